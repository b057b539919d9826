//! Table tests for policy matching, scoping and the allow/deny order.

use std::net::{IpAddr, SocketAddr};

use meshbox_certs::SpiffeId;
use meshbox_proto::security as pb;
use meshbox_proto::workload as wpb;
use pb::string_match::MatchType;

use super::*;
use crate::state::{PolicyError, PolicyStore};

// ----- builders -----

fn spiffe(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn exact(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}

fn prefix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(MatchType::Prefix(s.into())),
    }
}

fn suffix(s: &str) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(MatchType::Suffix(s.into())),
    }
}

fn presence() -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}

fn cidr(addr: &str, length: u32) -> pb::Address {
    let address = match ip(addr) {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    pb::Address { address, length }
}

fn sa_match(ns: &str, name: &str) -> pb::ServiceAccountMatch {
    pb::ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    }
}

/// A policy of one rule, one clause, one match.
fn single(m: pb::Match) -> Vec<pb::Rule> {
    vec![pb::Rule {
        clauses: vec![pb::Clause { matches: vec![m] }],
    }]
}

fn authz(
    ns: &str,
    name: &str,
    scope: pb::Scope,
    action: pb::Action,
    rules: Vec<pb::Rule>,
) -> pb::Authorization {
    pb::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
        extensions: vec![],
    }
}

fn compile(a: &pb::Authorization) -> Policy {
    Policy::from_proto(&format!("{}/{}", a.namespace, a.name), a).unwrap()
}

fn store(policies: &[pb::Authorization]) -> PolicyStore {
    let mut s = PolicyStore::new();
    for p in policies {
        s.insert(compile(p));
    }
    s
}

/// The destination: pod `server` in namespace `app`.
fn dest(listed: &[&str]) -> Workload {
    let w = wpb::Workload {
        uid: "c1//Pod/app/server".into(),
        name: "server".into(),
        namespace: "app".into(),
        addresses: vec![vec![10, 0, 0, 2]],
        tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
        service_account: "server".into(),
        authorization_policies: listed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Workload::from_proto(&w).unwrap()
}

/// mTLS from `td/ns/client/sa/web` at 10.1.2.3 to 10.0.0.2:8080.
fn tls() -> ConnectionInfo {
    ConnectionInfo {
        src_ip: ip("10.1.2.3"),
        src_identity: Some(spiffe("spiffe://td/ns/client/sa/web")),
        dst: "10.0.0.2:8080".parse().unwrap(),
    }
}

/// mTLS from another trust domain, namespace, account, address and port.
fn tls_other() -> ConnectionInfo {
    ConnectionInfo {
        src_ip: ip("192.168.7.7"),
        src_identity: Some(spiffe("spiffe://other.td/ns/batch/sa/job")),
        dst: "10.0.0.3:9090".parse().unwrap(),
    }
}

/// Plaintext (port 15006): no identity.
fn plain() -> ConnectionInfo {
    ConnectionInfo {
        src_identity: None,
        ..tls()
    }
}

// ----- matching -----

/// (case, match, [matches tls, matches tls_other, matches plaintext]).
// One case per line reads as a table; rustfmt would spread each over ten.
#[rustfmt::skip]
fn match_cases() -> Vec<(&'static str, pb::Match, [bool; 3])> {
    let m = pb::Match::default;
    vec![
        // principals: compared without "spiffe://".
        ("principal exact", pb::Match { principals: vec![exact("td/ns/client/sa/web")], ..m() }, [true, false, false]),
        ("principal exact with spiffe:// never matches", pb::Match { principals: vec![exact("spiffe://td/ns/client/sa/web")], ..m() }, [false, false, false]),
        ("principal prefix", pb::Match { principals: vec![prefix("td/ns/client/")], ..m() }, [true, false, false]),
        ("principal suffix", pb::Match { principals: vec![suffix("/sa/job")], ..m() }, [false, true, false]),
        ("principal presence (*)", pb::Match { principals: vec![presence()], ..m() }, [true, true, false]),
        ("principal OR within the field", pb::Match { principals: vec![exact("nope"), suffix("/sa/job"), exact("td/ns/client/sa/web")], ..m() }, [true, true, false]),
        ("not principal exact", pb::Match { not_principals: vec![exact("td/ns/client/sa/web")], ..m() }, [false, true, true]),
        ("not principal presence: only plaintext", pb::Match { not_principals: vec![presence()], ..m() }, [false, false, true]),
        // namespaces: the identity's namespace.
        ("namespace exact", pb::Match { namespaces: vec![exact("client")], ..m() }, [true, false, false]),
        ("namespace prefix", pb::Match { namespaces: vec![prefix("bat")], ..m() }, [false, true, false]),
        ("namespace suffix", pb::Match { namespaces: vec![suffix("ent")], ..m() }, [true, false, false]),
        ("namespace presence", pb::Match { namespaces: vec![presence()], ..m() }, [true, true, false]),
        ("namespace empty prefix still needs an identity", pb::Match { namespaces: vec![prefix("")], ..m() }, [true, true, false]),
        ("not namespace", pb::Match { not_namespaces: vec![exact("client")], ..m() }, [false, true, true]),
        // service accounts: namespace + name, any trust domain.
        ("service account", pb::Match { service_accounts: vec![sa_match("client", "web")], ..m() }, [true, false, false]),
        ("service account in another trust domain", pb::Match { service_accounts: vec![sa_match("batch", "job")], ..m() }, [false, true, false]),
        ("service account needs both parts", pb::Match { service_accounts: vec![sa_match("client", "job")], ..m() }, [false, false, false]),
        ("not service account", pb::Match { not_service_accounts: vec![sa_match("client", "web")], ..m() }, [false, true, true]),
        // source IPs.
        ("source /32", pb::Match { source_ips: vec![cidr("10.1.2.3", 32)], ..m() }, [true, false, true]),
        ("source /24", pb::Match { source_ips: vec![cidr("10.1.2.0", 24)], ..m() }, [true, false, true]),
        ("source /24 next to it", pb::Match { source_ips: vec![cidr("10.1.3.0", 24)], ..m() }, [false, false, false]),
        ("source /0", pb::Match { source_ips: vec![cidr("0.0.0.0", 0)], ..m() }, [true, true, true]),
        ("source IPv6 prefix never covers IPv4", pb::Match { source_ips: vec![cidr("::", 0)], ..m() }, [false, false, false]),
        ("source IPv4-mapped prefix covers IPv4", pb::Match { source_ips: vec![cidr("::ffff:192.168.0.0", 112)], ..m() }, [false, true, false]),
        ("not source", pb::Match { not_source_ips: vec![cidr("10.0.0.0", 8)], ..m() }, [false, true, false]),
        // destination IPs.
        ("destination /32", pb::Match { destination_ips: vec![cidr("10.0.0.2", 32)], ..m() }, [true, false, true]),
        ("destination /31 covers both", pb::Match { destination_ips: vec![cidr("10.0.0.2", 31)], ..m() }, [true, true, true]),
        ("not destination", pb::Match { not_destination_ips: vec![cidr("10.0.0.2", 32)], ..m() }, [false, true, false]),
        // destination ports.
        ("destination port", pb::Match { destination_ports: vec![8080], ..m() }, [true, false, true]),
        ("destination ports OR", pb::Match { destination_ports: vec![1, 9090], ..m() }, [false, true, false]),
        ("destination port out of range never matches", pb::Match { destination_ports: vec![8080 + 65536], ..m() }, [false, false, false]),
        ("not destination port", pb::Match { not_destination_ports: vec![8080], ..m() }, [false, true, false]),
        // fields AND together; a field and its twin together.
        ("principal AND port", pb::Match { principals: vec![presence()], destination_ports: vec![9090], ..m() }, [false, true, false]),
        ("namespace present but not this one", pb::Match { namespaces: vec![presence()], not_namespaces: vec![exact("batch")], ..m() }, [true, false, false]),
        ("source range minus one address", pb::Match { source_ips: vec![cidr("10.0.0.0", 8)], not_source_ips: vec![cidr("10.1.2.3", 32)], ..m() }, [false, false, false]),
        // nothing set: matches nothing.
        ("empty match", m(), [false, false, false]),
    ]
}

#[test]
fn every_match_field_and_its_twin() {
    let conns = [tls(), tls_other(), plain()];
    for (name, m, want) in match_cases() {
        let p = compile(&authz(
            "app",
            "p",
            pb::Scope::Namespace,
            pb::Action::Allow,
            single(m),
        ));
        let got = conns.each_ref().map(|c| p.matches(c));
        assert_eq!(got, want, "{name}: [tls, tls_other, plaintext]");
    }
}

#[test]
fn mapped_connection_addresses_match_ipv4_policies() {
    let p = compile(&authz(
        "app",
        "p",
        pb::Scope::Namespace,
        pb::Action::Allow,
        single(pb::Match {
            source_ips: vec![cidr("10.1.2.0", 24)],
            destination_ips: vec![cidr("10.0.0.2", 32)],
            ..Default::default()
        }),
    ));
    let conn = ConnectionInfo {
        src_ip: ip("::ffff:10.1.2.3"),
        src_identity: None,
        dst: SocketAddr::new(ip("::ffff:10.0.0.2"), 8080),
    };
    assert!(p.matches(&conn));
}

#[test]
fn rule_clause_match_structure() {
    let port = |p: u32| pb::Match {
        destination_ports: vec![p],
        ..Default::default()
    };
    let ns = |n: &str| pb::Match {
        namespaces: vec![exact(n)],
        ..Default::default()
    };
    let clause = |ms: Vec<pb::Match>| pb::Clause { matches: ms };
    let rule = |cs: Vec<pb::Clause>| pb::Rule { clauses: cs };
    // tls(): namespace client, port 8080.
    let cases: Vec<(&str, Vec<pb::Rule>, bool)> = vec![
        ("no rules: matches nothing", vec![], false),
        (
            "a rule with no clauses: matches everything",
            vec![rule(vec![])],
            true,
        ),
        (
            "a clause with no matches: matches",
            vec![rule(vec![clause(vec![])])],
            true,
        ),
        (
            "a clause with only an empty match: matches nothing",
            vec![rule(vec![clause(vec![pb::Match::default()])])],
            false,
        ),
        (
            "clauses AND: both hold",
            vec![rule(vec![
                clause(vec![port(8080)]),
                clause(vec![ns("client")]),
            ])],
            true,
        ),
        (
            "clauses AND: one fails",
            vec![rule(vec![
                clause(vec![port(8080)]),
                clause(vec![ns("batch")]),
            ])],
            false,
        ),
        (
            "matches OR within a clause",
            vec![rule(vec![clause(vec![port(1), ns("client")])])],
            true,
        ),
        (
            "matches OR: none holds",
            vec![rule(vec![clause(vec![port(1), ns("batch")])])],
            false,
        ),
        (
            "rules OR",
            vec![
                rule(vec![clause(vec![port(1)])]),
                rule(vec![clause(vec![ns("client")])]),
            ],
            true,
        ),
        (
            "rules OR: none holds",
            vec![
                rule(vec![clause(vec![port(1)])]),
                rule(vec![clause(vec![ns("batch")])]),
            ],
            false,
        ),
    ];
    for (name, rules, want) in cases {
        let p = compile(&authz(
            "app",
            "p",
            pb::Scope::Namespace,
            pb::Action::Allow,
            rules,
        ));
        assert_eq!(p.matches(&tls()), want, "{name}");
    }
}

#[test]
fn malformed_policies_are_rejected() {
    let ok = authz("app", "p", pb::Scope::Namespace, pb::Action::Allow, vec![]);
    let with_match = |m: pb::Match| pb::Authorization {
        rules: single(m),
        ..ok.clone()
    };
    let cases: Vec<(&str, pb::Authorization, PolicyError)> = vec![
        (
            "unknown scope",
            pb::Authorization {
                scope: 9,
                ..ok.clone()
            },
            PolicyError::Enum {
                field: "scope",
                value: 9,
            },
        ),
        (
            "unknown action",
            pb::Authorization {
                action: 2,
                ..ok.clone()
            },
            PolicyError::Enum {
                field: "action",
                value: 2,
            },
        ),
        (
            "CIDR of 5 bytes",
            with_match(pb::Match {
                source_ips: vec![pb::Address {
                    address: vec![1, 2, 3, 4, 5],
                    length: 8,
                }],
                ..Default::default()
            }),
            PolicyError::AddressLength {
                field: "source_ips",
                len: 5,
            },
        ),
        (
            "IPv4 prefix longer than 32",
            with_match(pb::Match {
                not_destination_ips: vec![cidr("10.0.0.0", 33)],
                ..Default::default()
            }),
            PolicyError::PrefixLength {
                field: "not_destination_ips",
                len: 33,
            },
        ),
        (
            "IPv6 prefix longer than 128",
            with_match(pb::Match {
                destination_ips: vec![cidr("fd00::", 129)],
                ..Default::default()
            }),
            PolicyError::PrefixLength {
                field: "destination_ips",
                len: 129,
            },
        ),
        (
            "string match without a type",
            with_match(pb::Match {
                principals: vec![pb::StringMatch { match_type: None }],
                ..Default::default()
            }),
            PolicyError::EmptyStringMatch {
                field: "principals",
            },
        ),
    ];
    for (name, a, want) in cases {
        assert_eq!(Policy::from_proto("app/p", &a), Err(want), "{name}");
    }
}

// ----- which policies apply, and the decision -----

fn deny_all(ns: &str, name: &str, scope: pb::Scope) -> pb::Authorization {
    authz(
        ns,
        name,
        scope,
        pb::Action::Deny,
        vec![pb::Rule { clauses: vec![] }],
    )
}

fn allow_all(ns: &str, name: &str, scope: pb::Scope) -> pb::Authorization {
    authz(
        ns,
        name,
        scope,
        pb::Action::Allow,
        vec![pb::Rule { clauses: vec![] }],
    )
}

fn allow_ns(ns: &str, name: &str, scope: pb::Scope, from: &str) -> pb::Authorization {
    authz(
        ns,
        name,
        scope,
        pb::Action::Allow,
        single(pb::Match {
            namespaces: vec![exact(from)],
            ..Default::default()
        }),
    )
}

fn deny_ns(ns: &str, name: &str, scope: pb::Scope, from: &str) -> pb::Authorization {
    pb::Authorization {
        action: pb::Action::Deny as i32,
        ..allow_ns(ns, name, scope, from)
    }
}

fn dry(mut a: pb::Authorization) -> pb::Authorization {
    a.dry_run = true;
    a
}

fn allowed(reason: Reason) -> Outcome {
    Outcome {
        verdict: Verdict::Allow,
        reason,
    }
}

fn denied(reason: Reason) -> Outcome {
    Outcome {
        verdict: Verdict::Deny,
        reason,
    }
}

struct DecisionCase {
    name: &'static str,
    policies: Vec<pb::Authorization>,
    /// What the destination workload lists.
    listed: Vec<&'static str>,
    conn: ConnectionInfo,
    want: Outcome,
    want_dry_run: Option<Outcome>,
}

fn decision_cases() -> Vec<DecisionCase> {
    use pb::Scope::{Global, Namespace, WorkloadSelector};
    let key = |s: &str| s.to_string();
    vec![
        DecisionCase {
            name: "no policies: allow",
            policies: vec![],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: None,
        },
        DecisionCase {
            name: "GLOBAL deny in the root namespace applies to every namespace",
            policies: vec![deny_all("istio-system", "deny", Global)],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::DenyPolicyMatched(key("istio-system/deny"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "NAMESPACE policy of the destination's namespace applies",
            policies: vec![deny_all("app", "deny", Namespace)],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::DenyPolicyMatched(key("app/deny"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "NAMESPACE policy of another namespace does not",
            policies: vec![deny_all("other", "deny", Namespace)],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: None,
        },
        DecisionCase {
            name: "WORKLOAD_SELECTOR policy applies only when listed: not listed",
            policies: vec![deny_all("app", "deny", WorkloadSelector)],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: None,
        },
        DecisionCase {
            name: "WORKLOAD_SELECTOR policy applies only when listed: listed",
            policies: vec![deny_all("app", "deny", WorkloadSelector)],
            listed: vec!["app/deny"],
            conn: tls(),
            want: denied(Reason::DenyPolicyMatched(key("app/deny"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "a listed NAMESPACE policy is counted once",
            policies: vec![allow_ns("app", "a", Namespace, "client")],
            listed: vec!["app/a"],
            conn: tls(),
            want: allowed(Reason::AllowPolicyMatched(key("app/a"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "DENY beats a matching ALLOW",
            policies: vec![
                allow_all("app", "allow", Namespace),
                deny_ns("app", "deny", Namespace, "client"),
            ],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::DenyPolicyMatched(key("app/deny"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "non-matching DENY, no ALLOW: allow",
            policies: vec![deny_ns("app", "deny", Namespace, "batch")],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: None,
        },
        DecisionCase {
            name: "ALLOW with no rules denies everything",
            policies: vec![authz("app", "empty", Namespace, pb::Action::Allow, vec![])],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::NoAllowPolicyMatched),
            want_dry_run: None,
        },
        DecisionCase {
            name: "DENY with no rules denies nothing",
            policies: vec![authz("app", "empty", Namespace, pb::Action::Deny, vec![])],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: None,
        },
        DecisionCase {
            name: "ALLOW that does not match: deny",
            policies: vec![allow_ns("app", "a", Namespace, "batch")],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::NoAllowPolicyMatched),
            want_dry_run: None,
        },
        DecisionCase {
            name: "several ALLOW policies across scopes: one match is enough",
            policies: vec![
                allow_ns("istio-system", "g", Global, "batch"),
                allow_ns("app", "n", Namespace, "nobody"),
                allow_ns("app", "w", WorkloadSelector, "client"),
            ],
            listed: vec!["app/w"],
            conn: tls(),
            want: allowed(Reason::AllowPolicyMatched(key("app/w"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "identity-based ALLOW never admits plaintext",
            policies: vec![allow_ns("app", "a", Namespace, "client")],
            listed: vec![],
            conn: plain(),
            want: denied(Reason::NoAllowPolicyMatched),
            want_dry_run: None,
        },
        DecisionCase {
            name: "DENY notPrincipals * refuses plaintext",
            policies: vec![authz(
                "istio-system",
                "strict",
                Global,
                pb::Action::Deny,
                single(pb::Match {
                    not_principals: vec![presence()],
                    ..Default::default()
                }),
            )],
            listed: vec![],
            conn: plain(),
            want: denied(Reason::DenyPolicyMatched(key("istio-system/strict"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "DENY notPrincipals * lets mTLS through",
            policies: vec![authz(
                "istio-system",
                "strict",
                Global,
                pb::Action::Deny,
                single(pb::Match {
                    not_principals: vec![presence()],
                    ..Default::default()
                }),
            )],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: None,
        },
        DecisionCase {
            name: "dry-run DENY that matches is not enforced, but reported",
            policies: vec![dry(deny_all("app", "dry-deny", Namespace))],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: Some(denied(Reason::DenyPolicyMatched(key("app/dry-deny")))),
        },
        DecisionCase {
            name: "dry-run ALLOW alone does not switch to default-deny",
            policies: vec![dry(allow_ns("app", "dry-allow", Namespace, "batch"))],
            listed: vec![],
            conn: tls(),
            want: allowed(Reason::NoAllowPolicy),
            want_dry_run: Some(denied(Reason::NoAllowPolicyMatched)),
        },
        DecisionCase {
            name: "dry-run ALLOW does not rescue a denied connection",
            policies: vec![
                allow_ns("app", "real", Namespace, "batch"),
                dry(allow_all("app", "dry-allow", Namespace)),
            ],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::NoAllowPolicyMatched),
            want_dry_run: Some(allowed(Reason::AllowPolicyMatched(key("app/dry-allow")))),
        },
        DecisionCase {
            name: "enforced DENY stays even if dry-run policies would allow",
            policies: vec![
                deny_all("app", "real-deny", Namespace),
                dry(allow_all("app", "dry-allow", Namespace)),
            ],
            listed: vec![],
            conn: tls(),
            want: denied(Reason::DenyPolicyMatched(key("app/real-deny"))),
            want_dry_run: Some(denied(Reason::DenyPolicyMatched(key("app/real-deny")))),
        },
        DecisionCase {
            name: "a listed policy this proxy does not have denies",
            policies: vec![],
            listed: vec!["app/not-yet"],
            conn: tls(),
            want: denied(Reason::UnknownPolicy(key("app/not-yet"))),
            want_dry_run: None,
        },
        DecisionCase {
            name: "an unknown listed policy denies even when an ALLOW matches",
            policies: vec![allow_all("app", "allow", Namespace)],
            listed: vec!["app/not-yet"],
            conn: tls(),
            want: denied(Reason::UnknownPolicy(key("app/not-yet"))),
            want_dry_run: None,
        },
    ]
}

#[test]
fn decisions() {
    for c in decision_cases() {
        let st = store(&c.policies);
        let d = authorize(&c.conn, &dest(&c.listed), &st);
        assert_eq!(d.outcome, c.want, "{}", c.name);
        assert_eq!(
            d.is_allowed(),
            c.want.verdict == Verdict::Allow,
            "{}",
            c.name
        );
        assert_eq!(d.dry_run_outcome, c.want_dry_run, "{}: dry run", c.name);
    }
}

#[test]
fn dry_run_notes_list_each_dry_run_policy() {
    let st = store(&[
        dry(deny_ns("app", "d1", pb::Scope::Namespace, "client")),
        dry(allow_ns("app", "a1", pb::Scope::Namespace, "batch")),
        allow_all("app", "real", pb::Scope::Namespace),
    ]);
    // The workload also lists a policy that applies by scope: one note each.
    let d = authorize(&tls(), &dest(&["app/d1"]), &st);
    assert_eq!(
        d.outcome,
        allowed(Reason::AllowPolicyMatched("app/real".into()))
    );
    assert_eq!(d.outcome.reason.policy(), Some("app/real"));
    let mut notes = d.dry_run.clone();
    notes.sort_by(|a, b| a.policy.cmp(&b.policy));
    assert_eq!(
        notes,
        vec![
            DryRunNote {
                policy: "app/a1".into(),
                action: Action::Allow,
                matched: false
            },
            DryRunNote {
                policy: "app/d1".into(),
                action: Action::Deny,
                matched: true
            },
        ]
    );
    assert_eq!(
        d.dry_run_outcome,
        Some(denied(Reason::DenyPolicyMatched("app/d1".into())))
    );
}

#[test]
fn store_follows_scope_changes_and_removals() {
    let mut st = PolicyStore::new();
    st.insert(compile(&deny_all("app", "p", pb::Scope::Namespace)));
    assert!(!authorize(&tls(), &dest(&[]), &st).is_allowed());

    // Narrowed to a selector that does not pick this workload.
    st.insert(compile(&deny_all("app", "p", pb::Scope::WorkloadSelector)));
    assert!(authorize(&tls(), &dest(&[]), &st).is_allowed());
    assert_eq!(st.scoped_policies("app").len(), 0);

    // Widened to global.
    st.insert(compile(&deny_all("app", "p", pb::Scope::Global)));
    assert_eq!(st.scoped_policies("elsewhere").len(), 1);

    assert!(st.remove("app/p").is_some());
    assert!(st.is_empty());
    assert!(authorize(&tls(), &dest(&[]), &st).is_allowed());
    assert!(st.remove("app/p").is_none());
}

#[test]
fn proxy_state_is_a_policy_lookup() {
    use crate::state::ProxyState;
    let mut ps = ProxyState::new();
    let a = deny_ns("app", "p", pb::Scope::WorkloadSelector, "client");
    ps.apply_authorization("app/p", Some(&a)).unwrap();
    assert!(!authorize(&tls(), &dest(&["app/p"]), &ps).is_allowed());

    // A malformed update is refused and the previous version stays.
    let bad = pb::Authorization {
        action: 5,
        ..a.clone()
    };
    assert!(ps.apply_authorization("app/p", Some(&bad)).is_err());
    assert_eq!(ps.policies().len(), 1);
    assert!(!authorize(&tls(), &dest(&["app/p"]), &ps).is_allowed());

    ps.apply_authorization("app/p", None).unwrap();
    assert!(ps.policies().is_empty());
    // Still listed but gone: fail closed.
    assert_eq!(
        authorize(&tls(), &dest(&["app/p"]), &ps).outcome,
        denied(Reason::UnknownPolicy("app/p".into()))
    );
}

// ----- PeerAuthentication, as the control plane converts it -----

/// `istio-system/istio_converted_static_strict`: DENY without identity.
fn static_strict() -> pb::Authorization {
    authz(
        "istio-system",
        "istio_converted_static_strict",
        pb::Scope::WorkloadSelector,
        pb::Action::Deny,
        single(pb::Match {
            not_principals: vec![presence()],
            ..Default::default()
        }),
    )
}

fn to_port(conn: ConnectionInfo, port: u16) -> ConnectionInfo {
    ConnectionInfo {
        dst: std::net::SocketAddr::new(conn.dst.ip(), port),
        ..conn
    }
}

#[test]
fn converted_peer_authentications_refuse_plaintext_where_strict() {
    let decide = |policies: &[pb::Authorization], listed: &[&str], conn: ConnectionInfo| {
        authorize(&conn, &dest(listed), &store(policies)).outcome
    };
    let strict_key = "istio-system/istio_converted_static_strict";

    // STRICT: plaintext refused by the static policy, mTLS let through; a
    // workload that does not list it is not affected.
    let policies = [static_strict()];
    assert_eq!(
        decide(&policies, &[strict_key], plain()),
        denied(Reason::DenyPolicyMatched(strict_key.into()))
    );
    assert_eq!(
        decide(&policies, &[strict_key], tls()),
        allowed(Reason::NoAllowPolicy)
    );
    assert_eq!(
        decide(&policies, &[], plain()),
        allowed(Reason::NoAllowPolicy)
    );

    // STRICT with port 9090 PERMISSIVE: one rule, "no identity AND not 9090".
    let exempt = authz(
        "app",
        "converted_peer_authentication_server",
        pb::Scope::WorkloadSelector,
        pb::Action::Deny,
        vec![pb::Rule {
            clauses: vec![
                pb::Clause {
                    matches: vec![pb::Match {
                        not_principals: vec![presence()],
                        ..Default::default()
                    }],
                },
                pb::Clause {
                    matches: vec![pb::Match {
                        not_destination_ports: vec![9090],
                        ..Default::default()
                    }],
                },
            ],
        }],
    );
    let key = "app/converted_peer_authentication_server";
    let policies = [static_strict(), exempt];
    assert_eq!(
        decide(&policies, &[key], to_port(plain(), 8080)),
        denied(Reason::DenyPolicyMatched(key.into()))
    );
    assert_eq!(
        decide(&policies, &[key], to_port(plain(), 9090)),
        allowed(Reason::NoAllowPolicy)
    );
    assert_eq!(
        decide(&policies, &[key], to_port(tls(), 8080)),
        allowed(Reason::NoAllowPolicy)
    );

    // PERMISSIVE with port 5432 STRICT: one rule per STRICT port.
    let strict_port = authz(
        "app",
        "converted_peer_authentication_server",
        pb::Scope::WorkloadSelector,
        pb::Action::Deny,
        single(pb::Match {
            not_principals: vec![presence()],
            destination_ports: vec![5432],
            ..Default::default()
        }),
    );
    let policies = [strict_port];
    assert_eq!(
        decide(&policies, &[key], to_port(plain(), 5432)),
        denied(Reason::DenyPolicyMatched(key.into()))
    );
    assert_eq!(
        decide(&policies, &[key], to_port(plain(), 8080)),
        allowed(Reason::NoAllowPolicy)
    );
    assert_eq!(
        decide(&policies, &[key], to_port(tls(), 5432)),
        allowed(Reason::NoAllowPolicy)
    );
}
