//! The policy language (docs/policy.md): parse, validate,
//! compile, explain.
//!
//! - [`load_file`] / [`parse_str`]: the file to a checked [`Policy`], with
//!   every error and warning positioned (`FILE:LINE:COL: error: MSG`).
//! - [`compile`]: a policy at a moment, plus runtime entries, to the exact
//!   contents of the datapath maps ([`CompiledPolicy`]).
//! - [`Explainer`]: the verdict for a packet, from the compiled tables
//!   through [`ipguard_common::decide`], as the XDP program finds it.
mod addr;
mod address_runs;
mod classes;
mod compile;
mod compiled;
mod diag;
mod diff;
mod dns;
mod entries;
mod explain;
mod feed;
mod image;
mod intervals;
mod lists;
mod model;
pub mod range4;
pub mod range6;
mod time;
mod validate;
mod written;
mod yaml;

use std::{path::Path, sync::Arc, time::SystemTime};

use sha2::{Digest, Sha256};

pub use addr::{is_valid_name, range_v4, range_v6};
pub use compile::{LIST_ALWAYS_ALLOW, LIST_DENY, RuntimeEntry, RuntimeKind, compile, compile_with};
pub use compiled::*;
pub use diag::{Diagnostic, PolicyErrors, Pos, Severity};
pub use diff::{ListDiff, PolicyDiff, VerdictChange, diff, verdict_changes};
pub use dns::{DnsFamily, DnsName, Resolved};
pub use entries::{Entries, EntryInfo};
pub use explain::{ExplainRef, Explainer, Explanation, parse_port_query};
pub use feed::{
    DEFAULT_FEED_MAX_BYTES, DEFAULT_FEED_MAX_ENTRIES, DEFAULT_FEED_MAX_SHRINK_PERCENT,
    DEFAULT_FEED_REFRESH, DEFAULT_FEED_TIMEOUT, Feed, FeedFormat, ParsedFeed,
};
pub use image::{SlotImage, TrieKey};
pub use lists::{DiskLists, GivenLists, ListFile, ListSource};
pub use model::{
    Action, DnsSettings, Entry, Events, Infrastructure, Mode, Policy, PortSpec, Scope, Service,
};
pub use time::Window;
pub use written::Written;

/// A valid policy file.
#[derive(Clone, Debug)]
pub struct LoadedPolicy {
    /// Shared with what it compiles to (which reads its entries' texts
    /// from it).
    pub policy: Arc<Policy>,
    pub warnings: Vec<Diagnostic>,
    /// Of the file's bytes, lowercase hex; for a policy that names list
    /// files, of that hash and theirs ([`policy_sha256`]), so that a changed
    /// list file is a changed policy.
    pub sha256: String,
    /// The list files it read, in the order it names them.
    pub lists: Vec<ListFile>,
}

/// Reads and checks a policy file. Diagnostics name the file as given.
/// Policy files larger than this are refused unless
/// [`MAX_POLICY_BYTES_ENV`] raises it: a policy of a million prefixes is
/// about 25 MB.
pub const DEFAULT_MAX_POLICY_BYTES: u64 = 256 << 20;
pub const MAX_POLICY_BYTES_ENV: &str = "IPGUARD_MAX_POLICY_BYTES";

fn max_policy_bytes() -> Result<u64, String> {
    match std::env::var(MAX_POLICY_BYTES_ENV) {
        Err(_) => Ok(DEFAULT_MAX_POLICY_BYTES),
        Ok(v) => v.trim().parse().map_err(|_| {
            format!("{MAX_POLICY_BYTES_ENV}={v:?} is not a number of bytes: set it to e.g. 536870912, or unset it")
        }),
    }
}

/// Reads a policy file: a regular file (a FIFO or a device would block a
/// reload or never end) of at most the size limit. Opened without
/// blocking and checked on the open file, so swapping the path for a FIFO
/// after a check cannot hang the daemon. Symbolic links are followed (a
/// Kubernetes ConfigMap is one).
pub fn read_policy_bytes(path: &Path) -> Result<Vec<u8>, String> {
    read_regular_file(path, "the policy")
}

/// As [`read_policy_bytes`], for a list file.
pub fn read_list_bytes(path: &Path) -> Result<Vec<u8>, String> {
    read_regular_file(path, "the list file")
}

/// As [`read_policy_bytes`], for `what` (the policy or a list file).
pub(crate) fn read_regular_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let limit = max_policy_bytes()?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {what}: {e}"))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot read {what}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{what} is not a regular file (a FIFO, a device or a directory): give the path of a file"
        ));
    }
    let too_big = || {
        format!(
            "{what} is larger than the limit of {limit} bytes: make it smaller, or raise {MAX_POLICY_BYTES_ENV}"
        )
    };
    if meta.len() > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {what}: {e}"))?;
    // It may have grown since the check.
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(bytes)
}

/// When the warnings about entries covered by other entries of their list
/// are found. They are the one check whose cost grows with the sort of a
/// whole list (0.4 s at a million entries) and they never change what is
/// enforced, so the daemon finds them after the policy is in force
/// ([`covered_warnings`]), on another core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// While the policy is read (`check`, `explain`, tests).
    Check,
    /// Later, by [`covered_warnings`].
    Defer,
}

/// The warnings [`Coverage::Defer`] left out, for the policy read from
/// `name`.
pub fn covered_warnings(name: &str, policy: &Policy) -> Vec<Diagnostic> {
    let mut sink = diag::Sink::new(name);
    validate::warn_covered(&mut sink, policy);
    sink.into_parts().1
}

pub fn load_file(path: &Path) -> Result<LoadedPolicy, PolicyErrors> {
    load_file_with(path, Coverage::Check)
}

/// [`load_file`], with the covered-entry warnings found now or later.
pub fn load_file_with(path: &Path, coverage: Coverage) -> Result<LoadedPolicy, PolicyErrors> {
    let name = path.display().to_string();
    let fail = |pos: Option<Pos>, message: String| PolicyErrors {
        errors: vec![Diagnostic {
            severity: Severity::Error,
            file: name.clone(),
            pos,
            message,
        }],
        warnings: Vec::new(),
    };
    let bytes = read_policy_bytes(path).map_err(|e| fail(None, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        // The valid prefix is UTF-8: count lines and characters in it.
        let good = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
        let line = good.matches('\n').count() + 1;
        let column = good.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        let pos = Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
        };
        fail(
            Some(pos),
            "the policy is not UTF-8: invalid byte here".to_string(),
        )
    })?;
    parse_checked(
        &name,
        text,
        SystemTime::now(),
        &DiskLists::beside(path),
        coverage,
    )
}

/// Checks a policy given as text; `name` stands for the file in
/// diagnostics. It may name no list files (see [`parse_with`]).
pub fn parse_str(name: &str, text: &str) -> Result<LoadedPolicy, PolicyErrors> {
    parse_str_at(name, text, SystemTime::now())
}

/// [`parse_str`] with "now" given, for the warnings that depend on it (an
/// `until` that has passed).
pub fn parse_str_at(name: &str, text: &str, now: SystemTime) -> Result<LoadedPolicy, PolicyErrors> {
    parse_with(name, text, now, &GivenLists::default())
}

/// Checks a policy given as text, its list files read from `lists`.
pub fn parse_with(
    name: &str,
    text: &str,
    now: SystemTime,
    lists: &dyn ListSource,
) -> Result<LoadedPolicy, PolicyErrors> {
    parse_checked(name, text, now, lists, Coverage::Check)
}

/// [`parse_with`], with the covered-entry warnings found now or later.
pub fn parse_checked(
    name: &str,
    text: &str,
    now: SystemTime,
    lists: &dyn ListSource,
    coverage: Coverage,
) -> Result<LoadedPolicy, PolicyErrors> {
    let file_sha256 = sha256_hex(text.as_bytes());
    let mut read = Vec::new();
    let mut sink = diag::Sink::new(name);
    let text_nobom = text.strip_prefix('\u{feff}').unwrap_or(text);
    let policy = if text_nobom.trim().is_empty() {
        sink.error(None, "the policy is empty: it needs at least `version: 1`");
        None
    } else {
        match yaml::parse(text_nobom) {
            Ok(raw) => validate::validate(
                raw,
                compile::timestamp(now),
                &mut sink,
                &mut validate::Lists {
                    source: lists,
                    read: &mut read,
                },
                coverage,
            ),
            Err(e) => {
                sink.error(e.pos, e.message);
                None
            }
        }
    };
    let (errors, warnings) = sink.into_parts();
    match policy {
        Some(policy) if errors.is_empty() => Ok(LoadedPolicy {
            policy: Arc::new(policy),
            warnings,
            sha256: policy_sha256(&file_sha256, &read),
            lists: read,
        }),
        _ => Err(PolicyErrors { errors, warnings }),
    }
}

/// [`LoadedPolicy::sha256`] of a policy file whose bytes hash to
/// `file_sha256` and which read `lists`.
pub fn policy_sha256(file_sha256: &str, lists: &[ListFile]) -> String {
    if lists.is_empty() {
        return file_sha256.to_string();
    }
    let mut all = format!("{file_sha256}\n");
    for l in lists {
        all.push_str(&format!("{}\0{}\n", l.written, l.sha256));
    }
    sha256_hex(all.as_bytes())
}

/// [`LoadedPolicy::sha256`] that the policy file at `path` would have now if
/// it still read the list files `lists` (what it read when last loaded):
/// a cheap test of whether anything changed, without parsing. None when a
/// file cannot be read.
pub fn current_sha256(path: &Path, lists: &[ListFile]) -> Option<String> {
    let bytes = read_policy_bytes(path).ok()?;
    let disk = DiskLists::beside(path);
    let mut now = Vec::with_capacity(lists.len());
    for l in lists {
        let b = read_regular_file(&disk.path_of(&l.written), "the list file").ok()?;
        now.push(ListFile {
            sha256: sha256_hex(&b),
            ..l.clone()
        });
    }
    Some(policy_sha256(&sha256_hex(&bytes), &now))
}

/// The hash of a file's bytes (lowercase hex SHA-256).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
