#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshbox_controlplane::fuzzing::delta_request(data);
});
