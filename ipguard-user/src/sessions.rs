//! Established inbound TCP sessions, for the lockout guard (docs/policy.md §7).
//!
//! Read from /proc/net/tcp and /proc/net/tcp6 of the daemon's own network
//! namespace: the text format has been stable since Linux 2.6 and needs no
//! netlink library. A session is inbound when its local port has a
//! listening socket on the same address (or the wildcard address).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Session {
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// Established sessions that a remote peer opened to this host.
pub fn inbound_sessions() -> std::io::Result<Vec<Session>> {
    let mut text = std::fs::read_to_string("/proc/net/tcp")?;
    // tcp6 is absent when IPv6 is disabled: that is not an error.
    if let Ok(t6) = std::fs::read_to_string("/proc/net/tcp6") {
        text.push('\n');
        text.push_str(&t6);
    }
    Ok(parse_inbound(&text))
}

/// Parses the concatenated contents of /proc/net/tcp and tcp6.
pub fn parse_inbound(text: &str) -> Vec<Session> {
    let mut listening: HashSet<(IpAddr, u16)> = HashSet::new();
    let mut established = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || !f[0].ends_with(':') {
            continue;
        }
        let (Some(local), Some(remote), Ok(state)) = (
            parse_endpoint(f[1]),
            parse_endpoint(f[2]),
            u8::from_str_radix(f[3], 16),
        ) else {
            continue;
        };
        match state {
            TCP_LISTEN => {
                listening.insert(local);
            }
            TCP_ESTABLISHED => established.push(Session {
                local: local.0,
                local_port: local.1,
                remote: remote.0,
                remote_port: remote.1,
            }),
            _ => {}
        }
    }
    let wildcard = |a: IpAddr| -> IpAddr {
        match a {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    };
    let mut out: Vec<Session> = established
        .into_iter()
        .filter(|s| {
            listening.contains(&(s.local, s.local_port))
                || listening.contains(&(wildcard(s.local), s.local_port))
                // An IPv6 wildcard listener also accepts IPv4 (v4-mapped).
                || listening.contains(&(IpAddr::V6(Ipv6Addr::UNSPECIFIED), s.local_port))
        })
        .map(|mut s| {
            s.local = unmap(s.local);
            s.remote = unmap(s.remote);
            s
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// IPv4 peers of an IPv6 socket appear as ::ffff:a.b.c.d; the datapath
/// sees them as IPv4.
fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

/// `0100007F:0016` (IPv4) or 32 hex digits (IPv6), each 32-bit word in
/// host byte order as the kernel prints it.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<u32>> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let words = words?;
    let ip = match words.len() {
        1 => IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes())),
        4 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a real host (little-endian), trimmed to the columns
    // that matter: sshd listening on 0.0.0.0:22 and [::]:22, one SSH
    // session from 198.51.100.7 (IPv4) and one from 2001:db8::9 (IPv6), and
    // an outbound connection to 203.0.113.5:443 that is not inbound.
    const SAMPLE: &str = "  sl  local_address rem_address   st
   0: 00000000:0016 00000000:0000 0A
   1: 016433C6:0016 076433C6:D431 01
   2: 016433C6:A3F2 057100CB:01BB 01
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A
   1: B80D0120000000000000000001000000:0016 B80D0120000000000000000009000000:E0D2 01
";

    #[test]
    fn finds_inbound_sessions_only() {
        let s = parse_inbound(SAMPLE);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].remote, "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(s[0].local_port, 22);
        assert_eq!(s[0].remote_port, 0xD431);
        assert_eq!(s[1].remote, "2001:db8::9".parse::<IpAddr>().unwrap());
        assert_eq!(s[1].local, "2001:db8::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn v4_mapped_peers_are_ipv4() {
        let text = "  sl local rem st
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A
   1: 0000000000000000FFFF0000016433C6:0016 0000000000000000FFFF0000076433C6:D431 01
";
        let s = parse_inbound(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].remote, "198.51.100.7".parse::<IpAddr>().unwrap());
    }
}
