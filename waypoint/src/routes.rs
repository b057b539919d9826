//! HTTPRoutes as the waypoint applies them: the control plane's checked
//! `WaypointRoute` resources compiled into one table per Service, and the
//! choice of a rule and a backend for each request.
//!
//! Pure: no I/O, no clock. Semantics (Gateway API, GAMMA):
//! - A route applies to requests for the Services it names as parents that
//!   use this waypoint, on the parent's port or on every port. A consumer
//!   route (from another namespace) applies only to clients in its
//!   namespace, and for them it replaces the Service's producer routes.
//! - Among the matches of all routes that apply, the most specific wins:
//!   an Exact path, then the longest PathPrefix, then a regular expression;
//!   then a method; then more header matches; then more query matches; then
//!   the older route, then the lower `namespace/name`, then rule and match
//!   order.
//! - A Service with routes but no match for a request: 404, as Envoy does.
//!   A Service without routes: the request goes to the Service itself.
//! - `PathPrefix` compares whole path elements; a regular expression must
//!   match the whole value; header names compare case-insensitively, query
//!   parameter names and values as received (not percent-decoded).
//! - Backends are chosen by weight per request; a backend the control plane
//!   marked unusable answers its share 500.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use meshbox_proto::meshbox::{self as pb, MatchKind, RuleOutcome};
use regex::Regex;

/// Largest compiled regular expression accepted; the control plane checks
/// the same, so a larger one only comes from a broken or hostile server.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A compiled string match.
#[derive(Clone, Debug)]
enum Matcher {
    Exact(String),
    /// Whole path elements; stored without a trailing `/`, empty for `/`.
    PathPrefix(String),
    Regex(Regex),
}

impl Matcher {
    fn compile(kind: i32, value: &str) -> Result<Self, String> {
        match MatchKind::try_from(kind) {
            Ok(MatchKind::Exact) => Ok(Self::Exact(value.to_owned())),
            Ok(MatchKind::PathPrefix) => {
                Ok(Self::PathPrefix(value.trim_end_matches('/').to_owned()))
            }
            Ok(MatchKind::RegularExpression) => regex::RegexBuilder::new(&format!("^(?:{value})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map(Self::Regex)
                .map_err(|e| format!("regular expression {value:?}: {e}")),
            Err(_) => Err(format!("unknown match kind {kind}")),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => value == v,
            Self::PathPrefix(p) => {
                p.is_empty()
                    || value
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::Regex(r) => r.is_match(value),
        }
    }

    /// How specific a path match is, larger first: Exact, then prefixes by
    /// length, then regular expressions.
    fn path_rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(v) => (2, v.len()),
            Self::PathPrefix(p) => (1, p.len()),
            Self::Regex(_) => (0, 0),
        }
    }
}

#[derive(Clone, Debug)]
struct CompiledMatch {
    path: Matcher,
    headers: Vec<(HeaderName, Matcher)>,
    query: Vec<(String, Matcher)>,
    method: Option<Method>,
}

impl CompiledMatch {
    fn compile(m: &pb::RouteMatch) -> Result<Self, String> {
        let path = match &m.path {
            Some(p) => Matcher::compile(p.kind, &p.value)?,
            None => Matcher::PathPrefix(String::new()),
        };
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("header name {:?}", h.name))?;
                Ok((name, Matcher::compile(h.kind, &h.value)?))
            })
            .collect::<Result<_, String>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| Ok((q.name.clone(), Matcher::compile(q.kind, &q.value)?)))
            .collect::<Result<_, String>>()?;
        let method = match m.method.as_str() {
            "" => None,
            other => Some(
                Method::from_bytes(other.as_bytes()).map_err(|_| format!("method {other:?}"))?,
            ),
        };
        Ok(Self {
            path,
            headers,
            query,
            method,
        })
    }

    fn matches(&self, req: &RequestHead<'_>) -> bool {
        self.path.matches(req.path)
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self
                .headers
                .iter()
                .all(|(name, m)| header_value(req.headers, name).is_some_and(|v| m.matches(&v)))
            && self
                .query
                .iter()
                .all(|(name, m)| query_values(req.query, name).any(|v| m.matches(v)))
    }
}

/// A header as one string: several values joined with `,`; `None` when
/// absent or not text.
fn header_value(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let v = v.to_str().ok()?;
        match &mut out {
            Some(s) => {
                s.push(',');
                s.push_str(v);
            }
            None => out = Some(v.to_owned()),
        }
    }
    out
}

fn query_values<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// What a request looks like to route matching.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Normalised, without the query.
    pub path: &'a str,
    /// Without the `?`; empty when there is none.
    pub query: &'a str,
    pub headers: &'a HeaderMap,
}

/// A backend as the control plane resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Address resource name of the Service, `{namespace}/{hostname}`.
    pub service: String,
    pub port: u16,
    pub weight: u32,
    /// Why this backend cannot be used: its share is answered 500.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    fn compile(m: &pb::HeaderModifier) -> Result<Self, String> {
        let pair = |h: &pb::HeaderValue| {
            Ok((
                HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("header name {:?}", h.name))?,
                HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("value of header {:?}", h.name))?,
            ))
        };
        Ok(Self {
            set: m.set.iter().map(pair).collect::<Result<_, String>>()?,
            add: m.add.iter().map(pair).collect::<Result<_, String>>()?,
            remove: m
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("header name {n:?}"))
                })
                .collect::<Result<_, String>>()?,
        })
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// What a matched rule does.
#[derive(Clone, Debug)]
pub enum Action {
    Forward {
        backends: Vec<Backend>,
        total_weight: u64,
    },
    /// Answer 500: the control plane could not honour what follows the
    /// match (an unsupported filter, no backends).
    Fail,
}

/// One rule of one route, ready to apply.
#[derive(Clone, Debug)]
pub struct Rule {
    /// `namespace/name` of the route, and the rule's index, for logs.
    pub route: String,
    pub index: usize,
    pub action: Action,
    pub request_headers: HeaderModifier,
    /// The whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// Each try.
    pub backend_timeout: Option<Duration>,
}

impl Rule {
    /// The backend for a request, by weight; `roll` is uniform in
    /// `0..total_weight` (the caller's randomness, so this stays pure).
    pub fn backend(&self, roll: u64) -> Option<&Backend> {
        let Action::Forward { backends, .. } = &self.action else {
            return None;
        };
        let mut left = roll;
        for b in backends {
            if left < u64::from(b.weight) {
                return Some(b);
            }
            left -= u64::from(b.weight);
        }
        None
    }
}

/// One match of one rule, ranked.
#[derive(Clone, Debug)]
struct Entry {
    port: Option<u16>,
    consumer_namespace: Option<String>,
    matcher: CompiledMatch,
    rule: Arc<Rule>,
    /// Larger first: path rank, method, headers, query.
    specificity: ((u8, usize), bool, usize, usize),
    /// Smaller first: creation time, then `namespace/name`, rule, match.
    age: (i64, String, usize, usize),
}

/// What routing decided for a request.
#[derive(Debug)]
pub enum Selected<'a> {
    /// No route applies to the Service: send it to the Service.
    NoRoutes,
    /// Routes apply but none matched: 404.
    NoMatch,
    Rule(&'a Arc<Rule>),
}

/// Every route this waypoint applies, by Service.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    by_service: HashMap<String, Vec<Entry>>,
}

/// A route the waypoint could not compile (the control plane checks the
/// same things, so this means the server and the proxy disagree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteProblem {
    pub route: String,
    pub problem: String,
}

impl RouteTable {
    /// Compiles the routes that name `waypoint` (`namespace/name`) as a
    /// parent's waypoint. A rule that does not compile takes no request (its
    /// matches) or answers 500 (its filter), and is reported.
    pub fn build<'a>(
        waypoint: &str,
        routes: impl IntoIterator<Item = &'a pb::WaypointRoute>,
    ) -> (Self, Vec<RouteProblem>) {
        let mut table = Self::default();
        let mut problems = Vec::new();
        for route in routes {
            let key = format!("{}/{}", route.namespace, route.name);
            let parents: Vec<&pb::RouteParent> = route
                .parents
                .iter()
                .filter(|p| p.waypoint == waypoint)
                .collect();
            if parents.is_empty() {
                continue;
            }
            for (index, rule) in route.rules.iter().enumerate() {
                let Some(compiled) = compile_rule(&key, index, rule, &mut problems) else {
                    continue;
                };
                let compiled = Arc::new(compiled);
                for (mi, m) in rule.matches.iter().enumerate() {
                    let matcher = match CompiledMatch::compile(m) {
                        Ok(m) => m,
                        Err(problem) => {
                            problems.push(RouteProblem {
                                route: key.clone(),
                                problem: format!(
                                    "rules[{index}].matches[{mi}]: {problem}; it matches nothing"
                                ),
                            });
                            continue;
                        }
                    };
                    let specificity = (
                        matcher.path.path_rank(),
                        matcher.method.is_some(),
                        matcher.headers.len(),
                        matcher.query.len(),
                    );
                    for parent in &parents {
                        table
                            .by_service
                            .entry(parent.service.clone())
                            .or_default()
                            .push(Entry {
                                port: u16::try_from(parent.port).ok().filter(|p| *p != 0),
                                consumer_namespace: Some(parent.consumer_namespace.clone())
                                    .filter(|n| !n.is_empty()),
                                matcher: matcher.clone(),
                                rule: compiled.clone(),
                                specificity,
                                age: (route.created, key.clone(), index, mi),
                            });
                    }
                }
            }
        }
        for entries in table.by_service.values_mut() {
            entries.sort_by(|a, b| b.specificity.cmp(&a.specificity).then(a.age.cmp(&b.age)));
        }
        (table, problems)
    }

    /// The rule for a request to `service` (Address resource name) on
    /// `port`, from a client in `client_namespace`.
    pub fn select(
        &self,
        service: &str,
        port: u16,
        client_namespace: Option<&str>,
        request: &RequestHead<'_>,
    ) -> Selected<'_> {
        let Some(entries) = self.by_service.get(service) else {
            return Selected::NoRoutes;
        };
        let on_port = |e: &&Entry| e.port.is_none_or(|p| p == port);
        let consumer = |e: &&Entry| {
            e.consumer_namespace.is_some() && e.consumer_namespace.as_deref() == client_namespace
        };
        // GAMMA: a client's own namespace's routes replace the producer's.
        let has_consumer = entries.iter().filter(on_port).any(|e| consumer(&e));
        let mut applicable = entries
            .iter()
            .filter(on_port)
            .filter(|e| {
                if has_consumer {
                    consumer(e)
                } else {
                    e.consumer_namespace.is_none()
                }
            })
            .peekable();
        if applicable.peek().is_none() {
            return Selected::NoRoutes;
        }
        match applicable.find(|e| e.matcher.matches(request)) {
            Some(e) => Selected::Rule(&e.rule),
            None => Selected::NoMatch,
        }
    }

    /// Services with at least one route, for `/config_dump`.
    pub fn services(&self) -> impl Iterator<Item = (&str, usize)> {
        self.by_service.iter().map(|(s, e)| (s.as_str(), e.len()))
    }
}

fn compile_rule(
    route: &str,
    index: usize,
    rule: &pb::RouteRule,
    problems: &mut Vec<RouteProblem>,
) -> Option<Rule> {
    let outcome = RuleOutcome::try_from(rule.outcome).unwrap_or(RuleOutcome::Answer500);
    if outcome == RuleOutcome::MatchesNothing {
        return None;
    }
    let mut fail = outcome == RuleOutcome::Answer500;
    let request_headers = match rule
        .request_header_modifier
        .as_ref()
        .map(HeaderModifier::compile)
    {
        None => HeaderModifier::default(),
        Some(Ok(m)) => m,
        Some(Err(problem)) => {
            problems.push(RouteProblem {
                route: route.to_owned(),
                problem: format!("rules[{index}]: requestHeaderModifier: {problem}; answered 500"),
            });
            fail = true;
            HeaderModifier::default()
        }
    };
    let backends: Vec<Backend> = rule
        .backends
        .iter()
        .map(|b| Backend {
            service: b.service.clone(),
            port: u16::try_from(b.port).unwrap_or(0),
            weight: b.weight,
            error: if !b.error.is_empty() {
                Some(b.error.clone())
            } else if b.port == 0 || b.port > u32::from(u16::MAX) {
                Some(format!("backend {} has no usable port", b.service))
            } else {
                None
            },
        })
        .collect();
    let total_weight: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total_weight == 0 {
        fail = true;
    }
    let ms = |v: u64| (v != 0).then(|| Duration::from_millis(v));
    Some(Rule {
        route: route.to_owned(),
        index,
        action: if fail {
            Action::Fail
        } else {
            Action::Forward {
                backends,
                total_weight,
            }
        },
        request_headers,
        request_timeout: ms(rule.request_timeout_ms),
        backend_timeout: ms(rule.backend_request_timeout_ms),
    })
}

/// Istio's default path normalisation (`BASE`: RFC 3986 §6), so a path is
/// matched, authorized and forwarded in one spelling: percent-encoded
/// unreserved characters are decoded (`/%61dmin` is `/admin`), other
/// encodings get upper-case hex, and dot segments are removed
/// (`/a/./b/../admin` and `/a/%2e%2e/admin` are `/admin`). Slashes are not
/// merged and `%2F` stays encoded, as in `BASE`.
pub fn normalize_path(path: &str) -> String {
    let decoded = decode_unreserved(path);
    if !decoded.split('/').any(|s| s == "." || s == "..") {
        return decoded;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Decodes `%XX` where XX is an unreserved character and upper-cases the
/// hex of the rest; a `%` not followed by two hex digits is kept as is.
fn decode_unreserved(path: &str) -> String {
    if !path.contains('%') {
        return path.to_owned();
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let c = (hi << 4) | lo;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(c));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
            continue;
        }
        // One whole character (paths from hyper are ASCII; this keeps any
        // other input intact rather than splitting a UTF-8 sequence).
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + len]);
        i += len;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
