//! What the plugin reads from the runtime, for the fuzz target in `fuzz/`
//! and the corpus replay test (`tests/fuzz_corpus.rs`), so both run the same
//! checks. A child of `plugin`, so nothing there had to become public. Not
//! part of the crate's API.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use super::*;

/// Input: an optional first line of runtime environment, tab-separated
/// `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_ARGS` (a line that does not start
/// with `{` or whitespace), then stdin.
///
/// Properties: every answer the plugin would print is JSON in a version it
/// speaks; an accepted configuration speaks a supported version new enough
/// for the command; its timeout is positive; `ADD`'s result is
/// `prevResult` unchanged but for an added `cniVersion`; accepted
/// environment values are well-formed. Returns whether stdin was accepted
/// as an `ADD` configuration.
pub fn stdin(data: &[u8]) -> bool {
    let (env, stdin) = split_env(data);
    if let Some(env) = env {
        check_env(env);
    }

    match version(stdin) {
        Ok(out) => {
            let v: serde_json::Value = match serde_json::from_slice(&out) {
                Ok(v) => v,
                Err(e) => panic!("VERSION printed something that is not JSON: {e}"),
            };
            let spoken = v["cniVersion"].as_str().unwrap_or_default();
            assert!(
                SUPPORTED_VERSIONS.contains(&spoken),
                "VERSION answered in {spoken:?}"
            );
        }
        Err(e) => check_error(&e),
    }

    let mut accepted_add = false;
    for min in ["0.3.0", "0.4.0", "1.1.0"] {
        let conf = match parse_conf(stdin, min) {
            Ok(conf) => conf,
            Err(e) => {
                check_error(&e);
                continue;
            }
        };
        let position = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
        assert!(position(&conf.cni_version) >= position(min));
        assert!(position(&conf.cni_version).is_some());
        match conf.timeout() {
            Ok(t) => assert!(!t.is_zero()),
            Err(e) => check_error(&e),
        }
        if let Err(e) = conf.pod_ips() {
            check_error(&e);
        }
        check_result(&conf);
        accepted_add |= min == "0.3.0";
    }
    accepted_add
}

fn split_env(data: &[u8]) -> (Option<&str>, &[u8]) {
    let starts_json = data
        .first()
        .is_none_or(|b| *b == b'{' || b.is_ascii_whitespace());
    if starts_json {
        return (None, data);
    }
    let end = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let env = std::str::from_utf8(&data[..end]).ok();
    (env, data.get(end + 1..).unwrap_or_default())
}

fn check_env(env: &str) {
    let mut fields = env.split('\t');
    let inv = Invocation {
        command: "ADD".into(),
        container_id: fields.next().unwrap_or_default().into(),
        ifname: fields.next().unwrap_or_default().into(),
        args: fields.next().unwrap_or_default().into(),
        netns: "/var/run/netns/fuzz".into(),
        path: Vec::new(),
    };
    if inv.require(true, true).is_ok() {
        assert!(
            inv.container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        );
        assert!(!inv.ifname.is_empty() && inv.ifname.len() <= 15);
        assert!(!inv.ifname.contains('/'));
    }
    let pod = PodArgs::parse(&inv.args);
    for value in [&pod.namespace, &pod.name, &pod.uid] {
        assert!(!value.contains(';'), "a CNI_ARGS value spans entries");
    }
}

/// An error must print as JSON whatever its text.
fn check_error(e: &CniError) {
    let out = e.json(FALLBACK_VERSION);
    if let Err(err) = serde_json::from_slice::<serde_json::Value>(&out) {
        panic!("error {e:?} printed as invalid JSON: {err}");
    }
}

/// `prevResult`'s members, each as written.
type Members = BTreeMap<String, Box<RawValue>>;

fn check_result(conf: &NetConf) {
    let out = conf.result();
    // Syntax only: JSON may hold numbers no f64 can (1e400).
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&out) {
        panic!("ADD printed something that is not JSON: {e}");
    }
    let Some(raw) = &conf.prev_result else {
        let printed: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(printed["cniVersion"], conf.cni_version.as_str());
        return;
    };
    let Ok(prev) = serde_json::from_str::<Members>(raw.get()) else {
        assert_eq!(
            out,
            format!("{}\n", raw.get()).into_bytes(),
            "a prevResult that is no object is printed as received"
        );
        return;
    };
    let printed: Members = match serde_json::from_slice(&out) {
        Ok(members) => members,
        Err(e) => panic!("ADD printed an object prevResult as something else: {e}"),
    };
    for (key, value) in &prev {
        let now = printed.get(key).map(|v| v.get());
        assert_eq!(now, Some(value.get()), "prevResult's {key:?} changed");
    }
    assert!(printed.contains_key("cniVersion"));
    assert_eq!(
        printed.len(),
        prev.len() + usize::from(!prev.contains_key("cniVersion"))
    );
}
