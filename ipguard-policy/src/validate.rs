//! From the YAML structure to a checked [`Policy`]: every value is given
//! its meaning here, and every mistake of docs/policy.md §1-§4 is reported with
//! its position and value. All errors are collected, not only the first,
//! so that one `ipguard check` shows everything there is to fix.

use std::{collections::HashMap, sync::Arc, time::Duration};

use ipnet::IpNet;
use jiff::Timestamp;
use serde_saphyr::Spanned;
use smallvec::SmallVec;

use super::{
    DnsName, Proto, Written,
    addr::{self, Item},
    diag::{Pos, Sink},
    lists::{ListFile, ListSource, read_list},
    model::*,
    time::{self, Window},
    yaml::{At, EntryList, GroupValue, ItemList, RawEntry, RawPolicy, RawWhen, Scalar, spos},
};
use ipguard_common::MAX_SERVICES;

pub const MAX_LABEL_CHARS: usize = 128;

fn at(p: Option<Pos>) -> String {
    match p {
        Some(p) => format!("line {}", p.line),
        None => "an unknown line".to_string(),
    }
}

/// Where the list files a policy names are read, and what was read.
pub(crate) struct Lists<'a> {
    pub source: &'a dyn ListSource,
    pub read: &'a mut Vec<ListFile>,
}

pub(crate) fn validate(
    raw: RawPolicy,
    now: Timestamp,
    sink: &mut Sink,
    lists: &mut Lists<'_>,
    coverage: crate::Coverage,
) -> Option<Policy> {
    let errors_before = sink.errors.len();
    match &raw.version {
        None => sink.error(
            None,
            "missing key `version`: the first line of a policy is `version: 1`",
        ),
        Some(v) if v.value.0.trim() == "1" => {}
        Some(v) => sink.error(
            spos(v),
            format!(
                "unsupported version {:?}: this ipguard reads policy version 1",
                v.value.0
            ),
        ),
    }
    let mode = enum_value(
        sink,
        raw.mode.as_ref(),
        "mode",
        &[
            ("enforce", Mode::Enforce),
            ("monitor", Mode::Monitor),
            ("off", Mode::Off),
        ],
        Mode::Enforce,
    );
    let action = enum_value(
        sink,
        raw.action.as_ref(),
        "action",
        &[("drop", Action::Drop), ("reject", Action::Reject)],
        Action::Drop,
    );
    let scope = enum_value(
        sink,
        raw.scope.as_ref(),
        "scope",
        &[("host", Scope::Host), ("services", Scope::Services)],
        Scope::Host,
    );
    let interfaces = interfaces(sink, raw.interfaces.as_ref());

    let mut groups = Groups::new(
        sink,
        raw.groups.as_ref().map(|g| &g.value.0[..]).unwrap_or(&[]),
        lists,
    );
    let group_names = groups.names.clone();
    let feeds = std::mem::take(&mut groups.feeds);

    let mut entries = ListReader {
        sink,
        groups: &mut groups,
        now,
        nets: Vec::new(),
    };
    let allow = entries.entries(raw.allow.as_ref().map(|l| &l.value));
    let deny = entries.entries(raw.deny.as_ref().map(|l| &l.value));
    let always_allow = entries.entries(raw.always_allow.as_ref().map(|l| &l.value));
    let services = entries.services(raw.services.as_ref());
    let sink = entries.sink;

    let infrastructure = infrastructure(sink, raw.infrastructure.as_ref());
    let events = events(sink, raw.events.as_ref());
    let lockout_ports = raw.lockout_guard.as_ref().map(|g| {
        let mut ports = Vec::new();
        for (text, pos) in g.ports.value.items(spos(&g.ports)) {
            match parse_port(text) {
                Ok(p) if p.proto == Proto::Tcp => ports.push(p),
                Ok(_) => sink.error(
                    pos,
                    format!(
                        "lockout_guard port {:?}: the guard watches TCP sessions; write tcp/PORT",
                        text.trim()
                    ),
                ),
                Err(msg) => sink.error(pos, msg),
            }
        }
        ports
    });
    let dns = dns_settings(sink, raw.dns.as_ref());
    let reject_max_per_sec = match &raw.reject_max_rate {
        None => DEFAULT_REJECT_MAX_PER_SEC,
        Some(r) => match parse_rate(&r.value.0) {
            Ok((n, secs)) => u32::try_from(n.div_ceil(secs)).unwrap_or(u32::MAX),
            Err(msg) => {
                sink.error(spos(r), msg);
                0
            }
        },
    };

    if sink.errors.len() > errors_before {
        return None;
    }
    let mut policy = Policy {
        mode,
        action,
        scope,
        interfaces,
        groups: group_names,
        allow,
        services,
        deny,
        always_allow,
        infrastructure,
        events,
        reject_max_per_sec,
        lockout_ports,
        dns,
        dns_names: Vec::new(),
        feeds: Vec::new(),
    };
    policy.dns_names = policy.find_dns_names();
    policy.feeds = policy.used_feeds(feeds);
    if coverage == crate::Coverage::Check {
        warn_covered(sink, &policy);
    }
    warn_allows_nobody(sink, &policy, raw.mode.as_ref().and_then(spos), now);
    Some(policy)
}

fn enum_value<T: Copy>(
    sink: &mut Sink,
    v: Option<&Spanned<Scalar>>,
    key: &str,
    choices: &[(&str, T)],
    default: T,
) -> T {
    let Some(v) = v else { return default };
    let s = v.value.0.trim();
    if let Some((_, t)) = choices.iter().find(|(name, _)| *name == s) {
        return *t;
    }
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    sink.error(
        spos(v),
        format!("{s:?} is not a {key}: use {}", names.join(", ")),
    );
    default
}

fn interfaces(sink: &mut Sink, v: Option<&Spanned<ItemList>>) -> Vec<String> {
    let Some(v) = v else { return Vec::new() };
    let mut out = Vec::new();
    for (name, pos) in v.value.items(spos(v)) {
        // IFNAMSIZ is 16 with the terminating NUL.
        let ok = !name.is_empty()
            && name.len() <= 15
            && !name.contains(|c: char| c == '/' || c.is_whitespace() || c == ':');
        if ok {
            out.push(name.to_string());
        } else {
            sink.error(pos, format!("{name:?} is not a network interface name"));
        }
    }
    out
}

/// Group definitions and their expansion.
struct Groups {
    names: Vec<String>,
    defs: HashMap<String, GroupDef>,
    /// The `{ url: … }` groups, in the order the policy defines them.
    feeds: Vec<Arc<crate::Feed>>,
}

struct GroupDef {
    /// The prefixes written directly in the group.
    nets: Vec<IpNet>,
    /// Its `dns:` items.
    dns: Vec<DnsName>,
    /// Its feed (a `{ url: … }` group is its own feed).
    feeds: Vec<Arc<str>>,
    /// The groups it names, where.
    refs: Vec<(String, Option<Pos>)>,
    state: GroupState,
}

enum GroupState {
    Todo,
    Busy,
    Done(Arc<Members>),
    /// A cycle or an unknown name below it (already reported).
    Failed,
}

/// Everything a group stands for, its subgroups' members included.
#[derive(Default)]
struct Members {
    nets: Vec<IpNet>,
    dns: Vec<DnsName>,
    /// The groups of the feeds it stands for.
    feeds: Vec<Arc<str>>,
}

impl Groups {
    fn new(
        sink: &mut Sink,
        raw: &[(Spanned<Scalar>, Spanned<GroupValue>)],
        lists: &mut Lists<'_>,
    ) -> Self {
        let mut names = Vec::new();
        let mut defs: HashMap<String, GroupDef> = HashMap::new();
        let mut first_pos: HashMap<String, Option<Pos>> = HashMap::new();
        let mut feeds = Vec::new();
        for (key, value) in raw {
            let name = key.value.0.as_str();
            let kpos = spos(key);
            if !addr::is_valid_name(name) {
                sink.error(kpos, bad_name_message("group", name));
                continue;
            }
            if let Some(first) = first_pos.get(name) {
                sink.error(
                    kpos,
                    format!("group {name:?} is defined twice (first at {})", at(*first)),
                );
                continue;
            }
            first_pos.insert(name.to_string(), kpos);
            let mut nets = Vec::new();
            let mut dns = Vec::new();
            let mut refs = Vec::new();
            let items = match &value.value {
                GroupValue::Items(items) => items,
                GroupValue::Source(src) => {
                    let (nets, own_feeds) = match source(sink, name, src, spos(value), lists) {
                        Some(Source::File(n)) => (Some(n), Vec::new()),
                        Some(Source::Feed(f)) => {
                            let group = f.group.clone();
                            feeds.push(Arc::new(*f));
                            (Some(Vec::new()), vec![group])
                        }
                        None => (None, Vec::new()),
                    };
                    let (nets, state) = match nets {
                        Some(n) => (n, GroupState::Todo),
                        // Reported: entries naming it add nothing more.
                        None => (Vec::new(), GroupState::Failed),
                    };
                    names.push(name.to_string());
                    defs.insert(
                        name.to_string(),
                        GroupDef {
                            nets,
                            dns: Vec::new(),
                            feeds: own_feeds,
                            refs: Vec::new(),
                            state,
                        },
                    );
                    continue;
                }
            };
            items.for_each(spos(value), |text, pos| {
                let before = nets.len();
                match addr::parse_item(text, &mut nets) {
                    Ok(Item::Nets { host_bits }) => {
                        if let Some(n) = host_bits {
                            sink.warning(pos, host_bits_message(text, &n));
                        }
                    }
                    Ok(Item::Group(g)) => refs.push((g.to_string(), pos)),
                    Ok(Item::Name(n)) => dns.push(n),
                    Err(msg) => {
                        nets.truncate(before);
                        sink.error(pos, msg);
                    }
                }
            });
            names.push(name.to_string());
            defs.insert(
                name.to_string(),
                GroupDef {
                    nets,
                    dns,
                    feeds: Vec::new(),
                    refs,
                    state: GroupState::Todo,
                },
            );
        }
        Self { names, defs, feeds }
    }

    /// The prefixes of group `name`, referenced at `pos`; None after an
    /// error (reported here, once).
    ///
    /// Iterative depth-first expansion: a chain of thousands of nested
    /// groups must not overflow the stack.
    fn expand(&mut self, sink: &mut Sink, name: &str, pos: Option<Pos>) -> Option<Arc<Members>> {
        match self.defs.get(name).map(|d| &d.state) {
            None => {
                sink.error(pos, format!("unknown group {name:?}"));
                return None;
            }
            Some(GroupState::Done(n)) => return Some(n.clone()),
            Some(GroupState::Failed) => return None,
            Some(_) => {}
        }
        // Frames: (group, index of the next reference to look at).
        let mut stack: Vec<(String, usize)> = vec![(name.to_string(), 0)];
        self.set_state(name, GroupState::Busy);
        while let Some((g, i)) = stack.last().cloned() {
            let next = self.defs.get(&g).and_then(|d| d.refs.get(i)).cloned();
            match next {
                None => {
                    stack.pop();
                    let failed = matches!(
                        self.defs.get(&g).map(|d| &d.state),
                        Some(GroupState::Failed)
                    );
                    if !failed {
                        let members = self.collect(&g);
                        self.set_state(&g, GroupState::Done(Arc::new(members)));
                    }
                }
                Some((child, ipos)) => {
                    if let Some(top) = stack.last_mut() {
                        top.1 += 1;
                    }
                    match self.defs.get(&child).map(|d| &d.state) {
                        None => {
                            sink.error(ipos, format!("unknown group {child:?}"));
                            self.fail_chain(&stack);
                        }
                        Some(GroupState::Failed) => self.fail_chain(&stack),
                        Some(GroupState::Done(_)) => {}
                        Some(GroupState::Busy) => {
                            let from = stack.iter().position(|(n, _)| *n == child).unwrap_or(0);
                            let mut path: Vec<&str> =
                                stack[from..].iter().map(|(n, _)| n.as_str()).collect();
                            path.push(&child);
                            sink.error(
                                ipos,
                                format!(
                                    "group {child:?} is part of a cycle: {}",
                                    path.join(" -> ")
                                ),
                            );
                            self.fail_chain(&stack);
                        }
                        Some(GroupState::Todo) => {
                            self.set_state(&child, GroupState::Busy);
                            stack.push((child, 0));
                        }
                    }
                }
            }
        }
        match self.defs.get(name).map(|d| &d.state) {
            Some(GroupState::Done(n)) => Some(n.clone()),
            _ => None,
        }
    }

    fn set_state(&mut self, name: &str, state: GroupState) {
        if let Some(d) = self.defs.get_mut(name) {
            d.state = state;
        }
    }

    /// Everything on the expansion stack depends on a failed group.
    fn fail_chain(&mut self, stack: &[(String, usize)]) {
        for (n, _) in stack {
            self.set_state(n, GroupState::Failed);
        }
    }

    /// All members of `g`, whose subgroups are done.
    fn collect(&self, g: &str) -> Members {
        let Some(d) = self.defs.get(g) else {
            return Members::default();
        };
        let mut nets = d.nets.clone();
        let mut dns = d.dns.clone();
        let mut feeds = d.feeds.clone();
        for (c, _) in &d.refs {
            if let Some(GroupDef {
                state: GroupState::Done(m),
                ..
            }) = self.defs.get(c)
            {
                nets.extend_from_slice(&m.nets);
                dns.extend_from_slice(&m.dns);
                feeds.extend_from_slice(&m.feeds);
            }
        }
        // Deduplicated per group, so that groups naming the same group many
        // times over cannot blow up exponentially.
        nets.sort_unstable();
        nets.dedup();
        dns.sort_unstable();
        dns.dedup();
        feeds.sort_unstable();
        feeds.dedup();
        Members { nets, dns, feeds }
    }
}

/// What a `{ file: … }` or `{ url: … }` group reads from.
enum Source {
    /// A list file's prefixes.
    File(Vec<IpNet>),
    /// A feed (its prefixes come from the daemon's last good copy).
    Feed(Box<crate::Feed>),
}

/// The feed keys a `{ file: PATH }` group may not have.
const FEED_KEYS: &str =
    "format, json_path, refresh, max_entries, max_bytes, timeout, max_shrink, sha256";

/// A group's `{ file: … }` or `{ url: … }`; None after errors (reported).
fn source(
    sink: &mut Sink,
    name: &str,
    src: &crate::yaml::RawSource,
    pos: Option<Pos>,
    lists: &mut Lists<'_>,
) -> Option<Source> {
    match (&src.file, &src.url) {
        (Some(_), Some(u)) => {
            sink.error(
                spos(u),
                format!("group {name:?} has both `file:` and `url:`: a group reads one source; split it into two groups"),
            );
            None
        }
        (None, None) => {
            sink.error(
                pos,
                format!("group {name:?}: a mapping group needs `file: PATH` or `url: https://…`"),
            );
            None
        }
        (Some(f), None) => {
            let feed_key = [
                src.format.as_ref().map(spos),
                src.json_path.as_ref().map(spos),
                src.refresh.as_ref().map(spos),
                src.max_entries.as_ref().map(spos),
                src.max_bytes.as_ref().map(spos),
                src.timeout.as_ref().map(spos),
                src.max_shrink.as_ref().map(spos),
                src.sha256.as_ref().map(spos),
            ]
            .into_iter()
            .flatten()
            .next();
            if let Some(p) = feed_key {
                sink.error(
                    p,
                    format!(
                        "group {name:?}: {FEED_KEYS} belong to a `url:` feed, not to a list file"
                    ),
                );
                return None;
            }
            let written = f.value.0.trim();
            if written.is_empty() {
                sink.error(
                    spos(f),
                    format!("group {name:?}: `file:` needs the path of a list file"),
                );
                return None;
            }
            read_list(sink, lists.source, written, spos(f), lists.read).map(Source::File)
        }
        (None, Some(u)) => feed(sink, name, src, u).map(|f| Source::Feed(Box::new(f))),
    }
}

/// The longest URL a feed may have (browsers' and servers' common limit).
const MAX_URL: usize = 2048;
/// Bounds of a feed's settings: a refresh of at least a second (tests and
/// fast-moving internal feeds), a week at most; a fetch may take 10 min.
const FEED_REFRESH: (Duration, Duration, &str, &str) = (
    Duration::from_secs(1),
    Duration::from_secs(7 * 24 * 3600),
    "1s",
    "7d",
);
const FEED_TIMEOUT: (Duration, Duration, &str, &str) = (
    Duration::from_secs(1),
    Duration::from_secs(600),
    "1s",
    "10m",
);
const FEED_MAX_ENTRIES: u64 = 16 << 20;
const FEED_MAX_BYTES: u64 = 1 << 30;

fn feed(
    sink: &mut Sink,
    name: &str,
    src: &crate::yaml::RawSource,
    u: &Spanned<Scalar>,
) -> Option<crate::Feed> {
    use crate::feed::*;
    let errors_before = sink.errors.len();
    let url = u.value.0.trim();
    match check_url(url) {
        Ok(()) => {}
        Err(why) => sink.error(spos(u), format!("group {name:?}: url {url:?} {why}")),
    }
    let format = match src.format.as_ref() {
        None => FeedFormat::Lines,
        Some(f) => {
            match f.value.0.trim() {
                "lines" => FeedFormat::Lines,
                "json" => FeedFormat::Json,
                other => {
                    sink.error(
                    spos(f),
                    format!("group {name:?}: format {other:?} is not a feed format: use lines or json"),
                );
                    FeedFormat::Lines
                }
            }
        }
    };
    let mut json_paths = Vec::new();
    if let Some(p) = &src.json_path {
        for (text, ppos) in p.value.items(spos(p)) {
            match serde_json_path::JsonPath::parse(text.trim()) {
                Ok(jp) => json_paths.push((text.trim().to_string(), jp)),
                Err(e) => sink.error(
                    ppos,
                    format!("group {name:?}: json_path {text:?} is not a JSONPath (RFC 9535): {e}; write e.g. $.prefixes[*].ip_prefix"),
                ),
            }
        }
    }
    match (format, &src.json_path) {
        (FeedFormat::Json, None) => sink.error(
            src.format.as_ref().and_then(spos),
            format!("group {name:?}: format json needs json_path, the JSONPath of the address strings (e.g. $.prefixes[*].ip_prefix)"),
        ),
        (FeedFormat::Lines, Some(p)) => sink.error(
            spos(p),
            format!("group {name:?}: json_path is for format: json; a lines feed has one address item per line"),
        ),
        _ => {}
    }
    let mut duration = |v: &Option<Spanned<Scalar>>,
                        key: &str,
                        bounds: (Duration, Duration, &str, &str),
                        default: Duration| {
        let Some(v) = v else { return default };
        match time::parse_duration(&v.value.0) {
            Ok(d) if (bounds.0..=bounds.1).contains(&d) => d,
            Ok(_) => {
                sink.error(
                    spos(v),
                    format!(
                        "group {name:?}: {key} {:?}: write a duration from {} to {}",
                        v.value.0, bounds.2, bounds.3
                    ),
                );
                default
            }
            Err(msg) => {
                sink.error(spos(v), format!("group {name:?}: {key}: {msg}"));
                default
            }
        }
    };
    let refresh = duration(&src.refresh, "refresh", FEED_REFRESH, DEFAULT_FEED_REFRESH);
    let timeout = duration(&src.timeout, "timeout", FEED_TIMEOUT, DEFAULT_FEED_TIMEOUT);
    let max_entries = match &src.max_entries {
        None => DEFAULT_FEED_MAX_ENTRIES,
        Some(v) => match v.value.0.trim().replace('_', "").parse::<u64>() {
            Ok(n) if (1..=FEED_MAX_ENTRIES).contains(&n) => n as usize,
            _ => {
                sink.error(
                    spos(v),
                    format!("group {name:?}: max_entries {:?}: write a number from 1 to {FEED_MAX_ENTRIES}", v.value.0),
                );
                DEFAULT_FEED_MAX_ENTRIES
            }
        },
    };
    let max_bytes = match &src.max_bytes {
        None => DEFAULT_FEED_MAX_BYTES,
        Some(v) => match parse_size(&v.value.0) {
            Some(n) if (1..=FEED_MAX_BYTES).contains(&n) => n,
            _ => {
                sink.error(
                    spos(v),
                    format!("group {name:?}: max_bytes {:?}: write a size from 1 byte to 1GiB, e.g. 4MiB", v.value.0),
                );
                DEFAULT_FEED_MAX_BYTES
            }
        },
    };
    let max_shrink_percent = match &src.max_shrink {
        None => DEFAULT_FEED_MAX_SHRINK_PERCENT,
        Some(v) => {
            let t = v.value.0.trim();
            match t.strip_suffix('%').unwrap_or(t).trim().parse::<u8>() {
                Ok(n) if n <= 100 => n,
                _ => {
                    sink.error(
                        spos(v),
                        format!("group {name:?}: max_shrink {t:?}: write a share from 0% to 100% (100% turns the guard off)"),
                    );
                    DEFAULT_FEED_MAX_SHRINK_PERCENT
                }
            }
        }
    };
    let sha256 = src.sha256.as_ref().and_then(|v| {
        let t = v.value.0.trim().to_ascii_lowercase();
        if t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit()) {
            Some(t)
        } else {
            sink.error(
                spos(v),
                format!(
                    "group {name:?}: sha256 {:?} is not a SHA-256: write its 64 hex digits",
                    v.value.0
                ),
            );
            None
        }
    });
    if sink.errors.len() > errors_before {
        return None;
    }
    Some(crate::Feed {
        group: Arc::from(name),
        url: Arc::from(url),
        format,
        json_paths,
        refresh,
        max_entries,
        max_bytes,
        timeout,
        max_shrink_percent,
        sha256,
    })
}

/// Whether `url` is an absolute https URL with a host. Feeds are fetched
/// over TLS only: an allowlist read over plain HTTP is anyone's on the
/// path to change.
fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL {
        return Err(format!("is longer than {MAX_URL} characters"));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("is not a URL ({e}): write https://HOST/PATH"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(
                "is plain HTTP: feeds are fetched over https only (an allowlist read over HTTP is anyone's on the path to change)"
                    .to_string(),
            );
        }
        _ => return Err("is not an https URL: write https://HOST/PATH".to_string()),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => {}
        _ => return Err("has no host: write https://HOST/PATH".to_string()),
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("holds credentials: a policy is no place for a password".to_string());
    }
    Ok(())
}

/// `4096`, `512KiB`, `16MiB`, `1GiB` (also `KB`, `MB`, `GB` as their
/// binary multiples, and `B`).
fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let digits = t.bytes().take_while(|c| c.is_ascii_digit()).count();
    let n: u64 = t[..digits].parse().ok()?;
    let unit: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// The shortest and longest re-resolution intervals an operator may set.
const DNS_TTL_FLOOR: Duration = Duration::from_secs(1);
const DNS_TTL_CEILING: Duration = Duration::from_secs(24 * 3600);

fn dns_settings(sink: &mut Sink, raw: Option<&crate::yaml::RawDns>) -> DnsSettings {
    let mut s = DnsSettings::default();
    let Some(raw) = raw else { return s };
    let mut read = |v: &Option<Spanned<Scalar>>, key: &str, out: &mut Duration| {
        let Some(v) = v else { return };
        match time::parse_duration(&v.value.0) {
            Ok(d) if (DNS_TTL_FLOOR..=DNS_TTL_CEILING).contains(&d) => *out = d,
            Ok(_) => sink.error(
                spos(v),
                format!("dns {key} {:?}: write a duration from 1s to 24h", v.value.0),
            ),
            Err(msg) => sink.error(spos(v), format!("dns {key}: {msg}")),
        }
    };
    read(&raw.min_ttl, "min_ttl", &mut s.min_ttl);
    read(&raw.max_ttl, "max_ttl", &mut s.max_ttl);
    if s.min_ttl > s.max_ttl {
        sink.error(
            raw.min_ttl.as_ref().and_then(spos),
            "dns min_ttl is longer than max_ttl: the shortest interval comes first",
        );
    }
    s
}

fn bad_name_message(what: &str, name: &str) -> String {
    if addr::KEYWORDS.contains(&name) {
        format!("{name:?} is a keyword and cannot name a {what}")
    } else {
        format!(
            "{name:?} is not a valid {what} name: use a lowercase letter, then up to 62 lowercase letters, digits, `_` or `-`"
        )
    }
}

pub(crate) fn host_bits_message(text: &str, n: &IpNet) -> String {
    format!("{:?} has host bits set: it means {n}", text.trim())
}

struct ListReader<'a> {
    sink: &'a mut Sink,
    groups: &'a mut Groups,
    now: Timestamp,
    /// An entry's prefixes while it is read, reused from entry to entry.
    nets: Vec<IpNet>,
}

impl ListReader<'_> {
    fn entries(&mut self, list: Option<&EntryList>) -> Vec<Entry> {
        let Some(list) = list else { return Vec::new() };
        let mut out = Vec::with_capacity(list.0.len());
        for e in &list.0 {
            if let Some(entry) = self.entry(e) {
                out.push(entry);
            }
        }
        out
    }

    fn entry(&mut self, e: &At<RawEntry>) -> Option<Entry> {
        let epos = e.pos;
        let errors_before = self.sink.errors.len();
        let mut nets = std::mem::take(&mut self.nets);
        nets.clear();
        let mut dns = Vec::new();
        let mut feeds = Vec::new();
        let (text, label, until, when) = match &e.value {
            RawEntry::Item(s) => {
                self.item(s, epos, &mut nets, &mut dns, &mut feeds);
                // Borrowed: most items end as a prefix, not a text.
                (std::borrow::Cow::Borrowed(s.as_str()), None, None, None)
            }
            RawEntry::Map(m) => {
                let mut any = false;
                m.from.value.for_each(spos(&m.from), |t, pos| {
                    any = true;
                    self.item(t, pos, &mut nets, &mut dns, &mut feeds);
                });
                if !any {
                    self.sink.error(
                        spos(&m.from),
                        "`from` is empty: name at least one address item",
                    );
                }
                let label = m.label.as_ref().and_then(|l| {
                    let n = l.value.0.chars().count();
                    if n > MAX_LABEL_CHARS {
                        self.sink.error(
                            spos(l),
                            format!("label {:?} is {n} characters long; at most {MAX_LABEL_CHARS} are allowed", l.value.0),
                        );
                        None
                    } else {
                        Some(l.value.0.clone())
                    }
                });
                let until = m
                    .until
                    .as_ref()
                    .and_then(|u| match time::parse_until(&u.value.0) {
                        Ok(t) => {
                            if t <= self.now {
                                self.sink.warning(
                                    spos(u),
                                    format!(
                                        "until {:?} has passed: this entry is no longer active",
                                        u.value.0
                                    ),
                                );
                            }
                            Some(t)
                        }
                        Err(msg) => {
                            self.sink.error(spos(u), msg);
                            None
                        }
                    });
                let when = m.when.as_ref().and_then(|w| self.window(&w.value, spos(w)));
                (
                    std::borrow::Cow::Owned(m.from.value.text()),
                    label,
                    until,
                    when,
                )
            }
        };
        if nets.len() > 1 {
            nets.sort_unstable();
            nets.dedup();
        }
        dns.sort_unstable();
        dns.dedup();
        feeds.sort_unstable();
        feeds.dedup();
        let own = SmallVec::from_slice(&nets);
        let text = Written::new(&text, &nets);
        self.nets = nets;
        if self.sink.errors.len() > errors_before {
            return None;
        }
        Some(Entry {
            text,
            nets: own,
            extras: (label.is_some()
                || until.is_some()
                || when.is_some()
                || !dns.is_empty()
                || !feeds.is_empty())
            .then(|| {
                Box::new(crate::model::Extras {
                    label: label.map(Arc::from),
                    until,
                    when,
                    dns,
                    feeds,
                })
            }),
            pos: epos,
        })
    }

    /// One address item of an entry, its prefixes appended to `nets`, its
    /// DNS names to `dns`, the groups of its feeds to `feeds`.
    fn item(
        &mut self,
        t: &str,
        pos: Option<Pos>,
        nets: &mut Vec<IpNet>,
        dns: &mut Vec<DnsName>,
        feeds: &mut Vec<Arc<str>>,
    ) {
        match addr::parse_item(t, nets) {
            Ok(Item::Nets { host_bits }) => {
                if let Some(h) = host_bits {
                    self.sink.warning(pos, host_bits_message(t, &h));
                }
            }
            Ok(Item::Group(g)) => {
                if let Some(m) = self.groups.expand(self.sink, g, pos) {
                    nets.extend_from_slice(&m.nets);
                    dns.extend_from_slice(&m.dns);
                    feeds.extend_from_slice(&m.feeds);
                }
            }
            Ok(Item::Name(n)) => dns.push(n),
            Err(msg) => self.sink.error(pos, msg),
        }
    }

    fn window(&mut self, w: &RawWhen, wpos: Option<Pos>) -> Option<Window> {
        let errors_before = self.sink.errors.len();
        if w.days.is_none() && w.time.is_none() {
            self.sink.error(wpos, "`when` needs `days`, `time` or both");
        }
        let mut days = 0u8;
        match &w.days {
            None => days = time::ALL_DAYS,
            Some(d) => {
                let items = d.value.items(spos(d));
                if items.is_empty() {
                    self.sink
                        .error(spos(d), "`days` is empty: name at least one day");
                }
                for (item, pos) in items {
                    match time::parse_days(item) {
                        Ok(m) => days |= m,
                        Err(msg) => self.sink.error(pos, msg),
                    }
                }
            }
        }
        let (start, end) = match &w.time {
            None => (0, 1440),
            Some(t) => match time::parse_time_range(&t.value.0) {
                Ok(r) => r,
                Err(msg) => {
                    self.sink.error(spos(t), msg);
                    (0, 1440)
                }
            },
        };
        let (tz, tz_name) = match &w.tz {
            None => (jiff::tz::TimeZone::UTC, "UTC".to_string()),
            Some(z) => match time::time_zone(z.value.0.trim()) {
                Ok(tz) => (tz, z.value.0.trim().to_string()),
                Err(msg) => {
                    self.sink.error(spos(z), msg);
                    (jiff::tz::TimeZone::UTC, String::new())
                }
            },
        };
        (self.sink.errors.len() == errors_before).then_some(Window {
            days,
            start,
            end,
            tz,
            tz_name,
        })
    }

    fn services(
        &mut self,
        raw: Option<&Spanned<super::yaml::NamedMap<Spanned<super::yaml::RawService>>>>,
    ) -> Vec<Service> {
        let Some(raw) = raw else { return Vec::new() };
        let mut out: Vec<Service> = Vec::new();
        let mut seen: HashMap<&str, Option<Pos>> = HashMap::new();
        // (spec, service index in `out`, position, text)
        let mut all_ports: Vec<(PortSpec, usize, Option<Pos>, String)> = Vec::new();
        let mut count = 0usize;
        for (key, value) in &raw.value.0 {
            let name = key.value.0.as_str();
            let kpos = spos(key);
            if !addr::is_valid_name(name) {
                self.sink.error(kpos, bad_name_message("service", name));
                continue;
            }
            if let Some(first) = seen.get(name) {
                self.sink.error(
                    kpos,
                    format!(
                        "service {name:?} is defined twice (first at {})",
                        at(*first)
                    ),
                );
                continue;
            }
            seen.insert(name, kpos);
            count += 1;
            if count == MAX_SERVICES + 1 {
                self.sink.error(
                    kpos,
                    format!("too many services: {name:?} is number {count}, at most {MAX_SERVICES} are allowed"),
                );
            }
            let svc = &value.value;
            let items = svc.ports.value.items(spos(&svc.ports));
            if items.is_empty() {
                self.sink.error(
                    spos(&svc.ports),
                    format!("service {name:?} has no ports: list at least one, e.g. tcp/443"),
                );
            }
            let mut ports = Vec::new();
            for (text, pos) in items {
                match parse_port(text) {
                    Ok(p) => {
                        ports.push(p);
                        all_ports.push((p, out.len(), pos, text.trim().to_string()));
                    }
                    Err(msg) => self.sink.error(pos, msg),
                }
            }
            let allow = svc.allow.as_ref().map(|l| self.entries(Some(&l.value)));
            out.push(Service {
                name: name.to_string(),
                ports,
                allow,
                pos: kpos,
            });
        }
        port_overlaps(self.sink, &out, &mut all_ports);
        out
    }
}

fn parse_port(text: &str) -> Result<PortSpec, String> {
    let t = text.trim();
    let Some((proto, ports)) = t.split_once('/') else {
        return Err(format!(
            "{t:?} is not a port: write tcp/N, udp/N, tcp/N-M or udp/N-M"
        ));
    };
    let proto = match proto.trim().to_ascii_lowercase().as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return Err(format!("{t:?}: the protocol must be tcp or udp")),
    };
    let num = |s: &str| -> Result<u16, String> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("{t:?}: {s:?} is not a port number"));
        }
        match s.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(format!("{t:?}: port {s} is out of range (1-65535)")),
        }
    };
    let (first, last) = match ports.split_once('-') {
        None => {
            let n = num(ports)?;
            (n, n)
        }
        Some((a, b)) => (num(a)?, num(b)?),
    };
    if first > last {
        return Err(format!("{t:?}: the port range is reversed"));
    }
    Ok(PortSpec { proto, first, last })
}

/// A port may belong to one service only: the later of two overlapping
/// port items (in file order) is the error, naming the earlier one.
fn port_overlaps(
    sink: &mut Sink,
    services: &[Service],
    all: &mut [(PortSpec, usize, Option<Pos>, String)],
) {
    all.sort_by_key(|(p, _, pos, _)| (p.proto, p.first, *pos));
    let mut reported = std::collections::HashSet::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        // The interval seen so far that reaches furthest.
        let mut reach: Option<usize> = None;
        for i in 0..all.len() {
            if all[i].0.proto != proto {
                continue;
            }
            if let Some(r) = reach {
                let (a, b) = (&all[r], &all[i]);
                if b.0.first <= a.0.last && a.1 != b.1 {
                    let (early, late) = if a.2 <= b.2 { (a, b) } else { (b, a) };
                    if reported.insert((late.2, late.3.clone())) {
                        sink.error(
                            late.2,
                            format!(
                                "{:?} of service {:?} overlaps {:?} of service {:?} ({}): a port belongs to one service only",
                                late.3, services[late.1].name, early.3, services[early.1].name, at(early.2)
                            ),
                        );
                    }
                }
                if all[i].0.last > all[r].0.last {
                    reach = Some(i);
                }
            } else {
                reach = Some(i);
            }
        }
    }
}

fn infrastructure(sink: &mut Sink, raw: Option<&super::yaml::RawInfra>) -> Infrastructure {
    let mut infra = Infrastructure::default();
    let Some(raw) = raw else { return infra };
    let b = |v: &Option<Spanned<bool>>, d: bool| v.as_ref().map_or(d, |s| s.value);
    infra.ndp = b(&raw.ndp, infra.ndp);
    if let Some(d) = &raw.dhcp {
        dhcp(sink, d, &mut infra);
    }
    infra.pmtu = b(&raw.pmtu, infra.pmtu);
    infra.mld = b(&raw.mld, infra.mld);
    infra.return_traffic = b(&raw.return_traffic, infra.return_traffic);
    for (name, raw, out) in [
        ("flow_timeout", &raw.flow_timeout, &mut infra.flow_timeout),
        (
            "flow_timeout_tcp",
            &raw.flow_timeout_tcp,
            &mut infra.flow_timeout_tcp,
        ),
    ] {
        let Some(t) = raw else { continue };
        match time::parse_duration(&t.value.0) {
            Ok(d) if d >= Duration::from_secs(1) => *out = d,
            Ok(_) => sink.error(
                spos(t),
                format!("{name} {:?} is too short: at least 1s", t.value.0),
            ),
            Err(msg) => sink.error(spos(t), msg),
        }
    }
    infra
}

/// `dhcp: true | false | [servers]`.
fn dhcp(sink: &mut Sink, d: &Spanned<ItemList>, infra: &mut Infrastructure) {
    match &d.value {
        ItemList::One(s) if s == "true" => return,
        ItemList::One(s) if s == "false" => {
            infra.dhcp = false;
            return;
        }
        ItemList::Many(v) if v.is_empty() => {
            sink.error(
                spos(d),
                "dhcp: [] names no server: write dhcp: false to refuse DHCP replies like any packet, or list the servers".to_string(),
            );
            return;
        }
        _ => {}
    }
    let mut nets = Vec::new();
    d.value.for_each(spos(d), |item, pos| {
        let before = nets.len();
        match addr::parse_item(item, &mut nets) {
            Ok(addr::Item::Nets { .. }) => {}
            Ok(addr::Item::Group(_) | addr::Item::Name(_)) | Err(_) => {
                nets.truncate(before);
                sink.error(
                    pos,
                    format!("dhcp: {item:?} is not an address or CIDR: write true, false or a list of DHCP servers"),
                );
            }
        }
    });
    for n in &mut nets {
        *n = n.trunc();
    }
    nets.sort_unstable();
    nets.dedup();
    if nets.len() > ipguard_common::MAX_DHCP_SERVERS as usize {
        sink.error(
            spos(d),
            format!(
                "dhcp: {} server prefixes, at most {} are possible: name the servers or their relays' subnet",
                nets.len(),
                ipguard_common::MAX_DHCP_SERVERS
            ),
        );
        return;
    }
    infra.dhcp_servers = nets;
}

/// `N/s`, `N/m`, `N/h`: (count, seconds).
fn parse_rate(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?} is not a rate: write e.g. 1/s, 10/m or 1000/s");
    let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let n = n.trim();
    if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    Ok((n, secs))
}

fn events(sink: &mut Sink, raw: Option<&super::yaml::RawEvents>) -> Events {
    let mut ev = Events::default();
    let Some(raw) = raw else { return ev };
    if let Some(r) = &raw.per_source {
        match parse_rate(&r.value.0) {
            Ok((0, _)) => sink.error(
                spos(r),
                format!("per_source {:?}: at least 1 event per source is needed (set max_rate: 0/s to send none)", r.value.0),
            ),
            Ok((n, secs)) => {
                ev.per_source_interval = Duration::from_nanos(secs.saturating_mul(1_000_000_000) / n)
            }
            Err(msg) => sink.error(spos(r), msg),
        }
    }
    if let Some(r) = &raw.max_rate {
        match parse_rate(&r.value.0) {
            Ok((n, secs)) => ev.max_per_sec = u32::try_from(n.div_ceil(secs)).unwrap_or(u32::MAX),
            Err(msg) => sink.error(spos(r), msg),
        }
    }
    ev
}

/// Whether `f` is active at least whenever `e` is, so that covering `e`'s
/// prefixes makes `e` redundant at every moment.
fn active_whenever(f: &Entry, e: &Entry) -> bool {
    let until_ok = match (f.until(), e.until()) {
        (None, _) => true,
        (Some(fu), Some(eu)) => eu <= fu,
        (Some(_), None) => false,
    };
    let when_ok = match (f.when(), e.when()) {
        (None, _) => true,
        (Some(a), Some(b)) => {
            a.days == b.days && a.start == b.start && a.end == b.end && a.tz_name == b.tz_name
        }
        (Some(_), None) => false,
    };
    until_ok && when_ok
}

/// For each entry of `list`, the entries (other than itself) that cover all
/// of its prefixes. A sweep over the sorted prefixes with a stack of the
/// prefixes containing the current one: O(n log n) for the usual lists of
/// single prefixes.
pub(crate) fn covering(list: &[Entry]) -> Vec<Option<Vec<u32>>> {
    // Bounds the work for pathological lists; a few candidates suffice to
    // name a covering entry.
    const MAX_CANDIDATES: usize = 64;
    let mut pairs: Vec<(IpNet, u32)> = Vec::new();
    for (i, e) in list.iter().enumerate() {
        for n in &e.nets {
            pairs.push((*n, i as u32));
        }
    }
    pairs.sort_unstable();
    // None: not seen yet; Some(empty): some prefix of the entry has no
    // candidate, so none can cover the whole entry.
    let mut cands: Vec<Option<Vec<u32>>> = vec![None; list.len()];
    // Stack of (net, the range of `pairs` owning exactly it). Buffers are
    // reused: a million-entry list must not cost allocations per prefix
    // (most prefixes are covered by nothing).
    let mut stack: Vec<(IpNet, usize, usize)> = Vec::new();
    let mut above: Vec<u32> = Vec::new();
    let mut here: Vec<u32> = Vec::new();
    let mut i = 0;
    while i < pairs.len() {
        let net = pairs[i].0;
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == net {
            j += 1;
        }
        while let Some((top, _, _)) = stack.last() {
            if top.contains(&net) {
                break;
            }
            stack.pop();
        }
        above.clear();
        'above: for &(_, from, to) in stack.iter().rev() {
            for &(_, x) in &pairs[from..to] {
                if above.len() == MAX_CANDIDATES {
                    break 'above;
                }
                above.push(x);
            }
        }
        let owners = &pairs[i..j];
        for &(_, e) in owners {
            if cands[e as usize].as_ref().is_some_and(|v| v.is_empty()) {
                continue;
            }
            let entry = &list[e as usize];
            here.clear();
            here.extend(
                owners
                    .iter()
                    .map(|&(_, o)| o)
                    .chain(above.iter().copied())
                    .filter(|&o| o != e && active_whenever(&list[o as usize], entry)),
            );
            here.sort_unstable();
            here.dedup();
            let c = &mut cands[e as usize];
            *c = Some(match c.take() {
                None => here.clone(),
                Some(prev) => prev
                    .into_iter()
                    .filter(|x| here.binary_search(x).is_ok())
                    .collect(),
            });
        }
        stack.push((net, i, j));
        i = j;
    }
    cands
        .into_iter()
        .map(|c| c.filter(|v| !v.is_empty()))
        .collect()
}

fn warn_covered_list(sink: &mut Sink, list: &[Entry], what: &str) {
    let cands = covering(list);
    for (e, c) in cands.iter().enumerate() {
        let Some(c) = c else { continue };
        // What its names resolve to and its feeds hold is not known here.
        if !list[e].dns().is_empty() || !list[e].feeds().is_empty() {
            continue;
        }
        // Two entries with the same prefixes cover each other: only the
        // later one is redundant.
        let by = c.iter().copied().find(|&f| {
            let mutual = cands[f as usize]
                .as_ref()
                .is_some_and(|v| v.binary_search(&(e as u32)).is_ok());
            !(mutual && (f as usize) > e)
        });
        if let Some(f) = by {
            let (ee, ff) = (&list[e], &list[f as usize]);
            sink.warning(
                ee.pos,
                format!(
                    "entry {:?} is fully covered by entry {:?} ({}) of the same list ({what})",
                    ee.text,
                    ff.text,
                    at(ff.pos)
                ),
            );
        }
    }
}

pub(crate) fn warn_covered(sink: &mut Sink, p: &Policy) {
    warn_covered_list(sink, &p.allow, "allow");
    warn_covered_list(sink, &p.deny, "deny");
    warn_covered_list(sink, &p.always_allow, "always_allow");
    for s in &p.services {
        if let Some(l) = &s.allow {
            warn_covered_list(sink, l, &format!("allow of service {}", s.name));
        }
    }
}

fn warn_allows_nobody(sink: &mut Sink, p: &Policy, mode_pos: Option<Pos>, now: Timestamp) {
    if p.mode != Mode::Enforce || p.scope != Scope::Host {
        return;
    }
    // An entry outside its time window still allows someone at other
    // times; only an expired one does not.
    let any_active = |l: &[Entry]| {
        l.iter().any(|e| {
            e.until().is_none_or(|u| now < u)
                && !(e.nets.is_empty() && e.dns().is_empty() && e.feeds().is_empty())
        })
    };
    let someone = any_active(&p.allow)
        || any_active(&p.always_allow)
        || p.services
            .iter()
            .any(|s| s.allow.as_deref().is_some_and(any_active));
    if !someone {
        sink.warning(
            mode_pos,
            "with mode: enforce and scope: host this policy allows nobody: every packet but infrastructure traffic is refused",
        );
    }
}
