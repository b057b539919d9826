//! Addresses as xDS carries them: raw IP bytes, `(network, IP)` pairs and
//! the `GatewayAddress` that points at a waypoint. Conversion only; nothing
//! here knows about workloads or services.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshbox_proto::workload as pb;

use super::ResourceError;

/// The HBONE port every meshed workload (and waypoint) listens on.
pub const HBONE_PORT: u16 = 15008;

/// Decodes an address sent as 4 (IPv4) or 16 (IPv6) bytes.
///
/// Any other length is malformed; the caller decides what that means for the
/// resource carrying it. IPv4-mapped IPv6 bytes are folded to IPv4 so that a
/// workload announced either way is found by the address a socket reports.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    let ip = if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::V4(Ipv4Addr::from(v4))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::V6(Ipv6Addr::from(v6))
    } else {
        return None;
    };
    Some(ip.to_canonical())
}

/// Decodes an IP field of a resource, naming the field when it is malformed.
pub(super) fn parse_ip(field: &'static str, bytes: &[u8]) -> Result<IpAddr, ResourceError> {
    ip_from_bytes(bytes).ok_or(ResourceError::AddressLength {
        field,
        len: bytes.len(),
    })
}

/// A port from a `uint32` proto field; anything above 65535 is malformed.
pub(super) fn parse_port(field: &'static str, value: u32) -> Result<u16, ResourceError> {
    u16::try_from(value).map_err(|_| ResourceError::Port { field, value })
}

/// Where a waypoint is: a service (or workload) by name, or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayTarget {
    /// `{namespace}/{hostname}` of the waypoint's Service. The preferred form:
    /// it survives the waypoint's IPs changing and adapts to the caller's IP
    /// family.
    Hostname { namespace: String, hostname: String },
    /// A VIP of the waypoint's Service or the IP of the waypoint workload.
    Address { network: String, ip: IpAddr },
}

impl fmt::Display for GatewayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hostname {
                namespace,
                hostname,
            } => write!(f, "{namespace}/{hostname}"),
            Self::Address { network, ip } => write!(f, "{network}/{ip}"),
        }
    }
}

/// A waypoint reference, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayAddress {
    pub target: GatewayTarget,
    /// Port the waypoint terminates HBONE on.
    pub hbone_port: u16,
}

impl GatewayAddress {
    pub(super) fn from_proto(
        field: &'static str,
        gw: &pb::GatewayAddress,
    ) -> Result<Self, ResourceError> {
        use pb::gateway_address::Destination;
        let target = match &gw.destination {
            Some(Destination::Hostname(h)) => {
                if h.namespace.is_empty() || h.hostname.is_empty() {
                    return Err(ResourceError::Missing(field));
                }
                GatewayTarget::Hostname {
                    namespace: h.namespace.clone(),
                    hostname: h.hostname.clone(),
                }
            }
            Some(Destination::Address(a)) => GatewayTarget::Address {
                network: a.network.clone(),
                ip: parse_ip(field, &a.address)?,
            },
            None => return Err(ResourceError::Missing(field)),
        };
        // istiod always fills the port; an unset one (0) can only mean the
        // standard HBONE port, and dialing port 0 would fail anyway.
        let hbone_port = match parse_port(field, gw.hbone_mtls_port)? {
            0 => HBONE_PORT,
            p => p,
        };
        Ok(Self { target, hbone_port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_bytes() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (&[10, 0, 0, 1], Some("10.0.0.1")),
            (
                &[0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                Some("2001:db8::1"),
            ),
            // IPv4-mapped IPv6 is folded to IPv4.
            (
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1],
                Some("10.0.0.1"),
            ),
            (&[], None),
            (&[10, 0, 0], None),
            (&[10, 0, 0, 1, 2], None),
            (&[0; 15], None),
            (&[0; 17], None),
        ];
        for (bytes, want) in cases {
            let want = want.map(|s| s.parse::<IpAddr>().unwrap());
            assert_eq!(ip_from_bytes(bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn gateway_addresses() {
        use pb::gateway_address::Destination;
        let by_host = pb::GatewayAddress {
            destination: Some(Destination::Hostname(pb::NamespacedHostname {
                namespace: "ns".into(),
                hostname: "wp.ns.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 0,
        };
        assert_eq!(
            GatewayAddress::from_proto("waypoint", &by_host),
            Ok(GatewayAddress {
                target: GatewayTarget::Hostname {
                    namespace: "ns".into(),
                    hostname: "wp.ns.svc.cluster.local".into()
                },
                hbone_port: HBONE_PORT
            })
        );
        let bad_ip = pb::GatewayAddress {
            destination: Some(Destination::Address(pb::NetworkAddress {
                network: String::new(),
                address: vec![1, 2, 3],
                length: None,
            })),
            hbone_mtls_port: 15008,
        };
        assert_eq!(
            GatewayAddress::from_proto("waypoint", &bad_ip),
            Err(ResourceError::AddressLength {
                field: "waypoint",
                len: 3
            })
        );
        let empty = pb::GatewayAddress::default();
        assert_eq!(
            GatewayAddress::from_proto("waypoint", &empty),
            Err(ResourceError::Missing("waypoint"))
        );
        let big_port = pb::GatewayAddress {
            hbone_mtls_port: 70_000,
            ..by_host
        };
        assert_eq!(
            GatewayAddress::from_proto("waypoint", &big_port),
            Err(ResourceError::Port {
                field: "waypoint",
                value: 70_000
            })
        );
    }
}
