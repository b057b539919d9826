#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    meshbox_waypoint::fuzzing::fuzz_waypoint_config(data);
});
