//! What the daemon records about the applied policy, for `status` (also
//! when no daemon runs) and for the next daemon.
//!
//! Written atomically (write a temporary file, fsync, rename, fsync the
//! directory) so a crash never leaves a torn file.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::AttachMode,
    policy::{CompiledPolicy, ListKind},
};

pub const APPLIED_FILE: &str = "applied.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    pub iface: String,
    pub mode: AttachMode,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryRecord {
    pub list: String,
    pub text: String,
    pub label: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppliedState {
    pub path: String,
    pub sha256: String,
    pub applied_at: String,
    pub generation: u64,
    pub slot: u32,
    /// Service names; index i is service i + 1.
    pub services: Vec<String>,
    /// The first `ENTRY_CAPACITY` entries: the ones the kernel counts hits
    /// for, all that `status` names. Recording all of them wrote some 70 MB
    /// at every change of a million-entry policy (each runtime deny
    /// included) and had `status` and every metrics scrape parse it.
    pub entries: Vec<EntryRecord>,
    pub prefixes_v4: usize,
    pub prefixes_v6: usize,
    pub attached: Vec<Attached>,
}

impl AppliedState {
    pub fn describe(
        compiled: &CompiledPolicy,
        path: &Path,
        sha256: &str,
        generation: u64,
        slot: u32,
        attached: Vec<Attached>,
    ) -> Self {
        let mut services = vec![String::new(); compiled.services.len()];
        for s in &compiled.services {
            if let Some(slot) = services.get_mut(s.index as usize - 1) {
                *slot = s.name.clone();
            }
        }
        let entries = compiled
            .entries
            .iter()
            .take(ipguard_common::ENTRY_CAPACITY as usize)
            .map(|e| EntryRecord {
                list: list_name(e.list, compiled),
                text: e.text.to_string(),
                label: e.label.map(str::to_string),
            })
            .collect();
        Self {
            path: path.display().to_string(),
            sha256: sha256.to_string(),
            applied_at: jiff::Timestamp::now().to_string(),
            generation,
            slot,
            services,
            entries,
            prefixes_v4: compiled.v4.len(),
            prefixes_v6: compiled.v6.len(),
            attached,
        }
    }

    pub fn service_name(&self, index: usize) -> Option<&str> {
        index
            .checked_sub(1)
            .and_then(|i| self.services.get(i))
            .map(String::as_str)
    }
}

fn list_name(list: ListKind, compiled: &CompiledPolicy) -> String {
    match list {
        ListKind::Allow => "allow".into(),
        ListKind::Deny => "deny".into(),
        ListKind::AlwaysAllow => "always_allow".into(),
        ListKind::Service(i) => {
            let name = compiled
                .services
                .iter()
                .find(|s| s.index == i)
                .map(|s| s.name.as_str())
                .unwrap_or("?");
            format!("services.{name}.allow")
        }
    }
}

pub fn applied_path(state_dir: &Path) -> PathBuf {
    state_dir.join(APPLIED_FILE)
}

pub fn read_applied(state_dir: &Path) -> Option<AppliedState> {
    let text = fs::read_to_string(applied_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_applied(state_dir: &Path, state: &AppliedState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state)?;
    write_atomic(&applied_path(state_dir), &json)
}

/// A JSON list kept in the state directory (`holds`: what it holds, for the
/// error): a missing file is an empty list, a corrupt one an error naming
/// the file (the daemon must not silently forget what an operator
/// decided).
pub fn read_list<T: serde::de::DeserializeOwned>(path: &Path, holds: &str) -> Result<Vec<T>> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is corrupt: fix or remove it (it holds {holds})",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// write, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("state file has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    {
        // A new file, never one that is there already (a leftover of a
        // crash is removed first; a planted symbolic link is removed, not
        // followed).
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_keeps_the_entries_the_kernel_counts_hits_for() {
        let n = ipguard_common::ENTRY_CAPACITY as usize;
        let addr = |i: usize| std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
        let mut text = "version: 1\nallow:\n".to_string();
        for i in 0..n + 5 {
            text.push_str(&format!("  - {}\n", addr(i)));
        }
        let loaded = crate::policy::parse_str("p.yaml", &text).unwrap();
        let compiled = crate::policy::compile(&loaded.policy, std::time::SystemTime::now(), &[]);
        let st = AppliedState::describe(&compiled, Path::new("p.yaml"), "x", 1, 0, Vec::new());
        assert_eq!(st.entries.len(), n);
        assert_eq!(st.entries[n - 1].text, addr(n - 1).to_string());
    }
}
