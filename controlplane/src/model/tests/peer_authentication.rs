//! PeerAuthentication: which converted policies workloads list, what the
//! converted `Authorization` resources hold, and what changes are pushed.

use meshbox_proto::security::{
    Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match::MatchType,
};
use serde_json::{Value, json};

use super::*;
use crate::model::{Kind, ObjectKey};

const STATIC: &str = "istio-system/istio_converted_static_strict";

/// A PeerAuthentication created at `created` (an RFC 3339 time), or without
/// a timestamp.
fn pa(ns: &str, name: &str, created: Option<&str>, spec: Value) -> Object {
    let mut v = json!({"metadata": {"name": name, "namespace": ns}, "spec": spec});
    if let Some(t) = created {
        v = set(v, "/metadata/creationTimestamp", json!(t));
    }
    peer_auth_from(v)
}

fn mode(m: &str) -> Value {
    json!({"mtls": {"mode": m}})
}

fn selected(app: &str, m: &str) -> Value {
    json!({"selector": {"matchLabels": {"app": app}}, "mtls": {"mode": m}})
}

fn listed(idx: &MeshIndex, ns: &str, name: &str) -> Vec<String> {
    workload(idx, ns, name)
        .expect("workload")
        .authorization_policies
}

fn no_identity() -> Match {
    Match {
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        ..Default::default()
    }
}

fn clause(m: Match) -> Clause {
    Clause { matches: vec![m] }
}

fn not_port(port: u32) -> Clause {
    clause(Match {
        not_destination_ports: vec![port],
        ..Default::default()
    })
}

fn converted(ns: &str, name: &str, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: format!("converted_peer_authentication_{name}"),
        namespace: ns.into(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    }
}

/// Two enrolled namespaces with a `db` and a `web` pod in `shop` and an
/// `api` pod in `other`.
fn mesh() -> MeshIndex {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            ambient_namespace("shop"),
            ambient_namespace("other"),
            pod("shop", "db", "10.0.0.1", json!({"app": "db"})),
            pod("shop", "web", "10.0.0.2", json!({"app": "web"})),
            pod("other", "api", "10.0.0.3", json!({"app": "api"})),
        ],
    );
    idx
}

#[test]
fn mesh_strict_lists_the_static_policy_on_every_workload() {
    let mut idx = mesh();
    let changes = idx.apply(pa("istio-system", "default", None, mode("STRICT")));
    assert_eq!(
        summary(&changes),
        [
            format!("+{}", uid("other", "api")),
            format!("+{}", uid("shop", "db")),
            format!("+{}", uid("shop", "web")),
            format!("+authz:{STATIC}"),
        ]
    );
    for (ns, name) in [("shop", "db"), ("shop", "web"), ("other", "api")] {
        assert_eq!(listed(&idx, ns, name), [STATIC], "{ns}/{name}");
    }
    // Exactly istiod's static policy: DENY when the peer has no identity.
    assert_eq!(
        authorization(&idx, "istio-system", "istio_converted_static_strict"),
        Some(Authorization {
            name: "istio_converted_static_strict".into(),
            namespace: "istio-system".into(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![clause(no_identity())],
            }],
            dry_run: false,
            extensions: Vec::new(),
        })
    );
    assert_eq!(
        idx.peer_authentication_origins(STATIC),
        [ObjectKey::peer_authentication("istio-system", "default")]
    );
}

#[test]
fn a_namespace_policy_overrides_the_mesh_unless_unset() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            pa("istio-system", "default", None, mode("STRICT")),
            pa("shop", "relaxed", None, mode("PERMISSIVE")),
        ],
    );
    assert!(listed(&idx, "shop", "db").is_empty());
    assert!(listed(&idx, "shop", "web").is_empty());
    assert_eq!(listed(&idx, "other", "api"), [STATIC]);

    // UNSET inherits the mesh's STRICT.
    idx.apply(pa("shop", "relaxed", None, mode("UNSET")));
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);
    idx.apply(pa("shop", "relaxed", None, json!({})));
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);

    // DISABLE, like PERMISSIVE, accepts plaintext.
    idx.apply(pa("shop", "relaxed", None, mode("DISABLE")));
    assert!(listed(&idx, "shop", "web").is_empty());

    // A namespace can be STRICT in a permissive mesh.
    apply_all(
        &mut idx,
        vec![
            pa("istio-system", "default", None, mode("PERMISSIVE")),
            pa("shop", "relaxed", None, mode("STRICT")),
        ],
    );
    assert_eq!(listed(&idx, "shop", "web"), [STATIC]);
    assert!(listed(&idx, "other", "api").is_empty());

    // UNSET inherits PERMISSIVE just as well, and nothing without a mesh
    // policy.
    idx.apply(pa("shop", "relaxed", None, mode("UNSET")));
    assert!(listed(&idx, "shop", "web").is_empty());
    idx.delete(ObjectKey::peer_authentication("istio-system", "default"));
    assert!(listed(&idx, "shop", "web").is_empty());
}

#[test]
fn workload_policies_override_their_namespace() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            pa("shop", "relaxed", None, mode("PERMISSIVE")),
            pa("shop", "db-strict", None, selected("db", "STRICT")),
        ],
    );
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);
    assert!(
        listed(&idx, "shop", "web").is_empty(),
        "selector not matching"
    );
    assert!(listed(&idx, "other", "api").is_empty(), "other namespace");

    // In a STRICT namespace, DISABLE and PERMISSIVE exempt the workload and
    // UNSET inherits.
    idx.apply(pa("shop", "relaxed", None, mode("STRICT")));
    idx.apply(pa("shop", "db-strict", None, selected("db", "DISABLE")));
    assert!(listed(&idx, "shop", "db").is_empty());
    assert_eq!(listed(&idx, "shop", "web"), [STATIC]);
    idx.apply(pa("shop", "db-strict", None, selected("db", "PERMISSIVE")));
    assert!(listed(&idx, "shop", "db").is_empty());
    idx.apply(pa("shop", "db-strict", None, selected("db", "UNSET")));
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);

    // A pod relabelled out of the selector inherits again; into it, follows it.
    idx.apply(pa("shop", "db-strict", None, selected("db", "PERMISSIVE")));
    idx.apply(pod("shop", "db", "10.0.0.1", json!({"app": "cache"})));
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);
    idx.apply(pod("shop", "db", "10.0.0.1", json!({"app": "db"})));
    assert!(listed(&idx, "shop", "db").is_empty());
}

#[test]
fn the_oldest_policy_wins_at_each_level() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            pa("shop", "new", Some("2024-06-01T00:00:00Z"), mode("STRICT")),
            pa(
                "shop",
                "old",
                Some("2024-01-01T00:00:00Z"),
                mode("PERMISSIVE"),
            ),
        ],
    );
    assert!(
        listed(&idx, "shop", "web").is_empty(),
        "the older PERMISSIVE"
    );
    idx.delete(ObjectKey::peer_authentication("shop", "old"));
    assert_eq!(listed(&idx, "shop", "web"), [STATIC], "the newer one now");

    // Workload level, and a policy without a timestamp counts as newest.
    apply_all(
        &mut idx,
        vec![
            pa("shop", "db-a", None, selected("db", "PERMISSIVE")),
            pa(
                "shop",
                "db-b",
                Some("2025-01-01T00:00:00Z"),
                selected("db", "STRICT"),
            ),
        ],
    );
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);
    idx.apply(pa(
        "shop",
        "db-a",
        Some("2024-12-31T00:00:00Z"),
        selected("db", "PERMISSIVE"),
    ));
    assert!(listed(&idx, "shop", "db").is_empty());

    // Mesh level.
    apply_all(
        &mut idx,
        vec![
            pa(
                "istio-system",
                "m1",
                Some("2024-01-01T00:00:00Z"),
                mode("STRICT"),
            ),
            pa(
                "istio-system",
                "m2",
                Some("2023-01-01T00:00:00Z"),
                mode("PERMISSIVE"),
            ),
        ],
    );
    assert!(listed(&idx, "other", "api").is_empty());
    idx.delete(ObjectKey::peer_authentication("istio-system", "m2"));
    assert_eq!(listed(&idx, "other", "api"), [STATIC]);
}

#[test]
fn strict_workload_with_permissive_ports_converts_to_one_rule() {
    let mut idx = mesh();
    let changes = idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}, "8081": {"mode": "DISABLE"}, "8080": {"mode": "STRICT"}}
        }),
    ));
    let name = "shop/converted_peer_authentication_db";
    assert_eq!(
        summary(&changes),
        [
            format!("+{}", uid("shop", "db")),
            format!("+authz:{STATIC}"),
            format!("+authz:{name}"),
        ]
    );
    // Deny without identity unless the port is exempt; STRICT port 8080
    // adds nothing. The workload lists it instead of the static policy.
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(converted(
            "shop",
            "db",
            vec![Rule {
                clauses: vec![clause(no_identity()), not_port(8081), not_port(9090)],
            }]
        ))
    );
    assert_eq!(listed(&idx, "shop", "db"), [name]);
    assert!(listed(&idx, "shop", "web").is_empty());
    assert_eq!(
        idx.peer_authentication_origins(name),
        [ObjectKey::peer_authentication("shop", "db")]
    );

    // All ports STRICT: plain STRICT, no converted policy.
    let changes = idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "STRICT"}}
        }),
    ));
    assert_eq!(
        summary(&changes),
        [format!("+{}", uid("shop", "db")), format!("-authz:{name}")]
    );
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);
}

#[test]
fn unset_workload_with_exempt_ports_merges_the_inherited_strict() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            pa("istio-system", "default", None, mode("STRICT")),
            pa(
                "shop",
                "db",
                None,
                json!({
                    "selector": {"matchLabels": {"app": "db"}},
                    "portLevelMtls": {"9090": {"mode": "DISABLE"}}
                }),
            ),
        ],
    );
    let name = "shop/converted_peer_authentication_db";
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(converted(
            "shop",
            "db",
            vec![Rule {
                clauses: vec![not_port(9090), clause(no_identity())],
            }]
        ))
    );
    assert_eq!(listed(&idx, "shop", "db"), [name]);
    assert_eq!(listed(&idx, "shop", "web"), [STATIC]);

    // STRICT both inherited and its own: istiod's rule says so twice.
    idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9090": {"mode": "DISABLE"}}
        }),
    ));
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(converted(
            "shop",
            "db",
            vec![Rule {
                clauses: vec![clause(no_identity()), not_port(9090), clause(no_identity())],
            }]
        ))
    );
    assert_eq!(listed(&idx, "shop", "db"), [name]);

    // The namespace turns PERMISSIVE: nothing to exempt, nothing converted.
    // The workload's own STRICT still holds, without the inherited repeat.
    let changes = idx.apply(pa("shop", "relaxed", None, mode("PERMISSIVE")));
    assert_eq!(
        summary(&changes),
        [format!("+{}", uid("shop", "web")), format!("+authz:{name}")]
    );
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(converted(
            "shop",
            "db",
            vec![Rule {
                clauses: vec![clause(no_identity()), not_port(9090)],
            }]
        ))
    );
    assert!(listed(&idx, "shop", "web").is_empty());

    // Back to UNSET: nothing to exempt under PERMISSIVE, nothing converted.
    let changes = idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "portLevelMtls": {"9090": {"mode": "DISABLE"}}
        }),
    ));
    assert_eq!(
        summary(&changes),
        [format!("+{}", uid("shop", "db")), format!("-authz:{name}")]
    );
    assert!(listed(&idx, "shop", "db").is_empty());
}

#[test]
fn permissive_workload_with_strict_ports_denies_plaintext_on_those_ports() {
    let mut idx = mesh();
    let strict_port = |port: u32| Rule {
        clauses: vec![clause(Match {
            destination_ports: vec![port],
            ..no_identity()
        })],
    };
    idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {"9090": {"mode": "STRICT"}, "5432": {"mode": "STRICT"}, "80": {"mode": "PERMISSIVE"}}
        }),
    ));
    let want = converted("shop", "db", vec![strict_port(5432), strict_port(9090)]);
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(want.clone())
    );
    assert_eq!(
        listed(&idx, "shop", "db"),
        ["shop/converted_peer_authentication_db"]
    );

    // Same under a STRICT mesh: the workload's own PERMISSIVE rules, so the
    // STRICT ports still need their rules (istiod drops them here and
    // leaves the ports open; see the README).
    idx.apply(pa("istio-system", "default", None, mode("STRICT")));
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(want)
    );
    assert_eq!(
        listed(&idx, "shop", "db"),
        ["shop/converted_peer_authentication_db"]
    );
    assert_eq!(listed(&idx, "shop", "web"), [STATIC]);

    // UNSET in a permissive mesh: the same per-port rules.
    idx.apply(pa("istio-system", "default", None, mode("PERMISSIVE")));
    idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "portLevelMtls": {"5432": {"mode": "STRICT"}}
        }),
    ));
    assert_eq!(
        authorization(&idx, "shop", "converted_peer_authentication_db"),
        Some(converted("shop", "db", vec![strict_port(5432)]))
    );
}

#[test]
fn root_namespace_selector_policies_are_ignored_and_reported() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            pod("istio-system", "gw", "10.0.0.9", json!({"app": "db"})),
            pa(
                "istio-system",
                "db-everywhere",
                None,
                json!({
                    "selector": {"matchLabels": {"app": "db"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}
                }),
            ),
        ],
    );
    assert!(listed(&idx, "shop", "db").is_empty());
    assert!(listed(&idx, "istio-system", "gw").is_empty());
    assert_eq!(
        authorization(
            &idx,
            "istio-system",
            "converted_peer_authentication_db-everywhere"
        ),
        None
    );
    let messages = statuses_of(
        &idx,
        Kind::PeerAuthentication,
        "istio-system",
        "db-everywhere",
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("root namespace is ignored")),
        "{messages:?}"
    );
    assert!(idx.peer_authentication_origins(STATIC).is_empty());
}

#[test]
fn deleting_the_policy_removes_every_reference() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            pa("istio-system", "default", None, mode("STRICT")),
            pa(
                "shop",
                "db",
                None,
                json!({
                    "selector": {"matchLabels": {"app": "db"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}
                }),
            ),
        ],
    );
    let changes = idx.delete(ObjectKey::peer_authentication("shop", "db"));
    assert_eq!(
        summary(&changes),
        [
            format!("+{}", uid("shop", "db")),
            "-authz:shop/converted_peer_authentication_db".to_string(),
        ]
    );
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);

    let changes = idx.delete(ObjectKey::peer_authentication("istio-system", "default"));
    assert_eq!(
        summary(&changes),
        [
            format!("+{}", uid("other", "api")),
            format!("+{}", uid("shop", "db")),
            format!("+{}", uid("shop", "web")),
            format!("-authz:{STATIC}"),
        ]
    );
    for (ns, name) in [("shop", "db"), ("shop", "web"), ("other", "api")] {
        assert!(listed(&idx, ns, name).is_empty(), "{ns}/{name}");
    }
    assert!(idx.statuses().is_empty(), "{:?}", idx.statuses());
}

#[test]
fn peer_authentication_and_authorization_policies_are_listed_together() {
    let mut idx = mesh();
    apply_all(
        &mut idx,
        vec![
            policy("shop", "allow-web", json!({"rules": [{}]})),
            pa("shop", "strict", None, mode("STRICT")),
        ],
    );
    assert_eq!(listed(&idx, "shop", "db"), [STATIC, "shop/allow-web"]);
    assert!(idx.peer_authentication_origins("shop/allow-web").is_empty());
}

#[test]
fn bad_values_fail_closed_and_are_reported() {
    let status = |idx: &MeshIndex, name: &str| {
        statuses_of(idx, Kind::PeerAuthentication, "shop", name).join(" | ")
    };
    let mut idx = mesh();
    idx.apply(pa("shop", "typo", None, mode("STRICTT")));
    assert_eq!(
        listed(&idx, "shop", "web"),
        [STATIC],
        "an unknown mode is STRICT"
    );
    assert!(
        status(&idx, "typo").contains("\"STRICTT\""),
        "{}",
        status(&idx, "typo")
    );
    idx.delete(ObjectKey::peer_authentication("shop", "typo"));

    // A STRICT port that names no port: only STRICT honours it.
    idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {"http": {"mode": "STRICT"}, "70000": {"mode": "STRICT"}, "0": {"mode": "PERMISSIVE"}}
        }),
    ));
    assert_eq!(listed(&idx, "shop", "db"), [STATIC]);
    let s = status(&idx, "db");
    for needle in [
        "\"http\" is not a port number",
        "\"70000\" is not a port",
        "\"0\" is not a port",
        "treated as STRICT",
    ] {
        assert!(s.contains(needle), "{needle}: {s}");
    }

    // Out-of-range ports carry no traffic: ignored without escalating.
    idx.apply(pa(
        "shop",
        "db",
        None,
        json!({
            "selector": {"matchLabels": {"app": "db"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {"70000": {"mode": "STRICT"}, "8080": {"mode": "sometimes"}}
        }),
    ));
    assert_eq!(
        listed(&idx, "shop", "db"),
        ["shop/converted_peer_authentication_db"],
        "8080's unknown mode is STRICT: {}",
        status(&idx, "db")
    );
    idx.delete(ObjectKey::peer_authentication("shop", "db"));

    // portLevelMtls without a selector: ignored, and a STRICT port makes the
    // namespace policy STRICT.
    idx.apply(pa(
        "shop",
        "ns",
        None,
        json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"5432": {"mode": "STRICT"}}}),
    ));
    assert_eq!(listed(&idx, "shop", "web"), [STATIC]);
    let s = status(&idx, "ns");
    assert!(s.contains("needs a workload selector"), "{s}");
    idx.apply(pa(
        "shop",
        "ns",
        None,
        json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"5432": {"mode": "DISABLE"}}}),
    ));
    assert!(listed(&idx, "shop", "web").is_empty());
    assert!(status(&idx, "ns").contains("needs a workload selector"));
}
