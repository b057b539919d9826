//! The mesh as the proxy sees it right now: the [`ProxyState`] behind a
//! lock, kept equal to what the xDS client holds, plus on-demand lookups of
//! destinations the proxy has not heard of.
//!
//! Boundaries: the state itself is [`crate::state`] (pure); the xDS stream
//! is [`crate::xds`]. This module is the glue and the only owner of the lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio::sync::watch;
use tracing::debug;

use crate::state::{Applied, ProxyState};
use crate::xds::{Answer, ResourceType, XdsClient, XdsState};

/// How long an on-demand "not found" is believed before asking again.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_NEGATIVE_ENTRIES: usize = 10_000;

pub struct Mesh {
    state: RwLock<ProxyState>,
    applied: Mutex<Applied>,
    xds: watch::Receiver<XdsState>,
    client: Option<XdsClient>,
    network: String,
    not_found: Mutex<HashMap<IpAddr, Instant>>,
}

impl Mesh {
    /// A mesh fed by `xds`; `client` (if given) answers on-demand lookups.
    pub fn new(
        xds: watch::Receiver<XdsState>,
        client: Option<XdsClient>,
        network: String,
    ) -> Arc<Self> {
        let mesh = Arc::new(Self {
            state: RwLock::new(ProxyState::new()),
            applied: Mutex::new(Applied::default()),
            xds,
            client,
            network,
            not_found: Mutex::new(HashMap::new()),
        });
        mesh.refresh();
        mesh
    }

    /// Applies whatever the xDS client holds now; returns how many resources
    /// changed.
    pub fn refresh(&self) -> usize {
        // Diffed in place: copying the client's whole resource map on every
        // change would cost more than the change.
        let xds = self.xds.borrow();
        let mut applied = self.applied.lock();
        let mut state = self.state.write();
        applied.sync(&xds, &mut state)
    }

    /// Follows the xDS client until it stops; `on_change` runs after each
    /// applied change (certificate prefetch, readiness).
    pub async fn follow(self: Arc<Self>, mut on_change: impl FnMut(&Mesh)) {
        let mut rx = self.xds.clone();
        loop {
            rx.borrow_and_update();
            let changed = self.refresh();
            if changed > 0 {
                debug!(changed, "applied xDS changes");
            }
            on_change(&self);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, ProxyState> {
        self.state.read()
    }

    /// Reads the xDS client's state without copying it.
    pub fn with_xds<T>(&self, f: impl FnOnce(&XdsState) -> T) -> T {
        f(&self.xds.borrow())
    }

    pub fn is_synced(&self) -> bool {
        self.xds.borrow().is_synced()
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    /// Makes sure the mesh has asked the control plane about `ip` before the
    /// proxy decides it is outside the mesh. Cheap when the IP is known or
    /// was recently not found.
    pub async fn lookup(&self, ip: IpAddr) {
        let Some(client) = &self.client else { return };
        {
            let state = self.read();
            if state.workload_by_ip(&self.network, ip).is_some()
                || state.is_service_vip(&self.network, ip)
            {
                return;
            }
        }
        {
            let mut not_found = self.not_found.lock();
            if let Some(at) = not_found.get(&ip) {
                if at.elapsed() < NEGATIVE_TTL {
                    return;
                }
                not_found.remove(&ip);
            }
        }
        let name = format!("{}/{ip}", self.network);
        match tokio::time::timeout(LOOKUP_TIMEOUT, client.demand(ResourceType::Address, name)).await
        {
            Ok(Ok(Answer::Found(_))) => {
                self.refresh();
            }
            Ok(Ok(Answer::NotFound)) => self.remember_not_found(ip),
            Ok(Err(error)) => debug!(%ip, %error, "on-demand lookup failed"),
            Err(_) => debug!(%ip, "on-demand lookup timed out"),
        }
    }

    fn remember_not_found(&self, ip: IpAddr) {
        let mut not_found = self.not_found.lock();
        if not_found.len() >= MAX_NEGATIVE_ENTRIES {
            not_found.retain(|_, at| at.elapsed() < NEGATIVE_TTL);
            if not_found.len() >= MAX_NEGATIVE_ENTRIES {
                not_found.clear();
            }
        }
        not_found.insert(ip, Instant::now());
    }
}
