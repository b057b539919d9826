//! L4 authorization of inbound connections, with Istio's ambient semantics.
//!
//! Which policies apply to a destination workload: every GLOBAL policy (the
//! root namespace's), every NAMESPACE policy of the workload's namespace, and
//! every policy the workload lists in `authorization_policies`. Then, as
//! Istio's AuthorizationPolicy reference says: a matching DENY policy denies;
//! otherwise, if no ALLOW policy applies the connection is allowed; otherwise
//! one of them must match. Dry-run policies are evaluated and reported, never
//! enforced.
//!
//! Boundaries: pure and synchronous. The caller gives the connection facts
//! (peer identity from the verified certificate, or none for plaintext) and a
//! way to look policies up ([`PolicyLookup`], implemented by
//! [`crate::state::PolicyStore`] and by [`crate::state::ProxyState`]);
//! it gets a [`Decision`] to enforce and log. What a policy is (compiled from
//! xDS, matched against a connection) and where policies are kept is
//! [`crate::state`]'s, as is finding the destination workload.

#[cfg(test)]
mod tests;

use tracing::{debug, info, warn};

use crate::state::policy::Action;
use crate::state::{ConnectionInfo, Policy, PolicyLookup, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// Why the verdict is what it is; names the deciding policy when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Allowed: no DENY policy matched and no ALLOW policy applies.
    NoAllowPolicy,
    /// Allowed by this ALLOW policy.
    AllowPolicyMatched(String),
    /// Denied by this DENY policy.
    DenyPolicyMatched(String),
    /// Denied: ALLOW policies apply and none matched.
    NoAllowPolicyMatched,
    /// Denied: the workload names a policy this proxy does not have (yet).
    /// It may be an ALLOW or DENY policy still in flight; not knowing which,
    /// we refuse rather than guess.
    UnknownPolicy(String),
}

impl Reason {
    /// The deciding policy's key, if one decided.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Self::AllowPolicyMatched(k) | Self::DenyPolicyMatched(k) | Self::UnknownPolicy(k) => {
                Some(k)
            }
            Self::NoAllowPolicy | Self::NoAllowPolicyMatched => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub reason: Reason,
}

/// What a dry-run policy would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunNote {
    pub policy: String,
    pub action: Action,
    pub matched: bool,
}

/// The result of authorizing one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What is enforced.
    pub outcome: Outcome,
    /// Each applicable dry-run policy and whether it matched.
    pub dry_run: Vec<DryRunNote>,
    /// The outcome if the dry-run policies were enforced too; `None` when no
    /// dry-run policy applies.
    pub dry_run_outcome: Option<Outcome>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.outcome.verdict == Verdict::Allow
    }
}

/// Authorizes a connection to `dest`.
pub fn authorize(conn: &ConnectionInfo, dest: &Workload, policies: &impl PolicyLookup) -> Decision {
    let mut applicable = policies.scoped_policies(&dest.namespace);
    let mut missing = None;
    for key in &dest.authorization_policies {
        // A workload may also list policies that apply by scope; count each once.
        if applicable.iter().any(|p| p.key == *key) {
            continue;
        }
        match policies.policy(key) {
            Some(p) => applicable.push(p),
            None => {
                warn!(workload = %dest.uid, policy = %key, "workload names an unknown policy; denying its connections until it arrives");
                missing.get_or_insert_with(|| key.clone());
            }
        }
    }

    let outcome = evaluate(&applicable, conn, missing.as_deref(), false);
    let dry_run: Vec<DryRunNote> = applicable
        .iter()
        .filter(|p| p.dry_run)
        .map(|p| DryRunNote {
            policy: p.key.clone(),
            action: p.action,
            matched: p.matches(conn),
        })
        .collect();
    let dry_run_outcome =
        (!dry_run.is_empty()).then(|| evaluate(&applicable, conn, missing.as_deref(), true));

    let identity = conn.src_identity.as_ref().map(ToString::to_string);
    debug!(
        src_ip = %conn.src_ip,
        src_identity = identity.as_deref().unwrap_or(""),
        dst = %conn.dst,
        workload = %dest.uid,
        verdict = ?outcome.verdict,
        reason = ?outcome.reason,
        "authorization decision"
    );
    if let Some(would) = &dry_run_outcome
        && would.verdict != outcome.verdict
    {
        info!(
            src_ip = %conn.src_ip,
            src_identity = identity.as_deref().unwrap_or(""),
            dst = %conn.dst,
            workload = %dest.uid,
            verdict = ?outcome.verdict,
            dry_run_verdict = ?would.verdict,
            dry_run_reason = ?would.reason,
            "dry-run policies would change this decision"
        );
    }
    Decision {
        outcome,
        dry_run,
        dry_run_outcome,
    }
}

/// Istio's order of evaluation over the applicable policies; dry-run ones
/// count only when `with_dry_run`.
fn evaluate(
    applicable: &[&Policy],
    conn: &ConnectionInfo,
    missing: Option<&str>,
    with_dry_run: bool,
) -> Outcome {
    let considered = || {
        applicable
            .iter()
            .filter(move |p| with_dry_run || !p.dry_run)
    };
    let deny = |reason| Outcome {
        verdict: Verdict::Deny,
        reason,
    };
    let allow = |reason| Outcome {
        verdict: Verdict::Allow,
        reason,
    };
    if let Some(p) = considered().find(|p| p.action == Action::Deny && p.matches(conn)) {
        return deny(Reason::DenyPolicyMatched(p.key.clone()));
    }
    if let Some(key) = missing {
        return deny(Reason::UnknownPolicy(key.to_owned()));
    }
    let mut allows = considered()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return allow(Reason::NoAllowPolicy);
    }
    match allows.find(|p| p.matches(conn)) {
        Some(p) => allow(Reason::AllowPolicyMatched(p.key.clone())),
        None => deny(Reason::NoAllowPolicyMatched),
    }
}
