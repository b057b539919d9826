//! Asks the control plane whether a pod the CNI plugin just reported is in
//! the mesh (meshbox's `EnrollmentService/Lookup`).
//!
//! At CNI ADD the pod has no IP in the API yet, so it is no workload in
//! xDS; the control plane knows from the pod's and its namespace's labels
//! all the same. Without this answer (Istio's control plane, or ours
//! unreachable) the agent falls back to guessing from the namespace's
//! other workloads.

use std::time::Duration;

use meshbox_proto::meshbox::EnrollmentRequest;
use meshbox_proto::meshbox::enrollment_service_client::EnrollmentServiceClient;
use tonic::transport::Channel;
use tracing::debug;

use crate::token::TokenFile;

pub struct EnrollmentLookup {
    client: EnrollmentServiceClient<Channel>,
    token: Option<TokenFile>,
}

impl EnrollmentLookup {
    pub fn new(channel: Channel, token: Option<TokenFile>) -> Self {
        Self {
            client: EnrollmentServiceClient::new(channel),
            token,
        }
    }

    /// `Some(enrolled)` when the control plane knows the pod on this node;
    /// `None` when it does not, or cannot be asked.
    pub async fn ask(&self, namespace: &str, name: &str) -> Option<bool> {
        let mut request = tonic::Request::new(EnrollmentRequest {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
        request.set_timeout(Duration::from_secs(2));
        if let Some(token) = &self.token
            && let Err(error) = token.authorize(&mut request).await
        {
            debug!(%error, "no usable token; cannot ask about enrollment");
            return None;
        }
        match self.client.clone().lookup(request).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                answer.known.then_some(answer.enrolled)
            }
            Err(status) => {
                debug!(code = ?status.code(), message = status.message(), "enrollment lookup failed");
                None
            }
        }
    }
}
