//! Hostile input (issue 7): TCP connections and UDP datagrams whose
//! destination is the proxy itself are refused or dropped, counted, and
//! never loop (DST-1, UDP-1); the same port on another host is served.
//!
//! Each test builds its own lab (tests/common, LAB-1..4) and reads tproxyd's
//! state from its metrics endpoint (scraped inside the router namespace) and
//! from /proc. Timing is never asserted beyond generous bounds: the machine
//! is shared and small.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use common::udp::UdpSink;
use common::{
    ACCEPTED, ACTIVE, EchoServer, LOOP_REFUSALS, Lab, METRICS, Metrics, PROXY_PORT, Proxy,
    ROUTER_V4, ROUTER_V6, Role, UDP_CREATED, UDP_LOOP_DROPS, server_addr, wait_metrics, wait_until,
};

/// Where a connection or datagram addressed to tproxyd itself comes from:
/// the client (TPROXY diverts it to tproxyd with the router's own address as
/// its destination) or the router itself (straight to the listener).
fn to_the_proxy_itself() -> Vec<(Role, SocketAddr)> {
    let at = |ip: IpAddr| SocketAddr::new(ip, PROXY_PORT);
    vec![
        (Role::Client, at(ROUTER_V4.into())),
        (Role::Client, at(ROUTER_V6.into())),
        (Role::Client, at(common::ROUTER_UPSTREAM_V4.into())),
        (Role::Router, at(Ipv4Addr::LOCALHOST.into())),
        (Role::Router, at(Ipv6Addr::LOCALHOST.into())),
    ]
}

/// TCP connections whose destination is tproxyd itself (through TPROXY to
/// one of the router's addresses, or straight to the listener) are reset,
/// counted as loop refusals, and never forwarded: the server sees nothing
/// and tproxyd's connection count stays flat. A connection to the same port
/// on another host is forwarded as usual.
#[test]
fn tcp_connections_to_the_proxy_itself_are_refused_counted_and_never_loop() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &["--metrics", METRICS]);
    // The real server also listens on the proxy's port number: were tproxyd
    // to forward a refused connection anywhere, it would show here.
    let echo = EchoServer::start(lab.listen_server(PROXY_PORT));
    let targets = to_the_proxy_itself();
    for &(role, dst) in &targets {
        let what = format!("{dst} from the {role:?}");
        let res = lab.run_in(role, move || common::connect(dst));
        match res {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ) => {}
            Err(e) => panic!("{what}: connect failed with {e}, expected refused or reset"),
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("SO_RCVTIMEO");
                match s.write_all(b"GET / HTTP/1.0\r\n\r\n") {
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                    Err(e) => panic!("{what}: write failed with {e}, expected a reset"),
                    Ok(()) => {
                        let got = common::expect_reset(&mut s, &what);
                        assert_eq!(got, 0, "{what}: {got} bytes came back");
                    }
                }
            }
        }
    }
    let n = targets.len() as u64;
    let m = Metrics::of(&lab);
    assert_eq!(m.get(LOOP_REFUSALS), n, "loop refusals counted");
    assert_eq!(m.get(ACCEPTED), n, "connections accepted: one per attempt");
    assert_eq!(m.get(ACTIVE), 0, "connections open");
    // A loop would keep making connections; give it time to show.
    thread::sleep(Duration::from_millis(500));
    let m = Metrics::of(&lab);
    assert_eq!(
        m.get(ACCEPTED),
        n,
        "connections accepted, half a second later"
    );
    assert_eq!(echo.accepted(), 0, "connections that reached the server");

    // The same port on another host is an ordinary destination.
    let mut c = lab
        .connect(server_addr(false, PROXY_PORT))
        .expect("connect to the server's port 8080");
    c.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"ping");
    assert_eq!(echo.accepted(), 1, "the server's own port 8080 is served");
    assert_eq!(Metrics::of(&lab).get(LOOP_REFUSALS), n, "and not refused");
}

/// UDP datagrams whose destination is tproxyd itself are dropped and counted
/// as loops: no session, nothing forwarded, nothing sent back. A datagram to
/// the same port on another host is forwarded.
#[test]
fn udp_datagrams_to_the_proxy_itself_are_dropped_counted_and_never_loop() {
    const ROUNDS: usize = 3;
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &["--metrics", METRICS]);
    let sink = UdpSink::start(&lab, PROXY_PORT);
    let targets = to_the_proxy_itself();
    let mut senders = Vec::new();
    for &(role, dst) in &targets {
        let s = lab.run_in(role, move || {
            let any: IpAddr = if dst.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            UdpSocket::bind(SocketAddr::new(any, 0)).expect("bind")
        });
        for i in 0..ROUNDS {
            s.send_to(&[i as u8; 32], dst)
                .unwrap_or_else(|e| panic!("send to {dst} from the {role:?}: {e}"));
        }
        senders.push((role, dst, s));
    }
    let n = (targets.len() * ROUNDS) as u64;
    let (counted, m) = wait_metrics(&lab, Duration::from_secs(5), |m| m.get(UDP_LOOP_DROPS) >= n);
    assert!(
        counted,
        "{} of {n} loop drops counted",
        m.get(UDP_LOOP_DROPS)
    );
    thread::sleep(Duration::from_millis(300));
    let m = Metrics::of(&lab);
    assert_eq!(m.get(UDP_LOOP_DROPS), n, "loop drops");
    assert_eq!(m.get(UDP_CREATED), 0, "sessions opened");
    assert_eq!(sink.count(), 0, "datagrams that reached the server");
    for (role, dst, s) in &senders {
        s.set_nonblocking(true).expect("O_NONBLOCK");
        let mut buf = [0u8; 64];
        match s.recv_from(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the {role:?}'s datagrams to {dst}: something came back: {other:?}"),
        }
    }

    // The same port on another host is an ordinary destination.
    let s = lab.client(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    s.send_to(b"ordinary", server_addr(false, PROXY_PORT))
        .expect("send");
    assert!(
        wait_until(Duration::from_secs(5), || sink.count() == 1),
        "the datagram to the server's port 8080 did not arrive"
    );
    let from = sink.seen.lock().expect("sink lock")[0];
    assert_eq!(
        from.ip(),
        IpAddr::from(common::ROUTER_UPSTREAM_V4),
        "relayed by the router"
    );
    let m = Metrics::of(&lab);
    assert_eq!(
        (m.get(UDP_CREATED), m.get(UDP_LOOP_DROPS)),
        (1, n),
        "sessions, loop drops"
    );
}
