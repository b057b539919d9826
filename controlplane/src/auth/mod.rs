//! Who is calling: turns a bearer token into a [`Caller`].
//!
//! Standalone mode accepts tokens this control plane minted itself
//! ([`local`]); Kubernetes mode asks the API server through TokenReview
//! ([`token_review`]). Whatever the source, the result is the same small enum,
//! so the CA and xDS services never care where a caller came from.

pub mod local;
pub mod token_review;

use meshbox_certs::SpiffeId;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A single workload: may get certificates for exactly this identity.
    Workload(SpiffeId),
    /// A node proxy: may get certificates for the identities of pods
    /// scheduled on `node`.
    Node { node: String },
}

impl Caller {
    /// A stable key for per-caller rate limiting and the audit log.
    pub fn key(&self) -> String {
        match self {
            Caller::Workload(id) => id.to_string(),
            Caller::Node { node } => format!("node:{node}"),
        }
    }
}

/// Why a token was refused. Messages never include the token itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send 'Authorization: Bearer <token>'")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("the token has expired: mint a new one")]
    Expired,
    #[error("the token is not valid for this control plane")]
    Invalid,
    #[error("the token's identity is not allowed here: {0}")]
    NotAllowed(String),
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// Either source of tokens, chosen at start-up.
pub enum Authenticator {
    Local(local::LocalTokens),
    Kubernetes(Box<token_review::TokenReviewer>),
}

impl Authenticator {
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        match self {
            Authenticator::Local(tokens) => tokens.verify(token),
            Authenticator::Kubernetes(reviewer) => reviewer.review(token).await,
        }
    }

    /// Authenticates the value of an `Authorization` header.
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let token = bearer_token(header)?;
        self.authenticate(token).await
    }
}

/// The token in `Bearer <token>` (the scheme is case-insensitive).
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let (scheme, token) = header
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("expected 'Bearer <token>'".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed("expected the Bearer scheme".into()));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// Node names are Kubernetes object names (DNS-1123 subdomains).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}
