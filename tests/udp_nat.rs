//! UDP's NAT behaviour through real TPROXY rules (issue 11: src/udp/nat.rs
//! and src/udp/worker.rs): what a client behind tproxyd looks like from the
//! outside, and who may reach it.
//!
//! - Each `--udp-nat` mode is classified as named by coturn's RFC 5780 NAT
//!   behaviour discovery client against coturn's STUN server on two
//!   addresses of the server namespace, over IPv4 and IPv6, with one UDP
//!   worker and with two.
//! - A remote the client never addressed sends to the client's mapping:
//!   `full-cone` delivers it from that remote's own address; the restricted
//!   modes drop it and count it (NAT-2).
//! - An ICMP error about one remote ends only what it concerns (NAT-4).
//! - With `--spoof-source`, servers see the client's own address and port.
//! - With `--udp-workers 2`, a thousand clients spread over both workers, and
//!   each keeps one mapping whichever destination it sends to.
//! - A datagram that the host's rules send back into the proxy from one of
//!   its own sockets is dropped and counted, not relayed round and round.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::udp::{RECV_BUF, REPLY_TIMEOUT, expect_datagram, udp_bind};
use common::{
    CLIENT_V4, CLIENT_V6, Daemon, Lab, METRICS, Metrics, Proxy, Role, family, proc_fd_count,
    server_addr, udp_listeners, wait_until,
};

/// What the tests give tproxyd as --mark (the lab's rules know it).
const MARK: &str = "2";
const STUN_PORT: u16 = 3478;
/// The server namespace's second address: RFC 5780 needs two, and the
/// restricted modes are told apart by a remote on another address.
const SERVER2_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 3);
const SERVER2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 3);

fn server2_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(SERVER2_V6.into(), port)
    } else {
        SocketAddr::new(SERVER2_V4.into(), port)
    }
}

fn client_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(CLIENT_V6.into(), port)
    } else {
        SocketAddr::new(CLIENT_V4.into(), port)
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A lab whose server namespace has a second address in each family.
fn lab_with_two_server_addresses() -> Lab {
    let lab = Lab::tproxy();
    lab.sh(
        Role::Server,
        &["ip", "addr", "add", "198.19.0.3/24", "dev", "eth0"],
    );
    lab.sh(
        Role::Server,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:2:0:2::3/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    lab
}

fn start_proxy(lab: &Lab, extra: &[&str]) -> Proxy {
    let mut args = vec!["--mark", MARK, "--metrics", METRICS];
    args.extend_from_slice(extra);
    Proxy::start(lab, &args)
}

fn metric(lab: &Lab, name: &str) -> u64 {
    Metrics::of(lab).get(name)
}

fn drops(lab: &Lab, reason: &str) -> u64 {
    metric(
        lab,
        &format!("tproxyd_udp_drops_total{{reason=\"{reason}\"}}"),
    )
}

// ------------------------------------------------------------ RFC 5780

/// coturn's STUN server on both addresses of the server namespace in both
/// families (RFC 5780's CHANGE-REQUEST needs two addresses and two ports).
fn stun_server(lab: &Lab) -> Daemon {
    let mut d = Daemon::start(
        lab,
        Role::Server,
        "turnserver",
        &[
            "turnserver",
            "-n",
            "--no-cli",
            "--stun-only",
            "--no-tls",
            "--no-dtls",
            "-L",
            "198.19.0.2",
            "-L",
            "198.19.0.3",
            "-L",
            "2001:2:0:2::2",
            "-L",
            "2001:2:0:2::3",
            "--pidfile",
            "/dev/null",
            "--log-file",
            "stdout",
        ],
    );
    // Four addresses, each on the primary and the alternative port.
    let up = wait_until(Duration::from_secs(10), || {
        d.exited().is_none() && udp_listeners(lab, Role::Server, STUN_PORT) >= 4
    });
    assert!(
        up,
        "turnserver did not listen on :{STUN_PORT} (exit {:?})",
        d.exited()
    );
    d
}

/// What `turnutils_natdiscovery -m -f` says of the NAT between the client
/// and `server`: (mapping, filtering), e.g. ("Endpoint Independent",
/// "Address Dependent").
fn discover(lab: &Lab, server: IpAddr) -> (String, String) {
    let out = lab
        .exec_bounded(
            Role::Client,
            Duration::from_secs(40),
            &["turnutils_natdiscovery", "-m", "-f", &server.to_string()],
        )
        .out;
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = |what: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix("NAT with ")?
                    .strip_suffix(&format!(" {what}!"))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| {
                panic!(
                    "natdiscovery {server}: no {what} verdict ({}):\n{text}",
                    out.status
                )
            })
    };
    (verdict("Mapping"), verdict("Filtering"))
}

#[test]
fn an_rfc_5780_client_classifies_each_nat_mode_as_named_with_one_and_two_workers() {
    const EI: &str = "Endpoint Independent";
    const AD: &str = "Address Dependent";
    const APD: &str = "Address and Port Dependent";
    let cases = [
        ("full-cone", EI, EI),
        ("restricted", EI, AD),
        ("port-restricted", EI, APD),
        ("symmetric", APD, APD),
    ];
    let lab = lab_with_two_server_addresses();
    let _stun = stun_server(&lab);
    for workers in ["1", "2"] {
        for (mode, mapping, filtering) in cases {
            let _proxy = start_proxy(&lab, &["--udp-nat", mode, "--udp-workers", workers]);
            for v6 in [false, true] {
                let server = server_addr(v6, STUN_PORT).ip();
                let got = discover(&lab, server);
                assert_eq!(
                    (got.0.as_str(), got.1.as_str()),
                    (mapping, filtering),
                    "--udp-nat {mode} with {workers} worker(s), {}: (mapping, filtering)",
                    family(v6)
                );
            }
        }
    }
}

// ------------------------------------------------------------ two remotes

/// A UDP socket in the server namespace.
fn server_socket(lab: &Lab, addr: SocketAddr) -> UdpSocket {
    lab.server(move || udp_bind(addr))
}

/// Read until `end` arrives; everything else that came, with its source.
fn read_until(s: &UdpSocket, end: &[u8]) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let (n, from) = s
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no {end:?} within {REPLY_TIMEOUT:?} (got {got:?}): {e}"));
        if &buf[..n] == end {
            return got;
        }
        got.push((buf[..n].to_vec(), canonical(from)));
    }
}

/// The client talks to remote A only. Then B (another address) and B'
/// (A's address, another port) send to the mapping A saw: which reach the
/// client, and from where, depends on the mode alone.
#[test]
fn a_remote_the_client_never_addressed_reaches_it_only_as_the_nat_mode_allows() {
    // (mode, B delivered, B' delivered, filtered and counted)
    let cases = [
        ("full-cone", true, true, 0),
        ("restricted", false, true, 1),
        ("port-restricted", false, false, 2),
        // Connected socket: the kernel itself turns B and B' away.
        ("symmetric", false, false, 0),
    ];
    let lab = lab_with_two_server_addresses();
    for (mode, b_in, b2_in, filtered) in cases {
        let _proxy = start_proxy(&lab, &["--udp-nat", mode]);
        for v6 in [false, true] {
            let what = format!("--udp-nat {mode}, {}", family(v6));
            let (a_addr, b_addr, b2_addr) = (
                server_addr(v6, 7000),
                server2_addr(v6, 7000),
                server_addr(v6, 7001),
            );
            let (a, b, b2) = (
                server_socket(&lab, a_addr),
                server_socket(&lab, b_addr),
                server_socket(&lab, b2_addr),
            );
            let client = lab.client(move || udp_bind(client_addr(v6, 0)));
            let before = drops(&lab, "filtered");
            client.send_to(b"hello A", a_addr).expect("send to A");
            let mut buf = [0u8; 64];
            let (n, mapping) = a.recv_from(&mut buf).expect("A hears the client");
            assert_eq!(&buf[..n], b"hello A", "{what}");
            a.send_to(b"from A", mapping).expect("A answers");
            expect_datagram(&client, a_addr, b"from A", &format!("{what}: A's answer"));
            b.send_to(b"from B", mapping).expect("B sends");
            b2.send_to(b"from B'", mapping).expect("B' sends");
            // Whatever the filter drops is counted before A's last word.
            let counted = wait_until(Duration::from_secs(3), || {
                drops(&lab, "filtered") - before >= filtered
            });
            assert!(
                counted,
                "{what}: {filtered} datagram(s) not counted as filtered"
            );
            std::thread::sleep(Duration::from_millis(100));
            a.send_to(b"end", mapping).expect("A ends");
            let got = read_until(&client, b"end");
            let mut want = Vec::new();
            if b_in {
                want.push((b"from B".to_vec(), b_addr));
            }
            if b2_in {
                want.push((b"from B'".to_vec(), b2_addr));
            }
            let mut got_sorted = got.clone();
            got_sorted.sort();
            want.sort();
            assert_eq!(
                got_sorted, want,
                "{what}: what reached the client from B and B' (and from where)"
            );
            assert_eq!(
                drops(&lab, "filtered") - before,
                filtered,
                "{what}: filtered and counted"
            );
        }
    }
}

// ------------------------------------------------------------ ICMP errors

/// One mapping serves two remotes; one of them answers with ICMP port
/// unreachable. That forgets only that remote (NAT-4): the other goes on
/// through the same mapping, and the mapping ends only when a datagram to
/// the closed port is all it has.
#[test]
fn an_icmp_error_about_one_remote_ends_only_what_it_concerns() {
    let lab = Lab::tproxy();
    let proxy = start_proxy(&lab, &["--udp-timeout", "60s"]);
    for v6 in [false, true] {
        let what = family(v6);
        let open = server_addr(v6, 7100);
        let closed = server_addr(v6, 7199);
        let server = server_socket(&lab, open);
        let client = lab.client(move || udp_bind(client_addr(v6, 0)));
        let before = metric(&lab, "tproxyd_udp_remote_unreachable_total");
        client.send_to(b"one", open).expect("send");
        let mut buf = [0u8; 64];
        let (_, first_mapping) = server.recv_from(&mut buf).expect("server hears one");
        client
            .send_to(b"anyone?", closed)
            .expect("send to the closed port");
        let heard = wait_until(Duration::from_secs(3), || {
            metric(&lab, "tproxyd_udp_remote_unreachable_total") > before
        });
        assert!(heard, "{what}: the ICMP error was not seen");
        client.send_to(b"two", open).expect("send");
        let (n, mapping) = server.recv_from(&mut buf).expect("server hears two");
        assert_eq!(&buf[..n], b"two");
        assert_eq!(
            mapping, first_mapping,
            "{what}: the mapping should have outlived the other remote's ICMP error"
        );
        server.send_to(b"still here", mapping).expect("answer");
        expect_datagram(&client, open, b"still here", what);
        assert!(
            !proxy.log().contains("unreachable after"),
            "{what}: a mapping ended: {}",
            proxy.log()
        );
    }
    // A mapping whose only remote is unreachable ends at once.
    let client = lab.client(|| udp_bind(client_addr(false, 0)));
    let me = client.local_addr().expect("local_addr");
    client
        .send_to(b"x", server_addr(false, 7199))
        .expect("send");
    let ended = wait_until(Duration::from_secs(3), || {
        proxy
            .log()
            .lines()
            .any(|l| l.contains(&format!("udp {me} -> ")) && l.contains("unreachable after"))
    });
    assert!(ended, "the lone mapping did not end: {}", proxy.log());
}

// ------------------------------------------------------------ spoofing

/// With --spoof-source a server that answers with the peer it saw reports
/// the client's own address and port, in every mode, and the answer
/// reaches the client from the server's address.
#[test]
fn with_spoof_source_servers_see_the_clients_own_address_and_port() {
    let lab = Lab::tproxy();
    for mode in ["full-cone", "symmetric"] {
        let _proxy = start_proxy(&lab, &["--udp-nat", mode, "--spoof-source"]);
        for v6 in [false, true] {
            let what = format!("--udp-nat {mode}, {}", family(v6));
            let dst = server_addr(v6, 7200);
            let server = server_socket(&lab, dst);
            let client = lab.client(move || udp_bind(client_addr(v6, 0)));
            let me = canonical(client.local_addr().expect("local_addr"));
            client.send_to(b"who am I?", dst).expect("send");
            let mut buf = [0u8; 64];
            let (_, peer) = server.recv_from(&mut buf).expect("the server hears it");
            assert_eq!(canonical(peer), me, "{what}: the server saw");
            server
                .send_to(peer.to_string().as_bytes(), peer)
                .expect("answer");
            expect_datagram(&client, dst, peer.to_string().as_bytes(), &what);
        }
    }
}

// ------------------------------------------------------------ workers

/// A thousand clients (client ports) send to two destinations each with
/// `--udp-workers 2`: the kernel spreads them over both workers, each
/// client gets its answers, and each keeps one mapping for both
/// destinations (the same worker took all of its datagrams).
#[test]
fn with_two_workers_a_thousand_clients_spread_over_both_and_each_keeps_one_mapping() {
    const CLIENTS: usize = 1000;
    let lab = Lab::tproxy();
    let _proxy = start_proxy(&lab, &["--udp-workers", "2"]);
    let (d1, d2) = (server_addr(false, 7300), server_addr(false, 7301));
    let (s1, s2) = (server_socket(&lab, d1), server_socket(&lab, d2));
    let clients: Vec<UdpSocket> = lab.client(|| {
        (0..CLIENTS)
            .map(|_| udp_bind(client_addr(false, 0)))
            .collect()
    });
    // Who each destination saw, by client index.
    let mut seen: [HashMap<usize, SocketAddr>; 2] = [HashMap::new(), HashMap::new()];
    for chunk in (0..CLIENTS).collect::<Vec<_>>().chunks(50) {
        for &i in chunk {
            let tag = (i as u32).to_le_bytes();
            clients[i].send_to(&tag, d1).expect("send d1");
            clients[i].send_to(&tag, d2).expect("send d2");
        }
        for (k, s) in [&s1, &s2].into_iter().enumerate() {
            for _ in chunk {
                let mut buf = [0u8; 8];
                let (n, from) = s.recv_from(&mut buf).expect("a client's datagram");
                assert_eq!(n, 4);
                let i = u32::from_le_bytes(buf[..4].try_into().expect("4")) as usize;
                seen[k].insert(i, from);
                s.send_to(&buf[..4], from).expect("answer");
            }
        }
        for &i in chunk {
            let tag = (i as u32).to_le_bytes();
            let mut got = Vec::new();
            for _ in 0..2 {
                let mut buf = [0u8; 8];
                let (n, from) = clients[i]
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("client {i}: an answer missing after {got:?}: {e}"));
                assert_eq!(&buf[..n], &tag, "client {i}: someone else's answer");
                got.push(from);
            }
            got.sort();
            assert_eq!(got, vec![d1, d2], "client {i}: answers from");
        }
    }
    for i in 0..CLIENTS {
        assert_eq!(
            seen[0].get(&i),
            seen[1].get(&i),
            "client {i}: two mappings for one client address and port"
        );
    }
    let per_worker: Vec<u64> = (0..2)
        .map(|w| {
            metric(
                &lab,
                &format!("tproxyd_udp_worker_sessions_created_total{{worker=\"{w}\"}}"),
            )
        })
        .collect();
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        CLIENTS as u64,
        "{per_worker:?}"
    );
    assert!(
        per_worker.iter().all(|&n| n >= CLIENTS as u64 / 5),
        "the clients did not spread over both workers: {per_worker:?}"
    );
}

// ------------------------------------------------------------ loops

/// The host's rules divert the proxy's own upstream datagrams back into it
/// (an output chain marking every UDP datagram to the servers, with no
/// exception for the proxy's --mark; prerouting diverting lo as well). The
/// datagram that comes back is dropped and counted as a loop, once per
/// datagram sent, with one warning; mappings and descriptors stay flat.
#[test]
fn a_datagram_the_rules_send_back_into_the_proxy_is_dropped_as_a_loop() {
    let lab = Lab::tproxy();
    lab.nft(
        Role::Router,
        "delete table inet tproxyd_lab
table inet tproxyd_lab {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto udp ip daddr 198.19.0.0/24 meta mark set 1 tproxy ip to :8080 accept
        meta l4proto udp ip6 daddr 2001:2:0:2::/64 meta mark set 1 tproxy ip6 to :8080 accept
    }
    chain output {
        type route hook output priority mangle; policy accept;
        meta l4proto udp ip daddr 198.19.0.0/24 meta mark set 1
        meta l4proto udp ip6 daddr 2001:2:0:2::/64 meta mark set 1
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
}
",
    );
    let proxy = start_proxy(&lab, &[]);
    let pid = proxy.pid();
    let fds_before = proc_fd_count(pid);
    const SENT: u64 = 20;
    for v6 in [false, true] {
        let client = lab.client(move || udp_bind(client_addr(v6, 0)));
        for _ in 0..SENT {
            client
                .send_to(b"round and round", server_addr(v6, 7400))
                .expect("send");
        }
    }
    let counted = wait_until(Duration::from_secs(5), || drops(&lab, "loop") >= 2 * SENT);
    std::thread::sleep(Duration::from_millis(300));
    let loops = drops(&lab, "loop");
    assert!(
        counted && loops <= 2 * SENT,
        "loop drops: {loops} for {} datagrams sent (each may come back once)",
        2 * SENT
    );
    assert_eq!(
        metric(&lab, "tproxyd_udp_sessions_active"),
        2,
        "one mapping per client, none for the looped datagrams"
    );
    let warned = proxy.log().matches("came back to it").count();
    assert_eq!(warned, 1, "one warning: {}", proxy.log());
    let fds = proc_fd_count(pid);
    assert!(
        fds <= fds_before + 4,
        "descriptors grew from {fds_before} to {fds}"
    );
}
