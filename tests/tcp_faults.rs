//! Failures reach the client as failures: an upstream reset, a refused or a
//! silent upstream all end the client's connection with a reset, never with a
//! clean EOF that would pass for a complete answer. A connection addressed to
//! the proxy itself is refused without disturbing the others.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    EchoServer, Lab, PROXY_PORT, Proxy, ROUTER_V4, ROUTER_V6, Role, accept, connect, expect_reset,
    expect_reset_from, family, reset, server_addr,
};

/// Long enough for any answer the proxy owes; a proxy that swallows a reset
/// fails the test after this, not after `IO_TIMEOUT`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn server_reset_reaches_the_client_as_a_reset() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let mut client = lab
            .connect(server_addr(v6, 80))
            .expect("connect through the proxy");
        client
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("SO_RCVTIMEO");
        let (mut upstream, _) = accept(&listener);
        client.write_all(b"request").expect("client write");
        let mut buf = [0u8; 7];
        upstream.read_exact(&mut buf).expect("server read");
        upstream.write_all(b"partial answer").expect("server write");
        reset(upstream);
        // The partial answer may or may not arrive before the reset; the end
        // must be a reset.
        let got = expect_reset(&mut client, family(v6));
        assert!(got <= 14, "{}: {got} bytes of a 14-byte answer", family(v6));
    }
}

#[test]
fn refused_upstream_resets_the_client_within_a_second() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    // Nothing listens on port 82 in the server namespace.
    for v6 in [false, true] {
        let start = Instant::now();
        let res = lab.connect(server_addr(v6, 82));
        expect_reset_from(res, ANSWER_TIMEOUT, family(v6));
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{}: the reset took {took:?}",
            family(v6)
        );
    }
}

#[test]
fn blackholed_upstream_resets_the_client_after_the_connect_timeout() {
    let lab = Lab::tproxy();
    // The server drops everything to port 81: SYNs go unanswered.
    lab.nft(
        Role::Server,
        "table inet blackhole {
            chain input {
                type filter hook input priority filter; policy accept;
                tcp dport 81 drop
            }
        }",
    );
    let _proxy = Proxy::start(&lab, &["--connect-timeout", "1s"]);
    // Both families at once: each waits out the timeout.
    let waits: Vec<_> = [false, true]
        .into_iter()
        .map(|v6| {
            let dst = server_addr(v6, 81);
            lab.spawn_client(move || {
                let start = Instant::now();
                let res = connect(dst);
                expect_reset_from(res, Duration::from_secs(15), family(v6));
                (v6, start.elapsed())
            })
        })
        .collect();
    for w in waits {
        let (v6, took) = w.join().expect("client thread panicked");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "{}: reset after {took:?}, expected about 1s",
            family(v6)
        );
    }
}

/// A client that connects to the proxy's own address and port must not get a
/// connection the proxy would forward to itself; proxied connections carry
/// on.
#[test]
fn direct_connection_to_the_proxy_port_is_reset_while_proxied_ones_work() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    let echo = EchoServer::start(lab.listen_server(80));
    let mut proxied = lab
        .connect(server_addr(false, 80))
        .expect("connect through the proxy");
    let round_trip = |s: &mut std::net::TcpStream, msg: &[u8]| {
        s.write_all(msg).expect("proxied write");
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).expect("proxied read");
        assert_eq!(buf, msg, "proxied echo");
    };
    round_trip(&mut proxied, b"before");

    for ip in [IpAddr::V4(ROUTER_V4), IpAddr::V6(ROUTER_V6)] {
        let dst = SocketAddr::new(ip, PROXY_PORT);
        let what = format!("direct connection to {dst}");
        match lab.connect(dst) {
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ) => {}
            Err(e) => panic!("{what}: connect failed with {e}, expected refused or reset"),
            Ok(mut s) => {
                s.set_read_timeout(Some(ANSWER_TIMEOUT))
                    .expect("SO_RCVTIMEO");
                // Something to forward, were the proxy to forward it. A write
                // that meets the reset reports it (and consumes it).
                match s.write_all(b"GET / HTTP/1.0\r\n\r\n") {
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                    Err(e) => panic!("{what}: write failed with {e}, expected a reset"),
                    Ok(()) => {
                        let got = expect_reset(&mut s, &what);
                        assert_eq!(got, 0, "{what}: got {got} bytes");
                    }
                }
            }
        }
    }

    round_trip(&mut proxied, b"after");
    // Let the proxy connect upstream for anything it wrongly took on.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(echo.accepted(), 1, "connections that reached the server");
}
