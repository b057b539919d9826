//! The Delta xDS request check, for the fuzz targets and the corpus replay
//! test, which reach it through the crate's fuzzing entry points (it lives
//! here because it drives this module's private request check and state).
//! Not part of the crate's API.

use std::sync::Arc;

use meshbox_proto::workload::{Address, Workload, address};
use meshbox_proto::xds::DeltaDiscoveryRequest;
use prost::Message;

use super::XdsOptions;
use super::cache::Cache;
use super::delta::{Limits, TypeState, validate};
use super::resource::{Encoded, Kind};

/// Decodes `data` as a `DeltaDiscoveryRequest` and runs it through what a
/// stream does with one: the shape check, then (if it passes and names a
/// type we serve) a fresh per-type state applies it and builds the answer,
/// and a second request ACKs or NACKs that answer. Properties: an accepted
/// request respects the limits on names and versions; nothing panics.
/// Returns whether the request was accepted.
pub fn delta_request(data: &[u8]) -> bool {
    let Ok(req) = DeltaDiscoveryRequest::decode(data) else {
        return false;
    };
    let options = XdsOptions::default();
    let limits = Limits {
        max_names_per_request: options.max_names_per_request,
        max_name_len: options.max_name_len,
        max_subscriptions: options.max_subscriptions,
        max_initial_resource_versions: options.max_initial_resource_versions,
    };
    if validate(&req, &limits).is_err() {
        return false;
    }
    let name_ok = |name: &String| {
        !name.is_empty()
            && name.len() <= limits.max_name_len
            && !name.chars().any(|c| c.is_control() || c.is_whitespace())
    };
    assert!(!req.type_url.is_empty());
    for names in [
        &req.resource_names_subscribe,
        &req.resource_names_unsubscribe,
    ] {
        assert!(names.len() <= limits.max_names_per_request);
        assert!(names.iter().all(name_ok), "accepted a bad name");
    }
    assert!(req.initial_resource_versions.len() <= limits.max_initial_resource_versions);
    assert!(req.initial_resource_versions.keys().all(name_ok));

    let Some(kind) = Kind::from_type_url(&req.type_url) else {
        return true;
    };
    let cache = sample_cache();
    let mut state = TypeState::new(kind);
    state.set_node("node-a");
    if state.on_request(&req, &cache, &limits).is_err() {
        return true;
    }
    let Ok((Some(_response), _)) = state.build(&cache, 1, options.max_response_bytes, true) else {
        return true;
    };
    // The client answers the response (nonce 1) with the same request.
    let mut answer = req;
    answer.response_nonce = "1".into();
    let _ = state.on_request(&answer, &cache, &limits);
    let _ = state.build(&cache, 2, options.max_response_bytes, true);
    true
}

/// A cache with one workload, so names, IPs and the node can match.
fn sample_cache() -> Cache {
    let mut cache = Cache::new(16);
    let uid: Arc<str> = "Kubernetes//Pod/default/web-0".into();
    let workload = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.to_string(),
            name: "web-0".into(),
            namespace: "default".into(),
            node: "node-a".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        })),
    };
    cache.apply(
        Kind::Address,
        uid.clone(),
        Some(Arc::new(Encoded::address(uid, &workload))),
    );
    cache
}
