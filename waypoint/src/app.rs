//! Wires the waypoint together from a [`Config`]: control-plane channels,
//! the xDS client (addresses and the waypoint's own L7 resources), its
//! certificate, the HBONE listener, the upstream pool and the admin
//! endpoints; and drains it all on shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use meshbox_dataplane::admin as dp_admin;
use meshbox_dataplane::app::channels;
use meshbox_dataplane::identity::{CaClient, CertificateManager};
use meshbox_dataplane::mesh::Mesh;
use meshbox_dataplane::proxy::pool::{Pool, PoolSettings};
use meshbox_dataplane::proxy::socket::Sockets;
use meshbox_dataplane::state::{HealthStatus, Locality, Protocol, Workload};
use meshbox_dataplane::xds::{ClientOptions, Credentials, ResourceType, XdsClient};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::Admin;
use crate::config::Config;
use crate::inbound::{self, ServerTls};
use crate::policies::PolicyTable;
use crate::proxy::{HttpLimits, L7Config, Waypoint};
use crate::routes::RouteTable;
use crate::telemetry::Telemetry;
use crate::upstream::{HboneConnector, Upstreams};

/// A running waypoint.
pub struct Running {
    pub wp: Arc<Waypoint>,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    /// Keeps the xDS stream open.
    _xds: XdsClient,
}

impl Running {
    /// Stops accepting, lets open requests finish for up to `timeout`.
    pub async fn drain(self, timeout: Duration) {
        meshbox_dataplane::process::drain(&self.wp.shutdown, &self.wp.tasks, timeout).await;
    }
}

/// The waypoint as a routing source, before (or without) its own workload
/// in the mesh state: its network, no locality.
fn placeholder_workload(config: &Config) -> Workload {
    Workload {
        uid: String::new(),
        name: config.pod_name.clone(),
        namespace: config.namespace.clone(),
        identity: config.identity.clone(),
        addresses: Vec::new(),
        network: config.network.clone(),
        node: String::new(),
        protocol: Protocol::Hbone,
        status: HealthStatus::Healthy,
        host_network: false,
        waypoint: None,
        services: BTreeMap::new(),
        authorization_policies: Vec::new(),
        locality: Locality::default(),
        cluster_id: config.cluster_id.clone(),
        workload_name: String::new(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
    }
}

/// Starts everything; listeners are bound before this returns.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    meshbox_certs::install_crypto_provider();
    let sockets = Sockets::probe(config.packet_mark);
    let (xds_channel, ca_channel) = channels(&config.xds, &config.ca, &sockets).await?;
    let metadata = vec![
        ("CLUSTER_ID", config.cluster_id.clone()),
        ("NAMESPACE", config.namespace.clone()),
        ("NAME", config.pod_name.clone()),
        ("WAYPOINT", config.gateway.clone()),
        (
            "SERVICE_ACCOUNT",
            config.identity.service_account().to_owned(),
        ),
    ];
    let node_id = format!("waypoint~{}~{}", config.gateway, config.pod_name);
    let credentials = config
        .auth_token
        .clone()
        .map_or(Credentials::None, Credentials::BearerFile);
    let mut options =
        ClientOptions::new(credentials, meshbox_dataplane::xds::node(node_id, metadata));
    options.wildcard = vec![
        ResourceType::Address,
        ResourceType::WaypointPolicy,
        ResourceType::WaypointRoute,
    ];
    options.validator = Some(meshbox_dataplane::state::validator());
    let xds = XdsClient::start(xds_channel, options);

    let certs = CertificateManager::new(Arc::new(CaClient::new(
        ca_channel,
        config.auth_token.clone(),
        false,
        config.cert_ttl,
    )));
    certs.prefetch(&config.identity);
    let mesh = Mesh::new(xds.state(), None, config.network.clone());

    let mut registry = Registry::default();
    let telemetry = Telemetry::register(&mut registry);
    let pool = Pool::new(
        PoolSettings {
            max_streams: config.pool_max_streams,
            idle_timeout: config.pool_idle_timeout,
        },
        sockets.clone(),
    );
    let connector = HboneConnector::new(
        mesh.clone(),
        certs.clone(),
        config.identity.clone(),
        pool,
        sockets.clone(),
    );
    let wp = Arc::new(Waypoint {
        gateway: config.gateway.clone(),
        identity: config.identity.clone(),
        trust_domain: config.trust_domain.clone(),
        mesh: mesh.clone(),
        certs,
        l7: ArcSwap::from_pointee(L7Config::default()),
        upstreams: Upstreams::new(connector),
        telemetry,
        me: ArcSwap::from_pointee(placeholder_workload(&config)),
        limits: HttpLimits {
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
        },
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });

    // Rebuild the L7 tables whenever xDS changes; the last good tables stay
    // in force while the control plane is away.
    let follow_wp = wp.clone();
    let placeholder = placeholder_workload(&config);
    tokio::spawn(mesh.clone().follow(move |mesh| {
        let (routes, problems, policies) = mesh.with_xds(|x| {
            let (routes, problems) = RouteTable::build(
                &follow_wp.gateway,
                x.waypoint_routes.values().map(|r| r.resource.as_ref()),
            );
            let policies = PolicyTable::build(
                &follow_wp.gateway,
                x.waypoint_policies.values().map(|p| p.resource.as_ref()),
            );
            (routes, problems, policies)
        });
        for p in &problems {
            warn!(route = %p.route, problem = %p.problem, "route rule not applied as written");
        }
        follow_wp.l7.store(Arc::new(L7Config {
            routes,
            policies,
            route_problems: problems,
        }));
        // Our own workload, once the mesh lists it, gives routing our
        // locality and addresses.
        let me = {
            let state = mesh.read();
            state
                .workloads()
                .find(|w| w.namespace == placeholder.namespace && w.name == placeholder.name)
                .map(|w| w.as_ref().clone())
        };
        follow_wp
            .me
            .store(Arc::new(me.unwrap_or_else(|| placeholder.clone())));
    }));

    // `[::]` falls back to IPv4 where a pod has IPv6 turned off.
    let listener = sockets
        .listen(config.inbound_addr)
        .with_context(|| format!("binding {}", config.inbound_addr))?;
    let inbound_addr = listener.local_addr()?;
    tokio::spawn(inbound::serve(
        listener,
        wp.clone(),
        Arc::new(ServerTls::default()),
    ));

    let admin_api = Admin::new(wp.clone(), registry);
    let admin_listener = dp_admin::bind(config.admin_addr).await?;
    let metrics_listener = dp_admin::bind(config.metrics_addr).await?;
    let readiness_listener = dp_admin::bind(config.readiness_addr).await?;
    let running = Running {
        wp: wp.clone(),
        inbound: inbound_addr,
        admin: admin_listener.local_addr()?,
        metrics: metrics_listener.local_addr()?,
        readiness: readiness_listener.local_addr()?,
        _xds: xds,
    };
    let http_shutdown = CancellationToken::new();
    for (listener, router) in [
        (admin_listener, admin_api.admin_router()),
        (metrics_listener, admin_api.metrics_router()),
        (readiness_listener, admin_api.readiness_router()),
    ] {
        tokio::spawn(dp_admin::serve(listener, router, http_shutdown.clone()));
    }
    info!(
        gateway = %config.gateway,
        identity = %config.identity,
        inbound = %running.inbound,
        admin = %running.admin,
        metrics = %running.metrics,
        readiness = %running.readiness,
        "waypoint listening"
    );
    Ok(running)
}
