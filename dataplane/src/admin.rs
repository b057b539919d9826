//! The dataplane's HTTP endpoints: admin on 15000 (`/config_dump`,
//! `/certs`; localhost by default since it shows the whole mesh), Prometheus
//! metrics on 15020 and readiness on 15021.
//!
//! Readiness is true only once the first xDS state is in and every local
//! workload has a certificate: before that, captured traffic would be
//! refused, so the pod should not receive any.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Scope;
use crate::inpod::Agent;
use crate::proxy::ProxyContext;
use crate::state::{GatewayAddress, Service, Workload};
use crate::xds::ResourceType;

#[derive(Clone)]
pub struct Admin {
    ctx: Arc<ProxyContext>,
    agent: Option<Arc<Agent>>,
    registry: Arc<Registry>,
    gauges: Arc<StatusGauges>,
}

/// Gauges read off the xDS client and certificate manager at scrape time.
#[derive(Default)]
struct StatusGauges {
    xds_connected: Gauge,
    xds_synced: Gauge,
    xds_streams: Gauge,
    xds_responses: Gauge,
    xds_nacks: Gauge,
    workloads: Gauge,
    services: Gauge,
    policies: Gauge,
    certificates: Gauge,
    certificate_soonest_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    pool_connections: Gauge,
    /// In-pod mode only: pods captured now, and enrolled pods not yet.
    inpod_captured: Gauge,
    inpod_pending: Gauge,
}

impl StatusGauges {
    fn register(registry: &mut Registry) -> Arc<Self> {
        let g = Arc::new(Self::default());
        let gauges: [(&str, &str, &Gauge); 10] = [
            (
                "meshbox_xds_connected",
                "1 while the xDS stream is open",
                &g.xds_connected,
            ),
            (
                "meshbox_xds_synced",
                "1 once every wildcard type was received on the current stream",
                &g.xds_synced,
            ),
            (
                "meshbox_xds_streams",
                "xDS streams opened since start",
                &g.xds_streams,
            ),
            (
                "meshbox_xds_responses",
                "xDS responses received since start",
                &g.xds_responses,
            ),
            (
                "meshbox_xds_nacks",
                "xDS responses rejected (NACKed) since start",
                &g.xds_nacks,
            ),
            ("meshbox_workloads", "Workloads known", &g.workloads),
            ("meshbox_services", "Services known", &g.services),
            (
                "meshbox_authorization_policies",
                "Authorization policies known",
                &g.policies,
            ),
            (
                "meshbox_workload_certificates",
                "Workload certificates held",
                &g.certificates,
            ),
            (
                "meshbox_hbone_pool_connections",
                "Pooled outbound HBONE connections",
                &g.pool_connections,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "meshbox_certificate_soonest_expiry_seconds",
            "Unix time at which the first held workload certificate expires",
            g.certificate_soonest_expiry.clone(),
        );
        g
    }
}

impl Admin {
    pub fn new(ctx: Arc<ProxyContext>, agent: Option<Arc<Agent>>, mut registry: Registry) -> Self {
        let gauges = StatusGauges::register(&mut registry);
        if agent.is_some() {
            registry.register(
                "meshbox_inpod_captured_pods",
                "Enrolled pods on this node captured now (rules and listeners in place)",
                gauges.inpod_captured.clone(),
            );
            registry.register(
                "meshbox_inpod_pending_pods",
                "Enrolled pods on this node not captured yet (see /config_dump pods for why)",
                gauges.inpod_pending.clone(),
            );
        }
        Self {
            ctx,
            agent,
            registry: Arc::new(registry),
            gauges,
        }
    }

    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/config_dump", get(config_dump))
            .route("/certs", get(certs))
            .route("/healthz/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    pub fn metrics_router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/stats/prometheus", get(metrics))
            .with_state(self.clone())
    }

    pub fn readiness_router(&self) -> Router {
        Router::new()
            .route("/healthz/ready", get(ready))
            .with_state(self.clone())
    }

    /// Whether captured traffic can be served now.
    pub fn is_ready(&self) -> bool {
        readiness(&self.ctx).is_ok()
    }
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

fn readiness(ctx: &ProxyContext) -> Result<(), String> {
    if !ctx.mesh.is_synced() {
        return Err("waiting for the first xDS state".into());
    }
    let state = ctx.mesh.read();
    let missing: Vec<String> = ctx
        .local_identities(&state)
        .into_iter()
        .filter(|id| ctx.certs.current(id).is_none())
        .map(|id| id.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("waiting for certificates: {}", missing.join(", ")))
    }
}

async fn ready(State(admin): State<Admin>) -> Response {
    readiness_response(readiness(&admin.ctx))
}

/// `200 ready`, or `503 not ready: why` (the waypoint answers the same).
pub fn readiness_response(state: Result<(), String>) -> Response {
    match state {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    admin.refresh_gauges();
    metrics_response(&admin.registry)
}

/// `registry` in the OpenMetrics text format (the waypoint's too).
pub fn metrics_response(registry: &Registry) -> Response {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

impl Admin {
    fn refresh_gauges(&self) {
        let g = &self.gauges;
        self.ctx.mesh.with_xds(|xds| {
            g.xds_connected.set(xds.connected as i64);
            g.xds_synced.set(xds.is_synced() as i64);
            g.xds_streams.set(xds.streams as i64);
            g.xds_responses.set(xds.responses as i64);
            g.xds_nacks.set(xds.nacks as i64);
        });
        {
            let state = self.ctx.mesh.read();
            g.workloads.set(state.workloads().count() as i64);
            g.services.set(state.services().count() as i64);
            g.policies.set(state.policies().len() as i64);
        }
        let certs = self.ctx.certs.snapshot();
        g.certificates
            .set(certs.iter().filter(|(_, c)| c.is_some()).count() as i64);
        let soonest = certs
            .iter()
            .filter_map(|(_, c)| c.as_ref().map(|(_, not_after)| *not_after))
            .min()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        g.certificate_soonest_expiry.set(soonest);
        g.pool_connections.set(self.ctx.pool.connections() as i64);
        if let Some(agent) = &self.agent {
            let pods = agent.status();
            let captured = pods.iter().filter(|p| p.state == "captured").count();
            g.inpod_captured.set(captured as i64);
            g.inpod_pending.set((pods.len() - captured) as i64);
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn certificates(ctx: &ProxyContext) -> Value {
    ctx.certs
        .snapshot()
        .into_iter()
        .map(|(id, cert)| match cert {
            Some((serial, not_after)) => json!({
                "identity": id.to_string(),
                "state": if not_after > SystemTime::now() { "valid" } else { "expired" },
                "serial": serial,
                "notAfter": rfc3339(not_after),
            }),
            None => json!({ "identity": id.to_string(), "state": "pending" }),
        })
        .collect()
}

async fn certs(State(admin): State<Admin>) -> Response {
    pretty(json!({ "certificates": certificates(&admin.ctx) }))
}

fn gateway(g: &Option<GatewayAddress>) -> Value {
    match g {
        Some(g) => json!({ "destination": g.target.to_string(), "hbonePort": g.hbone_port }),
        None => Value::Null,
    }
}

fn workload_json(w: &Workload, local: bool) -> Value {
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "identity": w.identity.to_string(),
        "addresses": w.addresses,
        "network": w.network,
        "node": w.node,
        "local": local,
        "protocol": format!("{:?}", w.protocol).to_uppercase(),
        "status": format!("{:?}", w.status),
        "waypoint": gateway(&w.waypoint),
        "services": w.services,
        "authorizationPolicies": w.authorization_policies,
        "workloadName": w.workload_name,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
    })
}

fn service_json(s: &Service, endpoints: Vec<String>) -> Value {
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": s.vips.iter().map(|v| format!("{}/{}", v.network, v.ip)).collect::<Vec<_>>(),
        "ports": s.ports,
        "subjectAltNames": s.subject_alt_names.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        "waypoint": gateway(&s.waypoint),
        "endpoints": endpoints,
    })
}

async fn config_dump(State(admin): State<Admin>) -> Response {
    let ctx = &admin.ctx;
    let (workloads, services, policies) = {
        let state = ctx.mesh.read();
        let mut workloads: Vec<Value> = state
            .workloads()
            .map(|w| workload_json(w, ctx.is_local(w)))
            .collect();
        workloads.sort_by(|a, b| a["uid"].as_str().cmp(&b["uid"].as_str()));
        let mut services: Vec<Value> = state
            .services()
            .map(|s| {
                let mut endpoints: Vec<String> =
                    state.endpoints(&s.key()).map(|w| w.uid.clone()).collect();
                endpoints.sort();
                service_json(s, endpoints)
            })
            .collect();
        services.sort_by(|a, b| {
            (a["namespace"].as_str(), a["hostname"].as_str())
                .cmp(&(b["namespace"].as_str(), b["hostname"].as_str()))
        });
        let mut policies: Vec<Value> = state
            .policies()
            .iter()
            .map(|p| {
                json!({
                    "key": p.key,
                    "name": p.name,
                    "namespace": p.namespace,
                    "scope": format!("{:?}", p.scope),
                    "action": format!("{:?}", p.action),
                    "dryRun": p.dry_run,
                    "rules": p.describe_rules(),
                })
            })
            .collect();
        policies.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        (workloads, services, policies)
    };
    let (mode, node, workload) = match &ctx.scope {
        Scope::Node { node, .. } => ("shared", Some(node.clone()), None),
        Scope::Workload {
            namespace,
            name,
            identity,
            node,
        } => (
            "dedicated",
            node.clone(),
            Some(json!({ "namespace": namespace, "name": name, "identity": identity.to_string() })),
        ),
    };
    let body = json!({
        "proxy": {
            "mode": mode,
            "node": node,
            "workload": workload,
            "clusterId": ctx.cluster_id,
            "trustDomain": ctx.trust_domain,
            "network": ctx.mesh.network(),
            "packetMark": ctx.sockets.mark(),
            "transparentSockets": ctx.sockets.transparent(),
            "originalSource": ctx.original_source,
            "ready": readiness(ctx).err().unwrap_or_else(|| "ready".into()),
        },
        "xds": ctx.mesh.with_xds(|xds| json!({
            "connected": xds.connected,
            "synced": xds.is_synced(),
            "streams": xds.streams,
            "responses": xds.responses,
            "nacks": xds.nacks,
            "lastError": xds.last_error,
            "addresses": xds.len(ResourceType::Address),
            "authorizations": xds.len(ResourceType::Authorization),
        })),
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates(ctx),
        "hbonePool": ctx.pool.entries(),
        "pods": admin.agent.as_ref().map(|a| a.status()),
    });
    pretty(body)
}

/// Indented JSON: these endpoints are read by people, with curl.
pub fn pretty(value: Value) -> Response {
    match serde_json::to_string_pretty(&value) {
        Ok(mut text) => {
            text.push('\n');
            ([(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Binds the three HTTP listeners (any may share an address with another
/// only if the caller merges routers; here each gets its own).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}
