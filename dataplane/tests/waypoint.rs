//! A service with a waypoint: the client's dataplane sends its traffic to
//! the waypoint over HBONE, asking for the service address it dialed.

mod support;

use std::time::Duration;

use support::*;

fn manifests() -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        "127.13.1.1",
        "app: client",
    );
    m += &pod(
        "reviews-1",
        "default",
        "reviews",
        "node-b",
        "127.13.2.1",
        "app: reviews",
    );
    m += &pod(
        "wp-0",
        "default",
        "wp",
        "node-b",
        "127.13.4.1",
        "gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none",
    );
    m += r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: wp
  namespace: default
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata:
  name: wp
  namespace: default
spec:
  clusterIP: 127.13.3.30
  clusterIPs: [127.13.3.30]
  selector: {gateway.networking.k8s.io/gateway-name: wp}
  ports: [{name: mesh, port: 15008, targetPort: 15008}]
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: default
  labels: {istio.io/use-waypoint: wp}
spec:
  clusterIP: 127.13.3.20
  clusterIPs: [127.13.3.20]
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 9080}]
"#;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_traffic_goes_through_its_waypoint() {
    let mesh = Mesh::start("waypoint", 13, &manifests(), &[]);
    let waypoint = hbone::server(
        addr("127.13.4.1:15008"),
        hbone::cert(&mesh.ca(), &hbone::id("wp"), Duration::from_secs(600)),
        "waypoint",
    )
    .await;
    let client = Dataplane::start(
        &mesh,
        DataplaneSpec {
            ip: "127.13.1.1",
            namespace: "default",
            pod: "client",
            service_account: "sleep",
            node: None,
            extra: vec![],
        },
    );
    client.wait_ready().await;

    let served_by = ask(client.socks(), addr("127.13.3.20:9080")).await;
    assert_eq!(served_by.as_deref(), Ok("waypoint"));
    assert_eq!(
        waypoint.authorities.lock().unwrap().as_slice(),
        ["127.13.3.20:9080"],
        "the waypoint is asked for the service address the client dialed"
    );
    let line = client
        .wait_for_log(&["connection complete", "dst.addr=127.13.4.1:15008"])
        .await;
    assert!(
        line.contains(r#"dst.identity="spiffe://cluster.local/ns/default/sa/wp""#),
        "{line}"
    );
    assert!(
        line.contains(r#"dst.service="reviews.default.svc.cluster.local""#),
        "{line}"
    );
}
