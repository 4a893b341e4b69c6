//! Address items (docs/policy.md §2): addresses, CIDRs, ranges, IPv4 wildcards,
//! keywords and group names, IPv4 and IPv6 alike.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv4Subnets, Ipv6Net, Ipv6Subnets};

/// What one address item stands for, before groups are resolved: its
/// prefixes were appended to the caller's vector, or it names a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Item<'a> {
    /// `host_bits` holds the normalized prefix when a CIDR was written with
    /// host bits set (a warning, not an error).
    Nets {
        host_bits: Option<IpNet>,
    },
    Group(&'a str),
    /// `dns:NAME`: addresses the daemon resolves.
    Name(crate::DnsName),
}

pub const KEYWORDS: [&str; 3] = ["any", "any4", "any6"];

/// `[a-z][a-z0-9_-]{0,62}`, and not a keyword.
pub fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
        && !KEYWORDS.contains(&s)
}

pub(crate) fn any4() -> IpNet {
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0))
}
pub(crate) fn any6() -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0))
}

/// Parses one address item, appending its prefixes to `out`; the error is
/// the full message, value included.
pub(crate) fn parse_item<'a>(raw: &'a str, out: &mut Vec<IpNet>) -> Result<Item<'a>, String> {
    let s = raw.trim();
    let plain = Item::Nets { host_bits: None };
    if let Some(n) = crate::dns::parse(s) {
        return n.map(Item::Name);
    }
    match s {
        "any" => {
            out.extend([any4(), any6()]);
            return Ok(plain);
        }
        "any4" => {
            out.push(any4());
            return Ok(plain);
        }
        "any6" => {
            out.push(any6());
            return Ok(plain);
        }
        _ => {}
    }
    let addressish = s.contains(['.', ':', '/', '*']);
    if !addressish {
        if is_valid_name(s) {
            return Ok(Item::Group(s));
        }
        if s.is_empty() {
            return Err("an empty value is not an address item".to_string());
        }
        if s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("{raw:?} is not an IPv4 address"));
        }
        return Err(format!(
            "{raw:?} is not an address, CIDR, range, wildcard, keyword (any, any4, any6) or group name"
        ));
    }
    if let Some((a, b)) = s.split_once('-') {
        parse_range(raw, a.trim(), b.trim(), out)?;
        return Ok(plain);
    }
    if let Some((a, len)) = s.split_once('/') {
        return parse_cidr(raw, a, len, out);
    }
    if s.contains('*') {
        out.push(parse_wildcard(raw, s)?);
        return Ok(plain);
    }
    let a = parse_addr(s).map_err(|_| not_an_address(s))?;
    out.push(IpNet::from(a));
    Ok(plain)
}

fn not_an_address(s: &str) -> String {
    if s.contains(':') {
        format!("{s:?} is not an IPv6 address")
    } else {
        format!("{s:?} is not an IPv4 address")
    }
}

fn parse_addr(s: &str) -> Result<IpAddr, ()> {
    if s.contains(':') {
        s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| ())
    } else {
        s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| ())
    }
}

fn parse_range(raw: &str, a: &str, b: &str, out: &mut Vec<IpNet>) -> Result<(), String> {
    for side in [a, b] {
        if side.contains(['/', '*']) {
            return Err(format!(
                "range {raw:?}: both ends must be plain addresses, not {side:?}"
            ));
        }
    }
    let start = parse_addr(a).map_err(|_| format!("range {raw:?}: {}", not_an_address(a)))?;
    let end = parse_addr(b).map_err(|_| format!("range {raw:?}: {}", not_an_address(b)))?;
    match (start, end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => {
            if s > e {
                return Err(format!("range {raw:?} is reversed: {s} comes after {e}"));
            }
            out.extend(Ipv4Subnets::new(s, e, 0).map(IpNet::V4));
            Ok(())
        }
        (IpAddr::V6(s), IpAddr::V6(e)) => {
            if s > e {
                return Err(format!("range {raw:?} is reversed: {s} comes after {e}"));
            }
            out.extend(Ipv6Subnets::new(s, e, 0).map(IpNet::V6));
            Ok(())
        }
        _ => Err(format!(
            "range {raw:?} mixes IPv4 and IPv6: both ends must be of one family"
        )),
    }
}

/// The minimal set of prefixes that covers exactly `start..=end`.
pub fn range_v4(start: Ipv4Addr, end: Ipv4Addr) -> Vec<Ipv4Net> {
    Ipv4Subnets::new(start, end, 0).collect()
}

/// The minimal set of prefixes that covers exactly `start..=end`.
pub fn range_v6(start: Ipv6Addr, end: Ipv6Addr) -> Vec<Ipv6Net> {
    Ipv6Subnets::new(start, end, 0).collect()
}

fn parse_cidr<'a>(raw: &str, a: &str, len: &str, out: &mut Vec<IpNet>) -> Result<Item<'a>, String> {
    let addr = parse_addr(a.trim()).map_err(|_| not_an_address(a.trim()))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    let len_t = len.trim();
    let plen: u8 = match len_t.parse::<u8>() {
        Ok(l) if l <= max && !len_t.starts_with('+') => l,
        _ => {
            return Err(format!(
                "{raw:?}: {len_t:?} is not a prefix length for {family} (0-{max})"
            ));
        }
    };
    let net = IpNet::new(addr, plen)
        .map_err(|_| format!("{raw:?}: {len_t:?} is not a prefix length for {family} (0-{max})"))?;
    let trunc = net.trunc();
    let host_bits = (trunc.addr() != addr).then_some(trunc);
    out.push(trunc);
    Ok(Item::Nets { host_bits })
}

fn parse_wildcard(raw: &str, s: &str) -> Result<IpNet, String> {
    if s.contains(':') {
        return Err(format!(
            "{raw:?}: wildcards are for IPv4 only; write an IPv6 prefix as a CIDR such as 2001:db8::/32"
        ));
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return Err(format!(
            "{raw:?} is not an IPv4 wildcard: it needs four octets, e.g. 10.15.1.*"
        ));
    }
    let mut octets = [0u8; 4];
    let mut fixed = 0usize;
    let mut seen_star = false;
    for (i, p) in parts.iter().enumerate() {
        if *p == "*" {
            seen_star = true;
            continue;
        }
        if p.contains('*') {
            return Err(format!(
                "{raw:?}: a wildcard replaces a whole octet (`*`), not part of one"
            ));
        }
        if seen_star {
            return Err(format!(
                "{raw:?}: a wildcard may only replace trailing octets, e.g. 10.15.*.*"
            ));
        }
        octets[i] = parse_octet(p).ok_or_else(|| {
            format!("{raw:?} is not an IPv4 wildcard: {p:?} is not an octet (0-255)")
        })?;
        fixed += 1;
    }
    let len = u8::try_from(fixed * 8).unwrap_or(32);
    Ok(IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::from(octets), len)))
}

/// A decimal octet as `Ipv4Addr`'s parser reads it (no leading zeros, which
/// some tools read as octal).
fn parse_octet(p: &str) -> Option<u8> {
    if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if p.len() > 1 && p.starts_with('0') {
        return None;
    }
    p.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        match parse_item(s, &mut out).unwrap() {
            Item::Nets { .. } => out.iter().map(|n| n.to_string()).collect(),
            Item::Group(g) => vec![format!("group {g}")],
            Item::Name(n) => vec![n.to_string()],
        }
    }

    #[test]
    fn forms() {
        assert_eq!(nets("203.0.113.7"), ["203.0.113.7/32"]);
        assert_eq!(nets("dns:VPN.example.com"), ["dns:vpn.example.com"]);
        assert_eq!(nets("dns6:vpn.example.com."), ["dns6:vpn.example.com"]);
        assert_eq!(nets("2001:db8::7"), ["2001:db8::7/128"]);
        assert_eq!(nets("203.0.113.0/24"), ["203.0.113.0/24"]);
        assert_eq!(nets("10.15.1.*"), ["10.15.1.0/24"]);
        assert_eq!(nets("10.15.*.*"), ["10.15.0.0/16"]);
        assert_eq!(nets("*.*.*.*"), ["0.0.0.0/0"]);
        assert_eq!(nets("any"), ["0.0.0.0/0", "::/0"]);
        assert_eq!(nets("any6"), ["::/0"]);
        assert_eq!(nets("office"), ["group office"]);
        assert_eq!(nets("192.0.2.1 - 192.0.2.255").len(), 8);
        assert_eq!(
            nets("203.0.113.10-203.0.113.20"),
            [
                "203.0.113.10/31",
                "203.0.113.12/30",
                "203.0.113.16/30",
                "203.0.113.20/32"
            ]
        );
        assert_eq!(nets("2001:db8::-2001:db8::ffff"), ["2001:db8::/112"]);
    }

    #[test]
    fn host_bits() {
        let mut nets = Vec::new();
        match parse_item("203.0.113.5/24", &mut nets).unwrap() {
            Item::Nets { host_bits } => {
                assert_eq!(nets[0].to_string(), "203.0.113.0/24");
                assert_eq!(host_bits.unwrap().to_string(), "203.0.113.0/24");
            }
            Item::Group(_) | Item::Name(_) => panic!(),
        }
    }

    #[test]
    fn errors() {
        let e = |s| parse_item(s, &mut Vec::new()).unwrap_err();
        assert_eq!(
            e("198.51.100.300"),
            "\"198.51.100.300\" is not an IPv4 address"
        );
        assert_eq!(e("2001:db8::g"), "\"2001:db8::g\" is not an IPv6 address");
        assert!(e("10.0.0.0/33").contains("is not a prefix length for IPv4 (0-32)"));
        assert!(e("10.*.1.*").contains("only replace trailing octets"));
        assert!(e("10.0.0.9-10.0.0.1").contains("is reversed"));
        assert!(e("10.0.0.1-2001:db8::1").contains("mixes IPv4 and IPv6"));
        assert!(e("Office").contains("is not an address"));
        assert!(e("010.0.0.1").contains("is not an IPv4 address"));
    }

    #[test]
    fn names() {
        assert!(is_valid_name("office"));
        assert!(is_valid_name("a-b_c9"));
        assert!(!is_valid_name("any"));
        assert!(!is_valid_name("9a"));
        assert!(!is_valid_name(&"a".repeat(64)));
        assert!(is_valid_name(&"a".repeat(63)));
    }
}
