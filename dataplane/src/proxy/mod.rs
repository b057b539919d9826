//! The proxy: the listeners of one set of local workloads and what happens
//! to each connection.
//!
//! - [`outbound`]: 15001, captured outbound TCP (and an optional SOCKS5
//!   listener for uncaptured development use) → route → HBONE, plain TCP to
//!   a workload outside HBONE, or passthrough out of the mesh;
//! - [`inbound`]: 15008, HBONE (mutual TLS + HTTP/2 CONNECT) → authorize →
//!   the local application;
//! - [`plaintext`]: 15006, captured inbound plaintext → authorize (no
//!   identity) → the local application;
//! - [`pool`]: pooled HBONE client connections;
//! - [`tunnel`]: one HBONE CONNECT stream on h2, and the HTTP/2 settings
//!   both ends use;
//! - [`relay`]: moving bytes between a connection's two sides, with no
//!   memory held while they are idle;
//! - [`socket`]: marks, transparent sockets, original destinations.
//!
//! Every path fails closed: no certificate, no state, an unknown source or
//! a policy error refuses the connection; nothing is ever forwarded around
//! the mesh in plaintext.

pub mod connect_head;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod relay;
pub mod socket;
mod socks5;
pub mod tunnel;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshbox_certs::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Scope;
use crate::identity::{CertificateManager, WorkloadCertificate};
use crate::mesh::Mesh;
use crate::state::{ProxyState, Workload};
use crate::telemetry::{Direction, RefusalReason, Telemetry};
use pool::Pool;
use socket::Sockets;

/// How long to wait for a TCP connection (to an application, or out of the
/// mesh) to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for its workload's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(10);

/// What every connection handler needs.
pub struct ProxyContext {
    pub mesh: Arc<Mesh>,
    pub certs: Arc<CertificateManager>,
    pub scope: Scope,
    pub cluster_id: String,
    pub trust_domain: String,
    pub sockets: Sockets,
    /// Connect to applications from the client's address (see
    /// `ENABLE_ORIG_SRC`).
    pub original_source: bool,
    pub pool: Pool,
    pub telemetry: Telemetry,
    /// Set on SIGTERM: listeners stop accepting, HBONE servers send GOAWAY.
    pub shutdown: CancellationToken,
    /// Every connection task, so a drain can wait for them.
    pub tasks: TaskTracker,
    /// The proxy's own ports: a connection aimed at one of them would loop.
    pub(crate) own_ports: Vec<u16>,
    pub(crate) server_configs: inbound::ServerConfigs,
    /// In-pod capture: the uid of the one pod whose network namespace these
    /// listeners are in. Every connection they accept is that pod's: its
    /// identity comes from the namespace, never from an address, which a
    /// pod able to add one to its interface could claim. `None`: listeners
    /// in the dataplane's own namespace (dedicated mode, or node mode with
    /// `INPOD_ENABLED=false`).
    pub(crate) pod_uid: Option<String>,
}

impl ProxyContext {
    /// A context for one pod's listeners (in-pod mode): sockets in the
    /// pod's namespace, a pool of its own (its connections leave from that
    /// namespace), bound to that pod (`pod_uid`), stopped with the pod or
    /// with the whole proxy.
    pub fn for_pod(&self, sockets: Sockets, pod_uid: &str) -> Self {
        Self {
            mesh: self.mesh.clone(),
            certs: self.certs.clone(),
            scope: self.scope.clone(),
            cluster_id: self.cluster_id.clone(),
            trust_domain: self.trust_domain.clone(),
            pool: Pool::new(self.pool.settings(), sockets.clone()),
            sockets,
            original_source: self.original_source,
            telemetry: self.telemetry.clone(),
            shutdown: self.shutdown.child_token(),
            tasks: self.tasks.clone(),
            own_ports: self.own_ports.clone(),
            server_configs: Default::default(),
            pod_uid: Some(pod_uid.to_owned()),
        }
    }

    /// Whether this proxy serves `w`: on this node (node mode), or the one
    /// workload it is dedicated to.
    pub fn is_local(&self, w: &Workload) -> bool {
        match &self.scope {
            Scope::Node { node, .. } => w.node == *node,
            Scope::Workload {
                namespace, name, ..
            } => w.namespace == *namespace && w.name == *name,
        }
    }

    /// The pod these listeners are bound to (in-pod capture), if it holds
    /// `ip`: a connection from or to any other address is not the pod's.
    fn bound_pod(&self, state: &ProxyState, uid: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        let ip = ip.to_canonical();
        state
            .workload_by_uid(uid)
            .filter(|w| self.is_local(w) && w.addresses.iter().any(|a| a.to_canonical() == ip))
            .cloned()
    }

    /// The local workload reached at `ip`: under in-pod capture, only the
    /// pod whose namespace the connection arrived in.
    pub fn local_workload(&self, state: &ProxyState, ip: IpAddr) -> Option<Arc<Workload>> {
        if let Some(uid) = &self.pod_uid {
            return self.bound_pod(state, uid, ip);
        }
        let network = self.mesh.network();
        match &self.scope {
            Scope::Node { node, .. } => state.local_workload(network, ip, node).cloned(),
            Scope::Workload { .. } => state
                .workload_by_ip(network, ip)
                .filter(|w| self.is_local(w))
                .cloned(),
        }
    }

    /// The workload an outbound connection from `peer` comes from: under
    /// in-pod capture the pod whose namespace it was opened in, and only
    /// from one of that pod's own addresses.
    pub fn outbound_source(&self, state: &ProxyState, peer: IpAddr) -> Option<Arc<Workload>> {
        if let Some(uid) = &self.pod_uid {
            return self.bound_pod(state, uid, peer);
        }
        match &self.scope {
            Scope::Node { .. } => self.local_workload(state, peer),
            Scope::Workload {
                namespace, name, ..
            } => {
                let uid = format!("{}//Pod/{namespace}/{name}", self.cluster_id);
                state
                    .workload_by_uid(&uid)
                    .or_else(|| state.workloads().find(|w| self.is_local(w)))
                    .cloned()
            }
        }
    }

    /// The identity whose certificate an inbound connection to `local_ip`
    /// is served with.
    pub fn served_identity(&self, state: &ProxyState, local_ip: IpAddr) -> Option<SpiffeId> {
        match &self.scope {
            Scope::Node { .. } => self
                .local_workload(state, local_ip)
                .map(|w| w.identity.clone()),
            Scope::Workload { identity, .. } => Some(identity.clone()),
        }
    }

    /// Identities of the workloads this proxy serves now: in node mode the
    /// enrolled (HBONE) pods on the node; a pod outside the mesh gets no
    /// certificate.
    pub fn local_identities(&self, state: &ProxyState) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = match &self.scope {
            Scope::Node { .. } => state
                .workloads()
                .filter(|w| self.is_local(w) && w.protocol == crate::state::Protocol::Hbone)
                .map(|w| w.identity.clone())
                .collect(),
            Scope::Workload { identity, .. } => vec![identity.clone()],
        };
        ids.sort();
        ids.dedup();
        ids
    }

    /// Connects to a local application on behalf of `source`, from the
    /// source's address when configured to and the kernel allows.
    async fn connect_app(&self, dst: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
        self.connect(dst, self.original_source.then_some(source))
            .await
    }

    /// A TCP connection with this proxy's socket options, bounded in time.
    async fn connect(&self, dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.sockets.connect(dst, source)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {dst} timed out"),
            )),
        }
    }

    /// The certificate of a local identity, waiting a bounded time for the
    /// first one. `None` (logged, counted as refused) means the connection
    /// must be refused.
    async fn certificate(
        &self,
        identity: &SpiffeId,
        direction: Direction,
    ) -> Option<Arc<WorkloadCertificate>> {
        match tokio::time::timeout(CERT_WAIT, self.certs.get(identity)).await {
            Ok(Ok(cert)) => return Some(cert),
            Ok(Err(error)) => warn!(%identity, %error, "no certificate; refusing"),
            Err(_) => warn!(%identity, "timed out waiting for a certificate; refusing"),
        }
        self.telemetry
            .refused(direction, RefusalReason::NoCertificate);
        None
    }
}

/// The bound listeners of one proxy.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub plaintext: TcpListener,
    pub socks5: Option<TcpListener>,
}

/// Addresses the listeners ended up on (port 0 resolved).
#[derive(Clone, Copy, Debug)]
pub struct BoundAddrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub plaintext: SocketAddr,
    pub socks5: Option<SocketAddr>,
}

impl Listeners {
    pub fn bind(
        sockets: &Sockets,
        outbound: SocketAddr,
        inbound: SocketAddr,
        plaintext: SocketAddr,
        socks5: Option<SocketAddr>,
    ) -> io::Result<Self> {
        let bind = |addr: SocketAddr, what: &str| {
            sockets.listen(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("binding the {what} listener on {addr}: {e}"),
                )
            })
        };
        Ok(Self {
            outbound: bind(outbound, "outbound")?,
            inbound: bind(inbound, "inbound HBONE")?,
            plaintext: bind(plaintext, "inbound plaintext")?,
            socks5: socks5.map(|a| bind(a, "SOCKS5")).transpose()?,
        })
    }

    pub fn addrs(&self) -> io::Result<BoundAddrs> {
        Ok(BoundAddrs {
            outbound: self.outbound.local_addr()?,
            inbound: self.inbound.local_addr()?,
            plaintext: self.plaintext.local_addr()?,
            socks5: self.socks5.as_ref().map(|l| l.local_addr()).transpose()?,
        })
    }

    pub fn ports(&self) -> Vec<u16> {
        self.addrs()
            .map(|a| {
                [
                    Some(a.outbound),
                    Some(a.inbound),
                    Some(a.plaintext),
                    a.socks5,
                ]
                .into_iter()
                .flatten()
                .map(|a| a.port())
                .collect()
            })
            .unwrap_or_default()
    }

    /// Serves until `ctx.shutdown`; connection tasks are tracked in
    /// `ctx.tasks`.
    pub fn serve(self, ctx: Arc<ProxyContext>) {
        if let Ok(addrs) = self.addrs() {
            info!(
                outbound = %addrs.outbound,
                inbound = %addrs.inbound,
                inbound_plaintext = %addrs.plaintext,
                socks5 = addrs.socks5.map(|a| a.to_string()),
                "proxy listening"
            );
        }
        let local = self.outbound.local_addr().ok();
        ctx.tasks.spawn(accept_loop(
            self.outbound,
            ctx.clone(),
            move |ctx, s, peer| outbound::handle_captured(ctx, s, peer, local),
        ));
        ctx.tasks
            .spawn(accept_loop(self.inbound, ctx.clone(), inbound::handle));
        let local = self.plaintext.local_addr().ok();
        ctx.tasks.spawn(accept_loop(
            self.plaintext,
            ctx.clone(),
            move |ctx, s, peer| plaintext::handle(ctx, s, peer, local),
        ));
        if let Some(socks) = self.socks5 {
            ctx.tasks
                .spawn(accept_loop(socks, ctx.clone(), socks5::handle));
        }
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, ctx: Arc<ProxyContext>, handle: F)
where
    F: Fn(Arc<ProxyContext>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    ctx.tasks.spawn(handle(ctx.clone(), stream, socket::canonical(peer)));
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// An error as a short string for access logs.
pub(crate) fn error_text(error: &Option<io::Error>) -> Option<String> {
    error.as_ref().map(|e| e.to_string())
}
