//! Two bits per entry of a table of 2^16 (an IPv4 /16, a bucket of the
//! IPv6 window) that answer a lookup before it reads the entry's own
//! words: no prefix covers any of the entry's addresses, all of them are
//! one of the slot's [`FREQUENT`] leaves, or read on ([`class_leaf`]).
//!
//! 16 KiB per slot and family, read by every lookup, so they stay in
//! cache; the words they spare a lookup are hundreds of kilobytes read
//! cold when sources are spread (docs/bench.md). What most refused
//! sources of a short allowlist are, and most allowed sources of a list
//! whose prefixes cover whole entries (a list file's share one value), is
//! answered here.

use crate::R4_LEAF_NONE;

/// Entries of a table of classes.
pub const CLASS_INDEX_BITS: u32 = 16;
/// Bits of an entry's class.
pub const CLASS_BITS: u32 = 2;
/// Classes per u32 word.
pub const CLASSES_PER_WORD: u32 = u32::BITS / CLASS_BITS;
/// Words of a table of classes (16 KiB).
pub const CLASS_WORDS: u32 = (1 << CLASS_INDEX_BITS) / CLASSES_PER_WORD;
/// An entry's class: no prefix covers any of its addresses.
pub const CLASS_NONE: u32 = 0;
/// An entry's class: all of it is the slot's first frequent leaf; the
/// next class, its second.
pub const CLASS_FREQUENT: u32 = 1;
/// An entry's class: the lookup reads on.
pub const CLASS_READ: u32 = 3;
/// Frequent leaves per slot and family.
pub const FREQUENT: usize = 2;
const _: () = assert!(CLASS_READ == CLASS_FREQUENT + FREQUENT as u32);
const _: () = assert!(CLASS_READ < 1 << CLASS_BITS);

/// Index of the word holding entry `i`'s class.
#[inline(always)]
pub const fn class_word(i: u32) -> usize {
    (i / CLASSES_PER_WORD) as usize
}

/// Where entry `i`'s class lies in its word.
#[inline(always)]
pub const fn class_shift(i: u32) -> u32 {
    i % CLASSES_PER_WORD * CLASS_BITS
}

/// Entry `i`'s class from its word: [`CLASS_NONE`], [`CLASS_FREQUENT`] +
/// k, or [`CLASS_READ`].
#[inline(always)]
pub const fn class_of(word: u32, i: u32) -> u32 {
    word >> class_shift(i) & ((1 << CLASS_BITS) - 1)
}

/// The leaf entry `i`'s class answers with, given its word and the
/// slot's `frequent` leaves ([`R4_LEAF_NONE`] for none), or None when
/// the lookup reads on.
#[inline(always)]
pub fn class_leaf(word: u32, i: u32, frequent: [u32; FREQUENT]) -> Option<u32> {
    // Branches, not `frequent[class - 1]`: an index picked at run time
    // into a copy on the stack is what the verifier refuses (range4).
    const SECOND: u32 = CLASS_FREQUENT + 1;
    match class_of(word, i) {
        CLASS_NONE => Some(R4_LEAF_NONE),
        CLASS_FREQUENT => Some(frequent[0]),
        SECOND => Some(frequent[1]),
        _ => None,
    }
}
