//! Waypoints: Gateways of class `istio-waypoint` or `meshbox-waypoint`, and
//! how pods, services and namespaces choose one with `istio.io/use-waypoint`.
//!
//! Rules, following istiod:
//! - A workload looks at its pod's labels, then its namespace's; a service at
//!   its own labels, then its namespace's. The most specific label wins, and
//!   `none` there means "no waypoint" without falling back.
//! - `istio.io/use-waypoint-namespace` next to the label names the waypoint's
//!   namespace (default: the object's own).
//! - The Gateway's `istio.io/waypoint-for` label says what it serves:
//!   `service` (default), `workload`, `all` or `none`. A namespace-wide
//!   label that names a service waypoint simply does not apply to workloads;
//!   the same mismatch on the object's own label is reported.
//! - A waypoint is reachable at the Service of the same name in its
//!   namespace (by hostname), else at the first address in its status.
//!   Without either, or when it is missing, or when its HBONE listener's
//!   `allowedRoutes` does not admit the referring namespace, the object gets
//!   no waypoint (traffic goes direct) and the problem is reported.
//! - A waypoint's own pods and Service never use a waypoint (that would
//!   loop); pods and services labelled `gateway.networking.k8s.io/gateway-name`
//!   or `gateway.istio.io/managed=istio.io-mesh-controller` belong to a
//!   Gateway and are treated the same way.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meshbox_proto::workload::{
    GatewayAddress, NamespacedHostname, NetworkAddress, gateway_address,
};
use serde::Serialize;

use super::selector::{Labels, label_selector_matches};
use super::{Dependent, Key, MeshIndex, ObjectKey, WaypointInfo};
use crate::k8s::Gateway;

pub(super) const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub(super) const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const WAYPOINT_CLASSES: [&str; 2] = ["istio-waypoint", "meshbox-waypoint"];
/// Set by Istio on the pods and Service it deploys for a waypoint.
const MANAGED: &str = "gateway.istio.io/managed";
const MANAGED_MESH: &str = "istio.io-mesh-controller";
/// Set by gateway controllers on the pods and Service of a Gateway.
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// Port of the waypoint's HBONE listener.
const HBONE_PORT: u32 = 15008;

/// What traffic a waypoint serves (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn serves(self, target: Target) -> bool {
        matches!(
            (self, target),
            (WaypointFor::All, _)
                | (WaypointFor::Service, Target::Service)
                | (WaypointFor::Workload, Target::Workload)
        )
    }

    fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }
}

/// What is asking for a waypoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Workload,
    Service,
}

#[derive(Clone, Debug, PartialEq)]
enum AllowedFrom {
    Same,
    All,
    Selector(LabelSelector),
}

/// A Gateway reduced to what waypoint handling reads.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct GatewayState {
    class: String,
    is_waypoint: bool,
    traffic: WaypointFor,
    allowed: AllowedFrom,
    /// `(type, value)` from `status.addresses`.
    status_addresses: Vec<(String, String)>,
    problems: Vec<String>,
}

impl GatewayState {
    fn from_gateway(gw: &Gateway) -> Self {
        let class = gw.spec.gateway_class_name.clone();
        let is_waypoint = WAYPOINT_CLASSES.contains(&class.as_str());
        let mut problems = Vec::new();
        let traffic = match gw
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(WAYPOINT_FOR))
            .map(String::as_str)
        {
            None | Some("service") => WaypointFor::Service,
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            Some(other) => {
                problems.push(format!(
                    "label {WAYPOINT_FOR}={other:?} is not one of service, workload, all, none; using service"
                ));
                WaypointFor::Service
            }
        };
        // Admission follows the HBONE listener; without one, only the
        // Gateway's own namespace may use it (Gateway API's default).
        let listener = gw
            .spec
            .listeners
            .iter()
            .find(|l| l.protocol.eq_ignore_ascii_case("HBONE"));
        let namespaces = listener
            .and_then(|l| l.allowed_routes.as_ref())
            .and_then(|r| r.namespaces.as_ref());
        let allowed = match namespaces.and_then(|n| n.from.as_deref()) {
            None | Some("Same") => AllowedFrom::Same,
            Some("All") => AllowedFrom::All,
            Some("Selector") => match namespaces.and_then(|n| n.selector.clone()) {
                Some(sel) => AllowedFrom::Selector(sel),
                None => {
                    problems.push(
                        "allowedRoutes.namespaces.from is Selector but no selector is given; only the Gateway's namespace may use it".to_string(),
                    );
                    AllowedFrom::Same
                }
            },
            Some(other) => {
                problems.push(format!(
                    "allowedRoutes.namespaces.from={other:?} is not Same, All or Selector; only the Gateway's namespace may use it"
                ));
                AllowedFrom::Same
            }
        };
        let status_addresses = gw
            .status
            .iter()
            .flat_map(|s| s.addresses.iter())
            .map(|a| {
                (
                    a.type_.clone().unwrap_or_else(|| "IPAddress".to_string()),
                    a.value.clone(),
                )
            })
            .collect();
        Self {
            class,
            is_waypoint,
            traffic,
            allowed,
            status_addresses,
            // Other Gateways (ingress, egress) are some other controller's
            // business; only their existence matters here.
            problems: if is_waypoint { problems } else { Vec::new() },
        }
    }
}

impl GatewayState {
    pub(super) fn is_waypoint_of_class(&self, class: &str) -> bool {
        self.is_waypoint && self.class == class
    }
}

/// Where a waypoint is reached, derived from the Gateway and its Service.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct GatewayDerived {
    address: Option<GatewayAddress>,
    display: Vec<String>,
}

/// The outcome of following `istio.io/use-waypoint` for one object.
#[derive(Debug, Default)]
pub(super) struct WaypointChoice {
    /// The Gateway this outcome depends on (even when it is missing, so its
    /// arrival rebuilds the object).
    pub(super) dep: Option<Key>,
    pub(super) address: Option<GatewayAddress>,
    /// A problem to report on the object that carries the label.
    pub(super) problem: Option<String>,
}

/// Whether an object is part of a waypoint deployment.
pub(super) fn is_waypoint_instance(labels: &Labels) -> bool {
    labels.get(MANAGED).is_some_and(|v| v == MANAGED_MESH) || labels.contains_key(GATEWAY_NAME)
}

impl MeshIndex {
    pub(super) fn ingest_gateway(&mut self, key: Key, gw: &Gateway) {
        let state = GatewayState::from_gateway(gw);
        if self.gateways.get(&key) == Some(&state) {
            return;
        }
        self.gateways.insert(key.clone(), state);
        self.dirty.gateways.insert(key);
    }

    pub(super) fn remove_gateway(&mut self, key: &Key) {
        if self.gateways.remove(key).is_some() {
            self.dirty.gateways.insert(key.clone());
        }
    }

    /// Whether `key` names a Gateway of a waypoint class.
    pub(super) fn is_waypoint(&self, key: &Key) -> bool {
        self.gateways.get(key).is_some_and(|g| g.is_waypoint)
    }

    /// Re-derives a Gateway's address and status, and marks everything that
    /// uses it.
    pub(super) fn recompute_gateway(&mut self, key: &Key) {
        let mut problems = Vec::new();
        let derived = match self.gateways.get(key) {
            Some(gw) if gw.is_waypoint => {
                problems.extend(gw.problems.iter().cloned());
                Some(self.waypoint_address(key, gw, &mut problems))
            }
            _ => None,
        };
        match derived {
            Some(d) => {
                self.gateway_derived.insert(key.clone(), d);
            }
            None => {
                self.gateway_derived.remove(key);
            }
        }
        self.set_status(ObjectKey::gateway(&key.ns, &key.name), problems);

        if let Some(deps) = self.waypoint_dependents.get(key) {
            for dep in deps {
                match dep {
                    Dependent::Pod(k) => {
                        self.dirty.pods.insert(k.clone());
                    }
                    Dependent::Service(k) => {
                        self.dirty.services.insert(k.clone());
                    }
                    Dependent::Namespace(ns) => {
                        self.dirty.namespaces.insert(ns.clone());
                    }
                }
            }
        }
        self.mark_gateway_policies(key);
        // A waypoint's own Service must not point at the waypoint.
        if self.services.contains_key(key) {
            self.dirty.services.insert(key.clone());
        }
    }

    fn waypoint_address(
        &self,
        key: &Key,
        gw: &GatewayState,
        problems: &mut Vec<String>,
    ) -> GatewayDerived {
        let mut display = Vec::new();
        let mut address = None;
        if self.services.contains_key(key) {
            let hostname = self.service_hostname(key);
            display.push(hostname.clone());
            address = Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: key.ns.clone(),
                hostname,
            }));
        } else {
            for (kind, value) in &gw.status_addresses {
                let dest = match kind.as_str() {
                    "Hostname" => {
                        Some(gateway_address::Destination::Hostname(NamespacedHostname {
                            namespace: key.ns.clone(),
                            hostname: value.clone(),
                        }))
                    }
                    "IPAddress" => match value.parse::<std::net::IpAddr>() {
                        Ok(ip) => Some(gateway_address::Destination::Address(NetworkAddress {
                            network: String::new(),
                            address: super::ip_bytes(ip),
                            length: None,
                        })),
                        Err(_) => {
                            problems.push(format!(
                                "status.addresses: {value:?} is not an IP address; ignored"
                            ));
                            None
                        }
                    },
                    other => {
                        problems.push(format!(
                            "status.addresses: type {other:?} is not supported; ignored"
                        ));
                        None
                    }
                };
                if let Some(dest) = dest {
                    display.push(value.clone());
                    address.get_or_insert(dest);
                }
            }
        }
        if address.is_none() {
            problems.push(format!(
                "waypoint has no address yet: no Service {} in namespace {} and no status.addresses; \
                 whatever uses it sends traffic direct",
                key.name, key.ns
            ));
        }
        GatewayDerived {
            address: address.map(|destination| GatewayAddress {
                destination: Some(destination),
                hbone_mtls_port: HBONE_PORT,
            }),
            display,
        }
    }

    /// The address of waypoint `key` for an object in namespace `from_ns`,
    /// or why it cannot be used.
    fn usable_waypoint(
        &self,
        key: &Key,
        from_ns: &str,
    ) -> Result<(&GatewayState, GatewayAddress), String> {
        let Some(gw) = self.gateways.get(key) else {
            return Err(format!("waypoint {key} not found; traffic goes direct"));
        };
        if !gw.is_waypoint {
            return Err(format!(
                "Gateway {key} has class {:?}, which is not a waypoint class ({}); traffic goes direct",
                gw.class,
                WAYPOINT_CLASSES.join(", ")
            ));
        }
        let Some(address) = self
            .gateway_derived
            .get(key)
            .and_then(|d| d.address.clone())
        else {
            return Err(format!(
                "waypoint {key} has no address yet; traffic goes direct"
            ));
        };
        let admitted = match &gw.allowed {
            AllowedFrom::All => true,
            AllowedFrom::Same => from_ns == key.ns,
            AllowedFrom::Selector(sel) => {
                let empty = Labels::new();
                let labels = self.namespace_labels(from_ns).unwrap_or(&empty);
                // A selector we cannot evaluate admits nobody.
                label_selector_matches(sel, labels).unwrap_or(false)
            }
        };
        if !admitted {
            return Err(format!(
                "waypoint {key} does not admit namespace {from_ns} (allowedRoutes of its HBONE listener); traffic goes direct"
            ));
        }
        Ok((gw, address))
    }

    /// Follows `istio.io/use-waypoint` for a pod (`Target::Workload`) or a
    /// service (`Target::Service`) with labels `own` in namespace `ns`.
    pub(super) fn choose_waypoint(&self, own: &Labels, ns: &str, target: Target) -> WaypointChoice {
        if is_waypoint_instance(own) {
            return WaypointChoice::default();
        }
        let (labels, is_own) = if own.contains_key(USE_WAYPOINT) {
            (own, true)
        } else {
            match self.namespace_labels(ns) {
                Some(l) if l.contains_key(USE_WAYPOINT) => (l, false),
                _ => return WaypointChoice::default(),
            }
        };
        let Some(key) = waypoint_key(labels, ns) else {
            return WaypointChoice::default();
        };
        let mut choice = WaypointChoice::default();
        match self.usable_waypoint(&key, ns) {
            Ok((gw, address)) => {
                if gw.traffic.serves(target) {
                    choice.address = Some(address);
                } else if is_own {
                    choice.problem = Some(format!(
                        "waypoint {key} serves {} traffic ({WAYPOINT_FOR}), not {}; traffic goes direct",
                        gw.traffic.as_str(),
                        match target {
                            Target::Workload => "workload",
                            Target::Service => "service",
                        }
                    ));
                }
            }
            Err(problem) => {
                if is_own {
                    choice.problem = Some(problem);
                }
            }
        }
        // Moved in last rather than cloned up front: this runs for every
        // workload and service rebuilt.
        choice.dep = Some(key);
        choice
    }

    /// The waypoint a namespace's label names, and what is wrong with it.
    pub(super) fn namespace_waypoint_check(
        &self,
        ns: &str,
        labels: &Labels,
    ) -> (Option<Key>, Option<String>) {
        let Some(key) = waypoint_key(labels, ns) else {
            return (None, None);
        };
        let problem = match self.usable_waypoint(&key, ns) {
            Ok((gw, _)) if gw.traffic == WaypointFor::None => Some(format!(
                "waypoint {key} serves no traffic ({WAYPOINT_FOR}=none)"
            )),
            Ok(_) => None,
            Err(problem) => Some(problem),
        };
        (Some(key), problem)
    }

    /// Gateways recognised as waypoints, sorted by namespace and name.
    pub fn waypoints(&self) -> Vec<WaypointInfo> {
        let mut config = self.waypoint_config_names();
        let mut out: Vec<WaypointInfo> = self
            .gateways
            .iter()
            .filter(|(_, gw)| gw.is_waypoint)
            .map(|(key, gw)| WaypointInfo {
                namespace: key.ns.clone(),
                name: key.name.clone(),
                class: gw.class.clone(),
                traffic_type: gw.traffic,
                addresses: self
                    .gateway_derived
                    .get(key)
                    .map(|d| d.display.clone())
                    .unwrap_or_default(),
                policies: Vec::new(),
                routes: Vec::new(),
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for w in &mut out {
            if let Some((policies, routes)) =
                config.remove(&super::concat(&[&w.namespace, "/", &w.name]))
            {
                w.policies = policies;
                w.routes = routes;
            }
        }
        out
    }
}

/// The waypoint named by `labels`, or `None` for no label, `none` or an
/// empty value.
fn waypoint_key(labels: &Labels, ns: &str) -> Option<Key> {
    let name = labels.get(USE_WAYPOINT)?;
    if name.is_empty() || name == "none" {
        return None;
    }
    let wns = labels
        .get(USE_WAYPOINT_NAMESPACE)
        .filter(|n| !n.is_empty())
        .map(String::as_str)
        .unwrap_or(ns);
    Some(Key::new(wns, name))
}
