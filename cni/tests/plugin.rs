//! The `meshbox-cni` binary run exactly as a container runtime runs it:
//! `CNI_*` environment, the network configuration (with the primary
//! plugin's `prevResult`) on stdin, the result or a CNI error on stdout,
//! against a fake node agent built on `cni::serve`. No root needed, except
//! for the last test, which chains Debian's `bridge` + `host-local` plugins
//! and `meshbox-cni` in network namespaces of its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbox_cni::{self as cni, CaptureCommand, CaptureRequest, CaptureResponse};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

#[path = "support/cni_chain.rs"]
mod cni_chain;

use cni_chain::run_list;

const PLUGIN: &str = env!("CARGO_BIN_EXE_meshbox-cni");

/// A primary plugin's result, formatted unlike serde would (spacing, key
/// order), so a pass-through that re-serializes would show.
const PREV_RESULT: &str = r#"{ "cniVersion": "1.0.0",
  "interfaces": [ {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/cni-7f3a"} ],
  "ips": [ {"address": "10.244.1.5/24", "interface": 0, "gateway": "10.244.1.1"},
           {"address": "fd00:10:244:1::5/64", "interface": 0} ],
  "routes": [ {"dst": "0.0.0.0/0"} ],
  "dns": {} }"#;

const CNI_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
                        K8S_POD_INFRA_CONTAINER_ID=3f2a9c;K8S_POD_UID=0b6e5c1a-1d2e-4f00-9a7b-5e3c2d1f0a99";

/// A socket path in a directory of its own, removed on drop.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshbox-cni-{tag}-"))
            .tempdir()
            .unwrap();
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.path().join("cni.sock")
    }
}

/// A node agent that answers every request the same way and keeps them.
struct FakeAgent {
    dir: TempDir,
    requests: Arc<Mutex<Vec<CaptureRequest>>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    fn start(answer: CaptureResponse) -> Self {
        Self::start_with(move |_| answer.clone())
    }

    fn start_with(
        answer: impl Fn(&CaptureRequest) -> CaptureResponse + Send + Sync + 'static,
    ) -> Self {
        let dir = TempDir::new("agent");
        let listener = cni::listen(&dir.socket()).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let answer = Arc::new(answer);
        let server = tokio::spawn(cni::serve(listener, move |req| {
            let response = answer(&req);
            seen.lock().unwrap().push(req);
            async move { response }
        }));
        Self {
            dir,
            requests,
            server,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.socket()
    }

    fn requests(&self) -> Vec<CaptureRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn conf(socket: &Path, prev_result: Option<&str>) -> String {
    let mut text = format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"meshbox-cni","socket":{},"timeout":"3s""#,
        Value::from(socket.to_str().unwrap())
    );
    if let Some(prev) = prev_result {
        text += r#","prevResult":"#;
        text += prev;
    }
    text + "}"
}

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn error(&self) -> Value {
        assert_ne!(self.status, 0, "expected a failure; stdout {}", self.stdout);
        let error: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one CNI error ({e}): {:?}", self.stdout));
        assert!(error["cniVersion"].is_string(), "{error}");
        assert!(error["msg"].is_string(), "{error}");
        error
    }

    fn code(&self) -> u64 {
        self.error()["code"].as_u64().expect("a numeric code")
    }
}

/// Runs the plugin with `command`, the usual pod environment (overridden
/// by `env`, where `None` unsets) and `stdin`.
async fn cni(command: &str, env: &[(&str, Option<&str>)], stdin: &[u8]) -> Run {
    let mut vars = vec![
        ("CNI_COMMAND", Some(command)),
        ("CNI_CONTAINERID", Some("3f2a9c0d1e")),
        ("CNI_NETNS", Some("/var/run/netns/cni-7f3a")),
        ("CNI_IFNAME", Some("eth0")),
        ("CNI_ARGS", Some(CNI_ARGS)),
        ("CNI_PATH", Some("/opt/cni/bin")),
    ];
    for (key, value) in env {
        vars.retain(|(k, _)| k != key);
        vars.push((key, *value));
    }
    let mut cmd = tokio::process::Command::new(PLUGIN);
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in vars {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    // The plugin stops reading an oversized config: a broken pipe here.
    let _ = input.write_all(stdin).await;
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the plugin finishes")
        .unwrap();
    let run = Run {
        status: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 on stdout"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "the plugin panicked: {}",
        run.stderr
    );
    run
}

#[tokio::test]
async fn add_passes_prev_result_through_once_captured() {
    let agent = FakeAgent::start(CaptureResponse::captured());
    let run = cni(
        "ADD",
        &[],
        conf(&agent.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0, "{} {}", run.stdout, run.stderr);
    // Byte for byte, and so equal as JSON too.
    assert_eq!(run.stdout.trim_end(), PREV_RESULT);
    assert_eq!(
        serde_json::from_str::<Value>(&run.stdout).unwrap(),
        serde_json::from_str::<Value>(PREV_RESULT).unwrap()
    );

    let requests = agent.requests();
    assert_eq!(
        requests,
        vec![CaptureRequest {
            command: CaptureCommand::Add,
            container_id: "3f2a9c0d1e".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "0b6e5c1a-1d2e-4f00-9a7b-5e3c2d1f0a99".into(),
            netns: "/var/run/netns/cni-7f3a".into(),
            ips: vec![
                "10.244.1.5".parse().unwrap(),
                "fd00:10:244:1::5".parse().unwrap()
            ],
        }]
    );
    // The wire form is the documented contract.
    assert_eq!(
        serde_json::to_value(&requests[0]).unwrap(),
        json!({"command":"add","containerId":"3f2a9c0d1e","podNamespace":"shop","podName":"web-0",
               "podUid":"0b6e5c1a-1d2e-4f00-9a7b-5e3c2d1f0a99","netns":"/var/run/netns/cni-7f3a",
               "ips":["10.244.1.5","fd00:10:244:1::5"]})
    );
}

#[tokio::test]
async fn add_of_a_pod_that_is_not_enrolled_succeeds() {
    let agent = FakeAgent::start(CaptureResponse::not_captured());
    let run = cni(
        "ADD",
        &[],
        conf(&agent.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0, "{}", run.stdout);
    assert_eq!(run.stdout.trim_end(), PREV_RESULT);
}

#[tokio::test]
async fn add_without_prev_result_prints_a_minimal_result() {
    let agent = FakeAgent::start(CaptureResponse::captured());
    let mut env: Vec<(&str, Option<&str>)> = vec![("CNI_ARGS", None)];
    let run = cni("ADD", &env, conf(&agent.socket(), None).as_bytes()).await;
    assert_eq!(run.status, 0, "{}", run.stdout);
    assert_eq!(
        serde_json::from_str::<Value>(&run.stdout).unwrap(),
        json!({"cniVersion": "1.0.0"})
    );
    let req = &agent.requests()[0];
    assert!(req.ips.is_empty());
    assert_eq!(
        (req.pod_namespace.as_str(), req.pod_name.as_str()),
        ("", "")
    );

    // An older runtime's result (no cniVersion of its own) gets the config's.
    env.clear();
    let stdin = conf(
        &agent.socket(),
        Some(r#"{"ips":[{"version":"4","address":"10.9.0.2/16"}]}"#),
    )
    .replace("\"1.0.0\"", "\"0.3.1\"");
    let run = cni("ADD", &env, stdin.as_bytes()).await;
    assert_eq!(run.status, 0, "{}", run.stdout);
    assert_eq!(
        serde_json::from_str::<Value>(&run.stdout).unwrap(),
        json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.9.0.2/16"}]})
    );
    assert_eq!(
        agent.requests()[1].ips,
        vec!["10.9.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[tokio::test]
async fn add_fails_closed_when_the_agent_is_down() {
    let dir = TempDir::new("down");
    // No socket at all.
    let run = cni(
        "ADD",
        &[],
        conf(&dir.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.code(), 11, "{}", run.stdout);
    assert_eq!(run.error()["cniVersion"], "1.0.0");
    assert!(
        run.error()["details"]
            .as_str()
            .unwrap()
            .contains("cni.sock")
    );

    // A socket left behind by an agent that is gone.
    drop(cni::listen(&dir.socket()).unwrap());
    assert!(dir.socket().exists());
    let run = cni(
        "ADD",
        &[],
        conf(&dir.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.code(), 11, "{}", run.stdout);

    // The default socket path is used when the config names none (nothing
    // listens there in a test).
    if !Path::new(cni::DEFAULT_SOCKET).exists() {
        let stdin = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"meshbox-cni","prevResult":{PREV_RESULT}}}"#
        );
        let run = cni("ADD", &[], stdin.as_bytes()).await;
        assert_eq!(run.code(), 11);
        assert!(
            run.error()["details"]
                .as_str()
                .unwrap()
                .contains(cni::DEFAULT_SOCKET)
        );
    }
}

#[tokio::test]
async fn add_fails_when_the_agent_cannot_capture() {
    let agent = FakeAgent::start(CaptureResponse::error("iptables-restore: exit status 4"));
    let run = cni(
        "ADD",
        &[],
        conf(&agent.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.code(), 11);
    assert_eq!(run.error()["details"], "iptables-restore: exit status 4");
    assert_eq!(agent.requests().len(), 1);
}

#[tokio::test]
async fn add_gives_up_on_a_silent_agent_within_its_timeout() {
    let dir = TempDir::new("silent");
    let listener = tokio::net::UnixListener::bind(dir.socket()).unwrap();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            open.push(stream);
        }
    });
    let stdin = conf(&dir.socket(), Some(PREV_RESULT)).replace("\"3s\"", "\"300ms\"");
    let run = cni("ADD", &[], stdin.as_bytes()).await;
    assert_eq!(run.code(), 11);
    // It gave up after the configured 300 ms, not the 3 s default: the
    // error names the timeout it used. No bound on the elapsed time: a
    // loaded machine makes it slower, not wrong.
    let details = run.error()["details"].as_str().unwrap().to_owned();
    assert!(details.contains("within 300ms"), "{details}");
    hold.abort();
}

#[tokio::test]
async fn del_never_fails_because_of_the_agent() {
    // Down.
    let dir = TempDir::new("del");
    let run = cni(
        "DEL",
        &[("CNI_NETNS", None)],
        conf(&dir.socket(), None).as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0, "{} {}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "", "DEL prints nothing");
    assert!(run.stderr.contains("DEL"), "logged: {}", run.stderr);

    // Up but failing.
    let agent = FakeAgent::start(CaptureResponse::error("rules already gone"));
    let run = cni(
        "DEL",
        &[],
        conf(&agent.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0, "{}", run.stdout);
    assert_eq!(run.stdout, "");

    // Up: told, with what the runtime still knows; the netns may be gone.
    let agent = FakeAgent::start(CaptureResponse::not_captured());
    let run = cni(
        "DEL",
        &[("CNI_NETNS", None)],
        conf(&agent.socket(), None).as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0, "{}", run.stdout);
    let req = &agent.requests()[0];
    assert_eq!(req.command, CaptureCommand::Del);
    assert_eq!(req.container_id, "3f2a9c0d1e");
    assert_eq!(req.pod_uid, "0b6e5c1a-1d2e-4f00-9a7b-5e3c2d1f0a99");
    assert_eq!(req.netns, "");

    // Twice is fine.
    let run = cni(
        "DEL",
        &[("CNI_NETNS", None)],
        conf(&agent.socket(), None).as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0);
}

#[tokio::test]
async fn check_fails_for_an_enrolled_pod_that_is_not_captured() {
    let agent = FakeAgent::start_with(|req| match req.pod_name.as_str() {
        "web-0" => CaptureResponse::captured(),
        "batch-1" => CaptureResponse::not_captured(),
        _ => CaptureResponse::error("enrolled, but no listeners in its netns"),
    });
    let stdin = conf(&agent.socket(), Some(PREV_RESULT));
    let run = cni("CHECK", &[], stdin.as_bytes()).await;
    assert_eq!((run.status, run.stdout.as_str()), (0, ""));
    let run = cni(
        "CHECK",
        &[("CNI_ARGS", Some("K8S_POD_NAMESPACE=a;K8S_POD_NAME=batch-1"))],
        stdin.as_bytes(),
    )
    .await;
    assert_eq!((run.status, run.stdout.as_str()), (0, ""));
    let run = cni(
        "CHECK",
        &[("CNI_ARGS", Some("K8S_POD_NAMESPACE=a;K8S_POD_NAME=db-0"))],
        stdin.as_bytes(),
    )
    .await;
    assert_eq!(run.code(), 100);
    assert_eq!(
        run.error()["details"],
        "enrolled, but no listeners in its netns"
    );
    assert!(
        agent
            .requests()
            .iter()
            .all(|r| r.command == CaptureCommand::Check)
    );

    drop(agent);
    let dir = TempDir::new("check");
    let run = cni(
        "CHECK",
        &[],
        conf(&dir.socket(), Some(PREV_RESULT)).as_bytes(),
    )
    .await;
    assert_eq!(run.code(), 11);
    // CHECK came with 0.4.0.
    let old = conf(&dir.socket(), None).replace("\"1.0.0\"", "\"0.3.1\"");
    let run = cni("CHECK", &[], old.as_bytes()).await;
    assert_eq!(run.code(), 1);
}

#[tokio::test]
async fn version_lists_the_supported_versions() {
    let run = cni(
        "VERSION",
        &[
            ("CNI_CONTAINERID", None),
            ("CNI_NETNS", None),
            ("CNI_IFNAME", None),
        ],
        br#"{"cniVersion":"1.0.0"}"#,
    )
    .await;
    assert_eq!(run.status, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&run.stdout).unwrap(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    let run = cni("VERSION", &[], b"").await;
    assert_eq!(run.status, 0);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn status_and_gc() {
    let agent = FakeAgent::start(CaptureResponse::captured());
    let v11 = |socket: &Path| conf(socket, None).replace("\"1.0.0\"", "\"1.1.0\"");
    let bare = [
        ("CNI_CONTAINERID", None),
        ("CNI_NETNS", None),
        ("CNI_IFNAME", None),
        ("CNI_ARGS", None),
    ];
    let run = cni("STATUS", &bare, v11(&agent.socket()).as_bytes()).await;
    assert_eq!((run.status, run.stdout.as_str()), (0, ""), "{}", run.stderr);
    assert!(agent.requests().is_empty(), "a probe is not a request");
    let dir = TempDir::new("status");
    let run = cni("STATUS", &bare, v11(&dir.socket()).as_bytes()).await;
    assert_eq!(run.code(), 50);

    let gc = v11(&dir.socket()).replace(
        "\"timeout\"",
        r#""cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],"timeout""#,
    );
    let run = cni("GC", &bare, gc.as_bytes()).await;
    assert_eq!((run.status, run.stdout.as_str()), (0, ""));
    // Neither exists before 1.1.0.
    let run = cni("STATUS", &bare, conf(&agent.socket(), None).as_bytes()).await;
    assert_eq!(run.code(), 1);
}

#[tokio::test]
async fn bad_input_gets_a_cni_error_not_a_panic() {
    let agent = FakeAgent::start(CaptureResponse::captured());
    let good = conf(&agent.socket(), Some(PREV_RESULT));
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("empty stdin", Vec::new(), 6),
        ("not JSON", b"garbage\n".to_vec(), 6),
        ("truncated", good.as_bytes()[..good.len() / 2].to_vec(), 6),
        ("binary", vec![0xff, 0x00, 0xfe, b'{'], 6),
        ("wrong types", br#"{"cniVersion":5,"name":[]}"#.to_vec(), 6),
        (
            "no cniVersion",
            br#"{"name":"n","type":"meshbox-cni"}"#.to_vec(),
            6,
        ),
        (
            "unknown version",
            good.replace("\"1.0.0\",\"name\"", "\"9.9.9\",\"name\"")
                .into_bytes(),
            1,
        ),
        (
            "bad timeout",
            good.replace("\"3s\"", "\"soon\"").into_bytes(),
            7,
        ),
        (
            "bad prevResult ip",
            conf(
                &agent.socket(),
                Some(r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.1.999/24"}]}"#),
            )
            .into_bytes(),
            7,
        ),
        ("huge", vec![b' '; 2 * 1024 * 1024], 6),
    ];
    for (what, stdin, code) in cases {
        let run = cni("ADD", &[], &stdin).await;
        assert_eq!(run.code(), code, "{what}: {}", run.stdout);
    }

    for (what, env, code) in [
        ("no command", vec![("CNI_COMMAND", None)], 4),
        ("unknown command", vec![("CNI_COMMAND", Some("FROB"))], 4),
        ("no container id", vec![("CNI_CONTAINERID", None)], 4),
        (
            "bad container id",
            vec![("CNI_CONTAINERID", Some("../../etc"))],
            4,
        ),
        ("no netns", vec![("CNI_NETNS", None)], 4),
        ("no ifname", vec![("CNI_IFNAME", None)], 4),
        ("bad ifname", vec![("CNI_IFNAME", Some("eth0/../x"))], 4),
    ] {
        let run = cni("ADD", &env, good.as_bytes()).await;
        assert_eq!(run.code(), code, "{what}: {}", run.stdout);
    }
    // Malformed CNI_ARGS entries are skipped, the pod fields still found.
    let run = cni(
        "ADD",
        &[(
            "CNI_ARGS",
            Some("junk;K8S_POD_NAME=web-1;;=;K8S_POD_NAMESPACE=shop"),
        )],
        good.as_bytes(),
    )
    .await;
    assert_eq!(run.status, 0, "{}", run.stdout);
    // Nothing bad reached the agent.
    let requests = agent.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (
            requests[0].pod_namespace.as_str(),
            requests[0].pod_name.as_str()
        ),
        ("shop", "web-1")
    );
}

// --- chained after Debian's containernetworking-plugins (root only) -----

const CNI_DIR: &str = "/usr/lib/cni";

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Skips (with a reason) outside CI; in CI a missing prerequisite fails.
fn skip(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI must run the chained CNI test: {reason}");
    }
    println!("skipping the chained CNI test: {reason}");
}

fn ip(args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"))
}

/// Network namespaces deleted when the test ends, however it ends.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> Result<(), String> {
        let out = ip(&["netns", "add", &name]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        self.0.push(name);
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.0.iter().rev() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[tokio::test]
async fn chained_after_bridge_and_host_local() {
    if !is_root() {
        // Through skip(): under CI a non-root run fails instead of passing
        // without having tested anything.
        return skip("needs root (network namespaces)");
    }
    for plugin in ["bridge", "host-local"] {
        if !Path::new(CNI_DIR).join(plugin).exists() {
            return skip(&format!(
                "{CNI_DIR}/{plugin} is missing (apt-get install containernetworking-plugins)"
            ));
        }
    }
    let tag = format!(
        "{:x}",
        std::process::id() ^ (rand::random::<u32>() & 0xffff)
    );
    let host_ns = format!("mbcni-host-{tag}");
    let pod_ns = format!("mbcni-pod-{tag}");
    let mut namespaces = Namespaces(Vec::new());
    for ns in [&host_ns, &pod_ns] {
        if let Err(e) = namespaces.add(ns.clone()) {
            return skip(&format!("cannot create network namespace {ns}: {e}"));
        }
    }
    let netns = format!("/var/run/netns/{pod_ns}");

    // The agent checks the pod's interface is already up with its address
    // when asked: the plugin runs after the primary CNI, before the pod.
    let dir = TempDir::new("chain");
    let check_ns = pod_ns.clone();
    let agent = FakeAgent::start_with(move |req| {
        let out = ip(&["-n", &check_ns, "-o", "addr", "show", "dev", "eth0"]);
        let addrs = String::from_utf8_lossy(&out.stdout);
        match req.ips.first() {
            Some(ip) if addrs.contains(&format!("inet {ip}/")) => CaptureResponse::captured(),
            _ => CaptureResponse::error(format!("{:?} not on eth0: {addrs}", req.ips)),
        }
    });
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "meshbox-chain-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "mbcni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.250.7.0/24"}]],
                    "dataDir": dir.0.path().join("ipam"),
                },
            },
            {"type": "meshbox-cni", "socket": agent.socket(), "timeout": "5s"},
        ],
    });
    let cni_path = vec![
        PathBuf::from(CNI_DIR),
        Path::new(PLUGIN).parent().unwrap().to_path_buf(),
    ];
    let env = [
        ("CNI_CONTAINERID", "c0ffee0123"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", CNI_ARGS),
    ];

    // ADD, in order, each plugin given the previous one's result.
    let result = run_list(&host_ns, &cni_path, &list, "ADD", &env, None)
        .await
        .unwrap()
        .expect("a result");
    let address = result["ips"][0]["address"].as_str().unwrap();
    let pod_ip = address.split('/').next().unwrap();
    assert!(pod_ip.starts_with("10.250.7."), "{result}");

    let requests = agent.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.command, CaptureCommand::Add);
    assert_eq!(req.netns, netns);
    assert_eq!(req.container_id, "c0ffee0123");
    assert_eq!(
        (req.pod_namespace.as_str(), req.pod_name.as_str()),
        ("shop", "web-0")
    );
    assert_eq!(req.ips, vec![pod_ip.parse::<std::net::IpAddr>().unwrap()]);
    assert!(
        dir.0
            .path()
            .join("ipam/meshbox-chain-test")
            .join(pod_ip)
            .exists()
    );

    // CHECK, in order, with the final result.
    run_list(&host_ns, &cni_path, &list, "CHECK", &env, Some(&result))
        .await
        .unwrap();
    assert_eq!(
        agent.requests().last().unwrap().command,
        CaptureCommand::Check
    );

    // DEL, in reverse; the address goes back to host-local's pool.
    run_list(&host_ns, &cni_path, &list, "DEL", &env, Some(&result))
        .await
        .unwrap();
    assert_eq!(
        agent.requests().last().unwrap().command,
        CaptureCommand::Del
    );
    assert!(
        !dir.0
            .path()
            .join("ipam/meshbox-chain-test")
            .join(pod_ip)
            .exists()
    );

    // With the agent gone, a new pod is refused, and its DEL still passes.
    drop(agent);
    let failed = run_list(&host_ns, &cni_path, &list, "ADD", &env, None)
        .await
        .expect_err("ADD fails without the agent");
    assert!(failed.starts_with("meshbox-cni ADD"), "{failed}");
    assert!(failed.contains("\"code\":11"), "{failed}");
    // The runtime cleans up a failed ADD with DEL, in reverse.
    run_list(&host_ns, &cni_path, &list, "DEL", &env, None)
        .await
        .unwrap();
    drop(namespaces);
    assert!(!Path::new(&netns).exists());
}
