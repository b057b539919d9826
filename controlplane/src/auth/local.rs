//! Tokens for standalone mode: HS256 JWTs signed with a key kept in the state
//! directory, minted by `controlplane token`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use meshbox_certs::SpiffeId;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::{AuthError, Caller, valid_node_name};

const KEY_FILE: &str = "token-signing.key";
const ISSUER: &str = "meshbox";
const AUDIENCE: &str = "meshbox";
const NODE_PREFIX: &str = "node:";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    exp: u64,
}

/// The signing key and trust domain of standalone tokens.
pub struct LocalTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    trust_domain: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: the token key must be at least 32 bytes; delete it to make a new one")]
    TooShort(PathBuf),
    #[error("no randomness available")]
    Random,
    #[error(transparent)]
    Write(#[from] meshbox_certs::CaError),
}

impl LocalTokens {
    /// Loads the key from `state_dir`, making one on first use.
    pub fn load_or_create(state_dir: &Path, trust_domain: &str) -> Result<Self, TokenKeyError> {
        let path = state_dir.join(KEY_FILE);
        let io = |source| TokenKeyError::Io {
            path: path.clone(),
            source,
        };
        let secret = if path.exists() {
            std::fs::read(&path).map_err(io)?
        } else {
            std::fs::create_dir_all(state_dir).map_err(io)?;
            let mut secret = vec![0u8; 32];
            SystemRandom::new()
                .fill(&mut secret)
                .map_err(|_| TokenKeyError::Random)?;
            meshbox_certs::ca::write_atomically(&path, &secret, 0o600)?;
            secret
        };
        if secret.len() < 32 {
            return Err(TokenKeyError::TooShort(path));
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// A token for one workload identity.
    pub fn mint_for_identity(&self, id: &SpiffeId, ttl: Duration) -> Result<String, AuthError> {
        if id.trust_domain() != self.trust_domain {
            return Err(AuthError::NotAllowed(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        self.mint(id.to_string(), ttl)
    }

    /// A token for the node proxy of `node`.
    pub fn mint_for_node(&self, node: &str, ttl: Duration) -> Result<String, AuthError> {
        if !valid_node_name(node) {
            return Err(AuthError::NotAllowed(format!("invalid node name {node:?}")));
        }
        self.mint(format!("{NODE_PREFIX}{node}"), ttl)
    }

    fn mint(&self, sub: String, ttl: Duration) -> Result<String, AuthError> {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub,
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Malformed(e.to_string()))
    }

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidToken
                | jsonwebtoken::errors::ErrorKind::Base64(_)
                | jsonwebtoken::errors::ErrorKind::Json(_)
                | jsonwebtoken::errors::ErrorKind::Utf8(_) => {
                    AuthError::Malformed("not a JWT".into())
                }
                _ => AuthError::Invalid,
            },
        )?;
        let sub = data.claims.sub;
        if let Some(node) = sub.strip_prefix(NODE_PREFIX) {
            if !valid_node_name(node) {
                return Err(AuthError::Invalid);
            }
            return Ok(Caller::Node {
                node: node.to_owned(),
            });
        }
        let id: SpiffeId = sub.parse().map_err(|_| AuthError::Invalid)?;
        if id.trust_domain() != self.trust_domain {
            return Err(AuthError::NotAllowed(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(Caller::Workload(id))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(dir: &Path) -> LocalTokens {
        LocalTokens::load_or_create(dir, "cluster.local").unwrap()
    }

    fn temp_dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("meshbox-{name}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn minted_tokens_verify_to_their_caller() {
        let dir = temp_dir("tokens-ok");
        let t = tokens(dir.path());
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let tok = t.mint_for_identity(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(t.verify(&tok).unwrap(), Caller::Workload(id));
        let tok = t
            .mint_for_node("worker-1", Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            t.verify(&tok).unwrap(),
            Caller::Node {
                node: "worker-1".into()
            }
        );
        // The key survives a restart: a token from before still verifies.
        assert!(tokens(dir.path()).verify(&tok).is_ok());
    }

    #[test]
    fn refuses_expired_forged_and_garbage_tokens() {
        let dir = temp_dir("tokens-bad");
        let t = tokens(dir.path());
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let expired = t
            .mint(id.to_string(), Duration::ZERO)
            .map(|_| {
                let now = unix_now();
                let claims = Claims {
                    iss: ISSUER.into(),
                    aud: AUDIENCE.into(),
                    sub: id.to_string(),
                    iat: now - 3600,
                    exp: now - 600,
                };
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &t.encoding).unwrap()
            })
            .unwrap();
        assert!(matches!(t.verify(&expired), Err(AuthError::Expired)));

        let other_dir = temp_dir("tokens-other");
        let forged = tokens(other_dir.path())
            .mint_for_identity(&id, Duration::from_secs(60))
            .unwrap();
        assert!(matches!(t.verify(&forged), Err(AuthError::Invalid)));

        assert!(matches!(t.verify("garbage"), Err(AuthError::Malformed(_))));
        let unsigned = format!(
            "{}.e30.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0" // {"alg":"none","typ":"JWT"}
        );
        assert!(t.verify(&unsigned).is_err());
    }
}
