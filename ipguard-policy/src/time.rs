//! Time windows (`when`) and the other time values of a policy.
//!
//! A window is judged on the wall clock of its time zone: "22:00-06:00,
//! mon-fri, Europe/Helsinki" is active whenever a clock in Helsinki shows a
//! time from 22:00 to 05:59 and the window started on a weekday. On the
//! night clocks jump forward, a window whose start does not exist that day
//! opens when the clock jumps past it; on the night they fall back, the
//! repeated hour is inside the window both times.

use std::time::Duration;

use jiff::{
    Timestamp,
    civil::{Date, DateTime, Time, Weekday},
    tz::{AmbiguousOffset, TimeZone},
};

/// `when: { days, time, tz }`.
#[derive(Clone, Debug)]
pub struct Window {
    /// Bit 0 Monday .. bit 6 Sunday: the days on which the window starts.
    pub days: u8,
    /// Minutes after local midnight, `start` in 0..1440, `end` in 0..=1440.
    /// `end <= start` (other than 1440) means the window crosses midnight
    /// and ends the next day.
    pub start: u16,
    pub end: u16,
    pub tz: TimeZone,
    pub tz_name: String,
}

pub const ALL_DAYS: u8 = 0x7f;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_FULL: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn day_index(s: &str) -> Option<u8> {
    let l = s.trim().to_ascii_lowercase();
    (0..7u8).find(|&i| DAY_NAMES[i as usize] == l || DAY_FULL[i as usize] == l)
}

/// `mon`, `mon-fri`, `fri-mon` (wraps over the weekend): a bit mask.
pub(crate) fn parse_days(item: &str) -> Result<u8, String> {
    let bad = |d: &str| {
        format!(
            "{item:?}: {:?} is not a day (mon, tue, wed, thu, fri, sat, sun)",
            d.trim()
        )
    };
    match item.split_once('-') {
        None => day_index(item).map(|d| 1 << d).ok_or_else(|| bad(item)),
        Some((a, b)) => {
            let a = day_index(a).ok_or_else(|| bad(a))?;
            let b = day_index(b).ok_or_else(|| bad(b))?;
            let mut mask = 0u8;
            let mut d = a;
            loop {
                mask |= 1 << d;
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
            Ok(mask)
        }
    }
}

fn parse_hhmm(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    if !h.bytes().chain(m.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    if m > 59 {
        return None;
    }
    if h == 24 && m == 0 && allow_24 {
        return Some(1440);
    }
    (h < 24).then_some(h * 60 + m)
}

/// `HH:MM-HH:MM`; `24:00` may end a window. Returns (start, end) minutes.
pub(crate) fn parse_time_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a time window: write HH:MM-HH:MM, e.g. \"22:00-06:00\"");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start = parse_hhmm(a, false).ok_or_else(bad)?;
    let end = parse_hhmm(b, true).ok_or_else(bad)?;
    if start == end {
        return Err(format!(
            "{s:?} is an empty time window: for the whole day leave `time` out or write \"00:00-24:00\""
        ));
    }
    Ok((start, end))
}

/// An IANA zone from the system's database, or from the copy built into
/// ipguard when the host has none (minimal containers).
pub(crate) fn time_zone(name: &str) -> Result<TimeZone, String> {
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    jiff::tz::db()
        .get(name)
        .or_else(|_| jiff::tz::TimeZoneDatabase::bundled().get(name))
        .map_err(|_| {
            format!(
                "{name:?} is not a known time zone (an IANA name such as Europe/Helsinki, or UTC)"
            )
        })
}

/// RFC 3339, e.g. `2026-12-01T00:00:00Z` or `2026-12-01T02:00:00+02:00`.
pub(crate) fn parse_until(s: &str) -> Result<Timestamp, String> {
    let t = s.trim();
    // jiff also accepts RFC 9557 annotations and lowercase separators; the
    // spec promises RFC 3339, so anything with a bracket is refused.
    if t.contains('[') {
        return Err(bad_until(s));
    }
    t.parse::<Timestamp>().map_err(|_| bad_until(s))
}

fn bad_until(s: &str) -> String {
    format!("{s:?} is not an RFC 3339 time: write e.g. 2026-12-01T00:00:00Z")
}

/// `120s`, `2m`, `1h30m`, `500ms`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: write e.g. 120s, 2m or 1h30m");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let n_len = rest.bytes().take_while(|c| c.is_ascii_digit()).count();
        if n_len == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..n_len].parse().map_err(|_| bad())?;
        rest = &rest[n_len..];
        let u_len = rest.bytes().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit_ms: u64 = match &rest[..u_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[u_len..];
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(Duration::from_millis(total))
}

fn weekday_index(w: Weekday) -> u8 {
    // Monday is 1 .. Sunday 7 in jiff's numbering.
    (w.to_monday_one_offset() - 1) as u8
}

impl Window {
    /// Whether the window is open at `t`.
    pub fn contains(&self, t: Timestamp) -> bool {
        let local = t.to_zoned(self.tz.clone()).datetime();
        let wd = weekday_index(local.weekday());
        let secs = i32::from(local.hour()) * 3600
            + i32::from(local.minute()) * 60
            + i32::from(local.second());
        let start = i32::from(self.start) * 60;
        let end = i32::from(self.end) * 60;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(wd) && start <= secs && secs < end
        } else {
            let yesterday = (wd + 6) % 7;
            (on(wd) && secs >= start) || (on(yesterday) && secs < end)
        }
    }

    fn always(&self) -> bool {
        self.days == ALL_DAYS && self.start == 0 && self.end == 1440
    }

    /// The first moment after `t` at which [`Window::contains`] may change:
    /// a start or end on the local clock, or a jump of that clock (DST).
    /// It may return a moment at which nothing changes (recompiling then is
    /// harmless), never one after a real change.
    pub fn next_edge(&self, t: Timestamp) -> Option<Timestamp> {
        if self.always() {
            return None;
        }
        let mut best: Option<Timestamp> = None;
        let mut consider = |c: Timestamp| {
            if c > t && best.is_none_or(|b| c < b) {
                best = Some(c);
            }
        };
        if let Some(tr) = self.tz.following(t).next() {
            consider(tr.timestamp());
        }
        let today = t.to_zoned(self.tz.clone()).date();
        for delta in -2i32..=8 {
            let Ok(day) = today.checked_add(jiff::Span::new().days(delta)) else {
                continue;
            };
            if self.days & (1 << weekday_index(day.weekday())) == 0 {
                continue;
            }
            let start = civil(day, self.start);
            let end_day = if self.end <= self.start {
                day.tomorrow().ok()
            } else {
                Some(day)
            };
            for dt in [Some(start), end_day.and_then(|d| civil_opt(d, self.end))]
                .into_iter()
                .flatten()
            {
                for c in self.instants(dt) {
                    consider(c);
                }
            }
        }
        best
    }

    /// Every instant at which the local clock shows `dt`: one, two in a
    /// fold, and in a gap both readings of it (the clock never shows it;
    /// the jump itself is covered by the zone's transitions).
    fn instants(&self, dt: DateTime) -> Vec<Timestamp> {
        let amb = self.tz.to_ambiguous_timestamp(dt);
        let offsets = match amb.offset() {
            AmbiguousOffset::Unambiguous { offset } => vec![offset],
            AmbiguousOffset::Gap { before, after } | AmbiguousOffset::Fold { before, after } => {
                vec![before, after]
            }
        };
        offsets
            .into_iter()
            .filter_map(|o| o.to_timestamp(dt).ok())
            .collect()
    }

    /// `mon-fri 22:00-06:00 Europe/Helsinki`.
    pub fn describe(&self) -> String {
        let days: Vec<&str> = (0..7)
            .filter(|d| self.days & (1 << d) != 0)
            .map(|d| DAY_NAMES[d as usize])
            .collect();
        format!(
            "{} {:02}:{:02}-{:02}:{:02} {}",
            days.join(","),
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60,
            self.tz_name
        )
    }
}

fn civil(day: Date, minutes: u16) -> DateTime {
    civil_opt(day, minutes).unwrap_or_else(|| day.to_datetime(Time::midnight()))
}

/// `minutes` after midnight of `day` (1440 is the next midnight).
fn civil_opt(day: Date, minutes: u16) -> Option<DateTime> {
    if minutes >= 1440 {
        return day.tomorrow().ok().map(|d| d.to_datetime(Time::midnight()));
    }
    let t = Time::new((minutes / 60) as i8, (minutes % 60) as i8, 0, 0).ok()?;
    Some(day.to_datetime(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: u8, time: &str, tz: &str) -> Window {
        let (start, end) = parse_time_range(time).unwrap();
        Window {
            days,
            start,
            end,
            tz: time_zone(tz).unwrap(),
            tz_name: tz.to_string(),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn days() {
        assert_eq!(parse_days("mon-fri").unwrap(), 0b0011111);
        assert_eq!(parse_days("fri-mon").unwrap(), 0b1110001);
        assert_eq!(parse_days("Sun").unwrap(), 0b1000000);
        assert!(
            parse_days("mon-fry")
                .unwrap_err()
                .contains("\"fry\" is not a day")
        );
    }

    #[test]
    fn times() {
        assert_eq!(parse_time_range("22:00-06:00").unwrap(), (1320, 360));
        assert_eq!(parse_time_range("00:00-24:00").unwrap(), (0, 1440));
        assert!(parse_time_range("25:00-06:00").is_err());
        assert!(
            parse_time_range("08:00-08:00")
                .unwrap_err()
                .contains("empty")
        );
        assert!(parse_time_range("8-9").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("12").is_err());
        assert!(parse_duration("1x").is_err());
    }

    #[test]
    fn night_shift_crosses_midnight() {
        // mon-fri 22:00-06:00 UTC; 2025-01-03 is a Friday.
        let win = w(0b0011111, "22:00-06:00", "UTC");
        assert!(win.contains(ts("2025-01-03T23:00:00Z")));
        assert!(win.contains(ts("2025-01-04T05:59:59Z"))); // Saturday morning, started Friday
        assert!(!win.contains(ts("2025-01-04T23:00:00Z"))); // Saturday night
        assert!(!win.contains(ts("2025-01-06T05:00:00Z"))); // Monday morning, Sunday had no window
        assert!(win.contains(ts("2025-01-06T22:00:00Z")));
        assert_eq!(
            win.next_edge(ts("2025-01-03T23:00:00Z")),
            Some(ts("2025-01-04T06:00:00Z"))
        );
        assert_eq!(
            win.next_edge(ts("2025-01-04T06:00:00Z")),
            Some(ts("2025-01-06T22:00:00Z"))
        );
    }

    #[test]
    fn helsinki_offset_and_dst() {
        let win = w(ALL_DAYS, "03:30-05:00", "Europe/Helsinki");
        // Winter: UTC+2.
        assert!(win.contains(ts("2025-01-10T01:45:00Z")));
        // 2025-03-30 03:00 EET jumps to 04:00 EEST (01:00Z).
        assert!(!win.contains(ts("2025-03-30T00:59:00Z")));
        assert!(win.contains(ts("2025-03-30T01:00:00Z")));
        assert_eq!(
            win.next_edge(ts("2025-03-30T00:30:00Z")),
            Some(ts("2025-03-30T01:00:00Z"))
        );
    }

    #[test]
    fn always_window_has_no_edge() {
        let win = w(ALL_DAYS, "00:00-24:00", "UTC");
        assert!(win.contains(ts("2025-01-10T01:45:00Z")));
        assert_eq!(win.next_edge(ts("2025-01-10T01:45:00Z")), None);
    }

    /// A host without /usr/share/zoneinfo falls back to this copy.
    #[test]
    fn zones_are_bundled() {
        let db = jiff::tz::TimeZoneDatabase::bundled();
        assert!(db.get("Europe/Helsinki").is_ok());
        assert!(db.get("America/New_York").is_ok());
        assert!(time_zone("Europe/Nowhere").is_err());
    }

    #[test]
    fn until_is_rfc3339() {
        assert!(parse_until("2026-12-01T00:00:00Z").is_ok());
        assert!(parse_until("2026-12-01T02:00:00+02:00").is_ok());
        assert!(parse_until("2026-12-01").is_err());
        assert!(parse_until("tomorrow").is_err());
    }
}
