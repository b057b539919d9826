//! Istio's `istio.v1.auth.IstioCertificateService/CreateCertificate`.

use std::sync::Arc;
use std::time::Duration;

use meshbox_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use meshbox_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use super::{CertificateIssuer, IssueError, IssueRequest, MAX_CSR_BYTES};
use crate::auth::{AuthError, Authenticator};

/// Metadata key (in the request's `metadata` Struct) naming the identity a
/// node proxy asks for on a pod's behalf.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

pub struct CaGrpc {
    issuer: Arc<CertificateIssuer>,
    auth: Arc<Authenticator>,
}

impl CaGrpc {
    pub fn server(
        issuer: Arc<CertificateIssuer>,
        auth: Arc<Authenticator>,
    ) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(Self { issuer, auth })
            .max_decoding_message_size(MAX_CSR_BYTES + 4096)
    }
}

/// Maps an authentication failure to its gRPC status.
pub fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::NotAllowed(_) => Status::permission_denied(e.to_string()),
        AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaGrpc {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let caller = self
            .auth
            .authenticate_header(header.as_deref())
            .await
            .map_err(auth_status)?;
        let body = request.into_inner();
        if body.validity_duration < 0 {
            return Err(Status::invalid_argument(
                "validity_duration must not be negative",
            ));
        }
        // 0 is proto3's "not set": the CA's default lifetime.
        let ttl = (body.validity_duration > 0)
            .then(|| Duration::from_secs(body.validity_duration as u64));
        let impersonate = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Ok(s.as_str()),
                _ => Err(Status::invalid_argument(
                    "ImpersonatedIdentity must be a string",
                )),
            })
            .transpose()?;
        let issued = self
            .issuer
            .issue(
                &caller,
                IssueRequest {
                    csr_pem: body.csr.as_bytes(),
                    ttl,
                    impersonate,
                    via: "grpc",
                },
            )
            .map_err(|e| match e {
                IssueError::BadCsr(_) | IssueError::BadRequest(_) => {
                    Status::invalid_argument(e.to_string())
                }
                IssueError::Forbidden(_) => Status::permission_denied(e.to_string()),
                IssueError::RateLimited => Status::resource_exhausted(e.to_string()),
                IssueError::Internal(_) => Status::internal(e.to_string()),
            })?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.chain_pem,
        }))
    }
}
