//! Inbound lookups: which local workload a connection is for, overlapping
//! IPs, the services of a workload.

use super::*;

#[test]
fn local_workload_lookup() {
    let st = build(&[
        W::new("here", &["10.0.0.5"]).node("n1").address(),
        W::new("there", &["10.0.0.6"]).node("n2").address(),
        W::new("hostnet", &["10.0.0.7"])
            .node("n1")
            .host_network()
            .address(),
        W::new("v6", &["fd00::5"]).node("n1").address(),
    ]);
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("10.0.0.5", "n1", Some("here")),
        ("::ffff:10.0.0.5", "n1", Some("here")),
        ("10.0.0.5", "n2", None),
        ("10.0.0.6", "n1", None),
        ("10.0.0.6", "n2", Some("there")),
        ("10.0.0.7", "n1", None),
        ("10.0.0.8", "n1", None),
        ("fd00::5", "n1", Some("v6")),
    ];
    for &(addr, node, want) in cases {
        let got = st
            .local_workload("", ip(addr), node)
            .map(|w| w.name.as_str());
        assert_eq!(got, want, "{addr} on {node}");
        assert_eq!(
            st.is_local_workload_ip("", ip(addr), node),
            want.is_some(),
            "{addr} on {node}"
        );
    }
    assert_eq!(
        st.workload_by_ip("", ip("10.0.0.6"))
            .map(|w| w.name.as_str()),
        Some("there")
    );
    assert!(st.workload_by_ip("other-net", ip("10.0.0.6")).is_none());
}

#[test]
fn overlapping_ips_prefer_pods_in_the_mesh_and_local_node() {
    let vm = {
        let mut w = W::new("vm", &["10.0.0.5"]).node("n1");
        w.0.uid = "c1//WorkloadEntry/ns/vm".into();
        w
    };
    let plain_pod = W::new("plain", &["10.0.0.5"]).tcp().node("n1");
    let mesh_pod = W::new("mesh", &["10.0.0.5"]).node("n2");
    let st = build(&[vm.address(), plain_pod.address(), mesh_pod.address()]);
    assert_eq!(
        st.workload_by_ip("", ip("10.0.0.5"))
            .map(|w| w.name.as_str()),
        Some("mesh")
    );
    // On n1, only the VM entry and the plain pod claim it; the pod wins.
    assert_eq!(
        st.local_workload("", ip("10.0.0.5"), "n1")
            .map(|w| w.name.as_str()),
        Some("plain")
    );
    // Removing one claimant leaves the others indexed.
    let mut st = st;
    st.apply_address(&uid(NS, "mesh"), None).unwrap();
    assert_eq!(
        st.workload_by_ip("", ip("10.0.0.5"))
            .map(|w| w.name.as_str()),
        Some("plain")
    );
}

#[test]
fn services_of_a_workload() {
    let w = W::new("web1", &["10.0.1.1"])
        .svc("web", &[(80, 8080)])
        .svc("absent", &[(80, 8080)]);
    let st = build(&[
        S::new("web", &["10.96.0.10"], &[(80, 8080)]).address(),
        w.address(),
    ]);
    let w = w.validated();
    let names: Vec<&str> = st.services_of(&w).map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web"]);
}
