//! The control plane's TLS listeners (15012 gRPC, 15014 REST) and their
//! serving certificate, issued by our own CA and renewed before it expires
//! without a restart.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use meshbox_certs::{CertificateAuthority, SpiffeId};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

use crate::limits::{ConnectionLimits, PeerConnections, PeerSlot};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The names the serving certificate covers.
#[derive(Debug, Clone)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl ServingNames {
    /// `localhost`, loopback IPs, the in-cluster Service names, plus `extra`
    /// (each a DNS name or an IP).
    pub fn new(service: &str, namespace: &str, extra: &[String]) -> Self {
        let mut dns = vec![
            "localhost".to_owned(),
            service.to_owned(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        let mut ips: Vec<IpAddr> =
            vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        for name in extra {
            match name.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) if !dns.contains(name) => dns.push(name.clone()),
                Err(_) => {}
            }
        }
        Self { dns, ips }
    }
}

/// The current serving certificate, swapped atomically on renewal.
pub struct ServingCertificate {
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCertificate")
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServingCertificate {
    /// Issues the first certificate and keeps renewing it at half its
    /// lifetime, for as long as the returned handle lives.
    pub fn start(
        ca: Arc<CertificateAuthority>,
        names: ServingNames,
        ttl: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let (key, lifetime) = issue(&ca, &names, ttl)?;
        let this = Arc::new(Self {
            current: ArcSwap::from_pointee(key),
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            let mut wait = lifetime / 2;
            loop {
                tokio::time::sleep(wait).await;
                let Some(this) = weak.upgrade() else { return };
                match issue(&ca, &names, ttl) {
                    Ok((key, lifetime)) => {
                        this.current.store(Arc::new(key));
                        tracing::info!(valid_for = ?lifetime, "renewed the serving certificate");
                        wait = lifetime / 2;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the serving certificate failed; retrying");
                        wait = Duration::from_secs(10);
                    }
                }
            }
        });
        Ok(this)
    }

    /// A TLS server config presenting this certificate. `client_roots`
    /// allows (never requires) clients to present a workload certificate.
    pub fn server_config(
        self: &Arc<Self>,
        client_roots: &[rustls::pki_types::CertificateDer<'static>],
        trust_domain: &str,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let verifier =
            meshbox_certs::tls::SpiffeClientVerifier::new(client_roots, trust_domain, true)?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(meshbox_certs::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

fn issue(
    ca: &CertificateAuthority,
    names: &ServingNames,
    ttl: Duration,
) -> anyhow::Result<(CertifiedKey, Duration)> {
    let (issued, key_pem) = ca.issue_serving_certificate(&names.dns, &names.ips, ttl)?;
    let key = meshbox_certs::pem::parse_private_key(key_pem.as_bytes())?;
    let signing = meshbox_certs::tls::provider()
        .key_provider
        .load_private_key(key)?;
    let lifetime = (issued.not_after - time::OffsetDateTime::now_utc())
        .try_into()
        .unwrap_or(Duration::from_secs(60));
    Ok((CertifiedKey::new(issued.chain_der, signing), lifetime))
}

/// The SPIFFE identity of a client that presented a workload certificate,
/// added to every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity(pub Option<SpiffeId>);

/// Serves `app` (HTTP/1.1 and HTTP/2, gRPC included) over TLS on `listener`
/// until the process ends, with no cap on connections per peer (see
/// [`serve_tls_with`]).
pub async fn serve_tls(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: axum::Router) {
    serve_tls_with(listener, tls, app, ConnectionLimits::unlimited("tls")).await
}

/// Serves `app` over TLS on `listener` until the process ends. A connection
/// from a peer that already holds `limits.max_per_peer` is closed at accept,
/// before the handshake. Handshakes run in their own tasks, so a slow or
/// silent client never holds up the others.
pub async fn serve_tls_with(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    limits: ConnectionLimits,
) {
    let acceptor = TlsAcceptor::from(tls);
    let peers = PeerConnections::new(limits.max_per_peer);
    let header_read_timeout = limits.header_read_timeout;
    loop {
        let Some((tcp, peer, slot)) = accept(&listener, &peers, &limits).await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = PeerIdentity(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(meshbox_certs::tls::spiffe_id_of),
            );
            serve_connection(stream, peer, local, identity, app, header_read_timeout).await;
        });
    }
}

/// Serves `app` without TLS (the development-only plaintext port), with no
/// cap on connections per peer.
pub async fn serve_plain(listener: TcpListener, app: axum::Router) {
    serve_plain_with(listener, app, ConnectionLimits::unlimited("plaintext")).await
}

/// Serves `app` without TLS, with `limits` as in [`serve_tls_with`].
pub async fn serve_plain_with(listener: TcpListener, app: axum::Router, limits: ConnectionLimits) {
    let peers = PeerConnections::new(limits.max_per_peer);
    loop {
        let Some((tcp, peer, slot)) = accept(&listener, &peers, &limits).await else {
            continue;
        };
        let app = app.clone();
        let local = tcp.local_addr().ok();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(
                tcp,
                peer,
                local,
                PeerIdentity::default(),
                app,
                header_read_timeout,
            )
            .await;
        });
    }
}

/// Accepts one connection and takes its peer's slot. `None` when accepting
/// failed (after a short pause, so a full file table does not spin) or the
/// peer is over its cap (the connection is closed right away, unread).
async fn accept(
    listener: &TcpListener,
    peers: &Arc<PeerConnections>,
    limits: &ConnectionLimits,
) -> Option<(TcpStream, SocketAddr, PeerSlot)> {
    let (tcp, peer) = match listener.accept().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(listener = limits.listener, error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return None;
        }
    };
    match peers.try_acquire(peer.ip()) {
        Some(slot) => Some((tcp, peer, slot)),
        None => {
            limits
                .metrics
                .connection_refused(limits.listener, "per_peer_limit");
            tracing::debug!(
                listener = limits.listener,
                %peer,
                max = limits.max_per_peer,
                "connection refused: the peer holds the most connections allowed"
            );
            None
        }
    }
}

/// Serves one connection. Every request carries the peer's address twice:
/// as axum's `ConnectInfo` (axum extractors) and as tonic's `TcpConnectInfo`,
/// which is what `tonic::Request::remote_addr()` reads (gRPC services).
/// tonic only fills that in itself when its own server accepts the
/// connection, which ours (TLS in front, one port for both) does not.
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    identity: PeerIdentity,
    app: axum::Router,
    header_read_timeout: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`; show
    // them as the IPv4 addresses they are.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let connect_info = TcpConnectInfo {
        local_addr: local,
        remote_addr: Some(peer),
    };
    let service = app.map_request(move |req: http::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(identity.clone());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        req.extensions_mut().insert(connect_info.clone());
        req
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
