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

use crate::netns::Netns;

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

/// A tagged rule in a built-in chain that enters a chain of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Jump {
    table: &'static str,
    builtin: &'static str,
    ours: &'static str,
}

/// Where a captured pod's traffic enters our chains.
const POD_JUMPS: [Jump; 3] = [
    Jump {
        table: "mangle",
        builtin: "PREROUTING",
        ours: "MESHBOX_PRERT",
    },
    Jump {
        table: "mangle",
        builtin: "OUTPUT",
        ours: "MESHBOX_OUTPUT",
    },
    Jump {
        table: "nat",
        builtin: "OUTPUT",
        ours: "MESHBOX_OUTPUT",
    },
];

/// Where the node's own connections enter the probe rewrite. Inserted
/// first, ahead of the CNI's masquerading.
const NODE_JUMP: Jump = Jump {
    table: "nat",
    builtin: "POSTROUTING",
    ours: "MESHBOX_POSTRT",
};

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

    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
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

/// A mark as iptables and `ip rule` take it: `value/mask`.
fn masked(mark: u32) -> String {
    format!("{mark:#x}/{MASK:#x}")
}

/// Our chains in a captured pod, per table: each declared (which, under
/// `iptables-restore --noflush`, empties it) and filled.
fn pod_chains(
    family: Family,
    inbound: u16,
    plaintext: u16,
    outbound: u16,
) -> [(&'static str, String); 2] {
    let mark = masked(PROXY_MARK);
    let conn = masked(CONNECTION_MARK);
    let lo = family.loopback();
    let any = family.unspecified();
    let probe = family.probe_source();
    [
        (
            "mangle",
            format!(
                ":MESHBOX_PRERT - [0:0]
:MESHBOX_OUTPUT - [0:0]
-A MESHBOX_OUTPUT -m connmark --mark {conn} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A MESHBOX_PRERT -m mark --mark {mark} -j CONNMARK --set-xmark {conn}
-A MESHBOX_PRERT -s {probe} -p tcp -j ACCEPT
-A MESHBOX_PRERT ! -d {lo} -i lo -p tcp -j ACCEPT
-A MESHBOX_PRERT -p tcp -m tcp --dport {inbound} -m mark ! --mark {mark} -j TPROXY --on-port {inbound} --on-ip {any} --tproxy-mark {conn}
-A MESHBOX_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A MESHBOX_PRERT ! -d {lo} -p tcp -m mark ! --mark {mark} -j TPROXY --on-port {plaintext} --on-ip {any} --tproxy-mark {conn}
"
            ),
        ),
        (
            "nat",
            format!(
                ":MESHBOX_OUTPUT - [0:0]
-A MESHBOX_OUTPUT -p tcp -m mark --mark {conn} -j ACCEPT
-A MESHBOX_OUTPUT ! -d {lo} -o lo -j ACCEPT
-A MESHBOX_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {outbound}
"
            ),
        ),
    ]
}

/// The input for `iptables-restore --noflush` (or `ip6tables-restore`)
/// for a pod whose namespace holds `installed`: our chains rebuilt and the
/// jumps into them added where missing, each table in one transaction.
fn pod_rules(
    family: Family,
    inbound: u16,
    plaintext: u16,
    outbound: u16,
    installed: &Installed,
) -> String {
    restore_input(
        &pod_chains(family, inbound, plaintext, outbound),
        &POD_JUMPS,
        "-A",
        installed,
    )
}

/// One `*table ... COMMIT` section per table: its chain bodies, then
/// each jump of `jumps` in that table that `installed` lacks, added with
/// `add` (`-A` or `-I`).
fn restore_input(
    tables: &[(&str, String)],
    jumps: &[Jump],
    add: &str,
    installed: &Installed,
) -> String {
    let mut out = String::new();
    for (table, body) in tables {
        out += &format!("*{table}\n{body}");
        for jump in jumps.iter().filter(|j| j.table == *table) {
            if !installed.jumps.contains(jump) {
                out += &format!("{} {}\n", add, jump_spec(jump));
            }
        }
        out += "COMMIT\n";
    }
    out
}

/// The rule spec after `-A`/`-I`/`-D CHAIN`'s verb.
fn jump_spec(jump: &Jump) -> String {
    format!(
        "{} -m comment --comment {TAG} -j {}",
        jump.builtin, jump.ours
    )
}

/// What of ours `iptables-save` shows in a namespace: the tagged jumps and
/// our chains.
#[derive(Debug, Default)]
struct Installed {
    jumps: std::collections::HashSet<Jump>,
    chains: Vec<(String, String)>,
}

impl Installed {
    /// Reads `iptables-save` output. Only what [`POD_JUMPS`] and
    /// [`NODE_JUMP`] name is recognised; everything else is someone
    /// else's and left alone.
    fn parse(save: &str) -> Installed {
        let ours: Vec<Jump> = POD_JUMPS.into_iter().chain([NODE_JUMP]).collect();
        let mut installed = Installed::default();
        let mut table = "";
        for line in save.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = name.trim();
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                if ours.iter().any(|j| j.table == table && j.ours == chain) {
                    installed.chains.push((table.to_owned(), chain.to_owned()));
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let words: Vec<&str> = rule.split_whitespace().collect();
                let after = |flag: &str| {
                    words
                        .iter()
                        .position(|w| *w == flag)
                        .and_then(|i| words.get(i + 1))
                        .map(|w| w.trim_matches('"'))
                };
                let (Some(builtin), Some(target)) = (words.first(), after("-j")) else {
                    continue;
                };
                if after("--comment") != Some(TAG) {
                    continue;
                }
                if let Some(jump) = ours
                    .iter()
                    .find(|j| j.table == table && j.builtin == *builtin && j.ours == target)
                {
                    installed.jumps.insert(*jump);
                }
            }
        }
        installed
    }

    /// The input for `iptables-restore --noflush` that removes our jumps
    /// and the pod chains; `None` when there is nothing of ours.
    fn pod_removal(&self) -> Option<String> {
        let mut out = String::new();
        let mut tables: Vec<&str> = POD_JUMPS.iter().map(|j| j.table).collect();
        tables.dedup();
        for table in tables {
            let jumps: Vec<&Jump> = POD_JUMPS
                .iter()
                .filter(|j| j.table == table && self.jumps.contains(j))
                .collect();
            let chains: Vec<&str> = self
                .chains
                .iter()
                .filter(|(t, c)| {
                    t == table && POD_JUMPS.iter().any(|j| j.table == table && j.ours == c)
                })
                .map(|(_, c)| c.as_str())
                .collect();
            if jumps.is_empty() && chains.is_empty() {
                continue;
            }
            out += &format!("*{table}\n");
            for jump in jumps {
                out += &format!("-D {}\n", jump_spec(jump));
            }
            for chain in &chains {
                out += &format!("-F {chain}\n");
            }
            for chain in &chains {
                out += &format!("-X {chain}\n");
            }
            out += "COMMIT\n";
        }
        (!out.is_empty()).then_some(out)
    }
}

/// Runs a command inside `netns`, feeding `stdin`; its stdout, or its
/// stderr on failure.
fn run_in(netns: &Path, program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<String> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running nsenter {program}: {e}")))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// What of ours the namespace's `family` tables hold now.
fn installed(path: &Path, family: Family) -> io::Result<Installed> {
    run_in(path, family.save(), &[], None).map(|save| Installed::parse(&save))
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

/// Three processes per family (capture time is mostly process start-up):
/// `iptables-save` to see what is there, one `iptables-restore` for the
/// chains and missing jumps, one `ip -batch` for the connmark route.
fn apply_family(
    netns: &Netns,
    family: Family,
    inbound: u16,
    plaintext: u16,
    outbound: u16,
) -> io::Result<()> {
    let path = netns.path();
    let installed = installed(path, family)?;
    run_in(
        path,
        family.restore(),
        &["--noflush"],
        Some(&pod_rules(family, inbound, plaintext, outbound, &installed)),
    )?;
    let fwmark = masked(CONNECTION_MARK);
    let everything = family.everything();
    let routes = format!(
        "route replace local {everything} dev lo table {ROUTE_TABLE}\n\
         rule add fwmark {fwmark} pref 32764 lookup {ROUTE_TABLE}\n"
    );
    match run_in(path, "ip", &[family.ip(), "-batch", "-"], Some(&routes)) {
        // The kernel refuses an exact duplicate rule: ours is in place.
        // Only the rule, the batch's last line, can answer that.
        Err(e) if e.to_string().contains("File exists") => Ok(()),
        other => other.map(drop),
    }
}

/// Removes everything [`apply`] installed; what is already gone is fine.
pub fn remove(netns: &Netns) -> io::Result<()> {
    let path = netns.path();
    let fwmark = masked(CONNECTION_MARK);
    let routes = format!(
        "rule del fwmark {fwmark} lookup {ROUTE_TABLE}\n\
         route flush table {ROUTE_TABLE}\n"
    );
    for family in [Family::V4, Family::V6] {
        if let Some(removal) = installed(path, family)
            .ok()
            .and_then(|installed| installed.pod_removal())
        {
            run_in(path, family.restore(), &["--noflush"], Some(&removal))?;
        }
        // `-force`: go on past what is already gone.
        let _ = run_in(
            path,
            "ip",
            &[family.ip(), "-force", "-batch", "-"],
            Some(&routes),
        );
    }
    Ok(())
}

/// The node's own probe-rewrite chain, for `iptables-restore --noflush`
/// in its nat table: connections the node opens to captured pods
/// (kubelet's probes; `-m owner --socket-exists` matches only locally
/// opened sockets) leave with the probe address as their source. When no
/// pod of this family is captured, the chain is emptied.
fn probe_snat_chain(family: Family, pods: &[std::net::IpAddr]) -> String {
    let (probe, prefix) = match family {
        Family::V4 => (PROBE_SOURCE_V4, 32),
        Family::V6 => (PROBE_SOURCE_V6, 128),
    };
    let mut out = String::from(":MESHBOX_POSTRT - [0:0]\n");
    for ip in pods {
        let ip = ip.to_canonical();
        if ip.is_ipv4() == (family == Family::V4) {
            out += &format!(
                "-A MESHBOX_POSTRT -m owner --socket-exists -p tcp -d {ip}/{prefix} -j SNAT --to-source {probe}\n"
            );
        }
    }
    out
}

/// Installs [`probe_snat_chain`] for `pods` in the calling thread's network
/// namespace (the node's), replacing what was there.
pub fn apply_probe_snat(pods: &[std::net::IpAddr]) -> io::Result<()> {
    let own = Path::new("/proc/thread-self/ns/net");
    for family in [Family::V4, Family::V6] {
        let installed = installed(own, family)?;
        let input = restore_input(
            &[("nat", probe_snat_chain(family, pods))],
            &[NODE_JUMP],
            "-I",
            &installed,
        );
        run_in(own, family.restore(), &["--noflush"], Some(&input))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_what_seed_004_redirects_and_spare_the_proxy() {
        let r = pod_rules(Family::V4, 15008, 15006, 15001, &Installed::default());
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
        let v4 = probe_snat_chain(Family::V4, &pods);
        assert!(v4.contains(
            "-m owner --socket-exists -p tcp -d 10.1.0.5/32 -j SNAT --to-source 169.254.7.127"
        ));
        assert!(
            v4.contains("-d 10.1.0.6/32"),
            "mapped addresses folded: {v4}"
        );
        assert!(!v4.contains("fd00"), "{v4}");
        let v6 = probe_snat_chain(Family::V6, &pods);
        assert!(v6.contains(&format!(
            "-d fd00::5/128 -j SNAT --to-source {PROBE_SOURCE_V6}"
        )));
        assert_eq!(v6.matches("-A ").count(), 1);
        // No pods: the chain is emptied, not left with stale addresses.
        assert_eq!(probe_snat_chain(Family::V4, &[]).matches("-A ").count(), 0);
    }

    #[test]
    fn ipv6_rules_use_ipv6_addresses_only() {
        let r = pod_rules(Family::V6, 15008, 15006, 15001, &Installed::default());
        assert!(r.contains("--on-ip :: "), "{r}");
        assert!(r.contains("! -d ::1/128"), "{r}");
        assert!(r.contains(&format!("-s {PROBE_SOURCE_V6}/128")), "{r}");
        assert!(!r.contains("127.0.0.1") && !r.contains("0.0.0.0"), "{r}");
    }

    /// `ip6tables-save` (iptables-nft 1.8.9) of a pod namespace that was
    /// captured once, with someone else's rule beside ours.
    const SAVED: &str = "# Generated by ip6tables-nft-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MESHBOX_OUTPUT - [0:0]
:MESHBOX_PRERT - [0:0]
-A PREROUTING -m comment --comment meshbox -j MESHBOX_PRERT
-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
-A OUTPUT -m comment --comment meshbox -j MESHBOX_OUTPUT
-A MESHBOX_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j ACCEPT
COMMIT
# Completed
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MESHBOX_OUTPUT - [0:0]
-A OUTPUT -m comment --comment \"meshbox\" -j MESHBOX_OUTPUT
-A OUTPUT -m comment --comment other -j MESHBOX_OUTPUT
COMMIT
";

    #[test]
    fn a_second_capture_rebuilds_our_chains_without_doubling_the_jumps() {
        let installed = Installed::parse(SAVED);
        let again = pod_rules(Family::V6, 15008, 15006, 15001, &installed);
        // Chains are declared again (which empties them) and refilled ...
        assert!(again.contains(":MESHBOX_PRERT - [0:0]"), "{again}");
        assert!(again.contains("TPROXY --on-port 15006"), "{again}");
        // ... but no jump is added twice.
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT"), "{again}");

        // A namespace that lost the nat jump gets exactly that one back.
        let partial = Installed::parse(&SAVED.replace(
            "-A OUTPUT -m comment --comment \"meshbox\" -j MESHBOX_OUTPUT\n",
            "",
        ));
        let repaired = pod_rules(Family::V6, 15008, 15006, 15001, &partial);
        let nat = &repaired[repaired.find("*nat").unwrap()..];
        assert_eq!(repaired.matches("-m comment --comment meshbox").count(), 1);
        assert!(
            nat.contains("-A OUTPUT -m comment --comment meshbox -j MESHBOX_OUTPUT\nCOMMIT"),
            "{repaired}"
        );
        // A fresh namespace gets all three.
        let fresh = pod_rules(Family::V4, 15008, 15006, 15001, &Installed::default());
        assert_eq!(fresh.matches("-m comment --comment meshbox").count(), 3);
    }

    #[test]
    fn removal_takes_only_what_is_ours() {
        let removal = Installed::parse(SAVED).pod_removal().unwrap();
        assert_eq!(
            removal,
            "*mangle
-D PREROUTING -m comment --comment meshbox -j MESHBOX_PRERT
-D OUTPUT -m comment --comment meshbox -j MESHBOX_OUTPUT
-F MESHBOX_OUTPUT
-F MESHBOX_PRERT
-X MESHBOX_OUTPUT
-X MESHBOX_PRERT
COMMIT
*nat
-D OUTPUT -m comment --comment meshbox -j MESHBOX_OUTPUT
-F MESHBOX_OUTPUT
-X MESHBOX_OUTPUT
COMMIT
"
        );
        // Nothing of ours: nothing to run.
        let foreign = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j MASQUERADE\nCOMMIT\n";
        assert!(Installed::parse(foreign).pod_removal().is_none());
        // The node's probe chain is not a pod chain.
        let node = "*nat\n:MESHBOX_POSTRT - [0:0]\n-A POSTROUTING -m comment --comment meshbox -j MESHBOX_POSTRT\nCOMMIT\n";
        assert!(Installed::parse(node).pod_removal().is_none());
    }

    #[test]
    fn the_node_jump_is_inserted_once_ahead_of_other_rules() {
        let pods: Vec<std::net::IpAddr> = vec!["10.1.0.5".parse().unwrap()];
        let chain = [("nat", probe_snat_chain(Family::V4, &pods))];
        let first = restore_input(&chain, &[NODE_JUMP], "-I", &Installed::default());
        assert!(first.contains("-I POSTROUTING -m comment --comment meshbox -j MESHBOX_POSTRT"));
        let node = "*nat\n:MESHBOX_POSTRT - [0:0]\n-A POSTROUTING -m comment --comment meshbox -j MESHBOX_POSTRT\nCOMMIT\n";
        let again = restore_input(&chain, &[NODE_JUMP], "-I", &Installed::parse(node));
        assert!(!again.contains("POSTROUTING"), "{again}");
        assert!(again.contains("-d 10.1.0.5/32"), "{again}");
    }
}
