//! The entries a compiled policy names: `PrefixValue::entry` and the
//! kernel's hit counters index them. A policy entry is read from the
//! policy itself, which the compiled policy shares: a daemon holding a
//! million entries would otherwise keep each one's text, label and line
//! twice (48 MB).

use std::sync::Arc;

use crate::{ListKind, Policy, Written, model::Entry};

/// One entry, as `explain`, `status` and the events name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryInfo<'a> {
    pub list: ListKind,
    pub label: Option<&'a str>,
    /// The entry as written (e.g. `office`, `198.51.100.10-198.51.100.20`).
    pub text: &'a Written,
    /// 1-based line in the policy file; None for runtime entries.
    pub line: Option<usize>,
}

/// A runtime entry (`ipguard allow`, `deny`): not in the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RuntimeInfo {
    list: ListKind,
    text: Written,
    label: Option<Arc<str>>,
}

/// The entries in index order: the policy's lists as the compiler walks
/// them (allow, each service's own, deny, always_allow), then the runtime
/// entries.
#[derive(Clone, Default)]
pub struct Entries {
    policy: Option<Arc<Policy>>,
    /// (first index, list) of each non-empty list of the policy, in index
    /// order.
    lists: Vec<(u32, ListKind)>,
    /// The index of the first runtime entry: the policy's entries count.
    runtime_first: u32,
    runtime: Vec<RuntimeInfo>,
}

impl Entries {
    pub(crate) fn new(policy: &Arc<Policy>) -> Self {
        Self {
            policy: Some(Arc::clone(policy)),
            ..Self::default()
        }
    }

    /// The policy's list of `kind` (Deny and Allow: the policy's own).
    fn policy_list(&self, kind: ListKind) -> &[Entry] {
        let Some(p) = self.policy.as_deref() else {
            return &[];
        };
        match kind {
            ListKind::Allow => &p.allow,
            ListKind::Deny => &p.deny,
            ListKind::AlwaysAllow => &p.always_allow,
            ListKind::Service(i) => (i as usize)
                .checked_sub(1)
                .and_then(|i| p.services.get(i))
                .and_then(|s| s.allow.as_deref())
                .unwrap_or(&[]),
        }
    }

    /// Appends the policy's list `kind` (its entries take the next
    /// indexes); returns the index of its first entry. Runtime entries come
    /// after all of them.
    pub(crate) fn push_list(&mut self, kind: ListKind) -> u32 {
        let first = self.runtime_first;
        let n = self.policy_list(kind).len();
        if n > 0 {
            self.lists.push((first, kind));
            // Entry indexes are u32 (the kernel's); the compiler saturates
            // them the same way.
            self.runtime_first = first.saturating_add(n as u32);
        }
        first
    }

    /// Appends a runtime entry; returns its index.
    pub(crate) fn push_runtime(
        &mut self,
        list: ListKind,
        text: Written,
        label: Option<Arc<str>>,
    ) -> u32 {
        let i = self.len();
        self.runtime.push(RuntimeInfo { list, text, label });
        u32::try_from(i).unwrap_or(u32::MAX)
    }

    pub fn len(&self) -> usize {
        self.runtime_first as usize + self.runtime.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<EntryInfo<'_>> {
        let first = self.runtime_first as usize;
        if i >= first {
            return self.runtime.get(i - first).map(|r| EntryInfo {
                list: r.list,
                label: r.label.as_deref(),
                text: &r.text,
                line: None,
            });
        }
        let at = self.lists.partition_point(|&(f, _)| f as usize <= i);
        let &(f, kind) = self.lists.get(at.checked_sub(1)?)?;
        self.policy_list(kind)
            .get(i - f as usize)
            .map(|e| EntryInfo {
                list: kind,
                label: e.label(),
                text: &e.text,
                line: e.pos.map(|p| p.line as usize),
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = EntryInfo<'_>> {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Entries {}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}
