//! Replays the fuzz corpus (`fuzz/corpus/<target>/`: the seeds and any
//! crash found) through the same checks the fuzz targets run, so every
//! `cargo test` on stable re-checks them without nightly or cargo-fuzz.

use std::path::Path;

/// Runs every file of `fuzz/corpus/<target>` through `check`, naming the
/// file that breaks a property. Returns (files, accepted).
fn replay(target: &str, check: fn(&[u8]) -> bool) -> (usize, usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    entries.sort();
    let mut accepted = 0;
    for path in &entries {
        let data = std::fs::read(path).expect("corpus file");
        match std::panic::catch_unwind(|| check(&data)) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => panic!("{} breaks a property (see the panic above)", path.display()),
        }
    }
    (entries.len(), accepted)
}

/// The seeds cover both sides of each check: a corpus that is all accepted
/// or all refused would leave the properties of the other side untested.
fn assert_covers_both(target: &str, (files, accepted): (usize, usize)) {
    assert!(files >= 5, "{target}: only {files} corpus files");
    assert!(accepted > 0, "{target}: no corpus input is accepted");
    assert!(accepted < files, "{target}: every corpus input is accepted");
}

#[test]
fn delta_request_corpus() {
    assert_covers_both(
        "delta_request",
        replay(
            "delta_request",
            meshbox_controlplane::fuzzing::delta_request,
        ),
    );
}

#[test]
fn manifest_corpus() {
    assert_covers_both(
        "manifest",
        replay("manifest", meshbox_controlplane::fuzzing::manifest),
    );
}
