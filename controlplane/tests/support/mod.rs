//! Runs the real `controlplane` binary for end-to-end tests, and drives it
//! with the real `curl` and `openssl`, as a user would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_controlplane");

pub use tempfile::TempDir;

/// A fresh temporary directory, removed on drop; `name` shows in its path.
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("meshbox-test-{name}-"))
        .tempdir()
        .expect("a temporary directory")
}

/// Whether a command-line tool the tests need is installed. In CI a missing
/// tool is a failure (`.ci/run` installs them); elsewhere the test is skipped
/// with a printed reason.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// A running control plane on loopback with ephemeral ports.
pub struct ControlPlane {
    child: Child,
    pub state: PathBuf,
    pub config: PathBuf,
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    pub logs: Arc<Mutex<String>>,
    _dir: Arc<TempDir>,
}

impl ControlPlane {
    /// Starts with the manifest folder `config` (written from `manifests`) and
    /// the extra flags `args`.
    pub fn start(manifests: &[(&str, &str)], args: &[&str]) -> Self {
        let dir = Arc::new(temp_dir("cp"));
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        for (name, body) in manifests {
            std::fs::write(config.join(name), body).unwrap();
        }
        Self::start_in(dir, args)
    }

    /// Starts again on the same state and manifest folders.
    pub fn restart(self, args: &[&str]) -> Self {
        let dir = self._dir.clone();
        drop(self);
        Self::start_in(dir, args)
    }

    fn start_in(dir: Arc<TempDir>, args: &[&str]) -> Self {
        let state = dir.path().join("state");
        let config = dir.path().join("config");
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config-dir")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["--grpc-addr", "127.0.0.1:0", "--rest-addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start controlplane");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (mut grpc, mut rest) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while grpc.is_none() || rest.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "controlplane did not start; logs:\n{}",
                    logs.lock().unwrap()
                ),
            };
            let addr = || {
                line.split("addr=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            if line.contains("serving xDS and CA (gRPC over TLS)") {
                grpc = addr();
            } else if line.contains("serving the REST API") {
                rest = addr();
            }
        }
        Self {
            child,
            state,
            config,
            grpc: grpc.unwrap(),
            rest: rest.unwrap(),
            logs,
            _dir: dir,
        }
    }

    pub fn root_pem_path(&self) -> PathBuf {
        self.state.join("root-cert.pem")
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.root_pem_path()).unwrap()
    }

    pub fn rest_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.rest.port())
    }

    /// `controlplane token --identity` for this control plane.
    pub fn token_for_identity(&self, id: &str) -> String {
        token(&self.state, &["--identity", id])
    }

    /// `controlplane token --node` for this control plane.
    pub fn token_for_node(&self, node: &str) -> String {
        token(&self.state, &["--node", node])
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn token(state: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("token")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs curl; returns the HTTP status and the body.
pub fn curl(cp: &ControlPlane, args: &[&str], path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(cp.root_pem_path())
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(cp.rest_url(path))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// POSTs a CSR file with a token; returns status and body.
pub fn post_csr(cp: &ControlPlane, token: Option<&str>, csr: &Path, query: &str) -> (u16, String) {
    let mut args = vec!["--data-binary".to_owned(), format!("@{}", csr.display())];
    if let Some(token) = token {
        args.push("-H".into());
        args.push(format!("Authorization: Bearer {token}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(cp, &args, &format!("/api/v1/certificates{query}"))
}

/// Makes a key and CSR with openssl. `key` is an `openssl req -newkey` spec
/// such as `ec -pkeyopt ec_paramgen_curve:P-256` or `rsa:2048`; `san` the
/// subjectAltName value (empty for none).
pub fn openssl_csr(dir: &Path, name: &str, key: &str, san: &str) -> PathBuf {
    let csr = dir.join(format!("{name}.csr"));
    let key_path = dir.join(format!("{name}.key"));
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-new", "-nodes", "-subj", "/"]);
    cmd.arg("-newkey");
    cmd.args(key.split_whitespace());
    cmd.arg("-keyout").arg(&key_path).arg("-out").arg(&csr);
    if !san.is_empty() {
        cmd.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    csr
}

pub fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The files of `examples/bookinfo`, sorted by name.
pub fn example_manifests() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bookinfo");
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// A control plane on the bookinfo example folder.
pub fn start_bookinfo() -> ControlPlane {
    let files = example_manifests();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_str()))
        .collect();
    ControlPlane::start(&refs, &[])
}

/// A gRPC channel to the control plane's TLS port, trusting its root.
pub fn grpc_channel(cp: &ControlPlane) -> tonic::transport::Endpoint {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cp.root_pem()))
        .domain_name("localhost");
    tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{}", cp.grpc.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
}
