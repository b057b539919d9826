//! Kubernetes service-account tokens, checked with the TokenReview API.
//!
//! A token of one of the node-proxy service accounts (meshbox's dataplane, or
//! Istio's ztunnel) makes a [`Caller::Node`] for the node the token is bound
//! to; any other service account makes a [`Caller::Workload`] with the
//! identity `spiffe://{td}/ns/{ns}/sa/{sa}`.
//!
//! Answers are cached briefly (see [`ReviewCache`]), so a client that sends
//! the same token on every request, or a flood of bad tokens, costs the API
//! server one review per token per few seconds, not one per request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use meshbox_certs::SpiffeId;
use parking_lot::Mutex;

use super::{AuthError, Caller, valid_node_name};

/// How long an accepted token is trusted without asking again. Short, so a
/// deleted service account or pod stops working within seconds (a bound
/// token dies with its pod); long enough that a burst of requests with one
/// token costs one review.
pub const POSITIVE_TTL: Duration = Duration::from_secs(10);
/// How long a refused token stays refused without asking again: shorter
/// than [`POSITIVE_TTL`], since a token refused because its pod was not yet
/// known may become valid moments later.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// Most tokens remembered. Past it, expired entries are dropped, and if
/// none are, the new answer is not cached (every entry is at most
/// [`POSITIVE_TTL`] old, so the cache empties itself soon).
pub const CACHE_CAPACITY: usize = 10_000;

/// A review's answer and when it stops being trusted.
type CachedAnswer = (Instant, Result<Caller, AuthError>);

/// Recent review answers, keyed by the SHA-256 of the token: the cache never
/// holds a token, so a memory dump does not leak live credentials. Review
/// failures (API server unreachable) are never cached.
pub struct ReviewCache {
    entries: Mutex<HashMap<[u8; 32], CachedAnswer>>,
    capacity: usize,
}

impl ReviewCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The key of `token`.
    pub fn key(token: &str) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        key
    }

    /// The cached answer for `key`, if it has not expired at `now`.
    pub fn get(&self, key: &[u8; 32], now: Instant) -> Option<Result<Caller, AuthError>> {
        let mut entries = self.entries.lock();
        match entries.get(key) {
            Some((expires, answer)) if now < *expires => Some(answer.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `answer` for `key` from `now`. An unavailable API server is
    /// not an answer about the token, so it is not remembered.
    pub fn put(&self, key: [u8; 32], answer: &Result<Caller, AuthError>, now: Instant) {
        let ttl = match answer {
            Ok(_) => POSITIVE_TTL,
            Err(AuthError::Unavailable(_)) => return,
            Err(_) => NEGATIVE_TTL,
        };
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, (expires, _)| now < *expires);
            if entries.len() >= self.capacity {
                return;
            }
        }
        entries.insert(key, (now + ttl, answer.clone()));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Extra key the API server sets on tokens bound to a pod on a node.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const SA_PREFIX: &str = "system:serviceaccount:";

pub struct TokenReviewer {
    api: Api<TokenReview>,
    trust_domain: String,
    audiences: Vec<String>,
    /// `namespace/name` of service accounts that act as node proxies.
    node_proxies: Vec<String>,
    cache: ReviewCache,
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
            cache: ReviewCache::new(CACHE_CAPACITY),
        }
    }

    /// The caller `token` belongs to, from the cache or the API server.
    pub async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let key = ReviewCache::key(token);
        if let Some(answer) = self.cache.get(&key, Instant::now()) {
            return answer;
        }
        let answer = self.ask(token).await;
        self.cache.put(key, &answer, Instant::now());
        answer
    }

    async fn ask(&self, token: &str) -> Result<Caller, AuthError> {
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
        // The API server answers with the requested audiences the token
        // carries. An empty list means the token is for the API server
        // itself (or the server ignores audiences): not one meant for us.
        if !self.audiences.is_empty() {
            let granted = status.audiences.unwrap_or_default();
            if !granted.iter().any(|a| self.audiences.contains(a)) {
                tracing::debug!(
                    expected = ?self.audiences,
                    granted = ?granted,
                    "token refused: not issued for our audience"
                );
                return Err(AuthError::Invalid);
            }
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
            "audiences": ["istio-ca"],
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
            "audiences": ["istio-ca"],
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
            "audiences": ["istio-ca"],
            "user": {"username": "system:node:worker-1"}
        })));
        assert!(matches!(
            reviewer(client).review("t").await,
            Err(AuthError::NotAllowed(_))
        ));
        let (client, _s) = mocked(review(json!({
            "authenticated": true,
            "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:istio-system:ztunnel"}
        })));
        assert!(matches!(
            reviewer(client).review("t").await,
            Err(AuthError::NotAllowed(_))
        ));
    }

    #[tokio::test]
    async fn refuses_tokens_not_issued_for_our_audience() {
        // Authenticated, but the API server granted none of the audiences
        // we asked for: a token for the API server itself, or for another
        // service, is no credential here.
        for audiences in [
            json!(null),
            json!([]),
            json!(["https://kubernetes.default.svc"]),
        ] {
            let (client, _s) = mocked(review(json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {"username": "system:serviceaccount:bookinfo:reviews"}
            })));
            assert!(
                matches!(reviewer(client).review("t").await, Err(AuthError::Invalid)),
                "{audiences}"
            );
        }
    }

    /// An API server that answers every review with `answer(token)` (status
    /// 500 when it is `None`), and the number of reviews it received.
    fn counting(
        answer: fn(&str) -> Option<serde_json::Value>,
    ) -> (kube::Client, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let reviews = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = reviews.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = request.into_body().collect_bytes().await.unwrap();
                let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let token = sent["spec"]["token"].as_str().unwrap_or_default();
                let response = match answer(token) {
                    Some(status) => Response::builder()
                        .status(201)
                        .body(Body::from(serde_json::to_vec(&review(status)).unwrap())),
                    None => Response::builder()
                        .status(500)
                        .body(Body::from(b"{}".to_vec())),
                };
                send.send_response(response.unwrap());
            }
        });
        (kube::Client::new(service, "default"), reviews)
    }

    fn good_or_bad(token: &str) -> Option<serde_json::Value> {
        match token {
            "down" => None,
            t if t.starts_with("good") => Some(json!({
                "authenticated": true,
                "audiences": ["istio-ca"],
                "user": {"username": format!("system:serviceaccount:bookinfo:{t}")}
            })),
            _ => Some(json!({"authenticated": false})),
        }
    }

    #[tokio::test]
    async fn answers_are_cached_per_token_and_failures_are_not() {
        use std::sync::atomic::Ordering;
        let (client, reviews) = counting(good_or_bad);
        let r = reviewer(client);
        let good = r.review("good-a").await.unwrap();
        assert_eq!(r.review("good-a").await.unwrap(), good);
        assert_eq!(
            reviews.load(Ordering::SeqCst),
            1,
            "the second came from the cache"
        );
        // Another token is another caller, never the cached one.
        assert_ne!(r.review("good-b").await.unwrap(), good);
        assert_eq!(reviews.load(Ordering::SeqCst), 2);
        // A refused token stays refused without asking again.
        assert!(matches!(r.review("bad").await, Err(AuthError::Invalid)));
        assert!(matches!(r.review("bad").await, Err(AuthError::Invalid)));
        assert_eq!(reviews.load(Ordering::SeqCst), 3);
        // An API server error says nothing about the token: asked again.
        assert!(matches!(
            r.review("down").await,
            Err(AuthError::Unavailable(_))
        ));
        assert!(matches!(
            r.review("down").await,
            Err(AuthError::Unavailable(_))
        ));
        assert_eq!(reviews.load(Ordering::SeqCst), 5);
        // The cache holds digests, never a token.
        let held: Vec<[u8; 32]> = r.cache.entries.lock().keys().copied().collect();
        assert_eq!(held.len(), 3);
        for token in ["good-a", "good-b", "bad"] {
            assert!(held.contains(&ReviewCache::key(token)));
            assert!(
                !held
                    .iter()
                    .any(|k| k.windows(token.len()).any(|w| w == token.as_bytes()))
            );
        }
    }

    #[test]
    fn cached_answers_expire_and_the_cache_is_bounded() {
        let cache = ReviewCache::new(2);
        let t0 = Instant::now();
        let caller = Ok(Caller::Node {
            node: "worker-1".into(),
        });
        let (good, bad, other) = (
            ReviewCache::key("good"),
            ReviewCache::key("bad"),
            ReviewCache::key("other"),
        );
        cache.put(good, &caller, t0);
        cache.put(bad, &Err(AuthError::Invalid), t0);
        let just_before = |ttl| t0 + ttl - Duration::from_millis(1);
        assert_eq!(
            cache
                .get(&good, just_before(POSITIVE_TTL))
                .unwrap()
                .unwrap(),
            caller.clone().unwrap()
        );
        assert!(cache.get(&bad, just_before(NEGATIVE_TTL)).unwrap().is_err());
        assert!(
            cache.get(&bad, t0 + NEGATIVE_TTL).is_none(),
            "negative answers expire sooner"
        );
        assert!(cache.get(&good, t0 + POSITIVE_TTL).is_none());
        assert!(cache.is_empty(), "expired entries are dropped when seen");
        // Full of live entries: a new answer is not cached.
        cache.put(good, &caller, t0);
        cache.put(bad, &Err(AuthError::Invalid), t0);
        cache.put(other, &caller, t0);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&other, t0).is_none());
        // Once they expire, there is room again.
        let later = t0 + POSITIVE_TTL;
        cache.put(other, &caller, later);
        assert!(cache.get(&other, later).is_some());
        assert_eq!(cache.len(), 1);
        cache.put(bad, &Err(AuthError::Unavailable("down".into())), later);
        assert!(cache.get(&bad, later).is_none(), "failures are not cached");
    }
}
