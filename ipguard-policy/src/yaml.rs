//! The policy file as YAML, before any meaning is given to its values.
//!
//! Parsed with `serde-saphyr`, chosen because it is the serde deserializer
//! that keeps a position for everything: `Spanned<T>` records line and column
//! of any value, and its own errors (unknown key, wrong type, duplicate key,
//! YAML syntax) carry the position of the offending node. `serde_yaml` is
//! unmaintained and drops value positions; `marked-yaml`'s serde layer loses
//! the position of unknown-key and type errors, which operators need most.
//! serde-saphyr is also panic-free by design and bounds alias expansion
//! (a "billion laughs" file cannot exhaust the daemon).
//!
//! Every mapping rejects unknown keys: a typo such as `alow:` must not
//! silently weaken a firewall. Values whose form is "one item or a list" are
//! read by hand-written visitors rather than `#[serde(untagged)]`, which
//! would buffer the value and lose its position.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use serde_saphyr::{Location, Spanned};

use super::{address_runs, diag::Pos};

/// The position of a spanned value (None when the parser could not tell).
pub(crate) fn pos_of(loc: &Location) -> Option<Pos> {
    let (line, column) = (loc.line(), loc.column());
    if line == 0 {
        return None;
    }
    Some(Pos {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
    })
}

pub(crate) fn spos<T>(s: &Spanned<T>) -> Option<Pos> {
    pos_of(&s.referenced)
}

/// An item of a list and its position: what a `Spanned` item keeps that
/// ipguard uses, and what a run of address lines (`address_runs`) gives
/// without the parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct At<T> {
    pub value: T,
    pub pos: Option<Pos>,
}

impl<T> From<Spanned<T>> for At<T> {
    fn from(s: Spanned<T>) -> At<T> {
        At {
            pos: spos(&s),
            value: s.value,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub version: Option<Spanned<Scalar>>,
    pub mode: Option<Spanned<Scalar>>,
    pub action: Option<Spanned<Scalar>>,
    pub scope: Option<Spanned<Scalar>>,
    pub interfaces: Option<Spanned<ItemList>>,
    pub groups: Option<Spanned<NamedMap<Spanned<GroupValue>>>>,
    pub allow: Option<Spanned<EntryList>>,
    pub services: Option<Spanned<NamedMap<Spanned<RawService>>>>,
    pub deny: Option<Spanned<EntryList>>,
    pub always_allow: Option<Spanned<EntryList>>,
    pub infrastructure: Option<RawInfra>,
    pub events: Option<RawEvents>,
    pub reject_max_rate: Option<Spanned<Scalar>>,
    pub lockout_guard: Option<RawLockoutGuard>,
    pub dns: Option<RawDns>,
}

/// `dns: { min_ttl: 30s, max_ttl: 1h }`: how often names are resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    pub min_ttl: Option<Spanned<Scalar>>,
    pub max_ttl: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLockoutGuard {
    pub ports: Spanned<ItemList>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub ports: Spanned<ItemList>,
    /// `allow:` with nothing after it is an empty list of the service's
    /// own (nobody), not "no list": a half-written list must fail closed.
    #[serde(default, deserialize_with = "present_entry_list")]
    pub allow: Option<Spanned<EntryList>>,
}

fn present_entry_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<EntryList>>, D::Error> {
    Spanned::<EntryList>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInfra {
    pub ndp: Option<Spanned<bool>>,
    /// `true`, `false`, or the DHCP servers (address items).
    pub dhcp: Option<Spanned<ItemList>>,
    pub pmtu: Option<Spanned<bool>>,
    pub mld: Option<Spanned<bool>>,
    pub return_traffic: Option<Spanned<bool>>,
    pub flow_timeout: Option<Spanned<Scalar>>,
    pub flow_timeout_tcp: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    pub per_source: Option<Spanned<Scalar>>,
    pub max_rate: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEntryMap {
    pub from: Spanned<ItemList>,
    pub label: Option<Spanned<Scalar>>,
    pub until: Option<Spanned<Scalar>>,
    pub when: Option<Spanned<RawWhen>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWhen {
    pub days: Option<Spanned<ItemList>>,
    pub time: Option<Spanned<Scalar>>,
    pub tz: Option<Spanned<Scalar>>,
}

/// Any scalar, kept as text: `version: 1`, `label: 42` and `label: yes`
/// are all read as the operator typed them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Scalar(pub String);

struct ScalarVisitor;

impl Visitor<'_> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a single value (not a list or a mapping)")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
        Ok(Scalar(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Scalar, E> {
        Ok(Scalar(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        // `{:?}` keeps `1.0` from reading as `1`.
        Ok(Scalar(format!("{v:?}")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar(String::new()))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // As a string: the text as written (`1.0`, `yes`, `010`), and no
        // attempt at reading a number out of every one of a million items.
        d.deserialize_string(ScalarVisitor)
    }
}

/// One item or a list of them (`from: office`, `from: [a, b]`,
/// `days: mon-fri`, `days: [sat, sun]`, `ports: tcp/22`).
#[derive(Debug)]
pub(crate) enum ItemList {
    /// A single scalar; its position is the one of the enclosing `Spanned`.
    One(String),
    Many(Vec<At<Scalar>>),
}

impl ItemList {
    /// The items with their positions; `outer` is the position of the value.
    pub fn items(&self, outer: Option<Pos>) -> Vec<(&str, Option<Pos>)> {
        match self {
            ItemList::One(s) => vec![(s.as_str(), outer)],
            ItemList::Many(v) => v.iter().map(|s| (s.value.0.as_str(), s.pos)).collect(),
        }
    }

    /// Calls `f` with each item and its position, without allocating.
    pub fn for_each<'a>(&'a self, outer: Option<Pos>, mut f: impl FnMut(&'a str, Option<Pos>)) {
        match self {
            ItemList::One(s) => f(s.as_str(), outer),
            ItemList::Many(v) => {
                for s in v {
                    f(s.value.0.as_str(), s.pos);
                }
            }
        }
    }

    /// As written, for display: `office` or `[a, b]`.
    pub fn text(&self) -> String {
        match self {
            ItemList::One(s) => s.clone(),
            ItemList::Many(v) => {
                let parts: Vec<&str> = v.iter().map(|s| s.value.0.as_str()).collect();
                format!("[{}]", parts.join(", "))
            }
        }
    }
}

struct ItemListVisitor;

impl<'de> Visitor<'de> for ItemListVisitor {
    type Value = ItemList;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or a list of values")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ItemList, E> {
        Ok(ItemList::One(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<ItemList, E> {
        Ok(ItemList::One(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ItemList, E> {
        Ok(ItemList::One(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ItemList, E> {
        Ok(ItemList::One(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ItemList, E> {
        Ok(ItemList::One(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ItemList, E> {
        Ok(ItemList::One(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<ItemList, E> {
        Ok(ItemList::Many(Vec::new()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ItemList, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(item) = seq.next_element::<Spanned<Scalar>>()? {
            let item = At::from(item);
            let rest = address_runs::claim(item.pos, &item.value.0);
            v.push(item);
            if let Some(rest) = rest {
                v.extend(rest.into_iter().map(|(s, pos)| At {
                    value: Scalar(s),
                    pos,
                }));
            }
        }
        Ok(ItemList::Many(v))
    }
}

impl<'de> Deserialize<'de> for ItemList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemListVisitor)
    }
}

/// A group: its address items, or a source of them (`{ file: PATH }`,
/// `{ url: URL, … }`).
#[derive(Debug)]
pub(crate) enum GroupValue {
    Items(ItemList),
    Source(Box<RawSource>),
}

/// `{ file: PATH }` (one address item per line of the file) or `{ url:
/// URL, format, json_path, refresh, max_entries, max_bytes, timeout,
/// max_shrink, sha256 }` (a feed the daemon fetches). One mapping for
/// both, so that a key of the other kind is an error validation words.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub file: Option<Spanned<Scalar>>,
    pub url: Option<Spanned<Scalar>>,
    pub format: Option<Spanned<Scalar>>,
    pub json_path: Option<Spanned<ItemList>>,
    pub refresh: Option<Spanned<Scalar>>,
    pub max_entries: Option<Spanned<Scalar>>,
    pub max_bytes: Option<Spanned<Scalar>>,
    pub timeout: Option<Spanned<Scalar>>,
    pub max_shrink: Option<Spanned<Scalar>>,
    pub sha256: Option<Spanned<Scalar>>,
}

struct GroupVisitor;

impl<'de> Visitor<'de> for GroupVisitor {
    type Value = GroupValue;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of address items, `{ file: PATH }` or `{ url: URL }`")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<GroupValue, E> {
        ItemListVisitor.visit_str(v).map(GroupValue::Items)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<GroupValue, E> {
        ItemListVisitor.visit_string(v).map(GroupValue::Items)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<GroupValue, E> {
        ItemListVisitor.visit_bool(v).map(GroupValue::Items)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<GroupValue, E> {
        ItemListVisitor.visit_i64(v).map(GroupValue::Items)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<GroupValue, E> {
        ItemListVisitor.visit_u64(v).map(GroupValue::Items)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<GroupValue, E> {
        ItemListVisitor.visit_f64(v).map(GroupValue::Items)
    }
    fn visit_unit<E: de::Error>(self) -> Result<GroupValue, E> {
        ItemListVisitor.visit_unit().map(GroupValue::Items)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<GroupValue, A::Error> {
        ItemListVisitor.visit_seq(seq).map(GroupValue::Items)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<GroupValue, A::Error> {
        RawSource::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(|s| GroupValue::Source(Box::new(s)))
    }
}

impl<'de> Deserialize<'de> for GroupValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(GroupVisitor)
    }
}

/// An entry: an address item, or a mapping with `from` and options.
#[derive(Debug)]
pub(crate) enum RawEntry {
    Item(String),
    Map(Box<RawEntryMap>),
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = RawEntry;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address item or a mapping with `from`")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEntry, E> {
        Ok(RawEntry::Item(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<RawEntry, E> {
        Ok(RawEntry::Item(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawEntry, E> {
        Ok(RawEntry::Item(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawEntry, E> {
        Ok(RawEntry::Item(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawEntry, E> {
        Ok(RawEntry::Item(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawEntry, E> {
        Ok(RawEntry::Item(v.to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawEntry, A::Error> {
        RawEntryMap::deserialize(de::value::MapAccessDeserializer::new(map))
            .map(|m| RawEntry::Map(Box::new(m)))
    }
}

impl<'de> Deserialize<'de> for RawEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

/// A list of entries; `allow:` with nothing after it is an empty list.
#[derive(Debug, Default)]
pub(crate) struct EntryList(pub Vec<At<RawEntry>>);

struct EntryListVisitor;

impl<'de> Visitor<'de> for EntryListVisitor {
    type Value = EntryList;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of entries")
    }
    fn visit_unit<E: de::Error>(self) -> Result<EntryList, E> {
        Ok(EntryList::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<EntryList, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(item) = seq.next_element::<Spanned<RawEntry>>()? {
            let item = At::from(item);
            let rest = match &item.value {
                RawEntry::Item(s) => address_runs::claim(item.pos, s),
                RawEntry::Map(_) => None,
            };
            v.push(item);
            if let Some(rest) = rest {
                v.extend(rest.into_iter().map(|(s, pos)| At {
                    value: RawEntry::Item(s),
                    pos,
                }));
            }
        }
        Ok(EntryList(v))
    }
}

impl<'de> Deserialize<'de> for EntryList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryListVisitor)
    }
}

/// A mapping from names to values that keeps every key with its position,
/// duplicates included, so that a group or service defined twice is
/// reported with both places.
#[derive(Debug)]
pub(crate) struct NamedMap<V>(pub Vec<(Spanned<Scalar>, V)>);

struct NamedMapVisitor<V>(std::marker::PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for NamedMapVisitor<V> {
    type Value = NamedMap<V>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of names")
    }
    fn visit_unit<E: de::Error>(self) -> Result<NamedMap<V>, E> {
        Ok(NamedMap(Vec::new()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NamedMap<V>, A::Error> {
        let mut v = Vec::new();
        while let Some(k) = map.next_key::<Spanned<Scalar>>()? {
            let value = map.next_value::<V>()?;
            v.push((k, value));
        }
        Ok(NamedMap(v))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NamedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(NamedMapVisitor(std::marker::PhantomData))
    }
}

/// A YAML or structure error: position and message.
#[derive(Debug)]
pub(crate) struct YamlError {
    pub pos: Option<Pos>,
    pub message: String,
}

/// Renders serde-saphyr's messages without the location it appends (the
/// caller puts `FILE:LINE:COL:` in front instead).
struct NoLocation;

impl serde_saphyr::Localizer for NoLocation {
    fn attach_location<'a>(
        &self,
        base: std::borrow::Cow<'a, str>,
        _loc: Location,
    ) -> std::borrow::Cow<'a, str> {
        base
    }
}

/// Events and nodes the parser may produce for `text`.
fn budget_nodes(text: &str) -> usize {
    text.len().saturating_add(4096)
}

fn options(text: &str, duplicates: serde_saphyr::DuplicateKeyPolicy) -> serde_saphyr::Options {
    // The budget grows with the file: a node costs at least a byte of text
    // unless an alias replays it, so a budget of about one event and one
    // node per byte never refuses a real policy (a million prefixes is
    // about 25 MB) and bounds what aliases can expand a small file to
    // (the "billion laughs"). The parser's nesting limits stay at their
    // defaults.
    let n = budget_nodes(text);
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = n;
    budget.max_nodes = n;
    budget.max_recorded_anchor_events = n;
    serde_saphyr::options! {
        budget: Some(budget),
        duplicate_keys: duplicates,
        strict_booleans: true,
        with_snippet: false,
    }
}

fn yaml_error(e: &serde_saphyr::Error, text: &str) -> YamlError {
    let pos = e.location().as_ref().and_then(pos_of);
    let formatter = serde_saphyr::DefaultMessageFormatter;
    let loc = NoLocation;
    let formatter = formatter.with_localizer(&loc);
    let opts = serde_saphyr::render_options! {
        formatter: &formatter,
        snippets: serde_saphyr::SnippetMode::Off,
    };
    let message = e.render_with_options(opts);
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    YamlError {
        pos,
        message: explain_yaml_message(message, text, pos),
    }
}

/// The file's raw structure; long runs of address lines are read by
/// `address_runs` (the same result, several times faster) when the parse
/// of the reduced copy stands for the file.
pub(crate) fn parse(text: &str) -> Result<RawPolicy, YamlError> {
    #[cfg(test)]
    let runs = !AS_WRITTEN.get();
    #[cfg(not(test))]
    let runs = true;
    parse_counting(text, runs).map(|(raw, _)| raw)
}

#[cfg(test)]
thread_local! {
    /// Tests: parse every file as written (the reference of
    /// `address_runs`' differential).
    pub(crate) static AS_WRITTEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`parse`], and how many items the runs gave; `runs: false` parses the
/// file as written (the reference the tests compare against).
pub(crate) fn parse_counting(text: &str, runs: bool) -> Result<(RawPolicy, usize), YamlError> {
    if runs && let Some((reduced, found)) = address_runs::find(text) {
        let active = address_runs::Active::start(found);
        let passthrough = serde_saphyr::DuplicateKeyPolicy::PassThrough;
        let parsed =
            serde_saphyr::from_str_with_options::<RawPolicy>(&reduced, options(text, passthrough));
        let found = active.finish();
        if let Ok(raw) = parsed
            && found.all_claimed()
        {
            return Ok((raw, found.items()));
        }
        // An error, or a run the parser did not hand to a list: the file
        // as written decides, with its own messages.
    }
    parse_as_written(text).map(|raw| (raw, 0))
}

fn parse_as_written(text: &str) -> Result<RawPolicy, YamlError> {
    // Duplicate keys reach the visitors, so that a group or service defined
    // twice is reported with both positions and the other errors.
    let passthrough = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    serde_saphyr::from_str_with_options::<RawPolicy>(text, options(text, passthrough)).map_err(
        |e| {
            let mut err = yaml_error(&e, text);
            if err.pos.is_none() && err.message.starts_with("duplicate key") {
                // serde reports a repeated field of the top-level mapping
                // without a position; the parser's own duplicate check has it.
                let strict = serde_saphyr::DuplicateKeyPolicy::Error;
                if let Err(e2) =
                    serde_saphyr::from_str_with_options::<RawPolicy>(text, options(text, strict))
                {
                    let again = yaml_error(&e2, text);
                    if again.pos.is_some() && again.message.starts_with("duplicate key") {
                        err = again;
                    }
                }
            }
            err
        },
    )
}

/// Adds the hint an operator needs for the YAML mistakes policies invite.
fn explain_yaml_message(message: &str, text: &str, pos: Option<Pos>) -> String {
    if message.starts_with("budget breached") {
        return format!(
            "the file expands to more than {} YAML nodes (one per byte of the file) through anchors and aliases: name a group where an alias repeats a list",
            budget_nodes(text)
        );
    }
    // serde speaks of fields; a policy has keys.
    for (from, to) in [
        ("unknown field", "unknown key"),
        ("missing field", "missing key"),
        ("duplicate field", "duplicate key"),
    ] {
        if let Some(rest) = message.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    match message {
        "expected mapping start" => {
            return "expected a mapping (`key: value` lines) here".to_string();
        }
        "expected string scalar" => {
            return "expected a single value here, not a list or a mapping".to_string();
        }
        _ => {}
    }
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!("duplicate key `{key}`: each key may appear once");
    }
    let at = pos.and_then(|p| {
        let line = text.lines().nth(p.line.checked_sub(1)? as usize)?;
        Some(
            line.chars()
                .skip(p.column.checked_sub(1)? as usize)
                .collect::<String>(),
        )
    });
    if message.contains("anchor")
        && let Some(rest) = at.as_deref()
        && rest.starts_with('*')
    {
        let value: String = rest
            .chars()
            .take_while(|c| !matches!(c, ',' | ']' | '}' | ' ' | '#'))
            .collect();
        return format!(
            "{value:?}: a value that starts with `*` must be quoted in YAML (`*` starts an alias): write \"{value}\""
        );
    }
    message.to_string()
}
