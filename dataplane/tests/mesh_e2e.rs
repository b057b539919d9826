//! Two (or three) dataplanes and a control plane from this repo carrying
//! real TCP over HBONE on loopback: identities in access logs, service VIP
//! load balancing, policy allow/deny from the manifest folder, and metrics.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;

const NET: u8 = 11;

fn manifests() -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        "127.11.1.1",
        "app: client",
    );
    m += &pod(
        "echo-1",
        "default",
        "echo",
        "node-b",
        "127.11.2.1",
        "app: echo",
    );
    m += &pod(
        "echo-2",
        "default",
        "echo",
        "node-b",
        "127.11.2.2",
        "app: echo",
    );
    m += r#"apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  clusterIP: 127.11.3.10
  clusterIPs: [127.11.3.10]
  selector: {app: echo}
  ports: [{name: tcp, port: 80, targetPort: 8080}]
"#;
    m
}

fn dataplane(mesh: &Mesh, ip: &str, pod: &str, sa: &str) -> Dataplane {
    Dataplane::start(
        mesh,
        DataplaneSpec {
            ip,
            namespace: "default",
            pod,
            service_account: sa,
            node: None,
            extra: vec![],
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_traffic_carries_identities_balances_services_and_obeys_policy() {
    let mesh = Mesh::start("traffic", NET, &manifests(), &[]);
    let client = dataplane(&mesh, "127.11.1.1", "client", "sleep");
    let echo1 = dataplane(&mesh, "127.11.2.1", "echo-1", "echo");
    let echo2 = dataplane(&mesh, "127.11.2.2", "echo-2", "echo");
    let _apps = [
        echo_server(addr("127.11.2.1:8080"), "echo-1").await,
        echo_server(addr("127.11.2.2:8080"), "echo-2").await,
    ];
    for dp in [&client, &echo1, &echo2] {
        dp.wait_ready().await;
    }

    // Pod IP: straight to echo-1, over HBONE, both identities logged.
    let name = ask(client.socks(), addr("127.11.2.1:8080")).await;
    assert_eq!(name.as_deref(), Ok("echo-1"));
    let out = client
        .wait_for_log(&["connection complete", r#"direction="outbound""#])
        .await;
    assert!(
        out.contains(r#"src.identity="spiffe://cluster.local/ns/default/sa/sleep""#),
        "{out}"
    );
    assert!(
        out.contains(r#"dst.identity="spiffe://cluster.local/ns/default/sa/echo""#),
        "{out}"
    );
    assert!(out.contains(r#"dst.hbone_addr="127.11.2.1:8080""#), "{out}");
    assert!(out.contains("dst.addr=127.11.2.1:15008"), "{out}");
    let inb = echo1
        .wait_for_log(&["connection complete", r#"direction="inbound""#])
        .await;
    assert!(
        inb.contains(r#"src.identity="spiffe://cluster.local/ns/default/sa/sleep""#),
        "{inb}"
    );
    assert!(inb.contains(r#"src.workload="client""#), "{inb}");
    // The tunnel came from the client pod's address, not the proxy's.
    assert!(inb.contains("src.addr=127.11.1.1:"), "{inb}");

    // Istio's metrics, with Istio's labels, on the receiving side.
    let metrics = echo1.metrics().await;
    let opened = metrics
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\""))
        .unwrap_or_else(|| panic!("no inbound connection metric:\n{metrics}"));
    for label in [
        r#"source_workload="client""#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep""#,
        r#"destination_workload="echo-1""#,
        r#"connection_security_policy="mutual_tls""#,
    ] {
        assert!(opened.contains(label), "{label} missing in {opened}");
    }
    assert!(
        metrics.contains("istio_tcp_received_bytes_total{"),
        "{metrics}"
    );

    // Service VIP: connections spread over both endpoints.
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        seen.insert(ask(client.socks(), addr("127.11.3.10:80")).await.unwrap());
    }
    assert_eq!(
        seen,
        BTreeSet::from(["echo-1".to_owned(), "echo-2".to_owned()]),
        "round robin over the service's endpoints"
    );
    let svc = client
        .wait_for_log(&[
            "connection complete",
            r#"dst.service="echo.default.svc.cluster.local""#,
        ])
        .await;
    assert!(svc.contains(r#"dst.hbone_addr="127.11.2."#), "{svc}");
    // A port the service does not declare is refused, never passed through.
    assert_eq!(
        ask(client.socks(), addr("127.11.3.10:81")).await,
        Err(2),
        "SOCKS 'not allowed'"
    );

    // The dataplane's own view.
    let dump = client.config_dump().await;
    let workloads: BTreeSet<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(workloads, BTreeSet::from(["client", "echo-1", "echo-2"]));
    assert_eq!(dump["certificates"][0]["state"], "valid");
    assert!(dump["certificates"][0].get("key").is_none());
    let dump_text = dump.to_string();
    assert!(!dump_text.contains("PRIVATE KEY"), "no key in config_dump");

    // A DENY policy from the manifest folder takes effect...
    mesh.write_manifest(
        "policy.yaml",
        &policy(
            "no-sleep",
            "DENY",
            "echo",
            "cluster.local/ns/default/sa/sleep",
        ),
    );
    let denied = eventually(client.socks(), addr("127.11.2.1:8080"), false).await;
    assert!(denied.is_err(), "the DENY policy must refuse sleep → echo");
    echo1
        .wait_for_log(&["denied by authorization policy", "sa/sleep"])
        .await;

    // ...an ALLOW-only-sleep policy lets sleep in and keeps others out...
    mesh.write_manifest(
        "policy.yaml",
        &policy(
            "only-sleep",
            "ALLOW",
            "echo",
            "cluster.local/ns/default/sa/sleep",
        ),
    );
    let allowed = eventually(client.socks(), addr("127.11.2.1:8080"), true).await;
    assert_eq!(allowed.as_deref(), Ok("echo-1"));
    // A valid certificate for an identity no policy names: denied (401).
    let stranger = hbone::client(&mesh, "stranger");
    let refused = stranger
        .connect(echo1.inbound(), "echo", addr("127.11.2.1:8080"))
        .await
        .err()
        .expect("an identity the ALLOW policy does not name is refused");
    assert!(refused.contains("401"), "{refused}");

    // ...and removing the policy opens the door again.
    mesh.remove_manifest("policy.yaml");
    // Waits for the removal to reach the dataplane; the deadline only ends a hang.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(refused) = stranger
        .connect(echo1.inbound(), "echo", addr("127.11.2.1:8080"))
        .await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no policy: any mesh identity is allowed, but still refused: {refused}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
