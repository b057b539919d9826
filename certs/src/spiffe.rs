//! SPIFFE identities of Kubernetes workloads: `spiffe://{td}/ns/{ns}/sa/{sa}`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest SPIFFE ID we accept, in bytes (the SPIFFE spec's limit).
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain, in bytes (a DNS name).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest namespace or service account name (a DNS-1123 subdomain).
const MAX_SEGMENT_LEN: usize = 253;

/// A workload identity in the Kubernetes shape Istio uses.
///
/// Kept as its URI in one shared string, with the parts' positions, so a
/// clone (every proxied connection, pool key and log record takes one) is
/// a reference count, not three allocations. Equal URIs are equal
/// identities; order is by trust domain, namespace, service account.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// End of the trust domain; the namespace starts 4 bytes later (`/ns/`).
    trust_domain_end: u16,
    namespace_end: u16,
}

/// Where the trust domain starts in the URI: after `spiffe://`.
const TRUST_DOMAIN_START: usize = "spiffe://".len();

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID must start with spiffe://")]
    Scheme,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("path must be /ns/<namespace>/sa/<service account>, got {0:?}")]
    Path(String),
    #[error(
        "invalid {what} {value:?}: use letters, digits, '.', '-' and '_' (at most {MAX_SEGMENT_LEN})"
    )]
    Segment { what: &'static str, value: String },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        let uri = uri(trust_domain, namespace, service_account);
        let trust_domain_end = TRUST_DOMAIN_START + trust_domain.len();
        let namespace_end = trust_domain_end + "/ns/".len() + namespace.len();
        // The validated lengths (at most 255 + 253 + 253 and the separators)
        // always fit.
        let (Ok(trust_domain_end), Ok(namespace_end)) = (
            u16::try_from(trust_domain_end),
            u16::try_from(namespace_end),
        ) else {
            return Err(SpiffeIdError::TooLong);
        };
        Ok(Self {
            uri: uri.into(),
            trust_domain_end,
            namespace_end,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[TRUST_DOMAIN_START..usize::from(self.trust_domain_end)]
    }

    pub fn namespace(&self) -> &str {
        &self.uri
            [usize::from(self.trust_domain_end) + "/ns/".len()..usize::from(self.namespace_end)]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.namespace_end) + "/sa/".len()..]
    }

    /// The URI, `spiffe://{td}/ns/{ns}/sa/{sa}`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> Ordering {
        (
            self.trust_domain(),
            self.namespace(),
            self.service_account(),
        )
            .cmp(&(
                other.trust_domain(),
                other.namespace(),
                other.service_account(),
            ))
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&&*self.uri).finish()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(String::new()))?;
        validate_trust_domain(trust_domain)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(SpiffeIdError::Path(format!("/{path}"))),
        }
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_LEN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && !td.starts_with('.')
        && !td.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.to_owned()))
    }
}

fn validate_segment(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SEGMENT_LEN
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Segment {
            what,
            value: value.to_owned(),
        })
    }
}

/// `spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}`, not
/// validated: the one place the URI's shape is written. For showing parts
/// that may not make a valid identity (the REST API shows what a manifest
/// says); anything held or compared is a [`SpiffeId`]. Built in one
/// allocation: the control plane makes one per pod.
pub fn uri(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    let parts = [
        "spiffe://",
        trust_domain,
        "/ns/",
        namespace,
        "/sa/",
        service_account,
    ];
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// Validates a trust domain name given on its own (flags, config).
pub fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    validate_trust_domain(td)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
    }

    #[test]
    fn parts_clones_and_order() {
        let a: SpiffeId = "spiffe://a/ns/x/sa/y".parse().unwrap();
        let ab: SpiffeId = "spiffe://a.b/ns/x/sa/y".parse().unwrap();
        // By parts: trust domain "a" before "a.b" (the URIs sort the
        // other way round, '.' < '/').
        assert!(a < ab);
        assert!(ab.as_str() < a.as_str());
        let c = a.clone();
        assert_eq!(c, a);
        assert_eq!(
            (c.trust_domain(), c.namespace(), c.service_account()),
            ("a", "x", "y")
        );
        let max = SpiffeId::new(&"t".repeat(255), &"n".repeat(253), &"s".repeat(253)).unwrap();
        assert_eq!(max.namespace().len(), 253);
        assert_eq!(max.service_account().len(), 253);
        assert_eq!(max.trust_domain().len(), 255);
        assert_ne!(
            SpiffeId::new("td", "ns", "sa").unwrap(),
            SpiffeId::new("td", "ns", "sb").unwrap()
        );
    }

    #[test]
    fn uri_is_the_display_form() {
        assert_eq!(
            uri("td", "ns", "sa"),
            SpiffeId::new("td", "ns", "sa").unwrap().to_string()
        );
        // Unvalidated: what it is given, in the URI's shape.
        assert_eq!(uri("td", "a b", ""), "spiffe://td/ns/a b/sa/");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local:443/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/serviceaccount/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#frag",
            "spiffe://cluster.local/ns/a%2f/sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe://cluster.local/ns/ä/sa/b",
            "spiffe://.local/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "accepted {bad:?}");
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(3000));
        assert_eq!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong));
    }
}
