//! Istio's `CreateCertificate` client: one CSR per identity, a bearer token
//! read fresh from its file on every request (tokens rotate), and Istio's
//! `ImpersonatedIdentity` when a node proxy asks on a pod's behalf.

use std::time::Duration;

use meshbox_certs::{SpiffeId, WorkloadKey};
use meshbox_proto::ca::IstioCertificateRequest;
use meshbox_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::{Struct, Value, value::Kind};
use tonic::transport::Channel;

use super::{CertificateProvider, IdentityError, WorkloadCertificate};
use crate::token::TokenFile;

pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    /// `None`: requests go without a token (a development CA).
    token: Option<TokenFile>,
    /// Node mode: ask for pods' identities with `ImpersonatedIdentity`.
    impersonate: bool,
    ttl: Duration,
}

impl CaClient {
    pub fn new(
        channel: Channel,
        token: Option<TokenFile>,
        impersonate: bool,
        ttl: Duration,
    ) -> Self {
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
        if let Some(token) = &self.token {
            token
                .authorize(&mut request)
                .await
                .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
        }
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
                    identity: identity.clone(),
                    message: format!("{:?}: {}", status.code(), status.message()),
                },
            })?;
        WorkloadCertificate::from_ca_response(identity, &key, &response.into_inner().cert_chain)
    }
}
