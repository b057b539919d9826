//! Replays one fuzz target's corpus (`fuzz/corpus/<target>/`: the seeds and
//! any input that once broke a property) through the check the target runs.
//! Each crate's `tests/fuzz_corpus.rs` includes this file by path, so every
//! `cargo test` on stable re-checks the corpora without nightly or
//! cargo-fuzz.

use std::path::Path;

/// Runs every file of `fuzz/corpus/<target>` through `check`, naming the
/// file that breaks a property, and asserts that the corpus covers both
/// sides of the check: one that is all accepted or all refused would leave
/// the properties of the other side untested.
pub fn replay(target: &str, check: fn(&[u8]) -> bool) {
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
    let files = entries.len();
    assert!(files >= 5, "{target}: only {files} corpus files");
    assert!(accepted > 0, "{target}: no corpus input is accepted");
    assert!(accepted < files, "{target}: every corpus input is accepted");
}
