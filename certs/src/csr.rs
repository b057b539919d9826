//! Certificate signing requests: strict validation of what callers send the
//! CA, and generation of workload keys and CSRs for the dataplane.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, SubjectPublicKeyInfo};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::spiffe::{SpiffeId, SpiffeIdError};

const OID_EC_P256: &str = "1.2.840.10045.3.1.7";
const OID_EC_P384: &str = "1.3.132.0.34";
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

/// Why a CSR was refused. Every message tells the caller what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the body is not a PEM 'CERTIFICATE REQUEST'")]
    NotPem,
    #[error("not a valid PKCS#10 certificate request: {0}")]
    NotCsr(String),
    #[error("the CSR's self-signature does not verify")]
    BadSignature,
    #[error("weak or unsupported key: {0}; use ECDSA P-256 (or P-384, RSA >= 2048, Ed25519)")]
    WeakKey(String),
    #[error(
        "the CSR has no URI SAN: add one, e.g. -addext subjectAltName=URI:spiffe://cluster.local/ns/NS/sa/SA"
    )]
    NoSpiffeUri,
    #[error("the CSR has {0} URI SANs; exactly one SPIFFE ID is allowed")]
    MultipleUris(usize),
    #[error("the CSR asks for a {0} SAN; only one URI SAN (the SPIFFE ID) is allowed")]
    DisallowedSan(&'static str),
    #[error("the URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffe(SpiffeIdError),
    #[error("the SPIFFE ID is in trust domain {got:?}, this CA serves {want:?}")]
    ForeignTrustDomain { got: String, want: String },
}

/// A CSR that passed every check: signed by its key, a strong key, and
/// exactly one SPIFFE identity in the CA's trust domain.
#[derive(Debug)]
pub struct ValidatedCsr {
    pub identity: SpiffeId,
    pub(crate) public_key: SubjectPublicKeyInfo,
}

impl ValidatedCsr {
    /// Parses and checks a PEM CSR for `trust_domain`.
    pub fn from_pem(pem: &[u8], trust_domain: &str) -> Result<Self, CsrError> {
        let der =
            CertificateSigningRequestDer::from_pem_slice(pem).map_err(|_| CsrError::NotPem)?;
        Self::from_der(der.as_ref(), trust_domain)
    }

    /// Parses and checks a DER CSR for `trust_domain`.
    pub fn from_der(der: &[u8], trust_domain: &str) -> Result<Self, CsrError> {
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|e| CsrError::NotCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::NotCsr("trailing bytes after the request".into()));
        }
        check_key_strength(&csr)?;
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

        let identity = requested_identity(&csr)?;
        if identity.trust_domain() != trust_domain {
            return Err(CsrError::ForeignTrustDomain {
                got: identity.trust_domain().to_owned(),
                want: trust_domain.to_owned(),
            });
        }
        let spki = csr.certification_request_info.subject_pki.raw;
        let public_key = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| CsrError::WeakKey(format!("unsupported key algorithm ({e})")))?;
        Ok(Self {
            identity,
            public_key,
        })
    }
}

fn check_key_strength(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let spki = &csr.certification_request_info.subject_pki;
    let parsed = spki
        .parsed()
        .map_err(|e| CsrError::WeakKey(format!("unreadable public key ({e})")))?;
    match parsed {
        PublicKey::RSA(rsa) => {
            let bits = rsa.key_size();
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err(CsrError::WeakKey(format!("RSA-{bits}")));
            }
        }
        PublicKey::EC(_) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            if curve != OID_EC_P256 && curve != OID_EC_P384 {
                return Err(CsrError::WeakKey(format!("EC curve {curve}")));
            }
        }
        PublicKey::Unknown(_) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => {}
        PublicKey::DSA(_) => return Err(CsrError::WeakKey("DSA".into())),
        _ => {
            return Err(CsrError::WeakKey(format!(
                "algorithm {}",
                spki.algorithm.algorithm.to_id_string()
            )));
        }
    }
    Ok(())
}

fn requested_identity(csr: &X509CertificationRequest<'_>) -> Result<SpiffeId, CsrError> {
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(*uri),
                    GeneralName::DNSName(_) => return Err(CsrError::DisallowedSan("DNS")),
                    GeneralName::IPAddress(_) => return Err(CsrError::DisallowedSan("IP")),
                    GeneralName::RFC822Name(_) => return Err(CsrError::DisallowedSan("email")),
                    _ => return Err(CsrError::DisallowedSan("non-URI")),
                }
            }
        }
    }
    match uris.as_slice() {
        [] => Err(CsrError::NoSpiffeUri),
        [uri] => uri.parse().map_err(CsrError::NotSpiffe),
        many => Err(CsrError::MultipleUris(many.len())),
    }
}

/// A workload's private key, made in-process; only its CSR ever leaves.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(<redacted>)")
    }
}

impl WorkloadKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, rcgen::Error> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A PEM CSR asking for `identity` (its only SAN), signed by this key.
    pub fn csr_pem(&self, identity: &SpiffeId) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.serialize_request(&self.key)?.pem()
    }

    /// The private key as PKCS#8 DER, for building a TLS config in-process.
    pub fn private_key_der(&self) -> rustls_pki_types::PrivateKeyDer<'static> {
        rustls_pki_types::PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn accepts_a_generated_workload_csr() {
        let key = WorkloadKey::generate().unwrap();
        let identity = id("spiffe://cluster.local/ns/default/sa/web");
        let pem = key.csr_pem(&identity).unwrap();
        let csr = ValidatedCsr::from_pem(pem.as_bytes(), "cluster.local").unwrap();
        assert_eq!(csr.identity, identity);
    }

    #[test]
    fn refuses_foreign_trust_domain() {
        let key = WorkloadKey::generate().unwrap();
        let pem = key
            .csr_pem(&id("spiffe://evil.example/ns/default/sa/web"))
            .unwrap();
        assert!(matches!(
            ValidatedCsr::from_pem(pem.as_bytes(), "cluster.local"),
            Err(CsrError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(
            ValidatedCsr::from_pem(b"hello", "cluster.local").unwrap_err(),
            CsrError::NotPem
        );
        let not_a_csr =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            ValidatedCsr::from_pem(not_a_csr.as_bytes(), "cluster.local"),
            Err(CsrError::NotCsr(_))
        ));
    }

    fn csr_with_sans(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn refuses_extra_or_missing_sans() {
        let uri = |s: &str| SanType::URI(s.try_into().unwrap());
        let good = "spiffe://cluster.local/ns/a/sa/b";
        let cases = [
            (vec![], CsrError::NoSpiffeUri),
            (
                vec![uri(good), SanType::DnsName("a.example".try_into().unwrap())],
                CsrError::DisallowedSan("DNS"),
            ),
            (
                vec![uri(good), SanType::IpAddress("10.0.0.1".parse().unwrap())],
                CsrError::DisallowedSan("IP"),
            ),
            (
                vec![uri(good), SanType::Rfc822Name("a@b.c".try_into().unwrap())],
                CsrError::DisallowedSan("email"),
            ),
            (
                vec![uri(good), uri("spiffe://cluster.local/ns/a/sa/c")],
                CsrError::MultipleUris(2),
            ),
        ];
        for (sans, want) in cases {
            let pem = csr_with_sans(sans);
            assert_eq!(
                ValidatedCsr::from_pem(pem.as_bytes(), "cluster.local").unwrap_err(),
                want
            );
        }
        let pem = csr_with_sans(vec![uri("https://example.com/x")]);
        assert!(matches!(
            ValidatedCsr::from_pem(pem.as_bytes(), "cluster.local"),
            Err(CsrError::NotSpiffe(_))
        ));
    }
}
