//! Long runs of address lines (`  - 198.51.100.0/24`), read without the
//! YAML parser.
//!
//! A policy of a million entries is a million lines of that one shape, and
//! serde-saphyr spends about 0.7 µs on each (tokens, events, a `Spanned`
//! with two locations, a number probe). This module finds runs of such
//! lines by their text and hands the parser a copy of the file in which
//! every line of a run but the first is a comment (its `-` turned into
//! `#`: the same length, so every other position stays). The entry and
//! item lists (`yaml.rs`) then claim a run when the parser gives them its
//! first line as an item, and add the rest themselves.
//!
//! Exactness does not rest on the line matcher: the result is used only
//! when every run was claimed exactly once, at the position the matcher
//! expected, by a list the parser itself found there. A run inside a block
//! scalar, a multi-line quoted string or any context other than a block
//! sequence of entries or items is never claimed, and the whole file is
//! then parsed again as written. Given a claimed first line, the lines
//! after it, with the same indentation and `- ` at the same column, are
//! the next items of the same block sequence (a plain scalar continues only
//! on lines indented deeper). Files with anchors or aliases (`&`, `*`
//! anywhere) are always parsed as written: an alias replays what the
//! parser saw, and the alias budget must count what is written.
//! `yaml_differential` in the tests compares both ways on generated files.

use std::cell::RefCell;

use crate::diag::Pos;

/// Runs shorter than this are left to the parser: nothing to gain.
const MIN_RUN: usize = 2;

/// One run: its first line (1-based) and the column (1-based) of its
/// items, and the items' text in order, the first included.
#[derive(Debug)]
struct Run {
    line: u32,
    column: u32,
    items: Vec<String>,
    /// How many items it had before a claim took them.
    len: usize,
    claimed: u32,
}

/// The runs of one file while its reduced copy is parsed.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    runs: Vec<Run>,
    /// A claim that did not match (another column, another text, a second
    /// claim): the reduced parse is not used.
    mismatch: bool,
}

impl Runs {
    /// Whether the parse of the reduced copy stands for the file: every
    /// run claimed once, nothing amiss.
    pub(crate) fn all_claimed(&self) -> bool {
        !self.mismatch && self.runs.iter().all(|r| r.claimed == 1)
    }

    /// The items the runs hold, in all.
    pub(crate) fn items(&self) -> usize {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// The reduced copy of `text` and its runs, or None when the file has no
/// run worth it or must be parsed as written.
pub(crate) fn find(text: &str) -> Option<(String, Runs)> {
    if text.contains(['&', '*']) {
        return None;
    }
    // A line's offset in `text`, of which it is a slice.
    let base = text.as_ptr() as usize;
    let offset = |line: &str| line.as_ptr() as usize - base;
    let mut lines = text.split('\n').peekable();
    let mut runs: Vec<Run> = Vec::new();
    let mut dashes = Vec::new();
    let mut n = 0usize;
    while let Some(raw) = lines.next() {
        n += 1;
        let Some((indent, first)) = address_line(raw) else {
            continue;
        };
        let line = n;
        let mut items = vec![first.to_string()];
        let mut at_dash = vec![offset(raw) + indent];
        while let Some(&next) = lines.peek()
            && let Some((i, item)) = address_line(next)
            && i == indent
        {
            items.push(item.to_string());
            at_dash.push(offset(next) + indent);
            lines.next();
            n += 1;
        }
        // A deeper line after the run (blank lines aside) would continue
        // its last item's plain scalar: that item is the parser's.
        if !followed_safely(lines.clone(), indent) {
            items.pop();
            at_dash.pop();
        }
        if items.len() >= MIN_RUN {
            // The first line stays an item the parser sees.
            dashes.extend_from_slice(&at_dash[1..]);
            runs.push(Run {
                line: u32::try_from(line).ok()?,
                column: u32::try_from(indent + 3).ok()?,
                len: items.len(),
                items,
                claimed: 0,
            });
        }
    }
    if runs.is_empty() {
        return None;
    }
    let mut bytes = text.as_bytes().to_vec();
    for d in dashes {
        // `-` and `#` are both one byte: the copy stays valid UTF-8 and
        // every position in it is the file's.
        bytes[d] = b'#';
    }
    let reduced = String::from_utf8(bytes).ok()?;
    Some((
        reduced,
        Runs {
            runs,
            mismatch: false,
        },
    ))
}

/// Whether the lines after a run at `indent` cannot continue its last
/// item: past blank lines, the next is at most as indented and starts with
/// no white space other than spaces (or there is none).
fn followed_safely<'a>(mut after: impl Iterator<Item = &'a str>, indent: usize) -> bool {
    let Some(next) = after.find(|l| !l.bytes().all(|c| c == b' ')) else {
        return true;
    };
    let i = next.bytes().take_while(|&c| c == b' ').count();
    i <= indent && !next.as_bytes()[i].is_ascii_whitespace()
}

/// `(indent, item)` of a line `<spaces>- <item>[ <spaces>[# comment]]`,
/// where the item looks like an address and the parser would read it as
/// that very string.
fn address_line(line: &str) -> Option<(usize, &str)> {
    let b = line.as_bytes();
    let indent = b.iter().take_while(|&&c| c == b' ').count();
    let rest = line.get(indent..)?.strip_prefix("- ")?;
    let len = rest
        .bytes()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, b'.' | b':' | b'/'))
        .count();
    let (item, after) = rest.split_at(len);
    if !after.is_empty() {
        // Only a comment may follow, after a space (a `#` right after the
        // item would belong to it); no tab or CR anywhere.
        if !after.starts_with(' ') || after.contains(['\t', '\r']) {
            return None;
        }
        let t = after.trim_start_matches(' ');
        if !t.is_empty() && !t.starts_with('#') {
            return None;
        }
    }
    plain_string(item).then_some((indent, item))
}

/// Whether YAML reads `s` (of hex digits, `.`, `:` and `/`) in a block
/// sequence as the string `s`, by its letters alone: whether it is an
/// address is validation's business, and the same on either path. It must
/// start with a digit or a hex letter (a leading `:` is an indicator), not
/// end with `:` (a mapping key), and be no number of YAML 1.2 or 1.1: a
/// `/`, a second `.`, or a `:` beside `::` or a hex letter rules out every
/// integer, float and sexagesimal form (`10`, `1.5`, `1e5`, `1:20`,
/// `1:20.5`).
fn plain_string(s: &str) -> bool {
    let (Some(first), Some(last)) = (s.bytes().next(), s.bytes().last()) else {
        return false;
    };
    if !first.is_ascii_hexdigit() || last == b':' {
        return false;
    }
    s.contains('/')
        || s.bytes().filter(|&c| c == b'.').count() >= 2
        || (s.contains(':') && (s.contains("::") || s.bytes().any(|c| c.is_ascii_alphabetic())))
}

thread_local! {
    /// The runs of the file whose reduced copy this thread is parsing.
    static ACTIVE: RefCell<Option<Runs>> = const { RefCell::new(None) };
}

/// Makes `runs` the ones [`claim`] answers from until the guard is
/// dropped, which gives them back.
pub(crate) struct Active;

impl Active {
    pub(crate) fn start(runs: Runs) -> Active {
        ACTIVE.with(|a| *a.borrow_mut() = Some(runs));
        Active
    }

    pub(crate) fn finish(self) -> Runs {
        ACTIVE.with(|a| a.borrow_mut().take()).unwrap_or_default()
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().take());
    }
}

/// The items after `first` when the parser found `first` at `pos` as an
/// item of a block sequence and a run starts there; each with its
/// position. None when no run starts there (or none is active).
pub(crate) fn claim(pos: Option<Pos>, first: &str) -> Option<Vec<(String, Option<Pos>)>> {
    let pos = pos?;
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let runs = a.as_mut()?;
        let i = runs.runs.binary_search_by_key(&pos.line, |r| r.line).ok()?;
        let r = &mut runs.runs[i];
        if r.column != pos.column
            || r.claimed != 0
            || r.items.first().map(String::as_str) != Some(first)
        {
            runs.mismatch = true;
            return None;
        }
        r.claimed += 1;
        let (line, column) = (r.line, r.column);
        let items = std::mem::take(&mut r.items);
        Some(
            items
                .into_iter()
                .enumerate()
                .skip(1)
                .map(|(k, s)| {
                    let line = u32::try_from(k).ok().and_then(|k| line.checked_add(k));
                    (s, line.map(|line| Pos { line, column }))
                })
                .collect(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lines() {
        assert_eq!(address_line("  - 198.51.100.7"), Some((2, "198.51.100.7")));
        assert_eq!(
            address_line("- 198.51.100.0/24   # office"),
            Some((0, "198.51.100.0/24"))
        );
        assert_eq!(
            address_line("    - 2001:db8::/32"),
            Some((4, "2001:db8::/32"))
        );
        // Not an address, but a string either way: validation refuses it
        // with the same message on both paths.
        assert_eq!(
            address_line("  - 198.51.100.0/33"),
            Some((2, "198.51.100.0/33"))
        );
        assert_eq!(address_line("  - 1.2.3"), Some((2, "1.2.3")));
        for no in [
            "  - 198.51.100.7#x",
            "  - 198.51.100.7 x",
            "  - ::1",
            "  - 1:20",
            "  - 1.5",
            "  - 10",
            "  - 198.51.100.7\r",
            "  - 198.51.100.7\t# x",
            "\t- 198.51.100.7",
            "  -198.51.100.7",
            "  - \"198.51.100.7\"",
            "  - 198.51.100.7:",
            "  - 1:20.5",
            "  - 1e5",
            "  - 198.51.100.1-198.51.100.9",
            "  - office",
            "  key: 198.51.100.7",
        ] {
            assert_eq!(address_line(no), None, "{no:?}");
        }
    }

    #[test]
    fn runs_keep_their_first_line_and_every_offset() {
        let text =
            "allow:\n  - 198.51.100.1\n  - 198.51.100.2\n  - 198.51.100.3 # c\nservices: {}\n";
        let (reduced, runs) = find(text).unwrap();
        assert_eq!(
            reduced,
            "allow:\n  - 198.51.100.1\n  # 198.51.100.2\n  # 198.51.100.3 # c\nservices: {}\n"
        );
        assert_eq!(reduced.len(), text.len());
        assert_eq!(runs.items(), 3);
        assert!(!runs.all_claimed());
        assert!(find("allow: [198.51.100.1]\n").is_none());
        // The last line of a run followed by a deeper one stays as written.
        for after in ["    more\n", "\n\n    more\n", "    # c\n", "\tx\n"] {
            let text =
                format!("allow:\n  - 198.51.100.1\n  - 198.51.100.2\n  - 198.51.100.3\n{after}");
            let (reduced, runs) = find(&text).unwrap();
            assert_eq!(runs.items(), 2, "{after:?}");
            assert!(reduced.contains("\n  - 198.51.100.3\n"), "{after:?}");
        }
        assert!(find("allow: &a\n  - 198.51.100.1\n  - 198.51.100.2\n").is_none());
    }

    #[test]
    fn a_claim_must_match_line_column_and_text() {
        let text = "allow:\n  - 198.51.100.1\n  - 198.51.100.2\n";
        let (_, runs) = find(text).unwrap();
        let active = Active::start(runs);
        let at = |line, column| Some(Pos { line, column });
        assert_eq!(claim(at(3, 5), "198.51.100.2"), None);
        let rest = claim(at(2, 5), "198.51.100.1").unwrap();
        assert_eq!(rest, vec![("198.51.100.2".to_string(), at(3, 5))]);
        let runs = active.finish();
        assert!(runs.all_claimed());

        let (_, runs) = find(text).unwrap();
        let active = Active::start(runs);
        assert_eq!(claim(at(2, 4), "198.51.100.1"), None);
        assert!(!active.finish().all_claimed());
    }
}

/// Both ways of reading a file agree, on generated files full of the
/// shapes that look like runs and are not.
#[cfg(test)]
mod differential {
    use proptest::prelude::*;

    use crate::yaml::{self, AS_WRITTEN};

    /// Items: mostly addresses, and now and then what looks like one to
    /// a line matcher but is a number, a key, a comment or an error to
    /// YAML or to validation.
    const GOOD: &[&str] = &[
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.0/24",
        "203.0.113.9",
        "203.0.113.0/25 # office",
        "2001:db8::1",
        "2001:db8:1::/48   # site",
        "203.0.113.64/26",
    ];
    const ODD: &[&str] = &[
        "198.51.100.0/33",
        "1.2.3",
        "1.5",
        "1e5",
        "10",
        "1:20",
        "1:20.5",
        "::1",
        "198.51.100.7:",
        "198.51.100.7#x",
        "198.51.100.7\t# tab",
        "198.51.100.7\r",
        "office",
        "\"198.51.100.3\"",
        "198.51.100.4-198.51.100.9",
        "1::2",
        "abc",
        "- 198.51.100.5",
        "{ from: 198.51.100.6, label: x }",
        "[198.51.100.8, 203.0.113.1]",
    ];

    fn item() -> impl Strategy<Value = String> {
        prop_oneof![
            50 => prop::sample::select(GOOD),
            1 => prop::sample::select(ODD),
        ]
        .prop_map(str::to_string)
    }

    /// A block list at `indent`, its items with blank and comment lines,
    /// continuation lines and (`maps`) the odd mapping entry between them.
    fn block(indent: usize, maps: bool) -> impl Strategy<Value = String> {
        prop::collection::vec((item(), 0u8..60), 0..14).prop_map(move |items| {
            let pad = " ".repeat(indent);
            let mut s = String::new();
            for (it, extra) in items {
                s.push_str(&format!("{pad}- {it}\n"));
                match extra {
                    0 => s.push('\n'),
                    1 => s.push_str(&format!("{pad}# between\n")),
                    2 if maps => s.push_str(&format!(
                        "{pad}- from: 203.0.113.5\n{pad}  label: |\n{pad}    - 198.51.100.1\n{pad}    - 198.51.100.2\n"
                    )),
                    3 => s.push_str(&format!("{pad}  - 198.51.100.3\n{pad}  - 198.51.100.4\n")),
                    4 if maps => s.push_str(&format!(
                        "{pad}- from:\n{pad}    - 198.51.100.5\n{pad}    - 198.51.100.6\n"
                    )),
                    5 => s.push_str(&format!("\n{pad}   continued\n")),
                    6 => s.push_str(&format!("{pad}    # deeper comment\n")),
                    _ => {}
                }
            }
            s
        })
    }

    /// A policy of lists under every key that takes one, some as other
    /// constructs (a literal block, a quoted multi-line string, an
    /// anchor) whose lines look like items.
    fn policy() -> impl Strategy<Value = String> {
        (
            prop::sample::select(&[0usize, 2, 4][..]),
            block(0, true),
            block(2, true),
            block(4, false),
            block(2, true),
            0u8..14,
        )
            .prop_map(|(ind, a, b, c, d, shape)| {
                let pad = " ".repeat(ind);
                let mut s = String::from("version: 1\nmode: monitor\n");
                s.push_str("allow:\n");
                s.push_str(&indent_by(&a, ind));
                s.push_str("always_allow:\n");
                s.push_str(&b);
                s.push_str("groups:\n  office:\n");
                s.push_str(&c);
                s.push_str("services:\n  ssh:\n    ports: [tcp/22]\n    allow:\n");
                s.push_str(&indent_by(&d, 4));
                match shape {
                    0 => s.push_str(&format!(
                        "deny:\n{pad}- from: 203.0.113.7\n{pad}  label: |\n{pad}    - 198.51.100.1\n{pad}    - 198.51.100.2\n{pad}    - 198.51.100.3\n"
                    )),
                    1 => s.push_str(&format!(
                        "deny:\n{pad}- from: 203.0.113.7\n{pad}  label: \"x\n{pad}    - 198.51.100.1\n{pad}    - 198.51.100.2\"\n"
                    )),
                    2 => s.push_str("deny: &d\n  - 203.0.113.8\n  - 203.0.113.9\n"),
                    3 => s.push_str("deny:\n- 203.0.113.8\n- 203.0.113.9\n  - 203.0.113.10\n"),
                    4 => s.push_str("deny: [\n  - 203.0.113.8,\n  - 203.0.113.9 ]\n"),
                    5 => s.push_str("allow:\n  - 203.0.113.8\n  - 203.0.113.9\n"),
                    _ => {}
                }
                s
            })
    }

    fn indent_by(block: &str, n: usize) -> String {
        let pad = " ".repeat(n);
        block
            .lines()
            .map(|l| {
                if l.is_empty() {
                    "\n".to_string()
                } else {
                    format!("{pad}{l}\n")
                }
            })
            .collect()
    }

    fn both(text: &str) -> (String, String) {
        let fast = format!("{:?}", crate::parse_str("p.yaml", text));
        AS_WRITTEN.set(true);
        let written = format!("{:?}", crate::parse_str("p.yaml", text));
        AS_WRITTEN.set(false);
        (fast, written)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn runs_read_as_the_parser_reads_the_file(text in policy()) {
            let (fast, written) = both(&text);
            prop_assert_eq!(fast, written, "{}", text);
        }
    }

    #[test]
    fn a_long_list_is_read_from_its_runs() {
        let mut text = String::from("version: 1\nallow:\n");
        for i in 0..1000u32 {
            text.push_str(&format!("  - 198.51.{}.{}\n", i / 250, i % 250));
        }
        text.push_str("services:\n  web:\n    ports: [tcp/443]\n    allow:\n");
        for i in 0..500u32 {
            text.push_str(&format!("      - 2001:db8:{i:x}::/48 # site {i}\n"));
        }
        let (_, items) = yaml::parse_counting(&text, true).unwrap();
        assert_eq!(items, 1500);
        let (fast, written) = both(&text);
        assert_eq!(fast, written);
        // The positions of diagnostics are the file's.
        text.push_str("      - 2001:db8:zz::/48\n");
        let (fast, written) = both(&text);
        assert_eq!(fast, written);
        assert!(fast.contains("line: 1507, column: 9"), "{fast}");
    }
}
