//! Source addresses and source-port exhaustion (issue 12, part 3): upstream
//! connections come from the `--source` addresses in turn, per family; when
//! no source port is left towards a server (all in use or in TIME_WAIT), the
//! client is reset at once, the failure is counted and warned about once per
//! episode, and each more `--source` address brings a port range of its own.
//!
//! The router's `net.ipv4.ip_local_port_range` is narrowed to `PORTS` ports
//! so that exhaustion comes after a few dozen connections instead of 28,000;
//! the clients close first, so the proxy's upstream sockets are the ones
//! left in TIME_WAIT (60 s, far longer than a test), as in the field.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{
    ACTIVE, EchoServer, Lab, METRICS, Proxy, Role, accept_timeout, describe, metric_value,
    scrape_metrics, server_addr, tproxyd_bin,
};

/// Local ports left to the router's connects: `PORT_RANGE` is this many.
const PORTS: usize = 40;
const PORT_RANGE: &str = "40000 40039";
/// The server's port every connection here goes to.
const PORT: u16 = 80;
/// Another port of the server: a destination with all its ports free.
const OTHER_PORT: u16 = 81;
const NO_SOURCE_PORT: &str = "tproxyd_tcp_connect_errors_total{kind=\"no_source_port\"}";
const CLOSED_NO_SOURCE_PORT: &str = "tproxyd_tcp_connections_closed_total{end=\"no_source_port\"}";
/// The words of the once-per-episode warning.
const WARNING: &str = "no source port is free towards";

/// Extra addresses of the router on the server's side (its own is .1).
fn add_router_addresses(lab: &Lab, addrs: &[&str]) {
    for a in addrs {
        let args: Vec<&str> = if a.contains(':') {
            vec!["ip", "-6", "addr", "add", a, "dev", "rs", "nodad"]
        } else {
            vec!["ip", "addr", "add", a, "dev", "rs"]
        };
        lab.sh(Role::Router, &args);
    }
}

fn narrow_port_range(lab: &Lab) {
    lab.sh(
        Role::Router,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ip_local_port_range={PORT_RANGE}"),
        ],
    );
}

/// What one client connection got.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Its byte came back through the proxy.
    Served,
    /// Reset: at connect or at the first read.
    Reset,
}

/// One connection to `dst` that sends a byte, reads the echo, and closes
/// first (FIN), so that the proxy's upstream socket closes first too and
/// stays in TIME_WAIT. A reset is an outcome; anything else (a timeout: a
/// hang) fails the test.
fn close_first(lab: &Lab, dst: SocketAddr) -> Outcome {
    lab.client(move || {
        let mut s = match common::connect(dst) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Outcome::Reset,
            Err(e) => panic!("connect {dst}: {e}"),
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("SO_RCVTIMEO");
        match s.write_all(b"x") {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Outcome::Reset,
            Err(e) => panic!("write to {dst}: {e}"),
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) => Outcome::Served,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Outcome::Reset,
            Ok(n) => panic!("{dst}: read {n} bytes instead of the echo or a reset"),
            Err(e) => panic!("{dst}: {e} instead of the echo or a reset (a hang?)"),
        }
    })
}

/// `n` connections one after the other: how many were served.
fn served_of(lab: &Lab, n: usize) -> usize {
    (0..n)
        .filter(|_| close_first(lab, server_addr(false, PORT)) == Outcome::Served)
        .count()
}

/// One source address gives `PORTS` connections towards one server ip:port
/// before every port is in TIME_WAIT; two give twice as many. Every
/// connection past that is reset at once (none hangs), counted as
/// no_source_port, and the warning is given once for the episode, which
/// ends (and says how many failed) once connects succeed again.
#[test]
fn two_source_addresses_give_twice_the_connections_and_the_rest_are_reset_counted_and_warned_once()
{
    let lab = Lab::tproxy();
    narrow_port_range(&lab);
    add_router_addresses(&lab, &["198.19.0.3/24", "198.19.0.4/24", "198.19.0.5/24"]);
    let _echo = EchoServer::start(lab.listen_server(PORT));
    let _other = EchoServer::start(lab.listen_server(OTHER_PORT));
    let metrics: SocketAddr = METRICS.parse().expect("metrics address");
    let attempts = 3 * PORTS;

    // Fresh addresses for each run: the first run's ports stay in TIME_WAIT.
    let mut served = Vec::new();
    for sources in [&["198.19.0.3"][..], &["198.19.0.4", "198.19.0.5"][..]] {
        let mut args = vec!["--metrics", METRICS];
        for s in sources {
            args.extend_from_slice(&["--source", s]);
        }
        let proxy = Proxy::start(&lab, &args);
        let n = served_of(&lab, attempts);
        let failed = (attempts - n) as u64;
        eprintln!("--source {sources:?}: {n} of {attempts} served");
        let m = scrape_metrics(&lab, metrics);
        assert_eq!(
            metric_value(&m, NO_SOURCE_PORT),
            failed,
            "{sources:?}: every failure counted"
        );
        assert_eq!(metric_value(&m, CLOSED_NO_SOURCE_PORT), failed);
        let warnings = proxy.log().matches(WARNING).count();
        assert_eq!(warnings, 1, "{sources:?}: one warning:\n{}", proxy.log());
        // The episode ends at the first success a quiet second after the last
        // failure: towards another port, whose ports are all free.
        thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            close_first(&lab, server_addr(false, OTHER_PORT)),
            Outcome::Served
        );
        assert!(
            proxy.wait_log(
                &format!("connects succeed again; {failed} failed"),
                Duration::from_secs(5)
            ),
            "{sources:?}: the end of the episode:\n{}",
            proxy.log()
        );
        let m = scrape_metrics(&lab, metrics);
        assert!(metric_value(&m, ACTIVE) <= 1, "connections left open:\n{m}");
        served.push(n);
    }
    assert_eq!(served[0], PORTS, "one source: one port range");
    assert_eq!(served[1], 2 * PORTS, "two sources: twice as many");
}

/// A server that answers each connection with the peer address it sees.
struct PeerServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    fn start(l: TcpListener) -> PeerServer {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut s, peer)) = accept_timeout(&l, Duration::from_millis(50)) {
                        // A dual-stack listener sees IPv4 peers v4-mapped.
                        let _ = s.write_all(peer.ip().to_canonical().to_string().as_bytes());
                    }
                }
            })
        };
        PeerServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// With one worker, IPv4 upstream connections take the two IPv4 `--source`
/// addresses in turn, and IPv6 ones the IPv6 address.
#[test]
fn upstream_connections_come_from_the_source_addresses_in_turn_per_family() {
    let lab = Lab::tproxy();
    add_router_addresses(
        &lab,
        &["198.19.0.3/24", "198.19.0.4/24", "2001:2:0:2::3/64"],
    );
    let _server = PeerServer::start(lab.listen_server(PORT));
    let _proxy = Proxy::start(
        &lab,
        &[
            "--workers",
            "1",
            "--source",
            "198.19.0.3",
            "--source",
            "2001:2:0:2::3",
            "--source",
            "198.19.0.4",
        ],
    );
    let seen = |v6: bool| -> String {
        let dst = server_addr(v6, PORT);
        lab.client(move || {
            let mut s = common::connect(dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
            let mut out = String::new();
            s.read_to_string(&mut out)
                .unwrap_or_else(|e| panic!("read from {dst}: {e}"));
            out
        })
    };
    let v4: Vec<String> = (0..4).map(|_| seen(false)).collect();
    assert_eq!(v4, ["198.19.0.3", "198.19.0.4", "198.19.0.3", "198.19.0.4"]);
    assert_eq!(seen(true), "2001:2:0:2::3");
    assert_eq!(seen(true), "2001:2:0:2::3");
}

/// A `--source` that is not one of the host's addresses would fail every
/// connect: tproxyd says so in one line and exits 1 before it listens.
#[test]
fn a_source_address_the_host_does_not_have_is_refused_at_start() {
    let lab = Lab::tproxy();
    // Bounded: a tproxyd that took the address would run on.
    let out = lab
        .exec_bounded(
            Role::Router,
            Duration::from_secs(10),
            &[tproxyd_bin(), "--port", "8080", "--source", "198.19.0.99"],
        )
        .out;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        out.status.code() == Some(1)
            && lines.len() == 1
            && lines[0].contains("--source 198.19.0.99"),
        "want exit 1 and one line naming the address: {}",
        describe(&out)
    );
    assert!(!lab.is_listening(Role::Router, 8080));
}
