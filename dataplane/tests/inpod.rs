//! In-pod capture, for real: pods are network namespaces joined by a bridge
//! (in a namespace of their own, so no address of the machine is touched),
//! two node-mode dataplanes install the redirection rules inside them and
//! serve their listeners there; the applications do nothing special.
//!
//! Needs root (network namespaces, iptables); skipped with a reason
//! otherwise, and required in CI.

mod support;

#[path = "../../cni/tests/support/cni_chain.rs"]
mod cni_chain;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbox_dataplane::netns::Netns;
use support::netns::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

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
            written.elapsed() < Duration::from_secs(30),
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
            reopened.elapsed() < Duration::from_secs(30),
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
    // Capturing again rebuilt our chains in place: one jump into each.
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = saved_rules("mbt17-client", save);
        assert_eq!(
            rules.matches("--comment meshbox").count(),
            3,
            "{save} after re-adoption:\n{rules}"
        );
    }

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
    let mut cni = Command::new(cni_plugin())
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

const SLEEP_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const ECHO_ID: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// The second topology: two echo pods behind one Service VIP, one on each
/// node; a client and a malicious pod on node-a; a pod outside the mesh;
/// a "kubelet" with Istio's probe address; and a pod whose sandbox the
/// real CNI chain creates later.
fn manifests_b() -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        "10.67.0.1",
        "app: client",
    );
    m += &pod(
        "server",
        "default",
        "echo",
        "node-b",
        "10.67.0.2",
        "app: echo",
    );
    m += &pod(
        "buddy",
        "default",
        "echo",
        "node-a",
        "10.67.0.5",
        "app: echo",
    );
    m += &pod(
        "mallory",
        "default",
        "mallory",
        "node-a",
        "10.67.0.6",
        "app: mallory",
    );
    m += "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n---\n";
    m += &pod(
        "legacy",
        "legacy",
        "legacy",
        "node-c",
        "10.67.0.4",
        "app: legacy",
    );
    m += r#"apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  clusterIP: 10.96.18.10
  selector: {app: echo}
  ports: [{name: tcp, port: 80, targetPort: 8080}]
---
"#;
    m
}

/// Tries to put the proxy's mark on a socket from inside `netns`, in a
/// thread that has dropped root (and with it every capability) the way a
/// pod's unprivileged process runs. Linux keeps credentials per thread
/// when the raw syscall is used, so the rest of the test keeps root.
fn set_mark_without_privileges(netns: &str) -> std::io::Result<()> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        // SAFETY: a plain syscall with integer arguments; it changes only
        // this thread's credentials, and the thread ends right after.
        let dropped = unsafe { nix::libc::syscall(nix::libc::SYS_setresuid, 65534, 65534, 65534) };
        if dropped != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_mark(0x539)
    })
    .join()
    .expect("thread runs")
}

/// A connection from inside `ns` carrying the proxy's mark (root only).
async fn dial_marked(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = ns.run(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_mark(0x539)?;
        Ok::<_, std::io::Error>(s)
    })?;
    sock.set_nonblocking(true)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    tokio::time::timeout(Duration::from_secs(5), sock.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_service_vips_malicious_pods_probes_and_the_cni_chain() {
    if !is_root() {
        return;
    }
    let mut topo = Topology::new(
        "mbt18",
        &[
            ("client", "10.67.0.1"),
            ("server", "10.67.0.2"),
            ("buddy", "10.67.0.5"),
            ("mallory", "10.67.0.6"),
            ("legacy", "10.67.0.4"),
        ],
    );
    // Service VIPs are not on the link: pods route everything out of eth0,
    // as a pod's default route does.
    for pod in ["client", "mallory"] {
        ip(&[
            "-n",
            &format!("mbt18-{pod}"),
            "route",
            "add",
            "default",
            "dev",
            "eth0",
        ]);
    }
    let mesh = Mesh::start("inpod-b", 18, &manifests_b(), &[]);
    let cni_socket = mesh.dir.path().join("cni.sock");
    let node_a = node_proxy_with(
        &mesh,
        "node-a",
        "127.18.1.1",
        &["--cni-socket", cni_socket.to_str().unwrap()],
    );
    let node_b = node_proxy(&mesh, "node-b", "127.18.2.1");
    let (client, mallory, legacy) = (
        topo.netns("client"),
        topo.netns("mallory"),
        topo.netns("legacy"),
    );
    app(
        &topo.netns("server"),
        "10.67.0.2:8080".parse().unwrap(),
        "server",
    )
    .await;
    app(
        &topo.netns("buddy"),
        "10.67.0.5:8080".parse().unwrap(),
        "buddy",
    )
    .await;
    for pod in ["client", "buddy", "mallory"] {
        wait_captured(&node_a, pod).await;
    }
    wait_captured(&node_b, "server").await;
    node_a.wait_ready().await;
    node_b.wait_ready().await;

    // Same node, by pod IP: still HBONE, both identities in the logs.
    assert_eq!(
        answer(&client, "10.67.0.5:8080").await,
        "buddy sees 10.67.0.1"
    );
    let out = node_a
        .wait_for_log(&[
            "connection complete",
            r#"direction="outbound""#,
            "dst.addr=10.67.0.5:15008",
        ])
        .await;
    assert!(
        out.contains(&format!(r#"dst.identity="{ECHO_ID}""#)),
        "{out}"
    );
    let inb = node_a
        .wait_for_log(&[
            "connection complete",
            r#"direction="inbound""#,
            "src.addr=10.67.0.1:",
        ])
        .await;
    assert!(
        inb.contains(&format!(r#"src.identity="{SLEEP_ID}""#)),
        "{inb}"
    );

    // By the Service VIP: endpoints on both nodes take turns.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(answer(&client, "10.96.18.10:80").await);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["buddy sees 10.67.0.1", "server sees 10.67.0.1"],
        "the VIP reaches both endpoints, original source kept"
    );
    let vip = node_a
        .wait_for_log(&[
            "connection complete",
            "dst.addr=10.67.0.2:15008",
            "dst.service=",
        ])
        .await;
    assert!(vip.contains("echo.default.svc.cluster.local"), "{vip}");
    let vip_in = node_b
        .wait_for_log(&[
            "connection complete",
            r#"direction="inbound""#,
            "src.addr=10.67.0.1:",
        ])
        .await;
    assert!(
        vip_in.contains(&format!(r#"src.identity="{SLEEP_ID}""#)),
        "{vip_in}"
    );

    // A malicious pod inside the mesh dials another pod's HBONE port and
    // speaks CONNECT itself: its bytes are captured and tunneled as its own
    // identity, and the server's proxy refuses a tunnel to its own port.
    // The application never sees the connection.
    // The same from a pod outside the mesh, straight to 15008 without TLS.
    for (from, who) in [(&mallory, "inside"), (&legacy, "outside")] {
        if let Ok(mut s) = dial(from, "10.67.0.2:15008".parse().unwrap()).await {
            let _ = s
                .write_all(b"CONNECT 10.67.0.2:8080 HTTP/1.1\r\nHost: 10.67.0.2:8080\r\n\r\n")
                .await;
            let reply = greeting_line(&mut s).await;
            assert!(
                !reply.contains("server sees"),
                "a forged CONNECT from {who} the mesh reached the app: {reply}"
            );
        }
    }
    let served_to_mallory = node_b.logs().iter().any(|l| {
        l.contains("connection complete")
            && l.contains("sa/mallory")
            && l.contains(":8080")
            && !l.contains("error=")
    });
    assert!(
        !served_to_mallory,
        "no connection from mallory was delivered"
    );

    // Skipping the capture takes the proxy's mark, and the mark takes
    // CAP_NET_ADMIN, which a pod's unprivileged process does not have.
    let denied = set_mark_without_privileges("mbt18-mallory")
        .expect_err("an unprivileged SO_MARK must fail");
    assert_eq!(denied.raw_os_error(), Some(nix::libc::EPERM), "{denied}");

    // From here on only `sleep` may reach the echo pods.
    allow_only_sleep(&mesh, &mallory).await;
    assert_eq!(
        answer(&client, "10.67.0.2:8080").await,
        "server sees 10.67.0.1"
    );
    node_b
        .wait_for_log(&["denied by authorization policy", "sa/mallory"])
        .await;
    // With privileges it would have (root in its namespace), the mark does
    // skip the pod's own capture — and the server's side still captures
    // the plaintext and applies the policy: no identity, no entry.
    // Marked so that only this attempt's refusal counts: the refusal above
    // logged the same source address.
    let mark = node_b.log_mark();
    let mut s = dial_marked(&mallory, "10.67.0.2:8080".parse().unwrap())
        .await
        .expect("as root the marked socket connects");
    assert_eq!(
        greeting_line(&mut s).await,
        "",
        "a marked bypass was let in"
    );
    node_b
        .wait_for_log_after(
            mark,
            &["denied by authorization policy", "src.addr=10.67.0.6:"],
        )
        .await;
    // Outside the mesh: no identity, so the policy refuses it too.
    assert_eq!(answer(&legacy, "10.67.0.2:8080").await, "");

    // Kubelet probes arrive from Istio's probe address and are not
    // captured: the ALLOW policy does not make the pod unready.
    topo.add_pod("mbt18", "kubelet", "169.254.7.127", "p8");
    ip(&[
        "-n",
        "mbt18-kubelet",
        "route",
        "add",
        "10.67.0.0/24",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        "mbt18-server",
        "route",
        "add",
        "169.254.7.127/32",
        "dev",
        "eth0",
    ]);
    assert_eq!(
        answer(&topo.netns("kubelet"), "10.67.0.2:8080").await,
        "server sees 169.254.7.127",
        "probe reached the app"
    );
    mesh.remove_manifest("allow.yaml");

    // A brand-new pod, the way a container runtime makes it: a sandbox,
    // then the conflist — Debian's bridge and host-local, then meshbox-cni
    // talking to the real node agent. When ADD returns it is captured.
    let cni_dir = Path::new("/usr/lib/cni");
    if ["bridge", "host-local", "loopback"]
        .iter()
        .any(|p| !cni_dir.join(p).exists())
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs containernetworking-plugins"
        );
        eprintln!(
            "SKIPPED the CNI chain part: /usr/lib/cni/{{bridge,host-local,loopback}} missing"
        );
    } else {
        cni_chain_captures_a_new_pod(&mesh, &node_a, &node_b, &cni_socket, &mut topo).await;
    }

    // The node's metrics count its pods by state.
    let metrics = node_a.metrics().await;
    assert!(
        metrics.contains("meshbox_inpod_captured_pods 3"),
        "client, buddy and mallory captured: {metrics}"
    );

    // The control plane shows each node's capture state.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dataplanes = mesh.rest_get("/api/v1/dataplanes");
        let node_a_pods: Vec<(String, String)> = dataplanes
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["node"] == "node-a")
            .flat_map(|d| d["capture"]["pods"].as_array().cloned().unwrap_or_default())
            .map(|p| {
                (
                    p["uid"].as_str().unwrap_or("").to_owned(),
                    p["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let captured = |name: &str| {
            node_a_pods.iter().any(|(uid, state)| {
                uid.ends_with(&format!("/default/{name}")) && state == "captured"
            })
        };
        if captured("client") && captured("buddy") && captured("mallory") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "capture state never reached the control plane: {dataplanes}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    spoofed_neighbour_address_is_refused(&mesh, &node_a, &node_b, &mallory).await;

    // Inbound, a pod's HBONE listener serves that pod only: a peer with a
    // valid mesh certificate that CONNECTs through buddy's 15008 to
    // another pod on the same node is refused as not local to buddy.
    let peer = hbone::client(&mesh, "sleep").in_netns(legacy.clone());
    let mark = node_a.log_mark();
    let err = peer
        .connect(
            "10.67.0.5:15008".parse().unwrap(),
            "echo",
            "10.67.0.1:8080".parse().unwrap(),
        )
        .await
        .err()
        .expect("a CONNECT to another pod through this pod's listener is refused");
    assert!(err.contains("403"), "{err}");
    node_a
        .wait_for_log_after(
            mark,
            &[
                "possible attack: CONNECT to an address that is no local workload",
                "authority=10.67.0.1:8080",
            ],
        )
        .await;
    assert_eq!(
        peer.connect(
            "10.67.0.5:15008".parse().unwrap(),
            "echo",
            "10.67.0.5:8080".parse().unwrap(),
        )
        .await
        .map(|_| ())
        .err(),
        None,
        "the pod itself is still reached through its own listener"
    );
}

/// Writes the ALLOW policy that lets only `sleep` reach the echo pods, and
/// waits until mallory is refused.
async fn allow_only_sleep(mesh: &Mesh, mallory: &Netns) {
    mesh.write_manifest(
        "allow.yaml",
        &policy(
            "only-sleep",
            "ALLOW",
            "echo",
            "cluster.local/ns/default/sa/sleep",
        ),
    );
    let written = Instant::now();
    while !answer(mallory, "10.67.0.2:8080").await.is_empty() {
        assert!(
            written.elapsed() < Duration::from_secs(30),
            "the ALLOW policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pod that can add an address to its own interface (root in its own
/// namespace) takes its neighbour's IP and sends from it, under a policy
/// that lets only the neighbour in. Its identity is the pod whose
/// namespace the connection was captured in, and that pod does not hold
/// the address: refused at once and counted, nothing leaves the node.
async fn spoofed_neighbour_address_is_refused(
    mesh: &Mesh,
    node_a: &Dataplane,
    node_b: &Dataplane,
    mallory: &Netns,
) {
    allow_only_sleep(mesh, mallory).await;
    // On `lo`, so the bridge never learns a second owner of the client's
    // address; the capture rules see the connection all the same.
    ip(&[
        "-n",
        "mbt18-mallory",
        "addr",
        "add",
        "10.67.0.1/32",
        "dev",
        "lo",
    ]);
    let unknown_before = refusals(node_a, "unknown_source").await;
    let inbound_mark = node_b.log_mark();
    let sock = mallory
        .run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&"10.67.0.1:0".parse::<SocketAddr>().unwrap().into())?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("a socket bound to the borrowed address");
    sock.set_nonblocking(true).unwrap();
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        TcpSocket::from_std_stream(sock.into()).connect("10.67.0.2:8080".parse().unwrap()),
    )
    .await
    .expect("the capture listener answers the connect at once");
    if let Ok(mut s) = connected {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a spoofed connection is closed at once, not left hanging");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the spoofed connection got an answer: {:?}",
            read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        );
    }
    node_a
        .wait_for_log(&["not the capturing pod's own", "src.addr=10.67.0.1:"])
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusals(node_a, "unknown_source").await <= unknown_before {
        assert!(
            Instant::now() < deadline,
            "the spoofed connection was not counted as unknown_source"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !node_b
            .logs()
            .iter()
            .skip(inbound_mark)
            .any(|l| l.contains("src.addr=10.67.0.1:") || l.contains("sa/mallory")),
        "the spoofed connection reached the server's node"
    );
    ip(&[
        "-n",
        "mbt18-mallory",
        "addr",
        "del",
        "10.67.0.1/32",
        "dev",
        "lo",
    ]);
    mesh.remove_manifest("allow.yaml");
}

/// `meshbox_proxy_connections_refused` summed over directions for `reason`.
async fn refusals(dp: &Dataplane, reason: &str) -> u64 {
    dp.metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("meshbox_proxy_connections_refused")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn cni_chain_captures_a_new_pod(
    mesh: &Mesh,
    node_a: &Dataplane,
    node_b: &Dataplane,
    cni_socket: &Path,
    topo: &mut Topology,
) {
    // Scheduled: the API has the pod, but no IP until its sandbox is
    // made, so it is no workload in xDS yet; the agent asks the control
    // plane, which knows it from its namespace's label.
    let scheduled = pod(
        "late",
        "default",
        "sleep",
        "node-a",
        "10.67.0.50",
        "app: late",
    );
    let status = scheduled.find("status:").unwrap();
    mesh.write_manifest(
        "late.yaml",
        &format!("{}status: {{phase: Pending}}\n---\n", &scheduled[..status]),
    );
    // Wait until the control plane has loaded it, asking what the agent
    // will ask, rather than sleeping and hoping it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.enrollment("node-a", "default", "late").await != Some(true) {
        assert!(
            Instant::now() < deadline,
            "the control plane never loaded the scheduled pod"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sandbox = "mbt18-late";
    let _ = Command::new("ip").args(["netns", "del", sandbox]).output();
    ip(&["netns", "add", sandbox]);
    topo.names.push(sandbox.to_owned());
    let netns_path = format!("/var/run/netns/{sandbox}");
    let list = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "mbt18-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "br0",
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.67.0.0/24", "rangeStart": "10.67.0.50", "rangeEnd": "10.67.0.50"}]],
                    "dataDir": mesh.dir.path().join("ipam"),
                },
            },
            {"type": "meshbox-cni", "socket": cni_socket, "timeout": "10s"},
        ],
    });
    let cni_path = vec![
        PathBuf::from("/usr/lib/cni"),
        cni_plugin().parent().unwrap().to_path_buf(),
    ];
    let env = [
        ("CNI_CONTAINERID", "late-sandbox-0"),
        ("CNI_NETNS", netns_path.as_str()),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=late;K8S_POD_UID=late-uid",
        ),
    ];
    // The runtime brings the sandbox's loopback up with the `loopback`
    // plugin, as a network of its own, before the pod network's list.
    let loopback = serde_json::json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]});
    cni_chain::run_list("mbt18-fabric", &cni_path, &loopback, "ADD", &env, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let result = cni_chain::run_list("mbt18-fabric", &cni_path, &list, "ADD", &env, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("the chain's result");
    eprintln!(
        "CNI ADD (bridge + host-local + meshbox-cni) took {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(result["ips"][0]["address"], "10.67.0.50/24", "{result}");
    assert!(
        shows_captured(&node_a.config_dump().await, "late"),
        "captured when ADD returned"
    );
    // The kubelet reports the pod's IP; its workload and certificate
    // follow, and its traffic flows (refused, never plaintext, until then).
    mesh.write_manifest("late.yaml", &scheduled);
    let late = topo.netns("late");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = answer(&late, "10.67.0.2:8080").await;
        if got == "server sees 10.67.0.50" {
            break;
        }
        assert!(got.is_empty(), "only the mesh path may answer: {got}");
        assert!(
            Instant::now() < deadline,
            "the new pod's traffic never flowed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node_b
        .wait_for_log(&[
            "connection complete",
            "src.addr=10.67.0.50:",
            &format!(r#"src.identity="{SLEEP_ID}""#),
        ])
        .await;

    // The pod is deleted; the runtime runs DEL, in reverse: released, and
    // its rules are gone from the sandbox.
    mesh.remove_manifest("late.yaml");
    cni_chain::run_list("mbt18-fabric", &cni_path, &list, "DEL", &env, Some(&result))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = saved_rules(sandbox, save);
        assert!(!rules.contains("MESHBOX"), "{save} after DEL:\n{rules}");
    }
    for family in ["-4", "-6"] {
        let out = Command::new("ip")
            .args(["netns", "exec", sandbox, "ip", family, "rule"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout);
        assert!(
            !rules.contains("lookup 133"),
            "ip {family} rule after DEL:\n{rules}"
        );
    }
}

/// `iptables-save` (or `ip6tables-save`) in a test namespace.
fn saved_rules(netns: &str, save: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, save])
        .output()
        .unwrap_or_else(|e| panic!("{save}: {e}"));
    assert!(out.status.success(), "{save} in {netns} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node side of the probe exemption (`--probe-snat`): connections the
/// node opens to a captured pod leave with Istio's probe address, and the
/// pod's rules let them through to the app uncaptured. Nothing listens on
/// the pod's capture ports here, so a probe that were captured would be
/// refused: reaching the app shows both halves work together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_side_probe_rewrite_reaches_the_app_uncaptured() {
    if !is_root() {
        return;
    }
    use meshbox_dataplane::inpod::rules;
    struct Cleanup;
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for ns in ["mbt19-node", "mbt19-pod"] {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
    }
    let _cleanup = Cleanup;
    for ns in ["mbt19-node", "mbt19-pod"] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&[
        "-n",
        "mbt19-node",
        "link",
        "add",
        "vpod",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        "mbt19-pod",
    ]);
    ip(&[
        "-n",
        "mbt19-node",
        "addr",
        "add",
        "10.68.0.1/24",
        "dev",
        "vpod",
    ]);
    ip(&["-n", "mbt19-node", "link", "set", "vpod", "up"]);
    ip(&[
        "-n",
        "mbt19-pod",
        "addr",
        "add",
        "10.68.0.2/24",
        "dev",
        "eth0",
    ]);
    ip(&["-n", "mbt19-pod", "link", "set", "eth0", "up"]);
    ip(&[
        "-n",
        "mbt19-pod",
        "route",
        "add",
        "default",
        "via",
        "10.68.0.1",
    ]);

    let node = Arc::new(Netns::open("/var/run/netns/mbt19-node").unwrap());
    let pod = Arc::new(Netns::open("/var/run/netns/mbt19-pod").unwrap());
    rules::apply(&pod, 15008, 15006, 15001, false).expect("pod rules");
    app(&pod, "10.68.0.2:8080".parse().unwrap(), "pod").await;

    // Without the rewrite, the node's connection is captured (and refused:
    // no proxy listens in this pod).
    assert_eq!(answer(&node, "10.68.0.2:8080").await, "");
    let pods = ["10.68.0.2".parse().unwrap()];
    node.run(|| rules::apply_probe_snat(&pods))
        .expect("node rules");
    // Idempotent: applying again changes nothing.
    node.run(|| rules::apply_probe_snat(&pods))
        .expect("node rules, again");
    assert_eq!(
        answer(&node, "10.68.0.2:8080").await,
        "pod sees 169.254.7.127"
    );
    let listing = iptables_in("mbt19-node", &["-t", "nat", "-S", "POSTROUTING"]);
    assert_eq!(listing.matches("MESHBOX_POSTRT").count(), 1, "{listing}");
    // The pod leaves: its address leaves the node's chain.
    node.run(|| rules::apply_probe_snat(&[])).expect("emptied");
    assert_eq!(answer(&node, "10.68.0.2:8080").await, "");
}
