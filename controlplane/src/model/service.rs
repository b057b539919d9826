//! Services, EndpointSlices, and the `Service` resources derived from them.
//!
//! Rules, following istiod:
//! - Hostname `{name}.{ns}.svc.{cluster_domain}`; VIPs from `clusterIPs`
//!   (or `clusterIP`), skipping `None`, plus load-balancer ingress IPs.
//!   Headless services have no VIP but still get their members.
//! - Ports carry the app protocol from `appProtocol`, else from the port
//!   name's prefix (`http`, `http-web`, `grpc-x`...). A named target port is
//!   sent as 0 on the Service and resolved per pod on each Workload, which
//!   leaves the port out when the pod has no container port of that name.
//! - A service with a selector has as members the pods of its namespace
//!   that it selects. A service without one (or with an empty one) takes
//!   its members from the EndpointSlices labelled
//!   `kubernetes.io/service-name`: endpoints that reference a pod, or whose
//!   address is a pod's IP. Other endpoints have no workload and are not
//!   represented.
//! - Membership appears on the Workload (`services` map), not on the
//!   Service, so membership churn never rewrites the Service resource.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshbox_proto::workload::{Address, AppProtocol, IpFamilies, NetworkAddress, Port, address};

use super::selector::Labels;
use super::waypoint::{Target, WaypointChoice};
use super::workload::PodState;
use super::{Dependent, Key, MeshIndex, ObjectKey, index_insert, index_remove, ip_bytes};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const INGRESS_USE_WAYPOINT: &str = "istio.io/ingress-use-waypoint";

#[derive(Clone, Debug, PartialEq)]
enum TargetPort {
    /// Not given: same as the service port.
    Same,
    Number(u32),
    Name(String),
}

#[derive(Clone, Debug, PartialEq)]
struct ServicePortState {
    name: String,
    port: u32,
    target: TargetPort,
    app_protocol: AppProtocol,
}

/// A Service reduced to what the model reads.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ServiceState {
    pub(super) labels: Labels,
    /// `None` for selector-less services (members from EndpointSlices).
    pub(super) selector: Option<Labels>,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePortState>,
    ip_families: IpFamilies,
    ingress_use_waypoint: bool,
    problems: Vec<String>,
}

impl ServiceState {
    /// Whether the Service exposes `port` (a service port, not a target).
    pub(super) fn has_port(&self, port: u32) -> bool {
        self.ports.iter().any(|p| p.port == port)
    }

    fn from_service(svc: &Service) -> Self {
        let spec = svc.spec.as_ref();
        let mut problems = Vec::new();

        let mut raw_vips: Vec<&str> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .map(|ips| ips.iter().map(String::as_str).collect())
            .unwrap_or_default();
        if raw_vips.is_empty() {
            raw_vips.extend(spec.and_then(|s| s.cluster_ip.as_deref()));
        }
        if spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
            raw_vips.extend(
                svc.status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.ip.as_deref()),
            );
        }
        let mut vips = Vec::new();
        for raw in raw_vips {
            if raw.is_empty() || raw == "None" {
                continue;
            }
            match raw.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    problems.push(format!("cluster IP {raw:?} is not an IP address; ignored"))
                }
            }
        }

        let mut ports = Vec::new();
        for p in spec.and_then(|s| s.ports.as_ref()).into_iter().flatten() {
            let name = p.name.clone().unwrap_or_default();
            let Some(port) = valid_port(p.port) else {
                problems.push(format!(
                    "port {name:?}: {} is not a valid port; ignored",
                    p.port
                ));
                continue;
            };
            let target = match &p.target_port {
                None => TargetPort::Same,
                Some(IntOrString::Int(n)) => match valid_port(*n) {
                    Some(n) => TargetPort::Number(n),
                    None => {
                        problems.push(format!(
                            "port {name:?}: targetPort {n} is not a valid port; using the service port"
                        ));
                        TargetPort::Same
                    }
                },
                Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Same,
                // Kubernetes accepts a numeric string here too.
                Some(IntOrString::String(s)) => match s.parse::<i32>().ok().and_then(valid_port) {
                    Some(n) => TargetPort::Number(n),
                    None => TargetPort::Name(s.clone()),
                },
            };
            ports.push(ServicePortState {
                app_protocol: app_protocol(p.app_protocol.as_deref(), &name),
                name,
                port,
                target,
            });
        }

        let families = spec
            .and_then(|s| s.ip_families.as_deref())
            .unwrap_or_default();
        let ip_families = match families {
            [a, b] if a != b => IpFamilies::Dual,
            [f] if f == "IPv4" => IpFamilies::Ipv4Only,
            [f] if f == "IPv6" => IpFamilies::Ipv6Only,
            _ => IpFamilies::Automatic,
        };
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        Self {
            selector: spec
                .and_then(|s| s.selector.clone())
                .filter(|s| !s.is_empty()),
            ingress_use_waypoint: labels
                .get(INGRESS_USE_WAYPOINT)
                .is_some_and(|v| v == "true"),
            labels,
            vips,
            ports,
            ip_families,
            problems,
        }
    }

    /// The workload-side port mappings of a selected pod.
    pub(super) fn ports_for_pod(&self, pod: &PodState) -> Vec<Port> {
        self.ports
            .iter()
            .filter_map(|p| {
                let target_port = match &p.target {
                    TargetPort::Same => p.port,
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => *pod.named_ports.get(name)?,
                };
                Some(Port {
                    service_port: p.port,
                    target_port,
                    app_protocol: AppProtocol::Unknown as i32,
                })
            })
            .collect()
    }

    /// The port mappings of an endpoint in `slice`: the slice port with the
    /// service port's name gives the target, as kube-proxy reads it.
    pub(super) fn ports_for_slice(&self, slice: &SliceState) -> Vec<Port> {
        self.ports
            .iter()
            .filter_map(|p| {
                let from_slice = slice
                    .ports
                    .iter()
                    .find(|(name, _)| *name == p.name)
                    .map(|(_, port)| *port);
                let target_port = match (&p.target, from_slice) {
                    (_, Some(n)) => n,
                    (TargetPort::Same, None) => p.port,
                    (TargetPort::Number(n), None) => *n,
                    (TargetPort::Name(_), None) => return None,
                };
                Some(Port {
                    service_port: p.port,
                    target_port,
                    app_protocol: AppProtocol::Unknown as i32,
                })
            })
            .collect()
    }
}

fn valid_port(n: i32) -> Option<u32> {
    u32::try_from(n).ok().filter(|n| (1..=65535).contains(n))
}

/// Istio's protocol selection: `appProtocol` first, else the port name
/// (`http`, or `http-` followed by anything). Case does not matter.
fn app_protocol(app_protocol: Option<&str>, port_name: &str) -> AppProtocol {
    let from = |p: &str| -> Option<AppProtocol> {
        Some(match p.to_ascii_lowercase().as_str() {
            "http" => AppProtocol::Http11,
            "http2" | "h2c" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            "tls" | "https" => AppProtocol::Tls,
            _ => return None,
        })
    };
    if let Some(p) = app_protocol.filter(|p| !p.is_empty()) {
        return from(p).unwrap_or(AppProtocol::Unknown);
    }
    let prefix = port_name.split('-').next().unwrap_or_default();
    from(prefix).unwrap_or(AppProtocol::Unknown)
}

/// An EndpointSlice reduced to what the model reads.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct SliceState {
    /// From the `kubernetes.io/service-name` label.
    pub(super) service: Option<String>,
    /// Port name ("" when unnamed) → port.
    ports: Vec<(String, u32)>,
    /// Endpoints that reference a pod.
    pod_refs: Vec<Key>,
    /// Addresses of endpoints that do not.
    ips: Vec<IpAddr>,
}

impl SliceState {
    fn from_slice(key: &Key, slice: &EndpointSlice) -> Self {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
            .cloned();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), valid_port(p.port?)?)))
            .collect();
        let mut pod_refs = Vec::new();
        let mut ips = Vec::new();
        // FQDN slices name hosts, never pods.
        if slice.address_type != "FQDN" {
            for ep in slice.endpoints.iter().flatten() {
                match &ep.target_ref {
                    Some(r) if r.kind.as_deref() == Some("Pod") && r.name.is_some() => {
                        let ns = r
                            .namespace
                            .as_deref()
                            .filter(|n| !n.is_empty())
                            .unwrap_or(&key.ns);
                        pod_refs.push(Key::new(ns, r.name.as_deref().unwrap_or_default()));
                    }
                    _ => ips.extend(ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok())),
                }
            }
        }
        Self {
            service,
            ports,
            pod_refs,
            ips,
        }
    }
}

impl MeshIndex {
    pub(super) fn ingest_service(&mut self, key: Key, svc: &Service) {
        let state = ServiceState::from_service(svc);
        let old = self.services.get(&key);
        if old == Some(&state) {
            return;
        }
        let existed = old.is_some();
        // Workloads carry the selector's membership and the port mappings;
        // anything else (VIPs, labels) concerns only the Service resource.
        let members_affected =
            old.is_none_or(|o| o.selector != state.selector || o.ports != state.ports);
        if let Some(old) = self.services.remove(&key) {
            self.unindex_service(&key, &old);
        }
        self.index_service(&key, &state);
        self.services.insert(key.clone(), state);
        if members_affected {
            self.mark_service_pods(&key);
        }
        self.dirty.services.insert(key.clone());
        if !existed && self.gateways.contains_key(&key) {
            // A waypoint is reached through its Service.
            self.dirty.gateways.insert(key);
        }
    }

    pub(super) fn remove_service(&mut self, key: &Key) {
        let Some(old) = self.services.remove(key) else {
            return;
        };
        self.unindex_service(key, &old);
        self.mark_service_pods(key);
        self.dirty.services.insert(key.clone());
        if self.gateways.contains_key(key) {
            self.dirty.gateways.insert(key.clone());
        }
    }

    fn index_service(&mut self, key: &Key, svc: &ServiceState) {
        index_insert(&mut self.services_by_ns, &key.ns, key.name.clone());
        if let Some(sel) = &svc.selector {
            self.service_selectors
                .insert_selector(&key.ns, sel, &key.name);
        }
        for ip in &svc.vips {
            index_insert(&mut self.services_by_vip, ip, key.clone());
        }
    }

    fn unindex_service(&mut self, key: &Key, svc: &ServiceState) {
        index_remove(&mut self.services_by_ns, &key.ns, &key.name);
        if let Some(sel) = &svc.selector {
            self.service_selectors
                .remove_selector(&key.ns, sel, &key.name);
        }
        for ip in &svc.vips {
            index_remove(&mut self.services_by_vip, ip, key);
        }
    }

    /// Marks the pods that were members of the service and those that are
    /// now, so their workloads pick up the difference.
    fn mark_service_pods(&mut self, key: &Key) {
        let mut pods: BTreeSet<Key> = self.service_members.get(key).cloned().unwrap_or_default();
        if let Some(svc) = self.services.get(key) {
            match &svc.selector {
                Some(sel) => pods.extend(self.select_pods(Some(&key.ns), sel)),
                None => {
                    for slice in self.slices_by_service.get(key).into_iter().flatten() {
                        if let Some(slice) = self.slices.get(slice) {
                            pods.extend(self.slice_pods(slice));
                        }
                    }
                }
            }
        }
        self.dirty.pods.extend(pods);
    }

    /// Rebuilds one Service resource, and marks the policies and routes
    /// that depend on it.
    pub(super) fn recompute_service(&mut self, key: &Key) {
        let before = self.waypoint_of_service(key).cloned();
        self.rebuild_service(key);
        let after = self.waypoint_of_service(key).cloned();
        self.mark_service_policies(key, before != after);
        self.mark_service_routes(key);
    }

    fn rebuild_service(&mut self, key: &Key) {
        let name = self.service_resource_name(key);
        let status_key = ObjectKey::service(&key.ns, &key.name);
        let old_dep = self.service_waypoint.remove(key);
        let Some(svc) = self.services.get(key) else {
            self.set_waypoint_dependency(Dependent::Service(key.clone()), old_dep, None);
            self.put_address(name, None);
            self.set_status(status_key, Vec::new());
            return;
        };
        let choice = if self.is_waypoint(key) {
            // The waypoint's own Service: sending its traffic to the
            // waypoint would loop.
            WaypointChoice::default()
        } else {
            self.choose_waypoint(&svc.labels, &key.ns, Target::Service)
        };
        let service = meshbox_proto::workload::Service {
            name: key.name.clone(),
            namespace: key.ns.clone(),
            hostname: self.service_hostname(key),
            addresses: svc
                .vips
                .iter()
                .map(|ip| NetworkAddress {
                    network: String::new(),
                    address: ip_bytes(*ip),
                    length: None,
                })
                .collect(),
            ports: svc
                .ports
                .iter()
                .map(|p| Port {
                    service_port: p.port,
                    target_port: match &p.target {
                        TargetPort::Same => p.port,
                        TargetPort::Number(n) => *n,
                        // Resolved per workload.
                        TargetPort::Name(_) => 0,
                    },
                    app_protocol: p.app_protocol as i32,
                })
                .collect(),
            waypoint: choice.address,
            ip_families: svc.ip_families as i32,
            canonical: true,
            ingress_use_waypoint: svc.ingress_use_waypoint,
            ..Default::default()
        };
        let mut problems = svc.problems.clone();
        problems.extend(choice.problem);
        if let Some(dep) = &choice.dep {
            self.service_waypoint.insert(key.clone(), dep.clone());
        }
        self.set_waypoint_dependency(
            Dependent::Service(key.clone()),
            old_dep,
            choice.dep.as_ref(),
        );
        self.put_address(
            name,
            Some(Address {
                r#type: Some(address::Type::Service(service)),
            }),
        );
        self.set_status(status_key, problems);
    }

    pub(super) fn ingest_slice(&mut self, key: Key, slice: &EndpointSlice) {
        let state = SliceState::from_slice(&key, slice);
        if self.slices.get(&key) == Some(&state) {
            return;
        }
        if let Some(old) = self.slices.remove(&key) {
            self.unindex_slice(&key, &old);
        }
        self.index_slice(&key, &state);
        self.slices.insert(key, state);
    }

    pub(super) fn remove_slice(&mut self, key: &Key) {
        if let Some(old) = self.slices.remove(key) {
            self.unindex_slice(key, &old);
        }
    }

    fn index_slice(&mut self, key: &Key, slice: &SliceState) {
        if let Some(service) = &slice.service {
            index_insert(
                &mut self.slices_by_service,
                &Key::new(&key.ns, service),
                key.clone(),
            );
        }
        for pod in &slice.pod_refs {
            index_insert(&mut self.slices_by_pod, pod, key.clone());
        }
        for ip in &slice.ips {
            index_insert(&mut self.slices_by_ip, ip, key.clone());
        }
        let pods = self.slice_pods(slice);
        self.dirty.pods.extend(pods);
    }

    fn unindex_slice(&mut self, key: &Key, slice: &SliceState) {
        if let Some(service) = &slice.service {
            index_remove(
                &mut self.slices_by_service,
                &Key::new(&key.ns, service),
                key,
            );
        }
        for pod in &slice.pod_refs {
            index_remove(&mut self.slices_by_pod, pod, key);
        }
        for ip in &slice.ips {
            index_remove(&mut self.slices_by_ip, ip, key);
        }
        let pods = self.slice_pods(slice);
        self.dirty.pods.extend(pods);
    }

    /// Existing pods a slice's endpoints stand for.
    fn slice_pods(&self, slice: &SliceState) -> BTreeSet<Key> {
        let mut out: BTreeSet<Key> = slice
            .pod_refs
            .iter()
            .filter(|k| self.pods.contains_key(*k))
            .cloned()
            .collect();
        for ip in &slice.ips {
            out.extend(self.pods_by_ip.get(ip).into_iter().flatten().cloned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocols() {
        let cases: &[(Option<&str>, &str, AppProtocol)] = &[
            (Some("http"), "tcp-x", AppProtocol::Http11),
            (Some("HTTP2"), "", AppProtocol::Http2),
            (Some("kubernetes.io/h2c"), "", AppProtocol::Http2),
            (Some("grpc"), "", AppProtocol::Grpc),
            (Some("mongo"), "http", AppProtocol::Unknown),
            (None, "http", AppProtocol::Http11),
            (None, "http-web", AppProtocol::Http11),
            (None, "http2-x", AppProtocol::Http2),
            (None, "grpc-api", AppProtocol::Grpc),
            (None, "tcp-db", AppProtocol::Tcp),
            (None, "tls", AppProtocol::Tls),
            (None, "https-admin", AppProtocol::Tls),
            (None, "httpx", AppProtocol::Unknown),
            (None, "web", AppProtocol::Unknown),
            (None, "", AppProtocol::Unknown),
        ];
        for (ap, name, want) in cases {
            assert_eq!(app_protocol(*ap, name), *want, "{ap:?} {name:?}");
        }
    }
}
