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

use crate::chart::{Chart, Series};
use crate::numbers::num;
use crate::section::{Section, Table};
use crate::stats::percentile;

pub const NAME: &str = "Control plane: xDS server";

#[derive(clap::Args)]
pub struct XdsArgs {
    /// Small sizes and few clients, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Client counts measured at `--workloads` (default 1,10,50,100;
    /// --quick 2,10).
    #[arg(long, value_delimiter = ',')]
    clients: Vec<usize>,
    /// Workloads for the client series (default 10 000; --quick 1 000);
    /// services = workloads / 5, policies = workloads / 20.
    #[arg(long)]
    workloads: Option<usize>,
    /// Workload counts of the size series (default 1000,10000,50000,100000,
    /// the last being issue 13's target size: 100 000 workloads, 20 000
    /// services, 5 000 policies; --quick 250,1000).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Clients in the size series (default 10; --quick 2).
    #[arg(long)]
    size_clients: Option<usize>,
    /// Single-workload changes measured after each full sync (default 50;
    /// --quick 10).
    #[arg(long)]
    changes: Option<usize>,
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
/// 15012 (or, with `plaintext`, 15010). Returns the address, the serving
/// task and, over TLS, the serving certificate (renewed for as long as it
/// is held) and the path of the root certificate clients must trust.
async fn serve(
    server: &XdsServer,
    state: &Path,
    plaintext: bool,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    Option<(Arc<ServingCertificate>, PathBuf)>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = tonic::service::Routes::new(server.service()).into_axum_router();
    if plaintext {
        let task = tokio::spawn(serve_plain(listener, app));
        return Ok((addr, task, None));
    }
    let ca = Arc::new(CertificateAuthority::load_or_create(
        state,
        None,
        CaPolicy::new("cluster.local"),
    )?);
    let names = ServingNames::new("meshbox-controlplane", "meshbox-system", &[]);
    let serving = ServingCertificate::start(ca.clone(), names, Duration::from_secs(24 * 3600))?;
    let tls = serving.server_config(ca.roots(), "cluster.local", &[b"h2"])?;
    let task = tokio::spawn(serve_tls(listener, tls, app));
    Ok((addr, task, Some((serving, state.join("root-cert.pem")))))
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

/// The figures of one run: `clients` clients against `workloads`.
struct Run {
    workloads: usize,
    services: usize,
    policies: usize,
    clients: usize,
    encode_ms: f64,
    sync_ms: f64,
    change_p50_ms: f64,
    change_p99_ms: f64,
    change_bytes: f64,
    sync_bytes_per_resource: f64,
    encodings_per_change: f64,
    heap_state_mib: f64,
    heap_per_client_kib: f64,
}

async fn run_one(
    workloads: usize,
    clients: usize,
    changes: usize,
    plaintext: bool,
) -> anyhow::Result<Run> {
    let (services, policies) = ((workloads / 5).max(1), (workloads / 20).max(1));
    eprintln!("==> xDS: {workloads} workloads, {clients} clients");
    let state =
        StateDir(std::env::temp_dir().join(format!("meshbox-bench-xds-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&state.0);
    std::fs::create_dir_all(&state.0)?;
    let tokens = LocalTokens::load_or_create(&state.0, "cluster.local")?;
    let token = tokens.mint_for_node("bench-node", Duration::from_secs(3600))?;
    let mut registry = prometheus_client::registry::Registry::default();
    let server = Arc::new(XdsServer::new(
        Arc::new(XdsAuth(Arc::new(Authenticator::Local(tokens)))),
        &mut registry,
        // Every client streams with the one token above, which the default
        // per-caller cap would refuse past 64 streams.
        XdsOptions {
            max_streams_per_caller: usize::MAX,
            ..XdsOptions::default()
        },
    ));
    let (addr, serving, tls) = serve(&server, &state.0, plaintext).await?;
    // Stop serving when this run ends, whatever way it ends.
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _serving = Abort(serving);

    // The resources as the model would hand them over: part of what the
    // server holds once fed.
    let heap_empty = crate::alloc::live_bytes();
    let addresses: Vec<_> = (0..workloads)
        .map(|i| workload(i, services, "v0"))
        .chain((0..services).map(service))
        .collect();
    let policy_list: Vec<_> = (0..policies).map(policy).collect();
    let encode = Instant::now();
    let feed = server.clone();
    tokio::task::spawn_blocking(move || feed.update(addresses, policy_list)).await?;
    let encode = encode.elapsed();
    let heap_loaded = crate::alloc::live_bytes();

    let exe = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(exe);
    command.arg("xds-clients");
    if let Some((_, root)) = &tls {
        command.arg("--root").arg(root);
    }
    let mut child = command
        .args(["--addr", &addr.to_string()])
        .args(["--clients", &clients.to_string()])
        .args(["--expect-addresses", &(workloads + services).to_string()])
        .args(["--expect-policies", &policies.to_string()])
        .args(["--changes", &changes.to_string()])
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
    let heap_synced = crate::alloc::live_bytes();

    let encodings_before = encodings(&registry);
    for change in 0..changes {
        let tag = format!("c{change}@{}", unix_nanos());
        let update = workload(change * 7 % workloads.max(1), services, &tag);
        let feed = server.clone();
        tokio::task::spawn_blocking(move || feed.update([update], [])).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    read_until("change_p99_ms", &mut results).await?;
    let encodings_per_change = (encodings(&registry) - encodings_before) / changes.max(1) as f64;
    let _ = child.wait().await;
    drop(tls);

    let get = |k: &str| results.get(k).copied().unwrap_or(f64::NAN);
    const MIB: f64 = 1024.0 * 1024.0;
    Ok(Run {
        workloads,
        services,
        policies,
        clients,
        encode_ms: encode.as_secs_f64() * 1e3,
        sync_ms: get("sync_ms"),
        change_p50_ms: get("change_p50_ms"),
        change_p99_ms: get("change_p99_ms"),
        change_bytes: get("change_bytes"),
        sync_bytes_per_resource: get("sync_bytes") / (workloads + services + policies) as f64,
        encodings_per_change,
        heap_state_mib: (heap_loaded - heap_empty) as f64 / MIB,
        heap_per_client_kib: (heap_synced - heap_loaded) as f64 / 1024.0 / clients as f64,
    })
}

pub async fn run(args: XdsArgs) -> anyhow::Result<Section> {
    let q = args.quick;
    let pick = |given: &[usize], quick: &[usize], full: &[usize]| {
        if !given.is_empty() {
            given.to_vec()
        } else if q {
            quick.to_vec()
        } else {
            full.to_vec()
        }
    };
    let client_counts = pick(&args.clients, &[2, 10], &[1, 10, 50, 100]);
    let workloads = args.workloads.unwrap_or(if q { 1_000 } else { 10_000 });
    let sizes = pick(
        &args.sizes,
        &[250, 1_000],
        &[1_000, 10_000, 50_000, 100_000],
    );
    let size_clients = args.size_clients.unwrap_or(if q { 2 } else { 10 });
    let changes = args.changes.unwrap_or(if q { 10 } else { 50 });
    anyhow::ensure!(
        client_counts.iter().chain(&sizes).all(|&n| n > 0) && size_clients > 0 && changes > 0,
        "client counts, sizes and changes must be positive"
    );

    let mut plan: Vec<(usize, usize)> = client_counts.iter().map(|&c| (workloads, c)).collect();
    for &w in &sizes {
        if !plan.contains(&(w, size_clients)) {
            plan.push((w, size_clients));
        }
    }
    let mut runs = vec![];
    for (w, c) in plan {
        runs.push(run_one(w, c, changes, args.plaintext).await?);
        // Let the finished run's connections wind down before the next
        // one's heap readings.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut section = Section::new("xds", NAME);
    section.note(format!(
        "services = workloads/5, policies = workloads/20; wildcard clients in a separate process, each on its own connection, {}; {changes} single-workload changes per run, 30 ms apart",
        if args.plaintext {
            "over plaintext loopback gRPC (the development port's path, --plaintext)"
        } else {
            "over TLS on loopback through the control plane's serving code (a certificate from its CA, clients trusting root-cert.pem from the state dir, node tokens)"
        },
    ));
    section.note(
        "bytes = encoded DeltaDiscoveryResponse messages a client receives (without gRPC/HTTP2/TLS framing); \
         server heap = live heap of the xDS server (state, encodings, connections), counted by the benchmark's allocator",
    );
    let mut table = Table {
        title: String::new(),
        columns: [
            "workloads",
            "services",
            "policies",
            "clients",
            "encode once",
            "full state to all",
            "change to all p50",
            "change to all p99",
            "bytes per client per change",
            "sync bytes per resource",
            "encodings per change",
            "server heap: state",
            "server heap per client",
        ]
        .map(String::from)
        .to_vec(),
        rows: vec![],
    };
    for r in &runs {
        let p = format!("w{}_c{}", r.workloads, r.clients);
        let label = format!("{} workloads, {} clients", r.workloads, r.clients);
        for (id, what, value, unit) in [
            ("encode_ms", "encode the full state once", r.encode_ms, "ms"),
            ("sync_ms", "full state to all clients", r.sync_ms, "ms"),
            (
                "change_p50_ms",
                "change to all clients p50",
                r.change_p50_ms,
                "ms",
            ),
            (
                "change_p99_ms",
                "change to all clients p99",
                r.change_p99_ms,
                "ms",
            ),
            (
                "change_bytes",
                "bytes per client for one pod change",
                r.change_bytes,
                "B",
            ),
            (
                "sync_bytes_per_resource",
                "full-state bytes per resource",
                r.sync_bytes_per_resource,
                "B",
            ),
            (
                "encodings_per_change",
                "resource encodings per change",
                r.encodings_per_change,
                "",
            ),
            (
                "heap_state_mib",
                "server heap with the state loaded",
                r.heap_state_mib,
                "MiB",
            ),
            (
                "heap_per_client_kib",
                "server heap per client after the full sync",
                r.heap_per_client_kib,
                "KiB",
            ),
        ] {
            section.table_row(
                &format!("{p}_{id}"),
                &format!("{label}: {what}"),
                value,
                unit,
            );
        }
        table.rows.push(vec![
            num(r.workloads as f64),
            num(r.services as f64),
            num(r.policies as f64),
            num(r.clients as f64),
            format!("{} ms", num(r.encode_ms)),
            format!("{} ms", num(r.sync_ms)),
            format!("{} ms", num(r.change_p50_ms)),
            format!("{} ms", num(r.change_p99_ms)),
            format!("{} B", num(r.change_bytes)),
            format!("{} B", num(r.sync_bytes_per_resource)),
            num(r.encodings_per_change),
            format!("{} MiB", num(r.heap_state_mib)),
            format!("{} KiB", num(r.heap_per_client_kib)),
        ]);
    }
    section.tables.push(table);

    let max = |f: fn(&Run) -> f64| runs.iter().map(f).fold(f64::NAN, f64::max);
    let min = |f: fn(&Run) -> f64| runs.iter().map(f).fold(f64::NAN, f64::min);
    section.table_row(
        "encodings_per_change_max",
        "resource encodings per change, highest over runs",
        max(|r| r.encodings_per_change),
        "",
    );
    section.table_row(
        "bytes_per_change_max",
        "bytes per client per pod change, highest over runs",
        max(|r| r.change_bytes),
        "B",
    );
    section.table_row(
        "bytes_per_change_spread",
        "bytes per client per pod change, highest / lowest over runs",
        max(|r| r.change_bytes) / min(|r| r.change_bytes),
        "",
    );
    section.table_row(
        "sync_bytes_per_resource_max",
        "full-state bytes per resource, highest over runs",
        max(|r| r.sync_bytes_per_resource),
        "B",
    );
    // Per connected client the server holds buffers and bookkeeping whose
    // size is capped, not a copy of the state: the runs with many clients
    // show it best (one client also carries the first connection's
    // one-time costs).
    let many: Vec<&Run> = runs.iter().filter(|r| r.clients >= 10).collect();
    let per_client = if many.is_empty() {
        max(|r| r.heap_per_client_kib)
    } else {
        many.iter()
            .map(|r| r.heap_per_client_kib)
            .fold(f64::NAN, f64::max)
    };
    section.table_row(
        "server_heap_per_client_kib_max",
        "server heap per connected client after the full sync, highest over runs with ≥ 10 clients",
        per_client,
        "KiB",
    );
    section.note(format!(
        "server heap per connected client: at most {} KiB over the runs with 10 or more clients, whatever the mesh size",
        num(per_client)
    ));

    let by_clients: Vec<&Run> = runs.iter().filter(|r| r.workloads == workloads).collect();
    let points = |rs: &[&Run], x: fn(&Run) -> f64, y: fn(&Run) -> f64| {
        rs.iter().map(|r| (x(r), y(r))).collect::<Vec<_>>()
    };
    section.charts.push(Chart::lines(
        "xds-clients.svg",
        &format!("xDS: {} workloads to N clients", num(workloads as f64)),
        "clients",
        "ms",
        vec![
            Series::new(
                "full state to all clients",
                points(&by_clients, |r| r.clients as f64, |r| r.sync_ms),
            ),
            Series::new(
                "one change to all clients, p99",
                points(&by_clients, |r| r.clients as f64, |r| r.change_p99_ms),
            ),
            Series::new(
                "one change to all clients, p50",
                points(&by_clients, |r| r.clients as f64, |r| r.change_p50_ms),
            ),
        ],
    ));
    let mut by_size: Vec<&Run> = runs.iter().filter(|r| r.clients == size_clients).collect();
    by_size.sort_by_key(|r| r.workloads);
    if let Some(first) = by_size.first() {
        let (w0, s0) = (first.workloads as f64, first.sync_ms);
        section.charts.push(Chart::lines(
            "xds-sizes.svg",
            &format!("xDS: full state to {size_clients} clients vs mesh size"),
            "workloads (services = workloads/5, policies = workloads/20)",
            "ms",
            vec![
                Series::reference(
                    &format!("linear from {} workloads", num(w0)),
                    points(&by_size, |r| r.workloads as f64, |r| r.workloads as f64)
                        .into_iter()
                        .map(|(x, _)| (x, s0 * x / w0))
                        .collect(),
                ),
                Series::new(
                    "full state to all clients",
                    points(&by_size, |r| r.workloads as f64, |r| r.sync_ms),
                ),
            ],
        ));
    }
    Ok(section)
}

/// Reads `meshbox_xds_resource_encodings_total` from the registry.
fn encodings(registry: &prometheus_client::registry::Registry) -> f64 {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    crate::stats::metric_sum(&text, "meshbox_xds_resource_encodings_total")
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
            let mut sync_bytes = 0;
            while let Ok(Some(r)) = stream.message().await {
                *counts.entry(r.type_url.clone()).or_default() += r.resources.len();
                if !synced {
                    sync_bytes += r.encoded_len();
                    if counts.get(ADDRESS_TYPE_URL).copied().unwrap_or(0) >= expect_addresses
                        && counts.get(AUTHORIZATION_TYPE_URL).copied().unwrap_or(0)
                            >= expect_policies
                    {
                        synced = true;
                        let _ = seen.send((None, unix_nanos(), sync_bytes));
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
    let mut sync_bytes = 0;
    while synced < args.clients {
        match seen_rx.recv().await {
            Some((None, _, bytes)) => {
                synced += 1;
                sync_bytes += bytes;
            }
            Some(_) => {}
            None => bail!("clients ended"),
        }
    }
    // Bytes first: the server reads its memory on `sync_ms`.
    println!("RESULT sync_bytes={}", sync_bytes / args.clients.max(1));
    println!("RESULT sync_ms={}", started.elapsed().as_secs_f64() * 1e3);
    let mut per_change: HashMap<String, (usize, u128)> = HashMap::new();
    let mut latencies = Vec::new();
    let mut bytes = 0;
    while latencies.len() < args.changes {
        let (tag, at, size) = match seen_rx.recv().await {
            Some((Some(tag), at, size)) => (tag, at, size),
            Some(_) => continue,
            None => bail!("clients ended"),
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
    println!("RESULT change_bytes={bytes}");
    println!("RESULT change_p50_ms={}", percentile(&latencies, 0.5));
    println!("RESULT change_p99_ms={}", percentile(&latencies, 0.99));
    Ok(())
}
