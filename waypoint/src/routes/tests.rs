use http::{HeaderMap, Method};
use meshbox_proto::meshbox::{
    HeaderModifier as PbModifier, HeaderValue as PbHeader, MatchKind, RouteBackend, RouteMatch,
    RouteParent, RouteRule, RuleOutcome, StringMatch, WaypointRoute,
};

use super::*;

const WP: &str = "default/wp";
const SVC: &str = "default/reviews.default.svc.cluster.local";

fn path(kind: MatchKind, value: &str) -> Option<StringMatch> {
    Some(StringMatch {
        kind: kind as i32,
        name: String::new(),
        value: value.to_owned(),
    })
}

fn backend(name: &str, weight: u32) -> RouteBackend {
    RouteBackend {
        service: format!("default/{name}.default.svc.cluster.local"),
        port: 9080,
        weight,
        error: String::new(),
    }
}

fn rule(matches: Vec<RouteMatch>, backends: Vec<RouteBackend>) -> RouteRule {
    RouteRule {
        matches,
        backends,
        ..Default::default()
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path: path(MatchKind::PathPrefix, p),
        ..Default::default()
    }
}

fn route(name: &str, created: i64, rules: Vec<RouteRule>) -> WaypointRoute {
    WaypointRoute {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        parents: vec![RouteParent {
            waypoint: WP.to_owned(),
            service: SVC.to_owned(),
            port: 0,
            consumer_namespace: String::new(),
        }],
        rules,
        created,
    }
}

struct Req {
    method: Method,
    path: &'static str,
    query: &'static str,
    headers: HeaderMap,
}

fn get(path: &'static str) -> Req {
    Req {
        method: Method::GET,
        path,
        query: "",
        headers: HeaderMap::new(),
    }
}

/// The first backend's service name of the rule chosen (by `roll` 0), or
/// what routing said instead.
fn chosen(table: &RouteTable, req: &Req, client_ns: Option<&str>) -> String {
    let head = RequestHead {
        method: &req.method,
        path: req.path,
        query: req.query,
        headers: &req.headers,
    };
    match table.select(SVC, 9080, client_ns, &head) {
        Selected::NoRoutes => "no routes".to_owned(),
        Selected::NoMatch => "404".to_owned(),
        Selected::Rule(r) => match &r.action {
            Action::Fail => "500".to_owned(),
            Action::Forward { .. } => r
                .backend(0)
                .map(|b| b.service.split('.').next().unwrap_or("").to_owned())
                .unwrap_or_default(),
        },
    }
}

fn table(routes: &[WaypointRoute]) -> RouteTable {
    let (t, problems) = RouteTable::build(WP, routes);
    assert!(problems.is_empty(), "{problems:?}");
    t
}

#[test]
fn path_prefix_compares_whole_elements_and_longest_wins() {
    let t = table(&[route(
        "r",
        1,
        vec![
            rule(vec![prefix("/")], vec![backend("root", 1)]),
            rule(vec![prefix("/api")], vec![backend("api", 1)]),
            rule(vec![prefix("/api/v2/")], vec![backend("v2", 1)]),
        ],
    )]);
    assert_eq!(chosen(&t, &get("/api"), None), "default/api");
    assert_eq!(chosen(&t, &get("/api/v1"), None), "default/api");
    assert_eq!(chosen(&t, &get("/apis"), None), "default/root");
    assert_eq!(chosen(&t, &get("/api/v2"), None), "default/v2");
    assert_eq!(chosen(&t, &get("/api/v2/x"), None), "default/v2");
}

#[test]
fn exact_beats_prefix_and_regex_matches_whole_path() {
    let t = table(&[route(
        "r",
        1,
        vec![
            rule(
                vec![RouteMatch {
                    path: path(MatchKind::RegularExpression, "/items/[0-9]+"),
                    ..Default::default()
                }],
                vec![backend("regex", 1)],
            ),
            rule(vec![prefix("/items")], vec![backend("prefix", 1)]),
            rule(
                vec![RouteMatch {
                    path: path(MatchKind::Exact, "/items/7"),
                    ..Default::default()
                }],
                vec![backend("exact", 1)],
            ),
        ],
    )]);
    assert_eq!(chosen(&t, &get("/items/7"), None), "default/exact");
    assert_eq!(chosen(&t, &get("/items/8"), None), "default/prefix");
    let only_regex = table(&[route(
        "r",
        1,
        vec![rule(
            vec![RouteMatch {
                path: path(MatchKind::RegularExpression, "/items/[0-9]+"),
                ..Default::default()
            }],
            vec![backend("regex", 1)],
        )],
    )]);
    assert_eq!(chosen(&only_regex, &get("/items/8"), None), "default/regex");
    assert_eq!(
        chosen(&only_regex, &get("/items/8/x"), None),
        "404",
        "anchored"
    );
    assert_eq!(
        chosen(&only_regex, &get("/x/items/8"), None),
        "404",
        "anchored"
    );
}

#[test]
fn method_header_and_query_matches_all_must_hold() {
    let m = RouteMatch {
        path: path(MatchKind::PathPrefix, "/"),
        headers: vec![StringMatch {
            kind: MatchKind::Exact as i32,
            name: "x-user".into(),
            value: "jason".into(),
        }],
        query_params: vec![StringMatch {
            kind: MatchKind::Exact as i32,
            name: "beta".into(),
            value: "1".into(),
        }],
        method: "GET".into(),
    };
    let t = table(&[route(
        "r",
        1,
        vec![
            rule(vec![m], vec![backend("special", 1)]),
            rule(vec![prefix("/")], vec![backend("plain", 1)]),
        ],
    )]);
    let mut req = get("/");
    req.headers.insert("x-user", "jason".parse().unwrap());
    req.query = "a=2&beta=1";
    assert_eq!(chosen(&t, &req, None), "default/special");
    req.query = "beta=2";
    assert_eq!(chosen(&t, &req, None), "default/plain");
    req.query = "beta=1";
    req.method = Method::POST;
    assert_eq!(chosen(&t, &req, None), "default/plain");
    req.method = Method::GET;
    req.headers.insert("x-user", "other".parse().unwrap());
    assert_eq!(chosen(&t, &req, None), "default/plain");
}

#[test]
fn older_route_wins_a_tie_and_no_match_is_404() {
    let newer = route(
        "a-newer",
        20,
        vec![rule(vec![prefix("/x")], vec![backend("newer", 1)])],
    );
    let older = route(
        "z-older",
        10,
        vec![rule(vec![prefix("/x")], vec![backend("older", 1)])],
    );
    let t = table(&[newer, older]);
    assert_eq!(chosen(&t, &get("/x"), None), "default/older");
    assert_eq!(chosen(&t, &get("/y"), None), "404");
    let none = table(&[]);
    assert_eq!(chosen(&none, &get("/y"), None), "no routes");
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let producer = route(
        "producer",
        1,
        vec![rule(vec![prefix("/")], vec![backend("producer", 1)])],
    );
    let mut consumer = route(
        "consumer",
        2,
        vec![rule(vec![prefix("/")], vec![backend("consumer", 1)])],
    );
    consumer.namespace = "shop".into();
    consumer.parents[0].consumer_namespace = "shop".into();
    let t = table(&[producer, consumer]);
    assert_eq!(chosen(&t, &get("/"), Some("shop")), "default/consumer");
    assert_eq!(chosen(&t, &get("/"), Some("other")), "default/producer");
    assert_eq!(chosen(&t, &get("/"), None), "default/producer");
}

#[test]
fn routes_for_other_waypoints_or_ports_do_not_apply() {
    let mut other = route(
        "other",
        1,
        vec![rule(vec![prefix("/")], vec![backend("x", 1)])],
    );
    other.parents[0].waypoint = "default/another".into();
    let t = table(&[other]);
    assert_eq!(chosen(&t, &get("/"), None), "no routes");
    let mut on_port = route(
        "port",
        1,
        vec![rule(vec![prefix("/")], vec![backend("x", 1)])],
    );
    on_port.parents[0].port = 8080;
    let t = table(&[on_port]);
    assert_eq!(
        chosen(&t, &get("/"), None),
        "no routes",
        "request is for 9080"
    );
}

#[test]
fn weights_split_by_roll_and_unusable_backends_fail() {
    let t = table(&[route(
        "r",
        1,
        vec![rule(
            vec![prefix("/")],
            vec![backend("v1", 90), backend("v2", 10)],
        )],
    )]);
    let head = RequestHead {
        method: &Method::GET,
        path: "/",
        query: "",
        headers: &HeaderMap::new(),
    };
    let Selected::Rule(r) = t.select(SVC, 9080, None, &head) else {
        panic!("a rule");
    };
    let Action::Forward { total_weight, .. } = &r.action else {
        panic!("forward");
    };
    assert_eq!(*total_weight, 100);
    let v1 = (0..100)
        .filter(|roll| {
            r.backend(*roll)
                .is_some_and(|b| b.service.starts_with("default/v1."))
        })
        .count();
    assert_eq!(v1, 90);

    let mut broken = backend("gone", 1);
    broken.error = "Service default/gone not found".into();
    let mut zero = rule(vec![prefix("/zero")], vec![backend("v1", 0)]);
    zero.outcome = RuleOutcome::Route as i32;
    let mut failing = rule(vec![prefix("/fail")], vec![backend("v1", 1)]);
    failing.outcome = RuleOutcome::Answer500 as i32;
    let mut nothing = rule(vec![prefix("/nothing")], vec![backend("v1", 1)]);
    nothing.outcome = RuleOutcome::MatchesNothing as i32;
    let t = table(&[route(
        "r",
        1,
        vec![
            rule(vec![prefix("/gone")], vec![broken]),
            zero,
            failing,
            nothing,
        ],
    )]);
    let head = RequestHead {
        method: &Method::GET,
        path: "/gone",
        query: "",
        headers: &HeaderMap::new(),
    };
    let Selected::Rule(r) = t.select(SVC, 9080, None, &head) else {
        panic!("a rule");
    };
    assert!(r.backend(0).is_some_and(|b| b.error.is_some()));
    assert_eq!(chosen(&t, &get("/zero"), None), "500", "all weights zero");
    assert_eq!(chosen(&t, &get("/fail"), None), "500");
    assert_eq!(
        chosen(&t, &get("/nothing"), None),
        "404",
        "takes no request"
    );
}

#[test]
fn bad_values_from_the_server_fail_closed_and_are_reported() {
    let bad_regex = rule(
        vec![RouteMatch {
            path: path(MatchKind::RegularExpression, "(unclosed"),
            ..Default::default()
        }],
        vec![backend("v1", 1)],
    );
    let mut bad_header = rule(vec![prefix("/h")], vec![backend("v1", 1)]);
    bad_header.request_header_modifier = Some(PbModifier {
        set: vec![PbHeader {
            name: "bad header".into(),
            value: "x".into(),
        }],
        ..Default::default()
    });
    let (t, problems) = RouteTable::build(WP, &[route("r", 1, vec![bad_regex, bad_header])]);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(
        chosen(&t, &get("/unclosed"), None),
        "404",
        "the bad match takes nothing"
    );
    assert_eq!(
        chosen(&t, &get("/h"), None),
        "500",
        "the bad filter answers 500"
    );
}

#[test]
fn header_modifier_sets_adds_and_removes() {
    let m = HeaderModifier::compile(&PbModifier {
        set: vec![PbHeader {
            name: "x-set".into(),
            value: "new".into(),
        }],
        add: vec![PbHeader {
            name: "x-add".into(),
            value: "two".into(),
        }],
        remove: vec!["x-gone".into()],
    })
    .expect("valid");
    let mut h = HeaderMap::new();
    h.insert("x-set", "old".parse().unwrap());
    h.insert("x-add", "one".parse().unwrap());
    h.insert("x-gone", "bye".parse().unwrap());
    m.apply(&mut h);
    assert_eq!(h.get_all("x-set").iter().collect::<Vec<_>>(), ["new"]);
    assert_eq!(
        h.get_all("x-add").iter().collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert!(h.get("x-gone").is_none());
}

#[test]
fn paths_are_normalised_before_matching() {
    for (raw, normal) in [
        ("/a/b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/../admin", "/admin"),
        ("/../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("//a", "//a"),
        ("/%61dmin", "/admin"),
        ("/a/%2e%2e/admin", "/admin"),
        ("/a/%2E./admin", "/admin"),
        ("/a%2fb", "/a%2Fb"),
        ("/100%", "/100%"),
        ("/%zz", "/%zz"),
        ("/caf\u{e9}/%7euser", "/caf\u{e9}/~user"),
    ] {
        assert_eq!(normalize_path(raw), normal, "{raw}");
    }
}
