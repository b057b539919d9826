#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshbox_cni::plugin::fuzzing::stdin(data);
});
