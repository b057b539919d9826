//! Table tests for indexing and destination selection, driven by xDS
//! resources as the control plane sends them.

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

// ----- destination selection -----

#[derive(Debug)]
enum Want {
    Hbone {
        connect: &'static str,
        authority: &'static str,
        ids: Vec<String>,
        peer: &'static str,
        via_waypoint: bool,
    },
    Tcp {
        connect: &'static str,
        peer: &'static str,
    },
    Passthrough(&'static str),
    Err(RouteError),
}

fn hbone(connect: &'static str, authority: &'static str, peer: &'static str) -> Want {
    Want::Hbone {
        connect,
        authority,
        ids: vec![id(NS, peer)],
        peer,
        via_waypoint: false,
    }
}

fn waypoint(connect: &'static str, authority: &'static str, peer: &'static str) -> Want {
    Want::Hbone {
        connect,
        authority,
        ids: vec![id(NS, peer)],
        peer,
        via_waypoint: true,
    }
}

struct Case {
    name: &'static str,
    resources: Vec<(String, pb::Address)>,
    source: W,
    target: &'static str,
    want: Want,
}

fn check(case: &Case, got: Result<Route, RouteError>) {
    let name = case.name;
    match (&case.want, got) {
        (
            Want::Hbone {
                connect,
                authority,
                ids,
                peer,
                via_waypoint,
            },
            Ok(Route::Upstream(up)),
        ) => {
            assert_eq!(up.connect_to, sa(connect), "{name}: connect_to");
            assert_eq!(up.authority(), Some(sa(authority)), "{name}: authority");
            let got_ids: Vec<String> = up
                .expected_identities()
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(&got_ids, ids, "{name}: identities");
            assert_eq!(up.peer.name, *peer, "{name}: peer");
            assert_eq!(up.via_waypoint, *via_waypoint, "{name}: via_waypoint");
        }
        (Want::Tcp { connect, peer }, Ok(Route::Upstream(up))) => {
            assert_eq!(up.transport, Transport::Tcp, "{name}: transport");
            assert_eq!(up.connect_to, sa(connect), "{name}: connect_to");
            assert_eq!(up.peer.name, *peer, "{name}: peer");
            assert!(!up.via_waypoint, "{name}: via_waypoint");
        }
        (Want::Passthrough(addr), Ok(Route::Passthrough(got))) => {
            assert_eq!(got, sa(addr), "{name}: passthrough address");
        }
        (Want::Err(want), Err(got)) => assert_eq!(&got, want, "{name}: error"),
        (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
    }
}

fn routing_cases() -> Vec<Case> {
    let server = W::new("server", &["10.0.0.2"]);
    let web_svc = S::new("web", &["10.96.0.10"], &[(80, 8080)]);
    let web1 = W::new("web1", &["10.0.1.1"]).svc("web", &[(80, 8080)]);
    let wp_svc = S::new("wp", &["10.96.0.99"], &[(15008, 15008)]);
    let wp = W::new("wp", &["10.0.9.9"]).svc("wp", &[(15008, 15008)]);
    let gone = RouteError::NoHealthyEndpoint {
        service: svc_key("web"),
        port: 80,
    };
    vec![
        Case {
            name: "workload IP, HBONE: tunnel to 15008 asking for ip:port",
            resources: vec![client().address(), server.address()],
            source: client(),
            target: "10.0.0.2:8080",
            want: hbone("10.0.0.2:15008", "10.0.0.2:8080", "server"),
        },
        Case {
            name: "workload IP, NONE: plain TCP to the workload",
            resources: vec![
                client().address(),
                W::new("legacy", &["10.0.0.3"]).tcp().address(),
            ],
            source: client(),
            target: "10.0.0.3:8080",
            want: Want::Tcp {
                connect: "10.0.0.3:8080",
                peer: "legacy",
            },
        },
        Case {
            name: "VIP: endpoint with the service's target port",
            resources: vec![client().address(), web_svc.address(), web1.address()],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "VIP: named target port resolved per endpoint; endpoints without it skipped",
            resources: vec![
                client().address(),
                S::new("web", &["10.96.0.10"], &[(80, 0)]).address(),
                // Listed first by uid, but does not define the named port.
                W::new("a-noport", &["10.0.1.7"]).svc("web", &[]).address(),
                W::new("web1", &["10.0.1.1"])
                    .svc("web", &[(80, 9090)])
                    .address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:9090", "web1"),
        },
        Case {
            name: "VIP: the endpoint's own mapping beats the service's target port",
            resources: vec![
                client().address(),
                web_svc.address(),
                W::new("web1", &["10.0.1.1"])
                    .svc("web", &[(80, 7070)])
                    .address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:7070", "web1"),
        },
        Case {
            name: "VIP: no mapping on the endpoint falls back to the service's target port",
            resources: vec![
                client().address(),
                web_svc.address(),
                W::new("web1", &["10.0.1.1"]).svc("web", &[]).address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "VIP: endpoint not in the mesh gets plain TCP to the target port",
            resources: vec![
                client().address(),
                web_svc.address(),
                W::new("web1", &["10.0.1.1"])
                    .tcp()
                    .svc("web", &[(80, 8080)])
                    .address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Tcp {
                connect: "10.0.1.1:8080",
                peer: "web1",
            },
        },
        Case {
            name: "VIP: port the service does not declare is refused",
            resources: vec![client().address(), web_svc.address(), web1.address()],
            source: client(),
            target: "10.96.0.10:81",
            want: Want::Err(RouteError::PortNotInService {
                service: svc_key("web"),
                port: 81,
            }),
        },
        Case {
            name: "VIP: no endpoints at all is refused, not passed through",
            resources: vec![client().address(), web_svc.address()],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Err(gone.clone()),
        },
        Case {
            name: "VIP: only unhealthy endpoints is refused",
            resources: vec![
                client().address(),
                web_svc.address(),
                web1.clone().unhealthy().address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Err(gone.clone()),
        },
        Case {
            name: "VIP: unhealthy endpoint skipped in favour of a healthy one",
            resources: vec![
                client().address(),
                web_svc.address(),
                W::new("a-sick", &["10.0.1.9"])
                    .unhealthy()
                    .svc("web", &[(80, 8080)])
                    .address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "VIP: ALLOW_ALL health policy uses unhealthy endpoints",
            resources: vec![
                client().address(),
                web_svc
                    .clone()
                    .lb(|lb| lb.health_policy = pb::load_balancing::HealthPolicy::AllowAll as i32)
                    .address(),
                web1.clone().unhealthy().address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "VIP: endpoint on another network is unreachable (no east-west gateway)",
            resources: vec![
                client().address(),
                web_svc.address(),
                web1.clone().network("remote").address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Err(gone.clone()),
        },
        Case {
            name: "VIP: service SANs are accepted besides the endpoint's identity",
            resources: vec![
                client().address(),
                web_svc
                    .clone()
                    .sans(&[
                        "spiffe://cluster.local/ns/ns/sa/web-legacy",
                        "not a spiffe id",
                        "spiffe://cluster.local/ns/ns/sa/web1",
                    ])
                    .address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Hbone {
                connect: "10.0.1.1:15008",
                authority: "10.0.1.1:8080",
                ids: vec![id(NS, "web1"), id(NS, "web-legacy")],
                peer: "web1",
                via_waypoint: false,
            },
        },
        Case {
            name: "VIP: PASSTHROUGH load balancing goes to the original address",
            resources: vec![
                client().address(),
                web_svc
                    .clone()
                    .lb(|lb| lb.mode = pb::load_balancing::Mode::Passthrough as i32)
                    .address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Passthrough("10.96.0.10:80"),
        },
        Case {
            name: "VIP: a host-network endpoint is reachable through its service",
            resources: vec![
                client().address(),
                web_svc.address(),
                web1.clone().host_network().address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "host-network workload IP is the node's: passthrough",
            resources: vec![
                client().address(),
                W::new("hostpod", &["10.0.0.50"]).host_network().address(),
            ],
            source: client(),
            target: "10.0.0.50:10250",
            want: Want::Passthrough("10.0.0.50:10250"),
        },
        Case {
            name: "VIP shared by two services: the client's namespace wins",
            resources: vec![
                client().address(),
                S::in_ns("other", "web", &["10.96.0.10"], &[(80, 1111)])
                    .canonical()
                    .address(),
                web_svc.address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "namespace-local service is invisible to other namespaces",
            resources: vec![
                W::in_ns("elsewhere", "client", &["10.0.0.1"]).address(),
                web_svc.clone().namespace_local().address(),
                web1.address(),
            ],
            source: W::in_ns("elsewhere", "client", &["10.0.0.1"]),
            target: "10.96.0.10:80",
            want: Want::Passthrough("10.96.0.10:80"),
        },
        Case {
            name: "namespace-local service is visible in its namespace",
            resources: vec![
                client().address(),
                web_svc.clone().namespace_local().address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "service waypoint by hostname: tunnel to the waypoint, authority stays the VIP",
            resources: vec![
                client().address(),
                web_svc.clone().waypoint(gw_host("wp")).address(),
                web1.address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: waypoint("10.0.9.9:15008", "10.96.0.10:80", "wp"),
        },
        Case {
            name: "service waypoint by VIP",
            resources: vec![
                client().address(),
                web_svc.clone().waypoint(gw_ip("10.96.0.99")).address(),
                web1.address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: waypoint("10.0.9.9:15008", "10.96.0.10:80", "wp"),
        },
        Case {
            name: "service waypoint is used even when the service has no endpoints",
            resources: vec![
                client().address(),
                web_svc.clone().waypoint(gw_host("wp")).address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: waypoint("10.0.9.9:15008", "10.96.0.10:80", "wp"),
        },
        Case {
            name: "waypoint service need not declare the HBONE port",
            resources: vec![
                client().address(),
                web_svc.clone().waypoint(gw_host("wp")).address(),
                S::new("wp", &["10.96.0.99"], &[]).address(),
                W::new("wp", &["10.0.9.9"]).svc("wp", &[]).address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: waypoint("10.0.9.9:15008", "10.96.0.10:80", "wp"),
        },
        Case {
            name: "source is the service's waypoint: straight to an endpoint",
            resources: vec![
                client().address(),
                web_svc.clone().waypoint(gw_host("wp")).address(),
                web1.address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: wp.clone(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "workload waypoint by workload IP",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_ip("10.0.9.9")).address(),
                wp.address(),
            ],
            source: client(),
            target: "10.0.0.2:8080",
            want: waypoint("10.0.9.9:15008", "10.0.0.2:8080", "wp"),
        },
        Case {
            name: "workload waypoint by hostname",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_host("wp")).address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: client(),
            target: "10.0.0.2:8080",
            want: waypoint("10.0.9.9:15008", "10.0.0.2:8080", "wp"),
        },
        Case {
            name: "source is the workload's waypoint: direct",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_host("wp")).address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: wp.clone(),
            target: "10.0.0.2:8080",
            want: hbone("10.0.0.2:15008", "10.0.0.2:8080", "server"),
        },
        Case {
            name: "another workload with the waypoint's identity is not the waypoint",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_host("wp")).address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: W::new("wp", &["10.0.9.10"])
                .node("n2")
                .with_uid("c1//Pod/ns/wp-impostor"),
            target: "10.0.0.2:8080",
            want: waypoint("10.0.9.9:15008", "10.0.0.2:8080", "wp"),
        },
        Case {
            name: "waypoint by workload IP: a workload sharing its identity is not it",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_ip("10.0.9.9")).address(),
                wp.address(),
            ],
            source: W::new("wp", &["10.0.9.10"]).with_uid("c1//Pod/ns/wp-impostor"),
            target: "10.0.0.2:8080",
            want: waypoint("10.0.9.9:15008", "10.0.0.2:8080", "wp"),
        },
        Case {
            name: "waypoint by workload IP: the waypoint itself goes direct",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_ip("10.0.9.9")).address(),
                wp.address(),
            ],
            source: wp.clone(),
            target: "10.0.0.2:8080",
            want: hbone("10.0.0.2:15008", "10.0.0.2:8080", "server"),
        },
        Case {
            name: "service-addressed traffic ignores the endpoint's workload waypoint",
            resources: vec![
                client().address(),
                web_svc.address(),
                web1.clone().waypoint(gw_host("wp")).address(),
                wp_svc.address(),
                wp.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "unknown waypoint is refused, never bypassed",
            resources: vec![
                client().address(),
                web_svc.clone().waypoint(gw_host("missing")).address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Err(RouteError::UnknownWaypoint {
                waypoint: svc_key("missing"),
            }),
        },
        Case {
            name: "waypoint with no healthy endpoint is refused",
            resources: vec![
                client().address(),
                server.clone().waypoint(gw_host("wp")).address(),
                wp_svc.address(),
                wp.clone().unhealthy().address(),
            ],
            source: client(),
            target: "10.0.0.2:8080",
            want: Want::Err(RouteError::NoHealthyWaypoint {
                waypoint: svc_key("wp"),
            }),
        },
        Case {
            name: "unknown IP: passthrough",
            resources: vec![client().address(), server.address()],
            source: client(),
            target: "93.184.216.34:443",
            want: Want::Passthrough("93.184.216.34:443"),
        },
        Case {
            name: "workload on another network is not this address",
            resources: vec![
                client().address(),
                server.clone().network("remote").address(),
            ],
            source: client(),
            target: "10.0.0.2:8080",
            want: Want::Passthrough("10.0.0.2:8080"),
        },
        Case {
            name: "IPv6 workload IP",
            resources: vec![
                client().address(),
                W::new("server6", &["fd00::2"]).address(),
            ],
            source: client(),
            target: "[fd00::2]:8080",
            want: hbone("[fd00::2]:15008", "[fd00::2]:8080", "server6"),
        },
        Case {
            name: "IPv6 VIP picks the dual-stack endpoint's IPv6 address",
            resources: vec![
                client().address(),
                S::new("web", &["10.96.0.10", "fd00:96::10"], &[(80, 8080)]).address(),
                W::new("web1", &["10.0.1.1", "fd00::1:1"])
                    .svc("web", &[(80, 8080)])
                    .address(),
            ],
            source: client(),
            target: "[fd00:96::10]:80",
            want: hbone("[fd00::1:1]:15008", "[fd00::1:1]:8080", "web1"),
        },
        Case {
            name: "IPv4 VIP picks the dual-stack endpoint's IPv4 address",
            resources: vec![
                client().address(),
                S::new("web", &["10.96.0.10", "fd00:96::10"], &[(80, 8080)]).address(),
                W::new("web1", &["fd00::1:1", "10.0.1.1"])
                    .svc("web", &[(80, 8080)])
                    .address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "IPV6_ONLY service sends an IPv4 client to the IPv6 address",
            resources: vec![
                client().address(),
                S::new("web", &["10.96.0.10"], &[(80, 8080)])
                    .families(pb::IpFamilies::Ipv6Only)
                    .address(),
                W::new("web1", &["10.0.1.1", "fd00::1:1"])
                    .svc("web", &[(80, 8080)])
                    .address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("[fd00::1:1]:15008", "[fd00::1:1]:8080", "web1"),
        },
        Case {
            name: "IPv4-mapped IPv6 target is looked up as IPv4",
            resources: vec![client().address(), server.address()],
            source: client(),
            target: "[::ffff:10.0.0.2]:8080",
            want: hbone("10.0.0.2:15008", "10.0.0.2:8080", "server"),
        },
        Case {
            name: "STRICT node locality keeps traffic on the client's node",
            resources: vec![
                client().address(),
                web_svc
                    .clone()
                    .lb(|lb| {
                        lb.mode = pb::load_balancing::Mode::Strict as i32;
                        lb.routing_preference = vec![pb::load_balancing::Scope::Node as i32];
                    })
                    .address(),
                W::new("a-far", &["10.0.1.2"])
                    .node("n2")
                    .svc("web", &[(80, 8080)])
                    .address(),
                web1.address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.1:15008", "10.0.1.1:8080", "web1"),
        },
        Case {
            name: "STRICT with no endpoint on the node is refused",
            resources: vec![
                client().address(),
                web_svc
                    .clone()
                    .lb(|lb| {
                        lb.mode = pb::load_balancing::Mode::Strict as i32;
                        lb.routing_preference = vec![pb::load_balancing::Scope::Node as i32];
                    })
                    .address(),
                web1.clone().node("n2").address(),
            ],
            source: client(),
            target: "10.96.0.10:80",
            want: Want::Err(gone.clone()),
        },
        Case {
            name: "FAILOVER prefers the closest zone, falls back when it is empty",
            resources: vec![
                client().zone("r1", "z1").address(),
                web_svc
                    .clone()
                    .lb(|lb| {
                        lb.mode = pb::load_balancing::Mode::Failover as i32;
                        lb.routing_preference = vec![
                            pb::load_balancing::Scope::Region as i32,
                            pb::load_balancing::Scope::Zone as i32,
                        ];
                    })
                    .address(),
                W::new("a-other-region", &["10.0.1.3"])
                    .zone("r2", "z1")
                    .svc("web", &[(80, 8080)])
                    .address(),
                W::new("b-same-region", &["10.0.1.2"])
                    .zone("r1", "z2")
                    .svc("web", &[(80, 8080)])
                    .address(),
            ],
            source: client().zone("r1", "z1"),
            target: "10.96.0.10:80",
            want: hbone("10.0.1.2:15008", "10.0.1.2:8080", "b-same-region"),
        },
    ]
}

impl W {
    fn with_uid(mut self, uid: &str) -> Self {
        self.0.uid = uid.into();
        self
    }
}

#[test]
fn destination_selection() {
    for case in routing_cases() {
        let st = build(&case.resources);
        let got = st.route(&case.source.validated(), sa(case.target));
        check(&case, got);
    }
}

#[test]
fn round_robin_spreads_over_healthy_endpoints() {
    let mut resources = vec![
        client().address(),
        S::new("web", &["10.96.0.10"], &[(80, 8080)]).address(),
        W::new("sick", &["10.0.1.9"])
            .unhealthy()
            .svc("web", &[(80, 8080)])
            .address(),
    ];
    for (name, addr) in [("e1", "10.0.1.1"), ("e2", "10.0.1.2"), ("e3", "10.0.1.3")] {
        resources.push(W::new(name, &[addr]).svc("web", &[(80, 8080)]).address());
    }
    let st = build(&resources);
    let source = client().validated();
    let picks: Vec<String> = (0..7)
        .map(|_| match st.route(&source, sa("10.96.0.10:80")) {
            Ok(Route::Upstream(up)) => up.peer.name.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Every healthy endpoint in turn, in a stable order, and the sick one never.
    assert_eq!(picks, ["e1", "e2", "e3", "e1", "e2", "e3", "e1"]);
}

#[test]
fn round_robin_cursor_survives_a_service_update() {
    let svc = S::new("web", &["10.96.0.10"], &[(80, 8080)]);
    let st_resources = vec![
        client().address(),
        svc.address(),
        W::new("e1", &["10.0.1.1"])
            .svc("web", &[(80, 8080)])
            .address(),
        W::new("e2", &["10.0.1.2"])
            .svc("web", &[(80, 8080)])
            .address(),
    ];
    let mut st = build(&st_resources);
    let source = client().validated();
    let next = |st: &ProxyState| match st.route(&source, sa("10.96.0.10:80")) {
        Ok(Route::Upstream(up)) => up.peer.name.clone(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(next(&st), "e1");
    // A push of the same service must not send the next connection to e1 again.
    let (name, addr) = svc.address();
    st.apply_address(&name, Some(&addr)).unwrap();
    assert_eq!(next(&st), "e2");
}

#[test]
fn workload_before_service_becomes_an_endpoint() {
    let mut st = ProxyState::new();
    let source = client().validated();
    let (n, a) = W::new("web1", &["10.0.1.1"])
        .svc("web", &[(80, 8080)])
        .address();
    st.apply_address(&n, Some(&a)).unwrap();
    assert_eq!(
        st.route(&source, sa("10.96.0.10:80")),
        Ok(Route::Passthrough(sa("10.96.0.10:80")))
    );
    let (n, a) = S::new("web", &["10.96.0.10"], &[(80, 8080)]).address();
    st.apply_address(&n, Some(&a)).unwrap();
    match st.route(&source, sa("10.96.0.10:80")) {
        Ok(Route::Upstream(up)) => {
            assert_eq!(up.connect_to, sa("10.0.1.1:15008"));
            assert_eq!(
                up.destination_service.map(|s| s.hostname),
                Some("web.ns.svc.cluster.local".to_string())
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn removals_and_updates_reindex() {
    let source = client().validated();
    let svc = S::new("web", &["10.96.0.10"], &[(80, 8080)]);
    let web1 = W::new("web1", &["10.0.1.1"]).svc("web", &[(80, 8080)]);
    let mut st = build(&[client().address(), svc.address(), web1.address()]);
    let route = |st: &ProxyState, t: &str| st.route(&source, sa(t));

    // Workload moves to a new IP and leaves the service.
    let moved = W::new("web1", &["10.0.1.100"]);
    let (n, a) = moved.address();
    st.apply_address(&n, Some(&a)).unwrap();
    assert_eq!(
        route(&st, "10.0.1.1:8080"),
        Ok(Route::Passthrough(sa("10.0.1.1:8080"))),
        "old IP unindexed"
    );
    assert!(
        matches!(route(&st, "10.0.1.100:8080"), Ok(Route::Upstream(ref up)) if up.peer.name == "web1"),
        "new IP indexed"
    );
    assert_eq!(
        route(&st, "10.96.0.10:80"),
        Err(RouteError::NoHealthyEndpoint {
            service: svc_key("web"),
            port: 80
        }),
        "no longer an endpoint"
    );
    assert_eq!(st.endpoints(&svc_key("web")).count(), 0);

    // Workload removed: unknown everywhere.
    st.apply_address(&n, None).unwrap();
    assert!(st.workload_by_uid(&uid(NS, "web1")).is_none());
    assert_eq!(
        route(&st, "10.0.1.100:8080"),
        Ok(Route::Passthrough(sa("10.0.1.100:8080")))
    );

    // Service removed: its VIP is no longer the mesh's.
    let (sn, _) = svc.address();
    st.apply_address(&sn, None).unwrap();
    assert!(st.service(&svc_key("web")).is_none());
    assert_eq!(
        route(&st, "10.96.0.10:80"),
        Ok(Route::Passthrough(sa("10.96.0.10:80")))
    );

    // Removing something unknown is harmless.
    st.apply_address("nope", None).unwrap();
    assert_eq!(st.workloads().count(), 1);
}

#[test]
fn service_vip_change_reindexes() {
    let source = client().validated();
    let web1 = W::new("web1", &["10.0.1.1"]).svc("web", &[(80, 8080)]);
    let mut st = build(&[
        client().address(),
        S::new("web", &["10.96.0.10"], &[(80, 8080)]).address(),
        web1.address(),
    ]);
    let (n, a) = S::new("web", &["10.96.0.20"], &[(80, 8080)]).address();
    st.apply_address(&n, Some(&a)).unwrap();
    assert_eq!(
        st.route(&source, sa("10.96.0.10:80")),
        Ok(Route::Passthrough(sa("10.96.0.10:80")))
    );
    assert!(matches!(
        st.route(&source, sa("10.96.0.20:80")),
        Ok(Route::Upstream(ref up)) if up.connect_to == sa("10.0.1.1:15008")
    ));
}

#[test]
fn removal_by_conventional_name_and_name_reuse() {
    let mut st = ProxyState::new();
    // Applied under an unconventional name, removed by that name.
    let (_, a) = W::new("p", &["10.0.0.5"]).address();
    st.apply_address("custom-name", Some(&a)).unwrap();
    st.apply_address("custom-name", None).unwrap();
    assert!(st.workload_by_ip("", ip("10.0.0.5")).is_none());

    // A name that switches from a workload to a service drops the workload.
    st.apply_address("x", Some(&a)).unwrap();
    let (_, s) = S::new("web", &["10.96.0.10"], &[(80, 80)]).address();
    st.apply_address("x", Some(&s)).unwrap();
    assert!(st.workload_by_ip("", ip("10.0.0.5")).is_none());
    assert!(st.service(&svc_key("web")).is_some());
    st.apply_address("x", None).unwrap();
    assert!(st.service(&svc_key("web")).is_none());
}

#[test]
fn malformed_resources_are_rejected_and_the_previous_version_kept() {
    let good = W::new("p", &["10.0.0.5"]);
    let bad_workloads: Vec<(&str, pb::Workload, ResourceError)> = vec![
        (
            "address of 5 bytes",
            pb::Workload {
                addresses: vec![vec![10, 0, 0, 5, 1]],
                ..good.0.clone()
            },
            ResourceError::AddressLength {
                field: "workload.addresses",
                len: 5,
            },
        ),
        (
            "empty address",
            pb::Workload {
                addresses: vec![vec![]],
                ..good.0.clone()
            },
            ResourceError::AddressLength {
                field: "workload.addresses",
                len: 0,
            },
        ),
        (
            "no uid",
            pb::Workload {
                uid: String::new(),
                ..good.0.clone()
            },
            ResourceError::Missing("workload.uid"),
        ),
        (
            "no namespace",
            pb::Workload {
                namespace: String::new(),
                ..good.0.clone()
            },
            ResourceError::Missing("workload.namespace"),
        ),
        (
            "legacy Istio mTLS",
            pb::Workload {
                tunnel_protocol: pb::TunnelProtocol::LegacyIstioMtls as i32,
                ..good.0.clone()
            },
            ResourceError::Enum {
                field: "workload.tunnel_protocol",
                value: 2,
            },
        ),
        (
            "unknown status",
            pb::Workload {
                status: 7,
                ..good.0.clone()
            },
            ResourceError::Enum {
                field: "workload.status",
                value: 7,
            },
        ),
        (
            "waypoint without destination",
            pb::Workload {
                waypoint: Some(pb::GatewayAddress::default()),
                ..good.0.clone()
            },
            ResourceError::Missing("workload.waypoint"),
        ),
        (
            "service key without slash",
            with_service(&good.0, "web", (80, 80)),
            ResourceError::ServiceKey("web".into()),
        ),
        (
            "port out of range",
            with_service(&good.0, "ns/web", (80, 70_000)),
            ResourceError::Port {
                field: "workload.services.target_port",
                value: 70_000,
            },
        ),
        (
            "invalid service account",
            pb::Workload {
                service_account: "a/b".into(),
                ..good.0.clone()
            },
            ResourceError::Identity(meshbox_certs::SpiffeIdError::Segment {
                what: "service account",
                value: "a/b".into(),
            }),
        ),
    ];
    let good_service = S::new("web", &["10.96.0.10"], &[(80, 8080)]);
    let bad_services: Vec<(&str, pb::Service, ResourceError)> = vec![
        (
            "VIP of 3 bytes",
            pb::Service {
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0],
                    length: None,
                }],
                ..good_service.0.clone()
            },
            ResourceError::AddressLength {
                field: "service.addresses",
                len: 3,
            },
        ),
        (
            "prefix longer than the address",
            pb::Service {
                addresses: vec![pb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 1],
                    length: Some(33),
                }],
                ..good_service.0.clone()
            },
            ResourceError::PrefixLength {
                field: "service.addresses",
                len: 33,
            },
        ),
        (
            "no hostname",
            pb::Service {
                hostname: String::new(),
                ..good_service.0.clone()
            },
            ResourceError::Missing("service.hostname"),
        ),
        (
            "unknown load balancing mode",
            pb::Service {
                load_balancing: Some(pb::LoadBalancing {
                    mode: 42,
                    ..Default::default()
                }),
                ..good_service.0.clone()
            },
            ResourceError::Enum {
                field: "service.load_balancing.mode",
                value: 42,
            },
        ),
        (
            "service port out of range",
            pb::Service {
                ports: vec![pb::Port {
                    service_port: 65_536,
                    target_port: 80,
                    app_protocol: 0,
                }],
                ..good_service.0.clone()
            },
            ResourceError::Port {
                field: "service.ports.service_port",
                value: 65_536,
            },
        ),
    ];

    let source = client().validated();
    let mut st = build(&[client().address(), good.address(), good_service.address()]);
    let before_w = st.workload_by_uid(&uid(NS, "p")).cloned();
    let before_s = st.service(&svc_key("web")).cloned();
    for (name, w, want) in bad_workloads {
        let r = pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        };
        assert_eq!(
            st.apply_address(&uid(NS, "p"), Some(&r)),
            Err(want),
            "{name}"
        );
        assert_eq!(
            st.workload_by_uid(&uid(NS, "p")).cloned(),
            before_w,
            "{name}: kept"
        );
        assert!(
            matches!(st.route(&source, sa("10.0.0.5:80")), Ok(Route::Upstream(_))),
            "{name}: still routed"
        );
    }
    for (name, s, want) in bad_services {
        let r = pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        };
        assert_eq!(
            st.apply_address(&svc_key("web"), Some(&r)),
            Err(want),
            "{name}"
        );
        assert_eq!(
            st.service(&svc_key("web")).cloned(),
            before_s,
            "{name}: kept"
        );
    }
    assert_eq!(
        st.apply_address("x", Some(&pb::Address { r#type: None })),
        Err(ResourceError::Missing("address.type"))
    );
}

fn with_service(w: &pb::Workload, key: &str, port: (u32, u32)) -> pb::Workload {
    let mut w = w.clone();
    w.services.insert(key.into(), port_list(&[port]));
    w
}

#[test]
fn cidr_service_addresses_are_ignored_not_fatal() {
    let mut s = S::new("ext", &["10.96.0.10"], &[(443, 443)]);
    s.0.addresses.push(pb::NetworkAddress {
        network: String::new(),
        address: vec![192, 168, 0, 0],
        length: Some(16),
    });
    let st = build(&[s.address()]);
    let svc = st.service(&svc_key("ext")).unwrap();
    assert_eq!(
        svc.vips,
        vec![NetworkIp {
            network: String::new(),
            ip: ip("10.96.0.10")
        }]
    );
    assert!(st.service_by_vip("", ip("192.168.1.1"), NS).is_none());
}

#[test]
fn workload_defaults_and_fields() {
    let mut w = W::new("p", &["10.0.0.5", "fd00::5"]).svc("web", &[(80, 8080), (81, 0)]);
    w.0.trust_domain = String::new();
    w.0.service_account = String::new();
    let v = w.validated();
    assert_eq!(
        v.identity.to_string(),
        "spiffe://cluster.local/ns/ns/sa/default"
    );
    assert_eq!(v.addresses, vec![ip("10.0.0.5"), ip("fd00::5")]);
    // An unresolved (0) target port is not a mapping.
    assert_eq!(
        v.services.get(&svc_key("web")),
        Some(&BTreeMap::from([(80, 8080)]))
    );
}

// ----- inbound lookups -----

#[test]
fn local_workload_lookup() {
    let st = build(&[
        W::new("here", &["10.0.0.5"]).node("n1").address(),
        W::new("there", &["10.0.0.6"]).node("n2").address(),
        W::new("hostnet", &["10.0.0.7"])
            .node("n1")
            .host_network()
            .address(),
        W::new("v6", &["fd00::5"]).node("n1").address(),
    ]);
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("10.0.0.5", "n1", Some("here")),
        ("::ffff:10.0.0.5", "n1", Some("here")),
        ("10.0.0.5", "n2", None),
        ("10.0.0.6", "n1", None),
        ("10.0.0.6", "n2", Some("there")),
        ("10.0.0.7", "n1", None),
        ("10.0.0.8", "n1", None),
        ("fd00::5", "n1", Some("v6")),
    ];
    for &(addr, node, want) in cases {
        let got = st
            .local_workload("", ip(addr), node)
            .map(|w| w.name.as_str());
        assert_eq!(got, want, "{addr} on {node}");
        assert_eq!(
            st.is_local_workload_ip("", ip(addr), node),
            want.is_some(),
            "{addr} on {node}"
        );
    }
    assert_eq!(
        st.workload_by_ip("", ip("10.0.0.6"))
            .map(|w| w.name.as_str()),
        Some("there")
    );
    assert!(st.workload_by_ip("other-net", ip("10.0.0.6")).is_none());
}

#[test]
fn overlapping_ips_prefer_pods_in_the_mesh_and_local_node() {
    let vm = {
        let mut w = W::new("vm", &["10.0.0.5"]).node("n1");
        w.0.uid = "c1//WorkloadEntry/ns/vm".into();
        w
    };
    let plain_pod = W::new("plain", &["10.0.0.5"]).tcp().node("n1");
    let mesh_pod = W::new("mesh", &["10.0.0.5"]).node("n2");
    let st = build(&[vm.address(), plain_pod.address(), mesh_pod.address()]);
    assert_eq!(
        st.workload_by_ip("", ip("10.0.0.5"))
            .map(|w| w.name.as_str()),
        Some("mesh")
    );
    // On n1, only the VM entry and the plain pod claim it; the pod wins.
    assert_eq!(
        st.local_workload("", ip("10.0.0.5"), "n1")
            .map(|w| w.name.as_str()),
        Some("plain")
    );
    // Removing one claimant leaves the others indexed.
    let mut st = st;
    st.apply_address(&uid(NS, "mesh"), None).unwrap();
    assert_eq!(
        st.workload_by_ip("", ip("10.0.0.5"))
            .map(|w| w.name.as_str()),
        Some("plain")
    );
}

#[test]
fn services_of_a_workload() {
    let w = W::new("web1", &["10.0.1.1"])
        .svc("web", &[(80, 8080)])
        .svc("absent", &[(80, 8080)]);
    let st = build(&[
        S::new("web", &["10.96.0.10"], &[(80, 8080)]).address(),
        w.address(),
    ]);
    let w = w.validated();
    let names: Vec<&str> = st.services_of(&w).map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web"]);
}
