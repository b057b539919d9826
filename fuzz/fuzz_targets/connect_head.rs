#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshbox_dataplane::proxy::connect_head::fuzz_connect_head(data);
});
