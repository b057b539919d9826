//! Services: the Service resource, membership on workloads (selector and
//! EndpointSlice), and how changes stay confined to what they affect.

use meshbox_proto::workload::{
    AppProtocol, IpFamilies, NetworkAddress, Port, Service as XdsService,
};
use serde_json::json;

use super::*;
use crate::model::{Kind, ObjectKey};

fn port(service_port: u32, target_port: u32, app: AppProtocol) -> Port {
    Port {
        service_port,
        target_port,
        app_protocol: app as i32,
    }
}

#[test]
fn service_resource_has_every_field() {
    let mut idx = index();
    let s = service_json(
        "shop",
        "cart",
        "10.96.0.10",
        json!({"app": "cart"}),
        json!([
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "api", "port": 9000, "targetPort": "http-web", "appProtocol": "grpc"},
            {"name": "tcp-db", "port": 5432},
            {"name": "metrics", "port": 9090, "targetPort": "9091"}
        ]),
    );
    let s = set(s, "/spec/clusterIPs", json!(["10.96.0.10", "fd00::10"]));
    let s = set(s, "/spec/ipFamilies", json!(["IPv4", "IPv6"]));
    let changes = idx.apply(service_from(s));
    assert_eq!(
        summary(&changes),
        vec![format!("+{}", svc_name("shop", "cart"))]
    );

    let mut v6 = vec![0xfd, 0];
    v6.extend([0u8; 13]);
    v6.push(0x10);
    let want = XdsService {
        name: "cart".into(),
        namespace: "shop".into(),
        hostname: "cart.shop.svc.cluster.local".into(),
        addresses: vec![
            NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 10],
                length: None,
            },
            NetworkAddress {
                network: String::new(),
                address: v6,
                length: None,
            },
        ],
        ports: vec![
            port(80, 8080, AppProtocol::Http11),
            // Named target ports are resolved per workload.
            port(9000, 0, AppProtocol::Grpc),
            port(5432, 5432, AppProtocol::Tcp),
            port(9090, 9091, AppProtocol::Unknown),
        ],
        ip_families: IpFamilies::Dual as i32,
        canonical: true,
        ..Default::default()
    };
    assert_eq!(xds_service(&idx, "shop", "cart"), Some(want));
}

#[test]
fn workload_port_mappings_resolve_named_target_ports() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service_from(service_json(
                "ns",
                "web",
                "10.96.0.1",
                json!({"app": "web"}),
                json!([
                    {"name": "http", "port": 80, "targetPort": "http-web"},
                    {"name": "metrics", "port": 9090, "targetPort": "metrics"},
                    {"name": "https", "port": 443, "targetPort": 8443},
                    {"name": "plain", "port": 7000}
                ]),
            )),
            pod("ns", "web-1", "10.0.0.1", json!({"app": "web"})),
        ],
    );
    let w = workload(&idx, "ns", "web-1").expect("workload");
    // `metrics` is left out: the pod has no container port of that name.
    assert_eq!(
        service_ports(&w),
        vec![(
            svc_name("ns", "web"),
            vec![(80, 8080), (443, 8443), (7000, 7000)]
        )]
    );
}

#[test]
fn selector_change_updates_exactly_old_and_new_members() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "a1", "10.0.0.1", json!({"app": "a"})),
            pod("ns", "b1", "10.0.0.2", json!({"app": "b"})),
            pod("ns", "c1", "10.0.0.3", json!({"app": "c"})),
            pod("other", "a-elsewhere", "10.0.1.1", json!({"app": "a"})),
        ],
    );
    assert_eq!(
        service_ports(&workload(&idx, "ns", "a1").expect("a1")).len(),
        1
    );
    assert!(
        workload(&idx, "other", "a-elsewhere")
            .expect("x")
            .services
            .is_empty()
    );

    let changes = idx.apply(service("ns", "svc", "10.96.0.1", json!({"app": "b"})));
    // The Service resource does not carry the selector, so only the two
    // workloads change.
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("ns", "a1")),
            format!("+{}", uid("ns", "b1"))
        ]
    );
    assert!(workload(&idx, "ns", "a1").expect("a1").services.is_empty());
    assert_eq!(
        service_ports(&workload(&idx, "ns", "b1").expect("b1")),
        vec![(svc_name("ns", "svc"), vec![(80, 8080)])]
    );
}

#[test]
fn pod_label_change_moves_it_between_services() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "sa", "10.96.0.1", json!({"app": "a"})),
            service("ns", "sb", "10.96.0.2", json!({"app": "b", "tier": "x"})),
            pod("ns", "p", "10.0.0.1", json!({"app": "a", "tier": "x"})),
            pod("ns", "q", "10.0.0.2", json!({"app": "a"})),
        ],
    );
    let changes = idx.apply(pod("ns", "p", "10.0.0.1", json!({"app": "b", "tier": "x"})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("ns", "p"))]);
    let keys: Vec<String> = service_ports(&workload(&idx, "ns", "p").expect("p"))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![svc_name("ns", "sb")]);
}

#[test]
fn service_port_change_updates_members_and_service() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "a1", "10.0.0.1", json!({"app": "a"})),
            pod("ns", "b1", "10.0.0.2", json!({"app": "b"})),
        ],
    );
    let changes = idx.apply(service_from(service_json(
        "ns",
        "svc",
        "10.96.0.1",
        json!({"app": "a"}),
        json!([{"name": "http", "port": 80, "targetPort": 9999}]),
    )));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("ns", "a1")),
            format!("+{}", svc_name("ns", "svc"))
        ]
    );

    // A VIP change touches only the Service.
    let changes = idx.apply(service_from(service_json(
        "ns",
        "svc",
        "10.96.0.7",
        json!({"app": "a"}),
        json!([{"name": "http", "port": 80, "targetPort": 9999}]),
    )));
    assert_eq!(
        summary(&changes),
        vec![format!("+{}", svc_name("ns", "svc"))]
    );
    assert_eq!(
        idx.lookup_ip("10.96.0.7".parse().expect("ip")),
        vec![svc_name("ns", "svc")]
    );
    assert!(idx.lookup_ip("10.96.0.1".parse().expect("ip")).is_empty());
}

#[test]
fn service_deletion_removes_resource_and_memberships() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "a1", "10.0.0.1", json!({"app": "a"})),
        ],
    );
    let changes = idx.delete(ObjectKey::service("ns", "svc"));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("ns", "a1")),
            format!("-{}", svc_name("ns", "svc"))
        ]
    );
    assert!(workload(&idx, "ns", "a1").expect("a1").services.is_empty());
}

#[test]
fn headless_service_has_no_vip_but_keeps_members() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "db", "None", json!({"app": "db"})),
            pod("ns", "db-0", "10.0.0.1", json!({"app": "db"})),
        ],
    );
    let s = xds_service(&idx, "ns", "db").expect("service");
    assert!(s.addresses.is_empty());
    assert_eq!(
        service_ports(&workload(&idx, "ns", "db-0").expect("db-0")),
        vec![(svc_name("ns", "db"), vec![(80, 8080)])]
    );
}

#[test]
fn load_balancer_ingress_ips_are_vips() {
    let mut idx = index();
    let s = service_json(
        "ns",
        "lb",
        "10.96.0.1",
        json!({"app": "a"}),
        json!([{"port": 80}]),
    );
    let s = set(s, "/spec/type", json!("LoadBalancer"));
    let s = set(
        s,
        "/status/loadBalancer/ingress",
        json!([{"ip": "192.0.2.7"}, {"hostname": "lb.example.com"}]),
    );
    idx.apply(service_from(s));
    let addrs: Vec<Vec<u8>> = xds_service(&idx, "ns", "lb")
        .expect("lb")
        .addresses
        .into_iter()
        .map(|a| a.address)
        .collect();
    assert_eq!(addrs, vec![vec![10, 96, 0, 1], vec![192, 0, 2, 7]]);
    assert_eq!(
        idx.lookup_ip("192.0.2.7".parse().expect("ip")),
        vec![svc_name("ns", "lb")]
    );
}

#[test]
fn invalid_service_values_are_reported() {
    let mut idx = index();
    let s = service_json(
        "ns",
        "bad",
        "not-an-ip",
        json!({}),
        json!([{"name": "zero", "port": 0}, {"name": "ok", "port": 80}]),
    );
    idx.apply(service_from(s));
    let s = xds_service(&idx, "ns", "bad").expect("served anyway");
    assert!(s.addresses.is_empty());
    assert_eq!(s.ports.len(), 1);
    assert_eq!(statuses_of(&idx, Kind::Service, "ns", "bad").len(), 2);
}

#[test]
fn endpoint_slices_give_members_to_selectorless_services() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service_from(service_json(
                "ns",
                "ext",
                "10.96.0.5",
                json!(null),
                json!([{"name": "http", "port": 80, "targetPort": 8080}, {"name": "admin", "port": 81, "targetPort": "admin"}]),
            )),
            pod("ns", "p1", "10.0.0.1", json!({})),
            pod("ns", "p2", "10.0.0.2", json!({})),
            pod("ns", "p3", "10.0.0.3", json!({})),
        ],
    );
    let changes = idx.apply(slice(
        "ns",
        "ext-abc",
        "ext",
        json!([
            {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "p1", "namespace": "ns"}},
            {"addresses": ["10.0.0.2"]},
            {"addresses": ["192.0.2.1"]}
        ]),
        json!([{"name": "http", "port": 9000}]),
    ));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("ns", "p1")),
            format!("+{}", uid("ns", "p2"))
        ]
    );
    // The slice's port wins over targetPort; a named target port the slice
    // does not list cannot be resolved.
    for p in ["p1", "p2"] {
        assert_eq!(
            service_ports(&workload(&idx, "ns", p).expect(p)),
            vec![(svc_name("ns", "ext"), vec![(80, 9000)])],
            "{p}"
        );
    }
    assert!(workload(&idx, "ns", "p3").expect("p3").services.is_empty());

    // p2 was matched by IP: a new IP drops it.
    let changes = idx.apply(pod("ns", "p2", "10.0.0.22", json!({})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("ns", "p2"))]);
    assert!(workload(&idx, "ns", "p2").expect("p2").services.is_empty());

    // A pod that appears later with a referenced IP joins.
    let changes = idx.apply(pod("ns", "late", "192.0.2.1", json!({})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("ns", "late"))]);
    assert_eq!(
        service_ports(&workload(&idx, "ns", "late").expect("late")).len(),
        1
    );

    let changes = idx.delete(ObjectKey::endpoint_slice("ns", "ext-abc"));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("ns", "late")),
            format!("+{}", uid("ns", "p1"))
        ]
    );
    assert!(workload(&idx, "ns", "p1").expect("p1").services.is_empty());
}

#[test]
fn slices_of_selector_services_do_not_duplicate_membership() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "a1", "10.0.0.1", json!({"app": "a"})),
            pod("ns", "stray", "10.0.0.2", json!({})),
        ],
    );
    let changes = idx.apply(slice(
        "ns",
        "svc-xyz",
        "svc",
        json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]),
        json!([{"name": "http", "port": 1234}]),
    ));
    assert!(changes.is_empty(), "{:?}", summary(&changes));
    assert_eq!(
        service_ports(&workload(&idx, "ns", "a1").expect("a1")),
        vec![(svc_name("ns", "svc"), vec![(80, 8080)])]
    );
}

#[test]
fn selectorless_service_created_after_its_slice() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            pod("ns", "p1", "10.0.0.1", json!({})),
            slice(
                "ns",
                "late-1",
                "late",
                json!([{"addresses": ["10.0.0.1"]}]),
                json!([{"name": "", "port": 7000}]),
            ),
        ],
    );
    assert!(workload(&idx, "ns", "p1").expect("p1").services.is_empty());
    let changes = idx.apply(service_from(service_json(
        "ns",
        "late",
        "10.96.0.9",
        json!({}),
        json!([{"port": 70}]),
    )));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("ns", "p1")),
            format!("+{}", svc_name("ns", "late"))
        ]
    );
    assert_eq!(
        service_ports(&workload(&idx, "ns", "p1").expect("p1")),
        vec![(svc_name("ns", "late"), vec![(70, 7000)])]
    );
}

#[test]
fn lookup_ip_finds_workloads_and_services() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            service("ns", "svc", "10.96.0.1", json!({"app": "a"})),
            pod("ns", "a1", "10.0.0.1", json!({"app": "a"})),
            pod_from(set(
                pod_json("ns", "host", "192.168.1.10", json!({})),
                "/spec/hostNetwork",
                json!(true),
            )),
            pod_from(set(
                pod_json("ns", "pending", "10.0.0.7", json!({})),
                "/status/phase",
                json!("Pending"),
            )),
        ],
    );
    let ip = |s: &str| s.parse().expect("ip");
    assert_eq!(idx.lookup_ip(ip("10.0.0.1")), vec![uid("ns", "a1")]);
    assert_eq!(idx.lookup_ip(ip("10.96.0.1")), vec![svc_name("ns", "svc")]);
    // Host-network workloads share the node's IP; not looked up by it.
    assert!(workload(&idx, "ns", "host").is_some());
    assert!(idx.lookup_ip(ip("192.168.1.10")).is_empty());
    // No workload, nothing to find.
    assert!(idx.lookup_ip(ip("10.0.0.7")).is_empty());
    assert!(idx.lookup_ip(ip("10.9.9.9")).is_empty());
}
