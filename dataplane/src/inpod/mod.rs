//! In-pod capture (node mode): for each enrolled pod on this node, the
//! redirection rules go into the pod's network namespace and the proxy's
//! listeners are opened inside it, from this one process.
//!
//! The [`Agent`] keeps the set of captured pods equal to what the control
//! plane says runs here enrolled (a local workload speaking HBONE): a pod's
//! namespace is found by the IP it holds ([`crate::netns::scan`]), or handed over
//! by the CNI plugin. Rules first, then listeners; a pod counts as captured
//! only when both are in place. When a pod leaves, its listeners close and
//! its rules are removed; when the dataplane stops, the rules stay, so
//! captured traffic is refused (nothing listens) rather than leaked, and the
//! next start re-adopts the pods.

pub mod enrollment;
pub mod report;
pub mod rules;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tracing::{info, warn};

pub use enrollment::EnrollmentLookup;

use crate::proxy::{Listeners, ProxyContext};
use crate::state::Protocol;
use meshbox_cni::{CaptureCommand, CaptureRequest, CaptureResponse};

use crate::netns::Netns;

/// The listener addresses opened inside each pod.
#[derive(Clone, Copy, Debug)]
pub struct PodListeners {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub plaintext: SocketAddr,
}

/// How long a CNI ADD waits for the control plane to know a new pod.
const CNI_WAIT: Duration = Duration::from_secs(3);

enum Enrollment {
    /// `known`: the control plane has the pod; else only its namespace.
    Enrolled {
        known: bool,
    },
    NotEnrolled,
}

/// Scanning every namespace is not free; at most this often.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);

struct Captured {
    netns: Arc<Netns>,
    ctx: Arc<ProxyContext>,
    ips: Vec<IpAddr>,
    /// Captured on the CNI plugin's word before the control plane knew the
    /// pod: kept until the plugin's DEL, or until the pod shows up.
    awaiting_state: bool,
}

/// Capture state of one pod, for `/config_dump` and the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub uid: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Agent {
    base: Arc<ProxyContext>,
    node: String,
    ports: PodListeners,
    /// Rewrite the node's own connections to captured pods (probes).
    probe_snat: bool,
    /// Asks the control plane about pods that are no workload yet.
    lookup: Option<EnrollmentLookup>,
    captured: Mutex<HashMap<String, Captured>>,
    /// Enrolled pods not captured yet, with why.
    pending: Mutex<BTreeMap<String, (Vec<IpAddr>, String)>>,
    last_scan: Mutex<Option<Instant>>,
    reconciling: tokio::sync::Mutex<()>,
    /// One capture or release at a time: the namespace scan and a CNI ADD
    /// may find the same pod at once, and only one may bind its listeners.
    capturing: tokio::sync::Mutex<()>,
    pub captures: prometheus_client::metrics::counter::Counter,
    pub failures: prometheus_client::metrics::counter::Counter,
}

impl Agent {
    pub fn new(
        base: Arc<ProxyContext>,
        node: String,
        ports: PodListeners,
        probe_snat: bool,
        lookup: Option<EnrollmentLookup>,
    ) -> Arc<Self> {
        Arc::new(Self {
            base,
            node,
            ports,
            probe_snat,
            lookup,
            captured: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            last_scan: Mutex::new(None),
            reconciling: tokio::sync::Mutex::new(()),
            capturing: tokio::sync::Mutex::new(()),
            captures: Default::default(),
            failures: Default::default(),
        })
    }

    /// The enrolled pods on this node: uid → IPs.
    fn wanted(&self) -> BTreeMap<String, Vec<IpAddr>> {
        let state = self.base.mesh.read();
        state
            .workloads()
            .filter(|w| {
                w.node == self.node && w.protocol == Protocol::Hbone && !w.addresses.is_empty()
            })
            .map(|w| (w.uid.clone(), w.addresses.clone()))
            .collect()
    }

    /// Brings the captured set in line with the mesh state.
    pub async fn reconcile(self: &Arc<Self>) {
        let _one_at_a_time = self.reconciling.lock().await;
        let wanted = self.wanted();
        let gone: Vec<String> = {
            let state = self.base.mesh.read();
            let mut captured = self.captured.lock();
            for (uid, pod) in captured.iter_mut() {
                // Captured before the control plane listed it: once it
                // does, the pod is judged like any other (an opted-out pod
                // is released).
                if wanted.contains_key(uid) || state.workload_by_uid(uid).is_some() {
                    pod.awaiting_state = false;
                }
            }
            drop(state);
            captured
                .iter()
                .filter(|(uid, pod)| !wanted.contains_key(*uid) && !pod.awaiting_state)
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        for uid in gone {
            self.release(&uid, true).await;
        }
        let missing: BTreeMap<String, Vec<IpAddr>> = {
            let captured = self.captured.lock();
            wanted
                .into_iter()
                .filter(|(uid, _)| !captured.contains_key(uid))
                .collect()
        };
        {
            let mut pending = self.pending.lock();
            pending.retain(|uid, _| missing.contains_key(uid));
        }
        if missing.is_empty() {
            return;
        }
        {
            let mut last = self.last_scan.lock();
            if last.is_some_and(|t| t.elapsed() < SCAN_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let by_ip = tokio::task::spawn_blocking(crate::netns::scan)
            .await
            .unwrap_or_default();
        for (uid, ips) in missing {
            let path = ips.iter().find_map(|ip| by_ip.get(ip));
            let Some(path) = path else {
                self.note_pending(
                    &uid,
                    &ips,
                    "no network namespace holds the pod's IP yet".into(),
                );
                continue;
            };
            match Netns::open(path) {
                Ok(ns) => {
                    if let Err(error) = self.capture(&uid, ns, ips.clone()).await {
                        self.note_pending(&uid, &ips, error.to_string());
                    }
                }
                Err(error) => {
                    self.note_pending(&uid, &ips, format!("opening {}: {error}", path.display()))
                }
            }
        }
    }

    fn note_pending(&self, uid: &str, ips: &[IpAddr], why: String) {
        let mut pending = self.pending.lock();
        pending.insert(uid.to_owned(), (ips.to_vec(), why));
    }

    /// Captures one pod: rules in its namespace, then listeners inside it.
    pub async fn capture(&self, uid: &str, netns: Netns, ips: Vec<IpAddr>) -> io::Result<()> {
        self.capture_as(uid, netns, ips, false).await
    }

    async fn capture_as(
        &self,
        uid: &str,
        netns: Netns,
        ips: Vec<IpAddr>,
        awaiting_state: bool,
    ) -> io::Result<()> {
        let _one_at_a_time = self.capturing.lock().await;
        if self
            .captured
            .lock()
            .get(uid)
            .is_some_and(|c| c.netns.same_as(&netns))
        {
            return Ok(());
        }
        let netns = Arc::new(netns);
        let ports = self.ports;
        let rules_ns = netns.clone();
        let has_ipv6 = ips.iter().any(|ip| ip.to_canonical().is_ipv6());
        let applied = tokio::task::spawn_blocking(move || {
            rules::apply(
                &rules_ns,
                ports.inbound.port(),
                ports.plaintext.port(),
                ports.outbound.port(),
                has_ipv6,
            )
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        match applied {
            Ok(None) => {}
            Ok(Some(error)) => {
                warn!(pod = uid, %error, "no IPv6 capture rules (the pod has no IPv6 address; IPv6 netfilter unavailable?)")
            }
            Err(error) => {
                self.failures.inc();
                warn!(pod = uid, netns = %netns.path().display(), %error, "installing the capture rules failed");
                return Err(error);
            }
        }
        let sockets = self.base.sockets.in_netns(netns.clone());
        let listeners = match Listeners::bind(
            &sockets,
            ports.outbound,
            ports.inbound,
            ports.plaintext,
            None,
        ) {
            Ok(l) => l,
            Err(error) => {
                self.failures.inc();
                warn!(pod = uid, %error, "opening listeners in the pod failed; its traffic is refused until they are");
                return Err(error);
            }
        };
        let ctx = Arc::new(self.base.for_pod(sockets, uid));
        listeners.serve(ctx.clone());
        info!(pod = uid, netns = %netns.path().display(), ips = ?ips, "pod captured");
        self.captures.inc();
        let previous = self.captured.lock().insert(
            uid.to_owned(),
            Captured {
                netns,
                ctx,
                ips,
                awaiting_state,
            },
        );
        if let Some(old) = previous {
            old.ctx.shutdown.cancel();
        }
        self.pending.lock().remove(uid);
        self.sync_probe_snat().await;
        Ok(())
    }

    /// Keeps the node-side probe rewrite in line with the captured pods.
    async fn sync_probe_snat(&self) {
        if !self.probe_snat {
            return;
        }
        let ips: Vec<IpAddr> = self
            .captured
            .lock()
            .values()
            .flat_map(|c| c.ips.iter().copied())
            .collect();
        let applied = tokio::task::spawn_blocking(move || rules::apply_probe_snat(&ips))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        if let Err(error) = applied {
            warn!(%error, "rewriting kubelet probes to the probe address failed; probes to captured pods go through the mesh");
        }
    }

    /// Stops serving a pod; `remove_rules` when it left the mesh (not when
    /// the dataplane stops).
    pub async fn release(&self, uid: &str, remove_rules: bool) {
        let _one_at_a_time = self.capturing.lock().await;
        let Some(pod) = self.captured.lock().remove(uid) else {
            return;
        };
        pod.ctx.shutdown.cancel();
        if remove_rules {
            let ns = pod.netns.clone();
            let _ = tokio::task::spawn_blocking(move || rules::remove(&ns)).await;
        }
        info!(pod = uid, rules_removed = remove_rules, "pod released");
        if remove_rules {
            self.sync_probe_snat().await;
        }
    }

    /// The CNI plugin's request: capture a pod as its sandbox is created,
    /// before the application's first instruction, or release it.
    ///
    /// Whether a new pod is enrolled is the control plane's call: from the
    /// xDS state when the pod is a workload there already, else by asking
    /// the control plane ([`EnrollmentLookup`]; a new pod has no IP in the
    /// API yet). An enrolled pod not yet in xDS is captured at once and its
    /// traffic refused until its workload and certificate arrive (fail
    /// closed). Only when the control plane cannot be asked does this wait
    /// a little for the pod to show up in xDS, then guess from its
    /// namespace: captured if the namespace has enrolled pods.
    pub async fn handle_cni(&self, req: CaptureRequest) -> CaptureResponse {
        let uid = format!(
            "{}//Pod/{}/{}",
            self.base.cluster_id, req.pod_namespace, req.pod_name
        );
        match req.command {
            CaptureCommand::Del => {
                self.release(&uid, true).await;
                CaptureResponse::not_captured()
            }
            CaptureCommand::Check => match self.enrollment(&uid, &req, Duration::ZERO).await {
                Enrollment::Enrolled { .. } if !self.is_captured(&uid) => {
                    CaptureResponse::error(format!("{uid} is enrolled but not captured"))
                }
                Enrollment::Enrolled { .. } => CaptureResponse::captured(),
                Enrollment::NotEnrolled => CaptureResponse::not_captured(),
            },
            CaptureCommand::Add => {
                let Enrollment::Enrolled { known } = self.enrollment(&uid, &req, CNI_WAIT).await
                else {
                    return CaptureResponse::not_captured();
                };
                let netns = match Netns::open(&req.netns) {
                    Ok(ns) => ns,
                    Err(e) => return CaptureResponse::error(format!("opening {}: {e}", req.netns)),
                };
                match self.capture_as(&uid, netns, req.ips.clone(), !known).await {
                    Ok(()) => CaptureResponse::captured(),
                    Err(e) => CaptureResponse::error(format!("capturing {uid}: {e}")),
                }
            }
        }
    }

    async fn enrollment(&self, uid: &str, req: &CaptureRequest, wait: Duration) -> Enrollment {
        if let Some(known) = self.known_enrollment(uid, req) {
            return known;
        }
        // A new pod has no IP in the API yet, so it is no workload in xDS:
        // ask the control plane, which knows it from its labels.
        if let Some(lookup) = &self.lookup
            && let Some(enrolled) = lookup.ask(&req.pod_namespace, &req.pod_name).await
        {
            return if enrolled {
                Enrollment::Enrolled { known: false }
            } else {
                Enrollment::NotEnrolled
            };
        }
        let deadline = Instant::now() + wait;
        loop {
            if Instant::now() >= deadline {
                let namespace_enrolled = self
                    .base
                    .mesh
                    .read()
                    .workloads()
                    .any(|w| w.namespace == req.pod_namespace && w.protocol == Protocol::Hbone);
                return if namespace_enrolled {
                    Enrollment::Enrolled { known: false }
                } else {
                    Enrollment::NotEnrolled
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(known) = self.known_enrollment(uid, req) {
                return known;
            }
        }
    }

    /// The pod's enrollment from the xDS state, when it is a workload there.
    fn known_enrollment(&self, uid: &str, req: &CaptureRequest) -> Option<Enrollment> {
        let state = self.base.mesh.read();
        let network = self.base.mesh.network();
        let w = state.workload_by_uid(uid).or_else(|| {
            req.ips
                .iter()
                .find_map(|ip| state.workload_by_ip(network, *ip))
        })?;
        Some(if w.protocol == Protocol::Hbone && w.node == self.node {
            Enrollment::Enrolled { known: true }
        } else {
            Enrollment::NotEnrolled
        })
    }

    /// Whether `uid` is captured now.
    pub fn is_captured(&self, uid: &str) -> bool {
        self.captured.lock().contains_key(uid)
    }

    pub fn status(&self) -> Vec<PodStatus> {
        let mut out: Vec<PodStatus> = self
            .captured
            .lock()
            .iter()
            .map(|(uid, c)| PodStatus {
                uid: uid.clone(),
                state: "captured",
                netns: Some(c.netns.path().display().to_string()),
                ips: c.ips.clone(),
                error: None,
            })
            .collect();
        out.extend(
            self.pending
                .lock()
                .iter()
                .map(|(uid, (ips, why))| PodStatus {
                    uid: uid.clone(),
                    state: "pending",
                    netns: None,
                    ips: ips.clone(),
                    error: Some(why.clone()),
                }),
        );
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }
}
