//! Istio's `CreateCertificate` client: one CSR per identity, a bearer token
//! read fresh from its file on every request (tokens rotate), and Istio's
//! `ImpersonatedIdentity` when a node proxy asks on a pod's behalf.

use std::path::PathBuf;
use std::time::Duration;

use meshbox_certs::{SpiffeId, WorkloadKey};
use meshbox_proto::ca::IstioCertificateRequest;
use meshbox_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::{Struct, Value, value::Kind};
use tonic::transport::Channel;

use super::{CertificateProvider, IdentityError, WorkloadCertificate};

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No token (a development CA on the plaintext port).
    None,
    /// A file holding the token, re-read on each request (Istio's `AUTH_TOKEN`).
    File(PathBuf),
}

impl TokenSource {
    /// Puts `authorization: Bearer <token>` on `request` (nothing for
    /// [`TokenSource::None`]).
    pub(crate) fn authorize<T>(
        &self,
        request: &mut tonic::Request<T>,
    ) -> Result<(), IdentityError> {
        if let Some(token) = self.read()? {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                IdentityError::Unavailable("the token is not a valid header".into())
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(())
    }

    fn read(&self) -> Result<Option<String>, IdentityError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| {
                    IdentityError::Unavailable(format!("reading the token {}: {e}", path.display()))
                }),
        }
    }
}

pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    token: TokenSource,
    /// Node mode: ask for pods' identities with `ImpersonatedIdentity`.
    impersonate: bool,
    ttl: Duration,
}

impl CaClient {
    pub fn new(channel: Channel, token: TokenSource, impersonate: bool, ttl: Duration) -> Self {
        Self {
            client: IstioCertificateServiceClient::new(channel),
            token,
            impersonate,
            ttl,
        }
    }
}

#[tonic::async_trait]
impl CertificateProvider for CaClient {
    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, IdentityError> {
        let key = WorkloadKey::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
        let csr = key
            .csr_pem(identity)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let metadata = self.impersonate.then(|| Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.ttl.as_secs() as i64,
            metadata,
        });
        self.token.authorize(&mut request)?;
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                    IdentityError::Unavailable(status.message().to_owned())
                }
                _ => IdentityError::Refused {
                    identity: identity.to_string(),
                    message: format!("{:?}: {}", status.code(), status.message()),
                },
            })?;
        WorkloadCertificate::from_ca_response(identity, &key, &response.into_inner().cert_chain)
    }
}
