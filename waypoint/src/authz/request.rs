//! What the engine knows about one HTTP request.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;
use meshbox_certs::SpiffeId;

/// A request's attributes, as the proxy has them once the headers are read.
///
/// Borrowed, so the proxy authorizes straight from hyper's request without
/// copying it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The peer's SPIFFE identity from the verified HBONE certificate; `None`
    /// when the peer showed none (a positive identity requirement then never
    /// matches).
    pub source_identity: Option<&'a SpiffeId>,
    /// The source address. There is no X-Forwarded-For trust: this is the
    /// address the waypoint itself saw (for HBONE, the one the tunnel names).
    pub source_ip: IpAddr,
    /// The destination (service or workload) port the request is for.
    pub destination_port: u16,
    pub method: &'a str,
    /// The path without the query string, exactly as received: the engine
    /// does not normalise it (see the module documentation).
    pub path: &'a str,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1), as received, port
    /// included if the client sent one.
    pub host: &'a str,
    /// Names are case-insensitive (`HeaderMap` keeps them lower-case); a
    /// header may appear more than once.
    pub headers: &'a HeaderMap,
}

/// The request in the form the matchers compare against, computed once per
/// decision rather than once per policy.
pub(crate) struct Facts<'a> {
    pub(crate) request: &'a Request<'a>,
    /// A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6; policies
    /// write them as IPv4.
    pub(crate) source_ip: IpAddr,
    /// The identity without `spiffe://` (`td/ns/x/sa/y`): how Istio's
    /// principals are written, prefix and suffix patterns included.
    pub(crate) principal: Option<String>,
    /// Hosts match case-insensitively; patterns are lower-cased when compiled.
    pub(crate) host: String,
    /// Not HTTP: method, path, host and headers mean nothing.
    pub(crate) tcp: bool,
}

impl<'a> Facts<'a> {
    pub(crate) fn of(request: &'a Request<'a>) -> Self {
        Self {
            request,
            source_ip: request.source_ip.to_canonical(),
            principal: request.source_identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
            host: request.host.to_ascii_lowercase(),
            tcp: false,
        }
    }

    /// Facts of a connection that is not HTTP.
    pub(crate) fn of_tcp(request: &'a Request<'a>) -> Self {
        Self {
            tcp: true,
            ..Self::of(request)
        }
    }

    pub(crate) fn namespace(&self) -> Option<&str> {
        self.request.source_identity.map(SpiffeId::namespace)
    }

    /// A header's value as Envoy's header matchers see it: absent, the one
    /// value, or all of its values joined with `,` in the order received.
    pub(crate) fn header(&self, name: &http::HeaderName) -> Option<Cow<'a, [u8]>> {
        let mut values = self.request.headers.get_all(name).iter();
        let first = values.next()?;
        let Some(second) = values.next() else {
            return Some(Cow::Borrowed(first.as_bytes()));
        };
        let mut joined = first.as_bytes().to_vec();
        for value in std::iter::once(second).chain(values) {
            joined.push(b',');
            joined.extend_from_slice(value.as_bytes());
        }
        Some(Cow::Owned(joined))
    }
}
