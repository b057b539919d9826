//! Node mode (`PROXY_MODE=shared`): one dataplane per node serves every pod
//! on it, with a node token and each pod's certificate asked for through
//! Istio's `ImpersonatedIdentity`; the source pod of an outbound connection
//! is told apart by its address (`--inpod false`: listeners in the
//! dataplane's own namespace, on loopback; in-pod capture is tested in
//! `inpod.rs`).

mod support;

use support::*;

fn manifests() -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        "127.16.1.1",
        "app: client",
    );
    m += &pod(
        "other",
        "default",
        "other",
        "node-a",
        "127.16.1.2",
        "app: other",
    );
    m += &pod(
        "echo-1",
        "default",
        "echo",
        "node-b",
        "127.16.2.1",
        "app: echo",
    );
    m += &policy(
        "only-sleep",
        "ALLOW",
        "echo",
        "cluster.local/ns/default/sa/sleep",
    );
    m
}

fn node(mesh: &Mesh, ip: &str, node: &str) -> Dataplane {
    Dataplane::start(
        mesh,
        DataplaneSpec {
            ip,
            namespace: "default",
            pod: node,
            service_account: "unused",
            node: Some(node),
            extra: vec![],
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_proxy_serves_each_pod_on_its_node_with_that_pods_identity() {
    let mesh = Mesh::start("node-mode", 16, &manifests(), &[]);
    let node_a = node(&mesh, "127.16.1.1", "node-a");
    let node_b = node(&mesh, "127.16.2.1", "node-b");
    let _app = echo_server(addr("127.16.2.1:8080"), "echo-1").await;
    node_a.wait_ready().await;
    node_b.wait_ready().await;

    // Certificates for exactly the pods on each node, via impersonation.
    let ids = |dump: serde_json::Value| -> Vec<String> {
        let mut ids: Vec<String> = dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["identity"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(node_a.config_dump().await),
        [
            "spiffe://cluster.local/ns/default/sa/other",
            "spiffe://cluster.local/ns/default/sa/sleep"
        ]
    );
    assert_eq!(
        ids(node_b.config_dump().await),
        ["spiffe://cluster.local/ns/default/sa/echo"]
    );

    // From the client pod's address: sleep's identity, allowed.
    let target = addr("127.16.2.1:8080");
    let mut s = socks_connect_from("127.16.1.1".parse().unwrap(), node_a.socks(), target)
        .await
        .expect("sleep → echo is allowed");
    assert_eq!(greeting(&mut s).await, "echo-1");
    drop(s);
    node_b
        .wait_for_log(&[
            "connection complete",
            r#"src.identity="spiffe://cluster.local/ns/default/sa/sleep""#,
        ])
        .await;

    // From the other pod on the same node: its own identity, denied.
    let denied = socks_connect_from("127.16.1.2".parse().unwrap(), node_a.socks(), target).await;
    assert!(denied.is_err(), "other → echo is not allowed");
    node_b
        .wait_for_log(&["denied by authorization policy", "sa/other"])
        .await;

    // From an address that is no pod on this node: refused outright.
    let stranger = socks_connect_from("127.16.9.9".parse().unwrap(), node_a.socks(), target).await;
    assert_eq!(stranger.err(), Some(2), "SOCKS 'not allowed'");
    node_a
        .wait_for_log(&["no local workload", "127.16.9.9"])
        .await;
}
