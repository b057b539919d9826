//! The head of an inbound HBONE request: what it must say before anything
//! about it is looked up. Pure, so the fuzz target in `fuzz/` and the
//! corpus replay test can run it on any input.

use std::net::SocketAddr;

use http::{Method, Request};

use super::socket::canonical;

/// Why a request head is refused; each is answered with its own status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectHeadError {
    #[error("the request is not CONNECT")]
    NotConnect,
    #[error("the CONNECT authority is not ip:port with a non-zero port")]
    BadAuthority,
}

/// The address an HBONE CONNECT asks for: its authority, which must be
/// exactly `ip:port` (no host name, user info or zero port: a peer names
/// the pod address it was routed to), in canonical form (an IPv4-mapped
/// IPv6 address is the IPv4 address, as the local workloads are keyed).
pub fn connect_target<B>(req: &Request<B>) -> Result<SocketAddr, ConnectHeadError> {
    if req.method() != Method::CONNECT {
        return Err(ConnectHeadError::NotConnect);
    }
    let target = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .map(canonical)
        .ok_or(ConnectHeadError::BadAuthority)?;
    if target.port() == 0 {
        return Err(ConnectHeadError::BadAuthority);
    }
    Ok(target)
}

/// For the fuzz target and the corpus replay test: builds a request head
/// from `data` (method, then URI, then `name: value` header lines, one per
/// line) and checks it. Properties: only a CONNECT is accepted, and an
/// accepted target is the authority as written, canonical, with a port.
/// Returns whether the head was accepted.
#[doc(hidden)]
pub fn fuzz_connect_head(data: &[u8]) -> bool {
    let mut lines = data.split(|b| *b == b'\n');
    let method = lines.next().unwrap_or_default();
    let uri = lines.next().unwrap_or_default();
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        if let Some(colon) = line.iter().position(|b| *b == b':') {
            builder = builder.header(&line[..colon], &line[colon + 1..]);
        }
    }
    let Ok(req) = builder.body(()) else {
        return false;
    };
    let Ok(target) = connect_target(&req) else {
        return false;
    };
    assert_eq!(req.method(), Method::CONNECT);
    assert_ne!(target.port(), 0);
    assert_eq!(target, canonical(target));
    let Some(authority) = req.uri().authority() else {
        panic!("accepted a CONNECT without an authority");
    };
    let written: SocketAddr = match authority.as_str().parse() {
        Ok(addr) => addr,
        Err(e) => panic!("accepted authority {authority} is not ip:port: {e}"),
    };
    assert_eq!(canonical(written), target);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str) -> Result<SocketAddr, ConnectHeadError> {
        // A URI http cannot even parse never reaches us either.
        match Request::builder().method(method).uri(uri).body(()) {
            Ok(req) => connect_target(&req),
            Err(_) => Err(ConnectHeadError::BadAuthority),
        }
    }

    #[test]
    fn accepts_ip_port_authorities_only() {
        assert_eq!(
            head("CONNECT", "10.0.0.1:8080"),
            Ok("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            head("CONNECT", "[fd00::1]:80"),
            Ok("[fd00::1]:80".parse().unwrap())
        );
        // An IPv4-mapped address is the pod's IPv4 address.
        assert_eq!(
            head("CONNECT", "[::ffff:10.0.0.1]:80"),
            Ok("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            head("GET", "http://10.0.0.1:80/"),
            Err(ConnectHeadError::NotConnect)
        );
        for bad in [
            "web.default.svc:80",
            "10.0.0.1",
            "10.0.0.1:0",
            "user@10.0.0.1:80",
            "10.0.0.1:65536",
            "[fe80::1%25eth0]:80",
        ] {
            assert_eq!(
                head("CONNECT", bad),
                Err(ConnectHeadError::BadAuthority),
                "{bad}"
            );
        }
    }
}
