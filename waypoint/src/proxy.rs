//! What happens to one request: authorize it (L7 policy), route it
//! (HTTPRoute, else the Service itself), pick an endpoint, and send it on
//! over HBONE with the waypoint's identity; every request is recorded.
//!
//! Every refusal is an HTTP answer, never a forward: 403 `RBAC: access
//! denied` for policy, 404 when routes apply and none matches, 500 for a
//! rule or backend the control plane could not honour, 503 when no endpoint
//! is healthy or none can be reached, 504 on a route timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use meshbox_certs::SpiffeId;
use meshbox_dataplane::identity::CertificateManager;
use meshbox_dataplane::mesh::Mesh;
use meshbox_dataplane::state::{
    GatewayAddress, GatewayTarget, ProxyState, ServiceInfo, Upstream, Workload, direct,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::authz::{self, DENIED_BODY, Policy};
use crate::policies::PolicyTable;
use crate::routes::{
    Action, RequestHead, RouteProblem, RouteTable, Rule, Selected, normalize_path,
};
use crate::telemetry::{HandleCache, Metered, RequestRecord, Telemetry};
use crate::upstream::{Body, Upstreams};

/// Istio's default retry policy: two more tries, on a failed connection or
/// a 503, for requests that can be replayed (no body).
const RETRIES: usize = 2;

/// The L7 configuration in force, rebuilt whenever xDS changes it.
#[derive(Default)]
pub struct L7Config {
    pub routes: RouteTable,
    pub policies: PolicyTable,
    pub route_problems: Vec<RouteProblem>,
}

/// Limits on what a client may send.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

/// Everything a request needs.
pub struct Waypoint {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    pub identity: SpiffeId,
    pub trust_domain: String,
    pub mesh: Arc<Mesh>,
    pub certs: Arc<CertificateManager>,
    pub l7: ArcSwap<L7Config>,
    pub upstreams: Upstreams,
    pub telemetry: Telemetry,
    /// The waypoint as a routing source: its network and locality.
    pub me: ArcSwap<Workload>,
    pub limits: HttpLimits,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// What a CONNECT stream is for.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A Service VIP and port.
    Service {
        /// Address resource name, `{namespace}/{hostname}`.
        key: String,
        info: ServiceInfo,
        port: u16,
    },
    /// A workload's own address (a waypoint for workloads).
    Workload {
        workload: Arc<Workload>,
        addr: SocketAddr,
    },
}

/// One accepted CONNECT stream.
pub struct Tunnel {
    pub peer_identity: SpiffeId,
    /// The client's address (the HBONE connection comes from the client
    /// pod's own namespace).
    pub peer_addr: SocketAddr,
    pub source_workload: Option<Arc<Workload>>,
    pub target: SocketAddr,
    pub destination: Destination,
    /// Its requests' metric series.
    pub metrics: Arc<HandleCache>,
}

impl Waypoint {
    /// Whether a waypoint reference names this waypoint: its Service (by
    /// hostname or VIP) or one of its pods' addresses.
    fn is_me(&self, state: &ProxyState, gw: &GatewayAddress) -> bool {
        let (ns, name) = self.gateway.split_once('/').unwrap_or(("", ""));
        match &gw.target {
            GatewayTarget::Hostname {
                namespace,
                hostname,
            } => {
                namespace == ns
                    && state
                        .service(&format!("{namespace}/{hostname}"))
                        .is_some_and(|s| s.name == name && s.namespace == ns)
            }
            GatewayTarget::Address { network, ip } => {
                state
                    .service_by_vip(network, *ip, ns)
                    .is_some_and(|s| s.name == name && s.namespace == ns)
                    || self.me.load().addresses.contains(ip)
            }
        }
    }

    /// What a CONNECT to `target` from a client in `client_namespace` is
    /// for; `None` unless it is a Service or workload that uses this
    /// waypoint. Anything else is refused: the waypoint must not become a
    /// way to reach workloads with its own identity.
    pub fn destination(&self, target: SocketAddr, client_namespace: &str) -> Option<Destination> {
        let state = self.mesh.read();
        let network = self.mesh.network();
        let ip = target.ip().to_canonical();
        if let Some(svc) = state.service_by_vip(network, ip, client_namespace) {
            let gw = svc.waypoint.as_ref()?;
            return self.is_me(&state, gw).then(|| Destination::Service {
                key: svc.key(),
                info: ServiceInfo::from(svc.as_ref()),
                port: target.port(),
            });
        }
        let w = state.workload_by_ip(network, ip)?;
        let gw = w.waypoint.as_ref()?;
        self.is_me(&state, gw).then(|| Destination::Workload {
            workload: w.clone(),
            addr: SocketAddr::new(ip, target.port()),
        })
    }
}

fn body_of(text: &'static str) -> Body {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn local_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(body_of(text));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Headers that describe one connection, not the message: never forwarded
/// (RFC 9110 §7.6.1), with those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Approximate wire size of a header block, for `istio_request_bytes`.
fn header_bytes(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// The outcome of one request before its response is metered.
struct Answer {
    response: Response<Body>,
    flags: &'static str,
    detail: Option<String>,
    destination_workload: Option<Arc<Workload>>,
    upstream: Option<SocketAddr>,
}

impl Answer {
    fn local(status: StatusCode, text: &'static str, flags: &'static str, detail: String) -> Self {
        Self {
            response: local_response(status, text),
            flags,
            detail: Some(detail),
            destination_workload: None,
            upstream: None,
        }
    }
}

/// Serves one request of a tunnel.
pub async fn handle(
    wp: Arc<Waypoint>,
    tunnel: Arc<Tunnel>,
    req: Request<Incoming>,
) -> Response<Metered> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let path = normalize_path(parts.uri.path());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let request_bytes = header_bytes(&parts.headers) + body.size_hint().exact().unwrap_or_default();
    let destination_service = match &tunnel.destination {
        Destination::Service { info, .. } => Some(info.clone()),
        Destination::Workload { .. } => None,
    };
    let method = parts.method.to_string();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let head = Head {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
    };
    let answer = decide_and_forward(&wp, &tunnel, head, &path, &authority, body).await;
    let mut response = answer.response;
    strip_hop_by_hop(response.headers_mut());
    let record = RequestRecord {
        telemetry: wp.telemetry.clone(),
        cache: tunnel.metrics.clone(),
        start,
        method,
        path: target,
        authority,
        protocol: "http",
        source_identity: Some(tunnel.peer_identity.clone()),
        source_workload: tunnel.source_workload.clone(),
        destination_service,
        destination_workload: answer.destination_workload,
        upstream: answer.upstream,
        status: response.status().as_u16(),
        flags: answer.flags,
        detail: answer.detail,
        request_bytes,
        response_bytes: header_bytes(response.headers()),
    };
    let (head, body) = response.into_parts();
    Response::from_parts(head, Metered::new(body, record))
}

/// The parts of a request head the pipeline reads and forwards.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

async fn decide_and_forward(
    wp: &Waypoint,
    tunnel: &Tunnel,
    head: Head,
    path: &str,
    authority: &str,
    body: Incoming,
) -> Answer {
    let l7 = wp.l7.load_full();
    let (service_key, workload_uid) = match &tunnel.destination {
        Destination::Service { key, .. } => (Some(key.as_str()), None),
        Destination::Workload { workload, .. } => (None, Some(workload.uid.as_str())),
    };
    let facts = authz::Request {
        source_identity: Some(&tunnel.peer_identity),
        source_ip: tunnel.peer_addr.ip(),
        destination_port: tunnel.target.port(),
        method: head.method.as_str(),
        path,
        host: authority,
        headers: &head.headers,
    };
    let policies: Vec<&Policy> = l7.policies.for_target(service_key, workload_uid).collect();
    let decision = authz::authorize(&facts, &policies);
    if !decision.is_allowed() {
        return Answer::local(
            authz::DENIED_STATUS,
            DENIED_BODY,
            "-",
            format!("{:?}", decision.reason),
        );
    }

    // Where to: a rule's backend, or the Service itself, or the workload.
    let mut rule: Option<Arc<Rule>> = None;
    let mut detail = None;
    let backend: Option<(String, u16)> = match &tunnel.destination {
        Destination::Service { key, port, .. } => {
            let query = head.uri.query().unwrap_or("");
            let client_ns = tunnel.peer_identity.namespace();
            let request = RequestHead {
                method: &head.method,
                path,
                query,
                headers: &head.headers,
            };
            match l7.routes.select(key, *port, Some(client_ns), &request) {
                Selected::NoRoutes => Some((key.clone(), *port)),
                Selected::NoMatch => {
                    return Answer::local(
                        StatusCode::NOT_FOUND,
                        "",
                        "NR",
                        "no route matched".to_owned(),
                    );
                }
                Selected::Rule(r) => {
                    detail = Some(format!("route {} rule {}", r.route, r.index));
                    let Action::Forward { total_weight, .. } = &r.action else {
                        return Answer::local(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "",
                            "-",
                            format!("route {} rule {} cannot be applied", r.route, r.index),
                        );
                    };
                    let roll = rand::rng().random_range(0..*total_weight);
                    let Some(b) = r.backend(roll) else {
                        return Answer::local(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "",
                            "-",
                            "no backend".to_owned(),
                        );
                    };
                    if let Some(error) = &b.error {
                        return Answer::local(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "",
                            "-",
                            format!("route {} backend {}: {error}", r.route, b.service),
                        );
                    }
                    let picked = (b.service.clone(), b.port);
                    rule = Some(r.clone());
                    Some(picked)
                }
            }
        }
        Destination::Workload { .. } => None,
    };

    let replayable = body.is_end_stream();
    let mut body = Some(body);
    let tries = if replayable { 1 + RETRIES } else { 1 };
    let request_timeout = rule.as_ref().and_then(|r| r.request_timeout);
    let try_timeout = rule.as_ref().and_then(|r| r.backend_timeout);
    let deadline = request_timeout.map(|t| tokio::time::Instant::now() + t);

    let mut last = Answer::local(
        StatusCode::SERVICE_UNAVAILABLE,
        "no healthy upstream",
        "UH",
        "no endpoint".to_owned(),
    );
    for attempt in 0..tries {
        let upstream = match pick(wp, tunnel, backend.as_ref()) {
            Ok(u) => u,
            Err(error) => {
                last = Answer::local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                    "UH",
                    error,
                );
                break;
            }
        };
        let endpoint = upstream.destination_workload.clone();
        let addr = upstream.authority().unwrap_or(upstream.connect_to);
        // Policies bound to the chosen endpoint (moved here from its node
        // proxy) are decided now that it is known.
        // (A request addressed to a workload had them with the target.)
        if let Some(w) = &endpoint
            && service_key.is_some()
            && l7.policies.has_endpoint_policies()
        {
            let extra: Vec<&Policy> = l7.policies.for_endpoint(&w.uid, service_key).collect();
            if !extra.is_empty() {
                let decision = authz::authorize(&facts, &extra);
                if !decision.is_allowed() {
                    return Answer::local(
                        authz::DENIED_STATUS,
                        DENIED_BODY,
                        "-",
                        format!("{:?} (endpoint {})", decision.reason, w.uid),
                    );
                }
            }
        }
        // HTTP/1.1 upstream: the URI names the endpoint (hyper's pool is
        // keyed on it) and the client's Host header goes as it came.
        // HTTP/2: the URI keeps the client's authority (`:authority`), and
        // the connection is chosen by endpoint.
        let h2 = head.version == Version::HTTP_2;
        let target = head
            .uri
            .query()
            .map_or_else(|| path.to_owned(), |q| format!("{path}?{q}"));
        let uri_authority = if h2 && !authority.is_empty() {
            authority.to_owned()
        } else {
            addr.to_string()
        };
        let uri = match Uri::builder()
            .scheme("http")
            .authority(uri_authority)
            .path_and_query(target)
            .build()
        {
            Ok(uri) => uri,
            Err(_) => {
                return Answer::local(StatusCode::BAD_REQUEST, "", "-", "bad path".to_owned());
            }
        };
        let mut builder = Request::builder()
            .method(head.method.clone())
            .uri(uri)
            .version(head.version);
        if let Some(h) = builder.headers_mut() {
            *h = head.headers.clone();
            if let Some(r) = &rule {
                r.request_headers.apply(h);
            }
            strip_hop_by_hop(h);
            if h2 {
                h.remove(header::HOST);
            }
        }
        let out_body = match body.take() {
            Some(b) => b.boxed(),
            None => empty(),
        };
        let Ok(request) = builder.body(out_body) else {
            return Answer::local(StatusCode::BAD_REQUEST, "", "-", "bad request".to_owned());
        };
        let send = async {
            if h2 {
                wp.upstreams
                    .http2
                    .send(addr, request)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                wp.upstreams
                    .http1
                    .request(request)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let limit = match (deadline, try_timeout) {
            (Some(d), Some(t)) => Some(d.min(tokio::time::Instant::now() + t)),
            (Some(d), None) => Some(d),
            (None, Some(t)) => Some(tokio::time::Instant::now() + t),
            (None, None) => None,
        };
        let result = match limit {
            Some(at) => match tokio::time::timeout_at(at, send).await {
                Ok(r) => r,
                Err(_) => {
                    return Answer {
                        response: local_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout",
                        ),
                        flags: "UT",
                        detail,
                        destination_workload: endpoint,
                        upstream: Some(addr),
                    };
                }
            },
            None => send.await,
        };
        match result {
            Ok(response)
                if response.status() == StatusCode::SERVICE_UNAVAILABLE && attempt + 1 < tries =>
            {
                debug!(upstream = %addr, attempt, "503 from upstream; retrying");
                last = Answer {
                    response: response.map(|b| b.boxed()),
                    flags: "-",
                    detail: detail.clone(),
                    destination_workload: endpoint,
                    upstream: Some(addr),
                };
            }
            Ok(response) => {
                return Answer {
                    response: response.map(|b| b.boxed()),
                    flags: "-",
                    detail,
                    destination_workload: endpoint,
                    upstream: Some(addr),
                };
            }
            Err(error) => {
                debug!(upstream = %addr, attempt, %error, "upstream request failed");
                last = Answer {
                    response: local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    ),
                    flags: "UF",
                    detail: Some(error.to_string()),
                    destination_workload: endpoint,
                    upstream: Some(addr),
                };
            }
        }
    }
    last
}

/// The endpoint for one try.
fn pick(
    wp: &Waypoint,
    tunnel: &Tunnel,
    backend: Option<&(String, u16)>,
) -> Result<Upstream, String> {
    match (&tunnel.destination, backend) {
        (_, Some((service, port))) => {
            let state = wp.mesh.read();
            state
                .service_endpoint(service, *port, &wp.me.load())
                .map_err(|e| e.to_string())
        }
        (Destination::Workload { workload, addr }, None) => Ok(direct(workload, *addr, None)),
        (Destination::Service { key, .. }, None) => Err(format!("service {key}: no backend")),
    }
}
