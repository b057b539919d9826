//! Where the mesh model's input comes from: a folder of YAML (standalone
//! mode, [`manifests`]) or a Kubernetes API server ([`kubernetes`]). Each
//! source only feeds objects into the [`MeshStore`](crate::store::MeshStore);
//! it derives nothing itself.

pub mod kubernetes;
pub mod manifests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::store::MeshStore;
use manifests::{ManifestFolder, POLL_INTERVAL};

/// How long the folder must stay unchanged before a change is applied, so an
/// editor's several writes become one update.
const SETTLE: Duration = Duration::from_millis(150);

/// Loads the folder once (so the first state is complete before anything is
/// served), then keeps it in sync in the background.
pub async fn run_manifests(
    mut folder: ManifestFolder,
    store: Arc<MeshStore>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    if rescan(&mut folder).await.is_none() {
        anyhow::bail!("reading the manifest folder failed");
    }
    publish(&folder, &store);
    ready.store(true, Ordering::Release);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let Some(changed) = rescan(&mut folder).await else {
                return;
            };
            if !changed {
                continue;
            }
            // Wait until the folder settles, then apply once.
            loop {
                tokio::time::sleep(SETTLE).await;
                match rescan(&mut folder).await {
                    Some(true) => continue,
                    Some(false) => break,
                    None => return,
                }
            }
            publish(&folder, &store);
        }
    });
    Ok(())
}

/// Rescans off the async threads (it reads files). `None` if the scan task
/// failed, which only a panic in it could cause; the folder is then gone.
async fn rescan(folder: &mut ManifestFolder) -> Option<bool> {
    let mut owned = std::mem::replace(folder, ManifestFolder::new(folder.dir().to_owned()));
    match tokio::task::spawn_blocking(move || {
        let changed = owned.rescan();
        (owned, changed)
    })
    .await
    {
        Ok((back, changed)) => {
            *folder = back;
            Some(changed)
        }
        Err(e) => {
            tracing::error!(error = %e, "manifest scan failed");
            None
        }
    }
}

fn publish(folder: &ManifestFolder, store: &MeshStore) {
    let changes = store.replace_all(folder.objects());
    store.set_source_errors(folder.errors());
    tracing::info!(
        dir = %folder.dir().display(),
        changed_addresses = changes.addresses.len(),
        changed_policies = changes.authorizations.len(),
        rejected_files = folder.errors().len(),
        "manifest folder loaded"
    );
}
