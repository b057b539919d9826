//! Keeps a [`ProxyState`] equal to what the xDS client holds.
//!
//! The client publishes its whole resource map on every change; applying it
//! means diffing by version against what was applied last, so one pod change
//! costs one `apply_address`, not a rebuild of 10 000 workloads.

use std::collections::HashMap;

use meshbox_proto::security::Authorization;
use meshbox_proto::workload::{Address, address::Type};

use super::policy::Policy;
use super::{ProxyState, Service, Workload};
use crate::xds::{Received, ResourceRef, Validator, XdsState};

/// Versions applied so far, by resource name.
#[derive(Debug, Default)]
pub struct Applied {
    addresses: HashMap<String, String>,
    authorizations: HashMap<String, String>,
}

impl Applied {
    /// Brings `state` up to `xds`; returns how many resources changed.
    pub fn sync(&mut self, xds: &XdsState, state: &mut ProxyState) -> usize {
        let mut changed = 0;
        changed += diff(
            &xds.addresses,
            &mut self.addresses,
            |name, r: Option<&Address>| {
                let _ = state.apply_address(name, r);
            },
        );
        changed += diff(
            &xds.authorizations,
            &mut self.authorizations,
            |name, r: Option<&Authorization>| {
                let _ = state.apply_authorization(name, r);
            },
        );
        changed
    }
}

fn diff<T>(
    current: &HashMap<String, Received<T>>,
    applied: &mut HashMap<String, String>,
    mut apply: impl FnMut(&str, Option<&T>),
) -> usize {
    let mut changed = 0;
    applied.retain(|name, _| {
        let keep = current.contains_key(name);
        if !keep {
            apply(name, None);
            changed += 1;
        }
        keep
    });
    for (name, received) in current {
        if applied.get(name) != Some(&received.version) {
            apply(name, Some(&received.resource));
            applied.insert(name.clone(), received.version.clone());
            changed += 1;
        }
    }
    changed
}

/// The xDS validator: a resource the proxy state would reject is NACKed
/// with the reason, so the control plane learns what it sent wrong.
pub fn validator() -> Validator {
    std::sync::Arc::new(|name: &str, resource: ResourceRef<'_>| match resource {
        ResourceRef::Address(a) => match &a.r#type {
            Some(Type::Workload(w)) => Workload::from_proto(w).map(|_| ()),
            Some(Type::Service(s)) => Service::from_proto(s).map(|_| ()),
            None => Err(super::ResourceError::Missing("address.type")),
        }
        .map_err(|e| format!("{name}: {e}")),
        ResourceRef::Authorization(a) => Policy::from_proto(name, a)
            .map(|_| ())
            .map_err(|e| format!("{name}: {e}")),
        // A node proxy never subscribes to waypoint types; the waypoint
        // checks them with its own validator.
        ResourceRef::WaypointPolicy(_) | ResourceRef::WaypointRoute(_) => Ok(()),
    })
}
