//! Table tests for indexing and destination selection, driven by xDS
//! resources as the control plane sends them: the builders here, the tests
//! one file per concern.

mod inbound;
mod index;
mod routing;
mod validation;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use meshbox_proto::workload as pb;
use pb::gateway_address::Destination;

use super::*;

// ----- builders -----

const NS: &str = "ns";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip_bytes(s: &str) -> Vec<u8> {
    match ip(s) {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn uid(ns: &str, name: &str) -> String {
    format!("c1//Pod/{ns}/{name}")
}

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn svc_key(name: &str) -> String {
    format!("{NS}/{name}.{NS}.svc.cluster.local")
}

/// A workload: pod `name` in `ns`, service account `name`, HBONE, healthy,
/// on node `n1`.
#[derive(Clone)]
struct W(pb::Workload);

impl W {
    fn new(name: &str, ips: &[&str]) -> Self {
        Self::in_ns(NS, name, ips)
    }

    fn in_ns(ns: &str, name: &str, ips: &[&str]) -> Self {
        W(pb::Workload {
            uid: uid(ns, name),
            name: name.into(),
            namespace: ns.into(),
            addresses: ips.iter().map(|s| ip_bytes(s)).collect(),
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: name.into(),
            node: "n1".into(),
            ..Default::default()
        })
    }

    fn tcp(mut self) -> Self {
        self.0.tunnel_protocol = pb::TunnelProtocol::None as i32;
        self
    }

    fn unhealthy(mut self) -> Self {
        self.0.status = pb::WorkloadStatus::Unhealthy as i32;
        self
    }

    fn node(mut self, node: &str) -> Self {
        self.0.node = node.into();
        self
    }

    fn network(mut self, network: &str) -> Self {
        self.0.network = network.into();
        self
    }

    fn host_network(mut self) -> Self {
        self.0.network_mode = pb::NetworkMode::HostNetwork as i32;
        self
    }

    fn zone(mut self, region: &str, zone: &str) -> Self {
        self.0.locality = Some(pb::Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        });
        self
    }

    /// Endpoint of service `svc` (short name in NS) with port mappings.
    fn svc(mut self, svc: &str, ports: &[(u32, u32)]) -> Self {
        self.0.services.insert(svc_key(svc), port_list(ports));
        self
    }

    fn waypoint(mut self, gw: pb::GatewayAddress) -> Self {
        self.0.waypoint = Some(gw);
        self
    }

    fn address(&self) -> (String, pb::Address) {
        (
            self.0.uid.clone(),
            pb::Address {
                r#type: Some(pb::address::Type::Workload(self.0.clone())),
            },
        )
    }

    fn validated(&self) -> Workload {
        Workload::from_proto(&self.0).unwrap()
    }
}

fn port_list(ports: &[(u32, u32)]) -> pb::PortList {
    pb::PortList {
        ports: ports
            .iter()
            .map(|&(service_port, target_port)| pb::Port {
                service_port,
                target_port,
                app_protocol: 0,
            })
            .collect(),
    }
}

/// A service `name.ns.svc.cluster.local` in NS.
#[derive(Clone)]
struct S(pb::Service);

impl S {
    fn new(name: &str, vips: &[&str], ports: &[(u32, u32)]) -> Self {
        Self::in_ns(NS, name, vips, ports)
    }

    fn in_ns(ns: &str, name: &str, vips: &[&str], ports: &[(u32, u32)]) -> Self {
        S(pb::Service {
            name: name.into(),
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            addresses: vips
                .iter()
                .map(|v| pb::NetworkAddress {
                    network: String::new(),
                    address: ip_bytes(v),
                    length: None,
                })
                .collect(),
            ports: port_list(ports).ports,
            ..Default::default()
        })
    }

    fn waypoint(mut self, gw: pb::GatewayAddress) -> Self {
        self.0.waypoint = Some(gw);
        self
    }

    fn lb(mut self, f: impl FnOnce(&mut pb::LoadBalancing)) -> Self {
        let mut lb = self.0.load_balancing.take().unwrap_or_default();
        f(&mut lb);
        self.0.load_balancing = Some(lb);
        self
    }

    fn sans(mut self, sans: &[&str]) -> Self {
        self.0.subject_alt_names = sans.iter().map(|s| s.to_string()).collect();
        self
    }

    fn families(mut self, f: pb::IpFamilies) -> Self {
        self.0.ip_families = f as i32;
        self
    }

    fn namespace_local(mut self) -> Self {
        self.0.visibility = pb::service::Visibility::Namespace as i32;
        self
    }

    fn canonical(mut self) -> Self {
        self.0.canonical = true;
        self
    }

    fn address(&self) -> (String, pb::Address) {
        (
            format!("{}/{}", self.0.namespace, self.0.hostname),
            pb::Address {
                r#type: Some(pb::address::Type::Service(self.0.clone())),
            },
        )
    }
}

fn gw_host(name: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(Destination::Hostname(pb::NamespacedHostname {
            namespace: NS.into(),
            hostname: format!("{name}.{NS}.svc.cluster.local"),
        })),
        hbone_mtls_port: 15008,
    }
}

fn gw_ip(addr: &str) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(Destination::Address(pb::NetworkAddress {
            network: String::new(),
            address: ip_bytes(addr),
            length: None,
        })),
        hbone_mtls_port: 15008,
    }
}

fn build(resources: &[(String, pb::Address)]) -> ProxyState {
    let mut st = ProxyState::new();
    for (name, r) in resources {
        st.apply_address(name, Some(r)).unwrap();
    }
    st
}

/// The client every routing case starts from.
fn client() -> W {
    W::new("client", &["10.0.0.1"])
}
