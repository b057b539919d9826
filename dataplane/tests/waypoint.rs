//! A service with a waypoint: the client's dataplane sends its traffic to
//! the waypoint over HBONE, asking for the service address it dialed.

mod support;

use std::net::SocketAddr;
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

// ---------------------------------------------------------------------------
// The real waypoint (`waypoint run`) between two dataplanes.

/// Pods, services and a waypoint in `127.{net}.0.0/16`: `client` on node-a;
/// `reviews-v1`/`-v2` (the endpoints of `reviews`, which uses the waypoint,
/// and each of its own `reviews-vN` service) on node-b; the waypoint `wp`
/// at `127.{net}.4.1`; `ratings` (no waypoint).
fn l7_manifests(net: u8) -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        &format!("127.{net}.1.1"),
        "app: client",
    );
    for (i, v) in ["v1", "v2"].iter().enumerate() {
        m += &pod(
            &format!("reviews-{v}"),
            "default",
            "reviews",
            "node-b",
            &format!("127.{net}.2.{}", i + 1),
            &format!("app: reviews, version: {v}"),
        );
    }
    m += &pod(
        "ratings",
        "default",
        "ratings",
        "node-b",
        &format!("127.{net}.2.9"),
        "app: ratings",
    );
    m += &pod(
        "wp-0",
        "default",
        "wp",
        "node-b",
        &format!("127.{net}.4.1"),
        "gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none",
    );
    m += &format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: wp
  namespace: default
  labels: {{istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: wp, namespace: default}}
spec:
  clusterIP: 127.{net}.3.30
  selector: {{gateway.networking.k8s.io/gateway-name: wp}}
  ports: [{{name: mesh, port: 15008, targetPort: 15008}}]
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: default
  labels: {{istio.io/use-waypoint: wp}}
spec:
  clusterIP: 127.{net}.3.20
  selector: {{app: reviews}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews-v1, namespace: default}}
spec:
  clusterIP: 127.{net}.3.21
  selector: {{app: reviews, version: v1}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews-v2, namespace: default}}
spec:
  clusterIP: 127.{net}.3.22
  selector: {{app: reviews, version: v2}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: ratings, namespace: default}}
spec:
  clusterIP: 127.{net}.3.40
  selector: {{app: ratings}}
  ports: [{{name: http, port: 9080, targetPort: 9080}}]
---
"#
    );
    m
}

/// The mesh of [`l7_manifests`] running: dataplanes for the client and the
/// two reviews pods (HTTP apps behind them), and the waypoint, all ready.
struct L7Mesh {
    mesh: Mesh,
    net: u8,
    client: Dataplane,
    waypoint: Dataplane,
    _servers: Vec<Dataplane>,
}

impl L7Mesh {
    async fn start(name: &str, net: u8, extra_manifests: &str) -> Self {
        Self::start_with(name, net, extra_manifests, &[]).await
    }

    /// [`start`](Self::start) with extra `waypoint run` flags.
    async fn start_with(
        name: &str,
        net: u8,
        extra_manifests: &str,
        waypoint_args: &[&str],
    ) -> Self {
        let mesh = Mesh::start(name, net, &(l7_manifests(net) + extra_manifests), &[]);
        let mut servers = Vec::new();
        for (pod, last) in [("reviews-v1", 1), ("reviews-v2", 2)] {
            let ip = format!("127.{net}.2.{last}");
            http_app(addr(&format!("{ip}:9080")), pod).await;
            servers.push(Dataplane::start(
                &mesh,
                DataplaneSpec {
                    ip: &ip,
                    namespace: "default",
                    pod,
                    service_account: "reviews",
                    node: None,
                    extra: vec![],
                },
            ));
        }
        let client = Dataplane::start(
            &mesh,
            DataplaneSpec {
                ip: &format!("127.{net}.1.1"),
                namespace: "default",
                pod: "client",
                service_account: "sleep",
                node: None,
                extra: vec![],
            },
        );
        let waypoint = Dataplane::start_waypoint(
            &mesh,
            &format!("127.{net}.4.1"),
            "default",
            "wp",
            waypoint_args,
        );
        for dp in servers.iter().chain([&client, &waypoint]) {
            dp.wait_ready().await;
        }
        Self {
            mesh,
            net,
            client,
            waypoint,
            _servers: servers,
        }
    }

    fn reviews(&self) -> SocketAddr {
        addr(&format!("127.{}.3.20:9080", self.net))
    }

    /// An HTTP/1.1 connection from the client pod to `target`, through its
    /// dataplane.
    async fn http1(&self, target: SocketAddr) -> HttpClient {
        let stream = socks_connect(self.client.socks(), target)
            .await
            .expect("the client's dataplane accepts");
        HttpClient::http1(stream).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_balances_each_request_over_the_service_endpoints() {
    let l7 = L7Mesh::start("waypoint-lb", 19, "").await;
    let mut conn = l7.http1(l7.reviews()).await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..10 {
        let r = conn.request("GET", "/reviews/1", &[], None).await.unwrap();
        let (status, body) = (r.status, r.body);
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            r.headers.get("echo-authority").map(|v| v.as_bytes()),
            Some(&b"reviews"[..]),
            "HTTP/1.1: the client's Host reaches the app"
        );
        let served_by = body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        *seen.entry(served_by).or_default() += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["reviews-v1", "reviews-v2"],
        "one keep-alive connection, requests spread over both endpoints: {seen:?}"
    );

    // HTTP/2 (prior knowledge): each stream is balanced on its own too.
    let stream = socks_connect(l7.client.socks(), l7.reviews())
        .await
        .unwrap();
    let mut h2 = HttpClient::http2(stream).await;
    let mut seen_h2 = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let r = h2.request("GET", "/h2", &[], None).await.unwrap();
        let (status, body) = (r.status, r.body);
        assert_eq!(status, 200, "{body}");
        // The client's authority reaches the app as `:authority`, alone
        // (the app answers 400 to a Host header next to it, as nginx does).
        assert_eq!(
            r.headers.get("echo-authority").map(|v| v.as_bytes()),
            Some(&b"reviews"[..])
        );
        seen_h2.insert(
            body.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert_eq!(
        seen_h2.len(),
        2,
        "HTTP/2 streams spread over both endpoints: {seen_h2:?}"
    );

    let line = l7
        .waypoint
        .wait_for_log(&["request", "path=/reviews/1", "response_code=200"])
        .await;
    for needle in [
        "method=GET",
        r#"src.identity=spiffe://cluster.local/ns/default/sa/sleep"#,
        "src.workload=client",
        "dst.service=reviews.default.svc.cluster.local",
        "dst.identity=spiffe://cluster.local/ns/default/sa/reviews",
    ] {
        assert!(line.contains(needle), "{needle} missing in {line}");
    }
    let metrics = l7.waypoint.metrics().await;
    let requests = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"reporter="waypoint""#)
                && l.contains(r#"destination_service="reviews.default.svc.cluster.local""#)
                && l.contains(r#"response_code="200""#)
                && l.contains(r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep""#)
        })
        .unwrap_or_else(|| panic!("no istio_requests_total for reviews:\n{metrics}"));
    let total: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"destination_service="reviews.default.svc.cluster.local""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 20, "{requests}");
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket{"));
    assert!(metrics.contains("istio_response_bytes_sum{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_refuses_connect_to_what_does_not_use_it() {
    let l7 = L7Mesh::start("waypoint-refuse", 20, "").await;
    let client = hbone::client(&l7.mesh, "sleep");
    let wp = addr("127.20.4.1:15008");
    // A Service without a waypoint, and a workload address: the waypoint's
    // identity must not become a way around their policies.
    for target in ["127.20.3.40:9080", "127.20.2.1:9080"] {
        let refused = client.connect(wp, "wp", addr(target)).await;
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("403")),
            "CONNECT to {target}: {:?}",
            refused.map(|_| ())
        );
    }
    l7.waypoint
        .wait_for_log(&["does not use this waypoint", "127.20.3.40:9080"])
        .await;
    // The same client, to the Service that does use it: served.
    let tunnel = client
        .connect(wp, "wp", addr("127.20.3.20:9080"))
        .await
        .expect("CONNECT to reviews");
    let mut http = HttpClient::http1(tunnel.io).await;
    let (status, body) = http.send("GET", "/", &[]).await;
    assert_eq!(status, 200, "{body}");
}

// ---------------------------------------------------------------------------
// Bad input the waypoint must survive: each refused, and honest clients
// still served.

impl L7Mesh {
    /// An HBONE stream from a `sleep` peer straight to the waypoint, for
    /// `reviews`: the raw bytes a client's node proxy would carry.
    async fn tunnel(&self) -> meshbox_dataplane::proxy::tunnel::HboneStream {
        hbone::client(&self.mesh, "sleep")
            .connect(
                addr(&format!("127.{}.4.1:15008", self.net)),
                "wp",
                self.reviews(),
            )
            .await
            .expect("CONNECT to reviews through the waypoint")
            .io
    }

    /// One honest GET through the client's dataplane.
    async fn honest_get(&self) -> u16 {
        let mut conn = self.http1(self.reviews()).await;
        conn.send("GET", "/honest", &[]).await.0
    }
}

/// Writes `raw` and reads what comes back until the peer closes or `wait`
/// passes.
async fn exchange<T>(io: &mut T, raw: &[u8], wait: Duration) -> String
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_request_smuggling_is_refused_or_reframed() {
    let l7 = L7Mesh::start("waypoint-smuggle", 21, "").await;

    // Two different Content-Lengths: which one ends the body is ambiguous,
    // so the request is refused and nothing is forwarded.
    let mut io = l7.tunnel().await;
    let mark = l7.waypoint.log_mark();
    let answer = exchange(
        &mut io,
        b"POST /dup HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(
        !l7.waypoint.logs()[mark..]
            .iter()
            .any(|l| l.contains("path=/dup")),
        "a refused request is never forwarded"
    );

    // Content-Length and Transfer-Encoding together: chunked framing wins
    // and the connection is closed after the answer (RFC 9112 §6.1), so
    // what follows the empty chunk, a request hidden from a peer that
    // trusted Content-Length, is never read, let alone forwarded.
    let mut io = l7.tunnel().await;
    let mark = l7.waypoint.log_mark();
    let answer = exchange(
        &mut io,
        b"POST /first HTTP/1.1\r\nHost: reviews\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: reviews\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    assert!(answer.contains("connection: close"), "{answer:?}");
    assert!(answer.contains(" POST /first\n"), "{answer:?}");
    l7.waypoint
        .wait_for_log_after(mark, &["request", "path=/first"])
        .await;
    assert!(
        !l7.waypoint.logs()[mark..]
            .iter()
            .any(|l| l.contains("/hidden")),
        "the hidden request never reached the waypoint's pipeline"
    );
    assert_eq!(l7.honest_get().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_answers_431_to_header_blocks_over_its_limit() {
    let l7 = L7Mesh::start_with("waypoint-431", 22, "", &["--max-header-bytes", "16384"]).await;
    let big = "a".repeat(20 * 1024);
    let fits = "a".repeat(8 * 1024);

    let mut http1 = l7.http1(l7.reviews()).await;
    let r = http1
        .request("GET", "/", &[("x-big", &big)], None)
        .await
        .expect("an answer");
    assert_eq!(r.status, 431, "HTTP/1.1: {}", r.body);
    let mut http1 = l7.http1(l7.reviews()).await;
    assert_eq!(http1.send("GET", "/", &[("x-fits", &fits)]).await.0, 200);

    let stream = socks_connect(l7.client.socks(), l7.reviews())
        .await
        .unwrap();
    let mut http2 = HttpClient::http2(stream).await;
    let r = http2.request("GET", "/", &[("x-big", &big)], None).await;
    match r {
        Ok(r) => assert_eq!(r.status, 431, "HTTP/2: {}", r.body),
        Err(e) => panic!("HTTP/2 oversized headers: {e}"),
    }
    assert_eq!(http2.send("GET", "/", &[("x-fits", &fits)]).await.0, 200);
    assert_eq!(l7.honest_get().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_closes_clients_that_never_finish_their_headers() {
    let l7 = L7Mesh::start_with(
        "waypoint-slowloris",
        23,
        "",
        &["--header-read-timeout", "1s"],
    )
    .await;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut io = socks_connect(l7.client.socks(), l7.reviews())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut io,
            b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Slow: ",
        )
        .await
        .unwrap();
        slow.push(io);
    }
    // Honest clients are served while the slow ones hang on.
    assert_eq!(l7.honest_get().await, 200);
    let started = std::time::Instant::now();
    for io in &mut slow {
        let answer = exchange(io, b"a", Duration::from_secs(5)).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "closed, or told it timed out: {answer:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow clients closed after the header-read timeout, not left open: {:?}",
        started.elapsed()
    );
    assert_eq!(l7.honest_get().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_keeps_serving_through_an_http2_rapid_reset_flood() {
    let l7 = L7Mesh::start("waypoint-reset", 24, "").await;
    // CVE-2023-44487: open streams and cancel them at once, as fast as
    // possible, on one connection.
    let io = l7.tunnel().await;
    let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    let attacker = tokio::spawn(async move {
        let mut client = client;
        let mut sent = 0u32;
        for _ in 0..5000 {
            let Ok(ready) = client.ready().await else {
                break;
            };
            client = ready;
            let request = http::Request::get("http://reviews/flood").body(()).unwrap();
            match client.send_request(request, true) {
                Ok((response, _)) => {
                    drop(response);
                    sent += 1;
                }
                Err(_) => break,
            }
        }
        sent
    });
    // Honest clients are served during and after the flood.
    for _ in 0..5 {
        assert_eq!(l7.honest_get().await, 200);
    }
    let sent = attacker.await.unwrap();
    assert_eq!(l7.honest_get().await, 200);
    let _ = tokio::time::timeout(Duration::from_secs(10), conn_task).await;
    assert!(sent > 0);
    assert!(
        l7.waypoint.try_config_dump().await.is_some(),
        "the waypoint process is still up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_refuses_peers_without_a_certificate_of_this_mesh() {
    use meshbox_certs::ca::CaPolicy;
    use meshbox_certs::{CertificateAuthority, SpiffeId};
    let l7 = L7Mesh::start("waypoint-certs", 25, "").await;
    let wp = addr("127.25.4.1:15008");

    // Plaintext to 15008.
    let mark = l7.waypoint.log_mark();
    let mut plain = tokio::net::TcpStream::connect(wp).await.unwrap();
    let _ = exchange(
        &mut plain,
        b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    l7.waypoint
        .wait_for_log_after(mark, &["inbound TLS handshake refused"])
        .await;

    // A certificate from another CA, for another trust domain (it trusts
    // our root, which is public, so it is the waypoint that must refuse).
    let foreign_ca = CertificateAuthority::create_root(CaPolicy {
        trust_domain: "evil.local".into(),
        default_ttl: Duration::from_secs(600),
        max_ttl: Duration::from_secs(600),
    })
    .unwrap()
    .0;
    let evil_id = SpiffeId::new("evil.local", "default", "sleep").unwrap();
    let mut foreign = hbone::cert(&foreign_ca, &evil_id, Duration::from_secs(600));
    foreign.roots = hbone::cert(&l7.mesh.ca(), &hbone::id("sleep"), Duration::from_secs(600)).roots;
    let mark = l7.waypoint.log_mark();
    let err = hbone::with_cert(foreign)
        .connect(wp, "wp", l7.reviews())
        .await
        .err()
        .expect("a foreign CA is refused");
    assert!(!err.contains("200"), "{err}");
    l7.waypoint
        .wait_for_log_after(mark, &["inbound TLS handshake refused", "UnknownIssuer"])
        .await;

    // Our CA, another trust domain.
    let mark = l7.waypoint.log_mark();
    let err = hbone::with_cert(hbone::cert(
        &l7.mesh.ca(),
        &evil_id,
        Duration::from_secs(600),
    ))
    .connect(wp, "wp", l7.reviews())
    .await
    .err()
    .expect("another trust domain is refused");
    assert!(!err.contains("200"), "{err}");
    l7.waypoint
        .wait_for_log_after(
            mark,
            &["inbound TLS handshake refused", "outside trust domain"],
        )
        .await;
    assert_eq!(l7.honest_get().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_keeps_its_last_state_when_the_control_plane_is_gone() {
    let mut l7 = L7Mesh::start("waypoint-cp-gone", 26, "").await;
    assert_eq!(l7.honest_get().await, 200);
    l7.mesh.cp.stop();
    for _ in 0..5 {
        assert_eq!(l7.honest_get().await, 200);
    }
    let mut conn = l7.http1(l7.reviews()).await;
    let (status, _) = conn.send("GET", "/still", &[]).await;
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------
// L7 policy and routing, configured by the control plane.

/// One policy (`targetRefs` to `reviews`: GET only) and one route (90/10
/// between the two versions, a header set, and a rule whose backend does
/// not exist).
const GET_ONLY_AND_SPLIT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get-only, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: nope, port: 9080}]
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: split}]}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
---
"#;

/// Waits until the waypoint holds `policies` policies and `routes` routes.
async fn wait_for_l7_config(waypoint: &Dataplane, policies: usize, routes: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(dump) = waypoint.try_config_dump().await {
            let held_policies = dump["policies"].as_array().map_or(0, Vec::len);
            let held_routes = dump["routes"]["resources"].as_array().map_or(0, Vec::len);
            if held_policies == policies && held_routes == routes {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waypoint config never settled: {dump:#}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_enforces_l7_policy_and_splits_by_weight() {
    let mut l7 = L7Mesh::start("waypoint-l7", 27, GET_ONLY_AND_SPLIT).await;
    wait_for_l7_config(&l7.waypoint, 1, 1).await;
    let mut conn = l7.http1(l7.reviews()).await;

    let r = conn
        .request("POST", "/reviews/1", &[], Some("{}"))
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    l7.waypoint
        .wait_for_log(&[
            "request",
            "method=POST",
            "response_code=403",
            "NoAllowPolicyMatched",
        ])
        .await;

    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        let r = conn.request("GET", "/reviews/1", &[], None).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.headers.get("echo-x-route").map(|v| v.as_bytes()),
            Some(&b"split"[..]),
            "the route's RequestHeaderModifier reached the app"
        );
        let version = r
            .body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        *counts.entry(version).or_default() += 1;
    }
    let v2 = counts.get("reviews-v2").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<usize>(), 200, "{counts:?}");
    // 10% of 200: 20 expected; 5..=40 is more than six standard deviations
    // either way.
    assert!((5..=40).contains(&v2), "90/10 split, got {counts:?}");

    let r = conn.request("GET", "/missing/x", &[], None).await.unwrap();
    assert_eq!(r.status, 500, "a backend that does not exist: {}", r.body);

    // The control plane goes away: the waypoint keeps enforcing what it had.
    l7.mesh.cp.stop();
    let mut conn = l7.http1(l7.reviews()).await;
    assert_eq!(
        conn.request("POST", "/x", &[], Some("{}"))
            .await
            .unwrap()
            .status,
        403
    );
    assert_eq!(conn.send("GET", "/x", &[]).await.0, 200);

    let metrics = l7.waypoint.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains(r#"response_code="403""#)
                && l.contains(r#"reporter="waypoint""#)),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_policy_with_unsupported_fields_fails_closed() {
    // A DENY rule needing JWT (which the waypoint does not do) denies every
    // request rather than none; the control plane reports why.
    let deny_jwt = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-no-jwt, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{from: [{source: {notRequestPrincipals: ["*"]}}], to: [{operation: {paths: ["/admin*"]}}]}]
---
"#;
    let l7 = L7Mesh::start("waypoint-unsupported", 28, deny_jwt).await;
    wait_for_l7_config(&l7.waypoint, 1, 0).await;
    let mut conn = l7.http1(l7.reviews()).await;
    let (status, body) = conn.send("GET", "/reviews/1", &[]).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let dump = l7.waypoint.config_dump().await;
    let unsupported = dump["policies"][0]["unsupported"].to_string();
    assert!(unsupported.contains("notRequestPrincipals"), "{dump:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_drains_on_sigterm() {
    let mut l7 = L7Mesh::start("waypoint-drain", 29, "").await;
    let mut conn = l7.http1(l7.reviews()).await;
    assert_eq!(conn.send("GET", "/before", &[]).await.0, 200);
    l7.waypoint.terminate();
    let status = tokio::task::block_in_place(|| l7.waypoint.wait_exit(Duration::from_secs(10)))
        .expect("the waypoint exits within its drain timeout");
    assert!(status.success(), "{status:?}");
    let logs = l7.waypoint.logs().join("\n");
    assert!(
        logs.contains("shutting down") && logs.contains("drained"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_deny_on_a_path_holds_against_other_spellings() {
    let deny_admin = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
"#;
    let l7 = L7Mesh::start("waypoint-paths", 30, deny_admin).await;
    wait_for_l7_config(&l7.waypoint, 1, 0).await;
    let mut conn = l7.http1(l7.reviews()).await;
    for path in [
        "/admin",
        "/admin/users",
        "/x/../admin",
        "/%61dmin",
        "/x/%2e%2e/admin/y",
    ] {
        let (status, body) = conn.send("GET", path, &[]).await;
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
    }
    // What the app sees is the normalised path the policy judged.
    let (status, body) = conn.send("GET", "/x/./public/../%7euser", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with(" GET /x/~user\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_policy_on_service_endpoints_is_enforced_at_the_services_waypoint() {
    // A selector policy on the reviews pods, whose Service uses the
    // waypoint: its HTTP rule is enforced there, and the reviews pods'
    // node proxies admit what the waypoint forwards. A direct connection
    // to a pod (the waypoint serves the Service, not the pod) is still
    // judged by the cut rule: the ALLOW rule needs HTTP, so it is refused.
    let get_from_sleep = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-get, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"]}}]
---
"#;
    let l7 = L7Mesh::start("waypoint-svc-lift", 31, get_from_sleep).await;
    wait_for_l7_config(&l7.waypoint, 1, 0).await;
    let mut conn = l7.http1(l7.reviews()).await;

    for _ in 0..4 {
        let (status, body) = conn.send("GET", "/reviews/1", &[]).await;
        assert_eq!(status, 200, "GET from sleep through the waypoint: {body}");
    }
    let r = conn
        .request("POST", "/reviews/1", &[], Some("{}"))
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    l7.waypoint
        .wait_for_log(&["request", "method=POST", "response_code=403"])
        .await;

    let direct = socks_connect(l7.client.socks(), addr("127.31.2.1:9080")).await;
    assert!(
        direct.is_err(),
        "sleep → reviews-v1's IP bypasses the waypoint: the cut ALLOW rule refuses it"
    );
    l7._servers[0]
        .wait_for_log(&["denied by authorization policy", "sa/sleep"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_retries_a_503_elsewhere_and_times_out_a_slow_backend() {
    let timeout_route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-timeouts, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: reviews, port: 9080}]
  - backendRefs: [{name: reviews, port: 9080}]
---
"#;
    let l7 = L7Mesh::start("waypoint-retry", 32, timeout_route).await;
    wait_for_l7_config(&l7.waypoint, 0, 1).await;
    let mut conn = l7.http1(l7.reviews()).await;
    // reviews-v1 answers this path 503: Istio's default retry sends the
    // request (it has no body) to another endpoint, so every one succeeds.
    for _ in 0..6 {
        let (status, body) = conn.send("GET", "/fail-on/reviews-v1", &[]).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("reviews-v2 "), "{body}");
    }
    // A request with a body is not replayed: its 503 comes back.
    let mut saw_503 = false;
    for _ in 0..6 {
        let r = conn
            .request("POST", "/fail-on/reviews-v1", &[], Some("x"))
            .await
            .unwrap();
        saw_503 |= r.status == 503;
    }
    assert!(
        saw_503,
        "a POST with a body reached reviews-v1 and was not retried"
    );

    // The route's request timeout: 504 after about 300 ms, not the app's 2 s.
    let started = std::time::Instant::now();
    let (status, body) = conn.send("GET", "/slow/2000", &[]).await;
    assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let mut conn = l7.http1(l7.reviews()).await;
    assert_eq!(conn.send("GET", "/slow/50", &[]).await.0, 200);
    l7.waypoint
        .wait_for_log(&[
            "request",
            "path=/slow/2000",
            "response_code=504",
            "flags=UT",
        ])
        .await;
}
