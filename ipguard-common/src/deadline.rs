//! Time-limited entries expire in the kernel: a prefix value that an entry
//! with a deadline (`until`, a runtime grant's `--for`, the end of the open
//! `when` window) contributes to carries [`FLAG_TIMED`] and the index of a
//! deadline record; past the deadline the datapath judges by the record's
//! fallback: the value the compiler computed without the entries that
//! expired then. A fallback may be timed itself, up to
//! [`DEADLINE_STEPS`] links; the compiler makes the last link untimed.
//!
//! Records live in the leaf table of the slot ([`crate::MAP_R4_LEAVES`],
//! both families), between the values: a record takes one leaf (16 bytes,
//! the layout of [`Deadline`]), so no map of its own has to be sized. The
//! clock is CLOCK_BOOTTIME (`bpf_ktime_get_boot_ns`, from Linux 5.8; it
//! keeps counting through a suspend, as the wall clock does), moved to Unix
//! time by the offset the loader writes into the slot's config
//! ([`crate::PolicyConfig::unix_at_boot_ns`]). The untimed path reads no
//! clock.

use crate::{PrefixValue, R4_LEAF_NONE};

/// In [`PrefixValue::flags`]: the value has a deadline; its record is the
/// leaf `flags >> TIMED_SHIFT` of the slot.
pub const FLAG_TIMED: u32 = 4;
/// Where the record's leaf index starts in `flags`.
pub const TIMED_SHIFT: u32 = 8;
/// The largest leaf index a timed value can name.
pub const TIMED_MAX_RECORD: u32 = (1 << (32 - TIMED_SHIFT)) - 1;
/// Deadlines one lookup follows at most: a source under more time-limited
/// entries with different deadlines than this is judged past the last one
/// as the compiler's untimed value says (see `docs/policy.md`).
pub const DEADLINE_STEPS: u32 = 4;

/// A deadline record, as it lies in a leaf.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Deadline {
    /// Unix time in nanoseconds from which the fallback applies.
    pub at_unix_ns: u64,
    /// The leaf to judge by from then on; [`R4_LEAF_NONE`]: as if no
    /// prefix held the source.
    pub fallback: u32,
    pub _pad0: u32,
}

const _: () = assert!(core::mem::size_of::<Deadline>() == core::mem::size_of::<PrefixValue>());
const _: () = assert!(core::mem::align_of::<Deadline>() == core::mem::align_of::<PrefixValue>());

impl Deadline {
    /// The leaf that holds this record (field for field, same layout).
    #[inline(always)]
    pub const fn to_leaf(self) -> PrefixValue {
        PrefixValue {
            allow_mask: self.at_unix_ns,
            flags: self.fallback,
            entry: self._pad0,
        }
    }

    /// The record a leaf holds.
    #[inline(always)]
    pub const fn of_leaf(leaf: &PrefixValue) -> Self {
        Self {
            at_unix_ns: leaf.allow_mask,
            fallback: leaf.flags,
            _pad0: leaf.entry,
        }
    }
}

/// `flags` (the low bits: [`crate::FLAG_ALWAYS_ALLOW`], [`crate::FLAG_DENY`])
/// of a value whose deadline record is leaf `record`.
#[inline(always)]
pub const fn timed_flags(flags: u32, record: u32) -> u32 {
    (flags & ((1 << TIMED_SHIFT) - 1)) | FLAG_TIMED | (record << TIMED_SHIFT)
}

/// The value to judge by at the time `now()` returns (Unix ns, asked at
/// most once, and only for a timed value), given the slot's leaves
/// (`leaf(i)`, None past the table). None: no prefix holds the source any
/// more. The kernel and user space run this same walk.
#[inline(always)]
pub fn expire<'a>(
    value: &'a PrefixValue,
    mut now: impl FnMut() -> u64,
    leaf: impl Fn(u32) -> Option<&'a PrefixValue>,
) -> Option<&'a PrefixValue> {
    let mut v = value;
    if v.flags & FLAG_TIMED == 0 {
        return Some(v);
    }
    let t = now();
    let mut step = 0;
    while step < DEADLINE_STEPS {
        if v.flags & FLAG_TIMED == 0 {
            break;
        }
        // A record that is not there (a corrupt table) keeps the value.
        let Some(rec) = leaf(v.flags >> TIMED_SHIFT) else {
            break;
        };
        let d = Deadline::of_leaf(rec);
        if t < d.at_unix_ns {
            break;
        }
        if d.fallback == R4_LEAF_NONE {
            return None;
        }
        v = leaf(d.fallback)?;
        step += 1;
    }
    Some(v)
}
