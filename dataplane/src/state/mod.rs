//! The dataplane's view of the mesh: the workloads, services and
//! authorization policies the control plane sends over xDS, validated on
//! arrival and indexed for the questions the proxy asks per connection:
//! where does an outbound connection go ([`ProxyState::route`]), which local
//! workload is an inbound connection for ([`ProxyState::local_workload`]),
//! which policies apply ([`PolicyLookup`]).
//!
//! Boundaries: pure and synchronous — no I/O, no async, no locks. The xDS
//! client feeds resources in with `apply_*` and turns a returned error into a
//! NACK; the proxy wraps the state in whatever lock it likes. Routing needs
//! only `&self` (round-robin cursors are atomics), so many connections can
//! route under one read lock. Policies are compiled ([`policy`]) and indexed
//! here; evaluating them is `authz`'s job (which depends on this module, never
//! the other way).

mod address;
mod policies;
pub mod policy;
mod route;
mod service;
mod sync;
mod workload;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use meshbox_certs::SpiffeIdError;
use meshbox_proto::security::Authorization;
use meshbox_proto::workload::{Address, address::Type};
use tracing::{debug, warn};

pub use address::{GatewayAddress, GatewayTarget, HBONE_PORT, ip_from_bytes};
pub use policies::{PolicyLookup, PolicyStore};
pub use policy::{ConnectionInfo, Policy, PolicyError};
pub use route::{Route, RouteError, ServiceInfo, Transport, Upstream, direct};
pub use service::{HealthPolicy, IpFamilies, LbMode, LbScope, LoadBalancing, NetworkIp, Service};
pub use sync::{Applied, validator};
pub use workload::{HealthStatus, Locality, Protocol, Workload};

/// Why an xDS resource was rejected. The previous version of the resource (if
/// any) stays in effect; the xDS client reports this in its NACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("{field}: an address must be 4 or 16 bytes, got {len}")]
    AddressLength { field: &'static str, len: usize },
    #[error("{field}: prefix length {len} is longer than the address")]
    PrefixLength { field: &'static str, len: u32 },
    #[error("{field}: {value} is not a port")]
    Port { field: &'static str, value: u32 },
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field}: unknown or unsupported value {value}")]
    Enum { field: &'static str, value: i32 },
    #[error("service key {0:?} is not namespace/hostname")]
    ServiceKey(String),
    #[error("identity: {0}")]
    Identity(#[from] SpiffeIdError),
    #[error("authorization: {0}")]
    Policy(#[from] PolicyError),
}

/// What an Address resource name currently stands for, so a removal (which
/// carries only the name) finds what to take out.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AddressKey {
    Workload(String),
    Service(String),
}

/// A service plus its round-robin cursor. The cursor survives updates of the
/// service so a config push does not send the next connections to the same
/// endpoint again.
#[derive(Debug)]
struct ServiceEntry {
    service: Arc<Service>,
    cursor: AtomicUsize,
}

/// Everything the dataplane knows about the mesh.
#[derive(Debug, Default)]
pub struct ProxyState {
    /// Workloads by uid.
    workloads: HashMap<String, Arc<Workload>>,
    /// `(network, IP)` → uids claiming it, sorted. Usually one; several when
    /// IPs overlap, and then the best claim wins (see
    /// [`Workload::address_claim_rank`]).
    workloads_by_ip: HashMap<(String, IpAddr), Vec<String>>,
    /// Services by `{namespace}/{hostname}`.
    services: HashMap<String, ServiceEntry>,
    /// `(network, VIP)` → service keys sharing it, sorted.
    services_by_vip: HashMap<(String, IpAddr), Vec<String>>,
    /// Service key → uids of the workloads that list it. Kept independently
    /// of the service itself, so workloads that arrive before their service
    /// are endpoints as soon as it does.
    endpoints: HashMap<String, BTreeSet<String>>,
    /// Address resource name → what it holds.
    address_names: HashMap<String, AddressKey>,
    policies: PolicyStore,
}

impl ProxyState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one `istio.workload.Address` resource: `Some` adds or replaces
    /// it, `None` removes it.
    ///
    /// A malformed resource is rejected with a warning and the previous
    /// version under that name is kept, as a NACK in xDS means.
    pub fn apply_address(
        &mut self,
        name: &str,
        resource: Option<&Address>,
    ) -> Result<(), ResourceError> {
        let Some(resource) = resource else {
            self.remove_address(name);
            return Ok(());
        };
        let result = match &resource.r#type {
            Some(Type::Workload(w)) => Workload::from_proto(w).map(|w| self.put_workload(name, w)),
            Some(Type::Service(s)) => Service::from_proto(s).map(|s| self.put_service(name, s)),
            None => Err(ResourceError::Missing("address.type")),
        };
        if let Err(error) = &result {
            warn!(resource = %name, %error, "rejecting malformed Address resource; keeping the previous version");
        }
        result
    }

    /// Applies one `istio.security.Authorization` resource: `Some` adds or
    /// replaces it, `None` removes it. A malformed policy is rejected and the
    /// previous version kept.
    pub fn apply_authorization(
        &mut self,
        name: &str,
        resource: Option<&Authorization>,
    ) -> Result<(), ResourceError> {
        let Some(resource) = resource else {
            self.policies.remove(name);
            return Ok(());
        };
        match Policy::from_proto(name, resource) {
            Ok(policy) => {
                self.policies.insert(policy);
                Ok(())
            }
            Err(error) => {
                warn!(resource = %name, %error, "rejecting malformed Authorization resource; keeping the previous version");
                Err(error.into())
            }
        }
    }

    fn put_workload(&mut self, name: &str, w: Workload) {
        if w.uid != name {
            debug!(resource = %name, uid = %w.uid, "workload resource name differs from its uid");
        }
        let key = AddressKey::Workload(w.uid.clone());
        self.forget_other_key(name, &key);
        self.remove_workload(&w.uid);
        let w = Arc::new(w);
        if !w.host_network {
            for ip in &w.addresses {
                insert_sorted(
                    self.workloads_by_ip
                        .entry((w.network.clone(), *ip))
                        .or_default(),
                    &w.uid,
                );
            }
        }
        for svc in w.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone());
        }
        debug!(uid = %w.uid, addresses = ?w.addresses, "workload applied");
        self.workloads.insert(w.uid.clone(), w);
        self.address_names.insert(name.to_owned(), key);
    }

    fn put_service(&mut self, name: &str, s: Service) {
        let svc_key = s.key();
        if svc_key != name {
            debug!(resource = %name, service = %svc_key, "service resource name differs from namespace/hostname");
        }
        let key = AddressKey::Service(svc_key.clone());
        self.forget_other_key(name, &key);
        let cursor = self.remove_service(&svc_key).unwrap_or(0);
        for vip in &s.vips {
            insert_sorted(
                self.services_by_vip
                    .entry((vip.network.clone(), vip.ip))
                    .or_default(),
                &svc_key,
            );
        }
        debug!(service = %svc_key, vips = s.vips.len(), "service applied");
        self.services.insert(
            svc_key,
            ServiceEntry {
                service: Arc::new(s),
                cursor: AtomicUsize::new(cursor),
            },
        );
        self.address_names.insert(name.to_owned(), key);
    }

    /// A resource name that switches between workload and service (or to a
    /// different uid) must not leave the old object behind.
    fn forget_other_key(&mut self, name: &str, new: &AddressKey) {
        match self.address_names.get(name) {
            Some(old) if old != new => {
                let old = old.clone();
                self.remove_key(&old);
            }
            _ => {}
        }
    }

    fn remove_address(&mut self, name: &str) {
        let key = match self.address_names.remove(name) {
            Some(key) => key,
            // Never applied under this name (or already gone): fall back to the
            // naming convention, a uid for workloads and namespace/hostname for
            // services, so a removal is never silently lost.
            None if self.workloads.contains_key(name) => AddressKey::Workload(name.to_owned()),
            None if self.services.contains_key(name) => AddressKey::Service(name.to_owned()),
            None => {
                debug!(resource = %name, "removal of an unknown Address resource");
                return;
            }
        };
        debug!(resource = %name, "Address resource removed");
        self.remove_key(&key);
    }

    fn remove_key(&mut self, key: &AddressKey) {
        match key {
            AddressKey::Workload(uid) => self.remove_workload(uid),
            AddressKey::Service(svc) => {
                self.remove_service(svc);
            }
        }
    }

    fn remove_workload(&mut self, uid: &str) {
        let Some(old) = self.workloads.remove(uid) else {
            return;
        };
        if !old.host_network {
            for ip in &old.addresses {
                remove_from_index(&mut self.workloads_by_ip, &(old.network.clone(), *ip), uid);
            }
        }
        for svc in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
    }

    /// Removes a service, returning its round-robin cursor.
    fn remove_service(&mut self, key: &str) -> Option<usize> {
        let old = self.services.remove(key)?;
        for vip in &old.service.vips {
            remove_from_index(
                &mut self.services_by_vip,
                &(vip.network.clone(), vip.ip),
                key,
            );
        }
        Some(old.cursor.into_inner())
    }

    // ----- lookups -----

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload reached at `ip` in `network`, if any. Host-network
    /// workloads are never returned: their IP is the node's.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.best_claim(network, ip, |_| true)
    }

    /// The workload at `ip` in `network` that runs on `node`: the check an
    /// inbound connection's destination must pass before we serve it.
    pub fn local_workload(&self, network: &str, ip: IpAddr, node: &str) -> Option<&Arc<Workload>> {
        self.best_claim(network, ip, |w| w.node == node)
    }

    /// Whether `ip` belongs to a workload on `node`.
    pub fn is_local_workload_ip(&self, network: &str, ip: IpAddr, node: &str) -> bool {
        self.local_workload(network, ip, node).is_some()
    }

    fn best_claim(
        &self,
        network: &str,
        ip: IpAddr,
        keep: impl Fn(&Workload) -> bool,
    ) -> Option<&Arc<Workload>> {
        let uids = self
            .workloads_by_ip
            .get(&(network.to_owned(), ip.to_canonical()))?;
        // `uids` is sorted and `max_by_key` keeps the last maximum, so iterate
        // in reverse: ties then go to the smallest uid, deterministically.
        uids.iter()
            .rev()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| keep(w))
            .max_by_key(|w| w.address_claim_rank())
    }

    /// A service by `{namespace}/{hostname}`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key).map(|e| &e.service)
    }

    /// The service a client in `client_namespace` reaches at `vip`: among the
    /// services visible to it that share the VIP, one in the client's own
    /// namespace first, then a canonical one, then the smallest key.
    pub fn service_by_vip(
        &self,
        network: &str,
        vip: IpAddr,
        client_namespace: &str,
    ) -> Option<&Arc<Service>> {
        self.service_entry_by_vip(network, vip, client_namespace)
            .map(|e| &e.service)
    }

    /// Whether any service (visible to anyone) has `vip` in `network`.
    pub fn is_service_vip(&self, network: &str, vip: IpAddr) -> bool {
        self.services_by_vip
            .contains_key(&(network.to_owned(), vip.to_canonical()))
    }

    fn service_entry_by_vip(
        &self,
        network: &str,
        vip: IpAddr,
        client_namespace: &str,
    ) -> Option<&ServiceEntry> {
        let keys = self
            .services_by_vip
            .get(&(network.to_owned(), vip.to_canonical()))?;
        keys.iter()
            .rev()
            .filter_map(|k| self.services.get(k))
            .filter(|e| {
                let visible = e.service.visible_to(client_namespace);
                if !visible {
                    debug!(service = %e.service.hostname, client_namespace, "service not visible to the client's namespace");
                }
                visible
            })
            .max_by_key(|e| {
                (
                    e.service.namespace == client_namespace,
                    e.service.canonical,
                )
            })
    }

    /// The workloads that are endpoints of the service `key`, by uid order.
    pub fn endpoints(&self, key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid))
    }

    /// The known services a workload is an endpoint of (for telemetry).
    pub fn services_of<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Arc<Service>> {
        w.services.keys().filter_map(|k| self.service(k))
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values().map(|e| &e.service)
    }

    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }
}

impl PolicyLookup for ProxyState {
    fn policy(&self, key: &str) -> Option<&Policy> {
        self.policies.policy(key)
    }

    fn scoped_policies(&self, namespace: &str) -> Vec<&Policy> {
        self.policies.scoped_policies(namespace)
    }
}

fn insert_sorted(list: &mut Vec<String>, item: &str) {
    if let Err(at) = list.binary_search_by(|probe| probe.as_str().cmp(item)) {
        list.insert(at, item.to_owned());
    }
}

fn remove_from_index(
    index: &mut HashMap<(String, IpAddr), Vec<String>>,
    key: &(String, IpAddr),
    item: &str,
) {
    if let Some(list) = index.get_mut(key) {
        list.retain(|x| x != item);
        if list.is_empty() {
            index.remove(key);
        }
    }
}
