//! Destination selection: table cases (workload, service VIP to endpoint,
//! waypoint, passthrough, errors) and round-robin over endpoints.

use super::*;

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
