//! The two policy slots: writing a compiled policy into the inactive one
//! and flipping the active index.

use super::*;

/// The pinned maps, opened by path: used by the daemon and by `status`
/// when no daemon runs.
pub struct Maps {
    pub pin_dir: PathBuf,
    /// The IPv4 lookup's arrays, mapped.
    pub(super) lookup4: Lookup4,
    /// The IPv6 lookup's arrays, mapped.
    pub(super) lookup6: Lookup6,
    pub(super) dec_v4: [LpmTrie<MapData, [u8; 5], u32>; 2],
    pub(super) dec_v6: [LpmTrie<MapData, [u8; 17], u32>; 2],
    pub(super) ports: Array<MapData, u8>,
    pub(super) config: Array<MapData, PolicyConfig>,
    pub(super) active: Array<MapData, u32>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) svc_counters: PerCpuArray<MapData, u64>,
    pub(super) entry_hits: PerCpuArray<MapData, u64>,
    pub(super) flows: aya::maps::HashMap<MapData, FlowKey, u64>,
    pub(super) dhcp: LpmTrie<MapData, [u8; 18], u8>,
    /// What this process last wrote into each slot.
    pub(super) shadow: [Option<Shadow>; 2],
    /// Batched map writes (`BPF_MAP_*_BATCH`); false writes one element
    /// per syscall (kept to measure the difference, and as a fallback).
    pub(super) batch: bool,
}

pub(super) fn open_map(pin_dir: &Path, name: &'static str) -> Result<Map> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Err(DatapathError::NotLoaded(pin_dir.to_path_buf()));
    }
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {{
        let name: &'static str = $name;
        open_map($dir, name)?.try_into().map_err(map_err(name))?
    }};
}

/// This network namespace's ephemeral port range
/// (`net.ipv4.ip_local_port_range`, which IPv6 uses too), read at every
/// apply so a changed range takes effect with the next policy. Linux's
/// default when the file cannot be read.
pub fn ephemeral_ports() -> (u16, u16) {
    const LINUX_DEFAULT: (u16, u16) = (32_768, 60_999);
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return LINUX_DEFAULT;
    };
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if a <= b => (a, b),
        _ => LINUX_DEFAULT,
    }
}

/// Per-slot numbers written by the last apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyStats {
    pub slot: u32,
    pub generation: u64,
    pub v4: usize,
    pub v6: usize,
}

/// An image's LPM key as bytes in the kernel's layout (`struct
/// bpf_lpm_trie_key_u8`: the prefix length, then the data).
pub(super) fn key_bytes<const N: usize>(k: &TrieKey<N>, out: &mut Vec<u8>) {
    out.extend_from_slice(&k.len.to_ne_bytes());
    out.extend_from_slice(&k.data);
}

/// A slot's contents as this process last wrote (or read) them, valid while
/// the slot's config still carries `generation` (generations only grow, so
/// any other writer would have changed it).
pub(super) struct Shadow {
    pub(super) generation: u64,
    pub(super) ports: Vec<u8>,
}

impl Maps {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            lookup4: Lookup4::open(pin_dir)?,
            lookup6: Lookup6::open(pin_dir)?,
            dec_v4: [
                typed!(pin_dir, MAP_DECIDERS_V4[0]),
                typed!(pin_dir, MAP_DECIDERS_V4[1]),
            ],
            dec_v6: [
                typed!(pin_dir, MAP_DECIDERS_V6[0]),
                typed!(pin_dir, MAP_DECIDERS_V6[1]),
            ],
            ports: typed!(pin_dir, MAP_PORTS),
            config: typed!(pin_dir, MAP_CONFIG),
            active: typed!(pin_dir, MAP_ACTIVE),
            counters: typed!(pin_dir, MAP_COUNTERS),
            svc_counters: typed!(pin_dir, MAP_SERVICE_COUNTERS),
            entry_hits: typed!(pin_dir, MAP_ENTRY_HITS),
            flows: typed!(pin_dir, MAP_FLOWS),
            dhcp: typed!(pin_dir, MAP_DHCP_SERVERS),
            shadow: [None, None],
            batch: true,
        })
    }

    /// Records that both slots are as the kernel created them (all zero,
    /// generation 0), so that the first apply into each reads nothing back:
    /// reading a slot's port table (131,072 elements, one by one in the
    /// kernel's generic batch lookup) took 60 ms of a 100 ms first apply.
    /// Only for maps this process created; reused pins are read.
    pub(super) fn slots_created_empty(&mut self) -> Result<()> {
        for slot in 0..SLOTS {
            let generation = self.config(slot)?.generation;
            if generation == 0 {
                self.shadow[slot as usize] = Some(Shadow {
                    generation,
                    ports: vec![0u8; PORT_SLOT_STRIDE as usize],
                });
            }
        }
        Ok(())
    }

    /// Chooses batched (default) or per-element map writes.
    pub fn set_batch_writes(&mut self, on: bool) {
        self.batch = on;
    }

    pub fn active_slot(&self) -> Result<u32> {
        Ok(self.active.get(&0, 0).map_err(map_err(MAP_ACTIVE))? & 1)
    }

    pub fn config(&self, slot: u32) -> Result<PolicyConfig> {
        self.config.get(&slot, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Writes `policy` into the inactive slot, then makes it live with one
    /// write of the active index.
    ///
    /// The inactive slot was live until the previous apply; before touching
    /// it, [`wait_for_readers`] waits for an RCU grace period, after which
    /// no XDP or TC run that read the old index is still going (both run
    /// inside RCU read-side sections). Only the difference to what the slot
    /// held is written of the port table; the lookups' tables are copied
    /// whole into arrays allocated at load, so nothing large is ever freed
    /// nor allocated.
    pub fn apply(&mut self, policy: &CompiledPolicy) -> Result<ApplyStats> {
        // What the slot must hold, by the one function that lays a policy
        // out for the kernel; from here on only differences are written
        // (the lookup tables are copied whole: a few milliseconds).
        let image = SlotImage::build(policy);
        self.lookup4.check_fits(&image.range4, image.v4_prefixes)?;
        self.lookup6.check_fits(&image.range6, image.v6_prefixes)?;
        let active = self.active_slot()?;
        let slot = 1 - active;
        let s = slot as usize;
        wait_for_readers();
        let generation = self
            .config(active)?
            .generation
            .max(self.config(slot)?.generation)
            + 1;

        let old = match self.shadow[s].take() {
            Some(sh) if sh.generation == self.config(slot)?.generation => sh,
            _ => self.read_slot(slot)?,
        };
        // Until the config carries the new generation the slot's contents
        // are unknown to the shadow (an error below leaves it None).
        let (r4_range_base, r4_leaf_base) = self.lookup4.write(slot, &image.range4)?;
        let (r6_node_base, r6_leaf_base) = self.lookup6.write(slot, &image.range6)?;
        self.sync_ports(slot, &old.ports, &image.ports)?;
        let names = (MAP_DECIDERS_V4[s], MAP_DECIDERS_V6[s]);
        self.replace_deciders(&self.dec_v4[s], names.0, &image.deciders_v4)?;
        self.replace_deciders(&self.dec_v6[s], names.1, &image.deciders_v6)?;
        self.reset_entry_hits(slot, policy.entries.len())?;
        let dhcp_servers = self.write_dhcp_servers(slot, &image.dhcp)?;
        let mut cfg = image.config;
        cfg.generation = generation;
        (cfg.ephemeral_first, cfg.ephemeral_last) = ephemeral_ports();
        cfg.dhcp_servers = dhcp_servers;
        cfg.format = TABLE_FORMAT;
        cfg.r4_range_base = r4_range_base;
        cfg.r4_leaf_base = r4_leaf_base;
        cfg.r4_frequent = image.range4.frequent;
        // Within the capacities checked above, which are u32.
        cfg.v4_prefixes = image.v4_prefixes as u32;
        cfg.r4_ranges = image.range4.ranges.len() as u32;
        cfg.r4_leaves = image.range4.leaves.len() as u32;
        cfg.timed_leaves = policy.timed.len() as u32;
        cfg.v6_prefixes = image.v6_prefixes as u32;
        cfg.r6_node_base = r6_node_base;
        cfg.r6_leaf_base = r6_leaf_base;
        cfg.r6_nodes = image.range6.nodes.len() as u32;
        cfg.r6_leaves = image.range6.leaves.len() as u32;
        cfg.r6_window = image.range6.window;
        cfg.r6_frequent = image.range6.frequent;
        cfg.unix_at_boot_ns = super::sys::unix_at_boot_ns();
        self.config.set(slot, cfg, 0).map_err(map_err(MAP_CONFIG))?;
        // x86 keeps stores in order, so a reader that sees the new index
        // sees the slot written before it. Weaker memory models get an
        // explicit full barrier on every CPU first.
        if !cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
            wait_for_readers();
        }
        // The switch: from here on every packet reads the new slot.
        self.active.set(0, slot, 0).map_err(map_err(MAP_ACTIVE))?;
        let stats = ApplyStats {
            slot,
            generation,
            v4: image.v4_prefixes,
            v6: image.v6_prefixes,
        };
        self.shadow[s] = Some(Shadow {
            generation,
            ports: image.ports,
        });
        Ok(stats)
    }

    /// Reads what a slot holds (a daemon taking over, or another writer).
    pub(super) fn read_slot(&self, slot: u32) -> Result<Shadow> {
        let all = dump(self.ports.map(), MAP_PORTS, 4, 1)?;
        let mut ports = vec![0u8; PORT_SLOT_STRIDE as usize];
        let base = slot * PORT_SLOT_STRIDE;
        for (k, v) in all.0.chunks_exact(4).zip(all.1) {
            let k = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
            if (base..base + PORT_SLOT_STRIDE).contains(&k) {
                ports[(k - base) as usize] = v;
            }
        }
        Ok(Shadow {
            generation: self.config(slot)?.generation,
            ports,
        })
    }
}

/// Waits until every XDP and TC program run that may have read the slot
/// index before now has finished: membarrier(MEMBARRIER_CMD_GLOBAL) is
/// synchronize_rcu() from user space, and BPF programs attached to network
/// hooks run inside RCU read-side sections. About one grace period (a few
/// milliseconds), paid once per policy swap.
pub fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory
    // of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
        )
    };
    if r != 0 {
        thread::sleep(SLOT_GRACE);
    }
}
