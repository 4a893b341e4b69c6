//! URL feeds: a group written `{ url: https://…, format: lines | json, … }`
//! stands for the address items of a document the daemon fetches (a
//! provider's published ranges). The policy only describes the feed; what
//! it holds comes from the daemon's last good copy, merged in by the
//! compiler like the addresses of a DNS name. The kernel only ever sees
//! prefixes.
//!
//! [`Feed::parse_body`] is the one reading of a fetched document: the
//! daemon accepts a copy only if it passes, so a malformed feed never
//! reaches the datapath.

use std::{fmt, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde_json_path::JsonPath;

use crate::addr::{self, Item};

/// How a feed's document is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeedFormat {
    /// One address item per line, `#` comments, blank lines (a list file).
    Lines,
    /// A JSON document whose strings at `json_path` are address items.
    Json,
}

impl FeedFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedFormat::Lines => "lines",
            FeedFormat::Json => "json",
        }
    }
}

/// A feed as the policy describes it.
#[derive(Clone, Debug)]
pub struct Feed {
    /// The group it defines: how status, metrics and logs name it.
    pub group: Arc<str>,
    /// `https://…`, as written.
    pub url: Arc<str>,
    pub format: FeedFormat,
    /// `json_path`: RFC 9535 JSONPath expressions, as written, and parsed.
    pub json_paths: Vec<(String, JsonPath)>,
    /// How often it is fetched again.
    pub refresh: Duration,
    /// A document with more address items is refused.
    pub max_entries: usize,
    /// A body larger than this is refused (and not read further).
    pub max_bytes: u64,
    /// For the whole fetch: connection, TLS, request and body.
    pub timeout: Duration,
    /// A copy that drops more than this share (percent) of the last good
    /// copy's entries at once is held: the last good copy stays in force.
    pub max_shrink_percent: u8,
    /// When set, the body's SHA-256 (lowercase hex) must be this.
    pub sha256: Option<String>,
}

pub const DEFAULT_FEED_REFRESH: Duration = Duration::from_secs(3600);
pub const DEFAULT_FEED_MAX_ENTRIES: usize = 100_000;
pub const DEFAULT_FEED_MAX_BYTES: u64 = 16 << 20;
pub const DEFAULT_FEED_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_FEED_MAX_SHRINK_PERCENT: u8 = 50;

impl Feed {
    /// What a copy depends on besides the bytes: a copy kept for another
    /// URL, format or path is not this feed's.
    pub fn identity(&self) -> String {
        let paths: Vec<&str> = self.json_paths.iter().map(|(s, _)| s.as_str()).collect();
        format!(
            "{}\n{}\n{}",
            self.url,
            self.format.as_str(),
            paths.join("\n")
        )
    }

    /// The prefixes of a fetched document, or why it is refused (one line,
    /// naming the line or the JSON location of the first bad item).
    pub fn parse_body(&self, body: &[u8]) -> Result<ParsedFeed, String> {
        if body.len() as u64 > self.max_bytes {
            return Err(format!(
                "the body is {} bytes, over max_bytes {}",
                body.len(),
                self.max_bytes
            ));
        }
        if let Some(want) = &self.sha256 {
            let got = crate::sha256_hex(body);
            if &got != want {
                return Err(format!(
                    "the body's sha256 is {got}, not the pinned {want}: update `sha256:` once the new document is trusted"
                ));
            }
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            let line = body[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            format!("line {line}: the body is not UTF-8")
        })?;
        let mut out = ParsedFeed::default();
        match self.format {
            FeedFormat::Lines => {
                for (i, line) in text.lines().enumerate() {
                    let item = line.split('#').next().unwrap_or("").trim();
                    if item.is_empty() {
                        continue;
                    }
                    self.item(item, &mut out)
                        .map_err(|m| format!("line {}: {m}", i + 1))?;
                }
            }
            FeedFormat::Json => {
                let doc: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
                let mut matched = 0usize;
                for (written, path) in &self.json_paths {
                    for node in path.query_located(&doc) {
                        matched += 1;
                        let Some(s) = node.node().as_str() else {
                            return Err(format!(
                                "{} (json_path {written:?}) is not a string but {}",
                                node.location(),
                                kind(node.node())
                            ));
                        };
                        self.item(s.trim(), &mut out)
                            .map_err(|m| format!("{}: {m}", node.location()))?;
                    }
                }
                if matched == 0 {
                    let paths: Vec<&str> =
                        self.json_paths.iter().map(|(s, _)| s.as_str()).collect();
                    return Err(format!(
                        "json_path {} matches nothing in the document: check the path against the feed's shape",
                        paths.join(", ")
                    ));
                }
            }
        }
        out.nets.sort_unstable();
        out.nets.dedup();
        Ok(out)
    }

    fn item(&self, s: &str, out: &mut ParsedFeed) -> Result<(), String> {
        let before = out.nets.len();
        match addr::parse_item(s, &mut out.nets) {
            Ok(Item::Nets { host_bits }) => {
                out.items += 1;
                if host_bits.is_some() {
                    out.host_bits += 1;
                }
                if out.items > self.max_entries {
                    return Err(format!(
                        "more than max_entries {} address items: raise max_entries if the feed grew",
                        self.max_entries
                    ));
                }
                Ok(())
            }
            Ok(Item::Group(_) | Item::Name(_)) => {
                out.nets.truncate(before);
                Err(format!(
                    "{s:?} is not an address item: a feed holds addresses, CIDRs, ranges and wildcards"
                ))
            }
            Err(m) => {
                out.nets.truncate(before);
                Err(m)
            }
        }
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// What a document holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedFeed {
    /// Sorted, without duplicates.
    pub nets: Vec<IpNet>,
    /// Address items read (the count `max_entries` and the shrink guard
    /// judge).
    pub items: usize,
    /// Items with host bits set (taken as their prefix).
    pub host_bits: usize,
}

impl fmt::Display for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "feed {} ({})", self.group, self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(format: FeedFormat, paths: &[&str]) -> Feed {
        Feed {
            group: Arc::from("f"),
            url: Arc::from("https://feed.test/x"),
            format,
            json_paths: paths
                .iter()
                .map(|p| (p.to_string(), JsonPath::parse(p).unwrap()))
                .collect(),
            refresh: DEFAULT_FEED_REFRESH,
            max_entries: 5,
            max_bytes: 1 << 20,
            timeout: DEFAULT_FEED_TIMEOUT,
            max_shrink_percent: DEFAULT_FEED_MAX_SHRINK_PERCENT,
            sha256: None,
        }
    }

    #[test]
    fn lines_are_read_like_a_list_file() {
        let f = feed(FeedFormat::Lines, &[]);
        let p = f
            .parse_body(b"# ranges\n198.51.100.0/24\n\n  203.0.113.7 # one\n2001:db8::/32\n")
            .unwrap();
        assert_eq!(p.items, 3);
        assert_eq!(p.nets.len(), 3);
        let e = f
            .parse_body(b"198.51.100.0/24\n203.0.113.7\nnot-an-address!\n")
            .unwrap_err();
        assert!(e.starts_with("line 3: "), "{e}");
        let e = f.parse_body(b"office\n").unwrap_err();
        assert!(e.contains("not an address item"), "{e}");
        let e = f.parse_body(b"1.1.1.1\n1.1.1.2\n1.1.1.3\n1.1.1.4\n1.1.1.5\n1.1.1.6\n");
        assert!(e.unwrap_err().contains("max_entries 5"));
    }

    #[test]
    fn json_paths_pick_the_strings() {
        // The shape of AWS's ip-ranges.json.
        let aws = br#"{"syncToken":"1","prefixes":[{"ip_prefix":"198.51.100.0/24","region":"x"},
            {"ip_prefix":"203.0.113.0/25","region":"y"}],
            "ipv6_prefixes":[{"ipv6_prefix":"2001:db8:1::/48"}]}"#;
        let f = feed(
            FeedFormat::Json,
            &["$.prefixes[*].ip_prefix", "$.ipv6_prefixes[*].ipv6_prefix"],
        );
        let p = f.parse_body(aws).unwrap();
        assert_eq!(p.items, 3);
        let f = feed(FeedFormat::Json, &["$.nothing[*]"]);
        assert!(f.parse_body(aws).unwrap_err().contains("matches nothing"));
        let f = feed(FeedFormat::Json, &["$.prefixes[*]"]);
        let e = f.parse_body(aws).unwrap_err();
        assert!(
            e.contains("$['prefixes'][0]") && e.contains("an object"),
            "{e}"
        );
        let f = feed(FeedFormat::Json, &["$.syncToken"]);
        let e = f.parse_body(aws).unwrap_err();
        assert!(e.contains("$['syncToken']"), "{e}");
        let e = feed(FeedFormat::Json, &["$.a"])
            .parse_body(b"{\n\"a\": [1,\n")
            .unwrap_err();
        assert!(e.starts_with("not JSON") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_pin_and_the_size_cap_refuse_other_bodies() {
        let mut f = feed(FeedFormat::Lines, &[]);
        f.sha256 = Some(crate::sha256_hex(b"198.51.100.7\n"));
        assert!(f.parse_body(b"198.51.100.7\n").is_ok());
        assert!(
            f.parse_body(b"198.51.100.8\n")
                .unwrap_err()
                .contains("pinned")
        );
        f.sha256 = None;
        f.max_bytes = 4;
        assert!(
            f.parse_body(b"198.51.100.7\n")
                .unwrap_err()
                .contains("max_bytes 4")
        );
    }
}
