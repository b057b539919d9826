//! Runs one plugin of a CNI chain exactly as a container runtime does:
//! `CNI_*` environment, the plugin's configuration with the list's name and
//! version (and the previous plugin's result) on stdin, inside the given
//! "host" network namespace. Shared by the CNI plugin tests and the in-pod
//! capture tests (`dataplane/tests/inpod.rs` includes this file by path).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Runs one plugin of a conflist the way libcni does: the plugin's object
/// with the list's `cniVersion` and `name` (and `prevResult`), the binary
/// found by its `type` in `CNI_PATH`, here run inside the "host" netns.
async fn invoke(
    host_ns: &str,
    cni_path: &[PathBuf],
    list: &Value,
    plugin: &Value,
    command: &str,
    env: &[(&str, &str)],
    prev_result: Option<&Value>,
) -> Result<Option<Value>, String> {
    let mut conf = plugin.clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev.clone();
    }
    let kind = plugin["type"].as_str().unwrap();
    let binary = cni_path
        .iter()
        .map(|dir| dir.join(kind))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{kind} not in CNI_PATH"));
    let path = std::env::join_paths(cni_path).unwrap();
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", host_ns])
        .arg(&binary)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(conf.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| format!("{kind} {command} hung"))?
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{kind} {command}: {} stdout {stdout} stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&stdout)
        .map(Some)
        .map_err(|e| format!("{kind} {command} printed {stdout:?}: {e}"))
}

/// Runs a whole conflist for `command` as libcni does: ADD and CHECK in
/// order, DEL in reverse; ADD hands each plugin the previous one's result,
/// CHECK and DEL give every plugin `result`. Stops at the first failure.
pub async fn run_list(
    host_ns: &str,
    cni_path: &[PathBuf],
    list: &Value,
    command: &str,
    env: &[(&str, &str)],
    result: Option<&Value>,
) -> Result<Option<Value>, String> {
    let plugins: Vec<&Value> = list["plugins"]
        .as_array()
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let ordered: Vec<&Value> = if command == "DEL" {
        plugins.into_iter().rev().collect()
    } else {
        plugins
    };
    let mut previous = result.cloned();
    for plugin in ordered {
        let out = invoke(
            host_ns,
            cni_path,
            list,
            plugin,
            command,
            env,
            previous.as_ref(),
        )
        .await?;
        if command == "ADD" {
            previous = out;
        }
    }
    Ok(previous)
}
