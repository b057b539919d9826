//! CA issuance: certificates per second through the real control plane's
//! gRPC `CreateCertificate` (TLS, token check, CSR validation, signing) with
//! concurrent clients, next to raw ECDSA P-256 signing with the same crypto
//! library (ring) on the same cores in the same run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshbox_certs::{SpiffeId, WorkloadKey};
use meshbox_proto::ca::IstioCertificateRequest;
use meshbox_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::chart::{Bar, Chart};
use crate::host::sibling_binary;
use crate::section::Section;
use crate::stats::{ms, percentile};

pub const NAME: &str = "Control plane: CA issuance";

#[derive(clap::Args)]
pub struct CaArgs {
    /// Short phases (1 s, 2 000 issuances before the memory reading), for CI.
    #[arg(long)]
    pub quick: bool,
    /// Concurrent gRPC clients (each with its own connection).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds each throughput phase runs (default 10; --quick 1).
    #[arg(long)]
    seconds: Option<u64>,
    /// Issuances before the second memory reading (the audit log is bounded,
    /// so memory must not grow with this; default 100 000, --quick 2 000).
    #[arg(long)]
    memory_issuances: Option<u64>,
}

/// Why this part cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    crate::host::missing_siblings(&["controlplane"])
}

const IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/client";

struct ControlPlane {
    child: Child,
    grpc: SocketAddr,
    state: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn start_control_plane() -> anyhow::Result<ControlPlane> {
    let bin = sibling_binary("controlplane")?;
    let state = std::env::temp_dir().join(format!("meshbox-bench-ca-{}", std::process::id()));
    let config = state.join("config");
    std::fs::create_dir_all(&config)?;
    let mut child = Command::new(&bin)
        .args([
            "run",
            "--grpc-addr",
            "127.0.0.1:0",
            "--rest-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--ca-rate-limit",
            "1000000000",
            "--ca-rate-burst",
            "1000000000",
        ])
        .arg("--config-dir")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .env("RUST_LOG", "warn,meshbox_controlplane::run=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting controlplane")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let grpc = loop {
        let Some(Ok(line)) = lines.next() else {
            bail!("controlplane exited before serving");
        };
        if line.contains("serving xDS and CA (gRPC over TLS)")
            && let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next())
        {
            break addr.parse()?;
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(ControlPlane { child, grpc, state })
}

/// Runs `work` on `threads` threads for `duration`; returns successful
/// calls per second. Each thread gets its own state from `setup`.
fn rate_on_threads<S>(
    threads: usize,
    duration: Duration,
    setup: impl Fn(usize) -> Option<S>,
    work: impl Fn(&mut S) -> bool + Send + Sync + 'static,
) -> f64
where
    S: Send + 'static,
{
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..threads)
        .filter_map(setup)
        .map(|mut state| {
            let (count, stop, work) = (count.clone(), stop.clone(), work.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if work(&mut state) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Raw ECDSA P-256 signatures per second on `threads` threads.
fn raw_sign_rate(threads: usize, duration: Duration) -> f64 {
    let rng = SystemRandom::new();
    let Ok(pkcs8) = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng) else {
        return 0.0;
    };
    let pkcs8 = pkcs8.as_ref().to_vec();
    rate_on_threads(
        threads,
        duration,
        |_| {
            let rng = SystemRandom::new();
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                .ok()
                .map(|key| (key, rng))
        },
        |(key, rng)| {
            let message = [7u8; 512]; // about the size of a leaf's TBS
            key.sign(rng, &message).is_ok()
        },
    )
}

/// In-process issuances per second on `threads` threads: CSR parsing and
/// signature check plus signing, with no transport, token or bookkeeping.
fn in_process_issue_rate(threads: usize, csrs: Arc<Vec<String>>, duration: Duration) -> f64 {
    let Ok((ca, _, _)) = meshbox_certs::ca::CertificateAuthority::create_root(
        meshbox_certs::ca::CaPolicy::new("cluster.local"),
    ) else {
        return 0.0;
    };
    let ca = Arc::new(ca);
    rate_on_threads(
        threads,
        duration,
        |t| Some((ca.clone(), csrs.clone(), t)),
        move |(ca, csrs, i)| {
            let csr = &csrs[*i % csrs.len()];
            *i += threads;
            meshbox_certs::ValidatedCsr::from_pem(csr.as_bytes(), "cluster.local")
                .ok()
                .and_then(|v| ca.sign(&v, Some(Duration::from_secs(3600))).ok())
                .is_some()
        },
    )
}

async fn connect(
    grpc: SocketAddr,
    root: &str,
) -> anyhow::Result<IstioCertificateServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", grpc.port()))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IstioCertificateServiceClient::new(channel))
}

struct LoadResult {
    issued: u64,
    failed: u64,
    elapsed: Duration,
    /// Milliseconds.
    latencies: Vec<f64>,
}

/// `clients` loops issuing certificates until `stop_after` issuances or
/// `duration`, whichever comes first.
async fn load(
    grpc: SocketAddr,
    root: &str,
    token: &str,
    csrs: Arc<Vec<String>>,
    clients: usize,
    duration: Duration,
    stop_after: u64,
) -> anyhow::Result<LoadResult> {
    let issued = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..clients {
        let mut client = connect(grpc, root).await?;
        let (issued, failed, csrs, token) = (
            issued.clone(),
            failed.clone(),
            csrs.clone(),
            token.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = n;
            while started.elapsed() < duration && issued.load(Ordering::Relaxed) < stop_after {
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr: csrs[i % csrs.len()].clone(),
                    validity_duration: 3600,
                    metadata: None,
                });
                i += clients;
                if let Ok(value) = format!("Bearer {token}").parse() {
                    req.metadata_mut().insert("authorization", value);
                }
                let t = Instant::now();
                if client.create_certificate(req).await.is_ok() {
                    latencies.push(ms(t.elapsed()));
                    issued.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    Ok(LoadResult {
        issued: issued.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latencies,
    })
}

pub async fn run(args: CaArgs) -> anyhow::Result<Section> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cp = start_control_plane()?;
    let root = std::fs::read_to_string(cp.state.join("root-cert.pem"))?;
    let token = {
        let out = Command::new(sibling_binary("controlplane")?)
            .args(["token", "--identity", IDENTITY, "--state-dir"])
            .arg(&cp.state)
            .output()?;
        String::from_utf8(out.stdout)?.trim().to_owned()
    };
    // CSRs are made up front so the clients spend no CPU making keys during
    // the measurement; the server does not cache, so reusing them is fair.
    let id: SpiffeId = IDENTITY.parse()?;
    let csrs: Vec<String> = (0..256)
        .map(|_| WorkloadKey::generate().and_then(|k| k.csr_pem(&id)))
        .collect::<Result<_, _>>()?;
    let csrs = Arc::new(csrs);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = crate::host::rss_kib(Some(cp.child.id()));

    let seconds = args.seconds.unwrap_or(if args.quick { 1 } else { 10 });
    let memory_issuances =
        args.memory_issuances
            .unwrap_or(if args.quick { 2_000 } else { 100_000 });
    let duration = Duration::from_secs(seconds);
    let raw = tokio::task::spawn_blocking(move || raw_sign_rate(cores, duration)).await?;
    let in_process = {
        let csrs = csrs.clone();
        tokio::task::spawn_blocking(move || in_process_issue_rate(cores, csrs, duration)).await?
    };
    let grpc = load(
        cp.grpc,
        &root,
        &token,
        csrs.clone(),
        args.clients,
        duration,
        u64::MAX,
    )
    .await?;
    let rate = grpc.issued as f64 / grpc.elapsed.as_secs_f64();

    // Push the total past `memory_issuances` to show the audit log is bounded.
    let remaining = memory_issuances.saturating_sub(grpc.issued);
    let more = load(
        cp.grpc,
        &root,
        &token,
        csrs,
        args.clients,
        Duration::from_secs(3600),
        remaining,
    )
    .await?;
    let total = grpc.issued + more.issued;
    let loaded_rss = crate::host::rss_kib(Some(cp.child.id()));

    let mut section = Section::new("ca", NAME);
    section.note(format!(
        "{} concurrent gRPC clients over TLS on loopback, {seconds} s per phase, {cores} cores; raw = ring ECDSA P-256 signatures/s on {cores} threads",
        args.clients
    ));
    section.note(
        "an issuance verifies the CSR's self-signature (proof of key possession: one ECDSA verify, costlier than a sign) before signing, so raw signing is an upper bound no CA that checks CSRs reaches; in-process issuance is the same work without transport",
    );
    section.note("the gRPC clients run on the same cores as the server");
    section.compared(
        "grpc_rate",
        "certificates/s via gRPC CreateCertificate, vs raw signing",
        rate,
        raw,
        "/s",
    );
    section.compared(
        "grpc_vs_in_process",
        "certificates/s via gRPC CreateCertificate, vs in-process issuance",
        rate,
        in_process,
        "/s",
    );
    section.row("raw_sign_rate", "raw ECDSA P-256 signs/s", raw, "/s");
    section.row(
        "in_process_rate",
        "in-process issuances/s (CSR check + sign, no transport)",
        in_process,
        "/s",
    );
    section.row(
        "latency_p50_ms",
        "p50 issuance latency",
        percentile(&grpc.latencies, 0.50),
        "ms",
    );
    section.row(
        "latency_p99_ms",
        "p99 issuance latency",
        percentile(&grpc.latencies, 0.99),
        "ms",
    );
    section.row(
        "failed_issuances",
        "gRPC issuances that failed",
        (grpc.failed + more.failed) as f64,
        "",
    );
    section.row(
        "rss_idle_mib",
        "control plane RSS idle",
        idle_rss as f64 / 1024.0,
        "MiB",
    );
    section.compared(
        "rss_after_issuances_mib",
        &format!(
            "control plane RSS after {} issuances",
            crate::numbers::num(total as f64)
        ),
        loaded_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        "MiB",
    );
    section.charts.push(Chart::bars(
        "ca-rates.svg",
        "Certificates per second",
        "per second",
        "/s",
        vec![
            Bar {
                label: "raw ECDSA P-256 signing".into(),
                value: raw,
            },
            Bar {
                label: "in-process issuance (CSR check + sign)".into(),
                value: in_process,
            },
            Bar {
                label: format!("gRPC CreateCertificate, {} clients over TLS", args.clients),
                value: rate,
            },
        ],
        None,
    ));
    Ok(section)
}
