//! Gateway API `HTTPRoute`s attached to Services (GAMMA), checked into the
//! form a waypoint will enforce, and indexed by the Services they attach to.
//!
//! Each route that attaches to a Service with a waypoint is sent to
//! waypoints as a `meshbox.v1.WaypointRoute` (resource name
//! `{namespace}/{name}`): parents resolved to `{waypoint, service resource
//! name, port, consumer namespace}` (a Service without a waypoint gives no
//! parent, and a route without parents is not sent), rules with their
//! outcome, matches, header modifier and timeouts, and backends as Address
//! resource names (`{ns}/{hostname}`) with the reason when one cannot be
//! used. Because a route's parents and backends follow Services and their
//! waypoints, every Service rebuild marks the routes attached to it or
//! naming it as a backend, and they are rebuilt after it; the resource
//! changes exactly when one of those does. The same view is shown by the
//! REST API (`/api/v1/routes`), and its problems by `/api/v1/status`.
//!
//! Attachment:
//! - A `parentRef` with group `""` and kind `Service` attaches the route to
//!   that Service (namespace: the ref's, else the route's). A route in the
//!   Service's own namespace is a *producer* route and applies to every
//!   client; one in another namespace is a *consumer* route and applies only
//!   to clients in the route's namespace, as GAMMA defines them. Both are
//!   accepted; nothing else (no ReferenceGrant) is needed for either.
//! - `port` narrows the attachment to one Service port. `sectionName` is not
//!   supported: such a ref is not attached (attaching it to every port would
//!   route more than it says) and reported.
//! - Refs to Gateways are not attached: meshbox serves mesh routes only.
//! - Routing happens in a Service's waypoint; a route attached to a Service
//!   without one has no effect, and that is reported.
//!
//! Checking, and how each problem fails closed (every problem is reported):
//! - If meshbox cannot tell which requests a rule takes (an unsupported match
//!   type or field, a regular expression that does not compile, a bad path,
//!   header name or method), the rule matches nothing.
//! - If it cannot do to those requests what the rule says (a filter type
//!   other than `RequestHeaderModifier`, a bad timeout, no backends, all
//!   weights zero), the rule answers them 500, as Gateway API asks for a
//!   filter that cannot be applied. It never forwards them unfiltered.
//! - A backend that cannot be used (not found, a kind other than Service, in
//!   another namespace — meshbox does not read ReferenceGrant — no port, a
//!   port the Service lacks, per-backend filters) keeps its weight and gets
//!   an error: its share of requests is answered 500, as Envoy does.
//! - Rule fields meshbox does not read (`sessionPersistence`, `retry`) and
//!   unknown route fields are reported; they do not change which requests
//!   the rule takes or where they go.
//! - `hostnames` are shown but not matched on.
//!
//! Backend existence, Service ports and waypoints change with other objects,
//! so those checks run when the routes are read rather than when a route is
//! ingested: reads are rare (an API call), and the result can never be stale.

use std::collections::BTreeSet;
use std::sync::Arc;

use meshbox_proto::meshbox as pb;
use meshbox_proto::workload::address;
use serde::Serialize;

use super::{Key, MeshIndex, ObjectKey, index_insert, index_remove};
use crate::k8s::{self, HttpRoute, OtherFields};

/// Largest compiled size of one regular expression from a route. Larger
/// patterns are refused (the rule matches nothing) rather than letting one
/// object take the control plane's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Gateway API's limit on a backend's weight.
const MAX_WEIGHT: i64 = 1_000_000;
const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// How a checked rule treats the requests it is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RuleOutcome {
    /// Matched requests go to the backends, by weight.
    Route,
    /// The rule takes no request (its matches could not be honoured).
    MatchesNothing,
    /// Matched requests are answered 500 (what follows the match could not
    /// be honoured).
    Answer500,
}

/// How a value is compared. What the enforcing proxy must honour, from
/// Gateway API: `PathPrefix` compares whole path elements (`/api` takes
/// `/api` and `/api/v1`, not `/apis`), and a `RegularExpression` must match
/// the whole value, as Envoy's safe regex does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum MatchKind {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub kind: MatchKind,
    pub value: String,
}

/// A header (name lower-cased: header names are case-insensitive) or query
/// parameter (name as written: query names are case-sensitive) match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    #[serde(rename = "type")]
    pub kind: MatchKind,
    pub name: String,
    pub value: String,
}

/// One match: every part must hold. Absent parts match anything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckedMatch {
    pub path: PathMatch,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    pub set: Vec<HeaderSetting>,
    pub add: Vec<HeaderSetting>,
    /// Lower-cased, as `set` and `add` names are.
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderSetting {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckedBackend {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
    /// Why this backend cannot be used; its share is answered 500.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Timeouts in milliseconds; 0 means "no timeout", as in Gateway API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_request_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckedRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub outcome: RuleOutcome,
    /// ORed. A rule written without matches has one, of every path.
    pub matches: Vec<CheckedMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    pub backends: Vec<CheckedBackend>,
    pub timeouts: Timeouts,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A Service a route attaches to, as the route is read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentInfo {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// A route from another namespace: it applies only to clients in the
    /// route's namespace.
    pub consumer: bool,
    pub found: bool,
    /// `namespace/name` of the Service's waypoint, which would apply the
    /// route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
}

/// An HTTPRoute as the model reads it: attachments, checked rules and every
/// problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteInfo {
    pub namespace: String,
    pub name: String,
    pub hostnames: Vec<String>,
    pub parents: Vec<RouteParentInfo>,
    pub rules: Vec<CheckedRule>,
    pub problems: Vec<String>,
}

/// An accepted Service parentRef.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Attachment {
    service: Key,
    port: Option<u16>,
}

/// An HTTPRoute reduced and checked, as far as it can be on its own.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RouteState {
    /// `metadata.creationTimestamp`, Unix seconds (0 when absent).
    created: i64,
    hostnames: Vec<String>,
    attachments: Vec<Attachment>,
    rules: Vec<CheckedRule>,
    problems: Vec<String>,
}

impl RouteState {
    /// The Services named as backends (usable or not).
    fn backend_services(&self) -> BTreeSet<Key> {
        self.rules
            .iter()
            .flat_map(|r| r.backends.iter())
            .filter(|b| !b.name.is_empty())
            .map(|b| Key::new(&b.namespace, &b.name))
            .collect()
    }

    fn from_route(ns: &str, route: &HttpRoute) -> Self {
        let spec = &route.spec;
        let mut problems = Vec::new();
        report_other_fields(&mut problems, "spec", &spec.other, "ignored");

        let mut attachments: Vec<Attachment> = Vec::new();
        if spec.parent_refs.is_empty() {
            problems.push("no parentRefs: the route is attached to nothing".to_string());
        }
        for (i, parent) in spec.parent_refs.iter().enumerate() {
            match attachment(ns, parent) {
                Ok(a) => {
                    if !attachments.contains(&a) {
                        attachments.push(a);
                    }
                }
                Err(problem) => problems.push(format!("parentRefs[{i}]: {problem}")),
            }
        }

        let rules = spec
            .rules
            .iter()
            .map(|rule| check_rule(ns, rule))
            .collect::<Vec<_>>();
        for (i, rule) in rules.iter().enumerate() {
            for problem in &rule.problems {
                problems.push(format!("rules[{i}]: {problem}"));
            }
        }
        Self {
            created: route
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            hostnames: spec.hostnames.clone(),
            attachments,
            rules,
            problems,
        }
    }
}

fn report_other_fields(problems: &mut Vec<String>, at: &str, other: &OtherFields, effect: &str) {
    for field in other.keys() {
        problems.push(format!(
            "{at}.{field} is not supported by meshbox ({effect})"
        ));
    }
}

fn attachment(route_ns: &str, parent: &k8s::ParentReference) -> Result<Attachment, String> {
    let group = parent
        .group
        .as_deref()
        .unwrap_or("gateway.networking.k8s.io");
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let ns = parent
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(route_ns);
    match (group, kind) {
        ("" | "core", "Service") => {}
        ("gateway.networking.k8s.io", "Gateway") => {
            return Err(format!(
                "Gateway {ns}/{}: meshbox applies routes attached to Services only (GAMMA); not attached",
                parent.name
            ));
        }
        _ => {
            return Err(format!(
                "parent kind {kind} (group {group:?}) is not supported; not attached"
            ));
        }
    }
    if parent.name.is_empty() {
        return Err("Service parentRef without a name; not attached".to_string());
    }
    if parent.section_name.is_some() {
        return Err(format!(
            "Service {ns}/{}: sectionName is not supported (use port); not attached",
            parent.name
        ));
    }
    let port = match parent.port {
        None => None,
        Some(p) => Some(port_number(p).ok_or_else(|| {
            format!(
                "Service {ns}/{}: port {p} is not a port number; not attached",
                parent.name
            )
        })?),
    };
    Ok(Attachment {
        service: Key::new(ns, &parent.name),
        port,
    })
}

fn port_number(p: i64) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn check_rule(route_ns: &str, rule: &k8s::HttpRouteRule) -> CheckedRule {
    let mut problems = Vec::new();
    // Set by problems with matching; wins over `answer_500`.
    let mut matches_nothing = false;
    let mut answer_500 = false;

    let mut matches = Vec::new();
    if rule.matches.is_empty() {
        matches.push(CheckedMatch {
            path: default_path(),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        });
    }
    for (i, m) in rule.matches.iter().enumerate() {
        match check_match(m) {
            Ok(checked) => matches.push(checked),
            Err(errors) => {
                matches_nothing = true;
                for e in errors {
                    problems.push(format!("matches[{i}]: {e}; the rule matches nothing"));
                }
            }
        }
    }
    if matches_nothing {
        // Fail closed: what is left of a rule after dropping a match it
        // cannot honour is not what was written.
        matches.clear();
    }

    let mut request_header_modifier = None;
    for (i, filter) in rule.filters.iter().enumerate() {
        match check_filter(filter) {
            Ok(modifier) => {
                if request_header_modifier.is_some() {
                    answer_500 = true;
                    problems.push(format!(
                        "filters[{i}]: RequestHeaderModifier given twice; matching requests are answered 500"
                    ));
                } else {
                    request_header_modifier = Some(modifier);
                }
            }
            Err(e) => {
                answer_500 = true;
                problems.push(format!(
                    "filters[{i}]: {e}; matching requests are answered 500"
                ));
            }
        }
    }

    let backends: Vec<CheckedBackend> = rule
        .backend_refs
        .iter()
        .map(|b| check_backend(route_ns, b))
        .collect();
    if backends.is_empty() {
        answer_500 = true;
        problems.push("no backendRefs: matching requests are answered 500".to_string());
    } else if backends.iter().all(|b| b.weight == 0) {
        answer_500 = true;
        problems.push("every backend has weight 0: matching requests are answered 500".to_string());
    }
    for (i, b) in backends.iter().enumerate() {
        if let Some(e) = &b.error {
            problems.push(format!(
                "backendRefs[{i}] {}/{}: {e}; its share of requests is answered 500",
                b.namespace, b.name
            ));
        }
    }

    let timeouts = match check_timeouts(rule.timeouts.as_ref()) {
        Ok(t) => t,
        Err(e) => {
            answer_500 = true;
            problems.push(format!("timeouts: {e}; matching requests are answered 500"));
            Timeouts::default()
        }
    };

    report_other_fields(
        &mut problems,
        "rule",
        &rule.other,
        "ignored: it does not change which requests the rule takes or where they go",
    );

    let outcome = if matches_nothing {
        RuleOutcome::MatchesNothing
    } else if answer_500 {
        RuleOutcome::Answer500
    } else {
        RuleOutcome::Route
    };
    CheckedRule {
        name: rule.name.clone(),
        outcome,
        matches,
        request_header_modifier,
        backends,
        timeouts,
        problems,
    }
}

fn default_path() -> PathMatch {
    PathMatch {
        kind: MatchKind::PathPrefix,
        value: "/".to_string(),
    }
}

fn check_match(m: &k8s::HttpRouteMatch) -> Result<CheckedMatch, Vec<String>> {
    let mut errors = Vec::new();
    for field in m.other.keys() {
        errors.push(format!("match field {field} is not supported"));
    }
    let path = match &m.path {
        None => default_path(),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_string());
            let kind = match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => MatchKind::Exact,
                "PathPrefix" => MatchKind::PathPrefix,
                "RegularExpression" => MatchKind::RegularExpression,
                other => {
                    errors.push(format!("path match type {other:?} is not supported"));
                    MatchKind::Exact
                }
            };
            match kind {
                MatchKind::RegularExpression => {
                    if let Err(e) = compile(&value) {
                        errors.push(format!("path regular expression {value:?}: {e}"));
                    }
                }
                _ if !value.starts_with('/') => {
                    errors.push(format!("path {value:?} does not start with /"));
                }
                _ => {}
            }
            PathMatch { kind, value }
        }
    };
    let headers = m
        .headers
        .iter()
        .map(|h| {
            if h.name.is_empty() || http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                errors.push(format!("{:?} is not a header name", h.name));
            }
            value_match("header", h, h.name.to_ascii_lowercase(), &mut errors)
        })
        .collect();
    let query_params = m
        .query_params
        .iter()
        .map(|q| {
            if q.name.is_empty() {
                errors.push("query parameter match without a name".to_string());
            }
            value_match("query parameter", q, q.name.clone(), &mut errors)
        })
        .collect();
    let method = match &m.method {
        Some(method) if !HTTP_METHODS.contains(&method.as_str()) => {
            errors.push(format!("method {method:?} is not one Gateway API allows"));
            None
        }
        other => other.clone(),
    };
    if errors.is_empty() {
        Ok(CheckedMatch {
            path,
            headers,
            query_params,
            method,
        })
    } else {
        Err(errors)
    }
}

fn value_match(
    what: &str,
    m: &k8s::HttpValueMatch,
    name: String,
    errors: &mut Vec<String>,
) -> ValueMatch {
    let kind = match m.type_.as_deref().unwrap_or("Exact") {
        "Exact" => MatchKind::Exact,
        "RegularExpression" => {
            if let Err(e) = compile(&m.value) {
                errors.push(format!(
                    "{what} {:?} regular expression {:?}: {e}",
                    m.name, m.value
                ));
            }
            MatchKind::RegularExpression
        }
        other => {
            errors.push(format!("{what} match type {other:?} is not supported"));
            MatchKind::Exact
        }
    };
    ValueMatch {
        kind,
        name,
        value: m.value.clone(),
    }
}

/// Checks that a pattern compiles; the proxy that enforces it compiles its
/// own copy.
fn compile(pattern: &str) -> Result<(), String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(|_| ())
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => "too large to compile".to_string(),
            // The syntax error spans several lines; the first says what.
            other => other
                .to_string()
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid")
                .trim()
                .to_string(),
        })
}

fn check_filter(filter: &k8s::HttpRouteFilter) -> Result<HeaderModifier, String> {
    if filter.type_ != "RequestHeaderModifier" {
        return Err(format!(
            "filter type {:?} is not supported (only RequestHeaderModifier)",
            filter.type_
        ));
    }
    let Some(modifier) = &filter.request_header_modifier else {
        return Err("RequestHeaderModifier without requestHeaderModifier".to_string());
    };
    let header_name = |name: &str| -> Result<String, String> {
        if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("{name:?} is not a header name"));
        }
        Ok(name.to_ascii_lowercase())
    };
    let header = |h: &k8s::HttpHeader| -> Result<HeaderSetting, String> {
        if http::HeaderValue::from_str(&h.value).is_err() {
            return Err(format!(
                "header {:?}: value is not a valid header value",
                h.name
            ));
        }
        Ok(HeaderSetting {
            name: header_name(&h.name)?,
            value: h.value.clone(),
        })
    };
    Ok(HeaderModifier {
        set: modifier.set.iter().map(header).collect::<Result<_, _>>()?,
        add: modifier.add.iter().map(header).collect::<Result<_, _>>()?,
        remove: modifier
            .remove
            .iter()
            .map(|n| header_name(n))
            .collect::<Result<_, _>>()?,
    })
}

fn check_backend(route_ns: &str, b: &k8s::HttpBackendRef) -> CheckedBackend {
    let namespace = b
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(route_ns)
        .to_string();
    let weight = b.weight.unwrap_or(1);
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    let port = b.port.and_then(port_number);
    let error = if !matches!(group, "" | "core") || kind != "Service" {
        Some(format!(
            "backend kind {kind} (group {group:?}) is not supported"
        ))
    } else if b.name.is_empty() {
        Some("backend without a name".to_string())
    } else if namespace != route_ns {
        Some(
            "a backend in another namespace needs a ReferenceGrant, which meshbox does not read"
                .to_string(),
        )
    } else if b.port.is_none() {
        Some("port is required for a Service backend".to_string())
    } else if port.is_none() {
        Some(format!("port {} is not a port number", b.port.unwrap_or(0)))
    } else if !(0..=MAX_WEIGHT).contains(&weight) {
        Some(format!("weight {weight} is outside 0..={MAX_WEIGHT}"))
    } else {
        b.other
            .keys()
            .next()
            .map(|field| format!("backendRef field {field} is not supported"))
    };
    CheckedBackend {
        namespace,
        name: b.name.clone(),
        port,
        weight: u32::try_from(weight.clamp(0, MAX_WEIGHT)).unwrap_or(0),
        error,
    }
}

fn check_timeouts(t: Option<&k8s::HttpRouteTimeouts>) -> Result<Timeouts, String> {
    let Some(t) = t else {
        return Ok(Timeouts::default());
    };
    let parse = |field: &str, v: &Option<String>| -> Result<Option<u64>, String> {
        v.as_deref()
            .map(|s| {
                parse_duration_ms(s).ok_or_else(|| {
                    format!("{field} {s:?} is not a Gateway API duration (e.g. 10s, 500ms, 1h30m)")
                })
            })
            .transpose()
    };
    let out = Timeouts {
        request_ms: parse("request", &t.request)?,
        backend_request_ms: parse("backendRequest", &t.backend_request)?,
    };
    // Gateway API: a backend attempt cannot outlast the whole request. 0
    // means "no timeout" on either side.
    if let (Some(request), Some(backend)) = (out.request_ms, out.backend_request_ms)
        && request != 0
        && (backend == 0 || backend > request)
    {
        return Err("backendRequest is longer than request".to_string());
    }
    Ok(out)
}

/// A Gateway API duration (GEP-2257): one to four parts, each one to five
/// digits followed by `h`, `m`, `s` or `ms`, e.g. `1h`, `10s`, `1m30s`,
/// `500ms`. Milliseconds, or `None` if it does not follow the format.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let mut rest = text;
    let mut total: u64 = 0;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return None;
        };
        rest = &rest[unit_len..];
        total = total.checked_add(value.checked_mul(unit_ms)?)?;
        parts += 1;
        if parts > 4 {
            return None;
        }
    }
    (parts > 0).then_some(total)
}

impl MeshIndex {
    pub(super) fn ingest_route(&mut self, key: Key, route: &HttpRoute) {
        let state = RouteState::from_route(&key.ns, route);
        if self.routes.get(&key) == Some(&state) {
            return;
        }
        self.remove_route(&key);
        for a in &state.attachments {
            index_insert(&mut self.routes_by_service, &a.service, key.clone());
        }
        for b in state.backend_services() {
            index_insert(&mut self.routes_by_backend, &b, key.clone());
        }
        self.dirty.routes.insert(key.clone());
        self.routes.insert(key, state);
    }

    pub(super) fn remove_route(&mut self, key: &Key) {
        if let Some(old) = self.routes.remove(key) {
            for a in &old.attachments {
                index_remove(&mut self.routes_by_service, &a.service, key);
            }
            for b in old.backend_services() {
                index_remove(&mut self.routes_by_backend, &b, key);
            }
            self.dirty.routes.insert(key.clone());
        }
    }

    /// Marks the routes a Service's rebuild can change: attached to it, or
    /// naming it as a backend.
    pub(super) fn mark_service_routes(&mut self, service: &Key) {
        let marked: Vec<Key> = self
            .routes_by_service
            .get(service)
            .into_iter()
            .flatten()
            .chain(self.routes_by_backend.get(service).into_iter().flatten())
            .cloned()
            .collect();
        self.dirty.routes.extend(marked);
    }

    /// Rebuilds the `WaypointRoute` of one HTTPRoute.
    pub(super) fn recompute_route(&mut self, key: &Key) {
        let value = self
            .routes
            .get(key)
            .and_then(|state| self.waypoint_route(key, state));
        self.put_waypoint_route(key.slash_name(), value);
    }

    /// What waypoints get for a route, or `None` when no parent has a
    /// waypoint.
    fn waypoint_route(&self, key: &Key, state: &RouteState) -> Option<pb::WaypointRoute> {
        let info = self.route_info(key, state);
        let parents: Vec<pb::RouteParent> = info
            .parents
            .iter()
            .filter(|p| p.found)
            .filter_map(|p| {
                Some(pb::RouteParent {
                    waypoint: p.waypoint.clone()?,
                    service: self.service_resource_name(&Key::new(&p.namespace, &p.name)),
                    port: p.port.map(u32::from).unwrap_or(0),
                    consumer_namespace: if p.consumer {
                        key.ns.clone()
                    } else {
                        String::new()
                    },
                })
            })
            .collect();
        if parents.is_empty() {
            return None;
        }
        Some(pb::WaypointRoute {
            name: key.name.clone(),
            namespace: key.ns.clone(),
            parents,
            rules: info.rules.iter().map(|r| self.wire_rule(r)).collect(),
            created: state.created,
        })
    }

    fn wire_rule(&self, rule: &CheckedRule) -> pb::RouteRule {
        let kind = |k: MatchKind| match k {
            MatchKind::Exact => pb::MatchKind::Exact,
            MatchKind::PathPrefix => pb::MatchKind::PathPrefix,
            MatchKind::RegularExpression => pb::MatchKind::RegularExpression,
        } as i32;
        let value = |v: &ValueMatch| pb::StringMatch {
            kind: kind(v.kind),
            name: v.name.clone(),
            value: v.value.clone(),
        };
        let header = |h: &HeaderSetting| pb::HeaderValue {
            name: h.name.clone(),
            value: h.value.clone(),
        };
        pb::RouteRule {
            matches: rule
                .matches
                .iter()
                .map(|m| pb::RouteMatch {
                    path: Some(pb::StringMatch {
                        kind: kind(m.path.kind),
                        name: String::new(),
                        value: m.path.value.clone(),
                    }),
                    headers: m.headers.iter().map(value).collect(),
                    query_params: m.query_params.iter().map(value).collect(),
                    method: m.method.clone().unwrap_or_default(),
                })
                .collect(),
            outcome: match rule.outcome {
                RuleOutcome::Route => pb::RuleOutcome::Route,
                RuleOutcome::MatchesNothing => pb::RuleOutcome::MatchesNothing,
                RuleOutcome::Answer500 => pb::RuleOutcome::Answer500,
            } as i32,
            backends: rule
                .backends
                .iter()
                .map(|b| pb::RouteBackend {
                    service: if b.name.is_empty() {
                        String::new()
                    } else {
                        self.service_resource_name(&Key::new(&b.namespace, &b.name))
                    },
                    port: b.port.map(u32::from).unwrap_or(0),
                    weight: b.weight,
                    error: b.error.clone().unwrap_or_default(),
                })
                .collect(),
            request_header_modifier: rule.request_header_modifier.as_ref().map(|h| {
                pb::HeaderModifier {
                    set: h.set.iter().map(header).collect(),
                    add: h.add.iter().map(header).collect(),
                    remove: h.remove.clone(),
                }
            }),
            request_timeout_ms: rule.timeouts.request_ms.unwrap_or(0),
            backend_request_timeout_ms: rule.timeouts.backend_request_ms.unwrap_or(0),
            name: rule.name.clone().unwrap_or_default(),
        }
    }

    /// Every served `WaypointRoute`, sorted by resource name.
    pub fn waypoint_routes(&self) -> impl Iterator<Item = (&str, &Arc<pb::WaypointRoute>)> {
        self.waypoint_routes.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn waypoint_route_resource(&self, name: &str) -> Option<Arc<pb::WaypointRoute>> {
        self.waypoint_routes.get(name).cloned()
    }

    /// The HTTPRoutes attached to a Service, sorted.
    pub fn service_routes(&self, namespace: &str, name: &str) -> Vec<ObjectKey> {
        self.routes_by_service
            .get(&Key::new(namespace, name))
            .into_iter()
            .flatten()
            .map(|k| ObjectKey::http_route(&k.ns, &k.name))
            .collect()
    }

    /// Every HTTPRoute, checked against the Services and waypoints known
    /// now, sorted by namespace and name.
    pub fn routes(&self) -> Vec<RouteInfo> {
        let mut keys: Vec<&Key> = self.routes.keys().collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|key| Some(self.route_info(key, self.routes.get(key)?)))
            .collect()
    }

    /// `route` as given (which may be newer than the copy the index holds),
    /// checked against the Services and waypoints known now: what the
    /// route status writer reports for the generation it stamps.
    pub fn check_route(&self, namespace: &str, route: &HttpRoute) -> RouteInfo {
        let name = route.metadata.name.as_deref().unwrap_or_default();
        let state = RouteState::from_route(namespace, route);
        self.route_info(&Key::new(namespace, name), &state)
    }

    /// Problems of every route, for [`MeshIndex::statuses`].
    pub(super) fn route_statuses(&self) -> impl Iterator<Item = (ObjectKey, Vec<String>)> + '_ {
        self.routes.iter().filter_map(|(key, state)| {
            let info = self.route_info(key, state);
            (!info.problems.is_empty())
                .then(|| (ObjectKey::http_route(&key.ns, &key.name), info.problems))
        })
    }

    fn route_info(&self, key: &Key, state: &RouteState) -> RouteInfo {
        let mut problems = state.problems.clone();
        let mut parents = Vec::new();
        for a in &state.attachments {
            let service = self.services.get(&a.service);
            let waypoint = self.waypoint_of_service(&a.service);
            let svc = &a.service;
            match service {
                None => problems.push(format!("parent Service {svc} not found")),
                Some(s) => {
                    if let Some(port) = a.port
                        && !s.has_port(u32::from(port))
                    {
                        problems.push(format!("parent Service {svc} has no port {port}"));
                    }
                    if waypoint.is_none() {
                        problems.push(format!(
                            "Service {svc} has no waypoint: routes are applied by a waypoint, so this one has no effect on its traffic"
                        ));
                    }
                }
            }
            parents.push(RouteParentInfo {
                namespace: svc.ns.clone(),
                name: svc.name.clone(),
                port: a.port,
                consumer: svc.ns != key.ns,
                found: service.is_some(),
                waypoint: waypoint.map(|w| w.to_string()),
            });
        }
        let mut rules = state.rules.clone();
        for (i, rule) in rules.iter_mut().enumerate() {
            for (j, backend) in rule.backends.iter_mut().enumerate() {
                if backend.error.is_some() {
                    continue; // already reported with the rule
                }
                let bkey = Key::new(&backend.namespace, &backend.name);
                let error = match self.services.get(&bkey) {
                    None => Some("backend not found".to_string()),
                    Some(s) => backend
                        .port
                        .filter(|p| !s.has_port(u32::from(*p)))
                        .map(|p| format!("Service has no port {p}")),
                };
                if let Some(e) = error {
                    let problem = format!(
                        "backendRefs[{j}] {bkey}: {e}; its share of requests is answered 500"
                    );
                    problems.push(format!("rules[{i}]: {problem}"));
                    rule.problems.push(problem);
                    backend.error = Some(e);
                }
            }
        }
        RouteInfo {
            namespace: key.ns.clone(),
            name: key.name.clone(),
            hostnames: state.hostnames.clone(),
            parents,
            rules,
            problems,
        }
    }

    /// The waypoint a Service's traffic goes through now, if any.
    pub(super) fn waypoint_of_service(&self, key: &Key) -> Option<&Key> {
        let served = self.addresses.get(&self.service_resource_name(key))?;
        match &served.r#type {
            Some(address::Type::Service(s)) if s.waypoint.is_some() => {
                self.service_waypoint.get(key)
            }
            _ => None,
        }
    }
}
