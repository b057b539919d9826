//! rustls configurations that authenticate peers by SPIFFE identity.
//!
//! Web PKI name checks do not fit a mesh: a workload is known by the URI SAN
//! `spiffe://td/ns/N/sa/S`, not by a DNS name. These verifiers check the chain
//! against our roots with webpki as usual, then check the SPIFFE ID.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::SpiffeId;

/// The SPIFFE ID in a certificate's URI SAN, if it has exactly one.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    first.parse().ok()
}

/// Facts about a certificate that logs and status pages show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Lower-case hex.
    pub serial: String,
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
}

/// Serial and validity of a DER certificate.
pub fn certificate_info(cert: &CertificateDer<'_>) -> Option<CertificateInfo> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
        } else {
            std::time::UNIX_EPOCH
        }
    };
    Some(CertificateInfo {
        serial: parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_before: at(parsed.validity().not_before),
        not_after: at(parsed.validity().not_after),
    })
}

/// The process-wide provider if a binary installed one
/// ([`crate::install_crypto_provider`]), else aws-lc-rs. Every config we build
/// names it, because with two providers compiled in rustls will not pick one.
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(default_provider()))
}

/// Our choice of provider: aws-lc-rs (see [`crate::install_crypto_provider`]).
pub(crate) fn default_provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, rustls::Error> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(store)
}

/// Checks a server's chain against our roots and its SPIFFE ID against the
/// identities the caller expects (the destination workload's, or a service's
/// `subject_alt_names`).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Vec<rustls_pki_types::TrustAnchor<'static>>,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: &[CertificateDer<'static>],
        expected: Vec<SpiffeId>,
    ) -> Result<Self, rustls::Error> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| rustls::Error::General(format!("bad root: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            roots: anchors,
            expected,
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad server certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate not trusted: {e}")))?;
        let id = spiffe_id_of(end_entity).ok_or_else(|| {
            rustls::Error::General("server certificate has no SPIFFE identity".into())
        })?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server identity {id} is not one of the expected identities"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks a client's chain against our roots and requires a SPIFFE ID in our
/// trust domain. Which identity may do what is decided after the handshake.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    /// `optional`: a client without a certificate may still connect (and
    /// authenticate some other way, such as a bearer token).
    pub fn new(
        roots: &[CertificateDer<'static>],
        trust_domain: &str,
        optional: bool,
    ) -> Result<Self, rustls::Error> {
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider());
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        let inner = builder
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Self {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Empty hints: clients should not need them, and they leak our roots.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match spiffe_id_of(end_entity) {
            Some(id) if id.trust_domain() == self.trust_domain => {
                Ok(ClientCertVerified::assertion())
            }
            Some(id) => Err(rustls::Error::General(format!(
                "client identity {id} is outside trust domain {}",
                self.trust_domain
            ))),
            None => Err(rustls::Error::General(
                "client certificate has no SPIFFE identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A mutual-TLS 1.3 server config for a workload: presents `chain`, requires a
/// client certificate with a SPIFFE ID in `trust_domain`.
pub fn workload_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier = SpiffeClientVerifier::new(roots, trust_domain, false)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A mutual-TLS 1.3 client config for a workload: presents `chain`, accepts
/// only a server whose SPIFFE ID is one of `expected`.
pub fn workload_client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &[CertificateDer<'static>],
    expected: Vec<SpiffeId>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier = SpiffeServerVerifier::new(roots, expected)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client config for reaching the control plane: ordinary DNS/IP name checks
/// against our roots, optionally with a client certificate.
pub fn control_plane_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(roots)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CaPolicy, CertificateAuthority};
    use crate::csr::WorkloadKey;
    use tokio_test_free::handshake;

    /// Runs a TLS handshake in memory between the two configs.
    mod tokio_test_free {
        use rustls::{ClientConnection, ServerConnection};
        use std::sync::Arc;

        pub fn handshake(
            client: rustls::ClientConfig,
            server: rustls::ServerConfig,
        ) -> Result<ServerConnection, rustls::Error> {
            let name = "workload.invalid".try_into().unwrap();
            let mut c = ClientConnection::new(Arc::new(client), name)?;
            let mut s = ServerConnection::new(Arc::new(server))?;
            for _ in 0..10 {
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets()?;
                let mut buf = Vec::new();
                s.write_tls(&mut buf).unwrap();
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets()?;
                if !c.is_handshaking() && !s.is_handshaking() {
                    return Ok(s);
                }
            }
            Err(rustls::Error::General("handshake did not finish".into()))
        }
    }

    fn identity(
        ca: &CertificateAuthority,
        id: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = WorkloadKey::generate().unwrap();
        let issued = ca.sign_for_key(&id.parse().unwrap(), &key, None).unwrap();
        (issued.chain_der, key.private_key_der())
    }

    #[test]
    fn mutual_tls_checks_both_identities() {
        crate::install_crypto_provider();
        let (ca, _, _) = CertificateAuthority::create_root(CaPolicy::new("cluster.local")).unwrap();
        let roots = ca.roots().to_vec();
        let (server_chain, server_key) = identity(&ca, "spiffe://cluster.local/ns/a/sa/server");
        let (client_chain, client_key) = identity(&ca, "spiffe://cluster.local/ns/b/sa/client");
        let server = || {
            workload_server_config(
                server_chain.clone(),
                server_key.clone_key(),
                &roots,
                "cluster.local",
            )
            .unwrap()
        };

        let good = workload_client_config(
            client_chain.clone(),
            client_key.clone_key(),
            &roots,
            vec!["spiffe://cluster.local/ns/a/sa/server".parse().unwrap()],
        )
        .unwrap();
        let conn = handshake(good, server()).unwrap();
        let peer = conn.peer_certificates().unwrap();
        assert_eq!(
            spiffe_id_of(&peer[0]).unwrap().to_string(),
            "spiffe://cluster.local/ns/b/sa/client"
        );

        let wrong_expectation = workload_client_config(
            client_chain,
            client_key,
            &roots,
            vec!["spiffe://cluster.local/ns/a/sa/other".parse().unwrap()],
        )
        .unwrap();
        assert!(handshake(wrong_expectation, server()).is_err());

        // A client from another CA is refused by the server.
        let (other_ca, _, _) =
            CertificateAuthority::create_root(CaPolicy::new("cluster.local")).unwrap();
        let (foreign_chain, foreign_key) =
            identity(&other_ca, "spiffe://cluster.local/ns/b/sa/client");
        let foreign = workload_client_config(
            foreign_chain,
            foreign_key,
            &roots,
            vec!["spiffe://cluster.local/ns/a/sa/server".parse().unwrap()],
        )
        .unwrap();
        assert!(handshake(foreign, server()).is_err());
    }
}
