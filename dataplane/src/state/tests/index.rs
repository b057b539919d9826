//! Indexing as resources come and go: endpoints before their service,
//! removals, updates, VIP changes, names reused.

use super::*;

#[test]
fn workload_before_service_becomes_an_endpoint() {
    let mut st = ProxyState::new();
    let source = client().validated();
    let (n, a) = W::new("web1", &["10.0.1.1"])
        .svc("web", &[(80, 8080)])
        .address();
    st.apply_address(&n, Some(&a)).unwrap();
    assert_eq!(
        st.route(&source, sa("10.96.0.10:80")),
        Ok(Route::Passthrough(sa("10.96.0.10:80")))
    );
    let (n, a) = S::new("web", &["10.96.0.10"], &[(80, 8080)]).address();
    st.apply_address(&n, Some(&a)).unwrap();
    match st.route(&source, sa("10.96.0.10:80")) {
        Ok(Route::Upstream(up)) => {
            assert_eq!(up.connect_to, sa("10.0.1.1:15008"));
            assert_eq!(
                up.destination_service.map(|s| s.hostname),
                Some("web.ns.svc.cluster.local".to_string())
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn removals_and_updates_reindex() {
    let source = client().validated();
    let svc = S::new("web", &["10.96.0.10"], &[(80, 8080)]);
    let web1 = W::new("web1", &["10.0.1.1"]).svc("web", &[(80, 8080)]);
    let mut st = build(&[client().address(), svc.address(), web1.address()]);
    let route = |st: &ProxyState, t: &str| st.route(&source, sa(t));

    // Workload moves to a new IP and leaves the service.
    let moved = W::new("web1", &["10.0.1.100"]);
    let (n, a) = moved.address();
    st.apply_address(&n, Some(&a)).unwrap();
    assert_eq!(
        route(&st, "10.0.1.1:8080"),
        Ok(Route::Passthrough(sa("10.0.1.1:8080"))),
        "old IP unindexed"
    );
    assert!(
        matches!(route(&st, "10.0.1.100:8080"), Ok(Route::Upstream(ref up)) if up.peer.name == "web1"),
        "new IP indexed"
    );
    assert_eq!(
        route(&st, "10.96.0.10:80"),
        Err(RouteError::NoHealthyEndpoint {
            service: svc_key("web"),
            port: 80
        }),
        "no longer an endpoint"
    );
    assert_eq!(st.endpoints(&svc_key("web")).count(), 0);

    // Workload removed: unknown everywhere.
    st.apply_address(&n, None).unwrap();
    assert!(st.workload_by_uid(&uid(NS, "web1")).is_none());
    assert_eq!(
        route(&st, "10.0.1.100:8080"),
        Ok(Route::Passthrough(sa("10.0.1.100:8080")))
    );

    // Service removed: its VIP is no longer the mesh's.
    let (sn, _) = svc.address();
    st.apply_address(&sn, None).unwrap();
    assert!(st.service(&svc_key("web")).is_none());
    assert_eq!(
        route(&st, "10.96.0.10:80"),
        Ok(Route::Passthrough(sa("10.96.0.10:80")))
    );

    // Removing something unknown is harmless.
    st.apply_address("nope", None).unwrap();
    assert_eq!(st.workloads().count(), 1);
}

#[test]
fn service_vip_change_reindexes() {
    let source = client().validated();
    let web1 = W::new("web1", &["10.0.1.1"]).svc("web", &[(80, 8080)]);
    let mut st = build(&[
        client().address(),
        S::new("web", &["10.96.0.10"], &[(80, 8080)]).address(),
        web1.address(),
    ]);
    let (n, a) = S::new("web", &["10.96.0.20"], &[(80, 8080)]).address();
    st.apply_address(&n, Some(&a)).unwrap();
    assert_eq!(
        st.route(&source, sa("10.96.0.10:80")),
        Ok(Route::Passthrough(sa("10.96.0.10:80")))
    );
    assert!(matches!(
        st.route(&source, sa("10.96.0.20:80")),
        Ok(Route::Upstream(ref up)) if up.connect_to == sa("10.0.1.1:15008")
    ));
}

#[test]
fn removal_by_conventional_name_and_name_reuse() {
    let mut st = ProxyState::new();
    // Applied under an unconventional name, removed by that name.
    let (_, a) = W::new("p", &["10.0.0.5"]).address();
    st.apply_address("custom-name", Some(&a)).unwrap();
    st.apply_address("custom-name", None).unwrap();
    assert!(st.workload_by_ip("", ip("10.0.0.5")).is_none());

    // A name that switches from a workload to a service drops the workload.
    st.apply_address("x", Some(&a)).unwrap();
    let (_, s) = S::new("web", &["10.96.0.10"], &[(80, 80)]).address();
    st.apply_address("x", Some(&s)).unwrap();
    assert!(st.workload_by_ip("", ip("10.0.0.5")).is_none());
    assert!(st.service(&svc_key("web")).is_some());
    st.apply_address("x", None).unwrap();
    assert!(st.service(&svc_key("web")).is_none());
}
