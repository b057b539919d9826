//! Another workspace package's binary, which `cargo test --workspace` builds
//! next to this package's before any test runs. Cargo gives this package no
//! `CARGO_BIN_EXE_` for it, and a test cannot build it itself (cargo may
//! hold the target directory's lock while tests run, so a nested `cargo
//! build` could wait forever): a missing or stale one is an error that says
//! what to run. Shared by `support` and `standalone_demo.rs` (by path).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The `controlplane` binary in `dir`, checked against everything it is
/// built from (its crate, and the certs and proto crates it links).
pub fn controlplane_binary(dir: &Path) -> Result<PathBuf, String> {
    sibling_binary(
        dir,
        "controlplane",
        "meshbox-controlplane",
        &[
            "controlplane/src",
            "controlplane/Cargo.toml",
            "certs/src",
            "certs/Cargo.toml",
            "proto/src",
            "proto/proto",
            "proto/build.rs",
            "proto/Cargo.toml",
        ],
    )
}

/// The `waypoint` binary in `dir`: it links the dataplane, so it is stale
/// whenever the dataplane's sources are newer too.
pub fn waypoint_binary(dir: &Path) -> Result<PathBuf, String> {
    sibling_binary(
        dir,
        "waypoint",
        "meshbox-waypoint",
        &[
            "waypoint/src",
            "waypoint/Cargo.toml",
            "dataplane/src",
            "dataplane/Cargo.toml",
            "certs/src",
            "certs/Cargo.toml",
            "proto/src",
            "proto/proto",
            "proto/build.rs",
            "proto/Cargo.toml",
        ],
    )
}

/// `dir/name`, built from `package`, provided it exists and is newer than
/// every file under `sources` (paths from the repository root). List only
/// what goes into the binary: test or bench sources would look newer
/// forever, since building the binary does not touch them.
pub fn sibling_binary(
    dir: &Path,
    name: &str,
    package: &str,
    sources: &[&str],
) -> Result<PathBuf, String> {
    let binary = dir.join(name);
    let build_it =
        format!("build it first: `cargo build -p {package}` (`cargo test --workspace` does)");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .map_err(|_| format!("{} is missing; {build_it}", binary.display()))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = sources
        .iter()
        .filter_map(|p| newest_file(&root.join(p)))
        .max();
    if newest.is_some_and(|newest| newest > built) {
        return Err(format!(
            "{} is older than its sources; {build_it}",
            binary.display()
        ));
    }
    Ok(binary)
}

/// The latest modification time of `path`, or of any file under it.
fn newest_file(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|entry| newest_file(&entry.path()))
        .max()
}
