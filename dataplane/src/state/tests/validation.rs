//! Validation on arrival: malformed resources are rejected and the previous
//! version kept; what is ignored rather than fatal; defaults.

use super::*;

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
