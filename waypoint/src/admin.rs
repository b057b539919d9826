//! The waypoint's HTTP endpoints: `/config_dump` (routes, policies,
//! certificate: never a key) on the admin port, `/metrics`, and
//! `/healthz/ready` (xDS synced and a certificate in hand, not draining).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use meshbox_dataplane::admin::{metrics_response, pretty, readiness_response};
use meshbox_dataplane::xds::ResourceType;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use crate::proxy::Waypoint;

#[derive(Clone)]
pub struct Admin {
    wp: Arc<Waypoint>,
    registry: Arc<Registry>,
}

impl Admin {
    pub fn new(wp: Arc<Waypoint>, registry: Registry) -> Self {
        Self {
            wp,
            registry: Arc::new(registry),
        }
    }

    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/config_dump", get(config_dump))
            .with_state(self.clone())
    }

    pub fn metrics_router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    pub fn readiness_router(&self) -> Router {
        Router::new()
            .route("/healthz/ready", get(ready))
            .with_state(self.clone())
    }
}

fn readiness(wp: &Waypoint) -> Result<(), String> {
    if wp.shutdown.is_cancelled() {
        return Err("draining".into());
    }
    if !wp.mesh.is_synced() {
        return Err("waiting for the first xDS state".into());
    }
    if wp.certs.current(&wp.identity).is_none() {
        return Err(format!("waiting for the certificate of {}", wp.identity));
    }
    Ok(())
}

async fn ready(State(admin): State<Admin>) -> Response {
    readiness_response(readiness(&admin.wp))
}

async fn metrics(State(admin): State<Admin>) -> Response {
    metrics_response(&admin.registry)
}

async fn config_dump(State(admin): State<Admin>) -> Response {
    let wp = &admin.wp;
    let l7 = wp.l7.load_full();
    let policies: Vec<Value> = l7
        .policies
        .policies
        .iter()
        .map(|e| {
            json!({
                "name": e.policy.key(),
                "action": format!("{:?}", e.policy.action),
                "appliesTo": {
                    "everyRequest": e.all,
                    "services": e.services,
                    "workloads": e.workloads,
                },
                "unsupported": e.policy.unsupported().map(|u| u.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut routes: Vec<Value> = l7
        .routes
        .services()
        .map(|(service, matches)| json!({"service": service, "matches": matches}))
        .collect();
    routes.sort_by_key(|v| v["service"].as_str().map(str::to_owned));
    let (xds, route_names) = wp.mesh.with_xds(|x| {
        let mut names: Vec<String> = x.waypoint_routes.keys().cloned().collect();
        names.sort();
        (
            json!({
                "connected": x.connected,
                "synced": x.is_synced(),
                "responses": x.responses,
                "nacks": x.nacks,
                "resources": {
                    "addresses": x.versions(ResourceType::Address).len(),
                    "waypointPolicies": x.versions(ResourceType::WaypointPolicy).len(),
                    "waypointRoutes": x.versions(ResourceType::WaypointRoute).len(),
                },
                "lastError": x.last_error,
            }),
            names,
        )
    });
    let certificate = wp.certs.current(&wp.identity).map(|c| {
        json!({
            "identity": c.identity.to_string(),
            "serial": c.serial,
            "notAfter": humantime::format_rfc3339_seconds(c.not_after).to_string(),
        })
    });
    let body = json!({
        "gateway": wp.gateway,
        "identity": wp.identity.to_string(),
        "certificate": certificate,
        "xds": xds,
        "routes": {
            "resources": route_names,
            "byService": routes,
            "problems": l7.route_problems.iter().map(|p| format!("{}: {}", p.route, p.problem)).collect::<Vec<_>>(),
        },
        "policies": policies,
        "upstreamPool": wp.upstreams.connector.pool().entries(),
    });
    pretty(body)
}
