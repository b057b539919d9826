//! Test harness: the real xDS server wired the way `controlplane run` wires
//! it, in-process on 127.0.0.1: the real CA in a state directory, the real
//! token key and authenticator (`LocalTokens` behind `XdsAuth`), and the
//! real gRPC listener (`serve_tls` with the serving certificate our CA
//! issues). Clients are our dataplane's xDS client (or raw tonic streams for
//! protocol-level checks) over TLS, verifying that certificate against the
//! root the way the dataplane does, and sending node tokens minted the way
//! `controlplane token --node` mints them. Plus a TCP proxy that can cut
//! connections, and resource builders.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshbox_certs::ca::{CaPolicy, CertificateAuthority};
use meshbox_controlplane::auth::Authenticator;
use meshbox_controlplane::auth::local::LocalTokens;
use meshbox_controlplane::run::XdsAuth;
use meshbox_controlplane::serving::{ServingCertificate, ServingNames, serve_plain, serve_tls};
use meshbox_controlplane::xds::{XdsOptions, XdsServer};
use meshbox_dataplane::xds::{ClientOptions, Credentials, XdsClient, XdsState, node};
use meshbox_proto::security::{Action, Authorization, Clause, Match, Rule, Scope};
use meshbox_proto::workload::{Address, NetworkAddress, Service, Workload, address};
use meshbox_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshbox_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Status, Streaming};

pub const ADDRESS: &str = meshbox_proto::ADDRESS_TYPE_URL;
pub const AUTHZ: &str = meshbox_proto::AUTHORIZATION_TYPE_URL;
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The node every test workload runs on, and the default client's node.
pub const NODE: &str = "worker-1";
/// `controlplane token`'s default `--ttl`.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// `controlplane run`'s default `--serving-cert-ttl`.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// A control plane's state directory (CA root and token key), removed on
/// drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshbox-xds-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Harness {
    pub server: XdsServer,
    /// The gRPC port, over TLS (15012 in a deployment).
    pub addr: SocketAddr,
    pub registry: Registry,
    /// The root certificate, as the dataplane is given it (`XDS_ROOT_CA`).
    pub root_pem: String,
    /// The token key, loaded from the state directory the way
    /// `controlplane token` loads it (the server loaded its own copy).
    tokens: LocalTokens,
    /// The gRPC routes, for a plaintext port next to the TLS one.
    app: axum::Router,
    state: StateDir,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with_options(XdsOptions::default()).await
    }

    /// What `controlplane run` does for xDS in standalone mode, with the
    /// xDS options given here.
    pub async fn with_options(options: XdsOptions) -> Harness {
        init_tracing();
        meshbox_certs::install_crypto_provider();
        let state = StateDir::new();
        let ca = Arc::new(
            CertificateAuthority::load_or_create(&state.0, None, CaPolicy::new(TRUST_DOMAIN))
                .unwrap(),
        );
        let auth = Arc::new(Authenticator::Local(
            LocalTokens::load_or_create(&state.0, TRUST_DOMAIN).unwrap(),
        ));
        let mut registry = Registry::default();
        let server = XdsServer::new(Arc::new(XdsAuth(auth)), &mut registry, options);
        let names = ServingNames::new("meshbox-controlplane", "meshbox-system", &[]);
        let serving = ServingCertificate::start(ca.clone(), names, SERVING_TTL).unwrap();
        let tls = serving
            .server_config(ca.roots(), TRUST_DOMAIN, &[b"h2"])
            .unwrap();
        let app = tonic::service::Routes::new(server.service()).into_axum_router();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_tls(listener, tls, app.clone()));
        Harness {
            server,
            addr,
            registry,
            root_pem: std::fs::read_to_string(state.0.join("root-cert.pem")).unwrap(),
            tokens: LocalTokens::load_or_create(&state.0, TRUST_DOMAIN).unwrap(),
            app,
            state,
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state.0
    }

    /// A node token, as `controlplane token --node <node>` prints it.
    pub fn token_for_node(&self, node: &str) -> String {
        self.tokens.mint_for_node(node, TOKEN_TTL).unwrap()
    }

    /// The token of [`NODE`].
    pub fn token(&self) -> String {
        self.token_for_node(NODE)
    }

    /// A TLS endpoint to the gRPC port (through `addr`, e.g. a proxy).
    pub fn endpoint_via(&self, addr: SocketAddr) -> Endpoint {
        tls_endpoint(addr, &self.root_pem)
    }

    /// A TLS endpoint to the gRPC port, for a channel with extra settings.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint_via(self.addr)
    }

    pub fn channel(&self) -> Channel {
        self.endpoint().connect_lazy()
    }

    /// [`client_options`] with the token of [`NODE`].
    pub fn client_options(&self) -> ClientOptions {
        client_options(&self.token())
    }

    /// [`client_options`] for a client on another node than [`NODE`]
    /// (where every test workload runs), with that node's token, so
    /// on-demand tests see only what they ask for and not the workloads an
    /// on-demand client gets for its own node.
    pub fn client_options_on(&self, node_name: &str) -> ClientOptions {
        let mut options = client_options(&self.token_for_node(node_name));
        options.node = node(
            "ztunnel~10.0.0.101~ztunnel-def.istio-system~istio-system.svc.cluster.local",
            [("NODE_NAME", node_name), ("NAMESPACE", "istio-system")],
        );
        options
    }

    /// Our client library, wildcard on both types, as node [`NODE`].
    pub fn client(&self) -> XdsClient {
        XdsClient::start(self.channel(), self.client_options())
    }

    /// A raw stream over TLS as node [`NODE`].
    pub async fn stream(&self) -> RawStream {
        self.stream_as(NODE).await
    }

    /// A raw stream over TLS with `node`'s token.
    pub async fn stream_as(&self, node: &str) -> RawStream {
        RawStream::open(self.channel(), Some(&self.token_for_node(node)))
            .await
            .unwrap()
    }

    /// Also serves the gRPC routes without TLS, the way
    /// `--xds-plaintext-addr` does; returns that port.
    pub async fn serve_plaintext(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_plain(listener, self.app.clone()));
        addr
    }

    /// A token for `node` signed with this control plane's key that expired
    /// ten minutes ago. `LocalTokens` rightly mints none, so the claims are
    /// written here, in its format (iss and aud `meshbox`, sub `node:…`).
    pub fn expired_token_for_node(&self, node: &str) -> String {
        let key = std::fs::read(self.state.0.join("token-signing.key")).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": "meshbox",
            "aud": "meshbox",
            "sub": format!("node:{node}"),
            "iat": now - 3600,
            "exp": now - 600,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&key),
        )
        .unwrap()
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    /// Sum of the samples of `name` whose labels contain `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let series_name = series.split('{').next()?;
                (series_name == name && series.contains(labels))
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    pub fn put_workloads(&self, items: impl IntoIterator<Item = (String, Arc<Address>)>) {
        self.server
            .update(items.into_iter().map(|(n, a)| (n, Some(a))), []);
    }

    pub fn remove_addresses(&self, names: &[&str]) {
        self.server
            .update(names.iter().map(|n| (n.to_string(), None)), []);
    }
}

/// A control plane that shares nothing with the harness: its own CA root and
/// token key, in its own state directory.
pub struct Stranger {
    pub root_pem: String,
    pub tokens: LocalTokens,
    _state: StateDir,
}

impl Stranger {
    pub fn create() -> Stranger {
        let state = StateDir::new();
        CertificateAuthority::load_or_create(&state.0, None, CaPolicy::new(TRUST_DOMAIN)).unwrap();
        Stranger {
            root_pem: std::fs::read_to_string(state.0.join("root-cert.pem")).unwrap(),
            tokens: LocalTokens::load_or_create(&state.0, TRUST_DOMAIN).unwrap(),
            _state: state,
        }
    }
}

/// An `https://` endpoint to `addr` that trusts `root_pem` and checks the
/// server's certificate for the address's host, as the dataplane's
/// control-plane channel does (`XDS_ADDRESS` with `XDS_ROOT_CA`).
pub fn tls_endpoint(addr: SocketAddr, root_pem: &str) -> Endpoint {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root_pem))
                .domain_name(addr.ip().to_string()),
        )
        .unwrap()
}

/// An `http://` channel: only for the plaintext-port test.
pub fn plaintext_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Options for a client of node [`NODE`] sending `token`.
pub fn client_options(token: &str) -> ClientOptions {
    let mut options = ClientOptions::new(
        Credentials::Bearer(token.to_owned()),
        node(
            "ztunnel~10.0.0.100~ztunnel-abc.istio-system~istio-system.svc.cluster.local",
            [("NODE_NAME", NODE), ("NAMESPACE", "istio-system")],
        ),
    );
    options.initial_backoff = Duration::from_millis(20);
    options.max_backoff = Duration::from_millis(200);
    options
}

pub fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

/// A workload; `tag` goes into `canonical_revision` so tests can change
/// content without changing identity.
pub fn workload(name: &str, ip: [u8; 4], tag: &str) -> Arc<Address> {
    Arc::new(Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid(name),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![ip.to_vec()],
            service_account: "default".into(),
            trust_domain: "cluster.local".into(),
            node: NODE.into(),
            canonical_name: name.into(),
            canonical_revision: tag.into(),
            ..Default::default()
        })),
    })
}

/// A workload padded to about `size` bytes.
pub fn big_workload(name: &str, ip: [u8; 4], tag: &str, size: usize) -> Arc<Address> {
    let mut a = (*workload(name, ip, tag)).clone();
    if let Some(address::Type::Workload(w)) = a.r#type.as_mut() {
        w.workload_name = "x".repeat(size);
    }
    Arc::new(a)
}

pub fn service(name: &str, vip: [u8; 4]) -> (String, Arc<Address>) {
    let hostname = format!("{name}.default.svc.cluster.local");
    (
        format!("default/{hostname}"),
        Arc::new(Address {
            r#type: Some(address::Type::Service(Service {
                name: name.into(),
                namespace: "default".into(),
                hostname,
                addresses: vec![NetworkAddress {
                    network: String::new(),
                    address: vip.to_vec(),
                    length: None,
                }],
                ..Default::default()
            })),
        }),
    )
}

pub fn policy(name: &str, port: u32) -> (String, Option<Arc<Authorization>>) {
    (
        format!("default/{name}"),
        Some(Arc::new(Authorization {
            name: name.into(),
            namespace: "default".into(),
            scope: Scope::Namespace as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        destination_ports: vec![port],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        })),
    )
}

/// Waits until `f` holds for the client's state; the deadline only ends a
/// hang (a loaded machine is slower, not wrong).
pub async fn wait_state(client: &XdsClient, what: &str, f: impl Fn(&XdsState) -> bool) {
    let mut rx = client.state();
    let waited = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| f(s))).await;
    match waited {
        Ok(Ok(_)) => {}
        _ => panic!("timed out waiting for: {what}"),
    }
}

/// A copy of `workload` on `node_name`, an endpoint of `services`
/// (`namespace/hostname`, port 80 → 8080).
pub fn placed(workload: &Address, node_name: &str, services: &[&str]) -> Arc<Address> {
    let mut a = workload.clone();
    if let Some(address::Type::Workload(w)) = a.r#type.as_mut() {
        w.node = node_name.into();
        for s in services {
            w.services.insert(
                (*s).to_owned(),
                meshbox_proto::workload::PortList {
                    ports: vec![meshbox_proto::workload::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            );
        }
    }
    Arc::new(a)
}

/// A raw Delta ADS stream for protocol-level tests.
pub struct RawStream {
    pub tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: Streaming<DeltaDiscoveryResponse>,
}

impl RawStream {
    pub async fn open(channel: Channel, token: Option<&str>) -> Result<RawStream, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let response = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await?;
        Ok(RawStream {
            tx,
            rx: response.into_inner(),
        })
    }

    pub async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    /// The next response (panics after 30 s, a hang).
    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(Duration::from_secs(30), self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// The status the stream ends with.
    pub async fn recv_error(&mut self) -> Status {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.rx.message()).await {
                Ok(Err(status)) => return status,
                Ok(Ok(Some(_))) => continue,
                other => panic!("expected an error status, got {other:?}"),
            }
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(message) = tokio::time::timeout(wait, self.rx.message()).await {
            panic!("expected no response, got {message:?}");
        }
    }

    pub async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

pub fn wildcard(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node("raw-test", [("NODE_NAME", NODE)])),
        type_url: type_url.into(),
        ..Default::default()
    }
}

pub fn subscribe(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sorted_names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    names
}

pub fn sorted_removed(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names = r.removed_resources.clone();
    names.sort();
    names
}

/// A TCP proxy whose connections can be cut, to force reconnects.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let list = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, connections }
    }

    /// Cuts every proxied connection.
    pub fn sever(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}
