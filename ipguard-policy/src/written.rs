//! An entry as the operator wrote it, for `explain`, `status`, events and
//! warnings.

use std::{borrow::Cow, fmt, sync::Arc};

use ipnet::IpNet;

/// The text of an entry. Most entries of a large policy are one address or
/// prefix, written as ipguard prints it: those keep their prefix rather
/// than a copy of the text (at a million entries, a million allocations
/// and about 45 MB).
#[derive(Clone, PartialEq, Eq)]
pub enum Written {
    /// Written as [`Written::render`] prints this prefix.
    Net(IpNet),
    Text(Arc<str>),
}

/// Longer than any rendered prefix (an IPv6 address with a length is at
/// most 43 characters).
const RENDERED_MAX: usize = 64;

impl Written {
    /// `text` as written for an entry of the prefixes `nets`.
    pub fn new(text: &str, nets: &[IpNet]) -> Self {
        if let [n] = nets {
            // Compared on the stack: this runs once per entry. IPv4 by
            // hand, since `fmt` takes most of the time of reading a
            // million-entry list.
            let mut buf = Stack::default();
            let rendered = match n {
                IpNet::V4(v4) => {
                    buf.v4(v4);
                    true
                }
                IpNet::V6(_) => Self::render(&mut buf, n).is_ok(),
            };
            if rendered && buf.as_bytes() == text.as_bytes() {
                return Written::Net(*n);
            }
        }
        Written::Text(Arc::from(text))
    }

    /// How an entry of one prefix is written canonically: a host without
    /// its length (`198.51.100.7`), other prefixes with it.
    fn render(w: &mut impl fmt::Write, n: &IpNet) -> fmt::Result {
        if n.prefix_len() == n.max_prefix_len() {
            write!(w, "{}", n.addr())
        } else {
            write!(w, "{n}")
        }
    }

    pub fn as_str(&self) -> Cow<'_, str> {
        match self {
            Written::Net(_) => Cow::Owned(self.to_string()),
            Written::Text(t) => Cow::Borrowed(t),
        }
    }
}

/// A rendering buffer that refuses what does not fit.
struct Stack {
    buf: [u8; RENDERED_MAX],
    len: usize,
}

impl Default for Stack {
    fn default() -> Self {
        Self {
            buf: [0; RENDERED_MAX],
            len: 0,
        }
    }
}

impl Stack {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, b: u8) {
        if let Some(c) = self.buf.get_mut(self.len) {
            *c = b;
            self.len += 1;
        }
    }

    fn decimal(&mut self, v: u8) {
        if v >= 100 {
            self.push(b'0' + v / 100);
        }
        if v >= 10 {
            self.push(b'0' + v / 10 % 10);
        }
        self.push(b'0' + v % 10);
    }

    /// What [`Written::render`] writes for `n` (at most 18 bytes).
    fn v4(&mut self, n: &ipnet::Ipv4Net) {
        for (i, o) in n.addr().octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b'.');
            }
            self.decimal(o);
        }
        if n.prefix_len() != 32 {
            self.push(b'/');
            self.decimal(n.prefix_len());
        }
    }
}

impl fmt::Write for Stack {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl From<&str> for Written {
    fn from(text: &str) -> Self {
        Written::Text(Arc::from(text))
    }
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Written::Net(n) => Self::render(f, n),
            Written::Text(t) => f.write_str(t),
        }
    }
}

/// As a string (`explain --json`'s `written`), without an allocation.
impl serde::Serialize for Written {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// As the text's own: warnings quote entries with `{:?}`.
impl fmt::Debug for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.as_str(), f)
    }
}

impl PartialEq<str> for Written {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(items: &[&str]) -> Vec<IpNet> {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_prefix_written_canonically_keeps_no_text() {
        for (text, net) in [
            ("198.51.100.7", "198.51.100.7/32"),
            ("198.51.100.0/24", "198.51.100.0/24"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("2001:db8::/32", "2001:db8::/32"),
        ] {
            let w = Written::new(text, &nets(&[net]));
            assert!(matches!(w, Written::Net(_)), "{text}");
            assert_eq!(w.as_str(), text);
            assert_eq!(format!("{w:?}"), format!("{text:?}"));
        }
    }

    #[test]
    fn ipv4_by_hand_is_as_fmt_renders_it() {
        let mut x = 0x9e37_79b9u32;
        for len in 0..=32u8 {
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let n = ipnet::Ipv4Net::new(x.into(), len).unwrap();
                let mut by_hand = Stack::default();
                by_hand.v4(&n);
                let mut by_fmt = String::new();
                Written::render(&mut by_fmt, &IpNet::V4(n)).unwrap();
                assert_eq!(by_hand.as_bytes(), by_fmt.as_bytes());
            }
        }
    }

    #[test]
    fn anything_else_keeps_its_text() {
        for (text, items) in [
            // Not as ipguard prints it.
            ("198.51.100.7/32", &["198.51.100.7/32"][..]),
            ("2001:DB8::1", &["2001:db8::1/128"]),
            ("2001:0db8::1", &["2001:db8::1/128"]),
            // A name, a range, several items.
            ("office", &["203.0.113.0/24"]),
            ("198.51.100.0-198.51.100.1", &["198.51.100.0/31"]),
            (
                "[198.51.100.1, 198.51.100.2]",
                &["198.51.100.1/32", "198.51.100.2/32"],
            ),
        ] {
            let w = Written::new(text, &nets(items));
            assert!(matches!(w, Written::Text(_)), "{text}");
            assert_eq!(w.as_str(), text);
            assert_eq!(w.to_string(), text);
        }
    }
}
