//! In-pod capture, for real: pods are network namespaces joined by a bridge
//! (in a namespace of their own, so no address of the machine is touched),
//! two node-mode dataplanes install the redirection rules inside them and
//! serve their listeners there; the applications do nothing special.
//!
//! Needs root (network namespaces, iptables); skipped with a reason
//! otherwise, and required in CI.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbox_dataplane::inpod::Netns;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn is_root() -> bool {
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

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn iptables_in(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iptables"])
        .args(args)
        .output()
        .expect("iptables runs");
    assert!(
        out.status.success(),
        "iptables {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets counted by the raw-table rule for `port` in `netns`.
fn link_packets(netns: &str, port: &str) -> u64 {
    let listing = iptables_in(netns, &["-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x"]);
    listing
        .lines()
        .find(|l| l.contains(&format!("dpt:{port}")))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter for port {port}:\n{listing}"))
}

/// Namespaces `{prefix}-fabric` (a bridge) and one per pod, removed on drop.
struct Topology {
    names: Vec<String>,
}

impl Topology {
    fn new(prefix: &str, pods: &[(&str, &str)]) -> Self {
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
    fn add_pod(&mut self, prefix: &str, pod: &str, addr: &str, port: &str) {
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

    fn netns(&self, pod: &str) -> Arc<Netns> {
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
async fn app(ns: &Netns, addr: SocketAddr, name: &str) {
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
async fn dial(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock =
        ns.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))?;
    sock.set_nonblocking(true)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    tokio::time::timeout(Duration::from_secs(5), sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn greeting_line(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 128];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

fn manifests() -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        "10.66.0.1",
        "app: client",
    );
    m += &pod(
        "server",
        "default",
        "echo",
        "node-b",
        "10.66.0.2",
        "app: echo",
    );
    // Outside the mesh: a namespace without the ambient label.
    m += "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n---\n";
    m += &pod(
        "legacy",
        "legacy",
        "legacy",
        "node-c",
        "10.66.0.4",
        "app: legacy",
    );
    // Scheduled, but its sandbox does not exist until the test makes it.
    m += &pod(
        "late",
        "default",
        "sleep",
        "node-a",
        "10.66.0.3",
        "app: late",
    );
    m
}

fn node_proxy(mesh: &Mesh, node: &str, admin_ip: &str) -> Dataplane {
    node_proxy_with(mesh, node, admin_ip, &[])
}

fn node_proxy_with(mesh: &Mesh, node: &str, admin_ip: &str, more: &[&str]) -> Dataplane {
    Dataplane::start(
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
    )
}

async fn wait_captured(dp: &Dataplane, pod: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dump = dp.try_config_dump().await.unwrap_or_default();
        let captured = dump["pods"].as_array().is_some_and(|pods| {
            pods.iter().any(|p| {
                p["uid"].as_str().is_some_and(|u| u.ends_with(pod)) && p["state"] == "captured"
            })
        });
        if captured {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_captured_in_their_namespace_and_stay_closed_while_the_dataplane_is_down() {
    if !is_root() {
        return;
    }
    let mut topo = Topology::new(
        "mbt17",
        &[
            ("client", "10.66.0.1"),
            ("server", "10.66.0.2"),
            ("legacy", "10.66.0.4"),
        ],
    );
    let mesh = Mesh::start("inpod", 17, &manifests(), &[]);
    let mut node_a = node_proxy(&mesh, "node-a", "127.17.1.1");
    let node_b = node_proxy(&mesh, "node-b", "127.17.2.1");
    let client_ns = topo.netns("client");
    let server_ns = topo.netns("server");
    app(&server_ns, "10.66.0.2:8080".parse().unwrap(), "server").await;
    wait_captured(&node_a, "client").await;
    wait_captured(&node_b, "server").await;
    node_a.wait_ready().await;
    node_b.wait_ready().await;

    // Count what arrives on the server pod's link, by destination port: the
    // raw table sees packets before any capture rule.
    for port in ["8080", "15008"] {
        iptables_in(
            "mbt17-server",
            &[
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-p",
                "tcp",
                "--dport",
                port,
            ],
        );
    }

    // The client app dials the server's pod IP, as if there were no mesh.
    let mut s = dial(&client_ns, "10.66.0.2:8080".parse().unwrap())
        .await
        .expect("captured traffic flows");
    assert_eq!(
        greeting_line(&mut s).await,
        "server sees 10.66.0.1",
        "original source kept"
    );
    s.write_all(b"over hbone").await.unwrap();
    let mut back = [0u8; 10];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"over hbone");
    drop(s);
    // On the wire between the nodes, only HBONE: nothing to the app's port.
    assert_eq!(
        link_packets("mbt17-server", "8080"),
        0,
        "application port seen on the link"
    );
    assert!(
        link_packets("mbt17-server", "15008") > 0,
        "HBONE seen on the link"
    );
    let out = node_a
        .wait_for_log(&["connection complete", r#"direction="outbound""#])
        .await;
    assert!(
        out.contains(r#"dst.identity="spiffe://cluster.local/ns/default/sa/echo""#),
        "{out}"
    );
    assert!(
        out.contains("dst.addr=10.66.0.2:15008"),
        "carried over HBONE: {out}"
    );
    let inb = node_b
        .wait_for_log(&["connection complete", r#"direction="inbound""#])
        .await;
    assert!(
        inb.contains(r#"src.identity="spiffe://cluster.local/ns/default/sa/sleep""#),
        "{inb}"
    );

    // A client outside the mesh reaches the enrolled server in plaintext:
    // captured on the server's side (TPROXY to 15006), authorized without
    // an identity, delivered from the client's own address.
    let legacy_ns = topo.netns("legacy");
    app(&legacy_ns, "10.66.0.4:8080".parse().unwrap(), "legacy").await;
    let mut s = dial(&legacy_ns, "10.66.0.2:8080".parse().unwrap())
        .await
        .expect("plaintext into the mesh");
    assert_eq!(greeting_line(&mut s).await, "server sees 10.66.0.4");
    drop(s);
    let plain = node_b
        .wait_for_log(&["connection complete", "src.addr=10.66.0.4:"])
        .await;
    assert!(plain.contains(r#"direction="inbound""#), "{plain}");
    assert!(
        !plain.contains("src.identity=\"spiffe"),
        "no identity in plaintext: {plain}"
    );
    // The same counter does see application-port traffic when there is some.
    assert!(
        link_packets("mbt17-server", "8080") > 0,
        "plaintext is visible on the link"
    );
    // And the enrolled client reaches the pod outside the mesh: plain TCP
    // from its own namespace, not re-captured (the proxy's mark).
    let mut s = dial(&client_ns, "10.66.0.4:8080".parse().unwrap())
        .await
        .expect("out of the mesh");
    assert_eq!(greeting_line(&mut s).await, "legacy sees 10.66.0.1");
    drop(s);

    // A pod cannot reach the dataplane's admin port: it listens on the
    // node's loopback, not in the pod.
    assert!(
        dial(&client_ns, "127.0.0.1:15000".parse().unwrap())
            .await
            .is_err(),
        "admin is not reachable from a pod"
    );

    // A DENY policy written to the manifest folder closes the path; the
    // time it took is printed (the issue asks for under a second).
    let written = Instant::now();
    mesh.write_manifest(
        "deny.yaml",
        &policy(
            "no-sleep",
            "DENY",
            "echo",
            "cluster.local/ns/default/sa/sleep",
        ),
    );
    let server: SocketAddr = "10.66.0.2:8080".parse().unwrap();
    loop {
        let served = match dial(&client_ns, server).await {
            Ok(mut s) => !greeting_line(&mut s).await.is_empty(),
            Err(_) => false,
        };
        if !served {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "the DENY policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "policy took effect {} ms after the manifest was written",
        written.elapsed().as_millis()
    );
    node_b
        .wait_for_log(&["denied by authorization policy", "sa/sleep"])
        .await;
    mesh.remove_manifest("deny.yaml");
    let reopened = Instant::now();
    loop {
        if let Ok(mut s) = dial(&client_ns, server).await
            && !greeting_line(&mut s).await.is_empty()
        {
            break;
        }
        assert!(
            reopened.elapsed() < Duration::from_secs(10),
            "removing the policy never reopened the path"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The client's dataplane dies (SIGKILL, no cleanup): its pod's traffic
    // is refused, never sent around the mesh in plaintext.
    node_a.kill();
    let mut leaked = false;
    if let Ok(mut s) = dial(&client_ns, "10.66.0.2:8080".parse().unwrap()).await {
        leaked = !greeting_line(&mut s).await.is_empty();
    }
    assert!(
        !leaked,
        "with the dataplane down, nothing reaches the server"
    );

    // It comes back and re-adopts the pod without touching it.
    let cni_socket = mesh.dir.path().join("cni.sock");
    let node_a = node_proxy_with(
        &mesh,
        "node-a",
        "127.17.1.1",
        &["--cni-socket", cni_socket.to_str().unwrap()],
    );
    wait_captured(&node_a, "client").await;
    node_a.wait_ready().await;
    let mut s = dial(&client_ns, "10.66.0.2:8080".parse().unwrap())
        .await
        .expect("traffic resumes");
    assert_eq!(greeting_line(&mut s).await, "server sees 10.66.0.1");

    drop(s);

    // A brand-new pod: the runtime makes its sandbox, the primary CNI gives
    // it an address, then the chained meshbox-cni runs — and when it
    // returns, the pod is already captured, before its first connection.
    topo.add_pod("mbt17", "late", "10.66.0.3", "p9");
    let late_ns = topo.netns("late");
    let prev_result = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/mbt17-late"}],"ips":[{"address":"10.66.0.3/24","interface":0}]}"#;
    let config = format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"meshbox-cni","socket":"{}","prevResult":{prev_result}}}"#,
        cni_socket.display()
    );
    let mut cni = Command::new(env!("CARGO_BIN_EXE_meshbox-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "late-sandbox")
        .env("CNI_NETNS", "/var/run/netns/mbt17-late")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=late;K8S_POD_UID=late-uid",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("meshbox-cni runs");
    {
        use std::io::Write;
        cni.stdin
            .take()
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
    }
    let out = cni.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["ips"][0]["address"], "10.66.0.3/24",
        "prevResult passed on"
    );
    let dump = node_a.config_dump().await;
    assert!(
        dump["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["uid"].as_str().is_some_and(|u| u.ends_with("/late"))
                && p["state"] == "captured"),
        "captured when ADD returned: {}",
        dump["pods"]
    );
    let mut s = dial(&late_ns, "10.66.0.2:8080".parse().unwrap())
        .await
        .expect("the new pod's first connection is meshed");
    assert_eq!(greeting_line(&mut s).await, "server sees 10.66.0.3");
    drop(s);
    node_b
        .wait_for_log(&["connection complete", "src.addr=10.66.0.3:"])
        .await;
}
