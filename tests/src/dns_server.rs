//! A DNS server for tests, inside a namespace the test made: it answers
//! real DNS messages (hickory-proto's) over UDP and TCP from a zone the
//! test changes while it runs. Threads stop when it is dropped.

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Result;
use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};

use crate::Netns;

#[derive(Default)]
struct Zone {
    /// Lowercase names without the final dot.
    names: HashMap<String, Vec<IpAddr>>,
    /// Answered over UDP truncated (TC), so that resolvers ask over TCP.
    tcp_only: HashSet<String>,
    ttl: u32,
    /// Answer SERVFAIL to everything.
    failing: bool,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    pub udp_queries: Arc<AtomicU64>,
    pub tcp_queries: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Listens on `addr` (UDP and TCP) in `ns`; answers carry `ttl`.
    pub fn new(ns: &Netns, addr: SocketAddr, ttl: u32) -> Result<Self> {
        let (udp, tcp) = ns.run_in(move || -> std::io::Result<(UdpSocket, TcpListener)> {
            Ok((UdpSocket::bind(addr)?, TcpListener::bind(addr)?))
        })??;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        tcp.set_nonblocking(true)?;
        let zone = Arc::new(Mutex::new(Zone {
            ttl,
            ..Zone::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (udp_queries, tcp_queries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut threads = Vec::new();
        {
            let (zone, stop, count) = (zone.clone(), stop.clone(), udp_queries.clone());
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        count.fetch_add(1, Ordering::Relaxed);
                        if let Some(out) = answer(&zone, &buf[..n], true) {
                            let _ = udp.send_to(&out, from);
                        }
                    }
                }
            }));
        }
        {
            let (zone, stop, count) = (zone.clone(), stop.clone(), tcp_queries.clone());
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        // A thread per connection: resolvers keep theirs
                        // open for more queries. Each ends at its
                        // client's close or after 2 s of silence.
                        Ok((s, _)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            let zone = zone.clone();
                            thread::spawn(move || serve_tcp(s, &zone));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        Ok(Self {
            addr,
            zone,
            stop,
            udp_queries,
            tcp_queries,
            threads,
        })
    }

    /// `name` answers `addrs` from now on (A and AAAA by family).
    pub fn set(&self, name: &str, addrs: &[&str]) {
        let addrs = addrs
            .iter()
            .map(|a| a.parse().expect("an address"))
            .collect();
        if let Ok(mut z) = self.zone.lock() {
            z.names.insert(name.to_string(), addrs);
        }
    }

    /// `name` is answered over TCP only (truncated over UDP).
    pub fn tcp_only(&self, name: &str) {
        if let Ok(mut z) = self.zone.lock() {
            z.tcp_only.insert(name.to_string());
        }
    }

    /// Every query gets SERVFAIL while `on`.
    pub fn failing(&self, on: bool) {
        if let Ok(mut z) = self.zone.lock() {
            z.failing = on;
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Length-prefixed messages (RFC 1035 4.2.2) until the client closes.
fn serve_tcp(mut s: std::net::TcpStream, zone: &Mutex<Zone>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut len = [0u8; 2];
    while s.read_exact(&mut len).is_ok() {
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if s.read_exact(&mut q).is_err() {
            break;
        }
        let Some(out) = answer(zone, &q, false) else {
            break;
        };
        let mut framed = (out.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&out);
        if s.write_all(&framed).is_err() {
            break;
        }
    }
}

fn answer(zone: &Mutex<Zone>, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let z = zone.lock().ok()?;
    let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.authoritative = true;
    r.add_queries(q.queries.clone());
    if z.failing {
        r.metadata.response_code = ResponseCode::ServFail;
        return r.to_vec().ok();
    }
    for question in &q.queries {
        let name = question
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_lowercase();
        if udp && z.tcp_only.contains(&name) {
            r.metadata.truncation = true;
            return r.to_vec().ok();
        }
        let Some(addrs) = z.names.get(&name) else {
            r.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for a in addrs {
            let rdata = match (question.query_type(), a) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            r.add_answer(Record::from_rdata(question.name().clone(), z.ttl, rdata));
        }
    }
    r.to_vec().ok()
}
