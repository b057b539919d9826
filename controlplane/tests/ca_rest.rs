//! The CA as a user meets it: a token from `controlplane token`, a CSR from
//! `openssl req`, curl against the REST API, `openssl verify` on the answer.

mod support;

use std::path::Path;

use support::*;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const EC: &str = "ec -pkeyopt ec_paramgen_curve:P-256";

fn tools() -> bool {
    have_tool("curl") && have_tool("openssl")
}

/// Splits a PEM chain file into its leaf and the rest.
fn split_chain(dir: &Path, chain: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let end = "-----END CERTIFICATE-----\n";
    let cut = chain.find(end).unwrap() + end.len();
    let leaf = dir.join("leaf.pem");
    let rest = dir.join("rest.pem");
    std::fs::write(&leaf, &chain[..cut]).unwrap();
    std::fs::write(&rest, &chain[cut..]).unwrap();
    (leaf, rest)
}

#[test]
fn curl_and_openssl_get_a_valid_spiffe_certificate() {
    if !tools() {
        return;
    }
    let cp = ControlPlane::start(&[], &[]);
    let dir = temp_dir("curl");
    let token = cp.token_for_identity(WEB);
    let csr = openssl_csr(dir.path(), "web", EC, &format!("URI:{WEB}"));

    let (status, chain) = post_csr(&cp, Some(&token), &csr, "?ttl=3600s");
    assert_eq!(status, 200, "{chain}");
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "leaf + root");
    let (leaf, _) = split_chain(dir.path(), &chain);

    let root = cp.root_pem_path();
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (_, text) = openssl(&["x509", "-in", leaf.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains(&format!("URI:{WEB}")), "{text}");
    assert!(
        !text.contains("DNS:") && !text.contains("IP Address:"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");

    // The root endpoint serves the same root as the state directory.
    let (status, root_pem) = curl(&cp, &[], "/api/v1/ca/root");
    assert_eq!(status, 200);
    assert_eq!(root_pem, cp.root_pem());

    // JSON form, and a TTL above the maximum is capped, not refused.
    let (status, body) = post_csr(&cp, Some(&token), &csr, "?format=json&ttl=100d");
    assert_eq!(status, 200, "{body}");
    let issued: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(issued["identity"], WEB);
    let not_after = time::OffsetDateTime::parse(
        issued["notAfter"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let lifetime = not_after - time::OffsetDateTime::now_utc();
    assert!(lifetime <= time::Duration::hours(24) && lifetime > time::Duration::hours(23));

    // The audit log lists both issuances, and no secret ever shows up.
    let (status, audit) = curl(&cp, &[], "/api/v1/certificates");
    assert_eq!(status, 200);
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let entries = audit["certificates"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["requester"], WEB);
    assert_eq!(entries[0]["serial"], issued["serial"]);
    let logs = cp.logs();
    assert!(!logs.contains(&token), "the token leaked into the logs");
    assert!(!logs.contains("PRIVATE KEY"));

    let (_, metrics) = curl(&cp, &[], "/metrics");
    assert!(
        metrics.contains("meshbox_ca_certificates_issued_total{via=\"rest\"} 2"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_clear_errors_and_nothing_is_issued() {
    if !tools() {
        return;
    }
    let cp = ControlPlane::start(&[], &["--ca-rate-limit", "1000", "--ca-rate-burst", "1000"]);
    let dir = temp_dir("bad");
    let token = cp.token_for_identity(WEB);
    let write = |name: &str, body: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    let good = openssl_csr(dir.path(), "good", EC, &format!("URI:{WEB}"));

    // A CSR whose signature was tampered with: flip one byte near the end of
    // the DER (inside the signature) and re-encode.
    let der_path = dir.path().join("good.der");
    assert!(
        openssl(&[
            "req",
            "-in",
            good.to_str().unwrap(),
            "-outform",
            "DER",
            "-out",
            der_path.to_str().unwrap()
        ])
        .0
    );
    let mut der = std::fs::read(&der_path).unwrap();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let tampered_der = write("tampered.der", &der);
    let tampered = dir.path().join("tampered.csr");
    assert!(
        openssl(&[
            "req",
            "-inform",
            "DER",
            "-in",
            tampered_der.to_str().unwrap(),
            "-out",
            tampered.to_str().unwrap()
        ])
        .0
    );

    let cases: Vec<(&str, std::path::PathBuf, u16, &str)> = vec![
        ("not PEM", write("text.csr", b"hello, CA"), 400, "PEM"),
        (
            "PEM but not a CSR",
            write(
                "cert.csr",
                cp.root_pem()
                    .replace("CERTIFICATE", "CERTIFICATE REQUEST")
                    .as_bytes(),
            ),
            400,
            "PKCS#10",
        ),
        ("bad self-signature", tampered, 400, "self-signature"),
        (
            "DNS SAN",
            openssl_csr(
                dir.path(),
                "dns",
                EC,
                &format!("URI:{WEB},DNS:web.example.com"),
            ),
            400,
            "DNS",
        ),
        (
            "IP SAN",
            openssl_csr(dir.path(), "ip", EC, &format!("URI:{WEB},IP:10.0.0.1")),
            400,
            "IP",
        ),
        (
            "email SAN",
            openssl_csr(
                dir.path(),
                "email",
                EC,
                &format!("URI:{WEB},email:a@b.example"),
            ),
            400,
            "email",
        ),
        (
            "two URIs",
            openssl_csr(
                dir.path(),
                "two",
                EC,
                &format!("URI:{WEB},URI:spiffe://cluster.local/ns/default/sa/db"),
            ),
            400,
            "exactly one",
        ),
        (
            "non-SPIFFE URI",
            openssl_csr(dir.path(), "https", EC, "URI:https://example.com/web"),
            400,
            "SPIFFE",
        ),
        (
            "no SAN",
            openssl_csr(dir.path(), "nosan", EC, ""),
            400,
            "no URI SAN",
        ),
        (
            "foreign trust domain",
            openssl_csr(
                dir.path(),
                "foreign",
                EC,
                "URI:spiffe://evil.example/ns/default/sa/web",
            ),
            400,
            "trust domain",
        ),
        (
            "another identity than the token's",
            openssl_csr(
                dir.path(),
                "other",
                EC,
                "URI:spiffe://cluster.local/ns/default/sa/db",
            ),
            403,
            "may not get",
        ),
        (
            "RSA-512",
            openssl_csr(dir.path(), "rsa512", "rsa:512", &format!("URI:{WEB}")),
            400,
            "RSA-512",
        ),
        (
            "P-192 curve",
            openssl_csr(
                dir.path(),
                "p192",
                "ec -pkeyopt ec_paramgen_curve:P-192",
                &format!("URI:{WEB}"),
            ),
            400,
            "weak",
        ),
        (
            "over 64 KiB",
            write("big.csr", &vec![b'A'; 70 * 1024]),
            413,
            "64",
        ),
    ];
    for (what, csr, want, needle) in cases {
        let (status, body) = post_csr(&cp, Some(&token), &csr, "");
        assert_eq!(status, want, "{what}: {body}");
        let err: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
        let message = err["message"].as_str().unwrap();
        assert!(
            message.contains(needle) || err["error"].as_str().unwrap().contains(needle),
            "{what}: {message}"
        );
    }

    // Tokens: missing, malformed, forged (another control plane's key), expired.
    let (status, body) = post_csr(&cp, None, &good, "");
    assert_eq!(status, 401, "{body}");
    let (status, _) = post_csr(&cp, Some("not-a-jwt"), &good, "");
    assert_eq!(status, 401);
    let other = temp_dir("other-state");
    let forged = support::token(other.path(), &["--identity", WEB]);
    let (status, body) = post_csr(&cp, Some(&forged), &good, "");
    assert_eq!(status, 401, "{body}");
    let expired = support::token(&cp.state, &["--identity", WEB, "--ttl", "0s"]);
    // Wait until the server itself calls it expired (past its leeway),
    // probing with a CSR it could never sign, so nothing is issued while
    // the token is still accepted; then the real request.
    let garbage = dir.path().join("garbage.csr");
    std::fs::write(&garbage, "not a CSR").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, body) = post_csr(&cp, Some(&expired), &garbage, "");
        if status == 401 {
            break;
        }
        assert_eq!(status, 400, "before expiry only the CSR is wrong: {body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the 0 s token never expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (status, body) = post_csr(&cp, Some(&expired), &good, "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired"), "{body}");

    // TTLs: zero and negative are refused with a reason.
    for ttl in ["0s", "-5s", "soon"] {
        let (status, body) = post_csr(&cp, Some(&token), &good, &format!("?ttl={ttl}"));
        assert_eq!(status, 400, "ttl={ttl}: {body}");
    }
    let (status, _) = post_csr(&cp, Some(&token), &good, "?format=xml");
    assert_eq!(status, 400);

    // Nothing above was issued, and the server still serves.
    let (_, audit) = curl(&cp, &[], "/api/v1/certificates");
    assert_eq!(audit, r#"{"certificates":[]}"#);
    let (status, _) = post_csr(&cp, Some(&token), &good, "");
    assert_eq!(status, 200);
}

#[test]
fn one_caller_is_rate_limited_without_starving_others() {
    if !tools() {
        return;
    }
    let cp = ControlPlane::start(&[], &["--ca-rate-limit", "1", "--ca-rate-burst", "3"]);
    let dir = temp_dir("rate");
    let token = cp.token_for_identity(WEB);
    let csr = openssl_csr(dir.path(), "web", EC, &format!("URI:{WEB}"));
    // Send until refused instead of betting that six requests fit in one
    // second: the limiter may refill while we send, but never faster than
    // its rate, so the successes are bounded by burst + rate x elapsed,
    // however slow this machine is.
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    while !statuses.contains(&429) {
        assert!(statuses.len() < 60, "never rate limited: {statuses:?}");
        statuses.push(post_csr(&cp, Some(&token), &csr, "").0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(&statuses[..3], &[200, 200, 200], "the burst is served");
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        served as f64 <= 3.0 + elapsed.ceil(),
        "{served} served in {elapsed:.1} s at 1/s with a burst of 3: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );

    let db = "spiffe://cluster.local/ns/default/sa/db";
    let other = cp.token_for_identity(db);
    let csr = openssl_csr(dir.path(), "db", EC, &format!("URI:{db}"));
    assert_eq!(post_csr(&cp, Some(&other), &csr, "").0, 200);
}

#[test]
fn the_root_survives_a_restart() {
    if !tools() {
        return;
    }
    let cp = ControlPlane::start(&[], &[]);
    let before = cp.root_pem();
    let token = cp.token_for_identity(WEB);
    let cp = cp.restart(&[]);
    assert_eq!(cp.root_pem(), before);
    let (_, served) = curl(&cp, &[], "/api/v1/ca/root");
    assert_eq!(served, before);
    // Tokens minted before the restart still work.
    let dir = temp_dir("restart");
    let csr = openssl_csr(dir.path(), "web", EC, &format!("URI:{WEB}"));
    assert_eq!(post_csr(&cp, Some(&token), &csr, "").0, 200);
}

#[test]
fn the_serving_certificate_covers_its_names_and_renews_itself() {
    if !tools() {
        return;
    }
    let cp = ControlPlane::start(
        &[],
        &[
            "--server-san",
            "cp.example.test",
            "--server-san",
            "192.0.2.7",
            "--serving-cert-ttl",
            "4s",
        ],
    );
    let serial = || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect 127.0.0.1:{} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial -ext subjectAltName",
                cp.rest.port()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = serial();
    for name in [
        "DNS:localhost",
        "DNS:cp.example.test",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "IP Address:192.0.2.7",
        "DNS:meshbox-controlplane.meshbox-system.svc",
    ] {
        assert!(first.contains(name), "{name} missing from {first}");
    }
    // Wait for the renewal itself (a new serial on the wire), not for a
    // guessed duration; 60 s is far past the 4 s lifetime and only ends a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let second = loop {
        let now = serial();
        if now.lines().next().is_some() && now.lines().next() != first.lines().next() {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the serving certificate was not renewed: still {first}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // The renewed certificate still covers every name.
    for name in ["DNS:cp.example.test", "IP Address:192.0.2.7"] {
        assert!(second.contains(name), "{name} missing from {second}");
    }
    // curl still trusts it (same CA), no restart needed.
    assert_eq!(curl(&cp, &[], "/healthz").0, 200);
}

#[test]
fn the_openapi_document_lists_every_route() {
    if !tools() {
        return;
    }
    let cp = ControlPlane::start(&[], &[]);
    let (status, doc) = curl(&cp, &[], "/api/openapi.json");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    for path in [
        "/api/v1/ca/root",
        "/api/v1/certificates",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
        let (status, _) = curl(&cp, &[], path);
        assert_eq!(status, 200, "{path}");
    }
}
