//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and any
//! crash found) through the same checks the fuzz targets run, so every
//! `cargo test` on stable re-checks them without nightly or cargo-fuzz.

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn cni_stdin_corpus() {
    replay::replay("cni_stdin", meshbox_cni::plugin::fuzzing::stdin);
}
