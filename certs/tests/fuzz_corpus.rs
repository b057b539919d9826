//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and any
//! crash found) through the same checks the fuzz targets run, so every
//! `cargo test` on stable re-checks them without nightly or cargo-fuzz.

#[path = "../../fuzz/replay.rs"]
mod replay;

#[test]
fn csr_corpus() {
    replay::replay("csr", meshbox_certs::fuzzing::csr);
}

#[test]
fn spiffe_id_corpus() {
    replay::replay("spiffe_id", meshbox_certs::fuzzing::spiffe_id);
}
