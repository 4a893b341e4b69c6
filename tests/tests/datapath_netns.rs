//! The datapath on a real veth between two namespaces, with real sockets:
//! allowed and refused clients over IPv4 and IPv6, a service with its own
//! list, monitor mode, `action: reject` refusing at once, and return traffic
//! of a connection the protected host opens to a peer it refuses.

mod datapath_util;

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use datapath_util::*;
use ipguard::{
    datapath::{Capacities, Datapath, Maps, XdpModeRequest},
    events::EventReader,
    policy::{CompiledPolicy, Proto},
};
use ipguard_common::*;
use ipguard_tests::*;

/// Loads the datapath in the server's namespace, writes `policy` and
/// attaches to the server's end of the veth (native XDP, as `run` does on
/// veth). The links are pinned: they stay until the pin directory goes.
fn protect(pair: &Pair, policy: CompiledPolicy) -> PinDir {
    let pins = PinDir::new().unwrap();
    let dir = pins.path.clone();
    let iface = pair.server_if.clone();
    pair.server
        .run_in(move || -> anyhow::Result<()> {
            let mut dp = Datapath::load(
                &dir,
                Capacities {
                    v4: 4096,
                    v6: 4096,
                    flows: 4096,
                },
            )?;
            dp.maps.apply(&policy)?;
            dp.attach(&iface, XdpModeRequest::Native, None)?;
            Ok(())
        })
        .unwrap()
        .unwrap();
    pins
}

fn connect(pair: &Pair, src: &str, dst: &str, port: u16, timeout: Duration) -> io::Result<()> {
    tcp_connect(
        &pair.client,
        ip(src),
        SocketAddr::new(ip(dst), port),
        timeout,
    )
    .unwrap()
}

fn ok(pair: &Pair, src: &str, dst: &str, port: u16) -> bool {
    connect(pair, src, dst, port, Duration::from_millis(1500)).is_ok()
}

/// A refused client's SYN is dropped: its connect times out.
fn times_out(pair: &Pair, src: &str, dst: &str, port: u16) -> bool {
    matches!(
        connect(pair, src, dst, port, Duration::from_millis(600)),
        Err(e) if e.kind() == io::ErrorKind::TimedOut
    )
}

fn listeners(pair: &Pair, ports: &[u16]) {
    for a in [SERVER_V4, SERVER_V4_ALT, SERVER_V6] {
        for &p in ports {
            tcp_listener(&pair.server, SocketAddr::new(ip(a), p)).unwrap();
        }
    }
}

const SVC: u8 = 1;

/// Host-wide: the client's main addresses. Service tcp/7001 with its own
/// list: the alternate IPv4 address only.
fn two_lists(cfg: PolicyConfig) -> CompiledPolicy {
    policy(
        cfg,
        &[
            (&format!("{CLIENT_V4}/32"), value(1, 0, 0)),
            (&format!("{CLIENT_V6}/128"), value(1, 0, 1)),
            (&format!("{CLIENT_V4_ALT}/32"), value(1 << SVC, 0, 2)),
        ],
        &[(Proto::Tcp, 7001, 7001, SVC)],
    )
}

fn counter(maps: &Maps, verdict: u8, reason: u8) -> u64 {
    maps.counters().unwrap()[counter_index(verdict, reason) as usize]
}

#[test]
fn allowed_and_refused_clients_and_a_service_list() {
    require_root();
    let pair = Pair::new().unwrap();
    listeners(&pair, &[7000, 7001]);
    assert!(
        ok(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "before ipguard everyone connects"
    );

    let pins = protect(
        &pair,
        two_lists(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)),
    );
    let maps = Maps::open(&pins.path).unwrap();
    assert!(ok(&pair, CLIENT_V4, SERVER_V4, 7000), "allowed IPv4");
    assert!(ok(&pair, CLIENT_V6, SERVER_V6, 7000), "allowed IPv6");
    assert!(
        times_out(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "refused IPv4"
    );
    assert!(
        times_out(&pair, CLIENT_V6_ALT, SERVER_V6, 7000),
        "refused IPv6"
    );
    // The service's own list replaces the host-wide one on its port.
    assert!(
        ok(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7001),
        "the service allows its own"
    );
    assert!(
        times_out(&pair, CLIENT_V4, SERVER_V4, 7001),
        "the service refuses the host-wide list"
    );
    assert!(counter(&maps, VERDICT_DROP, REASON_NOT_ALLOWED) >= 3);
    let svc = maps.service_counters().unwrap();
    assert!(
        svc[SVC as usize].0 >= 2 && svc[SVC as usize].1 >= 1,
        "{:?}",
        svc[SVC as usize]
    );
    // NDP keeps working (IPv6 needs it): the allowed IPv6 client resolved
    // the server, and the refused one's neighbour solicitations passed as
    // infrastructure.
    assert!(counter(&maps, VERDICT_PASS, REASON_INFRASTRUCTURE) >= 1);
}

#[test]
fn monitor_mode_passes_but_reports() {
    require_root();
    let pair = Pair::new().unwrap();
    listeners(&pair, &[7000]);
    let pins = protect(
        &pair,
        two_lists(config(MODE_MONITOR, ACTION_DROP, SCOPE_HOST)),
    );
    let maps = Maps::open(&pins.path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut reader = rt
        .block_on(async { EventReader::open(&pins.path) })
        .unwrap();
    assert!(
        ok(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "monitor passes a refused source"
    );
    assert!(
        ok(&pair, CLIENT_V6_ALT, SERVER_V6, 7000),
        "monitor passes a refused IPv6 source"
    );
    assert!(counter(&maps, VERDICT_WOULD_DROP, REASON_NOT_ALLOWED) >= 2);
    assert_eq!(counter(&maps, VERDICT_DROP, REASON_NOT_ALLOWED), 0);
    // The link carries the kernel's own IPv6 traffic too (router and
    // listener reports from fe80::, refused like any unlisted source):
    // the event of the refused IPv4 connection is the first from its
    // source, whatever came before it.
    let client = CLIENT_V4_ALT
        .parse::<std::net::Ipv4Addr>()
        .unwrap()
        .octets();
    let ev = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    let ev = reader.next().await?;
                    if ev.family == FAMILY_V4 && ev.src[..4] == client {
                        return Ok::<_, anyhow::Error>(ev);
                    }
                }
            })
            .await
        })
        .expect("an event from the refused IPv4 source within 2 s")
        .unwrap();
    assert_eq!(ev.verdict, VERDICT_WOULD_DROP);
    assert_eq!((ev.protocol, ev.dport), (IPPROTO_TCP, 7000));
    let ifindex = pair
        .server
        .run_in({
            let i = pair.server_if.clone();
            move || ipguard::datapath::if_index(&i).unwrap()
        })
        .unwrap();
    assert_eq!(ev.ifindex, ifindex, "the event names the interface");
}

/// A veth delivers what native XDP sends back (XDP_TX) only if its peer
/// runs NAPI, which it does once it has an XDP program (or GRO) of its own;
/// a physical NIC has no such condition. Gives the client's end a program
/// that passes everything, pinned in the returned directory.
fn xdp_pass_on_client(pair: &Pair) -> PinDir {
    let pins = PinDir::new().unwrap();
    let dir = pins.path.clone();
    let iface = pair.client_if.clone();
    pair.client
        .run_in(move || -> anyhow::Result<()> {
            let mut dp = Datapath::load(
                &dir,
                Capacities {
                    v4: 16,
                    v6: 16,
                    flows: 16,
                },
            )?;
            let prog = dp.xdp_program(PROG_BENCH_EMPTY)?;
            let idx = ipguard::datapath::if_index(&iface)?;
            let id = prog.attach_to_if_index(idx, aya::programs::XdpMode::Driver)?;
            let link: aya::programs::links::FdLink = prog.take_link(id)?.try_into()?;
            link.pin(dir.join(format!("link_{iface}")))?;
            Ok(())
        })
        .unwrap()
        .unwrap();
    pins
}

#[test]
fn reject_refuses_at_once() {
    require_root();
    let pair = Pair::new().unwrap();
    listeners(&pair, &[7000]);
    let _peer = xdp_pass_on_client(&pair);
    let _pins = protect(
        &pair,
        two_lists(config(MODE_ENFORCE, ACTION_REJECT, SCOPE_HOST)),
    );
    for (src, dst) in [(CLIENT_V4_ALT, SERVER_V4_ALT), (CLIENT_V6_ALT, SERVER_V6)] {
        let t = Instant::now();
        let r = connect(&pair, src, dst, 7000, Duration::from_secs(3));
        let took = t.elapsed();
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            other => panic!("{src} -> {dst}: want ECONNREFUSED, got {other:?} after {took:?}"),
        }
        assert!(
            took < Duration::from_millis(200),
            "{src}: refused after {took:?}"
        );
    }
    assert!(
        ok(&pair, CLIENT_V4, SERVER_V4, 7000),
        "allowed sources still connect"
    );
}

#[test]
fn host_initiated_connections_to_a_refused_peer_work() {
    require_root();
    let pair = Pair::new().unwrap();
    listeners(&pair, &[7000]);
    // The peer (the client namespace's alternate addresses) serves too.
    for a in [CLIENT_V4_ALT, CLIENT_V6_ALT] {
        tcp_listener(&pair.client, SocketAddr::new(ip(a), 8000)).unwrap();
    }
    let udp_peer = UdpEcho::new(&pair.client, SocketAddr::new(ip(CLIENT_V4_ALT), 5353)).unwrap();
    let pins = protect(
        &pair,
        two_lists(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)),
    );
    let maps = Maps::open(&pins.path).unwrap();
    let out = |src: &str, dst: &str| {
        tcp_connect(
            &pair.server,
            ip(src),
            SocketAddr::new(ip(dst), 8000),
            Duration::from_millis(1500),
        )
        .unwrap()
        .is_ok()
    };
    assert!(
        out(SERVER_V4_ALT, CLIENT_V4_ALT),
        "the host reaches a refused peer over IPv4"
    );
    assert!(
        out(SERVER_V6, CLIENT_V6_ALT),
        "the host reaches a refused peer over IPv6"
    );
    assert!(
        udp_peer.ask(&pair.server, SERVER_V4_ALT),
        "a UDP question gets its answer"
    );
    // ... while that peer's own attempts are refused.
    assert!(times_out(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    assert!(times_out(&pair, CLIENT_V6_ALT, SERVER_V6, 7000));
    assert!(counter(&maps, VERDICT_PASS, REASON_RETURN_TRAFFIC) >= 3);

    // Without return traffic the same connection fails: the test above
    // really depends on it.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.infra &= !INFRA_RETURN_TRAFFIC;
    let mut maps = maps;
    maps.apply(&two_lists(cfg)).unwrap();
    assert!(
        !out(SERVER_V4_ALT, CLIENT_V4_ALT),
        "without return traffic the reply is refused"
    );
}

/// A UDP server's answers are not connections the host opened: they must
/// not make its client "return traffic" (which would let the client in
/// after the policy stops allowing it).
#[test]
fn a_udp_servers_answers_never_keep_a_refused_client_in() {
    require_root();
    let pair = Pair::new().unwrap();
    // A server's port, outside the ephemeral range (as DNS on 53).
    let echo = UdpEcho::new(&pair.server, SocketAddr::new(ip(SERVER_V4), 5300)).unwrap();
    let pins = protect(
        &pair,
        two_lists(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)),
    );
    let mut maps = Maps::open(&pins.path).unwrap();
    let client = UdpClient::new(&pair.client, ip(CLIENT_V4), echo.addr).unwrap();
    assert!(client.ask(Duration::from_millis(1500)), "allowed: answered");
    let server_flows = |maps: &Maps| {
        maps.flows()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.local_port == 5300)
            .count()
    };
    assert_eq!(server_flows(&maps), 0, "the answer recorded no flow");
    // The client is no longer allowed: its next question gets no answer.
    let without = policy(
        config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST),
        &[(&format!("{CLIENT_V6}/128"), value(1, 0, 0))],
        &[],
    );
    maps.apply(&without).unwrap();
    assert!(
        !client.ask(Duration::from_millis(600)),
        "a refused client was answered"
    );
    assert!(counter(&maps, VERDICT_DROP, REASON_NOT_ALLOWED) >= 1);
}

/// A UDP answer larger than the link's MTU (a DNS answer with EDNS) comes
/// back to the host in IP fragments from a peer the policy refuses: the
/// first fragment passes as return traffic, the later ones with it, and
/// the host's socket gets the whole datagram.
#[test]
fn fragmented_answers_to_the_hosts_questions_arrive_whole() {
    require_root();
    let pair = Pair::new().unwrap();
    let peer4 = UdpEcho::new(&pair.client, SocketAddr::new(ip(CLIENT_V4_ALT), 5353)).unwrap();
    let peer6 = UdpEcho::new(&pair.client, SocketAddr::new(ip(CLIENT_V6_ALT), 5353)).unwrap();
    // The peer's addresses are in no list: a later fragment, judged by
    // its source alone, would be refused.
    let pins = protect(
        &pair,
        policy(
            config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST),
            &[
                (&format!("{CLIENT_V4}/32"), value(1, 0, 0)),
                (&format!("{CLIENT_V6}/128"), value(1, 0, 1)),
            ],
            &[],
        ),
    );
    let maps = Maps::open(&pins.path).unwrap();
    // Three fragments each way on a 1500-byte link.
    assert!(
        peer4.ask_sized(&pair.server, SERVER_V4_ALT, 4000),
        "a fragmented IPv4 answer arrives whole"
    );
    assert!(
        peer6.ask_sized(&pair.server, SERVER_V6, 4000),
        "a fragmented IPv6 answer arrives whole"
    );
    let c = maps.counters().unwrap();
    let moved: Vec<String> = (0..VERDICT_COUNT * REASON_SLOTS)
        .filter(|&i| c[i as usize] != 0)
        .map(|i| {
            format!(
                "{}/{}: {}",
                verdict_name((i / REASON_SLOTS) as u8),
                reason_name((i % REASON_SLOTS) as u8),
                c[i as usize]
            )
        })
        .collect();
    assert!(
        counter(&maps, VERDICT_PASS, REASON_RETURN_TRAFFIC) >= 6,
        "first and later fragments of both answers passed as return traffic: {moved:?}"
    );
    assert_eq!(counter(&maps, VERDICT_DROP, REASON_FRAGMENT), 0);
}

/// A connection the host opened keeps working when its flow is gone (the
/// table evicted it, or ipguard attached after the connection was opened):
/// the host's next segment on it records the flow again, and the peer's
/// answer passes as return traffic.
#[test]
fn a_connection_the_host_opened_survives_losing_its_flow() {
    use std::io::{Read, Write};
    require_root();
    let pair = Pair::new().unwrap();
    // An echo server at the peer, which the policy refuses.
    let peer = SocketAddr::new(ip(CLIENT_V4_ALT), 8100);
    let listener = pair
        .client
        .run_in(move || std::net::TcpListener::bind(peer))
        .unwrap()
        .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            s.write_all(&buf[..n])?;
        }
    });
    let pins = protect(
        &pair,
        two_lists(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)),
    );
    let mut maps = Maps::open(&pins.path).unwrap();
    let mut s = tcp_stream(
        &pair.server,
        ip(SERVER_V4_ALT),
        peer,
        Duration::from_millis(1500),
    )
    .unwrap()
    .expect("the host reaches the refused peer");
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let say = |s: &mut std::net::TcpStream, m: &[u8]| -> bool {
        let mut got = vec![0u8; m.len()];
        s.write_all(m).is_ok() && s.read_exact(&mut got).is_ok() && got == m
    };
    assert!(say(&mut s, b"first"), "an answer on the fresh connection");
    let deleted = maps.delete_flows(|k| k.local_port != 0).unwrap();
    assert!(deleted >= 1, "the connection's flow was there");
    assert!(
        say(&mut s, b"second"),
        "the answer after the flow was lost: the host's segment recorded it again"
    );
    drop(s);
    let _ = echo.join();
}
