//! Pods and the `Workload` resources derived from them.
//!
//! Rules, following istiod's ambient index:
//! - Every pod in phase Running with an IP is a workload, enrolled or not;
//!   dataplanes need the others too (as plaintext, tunnel `NONE`).
//! - Enrolled (tunnel `HBONE`): `istio.io/dataplane-mode=ambient` on the pod,
//!   or on its namespace unless the pod says `none`. Host-network pods and
//!   pods with an Istio sidecar cannot be captured, so they stay `NONE`
//!   (host-network ones are also marked `HOST_NETWORK`).
//! - A terminating pod keeps its workload, `UNHEALTHY`, so connections can
//!   drain while no new ones are balanced to it; otherwise `HEALTHY` only
//!   when the Ready condition is True.
//! - A pod with no `status.phase` at all can only come from a hand-written
//!   manifest (the API server always sets one); it is taken as Running, and
//!   as Ready when it has no conditions either, so standalone manifests need
//!   only `status.podIP`.
//! - Workload name/type come from the controlling owner: a ReplicaSet named
//!   `{deployment}-{pod-template-hash}` means a Deployment, a Job named
//!   `{cronjob}-{8..10 digits}` a CronJob, another Job a Job; other
//!   controllers give their name with type Pod; no owner gives the pod.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use meshbox_certs::SpiffeId;
use meshbox_proto::workload::{
    Address, NetworkMode, Port, PortList, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
    address,
};

use super::selector::{Labels, selects};
use super::waypoint::Target;
use super::{
    Dependent, Key, MeshConfig, MeshIndex, ObjectKey, index_insert, index_remove, ip_bytes,
};

const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// A pod reduced to what the model reads; equal states mean nothing to do.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PodState {
    pub(super) labels: Labels,
    pub(super) ips: Vec<IpAddr>,
    pub(super) node: String,
    service_account: String,
    phase: Option<String>,
    ready: bool,
    pub(super) host_network: bool,
    terminating: bool,
    has_sidecar: bool,
    workload_name: String,
    workload_type: WorkloadType,
    /// Container port names → numbers, to resolve named target ports.
    pub(super) named_ports: BTreeMap<String, u32>,
    /// The identity the pod runs as; `None` when its namespace or service
    /// account cannot be part of a SPIFFE ID (only a hand-written manifest
    /// can say so), and then no certificate can be asked for it either.
    identity: Option<SpiffeId>,
    problems: Vec<String>,
}

impl PodState {
    /// Takes the pod by value to move its labels rather than copy them.
    fn from_pod(key: &Key, mut pod: Pod, config: &MeshConfig) -> Self {
        let labels = pod.metadata.labels.take().unwrap_or_default();
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut problems = Vec::new();

        let mut raw_ips: Vec<&str> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|i| i.ip.as_str()).collect())
            .unwrap_or_default();
        if raw_ips.is_empty() {
            raw_ips.extend(status.and_then(|s| s.pod_ip.as_deref()));
        }
        let mut ips = Vec::new();
        for raw in raw_ips.into_iter().filter(|r| !r.is_empty()) {
            match raw.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => problems.push(format!(
                    "status.podIPs: {raw:?} is not an IP address; ignored"
                )),
            }
        }

        let phase = status.and_then(|s| s.phase.clone());
        let conditions = status.and_then(|s| s.conditions.as_ref());
        let ready = match conditions {
            Some(conds) => conds
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            None => phase.is_none(),
        };
        let service_account = spec
            .and_then(|s| {
                s.service_account_name
                    .as_deref()
                    .or(s.service_account.as_deref())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string();
        let named_ports = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let name = p.name.as_ref().filter(|n| !n.is_empty())?;
                let port = u32::try_from(p.container_port)
                    .ok()
                    .filter(|p| (1..=65535).contains(p))?;
                Some((name.clone(), port))
            })
            .collect();
        let (workload_name, workload_type) = workload_name_and_type(
            &key.name,
            &labels,
            meta.owner_references.as_deref().unwrap_or_default(),
        );
        Self {
            identity: SpiffeId::new(&config.trust_domain, &key.ns, &service_account).ok(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account,
            ready,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminating: meta.deletion_timestamp.is_some(),
            has_sidecar: meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(SIDECAR_STATUS)),
            workload_name,
            workload_type,
            named_ports,
            phase,
            labels,
            problems,
        }
    }

    fn running(&self) -> bool {
        self.phase.as_deref().is_none_or(|p| p == "Running")
    }

    /// Whether the pod is served as a workload.
    fn is_workload(&self) -> bool {
        self.running() && !self.ips.is_empty()
    }

    /// The identity a node proxy on the pod's node may fetch a certificate
    /// for, if any.
    fn held_identity(&self) -> Option<&SpiffeId> {
        let live = !self.node.is_empty()
            && !matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"));
        self.identity.as_ref().filter(|_| live)
    }

    pub(super) fn enrolled(&self, ns_labels: Option<&Labels>) -> bool {
        if self.host_network || self.has_sidecar {
            return false;
        }
        match self.labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some("ambient") => true,
            Some("none") => false,
            _ => ns_labels
                .and_then(|l| l.get(DATAPLANE_MODE))
                .is_some_and(|m| m == "ambient"),
        }
    }
}

/// What a pod's workload was derived from, to undo it on the next rebuild.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct PodDerived {
    pub(super) services: BTreeSet<Key>,
    pub(super) policies: BTreeSet<Key>,
    waypoint: Option<Key>,
    /// The waypoint that carries the workload's traffic now (the one
    /// `waypoint` names, when usable for workloads).
    pub(super) workload_waypoint: Option<Key>,
}

impl MeshIndex {
    pub(super) fn ingest_pod(&mut self, key: Key, pod: Pod) {
        let state = PodState::from_pod(&key, pod, &self.config);
        if self.pods.get(&key) == Some(&state) {
            return;
        }
        if let Some(old) = self.pods.remove(&key) {
            self.unindex_pod(&key, &old);
        }
        self.index_pod(&key, &state);
        self.pods.insert(key.clone(), state);
        self.dirty.pods.insert(key);
    }

    pub(super) fn remove_pod(&mut self, key: &Key) {
        if let Some(old) = self.pods.remove(key) {
            self.unindex_pod(key, &old);
            self.dirty.pods.insert(key.clone());
        }
    }

    fn index_pod(&mut self, key: &Key, pod: &PodState) {
        index_insert(&mut self.pods_by_ns, &key.ns, key.name.clone());
        self.pod_labels.insert_all(&key.ns, &pod.labels, &key.name);
        for ip in &pod.ips {
            index_insert(&mut self.pods_by_ip, ip, key.clone());
        }
        if let Some(identity) = pod.held_identity() {
            // Clone the node only when it is new: many pods share it.
            match self.identities_by_node.get_mut(&pod.node) {
                Some(ids) => *ids.entry(identity.clone()).or_insert(0) += 1,
                None => {
                    let ids = HashMap::from([(identity.clone(), 1)]);
                    self.identities_by_node.insert(pod.node.clone(), ids);
                }
            }
        }
    }

    fn unindex_pod(&mut self, key: &Key, pod: &PodState) {
        index_remove(&mut self.pods_by_ns, &key.ns, &key.name);
        self.pod_labels.remove_all(&key.ns, &pod.labels, &key.name);
        for ip in &pod.ips {
            index_remove(&mut self.pods_by_ip, ip, key);
        }
        if let Some(identity) = pod.held_identity()
            && let Some(ids) = self.identities_by_node.get_mut(&pod.node)
        {
            if let Some(n) = ids.get_mut(identity) {
                *n -= 1;
                if *n == 0 {
                    ids.remove(identity);
                }
            }
            if ids.is_empty() {
                self.identities_by_node.remove(&pod.node);
            }
        }
    }

    /// Rebuilds one pod's workload from the current inputs.
    pub(super) fn recompute_pod(&mut self, key: &Key) {
        let uid = self.workload_uid(key);
        let status_key = ObjectKey::pod(&key.ns, &key.name);
        let Some(pod) = self.pods.get(key) else {
            self.set_pod_derived(key, PodDerived::default());
            self.put_address(uid, None);
            self.set_status(status_key, Vec::new());
            return;
        };
        if !pod.is_workload() {
            let problems = pod.problems.clone();
            self.set_pod_derived(key, PodDerived::default());
            self.put_address(uid, None);
            self.set_status(status_key, problems);
            return;
        }

        let services = self.pod_services(key, pod);
        let policies = self.pod_policies(key, pod);
        let choice = self.choose_waypoint(&pod.labels, &key.ns, Target::Workload);
        let waypoint_usable = choice.address.is_some();
        let ns_labels = self.namespace_labels(&key.ns);
        let (canonical_name, canonical_revision) =
            canonical_service(&pod.labels, &pod.workload_name);

        let mut authorization_policies: Vec<String> =
            policies.iter().map(Key::slash_name).collect();
        authorization_policies.extend(self.peer_auth_policies(&key.ns, &pod.labels));
        authorization_policies.sort();
        let workload = Workload {
            uid: uid.clone(),
            name: key.name.clone(),
            namespace: key.ns.clone(),
            addresses: pod.ips.iter().map(|ip| ip_bytes(*ip)).collect(),
            tunnel_protocol: if pod.enrolled(ns_labels) {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::None
            } as i32,
            trust_domain: self.config.trust_domain.clone(),
            service_account: pod.service_account.clone(),
            waypoint: choice.address,
            node: pod.node.clone(),
            canonical_name,
            canonical_revision,
            workload_type: pod.workload_type as i32,
            workload_name: pod.workload_name.clone(),
            services: services
                .iter()
                .map(|(k, ports)| {
                    (
                        self.service_resource_name(k),
                        PortList {
                            ports: ports.clone(),
                        },
                    )
                })
                .collect::<HashMap<_, _>>(),
            authorization_policies,
            status: if pod.ready && !pod.terminating {
                WorkloadStatus::Healthy
            } else {
                WorkloadStatus::Unhealthy
            } as i32,
            cluster_id: self.config.cluster_id.clone(),
            network_mode: if pod.host_network {
                NetworkMode::HostNetwork
            } else {
                NetworkMode::Standard
            } as i32,
            ..Default::default()
        };
        let mut problems = pod.problems.clone();
        problems.extend(choice.problem);
        let derived = PodDerived {
            services: services.into_keys().collect(),
            policies,
            workload_waypoint: choice.dep.clone().filter(|_| waypoint_usable),
            waypoint: choice.dep,
        };

        self.set_pod_derived(key, derived);
        self.put_address(
            uid,
            Some(Address {
                r#type: Some(address::Type::Workload(workload)),
            }),
        );
        self.set_status(status_key, problems);
    }

    /// The services a pod belongs to, with its port mappings for each:
    /// selector services in its namespace that select it, and selector-less
    /// services whose EndpointSlices name it (by pod reference or IP).
    fn pod_services(&self, key: &Key, pod: &PodState) -> BTreeMap<Key, Vec<Port>> {
        let mut out = BTreeMap::new();
        for name in self.service_selectors.candidates(&key.ns, &pod.labels) {
            let skey = Key::new(&key.ns, name);
            if let Some(svc) = self.services.get(&skey)
                && svc
                    .selector
                    .as_ref()
                    .is_some_and(|s| selects(s, &pod.labels))
            {
                out.insert(skey, svc.ports_for_pod(pod));
            }
        }
        let mut slices: BTreeSet<&Key> = BTreeSet::new();
        slices.extend(self.slices_by_pod.get(key).into_iter().flatten());
        for ip in &pod.ips {
            slices.extend(self.slices_by_ip.get(ip).into_iter().flatten());
        }
        for slice_key in slices {
            let Some(slice) = self.slices.get(slice_key) else {
                continue;
            };
            let Some(service) = &slice.service else {
                continue;
            };
            let skey = Key::new(&slice_key.ns, service);
            let Some(svc) = self.services.get(&skey) else {
                continue;
            };
            if svc.selector.is_some() {
                // Selector services get their members from the selector;
                // their controller-made slices would only repeat them.
                continue;
            }
            let ports: &mut Vec<Port> = out.entry(skey).or_default();
            for port in svc.ports_for_slice(slice) {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
        out
    }

    /// The policies listed on a pod's workload: namespace-wide policies of
    /// its namespace, and selector policies of its namespace or the root
    /// namespace that select it. Mesh-wide ones are not listed: dataplanes
    /// apply them to everything.
    fn pod_policies(&self, key: &Key, pod: &PodState) -> BTreeSet<Key> {
        let mut out = BTreeSet::new();
        if let Some(names) = self.namespace_policies.get(&key.ns) {
            out.extend(names.iter().map(|n| Key::new(&key.ns, n)));
        }
        let root = self.config.root_namespace.as_str();
        let scopes: &[&str] = if key.ns == root {
            &[root]
        } else {
            &[key.ns.as_str(), root]
        };
        for scope in scopes {
            for name in self.policy_selectors.candidates(scope, &pod.labels) {
                let pkey = Key::new(scope, name);
                if self
                    .policies
                    .get(&pkey)
                    .and_then(|p| p.selector())
                    .is_some_and(|s| selects(s, &pod.labels))
                {
                    out.insert(pkey);
                }
            }
        }
        out
    }

    /// Replaces a pod's recorded dependencies, keeping the reverse indexes
    /// (service → members, policy → members, waypoint → users) in step.
    fn set_pod_derived(&mut self, key: &Key, new: PodDerived) {
        let old = self.pod_derived.remove(key).unwrap_or_default();
        if old != new {
            // What a policy sends to waypoints, and so to node proxies,
            // follows its workloads' waypoints and services.
            self.dirty
                .policies
                .extend(old.policies.union(&new.policies).cloned());
        }
        for s in old.services.difference(&new.services) {
            index_remove(&mut self.service_members, s, key);
        }
        for s in new.services.difference(&old.services) {
            index_insert(&mut self.service_members, s, key.clone());
        }
        for p in old.policies.difference(&new.policies) {
            index_remove(&mut self.policy_members, p, key);
        }
        for p in new.policies.difference(&old.policies) {
            index_insert(&mut self.policy_members, p, key.clone());
        }
        self.set_waypoint_dependency(
            Dependent::Pod(key.clone()),
            old.waypoint,
            new.waypoint.as_ref(),
        );
        if new != PodDerived::default() {
            self.pod_derived.insert(key.clone(), new);
        }
    }
}

/// Istio's canonical service name and revision for a workload.
fn canonical_service(labels: &Labels, workload_name: &str) -> (String, String) {
    let first = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
            .cloned()
    };
    let name = first(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| workload_name.to_string());
    let revision = first(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_string());
    (name, revision)
}

fn workload_name_and_type(
    pod_name: &str,
    labels: &Labels,
    owners: &[OwnerReference],
) -> (String, WorkloadType) {
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return (pod_name.to_string(), WorkloadType::Pod);
    };
    match owner.kind.as_str() {
        "ReplicaSet" => match deployment_name(&owner.name, labels.get(POD_TEMPLATE_HASH)) {
            Some(deployment) => (deployment.to_string(), WorkloadType::Deployment),
            None => (owner.name.clone(), WorkloadType::Pod),
        },
        "Job" => match cronjob_name(&owner.name) {
            Some(cronjob) => (cronjob.to_string(), WorkloadType::Cronjob),
            None => (owner.name.clone(), WorkloadType::Job),
        },
        _ => (owner.name.clone(), WorkloadType::Pod),
    }
}

/// The Deployment behind ReplicaSet `rs`: strip `-{pod-template-hash}`.
/// Without the label (hand-written manifests), a last segment made only of
/// the characters Kubernetes uses for hashes counts as the hash.
fn deployment_name<'a>(rs: &'a str, hash: Option<&String>) -> Option<&'a str> {
    if let Some(hash) = hash.filter(|h| !h.is_empty()) {
        return rs
            .strip_suffix(hash.as_str())
            .and_then(|p| p.strip_suffix('-'))
            .filter(|p| !p.is_empty());
    }
    const HASH_CHARS: &str = "bcdfghjklmnpqrstvwxz2456789";
    let (prefix, suffix) = rs.rsplit_once('-')?;
    let looks_like_hash =
        (5..=10).contains(&suffix.len()) && suffix.chars().all(|c| HASH_CHARS.contains(c));
    (looks_like_hash && !prefix.is_empty()).then_some(prefix)
}

/// The CronJob behind Job `job`: CronJobs name their Jobs
/// `{cronjob}-{scheduled time in minutes}`.
fn cronjob_name(job: &str) -> Option<&str> {
    let (prefix, suffix) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit());
    (digits && !prefix.is_empty()).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_names() {
        let hash = "7d9f8b6c4".to_string();
        let cases: &[(&str, Option<&String>, Option<&str>)] = &[
            ("reviews-v1-7d9f8b6c4", Some(&hash), Some("reviews-v1")),
            ("reviews-v1-other", Some(&hash), None),
            ("reviews-v1-7d9f8b6c4", None, Some("reviews-v1")),
            ("frontend", None, None),
            ("my-frontend", None, None),
        ];
        for (rs, hash, want) in cases {
            assert_eq!(deployment_name(rs, *hash), *want, "{rs}");
        }
    }

    #[test]
    fn cronjob_names() {
        assert_eq!(cronjob_name("backup-28734120"), Some("backup"));
        assert_eq!(cronjob_name("backup-123"), None);
        assert_eq!(cronjob_name("migrate"), None);
        assert_eq!(cronjob_name("-28734120"), None);
    }

    #[test]
    fn canonical_labels_in_order() {
        let labels = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            canonical_service(
                &labels(&[("app", "a"), ("app.kubernetes.io/name", "b")]),
                "w"
            ),
            ("b".into(), "latest".into())
        );
        assert_eq!(
            canonical_service(
                &labels(&[
                    ("app", "a"),
                    ("version", "v2"),
                    ("service.istio.io/canonical-name", "c")
                ]),
                "w"
            ),
            ("c".into(), "v2".into())
        );
        assert_eq!(
            canonical_service(&Labels::new(), "w"),
            ("w".into(), "latest".into())
        );
    }
}
