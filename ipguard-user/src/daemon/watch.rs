//! Reload when the policy file, or a list file it names, changes.
//!
//! The watch is on the file's directory, not the file: editors and config
//! management replace the file by rename, and a Kubernetes ConfigMap volume
//! swaps a `..data` symlink in that directory; a watch on the old inode
//! would see neither. Every event in a watched directory wakes the daemon,
//! which then reads the files and reloads only if their content changed.
//! The directories of the list files follow the policy: after each load
//! the daemon names the list files it read ([`Watch::follow`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub struct Watch {
    watcher: RecommendedWatcher,
    /// The policy's directory, always watched.
    home: PathBuf,
    /// The list files' directories watched besides.
    others: Vec<PathBuf>,
}

fn dir_of(file: &Path) -> PathBuf {
    file.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

impl Watch {
    pub fn new(config: &Path, tx: mpsc::Sender<()>) -> Result<Self> {
        let home = dir_of(config);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reading the file (our own reload included) produces access
            // events; only changes may wake the daemon, or it would wake
            // itself.
            tracing::debug!(?res, "policy directory event");
            if let Ok(ev) = res
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                // Full channel: a reload is already queued, which is enough.
                let _ = tx.try_send(());
            }
        })
        .context("cannot create the file watcher")?;
        tracing::debug!(dir = %home.display(), "watching the policy directory");
        watcher
            .watch(&home, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", home.display()))?;
        Ok(Self {
            watcher,
            home,
            others: Vec::new(),
        })
    }

    /// Watches the directories of `files` (the list files the policy read)
    /// besides the policy's, and no longer those of list files it dropped.
    /// A directory that cannot be watched is logged: its files then take
    /// effect with a SIGHUP or a change of the policy file.
    pub fn follow(&mut self, files: &[PathBuf]) {
        let mut want: Vec<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
        want.sort();
        want.dedup();
        want.retain(|d| *d != self.home);
        for gone in self.others.iter().filter(|d| !want.contains(d)) {
            let _ = self.watcher.unwatch(gone);
        }
        let mut watched = Vec::new();
        for dir in want {
            if self.others.contains(&dir) {
                watched.push(dir);
                continue;
            }
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), "watching a list file's directory");
                    watched.push(dir);
                }
                Err(e) => tracing::warn!(
                    "cannot watch {} for changes of the list files in it ({e}): send SIGHUP after changing them",
                    dir.display()
                ),
            }
        }
        self.others = watched;
    }
}
