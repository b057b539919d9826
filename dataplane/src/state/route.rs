//! Destination selection for an outbound connection: given the source
//! workload and the address the application dialed, decide where the proxy
//! connects, how (HBONE or plain TCP), what `:authority` it asks for and
//! which identities the far end may present.
//!
//! Boundaries: decides only — dialing, TLS and pooling belong to the proxy.
//! The order follows Istio's ztunnel: a service VIP first (its waypoint, else
//! one of its endpoints), then a workload IP (its waypoint, else the
//! workload), and anything unknown goes out of the mesh untouched. A known
//! destination that cannot be served is an error, never a passthrough: the
//! mesh fails closed.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use meshbox_certs::SpiffeId;
use tracing::{debug, trace};

use super::address::{GatewayAddress, GatewayTarget, HBONE_PORT};
use super::service::{HealthPolicy, IpFamilies, LbMode, LbScope, LoadBalancing, Service};
use super::workload::{HealthStatus, Protocol, Workload};
use super::{ProxyState, ServiceEntry};

/// Where an outbound connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// To a workload (or waypoint) the mesh knows.
    Upstream(Upstream),
    /// Not a mesh destination: connect to the original address as is.
    Passthrough(SocketAddr),
}

/// A connection to a mesh workload or waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The socket address to dial.
    pub connect_to: SocketAddr,
    pub transport: Transport,
    /// Whether `connect_to` is the destination's waypoint.
    pub via_waypoint: bool,
    /// The workload listening at `connect_to` (the waypoint, if any).
    pub peer: Arc<Workload>,
    /// The workload the connection is finally for, when known here. `None`
    /// through a service's waypoint: the waypoint picks the endpoint.
    pub destination_workload: Option<Arc<Workload>>,
    /// The service the application dialed, if it dialed a VIP.
    pub destination_service: Option<ServiceInfo>,
}

impl Upstream {
    /// The HBONE `:authority`, `None` for plain TCP.
    pub fn authority(&self) -> Option<SocketAddr> {
        match &self.transport {
            Transport::Hbone { authority, .. } => Some(*authority),
            Transport::Tcp => None,
        }
    }

    /// Identities the peer may present; empty for plain TCP.
    pub fn expected_identities(&self) -> &[SpiffeId] {
        match &self.transport {
            Transport::Hbone {
                expected_identities,
                ..
            } => expected_identities,
            Transport::Tcp => &[],
        }
    }
}

/// How to talk to the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTP/2 CONNECT over mutual TLS to `connect_to`, asking for
    /// `authority`; the peer's certificate must carry one of
    /// `expected_identities`.
    Hbone {
        authority: SocketAddr,
        expected_identities: Vec<SpiffeId>,
    },
    /// Plain TCP: the peer is not in the mesh.
    Tcp,
}

/// A service, for access logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub hostname: String,
}

impl From<&Service> for ServiceInfo {
    fn from(s: &Service) -> Self {
        Self {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            hostname: s.hostname.clone(),
        }
    }
}

/// Why a mesh destination cannot be reached. The connection must be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} does not declare port {port}")]
    PortNotInService { service: String, port: u16 },
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("waypoint {waypoint} is not known")]
    UnknownWaypoint { waypoint: String },
    #[error("waypoint {waypoint} has no healthy endpoint")]
    NoHealthyWaypoint { waypoint: String },
}

/// What a waypoint reference resolved to.
enum Waypoint<'a> {
    Service(&'a ServiceEntry),
    Workload(&'a Arc<Workload>, IpAddr),
}

impl fmt::Display for Waypoint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service(e) => f.write_str(&e.service.key()),
            Self::Workload(w, _) => f.write_str(&w.uid),
        }
    }
}

/// An endpoint chosen for a connection.
struct Pick {
    workload: Arc<Workload>,
    addr: SocketAddr,
}

impl ProxyState {
    /// Decides where a connection from `source` to `target` goes.
    ///
    /// `target` is the original destination of the captured socket. Lookups
    /// happen in the source's network.
    pub fn route(&self, source: &Workload, target: SocketAddr) -> Result<Route, RouteError> {
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
        let target = SocketAddr::new(target.ip().to_canonical(), target.port());
        let route = self.route_inner(source, target);
        match &route {
            Ok(Route::Upstream(up)) => debug!(
                source = %source.uid,
                %target,
                connect_to = %up.connect_to,
                peer = %up.peer.uid,
                via_waypoint = up.via_waypoint,
                hbone = matches!(up.transport, Transport::Hbone { .. }),
                "outbound route"
            ),
            Ok(Route::Passthrough(_)) => {
                debug!(source = %source.uid, %target, "outbound passthrough: not a mesh destination")
            }
            Err(error) => debug!(source = %source.uid, %target, %error, "outbound refused"),
        }
        route
    }

    fn route_inner(&self, source: &Workload, target: SocketAddr) -> Result<Route, RouteError> {
        if let Some(entry) =
            self.service_entry_by_vip(&source.network, target.ip(), &source.namespace)
        {
            return self.route_to_service(entry, source, target);
        }
        if let Some(w) = self.workload_by_ip(&source.network, target.ip()) {
            if let Some(gw) = &w.waypoint {
                let waypoint = self.resolve_waypoint(gw, source)?;
                if !self.is_member_of(&waypoint, source) {
                    return self
                        .via_waypoint(&waypoint, gw, source, target, None, Some(w))
                        .map(Route::Upstream);
                }
                // The waypoint forwarding to the workload it serves: going to
                // the waypoint again would loop.
                trace!(source = %source.uid, waypoint = %waypoint, "source is the destination's waypoint");
            }
            return Ok(Route::Upstream(direct(w, target, None)));
        }
        Ok(Route::Passthrough(target))
    }

    fn route_to_service(
        &self,
        entry: &ServiceEntry,
        source: &Workload,
        target: SocketAddr,
    ) -> Result<Route, RouteError> {
        let svc = &entry.service;
        if let Some(gw) = &svc.waypoint {
            let waypoint = self.resolve_waypoint(gw, source)?;
            if !self.is_member_of(&waypoint, source) {
                return self
                    .via_waypoint(&waypoint, gw, source, target, Some(svc), None)
                    .map(Route::Upstream);
            }
            trace!(source = %source.uid, waypoint = %waypoint, "source is the service's waypoint");
        }
        if svc.load_balancing.mode == LbMode::Passthrough {
            return Ok(Route::Passthrough(target));
        }
        self.endpoint_of(entry, source, target.port(), target.is_ipv6())
            .map(Route::Upstream)
    }

    /// At a waypoint: an endpoint of the service `key` for its `port`,
    /// chosen as for any client (round robin, health, locality relative to
    /// `source`, the waypoint's own workload), and never the service's
    /// waypoint: the caller is that waypoint.
    pub fn service_endpoint(
        &self,
        key: &str,
        port: u16,
        source: &Workload,
    ) -> Result<Upstream, RouteError> {
        let entry = self
            .services
            .get(key)
            .ok_or_else(|| RouteError::NoHealthyEndpoint {
                service: key.to_owned(),
                port,
            })?;
        self.endpoint_of(entry, source, port, false)
    }

    fn endpoint_of(
        &self,
        entry: &ServiceEntry,
        source: &Workload,
        port: u16,
        prefer_v6: bool,
    ) -> Result<Upstream, RouteError> {
        let svc = &entry.service;
        let Some(&svc_target) = svc.ports.get(&port) else {
            // Like kube-proxy: a VIP port the service does not declare leads
            // nowhere. Passing it through would leave the mesh.
            return Err(RouteError::PortNotInService {
                service: svc.key(),
                port,
            });
        };
        let key = svc.key();
        // The endpoint's own mapping wins (it carries named target ports
        // resolved for that workload); then the service's numeric target.
        // With neither, the endpoint does not serve this port and is skipped.
        let pick = self
            .pick_endpoint(entry, source, prefer_v6, |w| {
                w.services
                    .get(&key)
                    .and_then(|ports| ports.get(&port))
                    .copied()
                    .or((svc_target != 0).then_some(svc_target))
            })
            .ok_or_else(|| RouteError::NoHealthyEndpoint {
                service: key.clone(),
                port,
            })?;
        Ok(direct(&pick.workload, pick.addr, Some(svc)))
    }

    fn resolve_waypoint(
        &self,
        gw: &GatewayAddress,
        source: &Workload,
    ) -> Result<Waypoint<'_>, RouteError> {
        let found = match &gw.target {
            GatewayTarget::Hostname {
                namespace,
                hostname,
            } => self
                .services
                .get(&format!("{namespace}/{hostname}"))
                .map(Waypoint::Service),
            GatewayTarget::Address { network, ip } => self
                .service_entry_by_vip(network, *ip, &source.namespace)
                .map(Waypoint::Service)
                .or_else(|| {
                    self.workload_by_ip(network, *ip)
                        .map(|w| Waypoint::Workload(w, *ip))
                }),
        };
        // Traffic that must pass a waypoint never skips it because we cannot
        // find it: that would bypass the policies the waypoint enforces.
        found.ok_or_else(|| RouteError::UnknownWaypoint {
            waypoint: gw.target.to_string(),
        })
    }

    /// Whether `source` is (one of the workloads behind) `waypoint`.
    fn is_member_of(&self, waypoint: &Waypoint<'_>, source: &Workload) -> bool {
        match waypoint {
            Waypoint::Service(entry) => self
                .endpoints
                .get(&entry.service.key())
                .is_some_and(|uids| uids.contains(&source.uid)),
            Waypoint::Workload(w, _) => w.uid == source.uid,
        }
    }

    fn via_waypoint(
        &self,
        waypoint: &Waypoint<'_>,
        gw: &GatewayAddress,
        source: &Workload,
        target: SocketAddr,
        service: Option<&Service>,
        workload: Option<&Arc<Workload>>,
    ) -> Result<Upstream, RouteError> {
        let (peer, connect_to, sans): (Arc<Workload>, SocketAddr, &[SpiffeId]) = match waypoint {
            Waypoint::Service(entry) => {
                let key = entry.service.key();
                let hbone = gw.hbone_port;
                let declared = entry.service.ports.get(&hbone).copied().filter(|&p| p != 0);
                // Waypoints listen for HBONE themselves; a mapping of the
                // HBONE port on the waypoint service is honoured, but the port
                // need not be declared.
                let pick = self
                    .pick_endpoint(entry, source, target.is_ipv6(), |w| {
                        Some(
                            w.services
                                .get(&key)
                                .and_then(|ports| ports.get(&hbone))
                                .copied()
                                .or(declared)
                                .unwrap_or(hbone),
                        )
                    })
                    .ok_or(RouteError::NoHealthyWaypoint { waypoint: key })?;
                (pick.workload, pick.addr, &entry.service.subject_alt_names)
            }
            Waypoint::Workload(w, ip) => ((*w).clone(), SocketAddr::new(*ip, gw.hbone_port), &[]),
        };
        Ok(Upstream {
            connect_to,
            transport: Transport::Hbone {
                // The waypoint needs the address the application dialed (the
                // VIP, not an endpoint): it does its own routing.
                authority: target,
                expected_identities: identities(&peer, sans),
            },
            via_waypoint: true,
            peer,
            destination_workload: workload.cloned(),
            destination_service: service.map(ServiceInfo::from),
        })
    }

    /// Picks the next endpoint of a service, round-robin over the eligible
    /// ones: same network as the source (we have no east-west gateway), healthy
    /// unless the service says otherwise, an address of a usable family, a
    /// port for this connection, and the best locality match if the service
    /// asks for one.
    fn pick_endpoint(
        &self,
        entry: &ServiceEntry,
        source: &Workload,
        prefer_v6: bool,
        port_for: impl Fn(&Workload) -> Option<u16>,
    ) -> Option<Pick> {
        let svc = &entry.service;
        let key = svc.key();
        let lb = &svc.load_balancing;
        let mut candidates: Vec<(usize, Pick)> = self
            .endpoints(&key)
            .filter_map(|w| {
                if w.network != source.network {
                    trace!(service = %key, endpoint = %w.uid, "endpoint on another network");
                    return None;
                }
                if w.status == HealthStatus::Unhealthy && lb.health_policy != HealthPolicy::AllowAll
                {
                    trace!(service = %key, endpoint = %w.uid, "endpoint unhealthy");
                    return None;
                }
                let Some(ip) = pick_ip(w, svc.ip_families, prefer_v6) else {
                    trace!(service = %key, endpoint = %w.uid, "endpoint has no usable address");
                    return None;
                };
                let Some(port) = port_for(w) else {
                    trace!(service = %key, endpoint = %w.uid, "endpoint does not serve the port");
                    return None;
                };
                Some((
                    locality_rank(lb, source, w),
                    Pick {
                        workload: w.clone(),
                        addr: SocketAddr::new(ip, port),
                    },
                ))
            })
            .collect();
        match lb.mode {
            LbMode::Strict => {
                candidates.retain(|(rank, _)| *rank == lb.routing_preference.len());
            }
            LbMode::Failover => {
                let best = candidates.iter().map(|(rank, _)| *rank).max()?;
                candidates.retain(|(rank, _)| *rank == best);
            }
            LbMode::Standard | LbMode::Passthrough => {}
        }
        if candidates.is_empty() {
            return None;
        }
        // Relaxed is enough: the cursor only spreads load, it orders nothing.
        let i = entry.cursor.fetch_add(1, Ordering::Relaxed) % candidates.len();
        Some(candidates.swap_remove(i).1)
    }
}

/// A connection straight to a workload at `addr` (its IP and the app port);
/// also what a waypoint uses for a request addressed to a workload it serves.
pub fn direct(w: &Arc<Workload>, addr: SocketAddr, service: Option<&Service>) -> Upstream {
    let (connect_to, transport) = match w.protocol {
        Protocol::Hbone => (
            SocketAddr::new(addr.ip(), HBONE_PORT),
            Transport::Hbone {
                authority: addr,
                expected_identities: identities(
                    w,
                    service.map_or(&[][..], |s| &s.subject_alt_names),
                ),
            },
        ),
        Protocol::Tcp => (addr, Transport::Tcp),
    };
    Upstream {
        connect_to,
        transport,
        via_waypoint: false,
        peer: w.clone(),
        destination_workload: Some(w.clone()),
        destination_service: service.map(ServiceInfo::from),
    }
}

/// The peer's own identity, then the service's extra SANs, without repeats.
fn identities(peer: &Workload, sans: &[SpiffeId]) -> Vec<SpiffeId> {
    let mut out = vec![peer.identity.clone()];
    for san in sans {
        if !out.contains(san) {
            out.push(san.clone());
        }
    }
    out
}

/// An address of `w` the service may use, of the caller's family if there is
/// one (so an IPv6 client stays on IPv6), else any.
fn pick_ip(w: &Workload, families: IpFamilies, prefer_v6: bool) -> Option<IpAddr> {
    let mut usable = w.addresses.iter().filter(|ip| families.accepts(ip));
    let first = usable.clone().next().copied();
    usable
        .find(|ip| ip.is_ipv6() == prefer_v6)
        .copied()
        .or(first)
}

/// How many of the service's routing preferences, in order, the endpoint
/// shares with the source.
fn locality_rank(lb: &LoadBalancing, source: &Workload, w: &Workload) -> usize {
    lb.routing_preference
        .iter()
        .take_while(|scope| match scope {
            LbScope::Region => source.locality.region == w.locality.region,
            LbScope::Zone => source.locality.zone == w.locality.zone,
            LbScope::Subzone => source.locality.subzone == w.locality.subzone,
            LbScope::Node => source.node == w.node,
            LbScope::Cluster => source.cluster_id == w.cluster_id,
            LbScope::Network => source.network == w.network,
        })
        .count()
}
