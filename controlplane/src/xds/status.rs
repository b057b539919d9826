//! What `GET /api/v1/dataplanes` shows about connected xDS clients.
//!
//! Each stream publishes a small summary here whenever it sends, receives
//! an ACK/NACK or changes subscriptions; the REST handler reads the
//! summaries without ever waiting on a stream. Client-supplied text (node
//! id, NODE_NAME, NACK messages) is length-limited before it is stored.

use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Peer;
use super::resource::{KINDS, Kind};
use super::shorten;

const MAX_CLIENT_TEXT: usize = 256;

/// One connected xDS stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    /// Who authenticated, e.g. `node:worker-1` or a SPIFFE ID.
    pub caller: String,
    /// The node: from the authenticated identity, else the client's
    /// `NODE_NAME` node metadata.
    pub node: Option<String>,
    /// `Node.id` as the client sent it.
    pub node_id: Option<String>,
    /// The client's address, when known.
    pub remote_addr: Option<String>,
    /// RFC 3339.
    pub connected_since: String,
    /// The Gateway (`namespace/name`) a waypoint client says it serves, in
    /// its `WAYPOINT` node metadata; absent for node dataplanes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
    pub types: Vec<TypeInfo>,
}

/// Per resource type on one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeInfo {
    pub type_url: String,
    /// Whether the client subscribed to everything of this type.
    pub wildcard: bool,
    /// Names explicitly subscribed (on-demand).
    pub subscribed: usize,
    /// Resources the client holds, as far as the server knows.
    pub resources: usize,
    /// Names waiting to be sent (a slow client shows a backlog here).
    pub pending: usize,
    /// `system_version_info` of the last response sent.
    pub last_sent_version: Option<String>,
    /// `system_version_info` of the last response the client ACKed.
    pub last_acked_version: Option<String>,
    pub last_nack: Option<NackInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NackInfo {
    pub version: String,
    pub message: String,
}

#[derive(Debug, Default)]
struct Live {
    node_id: Option<String>,
    node_name: Option<String>,
    waypoint: Option<String>,
    types: [Option<TypeInfo>; KINDS],
}

/// The shared view of one stream.
#[derive(Debug)]
pub(crate) struct StreamStatus {
    pub id: u64,
    peer: Peer,
    remote_addr: Option<String>,
    connected_since: OffsetDateTime,
    live: Mutex<Live>,
}

impl StreamStatus {
    pub(crate) fn new(id: u64, peer: Peer, remote_addr: Option<String>) -> Self {
        Self {
            id,
            peer,
            remote_addr,
            connected_since: OffsetDateTime::now_utc(),
            live: Mutex::new(Live::default()),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock()
    }

    pub(crate) fn record_node(&self, node_id: &str, node_name: Option<&str>) {
        let mut live = self.live();
        if live.node_id.is_none() && !node_id.is_empty() {
            live.node_id = Some(shorten(node_id, MAX_CLIENT_TEXT).to_owned());
        }
        if live.node_name.is_none()
            && let Some(name) = node_name.filter(|n| !n.is_empty())
        {
            let name = shorten(name, MAX_CLIENT_TEXT).to_owned();
            if let Some(authenticated) = &self.peer.node
                && *authenticated != name
            {
                tracing::warn!(
                    caller = self.peer.caller,
                    node = authenticated,
                    claimed = name,
                    "NODE_NAME in node metadata differs from the authenticated node; showing the authenticated one"
                );
            }
            live.node_name = Some(name);
        }
    }

    /// Records the `WAYPOINT` node metadata (the first one given counts).
    /// It is the client's claim, shown as such: which resources a stream
    /// gets does not depend on it.
    pub(crate) fn record_waypoint(&self, waypoint: Option<&str>) {
        let mut live = self.live();
        if live.waypoint.is_none()
            && let Some(w) = waypoint.filter(|w| !w.is_empty())
        {
            live.waypoint = Some(shorten(w, MAX_CLIENT_TEXT).to_owned());
        }
    }

    /// The client's node: the authenticated one, else the `NODE_NAME` it
    /// sent (the same as the status API shows).
    pub(crate) fn node(&self) -> Option<String> {
        self.peer
            .node
            .clone()
            .or_else(|| self.live().node_name.clone())
    }

    pub(crate) fn record_type(&self, kind: Kind, summary: TypeInfo) {
        self.live().types[kind.index()] = Some(summary);
    }

    pub(crate) fn info(&self) -> ConnectionInfo {
        let live = self.live();
        let types = Kind::ALL
            .iter()
            .filter_map(|kind| live.types[kind.index()].clone())
            .collect();
        ConnectionInfo {
            caller: self.peer.caller.clone(),
            node: self.peer.node.clone().or_else(|| live.node_name.clone()),
            node_id: live.node_id.clone(),
            remote_addr: self.remote_addr.clone(),
            connected_since: self
                .connected_since
                .format(&Rfc3339)
                .unwrap_or_else(|_| self.connected_since.unix_timestamp().to_string()),
            waypoint: live.waypoint.clone(),
            types,
        }
    }
}
