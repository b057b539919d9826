//! Identities and certificates for meshbox.
//!
//! This crate owns everything cryptographic that the control plane and the
//! dataplane share: SPIFFE identities (`spiffe://td/ns/N/sa/S`), the
//! certificate authority that signs workload certificates (self-made root, or a
//! user-supplied `cacerts` CA), CSR validation and generation, PEM handling, and
//! the rustls configurations that authenticate peers by SPIFFE identity.
//!
//! It does no I/O except reading and writing the CA's own files, and knows
//! nothing about who is *allowed* a certificate: authorization is the caller's
//! job (the control plane's CA service).

pub mod ca;
pub mod csr;
#[doc(hidden)]
pub mod fuzzing;
pub mod pem;
pub mod spiffe;
pub mod tls;

pub use ca::{CaError, CertificateAuthority, IssuedCertificate};
pub use csr::{CsrError, ValidatedCsr, WorkloadKey};
pub use spiffe::{SpiffeId, SpiffeIdError};

/// Installs aws-lc-rs as rustls' process-wide crypto provider if none is set
/// yet. Its AES-GCM (AVX-512/VAES where the CPU has them) sealed and opened
/// the data path's records 1.5-1.65x as fast as ring's on our bench machine.
/// Every binary calls this once at start-up; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = tls::default_provider().install_default();
}
