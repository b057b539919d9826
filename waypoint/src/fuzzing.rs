//! Entry points for the `waypoint_config` fuzz target (fuzz/) and its
//! corpus replay (tests/fuzz_corpus.rs): what reaches the waypoint from
//! outside before hyper sees it — the first bytes of a stream, and the
//! control plane's resources.

use http::{HeaderMap, Method};
use meshbox_proto::meshbox::{WaypointPolicy, WaypointRoute};
use prost::Message;

use crate::authz;
use crate::policies::PolicyTable;
use crate::routes::{Action, RequestHead, RouteTable, Selected};
use crate::sniff::classify;

const WAYPOINT: &str = "default/wp";

/// The first byte picks what the rest is: 0 a stream's first bytes, 1 a
/// `WaypointRoute`, 2 a `WaypointPolicy`. Returns whether the input was
/// used. Panics (a finding) if a property does not hold.
pub fn fuzz_waypoint_config(data: &[u8]) -> bool {
    let Some((&kind, rest)) = data.split_first() else {
        return false;
    };
    match kind % 3 {
        0 => sniffing(rest),
        1 => route(rest),
        _ => policy(rest),
    }
}

/// Detection is decided once: more bytes never change a verdict.
fn sniffing(data: &[u8]) -> bool {
    let whole = classify(data);
    for end in 1..data.len() {
        if let Some(early) = classify(&data[..end]) {
            assert_eq!(Some(early), whole, "verdict changed after {end} bytes");
            break;
        }
    }
    true
}

fn requests() -> Vec<(Method, &'static str, &'static str)> {
    vec![
        (Method::GET, "/", ""),
        (Method::POST, "/api/v1/items", "a=1&b=2"),
        (Method::GET, "/admin", "debug=1"),
    ]
}

/// Any route compiles without panicking, and a rule that forwards always
/// has a backend for every roll below its total weight.
fn route(data: &[u8]) -> bool {
    let Ok(mut route) = WaypointRoute::decode(data) else {
        return false;
    };
    for p in &mut route.parents {
        p.waypoint = WAYPOINT.to_owned();
    }
    let services: Vec<(String, u32)> = route
        .parents
        .iter()
        .map(|p| (p.service.clone(), p.port))
        .collect();
    let (table, _problems) = RouteTable::build(WAYPOINT, [&route]);
    let headers = HeaderMap::new();
    for (service, port) in services {
        let port = u16::try_from(port).unwrap_or(80).max(1);
        for (method, path, query) in requests() {
            let head = RequestHead {
                method: &method,
                path,
                query,
                headers: &headers,
            };
            if let Selected::Rule(rule) = table.select(&service, port, Some("default"), &head)
                && let Action::Forward { total_weight, .. } = &rule.action
            {
                for roll in [0, total_weight / 2, total_weight.saturating_sub(1)] {
                    assert!(
                        rule.backend(roll).is_some(),
                        "roll {roll} of {total_weight}"
                    );
                }
            }
        }
    }
    true
}

/// Any policy compiles; a DENY policy denies over TCP whatever it denies
/// over HTTP (TCP judges DENY rules without their HTTP parts: never less).
fn policy(data: &[u8]) -> bool {
    let Ok(mut policy) = WaypointPolicy::decode(data) else {
        return false;
    };
    policy.targets = vec![meshbox_proto::meshbox::PolicyTarget {
        waypoint: WAYPOINT.to_owned(),
        ..Default::default()
    }];
    let table = PolicyTable::build(WAYPOINT, [&policy]);
    let applicable: Vec<&authz::Policy> = table.for_target(None, None).collect();
    let headers = HeaderMap::new();
    let identity: meshbox_certs::SpiffeId =
        match "spiffe://cluster.local/ns/default/sa/client".parse() {
            Ok(id) => id,
            Err(_) => return false,
        };
    for (method, path, _) in requests() {
        let request = authz::Request {
            source_identity: Some(&identity),
            source_ip: std::net::IpAddr::from([10, 0, 0, 1]),
            destination_port: 9080,
            method: method.as_str(),
            path,
            host: "reviews",
            headers: &headers,
        };
        let http = authz::authorize(&request, &applicable);
        let tcp = authz::authorize_tcp(&request, &applicable);
        let denied_by_deny = matches!(http.reason, authz::Reason::DenyPolicyMatched(_));
        if denied_by_deny {
            assert!(
                !tcp.is_allowed(),
                "TCP allowed what a DENY denies over HTTP"
            );
        }
    }
    true
}
