//! The client's connection loop: open a stream, subscribe, ACK/NACK, take
//! on-demand requests, and reconnect with backoff when the stream ends.
//!
//! One task owns everything here (subscriptions, waiting on-demand callers,
//! the request queue); the received resources live in the `watch` channel
//! the handles read.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use meshbox_proto::google::rpc::Status as RpcStatus;
use meshbox_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshbox_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::state::{self, Applied, ResourceType, XdsState};
use super::{Answer, ClientError, ClientOptions, Command, Credentials};
use crate::token::TokenError;

/// The subscription name meaning "everything of this type".
const WILDCARD: &str = "*";
/// Names per request; longer lists are split (servers bound them).
pub(crate) const MAX_NAMES_PER_REQUEST: usize = 5_000;
/// Requests queued towards the server (ACKs and subscription changes).
const REQUEST_QUEUE: usize = 64;
/// How much of the rejection reasons goes into a NACK.
const MAX_NACK_REASONS: usize = 10;
/// gRPC `INVALID_ARGUMENT`, the code of our NACK details.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
}

enum End {
    /// Every handle is gone.
    Shutdown,
    /// Asked to reconnect at once.
    Reconnect,
    /// The server ended the stream without an error.
    ServerClosed,
}

pub(crate) struct Runner {
    channel: Channel,
    options: ClientOptions,
    commands: mpsc::Receiver<Command>,
    state: watch::Sender<XdsState>,
    subs: [Subscription; state::TYPES],
    /// On-demand callers waiting for an answer, by type and name.
    waiting: HashMap<(ResourceType, String), Vec<oneshot::Sender<Answer>>>,
}

impl Runner {
    pub(crate) fn new(
        channel: Channel,
        options: ClientOptions,
        commands: mpsc::Receiver<Command>,
        state: watch::Sender<XdsState>,
    ) -> Self {
        let subs = ResourceType::ALL.map(|ty| Subscription {
            wildcard: options.wildcard.contains(&ty),
            names: BTreeSet::new(),
        });
        Self {
            channel,
            options,
            commands,
            state,
            subs,
            waiting: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        let initial = self.options.initial_backoff;
        let max = self.options.max_backoff.max(initial);
        let mut backoff = initial;
        loop {
            let mut received = false;
            let result = self.session(&mut received).await;
            self.state.send_modify(|s| {
                s.connected = false;
                s.synced = [false; state::TYPES];
                if let Err(e) = &result {
                    s.last_error = Some(e.to_string());
                }
            });
            if received {
                // The stream worked; this is a fresh failure, not a streak.
                backoff = initial;
            }
            match result {
                Ok(End::Shutdown) => {
                    debug!("xDS client stopped");
                    return;
                }
                Ok(End::Reconnect) => {
                    info!("reconnecting to the xDS server on request");
                    continue;
                }
                Ok(End::ServerClosed) => {
                    info!(retry_in = ?backoff, "the xDS server closed the stream; reconnecting");
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "xDS stream failed; reconnecting");
                }
            }
            if !self.wait(jitter(backoff)).await {
                return;
            }
            backoff = (backoff * 2).min(max);
        }
    }

    /// Sleeps before a reconnect while still taking subscription changes
    /// (they go out with the next stream's first requests). Returns false
    /// when every handle is gone.
    async fn wait(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                command = self.commands.recv() => match command {
                    None => return false,
                    Some(Command::Reconnect) => return true,
                    Some(command) => {
                        self.record(command);
                    }
                }
            }
        }
    }

    async fn session(&mut self, received: &mut bool) -> Result<End, ClientError> {
        let authorization = authorization(&self.options.credentials).await?;
        let (requests, request_rx) = mpsc::channel(REQUEST_QUEUE);
        let outbound =
            tokio_stream::iter(self.initial_requests()).chain(ReceiverStream::new(request_rx));
        let mut request = tonic::Request::new(outbound);
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(self.options.max_response_bytes);
        let mut responses = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| ClientError::Open(Box::new(s)))?
            .into_inner();
        self.state.send_modify(|s| {
            s.connected = true;
            s.streams += 1;
            s.last_error = None;
        });
        debug!("xDS stream open");
        loop {
            tokio::select! {
                biased;
                message = responses.message() => match message {
                    Ok(Some(response)) => {
                        *received = true;
                        let reply = self.on_response(response);
                        if requests.send(reply).await.is_err() {
                            return Ok(End::ServerClosed);
                        }
                    }
                    Ok(None) => return Ok(End::ServerClosed),
                    Err(status) => return Err(ClientError::Stream(Box::new(status))),
                },
                command = self.commands.recv() => match command {
                    None => return Ok(End::Shutdown),
                    Some(Command::Reconnect) => return Ok(End::Reconnect),
                    Some(command) => {
                        for request in self.record(command) {
                            if requests.send(request).await.is_err() {
                                return Ok(End::ServerClosed);
                            }
                        }
                    }
                },
            }
        }
    }

    /// The first requests of a stream: per type, the subscription and the
    /// versions already held.
    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        let state = self.state.borrow();
        let mut out = Vec::new();
        for ty in ResourceType::ALL {
            let sub = &self.subs[ty.index()];
            if !ty.is_istio() && !sub.wildcard && sub.names.is_empty() {
                continue;
            }
            let names: Vec<String> = sub.names.iter().cloned().collect();
            let mut chunks = names.chunks(MAX_NAMES_PER_REQUEST);
            let first = chunks.next().unwrap_or_default();
            let (mut subscribe, unsubscribe) = if sub.wildcard {
                (vec![WILDCARD.to_owned()], Vec::new())
            } else if first.is_empty() {
                // Subscribing and unsubscribing "*" at once is how Istio
                // says "nothing yet": an empty first request would mean
                // "everything".
                (vec![WILDCARD.to_owned()], vec![WILDCARD.to_owned()])
            } else {
                (Vec::new(), Vec::new())
            };
            subscribe.extend_from_slice(first);
            out.push(DeltaDiscoveryRequest {
                node: Some(self.options.node.clone()),
                type_url: ty.type_url().to_owned(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                initial_resource_versions: state.versions(ty).into_iter().collect(),
                ..Default::default()
            });
            for chunk in chunks {
                out.push(subscribe_request(ty, chunk.to_vec()));
            }
            debug!(
                type_url = ty.type_url(),
                wildcard = sub.wildcard,
                subscribed = names.len(),
                held = state.len(ty),
                "initial request"
            );
        }
        out
    }

    /// Applies a response and returns its ACK or NACK.
    fn on_response(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let nonce = response.nonce.clone();
        let type_url = response.type_url.clone();
        let Some(ty) = ResourceType::from_type_url(&type_url) else {
            warn!(
                type_url,
                "response of a type this client does not handle; rejecting it"
            );
            return reply(
                type_url,
                nonce,
                Some("resource type not supported".to_owned()),
            );
        };
        let resources = response.resources.len();
        let removed = response.removed_resources.len();
        let validator = self.options.validator.clone();
        let mut applied = Applied::default();
        self.state.send_modify(|s| {
            applied = state::apply(s, ty, response, validator.as_ref());
        });
        self.answer(ty, &applied);
        if applied.rejected.is_empty() {
            debug!(type_url, nonce, resources, removed, "ACK");
            return reply(type_url, nonce, None);
        }
        let mut message = applied
            .rejected
            .iter()
            .take(MAX_NACK_REASONS)
            .map(|(name, reason)| format!("{name}: {reason}"))
            .collect::<Vec<_>>()
            .join("; ");
        if applied.rejected.len() > MAX_NACK_REASONS {
            message.push_str(&format!(
                "; and {} more",
                applied.rejected.len() - MAX_NACK_REASONS
            ));
        }
        warn!(
            type_url,
            nonce,
            rejected = applied.rejected.len(),
            error = message,
            "rejecting resources (NACK)"
        );
        reply(type_url, nonce, Some(message))
    }

    /// Wakes on-demand callers whose name the response answered.
    fn answer(&mut self, ty: ResourceType, applied: &Applied) {
        if self.waiting.is_empty() {
            return;
        }
        let mut found: HashMap<&str, Vec<String>> = HashMap::new();
        for (name, aliases) in &applied.found {
            found.entry(name).or_default().push(name.clone());
            for alias in aliases {
                found.entry(alias).or_default().push(name.clone());
            }
        }
        for (key, names) in found {
            if let Some(waiters) = self.waiting.remove(&(ty, key.to_owned())) {
                for waiter in waiters {
                    let _ = waiter.send(Answer::Found(names.clone()));
                }
            }
        }
        for name in &applied.removed {
            if let Some(waiters) = self.waiting.remove(&(ty, name.clone())) {
                for waiter in waiters {
                    let _ = waiter.send(Answer::NotFound);
                }
            }
        }
    }

    /// Records a subscription change and returns the requests that carry
    /// it to the server.
    fn record(&mut self, command: Command) -> Vec<DeltaDiscoveryRequest> {
        match command {
            Command::Subscribe { ty, names, reply } => {
                let sub = &mut self.subs[ty.index()];
                sub.names.extend(names.iter().cloned());
                if let (Some(reply), [name]) = (reply, names.as_slice()) {
                    let waiters = self.waiting.entry((ty, name.clone())).or_default();
                    waiters.retain(|w| !w.is_closed());
                    waiters.push(reply);
                }
                names
                    .chunks(MAX_NAMES_PER_REQUEST)
                    .map(|chunk| subscribe_request(ty, chunk.to_vec()))
                    .collect()
            }
            Command::Unsubscribe { ty, mut names } => {
                let sub = &mut self.subs[ty.index()];
                for name in &names {
                    sub.names.remove(name);
                }
                if !sub.wildcard {
                    let still = &sub.names;
                    let mut dropped = Vec::new();
                    self.state.send_modify(|s| {
                        dropped = s.forget(ty, &names, |name, aliases| {
                            still.contains(name) || aliases.iter().any(|a| still.contains(a))
                        });
                    });
                    // Resources held through a dropped lookup key may be
                    // subscribed by their own name on the server (after a
                    // reconnect reported them); let go of those too.
                    for name in dropped {
                        if !names.contains(&name) {
                            names.push(name);
                        }
                    }
                }
                names
                    .chunks(MAX_NAMES_PER_REQUEST)
                    .map(|chunk| DeltaDiscoveryRequest {
                        type_url: ty.type_url().to_owned(),
                        resource_names_unsubscribe: chunk.to_vec(),
                        ..Default::default()
                    })
                    .collect()
            }
            Command::Reconnect => Vec::new(),
        }
    }
}

fn subscribe_request(ty: ResourceType, names: Vec<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: ty.type_url().to_owned(),
        resource_names_subscribe: names,
        ..Default::default()
    }
}

fn reply(type_url: String, nonce: String, error: Option<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url,
        response_nonce: nonce,
        error_detail: error.map(|message| RpcStatus {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

/// The `authorization` metadata value, read fresh on every connect.
async fn authorization(
    credentials: &Credentials,
) -> Result<Option<AsciiMetadataValue>, ClientError> {
    let value = match credentials {
        Credentials::None => return Ok(None),
        Credentials::Bearer(token) => crate::token::bearer(token),
        Credentials::BearerFile(file) => file.authorization().await,
    };
    match value {
        Ok(value) => Ok(Some(value)),
        Err(TokenError::Read { path, source }) => Err(ClientError::TokenFile { path, source }),
        Err(TokenError::InvalidHeader) => Err(ClientError::InvalidToken),
    }
}

/// Adds up to 25 % so clients that lost the same server do not return in
/// lockstep.
fn jitter(delay: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    delay + delay.mul_f64(f64::from(nanos % 250) / 1000.0)
}
