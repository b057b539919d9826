//! A workload (pod, VM entry) as the dataplane uses it: the xDS `Workload`
//! validated once on arrival, so routing and authorization never re-parse
//! bytes or strings on the connection path.

use std::collections::BTreeMap;
use std::net::IpAddr;

use meshbox_certs::SpiffeId;
use meshbox_proto::workload as pb;

use super::ResourceError;
use super::address::{GatewayAddress, parse_ip, parse_port};

/// Trust domain and service account Istio assumes when the control plane
/// leaves them empty.
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How a workload accepts mesh traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Plain TCP: the workload is not in the mesh (`TunnelProtocol::NONE`).
    Tcp,
    /// HBONE on port 15008 with mutual TLS.
    Hbone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
}

/// Where a workload runs, for locality-aware load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// A validated workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `{cluster}//Pod/{namespace}/{name}` for pods; the primary key.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// The identity its certificate carries.
    pub identity: SpiffeId,
    /// Its IPs (IPv4-mapped IPv6 already folded to IPv4).
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub node: String,
    pub protocol: Protocol,
    pub status: HealthStatus,
    /// Host-network pods share the node's IP, so their address says nothing
    /// about which pod is meant; they are not indexed by IP.
    pub host_network: bool,
    pub waypoint: Option<GatewayAddress>,
    /// Service key (`{namespace}/{hostname}`) → service port → target port,
    /// named target ports already resolved by the control plane.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `{namespace}/{name}` of the WORKLOAD_SELECTOR (and possibly other)
    /// policies that select this workload.
    pub authorization_policies: Vec<String>,
    pub locality: Locality,
    pub cluster_id: String,
    pub workload_name: String,
    pub canonical_name: String,
    pub canonical_revision: String,
}

impl Workload {
    /// Validates an xDS `Workload`. Any malformed part rejects the whole
    /// resource: indexing half a workload would route or authorize on a
    /// picture the control plane never sent.
    pub fn from_proto(w: &pb::Workload) -> Result<Self, ResourceError> {
        if w.uid.is_empty() {
            return Err(ResourceError::Missing("workload.uid"));
        }
        if w.namespace.is_empty() {
            return Err(ResourceError::Missing("workload.namespace"));
        }
        let trust_domain = non_empty_or(&w.trust_domain, DEFAULT_TRUST_DOMAIN);
        let service_account = non_empty_or(&w.service_account, DEFAULT_SERVICE_ACCOUNT);
        let identity = SpiffeId::new(trust_domain, &w.namespace, service_account)?;

        let addresses = w
            .addresses
            .iter()
            .map(|a| parse_ip("workload.addresses", a))
            .collect::<Result<Vec<_>, _>>()?;

        let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::None) => Protocol::Tcp,
            Ok(pb::TunnelProtocol::Hbone) => Protocol::Hbone,
            // Istio's sidecar mTLS is not something this proxy speaks; sending
            // plaintext to a workload that expects mTLS would be wrong.
            Ok(pb::TunnelProtocol::LegacyIstioMtls) | Err(_) => {
                return Err(ResourceError::Enum {
                    field: "workload.tunnel_protocol",
                    value: w.tunnel_protocol,
                });
            }
        };
        let status = match pb::WorkloadStatus::try_from(w.status) {
            Ok(pb::WorkloadStatus::Healthy) => HealthStatus::Healthy,
            Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
            Err(_) => {
                return Err(ResourceError::Enum {
                    field: "workload.status",
                    value: w.status,
                });
            }
        };
        let host_network = match pb::NetworkMode::try_from(w.network_mode) {
            Ok(pb::NetworkMode::Standard) => false,
            Ok(pb::NetworkMode::HostNetwork) => true,
            Err(_) => {
                return Err(ResourceError::Enum {
                    field: "workload.network_mode",
                    value: w.network_mode,
                });
            }
        };
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|g| GatewayAddress::from_proto("workload.waypoint", g))
            .transpose()?;

        let mut services = BTreeMap::new();
        for (key, list) in &w.services {
            if !is_service_key(key) {
                return Err(ResourceError::ServiceKey(key.clone()));
            }
            let mut ports = BTreeMap::new();
            for p in &list.ports {
                let service_port = parse_port("workload.services.service_port", p.service_port)?;
                let target_port = parse_port("workload.services.target_port", p.target_port)?;
                // 0 means "not resolved for this workload"; leaving it out
                // lets routing fall back to the service's own target port.
                if target_port != 0 {
                    ports.insert(service_port, target_port);
                }
            }
            services.insert(key.clone(), ports);
        }

        let locality = w
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            })
            .unwrap_or_default();

        Ok(Self {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity,
            addresses,
            network: w.network.clone(),
            node: w.node.clone(),
            protocol,
            status,
            host_network,
            waypoint,
            services,
            authorization_policies: w.authorization_policies.clone(),
            locality,
            cluster_id: w.cluster_id.clone(),
            workload_name: w.workload_name.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
        })
    }

    /// Ranking among workloads that claim the same IP (host network aside,
    /// this happens with VM entries or stale pods). Pods are preferred because
    /// their IPs come from the cluster and are hard to spoof, then workloads
    /// in the mesh because they carry more context.
    pub(super) fn address_claim_rank(&self) -> u8 {
        let is_pod = self.uid.contains("//Pod/");
        let is_hbone = self.protocol == Protocol::Hbone;
        u8::from(is_pod) * 2 + u8::from(is_hbone)
    }
}

fn non_empty_or<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

/// `{namespace}/{hostname}`. The hostname must be there; the namespace may be
/// empty, as Istio allows for services that belong to no namespace.
pub(super) fn is_service_key(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(_, host)| !host.is_empty())
}
