//! Standalone mode's source: a folder of Kubernetes YAML, re-read when it
//! changes.
//!
//! The folder is polled (every [`POLL_INTERVAL`]) rather than watched with
//! inotify: polling behaves the same on every filesystem, including the
//! symlink swaps of a mounted ConfigMap, and a folder of manifests is small.
//! Each file is parsed as a unit: a file that fails to parse is reported
//! (file, document index, reason) and its last good objects stay in force, so
//! a half-saved edit never takes the mesh down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::model::Object;
use crate::store::ManifestError;

/// How often the folder is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Largest manifest file read, so a stray file cannot exhaust memory.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
}

struct FileState {
    fingerprint: Fingerprint,
    /// The objects of the last version of this file that parsed.
    objects: Vec<Object>,
    error: Option<ManifestError>,
}

/// The folder's files and what was last read from each.
pub struct ManifestFolder {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    ignored_kinds: BTreeMap<String, usize>,
}

impl ManifestFolder {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            ignored_kinds: BTreeMap::new(),
        }
    }

    /// Re-reads files that are new or changed and forgets deleted ones.
    /// Returns true when the set of objects may have changed.
    pub fn rescan(&mut self) -> bool {
        let mut seen = Vec::new();
        let mut changed = false;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the manifest folder");
                return false;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_yaml = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml");
            // Editors' swap and backup files start with '.'; skip them.
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !is_yaml || hidden {
                continue;
            }
            // metadata() follows symlinks, as a ConfigMap mount needs.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let fingerprint = Fingerprint {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            seen.push(path.clone());
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.fingerprint == fingerprint)
            {
                continue;
            }
            changed = true;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed = if meta.len() > MAX_FILE_BYTES {
                Err(ManifestError {
                    file: name.clone(),
                    document: 0,
                    reason: format!("larger than {MAX_FILE_BYTES} bytes"),
                })
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(text) => parse_manifest(&text).map_err(|(document, reason)| ManifestError {
                        file: name.clone(),
                        document,
                        reason,
                    }),
                    Err(e) => Err(ManifestError {
                        file: name.clone(),
                        document: 0,
                        reason: e.to_string(),
                    }),
                }
            };
            let previous = self.files.remove(&path);
            let state = match parsed {
                Ok(parsed) => {
                    for kind in parsed.ignored {
                        *self.ignored_kinds.entry(kind).or_default() += 1;
                    }
                    if previous.as_ref().is_some_and(|p| p.error.is_some()) {
                        tracing::info!(file = %name, "manifest file is valid again");
                    }
                    FileState {
                        fingerprint,
                        objects: parsed.objects,
                        error: None,
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        file = %error.file,
                        document = error.document,
                        reason = %error.reason,
                        "manifest file rejected; keeping its last good version"
                    );
                    FileState {
                        fingerprint,
                        objects: previous.map(|p| p.objects).unwrap_or_default(),
                        error: Some(error),
                    }
                }
            };
            self.files.insert(path, state);
        }
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        changed || self.files.len() != before
    }

    /// Every object of every file's last good version, in file order.
    pub fn objects(&self) -> Vec<Object> {
        self.files
            .values()
            .flat_map(|f| f.objects.iter().cloned())
            .collect()
    }

    /// Files currently rejected.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What one file held.
#[derive(Debug, Default)]
pub struct ParsedManifest {
    pub objects: Vec<Object>,
    /// `apiVersion/kind` of documents the mesh does not read (Deployments...).
    pub ignored: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Parses multi-document YAML into the objects the model reads. Fails on the
/// first bad document, naming its index.
pub fn parse_manifest(text: &str) -> Result<ParsedManifest, (usize, String)> {
    let mut out = ParsedManifest::default();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(document).map_err(|e| (index, e.to_string()))?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        if let serde_json::Value::Object(map) = &value
            && map.get("kind").and_then(|k| k.as_str()) == Some("List")
        {
            let items = map.get("items").cloned().unwrap_or_default();
            let items: Vec<serde_json::Value> =
                serde_json::from_value(items).map_err(|e| (index, format!("List items: {e}")))?;
            for item in items {
                push_object(&mut out, item).map_err(|e| (index, e))?;
            }
            continue;
        }
        push_object(&mut out, value).map_err(|e| (index, e))?;
    }
    Ok(out)
}

fn push_object(out: &mut ParsedManifest, value: serde_json::Value) -> Result<(), String> {
    let meta: TypeMeta = serde_json::from_value(value.clone())
        .map_err(|e| format!("not a Kubernetes object: {e}"))?;
    if meta.api_version.is_empty() || meta.kind.is_empty() {
        return Err("missing apiVersion or kind".into());
    }
    fn typed<T: serde::de::DeserializeOwned>(
        kind: &str,
        value: serde_json::Value,
    ) -> Result<T, String> {
        serde_json::from_value(value).map_err(|e| format!("invalid {kind}: {e}"))
    }
    let group = meta.api_version.split('/').next().unwrap_or_default();
    let object = match (group, meta.kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(typed("Namespace", value)?),
        ("v1", "Pod") => Object::Pod(typed("Pod", value)?),
        ("v1", "Service") => Object::Service(typed("Service", value)?),
        ("discovery.k8s.io", "EndpointSlice") => {
            Object::EndpointSlice(typed("EndpointSlice", value)?)
        }
        ("gateway.networking.k8s.io", "Gateway") => Object::Gateway(typed("Gateway", value)?),
        ("gateway.networking.k8s.io", "HTTPRoute") => Object::HttpRoute(typed("HTTPRoute", value)?),
        ("security.istio.io", "AuthorizationPolicy") => {
            Object::AuthorizationPolicy(typed("AuthorizationPolicy", value)?)
        }
        // v1 and v1beta1 have the same shape.
        ("security.istio.io", "PeerAuthentication") => {
            Object::PeerAuthentication(typed("PeerAuthentication", value)?)
        }
        _ => {
            out.ignored
                .push(format!("{}/{}", meta.api_version, meta.kind));
            return Ok(());
        }
    };
    if object.key().is_none() {
        return Err(format!("{} without metadata.name", meta.kind));
    }
    out.objects.push(object);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multi_document_yaml_and_skips_unknown_kinds() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: cart, namespace: shop}
  spec: {ports: [{port: 80}]}
"#;
        let parsed = parse_manifest(text).unwrap();
        assert_eq!(parsed.objects.len(), 2);
        assert_eq!(parsed.ignored, ["apps/v1/Deployment"]);
    }

    #[test]
    fn reads_peer_authentication_in_both_versions_with_numeric_port_keys() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls:
  portLevelMtls:
    9090: {mode: PERMISSIVE}
"#;
        let parsed = parse_manifest(text).unwrap();
        let pas: Vec<&crate::k8s::PeerAuthentication> = parsed
            .objects
            .iter()
            .filter_map(|o| match o {
                Object::PeerAuthentication(pa) => Some(pa),
                _ => None,
            })
            .collect();
        assert_eq!(pas.len(), 2, "{:?}", parsed.ignored);
        assert_eq!(
            pas[0].spec.mtls.as_ref().and_then(|m| m.mode.as_deref()),
            Some("STRICT")
        );
        let ports: Vec<(&str, Option<&str>)> = pas[1]
            .spec
            .port_level_mtls
            .iter()
            .map(|(k, v)| (k.as_str(), v.mode.as_deref()))
            .collect();
        assert_eq!(ports, [("9090", Some("PERMISSIVE"))]);
    }

    #[test]
    fn names_the_bad_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 7}\n";
        let (index, reason) = parse_manifest(text).unwrap_err();
        assert_eq!(index, 1);
        assert!(reason.contains("invalid Pod"), "{reason}");
        let (index, _) = parse_manifest("a: [unclosed").unwrap_err();
        assert_eq!(index, 0);
        let (_, reason) = parse_manifest("apiVersion: v1\nkind: Pod\nmetadata: {}\n").unwrap_err();
        assert!(reason.contains("metadata.name"), "{reason}");
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let tmp = tempfile::Builder::new()
            .prefix("meshbox-manifests-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_owned();
        let file = dir.join("ns.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        let mut folder = ManifestFolder::new(&dir);
        assert!(folder.rescan());
        assert_eq!(folder.objects().len(), 1);
        assert!(!folder.rescan(), "nothing changed");

        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: [broken\n",
        )
        .unwrap();
        assert!(folder.rescan());
        assert_eq!(folder.objects().len(), 1, "last good version kept");
        assert_eq!(folder.errors().len(), 1);
        assert_eq!(folder.errors()[0].file, "ns.yaml");

        std::fs::remove_file(&file).unwrap();
        assert!(folder.rescan());
        assert!(folder.objects().is_empty());
        assert!(folder.errors().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
