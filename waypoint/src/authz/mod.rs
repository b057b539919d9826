//! L7 authorization at the waypoint: Istio's `AuthorizationPolicy`
//! semantics over one HTTP request.
//!
//! Boundaries: pure and synchronous. The caller gives the policies that
//! apply to the request's target (which ones do — `targetRefs` to the
//! Gateway or to a Service using the waypoint — is decided elsewhere) and the
//! request's attributes ([`Request`]); it gets a [`Decision`]. A denial is
//! answered `403` with [`DENIED_BODY`], as Envoy does.
//!
//! Order, as Istio's reference says: if any DENY policy matches, the
//! request is denied; otherwise, if no ALLOW policy applies it is allowed;
//! otherwise one ALLOW policy must match.
//!
//! Matching: a policy matches if any rule does; a rule if its `from`, `to`
//! and `when` all do (a rule with none matches every request); `from` and
//! `to` if any entry does; an entry if every field it sets does; a field if
//! any of its values does, and a `not…` field if none does. All `when`
//! conditions must match. Values are Istio's patterns: `*` (present and
//! non-empty), `*suffix`, `prefix*`, exact.
//!
//! - Principals are written without `spiffe://` (`cluster.local/ns/x/sa/y`)
//!   and compared with the peer's verified identity; namespaces with its
//!   namespace. Without an identity, positive fields never match and `not…`
//!   fields always do.
//! - Hosts compare case-insensitively with the authority as received (a
//!   port the client sent is part of it). Methods and paths compare as exact
//!   bytes, case-sensitively.
//! - Paths are compared exactly as given, without the query: the engine
//!   does not normalise them. Istio normalises paths by default (`BASE`:
//!   RFC 3986, which resolves `.` and `..` segments; slashes are not
//!   merged), so a DENY on `/admin*` is only as
//!   strong as the normalisation the caller applies before asking: without
//!   it, `/./admin` would not match.
//! - Headers: names case-insensitive; a header sent several times is matched
//!   as its values joined with `,`, as Envoy does. An absent header matches
//!   no value and every notValue; `*` matches a present header, even empty.
//! - `remoteIpBlocks`/`notRemoteIpBlocks` are matched like `ipBlocks`,
//!   against the source address: the waypoint trusts no X-Forwarded-For.
//!
//! Unsupported (each reported by [`Policy::unsupported`]): actions AUDIT
//! (never enforced, as in Istio it never changes a decision) and CUSTOM
//! (enforced as DENY of what it selects); `requestPrincipals`,
//! `serviceAccounts` and their `not…` forms; `when` keys other than
//! `request.headers[…]`, `source.ip`, `source.principal`,
//! `source.namespace` and `destination.port`; path templates. An invalid
//! value (an IP block that is not an address or CIDR, a port that is not a
//! number) and an empty `from`/`to` entry or `when` count as unsupported.
//! Such a rule fails closed: in an ALLOW policy it matches nothing, in a
//! DENY policy it matches every request.

mod policy;
mod request;
mod spec;

#[cfg(test)]
mod tests;

use std::borrow::Borrow;

pub use policy::{Action, Policy, Problem, Unsupported};
pub use request::Request;
pub use spec::{ActionSpec, ConditionSpec, OperationSpec, PolicySpec, RuleSpec, SourceSpec};

use request::Facts;

/// The status of a denied request.
pub const DENIED_STATUS: http::StatusCode = http::StatusCode::FORBIDDEN;
/// The body of a denied request: Envoy's RBAC filter's, which clients and
/// tests written against Istio look for.
pub const DENIED_BODY: &str = "RBAC: access denied";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Why the verdict is what it is; names the deciding policy
/// (`namespace/name`) when one decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Allowed: no DENY policy matched and no ALLOW policy applies.
    NoAllowPolicy,
    AllowPolicyMatched(String),
    DenyPolicyMatched(String),
    /// Denied: ALLOW policies apply and none matched.
    NoAllowPolicyMatched,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// Decides one request against the policies that apply to its target.
pub fn authorize<P: Borrow<Policy>>(request: &Request<'_>, policies: &[P]) -> Decision {
    decide(&Facts::of(request), policies)
}

/// Decides a connection that is not HTTP (proxied as TCP), as Istio does:
/// `request` carries no method, path, host or headers, an ALLOW rule that
/// needs any of them matches nothing, and a DENY rule is judged without
/// them, so it denies more, never less.
pub fn authorize_tcp<P: Borrow<Policy>>(request: &Request<'_>, policies: &[P]) -> Decision {
    decide(&Facts::of_tcp(request), policies)
}

fn decide<P: Borrow<Policy>>(facts: &Facts<'_>, policies: &[P]) -> Decision {
    let with = |action: Action| {
        policies
            .iter()
            .map(Borrow::borrow)
            .filter(move |p| p.action == action)
    };
    if let Some(p) = with(Action::Deny).find(|p| p.matches(facts)) {
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::DenyPolicyMatched(p.key()),
        };
    }
    let mut allows = with(Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision {
            verdict: Verdict::Allow,
            reason: Reason::NoAllowPolicy,
        };
    }
    match allows.find(|p| p.matches(facts)) {
        Some(p) => Decision {
            verdict: Verdict::Allow,
            reason: Reason::AllowPolicyMatched(p.key()),
        },
        None => Decision {
            verdict: Verdict::Deny,
            reason: Reason::NoAllowPolicyMatched,
        },
    }
}
