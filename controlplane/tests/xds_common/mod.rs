//! Test harness: a real xDS server on 127.0.0.1, clients over TCP (our
//! client library, or a raw tonic stream for protocol-level checks), a TCP
//! proxy that can cut connections, and resource builders.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbox_controlplane::xds::{Peer, StreamAuthenticator, XdsOptions, XdsServer};
use meshbox_dataplane::xds::{ClientOptions, Credentials, XdsClient, XdsState, node};
use meshbox_proto::security::{Action, Authorization, Clause, Match, Rule, Scope};
use meshbox_proto::workload::{Address, NetworkAddress, Service, Workload, address};
use meshbox_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshbox_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

pub const ADDRESS: &str = meshbox_proto::ADDRESS_TYPE_URL;
pub const AUTHZ: &str = meshbox_proto::AUTHORIZATION_TYPE_URL;
pub const TOKEN: &str = "node-token-worker-1";

/// Accepts `Bearer node-token-<node>`; anything else is unauthenticated.
pub struct TestAuth;

#[tonic::async_trait]
impl StreamAuthenticator for TestAuth {
    async fn authenticate(&self, authorization: Option<&str>) -> Result<Peer, Status> {
        let header = authorization.ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let node = header
            .strip_prefix("Bearer node-token-")
            .ok_or_else(|| Status::unauthenticated("token not valid here"))?;
        Ok(Peer {
            caller: format!("node:{node}"),
            node: Some(node.to_owned()),
        })
    }
}

pub struct Harness {
    pub server: XdsServer,
    pub addr: SocketAddr,
    pub registry: Registry,
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

    pub async fn with_options(options: XdsOptions) -> Harness {
        init_tracing();
        let mut registry = Registry::default();
        let server = XdsServer::new(Arc::new(TestAuth), &mut registry, options);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Mounted the way the control plane mounts its gRPC services.
        let routes = tonic::service::Routes::new(server.service());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Harness {
            server,
            addr,
            registry,
        }
    }

    pub fn channel(&self) -> Channel {
        channel_to(self.addr)
    }

    /// Our client library, wildcard on both types, as node `worker-1`.
    pub fn client(&self) -> XdsClient {
        XdsClient::start(self.channel(), client_options(TOKEN))
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

pub fn channel_to(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

pub fn client_options(token: &str) -> ClientOptions {
    let mut options = ClientOptions::new(
        Credentials::Bearer(token.to_owned()),
        node(
            "ztunnel~10.0.0.100~ztunnel-abc.istio-system~istio-system.svc.cluster.local",
            [("NODE_NAME", "worker-1"), ("NAMESPACE", "istio-system")],
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
            node: "worker-1".into(),
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

/// A raw Delta ADS stream for protocol-level tests.
/// [`client_options`] for a client on another node than `worker-1` (where
/// every test workload runs), so on-demand tests see only what they ask for
/// and not the workloads an on-demand client gets for its own node.
pub fn client_options_on(node_name: &str) -> ClientOptions {
    let mut options = client_options(&format!("node-token-{node_name}"));
    options.node = node(
        "ztunnel~10.0.0.101~ztunnel-def.istio-system~istio-system.svc.cluster.local",
        [("NODE_NAME", node_name), ("NAMESPACE", "istio-system")],
    );
    options
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
        node: Some(node("raw-test", [("NODE_NAME", "worker-1")])),
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
