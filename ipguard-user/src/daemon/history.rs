//! The history of applied policies (`ipguard history`, `ipguard
//! rollback`): every policy the daemon made live from its file, from
//! `apply`, from a rollback or through a runtime change, with when, its
//! generation and hash, where it came from (the file, or the client's uid
//! and user name from SO_PEERCRED) and a copy of its text and list files,
//! kept in the state directory to a configurable count.
//!
//! Copies are stored once per policy hash (`texts/SHA256.json`): a runtime
//! change, which keeps the policy, costs a record and no copy. Recompiles
//! of the same policy at a time edge or for a new DNS answer or feed copy
//! are not recorded (they would push the operator's changes out).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::rfc3339;
use crate::policy;

const DIR: &str = "history";
const INDEX: &str = "index.json";
/// How many records `run --history` keeps by default.
pub const DEFAULT_KEEP: usize = 50;

/// What caused an install, for the record (None: not recorded).
pub fn origin_of(why: &str) -> Option<&str> {
    match why {
        "time edge" | "DNS answer changed" | "feed changed" | "undo of a failed save" => None,
        w => Some(w),
    }
}

/// One applied policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    /// RFC 3339.
    pub applied_at: String,
    pub sha256: String,
    /// What made it live: `start`, `policy file changed`, `SIGHUP`,
    /// `apply`, `rollback`, `runtime allow`, ...
    pub origin: String,
    /// The policy file, or the path the client read for `apply`.
    pub path: String,
    /// The client that asked (apply, rollback, runtime changes).
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// Whether a copy of its text is kept (a rollback needs one); filled
    /// when the records are listed.
    #[serde(default)]
    pub copy: bool,
}

/// A policy's text and the list files it read, as `apply` sends them.
#[derive(Clone, Debug, Default)]
pub struct Copy {
    pub path: String,
    pub text: String,
    pub lists: Vec<crate::protocol::ListText>,
}

pub struct History {
    dir: PathBuf,
    keep: usize,
    records: Vec<Record>,
}

fn texts(dir: &Path) -> PathBuf {
    dir.join("texts")
}

/// A copy is the policy's text as it was (`SHA256.yaml`), its list files
/// (`SHA256.list.N`) and, last, a record of the paths (`SHA256.json`):
/// raw bytes, written as read, so that a copy of a million entries costs
/// a write and no encoding.
fn copy_path(dir: &Path, sha256: &str) -> PathBuf {
    texts(dir).join(format!("{sha256}.json"))
}

/// What `SHA256.json` records.
#[derive(Serialize, Deserialize)]
struct CopyIndex {
    path: String,
    /// The list files' paths as the policy writes them, in order.
    lists: Vec<String>,
}

/// The history directory under `state_dir`.
pub fn dir_of(state_dir: &Path) -> PathBuf {
    state_dir.join(DIR)
}

/// Keeps `copy` of the policy whose hash is `sha256` (once per hash).
pub fn store_copy(state_dir: &Path, sha256: &str, copy: &Copy) -> Result<()> {
    let dir = dir_of(state_dir);
    let path = copy_path(&dir, sha256);
    if path.exists() {
        return Ok(());
    }
    let t = texts(&dir);
    std::fs::create_dir_all(&t).with_context(|| format!("cannot create {}", t.display()))?;
    write_unsynced(&t.join(format!("{sha256}.yaml")), copy.text.as_bytes())?;
    for (i, l) in copy.lists.iter().enumerate() {
        write_unsynced(&t.join(format!("{sha256}.list.{i}")), l.text.as_bytes())?;
    }
    let index = CopyIndex {
        path: copy.path.clone(),
        lists: copy.lists.iter().map(|l| l.path.clone()).collect(),
    };
    // Last: a copy whose record is there is whole (but for a crash before
    // the writes reached the disk: a rollback then says so).
    write_unsynced(&path, &serde_json::to_vec(&index)?)
}

/// Written to a new temporary file and renamed over, without fsync: a
/// copy of tens of MB synced would hold up the fsync of the daemon's own
/// small state files behind it (one journal), and a lost copy costs only
/// a rollback that says it has none.
fn write_unsynced(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// The copy of `sha256` kept in `dir`.
fn read_copy(dir: &Path, sha256: &str) -> std::result::Result<Copy, String> {
    let t = texts(dir);
    let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
    let index: CopyIndex = serde_json::from_slice(&read(copy_path(dir, sha256))?)
        .map_err(|e| format!("the copy of {sha256} is corrupt: {e}"))?;
    let text = |p: PathBuf| {
        read(p.clone())
            .and_then(|b| String::from_utf8(b).map_err(|_| format!("{} is not UTF-8", p.display())))
    };
    let mut lists = Vec::new();
    for (i, path) in index.lists.into_iter().enumerate() {
        lists.push(crate::protocol::ListText {
            path,
            text: text(t.join(format!("{sha256}.list.{i}")))?,
        });
    }
    Ok(Copy {
        path: index.path,
        text: text(t.join(format!("{sha256}.yaml")))?,
        lists,
    })
}

/// Keeps a copy of the policy file at `path` and its list files, if they
/// still hold what was loaded as `loaded` (a file changed since is not
/// copied: its record then says it has no copy), on a thread of its own:
/// at a million entries it reads and writes tens of MB that the policy
/// need not wait for.
pub fn store_file_copy_later(state_dir: &Path, path: &Path, loaded: &policy::LoadedPolicy) {
    let (state_dir, path) = (state_dir.to_path_buf(), path.to_path_buf());
    let (sha256, lists) = (loaded.sha256.clone(), loaded.lists.clone());
    super::in_background("history-copy", move || {
        store_file_copy(&state_dir, &path, &sha256, &lists);
    });
}

/// [`store_file_copy_later`], now.
pub fn store_file_copy(
    state_dir: &Path,
    path: &Path,
    sha256: &str,
    read_lists: &[policy::ListFile],
) -> bool {
    let read = || -> Option<Copy> {
        let text = String::from_utf8(policy::read_policy_bytes(path).ok()?).ok()?;
        let disk = policy::DiskLists::beside(path);
        let mut lists = Vec::new();
        let mut now = Vec::new();
        for l in read_lists {
            let bytes = policy::read_list_bytes(&disk.path_of(&l.written)).ok()?;
            now.push(policy::ListFile {
                sha256: policy::sha256_hex(&bytes),
                ..l.clone()
            });
            lists.push(crate::protocol::ListText {
                path: l.written.clone(),
                text: String::from_utf8(bytes).ok()?,
            });
        }
        let sha = policy::policy_sha256(&policy::sha256_hex(text.as_bytes()), &now);
        (sha == sha256).then(|| Copy {
            path: path.display().to_string(),
            text,
            lists,
        })
    };
    match read() {
        Some(c) => match store_copy(state_dir, sha256, &c) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{e:#}; the history keeps no copy of this policy");
                false
            }
        },
        None => false,
    }
}

/// The user name of `uid` (None when it has none).
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

impl History {
    /// The records kept in `state_dir` (none if it has none, or a corrupt
    /// index, which is said).
    pub fn load(state_dir: &Path, keep: usize) -> Self {
        let dir = dir_of(state_dir);
        let records = match std::fs::read(dir.join(INDEX)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is corrupt ({e}); the history starts anew",
                    dir.join(INDEX).display()
                );
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Self {
            dir,
            keep: keep.max(1),
            records,
        }
    }

    /// The records, each saying whether its copy is there now (a file's
    /// copy is written beside the install, and may come after its
    /// record).
    pub fn records(&self) -> Vec<Record> {
        self.records
            .iter()
            .map(|r| Record {
                copy: copy_path(&self.dir, &r.sha256).exists(),
                ..r.clone()
            })
            .collect()
    }

    /// Appends `r`, drops the oldest records past the count and the copies
    /// no record names.
    pub fn push(&mut self, r: Record) -> Result<()> {
        self.records.push(r);
        if self.records.len() > self.keep {
            let extra = self.records.len() - self.keep;
            self.records.drain(..extra);
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        crate::state::write_atomic(
            &self.dir.join(INDEX),
            &serde_json::to_vec_pretty(&self.records)?,
        )
        .context("cannot write the policy history")?;
        if let Ok(rd) = std::fs::read_dir(texts(&self.dir)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some((sha, _)) = name.split_once('.') else {
                    continue;
                };
                // A copy written in the last minute may be of an install
                // whose record is still to come.
                let recent = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < std::time::Duration::from_secs(60));
                if !recent && !self.records.iter().any(|r| r.sha256 == sha) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// A record of an install now.
    pub fn record(
        generation: u64,
        sha256: &str,
        origin: &str,
        path: &Path,
        uid: Option<u32>,
    ) -> Record {
        Record {
            generation,
            applied_at: rfc3339(SystemTime::now()),
            sha256: sha256.to_string(),
            origin: origin.to_string(),
            path: path.display().to_string(),
            uid,
            user: uid.and_then(user_name),
            copy: false,
        }
    }

    /// The copy to roll back to: of `generation`, or (None) of the newest
    /// record with a policy other than `current` (the one before it).
    pub fn target(
        &self,
        generation: Option<u64>,
        current: &str,
    ) -> std::result::Result<(Record, Copy), String> {
        let r = match generation {
            Some(g) => self
                .records
                .iter()
                .rev()
                .find(|r| r.generation == g)
                .ok_or_else(|| {
                    format!("generation {g} is not in the history: `ipguard history` lists the ones kept")
                })?,
            None => self
                .records
                .iter()
                .rev()
                .find(|r| r.sha256 != current)
                .ok_or("the history holds no earlier policy to roll back to")?,
        };
        let copy = read_copy(&self.dir, &r.sha256).map_err(|e| {
            format!(
                "generation {} has no whole copy of its policy ({e}); roll back by applying the file",
                r.generation
            )
        })?;
        Ok((r.clone(), copy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of the test's own under the target directory, removed
    /// when dropped.
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn copies_come_back_with_their_list_files_and_old_records_go() {
        let dir = Dir(Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp")
            .join(format!("history-unit-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        let copy = Copy {
            path: "/etc/ipguard/policy.yaml".into(),
            text: "version: 1\ngroups:\n  p: { file: lists/p.txt }\nallow: [p]\n".into(),
            lists: vec![crate::protocol::ListText {
                path: "lists/p.txt".into(),
                text: "198.51.100.7\n".into(),
            }],
        };
        store_copy(&dir.0, "aaaa", &copy).unwrap();
        let mut h = History::load(&dir.0, 3);
        for (g, sha) in [(1, "aaaa"), (2, "bbbb"), (3, "aaaa"), (4, "cccc")] {
            h.push(History::record(g, sha, "apply", Path::new("/x"), Some(0)))
                .unwrap();
        }
        // Three kept: generation 1 is gone, its policy is not (3 has it).
        let h = History::load(&dir.0, 3);
        let gens: Vec<u64> = h.records().iter().map(|r| r.generation).collect();
        assert_eq!(gens, [2, 3, 4]);
        assert!(h.records()[1].copy && !h.records()[0].copy);
        let (r, back) = h.target(Some(3), "cccc").unwrap();
        assert_eq!(r.generation, 3);
        assert_eq!(back.text, copy.text);
        assert_eq!(back.lists[0].path, "lists/p.txt");
        assert_eq!(back.lists[0].text, "198.51.100.7\n");
        // The one before the policy in force: generation 3's.
        assert_eq!(h.target(None, "cccc").unwrap().0.generation, 3);
        let e = h.target(Some(2), "cccc").unwrap_err();
        assert!(e.contains("no whole copy"), "{e}");
        assert!(
            h.target(Some(9), "cccc")
                .unwrap_err()
                .contains("not in the history")
        );
    }
}
