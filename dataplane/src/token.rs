//! The bearer token the dataplane shows the control plane on every gRPC
//! call (xDS, certificates, enrollment lookups, capture reports): a file,
//! Istio's `AUTH_TOKEN`, read again on every use because tokens rotate.
//! Without one (`None` where a token is optional) calls go out without
//! `authorization`, as to a development control plane.

use std::path::{Path, PathBuf};

use tonic::metadata::AsciiMetadataValue;

/// `Bearer <token>` (trimmed), marked sensitive: kept out of HTTP/2 header
/// tables and debug output.
pub fn bearer(token: &str) -> Result<AsciiMetadataValue, TokenError> {
    let mut value: AsciiMetadataValue = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| TokenError::InvalidHeader)?;
    value.set_sensitive(true);
    Ok(value)
}

/// A file holding a bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile(PathBuf);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token is not a valid header")]
    InvalidHeader,
}

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// [`bearer`] with the token the file holds now.
    pub async fn authorization(&self) -> Result<AsciiMetadataValue, TokenError> {
        let token =
            tokio::fs::read_to_string(&self.0)
                .await
                .map_err(|source| TokenError::Read {
                    path: self.0.clone(),
                    source,
                })?;
        bearer(&token)
    }

    /// Puts `authorization: Bearer <token>` on `request`.
    pub async fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), TokenError> {
        let value = self.authorization().await?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }
}
