//! HTTPRoutes: which Services they attach to, how their rules are checked,
//! and how every problem is reported and fails closed.

use serde_json::{Value, json};

use super::*;
use crate::model::{Kind, MatchKind, ObjectKey, RouteInfo, RuleOutcome, parse_duration_ms};

fn route(ns: &str, name: &str, spec: Value) -> Object {
    Object::HttpRoute(from(
        json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
    ))
}

fn service_parent(name: &str) -> Value {
    json!({"group": "", "kind": "Service", "name": name})
}

/// Namespace `app` (waypoint `wp` for every Service) with Services `web`,
/// `v1` and `v2` on port 80.
fn mesh() -> MeshIndex {
    let mut idx = index();
    let mut objs = vec![
        namespace(
            "app",
            json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
        ),
        service("app", "web", "10.96.0.1", json!({"app": "web"})),
        service("app", "v1", "10.96.0.2", json!({"app": "web", "v": "1"})),
        service("app", "v2", "10.96.0.3", json!({"app": "web", "v": "2"})),
    ];
    objs.extend(waypoint("app", "wp", json!({}), "10.96.0.100"));
    apply_all(&mut idx, objs);
    idx
}

fn split_spec() -> Value {
    json!({
        "parentRefs": [service_parent("web")],
        "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
            "backendRefs": [
                {"name": "v1", "port": 80, "weight": 90},
                {"name": "v2", "port": 80, "weight": 10}
            ]
        }]
    })
}

fn only_route(idx: &MeshIndex) -> RouteInfo {
    let routes = idx.routes();
    assert_eq!(routes.len(), 1, "{routes:#?}");
    routes.into_iter().next().expect("one route")
}

fn route_statuses(idx: &MeshIndex) -> Vec<String> {
    idx.statuses()
        .into_iter()
        .filter(|s| s.kind == Kind::HttpRoute)
        .map(|s| s.message)
        .collect()
}

#[test]
fn a_route_attaches_to_its_service_and_detaches_when_deleted() {
    let mut idx = mesh();
    let changes = idx.apply(route("app", "split", split_spec()));
    assert!(
        changes.addresses.is_empty() && changes.authorizations.is_empty(),
        "a route changes nothing node proxies get"
    );
    assert_eq!(
        changes.waypoint_routes.keys().collect::<Vec<_>>(),
        ["app/split"],
        "waypoints get it"
    );
    assert_eq!(
        idx.service_routes("app", "web"),
        [ObjectKey::http_route("app", "split")]
    );
    assert!(idx.service_routes("app", "v1").is_empty());

    let info = only_route(&idx);
    assert_eq!(info.parents.len(), 1);
    let parent = &info.parents[0];
    assert_eq!(
        (parent.namespace.as_str(), parent.name.as_str()),
        ("app", "web")
    );
    assert!(parent.found && !parent.consumer);
    assert_eq!(parent.waypoint.as_deref(), Some("app/wp"));
    assert!(info.problems.is_empty(), "{:?}", info.problems);
    assert!(route_statuses(&idx).is_empty());

    // Moving the route to another Service moves it in the index.
    let mut moved = split_spec();
    moved["parentRefs"] = json!([service_parent("v1")]);
    idx.apply(route("app", "split", moved));
    assert!(idx.service_routes("app", "web").is_empty());
    assert_eq!(idx.service_routes("app", "v1").len(), 1);

    idx.delete(ObjectKey::http_route("app", "split"));
    assert!(idx.service_routes("app", "v1").is_empty());
    assert!(idx.routes().is_empty());
    assert!(route_statuses(&idx).is_empty());

    // A relist without the route removes it too.
    idx.apply(route("app", "split", split_spec()));
    idx.replace_kind(Kind::HttpRoute, Vec::new());
    assert!(idx.routes().is_empty());
    assert!(idx.service_routes("app", "web").is_empty());
}

#[test]
fn weights_are_kept_and_defaults_filled() {
    let mut idx = mesh();
    idx.apply(route(
        "app",
        "split",
        json!({
            "parentRefs": [service_parent("web")],
            "rules": [
                {"backendRefs": [
                    {"name": "v1", "port": 80, "weight": 90},
                    {"name": "v2", "port": 80, "weight": 10}
                ]},
                {"backendRefs": [{"name": "v1", "port": 80}]}
            ]
        }),
    ));
    let info = only_route(&idx);
    let weights: Vec<Vec<(String, u32)>> = info
        .rules
        .iter()
        .map(|r| {
            r.backends
                .iter()
                .map(|b| (b.name.clone(), b.weight))
                .collect()
        })
        .collect();
    assert_eq!(
        weights,
        [
            vec![("v1".to_string(), 90), ("v2".to_string(), 10)],
            vec![("v1".to_string(), 1)]
        ]
    );
    // No matches written: every path.
    assert_eq!(info.rules[0].matches.len(), 1);
    assert_eq!(info.rules[0].matches[0].path.kind, MatchKind::PathPrefix);
    assert_eq!(info.rules[0].matches[0].path.value, "/");
    assert!(info.rules.iter().all(|r| r.outcome == RuleOutcome::Route));
}

#[test]
fn a_missing_backend_keeps_its_share_with_an_error_until_it_appears() {
    let mut idx = mesh();
    let mut spec = split_spec();
    spec["rules"][0]["backendRefs"][1]["name"] = json!("v3");
    idx.apply(route("app", "split", spec));
    let info = only_route(&idx);
    let backends = &info.rules[0].backends;
    assert_eq!(backends[0].error, None);
    assert_eq!(backends[1].weight, 10);
    assert_eq!(backends[1].error.as_deref(), Some("backend not found"));
    assert_eq!(info.rules[0].outcome, RuleOutcome::Route);
    let statuses = route_statuses(&idx);
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(
        statuses[0].contains("app/v3: backend not found"),
        "{statuses:?}"
    );

    idx.apply(service("app", "v3", "10.96.0.4", json!({"app": "web"})));
    assert_eq!(only_route(&idx).rules[0].backends[1].error, None);
    assert!(route_statuses(&idx).is_empty());

    idx.delete(ObjectKey::service("app", "v3"));
    assert_eq!(
        only_route(&idx).rules[0].backends[1].error.as_deref(),
        Some("backend not found")
    );
}

#[test]
fn a_backend_port_the_service_lacks_is_an_error() {
    let mut idx = mesh();
    let mut spec = split_spec();
    spec["rules"][0]["backendRefs"][0]["port"] = json!(8443);
    spec["rules"][0]["backendRefs"][1]
        .as_object_mut()
        .expect("object")
        .remove("port");
    idx.apply(route("app", "split", spec));
    let info = only_route(&idx);
    assert_eq!(
        info.rules[0].backends[0].error.as_deref(),
        Some("Service has no port 8443")
    );
    assert_eq!(
        info.rules[0].backends[1].error.as_deref(),
        Some("port is required for a Service backend")
    );
}

#[test]
fn a_regex_that_does_not_compile_makes_the_rule_match_nothing() {
    let mut idx = mesh();
    let spec = json!({
        "parentRefs": [service_parent("web")],
        "rules": [
            {
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/ok"}},
                    {"headers": [{"type": "RegularExpression", "name": "x-user", "value": "(unclosed"}]}
                ],
                "backendRefs": [{"name": "v1", "port": 80}]
            },
            {
                "matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}}],
                "backendRefs": [{"name": "v2", "port": 80}]
            }
        ]
    });
    idx.apply(route("app", "regex", spec));
    let info = only_route(&idx);
    // The valid match of the broken rule is dropped too: keeping it would
    // let the rule take requests its author meant for another match.
    assert_eq!(info.rules[0].outcome, RuleOutcome::MatchesNothing);
    assert!(info.rules[0].matches.is_empty());
    assert_eq!(info.rules[1].outcome, RuleOutcome::Route);
    assert_eq!(
        info.rules[1].matches[0].path.kind,
        MatchKind::RegularExpression
    );
    let statuses = route_statuses(&idx);
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(
        statuses[0].starts_with("rules[0]: matches[1]: header \"x-user\" regular expression")
            && statuses[0].ends_with("the rule matches nothing"),
        "{statuses:?}"
    );
}

#[test]
fn unsupported_match_types_and_fields_match_nothing() {
    let mut idx = mesh();
    let spec = json!({
        "parentRefs": [service_parent("web")],
        "rules": [
            {"matches": [{"path": {"type": "Glob", "value": "/a*"}}],
             "backendRefs": [{"name": "v1", "port": 80}]},
            {"matches": [{"queryParams": [{"type": "Prefix", "name": "q", "value": "x"}]}],
             "backendRefs": [{"name": "v1", "port": 80}]},
            {"matches": [{"method": "FETCH"}],
             "backendRefs": [{"name": "v1", "port": 80}]},
            {"matches": [{"cookie": {"name": "a"}}],
             "backendRefs": [{"name": "v1", "port": 80}]},
            {"matches": [{"method": "GET", "headers": [{"name": "X-Env", "value": "prod"}]}],
             "backendRefs": [{"name": "v1", "port": 80}]}
        ]
    });
    idx.apply(route("app", "m", spec));
    let info = only_route(&idx);
    let outcomes: Vec<RuleOutcome> = info.rules.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [
            RuleOutcome::MatchesNothing,
            RuleOutcome::MatchesNothing,
            RuleOutcome::MatchesNothing,
            RuleOutcome::MatchesNothing,
            RuleOutcome::Route
        ]
    );
    let good = &info.rules[4].matches[0];
    assert_eq!(good.method.as_deref(), Some("GET"));
    assert_eq!(
        good.headers[0].name, "x-env",
        "header names are case-insensitive"
    );
    assert_eq!(route_statuses(&idx).len(), 4);
}

#[test]
fn an_unsupported_filter_answers_500_and_is_reported() {
    let mut idx = mesh();
    let spec = json!({
        "parentRefs": [service_parent("web")],
        "rules": [
            {
                "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}],
                "backendRefs": [{"name": "v1", "port": 80}]
            },
            {
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "X-Env", "value": "prod"}],
                    "add": [{"name": "x-trace", "value": "1"}],
                    "remove": ["Authorization"]
                }}],
                "backendRefs": [{"name": "v1", "port": 80}],
                "sessionPersistence": {"type": "Cookie"}
            }
        ]
    });
    idx.apply(route("app", "f", spec));
    let info = only_route(&idx);
    assert_eq!(info.rules[0].outcome, RuleOutcome::Answer500);
    assert_eq!(info.rules[1].outcome, RuleOutcome::Route);
    let modifier = info.rules[1]
        .request_header_modifier
        .as_ref()
        .expect("modifier");
    assert_eq!(modifier.set[0].name, "x-env");
    assert_eq!(modifier.set[0].value, "prod");
    assert_eq!(modifier.add[0].name, "x-trace");
    assert_eq!(modifier.remove, ["authorization"]);
    let statuses = route_statuses(&idx);
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("\"RequestRedirect\" is not supported")
                && s.contains("answered 500")),
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .any(|s| s.contains("rule.sessionPersistence is not supported")),
        "{statuses:?}"
    );
}

#[test]
fn cross_namespace_routes_are_consumer_routes_and_backends_need_a_grant() {
    let mut idx = mesh();
    idx.apply(namespace(
        "client",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    let spec = json!({
        "parentRefs": [{"group": "", "kind": "Service", "namespace": "app", "name": "web", "port": 80}],
        "rules": [{"backendRefs": [{"name": "v1", "namespace": "app", "port": 80}]}]
    });
    idx.apply(route("client", "mine", spec));
    assert_eq!(
        idx.service_routes("app", "web"),
        [ObjectKey::http_route("client", "mine")]
    );
    let info = only_route(&idx);
    assert!(info.parents[0].consumer);
    assert_eq!(info.parents[0].port, Some(80));
    let backend = &info.rules[0].backends[0];
    assert!(
        backend
            .error
            .as_deref()
            .is_some_and(|e| e.contains("ReferenceGrant")),
        "{backend:?}"
    );
}

#[test]
fn parents_that_are_not_services_are_not_attached() {
    let mut idx = mesh();
    let spec = json!({
        "parentRefs": [
            {"name": "ingress"},
            {"group": "", "kind": "Service", "name": "web", "sectionName": "http"},
            {"group": "", "kind": "Service", "name": "web", "port": 70000}
        ],
        "rules": [{"backendRefs": [{"name": "v1", "port": 80}]}]
    });
    idx.apply(route("app", "p", spec));
    assert!(idx.service_routes("app", "web").is_empty());
    assert!(only_route(&idx).parents.is_empty());
    assert_eq!(route_statuses(&idx).len(), 3, "{:?}", route_statuses(&idx));
}

#[test]
fn a_route_to_a_service_without_a_waypoint_is_reported() {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            ambient_namespace("app"),
            service("app", "web", "10.96.0.1", json!({"app": "web"})),
            service("app", "v1", "10.96.0.2", json!({"app": "web"})),
        ],
    );
    let mut spec = split_spec();
    spec["rules"][0]["backendRefs"] = json!([{"name": "v1", "port": 80}]);
    idx.apply(route("app", "r", spec));
    assert_eq!(only_route(&idx).parents[0].waypoint, None);
    let statuses = route_statuses(&idx);
    assert_eq!(statuses.len(), 1);
    assert!(statuses[0].contains("has no waypoint"), "{statuses:?}");

    // The waypoint arrives: the note goes.
    idx.apply(namespace(
        "app",
        json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"}),
    ));
    apply_all(&mut idx, waypoint("app", "wp", json!({}), "10.96.0.100"));
    assert_eq!(
        only_route(&idx).parents[0].waypoint.as_deref(),
        Some("app/wp")
    );
    assert!(route_statuses(&idx).is_empty());
}

#[test]
fn a_route_whose_service_is_missing_attaches_when_it_appears() {
    let mut idx = mesh();
    let mut spec = split_spec();
    spec["parentRefs"] = json!([service_parent("later")]);
    idx.apply(route("app", "r", spec));
    assert!(!only_route(&idx).parents[0].found);
    assert!(
        route_statuses(&idx)
            .iter()
            .any(|s| s == "parent Service app/later not found")
    );
    idx.apply(service(
        "app",
        "later",
        "10.96.0.9",
        json!({"app": "later"}),
    ));
    let info = only_route(&idx);
    assert!(info.parents[0].found);
    assert_eq!(info.parents[0].waypoint.as_deref(), Some("app/wp"));
}

#[test]
fn timeouts_are_parsed_and_bad_ones_answer_500() {
    let mut idx = mesh();
    let spec = json!({
        "parentRefs": [service_parent("web")],
        "rules": [
            {"backendRefs": [{"name": "v1", "port": 80}],
             "timeouts": {"request": "1m30s", "backendRequest": "500ms"}},
            {"backendRefs": [{"name": "v1", "port": 80}],
             "timeouts": {"request": "10 seconds"}},
            {"backendRefs": [{"name": "v1", "port": 80}],
             "timeouts": {"request": "1s", "backendRequest": "2s"}}
        ]
    });
    idx.apply(route("app", "t", spec));
    let info = only_route(&idx);
    assert_eq!(info.rules[0].timeouts.request_ms, Some(90_000));
    assert_eq!(info.rules[0].timeouts.backend_request_ms, Some(500));
    assert_eq!(info.rules[0].outcome, RuleOutcome::Route);
    assert_eq!(info.rules[1].outcome, RuleOutcome::Answer500);
    assert_eq!(info.rules[2].outcome, RuleOutcome::Answer500);
}

#[test]
fn gateway_api_durations() {
    assert_eq!(parse_duration_ms("10s"), Some(10_000));
    assert_eq!(parse_duration_ms("500ms"), Some(500));
    assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
    assert_eq!(parse_duration_ms("1h30m10s5ms"), Some(5_410_005));
    assert_eq!(parse_duration_ms("0s"), Some(0));
    for bad in [
        "",
        "10",
        "s",
        "1.5s",
        "-1s",
        "123456s",
        "1h1m1s1ms1h",
        "10us",
        "1d",
    ] {
        assert_eq!(parse_duration_ms(bad), None, "{bad:?}");
    }
}

#[test]
fn a_rule_without_backends_answers_500() {
    let mut idx = mesh();
    let spec = json!({
        "parentRefs": [service_parent("web")],
        "rules": [
            {"matches": [{"path": {"value": "/x"}}]},
            {"backendRefs": [{"name": "v1", "port": 80, "weight": 0}]}
        ]
    });
    idx.apply(route("app", "e", spec));
    let info = only_route(&idx);
    assert_eq!(info.rules[0].outcome, RuleOutcome::Answer500);
    assert_eq!(info.rules[1].outcome, RuleOutcome::Answer500);
}
