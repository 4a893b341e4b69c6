//! The IPv4 source lookup as the kernel holds it, and the one search both
//! sides run over it (DXR, Zec 2012, with a 16-bit direct table).
//!
//! Per slot: a direct table of 2^16 words indexed by the address's top 16
//! bits, packed 16 to a 64-byte value ([`R4Direct`], one cache line); a
//! word is a leaf, or [`R4_CHUNK_FLAG`] and the index of the /16's chunk:
//! its ranges, sorted by the low 16 bits of their first address (the
//! first starts at 0), as a head, their starts and their leaves in cells
//! of 8 bytes ([`R4Cell`]). A leaf indexes the slot's distinct prefix values
//! ([`crate::PrefixValue`]); [`R4_LEAF_NONE`] is "no prefix holds it".
//! After the words, in the same array and packed alike, each /16 has an
//! uncovered mask of two words: for a chunk, bit `b` set when no prefix
//! covers any address of its block `b` ([`r4_block`], a /22). A /16
//! whose covered addresses are one or two intervals of one leaf has no
//! ranges: its word is [`R4_CHUNK_FLAG`] | [`R4_PAIR_FLAG`] | the leaf,
//! and its mask words hold the intervals ([`r4_pair`]).
//!
//! The classes follow the masks: two bits per /16 ([`crate::class`]): no
//! prefix's, all of one of the slot's two frequent leaves (the leaves of
//! the most whole /16s), or read the direct word; a lookup reads its
//! /16's class first and stops there unless the class sends it on
//! ([`r4_find`]). After the classes, the whole bits: one per /24, set
//! in a chunk's /24 all of whose addresses are the slot's first frequent
//! leaf ([`r4_whole_key`], 2 MiB).
//!
//! A lookup reads the class, one direct value, for a chunk its
//! mask and its /24's whole bit, then its head, at most
//! [`R4_SEARCH_STEPS`] starts and one cell of leaves, and one leaf: a
//! bounded number of reads whatever the policy, and in a chunk,
//! neighbours. A source in an uncovered block, what most refused sources
//! are, is answered by the mask, and one in a /24 of a list's value (what
//! most allowed sources in a chunk are) by its whole bit: with many
//! prefixes the cells are megabytes, and the first read into them (a
//! cache and TLB miss, which cannot start before the direct word's has
//! ended) is most of a lookup's cost, where the words (256 KiB) are read
//! by the lookups their class sends on, the masks (512 KiB) by those in
//! chunks, and the whole bits by those in a covered block of a chunk, at
//! addresses the source alone gives, so that their misses overlap the
//! word's. The masks are a
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
/// Direct values of a slot's classes ([`crate::class`]): two bits per
/// /16 (16 KiB).
pub const R4_CLASS_VALUES: u32 = crate::CLASS_WORDS / R4_WORDS_PER_VALUE;
const _: () = assert!(crate::CLASS_INDEX_BITS == R4_DIRECT_BITS);
/// Address bits below a whole bit's unit ([`r4_whole_key`]): a /24.
pub const R4_WHOLE_BITS: u32 = 8;
/// Words of a /16's whole bits: one bit per /24.
pub const R4_WHOLE_WORDS: u32 = (1 << (16 - R4_WHOLE_BITS)) / u32::BITS;
/// Direct values of a slot's whole bits (2 MiB).
pub const R4_WHOLE_VALUES: u32 = (R4_WHOLE_WORDS << R4_DIRECT_BITS) / R4_WORDS_PER_VALUE;
/// Direct values per slot: the words, the uncovered masks, the classes,
/// then the whole bits.
pub const R4_DIRECT_SLOT_VALUES: u32 =
    (1 + R4_MASK_WORDS) * R4_DIRECT_VALUES + R4_CLASS_VALUES + R4_WHOLE_VALUES;
/// Where a slot's whole bits start among its direct values.
const R4_WHOLE_AT: u32 = (1 + R4_MASK_WORDS) * R4_DIRECT_VALUES + R4_CLASS_VALUES;
/// In a direct word: the rest is the index of a chunk's head cell (from
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
// A chunk's head index, and a pair's leaf, never reach the pair
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

/// A value of the ranges array, 8 bytes: a chunk's head, four of its
/// ranges' starts or two of their leaves ([`r4_start_cell`],
/// [`r4_leaf_cell`]). A chunk of `n` ranges is its head, then the starts
/// of ranges 1 to `n - 1` (the low 16 bits of their first addresses,
/// ascending; range 0 starts at 0), four per cell, then, unless it
/// alternates ([`R4_ALTERNATE`]), the leaves of ranges 1 to `n - 1`, two
/// per cell. A /16 of 30 ranges of one value is 64 bytes, where ranges
/// of 8 bytes, start and leaf together, took 240: with many prefixes a
/// search's first line is a cache and TLB miss, and fewer bytes are fewer
/// pages (docs/bench.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R4Cell {
    pub bits: u64,
}

/// Starts and leaves per cell.
pub const R4_STARTS_PER_CELL: u32 = 4;
pub const R4_LEAVES_PER_CELL: u32 = 2;
/// In a chunk's head ([`R4Cell::head`]): its ranges alternate between the
/// head's leaf and [`R4_LEAF_NONE`], so no leaves are stored: every
/// chunk of a policy whose prefixes share one value (a list file's) is
/// one.
pub const R4_ALTERNATE: u16 = 1;
/// With [`R4_ALTERNATE`]: range 0 is no prefix's, range 1 the leaf's
/// (without it, range 0 is the leaf's).
pub const R4_ALTERNATE_ODD: u16 = 2;

impl R4Cell {
    /// A chunk's head: its kind ([`R4_ALTERNATE`] and
    /// [`R4_ALTERNATE_ODD`], or 0), its range count minus one, and range
    /// 0's leaf (an alternating chunk's one leaf).
    pub const fn head(kind: u16, span: u16, leaf: u32) -> Self {
        Self {
            bits: kind as u64 | (span as u64) << 16 | (leaf as u64) << 32,
        }
    }
    pub const fn kind(self) -> u16 {
        self.bits as u16
    }
    pub const fn span(self) -> u16 {
        (self.bits >> 16) as u16
    }
    pub const fn leaf(self) -> u32 {
        (self.bits >> 32) as u32
    }
    /// The start of range `k` (k >= 1) in the cell [`r4_start_cell`]
    /// names for it. A shift, not an index into lanes: the verifier
    /// follows a shift of a loaded number, where a lane picked by index is
    /// a variable offset into the map value.
    pub const fn start(self, k: u32) -> u16 {
        (self.bits >> (16 * ((k - 1) % R4_STARTS_PER_CELL))) as u16
    }
    /// The leaf of range `k` (k >= 1) in the cell [`r4_leaf_cell`] names.
    pub const fn leaf_of(self, k: u32) -> u32 {
        (self.bits >> (32 * ((k - 1) % R4_LEAVES_PER_CELL))) as u32
    }
}

/// The cell holding the start of range `k` (k >= 1) of a chunk, from its
/// head.
#[inline(always)]
pub const fn r4_start_cell(k: u32) -> u32 {
    1 + (k - 1) / R4_STARTS_PER_CELL
}

/// The cell holding the leaf of range `k` (k >= 1) of a chunk of `n`
/// ranges that stores its leaves, from its head.
#[inline(always)]
pub const fn r4_leaf_cell(n: u32, k: u32) -> u32 {
    1 + (n - 1).div_ceil(R4_STARTS_PER_CELL) + (k - 1) / R4_LEAVES_PER_CELL
}

/// Cells of a chunk of `n` ranges (n >= 2), alternating or not.
pub const fn r4_chunk_cells(n: u32, alternate: bool) -> u32 {
    let starts = 1 + (n - 1).div_ceil(R4_STARTS_PER_CELL);
    if alternate {
        starts
    } else {
        starts + (n - 1).div_ceil(R4_LEAVES_PER_CELL)
    }
}

const _: () = assert!(core::mem::size_of::<R4Direct>() == 64);
const _: () = assert!(core::mem::size_of::<R4Cell>() == 8);
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

/// Key in [`MAP_R4_DIRECT`] of the value holding `addr`'s class.
#[inline(always)]
pub const fn r4_class_key(slot: u32, addr: u32) -> u32 {
    slot * R4_DIRECT_SLOT_VALUES
        + (1 + R4_MASK_WORDS) * R4_DIRECT_VALUES
        + crate::class_word(addr >> (32 - R4_DIRECT_BITS)) as u32 / R4_WORDS_PER_VALUE
}
// The class words fill their values whole.
const _: () = assert!(R4_CLASS_VALUES * R4_WORDS_PER_VALUE == crate::CLASS_WORDS);

/// `addr`'s class word, from the direct value that holds it (the one at
/// [`r4_class_key`]).
#[inline(always)]
pub fn r4_class_of(value: &R4Direct, addr: u32) -> u32 {
    value.words[crate::class_word(addr >> (32 - R4_DIRECT_BITS)) % R4_WORDS_PER_VALUE as usize]
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

/// The word that holds `addr`'s whole bit, among a slot's 2^16 x
/// [`R4_WHOLE_WORDS`].
#[inline(always)]
pub const fn r4_whole_word(addr: u32) -> u32 {
    addr >> (R4_WHOLE_BITS + u32::BITS.trailing_zeros())
}
const _: () = assert!(R4_WHOLE_WORDS == 1 << (16 - R4_WHOLE_BITS - u32::BITS.trailing_zeros()));

/// Key in [`MAP_R4_DIRECT`] of the value holding `addr`'s whole bit: set
/// when every address of its /24 is the slot's first frequent leaf
/// ([`r4_whole_leaf`]) and its /16 is a chunk (0 for the other /16s). A
/// source there is answered without the chunk's cells, which with many
/// prefixes are megabytes, and the read into them a miss to memory that
/// starts only once the direct word's has ended; the bit's address is
/// the source's own, so its read overlaps the word's (docs/bench.md: at
/// 1,000,000 prefixes an allowed source in a chunk cost 176 to 227 ns of
/// lookup with the cells, 80 to 110 with the bit).
#[inline(always)]
pub const fn r4_whole_key(slot: u32, addr: u32) -> u32 {
    slot * R4_DIRECT_SLOT_VALUES + R4_WHOLE_AT + r4_whole_word(addr) / R4_WORDS_PER_VALUE
}

/// Whether `addr`'s whole bit is set in `word`, its [`r4_whole_word`].
#[inline(always)]
pub const fn r4_whole_bit(word: u32, addr: u32) -> bool {
    word >> ((addr >> R4_WHOLE_BITS) % u32::BITS) & 1 != 0
}

/// `addr`'s whole bit, from the direct value that holds it (the one at
/// [`r4_whole_key`]).
#[inline(always)]
pub fn r4_whole_of(value: &R4Direct, addr: u32) -> bool {
    r4_whole_bit(
        value.words[(r4_whole_word(addr) % R4_WORDS_PER_VALUE) as usize],
        addr,
    )
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

/// Whether a chunk's uncovered `mask` ([`r4_mask_of`]) says no prefix
/// covers `addr`'s block.
#[inline(always)]
pub const fn r4_uncovered([lo, hi]: [u32; R4_MASK_WORDS as usize], addr: u32) -> bool {
    // As one number, not a word picked by index: LLVM picked the word of a
    // copy on the stack by OR-ing its offset into the stack pointer, which
    // the verifier refuses ("bitwise operator |= on pointer").
    ((hi as u64) << 32 | lo as u64) >> r4_block(addr) & 1 != 0
}

/// Ranges a slot's chunks hold at most for `prefixes` prefixes: each
/// prefix cuts the address space at most twice, and each /16 that holds a
/// cut starts its chunk with one more range.
pub const fn r4_ranges_bound(prefixes: u32) -> u32 {
    prefixes
        .saturating_mul(2)
        .saturating_add(1)
        .saturating_add(1 << R4_DIRECT_BITS)
}

/// Cells (values of the ranges array, [`R4Cell`]) a slot needs at most
/// for `prefixes` prefixes. A chunk of `n` ranges takes at most 1 + (n +
/// 2) / 4 + n / 2 cells ([`r4_chunk_cells`]), so the at most 2^16 chunks
/// take three quarters of a cell per range and one and a half per chunk.
pub const fn r4_ranges_capacity(prefixes: u32) -> u32 {
    let cells = 3 * r4_ranges_bound(prefixes) as u64 / 4 + R4_CHUNK_CELLS;
    if cells > u32::MAX as u64 {
        u32::MAX
    } else {
        cells as u32
    }
}
/// One and a half cells for each of 2^16 chunks.
const R4_CHUNK_CELLS: u64 = 3 << (R4_DIRECT_BITS - 1);

/// The prefixes a slot of `cells` cells and `leaves` leaves holds
/// whatever they are: the inverse of the two capacities above.
pub const fn r4_prefix_capacity(cells: u32, leaves: u32) -> u32 {
    // The largest p whose 3 (2p + 1 + 2^16) / 4, rounded down, is at most
    // the cells left after the chunks' share.
    let d = (cells as u64).saturating_sub(R4_CHUNK_CELLS);
    let by_cells = (4 * d).saturating_sub(3 * (1 + (1 << R4_DIRECT_BITS)) - 3) / 6;
    if by_cells < leaves as u64 {
        by_cells as u32
    } else {
        leaves
    }
}

/// Leaves a slot needs at most for `prefixes` prefixes: one per distinct
/// value.
pub const fn r4_leaves_capacity(prefixes: u32) -> u32 {
    if prefixes == 0 { 1 } else { prefixes }
}

/// Bytes a slot's table takes in the kernel with `cells` cells of ranges
/// and `leaves` leaves (the direct table is the same for every policy).
pub const fn r4_table_bytes(cells: u32, leaves: u32) -> u64 {
    (R4_DIRECT_SLOT_VALUES as u64) * 64 + cells as u64 * 8 + leaves as u64 * 16
}
// Any policy of 1,000,000 IPv4 prefixes fits 32 MiB per slot (the
// lookup's budget): 32,079,616 bytes at most.
const _: () = assert!(
    r4_table_bytes(r4_ranges_capacity(1_000_000), r4_leaves_capacity(1_000_000)) <= 32 << 20
);

/// The leaf of `addr`: its /16's class (`class()`: its word,
/// [`crate::class_word`] of the /16), which answers for a /16 no prefix
/// touches and for one all of one of the slot's `frequent` leaves
/// ([`crate::class_leaf`]); only for the others `search()`, which is
/// [`r4_search`] from the /16's direct word. The kernel and user space
/// run this same lookup; the kernel runs `search` out of line, so that
/// the code of a lookup its class answers, and of what follows it, stays
/// as it is whatever the search grows to (docs/bench.md).
#[inline(always)]
pub fn r4_find(
    addr: u32,
    class: impl FnOnce() -> Option<u32>,
    frequent: [u32; crate::FREQUENT],
    search: impl FnOnce() -> Option<u32>,
) -> Option<u32> {
    if let Some(leaf) = crate::class_leaf(class()?, addr >> (32 - R4_DIRECT_BITS), frequent) {
        return Some(leaf);
    }
    search()
}

/// The leaf of `addr` given its direct word and a reader of its /16's
/// mask words (read only for a chunk, [`r4_mask_of`]): a leaf word's
/// leaf, a pair's, none in a block the uncovered mask names; else what
/// `chunk(head)` finds in the chunk whose head cell is `head` (from the
/// slot's base), by [`r4_chunk`]. The kernel and user space run this
/// same search.
#[inline(always)]
pub fn r4_search(
    word: u32,
    addr: u32,
    mask: impl FnOnce() -> Option<[u32; R4_MASK_WORDS as usize]>,
    chunk: impl FnOnce(u32) -> Option<u32>,
) -> Option<u32> {
    if word & R4_CHUNK_FLAG == 0 {
        return Some(word);
    }
    if word & R4_PAIR_FLAG != 0 {
        let low = addr as u16;
        let [a, b] = mask()?;
        let inside = |bounds: u32| bounds as u16 <= low && low <= (bounds >> 16) as u16;
        return Some(if inside(a) || inside(b) {
            word & !(R4_CHUNK_FLAG | R4_PAIR_FLAG)
        } else {
            R4_LEAF_NONE
        });
    }
    // A mask that cannot be read only costs the search it would save.
    if mask().is_some_and(|m| r4_uncovered(m, addr)) {
        return Some(R4_LEAF_NONE);
    }
    chunk(word & !R4_CHUNK_FLAG)
}

/// The leaf whole bits stand for: the slot's first frequent leaf.
#[inline(always)]
pub const fn r4_whole_leaf(frequent: [u32; crate::FREQUENT]) -> u32 {
    frequent[0]
}

/// The leaf of `addr` in its /16's chunk, whose head cell is `first`:
/// `whole_leaf` ([`r4_whole_leaf`]) when its whole bit (`whole()`,
/// [`r4_whole_of`]) says all of its /24 is that leaf, else by a binary
/// search of the chunk's starts, given a reader of the slot's cells
/// (`cell(i)`: the cell at index `i` from the slot's base, None past the
/// array).
#[inline(always)]
pub fn r4_chunk(
    first: u32,
    addr: u32,
    whole_leaf: u32,
    whole: impl FnOnce() -> Option<bool>,
    cell: impl Fn(u32) -> Option<R4Cell>,
) -> Option<u32> {
    if whole() == Some(true) {
        return Some(whole_leaf);
    }
    let low = addr as u16;
    let head = cell(first)?;
    let n = u32::from(head.span()) + 1;
    // The last range starting at or before `low`: `at` is one that does
    // (range 0 starts at 0), `left` the ranges from `at` on that may.
    let mut at = 0;
    let mut left = n;
    let mut step = 0;
    while step < R4_SEARCH_STEPS {
        if left <= 1 {
            break;
        }
        let half = left / 2;
        let k = at + half;
        if cell(first + r4_start_cell(k))?.start(k) <= low {
            at = k;
            left -= half;
        } else {
            left = half;
        }
        step += 1;
    }
    let kind = head.kind();
    if kind & R4_ALTERNATE != 0 {
        let odd = u32::from(kind & R4_ALTERNATE_ODD != 0);
        return Some(if at & 1 == odd {
            head.leaf()
        } else {
            R4_LEAF_NONE
        });
    }
    if at == 0 {
        return Some(head.leaf());
    }
    Some(cell(first + r4_leaf_cell(n, at))?.leaf_of(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capacities_bound_every_chunk_and_invert() {
        // A chunk of n ranges takes at most 3/2 + 3n/4 cells: what
        // `r4_ranges_capacity` sums over 2^16 chunks.
        for n in 2..=1u32 << 16 {
            assert!(4 * r4_chunk_cells(n, false) <= 6 + 3 * n, "{n}");
            assert!(r4_chunk_cells(n, true) <= r4_chunk_cells(n, false));
        }
        // The largest prefix count a slot's sizes hold is the one they
        // were sized for, whatever it is.
        for p in (0..4_000_000u32).step_by(9_973).chain([R4_MAX_PREFIXES]) {
            let (cells, leaves) = (r4_ranges_capacity(p), r4_leaves_capacity(p));
            assert_eq!(r4_prefix_capacity(cells, leaves), p, "{p}");
            if p > 0 {
                assert!(r4_prefix_capacity(cells - 1, leaves) < p, "{p}");
            }
        }
        // The figure the docs give for the worst policy of 1,000,000.
        assert_eq!(
            r4_table_bytes(r4_ranges_capacity(1_000_000), r4_leaves_capacity(1_000_000)),
            32_079_616
        );
    }

    #[test]
    fn a_cell_holds_four_starts_or_two_leaves() {
        let head = R4Cell::head(R4_ALTERNATE | R4_ALTERNATE_ODD, 65_535, 0x7fff_fffe);
        assert_eq!(
            (head.kind(), head.span(), head.leaf()),
            (3, 65_535, 0x7fff_fffe)
        );
        let starts = R4Cell {
            bits: 0xffff_0003_0002_0001,
        };
        let got: [u16; 8] = core::array::from_fn(|k| starts.start(k as u32 + 1));
        assert_eq!(got, [1, 2, 3, 0xffff, 1, 2, 3, 0xffff]);
        let leaves = R4Cell {
            bits: 0x7fff_ffff_0000_0009,
        };
        assert_eq!((leaves.leaf_of(1), leaves.leaf_of(2)), (9, R4_LEAF_NONE));
        // A chunk of 10 ranges: its head, starts 1 to 9 in three cells,
        // leaves 1 to 9 in five.
        let starts: [u32; 9] = core::array::from_fn(|k| r4_start_cell(k as u32 + 1));
        assert_eq!(starts, [1, 1, 1, 1, 2, 2, 2, 2, 3]);
        let leaves: [u32; 9] = core::array::from_fn(|k| r4_leaf_cell(10, k as u32 + 1));
        assert_eq!(leaves, [4, 4, 5, 5, 6, 6, 7, 7, 8]);
        assert_eq!(
            (r4_chunk_cells(10, true), r4_chunk_cells(10, false)),
            (4, 9)
        );
    }
}
