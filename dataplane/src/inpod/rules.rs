//! The redirection rules installed inside a captured pod's network
//! namespace, as Istio's in-pod mode has them (seed 004 / design.md): inbound
//! TCP is TPROXY'd to 15008 (HBONE) or 15006 (plaintext), outbound TCP is
//! REDIRECTed to 15001, the proxy's own sockets (mark `0x539`) pass, and
//! connmark `0x111` with a local route table brings replies to connections
//! made from a client's original address back to the proxy.
//!
//! Everything lives in chains of our own (`MESHBOX_*`), jumped to from the
//! built-in chains by rules tagged with the comment `meshbox`, so `iptables-save`
//! shows what is ours and removal touches nothing else. Applying is
//! idempotent: our chains are rebuilt, the jumps added only if missing.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

use super::netns::Netns;

pub const PROXY_MARK: u32 = 0x539;
pub const CONNECTION_MARK: u32 = 0x111;
pub const ROUTE_TABLE: u32 = 133;
const MASK: u32 = 0xfff;
const TAG: &str = "meshbox";

/// Kubelet health probes reach a captured pod from these addresses (the
/// node rewrites their source to them, as Istio's node agent does), and
/// are let through uncaptured: a probe is not mesh traffic, and an ALLOW
/// policy must not make a pod unready. The same addresses as Istio's, so
/// a node set up for Istio's ambient mode works unchanged.
pub const PROBE_SOURCE_V4: &str = "169.254.7.127";
pub const PROBE_SOURCE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// `(table, built-in chain, our chain)`.
const JUMPS: [(&str, &str, &str); 3] = [
    ("mangle", "PREROUTING", "MESHBOX_PRERT"),
    ("mangle", "OUTPUT", "MESHBOX_OUTPUT"),
    ("nat", "OUTPUT", "MESHBOX_OUTPUT"),
];

/// The two address families, each with its own tables and tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn unspecified(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }

    fn probe_source(self) -> String {
        match self {
            Family::V4 => format!("{PROBE_SOURCE_V4}/32"),
            Family::V6 => format!("{PROBE_SOURCE_V6}/128"),
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn ip(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn everything(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// Input for `iptables-restore --noflush` (or `ip6tables-restore`):
/// declares (and so empties) our chains and fills them. The jumps are
/// added separately, once.
pub fn chains(family: Family, inbound: u16, plaintext: u16, outbound: u16) -> String {
    let mark = format!("{PROXY_MARK:#x}/{MASK:#x}");
    let conn = format!("{CONNECTION_MARK:#x}/{MASK:#x}");
    let lo = family.loopback();
    let any = family.unspecified();
    let probe = family.probe_source();
    format!(
        "*mangle
:MESHBOX_PRERT - [0:0]
:MESHBOX_OUTPUT - [0:0]
-A MESHBOX_OUTPUT -m connmark --mark {conn} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A MESHBOX_PRERT -m mark --mark {mark} -j CONNMARK --set-xmark {conn}
-A MESHBOX_PRERT -s {probe} -p tcp -j ACCEPT
-A MESHBOX_PRERT ! -d {lo} -i lo -p tcp -j ACCEPT
-A MESHBOX_PRERT -p tcp -m tcp --dport {inbound} -m mark ! --mark {mark} -j TPROXY --on-port {inbound} --on-ip {any} --tproxy-mark {conn}
-A MESHBOX_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A MESHBOX_PRERT ! -d {lo} -p tcp -m mark ! --mark {mark} -j TPROXY --on-port {plaintext} --on-ip {any} --tproxy-mark {conn}
COMMIT
*nat
:MESHBOX_OUTPUT - [0:0]
-A MESHBOX_OUTPUT -p tcp -m mark --mark {conn} -j ACCEPT
-A MESHBOX_OUTPUT ! -d {lo} -o lo -j ACCEPT
-A MESHBOX_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {outbound}
COMMIT
"
    )
}

/// Runs a command inside `netns`, feeding `stdin`; its stderr on failure.
fn run_in(netns: &Path, program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<()> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running nsenter {program}: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Installs (or re-installs) the rules in `netns`, for IPv4 and IPv6.
///
/// IPv6 is captured even in a pod with only IPv4 addresses: its link-local
/// addresses reach the other pods on the link, and traffic over them must
/// not slip past the proxy. Only a pod that has IPv6 addresses fails to be
/// captured when the IPv6 rules cannot go in (a node without IPv6
/// netfilter); for the others that is logged by the caller.
pub fn apply(
    netns: &Netns,
    inbound: u16,
    plaintext: u16,
    outbound: u16,
    has_ipv6: bool,
) -> io::Result<Option<io::Error>> {
    apply_family(netns, Family::V4, inbound, plaintext, outbound)?;
    match apply_family(netns, Family::V6, inbound, plaintext, outbound) {
        Ok(()) => Ok(None),
        Err(e) if has_ipv6 => Err(e),
        Err(e) => Ok(Some(e)),
    }
}

fn apply_family(
    netns: &Netns,
    family: Family,
    inbound: u16,
    plaintext: u16,
    outbound: u16,
) -> io::Result<()> {
    let path = netns.path();
    run_in(
        path,
        family.restore(),
        &["--noflush"],
        Some(&chains(family, inbound, plaintext, outbound)),
    )?;
    for (table, builtin, ours) in JUMPS {
        ensure_jump(path, family, table, builtin, ours, "-A")?;
    }
    let fwmark = format!("{CONNECTION_MARK:#x}/{MASK:#x}");
    let table = ROUTE_TABLE.to_string();
    // `ip rule add` duplicates on every call: delete first, ignore "absent".
    delete_route_rule(path, family);
    run_in(
        path,
        "ip",
        &[
            family.ip(),
            "rule",
            "add",
            "fwmark",
            &fwmark,
            "pref",
            "32764",
            "lookup",
            &table,
        ],
        None,
    )?;
    run_in(
        path,
        "ip",
        &[
            family.ip(),
            "route",
            "replace",
            "local",
            family.everything(),
            "dev",
            "lo",
            "table",
            &table,
        ],
        None,
    )?;
    Ok(())
}

/// Removes everything [`apply`] installed; what is already gone is fine.
pub fn remove(netns: &Netns) -> io::Result<()> {
    let path = netns.path();
    for family in [Family::V4, Family::V6] {
        for (table, builtin, ours) in JUMPS {
            let _ = run_in(
                path,
                family.iptables(),
                &jump("-D", table, builtin, ours),
                None,
            );
        }
        // Our chains are exactly the jumps' targets.
        for (table, _, chain) in JUMPS {
            let _ = run_in(path, family.iptables(), &["-t", table, "-F", chain], None);
            let _ = run_in(path, family.iptables(), &["-t", table, "-X", chain], None);
        }
        delete_route_rule(path, family);
        let table = ROUTE_TABLE.to_string();
        let _ = run_in(
            path,
            "ip",
            &[family.ip(), "route", "flush", "table", &table],
            None,
        );
    }
    Ok(())
}

/// The tagged rule that enters `ours` from `builtin`, for `op` (`-C`,
/// `-A`, `-I`, `-D`).
fn jump<'a>(op: &'a str, table: &'a str, builtin: &'a str, ours: &'a str) -> [&'a str; 10] {
    [
        "-t",
        table,
        op,
        builtin,
        "-j",
        ours,
        "-m",
        "comment",
        "--comment",
        TAG,
    ]
}

/// Adds the jump with `add` (`-A` or `-I`) unless it is there already.
fn ensure_jump(
    path: &Path,
    family: Family,
    table: &str,
    builtin: &str,
    ours: &str,
    add: &str,
) -> io::Result<()> {
    if run_in(
        path,
        family.iptables(),
        &jump("-C", table, builtin, ours),
        None,
    )
    .is_err()
    {
        run_in(
            path,
            family.iptables(),
            &jump(add, table, builtin, ours),
            None,
        )?;
    }
    Ok(())
}

/// Deletes the connmark routing rule; absent is fine.
fn delete_route_rule(path: &Path, family: Family) {
    let fwmark = format!("{CONNECTION_MARK:#x}/{MASK:#x}");
    let table = ROUTE_TABLE.to_string();
    let _ = run_in(
        path,
        "ip",
        &[
            family.ip(),
            "rule",
            "del",
            "fwmark",
            &fwmark,
            "lookup",
            &table,
        ],
        None,
    );
}

/// Input for `iptables-restore --noflush` in the node's own namespace:
/// connections the node opens to captured pods (kubelet's probes; `-m
/// owner --socket-exists` matches only locally opened sockets) leave with
/// the probe address as their source. When no pod of this family is
/// captured, the chain is emptied.
pub fn probe_snat(family: Family, pods: &[std::net::IpAddr]) -> String {
    let (probe, prefix) = match family {
        Family::V4 => (PROBE_SOURCE_V4, 32),
        Family::V6 => (PROBE_SOURCE_V6, 128),
    };
    let mut out = String::from("*nat\n:MESHBOX_POSTRT - [0:0]\n");
    for ip in pods {
        let ip = ip.to_canonical();
        if ip.is_ipv4() == (family == Family::V4) {
            out += &format!(
                "-A MESHBOX_POSTRT -m owner --socket-exists -p tcp -d {ip}/{prefix} -j SNAT --to-source {probe}\n"
            );
        }
    }
    out + "COMMIT\n"
}

/// Installs [`probe_snat`] for `pods` in the calling thread's network
/// namespace (the node's), replacing what was there.
pub fn apply_probe_snat(pods: &[std::net::IpAddr]) -> io::Result<()> {
    let own = Path::new("/proc/thread-self/ns/net");
    for family in [Family::V4, Family::V6] {
        run_in(
            own,
            family.restore(),
            &["--noflush"],
            Some(&probe_snat(family, pods)),
        )?;
        ensure_jump(own, family, "nat", "POSTROUTING", "MESHBOX_POSTRT", "-I")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_what_seed_004_redirects_and_spare_the_proxy() {
        let r = chains(Family::V4, 15008, 15006, 15001);
        assert!(r.contains("--dport 15008 -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15008"));
        assert!(r.contains("-j TPROXY --on-port 15006"));
        assert!(r.contains("-j REDIRECT --to-ports 15001"));
        // The proxy's own traffic is never redirected.
        for line in r
            .lines()
            .filter(|l| l.contains("TPROXY") || l.contains("REDIRECT"))
        {
            assert!(line.contains("! --mark 0x539/0xfff"), "{line}");
        }
        // Two tables, each committed.
        assert_eq!(r.matches("COMMIT").count(), 2);
        // Kubelet probes (rewritten to Istio's probe address) are not
        // captured, and that exemption comes before any TPROXY.
        let probe = r.find("-s 169.254.7.127/32 -p tcp -j ACCEPT").unwrap();
        assert!(probe < r.find("TPROXY").unwrap());
    }

    #[test]
    fn node_side_probe_rewrite_covers_each_captured_pod_of_its_family() {
        let pods: Vec<std::net::IpAddr> = vec![
            "10.1.0.5".parse().unwrap(),
            "fd00::5".parse().unwrap(),
            "::ffff:10.1.0.6".parse().unwrap(),
        ];
        let v4 = probe_snat(Family::V4, &pods);
        assert!(v4.contains(
            "-m owner --socket-exists -p tcp -d 10.1.0.5/32 -j SNAT --to-source 169.254.7.127"
        ));
        assert!(
            v4.contains("-d 10.1.0.6/32"),
            "mapped addresses folded: {v4}"
        );
        assert!(!v4.contains("fd00"), "{v4}");
        let v6 = probe_snat(Family::V6, &pods);
        assert!(v6.contains(&format!(
            "-d fd00::5/128 -j SNAT --to-source {PROBE_SOURCE_V6}"
        )));
        assert_eq!(v6.matches("-A ").count(), 1);
        // No pods: the chain is emptied, not left with stale addresses.
        assert_eq!(probe_snat(Family::V4, &[]).matches("-A ").count(), 0);
    }

    #[test]
    fn ipv6_rules_use_ipv6_addresses_only() {
        let r = chains(Family::V6, 15008, 15006, 15001);
        assert!(r.contains("--on-ip :: "), "{r}");
        assert!(r.contains("! -d ::1/128"), "{r}");
        assert!(r.contains(&format!("-s {PROBE_SOURCE_V6}/128")), "{r}");
        assert!(!r.contains("127.0.0.1") && !r.contains("0.0.0.0"), "{r}");
    }
}
