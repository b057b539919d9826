//! The HBONE connection pool: many CONNECT streams share one mutual-TLS
//! HTTP/2 connection per (source identity, expected destination identities,
//! destination address), as design.md fixes.
//!
//! A connection takes at most `max_streams` streams; past that a second one
//! is dialed. Dialing is single-flight per key, so a burst of new
//! connections to one destination makes one TLS handshake, not a hundred.
//! Connections idle for `idle_timeout` are closed, as are those whose client
//! certificate has expired (the peer would refuse new streams on them anyway
//! once it re-checks, and a rotated certificate should take over).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use meshbox_certs::SpiffeId;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::socket::Sockets;
use super::tunnel::{self, HboneStream, ReadAhead};
use crate::identity::WorkloadCertificate;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    /// Sorted, so the same set is the same key.
    pub expected: Vec<SpiffeId>,
    pub addr: SocketAddr,
}

impl PoolKey {
    pub fn new(source: SpiffeId, mut expected: Vec<SpiffeId>, addr: SocketAddr) -> Self {
        expected.sort();
        expected.dedup();
        Self {
            source,
            expected,
            addr,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS with {addr}: {error}")]
    Tls {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("building the TLS client: {0}")]
    Config(#[from] rustls::Error),
    #[error("HTTP/2 with {addr}: {error}")]
    Http2 { addr: SocketAddr, error: h2::Error },
    #[error("the peer answered CONNECT with {0}")]
    Refused(StatusCode),
    #[error("timed out connecting to {0}")]
    Timeout(SocketAddr),
}

#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub max_streams: usize,
    pub idle_timeout: Duration,
}

struct Pooled {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    /// Set when the connection's task ended (peer gone, GOAWAY done,
    /// keepalive failed).
    closed: Arc<AtomicBool>,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    cert_not_after: SystemTime,
}

impl Pooled {
    fn usable(&self, max_streams: usize) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.streams.load(Ordering::Acquire) < max_streams
            && SystemTime::now() < self.cert_not_after
    }
}

/// Holds a stream's place on its connection; dropping it frees the place.
pub struct StreamGuard {
    conn: Arc<Pooled>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock() = Instant::now();
        }
    }
}

/// An open HBONE tunnel: bytes written go to the far application.
pub struct Tunnel {
    pub io: HboneStream,
    pub guard: StreamGuard,
    /// Whether this stream opened a new connection (for debugging reuse).
    pub new_connection: bool,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PoolSettings,
    sockets: Sockets,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
}

/// One row of `/config_dump`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolEntry {
    pub source: String,
    pub destination: String,
    pub expected_identities: Vec<String>,
    pub connections: usize,
    pub streams: usize,
}

impl Pool {
    /// A pool; its idle reaper runs until the pool is dropped.
    pub fn new(settings: PoolSettings, sockets: Sockets) -> Self {
        let pool = Self {
            inner: Arc::new(Inner {
                settings,
                sockets,
                conns: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let period = (settings.idle_timeout / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.reap();
            }
        });
        pool
    }

    /// Opens a CONNECT stream to `authority` through a pooled connection for
    /// `key`, dialing one (from `source_ip`, with `cert`) if needed.
    pub async fn connect(
        &self,
        key: &PoolKey,
        cert: &WorkloadCertificate,
        source_ip: Option<IpAddr>,
        authority: SocketAddr,
    ) -> Result<Tunnel, PoolError> {
        let mut new_connection = false;
        let (sender, guard) = match self.inner.checkout(key) {
            Some(found) => found,
            None => {
                let lock = self.inner.dial_lock(key);
                let _dialing = lock.lock().await;
                match self.inner.checkout(key) {
                    Some(found) => found,
                    None => {
                        new_connection = true;
                        let conn = tokio::time::timeout(
                            DIAL_TIMEOUT,
                            self.inner.dial(key, cert, source_ip),
                        )
                        .await
                        .map_err(|_| PoolError::Timeout(key.addr))??;
                        self.inner.insert(key, conn)
                    }
                }
            }
        };
        let io = open_stream(sender, authority, key.addr).await?;
        Ok(Tunnel {
            io,
            guard,
            new_connection,
        })
    }

    /// Connections and streams per key.
    pub fn entries(&self) -> Vec<PoolEntry> {
        let conns = self.inner.conns.lock();
        let mut out: Vec<PoolEntry> = conns
            .iter()
            .map(|(key, list)| PoolEntry {
                source: key.source.to_string(),
                destination: key.addr.to_string(),
                expected_identities: key.expected.iter().map(|i| i.to_string()).collect(),
                connections: list.len(),
                streams: list.iter().map(|c| c.streams.load(Ordering::Relaxed)).sum(),
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        out
    }

    pub fn settings(&self) -> PoolSettings {
        self.inner.settings
    }

    /// Open connections in the pool.
    pub fn connections(&self) -> usize {
        let conns = self.inner.conns.lock();
        conns.values().map(Vec::len).sum()
    }
}

async fn open_stream(
    sender: h2::client::SendRequest<Bytes>,
    authority: SocketAddr,
    addr: SocketAddr,
) -> Result<HboneStream, PoolError> {
    let http2 = |error| PoolError::Http2 { addr, error };
    let mut sender = sender.ready().await.map_err(http2)?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .map_err(|_| PoolError::Refused(StatusCode::BAD_REQUEST))?;
    let (response, send) = sender.send_request(request, false).map_err(http2)?;
    let response = response.await.map_err(http2)?;
    if response.status() != StatusCode::OK {
        return Err(PoolError::Refused(response.status()));
    }
    Ok(HboneStream::new(send, response.into_body()))
}

impl Inner {
    fn checkout(&self, key: &PoolKey) -> Option<(h2::client::SendRequest<Bytes>, StreamGuard)> {
        let conns = self.conns.lock();
        let conn = conns
            .get(key)?
            .iter()
            .find(|c| c.usable(self.settings.max_streams))?
            .clone();
        conn.streams.fetch_add(1, Ordering::AcqRel);
        Some((conn.sender.clone(), StreamGuard { conn }))
    }

    fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        self.dialing.lock().entry(key.clone()).or_default().clone()
    }

    fn insert(
        &self,
        key: &PoolKey,
        conn: Arc<Pooled>,
    ) -> (h2::client::SendRequest<Bytes>, StreamGuard) {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        let sender = conn.sender.clone();
        let mut conns = self.conns.lock();
        conns.entry(key.clone()).or_default().push(conn.clone());
        (sender, StreamGuard { conn })
    }

    async fn dial(
        &self,
        key: &PoolKey,
        cert: &WorkloadCertificate,
        source_ip: Option<IpAddr>,
    ) -> Result<Arc<Pooled>, PoolError> {
        let addr = key.addr;
        let config = meshbox_certs::tls::workload_client_config(
            cert.chain.clone(),
            cert.private_key(),
            &cert.roots,
            key.expected.clone(),
        )?;
        let tcp = self
            .sockets
            .connect(addr, source_ip)
            .await
            .map_err(|error| PoolError::Connect { addr, error })?;
        // An IP server name: rustls sends no SNI, as HBONE peers expect.
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(addr.ip().into()), ReadAhead::new(tcp))
            .await
            .map_err(|error| PoolError::Tls { addr, error })?;
        let (sender, mut connection) = tunnel::client()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|error| PoolError::Http2 { addr, error })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let closed_by_task = closed.clone();
        tokio::spawn(async move {
            let keepalive = tunnel::keepalive(connection.ping_pong());
            tokio::select! {
                result = &mut connection => if let Err(error) = result {
                    debug!(%addr, id, %error, "pooled HBONE connection ended");
                },
                () = keepalive => debug!(%addr, id, "pooled HBONE connection stopped answering PINGs; closing"),
            }
            closed_by_task.store(true, Ordering::Release);
        });
        debug!(%addr, id, source = %key.source, "opened HBONE connection");
        Ok(Arc::new(Pooled {
            id,
            sender,
            closed,
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            cert_not_after: cert.not_after,
        }))
    }

    /// Drops closed connections and those idle too long.
    fn reap(&self) {
        let idle_timeout = self.settings.idle_timeout;
        let mut conns = self.conns.lock();
        conns.retain(|key, list| {
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && c.idle_since
                        .lock()
                        .elapsed()
                        >= idle_timeout;
                let expired = SystemTime::now() >= c.cert_not_after
                    && c.streams.load(Ordering::Acquire) == 0;
                let keep = !c.closed.load(Ordering::Acquire) && !idle && !expired;
                if !keep {
                    debug!(addr = %key.addr, id = c.id, idle, expired, "closing pooled HBONE connection");
                }
                keep
            });
            !list.is_empty()
        });
        drop(conns);
        let mut dialing = self.dialing.lock();
        dialing.retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}
