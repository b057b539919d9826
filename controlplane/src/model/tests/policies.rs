//! AuthorizationPolicy translation (table-driven) and how policies are
//! listed on workloads.

use meshbox_proto::security::{
    Action, Address as CidrAddress, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};
use serde_json::{Value, json};

use super::*;
use crate::model::{Kind, ObjectKey, translate_policy};

fn sm(t: MatchType) -> StringMatch {
    StringMatch {
        match_type: Some(t),
    }
}
fn exact(s: &str) -> StringMatch {
    sm(MatchType::Exact(s.into()))
}
fn prefix(s: &str) -> StringMatch {
    sm(MatchType::Prefix(s.into()))
}
fn suffix(s: &str) -> StringMatch {
    sm(MatchType::Suffix(s.into()))
}
fn presence() -> StringMatch {
    sm(MatchType::Presence(()))
}
fn cidr(ip: &str, length: u32) -> CidrAddress {
    let address = match ip.parse::<std::net::IpAddr>().expect("ip") {
        std::net::IpAddr::V4(v) => v.octets().to_vec(),
        std::net::IpAddr::V6(v) => v.octets().to_vec(),
    };
    CidrAddress { address, length }
}
fn rule(clauses: Vec<Clause>) -> Rule {
    Rule { clauses }
}
fn clause(matches: Vec<Match>) -> Clause {
    Clause { matches }
}

struct Case {
    name: &'static str,
    namespace: &'static str,
    spec: Value,
    /// `None`: nothing is sent to node proxies.
    want: Option<(Action, Scope, Vec<Rule>)>,
    /// Substrings of the expected status messages, in order.
    messages: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "allow principals and namespaces",
            namespace: "ns",
            spec: json!({"rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/a/sa/b", "*", "cluster.local/ns/x/*", "*/sa/admin"],
                "notNamespaces": ["kube-*"]
            }}]}]}),
            want: Some((
                Action::Allow,
                Scope::Namespace,
                vec![rule(vec![clause(vec![Match {
                    principals: vec![
                        exact("cluster.local/ns/a/sa/b"),
                        presence(),
                        prefix("cluster.local/ns/x/"),
                        suffix("/sa/admin"),
                    ],
                    not_namespaces: vec![prefix("kube-")],
                    ..Default::default()
                }])])],
            )),
            messages: vec![],
        },
        Case {
            name: "from, to and when become ANDed clauses; sources and operations ORed",
            namespace: "ns",
            spec: json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{
                "from": [{"source": {"namespaces": ["a"]}}, {"source": {"ipBlocks": ["10.0.0.0/8", "192.168.1.1"], "notIpBlocks": ["10.1.0.0/16"]}}],
                "to": [{"operation": {"ports": ["5432"]}}, {"operation": {"notPorts": ["22", "23"]}}],
                "when": [
                    {"key": "source.principal", "values": ["cluster.local/ns/a/sa/app"]},
                    {"key": "destination.port", "notValues": ["9090"]},
                    {"key": "destination.ip", "values": ["fd00::/64"]},
                    {"key": "remote.ip", "values": ["2001:db8::1"]},
                    {"key": "source.namespace", "values": ["a"], "notValues": ["b"]}
                ]
            }]}),
            want: Some((
                Action::Allow,
                Scope::WorkloadSelector,
                vec![rule(vec![
                    clause(vec![
                        Match {
                            namespaces: vec![exact("a")],
                            ..Default::default()
                        },
                        Match {
                            source_ips: vec![cidr("10.0.0.0", 8), cidr("192.168.1.1", 32)],
                            not_source_ips: vec![cidr("10.1.0.0", 16)],
                            ..Default::default()
                        },
                    ]),
                    clause(vec![
                        Match {
                            destination_ports: vec![5432],
                            ..Default::default()
                        },
                        Match {
                            not_destination_ports: vec![22, 23],
                            ..Default::default()
                        },
                    ]),
                    clause(vec![Match {
                        principals: vec![exact("cluster.local/ns/a/sa/app")],
                        ..Default::default()
                    }]),
                    clause(vec![Match {
                        not_destination_ports: vec![9090],
                        ..Default::default()
                    }]),
                    clause(vec![Match {
                        destination_ips: vec![cidr("fd00::", 64)],
                        ..Default::default()
                    }]),
                    clause(vec![Match {
                        source_ips: vec![cidr("2001:db8::1", 128)],
                        ..Default::default()
                    }]),
                    clause(vec![Match {
                        namespaces: vec![exact("a")],
                        not_namespaces: vec![exact("b")],
                        ..Default::default()
                    }]),
                ])],
            )),
            messages: vec![],
        },
        Case {
            name: "allow without rules denies everything",
            namespace: "ns",
            spec: json!({}),
            want: Some((Action::Allow, Scope::Namespace, vec![])),
            messages: vec![],
        },
        Case {
            name: "allow with an empty rule allows everything",
            namespace: "ns",
            spec: json!({"rules": [{}]}),
            want: Some((Action::Allow, Scope::Namespace, vec![rule(vec![])])),
            messages: vec![],
        },
        Case {
            name: "root namespace without selector is global; empty selector is no selector",
            namespace: "istio-system",
            spec: json!({"selector": {"matchLabels": {}}, "action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}),
            want: Some((
                Action::Deny,
                Scope::Global,
                vec![rule(vec![clause(vec![Match {
                    not_principals: vec![presence()],
                    ..Default::default()
                }])])],
            )),
            messages: vec![],
        },
        Case {
            name: "allow rule with HTTP fields is omitted, the others kept",
            namespace: "ns",
            spec: json!({"rules": [
                {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
                {"from": [{"source": {"requestPrincipals": ["*"]}}]},
                {"when": [{"key": "request.headers[x-user]", "values": ["a"]}]},
                {"to": [{"operation": {"ports": ["8080"]}}]}
            ]}),
            want: Some((
                Action::Allow,
                Scope::Namespace,
                vec![rule(vec![clause(vec![Match {
                    destination_ports: vec![8080],
                    ..Default::default()
                }])])],
            )),
            messages: vec![
                "rules[0] omitted: HTTP attributes need a waypoint (to[0].operation.methods)",
                "rules[1] omitted: HTTP attributes need a waypoint (from[0].source.requestPrincipals)",
                "rules[2] omitted: HTTP attributes need a waypoint (when[0] (key \"request.headers[x-user]\"))",
            ],
        },
        Case {
            name: "allow with only HTTP rules denies everything",
            namespace: "ns",
            spec: json!({"rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
            want: Some((Action::Allow, Scope::Namespace, vec![])),
            messages: vec!["rules[0] omitted", "denies all traffic"],
        },
        Case {
            name: "deny rule reduced to its L4 part",
            namespace: "ns",
            spec: json!({"action": "DENY", "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"], "requestPrincipals": ["issuer/*"]}}],
                "to": [{"operation": {"methods": ["DELETE"], "ports": ["80"]}}, {"operation": {"paths": ["/x"]}}],
                "when": [{"key": "request.auth.claims[group]", "values": ["admin"]}, {"key": "source.ip", "values": ["10.0.0.0/8"]}]
            }]}),
            // The second operation has no L4 part left, so the `to` clause
            // matches every port; the HTTP condition is dropped.
            want: Some((
                Action::Deny,
                Scope::Namespace,
                vec![rule(vec![
                    clause(vec![Match {
                        principals: vec![exact("cluster.local/ns/x/sa/y")],
                        ..Default::default()
                    }]),
                    clause(vec![Match {
                        source_ips: vec![cidr("10.0.0.0", 8)],
                        ..Default::default()
                    }]),
                ])],
            )),
            messages: vec![
                "rules[0] enforced without its HTTP attributes (from[0].source.requestPrincipals, to[0].operation.methods, to[1].operation.paths, when[0] (key \"request.auth.claims[group]\")), which need a waypoint; this DENY matches more than written",
            ],
        },
        Case {
            name: "deny rule with only HTTP attributes denies everything",
            namespace: "ns",
            spec: json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}),
            want: Some((Action::Deny, Scope::Namespace, vec![rule(vec![])])),
            messages: vec!["rules[0] enforced without its HTTP attributes"],
        },
        Case {
            name: "allow rule with an invalid port is omitted",
            namespace: "ns",
            spec: json!({"rules": [{"to": [{"operation": {"ports": ["80", "http"]}}]}, {"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
            want: Some((Action::Allow, Scope::Namespace, vec![])),
            messages: vec![
                "rules[0] omitted: invalid values (to[0].operation.ports: \"http\" is not a port number)",
                "rules[1] omitted: invalid values (from[0].source.ipBlocks: \"10.0.0.0/33\" is not an IP address or CIDR)",
                "denies all traffic",
            ],
        },
        Case {
            name: "deny drops fields with invalid values, matching more",
            namespace: "ns",
            spec: json!({"action": "DENY", "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"], "notIpBlocks": ["nope"]}}],
                "to": [{"operation": {"ports": ["80", "x"]}}],
                "when": [{"key": "destination.port", "values": ["99999"]}]
            }]}),
            want: Some((
                Action::Deny,
                Scope::Namespace,
                vec![rule(vec![clause(vec![Match {
                    principals: vec![exact("cluster.local/ns/a/sa/b")],
                    ..Default::default()
                }])])],
            )),
            messages: vec![
                "rules[0]: invalid values ignored (from[0].source.notIpBlocks: \"nope\" is not an IP address or CIDR; to[0].operation.ports: \"x\" is not a port number; when[0] (key \"destination.port\").values: \"99999\" is not a port number); this DENY matches more than written",
            ],
        },
        Case {
            name: "empty source or condition without values",
            namespace: "ns",
            spec: json!({"rules": [{"from": [{"source": {}}]}, {"when": [{"key": "source.ip"}]}, {"from": [{}]}]}),
            want: Some((Action::Allow, Scope::Namespace, vec![])),
            messages: vec![
                "rules[0] omitted: invalid values (from[0].source is empty)",
                "rules[1] omitted: invalid values (when[0] (key \"source.ip\") has neither values nor notValues)",
                "rules[2] omitted: invalid values (from[0].source is empty)",
                "denies all traffic",
            ],
        },
        Case {
            name: "ipBlocks and remoteIpBlocks intersect; not-lists add up",
            namespace: "ns",
            spec: json!({"rules": [
                {"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "172.16.0.0/12"], "remoteIpBlocks": ["10.1.0.0/16", "192.168.0.0/16"], "notIpBlocks": ["10.1.1.1"], "notRemoteIpBlocks": ["10.1.2.0/24"]}}]},
                {"from": [{"source": {"remoteIpBlocks": ["192.0.2.0/24"]}}]},
                {"from": [{"source": {"ipBlocks": ["10.0.0.0/8"], "remoteIpBlocks": ["192.168.0.0/16"]}}]}
            ]}),
            want: Some((
                Action::Allow,
                Scope::Namespace,
                vec![
                    rule(vec![clause(vec![Match {
                        source_ips: vec![cidr("10.1.0.0", 16)],
                        not_source_ips: vec![cidr("10.1.1.1", 32), cidr("10.1.2.0", 24)],
                        ..Default::default()
                    }])]),
                    rule(vec![clause(vec![Match {
                        source_ips: vec![cidr("192.0.2.0", 24)],
                        ..Default::default()
                    }])]),
                ],
            )),
            messages: vec![
                "rules[2] can never match: from[0].source: ipBlocks and remoteIpBlocks do not overlap",
            ],
        },
        Case {
            name: "service accounts",
            namespace: "ns",
            spec: json!({"rules": [{"from": [{"source": {"serviceAccounts": ["other/api", "local"], "notServiceAccounts": ["ns/legacy"]}}]}]}),
            want: Some((
                Action::Allow,
                Scope::Namespace,
                vec![rule(vec![clause(vec![Match {
                    service_accounts: vec![
                        ServiceAccountMatch {
                            namespace: "other".into(),
                            service_account: "api".into(),
                        },
                        ServiceAccountMatch {
                            namespace: "ns".into(),
                            service_account: "local".into(),
                        },
                    ],
                    not_service_accounts: vec![ServiceAccountMatch {
                        namespace: "ns".into(),
                        service_account: "legacy".into(),
                    }],
                    ..Default::default()
                }])])],
            )),
            messages: vec![],
        },
        Case {
            name: "malformed service accounts",
            namespace: "ns",
            spec: json!({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}, {"from": [{"source": {"serviceAccounts": ["/x"]}}]}]}),
            want: Some((Action::Allow, Scope::Namespace, vec![])),
            messages: vec![
                "rules[0] omitted: invalid values (from[0].source.serviceAccounts: \"a/b/c\" is not a service account",
                "rules[1] omitted: invalid values (from[0].source.serviceAccounts: \"/x\" is not a service account",
                "denies all traffic",
            ],
        },
        Case {
            name: "audit is ignored",
            namespace: "ns",
            spec: json!({"action": "AUDIT", "rules": [{}]}),
            want: None,
            messages: vec!["AUDIT policies are not enforced by node proxies"],
        },
        Case {
            name: "custom is refused",
            namespace: "ns",
            spec: json!({"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{}]}),
            want: None,
            messages: vec!["CUSTOM (external authorization) policies are not supported"],
        },
        Case {
            name: "targetRef policies belong to waypoints",
            namespace: "ns",
            spec: json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}], "rules": [{}]}),
            want: None,
            messages: vec!["targetRef binds this policy to Gateway wp"],
        },
        Case {
            name: "unknown action fails closed",
            namespace: "ns",
            spec: json!({"action": "DENNY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}),
            want: Some((Action::Allow, Scope::Namespace, vec![])),
            messages: vec!["action \"DENNY\" is not ALLOW, DENY, AUDIT or CUSTOM; failing closed"],
        },
    ]
}

#[test]
fn translation_table() {
    for c in cases() {
        let p = policy_obj(c.namespace, "p", c.spec.clone());
        let t = translate_policy(&p, c.namespace, "p", "istio-system");
        match (&t.authorization, &c.want) {
            (None, None) => {}
            (Some(a), Some((action, scope, rules))) => {
                assert_eq!(
                    (a.name.as_str(), a.namespace.as_str()),
                    ("p", c.namespace),
                    "{}",
                    c.name
                );
                assert_eq!(a.action, *action as i32, "{}: action", c.name);
                assert_eq!(a.scope, *scope as i32, "{}: scope", c.name);
                assert_eq!(&a.rules, rules, "{}: rules", c.name);
                assert!(!a.dry_run, "{}", c.name);
            }
            (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
        }
        assert_eq!(
            t.messages.len(),
            c.messages.len(),
            "{}: {:?}",
            c.name,
            t.messages
        );
        for (got, want) in t.messages.iter().zip(&c.messages) {
            assert!(
                got.contains(want),
                "{}: message {got:?} lacks {want:?}",
                c.name
            );
        }
        // Dataplanes read an empty Match as "matches nothing": never send one.
        for r in t.authorization.iter().flat_map(|a| &a.rules) {
            for cl in &r.clauses {
                assert!(!cl.matches.is_empty(), "{}: empty clause", c.name);
                assert!(
                    cl.matches.iter().all(|m| *m != Match::default()),
                    "{}: empty match",
                    c.name
                );
            }
        }
    }
}

#[test]
fn dry_run_annotation() {
    let mut p = policy_obj("ns", "p", json!({"rules": [{}]}));
    p.metadata.annotations = Some([("istio.io/dry-run".to_string(), "true".to_string())].into());
    assert!(
        translate_policy(&p, "ns", "p", "istio-system")
            .authorization
            .expect("sent")
            .dry_run
    );
}

fn policy_names(idx: &MeshIndex, ns: &str, pod: &str) -> Vec<String> {
    workload(idx, ns, pod)
        .expect("workload")
        .authorization_policies
}

/// Namespaces `a-b` and `a` (so string order differs from tuple order),
/// pods with various labels, policies of every scope.
fn policy_world() -> MeshIndex {
    let mut idx = index();
    apply_all(
        &mut idx,
        vec![
            pod("a", "web", "10.0.0.1", json!({"app": "web"})),
            pod("a", "db", "10.0.0.2", json!({"app": "db"})),
            pod("a-b", "web", "10.0.1.1", json!({"app": "web"})),
            pod("istio-system", "web", "10.0.2.1", json!({"app": "web"})),
            policy("a", "ns-wide", json!({"rules": [{}]})),
            policy(
                "a",
                "web-only",
                json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]}),
            ),
            policy("a-b", "ns-wide", json!({"action": "DENY"})),
            policy("istio-system", "mesh-wide", json!({"action": "DENY"})),
            policy(
                "istio-system",
                "all-webs",
                json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY"}),
            ),
            policy("a", "audit", json!({"action": "AUDIT"})),
        ],
    );
    idx
}

#[test]
fn workloads_list_the_policies_that_apply() {
    let idx = policy_world();
    assert_eq!(
        policy_names(&idx, "a", "web"),
        vec!["a/ns-wide", "a/web-only", "istio-system/all-webs"]
    );
    assert_eq!(policy_names(&idx, "a", "db"), vec!["a/ns-wide"]);
    assert_eq!(
        policy_names(&idx, "a-b", "web"),
        vec!["a-b/ns-wide", "istio-system/all-webs"]
    );
    assert_eq!(
        policy_names(&idx, "istio-system", "web"),
        vec!["istio-system/all-webs"]
    );
    let served: Vec<&str> = idx.authorizations().map(|(k, _)| k).collect();
    assert_eq!(
        served,
        vec![
            "a-b/ns-wide",
            "a/ns-wide",
            "a/web-only",
            "istio-system/all-webs",
            "istio-system/mesh-wide"
        ]
    );
    assert_eq!(
        statuses_of(&idx, Kind::AuthorizationPolicy, "a", "audit").len(),
        1
    );
}

#[test]
fn deleting_a_policy_unlists_it_and_removes_the_resource() {
    let mut idx = policy_world();
    let changes = idx.delete(ObjectKey::authorization_policy("istio-system", "all-webs"));
    assert_eq!(
        summary(&changes),
        vec![
            // "a-b/" sorts before "a/".
            format!("+{}", uid("a-b", "web")),
            format!("+{}", uid("a", "web")),
            format!("+{}", uid("istio-system", "web")),
            "-authz:istio-system/all-webs".to_string(),
        ]
    );
    assert_eq!(
        policy_names(&idx, "a", "web"),
        vec!["a/ns-wide", "a/web-only"]
    );
    let changes = idx.delete(ObjectKey::authorization_policy("a", "ns-wide"));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("a", "db")),
            format!("+{}", uid("a", "web")),
            "-authz:a/ns-wide".to_string()
        ]
    );
    let changes = idx.delete(ObjectKey::authorization_policy("a", "audit"));
    assert!(changes.is_empty());
    assert!(idx.statuses().iter().all(|s| s.name != "audit"));
}

#[test]
fn rule_only_change_touches_only_the_authorization() {
    let mut idx = policy_world();
    let changes = idx.apply(policy("a", "web-only", json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]})));
    assert_eq!(summary(&changes), vec!["+authz:a/web-only".to_string()]);
}

#[test]
fn selector_change_touches_old_and_new_workloads() {
    let mut idx = policy_world();
    let changes = idx.apply(policy(
        "a",
        "web-only",
        json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]}),
    ));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("a", "db")),
            format!("+{}", uid("a", "web"))
        ]
    );
    assert_eq!(
        policy_names(&idx, "a", "db"),
        vec!["a/ns-wide", "a/web-only"]
    );
}

#[test]
fn action_change_to_custom_withdraws_the_policy() {
    let mut idx = policy_world();
    let changes = idx.apply(policy("a", "web-only", json!({"selector": {"matchLabels": {"app": "web"}}, "action": "CUSTOM", "provider": {"name": "x"}})));
    assert_eq!(
        summary(&changes),
        vec![
            format!("+{}", uid("a", "web")),
            "-authz:a/web-only".to_string()
        ]
    );
    assert_eq!(
        policy_names(&idx, "a", "web"),
        vec!["a/ns-wide", "istio-system/all-webs"]
    );
    assert_eq!(
        statuses_of(&idx, Kind::AuthorizationPolicy, "a", "web-only").len(),
        1
    );
}

#[test]
fn pod_label_change_picks_up_selector_policies() {
    let mut idx = policy_world();
    let changes = idx.apply(pod("a", "db", "10.0.0.2", json!({"app": "web"})));
    assert_eq!(summary(&changes), vec![format!("+{}", uid("a", "db"))]);
    assert_eq!(
        policy_names(&idx, "a", "db"),
        vec!["a/ns-wide", "a/web-only", "istio-system/all-webs"]
    );
}

#[test]
fn authorization_resource_shape() {
    let idx = policy_world();
    let a = authorization(&idx, "a", "web-only").expect("sent");
    assert_eq!(a.name, "web-only");
    assert_eq!(a.namespace, "a");
    assert_eq!(a.scope, Scope::WorkloadSelector as i32);
    assert_eq!(a.action, Action::Allow as i32);
    assert_eq!(a.rules, vec![rule(vec![])]);
}
