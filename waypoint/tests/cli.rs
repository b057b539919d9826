//! The `waypoint` binary as a user or a Deployment runs it, before it serves.

use std::process::Command;

fn waypoint(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(args)
        .output()
        .expect("the waypoint binary runs")
}

#[test]
fn run_refuses_to_pretend_to_serve() {
    let out = waypoint(&["run"]);
    assert!(
        !out.status.success(),
        "`waypoint run` must fail until it serves"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not yet serving: see issue 16"), "{stderr}");
}

#[test]
fn version_and_help_work() {
    let out = waypoint(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("waypoint {}", env!("CARGO_PKG_VERSION"))
    );
    let out = waypoint(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("run"));
}
