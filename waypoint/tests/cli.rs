//! The `waypoint` binary as a user or a Deployment starts it, before it
//! serves (serving is tested end to end in dataplane/tests/waypoint.rs).

use std::process::Command;

fn waypoint(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(args)
        .output()
        .expect("the waypoint binary runs")
}

#[test]
fn run_names_what_is_missing_or_wrong_and_serves_nothing() {
    let out = waypoint(&["run"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in ["--namespace", "--gateway"] {
        assert!(stderr.contains(flag), "{flag} not named: {stderr}");
    }
    let out = waypoint(&["run", "--namespace", "default", "--gateway", "wp"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("XDS_ADDRESS (--xds-address) is required"),
        "{stderr}"
    );
    // Bad values are refused before anything is bound or dialed.
    let out = waypoint(&[
        "run",
        "--xds-address",
        "https://127.0.0.1:1",
        "--namespace",
        "default",
        "--gateway",
        "wp",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("XDS_ROOT_CA"), "{stderr}");
    let out = waypoint(&[
        "run",
        "--xds-address",
        "http://127.0.0.1:1",
        "--namespace",
        "Default",
        "--gateway",
        "wp",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("namespace \"Default\""), "{stderr}");
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
