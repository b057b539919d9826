//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and any
//! crash found) through the same checks the fuzz targets run, so every
//! `cargo test` on stable re-checks them without nightly or cargo-fuzz.

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn delta_request_corpus() {
    replay::replay(
        "delta_request",
        meshbox_controlplane::fuzzing::delta_request,
    );
}

#[test]
fn manifest_corpus() {
    replay::replay("manifest", meshbox_controlplane::fuzzing::manifest);
}
