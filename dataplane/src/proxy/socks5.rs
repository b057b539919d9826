//! A SOCKS5 (RFC 1928) outbound listener for traffic that is not captured:
//! local development, tests, and trying the mesh from a shell
//! (`curl --socks5-hostname 127.0.0.1:15080 http://echo.default.svc.cluster.local:8080`).
//! Only CONNECT without authentication; a domain name is resolved against
//! the mesh's service hostnames, nothing else. Off unless `--socks5-addr`
//! is given, since it lets any local process speak as the workload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::ProxyContext;
use super::outbound::{Refusal, establish};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;

#[derive(Clone, Copy)]
enum Reply {
    Succeeded = 0,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

pub async fn handle(ctx: Arc<ProxyContext>, mut stream: TcpStream, peer: SocketAddr) {
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(Ok(target))) => target,
        Ok(Ok(Err(reply))) => {
            let _ = send_reply(&mut stream, reply).await;
            return;
        }
        Ok(Err(error)) => {
            debug!(src.addr = %peer, %error, "bad SOCKS5 handshake");
            return;
        }
        Err(_) => return,
    };
    let target = match target {
        Target::Addr(addr) => addr,
        Target::Name(name, port) => match resolve(&ctx, &name) {
            Some(ip) => SocketAddr::new(ip, port),
            None => {
                debug!(src.addr = %peer, %name, "SOCKS5 name is no mesh service hostname");
                let _ = send_reply(&mut stream, Reply::HostUnreachable).await;
                return;
            }
        },
    };
    let upstream = match Box::pin(establish(&ctx, peer, target)).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            let reply = match refusal {
                Refusal::NotAllowed => Reply::NotAllowed,
                Refusal::Unreachable => Reply::ConnectionRefused,
            };
            let _ = send_reply(&mut stream, reply).await;
            return;
        }
    };
    if send_reply(&mut stream, Reply::Succeeded).await.is_err() {
        upstream.record.finish(0, 0, Some("client went away"));
        return;
    }
    upstream.relay(&mut stream).await;
}

/// A service hostname's VIP in the proxy's network.
fn resolve(ctx: &ProxyContext, name: &str) -> Option<IpAddr> {
    let state = ctx.mesh.read();
    let network = ctx.mesh.network();
    state
        .services()
        .filter(|s| s.hostname == name)
        .flat_map(|s| s.vips.iter())
        .find(|v| v.network == network)
        .map(|v| v.ip)
}

/// Reads the greeting and the request; `Ok(Err(reply))` is a well-formed
/// request we refuse with that reply.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Result<Target, Reply>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(std::io::Error::other("not SOCKS5"));
    }
    let mut methods = vec![0u8; head[1] as usize];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        stream.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(std::io::Error::other("client offers no usable method"));
    }
    stream.write_all(&[VERSION, NO_AUTH]).await?;

    let mut req = [0u8; 4];
    stream.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(std::io::Error::other("not SOCKS5"));
    }
    let target = match req[3] {
        1 => {
            let mut ip = [0u8; 4];
            stream.read_exact(&mut ip).await?;
            Target::Addr(SocketAddr::new(
                Ipv4Addr::from(ip).into(),
                stream.read_u16().await?,
            ))
        }
        4 => {
            let mut ip = [0u8; 16];
            stream.read_exact(&mut ip).await?;
            let ip = IpAddr::V6(Ipv6Addr::from(ip)).to_canonical();
            Target::Addr(SocketAddr::new(ip, stream.read_u16().await?))
        }
        3 => {
            let len = stream.read_u8().await? as usize;
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await?;
            let port = stream.read_u16().await?;
            match String::from_utf8(name) {
                Ok(name) => Target::Name(name, port),
                Err(_) => return Ok(Err(Reply::AddressTypeNotSupported)),
            }
        }
        _ => return Ok(Err(Reply::AddressTypeNotSupported)),
    };
    if req[1] != CONNECT {
        return Ok(Err(Reply::CommandNotSupported));
    }
    Ok(Ok(target))
}

async fn send_reply(stream: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    stream
        .write_all(&[VERSION, reply as u8, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
}
