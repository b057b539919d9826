//! Wires the dataplane together from a [`Config`]: control-plane channels,
//! the xDS client feeding the mesh state, the certificate manager, the proxy
//! listeners and the admin endpoints; and drains it all on shutdown.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use meshbox_certs::SpiffeId;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Uri};
use tracing::info;

use crate::admin::{self, Admin};
use crate::config::{Capture, Config, Endpoint, Scope};
use crate::identity::{CaClient, CertificateManager};
use crate::inpod::{Agent, PodListeners};
use crate::mesh::Mesh;
use crate::proxy::pool::{Pool, PoolSettings};
use crate::proxy::socket::Sockets;
use crate::proxy::{BoundAddrs, Listeners, ProxyContext};
use crate::telemetry::Telemetry;
use crate::xds::{ClientOptions, Credentials, XdsClient};

/// A running dataplane.
pub struct Running {
    pub ctx: Arc<ProxyContext>,
    /// The listeners in the dataplane's own namespace; `None` in in-pod
    /// mode, where each captured pod has its own.
    pub proxy: Option<BoundAddrs>,
    pub agent: Option<Arc<Agent>>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    /// Keeps the xDS stream open.
    _xds: XdsClient,
}

impl Running {
    /// Stops accepting, lets open connections finish for up to `timeout`,
    /// then returns (dropping the runtime cuts whatever is left).
    pub async fn drain(self, timeout: Duration) {
        crate::process::drain(&self.ctx.shutdown, &self.ctx.tasks, timeout).await;
    }
}

/// Starts everything; listeners are bound before this returns, so bind
/// errors surface here.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    meshbox_certs::install_crypto_provider();
    let sockets = Sockets::probe(config.packet_mark);

    let (xds_channel, ca_channel) = channels(&config.xds, &config.ca, &sockets).await?;

    let mut metadata = vec![("CLUSTER_ID", config.cluster_id.clone())];
    if let Some(node) = config.node_name() {
        metadata.push(("NODE_NAME", node.to_owned()));
    }
    let node_id = match &config.scope {
        Scope::Node { node, .. } => format!("meshbox-dataplane~{node}"),
        Scope::Workload {
            namespace, name, ..
        } => {
            metadata.push(("NAME", name.clone()));
            metadata.push(("NAMESPACE", namespace.clone()));
            format!("meshbox-dataplane~{namespace}/{name}")
        }
    };
    let credentials = config
        .auth_token
        .clone()
        .map_or(Credentials::None, Credentials::BearerFile);
    let mut options = ClientOptions::new(credentials, crate::xds::node(node_id, metadata));
    options.validator = Some(crate::state::validator());
    let xds = XdsClient::start(xds_channel.clone(), options);

    let token = config.auth_token.clone();
    let impersonate = matches!(config.scope, Scope::Node { .. });
    let certs = CertificateManager::new(Arc::new(CaClient::new(
        ca_channel,
        token.clone(),
        impersonate,
        config.cert_ttl,
    )));

    let mesh = Mesh::new(
        xds.state(),
        config.on_demand_lookup.then(|| xds.clone()),
        config.network.clone(),
    );

    let mut registry = Registry::default();
    let telemetry = Telemetry::register(&mut registry);

    // In-pod capture: each pod gets its listeners in its own namespace.
    let in_pod = match &config.scope {
        Scope::Node {
            node,
            capture:
                Capture::InPod {
                    cni_socket,
                    probe_snat,
                },
        } => Some((node, cni_socket.as_deref(), *probe_snat)),
        _ => None,
    };
    let listeners = if in_pod.is_some() {
        None
    } else {
        Some(Listeners::bind(
            &sockets,
            config.outbound_addr,
            config.inbound_addr,
            config.inbound_plaintext_addr,
            config.socks5_addr,
        )?)
    };
    let proxy = listeners.as_ref().map(Listeners::addrs).transpose()?;
    let own_ports = match &listeners {
        Some(l) => l.ports(),
        None => vec![
            config.outbound_addr.port(),
            config.inbound_addr.port(),
            config.inbound_plaintext_addr.port(),
        ],
    };
    let ctx = Arc::new(ProxyContext {
        mesh: mesh.clone(),
        certs: certs.clone(),
        scope: config.scope.clone(),
        cluster_id: config.cluster_id.clone(),
        trust_domain: config.trust_domain.clone(),
        sockets: sockets.clone(),
        original_source: config.original_source,
        pool: Pool::new(
            PoolSettings {
                max_streams: config.pool_max_streams,
                idle_timeout: config.pool_idle_timeout,
            },
            sockets,
        ),
        telemetry,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        own_ports,
        server_configs: Default::default(),
        pod_uid: None,
    });

    // Certificates for local workloads are fetched ahead of the first
    // connection and dropped when the workload leaves.
    if let Scope::Workload { identity, .. } = &config.scope {
        certs.prefetch(identity);
    }
    let agent = in_pod.map(|(node, _, probe_snat)| {
        Agent::new(
            ctx.clone(),
            node.clone(),
            PodListeners {
                outbound: config.outbound_addr,
                inbound: config.inbound_addr,
                plaintext: config.inbound_plaintext_addr,
            },
            probe_snat,
            Some(crate::inpod::EnrollmentLookup::new(
                xds_channel.clone(),
                token.clone(),
            )),
        )
    });
    // The agent follows the mesh: on every change, and every few seconds
    // for pods whose namespace appeared after their workload did.
    let reconcile = Arc::new(tokio::sync::Notify::new());
    if let Some(agent) = &agent {
        let agent = agent.clone();
        let reconcile = reconcile.clone();
        let shutdown = ctx.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = reconcile.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                }
                agent.reconcile().await;
            }
        });
    }
    if let Some(agent) = &agent {
        crate::inpod::report::spawn(
            agent.clone(),
            xds_channel.clone(),
            token.clone(),
            ctx.shutdown.clone(),
        );
    }
    if let (Some(agent), Some((_, Some(path), _))) = (&agent, in_pod) {
        let listener = meshbox_cni::listen(path)
            .with_context(|| format!("opening the CNI socket {}", path.display()))?;
        info!(socket = %path.display(), "serving the CNI plugin");
        let agent = agent.clone();
        tokio::spawn(meshbox_cni::serve(listener, move |req| {
            let agent = agent.clone();
            async move { agent.handle_cni(req).await }
        }));
    }
    let follow_ctx = ctx.clone();
    let mut local = HashSet::<SpiffeId>::new();
    tokio::spawn(mesh.clone().follow(move |mesh| {
        reconcile.notify_one();
        let now: HashSet<SpiffeId> = follow_ctx
            .local_identities(&mesh.read())
            .into_iter()
            .collect();
        for id in now.difference(&local) {
            follow_ctx.certs.prefetch(id);
        }
        if matches!(follow_ctx.scope, Scope::Node { .. }) {
            for gone in local.difference(&now) {
                follow_ctx.certs.forget(gone);
            }
        }
        local = now;
    }));

    if let Some(agent) = &agent {
        registry.register(
            "meshbox_inpod_captures",
            "Pods captured (rules and listeners installed in their network namespace)",
            agent.captures.clone(),
        );
        registry.register(
            "meshbox_inpod_capture_failures",
            "Attempts to capture a pod that failed",
            agent.failures.clone(),
        );
    }
    let admin_api = Admin::new(ctx.clone(), agent.clone(), registry);
    let admin_listener = admin::bind(config.admin_addr).await?;
    let metrics_listener = admin::bind(config.metrics_addr).await?;
    let readiness_listener = admin::bind(config.readiness_addr).await?;
    let running = Running {
        proxy,
        admin: admin_listener.local_addr()?,
        metrics: metrics_listener.local_addr()?,
        readiness: readiness_listener.local_addr()?,
        ctx: ctx.clone(),
        agent,
        _xds: xds,
    };
    // The HTTP endpoints are not drained with the proxy: readiness must
    // keep answering (not ready) while connections finish.
    let http_shutdown = CancellationToken::new();
    for (listener, router) in [
        (admin_listener, admin_api.admin_router()),
        (metrics_listener, admin_api.metrics_router()),
        (readiness_listener, admin_api.readiness_router()),
    ] {
        tokio::spawn(admin::serve(listener, router, http_shutdown.clone()));
    }
    if let Some(listeners) = listeners {
        listeners.serve(ctx);
    }
    info!(
        admin = %running.admin,
        metrics = %running.metrics,
        readiness = %running.readiness,
        "admin endpoints listening"
    );
    Ok(running)
}

/// The xDS and CA channels: one channel when both are the same endpoint (one
/// port serves both). The waypoint uses it too.
pub async fn channels(
    xds: &Endpoint,
    ca: &Endpoint,
    sockets: &Sockets,
) -> anyhow::Result<(Channel, Channel)> {
    let xds_channel = channel(xds, sockets.clone())
        .await
        .context("setting up the xDS connection")?;
    let ca_channel = if ca == xds {
        xds_channel.clone()
    } else {
        channel(ca, sockets.clone())
            .await
            .context("setting up the CA connection")?
    };
    Ok((xds_channel, ca_channel))
}

/// A lazily connected channel to a control-plane endpoint, over TLS when
/// the address is https, every socket marked.
async fn channel(endpoint: &Endpoint, sockets: Sockets) -> anyhow::Result<Channel> {
    let uri: Uri = endpoint
        .uri
        .parse()
        .with_context(|| format!("{} is not a valid address", endpoint.uri))?;
    let host = uri
        .host()
        .with_context(|| format!("{} has no host", endpoint.uri))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let mut builder = TonicEndpoint::from(uri.clone())
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(root) = &endpoint.root_ca {
        let pem = tokio::fs::read(root)
            .await
            .with_context(|| format!("reading the root certificate {}", root.display()))?;
        if meshbox_certs::pem::parse_certificates(&pem)
            .map(|c| c.is_empty())
            .unwrap_or(true)
        {
            anyhow::bail!("{} holds no PEM certificate", root.display());
        }
        builder = builder.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name(host),
        )?;
    }
    let connector = tower::service_fn(move |uri: Uri| {
        let sockets = sockets.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let mut last = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} did not resolve"),
            );
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match sockets.connect(addr, None).await {
                    Ok(stream) => return Ok(TokioIo::new(stream)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    });
    Ok(builder.connect_with_connector_lazy(connector))
}
