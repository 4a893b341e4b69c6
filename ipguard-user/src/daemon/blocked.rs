//! Relayed events and the table of refused sources (`ipguard blocked`,
//! `status`'s top_blocked): what an operator looks at to decide whom to
//! allow.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use crate::{
    policy::CompiledPolicy,
    protocol::{BlockedSource, EventLine},
};
use ipguard_common::*;

/// Sources kept in the table; the least recently refused go first.
const MAX_SOURCES: usize = 10_000;
/// Events kept for `ipguard events` without --follow.
const RECENT_EVENTS: usize = 1_000;

fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC is what
    // bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl EventLine {
    pub fn from_event(ev: &DropEvent, compiled: &CompiledPolicy) -> Self {
        let age = monotonic_now_ns().saturating_sub(ev.timestamp_ns);
        let when = SystemTime::now() - Duration::from_nanos(age);
        // The program writes IPv4 or IPv6 events only.
        let src = crate::datapath::map_addr(ev.family, &ev.src)
            .unwrap_or(IpAddr::V6(Ipv6Addr::from(ev.src)));
        let protocol = match ev.protocol {
            IPPROTO_TCP => "tcp".to_string(),
            IPPROTO_UDP => "udp".to_string(),
            IPPROTO_ICMP => "icmp".to_string(),
            IPPROTO_ICMPV6 => "icmpv6".to_string(),
            p => format!("ip/{p}"),
        };
        let service = compiled
            .services
            .iter()
            .find(|s| s.index == ev.service && ev.service != 0)
            .map(|s| s.name.clone());
        let entry = compiled.entries.get(ev.entry as usize);
        Self {
            time: jiff::Timestamp::try_from(when)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            iface: ifname(ev.ifindex),
            src,
            protocol,
            dport: (ev.protocol == IPPROTO_TCP || ev.protocol == IPPROTO_UDP).then_some(ev.dport),
            service,
            verdict: verdict_name(ev.verdict).to_string(),
            reason: reason_name(ev.reason).to_string(),
            entry: entry.map(|e| e.text.to_string()),
            label: entry.and_then(|e| e.label.map(str::to_string)),
            suppressed: ev.suppressed,
        }
    }
}

#[derive(Default)]
pub struct Blocked {
    sources: HashMap<IpAddr, BlockedSource>,
    recent: VecDeque<EventLine>,
    seq: u64,
}

impl Blocked {
    pub fn record(&mut self, ev: &EventLine) {
        self.seq += 1;
        let seq = self.seq;
        let e = self.sources.entry(ev.src).or_insert_with(|| BlockedSource {
            src: ev.src,
            count: 0,
            first_seen: ev.time.clone(),
            last_seen: ev.time.clone(),
            service: ev.service.clone(),
            status: Default::default(),
            last_seq: seq,
        });
        e.count += 1 + ev.suppressed;
        e.last_seen = ev.time.clone();
        e.last_seq = seq;
        if ev.service.is_some() {
            e.service = ev.service.clone();
        }
        if self.sources.len() > MAX_SOURCES
            && let Some(oldest) = self
                .sources
                .values()
                .min_by_key(|s| s.last_seq)
                .map(|s| s.src)
        {
            self.sources.remove(&oldest);
        }
        self.recent.push_back(ev.clone());
        if self.recent.len() > RECENT_EVENTS {
            self.recent.pop_front();
        }
    }

    /// The `n` sources refused most.
    pub fn top(&self, n: usize) -> Vec<BlockedSource> {
        let mut v: Vec<BlockedSource> = self.sources.values().cloned().collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.src.cmp(&b.src)));
        v.truncate(n);
        v
    }

    pub fn recent(&self) -> Vec<EventLine> {
        self.recent.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(src: &str, suppressed: u64) -> EventLine {
        EventLine {
            time: "2026-11-22T10:00:00Z".into(),
            iface: "eth0".into(),
            src: src.parse().unwrap(),
            protocol: "tcp".into(),
            dport: Some(22),
            service: Some("ssh".into()),
            verdict: "drop".into(),
            reason: "not_allowed".into(),
            entry: None,
            label: None,
            suppressed,
        }
    }

    #[test]
    fn counts_include_suppressed_and_rank() {
        let mut b = Blocked::default();
        b.record(&line("203.0.113.9", 0));
        b.record(&line("203.0.113.9", 4));
        b.record(&line("2001:db8::9", 0));
        let top = b.top(10);
        assert_eq!(top[0].src, "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(top[0].count, 6);
        assert_eq!(top[1].count, 1);
        assert_eq!(b.recent().len(), 3);
    }
}
