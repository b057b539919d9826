//! One ADS stream: reads the client's requests, watches the cache, and
//! writes responses when the client has room for them.
//!
//! Each stream is one task that owns its [`TypeState`]s; nothing else
//! touches them, so there is no per-stream lock. The cache is only read,
//! under a short read lock, while a response is *built*; the response is
//! then handed to a bounded queue that tonic drains into the HTTP/2 stream.
//! A response is only built once the queue has room ("pull"), so a client
//! that stops reading simply stops being built for: its pending work stays
//! a set of names (bounded by the number of resources), and when it reads
//! again it gets the latest state of those names, once. Other streams never
//! wait for it. (A wildcard stream so far behind that the change log no
//! longer reaches back is ended with `UNAVAILABLE` instead: the client's
//! reconnect, with `initial_resource_versions`, is the exact way back.)
//!
//! Pushes are debounced per stream: the first change starts a short quiet
//! timer that later changes extend (up to a maximum delay), so a burst of
//! updates becomes one push. Answers to the client's own requests are not
//! debounced.
//!
//! Unknown type URLs are ignored (logged once per type and counted), as
//! Istio's control plane does: a ztunnel that also watches a type we do not
//! serve keeps working with the types we do, rather than being cut off in a
//! reconnect loop.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use meshbox_proto::xds::DeltaDiscoveryRequest;
use prost_types::value::Kind as ValueKind;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::codec::Outbound;
use super::delta::{self, Ack, Handled, TypeState};
use super::resource::{KINDS, Kind};
use super::shared::Shared;
use super::shorten;
use super::status::StreamStatus;

/// How long we try to deliver a terminal error status to a client that is
/// not reading before giving up and just closing.
const ERROR_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Distinct unknown type URLs logged per stream (the rest only counted).
const MAX_UNKNOWN_TYPES_LOGGED: usize = 8;
/// Node metadata key Istio's ztunnel uses for the node it runs on.
const NODE_NAME: &str = "NODE_NAME";
/// Node metadata key a meshbox waypoint uses for the Gateway it serves
/// (`{namespace}/{name}`).
const WAYPOINT: &str = "WAYPOINT";

pub(crate) type ResponseTx = mpsc::Sender<Result<Outbound, Status>>;

/// Runs one stream until the client goes away or breaks the protocol.
pub(crate) async fn run(
    shared: Arc<Shared>,
    status: Arc<StreamStatus>,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: ResponseTx,
) {
    let mut stream = Stream {
        types: Kind::ALL.map(TypeState::new),
        node_known: false,
        next_seq: 1,
        turn: 0,
        unknown_types: HashSet::new(),
        shared: shared.clone(),
        status,
    };
    let mut published = shared.published.subscribe();
    let quiet = shared.options.debounce;
    let max_delay = shared.options.debounce_max.max(quiet);
    // (first change, deadline) of a running debounce.
    let mut debounce: Option<(Instant, Instant)> = None;
    let mut push_due = false;
    loop {
        let latest = *published.borrow();
        let work = stream.types.iter().any(|t| t.has_work(push_due, latest));
        let deadline = debounce.map(|(_, deadline)| deadline);
        tokio::select! {
            biased;
            message = requests.message() => match message {
                Ok(Some(request)) => {
                    if let Err(status) = stream.on_request(request) {
                        warn!(code = ?status.code(), error = status.message(), "ending stream: bad request");
                        deliver_error(&tx, status).await;
                        return;
                    }
                }
                Ok(None) => {
                    debug!("client closed its side of the stream");
                    return;
                }
                Err(status) => {
                    debug!(code = ?status.code(), error = status.message(), "request stream failed");
                    deliver_error(&tx, status).await;
                    return;
                }
            },
            changed = published.changed() => {
                if changed.is_err() {
                    // The server itself is gone.
                    return;
                }
                let now = Instant::now();
                debounce = Some(match debounce {
                    None => (now, now + quiet),
                    Some((first, _)) => (first, (now + quiet).min(first + max_delay)),
                });
            }
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                debounce = None;
                // Only arm the push if there is something to push; an armed
                // push with nothing pending would let the next change skip
                // its debounce.
                let latest = *published.borrow();
                push_due = stream.types.iter().any(|t| t.has_work(true, latest));
            }
            permit = tx.reserve(), if work => {
                let Ok(permit) = permit else { return };
                match stream.build(push_due) {
                    Ok(Some(response)) => permit.send(Ok(response)),
                    Ok(None) => push_due = false,
                    Err(status) => {
                        permit.send(Err(status));
                        return;
                    }
                }
                // Once every type has absorbed the change and is caught
                // up, the next change waits for its own debounce again. A
                // type that has not absorbed it yet keeps the push due: one
                // change may touch both types, and each answers in turn.
                let latest = *published.borrow();
                if !stream.types.iter().any(|t| t.has_work(push_due, latest)) {
                    push_due = false;
                }
            }
            _ = tx.closed() => {
                debug!("client went away");
                return;
            }
        }
    }
}

async fn deliver_error(tx: &ResponseTx, status: Status) {
    if tokio::time::timeout(ERROR_DELIVERY_TIMEOUT, tx.send(Err(status)))
        .await
        .is_err()
    {
        debug!("client did not take the error status in time; closing");
    }
}

struct Stream {
    types: [TypeState; KINDS],
    /// Whether the client's node has been handed to the type states.
    node_known: bool,
    next_seq: u64,
    /// Which type builds first next time, so a busy type cannot starve the
    /// other.
    turn: usize,
    unknown_types: HashSet<String>,
    shared: Arc<Shared>,
    status: Arc<StreamStatus>,
}

impl Stream {
    fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        if let Some(node) = &req.node {
            let text = |key: &str| {
                node.metadata
                    .as_ref()
                    .and_then(|m| m.fields.get(key))
                    .and_then(|v| match &v.kind {
                        Some(ValueKind::StringValue(s)) => Some(s.as_str()),
                        _ => None,
                    })
            };
            self.status.record_node(&node.id, text(NODE_NAME));
            self.status.record_waypoint(text(WAYPOINT));
        }
        if !self.node_known
            && let Some(node) = self.status.node()
        {
            self.node_known = true;
            for state in &mut self.types {
                state.set_node(&node);
            }
        }
        delta::validate(&req, &self.shared.limits)?;
        let Some(kind) = Kind::from_type_url(&req.type_url) else {
            self.shared.metrics.ignored("unknown_type");
            if self.unknown_types.len() < MAX_UNKNOWN_TYPES_LOGGED
                && self.unknown_types.insert(req.type_url.clone())
            {
                warn!(
                    type_url = shorten(&req.type_url, 200),
                    "ignoring requests for a resource type this server does not serve"
                );
            }
            return Ok(());
        };
        let type_url = kind.type_url();
        let state = &mut self.types[kind.index()];
        let (handled, summary) = {
            let cache = self.shared.read_cache();
            let handled = state.on_request(&req, &cache, &self.shared.limits)?;
            (handled, state.summary(&cache))
        };
        match handled {
            Handled::UnknownNonce => {
                self.shared.metrics.ignored("unknown_nonce");
                warn!(
                    type_url,
                    nonce = shorten(&req.response_nonce, 64),
                    "ignoring a request whose nonce this stream never sent (stale)"
                );
            }
            Handled::Applied(Ack::Nacked {
                nonce,
                version,
                message,
                resources,
            }) => {
                self.shared.metrics.nacked(type_url);
                warn!(
                    type_url,
                    nonce,
                    version,
                    resources,
                    error = message,
                    "client rejected a response (NACK); those versions are not resent until they change"
                );
            }
            Handled::Applied(Ack::Acked { nonce, version }) => {
                debug!(type_url, nonce, version, "ACK");
            }
            Handled::Applied(Ack::Stale) => {
                debug!(
                    type_url,
                    nonce = shorten(&req.response_nonce, 64),
                    "ACK/NACK for an already answered response ignored"
                );
            }
            Handled::Applied(Ack::None) => {
                debug!(
                    type_url,
                    subscribe = req.resource_names_subscribe.len(),
                    unsubscribe = req.resource_names_unsubscribe.len(),
                    initial_versions = req.initial_resource_versions.len(),
                    "subscription request"
                );
            }
        }
        self.status.record_type(kind, summary);
        Ok(())
    }

    /// Builds the next response of whichever type has something to say.
    /// `Err` ends the stream (a wildcard stream that lost track).
    fn build(&mut self, push_due: bool) -> Result<Option<Outbound>, Status> {
        let budget = self.shared.options.max_response_bytes;
        let cache = self.shared.read_cache();
        let count = self.types.len();
        for i in 0..count {
            let index = (self.turn + i) % count;
            let type_url = Kind::ALL[index].type_url();
            let state = &mut self.types[index];
            let (response, fell_behind) = match state.build(&cache, self.next_seq, budget, push_due)
            {
                Ok(built) => built,
                Err(status) => {
                    self.shared.metrics.fell_behind("reconnect");
                    warn!(
                        type_url,
                        "client fell behind the change log; ending the stream so it reconnects"
                    );
                    return Err(status);
                }
            };
            if fell_behind {
                self.shared.metrics.fell_behind("resync");
                info!(
                    type_url,
                    "client fell behind the change log; reconciling against the full state"
                );
            }
            if let Some(response) = response {
                self.status
                    .record_type(Kind::ALL[index], state.summary(&cache));
                drop(cache);
                self.turn = (index + 1) % count;
                self.next_seq += 1;
                self.shared.metrics.pushed(
                    response.type_url,
                    response.resources.len(),
                    response.removed.len(),
                );
                debug!(
                    type_url = response.type_url,
                    nonce = response.nonce,
                    version = response.system_version_info,
                    resources = response.resources.len(),
                    removed = response.removed.len(),
                    "push"
                );
                return Ok(Some(response));
            }
            if push_due {
                self.status
                    .record_type(Kind::ALL[index], state.summary(&cache));
            }
        }
        Ok(None)
    }
}
