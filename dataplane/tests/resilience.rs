//! What keeps traffic flowing: certificate rotation under a long-lived
//! connection, a control-plane restart, and a graceful drain on SIGTERM.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn manifests(net: u8) -> String {
    let mut m = ambient_namespace("default");
    m += &pod(
        "client",
        "default",
        "sleep",
        "node-a",
        &format!("127.{net}.1.1"),
        "app: client",
    );
    m += &pod(
        "echo-1",
        "default",
        "echo",
        "node-b",
        &format!("127.{net}.2.1"),
        "app: echo",
    );
    m
}

fn pair(mesh: &Mesh, net: u8, extra: &[&str]) -> (Dataplane, Dataplane) {
    let spec = |ip: String, pod: &'static str, sa: &'static str| {
        let ip: &'static str = Box::leak(ip.into_boxed_str());
        DataplaneSpec {
            ip,
            namespace: "default",
            pod,
            service_account: sa,
            node: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    };
    (
        Dataplane::start(mesh, spec(format!("127.{net}.1.1"), "client", "sleep")),
        Dataplane::start(mesh, spec(format!("127.{net}.2.1"), "echo-1", "echo")),
    )
}

async fn serial(dp: &Dataplane) -> String {
    dp.config_dump().await["certificates"][0]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_a_long_lived_connection() {
    // The CA grants 6 s certificates, so they rotate every ~3 s.
    let mesh = Mesh::start(
        "rotation",
        14,
        &manifests(14),
        &["--max-cert-ttl", "6s", "--default-cert-ttl", "6s"],
    );
    let (client, echo) = pair(&mesh, 14, &[]);
    let _app = echo_server(addr("127.14.2.1:8080"), "echo-1").await;
    client.wait_ready().await;
    echo.wait_ready().await;
    let first = serial(&client).await;
    let echo_first = serial(&echo).await;
    // Both first certificates were issued before this instant, for 6 s.
    let issued_by = Instant::now();

    let mut long = socks_connect(client.socks(), addr("127.14.2.1:8080"))
        .await
        .unwrap();
    assert_eq!(greeting(&mut long).await, "echo-1");
    // Keep the connection busy until what is under test has happened: both
    // sides renewed, and both first certificates expired (6 s, plus 1 s for
    // whole-second validity). A slow machine only makes this take longer;
    // the deadline ends a real hang (no renewal).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let back = roundtrip(&mut long, b"still here").await.unwrap();
        assert_eq!(back, b"still here");
        let renewed = serial(&client).await != first && serial(&echo).await != echo_first;
        if renewed && issued_by.elapsed() > Duration::from_secs(7) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not renewed in 60 s (client {first} -> {}, echo {echo_first} -> {})",
            serial(&client).await,
            serial(&echo).await
        );
        // Pacing between round trips, not synchronisation.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Both certificates the connection started with have expired by now;
    // a new connection uses the renewed ones.
    assert_eq!(
        ask(client.socks(), addr("127.14.2.1:8080"))
            .await
            .as_deref(),
        Ok("echo-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_a_control_plane_restart_and_sigterm_drains() {
    let mut mesh = Mesh::start("restart", 15, &manifests(15), &[]);
    let (mut client, echo) = pair(&mesh, 15, &["--drain-timeout", "3s"]);
    let _app = echo_server(addr("127.15.2.1:8080"), "echo-1").await;
    client.wait_ready().await;
    echo.wait_ready().await;

    let mut long = socks_connect(client.socks(), addr("127.15.2.1:8080"))
        .await
        .unwrap();
    assert_eq!(greeting(&mut long).await, "echo-1");

    // The control plane goes away: open and new connections keep working
    // on the last known state and the certificates in hand.
    mesh.cp.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.config_dump().await["xds"]["connected"] == true {
        assert!(Instant::now() < deadline, "the client never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(roundtrip(&mut long, b"cp down").await.unwrap(), b"cp down");
    assert_eq!(
        ask(client.socks(), addr("127.15.2.1:8080"))
            .await
            .as_deref(),
        Ok("echo-1")
    );

    // It comes back: the dataplanes reconnect on their own.
    mesh.cp.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.config_dump().await["xds"]["connected"] != true {
        assert!(Instant::now() < deadline, "the client never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(roundtrip(&mut long, b"cp back").await.unwrap(), b"cp back");

    // SIGTERM: no new connections, the open one finishes its work, then
    // the process exits within the drain deadline.
    client.terminate();
    client.wait_for_log(&["draining"]).await;
    assert!(
        socks_connect(client.socks(), addr("127.15.2.1:8080"))
            .await
            .is_err(),
        "a draining dataplane accepts no new connections"
    );
    assert_eq!(
        roundtrip(&mut long, b"draining").await.unwrap(),
        b"draining"
    );
    let status = client
        .wait_exit(Duration::from_secs(10))
        .expect("the dataplane exits after the drain deadline");
    assert!(status.success(), "{status:?}");
}
