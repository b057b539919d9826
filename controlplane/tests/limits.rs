//! Limits that apply before the control plane works for a client, checked
//! against the real binary: authentication before a request body is read,
//! header and body read timeouts, connections per peer, tokens on the
//! inspection endpoints, and the standalone tokens' lifetime and revocation.
//! Raw HTTP/1.1 over TLS where a client must misbehave (curl will not send
//! headers and then stall); curl for the rest.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to the REST port, trusting the control plane's root,
/// speaking HTTP/1.1.
async fn connect(cp: &ControlPlane, port: u16) -> std::io::Result<TlsStream<TcpStream>> {
    connect_with(cp, port, b"http/1.1").await
}

/// A TLS connection to `port` on loopback offering the protocol `alpn`.
async fn connect_with(
    cp: &ControlPlane,
    port: u16,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    meshbox_certs::install_crypto_provider();
    let roots = meshbox_certs::pem::parse_certificates(cp.root_pem().as_bytes()).unwrap();
    let mut config = meshbox_certs::tls::control_plane_client_config(&roots).unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Everything the server sends until it closes the connection or `within`
/// passes (then what came so far).
async fn read_for(stream: &mut TlsStream<TcpStream>, within: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // A complete response with a JSON body is all we need.
                if String::from_utf8_lossy(&out).contains("\r\n\r\n{") && out.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn post_headers(token: Option<&str>, content_length: usize) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /api/v1/certificates HTTP/1.1\r\nHost: localhost\r\n{auth}\
         Content-Type: application/x-pem-file\r\nContent-Length: {content_length}\r\n\r\n"
    )
}

/// Sum of the samples of `name` whose labels contain `labels`, from
/// `GET /metrics`.
fn metric(cp: &ControlPlane, name: &str, labels: &str) -> f64 {
    let (status, body) = curl(cp, &[], "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name && series.contains(labels))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[tokio::test]
async fn a_certificate_request_without_a_valid_token_is_refused_before_its_body() {
    if !have_tool("curl") {
        return;
    }
    let cp = ControlPlane::start(&[], &[]);
    for token in [None, Some("not-a-token")] {
        let mut conn = connect(&cp, cp.rest.port()).await.unwrap();
        // A megabyte announced, none of it sent.
        conn.write_all(post_headers(token, 1 << 20).as_bytes())
            .await
            .unwrap();
        let started = Instant::now();
        let response = read_for(&mut conn, Duration::from_secs(5)).await;
        assert!(
            response.starts_with("HTTP/1.1 401"),
            "{token:?}: {response:?}"
        );
        assert!(
            response.contains("\"error\":\"unauthenticated\""),
            "{response}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{token:?}");
    }
}

#[tokio::test]
async fn a_stalled_body_is_answered_with_408_after_the_body_read_timeout() {
    if !have_tool("curl") {
        return;
    }
    let cp = ControlPlane::start(&[], &["--body-read-timeout", "1s"]);
    let token = cp.token_for_identity("spiffe://cluster.local/ns/default/sa/web");
    let mut conn = connect(&cp, cp.rest.port()).await.unwrap();
    conn.write_all(post_headers(Some(&token), 1000).as_bytes())
        .await
        .unwrap();
    conn.write_all(b"-----BEGIN CERTIFICATE REQUEST-----\n")
        .await
        .unwrap();
    let started = Instant::now();
    let response = read_for(&mut conn, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(response.contains("did not arrive within 1s"), "{response}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(
        metric(
            &cp,
            "meshbox_rest_requests_refused_total",
            "reason=\"body_timeout\""
        ),
        1.0
    );
}

#[tokio::test]
async fn headers_that_never_end_close_the_connection() {
    if !have_tool("curl") {
        return;
    }
    let cp = ControlPlane::start(&[], &["--header-read-timeout", "1s"]);
    let mut conn = connect(&cp, cp.rest.port()).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was kept open");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Connects until the server refuses (closes the connection during the
/// handshake); returns the connections that it accepted.
async fn connect_until_refused(cp: &ControlPlane, port: u16) -> Vec<TlsStream<TcpStream>> {
    let mut open = Vec::new();
    while let Ok(conn) = connect_with(cp, port, b"h2").await {
        open.push(conn);
        assert!(open.len() <= 100, "100 connections accepted from one peer");
    }
    open
}

#[tokio::test]
async fn one_peer_may_hold_only_so_many_connections() {
    if !have_tool("curl") {
        return;
    }
    let cp = ControlPlane::start(&[], &["--max-connections-per-peer", "3"]);
    let rest = connect_until_refused(&cp, cp.rest.port()).await;
    assert_eq!(rest.len(), 3);
    // Each listener counts its own.
    let grpc = connect_until_refused(&cp, cp.grpc.port()).await;
    assert_eq!(grpc.len(), 3);
    // A closed connection gives its place back.
    drop(rest);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, _) = loop {
        let (status, body) = curl(&cp, &[], "/healthz");
        if status == 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &cp,
            "meshbox_connections_refused_total",
            "listener=\"rest\",reason=\"per_peer_limit\""
        ),
        1.0
    );
    assert_eq!(
        metric(
            &cp,
            "meshbox_connections_refused_total",
            "listener=\"grpc\",reason=\"per_peer_limit\""
        ),
        1.0
    );
}

/// Paths that only show what the mesh is, and need a token when
/// `--require-token-for-reads` is on.
const INSPECTION: &[&str] = &[
    "/api/v1/workloads",
    "/api/v1/workloads/default/web",
    "/api/v1/services",
    "/api/v1/services/default/web",
    "/api/v1/policies",
    "/api/v1/waypoints",
    "/api/v1/routes",
    "/api/v1/status",
    "/api/v1/dataplanes",
    "/api/v1/certificates",
];
/// Paths that stay open: probes, Prometheus, the API description, the root.
const PUBLIC: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/openapi.json",
    "/api/v1/ca/root",
];

#[test]
fn inspection_endpoints_need_a_token_when_required() {
    if !have_tool("curl") || !have_tool("openssl") {
        return;
    }
    let cp = ControlPlane::start(&[], &["--require-token-for-reads"]);
    let token = cp.token_for_identity("spiffe://cluster.local/ns/default/sa/web");
    let bearer = format!("Authorization: Bearer {token}");
    for path in INSPECTION {
        let (status, body) = curl(&cp, &[], path);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("no bearer token"), "{path}: {body}");
        let (status, _) = curl(&cp, &["-H", "Authorization: Bearer forged"], path);
        assert_eq!(status, 401, "{path}");
        let (status, body) = curl(&cp, &["-H", &bearer], path);
        assert!(status == 200 || status == 404, "{path}: {status} {body}");
    }
    for path in PUBLIC {
        let (status, _) = curl(&cp, &[], path);
        assert_eq!(status, 200, "{path}");
    }
    // Issuance still authenticates its caller itself.
    let dir = temp_dir("reads");
    let csr = openssl_csr(
        dir.path(),
        "web",
        "ec -pkeyopt ec_paramgen_curve:P-256",
        "URI:spiffe://cluster.local/ns/default/sa/web",
    );
    assert_eq!(post_csr(&cp, Some(&token), &csr, "").0, 200);
    assert_eq!(post_csr(&cp, None, &csr, "").0, 401);
    assert!(
        metric(
            &cp,
            "meshbox_rest_requests_refused_total",
            "reason=\"unauthenticated_read\""
        ) >= 2.0 * INSPECTION.len() as f64
    );
}

#[test]
fn inspection_endpoints_are_open_in_standalone_mode_by_default() {
    if !have_tool("curl") {
        return;
    }
    for args in [&[][..], &["--require-token-for-reads=false"][..]] {
        let cp = ControlPlane::start(&[], args);
        for path in INSPECTION {
            let (status, body) = curl(&cp, &[], path);
            assert!(
                status == 200 || status == 404,
                "{args:?} {path}: {status} {body}"
            );
        }
    }
}

fn token_command(state: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("token")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn token_lifetimes_are_capped_at_a_year() {
    let dir = temp_dir("ttl");
    let node = ["--node", "worker-1"];
    for ok in ["24h", "365d", "1y"] {
        let out = token_command(dir.path(), &[&node[..], &["--ttl", ok]].concat());
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for too_long in ["367d", "2y", "3000y"] {
        let out = token_command(dir.path(), &[&node[..], &["--ttl", too_long]].concat());
        assert!(!out.status.success(), "{too_long} was minted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("at most 366 days"), "{too_long}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn rotating_the_token_key_revokes_every_token_at_restart() {
    if !have_tool("curl") || !have_tool("openssl") {
        return;
    }
    let cp = ControlPlane::start(&[], &[]);
    let id = "spiffe://cluster.local/ns/default/sa/web";
    let old = cp.token_for_identity(id);
    let dir = temp_dir("rotate");
    let csr = openssl_csr(
        dir.path(),
        "web",
        "ec -pkeyopt ec_paramgen_curve:P-256",
        &format!("URI:{id}"),
    );
    assert_eq!(post_csr(&cp, Some(&old), &csr, "").0, 200);
    let out = std::process::Command::new(BIN)
        .arg("rotate-token-key")
        .arg("--state-dir")
        .arg(&cp.state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("restart the control plane"));
    let cp = cp.restart(&[]);
    let (status, body) = post_csr(&cp, Some(&old), &csr, "");
    assert_eq!(status, 401, "{body}");
    let new = cp.token_for_identity(id);
    assert_eq!(post_csr(&cp, Some(&new), &csr, "").0, 200);
}

#[tokio::test]
async fn grpc_calls_without_a_valid_token_are_refused_before_their_message() {
    use meshbox_proto::ca::IstioCertificateRequest;
    use meshbox_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
    use meshbox_proto::meshbox::EnrollmentRequest;
    use meshbox_proto::meshbox::enrollment_service_client::EnrollmentServiceClient;
    let cp = ControlPlane::start(&[], &[]);
    let channel = grpc_channel(&cp).connect().await.unwrap();
    // Larger than each service accepts: read first, it would be refused for
    // its size; checked first, for its (missing or bad) token.
    for token in [None, Some("Bearer forged")] {
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: "A".repeat(200 * 1024),
            validity_duration: 3600,
            metadata: None,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", token.parse().unwrap());
        }
        let status = IstioCertificateServiceClient::new(channel.clone())
            .create_certificate(request)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let status = EnrollmentServiceClient::new(channel.clone())
        .lookup(EnrollmentRequest {
            namespace: "default".into(),
            name: "x".repeat(10_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(
        metric(
            &cp,
            "meshbox_grpc_requests_refused_total",
            "reason=\"unauthenticated\""
        ),
        3.0
    );
}

#[tokio::test]
async fn a_stalled_grpc_message_fails_after_the_body_read_timeout() {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    let cp = ControlPlane::start(&[], &["--body-read-timeout", "1s"]);
    let token = cp.token_for_identity("spiffe://cluster.local/ns/default/sa/web");
    let tls = connect_with(&cp, cp.grpc.port(), b"h2").await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let request = http::Request::post(
        "https://localhost/istio.v1.auth.IstioCertificateService/CreateCertificate",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {token}"))
    .body(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
    .unwrap();
    // A gRPC message of 1000 bytes announced, 2 sent, then silence.
    tx.send(Ok(Frame::data(Bytes::from_static(&[
        0, 0, 0, 3, 0xe8, 0x0a, 0x05,
    ]))))
    .await
    .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    let headers = response.headers().clone();
    let trailers = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("no end within 10 s")
        .unwrap()
        .trailers()
        .cloned()
        .unwrap_or_default();
    let took = started.elapsed();
    let field = |name: &str| {
        headers
            .get(name)
            .or_else(|| trailers.get(name))
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert!(!field("grpc-status").is_empty() && field("grpc-status") != "0");
    // grpc-message is percent-encoded.
    let message = field("grpc-message").replace("%20", " ");
    assert!(message.contains("did not arrive within 1s"), "{message:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    drop(tx);
    assert_eq!(
        metric(
            &cp,
            "meshbox_grpc_requests_refused_total",
            "reason=\"body_timeout\""
        ),
        1.0
    );
}
