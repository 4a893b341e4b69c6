//! DNS names as address items (`dns:NAME`, `dns4:NAME`, `dns6:NAME`): the
//! policy names them, the daemon resolves them, the compiler merges what
//! they resolved to. The kernel only ever sees prefixes.

use std::{collections::HashMap, fmt, net::IpAddr, sync::Arc};

/// Which of a name's addresses count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DnsFamily {
    /// `dns:`: A and AAAA.
    Any,
    /// `dns4:`: A only.
    V4,
    /// `dns6:`: AAAA only.
    V6,
}

/// A name of the policy, as the resolver is asked for it: lowercase,
/// without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName {
    pub name: Arc<str>,
    pub family: DnsFamily,
}

impl DnsName {
    /// Whether `a` is one of the addresses this item means.
    pub fn wants(&self, a: &IpAddr) -> bool {
        match self.family {
            DnsFamily::Any => true,
            DnsFamily::V4 => a.is_ipv4(),
            DnsFamily::V6 => a.is_ipv6(),
        }
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.family {
            DnsFamily::Any => "dns",
            DnsFamily::V4 => "dns4",
            DnsFamily::V6 => "dns6",
        };
        write!(f, "{p}:{}", self.name)
    }
}

/// The longest name DNS carries (RFC 1035, without the final dot).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// `dns:NAME` and its kin; None if `s` is not written as one, Some(Err)
/// with the message if it is one written wrong.
pub(crate) fn parse(s: &str) -> Option<Result<DnsName, String>> {
    let (family, rest) = if let Some(r) = s.strip_prefix("dns:") {
        (DnsFamily::Any, r)
    } else if let Some(r) = s.strip_prefix("dns4:") {
        (DnsFamily::V4, r)
    } else if let Some(r) = s.strip_prefix("dns6:") {
        (DnsFamily::V6, r)
    } else {
        return None;
    };
    let name = rest.trim().trim_end_matches('.').to_ascii_lowercase();
    let bad = |why: &str| {
        Some(Err(format!(
            "{s:?} is not a DNS name item: {why} (write `dns:vpn.example.com`)"
        )))
    };
    if name.is_empty() {
        return bad("the name is empty");
    }
    if name.len() > MAX_NAME {
        return bad("a name has at most 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("it has an empty label");
        }
        if label.len() > MAX_LABEL {
            return bad("a label has at most 63 characters");
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return bad("a label holds letters, digits, `-` and `_` only");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label neither starts nor ends with `-`");
        }
    }
    if name.parse::<IpAddr>().is_ok() || name.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return bad("it is an address, not a name: write the address itself");
    }
    Some(Ok(DnsName {
        name: Arc::from(name),
        family,
    }))
}

/// What the daemon found for the policy's dynamic sources: what its
/// resolver last answered for each name (A and AAAA together;
/// [`DnsName::wants`] picks per item), and the prefixes of each feed's
/// last good copy (by the feed's group). A name without an answer, a feed
/// without a copy, means nothing: an entry naming only it allows no one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub names: HashMap<Arc<str>, Vec<IpAddr>>,
    pub feeds: HashMap<Arc<str>, Arc<[ipnet::IpNet]>>,
}

impl Resolved {
    /// The prefixes feed `group` holds now.
    pub fn feed(&self, group: &str) -> &[ipnet::IpNet] {
        self.feeds.get(group).map_or(&[], |n| n)
    }

    /// The addresses `n` stands for now.
    pub fn addresses<'a>(&'a self, n: &'a DnsName) -> impl Iterator<Item = IpAddr> + 'a {
        self.names
            .get(&n.name)
            .into_iter()
            .flatten()
            .copied()
            .filter(|a| n.wants(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_lowercase_without_the_final_dot() {
        let n = parse("dns:VPN.Example.com.").unwrap().unwrap();
        assert_eq!(&*n.name, "vpn.example.com");
        assert_eq!(n.family, DnsFamily::Any);
        assert_eq!(n.to_string(), "dns:vpn.example.com");
        assert_eq!(parse("dns4:a.test").unwrap().unwrap().family, DnsFamily::V4);
        assert_eq!(parse("dns6:a.test").unwrap().unwrap().family, DnsFamily::V6);
        assert!(parse("office").is_none());
        assert!(parse("198.51.100.7").is_none());
    }

    #[test]
    fn bad_names_say_why() {
        for (s, why) in [
            ("dns:", "empty"),
            ("dns:a..b", "empty label"),
            ("dns:-a.test", "starts nor ends"),
            ("dns:a b.test", "letters, digits"),
            ("dns:198.51.100.7", "an address"),
            ("dns:2001:db8::1", "letters, digits"),
        ] {
            let e = parse(s).unwrap().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
        let long = format!("dns:{}.test", "a".repeat(64));
        assert!(parse(&long).unwrap().unwrap_err().contains("63"));
    }

    #[test]
    fn an_item_takes_the_addresses_of_its_family() {
        let mut r = Resolved::default();
        r.names.insert(
            Arc::from("a.test"),
            vec![
                "198.51.100.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
            ],
        );
        let item = |s| parse(s).unwrap().unwrap();
        assert_eq!(r.addresses(&item("dns:a.test")).count(), 2);
        let v4: Vec<_> = r.addresses(&item("dns4:a.test")).collect();
        assert_eq!(v4, ["198.51.100.7".parse::<IpAddr>().unwrap()]);
        let v6: Vec<_> = r.addresses(&item("dns6:a.test")).collect();
        assert_eq!(v6, ["2001:db8::7".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.addresses(&item("dns:b.test")).count(), 0);
    }
}
