//! The resources a client has received, and how one response changes them.
//!
//! Pure data: decoding, validation and applying a `DeltaDiscoveryResponse`
//! to an [`XdsState`]. Rejected resources are never stored, so they are
//! never reported back in `initial_resource_versions` and a server that
//! honours those versions sends them again (a retry) after a reconnect.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use meshbox_proto::meshbox::{WaypointPolicy, WaypointRoute};
use meshbox_proto::security::Authorization;
use meshbox_proto::workload::Address;
use meshbox_proto::xds::{DeltaDiscoveryResponse, Resource};
use prost::Message;

/// The two resource types of Istio's workload API, and meshbox's two for
/// waypoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Address,
    Authorization,
    WaypointPolicy,
    WaypointRoute,
}

/// How many resource types there are.
pub(crate) const TYPES: usize = 4;

impl ResourceType {
    pub const ALL: [ResourceType; TYPES] = [
        ResourceType::Address,
        ResourceType::Authorization,
        ResourceType::WaypointPolicy,
        ResourceType::WaypointRoute,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Address => meshbox_proto::ADDRESS_TYPE_URL,
            ResourceType::Authorization => meshbox_proto::AUTHORIZATION_TYPE_URL,
            ResourceType::WaypointPolicy => meshbox_proto::WAYPOINT_POLICY_TYPE_URL,
            ResourceType::WaypointRoute => meshbox_proto::WAYPOINT_ROUTE_TYPE_URL,
        }
    }

    /// Istio's own types, which every stream asks for (a stock istiod
    /// knows no others, so meshbox's are asked for only when subscribed).
    pub fn is_istio(self) -> bool {
        matches!(self, ResourceType::Address | ResourceType::Authorization)
    }

    pub fn from_type_url(type_url: &str) -> Option<ResourceType> {
        Self::ALL.into_iter().find(|t| t.type_url() == type_url)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A resource as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received<T> {
    pub version: String,
    pub resource: Arc<T>,
    /// Other names the server answered with this resource (e.g. the
    /// `network/IP` key of an on-demand lookup).
    pub aliases: Vec<String>,
}

/// A decoded resource handed to the validation callback.
#[derive(Debug, Clone, Copy)]
pub enum ResourceRef<'a> {
    Address(&'a Address),
    Authorization(&'a Authorization),
    WaypointPolicy(&'a WaypointPolicy),
    WaypointRoute(&'a WaypointRoute),
}

/// Decides whether a decoded resource is acceptable; `Err(reason)` rejects
/// it and makes the client NACK the response that carried it.
pub type Validator = Arc<dyn Fn(&str, ResourceRef<'_>) -> Result<(), String> + Send + Sync>;

/// Everything the client knows, published through a `watch` channel.
#[derive(Debug, Clone, Default)]
pub struct XdsState {
    /// Address resources (workloads and services) by resource name.
    pub addresses: HashMap<String, Received<Address>>,
    /// Authorization resources by `{namespace}/{name}`.
    pub authorizations: HashMap<String, Received<Authorization>>,
    /// Waypoint L7 policies by `{namespace}/{name}` (waypoints only).
    pub waypoint_policies: HashMap<String, Received<WaypointPolicy>>,
    /// Waypoint routes by `{namespace}/{name}` (waypoints only).
    pub waypoint_routes: HashMap<String, Received<WaypointRoute>>,
    /// A stream is open.
    pub connected: bool,
    /// Per type (indexed like [`ResourceType::ALL`]): a response arrived
    /// on the current stream, so what is held reflects the server.
    pub synced: [bool; TYPES],
    /// Per type: subscribed in full (wildcard). Only these gate
    /// [`XdsState::is_synced`]; an on-demand type starts empty on purpose.
    pub wildcard: [bool; TYPES],
    /// Streams opened so far (1 after the first connect).
    pub streams: u64,
    /// Responses received so far.
    pub responses: u64,
    /// Responses NACKed so far.
    pub nacks: u64,
    /// Why the last stream ended, if it failed.
    pub last_error: Option<String>,
}

impl XdsState {
    /// Every wildcard type has been received on the current stream (the
    /// readiness condition: the proxy knows the whole mesh).
    pub fn is_synced(&self) -> bool {
        self.connected
            && self
                .synced
                .iter()
                .zip(self.wildcard)
                .all(|(synced, wildcard)| *synced || !wildcard)
    }

    pub fn is_type_synced(&self, ty: ResourceType) -> bool {
        self.connected && self.synced[ty.index()]
    }

    /// Name → version of everything held of one type.
    pub fn versions(&self, ty: ResourceType) -> BTreeMap<String, String> {
        match ty {
            ResourceType::Address => versions(&self.addresses),
            ResourceType::Authorization => versions(&self.authorizations),
            ResourceType::WaypointPolicy => versions(&self.waypoint_policies),
            ResourceType::WaypointRoute => versions(&self.waypoint_routes),
        }
    }

    pub(crate) fn len(&self, ty: ResourceType) -> usize {
        match ty {
            ResourceType::Address => self.addresses.len(),
            ResourceType::Authorization => self.authorizations.len(),
            ResourceType::WaypointPolicy => self.waypoint_policies.len(),
            ResourceType::WaypointRoute => self.waypoint_routes.len(),
        }
    }

    /// Drops the named resources and those answering to one of the names
    /// as an alias, unless `keep` still wants them. Returns the names
    /// dropped.
    pub(crate) fn forget(
        &mut self,
        ty: ResourceType,
        names: &[String],
        keep: impl Fn(&str, &[String]) -> bool,
    ) -> Vec<String> {
        let gone = |name: &str, aliases: &[String]| {
            (names.iter().any(|n| n == name) || aliases.iter().any(|a| names.contains(a)))
                && !keep(name, aliases)
        };
        let mut dropped = Vec::new();
        let mut retain = |name: &String, aliases: &[String]| {
            let drop = gone(name, aliases);
            if drop {
                dropped.push(name.clone());
            }
            !drop
        };
        match ty {
            ResourceType::Address => self.addresses.retain(|n, r| retain(n, &r.aliases)),
            ResourceType::Authorization => self.authorizations.retain(|n, r| retain(n, &r.aliases)),
            ResourceType::WaypointPolicy => {
                self.waypoint_policies.retain(|n, r| retain(n, &r.aliases))
            }
            ResourceType::WaypointRoute => {
                self.waypoint_routes.retain(|n, r| retain(n, &r.aliases))
            }
        }
        dropped
    }
}

fn versions<T>(map: &HashMap<String, Received<T>>) -> BTreeMap<String, String> {
    map.iter()
        .map(|(name, r)| (name.clone(), r.version.clone()))
        .collect()
}

/// What one response did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// `(name, reason)` of each resource not accepted.
    pub rejected: Vec<(String, String)>,
    /// Resource names (and their aliases) the response answered with a
    /// resource, accepted or not.
    pub found: Vec<(String, Vec<String>)>,
    pub removed: Vec<String>,
}

/// Applies one response of type `ty` to `state`.
pub(crate) fn apply(
    state: &mut XdsState,
    ty: ResourceType,
    response: DeltaDiscoveryResponse,
    validator: Option<&Validator>,
) -> Applied {
    let mut applied = Applied::default();
    for resource in response.resources {
        let Resource {
            name,
            version,
            resource,
            aliases,
            ..
        } = resource;
        let outcome = match resource {
            None => Err("the resource has no body".to_owned()),
            Some(any) if any.type_url != ty.type_url() => Err(format!(
                "resource of type {:?} in a {} response",
                any.type_url,
                ty.type_url()
            )),
            Some(any) => match ty {
                ResourceType::Address => decode::<Address>(&any.value).and_then(|a| {
                    check(validator, &name, ResourceRef::Address(&a))?;
                    state
                        .addresses
                        .insert(name.clone(), received(&version, &aliases, a));
                    Ok(())
                }),
                ResourceType::Authorization => decode::<Authorization>(&any.value).and_then(|a| {
                    check(validator, &name, ResourceRef::Authorization(&a))?;
                    state
                        .authorizations
                        .insert(name.clone(), received(&version, &aliases, a));
                    Ok(())
                }),
                ResourceType::WaypointPolicy => {
                    decode::<WaypointPolicy>(&any.value).and_then(|p| {
                        check(validator, &name, ResourceRef::WaypointPolicy(&p))?;
                        state
                            .waypoint_policies
                            .insert(name.clone(), received(&version, &aliases, p));
                        Ok(())
                    })
                }
                ResourceType::WaypointRoute => decode::<WaypointRoute>(&any.value).and_then(|r| {
                    check(validator, &name, ResourceRef::WaypointRoute(&r))?;
                    state
                        .waypoint_routes
                        .insert(name.clone(), received(&version, &aliases, r));
                    Ok(())
                }),
            },
        };
        if let Err(reason) = outcome {
            applied.rejected.push((name.clone(), reason));
        }
        applied.found.push((name, aliases));
    }
    for name in response.removed_resources {
        match ty {
            ResourceType::Address => {
                state.addresses.remove(&name);
            }
            ResourceType::Authorization => {
                state.authorizations.remove(&name);
            }
            ResourceType::WaypointPolicy => {
                state.waypoint_policies.remove(&name);
            }
            ResourceType::WaypointRoute => {
                state.waypoint_routes.remove(&name);
            }
        }
        applied.removed.push(name);
    }
    state.responses += 1;
    state.synced[ty.index()] = true;
    if !applied.rejected.is_empty() {
        state.nacks += 1;
    }
    applied
}

fn received<T>(version: &str, aliases: &[String], resource: T) -> Received<T> {
    Received {
        version: version.to_owned(),
        resource: Arc::new(resource),
        aliases: aliases.to_vec(),
    }
}

fn decode<T: Message + Default>(bytes: &[u8]) -> Result<T, String> {
    T::decode(bytes).map_err(|e| format!("cannot decode: {e}"))
}

fn check(
    validator: Option<&Validator>,
    name: &str,
    resource: ResourceRef<'_>,
) -> Result<(), String> {
    match validator {
        Some(validate) => validate(name, resource),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshbox_proto::workload::{Workload, address};

    fn response(resources: Vec<Resource>, removed: Vec<&str>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: ResourceType::Address.type_url().into(),
            resources,
            removed_resources: removed.into_iter().map(String::from).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    fn resource(name: &str, tag: &str) -> Resource {
        let a = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: name.into(),
                name: tag.into(),
                ..Default::default()
            })),
        };
        Resource {
            name: name.into(),
            version: tag.into(),
            resource: Some(prost_types::Any {
                type_url: ResourceType::Address.type_url().into(),
                value: a.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rejected_resources_are_not_stored() {
        let mut state = XdsState::default();
        let validator: Validator = Arc::new(|name, _| {
            if name == "bad" {
                Err("no".into())
            } else {
                Ok(())
            }
        });
        let mut garbage = resource("garbled", "v");
        if let Some(any) = garbage.resource.as_mut() {
            any.value = vec![0xff, 0xff, 0xff];
        }
        let applied = apply(
            &mut state,
            ResourceType::Address,
            response(
                vec![resource("good", "v1"), resource("bad", "v1"), garbage],
                vec![],
            ),
            Some(&validator),
        );
        assert_eq!(applied.rejected.len(), 2);
        assert_eq!(state.versions(ResourceType::Address).len(), 1);
        let applied = apply(
            &mut state,
            ResourceType::Address,
            response(vec![], vec!["good", "never-had"]),
            None,
        );
        assert!(applied.rejected.is_empty());
        assert!(state.addresses.is_empty());
    }
}
