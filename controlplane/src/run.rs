//! `controlplane run`: loads the CA, picks the mode (standalone from a
//! manifest folder, or Kubernetes), and starts the listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use meshbox_certs::ca::{CaPolicy, CertificateAuthority};
use tokio::net::TcpListener;

use crate::api::{self, ApiOptions, ApiState};
use crate::auth::Authenticator;
use crate::auth::Caller;
use crate::auth::local::LocalTokens;
use crate::auth::token_review::TokenReviewer;
use crate::ca::grpc::CaGrpc;
use crate::ca::{CertificateIssuer, NodeRoster, RateLimit};
use crate::capture::{CaptureGrpc, CaptureReports, EnrollmentGrpc};
use crate::cluster;
use crate::k8s::waypoint_controller;
use crate::k8s::waypoint_deployer::WaypointSettings;
use crate::limits::{self, AuthFirst, ConnectionLimits};
use crate::metrics::Metrics;
use crate::model::MeshConfig;
use crate::route_status::controller as route_status_controller;
use crate::serving::{ServingCertificate, ServingNames, serve_plain_with, serve_tls_with};
use crate::source::{self, manifests::ManifestFolder};
use crate::store::MeshStore;
use crate::xds::{Peer, StreamAuthenticator, XdsOptions, XdsServer};

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Standalone mode: read Kubernetes YAML from this folder instead of a
    /// cluster, and watch it for changes.
    #[arg(long, env = "MESHBOX_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Where the root CA and the token key are kept.
    #[arg(long, env = "MESHBOX_STATE_DIR")]
    pub state_dir: PathBuf,
    /// A user-supplied CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem). Default: STATE_DIR/cacerts if present.
    #[arg(long)]
    pub cacerts_dir: Option<PathBuf>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// xDS and CA over TLS.
    #[arg(long, default_value = "[::]:15012")]
    pub grpc_addr: SocketAddr,
    /// REST API, metrics and health over HTTPS.
    #[arg(long, default_value = "[::]:15014")]
    pub rest_addr: SocketAddr,
    /// xDS and CA without TLS, for development only (Istio uses 15010).
    #[arg(long)]
    pub xds_plaintext_addr: Option<SocketAddr>,
    /// An extra DNS name or IP for the serving certificate (repeatable).
    #[arg(long = "server-san")]
    pub server_sans: Vec<String>,
    /// Lifetime of a workload certificate when the request names none.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub default_cert_ttl: Duration,
    /// Longest workload certificate lifetime; longer requests are capped.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: Duration,
    /// Lifetime of the control plane's own serving certificate (renewed at half).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub serving_cert_ttl: Duration,
    /// Certificate requests per second allowed to one caller.
    #[arg(long, default_value_t = 100)]
    pub ca_rate_limit: u32,
    /// Requests one caller may make in a burst above the rate.
    #[arg(long, default_value_t = 200)]
    pub ca_rate_burst: u32,
    /// Issuances kept for GET /api/v1/certificates.
    #[arg(long, default_value_t = 1000)]
    pub audit_log_size: usize,
    /// The control plane's own namespace (Kubernetes mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshbox-system")]
    pub namespace: String,
    /// The control plane's Service name, for the serving certificate.
    #[arg(long, default_value = "meshbox-controlplane")]
    pub service_name: String,
    /// Service accounts (namespace/name) of node proxies, which may ask for
    /// the identities of pods on their node (Kubernetes mode).
    #[arg(
        long = "node-proxy-service-account",
        default_values = ["meshbox-system/meshbox-dataplane", "istio-system/ztunnel"]
    )]
    pub node_proxy_service_accounts: Vec<String>,
    /// Audiences a service-account token must carry (Kubernetes mode).
    #[arg(long = "token-audience", default_values = ["istio-ca"])]
    pub token_audiences: Vec<String>,
    /// Cluster name, used in workload uids (`{cluster}//Pod/{ns}/{name}`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// DNS suffix of Service hostnames.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Namespace whose selector-less AuthorizationPolicies apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// How log lines are written.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Most connections one source IP may hold open on each listener (15012,
    /// 15014, the plaintext port); more are closed at accept.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    pub max_connections_per_peer: usize,
    /// Most xDS streams one authenticated caller (a node, or a workload
    /// identity) may have open at once.
    #[arg(long, default_value_t = crate::xds::DEFAULT_MAX_STREAMS_PER_CALLER)]
    pub max_xds_streams_per_caller: usize,
    /// Longest an HTTP/1 client may take to send a request's headers.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Longest a request body may take to arrive: REST (answered with 408)
    /// and the unary gRPC calls (CA, capture reports, enrollment).
    /// The largest body accepted is a 64 KiB CSR, well under a second on any
    /// working link.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,
    /// Require a valid bearer token on the REST API's read-only inspection
    /// endpoints. Default: on in Kubernetes mode, off in standalone mode.
    #[arg(
        long,
        env = "MESHBOX_REQUIRE_TOKEN_FOR_READS",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub require_token_for_reads: Option<bool>,
    /// Image of the waypoint Deployments created for Gateways of class
    /// istio-waypoint or meshbox-waypoint (Kubernetes mode).
    #[arg(
        long,
        env = "MESHBOX_WAYPOINT_IMAGE",
        default_value = "meshbox/waypoint:dev"
    )]
    pub waypoint_image: String,
    /// Deploy waypoints for waypoint Gateways (Kubernetes mode); off where
    /// another controller (istiod) deploys them.
    #[arg(
        long,
        env = "MESHBOX_DEPLOY_WAYPOINTS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub deploy_waypoints: bool,
}

/// Where the mesh model's input comes from, decided once at start-up.
enum Source {
    /// Standalone: a folder of Kubernetes YAML (`--config-dir`).
    Folder(PathBuf),
    /// A Kubernetes API server, reachable.
    Kubernetes(kube::Client),
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    meshbox_certs::spiffe::check_trust_domain(&config.trust_domain).context("--trust-domain")?;
    if config.max_cert_ttl.is_zero() || config.default_cert_ttl.is_zero() {
        bail!("--max-cert-ttl and --default-cert-ttl must be positive");
    }
    if config.header_read_timeout.is_zero() || config.body_read_timeout.is_zero() {
        bail!("--header-read-timeout and --body-read-timeout must be positive");
    }
    if config.max_connections_per_peer == 0 {
        bail!("--max-connections-per-peer must be at least 1");
    }

    let source = match &config.config_dir {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--config-dir {}: not a directory", dir.display());
            }
            Source::Folder(dir.clone())
        }
        None => Source::Kubernetes(connect_to_cluster().await?),
    };

    let policy = CaPolicy {
        trust_domain: config.trust_domain.clone(),
        default_ttl: config.default_cert_ttl,
        max_ttl: config.max_cert_ttl,
    };
    let cacerts = config
        .cacerts_dir
        .clone()
        .unwrap_or_else(|| config.state_dir.join("cacerts"));
    let ca = Arc::new(match &source {
        Source::Folder(_) => {
            CertificateAuthority::load_or_create(&config.state_dir, Some(&cacerts), policy)
                .context("loading the CA")?
        }
        Source::Kubernetes(client) => {
            cluster::load_or_create_ca(client.clone(), &config.namespace, policy)
                .await
                .context("loading the CA from the cluster")?
        }
    });
    tracing::info!(source = ?ca.source(), trust_domain = %config.trust_domain, "CA ready");

    let auth = Arc::new(match &source {
        Source::Folder(_) => Authenticator::Local(
            LocalTokens::load_or_create(&config.state_dir, &config.trust_domain)
                .context("loading the token signing key")?,
        ),
        Source::Kubernetes(client) => Authenticator::Kubernetes(Box::new(TokenReviewer::new(
            client.clone(),
            &config.trust_domain,
            config.token_audiences.clone(),
            config.node_proxy_service_accounts.clone(),
        ))),
    });

    let store = MeshStore::new(MeshConfig {
        cluster_id: config.cluster_id.clone(),
        trust_domain: config.trust_domain.clone(),
        cluster_domain: config.cluster_domain.clone(),
        root_namespace: config.root_namespace.clone(),
    });
    let ready = Arc::new(AtomicBool::new(false));
    match &source {
        Source::Folder(dir) => {
            source::run_manifests(ManifestFolder::new(dir), store.clone(), ready.clone()).await?;
        }
        Source::Kubernetes(client) => {
            let sync = source::kubernetes::start(client.clone(), store.clone());
            let synced = sync.clone();
            route_status_controller::start(
                client.clone(),
                store.clone(),
                Box::pin(async move { synced.wait().await }),
            );
            let ready = ready.clone();
            tokio::spawn(async move {
                sync.wait().await;
                ready.store(true, Ordering::Release);
                tracing::info!("every Kubernetes watcher has listed once; ready");
            });
            cluster::publish_root_configmaps(
                client.clone(),
                ca.roots_pem(),
                config.namespace.clone(),
            );
            if config.deploy_waypoints {
                waypoint_controller::start(waypoint_controller::Context::new(
                    client.clone(),
                    waypoint_settings(&config),
                    ca.roots_pem(),
                ));
            }
        }
    }
    let roster: Arc<dyn NodeRoster> = store.clone();
    let mut xds = None;
    let metrics = Metrics::new(|registry| {
        xds = Some(XdsServer::new(
            Arc::new(XdsAuth(auth.clone())),
            registry,
            XdsOptions {
                max_streams_per_caller: config.max_xds_streams_per_caller,
                ..XdsOptions::default()
            },
        ));
    });
    let xds = Arc::new(xds.context("the xDS server was not built")?);
    feed_xds(&store, xds.clone());
    let issuer = Arc::new(CertificateIssuer::new(
        ca.clone(),
        roster,
        RateLimit {
            per_second: config.ca_rate_limit,
            burst: config.ca_rate_burst,
        },
        config.audit_log_size,
        metrics.ca.clone(),
    ));
    let names = ServingNames::new(&config.service_name, &config.namespace, &config.server_sans);
    let serving = ServingCertificate::start(ca.clone(), names, config.serving_cert_ttl)
        .context("issuing the serving certificate")?;

    // Kubernetes mode: 15014 is reachable from every pod through the
    // Service, and what it lists (pod IPs, identities, nodes, dataplane
    // addresses) is reconnaissance. Standalone mode is a development setup
    // whose quick start reads with plain curl.
    let require_token_for_reads = config
        .require_token_for_reads
        .unwrap_or(matches!(source, Source::Kubernetes(_)));
    tracing::info!(
        require_token_for_reads,
        "REST inspection endpoints {}",
        if require_token_for_reads {
            "need a bearer token"
        } else {
            "are open to anyone who reaches the REST port"
        }
    );
    let capture = Arc::new(CaptureReports::default());
    // The unary services check the token before their message is read, and
    // bound the time it may take to arrive; xDS streams authenticate on open.
    let grpc_routes = tonic::service::Routes::new(AuthFirst::new(
        CaGrpc::server(issuer.clone(), auth.clone()),
        auth.clone(),
        config.body_read_timeout,
        metrics.limits.clone(),
    ))
    .add_service(xds.service())
    .add_service(AuthFirst::new(
        CaptureGrpc::server(capture.clone(), auth.clone(), store.clone()),
        auth.clone(),
        config.body_read_timeout,
        metrics.limits.clone(),
    ))
    .add_service(AuthFirst::new(
        EnrollmentGrpc::server(auth.clone(), store.clone()),
        auth.clone(),
        config.body_read_timeout,
        metrics.limits.clone(),
    ));
    let grpc_app = grpc_routes.into_axum_router();
    let rest_app = api::router(ApiState {
        issuer: issuer.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        store: store.clone(),
        xds: xds.clone(),
        capture,
        options: ApiOptions {
            body_read_timeout: config.body_read_timeout,
            require_token_for_reads,
        },
    });

    let grpc_listener = bind(config.grpc_addr).await?;
    let rest_listener = bind(config.rest_addr).await?;
    let grpc_tls = serving.server_config(ca.roots(), &config.trust_domain, &[b"h2"])?;
    let rest_tls =
        serving.server_config(ca.roots(), &config.trust_domain, &[b"h2", b"http/1.1"])?;
    tracing::info!(addr = %grpc_listener.local_addr()?, "serving xDS and CA (gRPC over TLS)");
    tracing::info!(addr = %rest_listener.local_addr()?, "serving the REST API (HTTPS)");
    let limits = |listener| ConnectionLimits {
        listener,
        max_per_peer: config.max_connections_per_peer,
        header_read_timeout: config.header_read_timeout,
        metrics: metrics.limits.clone(),
    };
    tokio::spawn(serve_tls_with(
        grpc_listener,
        grpc_tls,
        grpc_app.clone(),
        limits("grpc"),
    ));
    tokio::spawn(serve_tls_with(
        rest_listener,
        rest_tls,
        rest_app,
        limits("rest"),
    ));
    if let Some(addr) = config.xds_plaintext_addr {
        let listener = bind(addr).await?;
        tracing::warn!(addr = %listener.local_addr()?, "serving xDS and CA WITHOUT TLS (development only)");
        tokio::spawn(serve_plain_with(listener, grpc_app, limits("plaintext")));
    }

    let housekeeping = issuer.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            housekeeping.forget_idle_callers();
        }
    });

    shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
}

/// What the waypoint Deployments get from the control plane's own flags:
/// its Service's address, the token audience it checks, its mesh names.
fn waypoint_settings(config: &RunConfig) -> WaypointSettings {
    WaypointSettings {
        image: config.waypoint_image.clone(),
        xds_address: format!(
            "https://{}.{}.svc:{}",
            config.service_name,
            config.namespace,
            config.grpc_addr.port()
        ),
        token_audience: config
            .token_audiences
            .first()
            .cloned()
            .unwrap_or_else(|| "istio-ca".into()),
        cluster_id: config.cluster_id.clone(),
        trust_domain: config.trust_domain.clone(),
        cluster_domain: config.cluster_domain.clone(),
    }
}

/// Authenticates xDS streams with the same tokens as the CA.
pub struct XdsAuth(pub Arc<Authenticator>);

#[tonic::async_trait]
impl StreamAuthenticator for XdsAuth {
    async fn authenticate(&self, header: Option<&str>) -> Result<Peer, tonic::Status> {
        let caller = self
            .0
            .authenticate_header(header)
            .await
            .map_err(crate::ca::grpc::auth_status)?;
        let node = match &caller {
            Caller::Node { node } => Some(node.clone()),
            Caller::Workload(_) => None,
        };
        Ok(Peer {
            caller: caller.key(),
            node,
        })
    }
}

/// Streams the model's changes, in order, into the xDS server. Encoding
/// happens here, off the request path.
fn feed_xds(store: &MeshStore, xds: Arc<XdsServer>) {
    let (snapshot, mut changes) = store.snapshot_and_subscribe();
    tokio::spawn(async move {
        let first = xds.clone();
        let _ = tokio::task::spawn_blocking(move || {
            first.update(
                snapshot.addresses.into_iter().map(|(n, a)| (n, Some(a))),
                snapshot
                    .authorizations
                    .into_iter()
                    .map(|(n, a)| (n, Some(a))),
            );
            first.update_waypoints(
                snapshot
                    .waypoint_policies
                    .into_iter()
                    .map(|(n, p)| (n, Some(p))),
                snapshot
                    .waypoint_routes
                    .into_iter()
                    .map(|(n, r)| (n, Some(r))),
            );
        })
        .await;
        while let Some(change) = changes.recv().await {
            // Fold whatever else is queued into one update.
            let mut addresses = change.addresses.clone();
            let mut authorizations = change.authorizations.clone();
            let mut waypoint_policies = change.waypoint_policies.clone();
            let mut waypoint_routes = change.waypoint_routes.clone();
            while let Ok(more) = changes.try_recv() {
                addresses.extend(more.addresses.clone());
                authorizations.extend(more.authorizations.clone());
                waypoint_policies.extend(more.waypoint_policies.clone());
                waypoint_routes.extend(more.waypoint_routes.clone());
            }
            let xds = xds.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // Workload resources first: a waypoint that reads a route
                // naming a new Service should already hold the Service.
                xds.update(addresses, authorizations);
                xds.update_waypoints(waypoint_policies, waypoint_routes);
            })
            .await;
        }
    });
}

/// Kubernetes mode needs a reachable API server; say how to run without one.
async fn connect_to_cluster() -> anyhow::Result<kube::Client> {
    const HOW: &str = "no --config-dir was given, so the control plane runs in Kubernetes mode, \
        but no Kubernetes cluster is reachable. To run standalone, point it at a folder of \
        Kubernetes YAML: controlplane run --config-dir examples/bookinfo --state-dir STATE_DIR";
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => bail!("{HOW}\n(cause: {e})"),
    };
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(version)) => {
            tracing::info!(version = %version.git_version, "connected to Kubernetes");
            Ok(client)
        }
        Ok(Err(e)) => bail!("{HOW}\n(cause: {e})"),
        Err(_) => bail!("{HOW}\n(cause: the API server did not answer within 5s)"),
    }
}

/// Binds `addr`; an IPv6 wildcard falls back to IPv4 where IPv6 is off.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::debug!(error = %e, "IPv6 unavailable; listening on IPv4 only");
            TcpListener::bind(v4)
                .await
                .with_context(|| format!("binding {v4}"))
        }
        Err(e) => Err(e).with_context(|| format!("binding {addr}")),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        config: RunConfig,
    }

    fn parse(extra: &[&str]) -> Result<RunConfig, clap::Error> {
        let mut args = vec!["controlplane", "--state-dir", "/nonexistent"];
        args.extend(extra);
        Args::try_parse_from(args).map(|a| a.config)
    }

    /// Every duration flag takes humantime's syntax, like the dataplane's.
    #[test]
    fn duration_flags_parse_with_humantime() {
        for (raw, secs) in [
            ("3600s", 3600),
            ("90m", 5400),
            ("24h", 86400),
            ("7d", 7 * 86400),
            ("0s", 0),
        ] {
            let config = parse(&[
                "--default-cert-ttl",
                raw,
                "--max-cert-ttl",
                raw,
                "--serving-cert-ttl",
                raw,
            ])
            .unwrap();
            let want = Duration::from_secs(secs);
            assert_eq!(
                (
                    config.default_cert_ttl,
                    config.max_cert_ttl,
                    config.serving_cert_ttl
                ),
                (want, want, want),
                "{raw}"
            );
        }
        // A number needs its unit (a bare one used to mean seconds).
        for bad in ["-1s", "", "10x", "s", "3600", "99999999999999999999d"] {
            assert!(parse(&["--max-cert-ttl", bad]).is_err(), "{bad}");
        }
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.max_cert_ttl, Duration::from_secs(86400));
    }

    /// The waypoints reach the control plane at its Service, with the
    /// token audience it checks, and run the configured image.
    #[test]
    fn waypoint_settings_follow_the_control_plane_flags() {
        let defaults = parse(&[]).unwrap();
        assert!(defaults.deploy_waypoints);
        assert_eq!(
            waypoint_settings(&defaults),
            WaypointSettings {
                image: "meshbox/waypoint:dev".into(),
                xds_address: "https://meshbox-controlplane.meshbox-system.svc:15012".into(),
                token_audience: "istio-ca".into(),
                cluster_id: "Kubernetes".into(),
                trust_domain: "cluster.local".into(),
                cluster_domain: "cluster.local".into(),
            }
        );
        let set = parse(&[
            "--waypoint-image",
            "registry.example/waypoint:1",
            "--namespace",
            "mesh",
            "--service-name",
            "cp",
            "--grpc-addr",
            "0.0.0.0:16012",
            "--token-audience",
            "mesh-ca",
            "--deploy-waypoints",
            "false",
        ])
        .unwrap();
        assert!(!set.deploy_waypoints);
        let settings = waypoint_settings(&set);
        assert_eq!(settings.image, "registry.example/waypoint:1");
        assert_eq!(settings.xds_address, "https://cp.mesh.svc:16012");
        assert_eq!(settings.token_audience, "mesh-ca");
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(parse(&[]).unwrap().log_format, LogFormat::Text);
        assert_eq!(
            parse(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        assert_eq!(
            parse(&["--log-format", "text"]).unwrap().log_format,
            LogFormat::Text
        );
        assert!(parse(&["--log-format", "jsno"]).is_err());
    }

    #[test]
    fn limit_flags_have_their_defaults_and_parse() {
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.max_connections_per_peer, 64);
        assert_eq!(defaults.max_xds_streams_per_caller, 64);
        assert_eq!(defaults.header_read_timeout, Duration::from_secs(10));
        assert_eq!(defaults.body_read_timeout, Duration::from_secs(10));
        // Unset: decided by the mode (on in Kubernetes, off standalone).
        assert_eq!(defaults.require_token_for_reads, None);
        for (args, want) in [
            (&["--require-token-for-reads"][..], Some(true)),
            (&["--require-token-for-reads=true"][..], Some(true)),
            (&["--require-token-for-reads=false"][..], Some(false)),
            (&["--require-token-for-reads", "off"][..], Some(false)),
        ] {
            assert_eq!(
                parse(args).unwrap().require_token_for_reads,
                want,
                "{args:?}"
            );
        }
        assert!(parse(&["--require-token-for-reads=maybe"]).is_err());
        let set = parse(&[
            "--max-connections-per-peer",
            "3",
            "--body-read-timeout",
            "2s",
            "--header-read-timeout",
            "500ms",
        ])
        .unwrap();
        assert_eq!(set.max_connections_per_peer, 3);
        assert_eq!(set.body_read_timeout, Duration::from_secs(2));
        assert_eq!(set.header_read_timeout, Duration::from_millis(500));
    }
}
