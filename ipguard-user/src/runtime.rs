//! Runtime entries (docs/policy.md §6): `ipguard allow ADDR --for 8h` and
//! `ipguard revoke ADDR`, `ipguard deny ADDR` and `ipguard undeny ADDR`.
//! Kept by the daemon in its state directory, written atomically, reloaded
//! at start, expired on time, merged into whatever policy file is current;
//! never written into that file.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{RuntimeEntry, RuntimeKind},
    state::write_atomic,
};

pub const RUNTIME_FILE: &str = "runtime.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeRecord {
    /// Absent in the files of versions before `deny`: an allow.
    #[serde(default)]
    pub kind: RuntimeKind,
    pub addr: IpNet,
    pub service: Option<String>,
    pub label: Option<String>,
    pub until: Option<Timestamp>,
    pub added_at: Timestamp,
}

#[derive(Debug)]
pub struct RuntimeStore {
    path: PathBuf,
    pub entries: Vec<RuntimeRecord>,
}

impl RuntimeStore {
    /// Loads the store; a missing file is an empty store, a corrupt one an
    /// error naming the file (the daemon must not silently forget grants or
    /// revocations).
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(RUNTIME_FILE);
        let entries = crate::state::read_list(&path, "the runtime allow and deny entries")?;
        Ok(Self { path, entries })
    }

    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.entries)?;
        write_atomic(&self.path, &json)
    }

    /// Adds (or replaces: same kind, address and service) an entry, in
    /// memory: the caller writes the datapath, then [`RuntimeStore::save`]s.
    pub fn allow(
        &mut self,
        addr: IpNet,
        duration: Option<Duration>,
        service: Option<String>,
        label: Option<String>,
        now: SystemTime,
    ) -> Result<RuntimeRecord> {
        let rec = record(RuntimeKind::Allow, addr, duration, service, label, now)?;
        self.add(vec![rec.clone()]);
        Ok(rec)
    }

    /// Adds runtime entries at once (a bulk `deny`), each replacing an
    /// entry of the same kind, address and service (of two in `recs`, the
    /// later wins); in memory, as [`RuntimeStore::allow`].
    pub fn add(&mut self, recs: Vec<RuntimeRecord>) {
        type Key = (RuntimeKind, IpNet, Option<String>);
        let key = |r: &RuntimeRecord| -> Key { (r.kind, r.addr, r.service.clone()) };
        let mut last: std::collections::HashMap<Key, usize> =
            std::collections::HashMap::with_capacity(recs.len());
        for (i, r) in recs.iter().enumerate() {
            last.insert(key(r), i);
        }
        self.entries.retain(|e| !last.contains_key(&key(e)));
        self.entries.extend(
            recs.into_iter()
                .enumerate()
                .filter(|(i, r)| last.get(&key(r)) == Some(i))
                .map(|(_, r)| r),
        );
    }

    /// Removes the runtime entries of `kind` for `addr` (revoke: allows;
    /// undeny: denies), in memory (as [`RuntimeStore::allow`]); returns how
    /// many.
    pub fn remove(&mut self, kind: RuntimeKind, addr: IpNet) -> usize {
        let before = self.entries.len();
        let addr = addr.trunc();
        self.entries.retain(|e| !(e.kind == kind && e.addr == addr));
        before - self.entries.len()
    }

    /// Drops the entries whose time is up; returns them.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<RuntimeRecord>> {
        let now = Timestamp::try_from(now).context("the clock is out of range")?;
        let (gone, kept): (Vec<_>, Vec<_>) = self
            .entries
            .drain(..)
            .partition(|e| e.until.is_some_and(|u| u <= now));
        self.entries = kept;
        if !gone.is_empty() {
            self.save()?;
        }
        Ok(gone)
    }

    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.entries
            .iter()
            .filter_map(|e| e.until)
            .min()
            .map(SystemTime::from)
    }

    /// The entries in the compiler's form.
    pub fn policy_entries(&self) -> Vec<RuntimeEntry> {
        self.entries
            .iter()
            .map(|e| RuntimeEntry {
                kind: e.kind,
                net: e.addr,
                service: e.service.clone(),
                label: e
                    .label
                    .clone()
                    .or_else(|| Some(format!("runtime entry added {}", e.added_at))),
                until: e.until.map(SystemTime::from),
            })
            .collect()
    }
}

/// A runtime entry of `kind` for `addr`, `duration` from `now` (None: until
/// removed).
pub fn record(
    kind: RuntimeKind,
    addr: IpNet,
    duration: Option<Duration>,
    service: Option<String>,
    label: Option<String>,
    now: SystemTime,
) -> Result<RuntimeRecord> {
    let now_ts = Timestamp::try_from(now).context("the clock is out of range")?;
    let until = match duration {
        Some(d) => {
            check_for(d).map_err(anyhow::Error::msg)?;
            let t = now
                .checked_add(d)
                .context("--for reaches past the clock's range")?;
            Some(Timestamp::try_from(t).context("--for reaches past the clock's range")?)
        }
        None => None,
    };
    Ok(RuntimeRecord {
        kind,
        addr: addr.trunc(),
        service,
        label,
        until,
        added_at: now_ts,
    })
}

/// The longest time-boxed runtime entry (3650 days): longer is meant to
/// stay, which is what an entry without `--for` does.
pub const MAX_FOR: Duration = Duration::from_secs(3650 * 86_400);
/// The longest `apply --confirm` wait: a day.
pub const MAX_CONFIRM_SECS: u64 = 86_400;

/// `--for` within [`MAX_FOR`]; the message is the one line a user sees.
pub fn check_for(d: Duration) -> Result<(), String> {
    if d > MAX_FOR {
        return Err(format!(
            "--for {}s is longer than a time-boxed entry may be (3650d): give a shorter time, or leave --for out for an entry that stays until revoked",
            d.as_secs()
        ));
    }
    Ok(())
}

/// `--confirm` from 1 s to [`MAX_CONFIRM_SECS`].
pub fn check_confirm(secs: u64) -> Result<(), String> {
    if secs == 0 || secs > MAX_CONFIRM_SECS {
        return Err(format!(
            "--confirm {secs} is out of range: give 1 to {MAX_CONFIRM_SECS} seconds"
        ));
    }
    Ok(())
}

/// `8h`, `90m`, `2s`, `1d`, `1h30m`: what operators type for `--for`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: use e.g. 30s, 15m, 8h, 2d or 1h30m");
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        any = true;
    }
    if !num.is_empty() || !any || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// An address or CIDR as `allow` and `revoke` take it (host bits cleared).
pub fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(n) = s.parse::<ipnet::IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| {
            format!("{s:?} is not an IP address or CIDR (e.g. 203.0.113.9 or 2001:db8::/64)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("8h"), Ok(Duration::from_secs(28_800)));
        assert!(parse_duration("8").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
        // Parsed (no overflow), then refused by range, never a panic.
        let huge = parse_duration("18446744073709551615s").unwrap();
        assert!(check_for(huge).unwrap_err().contains("3650d"), "{huge:?}");
        assert!(check_for(MAX_FOR).is_ok());
        assert!(check_confirm(0).is_err());
        assert!(check_confirm(u64::MAX).is_err());
        assert!(check_confirm(60).is_ok());
    }

    #[test]
    fn allow_expire_revoke_persist() {
        // Under the target directory, not the shared temp directory.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp")
            .join(format!("runtime-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let now = SystemTime::now();
        let mut st = RuntimeStore::load(&dir).unwrap();
        let a: IpNet = "203.0.113.9/32".parse().unwrap();
        let b: IpNet = "2001:db8::/64".parse().unwrap();
        st.allow(
            a,
            Some(Duration::from_secs(2)),
            None,
            Some("ticket 42".into()),
            now,
        )
        .unwrap();
        st.allow(b, None, Some("ssh".into()), None, now).unwrap();
        st.save().unwrap();
        let again = RuntimeStore::load(&dir).unwrap();
        assert_eq!(again.entries, st.entries, "survives a restart");
        assert_eq!(
            st.next_expiry()
                .unwrap()
                .duration_since(now)
                .unwrap()
                .as_secs(),
            2
        );
        assert!(st.expire(now + Duration::from_secs(1)).unwrap().is_empty());
        let gone = st.expire(now + Duration::from_secs(3)).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].addr, a);
        // A deny of the same address is an entry of its own; undeny and
        // revoke remove only their kind.
        st.add(vec![
            record(RuntimeKind::Deny, b, None, None, Some("x".into()), now).unwrap(),
            record(RuntimeKind::Deny, b, None, None, Some("y".into()), now).unwrap(),
        ]);
        assert_eq!(st.entries.len(), 2, "{:?}", st.entries);
        assert_eq!(st.entries[1].label.as_deref(), Some("y"), "the later wins");
        assert_eq!(st.remove(RuntimeKind::Deny, b), 1);
        assert_eq!(st.remove(RuntimeKind::Deny, b), 0);
        assert_eq!(st.remove(RuntimeKind::Allow, b), 1);
        st.save().unwrap();
        assert!(RuntimeStore::load(&dir).unwrap().entries.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
