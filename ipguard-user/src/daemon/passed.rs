//! The sources the datapath passed recently, from its sample
//! (`ipguard_common::PassSample`: the first passed packet of each reason
//! and CPU and one in `PASS_SAMPLE_EVERY` after it), read once a second
//! and kept for `KEEP_FOR`, at most `KEEP` of them: with the refused
//! sources and the established sessions, what `diff` and `apply --dry-run`
//! judge a new policy on.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use ipguard_common::{IPPROTO_TCP, IPPROTO_UDP, MAP_PASS_SAMPLE, PASS_SAMPLE_LEN, PassSample};
use tokio::sync::Mutex;

use crate::policy::Proto;

/// Distinct (source, port) pairs kept.
pub const KEEP: usize = 1024;
/// How long a pair stays after it was last sampled.
pub const KEEP_FOR: Duration = Duration::from_secs(15 * 60);
const POLL: Duration = Duration::from_secs(1);

/// A passed packet as `diff` judges it again: its source and, for TCP and
/// UDP, its destination port.
pub type Seen = (IpAddr, Option<(Proto, u16)>);

#[derive(Default)]
pub struct Passed {
    last: HashMap<Seen, Instant>,
    /// The sequence last read per CPU and slot: a slot not written since
    /// is not a new sample.
    read: HashMap<(usize, u32), u64>,
}

/// What a sample says was passed.
pub fn seen_of(s: &PassSample) -> Seen {
    // The program samples IPv4 and IPv6 packets only.
    let src =
        crate::datapath::map_addr(s.family, &s.src).unwrap_or(IpAddr::V6(Ipv6Addr::from(s.src)));
    let port = match s.protocol {
        IPPROTO_TCP => Some((Proto::Tcp, s.dport)),
        IPPROTO_UDP => Some((Proto::Udp, s.dport)),
        _ => None,
    };
    (src, port)
}

impl Passed {
    /// Takes the samples of one read: (CPU, slot, sample).
    pub fn absorb(&mut self, samples: impl IntoIterator<Item = (usize, u32, PassSample)>) {
        let now = Instant::now();
        for (cpu, slot, s) in samples {
            if s.seq == 0 || self.read.insert((cpu, slot), s.seq) == Some(s.seq) {
                continue;
            }
            self.last.insert(seen_of(&s), now);
        }
        self.last.retain(|_, t| now.duration_since(*t) < KEEP_FOR);
        if self.last.len() > KEEP {
            let mut by_age: Vec<(Seen, Instant)> = self.last.drain().collect();
            by_age.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            by_age.truncate(KEEP);
            self.last = by_age.into_iter().collect();
        }
    }

    /// The pairs kept, most recently sampled first.
    pub fn recent(&self) -> Vec<Seen> {
        let mut v: Vec<(&Seen, &Instant)> = self.last.iter().collect();
        v.sort_by_key(|(_, t)| std::cmp::Reverse(**t));
        v.into_iter().map(|(s, _)| *s).collect()
    }
}

/// The pinned sample of the datapath under `pin_dir` (None for one
/// pinned by an older ipguard, which has none).
pub fn open(pin_dir: &Path) -> Option<PerCpuArray<MapData, PassSample>> {
    let m = MapData::from_pin(pin_dir.join(MAP_PASS_SAMPLE)).ok()?;
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(m)).ok()
}

/// Every sample of the pinned map: (CPU, slot, sample).
pub fn read(map: &PerCpuArray<MapData, PassSample>) -> Vec<(usize, u32, PassSample)> {
    let mut out = Vec::new();
    for slot in 0..PASS_SAMPLE_LEN {
        if let Ok(values) = map.get(&slot, 0) {
            out.extend(values.iter().enumerate().map(|(cpu, s)| (cpu, slot, *s)));
        }
    }
    out
}

/// Reads the pinned sample once a second into `passed`. A datapath pinned
/// by an older ipguard has no sample: then nothing is read, and `diff`
/// judges refused sources and sessions only.
pub fn spawn_reader(pin_dir: &Path, passed: Arc<Mutex<Passed>>) {
    let Some(map) = open(pin_dir) else {
        tracing::warn!(
            "the datapath has no pass sample: diff judges refused sources and sessions only"
        );
        return;
    };
    tokio::spawn(async move {
        let map = Arc::new(map);
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let m = map.clone();
            // 64 lookups of a per-CPU map: off the event loop.
            let Ok(samples) = tokio::task::spawn_blocking(move || read(&m)).await else {
                return;
            };
            passed.lock().await.absorb(samples);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipguard_common::FAMILY_V4;

    fn sample(seq: u64, last: u8, port: u16) -> PassSample {
        let mut src = [0; 16];
        src[..4].copy_from_slice(&[203, 0, 113, last]);
        PassSample {
            seq,
            src,
            dport: port,
            family: FAMILY_V4,
            protocol: IPPROTO_UDP,
            ..Default::default()
        }
    }

    #[test]
    fn new_samples_are_kept_once_and_bounded() {
        let mut p = Passed::default();
        p.absorb([(0, 0, sample(1, 9, 5000)), (1, 0, sample(0, 1, 1))]);
        let seen: Seen = ("203.0.113.9".parse().unwrap(), Some((Proto::Udp, 5000)));
        assert_eq!(p.recent(), [seen], "a never-written slot is no sample");
        // The same slot read again unchanged: nothing new.
        p.absorb([(0, 0, sample(1, 9, 5000))]);
        assert_eq!(p.recent().len(), 1);
        // More distinct pairs than KEEP: the newest KEEP stay.
        let many: Vec<_> = (0..KEEP as u64 + 10)
            .map(|i| (2, (i % 64) as u32, sample(i + 2, (i % 250) as u8, i as u16)))
            .collect();
        for chunk in many.chunks(64) {
            p.absorb(chunk.to_vec());
        }
        assert_eq!(p.recent().len(), KEEP);
    }
}
