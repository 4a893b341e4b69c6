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
//! After the words, in the same array and packed alike, each /16 has an
//! uncovered mask of two words: for a chunk, bit `b` set when no prefix
//! covers any address of its block `b` ([`r4_block`], a /22). A /16
//! whose covered addresses are one or two intervals of one leaf has no
//! ranges: its word is [`R4_CHUNK_FLAG`] | [`R4_PAIR_FLAG`] | the leaf,
//! and its mask words hold the intervals ([`r4_pair`]).
//!
//! The presence bits follow the masks: one per /16, set when some prefix
//! covers some of its addresses ([`r4_present`]); a lookup reads its
//! /16's bit first and stops there when it is clear ([`r4_find`]).
//!
//! A lookup reads the presence bit, one direct value, for a chunk its
//! mask, then at most [`R4_SEARCH_STEPS`] + 1 ranges and one leaf: a
//! bounded number of reads whatever the policy, and for the ranges,
//! neighbours in one chunk. A source in an uncovered block, what most
//! refused sources are, is answered by the mask: with many prefixes the
//! ranges are megabytes, and the first read into them (a cache and TLB
//! miss) is most of a lookup's cost, where the words (256 KiB) are read by
//! every lookup in a /16 with a prefix and the masks (512 KiB) by those in
//! chunks, and stay in cache. The masks are a
//! separate part, rather than a second half of wider words, so that a
//! policy without chunks (or a source outside them) reads only the words'
//! 256 KiB. Blocks are /22s: with /21s (one word per /16), about four in
//! ten refused sources of the bench's 1,000,000-prefix set still searched
//! their chunk (docs/bench.md).
//!
//! Both slots live in the same three arrays; a slot's ranges and leaves
//! start at the bases its config holds
//! ([`crate::PolicyConfig::r4_range_base`]).

pub const MAP_R4_DIRECT: &str = "IPG_R4_DIRECT";
pub const MAP_R4_RANGES: &str = "IPG_R4_RANGES";
pub const MAP_R4_LEAVES: &str = "IPG_R4_LEAVES";

/// Address bits the direct table is indexed by.
pub const R4_DIRECT_BITS: u32 = 16;
/// Direct words per array value: 64 bytes, one cache line (an array map
/// rounds a value up to 8 bytes, so single words would take twice the
/// memory).
pub const R4_WORDS_PER_VALUE: u32 = 16;
/// Direct values of a slot's words, and of each word of its masks.
pub const R4_DIRECT_VALUES: u32 = (1 << R4_DIRECT_BITS) / R4_WORDS_PER_VALUE;
/// Address bits of a block, the unit of an uncovered mask: a /16 is 64
/// blocks (/22s), one bit each.
pub const R4_BLOCK_BITS: u32 = 10;
/// Words of a /16's uncovered mask.
pub const R4_MASK_WORDS: u32 = (1 << (16 - R4_BLOCK_BITS)) / u32::BITS;
/// Direct values of a slot's presence bits: one bit per /16, set when
/// some prefix covers some of its addresses (8 KiB).
pub const R4_PRESENT_VALUES: u32 = (1 << R4_DIRECT_BITS) / u32::BITS / R4_WORDS_PER_VALUE;
/// Direct values per slot: the words, the uncovered masks, then the
/// presence bits.
pub const R4_DIRECT_SLOT_VALUES: u32 = (1 + R4_MASK_WORDS) * R4_DIRECT_VALUES + R4_PRESENT_VALUES;
/// In a direct word: the rest is the index of a chunk's first range (from
/// the slot's range base), not a leaf.
pub const R4_CHUNK_FLAG: u32 = 1 << 31;
/// In a chunk's direct word: the /16's covered addresses are one or two
/// intervals of one leaf, the rest of the /16 no prefix's; the word's
/// other bits are that leaf and its mask words hold the intervals instead
/// of a mask ([`r4_pair`]): no ranges are stored for it. A sparse
/// allowlist (a /24 here, a /32 there, most of a list file's prefixes
/// sharing one value) is mostly such /16s, and a source in one, allowed
/// or not, is answered from the direct table without the read into the
/// ranges that a lookup's cost is.
pub const R4_PAIR_FLAG: u32 = 1 << 30;
/// The most prefixes a slot may be sized for (`--ipv4-capacity`).
pub const R4_MAX_PREFIXES: u32 = 1 << 24;
// A chunk's first range index, and a pair's leaf, never reach the pair
// flag.
const _: () = assert!(r4_ranges_capacity(R4_MAX_PREFIXES) < R4_PAIR_FLAG);
const _: () = assert!(r4_leaves_capacity(R4_MAX_PREFIXES) < R4_PAIR_FLAG);
/// The leaf of addresses no prefix covers.
pub const R4_LEAF_NONE: u32 = R4_CHUNK_FLAG - 1;
/// Halvings of the binary search: a chunk holds at most 2^16 ranges.
pub const R4_SEARCH_STEPS: u32 = 16;
const _: () = assert!(R4_MASK_WORDS * u32::BITS == 1 << (16 - R4_BLOCK_BITS));

/// 16 direct words, or 16 words of uncovered masks.
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
    slot * R4_DIRECT_SLOT_VALUES + (addr >> (32 - R4_DIRECT_BITS)) / R4_WORDS_PER_VALUE
}

/// Key in [`MAP_R4_DIRECT`] of the value holding `addr`'s presence bit.
#[inline(always)]
pub const fn r4_present_key(slot: u32, addr: u32) -> u32 {
    slot * R4_DIRECT_SLOT_VALUES
        + (1 + R4_MASK_WORDS) * R4_DIRECT_VALUES
        + r4_present_word(addr) as u32 / R4_WORDS_PER_VALUE
}
// The presence words fill their values whole.
const _: () = assert!(R4_PRESENT_VALUES * R4_WORDS_PER_VALUE * u32::BITS == 1 << R4_DIRECT_BITS);

/// Index of the word holding `addr`'s presence bit among a slot's 2^16 /
/// 32 presence words (and, modulo [`R4_WORDS_PER_VALUE`], in the value at
/// [`r4_present_key`]).
#[inline(always)]
pub const fn r4_present_word(addr: u32) -> usize {
    ((addr >> (32 - R4_DIRECT_BITS)) / u32::BITS) as usize
}

/// `addr`'s presence word, from the direct value that holds it (the one at
/// [`r4_present_key`]).
#[inline(always)]
pub fn r4_present_of(value: &R4Direct, addr: u32) -> u32 {
    value.words[r4_present_word(addr) % R4_WORDS_PER_VALUE as usize]
}

/// `addr`'s presence bit in its presence word.
#[inline(always)]
pub const fn r4_present_bit(addr: u32) -> u32 {
    1 << ((addr >> (32 - R4_DIRECT_BITS)) % u32::BITS)
}

/// Whether `word`, the presence word of `addr`'s /16, has its bit set.
#[inline(always)]
pub const fn r4_present(word: u32, addr: u32) -> bool {
    word & r4_present_bit(addr) != 0
}

/// The mask word that holds `addr`'s block, among a slot's 2^16 x
/// [`R4_MASK_WORDS`].
#[inline(always)]
pub const fn r4_mask_word(addr: u32) -> u32 {
    (addr >> (32 - R4_DIRECT_BITS)) * R4_MASK_WORDS + r4_block(addr) / u32::BITS
}

/// Key in [`MAP_R4_DIRECT`] of the value holding the mask word of
/// `addr`'s block.
#[inline(always)]
pub const fn r4_empty_key(slot: u32, addr: u32) -> u32 {
    slot * R4_DIRECT_SLOT_VALUES + R4_DIRECT_VALUES + r4_mask_word(addr) / R4_WORDS_PER_VALUE
}

/// The mask words of `addr`'s /16, from the direct value that holds them
/// (the one at [`r4_empty_key`]: a /16's words never straddle two).
#[inline(always)]
pub fn r4_mask_of(value: &R4Direct, addr: u32) -> [u32; R4_MASK_WORDS as usize] {
    let first = ((addr >> (32 - R4_DIRECT_BITS)) * R4_MASK_WORDS % R4_WORDS_PER_VALUE) as usize;
    core::array::from_fn(|k| value.words[first + k])
}
const _: () = assert!(R4_WORDS_PER_VALUE.is_multiple_of(R4_MASK_WORDS));

/// The mask words of a pair /16 ([`R4_PAIR_FLAG`]): the first and last
/// low 16 bits of each of its covered intervals (one interval: twice).
#[inline(always)]
pub const fn r4_pair(first: (u16, u16), second: (u16, u16)) -> [u32; R4_MASK_WORDS as usize] {
    [
        first.0 as u32 | (first.1 as u32) << 16,
        second.0 as u32 | (second.1 as u32) << 16,
    ]
}

/// Index of `addr`'s word in its direct value.
#[inline(always)]
pub const fn r4_direct_word(addr: u32) -> usize {
    ((addr >> (32 - R4_DIRECT_BITS)) % R4_WORDS_PER_VALUE) as usize
}

/// The block of its /16 `addr` lies in (0..64): its bit in the /16's
/// uncovered mask.
#[inline(always)]
pub const fn r4_block(addr: u32) -> u32 {
    (addr & 0xffff) >> R4_BLOCK_BITS
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
    (R4_DIRECT_SLOT_VALUES as u64) * 64 + ranges as u64 * 8 + leaves as u64 * 16
}
// Any policy of 1,000,000 IPv4 prefixes fits 32 MiB per slot (the
// lookup's budget): 33,310,728 bytes at most.
const _: () = assert!(
    r4_table_bytes(r4_ranges_capacity(1_000_000), r4_leaves_capacity(1_000_000)) <= 32 << 20
);

/// The leaf of `addr`: its /16's presence bit (`present()`: the word at
/// [`r4_present_word`]), and only when it is set the /16's direct word
/// (`word()`) and [`r4_search`]. A source in a /16 no prefix touches,
/// what most refused sources of a short allowlist are, reads only the
/// presence bits: 8 KiB, which every lookup reads and which stay in cache,
/// where the direct words are 256 KiB that sources spread over the
/// address space read cold (docs/bench.md). The kernel and user space run
/// this same lookup.
#[inline(always)]
pub fn r4_find(
    addr: u32,
    present: impl FnOnce() -> Option<u32>,
    word: impl FnOnce() -> Option<u32>,
    mask: impl FnOnce() -> Option<[u32; R4_MASK_WORDS as usize]>,
    range: impl Fn(u32) -> Option<R4Range>,
) -> Option<u32> {
    if !r4_present(present()?, addr) {
        return Some(R4_LEAF_NONE);
    }
    r4_search(word()?, addr, mask, range)
}

/// The leaf of `addr` given its direct word, a reader of its /16's mask
/// words (read only for a chunk, [`r4_mask_of`]) and a reader of the
/// slot's ranges (`range(i)`: the range at index `i` from the slot's base,
/// None past the array). The kernel and user space run this same search.
#[inline(always)]
pub fn r4_search(
    word: u32,
    addr: u32,
    mask: impl FnOnce() -> Option<[u32; R4_MASK_WORDS as usize]>,
    range: impl Fn(u32) -> Option<R4Range>,
) -> Option<u32> {
    if word & R4_CHUNK_FLAG == 0 {
        return Some(word);
    }
    let low = addr as u16;
    if word & R4_PAIR_FLAG != 0 {
        let [a, b] = mask()?;
        let inside = |bounds: u32| bounds as u16 <= low && low <= (bounds >> 16) as u16;
        return Some(if inside(a) || inside(b) {
            word & !(R4_CHUNK_FLAG | R4_PAIR_FLAG)
        } else {
            R4_LEAF_NONE
        });
    }
    // A mask that cannot be read only costs the search it would save. As
    // one number, not a word picked by index: LLVM picked the word of a
    // copy on the stack by OR-ing its offset into the stack pointer, which
    // the verifier refuses ("bitwise operator |= on pointer").
    if mask()
        .is_some_and(|[lo, hi]| (u64::from(hi) << 32 | u64::from(lo)) >> r4_block(addr) & 1 != 0)
    {
        return Some(R4_LEAF_NONE);
    }
    let first = word & !R4_CHUNK_FLAG;
    let head = range(first)?;
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
