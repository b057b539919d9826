#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshbox_certs::fuzzing::csr(data);
});
