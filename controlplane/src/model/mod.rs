//! The mesh model ("the index"): a pure, synchronous state machine that takes
//! Kubernetes objects (add/update/delete, or a whole relist) and keeps the
//! Istio workload-API resources derived from them — `istio.workload.Address`
//! (Workload or Service) and `istio.security.Authorization` — and meshbox's
//! waypoint resources (`meshbox.v1.WaypointPolicy`, `WaypointRoute`),
//! together with per-object problems ("statuses") for people to read.
//!
//! It never talks to an API server and never blocks, so it is tested by
//! feeding objects and asserting outputs, in the manner of linkerd2's
//! policy-controller index.
//!
//! How updates stay cheap: every input is first reduced to the fields the
//! model reads (so status-only churn on a pod is a no-op), the reverse
//! dependencies (service → selected pods, policy → selected pods, waypoint →
//! users, IP → pods, label → pods) are kept in indexes, and an event only
//! marks the derived resources it can affect as dirty (policies and routes
//! are rebuilt after the workloads and services they depend on, which mark
//! them). Dirty resources are rebuilt once per operation and compared with what was served before, so
//! [`Changes`] lists exactly the resources whose value really changed.

mod namespace;
mod peer_authentication;
mod policy;
mod route;
mod selector;
mod service;
mod waypoint;
mod waypoint_policy;
mod workload;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshbox_certs::SpiffeId;
use meshbox_proto::meshbox::{WaypointPolicy, WaypointRoute};
use meshbox_proto::security::Authorization;
use meshbox_proto::workload::Address;
use serde::Serialize;

use self::namespace::NamespaceState;
use self::peer_authentication::PeerAuthState;
use self::policy::PolicyState;
use self::route::RouteState;
use self::selector::PairIndex;
use self::service::{ServiceState, SliceState};
use self::waypoint::{GatewayDerived, GatewayState};
use self::workload::{PodDerived, PodState};

pub use self::peer_authentication::{CONVERTED_PREFIX, STATIC_STRICT_POLICY};
pub use self::policy::{TranslatedPolicy, translate_policy};
pub use self::route::{
    CheckedBackend, CheckedMatch, CheckedRule, HeaderModifier, HeaderSetting, MatchKind, PathMatch,
    RouteInfo, RouteParentInfo, RuleOutcome, Timeouts, ValueMatch, parse_duration_ms,
};
pub use self::waypoint::WaypointFor;

/// Mesh-wide settings that shape every derived resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// Cluster name used in workload uids (`{cluster_id}//Pod/{ns}/{name}`).
    pub cluster_id: String,
    /// Trust domain of workload identities.
    pub trust_domain: String,
    /// DNS suffix of service hostnames (`{name}.{ns}.svc.{cluster_domain}`).
    pub cluster_domain: String,
    /// Namespace whose selector-less policies apply to the whole mesh.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".to_string(),
            trust_domain: "cluster.local".to_string(),
            cluster_domain: "cluster.local".to_string(),
            root_namespace: "istio-system".to_string(),
        }
    }
}

/// A Kubernetes object the model reads.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // transient values; boxing buys nothing
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Gateway(crate::k8s::Gateway),
    AuthorizationPolicy(crate::k8s::AuthorizationPolicy),
    PeerAuthentication(crate::k8s::PeerAuthentication),
    HttpRoute(crate::k8s::HttpRoute),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Gateway(_) => Kind::Gateway,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::HttpRoute(_) => Kind::HttpRoute,
        }
    }

    /// The key of this object, or `None` when it has no name. A namespaced
    /// object without a namespace lands in `default`, as `kubectl apply`
    /// would put it.
    pub fn key(&self) -> Option<ObjectKey> {
        let meta = match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
        };
        ObjectKey::from_meta(self.kind(), meta)
    }
}

/// Kinds of objects the model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    Gateway,
    AuthorizationPolicy,
    PeerAuthentication,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Gateway => "Gateway",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::HttpRoute => "HTTPRoute",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies an input object: kind, namespace (empty for `Namespace`
/// objects) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = if kind == Kind::Namespace {
            String::new()
        } else {
            namespace.into()
        };
        Self {
            kind,
            namespace,
            name: name.into(),
        }
    }

    pub fn namespace(name: impl Into<String>) -> Self {
        Self::new(Kind::Namespace, "", name)
    }

    pub fn pod(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::Pod, namespace, name)
    }

    pub fn service(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::Service, namespace, name)
    }

    pub fn endpoint_slice(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::EndpointSlice, namespace, name)
    }

    pub fn gateway(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::Gateway, namespace, name)
    }

    pub fn authorization_policy(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::AuthorizationPolicy, namespace, name)
    }

    pub fn peer_authentication(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::PeerAuthentication, namespace, name)
    }

    pub fn http_route(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(Kind::HttpRoute, namespace, name)
    }

    fn from_meta(kind: Kind, meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
        let namespace = match kind {
            Kind::Namespace => "",
            _ => meta
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or("default"),
        };
        Some(Self::new(kind, namespace, name))
    }

    fn nsname(&self) -> Key {
        Key::new(&self.namespace, &self.name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What one operation changed in the served resources. `Some` = created or
/// updated, `None` = removed. Only resources whose value really changed are
/// listed, so a no-op update yields empty maps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    pub addresses: BTreeMap<String, Option<Arc<Address>>>,
    pub authorizations: BTreeMap<String, Option<Arc<Authorization>>>,
    /// `meshbox.v1.WaypointPolicy`, for waypoints.
    pub waypoint_policies: BTreeMap<String, Option<Arc<WaypointPolicy>>>,
    /// `meshbox.v1.WaypointRoute`, for waypoints.
    pub waypoint_routes: BTreeMap<String, Option<Arc<WaypointRoute>>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
            && self.authorizations.is_empty()
            && self.waypoint_policies.is_empty()
            && self.waypoint_routes.is_empty()
    }
}

/// A problem with one input object, for people (REST API, logs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectStatus {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub message: String,
}

/// A Gateway recognised as a waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaypointInfo {
    pub namespace: String,
    pub name: String,
    /// `gatewayClassName`.
    pub class: String,
    /// What traffic it serves (`istio.io/waypoint-for`).
    #[serde(rename = "for")]
    pub traffic_type: WaypointFor,
    /// Where dataplanes reach it: the hostname of its Service, or the
    /// addresses from the Gateway's status. Empty while it has none.
    pub addresses: Vec<String>,
    /// The HTTPRoutes (`namespace/name`) sent to it.
    pub routes: Vec<String>,
    /// The AuthorizationPolicies (`namespace/name`) sent to it.
    pub policies: Vec<String>,
}

/// Namespace + name, the key of every namespaced input.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    ns: String,
    name: String,
}

impl Key {
    fn new(ns: &str, name: &str) -> Self {
        Self {
            ns: ns.to_string(),
            name: name.to_string(),
        }
    }
}

impl Key {
    /// `{ns}/{name}`, as `to_string` writes it, without the formatting
    /// machinery (names are built for every workload of a build).
    fn slash_name(&self) -> String {
        concat(&[&self.ns, "/", &self.name])
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

/// The parts joined into one string, allocated once: `format!` costs
/// several times more, and the model builds a few names per workload.
fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// 4 or 16 bytes, as the workload API wants addresses.
fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Something whose derived state depends on a waypoint Gateway.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Dependent {
    Pod(Key),
    Service(Key),
    Namespace(String),
}

/// Derived resources that must be rebuilt before the operation ends.
#[derive(Default)]
struct Dirty {
    pods: HashSet<Key>,
    services: HashSet<Key>,
    namespaces: HashSet<String>,
    gateways: HashSet<Key>,
    /// Rebuilt after pods: what a policy sends depends on its workloads.
    policies: HashSet<Key>,
    /// Rebuilt last: a route depends on Services and their waypoints.
    routes: HashSet<Key>,
}

/// Each resource the current operation wrote: the value it had before (so
/// the operation reports net changes even when a resource is rebuilt twice)
/// and the value it has now (so reporting needs no second lookup in the
/// served map, a search through long, shared-prefix names).
#[derive(Default)]
struct Touched {
    addresses: TouchedMap<Address>,
    authorizations: TouchedMap<Authorization>,
    waypoint_policies: TouchedMap<WaypointPolicy>,
    waypoint_routes: TouchedMap<WaypointRoute>,
}

/// name → (before, now).
type TouchedMap<T> = HashMap<String, (Option<Arc<T>>, Option<Arc<T>>)>;

/// The mesh model. See the module documentation.
pub struct MeshIndex {
    config: MeshConfig,

    // Inputs, reduced to what the model reads.
    namespaces: HashMap<String, NamespaceState>,
    pods: HashMap<Key, PodState>,
    services: HashMap<Key, ServiceState>,
    slices: HashMap<Key, SliceState>,
    gateways: HashMap<Key, GatewayState>,
    policies: HashMap<Key, PolicyState>,
    peer_auths: HashMap<Key, PeerAuthState>,
    routes: HashMap<Key, RouteState>,

    // Indexes over inputs.
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    services_by_ns: HashMap<String, BTreeSet<String>>,
    /// Pod labels: ns → key → value → pod names.
    pod_labels: PairIndex,
    /// Service selectors, each under its first (key, value) pair: a pod can
    /// only match a selector if it carries that pair.
    service_selectors: PairIndex,
    /// Selector policies, indexed like `service_selectors`.
    policy_selectors: PairIndex,
    /// Selector-less (namespace-wide) policies that produce a resource.
    namespace_policies: HashMap<String, BTreeSet<String>>,
    peer_auths_by_ns: HashMap<String, BTreeSet<String>>,
    /// Service → the HTTPRoutes attached to it (whether or not it exists).
    routes_by_service: HashMap<Key, BTreeSet<Key>>,
    /// Service → the HTTPRoutes that name it as a backend.
    routes_by_backend: HashMap<Key, BTreeSet<Key>>,
    /// Gateway → the policies whose targetRefs name it.
    policies_by_gateway: HashMap<Key, BTreeSet<Key>>,
    /// Service → the policies whose targetRefs name it.
    policies_by_service: HashMap<Key, BTreeSet<Key>>,
    /// Policies whose targetRefs name a GatewayClass (any waypoint's change
    /// can move them).
    class_policies: BTreeSet<Key>,
    pods_by_ip: HashMap<IpAddr, BTreeSet<Key>>,
    services_by_vip: HashMap<IpAddr, BTreeSet<Key>>,
    /// node → identity → number of pods holding it there.
    identities_by_node: HashMap<String, HashMap<SpiffeId, usize>>,
    slices_by_service: HashMap<Key, BTreeSet<Key>>,
    slices_by_pod: HashMap<Key, BTreeSet<Key>>,
    slices_by_ip: HashMap<IpAddr, BTreeSet<Key>>,

    // Reverse dependencies recorded while deriving.
    pod_derived: HashMap<Key, PodDerived>,
    service_members: HashMap<Key, BTreeSet<Key>>,
    policy_members: HashMap<Key, BTreeSet<Key>>,
    service_waypoint: HashMap<Key, Key>,
    namespace_waypoint: HashMap<String, Key>,
    gateway_derived: HashMap<Key, GatewayDerived>,
    waypoint_dependents: HashMap<Key, BTreeSet<Dependent>>,

    // Outputs.
    addresses: BTreeMap<String, Arc<Address>>,
    authorizations: BTreeMap<String, Arc<Authorization>>,
    waypoint_policies: BTreeMap<String, Arc<WaypointPolicy>>,
    waypoint_routes: BTreeMap<String, Arc<WaypointRoute>>,
    statuses: BTreeMap<ObjectKey, Vec<String>>,

    dirty: Dirty,
    touched: Touched,
}

impl MeshIndex {
    pub fn new(config: MeshConfig) -> Self {
        Self {
            config,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            gateways: HashMap::new(),
            policies: HashMap::new(),
            peer_auths: HashMap::new(),
            routes: HashMap::new(),
            pods_by_ns: HashMap::new(),
            services_by_ns: HashMap::new(),
            pod_labels: PairIndex::default(),
            service_selectors: PairIndex::default(),
            policy_selectors: PairIndex::default(),
            namespace_policies: HashMap::new(),
            peer_auths_by_ns: HashMap::new(),
            routes_by_service: HashMap::new(),
            routes_by_backend: HashMap::new(),
            policies_by_gateway: HashMap::new(),
            policies_by_service: HashMap::new(),
            class_policies: BTreeSet::new(),
            pods_by_ip: HashMap::new(),
            services_by_vip: HashMap::new(),
            identities_by_node: HashMap::new(),
            slices_by_service: HashMap::new(),
            slices_by_pod: HashMap::new(),
            slices_by_ip: HashMap::new(),
            pod_derived: HashMap::new(),
            service_members: HashMap::new(),
            policy_members: HashMap::new(),
            service_waypoint: HashMap::new(),
            namespace_waypoint: HashMap::new(),
            gateway_derived: HashMap::new(),
            waypoint_dependents: HashMap::new(),
            addresses: BTreeMap::new(),
            authorizations: BTreeMap::new(),
            waypoint_policies: BTreeMap::new(),
            waypoint_routes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            dirty: Dirty::default(),
            touched: Touched::default(),
        }
    }

    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// Adds or updates one object.
    pub fn apply(&mut self, obj: Object) -> Changes {
        self.ingest(obj);
        self.flush()
    }

    /// Removes one object. Unknown keys are a no-op.
    pub fn delete(&mut self, key: ObjectKey) -> Changes {
        self.ingest_delete(&key);
        self.flush()
    }

    /// Makes `objs` the complete set of inputs (a relist, or a whole manifest
    /// folder): objects not in it are deleted, the rest applied, and the
    /// result reported as one set of changes.
    pub fn replace_all(&mut self, objs: Vec<Object>) -> Changes {
        self.replace_where(|_| true, objs)
    }

    /// Makes `objs` the complete set of objects of one kind (the relist of
    /// a single watch), leaving other kinds alone. Objects of another kind
    /// in `objs` are ignored.
    pub fn replace_kind(&mut self, kind: Kind, objs: Vec<Object>) -> Changes {
        let objs = objs.into_iter().filter(|o| o.kind() == kind).collect();
        self.replace_where(|k| k.kind == kind, objs)
    }

    fn replace_where(
        &mut self,
        in_scope: impl Fn(&ObjectKey) -> bool,
        objs: Vec<Object>,
    ) -> Changes {
        let existing: Vec<ObjectKey> = self
            .object_keys()
            .into_iter()
            .filter(|k| in_scope(k))
            .collect();
        // Only what already exists can be stale: the first build (the
        // largest relist) skips the set of every incoming key.
        let stale: Vec<ObjectKey> = if existing.is_empty() {
            Vec::new()
        } else {
            let keep: HashSet<ObjectKey> = objs.iter().filter_map(Object::key).collect();
            existing.into_iter().filter(|k| !keep.contains(k)).collect()
        };
        for key in &stale {
            self.ingest_delete(key);
        }
        self.reserve_for(&objs);
        for obj in objs {
            self.ingest(obj);
        }
        self.flush()
    }

    /// Sizes the largest per-object maps for a relist of `objs` up front:
    /// grown one doubling at a time, each would rehash (and so re-read
    /// every key string, a cache miss apiece) about once more in total.
    /// Capacity only: what they hold, and so every output, is unchanged.
    fn reserve_for(&mut self, objs: &[Object]) {
        let count = |kind: Kind| objs.iter().filter(|o| o.kind() == kind).count();
        let (pods, services) = (count(Kind::Pod), count(Kind::Service));
        let more = |have: usize, want: usize| want.saturating_sub(have);
        self.pods.reserve(more(self.pods.len(), pods));
        self.pod_derived.reserve(more(self.pod_derived.len(), pods));
        self.pods_by_ip.reserve(more(self.pods_by_ip.len(), pods));
        self.dirty.pods.reserve(pods);
        self.services.reserve(more(self.services.len(), services));
        self.service_members
            .reserve(more(self.service_members.len(), services));
        self.services_by_vip
            .reserve(more(self.services_by_vip.len(), services));
        self.dirty.services.reserve(services);
        if self.addresses.is_empty() {
            // The first build writes every address; a later relist may
            // write none, and this map lives only until the flush.
            self.touched.addresses.reserve(pods + services);
        }
    }

    /// Every served `Address`, sorted by resource name.
    pub fn addresses(&self) -> impl Iterator<Item = (&str, &Arc<Address>)> {
        self.addresses.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Every served `Authorization`, sorted by resource name.
    pub fn authorizations(&self) -> impl Iterator<Item = (&str, &Arc<Authorization>)> {
        self.authorizations.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn address(&self, name: &str) -> Option<Arc<Address>> {
        self.addresses.get(name).cloned()
    }

    pub fn authorization(&self, name: &str) -> Option<Arc<Authorization>> {
        self.authorizations.get(name).cloned()
    }

    /// Resource names of the workloads with this IP and the services with
    /// this VIP (xDS on-demand lookups by address), sorted. Host-network
    /// workloads are left out: their IP is the node's, and dataplanes do not
    /// look them up by address either.
    pub fn lookup_ip(&self, ip: IpAddr) -> Vec<String> {
        let mut out = BTreeSet::new();
        for key in self.pods_by_ip.get(&ip).into_iter().flatten() {
            if self.pods.get(key).is_some_and(|p| !p.host_network) {
                let uid = self.workload_uid(key);
                if self.addresses.contains_key(&uid) {
                    out.insert(uid);
                }
            }
        }
        for key in self.services_by_vip.get(&ip).into_iter().flatten() {
            let name = self.service_resource_name(key);
            if self.addresses.contains_key(&name) {
                out.insert(name);
            }
        }
        out.into_iter().collect()
    }

    /// Whether a pod scheduled on `node` runs as `identity`. Every pod with
    /// a node counts, enrolled or not, until it has finished (phase
    /// Succeeded/Failed): a node proxy asks for a pod's certificate while
    /// the pod is still starting.
    pub fn has_identity_on_node(&self, node: &str, identity: &SpiffeId) -> bool {
        self.identities_by_node
            .get(node)
            .is_some_and(|ids| ids.contains_key(identity))
    }

    /// A pod's node and whether it is enrolled, known as soon as the pod is
    /// scheduled — before it has an IP, and so before it is a workload. The
    /// node agent asks this when the CNI plugin reports a new sandbox.
    pub fn pod_enrollment(&self, namespace: &str, name: &str) -> Option<(&str, bool)> {
        let pod = self.pods.get(&Key::new(namespace, name))?;
        Some((
            pod.node.as_str(),
            pod.enrolled(self.namespace_labels(namespace)),
        ))
    }

    /// Problems with input objects, sorted.
    pub fn statuses(&self) -> Vec<ObjectStatus> {
        let mut out: Vec<ObjectStatus> = self
            .statuses
            .iter()
            .flat_map(|(key, msgs)| {
                msgs.iter().map(move |m| ObjectStatus {
                    kind: key.kind,
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    message: m.clone(),
                })
            })
            .chain(self.route_statuses().flat_map(|(key, msgs)| {
                msgs.into_iter().map(move |message| ObjectStatus {
                    kind: key.kind,
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    message,
                })
            }))
            .collect();
        out.sort();
        out
    }

    // ---- operation plumbing ----

    fn ingest(&mut self, obj: Object) {
        let Some(key) = obj.key() else {
            tracing::warn!("ignoring an object without metadata.name");
            return;
        };
        let nsname = key.nsname();
        match obj {
            Object::Namespace(o) => self.ingest_namespace(&key.name, &o),
            Object::Pod(o) => self.ingest_pod(nsname, o),
            Object::Service(o) => self.ingest_service(nsname, &o),
            Object::EndpointSlice(o) => self.ingest_slice(nsname, &o),
            Object::Gateway(o) => self.ingest_gateway(nsname, &o),
            Object::AuthorizationPolicy(o) => self.ingest_policy(nsname, &o),
            Object::PeerAuthentication(o) => self.ingest_peer_authentication(nsname, &o),
            Object::HttpRoute(o) => self.ingest_route(nsname, &o),
        }
    }

    fn ingest_delete(&mut self, key: &ObjectKey) {
        let nsname = key.nsname();
        match key.kind {
            Kind::Namespace => self.remove_namespace(&key.name),
            Kind::Pod => self.remove_pod(&nsname),
            Kind::Service => self.remove_service(&nsname),
            Kind::EndpointSlice => self.remove_slice(&nsname),
            Kind::Gateway => self.remove_gateway(&nsname),
            Kind::AuthorizationPolicy => self.remove_policy(&nsname),
            Kind::PeerAuthentication => self.remove_peer_authentication(&nsname),
            Kind::HttpRoute => self.remove_route(&nsname),
        }
    }

    fn object_keys(&self) -> Vec<ObjectKey> {
        let namespaced = |kind: Kind, keys: &mut dyn Iterator<Item = &Key>| -> Vec<ObjectKey> {
            keys.map(|k| ObjectKey::new(kind, &k.ns, &k.name)).collect()
        };
        let mut out: Vec<ObjectKey> = self.namespaces.keys().map(ObjectKey::namespace).collect();
        out.extend(namespaced(Kind::Pod, &mut self.pods.keys()));
        out.extend(namespaced(Kind::Service, &mut self.services.keys()));
        out.extend(namespaced(Kind::EndpointSlice, &mut self.slices.keys()));
        out.extend(namespaced(Kind::Gateway, &mut self.gateways.keys()));
        out.extend(namespaced(
            Kind::AuthorizationPolicy,
            &mut self.policies.keys(),
        ));
        out.extend(namespaced(
            Kind::PeerAuthentication,
            &mut self.peer_auths.keys(),
        ));
        out.extend(namespaced(Kind::HttpRoute, &mut self.routes.keys()));
        out
    }

    /// Rebuilds everything marked dirty and reports the net changes.
    fn flush(&mut self) -> Changes {
        // Gateways go first: rebuilding one marks the pods, services and
        // namespaces that use it.
        let gateways: Vec<Key> = self.dirty.gateways.drain().collect();
        for key in gateways {
            self.recompute_gateway(&key);
        }
        let namespaces: Vec<String> = self.dirty.namespaces.drain().collect();
        for ns in namespaces {
            self.recompute_namespace(&ns);
        }
        let services: Vec<Key> = self.dirty.services.drain().collect();
        for key in services {
            self.recompute_service(&key);
        }
        let pods: Vec<Key> = self.dirty.pods.drain().collect();
        for key in pods {
            self.recompute_pod(&key);
        }
        let policies: Vec<Key> = self.dirty.policies.drain().collect();
        for key in policies {
            self.recompute_policy(&key);
        }
        let routes: Vec<Key> = self.dirty.routes.drain().collect();
        for key in routes {
            self.recompute_route(&key);
        }
        debug_assert!(
            self.dirty.pods.is_empty()
                && self.dirty.services.is_empty()
                && self.dirty.namespaces.is_empty()
                && self.dirty.gateways.is_empty()
                && self.dirty.policies.is_empty()
                && self.dirty.routes.is_empty(),
            "rebuilding must not mark more work"
        );

        Changes {
            addresses: net_changes(std::mem::take(&mut self.touched.addresses)),
            authorizations: net_changes(std::mem::take(&mut self.touched.authorizations)),
            waypoint_policies: net_changes(std::mem::take(&mut self.touched.waypoint_policies)),
            waypoint_routes: net_changes(std::mem::take(&mut self.touched.waypoint_routes)),
        }
    }

    fn put_address(&mut self, name: String, value: Option<Address>) {
        put(
            &mut self.addresses,
            &mut self.touched.addresses,
            name,
            value,
        );
    }

    fn put_authorization(&mut self, name: String, value: Option<Authorization>) {
        put(
            &mut self.authorizations,
            &mut self.touched.authorizations,
            name,
            value,
        );
    }

    fn put_waypoint_policy(&mut self, name: String, value: Option<WaypointPolicy>) {
        put(
            &mut self.waypoint_policies,
            &mut self.touched.waypoint_policies,
            name,
            value,
        );
    }

    fn put_waypoint_route(&mut self, name: String, value: Option<WaypointRoute>) {
        put(
            &mut self.waypoint_routes,
            &mut self.touched.waypoint_routes,
            name,
            value,
        );
    }

    fn set_status(&mut self, key: ObjectKey, messages: Vec<String>) {
        if messages.is_empty() {
            self.statuses.remove(&key);
        } else {
            self.statuses.insert(key, messages);
        }
    }

    /// Moves `dependent` from the waypoint it used to the one it uses now.
    fn set_waypoint_dependency(
        &mut self,
        dependent: Dependent,
        old: Option<Key>,
        new: Option<&Key>,
    ) {
        if old.as_ref() == new {
            return;
        }
        if let Some(old) = old
            && let Some(set) = self.waypoint_dependents.get_mut(&old)
        {
            set.remove(&dependent);
            if set.is_empty() {
                self.waypoint_dependents.remove(&old);
            }
        }
        if let Some(new) = new {
            index_insert(&mut self.waypoint_dependents, new, dependent);
        }
    }

    fn workload_uid(&self, key: &Key) -> String {
        concat(&[&self.config.cluster_id, "//Pod/", &key.ns, "/", &key.name])
    }

    fn service_hostname(&self, key: &Key) -> String {
        concat(&[
            &key.name,
            ".",
            &key.ns,
            ".svc.",
            &self.config.cluster_domain,
        ])
    }

    fn service_resource_name(&self, key: &Key) -> String {
        concat(&[
            &key.ns,
            "/",
            &key.name,
            ".",
            &key.ns,
            ".svc.",
            &self.config.cluster_domain,
        ])
    }

    fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns).map(|n| &n.labels)
    }
}

/// Adds `item` to the set under `key`, creating it when missing (and
/// cloning the key only then: these run for every pod event).
fn index_insert<K, V>(map: &mut HashMap<K, BTreeSet<V>>, key: &K, item: V)
where
    K: std::hash::Hash + Eq + Clone,
    V: Ord,
{
    match map.get_mut(key) {
        Some(set) => {
            set.insert(item);
        }
        None => {
            map.insert(key.clone(), BTreeSet::from([item]));
        }
    }
}

/// Removes `item` from the set under `key`, dropping the set when empty so
/// the indexes do not grow with churn.
fn index_remove<K, V, Q>(map: &mut HashMap<K, BTreeSet<V>>, key: &Q, item: &V)
where
    K: std::hash::Hash + Eq + std::borrow::Borrow<Q>,
    Q: std::hash::Hash + Eq + ?Sized,
    V: Ord,
{
    if let Some(set) = map.get_mut(key) {
        set.remove(item);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// Sets (`Some`) or removes (`None`) one served resource and records the
/// write in `touched`. An unchanged value is not a write. One search of
/// `served` per call: a full build writes every resource once.
fn put<T: PartialEq>(
    served: &mut BTreeMap<String, Arc<T>>,
    touched: &mut TouchedMap<T>,
    name: String,
    value: Option<T>,
) {
    use std::collections::btree_map::Entry;
    let (name, before, now) = match (served.entry(name), value) {
        (Entry::Occupied(o), Some(v)) => {
            if **o.get() == v {
                return;
            }
            let name = o.key().clone();
            let now = Arc::new(v);
            let before = std::mem::replace(o.into_mut(), now.clone());
            (name, Some(before), Some(now))
        }
        (Entry::Occupied(o), None) => {
            let (name, before) = o.remove_entry();
            (name, Some(before), None)
        }
        (Entry::Vacant(slot), Some(v)) => {
            let name = slot.key().clone();
            let now = Arc::new(v);
            slot.insert(now.clone());
            (name, None, Some(now))
        }
        (Entry::Vacant(_), None) => return,
    };
    touched
        .entry(name)
        .and_modify(|(_, n)| *n = now.clone())
        .or_insert((before, now));
}

/// The resources whose value an operation really changed, from what it
/// wrote.
fn net_changes<T: PartialEq>(touched: TouchedMap<T>) -> BTreeMap<String, Option<Arc<T>>> {
    let mut changed: Vec<(String, Option<Arc<T>>)> = touched
        .into_iter()
        .filter(|(_, (before, now))| before != now)
        .map(|(name, (_, now))| (name, now))
        .collect();
    // Sorted, the map is built in one pass instead of one search per
    // resource (a full build changes every one).
    changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    changed.into_iter().collect()
}
