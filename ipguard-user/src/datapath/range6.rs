//! The IPv6 lookup's arrays (`ipguard_common::range6`), written as the
//! IPv4 ones are: through memory mappings of the pinned maps, a slot's
//! tree and leaves copied in whole, nothing freed.

use super::{mapped::*, *};
use crate::policy::range6::RangeTable6;

/// The four arrays, mapped while a slot is written or read.
pub(super) struct Lookup6 {
    nodes: MappableArray,
    leaves: MappableArray,
    empty: MappableArray,
    starts: MappableArray,
    /// Per slot.
    pub(super) node_capacity: u32,
    pub(super) leaf_capacity: u32,
}

impl Lookup6 {
    pub(super) fn open(pin_dir: &Path) -> Result<Self> {
        let (nodes, n) = MappableArray::open(pin_dir, MAP_R6_NODES)?;
        let (leaves, l) = MappableArray::open(pin_dir, MAP_R6_LEAVES)?;
        let (empty, _) = MappableArray::open(pin_dir, MAP_R6_EMPTY)?;
        let (starts, _) = MappableArray::open(pin_dir, MAP_R6_START)?;
        Ok(Self {
            nodes,
            leaves,
            empty,
            starts,
            node_capacity: n / SLOTS,
            leaf_capacity: l / SLOTS,
        })
    }

    /// Bytes of the four arrays, both slots.
    pub(super) fn allocated(&self) -> u64 {
        (self.nodes.len + self.leaves.len + self.empty.len + self.starts.len) as u64
    }

    /// The prefixes a slot holds whatever they are.
    pub(super) fn prefix_capacity(&self) -> u32 {
        r6_prefix_capacity(self.node_capacity, self.leaf_capacity)
    }

    /// Whether `t` fits a slot; the error names what it needs.
    pub(super) fn check_fits(&self, t: &RangeTable6, prefixes: usize) -> Result<()> {
        if prefixes > self.prefix_capacity() as usize
            || t.nodes.len() > self.node_capacity as usize
            || t.leaves.len() > self.leaf_capacity as usize
        {
            return Err(DatapathError::Capacity {
                family: "IPv6",
                need: prefixes,
                capacity: self.prefix_capacity(),
                fix: FIX_V6_CAPACITY,
            });
        }
        Ok(())
    }

    /// Writes `t` into `slot` (which no packet reads now) and returns the
    /// bases its config must carry.
    pub(super) fn write(&self, slot: u32, t: &RangeTable6) -> Result<(u32, u32)> {
        let node_base = slot * self.node_capacity;
        let leaf_base = slot * self.leaf_capacity;
        self.nodes.map()?.write(node_base as usize, &t.nodes);
        self.leaves.map()?.write(leaf_base as usize, &t.leaves);
        // Without a window (no IPv6 prefixes) the masks and classes are
        // never read. The classes follow the masks.
        let masks = pack(&[&t.empty[..], &t.class].concat(), |masks| R6Empty {
            masks,
        });
        self.empty
            .map()?
            .write((slot * R6_EMPTY_SLOT_VALUES) as usize, &masks);
        let starts: Vec<R6Start> = t
            .starts
            .chunks_exact(R6_STARTS_PER_VALUE as usize)
            .map(|c| {
                let mut v = R6Start::default();
                for (i, &(node, leaf)) in c.iter().enumerate() {
                    (v.nodes[i], v.leaves[i]) = (node, leaf);
                }
                v
            })
            .collect();
        self.starts
            .map()?
            .write((slot * R6_START_VALUES) as usize, &starts);
        Ok((node_base, leaf_base))
    }

    /// What `slot` holds, as a table; `nodes`, `leaves`, `window` and
    /// `frequent` are what its config gives.
    pub(super) fn read(
        &self,
        slot: u32,
        nodes: u32,
        leaves: u32,
        window: R6Window,
        frequent: [u32; FREQUENT],
    ) -> Result<RangeTable6> {
        let (empty, class, starts) = if window.at <= R6_MAX_WINDOW_AT {
            let mut empty: Vec<u32> = self
                .empty
                .map()?
                .read::<R6Empty>(
                    (slot * R6_EMPTY_SLOT_VALUES) as usize,
                    R6_EMPTY_SLOT_VALUES as usize,
                )
                .iter()
                .flat_map(|v| v.masks)
                .collect();
            let class = empty.split_off((R6_EMPTY_VALUES * R6_MASKS_PER_VALUE) as usize);
            let starts = self
                .starts
                .map()?
                .read::<R6Start>((slot * R6_START_VALUES) as usize, R6_START_VALUES as usize)
                .iter()
                .flat_map(|v| v.nodes.into_iter().zip(v.leaves))
                .collect();
            (empty, class, starts)
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        Ok(RangeTable6 {
            window,
            empty,
            starts,
            class,
            frequent,
            nodes: self.nodes.map()?.read::<R6Node>(
                (slot * self.node_capacity) as usize,
                nodes.min(self.node_capacity) as usize,
            ),
            leaves: self.leaves.map()?.read::<PrefixValue>(
                (slot * self.leaf_capacity) as usize,
                leaves.min(self.leaf_capacity) as usize,
            ),
        })
    }
}
