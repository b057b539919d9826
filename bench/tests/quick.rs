//! CI's performance regression test: runs the real `bench all --quick` and
//! checks its report.json — every regression check (figures that do not
//! depend on the machine's speed: bytes per change, encodings per change,
//! heap per pod, memory per idle connection, ...) present and passing, no
//! part failed. Never a wall-clock threshold.
//!
//! The capture, dataplane and waypoint parts need root, network namespaces
//! and tools (iperf3, wrk, h2load, nginx, the CNI plugins); without them
//! they are skipped with the reason printed — except in CI (`CI` set),
//! which must run them.
//! The meshbox binaries the parts start are the ones next to the bench
//! binary: `cargo test --workspace` builds them; alone, run
//! `cargo build --workspace` first.

use std::process::Command;
use std::time::Instant;

use serde_json::Value;

/// `section/row` of every check `bench` evaluates (bench/src/checks.rs):
/// a check silently dropped from the report fails here.
const EXPECTED_CHECKS: &[&str] = &[
    "xds/encodings_per_change_max",
    "xds/bytes_per_change_max",
    "xds/bytes_per_change_spread",
    "xds/sync_bytes_per_resource_max",
    "xds/server_heap_per_client_kib_max",
    "model/heap_per_pod_largest",
    "model/heap_per_pod_growth",
    "model/update_allocations_growth",
    "model/update_allocations_largest",
    "ca/failed_issuances",
    "capture/failed_adds",
    "capture/dataplane_kib_per_pod",
    "dataplane/kib_per_idle_connection_client",
    "dataplane/kib_per_idle_connection_server",
];

/// Parts that run anywhere; the others need root and tools.
const EVERYWHERE: &[&str] = &["model", "xds"];

#[test]
fn quick_mode_holds_every_regression_check() {
    let tmp = tempfile::Builder::new()
        .prefix("meshbox-bench-quick-")
        .tempdir()
        .expect("a temporary directory");
    let out = tmp.path();
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["all", "--quick", "--out"])
        .arg(out)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("bench runs");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let report: Value = serde_json::from_slice(
        &std::fs::read(out.join("report.json"))
            .unwrap_or_else(|e| panic!("no report.json ({e}); bench said:\n{stderr}")),
    )
    .expect("report.json is JSON");
    println!("bench all --quick took {:.0} s", took.as_secs_f64());

    assert_eq!(report["schema"], 1);
    assert_eq!(report["meta"]["quick"], true);
    let sections = report["sections"].as_array().expect("sections");
    let ids: Vec<&str> = sections.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(
        ids,
        ["ca", "model", "xds", "capture", "dataplane", "waypoint"]
    );
    let in_ci = std::env::var_os("CI").is_some();
    for s in sections {
        let (id, status) = (s["id"].as_str().unwrap_or(""), s["status"].as_str());
        match status {
            Some("ok") => {
                assert!(
                    !s["rows"].as_array().is_none_or(Vec::is_empty),
                    "{id}: no figures"
                );
                for chart in s["charts"].as_array().into_iter().flatten() {
                    let file = chart["file"].as_str().unwrap_or_default();
                    let svg = std::fs::read_to_string(out.join(file)).unwrap_or_default();
                    assert!(svg.starts_with("<svg"), "{id}: chart {file} missing");
                }
            }
            Some("skipped") => {
                let reason = s["reason"].as_str().unwrap_or_default();
                println!("SKIPPED {id}: {reason}");
                assert!(
                    !EVERYWHERE.contains(&id),
                    "{id} runs on any machine, but was skipped: {reason}"
                );
                assert!(!in_ci, "CI must run the {id} part: {reason}");
            }
            _ => panic!(
                "{id} failed: {}\nbench said:\n{stderr}",
                s["error"].as_str().unwrap_or("?")
            ),
        }
    }

    let checks = report["checks"].as_array().expect("checks");
    for expected in EXPECTED_CHECKS {
        assert!(
            checks.iter().any(|c| c["id"] == *expected),
            "check {expected} is not in the report"
        );
    }
    let mut failed = vec![];
    for c in checks {
        let id = c["id"].as_str().unwrap_or_default();
        match c["result"].as_str() {
            Some("pass") => println!("pass  {id} = {} ({})", c["value"], c["bound"]),
            Some("skipped") => println!("skip  {id}: {}", c["reason"]),
            _ => failed.push(format!(
                "{id} = {} (bound {}): {} — {}",
                c["value"], c["bound"], c["what"], c["reason"]
            )),
        }
    }
    assert!(
        failed.is_empty(),
        "regression checks failed:\n{}",
        failed.join("\n")
    );
    assert!(
        run.status.success(),
        "bench exited with {}:\n{stderr}",
        run.status
    );
}
