//! What waypoints get: `WaypointPolicy` (targetRefs, and selector policies
//! with HTTP rules on workloads that have a waypoint, with what that changes
//! for node proxies) and `WaypointRoute`, and that both follow the objects
//! they depend on.

use meshbox_proto::meshbox::{self as pb, PolicyAction, PolicyTarget};
use meshbox_proto::security::{Action, Clause, Match, Rule, StringMatch, string_match::MatchType};
use serde_json::{Value, json};

use super::*;
use crate::model::{Kind, ObjectKey};

const WAYPOINT_PRINCIPAL: &str = "cluster.local/ns/app/sa/wp";

fn wp_policy(idx: &MeshIndex, name: &str) -> Option<pb::WaypointPolicy> {
    idx.waypoint_policy(&format!("app/{name}"))
        .map(|p| (*p).clone())
}

fn wp_route(idx: &MeshIndex, name: &str) -> Option<pb::WaypointRoute> {
    idx.waypoint_route_resource(&format!("app/{name}"))
        .map(|r| (*r).clone())
}

fn target(waypoint: &str, service: &str, workload: &str) -> PolicyTarget {
    PolicyTarget {
        waypoint: waypoint.into(),
        service: service.into(),
        workload: workload.into(),
    }
}

fn policy_statuses(idx: &MeshIndex, name: &str) -> Vec<String> {
    statuses_of(idx, Kind::AuthorizationPolicy, "app", name)
}

/// Namespace `app` with Service `web` (pod `web-1`, `app: web`) and a
/// waypoint `wp` serving `traffic` (`service`, `workload`, `all`); the
/// namespace uses it when `use_waypoint`.
fn mesh(traffic: &str, use_waypoint: bool) -> MeshIndex {
    let mut idx = index();
    let mut labels = json!({"istio.io/dataplane-mode": "ambient"});
    if use_waypoint {
        labels["istio.io/use-waypoint"] = json!("wp");
    }
    let mut objs = vec![
        namespace("app", labels),
        service("app", "web", "10.96.0.1", json!({"app": "web"})),
        pod("app", "web-1", "10.0.0.1", json!({"app": "web"})),
    ];
    objs.extend(waypoint(
        "app",
        "wp",
        json!({"istio.io/waypoint-for": traffic}),
        "10.96.0.100",
    ));
    apply_all(&mut idx, objs);
    idx
}

fn get_rule() -> Value {
    json!([{
        "from": [{"source": {"principals": ["cluster.local/ns/app/sa/client"]}}],
        "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"], "ports": ["8080"]}}],
        "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]
    }])
}

fn gateway_ref(name: &str) -> Value {
    json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name})
}

fn service_ref(name: &str) -> Value {
    json!({"group": "", "kind": "Service", "name": name})
}

#[test]
fn a_policy_bound_to_the_waypoint_gateway_is_sent_to_it_as_written() {
    let mut idx = mesh("service", true);
    let changes = idx.apply(policy(
        "app",
        "get-only",
        json!({"targetRefs": [gateway_ref("wp")], "rules": get_rule()}),
    ));
    assert!(
        changes.authorizations.is_empty(),
        "node proxies get nothing"
    );
    assert_eq!(
        changes.waypoint_policies.keys().collect::<Vec<_>>(),
        ["app/get-only"]
    );
    let p = wp_policy(&idx, "get-only").expect("sent");
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("app", "get-only"));
    assert_eq!(p.targets, [target("app/wp", "", "")]);
    assert_eq!(p.action, PolicyAction::Allow as i32);
    assert_eq!(
        p.rules,
        [pb::PolicyRule {
            from: vec![pb::PolicySource {
                principals: vec!["cluster.local/ns/app/sa/client".into()],
                ..Default::default()
            }],
            to: vec![pb::PolicyOperation {
                methods: vec!["GET".into()],
                paths: vec!["/api/*".into()],
                ports: vec!["8080".into()],
                ..Default::default()
            }],
            when: vec![pb::PolicyCondition {
                key: "request.headers[x-user]".into(),
                values: vec!["alice".into()],
                not_values: vec![],
            }],
            unrecognized: vec![],
        }]
    );
    assert_eq!(idx.policy_enforcement("app/get-only"), ["waypoint app/wp"]);
    assert_eq!(idx.waypoints()[0].policies, ["app/get-only"]);

    // Bound to nothing usable: enforced nowhere, and listed as such.
    idx.apply(policy(
        "app",
        "lost",
        json!({"targetRefs": [gateway_ref("ghost")], "rules": get_rule()}),
    ));
    assert!(idx.policy_enforcement("app/lost").is_empty());
    assert_eq!(
        idx.unenforced_policies(),
        [("app".to_string(), "lost".to_string(), "ALLOW".to_string())]
    );

    let changes = idx.delete(ObjectKey::authorization_policy("app", "get-only"));
    assert_eq!(changes.waypoint_policies.get("app/get-only"), Some(&None));
}

#[test]
fn a_policy_bound_to_a_service_follows_the_services_waypoint() {
    let mut idx = mesh("service", false);
    idx.apply(policy(
        "app",
        "web-get",
        json!({"targetRefs": [service_ref("web")], "action": "DENY", "rules": get_rule()}),
    ));
    assert!(wp_policy(&idx, "web-get").is_none());
    assert!(
        policy_statuses(&idx, "web-get")
            .iter()
            .any(|m| m.contains("Service app/web has no waypoint")),
        "{:?}",
        policy_statuses(&idx, "web-get")
    );

    // The namespace starts using the waypoint: the policy follows.
    let changes = idx.apply(namespace(
        "app",
        json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
    ));
    assert!(changes.waypoint_policies.contains_key("app/web-get"));
    let p = wp_policy(&idx, "web-get").expect("sent");
    assert_eq!(p.targets, [target("app/wp", &svc_name("app", "web"), "")]);
    assert_eq!(p.action, PolicyAction::Deny as i32);
    assert!(
        !policy_statuses(&idx, "web-get")
            .iter()
            .any(|m| m.contains("no waypoint")),
        "the problem is gone"
    );

    // The Service opts out: the policy has no target left and is withdrawn.
    let mut web = service_json(
        "app",
        "web",
        "10.96.0.1",
        json!({"app": "web"}),
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    );
    web = set(
        web,
        "/metadata/labels",
        json!({"istio.io/use-waypoint": "none"}),
    );
    let changes = idx.apply(service_from(web));
    assert_eq!(changes.waypoint_policies.get("app/web-get"), Some(&None));
}

#[test]
fn a_target_that_resolves_to_nothing_is_reported_and_gives_no_target() {
    let mut idx = mesh("service", true);
    idx.apply(policy(
        "app",
        "refs",
        json!({"targetRefs": [
            gateway_ref("ghost"),
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp", "namespace": "other"},
            {"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"},
            {"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext"},
            service_ref("missing"),
            gateway_ref("wp"),
        ], "rules": [{}]}),
    ));
    let p = wp_policy(&idx, "refs").expect("the one good target remains");
    assert_eq!(p.targets, [target("app/wp", "", "")]);
    let status = policy_statuses(&idx, "refs").join("\n");
    for expected in [
        "Gateway app/ghost not found",
        "in namespace other",
        "must be in the root namespace",
        "does not read ServiceEntry",
        "Service app/missing not found",
    ] {
        assert!(status.contains(expected), "{expected:?} in {status}");
    }

    // A Gateway that appears later becomes a target.
    let changes = apply_all(&mut idx, waypoint("app", "ghost", json!({}), "10.96.0.101"));
    assert!(changes.waypoint_policies.contains_key("app/refs"));
    assert_eq!(
        wp_policy(&idx, "refs").expect("sent").targets,
        [target("app/ghost", "", ""), target("app/wp", "", "")]
    );
}

#[test]
fn a_gateway_class_policy_in_the_root_namespace_reaches_every_waypoint_of_the_class() {
    let mut idx = mesh("service", true);
    apply_all(&mut idx, waypoint("other", "wp2", json!({}), "10.96.0.102"));
    idx.apply(policy(
        "istio-system",
        "mesh-wide",
        json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"}],
               "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
    ));
    let p = idx.waypoint_policy("istio-system/mesh-wide").expect("sent");
    assert_eq!(
        p.targets,
        [target("app/wp", "", ""), target("other/wp2", "", "")]
    );
    assert!(idx.authorization("istio-system/mesh-wide").is_none());
}

#[test]
fn fields_meshbox_does_not_know_fail_the_rule_closed_everywhere() {
    let mut idx = mesh("service", true);
    let rules = json!([{
        "from": [{"source": {"principals": ["a"], "futureField": ["x"]}}],
        "to": [{"operation": {"methods": ["GET"], "newThing": true}}],
        "when": [{"key": "source.ip", "values": ["10.0.0.0/8"], "mode": "strict"}],
        "extra": 1
    }]);
    idx.apply(policy(
        "app",
        "future",
        json!({"targetRefs": [gateway_ref("wp")], "rules": rules.clone(), "someSpecField": {}}),
    ));
    let p = wp_policy(&idx, "future").expect("sent");
    assert_eq!(
        p.rules[0].unrecognized,
        [
            "spec.someSpecField",
            "extra",
            "from[0].source.futureField",
            "to[0].operation.newThing",
            "when[0].mode",
        ]
    );

    // At node proxies an ALLOW rule with an unknown field is left out
    // (matches nothing) rather than read without it.
    idx.apply(policy(
        "app",
        "future-l4",
        json!({"rules": [{"from": [{"source": {"namespaces": ["app"], "futureField": ["x"]}}]}]}),
    ));
    let auth = authorization(&idx, "app", "future-l4").expect("sent");
    assert!(auth.rules.is_empty(), "{auth:?}");
    assert!(
        policy_statuses(&idx, "future-l4")
            .iter()
            .any(|m| m.contains("from[0].source.futureField is not supported")),
        "{:?}",
        policy_statuses(&idx, "future-l4")
    );
}

#[test]
fn an_unknown_action_denies_everything_at_the_waypoint_and_dry_run_is_audit() {
    let mut idx = mesh("service", true);
    idx.apply(policy(
        "app",
        "odd",
        json!({"targetRefs": [gateway_ref("wp")], "action": "MAYBE", "rules": get_rule()}),
    ));
    let p = wp_policy(&idx, "odd").expect("sent");
    assert_eq!(p.action, PolicyAction::Allow as i32);
    assert!(p.rules.is_empty(), "an ALLOW without rules denies all");
    assert!(
        policy_statuses(&idx, "odd")
            .iter()
            .any(|m| m.contains("\"MAYBE\"") && m.contains("failing closed"))
    );

    let mut dry = policy_obj(
        "app",
        "dry",
        json!({"targetRefs": [gateway_ref("wp")], "action": "DENY", "rules": get_rule()}),
    );
    dry.metadata.annotations = Some([("istio.io/dry-run".to_string(), "true".to_string())].into());
    idx.apply(Object::AuthorizationPolicy(dry));
    let p = wp_policy(&idx, "dry").expect("sent");
    assert_eq!(p.action, PolicyAction::Audit as i32);
    assert_eq!(p.rules.len(), 1);
}

fn principal_rule(principals: &[&str]) -> Rule {
    Rule {
        clauses: vec![Clause {
            matches: vec![Match {
                principals: principals.iter().map(|p| exact(p)).collect(),
                ..Default::default()
            }],
        }],
    }
}

fn exact(v: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(v.into())),
    }
}

#[test]
fn an_allow_with_http_rules_on_workloads_with_a_waypoint_is_enforced_there_and_admits_it() {
    let mut idx = mesh("all", false);
    let spec = json!({"selector": {"matchLabels": {"app": "web"}}, "rules": get_rule()});
    idx.apply(policy("app", "web-get", spec));
    // No waypoint yet: the HTTP rule is cut and the policy denies all.
    let auth = authorization(&idx, "app", "web-get").expect("sent");
    assert!(auth.rules.is_empty());
    assert!(wp_policy(&idx, "web-get").is_none());
    assert_eq!(idx.policy_enforcement("app/web-get"), ["node proxies"]);
    assert!(
        policy_statuses(&idx, "web-get")
            .iter()
            .any(|m| m.contains("denies all traffic")),
        "{:?}",
        policy_statuses(&idx, "web-get")
    );

    let changes = idx.apply(namespace(
        "app",
        json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
    ));
    assert!(changes.authorizations.contains_key("app/web-get"));
    assert!(changes.waypoint_policies.contains_key("app/web-get"));
    let p = wp_policy(&idx, "web-get").expect("sent to the waypoint");
    assert_eq!(
        p.targets,
        [
            target("app/wp", "", &uid("app", "web-1")),
            target("app/wp", &svc_name("app", "web"), ""),
        ]
    );
    assert_eq!(p.rules.len(), 1);
    assert!(p.rules[0].to[0].methods == ["GET"], "the HTTP rule, whole");
    let auth = authorization(&idx, "app", "web-get").expect("sent");
    assert_eq!(auth.action, Action::Allow as i32);
    assert_eq!(auth.rules, [principal_rule(&[WAYPOINT_PRINCIPAL])]);
    assert_eq!(
        idx.policy_enforcement("app/web-get"),
        ["node proxies", "waypoint app/wp"]
    );
    assert!(
        policy_statuses(&idx, "web-get")
            .iter()
            .any(|m| m.contains("waypoint app/wp carries workload traffic")
                && m.contains(WAYPOINT_PRINCIPAL)),
        "{:?}",
        policy_statuses(&idx, "web-get")
    );

    assert!(
        !policy_statuses(&idx, "web-get")
            .iter()
            .any(|m| m.contains("denies all traffic")),
        "{:?}",
        policy_statuses(&idx, "web-get")
    );

    // The pod opts out of the waypoint: back to the cut policy.
    let changes = idx.apply(pod(
        "app",
        "web-1",
        "10.0.0.1",
        json!({"app": "web", "istio.io/use-waypoint": "none"}),
    ));
    assert_eq!(changes.waypoint_policies.get("app/web-get"), Some(&None));
    assert!(
        authorization(&idx, "app", "web-get")
            .expect("sent")
            .rules
            .is_empty()
    );
}

#[test]
fn a_deny_with_http_rules_exempts_only_waypoint_traffic_from_its_reduced_rules() {
    let mut idx = mesh("workload", true);
    let spec = json!({
        "action": "DENY",
        "rules": [
            {"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]},
            {"from": [{"source": {"namespaces": ["evil"]}}]}
        ]
    });
    idx.apply(policy("app", "no-post", spec));
    let auth = authorization(&idx, "app", "no-post").expect("sent");
    assert_eq!(auth.action, Action::Deny as i32);
    assert_eq!(auth.rules.len(), 2);
    // The reduced rule (port 8080, any method) now spares the waypoint's
    // identity; the L4 rule is unchanged.
    let exempt = Clause {
        matches: vec![Match {
            not_principals: vec![exact(WAYPOINT_PRINCIPAL)],
            ..Default::default()
        }],
    };
    assert_eq!(auth.rules[0].clauses.last(), Some(&exempt));
    assert_eq!(auth.rules[0].clauses.len(), 2);
    assert!(!auth.rules[1].clauses.contains(&exempt));
    let p = wp_policy(&idx, "no-post").expect("sent");
    // A workload waypoint only: the Service's waypoint is not this one.
    assert_eq!(p.targets, [target("app/wp", "", &uid("app", "web-1"))]);
    assert_eq!(p.action, PolicyAction::Deny as i32);
}

#[test]
fn a_service_waypoint_does_not_lift_a_selector_policy() {
    // Node proxies still cut it: the waypoint serves the Service, but the
    // policy is about the workload, which node proxies guard.
    let mut idx = mesh("service", true);
    idx.apply(policy(
        "app",
        "web-get",
        json!({"selector": {"matchLabels": {"app": "web"}}, "rules": get_rule()}),
    ));
    assert!(wp_policy(&idx, "web-get").is_none());
    assert!(
        authorization(&idx, "app", "web-get")
            .expect("sent")
            .rules
            .is_empty()
    );
}

fn route(ns: &str, name: &str, spec: Value) -> Object {
    Object::HttpRoute(serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": "2024-03-01T00:00:00Z"},
        "spec": spec
    })).expect("route"))
}

fn split_spec() -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [{
            "name": "split",
            "matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                         "headers": [{"name": "X-User", "value": "alice"}],
                         "queryParams": [{"type": "RegularExpression", "name": "q", "value": "a+"}],
                         "method": "GET"}],
            "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "X-Via", "value": "wp"}], "remove": ["X-Drop"]}}],
            "backendRefs": [
                {"name": "v1", "port": 80, "weight": 90},
                {"name": "v2", "port": 80, "weight": 10}
            ],
            "timeouts": {"request": "2s", "backendRequest": "500ms"}
        }]
    })
}

#[test]
fn a_route_is_sent_with_resolved_parents_backends_and_rules() {
    let mut idx = mesh("service", true);
    idx.apply(service("app", "v1", "10.96.0.2", json!({"app": "web"})));
    let changes = idx.apply(route("app", "split", split_spec()));
    assert_eq!(
        changes.waypoint_routes.keys().collect::<Vec<_>>(),
        ["app/split"]
    );
    let r = wp_route(&idx, "split").expect("sent");
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("app", "split"));
    assert_eq!(r.created, 1_709_251_200);
    assert_eq!(
        r.parents,
        [pb::RouteParent {
            waypoint: "app/wp".into(),
            service: svc_name("app", "web"),
            port: 80,
            consumer_namespace: String::new(),
        }]
    );
    let rule = &r.rules[0];
    assert_eq!(rule.name, "split");
    assert_eq!(rule.outcome, pb::RuleOutcome::Route as i32);
    assert_eq!(
        rule.matches,
        [pb::RouteMatch {
            path: Some(pb::StringMatch {
                kind: pb::MatchKind::PathPrefix as i32,
                name: String::new(),
                value: "/api".into(),
            }),
            headers: vec![pb::StringMatch {
                kind: pb::MatchKind::Exact as i32,
                name: "x-user".into(),
                value: "alice".into(),
            }],
            query_params: vec![pb::StringMatch {
                kind: pb::MatchKind::RegularExpression as i32,
                name: "q".into(),
                value: "a+".into(),
            }],
            method: "GET".into(),
        }]
    );
    assert_eq!(
        rule.request_header_modifier,
        Some(pb::HeaderModifier {
            set: vec![pb::HeaderValue {
                name: "x-via".into(),
                value: "wp".into()
            }],
            add: vec![],
            remove: vec!["x-drop".into()],
        })
    );
    assert_eq!(
        (rule.request_timeout_ms, rule.backend_request_timeout_ms),
        (2000, 500)
    );
    assert_eq!(
        rule.backends,
        [
            pb::RouteBackend {
                service: svc_name("app", "v1"),
                port: 80,
                weight: 90,
                error: String::new(),
            },
            pb::RouteBackend {
                service: svc_name("app", "v2"),
                port: 80,
                weight: 10,
                error: "backend not found".into(),
            },
        ]
    );
    assert_eq!(idx.waypoints()[0].routes, ["app/split"]);

    // The missing backend appears: exactly this route changes.
    let changes = idx.apply(service("app", "v2", "10.96.0.3", json!({"app": "web"})));
    assert_eq!(
        changes.waypoint_routes.keys().collect::<Vec<_>>(),
        ["app/split"]
    );
    let r = wp_route(&idx, "split").expect("sent");
    assert!(r.rules[0].backends.iter().all(|b| b.error.is_empty()));

    // The Service leaves its waypoint: no parent is left, the route is
    // withdrawn.
    let mut web = service_json(
        "app",
        "web",
        "10.96.0.1",
        json!({"app": "web"}),
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    );
    web = set(
        web,
        "/metadata/labels",
        json!({"istio.io/use-waypoint": "none"}),
    );
    let changes = idx.apply(service_from(web));
    assert_eq!(changes.waypoint_routes.get("app/split"), Some(&None));
}

#[test]
fn a_consumer_route_names_its_namespace_and_a_route_without_timestamp_is_created_0() {
    let mut idx = mesh("service", true);
    idx.apply(namespace("shop", json!({})));
    idx.apply(Object::HttpRoute(
        serde_json::from_value(json!({
            "metadata": {"name": "mine", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "namespace": "app"}],
                "rules": [{"backendRefs": [{"name": "web", "namespace": "app", "port": 80}]}]
            }
        }))
        .expect("route"),
    ));
    let r = idx.waypoint_route_resource("shop/mine").expect("sent");
    assert_eq!(r.created, 0);
    assert_eq!(r.parents[0].consumer_namespace, "shop");
    assert_eq!(r.parents[0].port, 0);
    // Cross-namespace backend without ReferenceGrant: kept, with its error.
    assert!(r.rules[0].backends[0].error.contains("ReferenceGrant"));
    // Written without matches: one of every path.
    assert_eq!(r.rules[0].matches.len(), 1);
}

#[test]
fn the_singular_target_ref_counts_and_a_selector_beside_target_refs_is_ignored() {
    let mut idx = mesh("service", true);
    idx.apply(policy(
        "app",
        "old-style",
        json!({"targetRef": gateway_ref("wp"), "selector": {"matchLabels": {"app": "web"}},
               "action": "DENY", "rules": get_rule()}),
    ));
    let p = wp_policy(&idx, "old-style").expect("sent");
    assert_eq!(p.targets, [target("app/wp", "", "")]);
    // Node proxies get nothing: the selector does not make it theirs.
    assert!(authorization(&idx, "app", "old-style").is_none());
    assert!(
        policy_statuses(&idx, "old-style")
            .iter()
            .any(|m| m.contains("the selector is ignored")),
        "{:?}",
        policy_statuses(&idx, "old-style")
    );
}
