//! List files: a group written `{ file: PATH }` holds the address items of
//! a file, one per line (`#` starts a comment, blank lines are skipped).
//! Operators keep large or generated sets this way (a provider's ranges,
//! an export of another tool), beside a small policy file; the daemon
//! watches them as it watches the policy.
//!
//! The file is read through a [`ListSource`]: from disk for a policy file
//! (relative paths are relative to the policy's directory), or from the
//! contents a client sent along with `apply` (the daemon never opens a
//! file a client names: its errors would show the client lines of files
//! only root may read).

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::{
    Pos,
    addr::{self, Item},
    diag::Sink,
};

/// Diagnostics of one kind a list file gets before the rest are counted
/// in one line: a generated file with a systematic mistake has it on
/// every line.
const MAX_LIST_DIAGNOSTICS: usize = 10;

/// Where the list files of a policy come from.
pub trait ListSource {
    /// The file the policy writes as `written`: the name diagnostics give
    /// it, and its bytes.
    fn read(&self, written: &str) -> Result<(String, Vec<u8>), String>;
}

/// From disk, a relative path from `base`.
pub struct DiskLists {
    pub base: PathBuf,
}

impl DiskLists {
    /// For the policy file at `policy`: relative to its directory.
    pub fn beside(policy: &Path) -> Self {
        Self {
            base: policy
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        }
    }

    pub fn path_of(&self, written: &str) -> PathBuf {
        self.base.join(written)
    }
}

impl ListSource for DiskLists {
    fn read(&self, written: &str) -> Result<(String, Vec<u8>), String> {
        let path = self.path_of(written);
        let bytes = crate::read_regular_file(&path, "the list file")?;
        Ok((path.display().to_string(), bytes))
    }
}

/// Only the contents given, by the path the policy writes.
#[derive(Default)]
pub struct GivenLists(pub Vec<(String, Vec<u8>)>);

impl ListSource for GivenLists {
    fn read(&self, written: &str) -> Result<(String, Vec<u8>), String> {
        self.0
            .iter()
            .find(|(p, _)| p == written)
            .map(|(p, b)| (p.clone(), b.clone()))
            .ok_or_else(|| {
                format!(
                    "the list file {written:?} was not sent with the policy: apply it with an ipguard that sends list files, or name it in the daemon's own policy file"
                )
            })
    }
}

/// A list file a policy read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListFile {
    /// As the policy writes it.
    pub written: String,
    /// As diagnostics name it (the path read).
    pub name: String,
    /// Of its bytes, lowercase hex.
    pub sha256: String,
    /// Prefixes it holds.
    pub prefixes: usize,
}

/// The prefixes of list file `written` (named at `pos` of the policy), or
/// None after errors (reported, in the list file's name and lines).
pub(crate) fn read_list(
    sink: &mut Sink,
    source: &dyn ListSource,
    written: &str,
    pos: Option<Pos>,
    read: &mut Vec<ListFile>,
) -> Option<Vec<IpNet>> {
    let (name, bytes) = match source.read(written) {
        Ok(x) => x,
        Err(e) => {
            sink.error(pos, format!("list file {written:?}: {e}"));
            return None;
        }
    };
    let sha256 = crate::sha256_hex(&bytes);
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
            let line = good.matches('\n').count() + 1;
            let column = good.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            sink.error_in(
                &name,
                Some(position(line, column)),
                "the list file is not UTF-8: invalid byte here",
            );
            return None;
        }
    };
    let errors_before = sink.errors.len();
    let mut nets = Vec::with_capacity(text.len() / 16);
    let (mut bad, mut host_bits) = (0usize, 0usize);
    // Where the first diagnostic not shown is: the count of the rest
    // points there.
    let (mut bad_unshown, mut host_bits_unshown) = (None, None);
    for (i, line) in text.lines().enumerate() {
        let item = line.split('#').next().unwrap_or("");
        let trimmed = item.trim();
        if trimmed.is_empty() {
            continue;
        }
        let column = item.chars().take_while(|c| c.is_whitespace()).count() + 1;
        let at = || Some(position(i + 1, column));
        let before = nets.len();
        let refused = match addr::parse_item(trimmed, &mut nets) {
            Ok(Item::Nets { host_bits: None }) => None,
            Ok(Item::Nets { host_bits: Some(n) }) => {
                host_bits += 1;
                if host_bits <= MAX_LIST_DIAGNOSTICS {
                    sink.warning_in(&name, at(), crate::validate::host_bits_message(trimmed, &n));
                } else if host_bits_unshown.is_none() {
                    host_bits_unshown = at();
                }
                None
            }
            Ok(Item::Group(g)) => Some(format!(
                "{g:?} is not an address item: a list file holds addresses, CIDRs, ranges and wildcards, one per line, not group names"
            )),
            // A file of names would be a resolver's load on every change:
            // names go in the policy.
            Ok(Item::Name(n)) => Some(format!(
                "\"{n}\": a list file holds addresses, CIDRs, ranges and wildcards, not DNS names: write the name in the policy"
            )),
            Err(msg) => Some(msg),
        };
        if let Some(msg) = refused {
            nets.truncate(before);
            bad += 1;
            if bad > MAX_LIST_DIAGNOSTICS {
                bad_unshown = bad_unshown.or_else(at);
            } else {
                sink.error_in(&name, at(), msg);
            }
        }
    }
    if bad > MAX_LIST_DIAGNOSTICS {
        sink.error_in(
            &name,
            bad_unshown,
            format!(
                "this line and {} more are not address items either (only the first {MAX_LIST_DIAGNOSTICS} are shown)",
                bad - MAX_LIST_DIAGNOSTICS - 1
            ),
        );
    }
    if host_bits > MAX_LIST_DIAGNOSTICS {
        sink.warning_in(
            &name,
            host_bits_unshown,
            format!(
                "this line and {} more have host bits set too (only the first {MAX_LIST_DIAGNOSTICS} are shown)",
                host_bits - MAX_LIST_DIAGNOSTICS - 1
            ),
        );
    }
    if sink.errors.len() > errors_before {
        return None;
    }
    read.push(ListFile {
        written: written.to_string(),
        name,
        sha256,
        prefixes: nets.len(),
    });
    Some(nets)
}

fn position(line: usize, column: usize) -> Pos {
    Pos {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
    }
}
