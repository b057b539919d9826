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
    folder = tokio::task::spawn_blocking(move || {
        folder.rescan();
        folder
    })
    .await?;
    publish(&folder, &store);
    ready.store(true, Ordering::Release);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let (back, changed) = match tokio::task::spawn_blocking(move || {
                let changed = folder.rescan();
                (folder, changed)
            })
            .await
            {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!(error = %e, "manifest scan failed");
                    return;
                }
            };
            folder = back;
            if !changed {
                continue;
            }
            // Wait until the folder settles, then apply once.
            loop {
                tokio::time::sleep(SETTLE).await;
                let (back, again) = match tokio::task::spawn_blocking(move || {
                    let again = folder.rescan();
                    (folder, again)
                })
                .await
                {
                    Ok(result) => result,
                    Err(_) => return,
                };
                folder = back;
                if !again {
                    break;
                }
            }
            publish(&folder, &store);
        }
    });
    Ok(())
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
