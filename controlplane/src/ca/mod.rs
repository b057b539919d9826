//! The CA service: decides who may have which certificate, then signs.
//!
//! [`CertificateIssuer`] is shared by the gRPC API ([`grpc`], Istio's
//! `CreateCertificate`) and the REST API, so both enforce the same rules:
//! - a workload caller gets certificates only for its own identity;
//! - a node caller gets certificates only for identities that have a pod
//!   scheduled on its node (Istio's `ImpersonatedIdentity` rule);
//! - each caller is rate-limited, so one cannot starve the CA;
//! - every issuance is counted, timed and kept in a bounded audit log.

pub mod audit;
pub mod grpc;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota};
use meshbox_certs::{CertificateAuthority, CsrError, IssuedCertificate, SpiffeId, ValidatedCsr};
use time::OffsetDateTime;

use crate::auth::Caller;
use crate::metrics::CaMetrics;
use audit::{AuditEntry, AuditLog};

/// Largest CSR we read, in bytes.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// Which pods run where: the CA's view of the mesh model.
pub trait NodeRoster: Send + Sync + 'static {
    fn has_identity_on_node(&self, node: &str, identity: &SpiffeId) -> bool;
}

/// Why a request got no certificate.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    BadCsr(#[from] CsrError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("too many certificate requests from this caller; retry later")]
    RateLimited,
    #[error("the CA could not sign: {0}")]
    Internal(String),
}

impl IssueError {
    fn reason(&self) -> &'static str {
        match self {
            IssueError::BadCsr(_) | IssueError::BadRequest(_) => "bad_request",
            IssueError::Forbidden(_) => "forbidden",
            IssueError::RateLimited => "rate_limited",
            IssueError::Internal(_) => "internal",
        }
    }
}

/// One certificate request, whichever API it came through.
pub struct IssueRequest<'a> {
    pub csr_pem: &'a [u8],
    /// `None` = the CA's default lifetime. Longer than the maximum is capped.
    pub ttl: Option<Duration>,
    /// Istio's `ImpersonatedIdentity`: the identity a node proxy asks for.
    pub impersonate: Option<&'a str>,
    /// `grpc` or `rest`, for the audit log and metrics.
    pub via: &'static str,
}

/// Per-caller request rate.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

pub struct CertificateIssuer {
    ca: Arc<CertificateAuthority>,
    roster: Arc<dyn NodeRoster>,
    limiter: DefaultKeyedRateLimiter<String>,
    audit: AuditLog,
    metrics: CaMetrics,
}

impl CertificateIssuer {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        roster: Arc<dyn NodeRoster>,
        rate: RateLimit,
        audit_capacity: usize,
        metrics: CaMetrics,
    ) -> Self {
        let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
        Self {
            ca,
            roster,
            limiter: DefaultKeyedRateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ),
            audit: AuditLog::new(audit_capacity),
            metrics,
        }
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Authorizes and signs one request.
    pub fn issue(
        &self,
        caller: &Caller,
        request: IssueRequest<'_>,
    ) -> Result<IssuedCertificate, IssueError> {
        let started = Instant::now();
        let result = self.try_issue(caller, &request);
        match &result {
            Ok(issued) => {
                self.metrics.issued(request.via, started.elapsed());
                self.audit.record(AuditEntry {
                    identity: issued.subject.clone(),
                    serial: issued.serial.clone(),
                    not_before: issued.not_before,
                    not_after: issued.not_after,
                    requester: caller.key(),
                    via: request.via,
                    issued_at: OffsetDateTime::now_utc(),
                });
                tracing::info!(
                    identity = %issued.subject,
                    serial = %issued.serial,
                    requester = %caller.key(),
                    via = request.via,
                    not_after = %issued.not_after,
                    "issued certificate"
                );
            }
            Err(e) => {
                self.metrics.refused(request.via, e.reason());
                tracing::warn!(requester = %caller.key(), via = request.via, error = %e, "refused certificate request");
            }
        }
        result
    }

    fn try_issue(
        &self,
        caller: &Caller,
        request: &IssueRequest<'_>,
    ) -> Result<IssuedCertificate, IssueError> {
        if self.limiter.check_key(&caller.key()).is_err() {
            return Err(IssueError::RateLimited);
        }
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(IssueError::BadRequest(format!(
                "the CSR is larger than {MAX_CSR_BYTES} bytes"
            )));
        }
        if request.ttl == Some(Duration::ZERO) {
            return Err(IssueError::BadRequest("the TTL must be positive".into()));
        }
        let csr = ValidatedCsr::from_pem(request.csr_pem, self.ca.trust_domain())?;
        let impersonated = request
            .impersonate
            .map(|raw| {
                raw.parse::<SpiffeId>().map_err(|e| {
                    IssueError::BadRequest(format!("ImpersonatedIdentity is not a SPIFFE ID: {e}"))
                })
            })
            .transpose()?;
        if let Some(target) = &impersonated
            && target != &csr.identity
        {
            return Err(IssueError::Forbidden(format!(
                "the CSR asks for {} but ImpersonatedIdentity is {target}",
                csr.identity
            )));
        }
        match caller {
            Caller::Workload(own) => {
                if own != &csr.identity {
                    return Err(IssueError::Forbidden(format!(
                        "the token is for {own}; it may not get a certificate for {}",
                        csr.identity
                    )));
                }
            }
            Caller::Node { node } => {
                if !self.roster.has_identity_on_node(node, &csr.identity) {
                    return Err(IssueError::Forbidden(format!(
                        "no pod with identity {} is scheduled on node {node}",
                        csr.identity
                    )));
                }
            }
        }
        self.ca
            .sign(&csr, request.ttl)
            .map_err(|e| IssueError::Internal(e.to_string()))
    }

    /// Drops rate-limiter state of callers that have gone quiet, so the
    /// limiter does not grow with every caller ever seen.
    pub fn forget_idle_callers(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}
