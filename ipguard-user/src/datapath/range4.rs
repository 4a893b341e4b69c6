//! The IPv4 lookup's arrays (`ipguard_common::range4`), written through
//! memory mappings of the pinned maps (`BPF_F_MMAPABLE`): a slot is
//! filled by copying the image's table into it, a few milliseconds for a
//! million prefixes, with no syscall per entry and nothing freed.

use super::{mapped::*, *};
use crate::policy::range4::RangeTable4;

/// The three arrays, mapped while a slot is written or read.
pub(super) struct Lookup4 {
    direct: MappableArray,
    ranges: MappableArray,
    leaves: MappableArray,
    /// Per slot.
    pub(super) range_capacity: u32,
    pub(super) leaf_capacity: u32,
}

impl Lookup4 {
    pub(super) fn open(pin_dir: &Path) -> Result<Self> {
        let (direct, _) = MappableArray::open(pin_dir, MAP_R4_DIRECT)?;
        let (ranges, r) = MappableArray::open(pin_dir, MAP_R4_RANGES)?;
        let (leaves, l) = MappableArray::open(pin_dir, MAP_R4_LEAVES)?;
        Ok(Self {
            direct,
            ranges,
            leaves,
            range_capacity: r / SLOTS,
            leaf_capacity: l / SLOTS,
        })
    }

    /// Bytes of the three arrays, both slots.
    pub(super) fn allocated(&self) -> u64 {
        (self.direct.len + self.ranges.len + self.leaves.len) as u64
    }

    /// Whether `t` fits a slot; the error names what it needs.
    pub(super) fn check_fits(&self, t: &RangeTable4, prefixes: usize) -> Result<()> {
        // The prefix count is the operator's measure (`--ipv4-capacity`);
        // the table never needs more than it allows, but check both.
        if prefixes > self.prefix_capacity() as usize
            || t.ranges.len() > self.range_capacity as usize
            || t.leaves.len() > self.leaf_capacity as usize
        {
            return Err(DatapathError::Capacity {
                family: "IPv4",
                // Leaves are prefix-sized: a policy whose time-limited
                // entries need more of them than prefixes says so.
                need: prefixes.max(t.leaves.len()),
                capacity: self.prefix_capacity(),
                fix: FIX_V4_CAPACITY,
            });
        }
        Ok(())
    }

    /// The prefixes a slot holds whatever they are (the sizes follow
    /// `r4_ranges_capacity` and `r4_leaves_capacity`).
    pub(super) fn prefix_capacity(&self) -> u32 {
        r4_prefix_capacity(self.range_capacity, self.leaf_capacity)
    }

    /// Writes `t` into `slot` (which no packet reads now) and returns the
    /// bases its config must carry.
    pub(super) fn write(&self, slot: u32, t: &RangeTable4) -> Result<(u32, u32)> {
        let range_base = slot * self.range_capacity;
        let leaf_base = slot * self.leaf_capacity;
        // The table's direct words index ranges from the slot's base; the
        // uncovered masks, the classes and the whole bits follow them.
        let words = pack(
            &[&t.direct[..], &t.empty, &t.class, &t.whole].concat(),
            |words| R4Direct { words },
        );
        self.direct
            .map()?
            .write((slot * R4_DIRECT_SLOT_VALUES) as usize, &words);
        self.ranges.map()?.write(range_base as usize, &t.ranges);
        self.leaves.map()?.write(leaf_base as usize, &t.leaves);
        Ok((range_base, leaf_base))
    }

    /// What `slot` holds, as a table (for a test or a daemon that wants to
    /// compare); `ranges`, `leaves` and `frequent` are what its config
    /// gives.
    pub(super) fn read(
        &self,
        slot: u32,
        ranges: u32,
        leaves: u32,
        frequent: [u32; FREQUENT],
    ) -> Result<RangeTable4> {
        let direct: Vec<u32> = self
            .direct
            .map()?
            .read::<R4Direct>(
                (slot * R4_DIRECT_SLOT_VALUES) as usize,
                R4_DIRECT_SLOT_VALUES as usize,
            )
            .iter()
            .flat_map(|d| d.words)
            .collect();
        let (direct, rest) = direct.split_at(1 << R4_DIRECT_BITS);
        let (empty, rest) = rest.split_at((R4_MASK_WORDS as usize) << R4_DIRECT_BITS);
        let (class, whole) = rest.split_at(CLASS_WORDS as usize);
        let ranges = self.ranges.map()?.read::<R4Cell>(
            (slot * self.range_capacity) as usize,
            ranges.min(self.range_capacity) as usize,
        );
        let leaves = self.leaves.map()?.read::<PrefixValue>(
            (slot * self.leaf_capacity) as usize,
            leaves.min(self.leaf_capacity) as usize,
        );
        Ok(RangeTable4 {
            leaves,
            direct: direct.to_vec(),
            empty: empty.to_vec(),
            ranges,
            class: class.to_vec(),
            whole: whole.to_vec(),
            frequent,
        })
    }
}
