//! Whole-index behaviour: no-op updates, relists (`replace_all`), deletes
//! of unknown objects, status bookkeeping, and a scale check.

use serde_json::json;

use super::*;
use crate::model::{Kind, ObjectKey};

fn world() -> Vec<Object> {
    let mut objs = vec![
        ambient_namespace("app"),
        namespace("other", json!({})),
        service("app", "web", "10.96.0.1", json!({"app": "web"})),
        service("app", "db", "10.96.0.2", json!({"app": "db"})),
        pod("app", "web-1", "10.0.0.1", json!({"app": "web"})),
        pod("app", "web-2", "10.0.0.2", json!({"app": "web"})),
        pod("app", "db-0", "10.0.0.3", json!({"app": "db"})),
        pod("other", "client", "10.0.1.1", json!({})),
        slice(
            "app",
            "web-abc",
            "web",
            json!([{"addresses": ["10.0.0.1"]}]),
            json!([{"name": "http", "port": 8080}]),
        ),
        policy(
            "app",
            "allow-web",
            json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
        ),
        policy("app", "custom", json!({"action": "CUSTOM"})),
    ];
    objs.extend(waypoint("app", "wp", json!({}), "10.96.0.100"));
    objs
}

#[test]
fn every_kind_ignores_a_repeated_apply() {
    let mut idx = index();
    apply_all(&mut idx, world());
    for obj in world() {
        let key = obj.key().expect("named");
        assert!(
            idx.apply(obj).is_empty(),
            "re-applying {key} changed something"
        );
    }
}

#[test]
fn first_build_reports_everything() {
    let mut idx = index();
    let changes = idx.replace_all(world());
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("app", "db-0")),
            format!("+{}", uid("app", "web-1")),
            format!("+{}", uid("app", "web-2")),
            format!("+{}", uid("other", "client")),
            format!("+{}", svc_name("app", "db")),
            format!("+{}", svc_name("app", "web")),
            format!("+{}", svc_name("app", "wp")),
            "+authz:app/allow-web".to_string(),
        ]
    );
    // The same result, object by object.
    let mut one_by_one = index();
    apply_all(&mut one_by_one, world());
    assert_eq!(
        idx.addresses().collect::<Vec<_>>(),
        one_by_one.addresses().collect::<Vec<_>>()
    );
}

#[test]
fn relist_reports_only_the_difference() {
    let mut idx = index();
    idx.replace_all(world());
    assert!(idx.replace_all(world()).is_empty());

    // web-2 gone, db-0 relabelled, db service gone, the custom policy gone,
    // a new policy.
    let mut next: Vec<Object> = world()
        .into_iter()
        .filter(|o| {
            let k = o.key().expect("named");
            k != ObjectKey::pod("app", "web-2")
                && k != ObjectKey::service("app", "db")
                && k != ObjectKey::pod("app", "db-0")
                && k != ObjectKey::authorization_policy("app", "custom")
        })
        .collect();
    next.push(pod(
        "app",
        "db-0",
        "10.0.0.3",
        json!({"app": "db", "istio.io/dataplane-mode": "none"}),
    ));
    next.push(policy(
        "other",
        "deny-all",
        json!({"action": "DENY", "rules": [{}]}),
    ));
    let changes = idx.replace_all(next);
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("app", "db-0")),
            format!("+{}", uid("other", "client")),
            "+authz:other/deny-all".to_string(),
            format!("-{}", uid("app", "web-2")),
            format!("-{}", svc_name("app", "db")),
        ]
    );
    assert!(statuses_of(&idx, Kind::AuthorizationPolicy, "app", "custom").is_empty());
    assert_eq!(
        workload(&idx, "other", "client")
            .expect("client")
            .authorization_policies,
        vec!["other/deny-all"]
    );

    // An empty relist removes everything.
    let changes = idx.replace_all(Vec::new());
    assert_eq!(
        changes.addresses.values().filter(|v| v.is_some()).count(),
        0
    );
    assert_eq!(changes.authorizations.len(), 2);
    assert!(idx.addresses().next().is_none());
    assert!(idx.authorizations().next().is_none());
    assert!(idx.statuses().is_empty());
    assert!(idx.waypoints().is_empty());
}

#[test]
fn relisting_one_kind_leaves_the_others() {
    let mut idx = index();
    idx.replace_all(world());
    // A pod relist that lost web-2 and carries a stray service.
    let pods: Vec<Object> = world()
        .into_iter()
        .filter(|o| o.kind() == Kind::Pod && o.key().expect("named").name != "web-2")
        .chain([service("app", "stray", "10.96.0.99", json!({}))])
        .collect();
    let changes = idx.replace_kind(Kind::Pod, pods);
    assert_eq!(summary(&changes), vec![format!("-{}", uid("app", "web-2"))]);
    assert!(xds_service(&idx, "app", "web").is_some());
    assert!(xds_service(&idx, "app", "stray").is_none());
    assert!(authorization(&idx, "app", "allow-web").is_some());

    let changes = idx.replace_kind(Kind::AuthorizationPolicy, Vec::new());
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("app", "web-1")),
            "-authz:app/allow-web".to_string()
        ]
    );
}

#[test]
fn the_index_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MeshIndex>();
    assert_send_sync::<Changes>();
}

#[test]
fn unknown_deletes_and_nameless_objects_are_no_ops() {
    let mut idx = index();
    apply_all(&mut idx, world());
    for key in [
        ObjectKey::namespace("nope"),
        ObjectKey::pod("app", "nope"),
        ObjectKey::service("app", "nope"),
        ObjectKey::endpoint_slice("app", "nope"),
        ObjectKey::gateway("app", "nope"),
        ObjectKey::authorization_policy("app", "nope"),
    ] {
        assert!(idx.delete(key.clone()).is_empty(), "{key}");
    }
    let nameless = pod_from(unset(
        pod_json("app", "x", "10.0.0.9", json!({})),
        "/metadata/name",
    ));
    assert_eq!(nameless.key(), None);
    assert!(idx.apply(nameless).is_empty());
}

#[test]
fn objects_without_namespace_land_in_default() {
    let mut idx = index();
    let p = unset(
        pod_json("x", "p", "10.0.0.1", json!({})),
        "/metadata/namespace",
    );
    idx.apply(pod_from(p));
    assert!(workload(&idx, "default", "p").is_some());
}

#[test]
fn statuses_are_sorted_and_cleared_when_fixed() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            policy("b", "custom", json!({"action": "CUSTOM"})),
            policy("a", "audit", json!({"action": "AUDIT"})),
            pod(
                "a",
                "p",
                "10.0.0.1",
                json!({"istio.io/use-waypoint": "ghost"}),
            ),
            namespace("z", json!({"istio.io/use-waypoint": "ghost"})),
        ],
    );
    let got: Vec<(Kind, String, String)> = idx
        .statuses()
        .into_iter()
        .map(|s| (s.kind, s.namespace, s.name))
        .collect();
    assert_eq!(
        got,
        vec![
            (Kind::Namespace, String::new(), "z".to_string()),
            (Kind::Pod, "a".to_string(), "p".to_string()),
            (
                Kind::AuthorizationPolicy,
                "a".to_string(),
                "audit".to_string()
            ),
            (
                Kind::AuthorizationPolicy,
                "b".to_string(),
                "custom".to_string()
            ),
        ]
    );
    apply_all(
        &mut idx,
        vec![
            policy("b", "custom", json!({"action": "DENY"})),
            policy("a", "audit", json!({})),
            pod("a", "p", "10.0.0.1", json!({})),
            namespace("z", json!({})),
        ],
    );
    assert!(idx.statuses().is_empty());
}
