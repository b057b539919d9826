//! A small Delta ADS (incremental xDS) client for Istio's workload API.
//!
//! It keeps one `DeltaAggregatedResources` stream open to a control plane
//! (ours or a stock istiod) over a tonic [`Channel`] the caller built (TLS
//! and addresses are the caller's business), subscribes to `Address` and
//! `Authorization` (wildcard, or on demand by name / `network/IP`), and for
//! a waypoint to meshbox's `WaypointPolicy` and `WaypointRoute`, ACKs
//! every response or NACKs it when decoding or the caller's validation
//! fails, and keeps what it received in an [`XdsState`] published through a
//! `watch` channel. When the stream breaks it reconnects with exponential
//! backoff and reports the versions it holds in `initial_resource_versions`,
//! so the server sends only what changed meanwhile.
//!
//! It does not interpret the resources (that is the proxy's job) and never
//! panics on what the network sends.

mod session;
mod state;

use std::path::PathBuf;
use std::time::Duration;

use meshbox_proto::xds::Node;
use prost_types::value::Kind as ValueKind;
use prost_types::{Struct, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

pub use state::{Received, ResourceRef, ResourceType, Validator, XdsState};

use crate::token::TokenFile;

/// How the client proves who it is.
#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    None,
    /// `authorization: Bearer <token>`, a token the caller holds.
    Bearer(String),
    /// A bearer-token file, read again on every (re)connect so a rotated
    /// token is picked up (Istio's `AUTH_TOKEN`).
    BearerFile(TokenFile),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credentials::BearerFile(file) => write!(f, "BearerFile({})", file.path().display()),
        }
    }
}

/// Client settings.
#[derive(Clone)]
pub struct ClientOptions {
    pub credentials: Credentials,
    /// Sent on the first request of each type on every stream.
    pub node: Node,
    /// Types subscribed to in full; the others start empty and are filled
    /// on demand ([`XdsClient::subscribe`], [`XdsClient::demand`]).
    pub wildcard: Vec<ResourceType>,
    /// Called for every decoded resource; `Err` rejects it (NACK).
    pub validator: Option<Validator>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Largest response accepted.
    pub max_response_bytes: usize,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("credentials", &self.credentials)
            .field("node", &self.node.id)
            .field("wildcard", &self.wildcard)
            .field("validator", &self.validator.is_some())
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

impl ClientOptions {
    /// Wildcard on Istio's two types, the given identity, default timings.
    pub fn new(credentials: Credentials, node: Node) -> Self {
        Self {
            credentials,
            node,
            wildcard: ResourceType::ALL
                .into_iter()
                .filter(|ty| ty.is_istio())
                .collect(),
            validator: None,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            max_response_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A `Node` with string metadata, the way Istio's ztunnel fills it
/// (`NODE_NAME`, `NAME`, `NAMESPACE`, `INSTANCE_IPS`, ...).
pub fn node<K: Into<String>, V: Into<String>>(
    id: impl Into<String>,
    metadata: impl IntoIterator<Item = (K, V)>,
) -> Node {
    let fields = metadata
        .into_iter()
        .map(|(k, v)| {
            (
                k.into(),
                Value {
                    kind: Some(ValueKind::StringValue(v.into())),
                },
            )
        })
        .collect();
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// The server's answer to an on-demand request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Resource names that answered (for an IP lookup, every workload and
    /// service at that address).
    Found(Vec<String>),
    /// The server has nothing by that name.
    NotFound,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the xDS client has stopped")]
    Closed,
    #[error("{0:?} is not a valid resource name")]
    InvalidName(String),
    #[error("cannot read the bearer token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the bearer token is not a valid header value")]
    InvalidToken,
    #[error("opening the xDS stream failed: {0}")]
    Open(Box<tonic::Status>),
    #[error("the xDS stream failed: {0}")]
    Stream(Box<tonic::Status>),
}

pub(crate) enum Command {
    Subscribe {
        ty: ResourceType,
        names: Vec<String>,
        reply: Option<oneshot::Sender<Answer>>,
    },
    Unsubscribe {
        ty: ResourceType,
        names: Vec<String>,
    },
    Reconnect,
}

/// Handle to a running client. Clones share it; the client stops when the
/// last handle is dropped.
#[derive(Clone, Debug)]
pub struct XdsClient {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<XdsState>,
}

impl XdsClient {
    /// Starts the client on the current tokio runtime.
    pub fn start(channel: Channel, options: ClientOptions) -> XdsClient {
        let (commands, command_rx) = mpsc::channel(64);
        let (state_tx, state) = watch::channel(XdsState {
            wildcard: ResourceType::ALL.map(|ty| options.wildcard.contains(&ty)),
            ..XdsState::default()
        });
        tokio::spawn(session::Runner::new(channel, options, command_rx, state_tx).run());
        XdsClient { commands, state }
    }

    /// The received state; `changed()`/`wait_for()` follow updates. Do not
    /// hold a `borrow()` across an await.
    pub fn state(&self) -> watch::Receiver<XdsState> {
        self.state.clone()
    }

    /// Adds names to the subscription of `ty` (kept across reconnects).
    pub async fn subscribe(&self, ty: ResourceType, names: Vec<String>) -> Result<(), ClientError> {
        check_names(&names)?;
        self.send(Command::Subscribe {
            ty,
            names,
            reply: None,
        })
        .await
    }

    /// Removes names from the subscription of `ty`; resources held only
    /// because of them are dropped.
    pub async fn unsubscribe(
        &self,
        ty: ResourceType,
        names: Vec<String>,
    ) -> Result<(), ClientError> {
        self.send(Command::Unsubscribe { ty, names }).await
    }

    /// Subscribes to one name (a resource name or, for Address, a
    /// `network/IP` lookup key) and waits for the server's answer. Wrap it
    /// in a timeout: a server may never answer.
    pub async fn demand(&self, ty: ResourceType, name: String) -> Result<Answer, ClientError> {
        check_names(std::slice::from_ref(&name))?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Subscribe {
            ty,
            names: vec![name],
            reply: Some(reply),
        })
        .await?;
        answer.await.map_err(|_| ClientError::Closed)
    }

    /// Drops the current stream and connects again at once (e.g. after a
    /// credential or address change).
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        self.send(Command::Reconnect).await
    }

    async fn send(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

/// Longest name sent; servers refuse (and end the stream on) longer ones.
const MAX_NAME_LEN: usize = 1024;

/// Refuses names a server would reject, so one bad name cannot put the
/// client into a reconnect loop (subscriptions are replayed on reconnect).
fn check_names(names: &[String]) -> Result<(), ClientError> {
    for name in names {
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name == "*"
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ClientError::InvalidName(name.chars().take(80).collect()));
        }
    }
    Ok(())
}
