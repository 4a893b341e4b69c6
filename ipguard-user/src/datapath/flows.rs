//! The flow table of return traffic: reading, pruning, its figures.

use super::*;

impl Maps {
    /// Every flow in the map (the key; see [`FlowKey`]).
    pub fn flows(&self) -> Result<Vec<(FlowKey, u64)>> {
        const KEY: usize = std::mem::size_of::<FlowKey>();
        match dump(self.flows.map(), MAP_FLOWS, KEY, 8) {
            Ok((keys, values)) => Ok(keys
                .chunks_exact(KEY)
                .zip(values.chunks_exact(8))
                .map(|(k, v)| {
                    // SAFETY: FlowKey is Pod (integers only, no padding),
                    // and `k` holds exactly its size.
                    let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<FlowKey>()) };
                    let mut t = [0u8; 8];
                    t.copy_from_slice(v);
                    (key, u64::from_ne_bytes(t))
                })
                .collect()),
            // Kernels without batched lookups, or a hash bucket larger
            // than a batch (ENOSPC): walk the keys.
            Err(_) => self
                .flows
                .iter()
                .filter_map(|r| match r {
                    Ok(kv) => Some(Ok(kv)),
                    // Evicted between the key and its value.
                    Err(aya::maps::MapError::KeyNotFound) => None,
                    Err(e) => Some(Err(DatapathError::Map {
                        name: MAP_FLOWS,
                        source: e,
                    })),
                })
                .collect(),
        }
    }

    /// Capacity, live entries and the counts behind evictions.
    pub fn flow_stats(&self) -> Result<FlowStats> {
        let live = self.flows()?.len() as u64;
        let created = Self::sum(&self.counters, MAP_COUNTERS, COUNTER_FLOWS_CREATED)?;
        let deleted = Self::sum(&self.counters, MAP_COUNTERS, COUNTER_FLOWS_DELETED)?;
        Ok(FlowStats {
            capacity: self.capacities().flows,
            live,
            created,
            deleted,
            not_recorded: Self::sum(&self.counters, MAP_COUNTERS, COUNTER_FLOWS_NOT_RECORDED)?,
            evicted: created.saturating_sub(deleted).saturating_sub(live),
        })
    }

    /// Deletes the flows `doomed` picks; returns how many it deleted (a
    /// flow evicted meanwhile is not counted) and adds them to
    /// [`COUNTER_FLOWS_DELETED`].
    pub fn delete_flows(&mut self, mut doomed: impl FnMut(&FlowKey) -> bool) -> Result<u64> {
        let fd = self.flows.map().fd().as_fd().as_raw_fd();
        let mut n = 0u64;
        for (key, _) in self.flows()? {
            if !doomed(&key) {
                continue;
            }
            // SAFETY: FlowKey is Pod: its bytes are its whole value.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&key as *const FlowKey).cast::<u8>(),
                    std::mem::size_of::<FlowKey>(),
                )
            };
            match sys::delete_one(fd, bytes) {
                Ok(()) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name: MAP_FLOWS,
                        op: "BPF_MAP_DELETE_ELEM",
                        source,
                    });
                }
            }
        }
        if n > 0 {
            self.add_user_counter(COUNTER_FLOWS_DELETED, n)?;
        }
        Ok(n)
    }

    /// Adds to a counter only user space writes, kept in CPU 0's slot.
    pub(super) fn add_user_counter(&mut self, index: u32, n: u64) -> Result<()> {
        let mut values = self
            .counters
            .get(&index, 0)
            .map_err(map_err(MAP_COUNTERS))?;
        let mut all: Vec<u64> = values.iter().copied().collect();
        if let Some(first) = all.first_mut() {
            *first = first.saturating_add(n);
        }
        values = aya::maps::PerCpuValues::try_from(all).map_err(|source| DatapathError::MapIo {
            name: MAP_COUNTERS,
            op: "per-CPU values",
            source,
        })?;
        self.counters
            .set(index, values, 0)
            .map_err(map_err(MAP_COUNTERS))
    }

    pub(super) fn reset_flow_counters(&mut self) -> Result<()> {
        let n = cpus()?;
        for index in [
            COUNTER_FLOWS_CREATED,
            COUNTER_FLOWS_DELETED,
            COUNTER_FLOWS_NOT_RECORDED,
        ] {
            let zero = aya::maps::PerCpuValues::try_from(vec![0u64; n]).map_err(|source| {
                DatapathError::MapIo {
                    name: MAP_COUNTERS,
                    op: "per-CPU values",
                    source,
                }
            })?;
            self.counters
                .set(index, zero, 0)
                .map_err(map_err(MAP_COUNTERS))?;
        }
        Ok(())
    }
}

/// The flow table in numbers. `evicted` is exact: every flow that left the
/// map without the daemon deleting it was evicted by a newer one (LRU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowStats {
    pub capacity: u32,
    pub live: u64,
    pub created: u64,
    pub deleted: u64,
    pub evicted: u64,
    /// Flows the kernel found no free element for.
    pub not_recorded: u64,
}
