//! One test per rule of the engine: each field, each `not…` form, each
//! pattern kind, the ANDs and ORs, the order of DENY and ALLOW, empty
//! policies, and failing closed. Then randomised properties over small
//! universes of requests and policies.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use meshbox_certs::SpiffeId;

use super::*;

/// A request, owned, with defaults a test overrides.
#[derive(Clone, Debug)]
struct Req {
    identity: Option<SpiffeId>,
    ip: IpAddr,
    port: u16,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
}

impl Default for Req {
    fn default() -> Self {
        Self {
            identity: Some(id("spiffe://cluster.local/ns/shop/sa/frontend")),
            ip: ip("10.1.2.3"),
            port: 8080,
            method: "GET",
            path: "/api/v1/items",
            host: "catalog.shop.svc.cluster.local",
            headers: HeaderMap::new(),
        }
    }
}

impl Req {
    fn with_identity(mut self, s: &str) -> Self {
        self.identity = Some(id(s));
        self
    }
    fn anonymous(mut self) -> Self {
        self.identity = None;
        self
    }
    fn source_ip(mut self, s: &str) -> Self {
        self.ip = ip(s);
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    fn path(mut self, p: &'static str) -> Self {
        self.path = p;
        self
    }
    fn host(mut self, h: &'static str) -> Self {
        self.host = h;
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
        self
    }

    fn decide(&self, policies: &[PolicySpec]) -> Decision {
        let compiled: Vec<Policy> = policies.iter().map(Policy::compile).collect();
        let request = Request {
            source_identity: self.identity.as_ref(),
            source_ip: self.ip,
            destination_port: self.port,
            method: self.method,
            path: self.path,
            host: self.host,
            headers: &self.headers,
        };
        authorize(&request, &compiled)
    }

    /// The same request as a connection that is not HTTP.
    fn decide_tcp(&self, policies: &[PolicySpec]) -> Decision {
        let compiled: Vec<Policy> = policies.iter().map(Policy::compile).collect();
        let request = Request {
            source_identity: self.identity.as_ref(),
            source_ip: self.ip,
            destination_port: self.port,
            method: "",
            path: "",
            host: "",
            headers: &self.headers,
        };
        authorize_tcp(&request, &compiled)
    }
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn policy(name: &str, action: ActionSpec, rules: Vec<RuleSpec>) -> PolicySpec {
    PolicySpec {
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        action,
        rules,
    }
}

fn from(sources: Vec<SourceSpec>) -> RuleSpec {
    RuleSpec {
        from: sources,
        ..Default::default()
    }
}

fn to(operations: Vec<OperationSpec>) -> RuleSpec {
    RuleSpec {
        to: operations,
        ..Default::default()
    }
}

fn when(conditions: Vec<ConditionSpec>) -> RuleSpec {
    RuleSpec {
        when: conditions,
        ..Default::default()
    }
}

fn cond(key: &str, values: &[&str], not_values: &[&str]) -> ConditionSpec {
    ConditionSpec {
        key: key.to_owned(),
        values: strs(values),
        not_values: strs(not_values),
    }
}

/// Whether `rule` matches `req`, asked both ways: alone in an ALLOW policy
/// (allowed iff it matches) and alone in a DENY policy (denied iff it
/// matches). The two must agree for a supported rule.
fn rule_matches(rule: RuleSpec, req: &Req) -> bool {
    let allowed = req
        .decide(&[policy("a", ActionSpec::Allow, vec![rule.clone()])])
        .is_allowed();
    let denied = !req
        .decide(&[policy("d", ActionSpec::Deny, vec![rule.clone()])])
        .is_allowed();
    assert_eq!(
        allowed, denied,
        "ALLOW and DENY disagree on whether {rule:?} matches {req:?}"
    );
    allowed
}

/// Checks a table: (what, rule, request, expected match).
fn check(cases: Vec<(&str, RuleSpec, Req, bool)>) {
    for (what, rule, req, expected) in cases {
        assert_eq!(rule_matches(rule, &req), expected, "{what}");
    }
}

// ---- from: sources ----

#[test]
fn principals_match_the_verified_identity_without_the_scheme() {
    let src = |v: &[&str]| {
        from(vec![SourceSpec {
            principals: strs(v),
            ..Default::default()
        }])
    };
    check(vec![
        (
            "exact",
            src(&["cluster.local/ns/shop/sa/frontend"]),
            Req::default(),
            true,
        ),
        (
            "exact, other service account",
            src(&["cluster.local/ns/shop/sa/admin"]),
            Req::default(),
            false,
        ),
        (
            "written with spiffe:// it is a different string",
            src(&["spiffe://cluster.local/ns/shop/sa/frontend"]),
            Req::default(),
            false,
        ),
        (
            "prefix",
            src(&["cluster.local/ns/shop/*"]),
            Req::default(),
            true,
        ),
        (
            "prefix, other namespace",
            src(&["cluster.local/ns/shop/*"]),
            Req::default().with_identity("spiffe://cluster.local/ns/shopping/sa/x"),
            false,
        ),
        ("suffix", src(&["*/sa/frontend"]), Req::default(), true),
        ("suffix, no", src(&["*/sa/backend"]), Req::default(), false),
        ("presence", src(&["*"]), Req::default(), true),
        (
            "presence without an identity",
            src(&["*"]),
            Req::default().anonymous(),
            false,
        ),
        (
            "exact without an identity",
            src(&["cluster.local/ns/shop/sa/frontend"]),
            Req::default().anonymous(),
            false,
        ),
        (
            "values are ORed",
            src(&[
                "cluster.local/ns/a/sa/b",
                "cluster.local/ns/shop/sa/frontend",
            ]),
            Req::default(),
            true,
        ),
    ]);
}

#[test]
fn not_principals_match_when_no_value_does() {
    let src = |v: &[&str]| {
        from(vec![SourceSpec {
            not_principals: strs(v),
            ..Default::default()
        }])
    };
    check(vec![
        (
            "the identity is listed",
            src(&["cluster.local/ns/shop/sa/frontend"]),
            Req::default(),
            false,
        ),
        (
            "another identity is listed",
            src(&["cluster.local/ns/shop/sa/admin"]),
            Req::default(),
            true,
        ),
        (
            "one of several matches",
            src(&["cluster.local/ns/x/sa/y", "*/sa/frontend"]),
            Req::default(),
            false,
        ),
        ("`*` with an identity", src(&["*"]), Req::default(), false),
        // What makes `DENY notPrincipals: ["*"]` refuse peers without mTLS.
        (
            "`*` without an identity",
            src(&["*"]),
            Req::default().anonymous(),
            true,
        ),
    ]);
}

#[test]
fn namespaces_and_not_namespaces_use_the_identity_namespace() {
    let src = |pos: &[&str], neg: &[&str]| {
        from(vec![SourceSpec {
            namespaces: strs(pos),
            not_namespaces: strs(neg),
            ..Default::default()
        }])
    };
    check(vec![
        ("exact", src(&["shop"], &[]), Req::default(), true),
        ("exact, no", src(&["bank"], &[]), Req::default(), false),
        ("prefix", src(&["sh*"], &[]), Req::default(), true),
        ("suffix", src(&["*op"], &[]), Req::default(), true),
        ("presence", src(&["*"], &[]), Req::default(), true),
        (
            "without an identity",
            src(&["*"], &[]),
            Req::default().anonymous(),
            false,
        ),
        ("not, listed", src(&[], &["shop"]), Req::default(), false),
        ("not, unlisted", src(&[], &["bank"]), Req::default(), true),
        (
            "not, without an identity",
            src(&[], &["shop"]),
            Req::default().anonymous(),
            true,
        ),
        (
            "a field and its not form are ANDed",
            src(&["sh*"], &["shop"]),
            Req::default(),
            false,
        ),
        (
            "a field and its not form are ANDed, other namespace",
            src(&["sh*"], &["shop"]),
            Req::default().with_identity("spiffe://cluster.local/ns/shipping/sa/x"),
            true,
        ),
    ]);
}

#[test]
fn ip_blocks_and_not_ip_blocks_match_the_source_address() {
    let src = |pos: &[&str], neg: &[&str]| {
        from(vec![SourceSpec {
            ip_blocks: strs(pos),
            not_ip_blocks: strs(neg),
            ..Default::default()
        }])
    };
    check(vec![
        ("one address", src(&["10.1.2.3"], &[]), Req::default(), true),
        (
            "another address",
            src(&["10.1.2.4"], &[]),
            Req::default(),
            false,
        ),
        ("a CIDR", src(&["10.1.0.0/16"], &[]), Req::default(), true),
        (
            "a CIDR that does not cover it",
            src(&["10.2.0.0/16"], &[]),
            Req::default(),
            false,
        ),
        (
            "host bits after the prefix are ignored",
            src(&["10.1.9.9/16"], &[]),
            Req::default(),
            true,
        ),
        (
            "/0 covers every IPv4",
            src(&["0.0.0.0/0"], &[]),
            Req::default(),
            true,
        ),
        (
            "an IPv4-mapped source matches an IPv4 block",
            src(&["10.1.2.0/24"], &[]),
            Req::default().source_ip("::ffff:10.1.2.3"),
            true,
        ),
        (
            "IPv6",
            src(&["fd00::/8"], &[]),
            Req::default().source_ip("fd00::1"),
            true,
        ),
        (
            "an IPv6 block never covers IPv4",
            src(&["::/0"], &[]),
            Req::default(),
            false,
        ),
        (
            "values are ORed",
            src(&["192.168.0.0/16", "10.0.0.0/8"], &[]),
            Req::default(),
            true,
        ),
        (
            "not, covered",
            src(&[], &["10.0.0.0/8"]),
            Req::default(),
            false,
        ),
        (
            "not, uncovered",
            src(&[], &["192.168.0.0/16"]),
            Req::default(),
            true,
        ),
        (
            "a block minus a hole",
            src(&["10.0.0.0/8"], &["10.1.2.0/24"]),
            Req::default(),
            false,
        ),
    ]);
}

#[test]
fn remote_ip_blocks_are_matched_like_ip_blocks() {
    let src = |pos: &[&str], neg: &[&str]| {
        from(vec![SourceSpec {
            remote_ip_blocks: strs(pos),
            not_remote_ip_blocks: strs(neg),
            ..Default::default()
        }])
    };
    // An X-Forwarded-For header naming another address changes nothing.
    let forwarded = Req::default().header("x-forwarded-for", "192.168.1.1");
    check(vec![
        (
            "covered",
            src(&["10.1.0.0/16"], &[]),
            forwarded.clone(),
            true,
        ),
        (
            "the forwarded address is not used",
            src(&["192.168.1.1"], &[]),
            forwarded.clone(),
            false,
        ),
        (
            "not, covered",
            src(&[], &["10.1.2.3"]),
            forwarded.clone(),
            false,
        ),
        ("not, uncovered", src(&[], &["10.9.9.9"]), forwarded, true),
    ]);
}

#[test]
fn fields_of_a_source_are_anded_and_sources_are_ored() {
    let both = SourceSpec {
        principals: strs(&["cluster.local/ns/shop/sa/frontend"]),
        ip_blocks: strs(&["10.1.0.0/16"]),
        ..Default::default()
    };
    let other = SourceSpec {
        namespaces: strs(&["bank"]),
        ..Default::default()
    };
    check(vec![
        (
            "both fields match",
            from(vec![both.clone()]),
            Req::default(),
            true,
        ),
        (
            "the address does not",
            from(vec![both.clone()]),
            Req::default().source_ip("10.2.0.1"),
            false,
        ),
        (
            "the principal does not",
            from(vec![both.clone()]),
            Req::default().with_identity("spiffe://cluster.local/ns/shop/sa/x"),
            false,
        ),
        (
            "the second source matches",
            from(vec![both.clone(), other.clone()]),
            Req::default()
                .with_identity("spiffe://cluster.local/ns/bank/sa/x")
                .source_ip("10.2.0.1"),
            true,
        ),
        (
            "neither source matches",
            from(vec![both, other]),
            Req::default()
                .with_identity("spiffe://cluster.local/ns/shop/sa/x")
                .source_ip("10.2.0.1"),
            false,
        ),
    ]);
}

// ---- to: operations ----

fn op(f: impl FnOnce(&mut OperationSpec)) -> RuleSpec {
    let mut o = OperationSpec::default();
    f(&mut o);
    to(vec![o])
}

#[test]
fn methods_and_not_methods() {
    check(vec![
        (
            "exact",
            op(|o| o.methods = strs(&["GET"])),
            Req::default(),
            true,
        ),
        (
            "case-sensitive",
            op(|o| o.methods = strs(&["get"])),
            Req::default(),
            false,
        ),
        (
            "values are ORed",
            op(|o| o.methods = strs(&["POST", "GET"])),
            Req::default(),
            true,
        ),
        (
            "other method",
            op(|o| o.methods = strs(&["GET", "HEAD"])),
            Req::default().method("POST"),
            false,
        ),
        (
            "prefix",
            op(|o| o.methods = strs(&["P*"])),
            Req::default().method("PUT"),
            true,
        ),
        (
            "not, listed",
            op(|o| o.not_methods = strs(&["POST"])),
            Req::default().method("POST"),
            false,
        ),
        (
            "not, unlisted",
            op(|o| o.not_methods = strs(&["POST"])),
            Req::default(),
            true,
        ),
    ]);
}

#[test]
fn paths_and_not_paths_compare_exact_bytes() {
    let paths = |v: &[&str]| {
        let v = strs(v);
        op(move |o| o.paths = v)
    };
    check(vec![
        ("exact", paths(&["/api/v1/items"]), Req::default(), true),
        (
            "exact, with a trailing slash",
            paths(&["/api/v1/items"]),
            Req::default().path("/api/v1/items/"),
            false,
        ),
        (
            "case-sensitive",
            paths(&["/API/v1/items"]),
            Req::default(),
            false,
        ),
        ("prefix", paths(&["/api/*"]), Req::default(), true),
        ("prefix, no", paths(&["/admin/*"]), Req::default(), false),
        ("suffix", paths(&["*/items"]), Req::default(), true),
        ("suffix, no", paths(&["*.css"]), Req::default(), false),
        ("presence", paths(&["*"]), Req::default(), true),
        (
            "not normalised: a dot segment is not resolved",
            paths(&["/admin"]),
            Req::default().path("/./admin"),
            false,
        ),
        (
            "not normalised: slashes are not merged",
            paths(&["/admin/*"]),
            Req::default().path("//admin/x"),
            false,
        ),
        (
            "not, listed",
            op(|o| o.not_paths = strs(&["/api/*"])),
            Req::default(),
            false,
        ),
        (
            "not, unlisted",
            op(|o| o.not_paths = strs(&["/admin*"])),
            Req::default(),
            true,
        ),
    ]);
}

#[test]
fn hosts_and_not_hosts_compare_case_insensitively() {
    let hosts = |v: &[&str]| {
        let v = strs(v);
        op(move |o| o.hosts = v)
    };
    check(vec![
        (
            "exact",
            hosts(&["catalog.shop.svc.cluster.local"]),
            Req::default(),
            true,
        ),
        (
            "exact, other case in the request",
            hosts(&["catalog.shop.svc.cluster.local"]),
            Req::default().host("Catalog.Shop.SVC.cluster.local"),
            true,
        ),
        (
            "exact, other case in the policy",
            hosts(&["CATALOG.shop.svc.cluster.local"]),
            Req::default(),
            true,
        ),
        ("prefix", hosts(&["catalog.*"]), Req::default(), true),
        (
            "suffix",
            hosts(&["*.SVC.cluster.local"]),
            Req::default(),
            true,
        ),
        (
            "suffix, no",
            hosts(&["*.example.com"]),
            Req::default(),
            false,
        ),
        (
            "a port the client sent is part of the authority",
            hosts(&["catalog"]),
            Req::default().host("catalog:8080"),
            false,
        ),
        (
            "... and a prefix pattern covers it",
            hosts(&["catalog*"]),
            Req::default().host("catalog:8080"),
            true,
        ),
        ("presence", hosts(&["*"]), Req::default(), true),
        (
            "presence, no authority",
            hosts(&["*"]),
            Req::default().host(""),
            false,
        ),
        (
            "not, listed in another case",
            op(|o| o.not_hosts = strs(&["CATALOG.*"])),
            Req::default(),
            false,
        ),
        (
            "not, unlisted",
            op(|o| o.not_hosts = strs(&["payments.*"])),
            Req::default(),
            true,
        ),
    ]);
}

#[test]
fn ports_and_not_ports_match_the_destination_port() {
    check(vec![
        (
            "listed",
            op(|o| o.ports = strs(&["8080"])),
            Req::default(),
            true,
        ),
        (
            "values are ORed",
            op(|o| o.ports = strs(&["80", "8080"])),
            Req::default(),
            true,
        ),
        (
            "unlisted",
            op(|o| o.ports = strs(&["80"])),
            Req::default(),
            false,
        ),
        (
            "not, listed",
            op(|o| o.not_ports = strs(&["8080"])),
            Req::default(),
            false,
        ),
        (
            "not, unlisted",
            op(|o| o.not_ports = strs(&["9090"])),
            Req::default(),
            true,
        ),
    ]);
}

#[test]
fn fields_of_an_operation_are_anded_and_operations_are_ored() {
    let get_api = OperationSpec {
        methods: strs(&["GET"]),
        paths: strs(&["/api/*"]),
        ..Default::default()
    };
    let post_orders = OperationSpec {
        methods: strs(&["POST"]),
        paths: strs(&["/orders"]),
        ..Default::default()
    };
    let both = to(vec![get_api.clone(), post_orders]);
    check(vec![
        (
            "GET /api/…",
            to(vec![get_api.clone()]),
            Req::default(),
            true,
        ),
        (
            "POST /api/…: the method fails the AND",
            to(vec![get_api]),
            Req::default().method("POST"),
            false,
        ),
        (
            "POST /orders: the second operation",
            both.clone(),
            Req::default().method("POST").path("/orders"),
            true,
        ),
        (
            "GET /orders: neither",
            both,
            Req::default().path("/orders"),
            false,
        ),
    ]);
}

// ---- when ----

#[test]
fn header_conditions() {
    let h = |values: &[&str], not: &[&str]| when(vec![cond("request.headers[X-Env]", values, not)]);
    check(vec![
        (
            "exact, the name in another case",
            h(&["prod"], &[]),
            Req::default().header("x-env", "prod"),
            true,
        ),
        (
            "the value is case-sensitive",
            h(&["prod"], &[]),
            Req::default().header("x-env", "PROD"),
            false,
        ),
        (
            "prefix",
            h(&["pr*"], &[]),
            Req::default().header("x-env", "prod"),
            true,
        ),
        (
            "suffix",
            h(&["*od"], &[]),
            Req::default().header("x-env", "prod"),
            true,
        ),
        (
            "presence, even empty",
            h(&["*"], &[]),
            Req::default().header("x-env", ""),
            true,
        ),
        ("presence, absent", h(&["*"], &[]), Req::default(), false),
        ("a value, absent", h(&["prod"], &[]), Req::default(), false),
        (
            "several values are joined with a comma",
            h(&["prod,canary"], &[]),
            Req::default()
                .header("x-env", "prod")
                .header("x-env", "canary"),
            true,
        ),
        (
            "... so one of them alone is not an exact match",
            h(&["canary"], &[]),
            Req::default()
                .header("x-env", "prod")
                .header("x-env", "canary"),
            false,
        ),
        (
            "not, listed",
            h(&[], &["prod"]),
            Req::default().header("x-env", "prod"),
            false,
        ),
        (
            "not, unlisted",
            h(&[], &["prod"]),
            Req::default().header("x-env", "dev"),
            true,
        ),
        ("not, absent", h(&[], &["prod"]), Req::default(), true),
        ("not `*`, absent", h(&[], &["*"]), Req::default(), true),
        (
            "values and notValues are ANDed",
            h(&["pr*"], &["preview"]),
            Req::default().header("x-env", "preview"),
            false,
        ),
    ]);
}

#[test]
fn source_and_destination_conditions() {
    let w = |key: &str, values: &[&str], not: &[&str]| when(vec![cond(key, values, not)]);
    check(vec![
        (
            "source.ip, covered",
            w("source.ip", &["10.1.0.0/16"], &[]),
            Req::default(),
            true,
        ),
        (
            "source.ip, uncovered",
            w("source.ip", &["10.2.0.0/16"], &[]),
            Req::default(),
            false,
        ),
        (
            "source.ip, not",
            w("source.ip", &[], &["10.1.2.3"]),
            Req::default(),
            false,
        ),
        (
            "source.principal",
            w("source.principal", &["cluster.local/ns/shop/*"], &[]),
            Req::default(),
            true,
        ),
        (
            "source.principal, without an identity",
            w("source.principal", &["*"], &[]),
            Req::default().anonymous(),
            false,
        ),
        (
            "source.principal, not",
            w("source.principal", &[], &["*/sa/frontend"]),
            Req::default(),
            false,
        ),
        (
            "source.principal, not, without an identity",
            w("source.principal", &[], &["*"]),
            Req::default().anonymous(),
            true,
        ),
        (
            "source.namespace",
            w("source.namespace", &["shop"], &[]),
            Req::default(),
            true,
        ),
        (
            "source.namespace, no",
            w("source.namespace", &["bank"], &[]),
            Req::default(),
            false,
        ),
        (
            "source.namespace, not",
            w("source.namespace", &[], &["shop"]),
            Req::default(),
            false,
        ),
        (
            "destination.port",
            w("destination.port", &["8080"], &[]),
            Req::default(),
            true,
        ),
        (
            "destination.port, no",
            w("destination.port", &["80"], &[]),
            Req::default(),
            false,
        ),
        (
            "destination.port, not",
            w("destination.port", &[], &["8080"]),
            Req::default(),
            false,
        ),
        (
            "destination.port, not, other",
            w("destination.port", &[], &["80"]),
            Req::default(),
            true,
        ),
    ]);
}

#[test]
fn conditions_are_anded_and_from_to_when_are_anded() {
    let rule = RuleSpec {
        from: vec![SourceSpec {
            namespaces: strs(&["shop"]),
            ..Default::default()
        }],
        to: vec![OperationSpec {
            methods: strs(&["GET"]),
            ..Default::default()
        }],
        when: vec![
            cond("request.headers[x-env]", &["prod"], &[]),
            cond("destination.port", &["8080"], &[]),
        ],
        unrecognized: vec![],
    };
    let ok = Req::default().header("x-env", "prod");
    check(vec![
        ("all parts match", rule.clone(), ok.clone(), true),
        (
            "from fails",
            rule.clone(),
            ok.clone()
                .with_identity("spiffe://cluster.local/ns/bank/sa/x"),
            false,
        ),
        ("to fails", rule.clone(), ok.clone().method("PUT"), false),
        (
            "the first condition fails",
            rule.clone(),
            Req::default(),
            false,
        ),
        ("the second condition fails", rule, ok.port(80), false),
    ]);
}

// ---- decisions ----

#[test]
fn no_policies_allow() {
    assert_eq!(
        Req::default().decide(&[]),
        Decision {
            verdict: Verdict::Allow,
            reason: Reason::NoAllowPolicy
        }
    );
}

#[test]
fn an_allow_policy_without_rules_allows_nothing() {
    // Istio's `spec: {}` (action defaults to ALLOW): "allow-nothing", which
    // denies every request to its target.
    let allow_nothing = policy("allow-nothing", ActionSpec::default(), vec![]);
    let d = Req::default().decide(&[allow_nothing]);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.reason, Reason::NoAllowPolicyMatched);
}

#[test]
fn a_deny_policy_without_rules_denies_nothing() {
    let d = Req::default().decide(&[policy("deny-none", ActionSpec::Deny, vec![])]);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.reason, Reason::NoAllowPolicy);
}

#[test]
fn an_empty_rule_matches_every_request() {
    // Istio's "allow-all" and "deny-all" are one rule with nothing in it.
    let anon = Req::default()
        .anonymous()
        .method("DELETE")
        .path("/x")
        .source_ip("fd00::9");
    for req in [Req::default(), anon] {
        let allow_all = req.decide(&[policy(
            "allow-all",
            ActionSpec::Allow,
            vec![RuleSpec::default()],
        )]);
        assert_eq!(
            allow_all.reason,
            Reason::AllowPolicyMatched("shop/allow-all".into())
        );
        let deny_all = req.decide(&[policy(
            "deny-all",
            ActionSpec::Deny,
            vec![RuleSpec::default()],
        )]);
        assert_eq!(
            deny_all.reason,
            Reason::DenyPolicyMatched("shop/deny-all".into())
        );
    }
}

#[test]
fn deny_is_evaluated_before_allow() {
    let allow_get = policy(
        "allow-get",
        ActionSpec::Allow,
        vec![op(|o| o.methods = strs(&["GET"]))],
    );
    let deny_admin = policy(
        "deny-admin",
        ActionSpec::Deny,
        vec![op(|o| o.paths = strs(&["/admin*"]))],
    );
    let both = [allow_get, deny_admin];
    // Order in the list does not matter.
    let reversed = [both[1].clone(), both[0].clone()];
    for policies in [&both[..], &reversed[..]] {
        let d = Req::default().path("/admin/users").decide(policies);
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(
            d.reason,
            Reason::DenyPolicyMatched("shop/deny-admin".into())
        );
        let d = Req::default().decide(policies);
        assert_eq!(
            d.reason,
            Reason::AllowPolicyMatched("shop/allow-get".into())
        );
        let d = Req::default().method("POST").decide(policies);
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(d.reason, Reason::NoAllowPolicyMatched);
    }
}

#[test]
fn any_one_allow_policy_is_enough() {
    let allow_get = policy(
        "allow-get",
        ActionSpec::Allow,
        vec![op(|o| o.methods = strs(&["GET"]))],
    );
    let allow_bank = policy(
        "allow-bank",
        ActionSpec::Allow,
        vec![from(vec![SourceSpec {
            namespaces: strs(&["bank"]),
            ..Default::default()
        }])],
    );
    let policies = [allow_get, allow_bank];
    let post_from_bank = Req::default()
        .method("POST")
        .with_identity("spiffe://cluster.local/ns/bank/sa/teller");
    assert_eq!(
        post_from_bank.decide(&policies).reason,
        Reason::AllowPolicyMatched("shop/allow-bank".into())
    );
    assert!(!Req::default().method("POST").decide(&policies).is_allowed());
}

#[test]
fn audit_policies_change_no_decision_and_are_reported() {
    let audit = policy("audit", ActionSpec::Audit, vec![RuleSpec::default()]);
    let d = Req::default().decide(std::slice::from_ref(&audit));
    assert_eq!(d.reason, Reason::NoAllowPolicy);
    let compiled = Policy::compile(&audit);
    let problems: Vec<_> = compiled.unsupported().collect();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].problem, Problem::AuditAction);
}

#[test]
fn custom_policies_deny_what_they_select_and_are_reported() {
    let custom = policy(
        "ext-authz",
        ActionSpec::Custom,
        vec![op(|o| o.paths = strs(&["/admin*"]))],
    );
    let d = Req::default()
        .path("/admin")
        .decide(std::slice::from_ref(&custom));
    assert_eq!(d.reason, Reason::DenyPolicyMatched("shop/ext-authz".into()));
    assert!(
        Req::default()
            .decide(std::slice::from_ref(&custom))
            .is_allowed()
    );
    let compiled = Policy::compile(&custom);
    assert_eq!(
        compiled
            .unsupported()
            .map(|u| &u.problem)
            .collect::<Vec<_>>(),
        [&Problem::CustomAction]
    );
}

#[test]
fn a_denial_is_403_with_envoys_body() {
    assert_eq!(DENIED_STATUS.as_u16(), 403);
    assert_eq!(DENIED_BODY, "RBAC: access denied");
}

// ---- failing closed ----

/// Rules that the engine cannot enforce, each with where it is reported.
/// Every one also carries `methods: [GET]` (or the like) so that, were the
/// unsupported part dropped, it would match the default request.
fn unsupported_rules() -> Vec<(RuleSpec, &'static str, Problem)> {
    let get = OperationSpec {
        methods: strs(&["GET"]),
        ..Default::default()
    };
    let with_source = |s: SourceSpec| RuleSpec {
        from: vec![s],
        to: vec![get.clone()],
        ..Default::default()
    };
    let with_when = |c: ConditionSpec| RuleSpec {
        to: vec![get.clone()],
        when: vec![c],
        ..Default::default()
    };
    let with_op = |o: OperationSpec| RuleSpec {
        to: vec![o],
        ..Default::default()
    };
    vec![
        (
            with_source(SourceSpec {
                namespaces: strs(&["shop"]),
                request_principals: strs(&["issuer/subject"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.requestPrincipals",
            Problem::Field,
        ),
        (
            with_source(SourceSpec {
                not_request_principals: strs(&["*"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.notRequestPrincipals",
            Problem::Field,
        ),
        (
            with_source(SourceSpec {
                service_accounts: strs(&["shop/frontend"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.serviceAccounts",
            Problem::Field,
        ),
        (
            with_source(SourceSpec {
                not_service_accounts: strs(&["shop/admin"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.notServiceAccounts",
            Problem::Field,
        ),
        (
            with_source(SourceSpec {
                ip_blocks: strs(&["10.1.0.0/16", "10.1.300.0/24"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.ipBlocks",
            Problem::InvalidIpBlock {
                value: "10.1.300.0/24".into(),
            },
        ),
        (
            with_source(SourceSpec {
                not_ip_blocks: strs(&["10.0.0.0/33"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.notIpBlocks",
            Problem::InvalidIpBlock {
                value: "10.0.0.0/33".into(),
            },
        ),
        (
            with_source(SourceSpec {
                remote_ip_blocks: strs(&["10.0.0.0/+8"]),
                ..Default::default()
            }),
            "rules[0].from[0].source.remoteIpBlocks",
            Problem::InvalidIpBlock {
                value: "10.0.0.0/+8".into(),
            },
        ),
        (
            with_source(SourceSpec::default()),
            "rules[0].from[0].source",
            Problem::EmptyEntry,
        ),
        (
            with_op(OperationSpec::default()),
            "rules[0].to[0].operation",
            Problem::EmptyEntry,
        ),
        (
            with_op(OperationSpec {
                methods: strs(&["GET"]),
                ports: strs(&["http"]),
                ..Default::default()
            }),
            "rules[0].to[0].operation.ports",
            Problem::InvalidPort {
                value: "http".into(),
            },
        ),
        (
            with_op(OperationSpec {
                methods: strs(&["GET"]),
                not_ports: strs(&["+80"]),
                ..Default::default()
            }),
            "rules[0].to[0].operation.notPorts",
            Problem::InvalidPort {
                value: "+80".into(),
            },
        ),
        (
            with_op(OperationSpec {
                ports: strs(&["65536"]),
                ..Default::default()
            }),
            "rules[0].to[0].operation.ports",
            Problem::InvalidPort {
                value: "65536".into(),
            },
        ),
        (
            with_op(OperationSpec {
                paths: strs(&["/api/{*}/items"]),
                ..Default::default()
            }),
            "rules[0].to[0].operation.paths",
            Problem::PathTemplate {
                value: "/api/{*}/items".into(),
            },
        ),
        (
            with_op(OperationSpec {
                methods: strs(&["GET"]),
                not_paths: strs(&["/admin/{**}"]),
                ..Default::default()
            }),
            "rules[0].to[0].operation.notPaths",
            Problem::PathTemplate {
                value: "/admin/{**}".into(),
            },
        ),
        (
            with_when(cond("request.auth.claims[groups]", &["admins"], &[])),
            "rules[0].when[0].key",
            Problem::ConditionKey {
                key: "request.auth.claims[groups]".into(),
            },
        ),
        (
            with_when(cond("remote.ip", &["10.0.0.0/8"], &[])),
            "rules[0].when[0].key",
            Problem::ConditionKey {
                key: "remote.ip".into(),
            },
        ),
        (
            with_when(cond("request.headers[:authority]", &["x"], &[])),
            "rules[0].when[0].key",
            Problem::HeaderName {
                name: ":authority".into(),
            },
        ),
        (
            with_when(cond("request.headers[]", &["x"], &[])),
            "rules[0].when[0].key",
            Problem::HeaderName { name: "".into() },
        ),
        (
            with_when(cond("source.ip", &["10.1.0.0/16"], &["not-an-ip"])),
            "rules[0].when[0].notValues",
            Problem::InvalidIpBlock {
                value: "not-an-ip".into(),
            },
        ),
        (
            with_when(cond("destination.port", &["8080", "eighty"], &[])),
            "rules[0].when[0].values",
            Problem::InvalidPort {
                value: "eighty".into(),
            },
        ),
        (
            with_when(cond("request.headers[x-env]", &[], &[])),
            "rules[0].when[0]",
            Problem::EmptyCondition,
        ),
        (
            RuleSpec {
                to: vec![get.clone()],
                unrecognized: vec!["from[0].source.futureField".into()],
                ..Default::default()
            },
            "rules[0].from[0].source.futureField",
            Problem::Field,
        ),
    ]
}

#[test]
fn unsupported_parts_are_reported_where_they_are() {
    for (rule, at, problem) in unsupported_rules() {
        let compiled = Policy::compile(&policy("p", ActionSpec::Allow, vec![rule.clone()]));
        let found: Vec<_> = compiled.unsupported().cloned().collect();
        assert_eq!(
            found,
            [Unsupported {
                at: at.to_owned(),
                problem
            }],
            "{rule:?}"
        );
    }
}

#[test]
fn an_allow_rule_with_an_unsupported_part_matches_nothing() {
    for (rule, at, _) in unsupported_rules() {
        let d = Req::default().decide(&[policy("p", ActionSpec::Allow, vec![rule])]);
        assert_eq!(d.reason, Reason::NoAllowPolicyMatched, "{at}");
    }
}

#[test]
fn a_deny_rule_with_an_unsupported_part_matches_every_request() {
    // A request the rule could not match even if its unsupported part were
    // dropped: another method, anonymous, from elsewhere.
    let unlike = Req::default()
        .method("PATCH")
        .anonymous()
        .source_ip("192.168.7.7")
        .port(9);
    for (rule, at, _) in unsupported_rules() {
        let d = unlike.decide(&[policy("p", ActionSpec::Deny, vec![rule])]);
        assert_eq!(d.reason, Reason::DenyPolicyMatched("shop/p".into()), "{at}");
    }
}

#[test]
fn other_rules_of_a_policy_still_apply() {
    // An ALLOW policy with one unsupported rule and one good one allows what
    // the good one matches, and nothing else.
    let (bad, _, _) = unsupported_rules().remove(0);
    let good = op(|o| o.paths = strs(&["/public/*"]));
    let p = policy("p", ActionSpec::Allow, vec![bad, good]);
    assert!(
        Req::default()
            .path("/public/x")
            .decide(std::slice::from_ref(&p))
            .is_allowed()
    );
    assert!(!Req::default().decide(std::slice::from_ref(&p)).is_allowed());
}

#[test]
fn valid_ip_blocks_and_ports_parse() {
    let rule = RuleSpec {
        from: vec![SourceSpec {
            ip_blocks: strs(&[
                "10.0.0.1",
                "10.0.0.0/8",
                "fd00::1",
                "fd00::/8",
                "::ffff:10.0.0.0/104",
            ]),
            ..Default::default()
        }],
        to: vec![OperationSpec {
            ports: strs(&["0", "80", "65535"]),
            ..Default::default()
        }],
        ..Default::default()
    };
    let p = Policy::compile(&policy("p", ActionSpec::Allow, vec![rule]));
    assert_eq!(p.unsupported().count(), 0);
}

// ---- randomised properties ----

mod properties {
    use proptest::prelude::*;

    use super::*;

    const IDS: [Option<&str>; 3] = [
        Some("spiffe://cluster.local/ns/shop/sa/frontend"),
        Some("spiffe://cluster.local/ns/bank/sa/teller"),
        None,
    ];
    const IPS: [&str; 3] = ["10.1.2.3", "192.168.0.9", "fd00::5"];
    const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
    const PATHS: [&str; 4] = ["/", "/api/v1", "/admin", "/admin/x"];
    const HOSTS: [&str; 2] = ["catalog.shop", "Bank.example"];
    const PORTS: [u16; 2] = [80, 8080];

    fn request() -> impl Strategy<Value = Req> {
        (
            0..3usize,
            0..3usize,
            0..3usize,
            0..4usize,
            0..2usize,
            0..2usize,
            any::<bool>(),
        )
            .prop_map(|(i, a, m, p, h, port, env)| {
                let mut r = Req {
                    identity: IDS[i].map(id),
                    ip: ip(IPS[a]),
                    port: PORTS[port],
                    method: METHODS[m],
                    path: PATHS[p],
                    host: HOSTS[h],
                    headers: HeaderMap::new(),
                };
                if env {
                    r = r.header("x-env", "prod");
                }
                r
            })
    }

    fn values(universe: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(prop::sample::select(universe), 0..2)
            .prop_map(|v| v.into_iter().map(str::to_owned).collect())
    }

    fn source() -> impl Strategy<Value = SourceSpec> {
        const PRINCIPALS: &[&str] = &["cluster.local/ns/shop/sa/frontend", "*/sa/teller", "*"];
        const NAMESPACES: &[&str] = &["shop", "ba*", "*"];
        const BLOCKS: &[&str] = &["10.0.0.0/8", "192.168.0.9", "fd00::/16"];
        (
            values(PRINCIPALS),
            values(PRINCIPALS),
            values(NAMESPACES),
            values(NAMESPACES),
            values(BLOCKS),
            values(BLOCKS),
        )
            .prop_map(|(p, np, n, nn, b, nb)| SourceSpec {
                principals: p,
                not_principals: np,
                namespaces: n,
                not_namespaces: nn,
                ip_blocks: b,
                not_ip_blocks: nb,
                ..Default::default()
            })
    }

    fn operation() -> impl Strategy<Value = OperationSpec> {
        const METHODS_P: &[&str] = &["GET", "POST", "D*"];
        const PATHS_P: &[&str] = &["/admin*", "/", "*x", "*"];
        const HOSTS_P: &[&str] = &["catalog.*", "bank.example", "*"];
        const PORTS_P: &[&str] = &["80", "8080"];
        (
            values(METHODS_P),
            values(METHODS_P),
            values(PATHS_P),
            values(PATHS_P),
            values(HOSTS_P),
            values(PORTS_P),
        )
            .prop_map(|(m, nm, p, np, h, port)| OperationSpec {
                methods: m,
                not_methods: nm,
                paths: p,
                not_paths: np,
                hosts: h,
                ports: port,
                ..Default::default()
            })
    }

    fn rule() -> impl Strategy<Value = RuleSpec> {
        (
            prop::collection::vec(source(), 0..2),
            prop::collection::vec(operation(), 0..2),
            prop::option::of(prop::sample::select(&["prod", "dev", "*"][..])),
        )
            .prop_map(|(from, to, env)| RuleSpec {
                from,
                to,
                when: env
                    .map(|v| vec![cond("request.headers[x-env]", &[v], &[])])
                    .unwrap_or_default(),
                unrecognized: vec![],
            })
    }

    fn policies() -> impl Strategy<Value = Vec<PolicySpec>> {
        prop::collection::vec((any::<bool>(), prop::collection::vec(rule(), 0..3)), 0..4).prop_map(
            |ps| {
                ps.into_iter()
                    .enumerate()
                    .map(|(i, (deny, rules))| {
                        let action = if deny {
                            ActionSpec::Deny
                        } else {
                            ActionSpec::Allow
                        };
                        policy(&format!("p{i}"), action, rules)
                    })
                    .collect()
            },
        )
    }

    proptest! {
        /// The decision is DENY-first over any set: denied if some DENY
        /// policy alone denies; otherwise allowed iff there is no ALLOW
        /// policy or some ALLOW policy alone allows.
        #[test]
        fn the_decision_combines_single_policy_decisions(req in request(), ps in policies()) {
            let alone = |p: &PolicySpec| req.decide(std::slice::from_ref(p)).is_allowed();
            let denies = ps.iter().any(|p| p.action == ActionSpec::Deny && !alone(p));
            let allows: Vec<_> = ps.iter().filter(|p| p.action == ActionSpec::Allow).collect();
            let expected = !denies && (allows.is_empty() || allows.iter().any(|p| alone(p)));
            prop_assert_eq!(req.decide(&ps).is_allowed(), expected);
        }

        /// Making any one rule unsupported never lets through a request
        /// that was denied.
        #[test]
        fn an_unsupported_part_never_opens(
            req in request(),
            mut ps in policies(),
            pick in any::<prop::sample::Index>(),
        ) {
            let before = req.decide(&ps).is_allowed();
            let rules: usize = ps.iter().map(|p| p.rules.len()).sum();
            prop_assume!(rules > 0);
            let mut n = pick.index(rules);
            for p in &mut ps {
                if n < p.rules.len() {
                    p.rules[n].unrecognized.push("unknown".into());
                    break;
                }
                n -= p.rules.len();
            }
            prop_assert!(before || !req.decide(&ps).is_allowed());
        }

        /// A field's `not…` form is the field's complement whenever the
        /// attribute is present.
        #[test]
        fn a_not_field_is_the_complement(req in request(), op in operation(), src in source()) {
            let only = |o: OperationSpec| to(vec![o]);
            let pairs = [
                (
                    OperationSpec { methods: op.methods.clone(), ..Default::default() },
                    OperationSpec { not_methods: op.methods.clone(), ..Default::default() },
                ),
                (
                    OperationSpec { paths: op.paths.clone(), ..Default::default() },
                    OperationSpec { not_paths: op.paths.clone(), ..Default::default() },
                ),
                (
                    OperationSpec { hosts: op.hosts.clone(), ..Default::default() },
                    OperationSpec { not_hosts: op.hosts.clone(), ..Default::default() },
                ),
                (
                    OperationSpec { ports: op.ports.clone(), ..Default::default() },
                    OperationSpec { not_ports: op.ports.clone(), ..Default::default() },
                ),
            ];
            for (pos, neg) in pairs {
                if pos == OperationSpec::default() {
                    continue;
                }
                prop_assert_ne!(rule_matches(only(pos), &req), rule_matches(only(neg), &req));
            }
            if req.identity.is_some() && !src.principals.is_empty() {
                let pos = from(vec![SourceSpec { principals: src.principals.clone(), ..Default::default() }]);
                let neg = from(vec![SourceSpec { not_principals: src.principals.clone(), ..Default::default() }]);
                prop_assert_ne!(rule_matches(pos, &req), rule_matches(neg, &req));
            }
            if !src.ip_blocks.is_empty() {
                let pos = from(vec![SourceSpec { ip_blocks: src.ip_blocks.clone(), ..Default::default() }]);
                let neg = from(vec![SourceSpec { not_ip_blocks: src.ip_blocks.clone(), ..Default::default() }]);
                prop_assert_ne!(rule_matches(pos, &req), rule_matches(neg, &req));
            }
        }
    }
}

// ---- connections that are not HTTP ----

#[test]
fn tcp_allow_rules_needing_http_match_nothing_and_deny_rules_deny_more() {
    let get_only = to(vec![OperationSpec {
        methods: strs(&["GET"]),
        ..Default::default()
    }]);
    let from_frontend = SourceSpec {
        principals: strs(&["cluster.local/ns/shop/sa/frontend"]),
        ..Default::default()
    };
    let req = Req::default();
    // ALLOW GET: over HTTP a GET passes; as TCP the rule cannot match.
    let allow = [policy("a", ActionSpec::Allow, vec![get_only.clone()])];
    assert!(req.decide(&allow).is_allowed());
    assert_eq!(req.decide_tcp(&allow).reason, Reason::NoAllowPolicyMatched);
    // ALLOW from frontend (L4 only) works for TCP as for HTTP.
    let allow_l4 = [policy(
        "a",
        ActionSpec::Allow,
        vec![from(vec![from_frontend.clone()])],
    )];
    assert!(req.decide_tcp(&allow_l4).is_allowed());
    // DENY POST from frontend: a GET over HTTP passes, but as TCP the
    // method cannot be told, so the rule is judged on its source alone.
    let deny = [policy(
        "d",
        ActionSpec::Deny,
        vec![RuleSpec {
            from: vec![from_frontend],
            to: vec![OperationSpec {
                methods: strs(&["POST"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    )];
    assert!(req.decide(&deny).is_allowed());
    assert!(!req.decide_tcp(&deny).is_allowed());
    assert!(
        req.clone()
            .with_identity("spiffe://cluster.local/ns/shop/sa/other")
            .decide_tcp(&deny)
            .is_allowed(),
        "the source part still has to match"
    );
    // A header condition is HTTP-only too.
    let deny_header = [policy(
        "d",
        ActionSpec::Deny,
        vec![when(vec![cond("request.headers[x-admin]", &["1"], &[])])],
    )];
    assert!(req.decide(&deny_header).is_allowed());
    assert!(!req.decide_tcp(&deny_header).is_allowed());
    // Ports are L4: honoured either way.
    let deny_port = [policy(
        "d",
        ActionSpec::Deny,
        vec![to(vec![OperationSpec {
            ports: strs(&["9999"]),
            ..Default::default()
        }])],
    )];
    assert!(req.decide_tcp(&deny_port).is_allowed());
    assert!(!req.clone().port(9999).decide_tcp(&deny_port).is_allowed());
}
