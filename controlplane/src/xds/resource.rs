//! Turns model objects into the exact bytes every client is served.
//!
//! A resource is encoded here exactly once, when it enters the cache: the
//! result is a complete, encoded `envoy.service.discovery.v3.Resource`
//! message (name, version, `Any`) held in shared [`Bytes`], which the codec
//! splices into each client's responses without touching it again. This
//! module also derives the per-resource version (a digest of the content, so
//! it changes only when the resource does, and is the same on every replica
//! and after a restart) and, for on-demand subscriptions, the IP addresses
//! an `Address` answers to plus a workload's node and services. It knows
//! nothing about streams or clients.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use meshbox_proto::security::Authorization;
use meshbox_proto::workload::{Address, PortList, address};
use meshbox_proto::xds::Resource;
use prost::Message;

/// The resource types this server knows. Anything else a client asks for is
/// ignored (see the stream module for why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Address,
    Authorization,
    /// meshbox's own, for waypoints (node dataplanes never subscribe).
    WaypointPolicy,
    WaypointRoute,
}

/// How many resource types there are (the length of per-type arrays).
pub(crate) const KINDS: usize = 4;

impl Kind {
    pub(crate) const ALL: [Kind; KINDS] = [
        Kind::Address,
        Kind::Authorization,
        Kind::WaypointPolicy,
        Kind::WaypointRoute,
    ];

    pub(crate) fn type_url(self) -> &'static str {
        match self {
            Kind::Address => meshbox_proto::ADDRESS_TYPE_URL,
            Kind::Authorization => meshbox_proto::AUTHORIZATION_TYPE_URL,
            Kind::WaypointPolicy => meshbox_proto::WAYPOINT_POLICY_TYPE_URL,
            Kind::WaypointRoute => meshbox_proto::WAYPOINT_ROUTE_TYPE_URL,
        }
    }

    pub(crate) fn from_type_url(type_url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == type_url)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// An IP address within a network, the key of on-demand lookups by IP.
/// Istio names these `{network}/{ip}`; the default network is the empty
/// string, so the common form is `/10.0.0.1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NetIp {
    pub network: Box<str>,
    pub ip: IpAddr,
}

impl NetIp {
    /// Parses an on-demand lookup key: `network/ip`, or a bare IP meaning the
    /// default network. Anything else (a uid, `ns/hostname`) is `None`.
    pub(crate) fn parse(name: &str) -> Option<NetIp> {
        let (network, ip) = match name.rsplit_once('/') {
            Some((network, ip)) => (network, ip),
            None => ("", name),
        };
        let ip = ip.parse::<IpAddr>().ok()?;
        Some(NetIp {
            network: network.into(),
            ip: canonical_ip(ip),
        })
    }
}

impl fmt::Display for NetIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.ip)
    }
}

/// IPv4-mapped IPv6 addresses are the same endpoint as their IPv4 form; use
/// one spelling so lookups match however the address was written.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(canonical_ip(ip))
}

/// One resource as it is served: immutable, shared by every stream.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub name: Arc<str>,
    pub version: Arc<str>,
    /// A complete encoded `Resource` message.
    pub bytes: Bytes,
    /// Addresses this resource answers to (Address resources only).
    pub ips: Box<[NetIp]>,
    /// The node a workload runs on (workload Address resources only).
    pub node: Option<Arc<str>>,
    /// The services (`namespace/hostname`) a workload is an endpoint of
    /// (workload Address resources only).
    pub member_of: Box<[Arc<str>]>,
}

impl Encoded {
    pub(crate) fn address(name: Arc<str>, address: &Address) -> Encoded {
        let ips = address_ips(address);
        let value = canonical_address_bytes(address);
        let mut encoded = Self::build(Kind::Address, name, value, ips);
        if let Some(address::Type::Workload(w)) = &address.r#type {
            encoded.node = (!w.node.is_empty()).then(|| w.node.as_str().into());
            let mut member_of: Vec<Arc<str>> =
                w.services.keys().map(|s| s.as_str().into()).collect();
            member_of.sort();
            encoded.member_of = member_of.into_boxed_slice();
        }
        encoded
    }

    pub(crate) fn authorization(name: Arc<str>, authorization: &Authorization) -> Encoded {
        // No map fields anywhere in Authorization, so prost's encoding is
        // already deterministic.
        let value = authorization.encode_to_vec();
        Self::build(Kind::Authorization, name, value, Box::default())
    }

    /// A waypoint's message (`WaypointPolicy` or `WaypointRoute`). Neither
    /// has a map field, so prost's encoding is deterministic.
    pub(crate) fn waypoint<M: Message>(kind: Kind, name: Arc<str>, message: &M) -> Encoded {
        Self::build(kind, name, message.encode_to_vec(), Box::default())
    }

    fn build(kind: Kind, name: Arc<str>, value: Vec<u8>, ips: Box<[NetIp]>) -> Encoded {
        let version: Arc<str> = content_version(&value).into();
        let resource = Resource {
            version: version.to_string(),
            resource: Some(prost_types::Any {
                type_url: kind.type_url().to_owned(),
                value,
            }),
            name: name.to_string(),
            ..Default::default()
        };
        Encoded {
            name,
            version,
            bytes: Bytes::from(resource.encode_to_vec()),
            ips,
            node: None,
            member_of: Box::default(),
        }
    }
}

/// The version of a resource: 128 bits of SHA-256 over its encoding, in hex.
/// A digest (rather than a counter) stays the same across restarts and
/// replicas, so a client reconnecting anywhere is sent only real changes;
/// a cryptographic one means nobody can craft two contents of their own
/// object that collide and so hide a change from reconnecting clients.
fn content_version(value: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value);
    let mut out = String::with_capacity(32);
    for b in &digest.as_ref()[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `Workload.services` is a protobuf map, which prost holds in a `HashMap`
/// and encodes in its (random) iteration order. Equal workloads would then
/// encode differently and get different versions, so a workload with more
/// than one service is encoded with the map entries sorted by key. Field
/// order does not matter to decoders, so appending the entries after the
/// other fields gives the same message.
fn canonical_address_bytes(address: &Address) -> Vec<u8> {
    match &address.r#type {
        Some(address::Type::Workload(workload)) if workload.services.len() > 1 => {
            let mut rest = workload.clone();
            let services = SortedServices {
                services: std::mem::take(&mut rest.services).into_iter().collect(),
            };
            let mut workload_bytes = rest.encode_to_vec();
            workload_bytes.extend_from_slice(&services.encode_to_vec());
            // `Address.workload` is field 1; a bytes field with the same
            // number has the same wire form as the embedded message.
            RawWorkloadAddress {
                workload: workload_bytes,
            }
            .encode_to_vec()
        }
        _ => address.encode_to_vec(),
    }
}

/// Field 22 of `istio.workload.Workload`, with a sorted map.
#[derive(Clone, PartialEq, prost::Message)]
struct SortedServices {
    #[prost(btree_map = "string, message", tag = "22")]
    services: BTreeMap<String, PortList>,
}

/// `istio.workload.Address` with its `workload` field pre-encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct RawWorkloadAddress {
    #[prost(bytes = "vec", tag = "1")]
    workload: Vec<u8>,
}

fn address_ips(address: &Address) -> Box<[NetIp]> {
    let mut ips: Vec<NetIp> = match &address.r#type {
        Some(address::Type::Workload(w)) => w
            .addresses
            .iter()
            .filter_map(|b| ip_from_bytes(b))
            .map(|ip| NetIp {
                network: w.network.as_str().into(),
                ip,
            })
            .collect(),
        Some(address::Type::Service(s)) => s
            .addresses
            .iter()
            .filter_map(|a| {
                Some(NetIp {
                    network: a.network.as_str().into(),
                    ip: ip_from_bytes(&a.address)?,
                })
            })
            .collect(),
        None => Vec::new(),
    };
    ips.sort();
    ips.dedup();
    ips.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshbox_proto::workload::{NetworkAddress, Port, Service, Workload};

    fn workload_with_services(order: &[&str]) -> Address {
        let mut w = Workload {
            uid: "c//Pod/ns/a".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        for s in order {
            w.services.insert(
                (*s).to_owned(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            );
        }
        Address {
            r#type: Some(address::Type::Workload(w)),
        }
    }

    #[test]
    fn equal_workloads_have_equal_versions_and_decode_back() {
        let names: Vec<String> = (0..20).map(|i| format!("ns/svc{i}")).collect();
        let forward: Vec<&str> = names.iter().map(String::as_str).collect();
        let backward: Vec<&str> = forward.iter().rev().copied().collect();
        let a = Encoded::address("a".into(), &workload_with_services(&forward));
        let b = Encoded::address("a".into(), &workload_with_services(&backward));
        assert_eq!(a.version, b.version);
        assert_eq!(a.bytes, b.bytes);
        let decoded = Resource::decode(a.bytes.clone()).unwrap();
        let any = decoded.resource.unwrap();
        let back = Address::decode(any.value.as_slice()).unwrap();
        assert_eq!(back, workload_with_services(&forward));
        assert_eq!(decoded.name, "a");
        assert_eq!(decoded.version, &*a.version);
    }

    #[test]
    fn lookup_keys() {
        assert_eq!(
            NetIp::parse("/10.0.0.1"),
            Some(NetIp {
                network: "".into(),
                ip: [10, 0, 0, 1].into()
            })
        );
        assert_eq!(NetIp::parse("net1/::1").unwrap().network.as_ref(), "net1");
        assert_eq!(
            NetIp::parse("::ffff:10.0.0.1").unwrap().ip,
            IpAddr::from([10, 0, 0, 1])
        );
        assert_eq!(NetIp::parse("ns/reviews.ns.svc.cluster.local"), None);
        assert_eq!(NetIp::parse("cluster//Pod/ns/name"), None);
    }

    #[test]
    fn service_vips_are_indexed() {
        let svc = Address {
            r#type: Some(address::Type::Service(Service {
                hostname: "h".into(),
                addresses: vec![
                    NetworkAddress {
                        network: "n".into(),
                        address: vec![10, 96, 0, 1],
                        length: None,
                    },
                    NetworkAddress {
                        network: "n".into(),
                        address: vec![1, 2, 3],
                        length: None,
                    },
                ],
                ..Default::default()
            })),
        };
        let e = Encoded::address("ns/h".into(), &svc);
        assert_eq!(e.ips.len(), 1);
        assert_eq!(e.ips[0].to_string(), "n/10.96.0.1");
    }
}
