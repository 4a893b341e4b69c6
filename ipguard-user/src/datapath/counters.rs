//! Counters read from the per-CPU maps, and capacities.

use super::*;

impl Maps {
    /// Sum over CPUs of one counter.
    pub(super) fn sum(
        map: &PerCpuArray<MapData, u64>,
        name: &'static str,
        index: u32,
    ) -> Result<u64> {
        Ok(map.get(&index, 0).map_err(map_err(name))?.iter().sum())
    }

    /// The verdict x reason matrix and the event counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_LEN)
            .map(|i| Self::sum(&self.counters, MAP_COUNTERS, i))
            .collect()
    }

    /// (passed, refused) per service index 0..=63 (0: no service).
    pub fn service_counters(&self) -> Result<Vec<(u64, u64)>> {
        (0..=MAX_SERVICES as u32)
            .map(|s| {
                Ok((
                    Self::sum(&self.svc_counters, MAP_SERVICE_COUNTERS, s * 2)?,
                    Self::sum(&self.svc_counters, MAP_SERVICE_COUNTERS, s * 2 + 1)?,
                ))
            })
            .collect()
    }

    /// Hits of the first `n` entries of `slot`.
    pub fn entry_hits(&self, slot: u32, n: usize) -> Result<Vec<u64>> {
        (0..n.min(ENTRY_CAPACITY as usize) as u32)
            .map(|i| Self::sum(&self.entry_hits, MAP_ENTRY_HITS, slot * ENTRY_CAPACITY + i))
            .collect()
    }

    /// The IPv4 lookup table a slot holds, as its config sizes it.
    pub fn range_table_v4(&self, slot: u32) -> Result<crate::policy::range4::RangeTable4> {
        let c = self.config(slot)?;
        self.lookup4
            .read(slot, c.r4_ranges, c.r4_leaves, c.r4_frequent)
    }

    /// The IPv6 lookup tree a slot holds, as its config sizes it.
    pub fn range_table_v6(&self, slot: u32) -> Result<crate::policy::range6::RangeTable6> {
        let c = self.config(slot)?;
        self.lookup6
            .read(slot, c.r6_nodes, c.r6_leaves, c.r6_window, c.r6_frequent)
    }

    /// Kernel memory of the source lookup, with `slot`'s policy.
    pub fn memory(&self, slot: u32) -> crate::protocol::Memory {
        let c = self.config(slot).unwrap_or_default();
        crate::protocol::Memory {
            ipv4_allocated: self.lookup4.allocated(),
            ipv4_policy: r4_table_bytes(c.r4_ranges, c.r4_leaves),
            ipv6_allocated: self.lookup6.allocated(),
            ipv6_policy: r6_table_bytes(c.r6_nodes, c.r6_leaves),
            deadline_leaves: u64::from(c.timed_leaves),
        }
    }

    /// Number of prefixes in a slot, as its config says.
    pub fn prefix_counts(&self, slot: u32) -> (usize, usize) {
        self.config(slot)
            .map_or((0, 0), |c| (c.v4_prefixes as usize, c.v6_prefixes as usize))
    }

    pub fn capacities(&self) -> Capacities {
        Capacities {
            v4: self.lookup4.prefix_capacity(),
            v6: self.lookup6.prefix_capacity(),
            flows: self
                .flows
                .map()
                .info()
                .map(|i| i.max_entries())
                .unwrap_or(0),
        }
    }
}
