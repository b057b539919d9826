//! A compiled policy and whether it matches a request.
//!
//! Compilation never fails: whatever cannot be enforced as written is kept
//! in the rule as an [`Unsupported`] entry, which both decides how the rule
//! matches (fail closed) and is what the control plane reports.

use std::net::IpAddr;

use http::HeaderName;

use super::request::Facts;
use super::spec::{ActionSpec, ConditionSpec, OperationSpec, PolicySpec, RuleSpec, SourceSpec};

/// What an enforced policy does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Never enforced (Istio's AUDIT only marks requests for logging, which
    /// the waypoint does not do); kept so it can be listed.
    Audit,
}

/// Something in a policy the engine cannot enforce as written, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct Unsupported {
    /// The field's path in Istio's spelling, e.g.
    /// `rules[0].from[1].source.requestPrincipals`.
    pub at: String,
    pub problem: Problem,
}

/// Why a field cannot be enforced. Values are echoed only for ports, IP
/// blocks, paths and header names: never a header value, which may be a
/// credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("not supported at the waypoint")]
    Field,
    #[error(
        "action AUDIT is not supported; the policy is not enforced (AUDIT never changes a decision)"
    )]
    AuditAction,
    #[error(
        "action CUSTOM is not supported (no external authorizer); the requests it selects are denied"
    )]
    CustomAction,
    #[error("{value:?} is not an IP address or CIDR")]
    InvalidIpBlock { value: String },
    #[error("{value:?} is not a port number")]
    InvalidPort { value: String },
    #[error("path templates ({{*}}, {{**}}) are not supported: {value:?}")]
    PathTemplate { value: String },
    #[error("condition key {key:?} is not supported")]
    ConditionKey { key: String },
    #[error("{name:?} is not a header name that can be matched (pseudo-headers cannot)")]
    HeaderName { name: String },
    #[error("a condition needs values or notValues")]
    EmptyCondition,
    #[error("an entry with no field set (Istio rejects it)")]
    EmptyEntry,
}

/// A compiled `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    rules: Vec<Rule>,
    /// Problems with the policy as a whole (its action).
    notes: Vec<Unsupported>,
}

impl Policy {
    /// Compiles a policy. Anything unsupported or invalid is recorded, and
    /// makes its rule fail closed: an ALLOW rule with one matches nothing, a
    /// DENY rule with one matches every request.
    pub fn compile(spec: &PolicySpec) -> Self {
        let mut notes = Vec::new();
        let action = match spec.action {
            ActionSpec::Allow => Action::Allow,
            ActionSpec::Deny => Action::Deny,
            ActionSpec::Audit => {
                notes.push(Unsupported {
                    at: "action".to_owned(),
                    problem: Problem::AuditAction,
                });
                Action::Audit
            }
            // Ignoring it would let through what the external authorizer
            // might refuse; denying what it selects is the closed side.
            ActionSpec::Custom => {
                notes.push(Unsupported {
                    at: "action".to_owned(),
                    problem: Problem::CustomAction,
                });
                Action::Deny
            }
        };
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| Rule::compile(&format!("rules[{i}]"), rule))
            .collect();
        Self {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            action,
            rules,
            notes,
        }
    }

    /// `namespace/name`: how decisions and logs name the policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Everything in the policy that is not enforced as written.
    pub fn unsupported(&self) -> impl Iterator<Item = &Unsupported> {
        self.notes
            .iter()
            .chain(self.rules.iter().flat_map(|r| r.unsupported.iter()))
    }

    /// Whether any rule matches, the action aside. No rules: nothing matches
    /// (so an ALLOW policy without rules, Istio's `spec: {}` "allow-nothing",
    /// applies and allows nothing; a DENY one denies nothing).
    pub(crate) fn matches(&self, facts: &Facts<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(self.action, facts))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    unsupported: Vec<Unsupported>,
}

impl Rule {
    fn compile(at: &str, spec: &RuleSpec) -> Self {
        let mut c = Compiler::default();
        let from = spec
            .from
            .iter()
            .enumerate()
            .map(|(i, s)| c.source(&format!("{at}.from[{i}].source"), s))
            .collect();
        let to = spec
            .to
            .iter()
            .enumerate()
            .map(|(i, o)| c.operation(&format!("{at}.to[{i}].operation"), o))
            .collect();
        let when = spec
            .when
            .iter()
            .enumerate()
            .filter_map(|(i, w)| c.condition(&format!("{at}.when[{i}]"), w))
            .collect();
        for field in &spec.unrecognized {
            c.note(format!("{at}.{field}"), Problem::Field);
        }
        Self {
            from,
            to,
            when,
            unsupported: c.unsupported,
        }
    }

    /// From, to and when are ANDed; a rule with none of them matches every
    /// request.
    fn matches(&self, action: Action, facts: &Facts<'_>) -> bool {
        if !self.unsupported.is_empty() {
            return action == Action::Deny;
        }
        // Not HTTP: as Istio builds TCP rules, an ALLOW rule that needs
        // HTTP attributes matches nothing, and a DENY one is judged without
        // them (denying more).
        if facts.tcp && action != Action::Deny && self.uses_http() {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(facts)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(facts)))
            && self.when.iter().all(|w| w.matches(facts))
    }
}

impl Rule {
    fn uses_http(&self) -> bool {
        self.to
            .iter()
            .any(|o| !(o.hosts.is_empty() && o.methods.is_empty() && o.paths.is_empty()))
            || self.when.iter().any(|c| matches!(c, Condition::Header(..)))
    }
}

/// A field and its `not…` twin: one of `any_of` must match (when there is
/// any), and none of `none_of` may.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Field<T> {
    any_of: Vec<T>,
    none_of: Vec<T>,
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }

    fn matches(&self, hit: impl Fn(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&hit)) && !self.none_of.iter().any(&hit)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Source {
    principals: Field<StringMatch>,
    namespaces: Field<StringMatch>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
}

impl Source {
    /// The identity fields read it as optional: a positive requirement is
    /// never met without one, a `not…` one always is (nothing to exclude),
    /// as in Envoy's RBAC, which is what makes `DENY notPrincipals: ["*"]`
    /// refuse peers without an identity.
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let principal = facts.principal.as_deref();
        let namespace = facts.namespace();
        self.principals
            .matches(|m| principal.is_some_and(|p| m.matches(p.as_bytes())))
            && self
                .namespaces
                .matches(|m| namespace.is_some_and(|n| m.matches(n.as_bytes())))
            && self.ip_blocks.matches(|c| c.contains(facts.source_ip))
            && self
                .remote_ip_blocks
                .matches(|c| c.contains(facts.source_ip))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Operation {
    /// Patterns lower-cased: hosts compare case-insensitively.
    hosts: Field<StringMatch>,
    ports: Field<u16>,
    methods: Field<StringMatch>,
    paths: Field<StringMatch>,
}

impl Operation {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        let request = facts.request;
        let http = !facts.tcp;
        self.ports.matches(|&p| p == request.destination_port)
            && (!http
                || (self.hosts.matches(|m| m.matches(facts.host.as_bytes()))
                    && self
                        .methods
                        .matches(|m| m.matches(request.method.as_bytes()))
                    && self.paths.matches(|m| m.matches(request.path.as_bytes()))))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Condition {
    /// `request.headers[name]`.
    Header(HeaderName, Field<StringMatch>),
    SourceIp(Field<Cidr>),
    SourcePrincipal(Field<StringMatch>),
    SourceNamespace(Field<StringMatch>),
    DestinationPort(Field<u16>),
}

impl Condition {
    fn matches(&self, facts: &Facts<'_>) -> bool {
        match self {
            // As Envoy's header matcher: an absent header meets no value and
            // so every notValue; `*` means present, even if empty.
            Self::Header(..) if facts.tcp => true,
            Self::Header(name, field) => {
                let value = facts.header(name);
                field.matches(|m| value.as_deref().is_some_and(|v| m.matches_header(v)))
            }
            Self::SourceIp(field) => field.matches(|c| c.contains(facts.source_ip)),
            Self::SourcePrincipal(field) => {
                let principal = facts.principal.as_deref();
                field.matches(|m| principal.is_some_and(|p| m.matches(p.as_bytes())))
            }
            Self::SourceNamespace(field) => {
                let namespace = facts.namespace();
                field.matches(|m| namespace.is_some_and(|n| m.matches(n.as_bytes())))
            }
            Self::DestinationPort(field) => field.matches(|&p| p == facts.request.destination_port),
        }
    }
}

/// Istio's string patterns: `*` alone, `*suffix`, `prefix*`, or exact.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any non-empty value.
    Presence,
}

impl StringMatch {
    fn parse(value: &str) -> Self {
        if value == "*" {
            Self::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else {
            Self::Exact(value.to_owned())
        }
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            Self::Exact(s) => value == s.as_bytes(),
            Self::Prefix(s) => value.starts_with(s.as_bytes()),
            Self::Suffix(s) => value.ends_with(s.as_bytes()),
            Self::Presence => !value.is_empty(),
        }
    }

    /// For a header that is present: `*` matches even an empty value.
    fn matches_header(&self, value: &[u8]) -> bool {
        matches!(self, Self::Presence) || self.matches(value)
    }
}

/// An IP prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// `a.b.c.d`, `a.b.c.d/n`, or the IPv6 forms. Host bits after the
    /// prefix are ignored, as Envoy's CIDR ranges do.
    fn parse(value: &str) -> Option<Self> {
        let (addr, len) = match value.split_once('/') {
            Some((addr, len)) => {
                // `u8::from_str` accepts a leading `+`; a prefix length is digits.
                if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                (addr.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?)
            }
            None => {
                let addr = value.parse::<IpAddr>().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        // Requests are matched on canonical addresses (IPv4 peers as IPv4),
        // so a prefix inside the IPv4-mapped range becomes the IPv4 prefix.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && len >= 96
        {
            return Some(Self {
                addr: IpAddr::V4(v4),
                len: len - 96,
            });
        }
        Some(Self { addr, len })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                (u128::from(net.to_bits()), u128::from(ip.to_bits()), 32u32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => (net.to_bits(), ip.to_bits(), 128),
            _ => return false,
        };
        let len = u32::from(self.len);
        if len == 0 {
            return true;
        }
        // `parse` keeps `len` within the family's width.
        let Some(shift) = bits.checked_sub(len) else {
            return false;
        };
        (net >> shift) == (ip >> shift)
    }
}

/// Collects a rule's problems while compiling its parts.
#[derive(Default)]
struct Compiler {
    unsupported: Vec<Unsupported>,
}

impl Compiler {
    fn note(&mut self, at: String, problem: Problem) {
        self.unsupported.push(Unsupported { at, problem });
    }

    fn reject_if_set(&mut self, at: &str, field: &str, values: &[String]) {
        if !values.is_empty() {
            self.note(format!("{at}.{field}"), Problem::Field);
        }
    }

    fn strings(&self, values: &[String]) -> Vec<StringMatch> {
        values.iter().map(|v| StringMatch::parse(v)).collect()
    }

    fn string_field(&self, any_of: &[String], none_of: &[String]) -> Field<StringMatch> {
        Field {
            any_of: self.strings(any_of),
            none_of: self.strings(none_of),
        }
    }

    fn host_field(&self, any_of: &[String], none_of: &[String]) -> Field<StringMatch> {
        let lower = |v: &[String]| -> Vec<StringMatch> {
            v.iter()
                .map(|h| StringMatch::parse(&h.to_ascii_lowercase()))
                .collect()
        };
        Field {
            any_of: lower(any_of),
            none_of: lower(none_of),
        }
    }

    fn path_field(
        &mut self,
        at: &str,
        any_of: &[String],
        none_of: &[String],
    ) -> Field<StringMatch> {
        for (field, values) in [("paths", any_of), ("notPaths", none_of)] {
            for value in values {
                if value.contains("{*}") || value.contains("{**}") {
                    self.note(
                        format!("{at}.{field}"),
                        Problem::PathTemplate {
                            value: value.clone(),
                        },
                    );
                }
            }
        }
        self.string_field(any_of, none_of)
    }

    fn cidrs(&mut self, at: String, values: &[String]) -> Vec<Cidr> {
        let mut cidrs = Vec::with_capacity(values.len());
        for value in values {
            match Cidr::parse(value) {
                Some(c) => cidrs.push(c),
                None => self.note(
                    at.clone(),
                    Problem::InvalidIpBlock {
                        value: value.clone(),
                    },
                ),
            }
        }
        cidrs
    }

    fn cidr_field(&mut self, at: &str, names: [&str; 2], values: [&[String]; 2]) -> Field<Cidr> {
        Field {
            any_of: self.cidrs(format!("{at}.{}", names[0]), values[0]),
            none_of: self.cidrs(format!("{at}.{}", names[1]), values[1]),
        }
    }

    fn ports(&mut self, at: String, values: &[String]) -> Vec<u16> {
        let mut ports = Vec::with_capacity(values.len());
        for value in values {
            // `u16::from_str` accepts a leading `+`; a port is digits.
            let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
            match value.parse::<u16>() {
                Ok(p) if digits => ports.push(p),
                _ => self.note(
                    at.clone(),
                    Problem::InvalidPort {
                        value: value.clone(),
                    },
                ),
            }
        }
        ports
    }

    fn port_field(&mut self, at: &str, names: [&str; 2], values: [&[String]; 2]) -> Field<u16> {
        Field {
            any_of: self.ports(format!("{at}.{}", names[0]), values[0]),
            none_of: self.ports(format!("{at}.{}", names[1]), values[1]),
        }
    }

    fn source(&mut self, at: &str, s: &SourceSpec) -> Source {
        let all = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.service_accounts,
            &s.not_service_accounts,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        ];
        if all.iter().all(|v| v.is_empty()) {
            self.note(at.to_owned(), Problem::EmptyEntry);
        }
        self.reject_if_set(at, "requestPrincipals", &s.request_principals);
        self.reject_if_set(at, "notRequestPrincipals", &s.not_request_principals);
        self.reject_if_set(at, "serviceAccounts", &s.service_accounts);
        self.reject_if_set(at, "notServiceAccounts", &s.not_service_accounts);
        Source {
            principals: self.string_field(&s.principals, &s.not_principals),
            namespaces: self.string_field(&s.namespaces, &s.not_namespaces),
            ip_blocks: self.cidr_field(
                at,
                ["ipBlocks", "notIpBlocks"],
                [&s.ip_blocks, &s.not_ip_blocks],
            ),
            remote_ip_blocks: self.cidr_field(
                at,
                ["remoteIpBlocks", "notRemoteIpBlocks"],
                [&s.remote_ip_blocks, &s.not_remote_ip_blocks],
            ),
        }
    }

    fn operation(&mut self, at: &str, o: &OperationSpec) -> Operation {
        let all = [
            &o.hosts,
            &o.not_hosts,
            &o.ports,
            &o.not_ports,
            &o.methods,
            &o.not_methods,
            &o.paths,
            &o.not_paths,
        ];
        if all.iter().all(|v| v.is_empty()) {
            self.note(at.to_owned(), Problem::EmptyEntry);
        }
        Operation {
            hosts: self.host_field(&o.hosts, &o.not_hosts),
            ports: self.port_field(at, ["ports", "notPorts"], [&o.ports, &o.not_ports]),
            methods: self.string_field(&o.methods, &o.not_methods),
            paths: self.path_field(at, &o.paths, &o.not_paths),
        }
    }

    fn condition(&mut self, at: &str, w: &ConditionSpec) -> Option<Condition> {
        if w.values.is_empty() && w.not_values.is_empty() {
            self.note(at.to_owned(), Problem::EmptyCondition);
            return None;
        }
        let (values, not_values) = (w.values.as_slice(), w.not_values.as_slice());
        let key = w.key.as_str();
        if let Some(name) = key
            .strip_prefix("request.headers[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            // `HeaderName` lower-cases, so names match case-insensitively;
            // pseudo-headers (`:authority`…) are not valid names and fail here.
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                self.note(
                    format!("{at}.key"),
                    Problem::HeaderName {
                        name: name.to_owned(),
                    },
                );
                return None;
            };
            return Some(Condition::Header(
                name,
                self.string_field(values, not_values),
            ));
        }
        match key {
            "source.ip" => Some(Condition::SourceIp(self.cidr_field(
                at,
                ["values", "notValues"],
                [values, not_values],
            ))),
            "source.principal" => Some(Condition::SourcePrincipal(
                self.string_field(values, not_values),
            )),
            "source.namespace" => Some(Condition::SourceNamespace(
                self.string_field(values, not_values),
            )),
            "destination.port" => Some(Condition::DestinationPort(self.port_field(
                at,
                ["values", "notValues"],
                [values, not_values],
            ))),
            _ => {
                self.note(
                    format!("{at}.key"),
                    Problem::ConditionKey {
                        key: key.to_owned(),
                    },
                );
                None
            }
        }
    }
}
