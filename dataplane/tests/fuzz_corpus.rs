//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and any
//! crash found) through the same checks the fuzz targets run, so every
//! `cargo test` on stable re-checks them without nightly or cargo-fuzz.

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn connect_head_corpus() {
    replay::replay(
        "connect_head",
        meshbox_dataplane::proxy::connect_head::fuzz_connect_head,
    );
}
