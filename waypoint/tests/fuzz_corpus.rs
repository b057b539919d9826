//! Replays the `waypoint_config` fuzz corpus (see fuzz/replay.rs).

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn waypoint_config_corpus() {
    replay::replay(
        "waypoint_config",
        meshbox_waypoint::fuzzing::fuzz_waypoint_config,
    );
}
