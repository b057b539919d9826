//! AuthorizationPolicies and the `istio.security.Authorization` resources
//! node proxies enforce.
//!
//! Translation follows istiod's ambient rules:
//! - Scope: a `selector` with labels → `WORKLOAD_SELECTOR`; otherwise
//!   `GLOBAL` in the root namespace and `NAMESPACE` elsewhere. (An empty
//!   selector selects everything in scope, so it is treated as none.)
//! - `ALLOW` (default) and `DENY` are translated; `AUDIT` is ignored and
//!   `CUSTOM` refused (no resource, a status either way); a policy with
//!   `targetRef(s)` belongs to waypoints and is not sent to node proxies.
//! - Each Istio rule becomes one `Rule` whose clauses are ANDed: one clause
//!   for `from` (one `Match` per source), one for `to` (one per operation),
//!   one per `when` condition. `rules: [{}]` is one rule without clauses,
//!   which matches everything; no rules at all matches nothing (so an
//!   `ALLOW` policy without rules denies everything it applies to).
//! - Principals and namespaces: `*` → presence, `x*` → prefix, `*x` →
//!   suffix, else exact; principals stay as written (no `spiffe://`), which
//!   is how dataplanes compare them. `serviceAccounts` entries are `ns/sa`
//!   or `sa` (in the policy's namespace). IP blocks and `remoteIpBlocks`
//!   (node proxies see no proxy headers, so the remote address is the
//!   source address) become CIDRs, a bare IP being /32 or /128; when a
//!   source gives both lists, it matches their intersection.
//! - HTTP-only attributes (`hosts`, `methods`, `paths`, request principals,
//!   `when` keys other than source.ip/remote.ip/source.namespace/
//!   source.principal/destination.ip/destination.port) cannot be enforced
//!   at L4. In an `ALLOW` policy a rule using them matches nothing, so the
//!   rule is left out; in a `DENY` policy the rule is kept without them,
//!   which denies more than written. Both are reported. Where the
//!   workloads use a waypoint, the waypoint enforces those rules in full and
//!   node proxies let its traffic through (the `waypoint_policy` module).
//! - Fields meshbox does not know (a newer Istio's) are invalid values, at
//!   any level: the rule fails closed as below.
//!
//! - Workloads list, by `{namespace}/{name}`, the `NAMESPACE` policies of
//!   their namespace and the `WORKLOAD_SELECTOR` policies that select them:
//!   those of their namespace and those of the root namespace, whose
//!   selectors reach every namespace. `GLOBAL` policies are not listed;
//!   dataplanes apply them to everything.
//!
//! Invalid values (a bad CIDR, a non-numeric port, an empty source) fail
//! closed: in `ALLOW` the rule is left out (allowing less); in `DENY` the
//! field holding the bad value is dropped (denying more), and a source,
//! operation or condition left with no field at all matches every
//! connection. Never emitted: an empty `Match`, which dataplanes treat as
//! matching nothing — in a `DENY` rule that would silently deny less. An
//! unknown `action` denies everything in the policy's scope (an `ALLOW`
//! without rules) until it is fixed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use meshbox_proto::security::{
    Action, Address as CidrAddress, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch,
    StringMatch, string_match::MatchType,
};

use super::selector::Labels;
use super::waypoint_policy::WaypointSpec;
use super::{Key, MeshIndex, index_insert, index_remove};
use crate::k8s::{self, AuthorizationPolicy};

const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
/// Reported when node proxies can enforce no rule of an ALLOW policy;
/// replaced when a waypoint takes the policy over.
pub(super) const ALLOW_ALL_CUT: &str = "no rule of this ALLOW policy can be enforced by node proxies, so it denies all traffic to the workloads it applies to";

/// The outcome of translating one AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TranslatedPolicy {
    /// What node proxies get, if anything.
    pub authorization: Option<Authorization>,
    /// The workload selector, for `WORKLOAD_SELECTOR` policies.
    pub selector: Option<BTreeMap<String, String>>,
    /// Problems and reductions, for the policy's status.
    pub messages: Vec<String>,
    /// Whether some rule uses HTTP attributes that node proxies cannot
    /// enforce (an ALLOW rule left out, a DENY rule reduced).
    pub has_http_rules: bool,
    /// Indexes into `authorization.rules` of the DENY rules enforced
    /// without their HTTP attributes.
    pub reduced_deny_rules: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Allow,
    Deny,
}

/// Translates one policy. `namespace`/`name` are the policy's;
/// `root_namespace` makes selector-less policies mesh-wide.
pub fn translate_policy(
    policy: &AuthorizationPolicy,
    namespace: &str,
    name: &str,
    root_namespace: &str,
) -> TranslatedPolicy {
    let spec = &policy.spec;
    let mut out = TranslatedPolicy::default();

    let targets: Vec<&k8s::PolicyTargetReference> = spec
        .target_ref
        .iter()
        .chain(spec.target_refs.iter())
        .collect();
    if !targets.is_empty() {
        let names: Vec<String> = targets
            .iter()
            .map(|t| format!("{} {}", t.kind, t.name))
            .collect();
        out.messages.push(format!(
            "targetRef binds this policy to {}: waypoints enforce it, node proxies do not, so nothing is sent to them",
            names.join(", ")
        ));
        return out;
    }

    let (mode, fail_closed) = match spec.action.as_deref() {
        None | Some("") | Some("ALLOW") => (Mode::Allow, false),
        Some("DENY") => (Mode::Deny, false),
        Some("AUDIT") => {
            out.messages
                .push("AUDIT policies are not enforced by node proxies; ignored".to_string());
            return out;
        }
        Some("CUSTOM") => {
            out.messages.push(
                "CUSTOM (external authorization) policies are not supported by meshbox; refused, nothing is enforced for it"
                    .to_string(),
            );
            return out;
        }
        Some(other) => {
            out.messages.push(format!(
                "action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM; failing closed: this policy denies all traffic to the workloads it applies to"
            ));
            (Mode::Allow, true)
        }
    };

    let selector = spec
        .selector
        .as_ref()
        .map(|s| &s.match_labels)
        .filter(|l| !l.is_empty());
    let scope = match (selector, namespace == root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };

    let spec_unknown: Vec<String> = spec.other.keys().map(|f| format!("spec.{f}")).collect();
    if !spec_unknown.is_empty() {
        out.messages.push(format!(
            "fields not supported by meshbox ({}); every rule fails closed",
            spec_unknown.join(", ")
        ));
    }
    let mut rules = Vec::new();
    if !fail_closed {
        for (i, rule) in spec.rules.iter().enumerate() {
            let translated = translate_rule(mode, rule, i, namespace, &spec_unknown);
            out.has_http_rules |= translated.has_http;
            if let Some(r) = translated.rule {
                if mode == Mode::Deny && translated.has_http {
                    out.reduced_deny_rules.push(rules.len());
                }
                rules.push(r);
            }
            out.messages.extend(translated.messages);
        }
        if mode == Mode::Allow && !spec.rules.is_empty() && rules.is_empty() {
            out.messages.push(ALLOW_ALL_CUT.to_string());
        }
    }

    out.authorization = Some(Authorization {
        name: name.to_string(),
        namespace: namespace.to_string(),
        scope: scope as i32,
        action: match mode {
            Mode::Allow => Action::Allow,
            Mode::Deny => Action::Deny,
        } as i32,
        rules,
        dry_run: policy
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN_ANNOTATION))
            .is_some_and(|v| v == "true"),
        extensions: Vec::new(),
    });
    out.selector = selector.cloned();
    out
}

/// What one source, operation or condition matches.
enum Part {
    Match(Box<Match>),
    /// No constraint is left: every connection.
    Any,
    /// No connection at all.
    Nothing(String),
}

/// Collects what cannot be enforced while translating one rule.
struct RuleContext<'a> {
    policy_ns: &'a str,
    http: Vec<String>,
    invalid: Vec<String>,
}

impl RuleContext<'_> {
    fn strings(&mut self, path: &str, values: &[String]) -> Vec<StringMatch> {
        if let Some(bad) = values.iter().find(|v| v.is_empty()) {
            self.invalid.push(format!("{path}: empty value {bad:?}"));
            return Vec::new();
        }
        values.iter().map(|v| string_match(v)).collect()
    }

    fn ports(&mut self, path: &str, values: &[String]) -> Vec<u32> {
        let parsed: Result<Vec<u32>, &String> = values
            .iter()
            .map(|v| {
                v.parse::<u32>()
                    .ok()
                    .filter(|p| (1..=65535).contains(p))
                    .ok_or(v)
            })
            .collect();
        parsed.unwrap_or_else(|bad| {
            self.invalid
                .push(format!("{path}: {bad:?} is not a port number"));
            Vec::new()
        })
    }

    fn cidrs(&mut self, path: &str, values: &[String]) -> Vec<Cidr> {
        let parsed: Result<Vec<Cidr>, &String> =
            values.iter().map(|v| Cidr::parse(v).ok_or(v)).collect();
        parsed.unwrap_or_else(|bad| {
            self.invalid
                .push(format!("{path}: {bad:?} is not an IP address or CIDR"));
            Vec::new()
        })
    }

    fn service_accounts(&mut self, path: &str, values: &[String]) -> Vec<ServiceAccountMatch> {
        let parsed: Result<Vec<ServiceAccountMatch>, &String> = values
            .iter()
            .map(|v| {
                let (ns, sa) = match v.split_once('/') {
                    Some((ns, sa)) => (ns, sa),
                    None => (self.policy_ns, v.as_str()),
                };
                if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                    return Err(v);
                }
                Ok(ServiceAccountMatch {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            })
            .collect();
        parsed.unwrap_or_else(|bad| {
            self.invalid.push(format!(
                "{path}: {bad:?} is not a service account (\"name\" or \"namespace/name\")"
            ));
            Vec::new()
        })
    }

    /// Fields meshbox does not know: invalid, so the rule fails closed.
    fn unknown(&mut self, prefix: &str, other: &k8s::OtherFields) {
        for field in other.keys() {
            self.invalid
                .push(format!("{prefix}{field} is not supported"));
        }
    }

    fn http_fields(&mut self, path: &str, fields: &[(&str, &[String])]) {
        for (field, values) in fields {
            if !values.is_empty() {
                self.http.push(format!("{path}.{field}"));
            }
        }
    }

    fn source(&mut self, path: &str, source: Option<&k8s::Source>) -> Part {
        let Some(s) = source.filter(|s| **s != k8s::Source::default()) else {
            self.invalid.push(format!("{path} is empty"));
            return Part::Any;
        };
        self.unknown(&format!("{path}."), &s.other);
        self.http_fields(
            path,
            &[
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ],
        );
        let mut m = Match {
            principals: self.strings(&format!("{path}.principals"), &s.principals),
            not_principals: self.strings(&format!("{path}.notPrincipals"), &s.not_principals),
            namespaces: self.strings(&format!("{path}.namespaces"), &s.namespaces),
            not_namespaces: self.strings(&format!("{path}.notNamespaces"), &s.not_namespaces),
            service_accounts: self
                .service_accounts(&format!("{path}.serviceAccounts"), &s.service_accounts),
            not_service_accounts: self.service_accounts(
                &format!("{path}.notServiceAccounts"),
                &s.not_service_accounts,
            ),
            ..Default::default()
        };
        let ip_blocks = self.cidrs(&format!("{path}.ipBlocks"), &s.ip_blocks);
        let remote = self.cidrs(&format!("{path}.remoteIpBlocks"), &s.remote_ip_blocks);
        let source_ips = match (ip_blocks.is_empty(), remote.is_empty()) {
            (false, false) => {
                let both = Cidr::intersect(&ip_blocks, &remote);
                if both.is_empty() {
                    return Part::Nothing(format!(
                        "{path}: ipBlocks and remoteIpBlocks do not overlap"
                    ));
                }
                both
            }
            (false, true) => ip_blocks,
            _ => remote,
        };
        m.source_ips = source_ips.iter().map(|c| c.to_proto()).collect();
        let mut not_ips = self.cidrs(&format!("{path}.notIpBlocks"), &s.not_ip_blocks);
        not_ips.extend(self.cidrs(
            &format!("{path}.notRemoteIpBlocks"),
            &s.not_remote_ip_blocks,
        ));
        not_ips.dedup();
        m.not_source_ips = not_ips.iter().map(|c| c.to_proto()).collect();
        part(m)
    }

    fn operation(&mut self, path: &str, operation: Option<&k8s::Operation>) -> Part {
        let Some(o) = operation.filter(|o| **o != k8s::Operation::default()) else {
            self.invalid.push(format!("{path} is empty"));
            return Part::Any;
        };
        self.unknown(&format!("{path}."), &o.other);
        self.http_fields(
            path,
            &[
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ],
        );
        part(Match {
            destination_ports: self.ports(&format!("{path}.ports"), &o.ports),
            not_destination_ports: self.ports(&format!("{path}.notPorts"), &o.not_ports),
            ..Default::default()
        })
    }

    fn condition(&mut self, path: &str, c: &k8s::Condition) -> Part {
        let path = format!("{path} (key {:?})", c.key);
        self.unknown(&format!("{path}."), &c.other);
        let mut m = Match::default();
        match c.key.as_str() {
            "source.ip" | "remote.ip" => {
                m.source_ips = cidr_protos(self.cidrs(&format!("{path}.values"), &c.values));
                m.not_source_ips =
                    cidr_protos(self.cidrs(&format!("{path}.notValues"), &c.not_values));
            }
            "destination.ip" => {
                m.destination_ips = cidr_protos(self.cidrs(&format!("{path}.values"), &c.values));
                m.not_destination_ips =
                    cidr_protos(self.cidrs(&format!("{path}.notValues"), &c.not_values));
            }
            "source.namespace" => {
                m.namespaces = self.strings(&format!("{path}.values"), &c.values);
                m.not_namespaces = self.strings(&format!("{path}.notValues"), &c.not_values);
            }
            "source.principal" => {
                m.principals = self.strings(&format!("{path}.values"), &c.values);
                m.not_principals = self.strings(&format!("{path}.notValues"), &c.not_values);
            }
            "destination.port" => {
                m.destination_ports = self.ports(&format!("{path}.values"), &c.values);
                m.not_destination_ports = self.ports(&format!("{path}.notValues"), &c.not_values);
            }
            _ => {
                self.http.push(path);
                return Part::Any;
            }
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            self.invalid
                .push(format!("{path} has neither values nor notValues"));
        }
        part(m)
    }
}

fn part(m: Match) -> Part {
    if m == Match::default() {
        Part::Any
    } else {
        Part::Match(Box::new(m))
    }
}

/// ORs parts into a clause: `Ok(None)` when some part matches everything
/// (no clause needed), `Err` when none can match.
fn clause(parts: Vec<Part>) -> Result<Option<Clause>, String> {
    let mut matches = Vec::new();
    let mut nothing = Vec::new();
    for p in parts {
        match p {
            Part::Any => return Ok(None),
            Part::Match(m) => matches.push(*m),
            Part::Nothing(why) => nothing.push(why),
        }
    }
    if matches.is_empty() {
        Err(nothing.join("; "))
    } else {
        Ok(Some(Clause { matches }))
    }
}

/// One translated rule: what node proxies get, whether HTTP attributes were
/// cut from it, and what to report.
struct TranslatedRule {
    rule: Option<Rule>,
    has_http: bool,
    messages: Vec<String>,
}

fn translate_rule(
    mode: Mode,
    rule: &k8s::Rule,
    index: usize,
    policy_ns: &str,
    spec_unknown: &[String],
) -> TranslatedRule {
    let mut cx = RuleContext {
        policy_ns,
        http: Vec::new(),
        invalid: spec_unknown
            .iter()
            .map(|f| format!("{f} is not supported"))
            .collect(),
    };
    cx.unknown("", &rule.other);
    for (i, f) in rule.from.iter().enumerate() {
        cx.unknown(&format!("from[{i}]."), &f.other);
    }
    for (i, t) in rule.to.iter().enumerate() {
        cx.unknown(&format!("to[{i}]."), &t.other);
    }
    let mut groups: Vec<Vec<Part>> = Vec::new();
    if !rule.from.is_empty() {
        groups.push(
            rule.from
                .iter()
                .enumerate()
                .map(|(i, f)| cx.source(&format!("from[{i}].source"), f.source.as_ref()))
                .collect(),
        );
    }
    if !rule.to.is_empty() {
        groups.push(
            rule.to
                .iter()
                .enumerate()
                .map(|(i, t)| cx.operation(&format!("to[{i}].operation"), t.operation.as_ref()))
                .collect(),
        );
    }
    for (i, c) in rule.when.iter().enumerate() {
        groups.push(vec![cx.condition(&format!("when[{i}]"), c)]);
    }

    let mut clauses = Vec::new();
    let mut never = None;
    for g in groups {
        match clause(g) {
            Ok(c) => clauses.extend(c),
            Err(why) => never = Some(why),
        }
    }

    let prefix = format!("rules[{index}]");
    let mut messages = Vec::new();
    if mode == Mode::Allow && (!cx.http.is_empty() || !cx.invalid.is_empty()) {
        let mut reasons = Vec::new();
        if !cx.http.is_empty() {
            reasons.push(format!(
                "HTTP attributes need a waypoint ({})",
                cx.http.join(", ")
            ));
        }
        if !cx.invalid.is_empty() {
            reasons.push(format!("invalid values ({})", cx.invalid.join("; ")));
        }
        messages.push(format!(
            "{prefix} omitted: {}; in an ALLOW policy such a rule matches nothing, which is more restrictive than written",
            reasons.join(" and ")
        ));
        return TranslatedRule {
            rule: None,
            has_http: !cx.http.is_empty(),
            messages,
        };
    }
    if !cx.http.is_empty() {
        messages.push(format!(
            "{prefix} enforced without its HTTP attributes ({}), which need a waypoint; this DENY matches more than written",
            cx.http.join(", ")
        ));
    }
    if !cx.invalid.is_empty() {
        messages.push(format!(
            "{prefix}: invalid values ignored ({}); this DENY matches more than written",
            cx.invalid.join("; ")
        ));
    }
    let has_http = !cx.http.is_empty();
    if let Some(why) = never {
        messages.push(format!("{prefix} can never match: {why}"));
        return TranslatedRule {
            rule: None,
            has_http,
            messages,
        };
    }
    TranslatedRule {
        rule: Some(Rule { clauses }),
        has_http,
        messages,
    }
}

fn string_match(v: &str) -> StringMatch {
    let t = if v == "*" {
        MatchType::Presence(())
    } else if let Some(suffix) = v.strip_prefix('*') {
        MatchType::Suffix(suffix.to_string())
    } else if let Some(prefix) = v.strip_suffix('*') {
        MatchType::Prefix(prefix.to_string())
    } else {
        MatchType::Exact(v.to_string())
    };
    StringMatch {
        match_type: Some(t),
    }
}

/// An IP network as written in a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    ip: IpAddr,
    len: u32,
}

impl Cidr {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = Self::bits(ip);
        let len = len.unwrap_or(max);
        (len <= max).then_some(Self { ip, len })
    }

    fn bits(ip: IpAddr) -> u32 {
        if ip.is_ipv4() { 32 } else { 128 }
    }

    fn value(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// Whether `self` contains all of `other`.
    fn contains(&self, other: &Cidr) -> bool {
        if self.ip.is_ipv4() != other.ip.is_ipv4() || self.len > other.len {
            return false;
        }
        if self.len == 0 {
            return true;
        }
        let shift = Self::bits(self.ip) - self.len;
        (Self::value(self.ip) >> shift) == (Self::value(other.ip) >> shift)
    }

    /// The networks in both lists (two networks overlap only when one
    /// contains the other; the smaller one is their intersection).
    fn intersect(a: &[Cidr], b: &[Cidr]) -> Vec<Cidr> {
        let mut out = Vec::new();
        for x in a {
            for y in b {
                let both = if x.contains(y) {
                    Some(*y)
                } else if y.contains(x) {
                    Some(*x)
                } else {
                    None
                };
                if let Some(c) = both.filter(|c| !out.contains(c)) {
                    out.push(c);
                }
            }
        }
        out
    }

    fn to_proto(self) -> CidrAddress {
        CidrAddress {
            address: super::ip_bytes(self.ip),
            length: self.len,
        }
    }
}

fn cidr_protos(cidrs: Vec<Cidr>) -> Vec<CidrAddress> {
    cidrs.iter().map(|c| c.to_proto()).collect()
}

/// A translated policy as the index keeps it: what node proxies get
/// before it meets the workloads it applies to, and what waypoints get.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PolicyState {
    pub(super) translated: TranslatedPolicy,
    pub(super) waypoint: WaypointSpec,
}

/// How a policy is listed on workloads.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Listing {
    None,
    Namespace,
    Selector(Labels),
}

impl PolicyState {
    /// The selector of a `WORKLOAD_SELECTOR` policy that is sent.
    pub(super) fn selector(&self) -> Option<&Labels> {
        self.translated.authorization.as_ref()?;
        self.translated.selector.as_ref()
    }

    pub(super) fn listing(&self) -> Listing {
        let Some(auth) = &self.translated.authorization else {
            return Listing::None;
        };
        match (Scope::try_from(auth.scope), &self.translated.selector) {
            (Ok(Scope::Namespace), _) => Listing::Namespace,
            (Ok(Scope::WorkloadSelector), Some(sel)) => Listing::Selector(sel.clone()),
            _ => Listing::None,
        }
    }
}

impl MeshIndex {
    pub(super) fn ingest_policy(&mut self, key: Key, policy: &AuthorizationPolicy) {
        let state = PolicyState {
            translated: translate_policy(policy, &key.ns, &key.name, &self.config.root_namespace),
            waypoint: WaypointSpec::from_policy(policy, &key.ns, &self.config.root_namespace),
        };
        let old = self.policies.get(&key);
        if old == Some(&state) {
            return;
        }
        let listing_changed = old.is_none_or(|o| o.listing() != state.listing());
        if let Some(old) = self.policies.remove(&key) {
            self.unindex_policy(&key, &old);
        }
        self.index_policy(&key, &state);
        self.policies.insert(key.clone(), state);
        self.dirty.policies.insert(key.clone());
        if listing_changed {
            self.mark_policy_pods(&key);
        }
    }

    pub(super) fn remove_policy(&mut self, key: &Key) {
        let Some(old) = self.policies.remove(key) else {
            return;
        };
        self.unindex_policy(key, &old);
        self.dirty.policies.insert(key.clone());
        self.mark_policy_pods(key);
    }

    fn index_policy(&mut self, key: &Key, policy: &PolicyState) {
        match policy.listing() {
            Listing::None => {}
            Listing::Namespace => {
                index_insert(&mut self.namespace_policies, &key.ns, key.name.clone())
            }
            Listing::Selector(sel) => self
                .policy_selectors
                .insert_selector(&key.ns, &sel, &key.name),
        }
        self.index_policy_targets(key, &policy.waypoint);
    }

    fn unindex_policy(&mut self, key: &Key, policy: &PolicyState) {
        match policy.listing() {
            Listing::None => {}
            Listing::Namespace => index_remove(&mut self.namespace_policies, &key.ns, &key.name),
            Listing::Selector(sel) => self
                .policy_selectors
                .remove_selector(&key.ns, &sel, &key.name),
        }
        self.unindex_policy_targets(key, &policy.waypoint);
    }

    /// Marks the workloads that listed the policy and those that list it
    /// now.
    fn mark_policy_pods(&mut self, key: &Key) {
        let mut pods: BTreeSet<Key> = self.policy_members.get(key).cloned().unwrap_or_default();
        match self.policies.get(key).map(PolicyState::listing) {
            Some(Listing::Namespace) => {
                pods.extend(
                    self.pods_by_ns
                        .get(&key.ns)
                        .into_iter()
                        .flatten()
                        .map(|n| Key::new(&key.ns, n)),
                );
            }
            Some(Listing::Selector(sel)) => {
                // Root-namespace selectors reach every namespace.
                let scope = (key.ns != self.config.root_namespace).then_some(key.ns.as_str());
                pods.extend(self.select_pods(scope, &sel));
            }
            Some(Listing::None) | None => {}
        }
        self.dirty.pods.extend(pods);
    }
}
