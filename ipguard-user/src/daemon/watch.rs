//! Reload when the policy file changes.
//!
//! The watch is on the file's directory, not the file: editors and config
//! management replace the file by rename, and a Kubernetes ConfigMap volume
//! swaps a `..data` symlink in that directory; a watch on the old inode
//! would see neither. Every event in the directory wakes the daemon, which
//! then reads the file and reloads only if its content changed.

use std::path::Path;

use anyhow::{Context, Result};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub fn watch(config: &Path, tx: mpsc::Sender<()>) -> Result<RecommendedWatcher> {
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reading the file (our own reload included) produces access
        // events; only changes may wake the daemon, or it would wake itself.
        tracing::debug!(?res, "policy directory event");
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            // Full channel: a reload is already queued, which is enough.
            let _ = tx.try_send(());
        }
    })
    .context("cannot create the file watcher")?;
    tracing::debug!(dir = %dir.display(), "watching the policy directory");
    w.watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(w)
}
