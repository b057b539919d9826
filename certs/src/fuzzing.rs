//! Entry points shared by the fuzz targets in `fuzz/` and the corpus replay
//! test (`tests/fuzz_corpus.rs`), so both run exactly the same checks.
//!
//! Each takes arbitrary bytes, runs them through the code the CA and the
//! dataplane run on untrusted input, and panics only when a property that
//! must hold for every input is broken: a panic here is a bug found, which
//! is what a fuzzer reports. Not part of the crate's API.

use std::sync::OnceLock;

use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::ca::{CaPolicy, CertificateAuthority};
use crate::csr::ValidatedCsr;
use crate::spiffe::{SpiffeId, check_trust_domain};

/// The trust domain the fuzzed CA serves (the seeds ask for it).
pub const TRUST_DOMAIN: &str = "cluster.local";

/// SPIFFE ID parsing. Properties: an accepted ID prints as exactly the text
/// it was parsed from (no normalisation an attacker could play with), parses
/// again to the same identity, and is rebuilt from its parts unchanged.
/// Returns whether the input was accepted.
pub fn spiffe_id(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let _ = check_trust_domain(text);
    let Ok(id) = text.parse::<SpiffeId>() else {
        return false;
    };
    assert_eq!(id.as_str(), text, "an accepted ID is printed as given");
    let again: SpiffeId = match id.to_string().parse() {
        Ok(again) => again,
        Err(e) => panic!("{id:?} printed does not parse again: {e}"),
    };
    assert_eq!(again, id, "print/parse round trip");
    assert_eq!(again.cmp(&id), std::cmp::Ordering::Equal);
    let rebuilt = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account());
    assert_eq!(rebuilt.as_ref(), Ok(&id), "rebuilt from its parts");
    true
}

/// The CA's CSR check, on the input as DER and as PEM. Properties of an
/// accepted CSR: its identity is in the CA's trust domain, the request's
/// only SAN is exactly that identity, and the certificate the CA then
/// signs names that identity and nothing else. Returns whether either
/// form was accepted.
pub fn csr(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(csr) = ValidatedCsr::from_der(data, TRUST_DOMAIN) {
        check_accepted_csr(&csr, data);
        accepted = true;
    }
    if let Ok(csr) = ValidatedCsr::from_pem(data, TRUST_DOMAIN) {
        match CertificateSigningRequestDer::from_pem_slice(data) {
            Ok(der) => check_accepted_csr(&csr, der.as_ref()),
            Err(e) => panic!("accepted PEM that does not decode on its own: {e:?}"),
        }
        accepted = true;
    }
    accepted
}

fn check_accepted_csr(csr: &ValidatedCsr, der: &[u8]) {
    assert_eq!(csr.identity.trust_domain(), TRUST_DOMAIN);
    let Ok((_, parsed)) = X509CertificationRequest::from_der(der) else {
        panic!("accepted a CSR that does not parse");
    };
    let mut sans = Vec::new();
    for ext in parsed.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            sans.extend(san.general_names.iter().map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            }));
        }
    }
    assert_eq!(
        sans,
        [Some(csr.identity.as_str())],
        "the SAN is exactly the identity"
    );
    let issued = match ca().sign(csr, None) {
        Ok(issued) => issued,
        Err(e) => panic!("the CA cannot sign a CSR it accepted: {e}"),
    };
    let Some(leaf) = issued.chain_der.first() else {
        panic!("a signed chain without a leaf");
    };
    assert_eq!(
        crate::tls::spiffe_id_of(leaf).as_ref(),
        Some(&csr.identity),
        "the issued certificate names the requested identity"
    );
}

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(
        || match CertificateAuthority::create_root(CaPolicy::new(TRUST_DOMAIN)) {
            Ok((ca, _, _)) => ca,
            Err(e) => panic!("cannot make the fuzzing CA: {e}"),
        },
    )
}
