//! The classes of a table of 2^16 entries (`ipguard_common::class`):
//! which entries a lookup answers from two bits, and the slot's frequent
//! leaves they name.

use ipguard_common::{
    CLASS_FREQUENT, CLASS_INDEX_BITS, CLASS_NONE, CLASS_READ, CLASS_WORDS, FREQUENT, R4_LEAF_NONE,
    class_shift, class_word,
};

/// What an entry's addresses resolve to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Whole {
    /// No prefix covers any of them.
    None,
    /// All of them are this leaf.
    Leaf(u32),
    /// More than one leaf, or one leaf and none.
    Part,
}

/// The classes of `entries` (2^16 of them; fewer are taken as
/// [`Whole::Part`], and the lookup reads on for them) and the slot's
/// frequent leaves: the [`FREQUENT`] leaves the most entries are all of,
/// most first, ties to the lower leaf, [`R4_LEAF_NONE`] where fewer leaves
/// hold an entry whole. A list file's prefixes share one value, so one
/// leaf holds every whole entry of such a policy.
pub(crate) fn classify(
    entries: impl Iterator<Item = Whole> + Clone,
) -> ([u32; FREQUENT], Vec<u32>) {
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for e in entries.clone() {
        if let Whole::Leaf(leaf) = e {
            *counts.entry(leaf).or_default() += 1;
        }
    }
    let mut ranked: Vec<(u32, u32)> = counts.into_iter().collect();
    ranked.sort_by_key(|&(leaf, n)| (std::cmp::Reverse(n), leaf));
    let frequent: [u32; FREQUENT] =
        std::array::from_fn(|k| ranked.get(k).map_or(R4_LEAF_NONE, |r| r.0));
    let mut words = vec![0; CLASS_WORDS as usize];
    let all = entries.chain(std::iter::repeat(Whole::Part));
    for (i, e) in (0..1u32 << CLASS_INDEX_BITS).zip(all) {
        let class = match e {
            Whole::None => CLASS_NONE,
            Whole::Leaf(leaf) => frequent
                .iter()
                .position(|&f| f == leaf)
                .map_or(CLASS_READ, |k| CLASS_FREQUENT + k as u32),
            Whole::Part => CLASS_READ,
        };
        words[class_word(i)] |= class << class_shift(i);
    }
    (frequent, words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipguard_common::class_leaf;

    #[test]
    fn the_two_leaves_of_the_most_whole_entries_are_frequent() {
        let mut entries = vec![Whole::Part; 1 << 16];
        entries[0] = Whole::None;
        entries[1..4].fill(Whole::Leaf(7));
        entries[4..6].fill(Whole::Leaf(9));
        entries[6..8].fill(Whole::Leaf(5));
        entries[8] = Whole::Leaf(1);
        entries[0xffff] = Whole::None;
        let (frequent, words) = classify(entries.iter().copied());
        // Three of 7, two of 5 and of 9: the tie goes to the lower leaf.
        assert_eq!(frequent, [7, 5]);
        let answer = |i: u32| class_leaf(words[class_word(i)], i, frequent);
        let got: Vec<_> = (0..10).map(answer).collect();
        let none = Some(R4_LEAF_NONE);
        assert_eq!(
            got,
            [
                none,
                Some(7),
                Some(7),
                Some(7),
                None,
                None,
                Some(5),
                Some(5),
                None,
                None
            ]
        );
        assert_eq!(answer(0xffff), none);
        assert_eq!(answer(0xfffe), None);
        // Fewer entries than the table: the rest read on.
        let (frequent, words) = classify([Whole::Leaf(3)].into_iter());
        assert_eq!(frequent, [3, R4_LEAF_NONE]);
        assert_eq!(class_leaf(words[0], 0, frequent), Some(3));
        assert_eq!(class_leaf(words[0], 1, frequent), None);
    }
}
