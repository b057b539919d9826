//! The certificate authority: a signing key and certificate (our own
//! self-made root, or a user-supplied intermediate in Istio's `cacerts`
//! layout), the chain up to the root, and the rules every issued leaf obeys.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::{ValidatedCsr, WorkloadKey};
use crate::pem::{self, PemError};
use crate::spiffe::SpiffeId;

/// Lifetime of a root this CA makes for itself.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start this long in the past so peers with a slightly slow clock
/// accept them. Two minutes, as Istio's CA: a node up to that far behind
/// ours works with either.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(120);

/// File names, the same as Istio's so existing tooling and docs carry over.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pem { path: PathBuf, source: PemError },
    #[error("invalid CA material: {0}")]
    Invalid(String),
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// Where the signing key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaSource {
    /// Made on first start and kept in the state directory.
    SelfSigned,
    /// A user-supplied `cacerts` folder.
    Plugged,
}

/// One certificate this CA signed.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The URI SAN for workload leaves; the first DNS name for serving certs.
    pub subject: String,
    /// Lower-case hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// PEM certificates, leaf first, root last.
    pub chain_pem: Vec<String>,
    /// DER certificates in the same order.
    pub chain_der: Vec<CertificateDer<'static>>,
}

/// Options that bound what the CA issues.
#[derive(Debug, Clone)]
pub struct CaPolicy {
    pub trust_domain: String,
    /// Lifetime of a leaf when the request does not ask for one.
    pub default_ttl: Duration,
    /// The longest lifetime any leaf gets; longer requests are cut to this.
    pub max_ttl: Duration,
}

impl CaPolicy {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct CertificateAuthority {
    policy: CaPolicy,
    issuer: Issuer<'static, KeyPair>,
    signing_not_after: OffsetDateTime,
    /// Certificates above a leaf, nearest first, root last (PEM and DER).
    upper_chain_pem: Vec<String>,
    upper_chain_der: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    source: CaSource,
    rng: SystemRandom,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.policy.trust_domain)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Uses `cacerts_dir` when it holds a `ca-cert.pem`; otherwise loads the
    /// self-made root from `state_dir`, creating and saving it on first start.
    pub fn load_or_create(
        state_dir: &Path,
        cacerts_dir: Option<&Path>,
        policy: CaPolicy,
    ) -> Result<Self, CaError> {
        if let Some(dir) = cacerts_dir
            && dir.join(CA_CERT_FILE).exists()
        {
            return Self::from_cacerts(dir, policy);
        }
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            return Self::from_root_pem(&cert_pem, &key_pem, policy);
        }
        let (ca, cert_pem, key_pem) = Self::create_root(policy)?;
        fs::create_dir_all(state_dir).map_err(|source| CaError::Write {
            path: state_dir.to_owned(),
            source,
        })?;
        // Both written in full before either takes its name: a disk that
        // fills up in between would otherwise leave a key without its
        // certificate, which every later start refuses to load.
        let key = stage(&key_path, key_pem.as_bytes(), 0o600)?;
        let cert = stage(&cert_path, cert_pem.as_bytes(), 0o644)?;
        key.commit()?;
        cert.commit()?;
        tracing::info!(path = %cert_path.display(), "created a new root CA");
        Ok(ca)
    }

    /// Makes a new self-signed root (ECDSA P-256). Returns it with its PEM
    /// certificate and key, for the caller to persist.
    pub fn create_root(policy: CaPolicy) -> Result<(Self, String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, policy.trust_domain.clone());
        dn.push(DnType::CommonName, "meshbox root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial(&SystemRandom::new())?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let ca = Self::from_root_pem(&cert_pem, &key_pem, policy)?;
        Ok((ca, cert_pem, key_pem))
    }

    /// A self-signed root whose key signs leaves directly.
    pub fn from_root_pem(cert_pem: &str, key_pem: &str, policy: CaPolicy) -> Result<Self, CaError> {
        let root = single_cert(cert_pem.as_bytes(), Path::new(ROOT_CERT_FILE))?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::Invalid(format!("{ROOT_KEY_FILE}: {e}")))?;
        Self::assemble(
            root.clone(),
            key,
            vec![],
            vec![root],
            CaSource::SelfSigned,
            policy,
        )
    }

    /// A user-supplied CA in Istio's `cacerts` layout: `ca-cert.pem` and
    /// `ca-key.pem` sign, `cert-chain.pem` leads from `ca-cert.pem` towards
    /// the root, `root-cert.pem` holds the trusted root(s).
    pub fn from_cacerts(dir: &Path, policy: CaPolicy) -> Result<Self, CaError> {
        let path = |f: &str| dir.join(f);
        let chain = if path(CERT_CHAIN_FILE).exists() {
            read(&path(CERT_CHAIN_FILE))?
        } else {
            String::new()
        };
        Self::from_cacerts_pem(
            &read(&path(CA_CERT_FILE))?,
            &read(&path(CA_KEY_FILE))?,
            &chain,
            &read(&path(ROOT_CERT_FILE))?,
            policy,
        )
    }

    /// [`from_cacerts`](Self::from_cacerts) from the four files' contents
    /// (e.g. the keys of a Kubernetes Secret); `cert_chain` may be empty.
    pub fn from_cacerts_pem(
        ca_cert: &str,
        ca_key: &str,
        cert_chain: &str,
        root_cert: &str,
        policy: CaPolicy,
    ) -> Result<Self, CaError> {
        let signing = single_cert(ca_cert.as_bytes(), Path::new(CA_CERT_FILE))?;
        let key = KeyPair::from_pem(ca_key)
            .map_err(|e| CaError::Invalid(format!("{CA_KEY_FILE}: {e}")))?;
        let roots =
            pem::parse_certificates(root_cert.as_bytes()).map_err(|source| CaError::Pem {
                path: ROOT_CERT_FILE.into(),
                source,
            })?;
        let chain = if cert_chain.trim().is_empty() {
            vec![]
        } else {
            pem::parse_certificates(cert_chain.as_bytes()).map_err(|source| CaError::Pem {
                path: CERT_CHAIN_FILE.into(),
                source,
            })?
        };
        // cert-chain.pem may or may not start with ca-cert.pem and end with
        // the root; keep only the certificates strictly between the two.
        let intermediates: Vec<_> = chain
            .into_iter()
            .filter(|c| c != &signing && !roots.contains(c))
            .collect();
        Self::assemble(
            signing,
            key,
            intermediates,
            roots,
            CaSource::Plugged,
            policy,
        )
    }

    fn assemble(
        signing: CertificateDer<'static>,
        key: KeyPair,
        intermediates: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        source: CaSource,
        policy: CaPolicy,
    ) -> Result<Self, CaError> {
        crate::spiffe::check_trust_domain(&policy.trust_domain)
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        let (_, parsed) = X509Certificate::from_der(&signing)
            .map_err(|e| CaError::Invalid(format!("signing certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(CaError::Invalid(
                "the signing certificate is not a CA certificate (basicConstraints CA:TRUE)".into(),
            ));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Invalid(
                "the signing key does not match the signing certificate".into(),
            ));
        }
        let signing_not_after = parsed.validity().not_after.to_datetime();
        if signing_not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::Invalid(
                "the signing certificate has expired".into(),
            ));
        }
        // The path signing -> intermediates -> one of the roots must verify,
        // or every leaf we hand out would be useless.
        let mut path: Vec<CertificateDer<'static>> = vec![signing.clone()];
        path.extend(intermediates.iter().cloned());
        verify_path_to_roots(&path, &roots)?;

        let issuer = Issuer::from_ca_cert_der(&signing, key)?;
        let mut upper_chain_der: Vec<CertificateDer<'static>> = vec![];
        if source == CaSource::Plugged {
            upper_chain_der.push(signing.clone());
            upper_chain_der.extend(intermediates);
        }
        // Root last; for a self-signed CA the signing cert is the root.
        let anchor = issuing_root(path.last().unwrap_or(&signing), &roots)
            .unwrap_or_else(|| roots[0].clone());
        upper_chain_der.push(anchor);
        let upper_chain_pem = upper_chain_der
            .iter()
            .map(|c| pem::encode_certificate(c))
            .collect();
        Ok(Self {
            policy,
            issuer,
            signing_not_after,
            upper_chain_pem,
            upper_chain_der,
            roots,
            source,
            rng: SystemRandom::new(),
        })
    }

    pub fn policy(&self) -> &CaPolicy {
        &self.policy
    }

    pub fn trust_domain(&self) -> &str {
        &self.policy.trust_domain
    }

    pub fn source(&self) -> CaSource {
        self.source
    }

    /// The trusted root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trusted roots as one PEM bundle.
    pub fn roots_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| pem::encode_certificate(c))
            .collect()
    }

    /// The lifetime a leaf gets for a requested one: the default when none is
    /// asked, never more than the maximum nor past the signing cert's expiry.
    pub fn effective_ttl(&self, requested: Option<Duration>) -> Duration {
        requested
            .unwrap_or(self.policy.default_ttl.min(self.policy.max_ttl))
            .min(self.policy.max_ttl)
    }

    /// Signs a validated CSR into a SPIFFE leaf.
    pub fn sign(
        &self,
        csr: &ValidatedCsr,
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, CaError> {
        let mut params = self.leaf_params(ttl)?;
        params.subject_alt_names = vec![SanType::URI(csr.identity.to_string().try_into()?)];
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(self.issued(csr.identity.to_string(), &params, cert.der().clone()))
    }

    /// Issues a leaf for a key held in this process (the dataplane's own
    /// tests, and the control plane when it needs a workload identity).
    pub fn sign_for_key(
        &self,
        identity: &SpiffeId,
        key: &WorkloadKey,
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, CaError> {
        let mut params = self.leaf_params(ttl)?;
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        let cert = params.signed_by(key.key_pair(), &self.issuer)?;
        Ok(self.issued(identity.to_string(), &params, cert.der().clone()))
    }

    /// A TLS serving certificate for the control plane's own ports, covering
    /// the given DNS names and IPs. Returns the chain and the PEM private key.
    pub fn issue_serving_certificate(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(IssuedCertificate, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.leaf_params(Some(ttl))?;
        params.not_after = self.cap_expiry(OffsetDateTime::now_utc() + ttl);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "meshbox control plane");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let subject = dns_names.first().cloned().unwrap_or_default();
        Ok((
            self.issued(subject, &params, cert.der().clone()),
            key.serialize_pem(),
        ))
    }

    fn leaf_params(&self, ttl: Option<Duration>) -> Result<CertificateParams, CaError> {
        let ttl = self.effective_ttl(ttl);
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = self.cap_expiry(now + ttl);
        params.serial_number = Some(random_serial(&self.rng)?);
        Ok(params)
    }

    fn cap_expiry(&self, wanted: OffsetDateTime) -> OffsetDateTime {
        wanted.min(self.signing_not_after)
    }

    fn issued(
        &self,
        subject: String,
        params: &CertificateParams,
        leaf: CertificateDer<'static>,
    ) -> IssuedCertificate {
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes().iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
        let mut chain_pem = Vec::with_capacity(self.upper_chain_pem.len() + 1);
        chain_pem.push(pem::encode_certificate(&leaf));
        chain_pem.extend(self.upper_chain_pem.iter().cloned());
        let mut chain_der = Vec::with_capacity(self.upper_chain_der.len() + 1);
        chain_der.push(leaf);
        chain_der.extend(self.upper_chain_der.iter().cloned());
        IssuedCertificate {
            subject,
            serial,
            not_before: params.not_before,
            not_after: params.not_after,
            chain_pem,
            chain_der,
        }
    }
}

fn random_serial(rng: &SystemRandom) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes)
        .map_err(|_| CaError::Invalid("no randomness for a serial number".into()))?;
    // Positive and without a leading zero byte, as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn single_cert(pem_bytes: &[u8], path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let mut certs = pem::parse_certificates(pem_bytes).map_err(|source| CaError::Pem {
        path: path.to_owned(),
        source,
    })?;
    Ok(certs.swap_remove(0))
}

/// Checks that each certificate in `path` is signed by the next one, and the
/// last one by (or is) one of `roots`.
fn verify_path_to_roots(
    path: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), CaError> {
    for pair in path.windows(2) {
        let child = parse(&pair[0])?;
        let parent = parse(&pair[1])?;
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|_| CaError::Invalid("cert-chain.pem is not a signing chain".into()))?;
    }
    let Some(top) = path.last() else {
        return Err(CaError::Invalid("empty chain".into()));
    };
    if issuing_root(top, roots).is_some() {
        Ok(())
    } else {
        Err(CaError::Invalid(
            "the CA certificate does not chain to any certificate in root-cert.pem".into(),
        ))
    }
}

/// The root in `roots` that is `cert` itself or that signed it.
fn issuing_root(
    cert: &CertificateDer<'static>,
    roots: &[CertificateDer<'static>],
) -> Option<CertificateDer<'static>> {
    if roots.contains(cert) {
        return Some(cert.clone());
    }
    let (_, child) = X509Certificate::from_der(cert).ok()?;
    roots
        .iter()
        .find(|root| {
            X509Certificate::from_der(root)
                .map(|(_, r)| child.verify_signature(Some(r.public_key())).is_ok())
                .unwrap_or(false)
        })
        .cloned()
}

fn parse<'a>(der: &'a CertificateDer<'static>) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::Invalid(format!("unreadable certificate: {e}")))
}

/// Writes via a temporary file and a rename, so a crash never leaves half a
/// key behind.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    stage(path, contents, mode)?.commit()
}

/// A file written in full beside its final path; [`Staged::commit`] gives
/// it that name. Dropped before that (a later step failed), it is removed,
/// so a failed write leaves nothing behind, not even a partial copy.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

fn stage(path: &Path, contents: &[u8], mode: u32) -> Result<Staged, CaError> {
    let staged = Staged {
        tmp: path.with_extension("tmp"),
        path: path.to_owned(),
        committed: false,
    };
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = options.open(&staged.tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(staged)
}

impl Staged {
    fn commit(mut self) -> Result<(), CaError> {
        fs::rename(&self.tmp, &self.path).map_err(|source| CaError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn policy() -> CaPolicy {
        CaPolicy::new("cluster.local")
    }

    fn leaf(chain: &IssuedCertificate) -> X509Certificate<'_> {
        X509Certificate::from_der(&chain.chain_der[0]).unwrap().1
    }

    #[test]
    fn signs_a_spiffe_leaf_with_the_right_shape() {
        let (ca, _, _) = CertificateAuthority::create_root(policy()).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let csr =
            ValidatedCsr::from_pem(key.csr_pem(&id).unwrap().as_bytes(), "cluster.local").unwrap();
        let issued = ca.sign(&csr, Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(issued.chain_der.len(), 2, "leaf + root");
        let cert = leaf(&issued);
        assert!(!cert.is_ca());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "empty subject => critical SAN");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let root = X509Certificate::from_der(&issued.chain_der[1]).unwrap().1;
        cert.verify_signature(Some(root.public_key())).unwrap();
        let lifetime = issued.not_after - OffsetDateTime::now_utc();
        assert!(lifetime <= time::Duration::hours(1) && lifetime > time::Duration::minutes(59));
    }

    #[test]
    fn caps_ttl_at_the_maximum() {
        let (ca, _, _) = CertificateAuthority::create_root(policy()).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let issued = ca
            .sign_for_key(&id, &key, Some(Duration::from_secs(365 * 24 * 3600)))
            .unwrap();
        // Exact, not just an upper bound: a cap that cut the lifetime to
        // one hour would pass `<= 24h`. The leaf is backdated by the skew
        // allowance and expires exactly max_ttl after issuance; both ends
        // are truncated to whole seconds from the same instant, so the
        // encoded validity span is exact too.
        let max_ttl = time::Duration::try_from(policy().max_ttl).unwrap();
        let skew = time::Duration::try_from(CLOCK_SKEW_ALLOWANCE).unwrap();
        assert_eq!(issued.not_after - issued.not_before, max_ttl + skew);
        let validity = leaf(&issued).validity().clone();
        assert_eq!(
            validity.not_after.to_datetime() - validity.not_before.to_datetime(),
            max_ttl + skew
        );
        assert_eq!(max_ttl, time::Duration::hours(24));
    }

    #[test]
    fn root_persists_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = CertificateAuthority::load_or_create(&dir, None, policy()).unwrap();
        let second = CertificateAuthority::load_or_create(&dir, None, policy()).unwrap();
        assert_eq!(first.roots(), second.roots());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(ROOT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "root key must not be readable by others");
        }
    }

    /// The certificate cannot be written (here a directory holds its
    /// temporary name; in the field, the disk is full): the start fails and
    /// leaves no key without a certificate, so the next start, once the
    /// cause is gone, makes a root as the first one would have.
    #[test]
    fn a_failed_first_start_leaves_no_half_a_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir_all(dir.join("root-cert.tmp")).unwrap();
        let Err(error) = CertificateAuthority::load_or_create(&dir, None, policy()) else {
            panic!("the certificate cannot be written, yet the start succeeded");
        };
        assert!(error.to_string().contains(ROOT_CERT_FILE), "{error}");
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["root-cert.tmp"], "only the obstacle is left");
        fs::remove_dir(dir.join("root-cert.tmp")).unwrap();
        CertificateAuthority::load_or_create(&dir, None, policy()).expect("starts once it can");
    }

    /// Writes an Istio-style cacerts folder: root -> intermediate.
    fn write_cacerts(dir: &Path) -> String {
        let (root_ca, root_pem, _) = CertificateAuthority::create_root(policy()).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "intermediate");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let inter = params.signed_by(&key, &root_ca.issuer).unwrap();
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(CA_CERT_FILE), inter.pem()).unwrap();
        fs::write(dir.join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        fs::write(
            dir.join(CERT_CHAIN_FILE),
            format!("{}{}", inter.pem(), root_pem),
        )
        .unwrap();
        fs::write(dir.join(ROOT_CERT_FILE), &root_pem).unwrap();
        root_pem
    }

    #[test]
    fn plugged_cacerts_sign_through_the_intermediate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cacerts");
        write_cacerts(&dir);
        let ca = CertificateAuthority::from_cacerts(&dir, policy()).unwrap();
        assert_eq!(ca.source(), CaSource::Plugged);
        let key = WorkloadKey::generate().unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let issued = ca.sign_for_key(&id, &key, None).unwrap();
        assert_eq!(issued.chain_der.len(), 3, "leaf, intermediate, root");
        let parsed: Vec<_> = issued
            .chain_der
            .iter()
            .map(|c| X509Certificate::from_der(c).unwrap().1)
            .collect();
        parsed[0]
            .verify_signature(Some(parsed[1].public_key()))
            .unwrap();
        parsed[1]
            .verify_signature(Some(parsed[2].public_key()))
            .unwrap();

        // A key that does not belong to ca-cert.pem is refused at load time.
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(dir.join(CA_KEY_FILE), other.serialize_pem()).unwrap();
        let err = CertificateAuthority::from_cacerts(&dir, policy()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
