//! `--max-conns-per-client` (issue 14): one client cannot take every
//! connection slot. A client over its cap is reset before any upstream
//! connect and counted (`tproxyd_tcp_client_limit_total`), while other
//! clients are served; its places come back as its connections go
//! (tcp/accept/client_limit.rs ACC-2..5, tcp/accept.rs ACC-1).
//!
//! - One IPv4 client opens 3N connections while a second is served: N stay
//!   open, every other one is reset before any byte, the metric rises by
//!   exactly that many, the second client's streams arrive byte-exact, and
//!   once the first closes some (one with a FIN, one with a reset) it is
//!   admitted again.
//! - IPv6 is counted per /64: two addresses in one /64 share a cap, an
//!   address in another /64 has its own.
//! - A client reset for its own cap holds no place under `--max-conns`, and
//!   connects that fail give their client place back.
//!
//! Every test runs two workers (SO_REUSEPORT spreads one client's
//! connections over both, so the count must be shared), in its own lab
//! with second client addresses added to the client's link (LAB-1..4).
//! Nothing is timed beyond generous bounds.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    ACTIVE, ANSWER_TIMEOUT, CLIENT_OTHER64_V6, CLIENT_V4, CLIENT_V6, CLIENT2_V4, CLIENT2_V6,
    EchoServer, Lab, METRICS, Metrics, Proxy, closed, connect_from, exchange,
    expect_reset_before_any_byte, reset, server_addr, wait_metrics,
};

/// The cap under test.
const N: usize = 5;
const ECHO_PORT: u16 = 80;
/// A port nothing listens on in the server namespace.
const CLOSED_PORT: u16 = 81;
const CLIENT_LIMIT: &str = "tproxyd_tcp_client_limit_total";
/// Bytes each way on the second client's connections.
const STREAM: u64 = 1 << 20;

fn start(lab: &Lab, extra: &[&str]) -> Proxy {
    let n = N.to_string();
    let mut args = vec![
        "--workers",
        "2",
        "--max-conns-per-client",
        &n,
        "--metrics",
        METRICS,
    ];
    args.extend_from_slice(extra);
    Proxy::start(lab, &args)
}

/// A connection from `src` to the echo server through the proxy.
fn open(lab: &Lab, src: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    let dst = server_addr(src.is_ipv6(), port);
    lab.client(move || connect_from(SocketAddr::new(src, 0), dst))
}

/// A connection from `src` that the proxy serves: its bytes come back.
fn served(lab: &Lab, src: IpAddr, what: &str) -> TcpStream {
    let mut s = open(lab, src, ECHO_PORT).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("timeout");
    s.write_all(b"ping")
        .unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: not served: {e}"));
    assert_eq!(&buf, b"ping", "{what}");
    s
}

/// A connection from `src` that the proxy resets before any byte: the one
/// check of a refused connection (common's `expect_reset_before_any_byte`).
fn refused(lab: &Lab, src: IpAddr, what: &str) {
    expect_reset_before_any_byte(open(lab, src, ECHO_PORT), b"ping", ANSWER_TIMEOUT, what);
}

/// Whether the client's held connection still carries bytes both ways.
fn still_open(s: &mut TcpStream, what: &str) {
    s.write_all(b"more")
        .unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: no longer served: {e}"));
    assert_eq!(&buf, b"more", "{what}");
}

#[test]
fn one_client_at_its_cap_is_reset_while_another_is_served() {
    let lab = Lab::tproxy();
    lab.add_client_address(IpAddr::V4(CLIENT2_V4));
    let _echo = EchoServer::start(lab.listen_server(ECHO_PORT));
    let proxy = start(&lab, &[]);
    let (a, b) = (IpAddr::V4(CLIENT_V4), IpAddr::V4(CLIENT2_V4));

    // B holds one connection from before A's flood to after it.
    let mut b_held = served(&lab, b, "B's first connection");
    // A opens 3N, one after another: the first N are served and held, the
    // 2N after them are reset, whichever worker takes each.
    let mut a_held: Vec<TcpStream> = (0..N)
        .map(|i| served(&lab, a, &format!("A's connection {i}")))
        .collect();
    // Meanwhile B opens N - 1 more (with its first, its whole cap), each
    // moving STREAM bytes both ways.
    let b_streams = lab.spawn_client(move || {
        let dst = server_addr(false, ECHO_PORT);
        let streams: Vec<_> = (0..N - 1)
            .map(|i| {
                let s = connect_from(SocketAddr::new(b, 0), dst)
                    .unwrap_or_else(|e| panic!("B's stream {i}: connect: {e}"));
                thread::spawn(move || exchange(s, i as u64, STREAM, i as u64, STREAM))
            })
            .collect();
        streams
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.join()
                    .expect("B's stream thread")
                    .map_err(|e| format!("B's stream {i}: {e}"))
            })
            .collect::<Vec<_>>()
    });
    for i in N..3 * N {
        refused(&lab, a, &format!("A's connection {i}, over its cap"));
    }
    for r in b_streams.join().expect("B's client thread") {
        r.unwrap_or_else(|e| panic!("{e}"));
    }
    for (i, s) in a_held.iter_mut().enumerate() {
        still_open(s, &format!("A's held connection {i}"));
    }
    still_open(&mut b_held, "B's first connection");
    let m = Metrics::of(&lab);
    assert_eq!(m.get(CLIENT_LIMIT), 2 * N as u64, "every reset counted");
    assert_eq!(m.get(ACTIVE), N as u64 + 1, "A's N and B's first");
    assert!(
        proxy.log().contains(&format!(
            "client 198.18.0.2/32 is at --max-conns-per-client {N}"
        )),
        "the episode's warning names A as a prefix:\n{}",
        proxy.log()
    );
    assert!(
        !proxy.log().contains("client 198.18.0.12/32"),
        "B never reached its cap"
    );

    // A lets two go, one with a FIN and one with a reset: their places
    // come back (RAII), so A is admitted again, twice, and then not.
    drop(a_held.pop());
    reset(a_held.pop().expect("held"));
    let before = m.get(CLIENT_LIMIT);
    let mut rejected = 0;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut again = Vec::new();
    while again.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "A was not admitted again after closing two connections ({rejected} reset meanwhile)"
        );
        let mut s = open(&lab, a, ECHO_PORT).expect("connect");
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 4];
        match s.write_all(b"ping").and_then(|()| s.read_exact(&mut buf)) {
            Ok(()) => {
                assert_eq!(&buf, b"ping");
                again.push(s);
            }
            // The proxy may not have seen the close yet: then this one is
            // reset for A's cap, and counted.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => rejected += 1,
            Err(e) => panic!("A's connection after closing two: {e}, neither served nor reset"),
        }
    }
    refused(&lab, a, "A's connection over its cap again");
    let m = Metrics::of(&lab);
    assert_eq!(m.get(CLIENT_LIMIT), before + rejected + 1);
    assert_eq!(m.get(ACTIVE), N as u64 + 1);
    // The episode ends once A has gone a quiet second without a reset.
    assert!(
        proxy.wait_log("client 198.18.0.2/32: no reset", Duration::from_secs(10)),
        "no end line for A's episode:\n{}",
        proxy.log()
    );
    drop((a_held, again, b_held, proxy));
}

#[test]
fn ipv6_clients_in_one_64_share_a_cap_and_another_64_has_its_own() {
    let lab = Lab::tproxy();
    lab.add_client_address(IpAddr::V6(CLIENT2_V6));
    lab.add_client_address(IpAddr::V6(CLIENT_OTHER64_V6));
    let _echo = EchoServer::start(lab.listen_server(ECHO_PORT));
    let proxy = start(&lab, &[]);
    let (a1, a2) = (IpAddr::V6(CLIENT_V6), IpAddr::V6(CLIENT2_V6));
    let other = IpAddr::V6(CLIENT_OTHER64_V6);

    // N connections from two addresses of 2001:2:0:1::/64, in turn.
    let mut held: Vec<TcpStream> = (0..N)
        .map(|i| {
            let src = if i % 2 == 0 { a1 } else { a2 };
            served(&lab, src, &format!("{src}'s connection {i}"))
        })
        .collect();
    refused(&lab, a1, "a sixth from 2001:2:0:1::2");
    refused(&lab, a2, "a sixth from 2001:2:0:1::12, the same /64");
    // Another /64 is another client, with a cap of its own.
    for i in 0..N {
        held.push(served(
            &lab,
            other,
            &format!("2001:2:0:3::2's connection {i}"),
        ));
    }
    refused(&lab, other, "2001:2:0:3::2 over its own cap");
    let m = Metrics::of(&lab);
    assert_eq!(m.get(CLIENT_LIMIT), 3);
    assert_eq!(m.get(ACTIVE), 2 * N as u64);
    let log = proxy.log();
    for key in ["2001:2:0:1::/64", "2001:2:0:3::/64"] {
        assert!(
            log.contains(&format!("client {key} is at --max-conns-per-client {N}")),
            "no warning for {key}:\n{log}"
        );
    }
    for (i, s) in held.iter_mut().enumerate() {
        still_open(s, &format!("held connection {i}"));
    }
    drop((held, proxy));
}

#[test]
fn a_client_reset_for_its_cap_holds_no_place_and_failed_connects_give_theirs_back() {
    let lab = Lab::tproxy();
    lab.add_client_address(IpAddr::V4(CLIENT2_V4));
    let _echo = EchoServer::start(lab.listen_server(ECHO_PORT));
    // Room for A's cap and two more.
    let max = (N + 2).to_string();
    let _proxy = start(&lab, &["--max-conns", &max]);
    let (a, b) = (IpAddr::V4(CLIENT_V4), IpAddr::V4(CLIENT2_V4));

    // Connects that fail (nothing listens on CLOSED_PORT) reset A, 3N
    // times, and give A's place back each time: none is reset for A's cap.
    for i in 0..3 * N {
        expect_reset_before_any_byte(
            open(&lab, a, CLOSED_PORT),
            b"ping",
            ANSWER_TIMEOUT,
            &format!("A's connection {i} to a closed port"),
        );
    }
    let (ok, m) = wait_metrics(&lab, ANSWER_TIMEOUT, |m| {
        m.get(&closed("connect_refused")) == 3 * N as u64
    });
    assert!(ok, "{} refused connects", m.get(&closed("connect_refused")));
    assert_eq!(
        m.get(CLIENT_LIMIT),
        0,
        "failed connects gave their places back"
    );

    let mut held: Vec<TcpStream> = (0..N)
        .map(|i| served(&lab, a, &format!("A's connection {i}")))
        .collect();
    for i in 0..2 * N {
        refused(&lab, a, &format!("A's connection {}, over its cap", N + i));
    }
    // Had A's resets kept their --max-conns places, B would now wait in
    // the accept queue: it takes the last two at once.
    for i in 0..2 {
        held.push(served(&lab, b, &format!("B's connection {i}")));
    }
    let m = Metrics::of(&lab);
    assert_eq!(m.get(CLIENT_LIMIT), 2 * N as u64);
    assert_eq!(m.get(ACTIVE), N as u64 + 2, "--max-conns {max}: all taken");
    drop(held);
}
