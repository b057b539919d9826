//! Kubernetes service-account tokens, checked with the TokenReview API.
//!
//! A token of one of the node-proxy service accounts (meshbox's dataplane, or
//! Istio's ztunnel) makes a [`Caller::Node`] for the node the token is bound
//! to; any other service account makes a [`Caller::Workload`] with the
//! identity `spiffe://{td}/ns/{ns}/sa/{sa}`.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use meshbox_certs::SpiffeId;

use super::{AuthError, Caller, valid_node_name};

/// Extra key the API server sets on tokens bound to a pod on a node.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const SA_PREFIX: &str = "system:serviceaccount:";

pub struct TokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    audiences: Vec<String>,
    /// `namespace/name` of service accounts that act as node proxies.
    node_proxies: Vec<String>,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        trust_domain: &str,
        audiences: Vec<String>,
        node_proxies: Vec<String>,
    ) -> Self {
        Self {
            api: Api::all(client),
            trust_domain: trust_domain.to_owned(),
            audiences,
            node_proxies,
        }
    }

    pub async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid);
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, account) = username
            .strip_prefix(SA_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| AuthError::NotAllowed(format!("{username} is not a service account")))?;
        if self
            .node_proxies
            .iter()
            .any(|p| p == &format!("{namespace}/{account}"))
        {
            let node = user
                .extra
                .as_ref()
                .and_then(|extra| extra.get(NODE_NAME_EXTRA))
                .and_then(|values| values.first())
                .filter(|n| valid_node_name(n))
                .ok_or_else(|| {
                    AuthError::NotAllowed(format!(
                        "node proxy {namespace}/{account} sent a token not bound to a node"
                    ))
                })?;
            return Ok(Caller::Node { node: node.clone() });
        }
        let id = SpiffeId::new(&self.trust_domain, namespace, account)
            .map_err(|e| AuthError::NotAllowed(e.to_string()))?;
        Ok(Caller::Workload(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    /// A kube client whose API server is this closure.
    fn mocked(
        answer: serde_json::Value,
    ) -> (kube::Client, tokio::task::JoinHandle<serde_json::Value>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("one request");
            assert_eq!(request.method(), http::Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = request.into_body().collect_bytes().await.unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            send.send_response(
                Response::builder()
                    .status(201)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            sent
        });
        (kube::Client::new(service, "default"), server)
    }

    fn reviewer(client: kube::Client) -> TokenReviewer {
        TokenReviewer::new(
            client,
            "cluster.local",
            vec!["istio-ca".into()],
            vec!["istio-system/ztunnel".into()],
        )
    }

    fn review(status: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": status})
    }

    #[tokio::test]
    async fn a_workload_token_becomes_its_spiffe_identity() {
        let (client, server) = mocked(review(json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:bookinfo:reviews"}
        })));
        let caller = reviewer(client).review("the-token").await.unwrap();
        assert_eq!(
            caller,
            Caller::Workload(
                "spiffe://cluster.local/ns/bookinfo/sa/reviews"
                    .parse()
                    .unwrap()
            )
        );
        let sent = server.await.unwrap();
        assert_eq!(sent["spec"]["token"], "the-token");
        assert_eq!(sent["spec"]["audiences"], json!(["istio-ca"]));
    }

    #[tokio::test]
    async fn a_ztunnel_token_becomes_a_node_caller() {
        let (client, _server) = mocked(review(json!({
            "authenticated": true,
            "user": {
                "username": "system:serviceaccount:istio-system:ztunnel",
                "extra": {"authentication.kubernetes.io/node-name": ["worker-2"]}
            }
        })));
        assert_eq!(
            reviewer(client).review("t").await.unwrap(),
            Caller::Node {
                node: "worker-2".into()
            }
        );
    }

    #[tokio::test]
    async fn refuses_unauthenticated_users_and_unbound_node_tokens() {
        let (client, _s) = mocked(review(json!({"authenticated": false, "error": "invalid"})));
        assert!(matches!(
            reviewer(client).review("t").await,
            Err(AuthError::Invalid)
        ));
        let (client, _s) = mocked(review(json!({
            "authenticated": true,
            "user": {"username": "system:node:worker-1"}
        })));
        assert!(matches!(
            reviewer(client).review("t").await,
            Err(AuthError::NotAllowed(_))
        ));
        let (client, _s) = mocked(review(json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:istio-system:ztunnel"}
        })));
        assert!(matches!(
            reviewer(client).review("t").await,
            Err(AuthError::NotAllowed(_))
        ));
    }
}
