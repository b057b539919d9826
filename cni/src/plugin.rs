//! The CNI spec side of `meshbox-cni`: the environment and the network
//! configuration on stdin in, a result or an error on stdout out.
//!
//! A chained plugin (after the cluster's primary CNI): it adds no
//! interface or address, so `ADD` prints `prevResult` unchanged. Commands:
//!
//! - `ADD`: asks the agent to capture the pod; fails (code 11, "try again
//!   later") when the agent cannot be reached or cannot capture it.
//! - `DEL`: tells the agent; never fails because of the agent.
//! - `CHECK`: asks the agent; fails when the pod is enrolled but not
//!   captured (code 100) or the agent cannot be reached (code 11).
//! - `VERSION`: the versions in [`SUPPORTED_VERSIONS`].
//! - `STATUS` (1.1.0): ready when the agent's socket accepts connections,
//!   code 50 otherwise.
//! - `GC` (1.1.0): the plugin keeps no state of its own (the agent releases
//!   pods that leave the node), so there is nothing to collect.
//!
//! Nothing but the result goes to stdout; logs go to stderr.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{info, warn};

use crate::{CaptureCommand, CaptureRequest, CaptureResponse, DEFAULT_SOCKET, probe, request};

#[doc(hidden)]
pub mod fuzzing;

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version errors are reported in when the input does not say.
const FALLBACK_VERSION: &str = "1.0.0";

/// How long the plugin waits for the agent unless `"timeout"` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest network configuration accepted on stdin.
const MAX_STDIN: u64 = 1024 * 1024;

/// Error codes of the CNI specification, and ours (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// `CHECK`: the pod is enrolled but not captured.
    pub const NOT_CAPTURED: u32 = 100;
    /// A bug in the plugin (it panicked).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error, printed on stdout as the spec says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    fn json(&self, cni_version: &str) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let mut out = serde_json::to_vec(&Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("plain strings serialize");
        out.push(b'\n');
        out
    }
}

/// The runtime's environment variables.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads `CNI_*` through `get` (`|k| std::env::var(k).ok()` for real).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: get("CNI_ARGS").unwrap_or_default(),
            path: get("CNI_PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
        }
    }

    fn require(&self, container_id: bool, netns: bool) -> Result<(), CniError> {
        let invalid = |what: &str| CniError::new(code::INVALID_ENV, what.to_string(), "");
        if container_id {
            if self.container_id.is_empty() {
                return Err(invalid("CNI_CONTAINERID is not set"));
            }
            let valid = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
            if !self
                .container_id
                .starts_with(|c: char| c.is_ascii_alphanumeric())
                || !self.container_id.chars().all(valid)
            {
                return Err(invalid("CNI_CONTAINERID is not a valid container ID"));
            }
            // Same rules as Linux and the reference plugins.
            let name = &self.ifname;
            if name.is_empty() {
                return Err(invalid("CNI_IFNAME is not set"));
            }
            if name.len() > 15
                || name == "."
                || name == ".."
                || name
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(invalid("CNI_IFNAME is not a valid interface name"));
            }
        }
        if netns && self.netns.is_empty() {
            return Err(invalid("CNI_NETNS is not set"));
        }
        Ok(())
    }
}

/// The pod fields of `CNI_ARGS` (`K=V;K=V`, as kubelet's runtimes set it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodArgs {
    /// Unknown keys are ignored; a pair without `=` is skipped with a
    /// warning rather than failing a `DEL`.
    pub fn parse(cni_args: &str) -> Self {
        let mut pod = Self::default();
        for pair in cni_args.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                warn!(pair, "CNI_ARGS: ignoring an entry without '='");
                continue;
            };
            match key {
                "K8S_POD_NAMESPACE" => pod.namespace = value.to_string(),
                "K8S_POD_NAME" => pod.name = value.to_string(),
                "K8S_POD_UID" => pod.uid = value.to_string(),
                _ => {}
            }
        }
        pod
    }
}

/// The network configuration: the spec's keys we use, and ours.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// Kept as received, to be printed back unchanged.
    #[serde(default)]
    pub prev_result: Option<Box<RawValue>>,
    /// The agent's Unix socket ([`DEFAULT_SOCKET`] by default).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// How long to wait for the agent, e.g. `"10s"`.
    #[serde(default)]
    pub timeout: Option<String>,
}

impl NetConf {
    fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .unwrap_or_else(|| Path::new(DEFAULT_SOCKET))
    }

    fn timeout(&self) -> Result<Duration, CniError> {
        let Some(text) = &self.timeout else {
            return Ok(DEFAULT_TIMEOUT);
        };
        match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(CniError::new(
                code::INVALID_CONFIG,
                "\"timeout\" must be more than zero",
                text.clone(),
            )),
            Err(e) => Err(CniError::new(
                code::INVALID_CONFIG,
                format!("\"timeout\" is not a duration like \"10s\": {e}"),
                text.clone(),
            )),
        }
    }

    /// The pod's addresses from the primary plugin's result, without their
    /// prefix lengths.
    fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        #[derive(Deserialize)]
        struct PrevResult {
            #[serde(default)]
            ips: Vec<IpConfig>,
        }
        #[derive(Deserialize)]
        struct IpConfig {
            address: String,
        }
        let Some(raw) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let prev: PrevResult = serde_json::from_str(raw.get())
            .map_err(|e| CniError::new(code::DECODE, "cannot decode prevResult", e.to_string()))?;
        prev.ips
            .iter()
            .map(|ip| {
                let addr = ip.address.split('/').next().unwrap_or_default();
                addr.parse().map_err(|_| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        "prevResult has an address that is not an IP",
                        ip.address.clone(),
                    )
                })
            })
            .collect()
    }

    /// What `ADD` prints: `prevResult` as received, or a minimal result.
    fn result(&self) -> Vec<u8> {
        let mut out = match &self.prev_result {
            Some(raw) => {
                // Each member is kept as the runtime wrote it: read into a
                // `serde_json::Value`, a number it cannot hold exactly was
                // rewritten (2^64 came out as 1.8446744073709552e19) or, out
                // of f64's range, made the whole result go out unversioned.
                let members: Option<BTreeMap<String, Box<RawValue>>> =
                    serde_json::from_str(raw.get()).ok();
                match members {
                    // A result must say its version; add it if the runtime
                    // left it out, change nothing else.
                    Some(mut members) if !members.contains_key("cniVersion") => {
                        let version = serde_json::value::to_raw_value(&self.cni_version)
                            .expect("a string serializes");
                        members.insert("cniVersion".into(), version);
                        serde_json::to_vec(&members).expect("raw JSON values serialize")
                    }
                    _ => raw.get().as_bytes().to_vec(),
                }
            }
            None => serde_json::to_vec(&serde_json::json!({ "cniVersion": self.cni_version }))
                .expect("a JSON value serializes"),
        };
        out.push(b'\n');
        out
    }
}

/// What the binary prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub status: i32,
}

/// Runs one invocation. Never panics on bad input: every problem is a CNI
/// error on stdout with a non-zero status.
pub async fn run(inv: &Invocation, stdin: &[u8]) -> Output {
    // Errors are reported in the caller's version when it can be read.
    let version = serde_json::from_slice::<VersionOnly>(stdin)
        .ok()
        .and_then(|v| v.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string());
    match dispatch(inv, stdin).await {
        Ok(stdout) => Output { stdout, status: 0 },
        Err(e) => {
            warn!(command = %inv.command, container = %inv.container_id, code = e.code, msg = %e.msg, details = %e.details, "meshbox-cni failed");
            Output {
                stdout: e.json(&version),
                status: 1,
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionOnly {
    #[serde(default)]
    cni_version: Option<String>,
}

async fn dispatch(inv: &Invocation, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    match inv.command.as_str() {
        "VERSION" => version(stdin),
        "ADD" => {
            inv.require(true, true)?;
            let conf = parse_conf(stdin, "0.3.0")?;
            add(inv, &conf).await
        }
        "DEL" => {
            inv.require(true, false)?;
            let conf = parse_conf(stdin, "0.3.0")?;
            del(inv, &conf).await;
            Ok(Vec::new())
        }
        "CHECK" => {
            inv.require(true, true)?;
            let conf = parse_conf(stdin, "0.4.0")?;
            check(inv, &conf).await?;
            Ok(Vec::new())
        }
        "STATUS" => {
            let conf = parse_conf(stdin, "1.1.0")?;
            probe(conf.socket(), conf.timeout()?).await.map_err(|e| {
                CniError::new(
                    code::NOT_AVAILABLE,
                    "the meshbox dataplane is not available",
                    e.to_string(),
                )
            })?;
            Ok(Vec::new())
        }
        "GC" => {
            parse_conf(stdin, "1.1.0")?;
            Ok(Vec::new())
        }
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "CNI_COMMAND is not set",
            "",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not supported"),
            "",
        )),
    }
}

fn version(stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    // The runtime sends {"cniVersion": …}; answer in it when we speak it.
    let asked = if stdin.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<VersionOnly>(stdin)
            .map_err(|e| CniError::new(code::DECODE, "cannot decode stdin", e.to_string()))?
            .cni_version
    };
    let newest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let cni_version = asked
        .as_deref()
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(newest);
    let mut out = serde_json::to_vec(&serde_json::json!({
        "cniVersion": cni_version,
        "supportedVersions": SUPPORTED_VERSIONS,
    }))
    .expect("a JSON value serializes");
    out.push(b'\n');
    Ok(out)
}

/// Decodes the configuration and checks its version is one we speak and
/// at least `min` (the first version with that command).
fn parse_conf(stdin: &[u8], min: &str) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration on stdin",
            e.to_string(),
        )
    })?;
    let index = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    match index(&conf.cni_version) {
        None => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {:?} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        )),
        Some(i) if Some(i) < index(min) => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} does not have this command", conf.cni_version),
            format!("it needs {min} or later"),
        )),
        Some(_) => Ok(conf),
    }
}

fn capture_request(inv: &Invocation, command: CaptureCommand, ips: Vec<IpAddr>) -> CaptureRequest {
    let pod = PodArgs::parse(&inv.args);
    CaptureRequest {
        command,
        container_id: inv.container_id.clone(),
        pod_namespace: pod.namespace,
        pod_name: pod.name,
        pod_uid: pod.uid,
        netns: inv.netns.clone(),
        ips,
    }
}

async fn add(inv: &Invocation, conf: &NetConf) -> Result<Vec<u8>, CniError> {
    let timeout = conf.timeout()?;
    let req = capture_request(inv, CaptureCommand::Add, conf.pod_ips()?);
    match request(conf.socket(), &req, timeout).await {
        Ok(CaptureResponse {
            captured,
            error: None,
        }) => {
            info!(pod = %format!("{}/{}", req.pod_namespace, req.pod_name), captured, "ADD");
            Ok(conf.result())
        }
        Ok(CaptureResponse {
            error: Some(error), ..
        }) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the meshbox dataplane could not capture the pod",
            error,
        )),
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the meshbox dataplane is not reachable; the pod cannot start uncaptured",
            e.to_string(),
        )),
    }
}

async fn del(inv: &Invocation, conf: &NetConf) {
    // Whatever happens, DEL succeeds: the pod is going away, and the agent
    // releases pods that leave the node on its own.
    let ips = conf.pod_ips().unwrap_or_else(|e| {
        warn!(details = %e.details, "DEL: {}", e.msg);
        Vec::new()
    });
    let timeout = conf.timeout().unwrap_or(DEFAULT_TIMEOUT);
    let req = capture_request(inv, CaptureCommand::Del, ips);
    match request(conf.socket(), &req, timeout).await {
        Ok(CaptureResponse { error: None, .. }) => {}
        Ok(CaptureResponse {
            error: Some(error), ..
        }) => warn!(container = %inv.container_id, %error, "DEL: the dataplane reported an error"),
        Err(e) => warn!(container = %inv.container_id, error = %e, "DEL: dataplane not told"),
    }
}

async fn check(inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
    let timeout = conf.timeout()?;
    let req = capture_request(inv, CaptureCommand::Check, conf.pod_ips()?);
    match request(conf.socket(), &req, timeout).await {
        Ok(CaptureResponse { error: None, .. }) => Ok(()),
        Ok(CaptureResponse {
            error: Some(error), ..
        }) => Err(CniError::new(
            code::NOT_CAPTURED,
            "the pod is not captured by the meshbox dataplane",
            error,
        )),
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the meshbox dataplane is not reachable",
            e.to_string(),
        )),
    }
}

/// The `meshbox-cni` binary: environment and stdin in, stdout and the exit
/// status out. Logs go to stderr (`MESHBOX_CNI_LOG`, default `warn`).
pub fn main() -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHBOX_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();

    let output = match std::panic::catch_unwind(invoke) {
        Ok(output) => output,
        Err(_) => Output {
            stdout: CniError::new(code::INTERNAL, "meshbox-cni failed unexpectedly", "")
                .json(FALLBACK_VERSION),
            status: 1,
        },
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&output.stdout)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return 1;
    }
    output.status
}

fn invoke() -> Output {
    let inv = Invocation::from_env(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut stdin);
    let early = |e: CniError| Output {
        stdout: e.json(FALLBACK_VERSION),
        status: 1,
    };
    if let Err(e) = read {
        return early(CniError::new(
            code::IO_FAILURE,
            "cannot read stdin",
            e.to_string(),
        ));
    }
    if stdin.len() as u64 > MAX_STDIN {
        return early(CniError::new(
            code::DECODE,
            format!("the network configuration is larger than {MAX_STDIN} bytes"),
            "",
        ));
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(&inv, &stdin)),
        Err(e) => early(CniError::new(
            code::IO_FAILURE,
            "cannot start the runtime",
            e.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_give_the_pod() {
        let pod = PodArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=6f1c-22;junk;=x",
        );
        assert_eq!(
            pod,
            PodArgs {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "6f1c-22".into()
            }
        );
        assert_eq!(PodArgs::parse(""), PodArgs::default());
    }

    fn conf(json: &str) -> NetConf {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn ips_lose_their_prefix_and_result_passes_through() {
        let text = r#"{"cniVersion":"1.0.0","name":"n","type":"meshbox-cni",
            "prevResult":{"cniVersion":"1.0.0", "ips":[{"address":"10.1.2.3/24","interface":0},{"address":"fd00::5/64"}],"z":1,"a":2}}"#;
        let c = conf(text);
        assert_eq!(
            c.pod_ips().unwrap(),
            vec![
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let raw = c.prev_result.as_ref().unwrap().get().to_string();
        assert_eq!(c.result(), format!("{raw}\n").into_bytes());

        let c = conf(r#"{"cniVersion":"0.4.0","prevResult":{"ips":[]}}"#);
        assert_eq!(c.result(), b"{\"cniVersion\":\"0.4.0\",\"ips\":[]}\n");
        // Found by the cni_stdin fuzz target: numbers a f64 cannot hold
        // exactly are passed on as written, and the version is still added.
        let c =
            conf(r#"{"cniVersion":"1.0.0","prevResult":{"mtu":18446744073709551616,"x":1e400}}"#);
        assert_eq!(
            c.result(),
            b"{\"cniVersion\":\"1.0.0\",\"mtu\":18446744073709551616,\"x\":1e400}\n"
        );
        let c = conf(r#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(c.result(), b"{\"cniVersion\":\"0.4.0\"}\n");
        assert!(c.pod_ips().unwrap().is_empty());

        let c = conf(r#"{"cniVersion":"1.0.0","prevResult":{"ips":[{"address":"nope/3"}]}}"#);
        assert_eq!(c.pod_ips().unwrap_err().code, code::INVALID_CONFIG);
        let c = conf(r#"{"cniVersion":"1.0.0","prevResult":{"ips":"x"}}"#);
        assert_eq!(c.pod_ips().unwrap_err().code, code::DECODE);
    }

    #[test]
    fn versions_and_timeouts() {
        assert_eq!(
            parse_conf(br#"{"cniVersion":"0.2.0"}"#, "0.3.0")
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            parse_conf(br#"{"cniVersion":"0.3.1"}"#, "0.4.0")
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        assert!(parse_conf(br#"{"cniVersion":"1.1.0"}"#, "1.1.0").is_ok());
        assert_eq!(
            parse_conf(br#"{"name":"x"}"#, "0.3.0").unwrap_err().code,
            code::DECODE
        );
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0"}"#).timeout().unwrap(),
            DEFAULT_TIMEOUT
        );
        assert_eq!(
            conf(r#"{"cniVersion":"1.0.0","timeout":"250ms"}"#)
                .timeout()
                .unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["\"0s\"", "\"soon\""] {
            let c = conf(&format!(r#"{{"cniVersion":"1.0.0","timeout":{bad}}}"#));
            assert_eq!(c.timeout().unwrap_err().code, code::INVALID_CONFIG);
        }
    }

    #[test]
    fn environment_is_checked() {
        let inv = Invocation {
            command: "ADD".into(),
            container_id: "abc-1_2.3".into(),
            netns: "/proc/1/ns/net".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        assert!(inv.require(true, true).is_ok());
        for (container_id, ifname) in [
            ("", "eth0"),
            ("-abc", "eth0"),
            ("a/b", "eth0"),
            ("abc", ""),
            ("abc", "a-very-long-interface"),
            ("abc", "a/b"),
            ("abc", ".."),
        ] {
            let inv = Invocation {
                container_id: container_id.into(),
                ifname: ifname.into(),
                ..inv.clone()
            };
            assert_eq!(
                inv.require(true, true).unwrap_err().code,
                code::INVALID_ENV,
                "{container_id:?} {ifname:?}"
            );
        }
        let inv = Invocation {
            netns: String::new(),
            ..inv
        };
        assert!(inv.require(true, false).is_ok());
        assert_eq!(inv.require(true, true).unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn version_answers() {
        let v: serde_json::Value = serde_json::from_slice(&version(b"").unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let v: serde_json::Value =
            serde_json::from_slice(&version(br#"{"cniVersion":"0.4.0"}"#).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(version(b"{{").unwrap_err().code, code::DECODE);
    }
}
