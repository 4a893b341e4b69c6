//! The IPv6 source lookup as the kernel holds it, and the one search both
//! sides run over it: a static B-tree of the address ranges' starts.
//!
//! IPv6 policies do not spread over the top bits as IPv4 ones do (a
//! hundred thousand customer prefixes may all sit in one /32), so a direct
//! table indexed by leading bits buys nothing; what bounds the reads is
//! the tree's fan-out. The address space is cut where the longest matching
//! prefix changes; the cuts' first addresses, sorted, are the keys, three
//! to a node of one cache line ([`R6Node`], with each key's leaf), nodes
//! in breadth-first order with the children of node `k` at
//! `k * 4 + 1 ..= k * 4 + 4` ([`r6_child`]) and the keys placed in order
//! by an in-order walk of that shape (Eytzinger's layout with fan-out 4).
//! A lookup reads one node per level, at most [`R6_MAX_LEVELS`], and one
//! leaf; the top levels, a few kilobytes, stay in cache.
//!
//! Before the tree, a window of [`R6_WINDOW_BITS`] address bits answers
//! most sources no prefix covers. The compiler takes the leading bits all
//! the policy's prefixes share (the window's base, up to
//! [`R6_MAX_WINDOW_AT`] bits): an address outside them is covered by
//! none; inside, the next 16 bits pick a bucket and the 5 after them a
//! block of it, and a bucket's mask ([`MAP_R6_EMPTY`], 16 to a 64-byte
//! value) marks the blocks no prefix covers. Customer prefixes in one
//! /32, say, get a bucket per /48 and a block per /53. A bucket's class
//! ([`crate::class`], after the masks) answers first for a bucket no
//! prefix touches and for one all of one of the slot's two frequent
//! leaves (a /48 of a list, in a /32's window). Only a source in a
//! covered block walks the tree, whose lower levels are megabytes: each of
//! their reads is a cache and TLB miss. It starts at its bucket's start
//! node ([`MAP_R6_START`]): the deepest node every address of the bucket
//! passes through, with the leaf met above it, so the levels above (all
//! alike for the bucket) cost no instructions.
//!
//! A leaf indexes the slot's distinct IPv6 prefix values
//! ([`crate::PrefixValue`], in [`MAP_R6_LEAVES`]); [`crate::R4_LEAF_NONE`]
//! is "no prefix holds it". Both slots live in the same four arrays; a
//! slot's nodes and leaves start at the bases its config holds
//! ([`crate::PolicyConfig::r6_node_base`]), its masks and starts at
//! `slot *` [`R6_EMPTY_SLOT_VALUES`] and `slot *` [`R6_START_VALUES`], its
//! window in its config.

pub const MAP_R6_NODES: &str = "IPG_R6_NODES";
pub const MAP_R6_LEAVES: &str = "IPG_R6_LEAVES";
pub const MAP_R6_EMPTY: &str = "IPG_R6_EMPTY";
pub const MAP_R6_START: &str = "IPG_R6_START";

/// Address bits after the window's base that pick a bucket.
pub const R6_WINDOW_BITS: u32 = 16;
/// Address bits after the bucket that pick a block: 32 blocks, one bit
/// each in the bucket's mask.
pub const R6_BLOCK_BITS: u32 = 5;
/// The most leading bits a window's base may have (the bucket and block
/// bits must fit after it).
pub const R6_MAX_WINDOW_AT: u32 = 128 - R6_WINDOW_BITS - R6_BLOCK_BITS;
/// [`R6Window::at`] of a slot without a window (no IPv6 prefixes): every
/// source walks the tree.
pub const R6_NO_WINDOW: u32 = u32::MAX;
/// Bucket masks per array value.
pub const R6_MASKS_PER_VALUE: u32 = 16;
/// Mask values per slot.
pub const R6_EMPTY_VALUES: u32 = (1 << R6_WINDOW_BITS) / R6_MASKS_PER_VALUE;
/// Values of a slot's bucket classes ([`crate::class`], 16 KiB), after
/// its masks in [`MAP_R6_EMPTY`], packed alike.
pub const R6_CLASS_VALUES: u32 = crate::CLASS_WORDS / R6_MASKS_PER_VALUE;
/// Values of [`MAP_R6_EMPTY`] per slot: the masks, then the classes.
pub const R6_EMPTY_SLOT_VALUES: u32 = R6_EMPTY_VALUES + R6_CLASS_VALUES;
const _: () = assert!(crate::CLASS_INDEX_BITS == R6_WINDOW_BITS);
const _: () = assert!(R6_CLASS_VALUES * R6_MASKS_PER_VALUE == crate::CLASS_WORDS);
/// Bucket start nodes per array value.
pub const R6_STARTS_PER_VALUE: u32 = 8;
/// Start values per slot.
pub const R6_START_VALUES: u32 = (1 << R6_WINDOW_BITS) / R6_STARTS_PER_VALUE;

/// 8 buckets' start nodes and the leaves met above them: bucket `i`'s
/// search starts at node `nodes[i]` with leaf `leaves[i]` (one line for
/// both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R6Start {
    pub nodes: [u32; R6_STARTS_PER_VALUE as usize],
    pub leaves: [u32; R6_STARTS_PER_VALUE as usize],
}

const _: () = assert!(core::mem::size_of::<R6Start>() == 64);

/// 16 bucket masks: bit `b` of a mask set when no prefix covers any
/// address of the bucket's block `b`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R6Empty {
    pub masks: [u32; R6_MASKS_PER_VALUE as usize],
}

const _: () = assert!(core::mem::size_of::<R6Empty>() == 64);
const _: () = assert!(1 << R6_BLOCK_BITS == u32::BITS);

/// Keys per node.
pub const R6_KEYS: usize = 3;
/// Levels a slot's tree may have: (4^12 - 1) / 3 nodes, 16.7 million
/// keys, more than any capacity [`r6_nodes_capacity`] allows.
pub const R6_MAX_LEVELS: u32 = 12;
/// Nodes of a complete tree of [`R6_MAX_LEVELS`] levels.
pub const R6_MAX_NODES: u32 = ((1u64 << (2 * R6_MAX_LEVELS)) / 3) as u32;
/// The largest IPv6 capacity (prefixes) a slot may be given: its nodes fit
/// [`R6_MAX_NODES`].
pub const R6_MAX_PREFIXES: u32 = (R6_MAX_NODES * R6_KEYS as u32 - 1) / 2;

/// Three keys, the first addresses of ranges, ascending, each as its high
/// and low 64 bits, and the leaves of those ranges. A node's unused slots
/// (only in the last nodes of a tree whose key count is not a multiple of
/// three) hold the largest address and the last range's leaf, so they
/// never change an answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct R6Node {
    pub hi: [u64; R6_KEYS],
    pub lo: [u64; R6_KEYS],
    pub leaf: [u32; R6_KEYS],
    pub _pad0: u32,
}

const _: () = assert!(core::mem::size_of::<R6Node>() == 64);
const _: () = assert!(r6_nodes_capacity(R6_MAX_PREFIXES) <= R6_MAX_NODES);
const _: () = assert!(r6_prefix_capacity(r6_nodes_capacity(65_536), 65_536) == 65_536);
const _: () = assert!(r6_prefix_capacity(r6_nodes_capacity(4_096), 4_096) == 4_096);

/// Index of child `i` (0..=3) of node `k`.
#[inline(always)]
pub const fn r6_child(k: u32, i: u32) -> u32 {
    k.wrapping_mul(R6_KEYS as u32 + 1)
        .wrapping_add(i)
        .wrapping_add(1)
}

/// Nodes a slot needs at most for `prefixes` prefixes: each prefix cuts
/// the address space at most twice, plus the range at address 0.
pub const fn r6_nodes_capacity(prefixes: u32) -> u32 {
    let keys = (prefixes as u64) * 2 + 1;
    keys.div_ceil(R6_KEYS as u64) as u32
}

/// Leaves a slot needs at most for `prefixes` prefixes: one per distinct
/// value.
pub const fn r6_leaves_capacity(prefixes: u32) -> u32 {
    if prefixes == 0 { 1 } else { prefixes }
}

/// The prefixes a slot of `nodes` nodes and `leaves` leaves holds whatever
/// they are: the inverse of the two capacities above.
pub const fn r6_prefix_capacity(nodes: u32, leaves: u32) -> u32 {
    let by_nodes = ((nodes as u64 * R6_KEYS as u64).saturating_sub(1) / 2) as u32;
    if by_nodes < leaves { by_nodes } else { leaves }
}

/// Bytes a slot's tree takes in the kernel with `nodes` nodes and `leaves`
/// leaves (the window's masks are the same for every policy).
pub const fn r6_table_bytes(nodes: u32, leaves: u32) -> u64 {
    (R6_EMPTY_SLOT_VALUES + R6_START_VALUES) as u64 * 64 + nodes as u64 * 64 + leaves as u64 * 16
}

/// A slot's window: the leading bits all its IPv6 prefixes share.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R6Window {
    /// How many leading bits (at most [`R6_MAX_WINDOW_AT`]), or
    /// [`R6_NO_WINDOW`].
    pub at: u32,
    pub _pad0: u32,
    /// The base's high and low 64 bits, those past `at` zero.
    pub base_hi: u64,
    pub base_lo: u64,
}

const _: () = assert!(core::mem::size_of::<R6Window>() == 24);

impl Default for R6Window {
    fn default() -> Self {
        Self {
            at: R6_NO_WINDOW,
            _pad0: 0,
            base_hi: 0,
            base_lo: 0,
        }
    }
}

impl R6Window {
    /// Where address (`hi`, `lo`) falls: None outside the base (or for
    /// no window, which the caller rules out first), else its bucket and
    /// block.
    #[inline(always)]
    pub fn place(&self, hi: u64, lo: u64) -> Option<(u32, u32)> {
        let at = self.at;
        // Every shift below is by 1 to 63: `at` and `end` are bounded here.
        if at > R6_MAX_WINDOW_AT {
            return None;
        }
        let mask_hi = match at {
            0 => 0,
            1..64 => u64::MAX << (64 - at),
            _ => u64::MAX,
        };
        let mask_lo = if at <= 64 { 0 } else { u64::MAX << (128 - at) };
        if (hi ^ self.base_hi) & mask_hi != 0 || (lo ^ self.base_lo) & mask_lo != 0 {
            return None;
        }
        let end = at + R6_WINDOW_BITS + R6_BLOCK_BITS;
        let bits = if end <= 64 {
            hi >> (64 - end)
        } else if at >= 64 {
            lo >> (128 - end)
        } else {
            hi << (end - 64) | lo >> (128 - end)
        };
        let bits = (bits as u32) & ((1 << (R6_WINDOW_BITS + R6_BLOCK_BITS)) - 1);
        Some((bits >> R6_BLOCK_BITS, bits & ((1 << R6_BLOCK_BITS) - 1)))
    }
}

/// Key in [`MAP_R6_EMPTY`] of the value holding `bucket`'s mask, and the
/// mask's index in it.
#[inline(always)]
pub const fn r6_empty_key(slot: u32, bucket: u32) -> (u32, usize) {
    (
        slot * R6_EMPTY_SLOT_VALUES + bucket / R6_MASKS_PER_VALUE,
        (bucket % R6_MASKS_PER_VALUE) as usize,
    )
}

/// Key in [`MAP_R6_EMPTY`] of the value holding `bucket`'s class word,
/// and the word's index in it.
#[inline(always)]
pub const fn r6_class_key(slot: u32, bucket: u32) -> (u32, usize) {
    let word = crate::class_word(bucket) as u32;
    (
        slot * R6_EMPTY_SLOT_VALUES + R6_EMPTY_VALUES + word / R6_MASKS_PER_VALUE,
        (word % R6_MASKS_PER_VALUE) as usize,
    )
}

/// Key in [`MAP_R6_START`] of the value holding `bucket`'s start, and
/// the start's index in it.
#[inline(always)]
pub const fn r6_start_key(slot: u32, bucket: u32) -> (u32, usize) {
    (
        slot * R6_START_VALUES + bucket / R6_STARTS_PER_VALUE,
        (bucket % R6_STARTS_PER_VALUE) as usize,
    )
}

/// The leaf of address (`hi`, `lo`): the slot's window first, when it
/// has one, with readers of a bucket's class word (`class(bucket)`,
/// answered with the slot's `frequent` leaves: [`crate::class_leaf`]),
/// mask (`mask(bucket)`) and start (`start(bucket)`: node and leaf),
/// then the tree of `nodes` nodes ([`r6_search`]) from the bucket's start
/// or the root. The kernel and user space run this same lookup.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn r6_lookup<'a>(
    window: &R6Window,
    class: impl FnOnce(u32) -> Option<u32>,
    frequent: [u32; crate::FREQUENT],
    mask: impl FnOnce(u32) -> Option<u32>,
    start: impl FnOnce(u32) -> Option<(u32, u32)>,
    nodes: u32,
    hi: u64,
    lo: u64,
    node: impl Fn(u32) -> Option<&'a R6Node>,
) -> Option<u32> {
    let mut from = (0, crate::R4_LEAF_NONE);
    if window.at <= R6_MAX_WINDOW_AT {
        match window.place(hi, lo) {
            None => return Some(crate::R4_LEAF_NONE),
            // A class, a mask or a start that cannot be read only costs
            // the reads it would save.
            Some((bucket, block)) => {
                if let Some(leaf) =
                    class(bucket).and_then(|w| crate::class_leaf(w, bucket, frequent))
                {
                    return Some(leaf);
                }
                if mask(bucket).is_some_and(|m| m >> block & 1 != 0) {
                    return Some(crate::R4_LEAF_NONE);
                }
                if let Some(s) = start(bucket) {
                    from = s;
                }
            }
        }
    }
    r6_search(nodes, from, hi, lo, node)
}

/// The high and low 64 bits of an address in network byte order.
#[inline(always)]
pub fn r6_key(addr: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&addr[..8]);
    lo.copy_from_slice(&addr[8..]);
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}

/// The leaf of address (`hi`, `lo`) in a tree of `nodes` nodes, from
/// node `from.0` with `from.1` the leaf met above it (the root and
/// [`crate::R4_LEAF_NONE`] for a whole walk), given a reader of the
/// slot's nodes (`node(k)`: node `k` from the slot's base, None past the
/// array). The kernel and user space run this same search. Each node
/// visited narrows the range to one of its four gaps; the leaf is that of
/// the last key at or below the address met on the way down (the deepest
/// one is the nearest). An empty tree answers [`crate::R4_LEAF_NONE`].
#[inline(always)]
pub fn r6_search<'a>(
    nodes: u32,
    from: (u32, u32),
    hi: u64,
    lo: u64,
    node: impl Fn(u32) -> Option<&'a R6Node>,
) -> Option<u32> {
    let (mut k, mut leaf) = from;
    let mut level = 0;
    while level < R6_MAX_LEVELS {
        if k >= nodes {
            break;
        }
        let n = node(k)?;
        // Keys at or below the address; they are the node's first ones.
        let mut below = 0u32;
        let mut i = 0;
        while i < R6_KEYS {
            if n.hi[i] < hi || (n.hi[i] == hi && n.lo[i] <= lo) {
                below += 1;
                leaf = n.leaf[i];
            }
            i += 1;
        }
        k = r6_child(k, below);
        level += 1;
    }
    Some(leaf)
}
