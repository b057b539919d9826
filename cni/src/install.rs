//! `meshbox-cni install` and `meshbox-cni uninstall`: put the plugin into a
//! node's CNI configuration, and take it out again.
//!
//! Install copies this binary into the CNI bin directory and appends
//! `{"type": "meshbox-cni", "socket": …}` as the last plugin of the node's
//! primary network configuration: the file the container runtime uses,
//! which is the first `*.conf`, `*.conflist` or `*.json` by name (containerd
//! and CRI-O both load the directory that way and take the first). A
//! conflist gets the entry appended; a single-plugin `*.conf`/`*.json`
//! is turned into a conflist of the same name holding it, as the runtime
//! itself would read it. Uninstall removes the entry from every conflist
//! in the directory, puts back the file as it was before install when
//! nothing else changed it since, and removes the binary.
//!
//! Every write goes to a temporary file in the same directory (with an
//! extension the runtime ignores) and is renamed over the target, so the
//! runtime never reads half a file and a running plugin binary is never
//! written into. A file that is already as it should be is not touched
//! (runtimes watch the directory and reload on every write). A file that
//! does not parse is reported and left alone.
//!
//! The original of each file install changes is kept beside it as
//! `NAME.meshbox-orig` (an extension no runtime loads), so uninstall can
//! restore it byte for byte.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::DEFAULT_SOCKET;
use crate::plugin::SUPPORTED_VERSIONS;

/// The plugin's `type`: the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "meshbox-cni";

/// Suffix of the copy of a file as it was before install.
const BACKUP_SUFFIX: &str = ".meshbox-orig";

/// Suffix of files being written (never loaded by a runtime).
const TEMP_SUFFIX: &str = ".meshbox-tmp";

/// The extensions a runtime loads network configurations from.
const CONFIG_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];

/// Where things go on the node.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The CNI bin directory (`/opt/cni/bin` on most nodes).
    pub bin_dir: PathBuf,
    /// The CNI network configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "{dir}: no network configuration (*.conflist, *.conf, *.json) yet; the cluster's CNI writes one when it starts"
    )]
    NoConfig { dir: PathBuf },
    #[error("{path}: not valid JSON ({source}); left untouched")]
    BadJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {what}; left untouched")]
    BadConfig { path: PathBuf, what: String },
    #[error(
        "{path}: cniVersion {version:?} cannot chain meshbox-cni, which speaks {supported}; left untouched"
    )]
    Version {
        path: PathBuf,
        version: String,
        supported: String,
    },
    #[error("the plugin's socket must be an absolute path on the node, got {0}")]
    RelativeSocket(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// What [`install`] or [`uninstall`] changed; empty when nothing needed to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Files written, renamed into place or removed, in order.
    pub files: Vec<PathBuf>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Copies `plugin_binary` into the bin directory and makes the plugin the
/// last one of the primary network configuration, pointing at `socket`.
/// Idempotent: run again, it changes nothing.
pub fn install(
    layout: &Layout,
    plugin_binary: &Path,
    socket: &Path,
) -> Result<Changes, InstallError> {
    if !socket.is_absolute() {
        return Err(InstallError::RelativeSocket(socket.to_path_buf()));
    }
    let mut changes = Changes::default();
    // The binary first: a configuration naming a plugin that is not there
    // yet would fail every pod on the node.
    if copy_binary(plugin_binary, &layout.bin_dir.join(PLUGIN_TYPE))? {
        changes.files.push(layout.bin_dir.join(PLUGIN_TYPE));
    }
    let files = config_files(&layout.conf_dir)?;
    let primary = files.first().ok_or_else(|| InstallError::NoConfig {
        dir: layout.conf_dir.clone(),
    })?;
    let original = fs::read(primary).map_err(io_error("reading", primary))?;
    let value: Value =
        serde_json::from_slice(&original).map_err(|source| InstallError::BadJson {
            path: primary.clone(),
            source,
        })?;
    let is_list = extension(primary) == Some("conflist");
    let mut list = if is_list {
        check_conflist(primary, value)?
    } else {
        conf_to_conflist(primary, value)?
    };
    check_version(primary, &list)?;
    let already = ours_last(&list, socket);
    let had_entry = plugins(&list).iter().any(is_ours);
    if is_list && already {
        return Ok(changes);
    }
    let plugins = plugins_mut(&mut list);
    plugins.retain(|p| !is_ours(p));
    plugins.push(our_entry(socket));

    let target = if is_list {
        primary.clone()
    } else {
        let target = primary.with_extension("conflist");
        // The converted file must still be the one the runtime picks.
        let mut after: Vec<&PathBuf> = files.iter().filter(|f| *f != primary).collect();
        after.push(&target);
        after.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        if after.first() != Some(&&target) {
            return Err(InstallError::BadConfig {
                path: primary.clone(),
                what: format!(
                    "as {} it would no longer be the first configuration by name",
                    target.display()
                ),
            });
        }
        target
    };
    if !had_entry {
        // Keep the file as it was, for uninstall to put back.
        let backup = backup_path(primary);
        write_atomic(&backup, &original, mode_of(primary))?;
        changes.files.push(backup);
    }
    write_atomic(&target, &to_json(&Value::Object(list)), mode_of(primary))?;
    changes.files.push(target.clone());
    if target != *primary {
        // Written first, removed second: the runtime always has a config.
        fs::remove_file(primary).map_err(io_error("removing", primary))?;
        changes.files.push(primary.clone());
    }
    Ok(changes)
}

/// Removes the plugin from every conflist in the configuration directory
/// (restoring the file as it was before install where nothing else changed
/// it since), then the binary. A file that cannot be read or parsed is
/// reported and left as it is, and the binary then stays too (a
/// configuration may still name it). Removing what is not there is fine.
pub fn uninstall(layout: &Layout) -> Result<Changes, InstallError> {
    let mut changes = Changes::default();
    let mut first_error = None;
    for path in config_files(&layout.conf_dir)? {
        match uninstall_file(&path) {
            Ok(mut c) => changes.files.append(&mut c.files),
            Err(e) => {
                warn!(error = %e, "uninstall: skipping a file");
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Backups whose file no longer has our entry (the cluster's CNI
    // rewrote it), and temporaries of an interrupted run.
    for entry in read_dir(&layout.conf_dir)? {
        let name = entry.to_string_lossy();
        if name.ends_with(BACKUP_SUFFIX) || name.contains(TEMP_SUFFIX) {
            let path = layout.conf_dir.join(&entry);
            fs::remove_file(&path).map_err(io_error("removing", &path))?;
            changes.files.push(path);
        }
    }
    let binary = layout.bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => changes.files.push(binary),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("removing", &binary)(e)),
    }
    Ok(changes)
}

fn uninstall_file(path: &Path) -> Result<Changes, InstallError> {
    let mut changes = Changes::default();
    if extension(path) != Some("conflist") {
        return Ok(changes);
    }
    let bytes = fs::read(path).map_err(io_error("reading", path))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|source| InstallError::BadJson {
        path: path.to_path_buf(),
        source,
    })?;
    let mut list = check_conflist(path, value)?;
    if !plugins(&list).iter().any(is_ours) {
        return Ok(changes);
    }
    plugins_mut(&mut list).retain(|p| !is_ours(p));
    let without = Value::Object(list);

    // Installed into this conflist as it was: put the original back if it
    // says the same as what is left.
    let backup = backup_path(path);
    if let Some(original) = read_backup(&backup, |v| v == &without) {
        write_atomic(path, &original, mode_of(path))?;
        changes.files.push(path.to_path_buf());
        fs::remove_file(&backup).map_err(io_error("removing", &backup))?;
        changes.files.push(backup);
        return Ok(changes);
    }
    // Converted from a single-plugin file: put that back, unless the
    // cluster's CNI has written a new one meanwhile.
    for ext in ["conf", "json"] {
        let single = path.with_extension(ext);
        let backup = backup_path(&single);
        if !backup.exists() {
            continue;
        }
        let same = |v: &Value| {
            without["plugins"]
                .as_array()
                .is_some_and(|p| p == std::slice::from_ref(v))
        };
        if single.exists() {
            // The single file is back and sorts first: our conflist is
            // unused; drop it rather than leave a second network behind.
            fs::remove_file(path).map_err(io_error("removing", path))?;
            changes.files.push(path.to_path_buf());
            return Ok(changes);
        }
        if let Some(original) = read_backup(&backup, same) {
            write_atomic(&single, &original, mode_of(path))?;
            changes.files.push(single);
            fs::remove_file(path).map_err(io_error("removing", path))?;
            changes.files.push(path.to_path_buf());
            fs::remove_file(&backup).map_err(io_error("removing", &backup))?;
            changes.files.push(backup);
            return Ok(changes);
        }
    }
    // Changed since install by someone else: keep their change, drop ours.
    write_atomic(path, &to_json(&without), mode_of(path))?;
    changes.files.push(path.to_path_buf());
    Ok(changes)
}

/// The backup's bytes, if it exists, parses, and `matches`.
fn read_backup(backup: &Path, matches: impl Fn(&Value) -> bool) -> Option<Vec<u8>> {
    let bytes = fs::read(backup).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    matches(&value).then_some(bytes)
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(BACKUP_SUFFIX);
    path.with_file_name(name)
}

fn extension(path: &Path) -> Option<&str> {
    path.extension().and_then(OsStr::to_str)
}

fn read_dir(dir: &Path) -> Result<Vec<std::ffi::OsString>, InstallError> {
    let entries = fs::read_dir(dir).map_err(io_error("reading the directory", dir))?;
    let mut names = Vec::new();
    for entry in entries {
        names.push(
            entry
                .map_err(io_error("reading the directory", dir))?
                .file_name(),
        );
    }
    names.sort();
    Ok(names)
}

/// The regular files a runtime would load, in the order it loads them.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files = Vec::new();
    for name in read_dir(dir)? {
        let path = dir.join(&name);
        if extension(&path).is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
            && path.metadata().is_ok_and(|m| m.is_file())
        {
            files.push(path);
        }
    }
    Ok(files)
}

fn check_conflist(path: &Path, value: Value) -> Result<Map<String, Value>, InstallError> {
    let bad = |what: &str| InstallError::BadConfig {
        path: path.to_path_buf(),
        what: what.to_owned(),
    };
    let Value::Object(list) = value else {
        return Err(bad("a conflist must be a JSON object"));
    };
    match list.get("plugins") {
        Some(Value::Array(p)) if p.iter().all(Value::is_object) => Ok(list),
        Some(Value::Array(_)) => Err(bad("every entry of \"plugins\" must be an object")),
        _ => Err(bad("a conflist needs a \"plugins\" array")),
    }
}

/// A single-plugin configuration as the conflist the runtime would make of
/// it: its name and version on top, the whole object as the one plugin.
fn conf_to_conflist(path: &Path, value: Value) -> Result<Map<String, Value>, InstallError> {
    let bad = |what: &str| InstallError::BadConfig {
        path: path.to_path_buf(),
        what: what.to_owned(),
    };
    let Value::Object(conf) = value else {
        return Err(bad("a network configuration must be a JSON object"));
    };
    if conf.contains_key("plugins") {
        return Err(bad(
            "it has a \"plugins\" list, so it is a conflist: rename it to .conflist",
        ));
    }
    if !conf.get("type").is_some_and(Value::is_string) {
        return Err(bad("a single-plugin configuration needs a \"type\""));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.get(key) {
            list.insert(key.to_owned(), v.clone());
        }
    }
    list.insert(
        "plugins".to_owned(),
        Value::Array(vec![Value::Object(conf)]),
    );
    Ok(list)
}

/// The runtime hands the conflist's `cniVersion` to every plugin; one the
/// plugin does not speak would fail every pod on the node, so refuse here.
fn check_version(path: &Path, list: &Map<String, Value>) -> Result<(), InstallError> {
    let version = list.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(InstallError::Version {
            path: path.to_path_buf(),
            version: version.to_owned(),
            supported: SUPPORTED_VERSIONS.join(", "),
        })
    }
}

fn plugins(list: &Map<String, Value>) -> &[Value] {
    list.get("plugins")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn plugins_mut(list: &mut Map<String, Value>) -> &mut Vec<Value> {
    let entry = list
        .entry("plugins")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !entry.is_array() {
        *entry = Value::Array(Vec::new());
    }
    match entry {
        Value::Array(plugins) => plugins,
        _ => unreachable!("made an array just above"),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn our_entry(socket: &Path) -> Value {
    serde_json::json!({ "type": PLUGIN_TYPE, "socket": socket.to_string_lossy() })
}

/// Our entry is there once, last, with this socket (other keys an operator
/// added to it, such as `timeout`, are kept).
fn ours_last(list: &Map<String, Value>, socket: &Path) -> bool {
    let plugins = plugins(list);
    plugins.iter().filter(|p| is_ours(p)).count() == 1
        && plugins.last().is_some_and(|p| {
            is_ours(p)
                && p.get("socket").and_then(Value::as_str) == Some(&*socket.to_string_lossy())
        })
}

fn to_json(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).expect("a JSON value serializes");
    out.push(b'\n');
    out
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// Writes `content` to a temporary file beside `path`, syncs it, and
/// renames it over `path`.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), InstallError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TEMP_SUFFIX}-{}", std::process::id()));
    let temp = path.with_file_name(name);
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(content)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(io_error("writing", path))
}

/// Copies the plugin binary into place unless an identical copy is there.
/// Returns whether it wrote.
fn copy_binary(source: &Path, target: &Path) -> Result<bool, InstallError> {
    if let (Ok(a), Ok(b)) = (fs::canonicalize(source), fs::canonicalize(target))
        && a == b
    {
        return Ok(false);
    }
    let content = fs::read(source).map_err(io_error("reading", source))?;
    // The size first: the watching installer checks this every few seconds.
    let same_size = fs::metadata(target).is_ok_and(|m| m.len() == content.len() as u64);
    if same_size && fs::read(target).is_ok_and(|existing| existing == content) {
        return Ok(false);
    }
    write_atomic(target, &content, 0o755)?;
    Ok(true)
}

/// The `install`/`uninstall` command line.
#[derive(clap::Parser, Debug)]
#[command(
    name = "meshbox-cni",
    version,
    about = "The meshbox CNI plugin. Container runtimes run it with CNI_COMMAND set and no \
             arguments; these commands put it into a node's CNI configuration and take it out."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Copy this binary into the CNI bin directory and chain the plugin
    /// last in the node's primary network configuration.
    Install {
        #[command(flatten)]
        layout: LayoutArgs,
        /// The dataplane's socket, as a path on the node.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Keep running: put the plugin back every INTERVAL if the
        /// cluster's CNI rewrites its configuration, and uninstall on
        /// SIGTERM or SIGINT.
        #[arg(long, value_name = "INTERVAL", value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
    },
    /// Remove the plugin from the node's network configuration and the
    /// binary from the CNI bin directory.
    Uninstall {
        #[command(flatten)]
        layout: LayoutArgs,
    },
}

#[derive(clap::Args, Debug)]
struct LayoutArgs {
    /// The node's CNI plugin directory (mounted from the host in a pod).
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI network configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
}

impl LayoutArgs {
    fn layout(&self) -> Layout {
        Layout {
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
        }
    }
}

/// Whether the process was started as `meshbox-cni install|uninstall …`
/// (or asked for help) rather than by a runtime, which passes no arguments.
pub fn is_management_command() -> bool {
    is_management_arg(std::env::args_os().nth(1).as_deref())
}

fn is_management_arg(first: Option<&OsStr>) -> bool {
    matches!(
        first.and_then(OsStr::to_str),
        Some("install" | "uninstall" | "help" | "--help" | "-h" | "--version" | "-V")
    )
}

/// How long install waits between looks for a configuration that is not
/// there yet (the cluster's CNI writes it when it starts).
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Runs `meshbox-cni install|uninstall`; returns the exit status.
pub fn main() -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHBOX_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cli = <Cli as clap::Parser>::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshbox-cni: cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = match cli.command {
        Command::Install {
            layout,
            socket,
            watch,
        } => runtime.block_on(run_install(layout.layout(), socket, watch)),
        Command::Uninstall { layout } => run_uninstall(&layout.layout()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("meshbox-cni: {e}");
            1
        }
    }
}

fn run_uninstall(layout: &Layout) -> Result<(), InstallError> {
    let changes = uninstall(layout)?;
    if changes.is_empty() {
        info!(conf_dir = %layout.conf_dir.display(), "meshbox-cni was not installed; nothing to do");
    } else {
        info!(files = ?changes.files, "meshbox-cni uninstalled");
    }
    Ok(())
}

async fn run_install(
    layout: Layout,
    socket: PathBuf,
    watch: Option<Duration>,
) -> Result<(), InstallError> {
    use tokio::signal::unix::{SignalKind, signal};
    let binary = std::env::current_exe().map_err(io_error("finding", Path::new("this binary")))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(io_error("handling SIGTERM", Path::new("-")))?;
    let mut waited = false;
    // The first install must succeed (so a configuration that cannot take
    // the plugin shows as a failing container, with the reason); only a
    // configuration that is not written yet is waited for.
    loop {
        match install(&layout, &binary, &socket) {
            Ok(changes) => {
                report(&layout, &changes);
                break;
            }
            Err(InstallError::NoConfig { .. }) => {
                if !waited {
                    info!(conf_dir = %layout.conf_dir.display(), "waiting for the cluster's CNI to write its configuration");
                    waited = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(CONFIG_POLL) => {}
                    _ = term.recv() => return Ok(()),
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    let Some(interval) = watch else {
        return Ok(());
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        // Later failures are logged and retried: the plugin stays where it
        // is until the configuration can take it again.
        match install(&layout, &binary, &socket) {
            Ok(changes) if !changes.is_empty() => {
                warn!(files = ?changes.files, "the plugin had been removed from the CNI configuration; put it back");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "keeping meshbox-cni installed failed; retrying"),
        }
    }
    info!("stopping: uninstalling meshbox-cni");
    run_uninstall(&layout)
}

fn report(layout: &Layout, changes: &Changes) {
    if changes.is_empty() {
        info!(conf_dir = %layout.conf_dir.display(), "meshbox-cni already installed");
    } else {
        info!(files = ?changes.files, "meshbox-cni installed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kindnet's conflist, as kind writes it (pod CIDR of one node).
    const KINDNET: &str = r#"
{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [
				{ "dst": "0.0.0.0/0" }
			],
			"ranges": [
				[ { "subnet": "10.244.1.0/24" } ]
			]
		}
		,
		"mtu": 1500
	},
	{
		"type": "portmap",
		"capabilities": {
			"portMappings": true
		}
	}
	]
}
"#;

    const SOCKET: &str = "/var/run/meshbox/cni.sock";

    /// A node's bin and conf directories, removed on drop.
    struct Node {
        _root: tempfile::TempDir,
        layout: Layout,
        binary: PathBuf,
    }

    impl Node {
        fn new(tag: &str) -> Self {
            let dir = tempfile::Builder::new()
                .prefix(&format!("meshbox-cni-install-{tag}-"))
                .tempdir()
                .unwrap();
            let root = dir.path();
            let layout = Layout {
                bin_dir: root.join("opt/cni/bin"),
                conf_dir: root.join("etc/cni/net.d"),
            };
            fs::create_dir_all(&layout.bin_dir).unwrap();
            fs::create_dir_all(&layout.conf_dir).unwrap();
            let binary = root.join("meshbox-cni-build");
            fs::write(&binary, b"\x7fELF plugin v1").unwrap();
            Self {
                _root: dir,
                layout,
                binary,
            }
        }

        fn conf(&self, name: &str) -> PathBuf {
            self.layout.conf_dir.join(name)
        }

        fn write(&self, name: &str, content: &str) {
            fs::write(self.conf(name), content).unwrap();
        }

        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.conf(name)).unwrap()
        }

        fn json(&self, name: &str) -> Value {
            serde_json::from_str(&self.read(name)).unwrap()
        }

        fn install(&self) -> Result<Changes, InstallError> {
            install(&self.layout, &self.binary, Path::new(SOCKET))
        }

        fn uninstall(&self) -> Result<Changes, InstallError> {
            uninstall(&self.layout)
        }

        /// Every file in the conf dir, by name.
        fn listing(&self) -> Vec<String> {
            read_dir(&self.layout.conf_dir)
                .unwrap()
                .into_iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect()
        }
    }

    fn types(list: &Value) -> Vec<&str> {
        list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn chains_last_into_kindnets_conflist_and_uninstall_restores_it_exactly() {
        let node = Node::new("kindnet");
        node.write("10-kindnet.conflist", KINDNET);

        let changes = node.install().unwrap();
        assert!(!changes.is_empty());
        let list = node.json("10-kindnet.conflist");
        assert_eq!(types(&list), ["ptp", "portmap", "meshbox-cni"]);
        assert_eq!(list["plugins"][2]["socket"], SOCKET);
        // Everything of kindnet's is still there, unchanged.
        let before: Value = serde_json::from_str(KINDNET).unwrap();
        assert_eq!(list["plugins"][0], before["plugins"][0]);
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["name"], "kindnet");
        let binary = node.layout.bin_dir.join("meshbox-cni");
        assert_eq!(fs::read(&binary).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(
            fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
            0o755
        );

        node.uninstall().unwrap();
        assert_eq!(node.read("10-kindnet.conflist"), KINDNET, "byte for byte");
        assert_eq!(node.listing(), ["10-kindnet.conflist"], "no leftovers");
        assert!(!binary.exists());
    }

    #[test]
    fn install_is_idempotent_and_does_not_rewrite_an_installed_node() {
        let node = Node::new("idempotent");
        node.write("10-kindnet.conflist", KINDNET);
        node.install().unwrap();
        let installed = node.read("10-kindnet.conflist");
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        let conf_time = mtime(&node.conf("10-kindnet.conflist"));
        std::thread::sleep(Duration::from_millis(20));

        for _ in 0..3 {
            let changes = node.install().unwrap();
            assert!(changes.is_empty(), "{changes:?}");
        }
        assert_eq!(node.read("10-kindnet.conflist"), installed);
        assert_eq!(mtime(&node.conf("10-kindnet.conflist")), conf_time);
        assert_eq!(
            types(&node.json("10-kindnet.conflist")),
            ["ptp", "portmap", "meshbox-cni"]
        );

        // A new build of the plugin replaces the old binary; the config
        // stays as it is.
        fs::write(&node.binary, b"\x7fELF plugin v2").unwrap();
        let changes = node.install().unwrap();
        assert_eq!(changes.files, [node.layout.bin_dir.join("meshbox-cni")]);
        assert_eq!(
            fs::read(node.layout.bin_dir.join("meshbox-cni")).unwrap(),
            b"\x7fELF plugin v2"
        );
    }

    #[test]
    fn moves_its_entry_last_and_follows_a_new_socket() {
        let node = Node::new("reorder");
        node.write(
            "10-net.conflist",
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[
                {"type":"bridge"},
                {"type":"meshbox-cni","socket":"/old.sock"},
                {"type":"portmap"}]}"#,
        );
        node.install().unwrap();
        let list = node.json("10-net.conflist");
        assert_eq!(types(&list), ["bridge", "portmap", "meshbox-cni"]);
        assert_eq!(list["plugins"][2]["socket"], SOCKET);
    }

    #[test]
    fn installs_into_the_file_the_runtime_uses() {
        let node = Node::new("first");
        node.write("20-other.conflist", KINDNET);
        node.write(
            "10-primary.conflist",
            &KINDNET.replace("kindnet", "primary"),
        );
        node.write("05-notes.txt", "not a CNI file");
        node.install().unwrap();
        assert_eq!(
            types(&node.json("10-primary.conflist")),
            ["ptp", "portmap", "meshbox-cni"]
        );
        assert_eq!(node.read("20-other.conflist"), KINDNET);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_and_comes_back() {
        let node = Node::new("conf");
        let conf = r#"{
  "cniVersion": "0.4.0",
  "name": "bridge-net",
  "type": "bridge",
  "bridge": "cni0",
  "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}
"#;
        node.write("10-bridge.conf", conf);
        node.install().unwrap();
        assert_eq!(
            node.listing(),
            ["10-bridge.conf.meshbox-orig", "10-bridge.conflist"]
        );
        let list = node.json("10-bridge.conflist");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "bridge-net");
        assert_eq!(types(&list), ["bridge", "meshbox-cni"]);
        assert_eq!(list["plugins"][0]["bridge"], "cni0");

        assert!(node.install().unwrap().is_empty(), "idempotent");

        node.uninstall().unwrap();
        assert_eq!(node.listing(), ["10-bridge.conf"]);
        assert_eq!(node.read("10-bridge.conf"), conf);
    }

    #[test]
    fn bad_json_is_a_clear_error_and_the_file_is_left_alone() {
        let node = Node::new("badjson");
        let broken = "{\"cniVersion\": \"0.3.1\", \"plugins\": [ {\"type\": \"ptp\" ";
        node.write("10-kindnet.conflist", broken);
        let err = node.install().unwrap_err();
        assert!(matches!(err, InstallError::BadJson { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("10-kindnet.conflist"), "{message}");
        assert!(message.contains("not valid JSON"), "{message}");
        assert!(message.contains("left untouched"), "{message}");
        assert_eq!(node.read("10-kindnet.conflist"), broken);
        assert_eq!(node.listing(), ["10-kindnet.conflist"]);

        // Uninstall does not touch it either, and says so.
        let err = node.uninstall().unwrap_err();
        assert!(matches!(err, InstallError::BadJson { .. }), "{err:?}");
        assert_eq!(node.read("10-kindnet.conflist"), broken);
    }

    #[test]
    fn refuses_configs_it_cannot_chain_into() {
        let node = Node::new("refuse");
        let cases = [
            (
                "10-a.conflist",
                r#"{"cniVersion":"0.2.0","name":"a","plugins":[{"type":"bridge"}]}"#,
                "cniVersion \"0.2.0\"",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","plugins":[{"type":"bridge"}]}"#,
                "cniVersion \"\"",
            ),
            (
                "10-a.conflist",
                r#"{"cniVersion":"1.0.0","name":"a"}"#,
                "needs a \"plugins\" array",
            ),
            (
                "10-a.conflist",
                r#"["not", "an", "object"]"#,
                "must be a JSON object",
            ),
            (
                "10-a.conf",
                r#"{"cniVersion":"1.0.0","name":"a"}"#,
                "needs a \"type\"",
            ),
        ];
        for (name, content, expected) in cases {
            for f in node.listing() {
                fs::remove_file(node.conf(&f)).unwrap();
            }
            node.write(name, content);
            let err = node.install().unwrap_err().to_string();
            assert!(err.contains(expected), "{content}: {err}");
            assert_eq!(node.read(name), content, "{content} untouched");
            assert_eq!(node.listing(), [name]);
        }
    }

    #[test]
    fn no_config_yet_is_its_own_error() {
        let node = Node::new("empty");
        assert!(matches!(
            node.install().unwrap_err(),
            InstallError::NoConfig { .. }
        ));
        assert!(matches!(
            install(&node.layout, &node.binary, Path::new("relative.sock")).unwrap_err(),
            InstallError::RelativeSocket(_)
        ));
    }

    #[test]
    fn after_the_primary_cni_rewrites_its_file_install_repairs_and_uninstall_keeps_its_change() {
        let node = Node::new("rewrite");
        node.write("10-kindnet.conflist", KINDNET);
        node.install().unwrap();
        // kindnet restarts with another pod CIDR and rewrites its file,
        // dropping our entry.
        let rewritten = KINDNET.replace("10.244.1.0/24", "10.244.7.0/24");
        node.write("10-kindnet.conflist", &rewritten);
        let changes = node.install().unwrap();
        assert!(!changes.is_empty());
        assert_eq!(
            types(&node.json("10-kindnet.conflist")),
            ["ptp", "portmap", "meshbox-cni"]
        );
        node.uninstall().unwrap();
        assert_eq!(node.read("10-kindnet.conflist"), rewritten);

        // Changed again while installed, entry kept: uninstall removes
        // only the entry and keeps the change.
        node.install().unwrap();
        let mut list = node.json("10-kindnet.conflist");
        list["plugins"][0]["mtu"] = 9000.into();
        node.write("10-kindnet.conflist", &list.to_string());
        node.uninstall().unwrap();
        let after = node.json("10-kindnet.conflist");
        assert_eq!(types(&after), ["ptp", "portmap"]);
        assert_eq!(after["plugins"][0]["mtu"], 9000);
        assert_eq!(node.listing(), ["10-kindnet.conflist"]);
    }

    #[test]
    fn uninstall_on_a_clean_node_changes_nothing() {
        let node = Node::new("clean");
        node.write("10-kindnet.conflist", KINDNET);
        assert!(node.uninstall().unwrap().is_empty());
        assert_eq!(node.read("10-kindnet.conflist"), KINDNET);
    }

    #[test]
    fn management_commands_are_told_apart_from_runtime_calls() {
        // A runtime passes no arguments (CNI_COMMAND says what to do).
        assert!(!is_management_arg(None));
        assert!(!is_management_arg(Some(OsStr::new("ADD"))));
        assert!(is_management_arg(Some(OsStr::new("install"))));
        assert!(is_management_arg(Some(OsStr::new("uninstall"))));
        assert!(is_management_arg(Some(OsStr::new("--help"))));
    }
}
