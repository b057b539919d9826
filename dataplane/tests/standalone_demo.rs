//! The standalone demo (`examples/demo.sh`), run as a user runs it, with
//! the binaries of this build: its story must be told (pods captured, a
//! cross-node request over HBONE with both SPIFFE identities, a policy
//! denial, a certificate issued with curl and verified) and nothing it
//! made may be left behind — after a normal run, after Ctrl-C, and after a
//! run that was killed outright (the next run cleans up for it).
//!
//! Needs root and the demo's tools (iproute2, iptables, util-linux, curl,
//! openssl, python3); skipped with a reason otherwise, required in CI.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigHandler, Signal, signal};

#[path = "support/sibling.rs"]
mod sibling;

/// One demo at a time: they share the `mbd-` names (the script refuses a
/// second one).
static ONE_DEMO: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

const TOOLS: [&str; 8] = [
    "ip",
    "iptables",
    "iptables-restore",
    "nsenter",
    "runuser",
    "curl",
    "openssl",
    "python3",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the dataplane crate is inside the workspace")
        .to_path_buf()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// The directory holding this build's `dataplane`, `controlplane` and
/// `waypoint`, or
/// why the demo cannot run here.
fn prerequisites() -> Result<PathBuf, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("the demo needs root (network namespaces, iptables)".into());
    }
    let missing: Vec<&str> = TOOLS.into_iter().filter(|t| !on_path(t)).collect();
    if !missing.is_empty() {
        return Err(format!("the demo needs {}", missing.join(", ")));
    }
    let dataplane = Path::new(env!("CARGO_BIN_EXE_dataplane"));
    let dir = dataplane
        .parent()
        .ok_or("no directory around the dataplane binary")?;
    // The controlplane and waypoint binaries are other packages'.
    sibling::controlplane_binary(dir)?;
    sibling::waypoint_binary(dir)?;
    Ok(dir.to_path_buf())
}

/// `None` (after printing why) when the demo cannot run on this machine;
/// CI must be able to run it, so there it fails instead.
fn bin_dir_or_skip() -> Option<PathBuf> {
    match prerequisites() {
        Ok(dir) => Some(dir),
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs the standalone demo: {why}"
            );
            eprintln!("SKIPPED: standalone demo: {why}");
            None
        }
    }
}

/// A base port for the demo whose eight ports on 127.0.0.1 are free now.
fn free_base_port() -> u16 {
    let offsets = [0u16, 12, 14, 20, 21, 100, 120, 121];
    for attempt in 0..50u32 {
        let base = 20000 + ((std::process::id() * 7 + attempt * 131) % 400) as u16 * 100;
        if offsets
            .iter()
            .all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok())
        {
            return base;
        }
    }
    panic!("no free range of ports for the demo");
}

/// A running `examples/demo.sh`, its output (stdout and stderr) collected
/// line by line.
struct Demo {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr; they end at end of file.
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Demo {
    fn start(bin_dir: &Path, keep: bool) -> Self {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("examples/demo.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--base-port")
            .arg(free_base_port().to_string())
            .env("NO_COLOR", "1")
            .env_remove("MESHBOX_BIN_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if keep {
            cmd.arg("--keep");
        }
        // The Ctrl-C test stands in for a terminal, so the script starts as
        // one would start it: SIGINT at its default action. A test run as a
        // background job of a non-interactive shell inherits SIGINT ignored,
        // and bash cannot trap a signal that was ignored when it started.
        // SAFETY: only sigaction, which is async-signal-safe, runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                signal(Signal::SIGINT, SigHandler::SigDfl)
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().expect("bash runs");
        let output = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ];
        let mut readers = Vec::new();
        for pipe in pipes.into_iter().flatten() {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            }));
        }
        Self {
            child,
            output,
            readers,
            started: Instant::now(),
        }
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Sends `signal` (a name such as `INT`) to the script.
    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Waits for an output line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self
            .output
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the demo ended ({status}) before {needle:?}:\n{}",
                    self.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} from the demo:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the script to exit (SIGTERM, then SIGKILL, if it hangs);
    /// its status and the whole output. `survivors`: processes the script
    /// started may outlive it (it was killed), so its output may never
    /// reach end of file; take what has arrived.
    fn finish(&mut self, survivors: bool) -> (ExitStatus, String, Duration) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                self.signal("TERM");
                std::thread::sleep(Duration::from_secs(10));
                let _ = self.child.kill();
                panic!("the demo did not finish in time:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let elapsed = self.started.elapsed();
        // The output is complete once both readers reached end of file,
        // i.e. every process the demo started has closed its end. One
        // still holding it after the demo exited is a leftover: fail.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !survivors && !self.readers.iter().all(|r| r.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "something the demo started still holds its output open:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        (status, self.text(), elapsed)
    }
}

/// A test that fails half-way must not leave a `--keep` demo running: it
/// gets Ctrl-C and cleans up as it would for a user.
impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("INT");
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.wait();
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The demo's work directory, as its output names it.
fn work_dir(output: &str) -> Option<String> {
    let at = output.find("--config-dir ")? + "--config-dir ".len();
    let path = output[at..].split_whitespace().next()?;
    Some(path.trim_end_matches("/config").to_owned())
}

/// What a demo may have left: its namespaces, links, work directory and
/// processes (anything still running with the work directory in its
/// command line).
fn leftovers(work: Option<&str>) -> Vec<String> {
    let mut left = Vec::new();
    left.extend(
        run("ip", &["netns", "list"])
            .lines()
            .filter(|l| l.starts_with("mbd-"))
            .map(|l| format!("netns {l}")),
    );
    left.extend(
        run("ip", &["-o", "link", "show"])
            .lines()
            .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("mbd")))
            .map(|l| format!("link {l}")),
    );
    if let Some(work) = work {
        if Path::new(work).exists() {
            left.push(format!("directory {work}"));
        }
        left.extend(processes_of(work));
    }
    let run_file = std::env::temp_dir().join("mbd-demo.run");
    if run_file.exists() {
        left.push(format!("file {}", run_file.display()));
    }
    left
}

/// Processes running with `work` in their command line.
fn processes_of(work: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(work) {
            found.push(format!("process {}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// The lines of `output` from the one containing `from` up to (not
/// including) the next one containing `to`, joined with spaces (the
/// script folds long log lines).
fn section<'a>(output: &'a str, from: &str, to: &str) -> String {
    let lines: Vec<&'a str> = output
        .lines()
        .skip_while(|l| !l.contains(from))
        .skip(1)
        .take_while(|l| !l.contains(to))
        .map(str::trim)
        .collect();
    lines.join(" ")
}

#[test]
fn the_demo_tells_its_story_and_leaves_nothing_behind() {
    let Some(bin_dir) = bin_dir_or_skip() else {
        return;
    };
    let _one = ONE_DEMO.lock();

    let mut demo = Demo::start(&bin_dir, false);
    let (status, out, elapsed) = demo.finish(false);
    eprintln!("{out}");
    eprintln!("the demo took {:.1} s", elapsed.as_secs_f64());
    assert!(status.success(), "the demo failed ({status}):\n{out}");
    let has = |needle: &str| {
        assert!(out.contains(needle), "no {needle:?} in the demo's output");
    };

    // Enrolled pods captured by their node's dataplane; the pod outside
    // the mesh left alone.
    has("node-a: captured demo/sleep (10.55.1.10) in /var/run/netns/mbd-sleep");
    has("node-b: captured demo/web-1 (10.55.2.10) in /var/run/netns/mbd-web-1");
    has("node-b: captured demo/web-2 (10.55.2.11) in /var/run/netns/mbd-web-2");
    assert!(!out.contains("captured legacy"), "legacy was captured");
    has("legacy/legacy  node-a  10.55.1.20  not enrolled");
    // Certificates held, with serial and expiry.
    for (node, sa) in [("node-a", "sleep"), ("node-b", "web")] {
        let line = out
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "{node}: spiffe://cluster.local/ns/demo/sa/{sa}  serial "
                ))
            })
            .unwrap_or_else(|| panic!("no certificate for {sa} on {node}"));
        assert!(line.contains("valid until 20"), "{line}");
    }

    // The request through the VIP reaches both replicas on the other node,
    // from sleep's own address.
    has("hello from web-1 on node-b, you are 10.55.1.10");
    has("hello from web-2 on node-b, you are 10.55.1.10");
    let outbound = section(
        &out,
        "node-a, leaving sleep's namespace:",
        "node-b, arriving",
    );
    for field in [
        r#"src.identity="spiffe://cluster.local/ns/demo/sa/sleep""#,
        r#"dst.identity="spiffe://cluster.local/ns/demo/sa/web""#,
        r#"dst.service="web.demo.svc.cluster.local""#,
        r#"direction="outbound""#,
    ] {
        assert!(
            outbound.contains(field),
            "{field} not in node-a's line: {outbound}"
        );
    }
    assert!(
        outbound.contains(":15008 "),
        "not carried over HBONE: {outbound}"
    );
    let inbound = section(
        &out,
        "node-b, arriving in the web pod's namespace:",
        "mutual TLS",
    );
    for field in [
        r#"src.identity="spiffe://cluster.local/ns/demo/sa/sleep""#,
        r#"dst.identity="spiffe://cluster.local/ns/demo/sa/web""#,
        r#"direction="inbound""#,
    ] {
        assert!(
            inbound.contains(field),
            "{field} not in node-b's line: {inbound}"
        );
    }
    has("in plaintext: \"hello from web-1 on node-b, you are 10.55.1.20\"");

    // The policy: written, delivered, and the next request refused by the
    // web pods' dataplane for sleep's identity.
    has("node-b's dataplane has demo/deny-sleep");
    let after_policy = section(&out, "node-b's dataplane has demo/deny-sleep", "[8/11]");
    assert!(
        after_policy.contains("curl: ("),
        "the request was not refused: {after_policy}"
    );
    assert!(!after_policy.contains("hello from"), "{after_policy}");
    let denial = section(&out, "connection denied by authorization policy", "denied:");
    assert!(
        denial.contains("src.identity=spiffe://cluster.local/ns/demo/sa/sleep")
            && denial.contains(r#"reason=DenyPolicyMatched("demo/deny-sleep")"#),
        "{denial}"
    );

    // The PeerAuthentication: converted, listed on web-1, and legacy's
    // plaintext refused and counted by web-1's dataplane.
    let strict = "istio-system/istio_converted_static_strict";
    has(&format!("web-1 lists {strict} on node-b's dataplane"));
    has(&format!(
        "{strict}: DENY WORKLOAD_SELECTOR [[[{{\"notPrincipals\": [\"*\"]}}]]]  <- PeerAuthentication demo/default"
    ));
    let after_strict = section(&out, "web-1 lists", "refused: legacy");
    assert!(
        after_strict.contains("curl: ("),
        "legacy's plaintext was not refused: {after_strict}"
    );
    assert!(!after_strict.contains("hello from"), "{after_strict}");
    assert!(
        after_strict.contains(&format!("reason=DenyPolicyMatched(\"{strict}\")")),
        "{after_strict}"
    );
    let refused: f64 = out
        .lines()
        .find(|l| l.contains("meshbox_proxy_connections_refused") && l.contains("policy_denied"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no policy_denied refusal counter: {after_strict}"));
    // sleep's refused request counts too: at least one more for legacy.
    assert!(refused >= 2.0, "{refused}: {after_strict}");
    has("accepted once more: \"hello from web-1 on node-b, you are 10.55.1.20\"");

    // The waypoint: the HTTP policy decided per request (GET allowed, POST
    // 403 from the waypoint, on sleep's verified identity), and the route
    // splitting one connection's requests 90/10.
    has("demo/allow-get: ALLOW scope WAYPOINT, enforced by waypoint demo/waypoint");
    has("200 hello from web-1 on node-b");
    has("403 RBAC: access denied");
    let access = section(
        &out,
        "the waypoint's access log (one line per request):",
        "GET allowed",
    );
    for field in [
        "method=POST",
        "response_code=403",
        "src.identity=spiffe://cluster.local/ns/demo/sa/sleep",
        "detail=NoAllowPolicyMatched",
    ] {
        assert!(
            access.contains(field),
            "{field} not in the access log: {access}"
        );
    }
    let count = |version: &str| -> u32 {
        out.lines()
            .find(|l| l.contains(&format!("(version {version}):")))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count for {version}"))
    };
    let (v1, v2) = (count("v1"), count("v2"));
    assert_eq!(v1 + v2, 100, "{v1} + {v2}");
    // 10 expected; 1..=30 is well over six standard deviations wide.
    assert!((1..=30).contains(&v2), "a 90/10 split gave {v1}/{v2}");

    // The certificate from the REST API verifies against the mesh root.
    has("reporter-chain.pem: OK");
    has("URI:spiffe://cluster.local/ns/demo/sa/reporter");
    has("spiffe://cluster.local/ns/demo/sa/sleep  for node:node-a");

    has("nothing left");
    let work = work_dir(&out);
    assert!(work.is_some(), "no work directory in the output");
    assert_eq!(leftovers(work.as_deref()), Vec::<String>::new());
    // No bound on `elapsed`: on a loaded machine the demo is slower, not
    // wrong. `finish` fails on a real hang (120 s).
}

#[test]
fn after_a_killed_run_and_after_ctrl_c_nothing_is_left() {
    let Some(bin_dir) = bin_dir_or_skip() else {
        return;
    };
    let _one = ONE_DEMO.lock();

    // A run killed outright (no trap runs) leaves its mesh behind...
    let mut killed = Demo::start(&bin_dir, true);
    killed.wait_for("Ctrl-C to stop");
    killed.signal("KILL");
    let (_, out, _) = killed.finish(true);
    let first_work = work_dir(&out);
    assert!(
        !processes_of(first_work.as_deref().unwrap_or("?")).is_empty(),
        "a killed demo left nothing, so the next run has nothing to clean"
    );

    // ... which the next run removes before it starts.
    let mut interrupted = Demo::start(&bin_dir, true);
    interrupted.wait_for("Ctrl-C to stop");
    assert!(
        interrupted
            .text()
            .contains("removed what an earlier run left behind"),
        "{}",
        interrupted.text()
    );
    let first_work = first_work.expect("the killed run named its work directory");
    assert!(
        !Path::new(&first_work).exists(),
        "{first_work} is still there"
    );
    assert_eq!(processes_of(&first_work), Vec::<String>::new());
    // While it runs, the mesh answers from outside the script too.
    let reply = run(
        "ip",
        &[
            "netns",
            "exec",
            "mbd-legacy",
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://10.55.2.11:8080/",
        ],
    );
    assert_eq!(reply, "hello from web-2 on node-b, you are 10.55.1.20\n");

    // Ctrl-C: the script cleans up and says so.
    interrupted.signal("INT");
    let (status, out, _) = interrupted.finish(false);
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("nothing left"), "{out}");
    assert_eq!(leftovers(work_dir(&out).as_deref()), Vec::<String>::new());
}

#[test]
fn the_demo_script_is_shellcheck_clean() {
    if !on_path("shellcheck") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI checks the demo script with shellcheck: install it"
        );
        eprintln!("SKIPPED: shellcheck is not installed (apt-get install shellcheck)");
        return;
    }
    let out = Command::new("shellcheck")
        .arg(repo().join("examples/demo.sh"))
        .output()
        .expect("shellcheck runs");
    assert!(
        out.status.success(),
        "shellcheck examples/demo.sh:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
