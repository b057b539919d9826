//! A service as the dataplane uses it: the xDS `Service` validated once on
//! arrival. Its endpoints are not part of it: they are the workloads whose
//! `services` map names it, indexed by [`super::ProxyState`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use meshbox_certs::SpiffeId;
use meshbox_proto::workload as pb;
use tracing::warn;

use super::ResourceError;
use super::address::{GatewayAddress, parse_ip, parse_port};

/// How connections to the service's VIP are spread over its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    /// Round-robin over every eligible endpoint.
    #[default]
    Standard,
    /// Only endpoints matching the source on every routing preference.
    Strict,
    /// The endpoints matching the source on the longest prefix of the routing
    /// preferences; the others only when none match better.
    Failover,
    /// Not load balanced by the mesh: connect to the original address.
    Passthrough,
}

/// A locality dimension a routing preference compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthPolicy {
    /// Unhealthy endpoints are skipped.
    #[default]
    OnlyHealthy,
    /// Every endpoint is used, whatever its health.
    AllowAll,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancing {
    pub mode: LbMode,
    pub routing_preference: Vec<LbScope>,
    pub health_policy: HealthPolicy,
}

/// Which endpoint IPs a service may be reached on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamilies {
    #[default]
    Any,
    Ipv4Only,
    Ipv6Only,
}

impl IpFamilies {
    pub fn accepts(self, ip: &IpAddr) -> bool {
        match self {
            Self::Any => true,
            Self::Ipv4Only => ip.is_ipv4(),
            Self::Ipv6Only => ip.is_ipv6(),
        }
    }
}

/// A VIP in a network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkIp {
    pub network: String,
    pub ip: IpAddr,
}

/// A validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkIp>,
    /// Service port → target port; 0 means a named target port, resolved per
    /// endpoint in the workload's `services` map.
    pub ports: BTreeMap<u16, u16>,
    /// Identities the endpoints may present besides their own.
    pub subject_alt_names: Vec<SpiffeId>,
    pub waypoint: Option<GatewayAddress>,
    pub load_balancing: LoadBalancing,
    pub ip_families: IpFamilies,
    /// Visible only to clients in its own namespace.
    pub namespace_local: bool,
    /// Preferred when several services share a VIP.
    pub canonical: bool,
}

impl Service {
    /// `{namespace}/{hostname}`: the xDS resource name and the key workloads
    /// use in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Whether a client in `namespace` may route to this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        !self.namespace_local || self.namespace == namespace
    }

    /// Validates an xDS `Service`; any malformed part rejects the resource.
    pub fn from_proto(s: &pb::Service) -> Result<Self, ResourceError> {
        if s.hostname.is_empty() {
            return Err(ResourceError::Missing("service.hostname"));
        }
        let mut vips = Vec::new();
        for a in &s.addresses {
            let ip = parse_ip("service.addresses", &a.address)?;
            let full = if ip.is_ipv4() { 32 } else { 128 };
            match a.length {
                None => {}
                Some(l) if l == full => {}
                // A CIDR VIP (ServiceEntry address ranges). Not supported:
                // the range is ignored rather than the whole service, so the
                // service stays reachable by its exact VIPs and its hostname.
                Some(l) if l < full => {
                    warn!(
                        service = %s.hostname,
                        vip = %ip,
                        prefix_len = l,
                        "CIDR service addresses are not supported; ignoring this one"
                    );
                    continue;
                }
                Some(l) => {
                    return Err(ResourceError::PrefixLength {
                        field: "service.addresses",
                        len: l,
                    });
                }
            }
            vips.push(NetworkIp {
                network: a.network.clone(),
                ip,
            });
        }

        let mut ports = BTreeMap::new();
        for p in &s.ports {
            ports.insert(
                parse_port("service.ports.service_port", p.service_port)?,
                parse_port("service.ports.target_port", p.target_port)?,
            );
        }

        // A bad SAN only narrows who may answer for the service (the endpoint's
        // own identity is always accepted), so it is dropped, not fatal.
        let subject_alt_names = s
            .subject_alt_names
            .iter()
            .filter_map(|san| match san.parse::<SpiffeId>() {
                Ok(id) => Some(id),
                Err(error) => {
                    warn!(service = %s.hostname, san = %san, %error, "ignoring invalid subject alt name");
                    None
                }
            })
            .collect();

        let waypoint = s
            .waypoint
            .as_ref()
            .map(|g| GatewayAddress::from_proto("service.waypoint", g))
            .transpose()?;
        let load_balancing = s
            .load_balancing
            .as_ref()
            .map(load_balancing)
            .transpose()?
            .unwrap_or_default();
        let ip_families = match pb::IpFamilies::try_from(s.ip_families) {
            Ok(pb::IpFamilies::Automatic | pb::IpFamilies::Dual) => IpFamilies::Any,
            Ok(pb::IpFamilies::Ipv4Only) => IpFamilies::Ipv4Only,
            Ok(pb::IpFamilies::Ipv6Only) => IpFamilies::Ipv6Only,
            Err(_) => {
                return Err(ResourceError::Enum {
                    field: "service.ip_families",
                    value: s.ip_families,
                });
            }
        };
        // Unknown visibility values are read as PUBLIC, as Istio's ztunnel
        // does: visibility hides a service from other namespaces' clients, it
        // is not an access control.
        let namespace_local = s.visibility == pb::service::Visibility::Namespace as i32;

        Ok(Self {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            vips,
            ports,
            subject_alt_names,
            waypoint,
            load_balancing,
            ip_families,
            namespace_local,
            canonical: s.canonical,
        })
    }
}

fn load_balancing(lb: &pb::LoadBalancing) -> Result<LoadBalancing, ResourceError> {
    use pb::load_balancing::{HealthPolicy as PbHealth, Mode, Scope};
    let mode = match Mode::try_from(lb.mode) {
        Ok(Mode::UnspecifiedMode) => LbMode::Standard,
        Ok(Mode::Strict) => LbMode::Strict,
        Ok(Mode::Failover) => LbMode::Failover,
        Ok(Mode::Passthrough) => LbMode::Passthrough,
        Err(_) => {
            return Err(ResourceError::Enum {
                field: "service.load_balancing.mode",
                value: lb.mode,
            });
        }
    };
    let health_policy = match PbHealth::try_from(lb.health_policy) {
        Ok(PbHealth::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(PbHealth::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => {
            return Err(ResourceError::Enum {
                field: "service.load_balancing.health_policy",
                value: lb.health_policy,
            });
        }
    };
    let routing_preference = lb
        .routing_preference
        .iter()
        .map(|&raw| match Scope::try_from(raw) {
            Ok(Scope::Region) => Ok(LbScope::Region),
            Ok(Scope::Zone) => Ok(LbScope::Zone),
            Ok(Scope::Subzone) => Ok(LbScope::Subzone),
            Ok(Scope::Node) => Ok(LbScope::Node),
            Ok(Scope::Cluster) => Ok(LbScope::Cluster),
            Ok(Scope::Network) => Ok(LbScope::Network),
            Ok(Scope::UnspecifiedScope) | Err(_) => Err(ResourceError::Enum {
                field: "service.load_balancing.routing_preference",
                value: raw,
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LoadBalancing {
        mode,
        routing_preference,
        health_policy,
    })
}
