//! The malicious cases of inbound HBONE: each is refused, logged, and the
//! dataplane keeps serving honest peers.

mod support;

use std::time::Duration;

use meshbox_certs::ca::CaPolicy;
use meshbox_certs::{CertificateAuthority, SpiffeId};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn manifests() -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        "127.12.1.1",
        "app: client",
    );
    m += &pod(
        "echo-1",
        "default",
        "echo",
        "node-b",
        "127.12.2.1",
        "app: echo",
    );
    // Another workload with no dataplane in front of it.
    m += &pod(
        "other",
        "default",
        "other",
        "node-c",
        "127.12.2.2",
        "app: other",
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_peers_are_refused_and_honest_ones_still_served() {
    let mesh = Mesh::start("attacks", 12, &manifests(), &[]);
    let echo = Dataplane::start(
        &mesh,
        DataplaneSpec {
            ip: "127.12.2.1",
            namespace: "default",
            pod: "echo-1",
            service_account: "echo",
            node: None,
            extra: vec![],
        },
    );
    let _app = echo_server(addr("127.12.2.1:8080"), "echo-1").await;
    echo.wait_ready().await;
    let honest = hbone::client(&mesh, "sleep");
    let app = addr("127.12.2.1:8080");
    honest
        .connect(echo.inbound(), "echo", app)
        .await
        .expect("an honest peer is served");

    // CONNECT to a workload that is not this dataplane's: 403, an attack.
    let err = honest
        .connect(echo.inbound(), "echo", addr("127.12.2.2:8080"))
        .await
        .err()
        .expect("CONNECT to a non-local address is refused");
    assert!(err.contains("403"), "{err}");
    echo.wait_for_log(&["possible attack", "127.12.2.2:8080"])
        .await;

    // CONNECT to the proxy's own port would loop: refused.
    let err = honest
        .connect(echo.inbound(), "echo", addr("127.12.2.1:15008"))
        .await
        .err()
        .expect("CONNECT to the proxy port is refused");
    assert!(err.contains("400"), "{err}");

    // Plaintext on 15008: no TLS, no tunnel, no bytes to the app.
    let mark = echo.log_mark();
    let mut raw = tokio::net::TcpStream::connect(echo.inbound())
        .await
        .unwrap();
    raw.write_all(b"CONNECT 127.12.2.1:8080 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
        .await
        .expect("the dataplane closes a plaintext connection")
        .unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).contains("echo-1"),
        "plaintext must never reach the application"
    );
    echo.wait_for_log_after(
        mark,
        &[
            "inbound TLS handshake refused",
            "received corrupt message of type InvalidContentType",
        ],
    )
    .await;

    // A certificate from another CA, for another trust domain.
    let foreign_ca = CertificateAuthority::create_root(CaPolicy {
        trust_domain: "evil.local".into(),
        default_ttl: Duration::from_secs(600),
        max_ttl: Duration::from_secs(600),
    })
    .unwrap()
    .0;
    let evil_id = SpiffeId::new("evil.local", "default", "sleep").unwrap();
    // It trusts our root (public, an attacker has it), so it is the server
    // that must refuse, not the attacker's own check of the server.
    let mut foreign = hbone::cert(&foreign_ca, &evil_id, Duration::from_secs(600));
    foreign.roots = hbone::cert(&mesh.ca(), &hbone::id("sleep"), Duration::from_secs(600)).roots;
    let evil = hbone::with_cert(foreign);
    let mark = echo.log_mark();
    let err = evil
        .connect(echo.inbound(), "echo", app)
        .await
        .err()
        .expect("a foreign CA is refused");
    // The client sees the server's alert or, in TLS 1.3 where the client
    // may write first, a broken pipe: a race. The reason is asserted on the
    // server's side, after a mark so that only this attempt counts.
    assert!(!err.contains("200"), "{err}");
    echo.wait_for_log_after(
        mark,
        &[
            "inbound TLS handshake refused",
            "invalid peer certificate: UnknownIssuer",
        ],
    )
    .await;

    // A certificate from our own CA but naming another trust domain.
    let ours_other_td =
        hbone::with_cert(hbone::cert(&mesh.ca(), &evil_id, Duration::from_secs(600)));
    let mark = echo.log_mark();
    let err = ours_other_td
        .connect(echo.inbound(), "echo", app)
        .await
        .err()
        .expect("an identity outside our trust domain is refused even when our CA signed it");
    assert!(!err.contains("200"), "{err}");
    echo.wait_for_log_after(
        mark,
        &[
            "inbound TLS handshake refused",
            "client identity spiffe://evil.local/ns/default/sa/sleep is outside trust domain cluster.local",
        ],
    )
    .await;

    // An expired certificate.
    let short_lived = hbone::cert(&mesh.ca(), &hbone::id("sleep"), Duration::from_secs(1));
    // Wait for the expiry itself, as the verifier sees it (whole seconds,
    // strictly after not_after), rather than a guessed duration.
    let expired_at = short_lived.not_after + Duration::from_secs(1);
    while std::time::SystemTime::now() <= expired_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = hbone::with_cert(short_lived);
    let mark = echo.log_mark();
    let err = expired
        .connect(echo.inbound(), "echo", app)
        .await
        .err()
        .expect("an expired certificate is refused");
    assert!(!err.contains("200"), "{err}");
    echo.wait_for_log_after(
        mark,
        &[
            "inbound TLS handshake refused",
            "invalid peer certificate: certificate expired",
        ],
    )
    .await;

    // A server that is not who the client expects: our client refuses it.
    let err = hbone::client(&mesh, "sleep")
        .connect(echo.inbound(), "someone-else", app)
        .await
        .err()
        .expect("the client checks the server's identity");
    assert!(
        err.contains(
            "server identity spiffe://cluster.local/ns/default/sa/echo is not one of the expected identities"
        ),
        "{err}"
    );

    // Through all of that, honest peers are still served.
    let mut tunnel = honest
        .connect(echo.inbound(), "echo", app)
        .await
        .expect("still serving");
    let mut greeting = [0u8; 7];
    tunnel.io.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"echo-1\n");
}
