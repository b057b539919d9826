//! Sockets as the proxy needs them inside a captured network namespace:
//! every socket carries the packet mark (so the capture rules let the
//! proxy's own traffic through), listeners accept TPROXY'd connections
//! (`IP_TRANSPARENT`), upstream connections can keep the original source
//! address, and redirected connections give up their original destination.
//!
//! What the process may do is probed once at startup: without
//! `CAP_NET_ADMIN` (a developer's shell, unit tests) marking and transparent
//! sockets are off, with a warning, and everything else still works.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::netns::Netns;

/// Opens sockets with the process-wide options, in the proxy's own network
/// namespace or in a pod's (in-pod mode: the socket is created inside the
/// pod's namespace and stays there).
#[derive(Clone, Debug)]
pub struct Sockets {
    mark: Option<u32>,
    transparent: bool,
    netns: Option<Arc<Netns>>,
}

impl Sockets {
    /// Checks which of `mark` and transparent sockets this process may use.
    pub fn probe(mark: Option<u32>) -> Self {
        let probe = TcpSocket::new_v4();
        let (mark, transparent) = match probe {
            Ok(sock) => {
                let r = SockRef::from(&sock);
                let mark = mark.filter(|m| match r.set_mark(*m) {
                    Ok(()) => true,
                    Err(error) => {
                        warn!(%error, mark = m, "cannot mark sockets (needs CAP_NET_ADMIN); \
                              fine outside a captured netns, but inside one the proxy's own \
                              traffic would be captured again");
                        false
                    }
                });
                let transparent = r.set_ip_transparent_v4(true).is_ok();
                if !transparent {
                    debug!(
                        "transparent sockets unavailable; original source addresses are kept only when local"
                    );
                }
                (mark, transparent)
            }
            Err(_) => (None, false),
        };
        Self {
            mark,
            transparent,
            netns: None,
        }
    }

    /// Sockets with no special options (tests).
    pub fn plain() -> Self {
        Self {
            mark: None,
            transparent: false,
            netns: None,
        }
    }

    /// The same options, with sockets created inside `netns`.
    pub fn in_netns(&self, netns: Arc<Netns>) -> Self {
        Self {
            netns: Some(netns),
            ..self.clone()
        }
    }

    pub fn mark(&self) -> Option<u32> {
        self.mark
    }

    pub fn transparent(&self) -> bool {
        self.transparent
    }

    /// A listener on `addr`, accepting TPROXY'd connections when allowed.
    /// `[::]` falls back to `0.0.0.0` where IPv6 is off.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        match self.listen_exact(addr) {
            Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
                debug!(%addr, error = %e, "IPv6 listener failed; using IPv4 only");
                self.listen_exact(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
            }
            other => other,
        }
    }

    fn listen_exact(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let sock = self.new_socket(addr)?;
        sock.set_reuseaddr(true)?;
        let r = SockRef::from(&sock);
        if let Some(mark) = self.mark {
            r.set_mark(mark)?;
        }
        if self.transparent {
            set_transparent(&r, addr)?;
        }
        sock.bind(addr)?;
        sock.listen(1024)
    }

    /// Connects to `dst`, from `source` when given: bound as is when the
    /// address is local, transparently when allowed, else from whatever
    /// address the kernel picks.
    pub async fn connect(&self, dst: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let sock = self.new_socket(dst)?;
        let r = SockRef::from(&sock);
        if let Some(mark) = self.mark {
            r.set_mark(mark)?;
        }
        sock.set_nodelay(true)?;
        if let Some(ip) = source.map(|ip| ip.to_canonical())
            && ip.is_ipv4() == dst.ip().to_canonical().is_ipv4()
        {
            let bind = SocketAddr::new(family_of(dst, ip), 0);
            if sock.bind(bind).is_err() && self.transparent {
                set_transparent(&r, dst)?;
                if let Err(error) = sock.bind(bind) {
                    debug!(%error, source = %ip, "cannot keep the source address");
                }
            }
        }
        sock.connect(dst).await
    }
}

impl Sockets {
    fn new_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        let Some(netns) = &self.netns else {
            return if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            };
        };
        let socket = netns.run(|| Socket::new(Domain::for_address(addr), Type::STREAM, None))?;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        Ok(TcpSocket::from_std_stream(socket.into()))
    }
}

fn set_transparent(r: &SockRef<'_>, addr: SocketAddr) -> io::Result<()> {
    if addr.is_ipv4() {
        r.set_ip_transparent_v4(true)
    } else {
        r.set_ip_transparent_v6(true)
    }
}

/// `ip` in the address family of `dst`'s socket (IPv4-mapped on an IPv6
/// socket).
fn family_of(dst: SocketAddr, ip: IpAddr) -> IpAddr {
    match (dst, ip) {
        (SocketAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => ip,
    }
}

/// The destination a redirected (`REDIRECT`ed) connection was sent to.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let r = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.ip().to_canonical().is_ipv4() {
        r.original_dst_v4()?
    } else {
        r.original_dst_v6()?
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// Folds IPv4-mapped IPv6 addresses to IPv4, as the mesh state keys them.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_keeps_a_local_source_address() {
        let listener = Sockets::plain()
            .listen("127.0.0.1:0".parse().unwrap())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.7".parse().unwrap();
        let sockets = Sockets::plain();
        let (client, accepted) =
            tokio::join!(sockets.connect(addr, Some(source)), listener.accept());
        client.unwrap();
        assert_eq!(accepted.unwrap().1.ip(), source);
    }

    #[tokio::test]
    async fn an_unusable_source_falls_back_to_any() {
        let listener = Sockets::plain()
            .listen("127.0.0.1:0".parse().unwrap())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        // TEST-NET-3, never assigned here.
        let source: IpAddr = "203.0.113.9".parse().unwrap();
        let sockets = Sockets::plain();
        let (client, accepted) =
            tokio::join!(sockets.connect(addr, Some(source)), listener.accept());
        // The connection still goes out, from the address the kernel picks
        // for loopback, not the unusable one asked for.
        let client = client.expect("falls back instead of failing");
        let (_, peer) = accepted.unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(client.local_addr().unwrap(), peer);
    }

    #[test]
    fn mapped_addresses_fold_to_ipv4() {
        let a: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(a), "10.0.0.1:80".parse::<SocketAddr>().unwrap());
    }
}
