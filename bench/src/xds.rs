//! The xDS server at scale: N clients (a separate process, so the server's
//! memory and CPU are its own) subscribe to everything; measured are the time
//! until all hold the full state, the time from one workload change to all
//! clients having it, the bytes each client receives for that change, the
//! encodings per change (must be 1, not N), and the server's memory.
//!
//! By default the server is reached the way dataplanes reach port 15012:
//! the control plane's own serving code (TLS with a certificate from its CA,
//! kept in a state directory), node tokens checked by the same authenticator,
//! and clients that trust `root-cert.pem` from that state directory.
//! `--plaintext` serves it like the development port 15010 instead. Changes
//! are fed to the xDS server directly (as the model does), so the figures are
//! the xDS server's, not the manifest folder's polling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use meshbox_certs::ca::{CaPolicy, CertificateAuthority};
use meshbox_controlplane::auth::Authenticator;
use meshbox_controlplane::auth::local::LocalTokens;
use meshbox_controlplane::run::XdsAuth;
use meshbox_controlplane::serving::{ServingCertificate, ServingNames, serve_plain, serve_tls};
use meshbox_controlplane::xds::{XdsOptions, XdsServer};
use meshbox_proto::security::{Action, Authorization, Clause, Match, Rule, Scope};
use meshbox_proto::workload::{
    Address, NetworkAddress, Port, PortList, Service, Workload, address,
};
use meshbox_proto::xds::DeltaDiscoveryRequest;
use meshbox_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshbox_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::report::Section;

#[derive(clap::Args)]
pub struct XdsArgs {
    #[arg(long, default_value_t = 100)]
    clients: usize,
    #[arg(long, default_value_t = 10_000)]
    workloads: usize,
    #[arg(long, default_value_t = 2_000)]
    services: usize,
    #[arg(long, default_value_t = 500)]
    policies: usize,
    /// Single-workload changes measured after the full sync.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Serve without TLS (like the development port 15010) instead of the
    /// TLS path of port 15012.
    #[arg(long)]
    plaintext: bool,
}

/// The client side, run as a child process: `bench xds-clients`.
#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    addr: String,
    /// Trust this root and connect over TLS (else plaintext).
    #[arg(long)]
    root: Option<PathBuf>,
    #[arg(long)]
    clients: usize,
    #[arg(long)]
    expect_addresses: usize,
    #[arg(long)]
    expect_policies: usize,
    #[arg(long)]
    changes: usize,
}

/// The bearer token the client process presents (an environment variable,
/// not an argument, so it does not show in `ps`).
const TOKEN_ENV: &str = "MESHBOX_BENCH_XDS_TOKEN";

/// A state directory for the benchmark's CA and token key, removed at the
/// end.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves `server` on a loopback port the way `controlplane run` serves
/// 15012 (or, with `plaintext`, 15010). Returns the address and, over TLS,
/// the serving certificate (renewed for as long as it is held) and the path
/// of the root certificate clients must trust.
async fn serve(
    server: &XdsServer,
    state: &Path,
    plaintext: bool,
) -> anyhow::Result<(
    std::net::SocketAddr,
    Option<(Arc<ServingCertificate>, PathBuf)>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = tonic::service::Routes::new(server.service()).into_axum_router();
    if plaintext {
        tokio::spawn(serve_plain(listener, app));
        return Ok((addr, None));
    }
    let ca = Arc::new(CertificateAuthority::load_or_create(
        state,
        None,
        CaPolicy::new("cluster.local"),
    )?);
    let names = ServingNames::new("meshbox-controlplane", "meshbox-system", &[]);
    let serving = ServingCertificate::start(ca.clone(), names, Duration::from_secs(24 * 3600))?;
    let tls = serving.server_config(ca.roots(), "cluster.local", &[b"h2"])?;
    tokio::spawn(serve_tls(listener, tls, app));
    Ok((addr, Some((serving, state.join("root-cert.pem")))))
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn workload(i: usize, services: usize, tag: &str) -> (String, Option<Arc<Address>>) {
    let name = format!("pod-{i}");
    let uid = format!("Kubernetes//Pod/default/{name}");
    let mut w = Workload {
        uid: uid.clone(),
        name: name.clone(),
        namespace: "default".into(),
        addresses: vec![vec![10, (i >> 16) as u8, (i >> 8) as u8, i as u8]],
        service_account: format!("sa-{}", i % 50),
        trust_domain: "cluster.local".into(),
        node: format!("node-{}", i % 20),
        canonical_name: name,
        canonical_revision: tag.into(),
        tunnel_protocol: 1,
        ..Default::default()
    };
    for s in 0..2 {
        w.services.insert(
            format!(
                "default/svc-{}.default.svc.cluster.local",
                (i + s) % services.max(1)
            ),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        );
    }
    let a = Address {
        r#type: Some(address::Type::Workload(w)),
    };
    (uid, Some(Arc::new(a)))
}

fn service(s: usize) -> (String, Option<Arc<Address>>) {
    let hostname = format!("svc-{s}.default.svc.cluster.local");
    let a = Address {
        r#type: Some(address::Type::Service(Service {
            name: format!("svc-{s}"),
            namespace: "default".into(),
            hostname: hostname.clone(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, (s >> 8) as u8, s as u8],
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..Default::default()
        })),
    };
    (format!("default/{hostname}"), Some(Arc::new(a)))
}

fn policy(p: usize) -> (String, Option<Arc<Authorization>>) {
    let a = Authorization {
        name: format!("p{p}"),
        namespace: "default".into(),
        scope: Scope::Namespace as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![p as u32 + 1000],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    (format!("default/p{p}"), Some(Arc::new(a)))
}

pub async fn run(args: XdsArgs) -> anyhow::Result<Section> {
    let state =
        StateDir(std::env::temp_dir().join(format!("meshbox-bench-xds-{}", std::process::id())));
    std::fs::create_dir_all(&state.0)?;
    let tokens = LocalTokens::load_or_create(&state.0, "cluster.local")?;
    let token = tokens.mint_for_node("bench-node", Duration::from_secs(3600))?;
    let mut registry = prometheus_client::registry::Registry::default();
    let server = Arc::new(XdsServer::new(
        Arc::new(XdsAuth(Arc::new(Authenticator::Local(tokens)))),
        &mut registry,
        XdsOptions::default(),
    ));
    let (addr, tls) = serve(&server, &state.0, args.plaintext).await?;

    let rss_empty = crate::proc::rss_kib(None) as f64 / 1024.0;
    let addresses: Vec<_> = (0..args.workloads)
        .map(|i| workload(i, args.services, "v0"))
        .chain((0..args.services).map(service))
        .collect();
    let policies: Vec<_> = (0..args.policies).map(policy).collect();
    let encode = Instant::now();
    let feed = server.clone();
    tokio::task::spawn_blocking(move || feed.update(addresses, policies)).await?;
    let encode = encode.elapsed();
    let rss_loaded = crate::proc::rss_kib(None) as f64 / 1024.0;

    let exe = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(exe);
    command.arg("xds-clients");
    if let Some((_, root)) = &tls {
        command.arg("--root").arg(root);
    }
    let mut child = command
        .args(["--addr", &addr.to_string()])
        .args(["--clients", &args.clients.to_string()])
        .args([
            "--expect-addresses",
            &(args.workloads + args.services).to_string(),
        ])
        .args(["--expect-policies", &args.policies.to_string()])
        .args(["--changes", &args.changes.to_string()])
        .env(TOKEN_ENV, &token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the client process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut results: HashMap<String, f64> = HashMap::new();
    let mut read_until =
        async |key: &str, results: &mut HashMap<String, f64>| -> anyhow::Result<()> {
            while let Some(line) = lines.next_line().await? {
                if let Some((k, v)) = line.strip_prefix("RESULT ").and_then(|l| l.split_once('=')) {
                    results.insert(k.to_owned(), v.parse()?);
                    if k == key {
                        return Ok(());
                    }
                }
            }
            bail!("the client process ended before reporting {key}")
        };
    read_until("sync_ms", &mut results).await?;
    let rss_synced = crate::proc::rss_kib(None) as f64 / 1024.0;

    let encodings_before = encodings(&registry);
    for change in 0..args.changes {
        let tag = format!("c{change}@{}", unix_nanos());
        let update = workload(change * 7 % args.workloads.max(1), args.services, &tag);
        let feed = server.clone();
        tokio::task::spawn_blocking(move || feed.update([update], [])).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    read_until("change_p99_ms", &mut results).await?;
    let encodings_per_change =
        (encodings(&registry) - encodings_before) / args.changes.max(1) as f64;
    let _ = child.wait().await;

    let mut section = Section::new("xDS server");
    section.notes.push(format!(
        "{} workloads, {} services, {} policies; {} wildcard clients in a separate process, each on its own connection, {}; {} single-workload changes, 30 ms apart",
        args.workloads,
        args.services,
        args.policies,
        args.clients,
        if args.plaintext {
            "over plaintext loopback gRPC (the development port's path, --plaintext)"
        } else {
            "over TLS on loopback through the control plane's serving code (a certificate from its CA, clients trusting root-cert.pem from the state dir, node tokens)"
        },
        args.changes
    ));
    let get = |k: &str| results.get(k).copied().unwrap_or(f64::NAN);
    section.row(
        "encode the full state once",
        encode.as_secs_f64() * 1e3,
        "ms",
    );
    section.row(
        &format!("full state to all {} clients", args.clients),
        get("sync_ms"),
        "ms",
    );
    section.row("change to all clients p50", get("change_p50_ms"), "ms");
    section.row("change to all clients p99", get("change_p99_ms"), "ms");
    section.row(
        "bytes per client for one pod change",
        get("change_bytes"),
        "B",
    );
    section.row("resource encodings per change", encodings_per_change, "");
    section.row("server RSS empty", rss_empty, "MiB");
    section.compared(
        "server RSS with the state loaded",
        rss_loaded,
        rss_empty,
        "MiB",
    );
    section.compared(
        "server RSS after the full sync",
        rss_synced,
        rss_empty,
        "MiB",
    );
    Ok(section)
}

/// Reads `meshbox_xds_resource_encodings_total` from the registry.
fn encodings(registry: &prometheus_client::registry::Registry) -> f64 {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text.lines()
        .find(|l| l.starts_with("meshbox_xds_resource_encodings_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub async fn run_clients(args: ClientArgs) -> anyhow::Result<()> {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(Option<String>, u128, usize)>();
    let token = std::env::var(TOKEN_ENV).with_context(|| format!("{TOKEN_ENV} is not set"))?;
    let authorization: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let endpoint = match &args.root {
        Some(root) => {
            let root = std::fs::read_to_string(root)
                .with_context(|| format!("reading {}", root.display()))?;
            Endpoint::from_shared(format!("https://{}", args.addr))?.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(root))
                    .domain_name("localhost"),
            )?
        }
        None => Endpoint::from_shared(format!("http://{}", args.addr))?,
    };
    let started = Instant::now();
    for _ in 0..args.clients {
        // One connection per client, as separate dataplanes would have.
        let channel = endpoint.connect_lazy();
        let authorization = authorization.clone();
        let seen = seen_tx.clone();
        let (expect_addresses, expect_policies) = (args.expect_addresses, args.expect_policies);
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            request
                .metadata_mut()
                .insert("authorization", authorization);
            let response = match AggregatedDiscoveryServiceClient::new(channel)
                .delta_aggregated_resources(request)
                .await
            {
                Ok(response) => response,
                Err(status) => {
                    eprintln!("xDS stream refused: {status}");
                    return;
                }
            };
            let mut stream = response.into_inner();
            for type_url in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: type_url.into(),
                        ..Default::default()
                    })
                    .await;
            }
            let mut counts: HashMap<String, usize> = HashMap::new();
            let mut synced = false;
            while let Ok(Some(r)) = stream.message().await {
                *counts.entry(r.type_url.clone()).or_default() += r.resources.len();
                if !synced {
                    if counts.get(ADDRESS_TYPE_URL).copied().unwrap_or(0) >= expect_addresses
                        && counts.get(AUTHORIZATION_TYPE_URL).copied().unwrap_or(0)
                            >= expect_policies
                    {
                        synced = true;
                        let _ = seen.send((None, unix_nanos(), 0));
                    }
                } else {
                    for res in &r.resources {
                        if let Some(any) = &res.resource
                            && let Ok(a) = Address::decode(any.value.as_slice())
                            && let Some(address::Type::Workload(w)) = a.r#type
                        {
                            let _ = seen.send((
                                Some(w.canonical_revision),
                                unix_nanos(),
                                r.encoded_len(),
                            ));
                        }
                    }
                }
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: r.type_url.clone(),
                        response_nonce: r.nonce.clone(),
                        ..Default::default()
                    })
                    .await;
            }
        });
    }
    let mut synced = 0;
    while synced < args.clients {
        match seen_rx.recv().await {
            Some((None, _, _)) => synced += 1,
            Some(_) => {}
            None => bail!("clients ended"),
        }
    }
    println!("RESULT sync_ms={}", started.elapsed().as_secs_f64() * 1e3);
    let mut per_change: HashMap<String, (usize, u128)> = HashMap::new();
    let mut latencies = Vec::new();
    let mut bytes = 0;
    while latencies.len() < args.changes {
        let Some((Some(tag), at, size)) = seen_rx.recv().await else {
            continue;
        };
        let Some(sent) = tag
            .split_once('@')
            .and_then(|(_, s)| s.parse::<u128>().ok())
        else {
            continue;
        };
        bytes = size;
        let entry = per_change.entry(tag).or_insert((0, 0));
        entry.0 += 1;
        entry.1 = entry.1.max(at.saturating_sub(sent));
        if entry.0 == args.clients {
            latencies.push(entry.1 as f64 / 1e6);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!("RESULT change_bytes={bytes}");
    println!("RESULT change_p50_ms={}", pct(0.5));
    println!("RESULT change_p99_ms={}", pct(0.99));
    Ok(())
}
