//! Pods as network namespaces on a bridge, for the tests that capture for
//! real (`inpod.rs`, `fault_matrix.rs`): a fabric namespace holding the
//! bridge, one namespace per pod, apps and clients inside them, and node
//! dataplanes in in-pod mode. Everything here needs root.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbox_dataplane::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{Dataplane, DataplaneSpec, Mesh};

/// Whether the tests that need network namespaces can run; not being root
/// skips them with a reason, except in CI, which runs them as root.
pub fn is_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the in-pod tests as root"
        );
        eprintln!("SKIPPED: in-pod capture tests need root (network namespaces, iptables)");
    }
    root
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces `{prefix}-fabric` (a bridge) and one per pod, removed on drop.
pub struct Topology {
    pub names: Vec<String>,
}

impl Topology {
    pub fn new(prefix: &str, pods: &[(&str, &str)]) -> Self {
        let fabric = format!("{prefix}-fabric");
        let names = vec![fabric.clone()];
        let _ = Command::new("ip").args(["netns", "del", &fabric]).output();
        ip(&["netns", "add", &fabric]);
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &fabric, "link", "set", "br0", "up"]);
        let mut topo = Self { names };
        for (i, (pod, addr)) in pods.iter().enumerate() {
            topo.add_pod(prefix, pod, addr, &format!("p{i}"));
        }
        topo
    }

    /// Adds a pod namespace after the fact, as a runtime creates a sandbox.
    pub fn add_pod(&mut self, prefix: &str, pod: &str, addr: &str, port: &str) {
        let fabric = format!("{prefix}-fabric");
        let ns = format!("{prefix}-{pod}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        self.names.push(ns.clone());
        ip(&[
            "-n", &fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        ip(&["-n", &fabric, "link", "set", port, "master", "br0", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    pub fn netns(&self, pod: &str) -> Arc<Netns> {
        let name = self
            .names
            .iter()
            .find(|n| n.ends_with(&format!("-{pod}")))
            .unwrap();
        Arc::new(Netns::open(format!("/var/run/netns/{name}")).unwrap())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// An app inside `ns`: greets with `{name} sees {peer ip}\n`, then echoes.
pub async fn app(ns: &Netns, addr: SocketAddr, name: &str) {
    let std_listener = ns
        .run(|| std::net::TcpListener::bind(addr))
        .expect("bind in the pod");
    std_listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std_listener).unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            let line = format!("{name} sees {}\n", peer.ip());
            tokio::spawn(async move {
                let _ = s.write_all(line.as_bytes()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// A connection made by an application inside `ns`.
pub async fn dial(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock =
        ns.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))?;
    sock.set_nonblocking(true)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    tokio::time::timeout(Duration::from_secs(5), sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

pub async fn greeting_line(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 128];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

/// What `from` gets back when it connects to `to`: the app's greeting, or
/// "" when the connection is refused, reset or closed without one.
pub async fn answer(from: &Netns, to: &str) -> String {
    match dial(from, to.parse().unwrap()).await {
        Ok(mut s) => greeting_line(&mut s).await,
        Err(_) => String::new(),
    }
}

pub fn node_proxy(mesh: &Mesh, node: &str, admin_ip: &str) -> Dataplane {
    node_proxy_with(mesh, node, admin_ip, &[])
}

pub fn node_proxy_with(mesh: &Mesh, node: &str, admin_ip: &str, more: &[&str]) -> Dataplane {
    node_proxy_env(mesh, node, admin_ip, more, &[])
}

/// A node dataplane in in-pod mode, with `env` added to its environment.
pub fn node_proxy_env(
    mesh: &Mesh,
    node: &str,
    admin_ip: &str,
    more: &[&str],
    env: &[(&str, &str)],
) -> Dataplane {
    Dataplane::start_with_env(
        mesh,
        DataplaneSpec {
            ip: admin_ip,
            namespace: "default",
            pod: node,
            service_account: "unused",
            node: Some(node),
            extra: ["--inpod", "true"]
                .iter()
                .chain(more)
                .map(|s| s.to_string())
                .collect(),
        },
        env,
    )
}

/// Whether the dataplane's `/config_dump` shows `pod` (of any namespace)
/// captured.
pub fn shows_captured(dump: &serde_json::Value, pod: &str) -> bool {
    dump["pods"].as_array().is_some_and(|pods| {
        pods.iter().any(|p| {
            p["uid"]
                .as_str()
                .is_some_and(|u| u.ends_with(&format!("/{pod}")))
                && p["state"] == "captured"
        })
    })
}

pub async fn wait_captured(dp: &Dataplane, pod: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dump = dp.try_config_dump().await.unwrap_or_default();
        if shows_captured(&dump, pod) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pod} never captured: {}",
            dump["pods"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
