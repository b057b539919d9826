//! Waypoints: who gets one, where it is reached, and what happens when it is
//! missing, appears, changes or goes away.

use meshbox_proto::workload::{
    GatewayAddress, NamespacedHostname, NetworkAddress, gateway_address,
};
use serde_json::json;

use super::*;
use crate::model::{Kind, ObjectKey, WaypointFor, WaypointInfo};

fn by_hostname(ns: &str, name: &str) -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
        })),
        hbone_mtls_port: 15008,
    }
}

/// Namespace `app` using waypoint `wp` (with `for` label) from a namespace
/// label, one service and one pod selected by it.
fn app_with_waypoint(waypoint_for: Option<&str>) -> MeshIndex {
    let mut idx = index();
    let labels = match waypoint_for {
        Some(f) => json!({"istio.io/waypoint-for": f}),
        None => json!({}),
    };
    let mut objs = vec![
        namespace(
            "app",
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
        ),
        service("app", "web", "10.96.0.1", json!({"app": "web"})),
        pod("app", "web-1", "10.0.0.1", json!({"app": "web"})),
    ];
    objs.extend(waypoint("app", "wp", labels, "10.96.0.100"));
    apply_all(&mut idx, objs);
    idx
}

#[test]
fn waypoint_for_decides_who_gets_it() {
    let cases = [
        (None, true, false),
        (Some("service"), true, false),
        (Some("workload"), false, true),
        (Some("all"), true, true),
        (Some("none"), false, false),
    ];
    for (waypoint_for, on_service, on_workload) in cases {
        let idx = app_with_waypoint(waypoint_for);
        let want = |yes: bool| yes.then(|| by_hostname("app", "wp"));
        assert_eq!(
            xds_service(&idx, "app", "web").expect("svc").waypoint,
            want(on_service),
            "{waypoint_for:?}"
        );
        assert_eq!(
            workload(&idx, "app", "web-1").expect("wl").waypoint,
            want(on_workload),
            "{waypoint_for:?}"
        );
        // A namespace-wide label that does not fit a kind is not a problem.
        assert_eq!(
            statuses_of(&idx, Kind::Pod, "app", "web-1"),
            Vec::<String>::new()
        );
    }
}

#[test]
fn waypoints_own_pods_and_service_never_use_it() {
    let mut idx = app_with_waypoint(Some("all"));
    let wp_pod = pod_json(
        "app",
        "wp-7f8d9-abcde",
        "10.0.0.50",
        json!({"gateway.networking.k8s.io/gateway-name": "wp"}),
    );
    idx.apply(pod_from(wp_pod));
    assert_eq!(
        workload(&idx, "app", "wp-7f8d9-abcde")
            .expect("wp pod")
            .waypoint,
        None
    );
    assert_eq!(
        xds_service(&idx, "app", "wp").expect("wp svc").waypoint,
        None
    );
    assert_eq!(
        xds_service(&idx, "app", "web").expect("web").waypoint,
        Some(by_hostname("app", "wp"))
    );
}

#[test]
fn unlabelled_waypoint_service_still_never_uses_itself() {
    // A hand-written manifest: the waypoint's Service carries no gateway
    // labels, and the namespace sends services to that waypoint.
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            namespace("app", json!({"istio.io/use-waypoint": "wp"})),
            gateway_from(waypoint_json("app", "wp", json!({}))),
            service("app", "wp", "10.96.0.100", json!({"app": "wp"})),
            service("app", "web", "10.96.0.1", json!({"app": "web"})),
        ],
    );
    assert_eq!(xds_service(&idx, "app", "wp").expect("wp").waypoint, None);
    assert_eq!(
        xds_service(&idx, "app", "web").expect("web").waypoint,
        Some(by_hostname("app", "wp"))
    );
    // Once it is no longer a waypoint, it is an ordinary service.
    let changes = idx.delete(ObjectKey::gateway("app", "wp"));
    assert_eq!(
        summary(&changes),
        vec![format!("+{}", svc_name("app", "web"))]
    );
}

#[test]
fn most_specific_label_wins_and_none_disables() {
    let mut idx = app_with_waypoint(Some("all"));
    let mut objs = waypoint(
        "app",
        "special",
        json!({"istio.io/waypoint-for": "all"}),
        "10.96.0.101",
    );
    objs.push(pod(
        "app",
        "own",
        "10.0.0.2",
        json!({"istio.io/use-waypoint": "special"}),
    ));
    objs.push(pod(
        "app",
        "optout",
        "10.0.0.3",
        json!({"istio.io/use-waypoint": "none"}),
    ));
    let s = set(
        service_json(
            "app",
            "direct",
            "10.96.0.2",
            json!({"x": "y"}),
            json!([{"port": 80}]),
        ),
        "/metadata/labels",
        json!({"istio.io/use-waypoint": "none"}),
    );
    objs.push(service_from(s));
    let s = set(
        service_json(
            "app",
            "svc-special",
            "10.96.0.3",
            json!({"x": "z"}),
            json!([{"port": 80}]),
        ),
        "/metadata/labels",
        json!({"istio.io/use-waypoint": "special"}),
    );
    objs.push(service_from(s));
    apply_all(&mut idx, objs);

    assert_eq!(
        workload(&idx, "app", "own").expect("own").waypoint,
        Some(by_hostname("app", "special"))
    );
    assert_eq!(
        workload(&idx, "app", "optout").expect("optout").waypoint,
        None
    );
    assert_eq!(
        workload(&idx, "app", "web-1").expect("web-1").waypoint,
        Some(by_hostname("app", "wp"))
    );
    assert_eq!(
        xds_service(&idx, "app", "direct").expect("direct").waypoint,
        None
    );
    assert_eq!(
        xds_service(&idx, "app", "svc-special").expect("s").waypoint,
        Some(by_hostname("app", "special"))
    );
}

#[test]
fn missing_waypoint_goes_direct_with_status_until_it_appears() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            namespace("app", json!({"istio.io/use-waypoint": "wp"})),
            service("app", "web", "10.96.0.1", json!({"app": "web"})),
            pod(
                "app",
                "pinned",
                "10.0.0.2",
                json!({"istio.io/use-waypoint": "later"}),
            ),
        ],
    );
    assert_eq!(xds_service(&idx, "app", "web").expect("web").waypoint, None);
    assert_eq!(
        statuses_of(&idx, Kind::Namespace, "", "app"),
        vec!["waypoint app/wp not found; traffic goes direct".to_string()]
    );
    assert_eq!(
        statuses_of(&idx, Kind::Pod, "app", "pinned"),
        vec!["waypoint app/later not found; traffic goes direct".to_string()]
    );
    // Reported once on the namespace, not once per object using it.
    assert!(statuses_of(&idx, Kind::Service, "app", "web").is_empty());

    let changes = apply_all(&mut idx, waypoint("app", "wp", json!({}), "10.96.0.100"));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", svc_name("app", "web")),
            format!("+{}", svc_name("app", "wp"))
        ]
    );
    assert_eq!(
        xds_service(&idx, "app", "web").expect("web").waypoint,
        Some(by_hostname("app", "wp"))
    );
    assert!(statuses_of(&idx, Kind::Namespace, "", "app").is_empty());

    let changes = apply_all(
        &mut idx,
        waypoint(
            "app",
            "later",
            json!({"istio.io/waypoint-for": "workload"}),
            "10.96.0.101",
        ),
    );
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("app", "pinned")),
            format!("+{}", svc_name("app", "later"))
        ]
    );
    assert_eq!(
        workload(&idx, "app", "pinned").expect("pinned").waypoint,
        Some(by_hostname("app", "later"))
    );
    assert!(statuses_of(&idx, Kind::Pod, "app", "pinned").is_empty());
}

#[test]
fn deleting_the_waypoint_removes_it_everywhere() {
    let mut idx = app_with_waypoint(Some("all"));
    idx.apply(pod("app", "web-2", "10.0.0.2", json!({"app": "web"})));
    let changes = idx.delete(ObjectKey::gateway("app", "wp"));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("app", "web-1")),
            format!("+{}", uid("app", "web-2")),
            format!("+{}", svc_name("app", "web")),
        ]
    );
    assert_eq!(workload(&idx, "app", "web-1").expect("w").waypoint, None);
    assert_eq!(xds_service(&idx, "app", "web").expect("s").waypoint, None);
    assert_eq!(statuses_of(&idx, Kind::Namespace, "", "app").len(), 1);
    assert!(idx.waypoints().is_empty());
}

#[test]
fn waypoint_class_or_for_change_updates_users() {
    let mut idx = app_with_waypoint(None);
    // service → workload: the service loses it, the workload gains it.
    let changes = idx.apply(gateway_from(waypoint_json(
        "app",
        "wp",
        json!({"istio.io/waypoint-for": "workload"}),
    )));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("app", "web-1")),
            format!("+{}", svc_name("app", "web"))
        ]
    );
    // Not a waypoint class any more: nobody uses it, and the namespace says why.
    let gw = set(
        waypoint_json("app", "wp", json!({})),
        "/spec/gatewayClassName",
        json!("istio"),
    );
    idx.apply(gateway_from(gw));
    assert_eq!(workload(&idx, "app", "web-1").expect("w").waypoint, None);
    assert_eq!(xds_service(&idx, "app", "web").expect("s").waypoint, None);
    assert!(statuses_of(&idx, Kind::Namespace, "", "app")[0].contains("not a waypoint class"));
}

#[test]
fn waypoint_address_from_status_when_no_service() {
    let cases = [
        (
            json!([{"type": "IPAddress", "value": "10.96.0.100"}]),
            Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 100],
                length: None,
            })),
            vec!["10.96.0.100".to_string()],
        ),
        (
            json!([{"value": "10.96.0.100"}]),
            Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 100],
                length: None,
            })),
            vec!["10.96.0.100".to_string()],
        ),
        (
            json!([{"type": "Hostname", "value": "wp.app.svc.cluster.local"}]),
            Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "app".into(),
                hostname: "wp.app.svc.cluster.local".into(),
            })),
            vec!["wp.app.svc.cluster.local".to_string()],
        ),
        (json!([]), None, vec![]),
    ];
    for (addresses, want, display) in cases {
        let mut idx = index();
        let gw = set(
            waypoint_json("app", "wp", json!({})),
            "/status/addresses",
            addresses.clone(),
        );
        apply_all(
            &mut idx,
            vec![
                namespace("app", json!({"istio.io/use-waypoint": "wp"})),
                service("app", "web", "10.96.0.1", json!({"app": "web"})),
                gateway_from(gw),
            ],
        );
        let got = xds_service(&idx, "app", "web").expect("web").waypoint;
        assert_eq!(got.and_then(|g| g.destination), want, "{addresses}");
        assert_eq!(idx.waypoints()[0].addresses, display, "{addresses}");
        let gw_status = statuses_of(&idx, Kind::Gateway, "app", "wp");
        assert_eq!(
            gw_status.len(),
            usize::from(display.is_empty()),
            "{addresses}: {gw_status:?}"
        );
    }
}

#[test]
fn waypoint_service_arriving_later_switches_to_its_hostname() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            namespace("app", json!({"istio.io/use-waypoint": "wp"})),
            service("app", "web", "10.96.0.1", json!({"app": "web"})),
            gateway_from(waypoint_json("app", "wp", json!({}))),
        ],
    );
    assert_eq!(xds_service(&idx, "app", "web").expect("web").waypoint, None);
    assert_eq!(statuses_of(&idx, Kind::Gateway, "app", "wp").len(), 1);
    let changes = idx.apply(service(
        "app",
        "wp",
        "10.96.0.100",
        json!({"gateway.networking.k8s.io/gateway-name": "wp"}),
    ));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", svc_name("app", "web")),
            format!("+{}", svc_name("app", "wp"))
        ]
    );
    assert_eq!(
        xds_service(&idx, "app", "web").expect("web").waypoint,
        Some(by_hostname("app", "wp"))
    );
    assert!(statuses_of(&idx, Kind::Gateway, "app", "wp").is_empty());
    // And going away again.
    let changes = idx.delete(ObjectKey::service("app", "wp"));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", svc_name("app", "web")),
            format!("-{}", svc_name("app", "wp"))
        ]
    );
}

#[test]
fn cross_namespace_waypoints_need_admission() {
    let cases = [
        ("default Same", json!(null), json!({}), false),
        (
            "All",
            json!({"namespaces": {"from": "All"}}),
            json!({}),
            true,
        ),
        (
            "Selector match",
            json!({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}}),
            json!({"team": "a"}),
            true,
        ),
        (
            "Selector miss",
            json!({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"team": "a"}}}}),
            json!({"team": "b"}),
            false,
        ),
        (
            "Selector expression",
            json!({"namespaces": {"from": "Selector", "selector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "c"]}]}}}),
            json!({"team": "c"}),
            true,
        ),
    ];
    for (name, allowed_routes, app_ns_labels, admitted) in cases {
        let mut idx = index();
        let gw = set(
            waypoint_json("infra", "shared", json!({"istio.io/waypoint-for": "all"})),
            "/spec/listeners/0/allowedRoutes",
            allowed_routes,
        );
        apply_all(
            &mut idx,
            vec![
                namespace("app", app_ns_labels),
                gateway_from(gw),
                service(
                    "infra",
                    "shared",
                    "10.96.0.100",
                    json!({"gateway.networking.k8s.io/gateway-name": "shared"}),
                ),
                pod(
                    "app",
                    "p",
                    "10.0.0.1",
                    json!({"istio.io/use-waypoint": "shared", "istio.io/use-waypoint-namespace": "infra"}),
                ),
            ],
        );
        let got = workload(&idx, "app", "p").expect("p").waypoint;
        assert_eq!(got.is_some(), admitted, "{name}");
        if admitted {
            assert_eq!(got, Some(by_hostname("infra", "shared")), "{name}");
            assert!(
                statuses_of(&idx, Kind::Pod, "app", "p").is_empty(),
                "{name}"
            );
        } else {
            assert!(
                statuses_of(&idx, Kind::Pod, "app", "p")[0]
                    .contains("does not admit namespace app"),
                "{name}"
            );
        }
    }
}

#[test]
fn namespace_label_change_reevaluates_admission() {
    let mut idx = index();
    let gw = set(
        waypoint_json(
            "infra",
            "shared",
            json!({"istio.io/waypoint-for": "workload"}),
        ),
        "/spec/listeners/0/allowedRoutes",
        json!({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"mesh": "yes"}}}}),
    );
    apply_all(
        &mut idx,
        vec![
            namespace("app", json!({})),
            gateway_from(gw),
            service(
                "infra",
                "shared",
                "10.96.0.100",
                json!({"gateway.networking.k8s.io/gateway-name": "shared"}),
            ),
            pod(
                "app",
                "p",
                "10.0.0.1",
                json!({"istio.io/use-waypoint": "shared", "istio.io/use-waypoint-namespace": "infra"}),
            ),
        ],
    );
    assert_eq!(workload(&idx, "app", "p").expect("p").waypoint, None);
    let changes = idx.apply(namespace("app", json!({"mesh": "yes"})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("app", "p"))]);
    assert_eq!(
        workload(&idx, "app", "p").expect("p").waypoint,
        Some(by_hostname("infra", "shared"))
    );
}

#[test]
fn own_label_mismatch_with_waypoint_for_is_reported() {
    let mut idx = index();
    let mut objs = waypoint("app", "svc-only", json!({}), "10.96.0.100");
    objs.push(pod(
        "app",
        "p",
        "10.0.0.1",
        json!({"istio.io/use-waypoint": "svc-only"}),
    ));
    apply_all(&mut idx, objs);
    assert_eq!(workload(&idx, "app", "p").expect("p").waypoint, None);
    assert_eq!(
        statuses_of(&idx, Kind::Pod, "app", "p"),
        vec!["waypoint app/svc-only serves service traffic (istio.io/waypoint-for), not workload; traffic goes direct".to_string()]
    );
}

#[test]
fn waypoints_are_listed() {
    let mut idx = app_with_waypoint(Some("workload"));
    let gw = set(
        waypoint_json("infra", "mine", json!({"istio.io/waypoint-for": "bogus"})),
        "/spec/gatewayClassName",
        json!("meshbox-waypoint"),
    );
    idx.apply(gateway_from(gw));
    // Not a waypoint: not listed.
    let ingress = set(
        waypoint_json("infra", "ingress", json!({})),
        "/spec/gatewayClassName",
        json!("istio"),
    );
    idx.apply(gateway_from(ingress));
    assert_eq!(
        idx.waypoints(),
        vec![
            WaypointInfo {
                namespace: "app".into(),
                name: "wp".into(),
                class: "istio-waypoint".into(),
                traffic_type: WaypointFor::Workload,
                addresses: vec!["wp.app.svc.cluster.local".into()],
                routes: vec![],
                policies: vec![],
            },
            WaypointInfo {
                namespace: "infra".into(),
                name: "mine".into(),
                class: "meshbox-waypoint".into(),
                traffic_type: WaypointFor::Service,
                addresses: vec![],
                routes: vec![],
                policies: vec![],
            },
        ]
    );
    let st = statuses_of(&idx, Kind::Gateway, "infra", "mine");
    assert_eq!(st.len(), 2, "{st:?}");
    assert!(statuses_of(&idx, Kind::Gateway, "infra", "ingress").is_empty());
    assert_eq!(
        serde_json::to_value(&idx.waypoints()[0]).expect("json")["for"],
        json!("workload")
    );
}
