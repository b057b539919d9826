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
/// Seconds of clock difference tolerated on `exp` and `iat`.
const LEEWAY_SECS: u64 = 5;

/// Longest lifetime a standalone token may have (`token --ttl`): one year
/// (366 days, so `--ttl 1y`, which humantime reads as 365.25 days, fits).
/// Long enough for a demo or lab node that is set up once and never
/// re-provisioned; short enough that a leaked token stops working on its
/// own. Tokens claiming more (or no `iat`/`exp`) are refused at
/// verification too, so an old or hand-made long-lived token is no way
/// around it. To revoke every token sooner, rotate the key
/// ([`LocalTokens::rotate`], `controlplane rotate-token-key`).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

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

    /// Replaces the signing key in `state_dir` with a new random one, which
    /// revokes every token signed with the old key once the control plane
    /// loads it (at its next start). The file is replaced atomically, mode
    /// 0600.
    pub fn rotate(state_dir: &Path) -> Result<(), TokenKeyError> {
        let path = state_dir.join(KEY_FILE);
        std::fs::create_dir_all(state_dir).map_err(|source| TokenKeyError::Io {
            path: path.clone(),
            source,
        })?;
        let mut secret = vec![0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| TokenKeyError::Random)?;
        meshbox_certs::ca::write_atomically(&path, &secret, 0o600)?;
        Ok(())
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
        if ttl > MAX_TOKEN_TTL {
            return Err(AuthError::NotAllowed(format!(
                "a token may be valid for at most {} days (1y); asked for {}",
                MAX_TOKEN_TTL.as_secs() / 86_400,
                humantime::format_duration(ttl)
            )));
        }
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
        validation.leeway = LEEWAY_SECS;
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
        // `iat` and `exp` are both required by `Claims`; a token without them
        // does not decode. One issued in the future or living longer than
        // any `token --ttl` can mint was not minted by us as it claims.
        let (iat, exp) = (data.claims.iat, data.claims.exp);
        if iat > unix_now().saturating_add(LEEWAY_SECS)
            || exp < iat
            || exp - iat > MAX_TOKEN_TTL.as_secs()
        {
            return Err(AuthError::Invalid);
        }
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

    /// A token signed with `t`'s key carrying `claims` as given.
    fn signed(t: &LocalTokens, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &t.encoding).unwrap()
    }

    #[test]
    fn lifetimes_beyond_the_maximum_are_refused_at_minting_and_verification() {
        let dir = temp_dir("tokens-ttl");
        let t = tokens(dir.path());
        assert!(t.mint_for_node("worker-1", MAX_TOKEN_TTL).is_ok());
        let too_long = t.mint_for_node("worker-1", MAX_TOKEN_TTL + Duration::from_secs(1));
        assert!(
            matches!(&too_long, Err(AuthError::NotAllowed(m)) if m.contains("at most 366 days")),
            "{too_long:?}"
        );
        assert!(humantime::parse_duration("1y").unwrap() <= MAX_TOKEN_TTL);
        let now = unix_now();
        let base = |iat: serde_json::Value, exp: serde_json::Value| {
            serde_json::json!({
                "iss": ISSUER, "aud": AUDIENCE, "sub": "node:worker-1", "iat": iat, "exp": exp
            })
        };
        // The audit's case: valid until the year 5138.
        let forever = signed(&t, base(now.into(), 99_999_999_999u64.into()));
        assert!(matches!(t.verify(&forever), Err(AuthError::Invalid)));
        let max = MAX_TOKEN_TTL.as_secs();
        let just_over = signed(&t, base(now.into(), (now + max + 1).into()));
        assert!(matches!(t.verify(&just_over), Err(AuthError::Invalid)));
        let at_max = signed(&t, base(now.into(), (now + max).into()));
        assert!(t.verify(&at_max).is_ok());
        // From the future, or expiring before it was issued.
        let future = signed(&t, base((now + 3600).into(), (now + 7200).into()));
        assert!(matches!(t.verify(&future), Err(AuthError::Invalid)));
        let backwards = signed(&t, base(now.into(), (now - 1).into()));
        assert!(t.verify(&backwards).is_err());
        // Without iat, or without exp.
        let mut no_iat = base(now.into(), (now + 60).into());
        no_iat.as_object_mut().unwrap().remove("iat");
        assert!(t.verify(&signed(&t, no_iat)).is_err());
        let mut no_exp = base(now.into(), (now + 60).into());
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(t.verify(&signed(&t, no_exp)).is_err());
    }

    #[test]
    fn rotating_the_key_revokes_every_token() {
        let dir = temp_dir("tokens-rotate");
        let old = tokens(dir.path());
        let before = old
            .mint_for_node("worker-1", Duration::from_secs(60))
            .unwrap();
        LocalTokens::rotate(dir.path()).unwrap();
        let new = tokens(dir.path());
        assert!(matches!(new.verify(&before), Err(AuthError::Invalid)));
        let after = new
            .mint_for_node("worker-1", Duration::from_secs(60))
            .unwrap();
        assert!(new.verify(&after).is_ok());
        assert!(old.verify(&after).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
