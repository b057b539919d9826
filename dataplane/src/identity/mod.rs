//! Workload certificates for the dataplane: keys made in-process (they never
//! leave it), CSRs sent to the CA, certificates cached per identity and
//! renewed at half their lifetime, with jitter and retry backoff.
//!
//! The CA is reached through [`CaClient`] (Istio's `CreateCertificate`); in
//! node mode the dataplane asks for each pod's identity on its behalf with
//! Istio's `ImpersonatedIdentity`. [`CertificateManager`] is what the proxy
//! uses: `get` waits for a certificate on first need, and concurrent callers
//! share one request.

mod ca_client;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshbox_certs::{SpiffeId, WorkloadKey};
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

pub use ca_client::CaClient;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("the CA refused {identity}: {message}")]
    Refused { identity: SpiffeId, message: String },
    #[error("the CA is unreachable: {0}")]
    Unavailable(String),
    #[error("the CA answered with an unusable certificate: {0}")]
    BadResponse(String),
    #[error("making a key or CSR failed: {0}")]
    Key(String),
    #[error("no certificate for {0} yet")]
    Pending(SpiffeId),
    #[error("the certificate for {0} expired and could not be renewed")]
    Expired(SpiffeId),
}

/// A certificate and its key for one identity.
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    /// Leaf first; the CA's chain follows (root included, as Istio's CA sends it).
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The trust anchors: the last certificate of the CA's chain.
    pub roots: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When we received it. Renewal counts from here, not from
    /// `not_before`, which CAs backdate to absorb clock skew.
    received_at: SystemTime,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// Builds from the CA's PEM answer, checking the leaf is for `identity`.
    pub fn from_ca_response(
        identity: &SpiffeId,
        key: &WorkloadKey,
        chain_pem: &[String],
    ) -> Result<Self, IdentityError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(
                meshbox_certs::pem::parse_certificates(pem.as_bytes())
                    .map_err(|e| IdentityError::BadResponse(e.to_string()))?,
            );
        }
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::BadResponse("empty certificate chain".into()))?;
        let got = meshbox_certs::tls::spiffe_id_of(leaf);
        if got.as_ref() != Some(identity) {
            return Err(IdentityError::BadResponse(format!(
                "asked for {identity}, the certificate is for {}",
                got.map(|g| g.to_string())
                    .unwrap_or_else(|| "no SPIFFE ID".into())
            )));
        }
        let info = meshbox_certs::tls::certificate_info(leaf)
            .ok_or_else(|| IdentityError::BadResponse("unreadable leaf".into()))?;
        let roots = chain.last().cloned().into_iter().collect();
        Ok(Self {
            identity: identity.clone(),
            chain,
            key: key.private_key_der(),
            roots,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            received_at: SystemTime::now(),
        })
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// When to renew: half way through the remaining lifetime at receipt.
    pub fn renew_at(&self) -> SystemTime {
        let start = self.received_at.max(self.not_before);
        let lifetime = self.not_after.duration_since(start).unwrap_or_default();
        start + lifetime / 2
    }

    pub fn is_expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

/// Anything that can turn an identity into a certificate (the CA client, or a
/// test double).
#[tonic::async_trait]
pub trait CertificateProvider: Send + Sync + 'static {
    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, IdentityError>;
}

/// The state of one identity's certificate, shared with waiters.
type Slot = watch::Sender<Option<Result<Arc<WorkloadCertificate>, IdentityError>>>;

/// Caches certificates per identity and keeps them fresh.
pub struct CertificateManager {
    provider: Arc<dyn CertificateProvider>,
    slots: Mutex<HashMap<SpiffeId, Slot>>,
}

/// Renewal retries start at this delay and double up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

impl CertificateManager {
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Arc<Self> {
        Arc::new(Self {
            provider,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Starts fetching (and then renewing) `identity` if not already.
    pub fn prefetch(self: &Arc<Self>, identity: &SpiffeId) {
        let _ = self.slot(identity);
    }

    /// The current certificate for `identity`, waiting for the first one.
    /// A refusal is returned as is; the next call tries again. An expired
    /// one is an error at once: renewal starts at half its lifetime, so it
    /// expired because renewals kept failing, and waiting for the next try
    /// would only hold the caller's connection before refusing it.
    pub async fn get(
        self: &Arc<Self>,
        identity: &SpiffeId,
    ) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        let mut rx = self.slot(identity).subscribe();
        loop {
            if let Some(result) = rx.borrow_and_update().clone() {
                match result {
                    Ok(cert) if !cert.is_expired() => return Ok(cert),
                    Ok(_) => return Err(IdentityError::Expired(identity.clone())),
                    Err(e) => return Err(e),
                }
            }
            if rx.changed().await.is_err() {
                return Err(IdentityError::Pending(identity.clone()));
            }
        }
    }

    /// The current certificate without waiting, if there is a valid one.
    pub fn current(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let slots = self.slots.lock();
        let value = slots.get(identity)?.borrow().clone();
        match value {
            Some(Ok(cert)) if !cert.is_expired() => Some(cert),
            _ => None,
        }
    }

    /// Stops renewing `identity` and drops its certificate.
    pub fn forget(&self, identity: &SpiffeId) {
        self.slots.lock().remove(identity);
    }

    /// Every identity with its certificate's serial and expiry (no keys), for
    /// `/config_dump` and `/certs`.
    pub fn snapshot(&self) -> Vec<(SpiffeId, Option<(String, SystemTime)>)> {
        let slots = self.slots.lock();
        let mut out: Vec<_> = slots
            .iter()
            .map(|(id, slot)| {
                let state = match &*slot.borrow() {
                    Some(Ok(cert)) => Some((cert.serial.clone(), cert.not_after)),
                    _ => None,
                };
                (id.clone(), state)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn slot(self: &Arc<Self>, identity: &SpiffeId) -> Slot {
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get(identity) {
            return slot.clone();
        }
        let slot: Slot = watch::channel(None).0;
        slots.insert(identity.clone(), slot.clone());
        tokio::spawn(Self::keep_fresh(
            Arc::downgrade(self),
            identity.clone(),
            slot.clone(),
        ));
        slot
    }

    /// Fetches, then renews at half-life (with up to 10% jitter so a node's
    /// pods do not all renew at once), retrying with backoff. Ends when the
    /// identity is forgotten or the manager dropped.
    async fn keep_fresh(manager: std::sync::Weak<Self>, identity: SpiffeId, slot: Slot) {
        let mut retry = FIRST_RETRY;
        loop {
            let Some(this) = manager.upgrade() else {
                return;
            };
            let still_wanted = this
                .slots
                .lock()
                .get(&identity)
                .is_some_and(|s| s.same_channel(&slot));
            if !still_wanted {
                return;
            }
            let provider = this.provider.clone();
            drop(this);
            let wait = match provider.fetch(&identity).await {
                Ok(cert) => {
                    retry = FIRST_RETRY;
                    let until_renewal = cert
                        .renew_at()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tracing::info!(
                        identity = %identity,
                        serial = %cert.serial,
                        renew_in = ?until_renewal,
                        "certificate ready"
                    );
                    slot.send_replace(Some(Ok(Arc::new(cert))));
                    until_renewal.saturating_sub(jitter(until_renewal / 10))
                }
                Err(e) => {
                    tracing::warn!(identity = %identity, error = %e, retry_in = ?retry, "certificate request failed");
                    // Keep serving a still-valid certificate while retrying.
                    let keep = matches!(&*slot.borrow(), Some(Ok(c)) if !c.is_expired());
                    if !keep {
                        slot.send_replace(Some(Err(e)));
                    }
                    let wait = retry;
                    retry = (retry * 2).min(MAX_RETRY);
                    wait
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// A pseudo-random duration in `[0, max)`; only spreads renewals.
fn jitter(max: Duration) -> Duration {
    let nanos = max.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    Duration::from_nanos(seed.wrapping_mul(6364136223846793005) % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshbox_certs::ca::{CaPolicy, CertificateAuthority};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Issues from an in-process CA; can be told to fail.
    struct FakeCa {
        ca: CertificateAuthority,
        ttl: Duration,
        calls: AtomicUsize,
        failing: std::sync::atomic::AtomicBool,
        /// How long a failing request takes (a CA that does not answer).
        failing_after: Duration,
    }

    #[tonic::async_trait]
    impl CertificateProvider for FakeCa {
        async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, IdentityError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.failing.load(Ordering::SeqCst) {
                tokio::time::sleep(self.failing_after).await;
                return Err(IdentityError::Unavailable("CA down".into()));
            }
            let key = WorkloadKey::generate().unwrap();
            let issued = self
                .ca
                .sign_for_key(identity, &key, Some(self.ttl))
                .unwrap();
            WorkloadCertificate::from_ca_response(identity, &key, &issued.chain_pem)
        }
    }

    fn fake(ttl: Duration) -> Arc<FakeCa> {
        let mut policy = CaPolicy::new("cluster.local");
        policy.max_ttl = ttl;
        Arc::new(FakeCa {
            ca: CertificateAuthority::create_root(policy).unwrap().0,
            ttl,
            calls: AtomicUsize::new(0),
            failing: false.into(),
            failing_after: Duration::ZERO,
        })
    }

    fn id(s: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/default/sa/{s}")
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_fetch() {
        let ca = fake(Duration::from_secs(3600));
        let manager = CertificateManager::new(ca.clone());
        let web = id("web");
        let (a, b, c) = tokio::join!(manager.get(&web), manager.get(&web), manager.get(&web));
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.serial, b.serial);
        assert_eq!(b.serial, c.serial);
        assert_eq!(a.identity, web);
        assert_eq!(a.chain.len(), 2);
        assert!(manager.current(&web).is_some());
        assert!(manager.current(&id("db")).is_none());
    }

    // Tokio's clock is paused: the renewal timer and the test's polling run
    // on virtual time, so "renewed once, near half-life" is exact however
    // slow the machine is. Certificate validity still reads the wall clock,
    // which hardly moves while virtual seconds pass, so the 4 s certificate
    // stays valid throughout.
    #[tokio::test(start_paused = true)]
    async fn renews_at_half_life_and_keeps_the_old_one_while_the_ca_is_down() {
        let ca = fake(Duration::from_secs(4));
        let manager = CertificateManager::new(ca.clone());
        let web = id("web");
        let first = manager.get(&web).await.unwrap();
        let received = tokio::time::Instant::now();
        let deadline = received + Duration::from_secs(10);
        while manager.current(&web).unwrap().serial == first.serial {
            assert!(tokio::time::Instant::now() < deadline, "never renewed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Half the lifetime, less up to 10% jitter, plus the fake CA's 20 ms.
        // not_after is whole seconds, so the lifetime is in (3 s, 4 s] and
        // the renewal comes in (1.37 s, 2.02 s] of virtual time.
        let renewed_after = received.elapsed();
        assert!(
            renewed_after > Duration::from_millis(1350)
                && renewed_after <= Duration::from_millis(2050),
            "renewed after {renewed_after:?}, not near half-life"
        );
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2, "renewed exactly once");

        // The CA goes down: the next renewal fails and is retried, and the
        // still-valid certificate keeps being served meanwhile.
        ca.failing.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ca.calls.load(Ordering::SeqCst) < 4 {
            assert!(tokio::time::Instant::now() < deadline, "no retries");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            manager.current(&web).is_some(),
            "a valid certificate is kept"
        );
        manager.forget(&web);
        assert!(manager.current(&web).is_none());
        assert!(manager.snapshot().is_empty());
    }

    // Real time: expiry reads the wall clock. The CA goes down and takes
    // 3 s to fail each request, so the renewal that started at half-life is
    // still in flight when the certificate expires; a caller must not wait
    // for it.
    #[tokio::test]
    async fn an_expired_certificate_is_refused_at_once_while_the_ca_is_down() {
        let mut ca = fake(Duration::from_secs(3));
        Arc::get_mut(&mut ca).unwrap().failing_after = Duration::from_secs(3);
        let manager = CertificateManager::new(ca.clone());
        let web = id("web");
        let first = manager.get(&web).await.unwrap();
        ca.failing.store(true, Ordering::SeqCst);
        let until_expiry = first
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(until_expiry + Duration::from_millis(50)).await;
        // Waiting for the renewal in flight would answer with its failure
        // (Unavailable) about 1.5 s later; the expiry itself is the answer.
        let got = tokio::time::timeout(Duration::from_secs(10), manager.get(&web))
            .await
            .expect("an answer within 10 s");
        assert!(matches!(got, Err(IdentityError::Expired(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_refusal_reaches_the_caller() {
        let ca = fake(Duration::from_secs(3600));
        ca.failing.store(true, Ordering::SeqCst);
        let manager = CertificateManager::new(ca);
        assert!(matches!(
            manager.get(&id("web")).await,
            Err(IdentityError::Unavailable(_))
        ));
    }

    #[test]
    fn a_certificate_for_another_identity_is_refused() {
        let ca = CertificateAuthority::create_root(CaPolicy::new("cluster.local"))
            .unwrap()
            .0;
        let key = WorkloadKey::generate().unwrap();
        let issued = ca.sign_for_key(&id("db"), &key, None).unwrap();
        let err =
            WorkloadCertificate::from_ca_response(&id("web"), &key, &issued.chain_pem).unwrap_err();
        assert!(matches!(err, IdentityError::BadResponse(_)), "{err}");
    }
}
