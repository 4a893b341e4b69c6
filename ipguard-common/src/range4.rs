//! The IPv4 source lookup as the kernel holds it, and the one search both
//! sides run over it (DXR, Zec 2012, with a 16-bit direct table).
//!
//! Per slot: a direct table of 2^16 words indexed by the address's top 16
//! bits, packed 16 to a 64-byte value ([`R4Direct`], one cache line); a
//! word is a leaf, or [`R4_CHUNK_FLAG`] and the index of the first of the
//! /16's ranges. A chunk's ranges ([`R4Range`]) are sorted by the low 16
//! bits of their first address, the first starts at 0 and carries the
//! chunk's length. A leaf indexes the slot's distinct prefix values
//! ([`crate::PrefixValue`]); [`R4_LEAF_NONE`] is "no prefix holds it".
//!
//! A lookup reads one direct value, at most [`R4_SEARCH_STEPS`] + 1
//! ranges and one leaf: a bounded number of reads whatever the policy,
//! and for the ranges, neighbours in one chunk. Both slots live in the
//! same three arrays; a slot's ranges and leaves start at the bases its
//! config holds ([`crate::PolicyConfig::r4_range_base`]).

pub const MAP_R4_DIRECT: &str = "IPG_R4_DIRECT";
pub const MAP_R4_RANGES: &str = "IPG_R4_RANGES";
pub const MAP_R4_LEAVES: &str = "IPG_R4_LEAVES";

/// Address bits the direct table is indexed by.
pub const R4_DIRECT_BITS: u32 = 16;
/// Direct words per array value: 64 bytes, one cache line (an array map
/// rounds a value up to 8 bytes, so single words would take twice the
/// memory).
pub const R4_WORDS_PER_VALUE: u32 = 16;
/// Direct values per slot.
pub const R4_DIRECT_VALUES: u32 = (1 << R4_DIRECT_BITS) / R4_WORDS_PER_VALUE;
/// In a direct word: the rest is the index of a chunk's first range (from
/// the slot's range base), not a leaf.
pub const R4_CHUNK_FLAG: u32 = 1 << 31;
/// The leaf of addresses no prefix covers.
pub const R4_LEAF_NONE: u32 = R4_CHUNK_FLAG - 1;
/// Halvings of the binary search: a chunk holds at most 2^16 ranges.
pub const R4_SEARCH_STEPS: u32 = 16;

/// 16 direct words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R4Direct {
    pub words: [u32; R4_WORDS_PER_VALUE as usize],
}

/// A range of a chunk: from `start` (the low 16 bits of its first address)
/// to the next range's start, or the end of the /16.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R4Range {
    pub start: u16,
    /// In a chunk's first range: the chunk's length minus one. 0 in the
    /// others.
    pub span: u16,
    pub leaf: u32,
}

const _: () = assert!(core::mem::size_of::<R4Direct>() == 64);
const _: () = assert!(core::mem::size_of::<R4Range>() == 8);
// The capacities and their inverse agree.
const _: () = assert!(
    r4_prefix_capacity(r4_ranges_capacity(131_072), r4_leaves_capacity(131_072)) == 131_072
);
const _: () =
    assert!(r4_prefix_capacity(r4_ranges_capacity(4096), r4_leaves_capacity(4096)) == 4096);

/// Key in [`MAP_R4_DIRECT`] of the value holding `addr`'s direct word.
#[inline(always)]
pub const fn r4_direct_key(slot: u32, addr: u32) -> u32 {
    slot * R4_DIRECT_VALUES + (addr >> (32 - R4_DIRECT_BITS)) / R4_WORDS_PER_VALUE
}

/// Index of `addr`'s word in its direct value.
#[inline(always)]
pub const fn r4_direct_word(addr: u32) -> usize {
    ((addr >> (32 - R4_DIRECT_BITS)) % R4_WORDS_PER_VALUE) as usize
}

/// Ranges a slot needs at most for `prefixes` prefixes: each prefix cuts
/// the address space at most twice, and each /16 that holds a cut starts
/// its chunk with one more range.
pub const fn r4_ranges_capacity(prefixes: u32) -> u32 {
    prefixes
        .saturating_mul(2)
        .saturating_add(1)
        .saturating_add(1 << R4_DIRECT_BITS)
}

/// The prefixes a slot of `ranges` ranges and `leaves` leaves holds
/// whatever they are: the inverse of the two capacities above.
pub const fn r4_prefix_capacity(ranges: u32, leaves: u32) -> u32 {
    let by_ranges = ranges.saturating_sub(1 + (1 << R4_DIRECT_BITS)) / 2;
    if by_ranges < leaves {
        by_ranges
    } else {
        leaves
    }
}

/// Leaves a slot needs at most for `prefixes` prefixes: one per distinct
/// value.
pub const fn r4_leaves_capacity(prefixes: u32) -> u32 {
    if prefixes == 0 { 1 } else { prefixes }
}

/// Bytes a slot's table takes in the kernel with `ranges` ranges and
/// `leaves` leaves (the direct table is the same for every policy).
pub const fn r4_table_bytes(ranges: u32, leaves: u32) -> u64 {
    (R4_DIRECT_VALUES as u64) * 64 + ranges as u64 * 8 + leaves as u64 * 16
}

/// The leaf of `addr` given its direct word and a reader of the slot's
/// ranges (`range(i)`: the range at index `i` from the slot's base, None
/// past the array). The kernel and user space run this same search.
#[inline(always)]
pub fn r4_search(word: u32, addr: u32, range: impl Fn(u32) -> Option<R4Range>) -> Option<u32> {
    if word & R4_CHUNK_FLAG == 0 {
        return Some(word);
    }
    let first = word & !R4_CHUNK_FLAG;
    let head = range(first)?;
    let low = addr as u16;
    // The last range starting at or before `low`: `at` is one that does
    // (the head starts at 0), `n` the ranges from `at` on that may.
    let mut at = first;
    let mut n = u32::from(head.span) + 1;
    let mut leaf = head.leaf;
    let mut step = 0;
    while step < R4_SEARCH_STEPS {
        if n <= 1 {
            break;
        }
        let half = n / 2;
        let r = range(at + half)?;
        if r.start <= low {
            at += half;
            leaf = r.leaf;
            n -= half;
        } else {
            n = half;
        }
        step += 1;
    }
    Some(leaf)
}
