//! SPIFFE identities of Kubernetes workloads: `spiffe://{td}/ns/{ns}/sa/{sa}`.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID we accept, in bytes (the SPIFFE spec's limit).
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain, in bytes (a DNS name).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest namespace or service account name (a DNS-1123 subdomain).
const MAX_SEGMENT_LEN: usize = 253;

/// A workload identity in the Kubernetes shape Istio uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

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
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
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
