//! Envoy's incremental ("delta") xDS bookkeeping for one resource type on
//! one stream: what the client subscribed to, what it holds, what it
//! rejected, and what it still needs to be told.
//!
//! An explicit (on-demand) Address subscription also gets what Istio's
//! control plane adds to it, and what Istio's ztunnel relies on: the
//! workloads on the client's own node (a dedicated-mode ztunnel waits for
//! its own workload without asking for it; a node proxy needs the pods it
//! serves), and the workloads behind a service the client subscribed to by
//! name or VIP (a service's endpoints are those workloads).
//!
//! This is pure state: it reads the [`Cache`] it is handed and produces
//! [`Outbound`] responses, but does no I/O, takes no locks and keeps no
//! clock. The stream task decides *when* to build a response (debounce,
//! room in the client's queue); this module decides *what* goes in it.
//!
//! Memory is bounded by the number of resources (and the subscription
//! limit), never by the number of updates: pending work is a de-duplicated
//! set of names, and the content is always read fresh from the cache when
//! a response is built, so a client that fell behind is sent the latest
//! state of whatever changed, once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use meshbox_proto::xds::DeltaDiscoveryRequest;
use tonic::Status;

use super::cache::Cache;
use super::codec::{OutResource, Outbound};
use super::resource::{Encoded, Kind, NetIp};
use super::shorten;
use super::status::{NackInfo, TypeInfo};

/// The name that turns a wildcard subscription on or off.
const WILDCARD: &str = "*";
/// Nonces sent but not yet ACKed or NACKed that we still recognise; an
/// answer to an older one is treated as stale.
const MAX_UNACKED: usize = 64;
/// Longest NACK message kept for the status API and logs.
const MAX_NACK_MESSAGE: usize = 1024;
/// Longest version string accepted in `initial_resource_versions`.
const MAX_VERSION_LEN: usize = 256;

/// Bounds on what a client may ask for.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_names_per_request: usize,
    pub max_name_len: usize,
    pub max_subscriptions: usize,
    pub max_initial_resource_versions: usize,
}

/// Checks a request's shape before any of it is applied, so a bad request
/// changes nothing.
pub(crate) fn validate(req: &DeltaDiscoveryRequest, limits: &Limits) -> Result<(), Status> {
    if req.type_url.is_empty() {
        return Err(Status::invalid_argument(
            "type_url is required on an aggregated (ADS) stream",
        ));
    }
    // Counted before any name is looked at: the count alone decides.
    if req.initial_resource_versions.len() > limits.max_initial_resource_versions {
        return Err(Status::invalid_argument(format!(
            "initial_resource_versions lists {} resources; at most {} are accepted",
            req.initial_resource_versions.len(),
            limits.max_initial_resource_versions
        )));
    }
    for (what, names) in [
        ("resource_names_subscribe", &req.resource_names_subscribe),
        (
            "resource_names_unsubscribe",
            &req.resource_names_unsubscribe,
        ),
    ] {
        if names.len() > limits.max_names_per_request {
            return Err(Status::invalid_argument(format!(
                "{what} lists {} names; at most {} are accepted per request: split the request",
                names.len(),
                limits.max_names_per_request
            )));
        }
        for name in names {
            check_name(name, limits)?;
        }
    }
    for (name, version) in &req.initial_resource_versions {
        check_name(name, limits)?;
        if version.len() > MAX_VERSION_LEN || version.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "initial_resource_versions has a malformed version for {:?}",
                shorten(name, 80)
            )));
        }
    }
    Ok(())
}

fn check_name(name: &str, limits: &Limits) -> Result<(), Status> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > limits.max_name_len {
        Some("is too long")
    } else if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("contains whitespace or control characters")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Status::invalid_argument(format!(
            "resource name {:?} {problem} (names are workload uids, namespace/name, or network/IP, at most {} bytes)",
            shorten(name, 80),
            limits.max_name_len
        ))),
    }
}

/// Whether the first request of a type subscribes to everything. Envoy: a
/// first request that names nothing at all is a wildcard subscription
/// (legacy form); "*" is the explicit form. Istio's ztunnel subscribes and
/// unsubscribes "*" in one request to mean "nothing yet" (on-demand only).
fn first_request_is_wildcard(req: &DeltaDiscoveryRequest) -> bool {
    let names = |list: &Vec<String>| list.iter().any(|n| n == WILDCARD);
    (req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty())
        || (names(&req.resource_names_subscribe) && !names(&req.resource_names_unsubscribe))
}

/// A de-duplicated FIFO of names.
#[derive(Debug, Default)]
struct NameQueue {
    set: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

/// A drained queue bigger than this gives its memory back: after an
/// initial sync a stream should not keep a table sized for the whole mesh.
const KEEP_QUEUE_CAPACITY: usize = 1024;

impl NameQueue {
    fn push(&mut self, name: &Arc<str>) {
        if self.set.insert(name.clone()) {
            self.order.push_back(name.clone());
        }
    }

    fn pop(&mut self) -> Option<Arc<str>> {
        let name = self.order.pop_front()?;
        self.set.remove(&name);
        if self.order.is_empty() && self.order.capacity() > KEEP_QUEUE_CAPACITY {
            *self = NameQueue::default();
        }
        Some(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.set.contains(name)
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// How a request's `response_nonce` relates to what we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ack {
    /// No nonce: a subscription request.
    None,
    Acked {
        nonce: u64,
        version: String,
    },
    Nacked {
        nonce: u64,
        version: String,
        message: String,
        resources: usize,
    },
    /// A nonce we sent but that was already answered or is too old to
    /// track: the ACK part is ignored, the subscription changes apply.
    Stale,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handled {
    Applied(Ack),
    /// The nonce is not one we ever sent on this stream for this type; the
    /// whole request is ignored as stale.
    UnknownNonce,
}

/// A response sent and not yet ACKed: what it carried, for a NACK.
#[derive(Debug)]
struct Sent {
    seq: u64,
    version: String,
    resources: Vec<(Arc<str>, Arc<str>)>,
}

/// Delta state of one type on one stream.
#[derive(Debug)]
pub(crate) struct TypeState {
    kind: Kind,
    started: bool,
    wildcard: bool,
    /// Explicit subscriptions: resource names and, for Address, IP lookup
    /// keys.
    subs: HashSet<Arc<str>>,
    /// The IP lookup keys among `subs`, by the address they name (one
    /// address may be spelled more than one way).
    ip_keys: HashMap<NetIp, Vec<Arc<str>>>,
    /// The node the client runs on (Address only); see the module docs.
    node: Option<Arc<str>>,
    /// Name → version the client holds.
    ///
    /// With explicit subscriptions this is kept for everything sent, to
    /// know what to update and remove. A wildcard client holds everything
    /// it was sent, so nothing is kept per resource (the main reason a
    /// hundred full-mesh clients cost little memory); only the versions it
    /// reported in `initial_resource_versions` stay here until each name
    /// has been reconciled once.
    known: HashMap<Arc<str>, Arc<str>>,
    /// Versions the client rejected; not offered again until they change.
    nacked: HashMap<Arc<str>, Arc<str>>,
    /// Newly subscribed names that must be answered, even if unchanged.
    answer: NameQueue,
    /// Names whose state may differ from what the client holds.
    dirty: NameQueue,
    /// A full reconciliation of a wildcard subscription walks this snapshot
    /// of the cache instead of queueing every name (no hashing per
    /// resource). Anything that changes after the snapshot is also in
    /// `dirty`, which is only worked on once the sweep is done, so the
    /// latest state always goes out last.
    sweep: Vec<Arc<Encoded>>,
    /// The cache generation this state has caught up with.
    cursor: u64,
    /// Reconcile every relevant name against the cache before the next
    /// response.
    resync: bool,
    /// Send a response even if it is empty (the answer to the first
    /// request, so the client knows it is in sync).
    must_respond: bool,
    /// A wildcard stream fell behind the change log: without a per-name
    /// record of what it holds, deletions it missed cannot be recovered,
    /// so the stream must be restarted (the client then reports what it
    /// holds in `initial_resource_versions`).
    lost_track: bool,
    last_seq: u64,
    unacked: VecDeque<Sent>,
    last_sent_version: Option<String>,
    last_acked_version: Option<String>,
    last_nack: Option<NackInfo>,
}

/// A response being filled.
struct Building {
    bytes: usize,
    out: Outbound,
    sent: Vec<(Arc<str>, Arc<str>)>,
    /// Names answered on request in this response, so the same name is
    /// not also sent again from the change backlog.
    answered: HashSet<Arc<str>>,
}

impl TypeState {
    pub(crate) fn new(kind: Kind) -> Self {
        Self {
            kind,
            started: false,
            wildcard: false,
            subs: HashSet::new(),
            ip_keys: HashMap::new(),
            node: None,
            known: HashMap::new(),
            nacked: HashMap::new(),
            answer: NameQueue::default(),
            dirty: NameQueue::default(),
            sweep: Vec::new(),
            cursor: 0,
            resync: false,
            must_respond: false,
            lost_track: false,
            last_seq: 0,
            unacked: VecDeque::new(),
            last_sent_version: None,
            last_acked_version: None,
            last_nack: None,
        }
    }

    /// Records the node the client runs on (the first one given counts).
    /// On an explicit Address subscription, the workloads on that node are
    /// then sent as if subscribed.
    pub(crate) fn set_node(&mut self, node: &str) {
        if self.kind != Kind::Address || self.node.is_some() || node.is_empty() {
            return;
        }
        self.node = Some(node.into());
        if self.started && !self.wildcard {
            self.resync = true;
        }
    }

    #[cfg(test)]
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Whether a response should be built now. `push_due` says the
    /// debounce after a cache change has elapsed; `latest` is the newest
    /// generation the stream has heard of.
    pub(crate) fn has_work(&self, push_due: bool, latest: u64) -> bool {
        self.started
            && (self.must_respond
                || self.lost_track
                || self.resync
                || !self.answer.is_empty()
                || !self.sweep.is_empty()
                || !self.dirty.is_empty()
                || (push_due && self.cursor < latest))
    }

    /// This type's row of `GET /api/v1/dataplanes`.
    pub(crate) fn summary(&self, cache: &Cache) -> TypeInfo {
        TypeInfo {
            type_url: self.kind.type_url().to_owned(),
            wildcard: self.wildcard,
            subscribed: self.subs.len(),
            resources: if self.wildcard {
                cache.len(self.kind)
            } else {
                self.known.len()
            },
            pending: self.dirty.len() + self.answer.len() + self.sweep.len(),
            last_sent_version: self.last_sent_version.clone(),
            last_acked_version: self.last_acked_version.clone(),
            last_nack: self.last_nack.clone(),
        }
    }

    /// Applies a validated request of this type.
    pub(crate) fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        cache: &Cache,
        limits: &Limits,
    ) -> Result<Handled, Status> {
        let nonce = if req.response_nonce.is_empty() {
            None
        } else {
            match self.classify(&req.response_nonce) {
                Nonce::Unknown => return Ok(Handled::UnknownNonce),
                known => Some(known),
            }
        };
        // Refused before anything is applied, the ACK included, so a refused
        // request leaves this state exactly as it was.
        let subscribed = self.subscriptions_after(req);
        if subscribed > limits.max_subscriptions {
            return Err(Status::invalid_argument(format!(
                "this request would leave {subscribed} names subscribed for {} on one stream; at most {} are allowed",
                self.kind.type_url(),
                limits.max_subscriptions,
            )));
        }
        let ack = match nonce {
            None => Ack::None,
            Some(Nonce::Outstanding(seq)) => self.acknowledge(seq, req.error_detail.as_ref()),
            Some(_) => Ack::Stale,
        };
        if self.started {
            self.change_subscriptions(req, cache);
        } else {
            self.start(req, cache);
        }
        Ok(Handled::Applied(ack))
    }

    /// How many names would be subscribed after applying `req` (the same
    /// rules as [`Self::start`] and [`Self::change_subscriptions`]), without
    /// changing anything.
    fn subscriptions_after(&self, req: &DeltaDiscoveryRequest) -> usize {
        let subscribe = req
            .resource_names_subscribe
            .iter()
            .map(String::as_str)
            .filter(|n| *n != WILDCARD);
        let unsubscribe: HashSet<&str> = req
            .resource_names_unsubscribe
            .iter()
            .map(String::as_str)
            .filter(|n| *n != WILDCARD)
            .collect();
        let mut added: HashSet<&str> = HashSet::new();
        if self.started {
            // Subscriptions are added first, then removals applied.
            added.extend(subscribe.filter(|n| !self.subs.contains(*n)));
            let removed = unsubscribe
                .iter()
                .filter(|n| self.subs.contains(**n) || added.contains(**n))
                .count();
            return self.subs.len() + added.len() - removed;
        }
        // First request: a name both subscribed and unsubscribed is not
        // subscribed; an on-demand client stays subscribed to what it
        // reports holding.
        added.extend(subscribe.filter(|n| !unsubscribe.contains(n)));
        if !first_request_is_wildcard(req) {
            added.extend(req.initial_resource_versions.keys().map(String::as_str));
        }
        self.subs.len() + added.len()
    }

    fn classify(&self, nonce: &str) -> Nonce {
        let Ok(seq) = nonce.parse::<u64>() else {
            return Nonce::Unknown;
        };
        if seq == 0 || seq > self.last_seq {
            Nonce::Unknown
        } else if self.unacked.iter().any(|s| s.seq == seq) {
            Nonce::Outstanding(seq)
        } else {
            Nonce::Stale
        }
    }

    fn acknowledge(&mut self, seq: u64, error: Option<&meshbox_proto::google::rpc::Status>) -> Ack {
        // Responses are answered in order, so older ones are settled too.
        let mut answered = None;
        while self.unacked.front().is_some_and(|s| s.seq <= seq) {
            answered = self.unacked.pop_front();
        }
        let Some(sent) = answered.filter(|s| s.seq == seq) else {
            return Ack::Stale;
        };
        match error {
            None => {
                self.last_acked_version = Some(sent.version.clone());
                Ack::Acked {
                    nonce: seq,
                    version: sent.version,
                }
            }
            Some(status) => {
                // The client may have applied part of the response; it is
                // still treated as holding what was sent (so removals are
                // sent), but these exact versions are not offered again.
                let resources = sent.resources.len();
                for (name, version) in sent.resources {
                    self.nacked.insert(name, version);
                }
                let message = shorten(&status.message, MAX_NACK_MESSAGE).to_owned();
                self.last_nack = Some(NackInfo {
                    version: sent.version.clone(),
                    message: message.clone(),
                });
                Ack::Nacked {
                    nonce: seq,
                    version: sent.version,
                    message,
                    resources,
                }
            }
        }
    }

    /// The first request of this type on the stream.
    fn start(&mut self, req: &DeltaDiscoveryRequest, cache: &Cache) {
        self.started = true;
        self.must_respond = true;
        self.resync = true;
        let unsubscribed: HashSet<&str> = req
            .resource_names_unsubscribe
            .iter()
            .map(String::as_str)
            .collect();
        let names: Vec<&str> = req
            .resource_names_subscribe
            .iter()
            .map(String::as_str)
            .filter(|n| !unsubscribed.contains(n))
            .collect();
        self.wildcard = first_request_is_wildcard(req);
        for (name, version) in &req.initial_resource_versions {
            let name = self.intern(name, cache);
            if !self.wildcard {
                // A reconnecting on-demand client lists what it holds here
                // and expects to stay subscribed to it (Istio does the same).
                self.subscribe(&name);
            }
            self.known.insert(name, version.as_str().into());
        }
        for name in names.into_iter().filter(|n| *n != WILDCARD) {
            let name = self.intern(name, cache);
            self.subscribe(&name);
            if !req.initial_resource_versions.contains_key(&*name) {
                self.answer.push(&name);
            }
        }
    }

    fn change_subscriptions(&mut self, req: &DeltaDiscoveryRequest, cache: &Cache) {
        for name in &req.resource_names_subscribe {
            if name == WILDCARD {
                if !self.wildcard {
                    // What is in `known` now serves as the baseline of the
                    // full reconciliation.
                    self.wildcard = true;
                    self.resync = true;
                    self.must_respond = true;
                }
                continue;
            }
            let name = self.intern(name, cache);
            self.subscribe(&name);
            self.answer.push(&name);
            self.queue_members(&name, cache);
        }
        for name in &req.resource_names_unsubscribe {
            if name == WILDCARD {
                if self.wildcard {
                    self.leave_wildcard(cache);
                }
                continue;
            }
            self.unsubscribe(name, cache);
        }
    }

    /// From "everything" to explicit names only. The client drops what it
    /// no longer asked for by itself (Envoy semantics; no removals are
    /// sent). For what it keeps, `known` must now be tracked: it holds the
    /// current version of everything not still waiting to be sent.
    fn leave_wildcard(&mut self, cache: &Cache) {
        // Pending changes must be in `dirty` first, or they would be
        // mistaken for versions the client already has.
        self.absorb(cache);
        for e in std::mem::take(&mut self.sweep) {
            self.dirty.push(&e.name);
        }
        self.wildcard = false;
        // Rare (a client narrowing its subscription), so one pass over the
        // cache is fine; it catches every way a name can still be wanted.
        let kept: Vec<&Arc<Encoded>> = cache
            .entries(self.kind)
            .filter(|e| self.wanted(e, cache))
            .collect();
        let mut known = std::mem::take(&mut self.known);
        known.retain(|name, _| {
            cache
                .get(self.kind, name)
                .is_some_and(|e| self.wanted(e, cache))
        });
        for e in kept {
            if !self.dirty.contains(&e.name) && !self.answer.contains(&e.name) {
                known
                    .entry(e.name.clone())
                    .or_insert_with(|| e.version.clone());
            }
        }
        self.known = known;
    }

    /// Uses the cache's copy of a name when there is one, so the maps of
    /// all streams share one allocation per name.
    fn intern(&self, name: &str, cache: &Cache) -> Arc<str> {
        cache
            .get(self.kind, name)
            .map(|e| e.name.clone())
            .unwrap_or_else(|| name.into())
    }

    fn ip_key(&self, name: &str) -> Option<NetIp> {
        match self.kind {
            Kind::Address => NetIp::parse(name),
            Kind::Authorization | Kind::WaypointPolicy | Kind::WaypointRoute => None,
        }
    }

    fn subscribe(&mut self, name: &Arc<str>) {
        if !self.subs.insert(name.clone()) {
            return;
        }
        if let Some(ip) = self.ip_key(name) {
            self.ip_keys.entry(ip).or_default().push(name.clone());
        }
    }

    fn unsubscribe(&mut self, name: &str, cache: &Cache) {
        if !self.subs.remove(name) {
            return;
        }
        if let Some(ip) = self.ip_key(name) {
            if let Some(spellings) = self.ip_keys.get_mut(&ip) {
                spellings.retain(|s| &**s != name);
                if spellings.is_empty() {
                    self.ip_keys.remove(&ip);
                }
            }
            if !self.wildcard {
                for matched in cache.lookup_ip(&ip) {
                    if !cache
                        .get(self.kind, matched)
                        .is_some_and(|e| self.wanted(e, cache))
                    {
                        self.known.remove(matched);
                    }
                }
            }
        }
        if !self.wildcard {
            self.known.remove(name);
            // The client drops what it unsubscribed from by itself, but not
            // the workloads that came with it: those are re-evaluated, and
            // the ones no longer wanted are sent as removed.
            self.queue_members(name, cache);
        }
    }

    fn wanted(&self, e: &Encoded, cache: &Cache) -> bool {
        self.wildcard
            || self.subs.contains(&e.name)
            || self.matches_ip_key(e)
            || self.implied(e, cache)
    }

    /// Whether an explicit subscription gets `e` without naming it: a
    /// workload on the client's node, or behind a service the client
    /// subscribed to by name or by VIP.
    fn implied(&self, e: &Encoded, cache: &Cache) -> bool {
        if self.node.is_some() && e.node.is_some() && self.node == e.node {
            return true;
        }
        e.member_of.iter().any(|service| {
            self.subs.contains(service)
                || (!self.ip_keys.is_empty()
                    && cache
                        .get(self.kind, service)
                        .is_some_and(|s| self.matches_ip_key(s)))
        })
    }

    /// Queues, for re-evaluation, the workloads behind the service `name`
    /// names, or behind the services at the address it looks up.
    fn queue_members(&mut self, name: &str, cache: &Cache) {
        if self.kind != Kind::Address || self.wildcard {
            return;
        }
        match self.ip_key(name) {
            Some(ip) => {
                for service in cache.lookup_ip(&ip) {
                    for member in cache.members(service) {
                        self.dirty.push(member);
                    }
                }
            }
            None => {
                for member in cache.members(name) {
                    self.dirty.push(member);
                }
            }
        }
    }

    fn matches_ip_key(&self, e: &Encoded) -> bool {
        !self.ip_keys.is_empty() && e.ips.iter().any(|ip| self.ip_keys.contains_key(ip))
    }

    fn aliases(&self, e: &Encoded) -> Vec<Arc<str>> {
        if self.ip_keys.is_empty() {
            return Vec::new();
        }
        e.ips
            .iter()
            .filter_map(|ip| self.ip_keys.get(ip))
            .flatten()
            .cloned()
            .collect()
    }

    /// Moves what changed in the cache since `cursor` into `dirty`.
    /// Returns `true` when the change log no longer reached back that far:
    /// an explicit subscription is then reconciled in full against what
    /// the client holds; a wildcard one has lost track (see `lost_track`).
    pub(crate) fn absorb(&mut self, cache: &Cache) -> bool {
        let mut fell_behind = false;
        if !self.resync {
            match cache.changes_since(self.cursor) {
                Some(changes) => {
                    let explicit = !self.wildcard && self.kind == Kind::Address;
                    for change in changes.filter(|c| c.kind == self.kind) {
                        if self.relevant(&change.name, cache) {
                            self.dirty.push(&change.name);
                        }
                        if explicit {
                            // A service that changed (its VIPs, or its
                            // existence) may change which workloads come
                            // with it.
                            for member in cache.members(&change.name) {
                                if self.relevant(member, cache) {
                                    self.dirty.push(member);
                                }
                            }
                        }
                    }
                }
                None => {
                    fell_behind = true;
                    self.lost_track |= self.wildcard;
                }
            }
        }
        if (self.resync || fell_behind) && !self.lost_track {
            self.fill_everything(cache);
            self.resync = false;
        }
        self.cursor = cache.generation();
        fell_behind
    }

    fn relevant(&self, name: &Arc<str>, cache: &Cache) -> bool {
        self.wildcard
            || self.subs.contains(name)
            || self.known.contains_key(name)
            || cache
                .get(self.kind, name)
                .is_some_and(|e| self.wanted(e, cache))
    }

    fn fill_everything(&mut self, cache: &Cache) {
        let wildcard = self.wildcard;
        if wildcard {
            self.sweep = cache.entries(self.kind).cloned().collect();
        }
        // On a wildcard subscription, whatever is in the cache is covered
        // by the sweep; queue only the rest (removals, "not found").
        let covered = |name: &Arc<str>| wildcard && cache.get(self.kind, name).is_some();
        let mut dirty = std::mem::take(&mut self.dirty);
        for name in self.subs.iter().chain(self.known.keys()) {
            // Names waiting for their answer get it there.
            if !covered(name) && !self.answer.contains(name) {
                dirty.push(name);
            }
        }
        if !wildcard {
            for ip in self.ip_keys.keys() {
                for name in cache.lookup_ip(ip) {
                    dirty.push(name);
                    for member in cache.members(name) {
                        dirty.push(member);
                    }
                }
            }
            for name in &self.subs {
                for member in cache.members(name) {
                    dirty.push(member);
                }
            }
            if let Some(node) = &self.node {
                for name in cache.on_node(node) {
                    dirty.push(name);
                }
            }
        }
        self.dirty = dirty;
    }

    /// Builds the next response, of at most about `budget` bytes, or
    /// `None` when the client is already up to date. `absorb` is false
    /// while a debounce is running: only subscription answers go out then.
    /// The second value reports a stream that fell behind the change log
    /// and was reconciled in full; `Err` ends a wildcard stream that lost
    /// track (see `lost_track`).
    pub(crate) fn build(
        &mut self,
        cache: &Cache,
        seq: u64,
        budget: usize,
        absorb: bool,
    ) -> Result<(Option<Outbound>, bool), Status> {
        if !self.started {
            return Ok((None, false));
        }
        let fell_behind = if absorb || self.resync {
            self.absorb(cache)
        } else {
            false
        };
        if self.lost_track {
            return Err(Status::unavailable(format!(
                "this stream fell more than {} changes behind and lost track of the {} resources the client holds; reconnect (with initial_resource_versions) to resynchronise",
                cache.log_capacity(),
                self.kind.type_url()
            )));
        }
        let mut b = Building {
            bytes: 0,
            out: Outbound {
                type_url: self.kind.type_url(),
                ..Default::default()
            },
            sent: Vec::new(),
            answered: HashSet::new(),
        };
        while b.bytes < budget {
            if let Some(name) = self.answer.pop() {
                if self.subs.contains(&name) {
                    self.evaluate(&name, true, cache, &mut b);
                }
            } else if let Some(e) = self.sweep.pop() {
                if self.sweep.is_empty() {
                    self.sweep = Vec::new();
                }
                if b.answered.is_empty() || !b.answered.contains(&e.name) {
                    self.evaluate_entry(&e, cache, &mut b);
                }
            } else if let Some(name) = self.dirty.pop() {
                if b.answered.is_empty() || !b.answered.contains(&name) {
                    self.evaluate(&name, false, cache, &mut b);
                }
            } else {
                break;
            }
        }
        if b.out.is_empty() && !self.must_respond {
            return Ok((None, fell_behind));
        }
        self.must_respond = false;
        let version = cache.generation().to_string();
        b.out.nonce = seq.to_string();
        b.out.system_version_info = version.clone();
        self.last_seq = seq;
        self.unacked.push_back(Sent {
            seq,
            version: version.clone(),
            resources: b.sent,
        });
        if self.unacked.len() > MAX_UNACKED {
            self.unacked.pop_front();
        }
        self.last_sent_version = Some(version);
        Ok((Some(b.out), fell_behind))
    }

    /// Decides what (if anything) the client must be told about `name`.
    /// `force`: the client just asked for it, so it is answered even if it
    /// already holds the current version, and "not found" if it is absent.
    fn evaluate(&mut self, name: &Arc<str>, force: bool, cache: &Cache, b: &mut Building) {
        if let Some(e) = cache.get(self.kind, name) {
            if self.wanted(e, cache) {
                let e = e.clone();
                self.offer(&e, force, b);
            } else if self.known.remove(name).is_some() {
                // It exists but no longer matches what the client asked
                // for (e.g. a workload moved off a looked-up IP).
                self.push_removed(name, b);
            }
            return;
        }
        if !self.nacked.is_empty() {
            self.nacked.remove(name);
        }
        if self.subs.contains(name)
            && let Some(ip) = self.ip_key(name)
        {
            let matches = cache.lookup_ip(&ip);
            if !matches.is_empty() {
                // The key names a lookup, not a resource: answer with the
                // resources at that address (aliased to the key).
                self.known.remove(name);
                if force {
                    for matched in matches {
                        if let Some(e) = cache.get(self.kind, matched) {
                            let e = e.clone();
                            self.offer(&e, true, b);
                        }
                    }
                }
                return;
            }
        }
        let held = self.known.remove(name).is_some();
        // A wildcard client may hold any name that ever existed; an
        // explicit one only what we know it holds. A name asked for that
        // does not exist is answered as removed (Envoy's "not found").
        if held || self.wildcard || (force && self.subs.contains(name)) {
            if force {
                b.answered.insert(name.clone());
            }
            self.push_removed(name, b);
        }
    }

    /// [`Self::evaluate`] for an entry of the sweep's snapshot.
    fn evaluate_entry(&mut self, e: &Arc<Encoded>, cache: &Cache, b: &mut Building) {
        if self.wanted(e, cache) {
            self.offer(e, false, b);
        } else if self.known.remove(&e.name).is_some() {
            self.push_removed(&e.name, b);
        }
    }

    fn offer(&mut self, e: &Arc<Encoded>, force: bool, b: &mut Building) {
        if !self.nacked.is_empty()
            && let Some(rejected) = self.nacked.get(&e.name)
        {
            if *rejected == e.version {
                return;
            }
            self.nacked.remove(&e.name);
        }
        if force {
            if !b.answered.insert(e.name.clone()) {
                // Already in this response.
                return;
            }
        } else if !self.known.is_empty() && self.known.get(&e.name).is_some_and(|v| *v == e.version)
        {
            // The client has it.
            if self.wildcard {
                self.known.remove(&e.name);
            }
            return;
        }
        let aliases = self.aliases(e);
        b.bytes += e.bytes.len() + aliases.iter().map(|a| a.len() + 2).sum::<usize>();
        b.out.resources.push(OutResource {
            bytes: e.bytes.clone(),
            aliases,
        });
        b.sent.push((e.name.clone(), e.version.clone()));
        if self.wildcard {
            self.known.remove(&e.name);
        } else {
            self.known.insert(e.name.clone(), e.version.clone());
        }
    }

    fn push_removed(&mut self, name: &Arc<str>, b: &mut Building) {
        b.bytes += name.len() + 2;
        b.out.removed.push(name.clone());
    }
}

/// How a `response_nonce` relates to what this stream sent.
enum Nonce {
    /// Sent and awaiting its ACK/NACK.
    Outstanding(u64),
    /// Sent, but already answered or too old to track.
    Stale,
    /// Never sent.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshbox_proto::workload::{Address, NetworkAddress, PortList, Service, Workload, address};
    use meshbox_proto::xds::{DeltaDiscoveryResponse, Resource};
    use prost::Message;

    const LIMITS: Limits = Limits {
        max_names_per_request: 10,
        max_name_len: 64,
        max_subscriptions: 20,
        max_initial_resource_versions: 5,
    };

    fn put(cache: &mut Cache, uid: &str, ip: [u8; 4], tag: &str) {
        let a = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                name: tag.into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        };
        cache.apply(
            Kind::Address,
            uid.into(),
            Some(Arc::new(Encoded::address(uid.into(), &a))),
        );
    }

    /// A workload on `node`, an endpoint of `services`.
    fn put_on(cache: &mut Cache, uid: &str, ip: [u8; 4], node: &str, services: &[&str]) {
        let a = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                addresses: vec![ip.to_vec()],
                node: node.into(),
                services: services
                    .iter()
                    .map(|s| (s.to_string(), PortList::default()))
                    .collect(),
                ..Default::default()
            })),
        };
        cache.apply(
            Kind::Address,
            uid.into(),
            Some(Arc::new(Encoded::address(uid.into(), &a))),
        );
    }

    fn put_service(cache: &mut Cache, name: &str, vip: [u8; 4]) {
        let a = Address {
            r#type: Some(address::Type::Service(Service {
                hostname: name.into(),
                addresses: vec![NetworkAddress {
                    network: String::new(),
                    address: vip.to_vec(),
                    length: None,
                }],
                ..Default::default()
            })),
        };
        cache.apply(
            Kind::Address,
            name.into(),
            Some(Arc::new(Encoded::address(name.into(), &a))),
        );
    }

    fn req(sub: &[&str], unsub: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: Kind::Address.type_url().into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn decode(out: Outbound) -> DeltaDiscoveryResponse {
        let mut buf = Vec::new();
        out.write(&mut buf);
        DeltaDiscoveryResponse::decode(buf.as_slice()).unwrap()
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut n: Vec<String> = r
            .resources
            .iter()
            .map(|r: &Resource| r.name.clone())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn on_demand_ip_lookup_and_not_found() {
        let mut cache = Cache::new(100);
        put(&mut cache, "a", [10, 0, 0, 1], "x");
        put(&mut cache, "b", [10, 0, 0, 2], "x");
        let mut t = TypeState::new(Kind::Address);
        // ztunnel's "subscribe to nothing".
        t.on_request(&req(&["*"], &["*"]), &cache, &LIMITS).unwrap();
        let (out, _) = t.build(&cache, 1, 1 << 20, true).unwrap();
        assert!(out.unwrap().is_empty());
        t.on_request(&req(&["/10.0.0.1", "nope"], &[]), &cache, &LIMITS)
            .unwrap();
        let r = decode(t.build(&cache, 2, 1 << 20, false).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["a"]);
        assert_eq!(r.resources[0].aliases, vec!["/10.0.0.1"]);
        assert_eq!(r.removed_resources, vec!["nope"]);
        // A change to "b" is not for this client; one to "a" is.
        put(&mut cache, "b", [10, 0, 0, 2], "y");
        assert!(t.build(&cache, 3, 1 << 20, true).unwrap().0.is_none());
        put(&mut cache, "a", [10, 0, 0, 1], "y");
        let r = decode(t.build(&cache, 3, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["a"]);
        // A new workload taking the looked-up IP is sent too.
        put(&mut cache, "c", [10, 0, 0, 1], "y");
        let r = decode(t.build(&cache, 4, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["c"]);
    }

    #[test]
    fn on_demand_gets_its_node_and_service_endpoints_like_istio() {
        let mut cache = Cache::new(100);
        put_on(&mut cache, "mine", [10, 0, 0, 1], "n1", &[]);
        put_on(&mut cache, "other", [10, 0, 0, 2], "n2", &[]);
        put_on(&mut cache, "ep1", [10, 0, 0, 3], "n2", &["ns/svc"]);
        put_on(&mut cache, "ep2", [10, 0, 0, 4], "n3", &["ns/svc"]);
        put_service(&mut cache, "ns/svc", [10, 96, 0, 1]);
        put_service(&mut cache, "ns/svc2", [10, 96, 0, 2]);
        let mut t = TypeState::new(Kind::Address);
        t.set_node("n1");
        // ztunnel's "subscribe to nothing" still gets its node's workloads.
        t.on_request(&req(&["*"], &["*"]), &cache, &LIMITS).unwrap();
        let r = decode(t.build(&cache, 1, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["mine"]);
        // A workload scheduled on the node later is pushed; one elsewhere
        // is not.
        put_on(&mut cache, "mine2", [10, 0, 0, 5], "n1", &[]);
        put_on(&mut cache, "other2", [10, 0, 0, 6], "n2", &[]);
        let r = decode(t.build(&cache, 2, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["mine2"]);
        // Moving off the node removes it.
        put_on(&mut cache, "mine2", [10, 0, 0, 5], "n2", &[]);
        let r = decode(t.build(&cache, 3, 1 << 20, true).unwrap().0.unwrap());
        assert!(r.resources.is_empty());
        assert_eq!(r.removed_resources, vec!["mine2"]);

        // A VIP lookup answers with the service and its endpoints.
        t.on_request(&req(&["/10.96.0.1"], &[]), &cache, &LIMITS)
            .unwrap();
        let r = decode(t.build(&cache, 4, 1 << 20, false).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["ep1", "ep2", "ns/svc"]);
        // A new endpoint follows; one that leaves the service is removed.
        put_on(&mut cache, "ep3", [10, 0, 0, 7], "n3", &["ns/svc"]);
        put_on(&mut cache, "ep1", [10, 0, 0, 3], "n2", &["ns/svc2"]);
        let r = decode(t.build(&cache, 5, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["ep3"]);
        assert_eq!(r.removed_resources, vec!["ep1"]);
        // The service losing that VIP takes its endpoints with it.
        put_service(&mut cache, "ns/svc", [10, 96, 0, 9]);
        let r = decode(t.build(&cache, 6, 1 << 20, true).unwrap().0.unwrap());
        let mut removed = r.removed_resources.clone();
        removed.sort();
        assert_eq!(removed, vec!["ep2", "ep3", "ns/svc"]);

        // By name: the service and its endpoints; unsubscribing removes
        // the endpoints (the client drops the service itself).
        t.on_request(&req(&["ns/svc2"], &[]), &cache, &LIMITS)
            .unwrap();
        let r = decode(t.build(&cache, 7, 1 << 20, false).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["ep1", "ns/svc2"]);
        t.on_request(&req(&[], &["ns/svc2"]), &cache, &LIMITS)
            .unwrap();
        let r = decode(t.build(&cache, 8, 1 << 20, false).unwrap().0.unwrap());
        assert!(r.resources.is_empty());
        assert_eq!(r.removed_resources, vec!["ep1"]);
        assert!(t.build(&cache, 9, 1 << 20, true).unwrap().0.is_none());
    }

    #[test]
    fn a_node_learned_after_the_first_request_brings_its_workloads() {
        let mut cache = Cache::new(100);
        put_on(&mut cache, "mine", [10, 0, 0, 1], "n1", &[]);
        let mut t = TypeState::new(Kind::Address);
        t.on_request(&req(&["*"], &["*"]), &cache, &LIMITS).unwrap();
        let r = decode(t.build(&cache, 1, 1 << 20, true).unwrap().0.unwrap());
        assert!(r.resources.is_empty());
        t.set_node("n1");
        let r = decode(t.build(&cache, 2, 1 << 20, false).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["mine"]);
        // Wildcard subscriptions are unaffected (they get everything), and
        // so is the Authorization type.
        let mut a = TypeState::new(Kind::Authorization);
        a.set_node("n1");
        assert!(a.node.is_none());
    }

    #[test]
    fn nack_suppresses_that_version_only() {
        let mut cache = Cache::new(100);
        put(&mut cache, "a", [10, 0, 0, 1], "x");
        let mut t = TypeState::new(Kind::Address);
        t.on_request(&req(&[], &[]), &cache, &LIMITS).unwrap();
        let r = decode(t.build(&cache, 1, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["a"]);
        let mut nack = req(&[], &[]);
        nack.response_nonce = "1".into();
        nack.error_detail = Some(meshbox_proto::google::rpc::Status {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        let handled = t.on_request(&nack, &cache, &LIMITS).unwrap();
        assert!(matches!(
            handled,
            Handled::Applied(Ack::Nacked { resources: 1, .. })
        ));
        // Re-subscribing does not bring the rejected version back.
        t.on_request(&req(&["a"], &[]), &cache, &LIMITS).unwrap();
        assert!(t.build(&cache, 2, 1 << 20, true).unwrap().0.is_none());
        put(&mut cache, "a", [10, 0, 0, 1], "y");
        let r = decode(t.build(&cache, 3, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["a"]);
    }

    #[test]
    fn bad_requests_are_refused_whole() {
        let long = "x".repeat(65);
        for bad in [vec![""], vec!["a b"], vec!["a\u{0}"], vec![long.as_str()]] {
            assert!(validate(&req(&bad, &[]), &LIMITS).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..11).map(|i| format!("n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let status = validate(&req(&many, &[]), &LIMITS).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(validate(&req(&["*", "/10.0.0.1", "c//Pod/ns/n"], &["*"]), &LIMITS).is_ok());
    }

    #[test]
    fn unknown_and_stale_nonces() {
        let cache = Cache::new(10);
        let mut t = TypeState::new(Kind::Address);
        let mut r = req(&[], &[]);
        r.response_nonce = "1".into();
        assert_eq!(
            t.on_request(&r, &cache, &LIMITS).unwrap(),
            Handled::UnknownNonce
        );
        assert!(!t.started());
        t.on_request(&req(&[], &[]), &cache, &LIMITS).unwrap();
        t.build(&cache, 1, 100, true).unwrap().0.unwrap();
        r.response_nonce = "1".into();
        assert!(matches!(
            t.on_request(&r, &cache, &LIMITS).unwrap(),
            Handled::Applied(Ack::Acked { nonce: 1, .. })
        ));
        assert_eq!(
            t.on_request(&r, &cache, &LIMITS).unwrap(),
            Handled::Applied(Ack::Stale)
        );
        r.response_nonce = "zzz".into();
        assert_eq!(
            t.on_request(&r, &cache, &LIMITS).unwrap(),
            Handled::UnknownNonce
        );
    }

    #[test]
    fn leaving_wildcard_keeps_tracking_explicit_names() {
        let mut cache = Cache::new(100);
        put(&mut cache, "a", [10, 0, 0, 1], "x");
        put(&mut cache, "b", [10, 0, 0, 2], "x");
        let mut t = TypeState::new(Kind::Address);
        t.on_request(&req(&["*", "a"], &[]), &cache, &LIMITS)
            .unwrap();
        let r = decode(t.build(&cache, 1, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["a", "b"]);
        // A change not yet pushed when the client leaves wildcard mode.
        put(&mut cache, "a", [10, 0, 0, 1], "y");
        t.on_request(&req(&[], &["*"]), &cache, &LIMITS).unwrap();
        let r = decode(t.build(&cache, 2, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["a"], "the pending change still goes out");
        put(&mut cache, "b", [10, 0, 0, 2], "y");
        assert!(
            t.build(&cache, 3, 1 << 20, true).unwrap().0.is_none(),
            "b is no longer wanted"
        );
        cache.apply(Kind::Address, "a".into(), None);
        let r = decode(t.build(&cache, 3, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(r.removed_resources, vec!["a"]);
    }

    #[test]
    fn wildcard_reconnect_sends_only_differences() {
        let mut cache = Cache::new(100);
        put(&mut cache, "a", [10, 0, 0, 1], "x");
        put(&mut cache, "b", [10, 0, 0, 2], "x");
        let version_a = cache.get(Kind::Address, "a").unwrap().version.to_string();
        let mut t = TypeState::new(Kind::Address);
        let mut first = req(&[], &[]);
        first.initial_resource_versions = [
            ("a".to_string(), version_a),
            ("gone".to_string(), "v".to_string()),
        ]
        .into();
        t.on_request(&first, &cache, &LIMITS).unwrap();
        let r = decode(t.build(&cache, 1, 1 << 20, true).unwrap().0.unwrap());
        assert_eq!(names(&r), vec!["b"]);
        assert_eq!(r.removed_resources, vec!["gone"]);
        assert!(t.build(&cache, 2, 1 << 20, true).unwrap().0.is_none());
    }

    fn many(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn refs(names: &[String]) -> Vec<&str> {
        names.iter().map(String::as_str).collect()
    }

    #[test]
    fn the_subscription_limit_is_checked_before_anything_is_applied() {
        let cache = Cache::new(100);
        let mut t = TypeState::new(Kind::Address);
        let first = many("a", 18);
        t.on_request(&req(&refs(&first), &[]), &cache, &LIMITS)
            .unwrap();
        t.build(&cache, 1, 1 << 20, true).unwrap().0.unwrap();
        let before = t.summary(&cache);
        // Acks response 1 and asks for 3 more: 21 > 20.
        let more = many("b", 3);
        let mut over = req(&refs(&more), &[]);
        over.response_nonce = "1".into();
        let status = t.on_request(&over, &cache, &LIMITS).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("at most 20"),
            "{}",
            status.message()
        );
        let after = t.summary(&cache);
        assert_eq!(after.subscribed, 18, "nothing was subscribed");
        assert_eq!(after.pending, before.pending, "nothing was queued");
        assert_eq!(after.last_acked_version, None, "the ACK was not applied");
        assert!(
            matches!(
                t.on_request(
                    &{
                        let mut ack = req(&[], &[]);
                        ack.response_nonce = "1".into();
                        ack
                    },
                    &cache,
                    &LIMITS
                ),
                Ok(Handled::Applied(Ack::Acked { nonce: 1, .. }))
            ),
            "response 1 is still waiting for its ACK"
        );
        // Swapping names at the limit is fine: removals count.
        let swap = many("c", 2);
        t.on_request(&req(&refs(&swap), &["a0", "a1"]), &cache, &LIMITS)
            .unwrap();
        t.on_request(&req(&["d0", "d1"], &["a2", "a3"]), &cache, &LIMITS)
            .unwrap();
        assert_eq!(t.summary(&cache).subscribed, 18);
        let two = many("e", 2);
        t.on_request(&req(&refs(&two), &[]), &cache, &LIMITS)
            .unwrap();
        assert_eq!(t.summary(&cache).subscribed, 20);
        assert!(t.on_request(&req(&["f"], &[]), &cache, &LIMITS).is_err());
        // A name subscribed and unsubscribed in one request ends unsubscribed.
        t.on_request(&req(&["f"], &["f", "e0"]), &cache, &LIMITS)
            .unwrap();
        assert_eq!(t.summary(&cache).subscribed, 19);
    }

    #[test]
    fn a_first_request_over_the_limit_starts_nothing() {
        let cache = Cache::new(100);
        let mut t = TypeState::new(Kind::Address);
        // An on-demand client reconnecting stays subscribed to what it
        // holds: 15 held + 6 named = 21 > 20.
        let mut first = req(&refs(&many("n", 6)), &[]);
        first.initial_resource_versions = many("held", 15)
            .into_iter()
            .map(|n| (n, "v".to_string()))
            .collect();
        assert!(t.on_request(&first, &cache, &LIMITS).is_err());
        assert!(!t.started());
        assert_eq!(t.summary(&cache).subscribed, 0);
        // The same on a wildcard stream holds no subscriptions.
        first.resource_names_subscribe.push("*".into());
        t.on_request(&first, &cache, &LIMITS).unwrap();
        assert_eq!(t.summary(&cache).subscribed, 6);
    }

    #[test]
    fn too_many_initial_resource_versions_are_refused_unread() {
        let mut r = req(&[], &[]);
        r.initial_resource_versions = many("n", 5)
            .into_iter()
            .map(|n| (n, "v".to_string()))
            .collect();
        assert!(validate(&r, &LIMITS).is_ok());
        // One more, with a name that would itself be refused: the count is
        // what is reported.
        r.initial_resource_versions
            .insert("bad name".into(), "v".into());
        let status = validate(&r, &LIMITS).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("lists 6 resources; at most 5"),
            "{}",
            status.message()
        );
    }
}
