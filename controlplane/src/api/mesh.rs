//! Read-only views of the mesh model, as the dataplanes see it:
//! `/api/v1/workloads`, `/services`, `/policies`, `/waypoints`, `/routes`,
//! `/status`.
//!
//! Each handler copies what it needs under a short read lock and formats
//! after releasing it. Lists are sorted, so output is stable.

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::Json;
use axum::extract::{Path, Query, State};
use meshbox_proto::meshbox::{self, WaypointPolicy};
use meshbox_proto::security::{self, Authorization};
use meshbox_proto::workload::{self, Address, GatewayAddress, address, gateway_address};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiState};

#[derive(Debug, Deserialize)]
pub struct NamespaceFilter {
    namespace: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    /// `namespace/hostname` of the waypoint's Service, when known by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    hbone_mtls_port: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortView {
    service_port: u32,
    target_port: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_protocol: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    uid: String,
    name: String,
    namespace: String,
    addresses: Vec<String>,
    identity: String,
    service_account: String,
    node: String,
    protocol: String,
    status: String,
    canonical_name: String,
    canonical_revision: String,
    workload_name: String,
    workload_type: String,
    cluster_id: String,
    /// Service (`namespace/hostname`) → port mappings.
    services: BTreeMap<String, Vec<PortView>>,
    waypoint: Option<GatewayView>,
    authorization_policies: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    uid: String,
    name: String,
    addresses: Vec<String>,
    status: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    name: String,
    namespace: String,
    hostname: String,
    vips: Vec<String>,
    ports: Vec<PortView>,
    endpoints: Vec<EndpointView>,
    waypoint: Option<GatewayView>,
    subject_alt_names: Vec<String>,
}

fn ip_of(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .map(|b| IpAddr::from(b).to_string())
            .unwrap_or_default(),
        16 => <[u8; 16]>::try_from(bytes)
            .map(|b| IpAddr::from(b).to_string())
            .unwrap_or_default(),
        _ => format!("<{} invalid bytes>", bytes.len()),
    }
}

fn gateway_view(g: &Option<GatewayAddress>) -> Option<GatewayView> {
    let g = g.as_ref()?;
    let (hostname, address) = match &g.destination {
        Some(gateway_address::Destination::Hostname(h)) => {
            (Some(format!("{}/{}", h.namespace, h.hostname)), None)
        }
        Some(gateway_address::Destination::Address(a)) => (None, Some(ip_of(&a.address))),
        None => (None, None),
    };
    Some(GatewayView {
        hostname,
        address,
        hbone_mtls_port: g.hbone_mtls_port,
    })
}

fn app_protocol(p: i32) -> Option<String> {
    match workload::AppProtocol::try_from(p) {
        Ok(workload::AppProtocol::Unknown) | Err(_) => None,
        Ok(other) => Some(other.as_str_name().to_owned()),
    }
}

fn ports(ports: &[workload::Port]) -> Vec<PortView> {
    ports
        .iter()
        .map(|p| PortView {
            service_port: p.service_port,
            target_port: p.target_port,
            app_protocol: app_protocol(p.app_protocol),
        })
        .collect()
}

fn status_name(s: i32) -> String {
    match workload::WorkloadStatus::try_from(s) {
        Ok(workload::WorkloadStatus::Healthy) => "Healthy".into(),
        _ => "Unhealthy".into(),
    }
}

fn workload_view(w: &workload::Workload) -> WorkloadView {
    WorkloadView {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.addresses.iter().map(|a| ip_of(a)).collect(),
        // Shown as the workload's parts say, valid or not: the REST API
        // reports, it does not judge.
        identity: meshbox_certs::spiffe::uri(&w.trust_domain, &w.namespace, &w.service_account),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        protocol: workload::TunnelProtocol::try_from(w.tunnel_protocol)
            .map(|p| p.as_str_name().to_owned())
            .unwrap_or_else(|_| "UNKNOWN".into()),
        status: status_name(w.status),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        workload_type: workload::WorkloadType::try_from(w.workload_type)
            .map(|t| t.as_str_name().to_owned())
            .unwrap_or_default(),
        cluster_id: w.cluster_id.clone(),
        services: w
            .services
            .iter()
            .map(|(k, v)| (k.clone(), ports(&v.ports)))
            .collect(),
        waypoint: gateway_view(&w.waypoint),
        authorization_policies: w.authorization_policies.clone(),
    }
}

/// Copies every Address out of the model (cheap: they are `Arc`s).
fn all_addresses(state: &ApiState) -> Vec<std::sync::Arc<Address>> {
    state
        .store
        .read(|index| index.addresses().map(|(_, a)| a.clone()).collect())
}

fn workloads_of(
    addresses: &[std::sync::Arc<Address>],
) -> impl Iterator<Item = &workload::Workload> {
    addresses.iter().filter_map(|a| match &a.r#type {
        Some(address::Type::Workload(w)) => Some(w),
        _ => None,
    })
}

pub async fn list_workloads(
    State(state): State<ApiState>,
    Query(filter): Query<NamespaceFilter>,
) -> Json<Vec<WorkloadView>> {
    let addresses = all_addresses(&state);
    let mut out: Vec<WorkloadView> = workloads_of(&addresses)
        .filter(|w| {
            filter
                .namespace
                .as_ref()
                .is_none_or(|ns| &w.namespace == ns)
        })
        .map(workload_view)
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Json(out)
}

pub async fn get_workload(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<WorkloadView>, ApiError> {
    let addresses = all_addresses(&state);
    workloads_of(&addresses)
        .find(|w| w.namespace == namespace && w.name == name)
        .map(|w| Json(workload_view(w)))
        .ok_or_else(|| ApiError::not_found(format!("no workload {namespace}/{name}")))
}

fn service_views(addresses: &[std::sync::Arc<Address>]) -> Vec<ServiceView> {
    // Endpoints are the workloads whose `services` map names the service.
    let mut endpoints: BTreeMap<&str, Vec<EndpointView>> = BTreeMap::new();
    for w in workloads_of(addresses) {
        for key in w.services.keys() {
            endpoints
                .entry(key.as_str())
                .or_default()
                .push(EndpointView {
                    uid: w.uid.clone(),
                    name: w.name.clone(),
                    addresses: w.addresses.iter().map(|a| ip_of(a)).collect(),
                    status: status_name(w.status),
                });
        }
    }
    let mut out: Vec<ServiceView> = addresses
        .iter()
        .filter_map(|a| match &a.r#type {
            Some(address::Type::Service(s)) => Some(s),
            _ => None,
        })
        .map(|s| {
            let key = format!("{}/{}", s.namespace, s.hostname);
            let mut eps = endpoints.remove(key.as_str()).unwrap_or_default();
            eps.sort_by(|a, b| a.name.cmp(&b.name));
            ServiceView {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                vips: s.addresses.iter().map(|a| ip_of(&a.address)).collect(),
                ports: ports(&s.ports),
                endpoints: eps,
                waypoint: gateway_view(&s.waypoint),
                subject_alt_names: s.subject_alt_names.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

pub async fn list_services(
    State(state): State<ApiState>,
    Query(filter): Query<NamespaceFilter>,
) -> Json<Vec<ServiceView>> {
    let addresses = all_addresses(&state);
    let mut out = service_views(&addresses);
    out.retain(|s| {
        filter
            .namespace
            .as_ref()
            .is_none_or(|ns| &s.namespace == ns)
    });
    Json(out)
}

pub async fn get_service(
    State(state): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<ServiceView>, ApiError> {
    let addresses = all_addresses(&state);
    service_views(&addresses)
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no service {namespace}/{name}")))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    name: String,
    namespace: String,
    scope: String,
    action: String,
    dry_run: bool,
    /// A connection matches the policy when any rule matches; a rule when
    /// every clause matches; a clause when any of its matches matches.
    rules: Vec<Vec<Vec<serde_json::Value>>>,
    /// The PeerAuthentications a converted policy stands for; absent for
    /// AuthorizationPolicies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    converted_from: Vec<ObjectRef>,
    /// Who enforces it: `node proxies`, `waypoint ns/gw` (one entry per
    /// waypoint), or both.
    enforced_by: Vec<String>,
}

/// A Kubernetes object by kind, namespace and name.
#[derive(Debug, Serialize)]
pub struct ObjectRef {
    kind: String,
    namespace: String,
    name: String,
}

fn string_matches(ms: &[security::StringMatch]) -> Vec<String> {
    use security::string_match::MatchType;
    ms.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => s.clone(),
            Some(MatchType::Prefix(s)) => format!("{s}*"),
            Some(MatchType::Suffix(s)) => format!("*{s}"),
            Some(MatchType::Presence(_)) => "*".into(),
            None => String::new(),
        })
        .collect()
}

fn cidrs(addrs: &[security::Address]) -> Vec<String> {
    addrs
        .iter()
        .map(|a| format!("{}/{}", ip_of(&a.address), a.length))
        .collect()
}

fn match_view(m: &security::Match) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let mut put = |key: &str, value: serde_json::Value| {
        if value.as_array().is_some_and(|a| !a.is_empty()) {
            out.insert(key.to_owned(), value);
        }
    };
    put("namespaces", string_matches(&m.namespaces).into());
    put("notNamespaces", string_matches(&m.not_namespaces).into());
    put("principals", string_matches(&m.principals).into());
    put("notPrincipals", string_matches(&m.not_principals).into());
    put("sourceIps", cidrs(&m.source_ips).into());
    put("notSourceIps", cidrs(&m.not_source_ips).into());
    put("destinationIps", cidrs(&m.destination_ips).into());
    put("notDestinationIps", cidrs(&m.not_destination_ips).into());
    put("destinationPorts", m.destination_ports.clone().into());
    put(
        "notDestinationPorts",
        m.not_destination_ports.clone().into(),
    );
    let sa = |v: &[security::ServiceAccountMatch]| -> serde_json::Value {
        v.iter()
            .map(|s| format!("{}/{}", s.namespace, s.service_account))
            .collect::<Vec<_>>()
            .into()
    };
    put("serviceAccounts", sa(&m.service_accounts));
    put("notServiceAccounts", sa(&m.not_service_accounts));
    serde_json::Value::Object(out)
}

fn policy_view(
    p: &Authorization,
    origins: Vec<crate::model::ObjectKey>,
    enforced_by: Vec<String>,
) -> PolicyView {
    PolicyView {
        enforced_by,
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: security::Scope::try_from(p.scope)
            .map(|s| s.as_str_name().to_owned())
            .unwrap_or_default(),
        action: security::Action::try_from(p.action)
            .map(|a| a.as_str_name().to_owned())
            .unwrap_or_default(),
        dry_run: p.dry_run,
        rules: p
            .rules
            .iter()
            .map(|r| {
                r.clauses
                    .iter()
                    .map(|c| c.matches.iter().map(match_view).collect())
                    .collect()
            })
            .collect(),
        converted_from: origins
            .into_iter()
            .map(|k| ObjectRef {
                kind: k.kind.as_str().to_owned(),
                namespace: k.namespace,
                name: k.name,
            })
            .collect(),
    }
}

/// Policies only waypoints enforce (`targetRefs`) have no node-proxy
/// resource; they are listed with scope `WAYPOINT` and their waypoints.
fn waypoint_only_view(p: &WaypointPolicy, enforced_by: Vec<String>) -> PolicyView {
    PolicyView {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: "WAYPOINT".to_owned(),
        action: meshbox::PolicyAction::try_from(p.action)
            .map(|a| a.as_str_name().to_owned())
            .unwrap_or_default(),
        dry_run: false,
        rules: Vec::new(),
        converted_from: Vec::new(),
        enforced_by,
    }
}

pub async fn list_policies(State(state): State<ApiState>) -> Json<Vec<PolicyView>> {
    type WithOrigins = (
        std::sync::Arc<Authorization>,
        Vec<crate::model::ObjectKey>,
        Vec<String>,
    );
    type WaypointOnly = (std::sync::Arc<WaypointPolicy>, Vec<String>);
    let (policies, waypoint_only): (Vec<WithOrigins>, Vec<WaypointOnly>) =
        state.store.read(|index| {
            let node = index
                .authorizations()
                .map(|(name, p)| {
                    (
                        p.clone(),
                        index.peer_authentication_origins(name),
                        index.policy_enforcement(name),
                    )
                })
                .collect();
            let waypoint = index
                .waypoint_policies()
                .filter(|(name, _)| index.authorization(name).is_none())
                .map(|(name, p)| (p.clone(), index.policy_enforcement(name)))
                .collect();
            (node, waypoint)
        });
    let unenforced = state.store.read(|index| index.unenforced_policies());
    let mut out: Vec<PolicyView> = policies
        .into_iter()
        .map(|(p, origins, enforced_by)| policy_view(&p, origins, enforced_by))
        .chain(
            waypoint_only
                .into_iter()
                .map(|(p, enforced_by)| waypoint_only_view(&p, enforced_by)),
        )
        .chain(
            unenforced
                .into_iter()
                .map(|(namespace, name, action)| PolicyView {
                    name,
                    namespace,
                    scope: "NONE".to_owned(),
                    action,
                    dry_run: false,
                    rules: Vec::new(),
                    converted_from: Vec::new(),
                    enforced_by: Vec::new(),
                }),
        )
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Json(out)
}

/// An xDS client serving a waypoint.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointProxyView {
    node_id: Option<String>,
    /// Who authenticated the stream (a SPIFFE ID for a waypoint's token).
    identity: String,
    /// RFC 3339.
    connected_since: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointView {
    #[serde(flatten)]
    waypoint: crate::model::WaypointInfo,
    /// Connected xDS clients whose `WAYPOINT` node metadata names this
    /// Gateway.
    proxies: Vec<WaypointProxyView>,
}

pub async fn list_waypoints(State(state): State<ApiState>) -> Json<Vec<WaypointView>> {
    let waypoints = state.store.read(|index| index.waypoints());
    let connections = state.xds.connections();
    Json(
        waypoints
            .into_iter()
            .map(|waypoint| {
                let name = format!("{}/{}", waypoint.namespace, waypoint.name);
                let proxies = connections
                    .iter()
                    .filter(|c| c.waypoint.as_deref() == Some(name.as_str()))
                    .map(|c| WaypointProxyView {
                        node_id: c.node_id.clone(),
                        identity: c.caller.clone(),
                        connected_since: c.connected_since.clone(),
                    })
                    .collect();
                WaypointView { waypoint, proxies }
            })
            .collect(),
    )
}

/// HTTPRoutes, checked against the Services and waypoints known now (what
/// waypoints get as `WaypointRoute`, in the model's terms).
pub async fn list_routes(
    State(state): State<ApiState>,
    Query(filter): Query<NamespaceFilter>,
) -> Json<Vec<crate::model::RouteInfo>> {
    let mut routes = state.store.read(|index| index.routes());
    if let Some(ns) = filter.namespace {
        routes.retain(|r| r.namespace == ns);
    }
    Json(routes)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// Problems with individual objects (refused policies, missing waypoints...).
    objects: Vec<crate::model::ObjectStatus>,
    /// Manifest files that failed to parse (standalone mode); their last good
    /// version is still served.
    files: Vec<crate::store::ManifestError>,
}

pub async fn status(State(state): State<ApiState>) -> Json<StatusView> {
    Json(StatusView {
        objects: state.store.read(|index| index.statuses()),
        files: state.store.source_errors(),
    })
}
