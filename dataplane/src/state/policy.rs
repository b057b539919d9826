//! One authorization policy, compiled from its xDS form, and whether it
//! matches a connection (`authz` decides over the policies that
//! apply; [`super::PolicyStore`] keeps them).
//!
//! Matching follows Istio's ambient semantics: a policy matches if any rule
//! matches; a rule if all of its clauses match (no clauses: always); a clause
//! if any of its matches matches (no matches: always); a match if every field
//! it sets matches, where a field matches if any of its values does and a
//! `not_` field matches if none of its values does. A match that sets nothing
//! matches nothing, and a policy without rules matches nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use meshbox_certs::SpiffeId;
use meshbox_proto::security as pb;

/// Why an Authorization resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{field}: unknown value {value}")]
    Enum { field: &'static str, value: i32 },
    #[error("{field}: an address must be 4 or 16 bytes, got {len}")]
    AddressLength { field: &'static str, len: usize },
    #[error("{field}: prefix length {len} is longer than the address")]
    PrefixLength { field: &'static str, len: u32 },
    #[error("{field}: a string match without a match type")]
    EmptyStringMatch { field: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every workload in the mesh (a policy in the root namespace).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list it in `authorization_policies`.
    WorkloadSelector,
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The xDS resource name, `{namespace}/{name}`: how workloads refer to it.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub dry_run: bool,
    /// Rules → clauses → matches.
    rules: Vec<Vec<Vec<Matcher>>>,
}

/// What is known about a connection at authorization time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub src_ip: IpAddr,
    /// The peer's certificate identity; `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    /// The workload address and port the connection is for.
    pub dst: SocketAddr,
}

impl Policy {
    /// The compiled rules, readable, for `/config_dump`.
    pub fn describe_rules(&self) -> String {
        format!("{:?}", self.rules)
    }

    /// Compiles an xDS `Authorization` published under `key`.
    ///
    /// Anything malformed rejects the whole policy rather than dropping the
    /// bad value: dropping, say, the only source CIDR of an ALLOW rule would
    /// turn it into "allow from anywhere".
    pub fn from_proto(key: &str, a: &pb::Authorization) -> Result<Self, PolicyError> {
        let scope = match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => Scope::Global,
            Ok(pb::Scope::Namespace) => Scope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => {
                return Err(PolicyError::Enum {
                    field: "scope",
                    value: a.scope,
                });
            }
        };
        let action = match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Err(_) => {
                return Err(PolicyError::Enum {
                    field: "action",
                    value: a.action,
                });
            }
        };
        let rules = a
            .rules
            .iter()
            .map(|r| {
                r.clauses
                    .iter()
                    .map(|c| c.matches.iter().map(Matcher::from_proto).collect())
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            key: key.to_owned(),
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            scope,
            action,
            dry_run: a.dry_run,
            rules,
        })
    }

    /// Whether the policy's rules match the connection (its action aside).
    pub fn matches(&self, conn: &ConnectionInfo) -> bool {
        let peer = Peer::of(conn);
        self.rules.iter().any(|rule| {
            rule.iter()
                .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(&peer)))
        })
    }
}

/// Connection facts in the form matchers compare against, computed once per
/// evaluation.
struct Peer<'a> {
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
    identity: Option<&'a SpiffeId>,
    /// The identity without `spiffe://`: `td/ns/x/sa/y`. Istio's principals
    /// are written that way, prefix and suffix matches included.
    principal: Option<String>,
}

impl<'a> Peer<'a> {
    fn of(conn: &'a ConnectionInfo) -> Self {
        let identity = conn.src_identity.as_ref();
        Self {
            // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6;
            // policies write them as IPv4.
            src_ip: conn.src_ip.to_canonical(),
            dst_ip: conn.dst.ip().to_canonical(),
            dst_port: conn.dst.port(),
            identity,
            principal: identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
        }
    }
}

/// One `Match`: every field it sets must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Matcher {
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    service_accounts: Vec<ServiceAccount>,
    not_service_accounts: Vec<ServiceAccount>,
    source_ips: Vec<Cidr>,
    not_source_ips: Vec<Cidr>,
    destination_ips: Vec<Cidr>,
    not_destination_ips: Vec<Cidr>,
    // Kept as sent: a value above 65535 simply never equals a port.
    destination_ports: Vec<u32>,
    not_destination_ports: Vec<u32>,
}

impl Matcher {
    fn from_proto(m: &pb::Match) -> Result<Self, PolicyError> {
        Ok(Self {
            namespaces: strings("namespaces", &m.namespaces)?,
            not_namespaces: strings("not_namespaces", &m.not_namespaces)?,
            principals: strings("principals", &m.principals)?,
            not_principals: strings("not_principals", &m.not_principals)?,
            service_accounts: m
                .service_accounts
                .iter()
                .map(ServiceAccount::from)
                .collect(),
            not_service_accounts: m
                .not_service_accounts
                .iter()
                .map(ServiceAccount::from)
                .collect(),
            source_ips: cidrs("source_ips", &m.source_ips)?,
            not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
            destination_ips: cidrs("destination_ips", &m.destination_ips)?,
            not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
            destination_ports: m.destination_ports.clone(),
            not_destination_ports: m.not_destination_ports.clone(),
        })
    }

    fn matches(&self, peer: &Peer<'_>) -> bool {
        // Istio's ztunnel treats a match with nothing set as matching nothing;
        // the control plane never sends one on purpose, so an empty one is
        // more likely a translation that dropped everything it could not
        // express than a wish to match every connection.
        if *self == Self::default() {
            return false;
        }
        let ns = peer.identity.map(SpiffeId::namespace);
        let principal = peer.principal.as_deref();
        // Identity-based fields read the identity as optional: a positive
        // requirement is never met without an identity (fail closed), a
        // negative one is (there is nothing to exclude) — which is what makes
        // Istio's "DENY notPrincipals: [*]" refuse plaintext.
        field(&self.namespaces, &self.not_namespaces, |m| {
            ns.is_some_and(|ns| m.matches(ns))
        }) && field(&self.principals, &self.not_principals, |m| {
            principal.is_some_and(|p| m.matches(p))
        }) && field(&self.service_accounts, &self.not_service_accounts, |sa| {
            peer.identity.is_some_and(|id| sa.matches(id))
        }) && field(&self.source_ips, &self.not_source_ips, |c| {
            c.contains(peer.src_ip)
        }) && field(&self.destination_ips, &self.not_destination_ips, |c| {
            c.contains(peer.dst_ip)
        }) && field(&self.destination_ports, &self.not_destination_ports, |&p| {
            p == u32::from(peer.dst_port)
        })
    }
}

/// A field and its `not_` twin: any positive value must match (if any are
/// given) and no negative value may.
fn field<T>(positive: &[T], negative: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&hit)) && !negative.iter().any(&hit)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value (Istio's `*`).
    Presence,
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }
}

fn strings(field: &'static str, list: &[pb::StringMatch]) -> Result<Vec<StringMatch>, PolicyError> {
    use pb::string_match::MatchType;
    list.iter()
        .map(|m| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            // Dropping it could empty the field and widen the match.
            None => Err(PolicyError::EmptyStringMatch { field }),
        })
        .collect()
}

/// A Kubernetes service account; the trust domain is not compared, as in
/// Istio (service accounts are named by namespace and name only).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceAccount {
    namespace: String,
    name: String,
}

impl From<&pb::ServiceAccountMatch> for ServiceAccount {
    fn from(m: &pb::ServiceAccountMatch) -> Self {
        Self {
            namespace: m.namespace.clone(),
            name: m.service_account.clone(),
        }
    }
}

impl ServiceAccount {
    fn matches(&self, id: &SpiffeId) -> bool {
        id.namespace() == self.namespace && id.service_account() == self.name
    }
}

/// An IP prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(net.to_bits()),
                u128::from(ip.to_bits()),
                32,
                self.len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(net.to_bits(), ip.to_bits(), 128, self.len)
            }
            // An IPv4 prefix never covers an IPv6 address and vice versa.
            _ => false,
        }
    }
}

/// Whether the top `len` of `bits` bits agree.
fn prefix_eq(a: u128, b: u128, bits: u32, len: u8) -> bool {
    let len = u32::from(len);
    if len == 0 {
        return true;
    }
    // Validation keeps `len` within the family's width; should that ever
    // break, match nothing rather than overflow.
    let Some(shift) = bits.checked_sub(len) else {
        return false;
    };
    (a >> shift) == (b >> shift)
}

fn cidrs(field: &'static str, list: &[pb::Address]) -> Result<Vec<Cidr>, PolicyError> {
    list.iter().map(|a| cidr(field, a)).collect()
}

fn cidr(field: &'static str, a: &pb::Address) -> Result<Cidr, PolicyError> {
    let too_long = PolicyError::PrefixLength {
        field,
        len: a.length,
    };
    let (addr, max) = if let Ok(v4) = <[u8; 4]>::try_from(a.address.as_slice()) {
        (IpAddr::V4(Ipv4Addr::from(v4)), 32)
    } else if let Ok(v6) = <[u8; 16]>::try_from(a.address.as_slice()) {
        (IpAddr::V6(Ipv6Addr::from(v6)), 128)
    } else {
        return Err(PolicyError::AddressLength {
            field,
            len: a.address.len(),
        });
    };
    if a.length > max {
        return Err(too_long);
    }
    let len = u8::try_from(a.length).map_err(|_| too_long)?;
    // Connections are matched on canonical addresses (IPv4 peers as IPv4), so
    // an IPv4-mapped prefix that lies within the mapped range becomes the
    // IPv4 prefix it describes.
    if let IpAddr::V6(v6) = addr
        && let Some(v4) = v6.to_ipv4_mapped()
        && len >= 96
    {
        return Ok(Cidr {
            addr: IpAddr::V4(v4),
            len: len - 96,
        });
    }
    Ok(Cidr { addr, len })
}
