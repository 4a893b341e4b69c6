//! Map writes of a slot: differences of the port table, the deciders,
//! the DHCP servers; reading a map back.

use super::*;

impl Maps {
    /// Makes a slot's deciders trie hold exactly `want`. The trie is small
    /// (at most `DECIDERS_*_CAPACITY`) and the slot inactive, so it is
    /// emptied and written again rather than diffed.
    pub(super) fn replace_deciders<const N: usize>(
        &self,
        trie: &LpmTrie<MapData, [u8; N], u32>,
        name: &'static str,
        want: &[(TrieKey<N>, u32)],
    ) -> Result<()>
    where
        [u8; N]: aya::Pod,
    {
        let key_size = 4 + N;
        let mut keys = Vec::new();
        for k in trie.keys() {
            let k: Key<[u8; N]> = k.map_err(map_err(name))?;
            key_bytes(
                &TrieKey {
                    data: k.data(),
                    len: k.prefix_len(),
                },
                &mut keys,
            );
        }
        self.delete(trie.map(), name, &keys, key_size)?;
        keys.clear();
        let mut values = Vec::with_capacity(want.len() * 4);
        for (k, v) in want {
            key_bytes(k, &mut keys);
            values.extend_from_slice(&v.to_ne_bytes());
        }
        self.update(trie.map(), name, &keys, key_size, &values, 4)
    }

    pub(super) fn sync_ports(&mut self, slot: u32, have: &[u8], want: &[u8]) -> Result<()> {
        let base = slot * PORT_SLOT_STRIDE;
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for (i, (h, w)) in have.iter().zip(want).enumerate() {
            if h != w {
                keys.extend_from_slice(&(base + i as u32).to_ne_bytes());
                values.push(*w);
            }
        }
        self.update(self.ports.map(), MAP_PORTS, &keys, 4, &values, 1)
    }

    /// Zeroes the hit counters of the first `entries` entries of `slot`
    /// (left from the policy before last).
    pub(super) fn reset_entry_hits(&mut self, slot: u32, entries: usize) -> Result<()> {
        let ncpu = cpus()?;
        let n = entries.min(ENTRY_CAPACITY as usize) as u32;
        let mut keys = Vec::with_capacity(n as usize * 4);
        for i in 0..n {
            keys.extend_from_slice(&(slot * ENTRY_CAPACITY + i).to_ne_bytes());
        }
        let values = vec![0u8; n as usize * 8 * ncpu];
        self.update(
            self.entry_hits.map(),
            MAP_ENTRY_HITS,
            &keys,
            4,
            &values,
            8 * ncpu,
        )
    }

    pub(super) fn update(
        &self,
        map: &MapData,
        name: &'static str,
        keys: &[u8],
        key_size: usize,
        values: &[u8],
        value_size: usize,
    ) -> Result<()> {
        let n = keys.len() / key_size;
        if n == 0 {
            return Ok(());
        }
        let fd = map.fd().as_fd().as_raw_fd();
        if self.batch {
            match sys::update(fd, keys, key_size, values, value_size) {
                Ok(()) => return Ok(()),
                Err(e) if sys::unsupported(&e) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name,
                        op: "BPF_MAP_UPDATE_BATCH",
                        source,
                    });
                }
            }
        }
        for i in 0..n {
            sys::update_one(
                fd,
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            )
            .map_err(|source| DatapathError::MapIo {
                name,
                op: "BPF_MAP_UPDATE_ELEM",
                source,
            })?;
        }
        Ok(())
    }

    pub(super) fn delete(
        &self,
        map: &MapData,
        name: &'static str,
        keys: &[u8],
        key_size: usize,
    ) -> Result<()> {
        let n = keys.len() / key_size;
        if n == 0 {
            return Ok(());
        }
        let fd = map.fd().as_fd().as_raw_fd();
        if self.batch {
            match sys::delete(fd, keys, key_size) {
                Ok(()) => return Ok(()),
                Err(e) if sys::unsupported(&e) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name,
                        op: "BPF_MAP_DELETE_BATCH",
                        source,
                    });
                }
            }
        }
        for i in 0..n {
            match sys::delete_one(fd, &keys[i * key_size..(i + 1) * key_size]) {
                Ok(()) => {}
                // Already gone: the goal is reached.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(DatapathError::MapIo {
                        name,
                        op: "BPF_MAP_DELETE_ELEM",
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Maps {
    /// Replaces a slot's DHCP servers; returns how many it wrote.
    pub(super) fn write_dhcp_servers(
        &mut self,
        slot: u32,
        servers: &[(u8, [u8; 16], u8)],
    ) -> Result<u32> {
        if servers.len() > MAX_DHCP_SERVERS as usize {
            return Err(DatapathError::Capacity {
                family: "DHCP server",
                need: servers.len(),
                capacity: MAX_DHCP_SERVERS,
                fix: "name fewer DHCP servers",
            });
        }
        let old: Vec<Key<[u8; 18]>> = self
            .dhcp
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data()[0] == slot as u8)
            .collect();
        for k in old {
            match self.dhcp.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_DHCP_SERVERS)(e)),
            }
        }
        for &(family, addr, len) in servers {
            let key = Key::new(
                DHCP_KEY_BITS + u32::from(len),
                dhcp_key(slot, family, &addr),
            );
            self.dhcp
                .insert(&key, 1, 0)
                .map_err(map_err(MAP_DHCP_SERVERS))?;
        }
        Ok(servers.len() as u32)
    }
}

/// Every key and value of a map, as raw bytes.
pub(super) fn dump(
    map: &MapData,
    name: &'static str,
    key_size: usize,
    value_size: usize,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let fd = map.fd().as_fd().as_raw_fd();
    sys::lookup_all(fd, key_size, value_size).map_err(|source| DatapathError::MapIo {
        name,
        op: "BPF_MAP_LOOKUP_BATCH",
        source,
    })
}
