//! A whole mesh on loopback for end-to-end tests: the real control plane
//! (in-process, on its own runtime so it can be killed and restarted), real
//! `dataplane` processes in dedicated mode, one per workload, each on its
//! own 127.x.y.z address, and small TCP apps. Traffic enters a dataplane
//! through its SOCKS5 listener, since nothing is captured without root.
//!
//! Each test uses its own `127.{net}.0.0/16`, so tests run in parallel
//! without port clashes.

#![allow(dead_code)]

pub mod netns;
pub mod sibling;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use meshbox_certs::SpiffeId;
use meshbox_controlplane::auth::local::LocalTokens;
use meshbox_controlplane::run::RunConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_dataplane");

/// The `meshbox-cni` binary, from the `cni/` crate (see [`sibling`]).
pub fn cni_plugin() -> PathBuf {
    let dir = Path::new(BIN)
        .parent()
        .expect("the dataplane binary is in a directory");
    sibling::sibling_binary(
        dir,
        "meshbox-cni",
        "meshbox-cni",
        &["cni/src", "cni/Cargo.toml"],
    )
    .unwrap_or_else(|error| panic!("{error}"))
}

/// The `waypoint` binary, from the `waypoint/` crate (see [`sibling`]).
pub fn waypoint_binary() -> PathBuf {
    let dir = Path::new(BIN)
        .parent()
        .expect("the dataplane binary is in a directory");
    sibling::waypoint_binary(dir).unwrap_or_else(|error| panic!("{error}"))
}

/// A spawned child's piped stdout and stderr, each to be read on a thread
/// of its own.
pub fn output_pipes(
    child: &mut std::process::Child,
) -> impl Iterator<Item = Box<dyn std::io::Read + Send>> {
    let stdout = child
        .stdout
        .take()
        .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>);
    stdout.into_iter().chain(stderr)
}

/// A fresh directory, removed on drop.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("meshbox-dp-{name}-"))
        .tempdir()
        .unwrap()
}

#[derive(Parser)]
struct RunArgs {
    #[command(flatten)]
    config: RunConfig,
}

/// The control plane on a runtime of its own: dropping it kills every task
/// it spawned, as a crashed process would.
pub struct ControlPlane {
    runtime: Option<tokio::runtime::Runtime>,
    /// Its gRPC (xDS + CA) address; free ports are picked at start so a
    /// developer's own control plane on 15012 does not get in the way.
    pub grpc: SocketAddr,
    /// Its REST API (HTTPS).
    pub rest: SocketAddr,
    args: Vec<String>,
}

/// `N` distinct free ports on `ip` (all held while picking, so no two are
/// the same). Free now is not free later: `ControlPlane::start` picks again
/// if one is taken by the time the control plane binds it.
fn free_ports<const N: usize>(ip: IpAddr) -> [SocketAddr; N] {
    let held = [(); N].map(|_| std::net::TcpListener::bind(SocketAddr::new(ip, 0)).unwrap());
    held.map(|listener| listener.local_addr().unwrap())
}

impl ControlPlane {
    pub fn start(addr: IpAddr, config_dir: &Path, state_dir: &Path, extra: &[&str]) -> Self {
        let mut attempts = 0;
        loop {
            let mut cp = Self::configure(addr, config_dir, state_dir, extra);
            match cp.try_boot() {
                Ok(()) => return cp,
                Err(error) if error.contains("Address already in use") && attempts < 5 => {
                    attempts += 1;
                    eprintln!("control plane ports taken meanwhile ({error}); picking others");
                }
                Err(error) => panic!("control plane did not start: {error}"),
            }
        }
    }

    fn configure(addr: IpAddr, config_dir: &Path, state_dir: &Path, extra: &[&str]) -> Self {
        let [grpc, rest] = free_ports(addr);
        let mut args: Vec<String> = [
            "controlplane",
            "--config-dir",
            config_dir.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--grpc-addr",
            &grpc.to_string(),
            "--rest-addr",
            &rest.to_string(),
            "--server-san",
            &addr.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self {
            runtime: None,
            grpc,
            rest,
            args,
        }
    }

    /// Starts the control plane and waits until its gRPC port answers, or
    /// until it stops with an error (returned).
    fn try_boot(&mut self) -> Result<(), String> {
        let config = RunArgs::try_parse_from(&self.args).unwrap().config;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            if let Err(e) = meshbox_controlplane::run::run(config).await {
                eprintln!("control plane stopped: {e:#}");
                let _ = stopped_tx.send(format!("{e:#}"));
            }
        });
        self.runtime = Some(runtime);
        // Only ends a hang.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&self.grpc, Duration::from_millis(200)).is_err()
        {
            if let Ok(error) = stopped.try_recv() {
                self.stop();
                return Err(error);
            }
            assert!(Instant::now() < deadline, "{} did not open", self.grpc);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn boot(&mut self) {
        if let Err(error) = self.try_boot() {
            panic!("control plane did not start again: {error}");
        }
    }

    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `dataplane run` process in dedicated mode for one workload.
pub struct Dataplane {
    child: Child,
    pub ip: IpAddr,
    /// SOCKS5, admin, metrics and readiness: free ports, picked at start.
    ports: [u16; 4],
    pub name: String,
    logs: Arc<Mutex<Vec<String>>>,
}

pub struct DataplaneSpec<'a> {
    pub ip: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub service_account: &'a str,
    /// `Some(node)`: node mode (`PROXY_MODE=shared`) with a node token,
    /// serving every pod on that node; `None`: dedicated to this pod.
    pub node: Option<&'a str>,
    pub extra: Vec<String>,
}

impl Dataplane {
    pub fn start(mesh: &Mesh, spec: DataplaneSpec<'_>) -> Self {
        Self::start_with_env(mesh, spec, &[])
    }

    /// [`start`](Self::start) with `env` added to the process's environment
    /// (e.g. libfaketime's, to skew one node's clock).
    pub fn start_with_env(mesh: &Mesh, spec: DataplaneSpec<'_>, env: &[(&str, &str)]) -> Self {
        let ip: IpAddr = spec.ip.parse().unwrap();
        let identity = format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            spec.namespace, spec.service_account
        );
        let token = match spec.node {
            Some(node) => mesh.node_token_file(node),
            None => mesh.token_file(&identity),
        };
        let at = |port: u16| SocketAddr::new(ip, port).to_string();
        let ports = free_ports::<4>(ip).map(|addr| addr.port());
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args(["--xds-address", &mesh.cp_url()])
            .args(["--xds-root-ca", mesh.root_cert().to_str().unwrap()])
            .args(["--auth-token", token.to_str().unwrap()])
            .args(match spec.node {
                Some(node) => vec![
                    "--proxy-mode".into(),
                    "shared".into(),
                    "--node-name".into(),
                    node.to_owned(),
                ],
                None => vec![
                    "--proxy-mode".into(),
                    "dedicated".into(),
                    "--proxy-workload-info".into(),
                    format!("{}/{}/{}", spec.namespace, spec.pod, spec.service_account),
                ],
            })
            .args(["--socks5-addr", &at(ports[0])])
            .args(["--admin-addr", &at(ports[1])])
            .args(["--metrics-addr", &at(ports[2])])
            .args(["--readiness-addr", &at(ports[3])])
            .args(&spec.extra)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "info")
            .env_remove("XDS_ADDRESS")
            .env_remove("CA_ADDRESS")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // In-pod mode opens its proxy listeners inside each pod, on the
        // standard ports; otherwise they go on this dataplane's address.
        if !spec.extra.iter().any(|a| a == "--inpod") {
            // Node mode captures in-pod by default; these meshes run on
            // loopback addresses, with no pod namespaces to capture in.
            if spec.node.is_some() {
                cmd.args(["--inpod", "false"]);
            }
            cmd.args(["--outbound-addr", &at(0)])
                .args(["--inbound-addr", &at(15008)])
                .args(["--inbound-plaintext-addr", &at(0)]);
        }
        let mut child = cmd.spawn().expect("dataplane starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let name = spec.pod.to_owned();
        for pipe in output_pipes(&mut child) {
            let logs = logs.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if std::env::var_os("MESHBOX_TEST_LOGS").is_some() {
                        eprintln!("[{name}] {line}");
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        Self {
            child,
            ip,
            ports,
            name,
            logs,
        }
    }

    /// A `waypoint run` process for the Gateway `namespace/gateway`, HBONE
    /// on `ip:15008`, with the token of the Gateway's service account (named
    /// after it). It shares this handle: logs, readiness, admin, metrics
    /// (no SOCKS5 port).
    pub fn start_waypoint(
        mesh: &Mesh,
        ip: &str,
        namespace: &str,
        gateway: &str,
        extra: &[&str],
    ) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        let token = mesh.token_file(&format!(
            "spiffe://cluster.local/ns/{namespace}/sa/{gateway}"
        ));
        let at = |port: u16| SocketAddr::new(ip, port).to_string();
        let ports = free_ports::<4>(ip).map(|addr| addr.port());
        let mut child = Command::new(waypoint_binary())
            .arg("run")
            .args(["--xds-address", &mesh.cp_url()])
            .args(["--xds-root-ca", mesh.root_cert().to_str().unwrap()])
            .args(["--auth-token", token.to_str().unwrap()])
            .args(["--namespace", namespace, "--gateway", gateway])
            .args(["--pod-name", &format!("{gateway}-0")])
            .args(["--inbound-addr", &at(15008)])
            .args(["--admin-addr", &at(ports[1])])
            .args(["--metrics-addr", &at(ports[2])])
            .args(["--readiness-addr", &at(ports[3])])
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "info")
            .env_remove("XDS_ADDRESS")
            .env_remove("CA_ADDRESS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("waypoint starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let name = format!("waypoint {gateway}");
        for pipe in output_pipes(&mut child) {
            let logs = logs.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if std::env::var_os("MESHBOX_TEST_LOGS").is_some() {
                        eprintln!("[{name}] {line}");
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        Self {
            child,
            ip,
            ports,
            name,
            logs,
        }
    }

    pub fn socks(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports[0])
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.ports[1])
    }

    pub fn inbound(&self) -> SocketAddr {
        SocketAddr::new(self.ip, 15008)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line containing every one of `needles`.
    pub async fn wait_for_log(&self, needles: &[&str]) -> String {
        self.wait_for_log_after(0, needles).await
    }

    /// A mark in the log: take it before an action, then
    /// [`wait_for_log_after`](Self::wait_for_log_after) finds only lines the
    /// action caused, never an earlier look-alike.
    pub fn log_mark(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    /// Waits for a line after `mark` containing every one of `needles`.
    pub async fn wait_for_log_after(&self, mark: usize, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self
                .logs()
                .into_iter()
                .skip(mark)
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needles:?}; logs:\n{}",
                self.name,
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) =
                http_get(SocketAddr::new(self.ip, self.ports[3]), "/healthz/ready").await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became ready; logs:\n{}",
                self.name,
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `/config_dump`, or `None` while the admin port is not up.
    pub async fn try_config_dump(&self) -> Option<serde_json::Value> {
        let (status, body) = http_get(self.admin(), "/config_dump").await.ok()?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin(), "/config_dump").await.unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    pub async fn metrics(&self) -> String {
        http_get(SocketAddr::new(self.ip, self.ports[2]), "/metrics")
            .await
            .unwrap()
            .1
    }

    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// SIGKILL: no drain, no cleanup, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; `None` if it did not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The control plane plus its manifest folder.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub cp: ControlPlane,
}

impl Mesh {
    /// A control plane on `127.{net}.0.1` serving `manifests`.
    pub fn start(name: &str, net: u8, manifests: &str, cp_args: &[&str]) -> Self {
        let dir = temp_dir(name);
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("config/mesh.yaml"), manifests).unwrap();
        let cp = ControlPlane::start(
            format!("127.{net}.0.1").parse().unwrap(),
            &dir.path().join("config"),
            &dir.path().join("state"),
            cp_args,
        );
        Self { dir, cp }
    }

    pub fn cp_url(&self) -> String {
        format!("https://{}", self.cp.grpc)
    }

    /// GET on the control plane's REST API, with curl as a user would.
    pub fn rest_get(&self, path: &str) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-sSf", "--max-time", "5", "--cacert"])
            .arg(self.root_cert())
            .arg(format!("https://{}{path}", self.cp.rest))
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn root_cert(&self) -> PathBuf {
        self.state_dir().join("root-cert.pem")
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        let path = self.dir.path().join("config").join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    pub fn remove_manifest(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.path().join("config").join(file));
    }

    /// A workload token (dedicated mode), in a file as `AUTH_TOKEN` wants.
    pub fn token_file(&self, identity: &str) -> PathBuf {
        let id: SpiffeId = identity.parse().unwrap();
        let token = self
            .tokens()
            .mint_for_identity(&id, Duration::from_secs(3600));
        self.write_token(id.service_account(), token.unwrap())
    }

    /// Whether the control plane knows pod `namespace/name` on `node`, as
    /// the node agent asks it (`EnrollmentService/Lookup`, over TLS with the
    /// node's token): `Some(enrolled)`, or `None` while it does not know
    /// the pod. What tests wait for instead of guessing how long loading a
    /// manifest takes.
    pub async fn enrollment(&self, node: &str, namespace: &str, name: &str) -> Option<bool> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        let pem = std::fs::read(self.root_cert()).unwrap();
        let channel = Endpoint::from_shared(self.cp_url())
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(self.cp.grpc.ip().to_string()),
            )
            .unwrap()
            .connect_lazy();
        // A file of its own: the running agent re-reads node-a.token.
        let token = self.tokens().mint_for_node(node, Duration::from_secs(3600));
        let token = self.write_token(&format!("{node}-lookup"), token.unwrap());
        meshbox_dataplane::inpod::EnrollmentLookup::new(
            channel,
            Some(meshbox_dataplane::token::TokenFile::new(token)),
        )
        .ask(namespace, name)
        .await
    }

    /// A node token (node mode).
    pub fn node_token_file(&self, node: &str) -> PathBuf {
        let token = self.tokens().mint_for_node(node, Duration::from_secs(3600));
        self.write_token(node, token.unwrap())
    }

    fn tokens(&self) -> LocalTokens {
        LocalTokens::load_or_create(&self.state_dir(), "cluster.local").unwrap()
    }

    fn write_token(&self, name: &str, token: String) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// The CA of this mesh, loaded from its state dir (to mint test
    /// certificates a real peer would never get).
    pub fn ca(&self) -> meshbox_certs::CertificateAuthority {
        meshbox_certs::CertificateAuthority::load_or_create(
            &self.state_dir(),
            None,
            meshbox_certs::ca::CaPolicy {
                trust_domain: "cluster.local".into(),
                default_ttl: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(86400),
            },
        )
        .unwrap()
    }
}

/// YAML for a Ready pod.
pub fn pod(name: &str, namespace: &str, sa: &str, node: &str, ip: &str, labels: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{{labels}}}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers: [{{name: app, image: test}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: "True"}}]
---
"#
    )
}

/// YAML for an AuthorizationPolicy in `default` on the pods labelled
/// `app: {app}`, with one rule: from `principal`.
pub fn policy(name: &str, action: &str, app: &str, principal: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: default
spec:
  selector:
    matchLabels: {{app: {app}}}
  action: {action}
  rules:
  - from:
    - source:
        principals: ["{principal}"]
---
"#
    )
}

pub fn ambient_namespace(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n"
    )
}

/// An echo server on `addr`: it first sends `{name}\n`, then echoes.
pub async fn echo_server(addr: SocketAddr, name: &str) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// Opens a connection to `target` through a SOCKS5 listener. `Err(reply)`
/// is the proxy's refusal code.
pub async fn socks_connect(socks: SocketAddr, target: SocketAddr) -> Result<TcpStream, u8> {
    let s = TcpStream::connect(socks).await.map_err(|_| 0xffu8)?;
    socks_handshake(s, target).await
}

/// Like [`socks_connect`], from `source` (how node mode tells pods apart).
pub async fn socks_connect_from(
    source: IpAddr,
    socks: SocketAddr,
    target: SocketAddr,
) -> Result<TcpStream, u8> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(source, 0)).unwrap();
    let s = sock.connect(socks).await.map_err(|_| 0xffu8)?;
    socks_handshake(s, target).await
}

/// `Err(0xfd)`: the proxy closed or reset the connection before answering
/// the greeting (a draining dataplane may have completed the TCP handshake
/// from its listen backlog, then reset it); `Err(0xfe)`: no reply to the
/// request; any other `Err`: the SOCKS reply code.
async fn socks_handshake(mut s: TcpStream, target: SocketAddr) -> Result<TcpStream, u8> {
    let mut method = [0u8; 2];
    if s.write_all(&[5, 1, 0]).await.is_err() || s.read_exact(&mut method).await.is_err() {
        return Err(0xfd);
    }
    assert_eq!(method, [5, 0]);
    let mut req = vec![5, 1, 0];
    match target.ip() {
        IpAddr::V4(v4) => {
            req.push(1);
            req.extend(v4.octets());
        }
        IpAddr::V6(v6) => {
            req.push(4);
            req.extend(v6.octets());
        }
    }
    req.extend(target.port().to_be_bytes());
    if s.write_all(&req).await.is_err() {
        return Err(0xfd);
    }
    let mut reply = [0u8; 10];
    match tokio::time::timeout(Duration::from_secs(15), s.read_exact(&mut reply)).await {
        Ok(Ok(_)) if reply[1] == 0 => Ok(s),
        Ok(Ok(_)) => Err(reply[1]),
        _ => Err(0xfe),
    }
}

/// Reads the echo server's greeting line.
pub async fn greeting(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) if b[0] == b'\n' => break,
            Ok(Ok(1)) => out.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8(out).unwrap()
}

/// Sends `msg` and reads it back.
pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
    Ok(back)
}

/// One echo exchange through `socks` to `target`; the echo server's name.
pub async fn ask(socks: SocketAddr, target: SocketAddr) -> Result<String, u8> {
    let mut s = socks_connect(socks, target).await?;
    let name = greeting(&mut s).await;
    if name.is_empty() {
        return Err(0xfd);
    }
    let back = roundtrip(&mut s, b"ping").await.map_err(|_| 0xfcu8)?;
    assert_eq!(back, b"ping");
    Ok(name)
}

/// Retries `ask` until it gives `want` (Ok or a refusal) or 10 s pass.
pub async fn eventually(
    socks: SocketAddr,
    target: SocketAddr,
    want_ok: bool,
) -> Result<String, u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ask(socks, target).await;
        if r.is_ok() == want_ok || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 GET: `(status, body)`.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_owned()))
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// HBONE peers for tests: a client built from the dataplane's own pool
/// and a server that accepts any CONNECT, with certificates minted straight
/// from a CA (so tests can make ones a real peer would never get).
pub mod hbone {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use meshbox_certs::{CertificateAuthority, SpiffeId, WorkloadKey};
    use meshbox_dataplane::identity::WorkloadCertificate;
    use meshbox_dataplane::proxy::pool::{Pool, PoolKey, PoolSettings, Tunnel};
    use meshbox_dataplane::proxy::socket::Sockets;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::Mesh;

    pub fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    /// A certificate for `identity` from `ca`, valid for `ttl`.
    pub fn cert(
        ca: &CertificateAuthority,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> WorkloadCertificate {
        meshbox_certs::install_crypto_provider();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca.sign_for_key(identity, &key, Some(ttl)).unwrap();
        WorkloadCertificate::from_ca_response(identity, &key, &issued.chain_pem).unwrap()
    }

    pub struct Client {
        pool: Pool,
        cert: WorkloadCertificate,
    }

    /// A client for `default/{sa}` with a certificate from the mesh's CA.
    pub fn client(mesh: &Mesh, sa: &str) -> Client {
        with_cert(cert(&mesh.ca(), &id(sa), Duration::from_secs(600)))
    }

    pub fn with_cert(cert: WorkloadCertificate) -> Client {
        Client {
            pool: Pool::new(
                PoolSettings {
                    max_streams: 10,
                    idle_timeout: Duration::from_secs(5),
                },
                Sockets::plain(),
            ),
            cert,
        }
    }

    impl Client {
        /// The same client, dialing from inside `netns`.
        pub fn in_netns(self, netns: Arc<meshbox_dataplane::netns::Netns>) -> Self {
            Client {
                pool: Pool::new(
                    PoolSettings {
                        max_streams: 10,
                        idle_timeout: Duration::from_secs(5),
                    },
                    Sockets::plain().in_netns(netns),
                ),
                cert: self.cert,
            }
        }

        /// CONNECTs to `authority` through `peer` (a 15008), expecting the
        /// server to be `default/{server_sa}`; errors as text.
        pub async fn connect(
            &self,
            peer: SocketAddr,
            server_sa: &str,
            authority: SocketAddr,
        ) -> Result<Tunnel, String> {
            let key = PoolKey::new(self.cert.identity.clone(), vec![id(server_sa)], peer);
            self.pool
                .connect(&key, &self.cert, None, authority)
                .await
                .map_err(|e| e.to_string())
        }
    }

    /// A stand-in waypoint: accepts every CONNECT, records its authority,
    /// greets with `{name}\n` and echoes.
    pub struct Server {
        pub authorities: Arc<Mutex<Vec<String>>>,
    }

    pub async fn server(addr: SocketAddr, cert: WorkloadCertificate, name: &str) -> Server {
        let config = Arc::new(
            meshbox_certs::tls::workload_server_config(
                cert.chain.clone(),
                cert.private_key(),
                &cert.roots,
                "cluster.local",
            )
            .unwrap(),
        );
        let listener = TcpListener::bind(addr).await.unwrap();
        let authorities = Arc::new(Mutex::new(Vec::new()));
        let seen = authorities.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                let seen = seen.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            let name = name.clone();
                            async move {
                                seen.lock().unwrap().push(req.uri().to_string());
                                let upgrade = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(up) = upgrade.await {
                                        let mut io = TokioIo::new(up);
                                        let _ = io.write_all(format!("{name}\n").as_bytes()).await;
                                        let (mut r, mut w) = tokio::io::split(io);
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new()))
                            }
                        });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Server { authorities }
    }
}

/// An HTTP app (HTTP/1.1 and HTTP/2 by prior knowledge) that answers every
/// request `200 {name} {method} {path-and-query}` (after N ms for
/// `/slow/N`; `503` for `/fail-on/{name}`), echoes each request
/// header whose name starts with `x-` as `echo-{name}`, and the authority it
/// was asked for (`:authority`, else Host) as `echo-authority`.
pub async fn http_app(addr: SocketAddr, name: &str) -> tokio::task::JoinHandle<()> {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = TcpListener::bind(addr).await.unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let name = name.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        if let Some(ms) = path.strip_prefix("/slow/").and_then(|n| n.parse().ok()) {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let target = req
                            .uri()
                            .path_and_query()
                            .map_or("/".to_owned(), |p| p.as_str().to_owned());
                        let mut response = hyper::Response::new(Full::new(bytes::Bytes::from(
                            format!("{name} {} {target}\n", req.method()),
                        )));
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.as_str().to_owned())
                            .or_else(|| {
                                req.headers()
                                    .get("host")
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_owned)
                            });
                        if let Some(value) =
                            authority.and_then(|a| hyper::header::HeaderValue::from_str(&a).ok())
                        {
                            response.headers_mut().insert("echo-authority", value);
                        }
                        if path.strip_prefix("/fail-on/") == Some(name.as_str()) {
                            *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        // HTTP/2 carries the authority once: a Host header
                        // next to `:authority` is what nginx refuses.
                        if req.version() == hyper::Version::HTTP_2
                            && req.headers().contains_key("host")
                        {
                            *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
                        }
                        for (header, value) in req.headers() {
                            if header.as_str().starts_with("x-")
                                && let Ok(echo) = hyper::header::HeaderName::from_bytes(
                                    format!("echo-{header}").as_bytes(),
                                )
                            {
                                response.headers_mut().append(echo, value.clone());
                            }
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// An HTTP client on one connection (any byte stream: a SOCKS5 tunnel
/// through a dataplane, an HBONE stream).
pub enum HttpClient {
    Http1(hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>),
}

/// A response with its body read.
pub struct HttpResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl HttpClient {
    pub async fn http1<T>(io: T) -> Self
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        Self::Http1(sender)
    }

    pub async fn http2<T>(io: T) -> Self
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(io),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        Self::Http2(sender)
    }

    /// Sends one request (empty body unless `body` is given) and reads the
    /// whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<HttpResponse, String> {
        use http_body_util::BodyExt;
        let mut builder = hyper::Request::builder().method(method);
        builder = match self {
            Self::Http1(_) => builder.uri(path).header("host", "reviews"),
            Self::Http2(_) => builder.uri(format!("http://reviews{path}")),
        };
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default().to_owned(),
            )))
            .map_err(|e| e.to_string())?;
        let response = match self {
            Self::Http1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(request).await
            }
            Self::Http2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// [`request`](Self::request) without a body, as `(status, body)`.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let r = self
            .request(method, path, headers, None)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (r.status, r.body)
    }
}
