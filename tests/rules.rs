//! scripts/rules and tune/: the interception goes in and out without a
//! trace, real traffic passes the proxy with either backend, `--local`
//! proxies the router's own connections without a loop, NOTRACK leaves only
//! the proxied client side untracked, and tune/apply + tune/revert give back
//! every per-namespace setting.
//!
//! Every test has its own lab in direct mode: the router forwards and has no
//! TPROXY rules of its own, so whatever intercepts is what scripts/rules
//! installed. The scripts run only inside the lab's router namespace (or a
//! throwaway one from `unshare -n`), never in the host's.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{
    CLIENT_V4, CLIENT_V6, IO_TIMEOUT, Lab, METRICS, Mode, PROXY_PORT, Proxy, ROUTER_UPSTREAM_V4,
    ROUTER_UPSTREAM_V6, ROUTER_V4, Role, accept_timeout, connect, describe, family, listen,
    metric_value, require_root, scrape_metrics, server_addr,
};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rules");
const NOTRACK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tune/notrack");
const TUNE_APPLY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tune/apply");
const TUNE_REVERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tune/revert");
const SYSCTL_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tune/sysctl.conf");
const NOTRACK_NFT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tune/notrack.nft");
const NOTRACK_IPTABLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tune/notrack.iptables");

const BACKENDS: [&str; 2] = ["nft", "iptables"];
/// tproxyd's upstream mark in these tests: scripts/rules' default
/// --proxy-mark, which its --local output chain lets pass.
const PROXY_MARK: &str = "2";
/// The server's TCP and UDP ports.
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 5353;
/// A service of the router's own, for --local's "replies stay alone" check.
const ROUTER_SERVICE_PORT: u16 = 9000;
/// How long tproxyd may take to log a closed connection.
const LOG_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// Run a script in the router; it must succeed. Returns its stdout.
fn run_ok(lab: &Lab, script: &str, args: &[&str]) -> String {
    let mut argv = vec![script];
    argv.extend_from_slice(args);
    let out = lab.exec(Role::Router, &argv);
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rules_up(lab: &Lab, opts: &[&str]) {
    let mut args = vec!["up"];
    args.extend_from_slice(opts);
    run_ok(lab, RULES, &args);
}

fn rules_down(lab: &Lab) {
    run_ok(lab, RULES, &["down"]);
}

/// `scripts/rules status` exit code.
fn rules_status(lab: &Lab) -> i32 {
    let out = lab.exec(Role::Router, &[RULES, "status"]);
    out.status
        .code()
        .unwrap_or_else(|| panic!("rules status killed: {}", describe(&out)))
}

/// A command's stdout in the router; it must succeed (stderr is ignored:
/// nft warns there about iptables-nft's xt targets it cannot print).
fn router_stdout(lab: &Lab, args: &[&str]) -> String {
    let out = lab.exec(Role::Router, args);
    assert!(out.status.success(), "{args:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// iptables-save without its timestamp comments and counters.
fn iptables_save(lab: &Lab, cmd: &str) -> String {
    router_stdout(lab, &[cmd])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What may be touched in the router, section by section. `nft` includes
/// `nft list ruleset` (stateless: no counters). It is left out when
/// comparing iptables-backend states after a `down`: iptables-nft creates
/// mangle's base chains on first use and leaves them, so a later `up` lists
/// our chains in another order there; iptables-save shows the same rules
/// in a fixed order.
fn snapshot(lab: &Lab, nft: bool) -> String {
    let mut s = String::new();
    if nft {
        s += &format!(
            "## nft\n{}\n",
            router_stdout(lab, &["nft", "-s", "list", "ruleset"])
        );
    }
    s += &format!("## iptables\n{}\n", iptables_save(lab, "iptables-save"));
    s += &format!("## ip6tables\n{}\n", iptables_save(lab, "ip6tables-save"));
    for (name, args) in [
        ("ip -4 rule", &["ip", "-4", "rule"][..]),
        ("ip -6 rule", &["ip", "-6", "rule"]),
        (
            "ip -4 route",
            &["ip", "-4", "route", "show", "table", "all"],
        ),
        (
            "ip -6 route",
            &["ip", "-6", "route", "show", "table", "all"],
        ),
    ] {
        s += &format!("## {name}\n{}\n", router_stdout(lab, args));
    }
    s
}

/// The lines in only one of two snapshots, for assertion messages.
fn diff(a: &str, b: &str) -> String {
    let only = |x: &str, y: &str| -> Vec<String> {
        x.lines()
            .filter(|l| !y.lines().any(|m| m == *l))
            .map(str::to_owned)
            .collect()
    };
    format!(
        "only before: {:#?}\nonly after: {:#?}",
        only(a, b),
        only(b, a)
    )
}

fn assert_same(before: &str, after: &str, what: &str) {
    assert!(before == after, "{what}:\n{}", diff(before, after));
}

/// A TCP server in the server namespace answering each connection with the
/// address it came from, then closing. Counts connections.
struct PeerServer {
    accepted: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl PeerServer {
    fn start(listener: TcpListener) -> PeerServer {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handle = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (mut s, peer) = match accept_timeout(&listener, Duration::from_millis(50)) {
                        Ok(pair) => pair,
                        Err(e) if e.kind() == ErrorKind::TimedOut => continue,
                        Err(e) => panic!("peer server: accept: {e}"),
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let mut line = [0u8; 6];
                    let _ = s.read_exact(&mut line);
                    let _ = s.write_all(peer.ip().to_canonical().to_string().as_bytes());
                    let _ = s.shutdown(Shutdown::Write);
                }
            })
        };
        PeerServer {
            accepted,
            handle: Some(handle),
            stop,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// On a connection to a PeerServer: say hello, read the peer address the
/// server saw. Returns (our local address, what the server saw).
fn ask_peer(mut s: std::net::TcpStream) -> (SocketAddr, String) {
    let local = s.local_addr().expect("local_addr");
    s.write_all(b"hello\n").expect("send hello");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    (local, answer)
}

fn upstream_ip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(ROUTER_UPSTREAM_V6)
    } else {
        IpAddr::V4(ROUTER_UPSTREAM_V4)
    }
}

/// tproxyd's debug line for a finished connection, up to the verdict.
fn log_line(client: SocketAddr, dst: SocketAddr) -> String {
    format!("{client} -> {dst}: completed")
}

/// A UDP server in the server namespace answering each datagram with the
/// address it came from.
fn start_udp_peer_server(lab: &Lab) -> JoinHandle<()> {
    let sock = lab.server(|| {
        let s = UdpSocket::bind(("::", UDP_PORT)).expect("bind UDP");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("SO_RCVTIMEO");
        s
    });
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let Ok((_, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            let seen = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let _ = sock.send_to(seen.to_string().as_bytes(), peer);
        }
    })
}

/// Ask the UDP peer server who it saw: (our own address, its answer).
fn udp_ask_peer(lab: &Lab, v6: bool) -> (SocketAddr, String) {
    let dst = server_addr(v6, UDP_PORT);
    lab.client(move || {
        let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().unwrap();
        let s = UdpSocket::bind(bind).expect("bind UDP client");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("SO_RCVTIMEO");
        s.connect(dst).expect("connect UDP");
        s.send(b"hello").expect("send datagram");
        let mut buf = [0u8; 64];
        let n = s
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{}: no UDP answer: {e}", family(v6)));
        let local = s.local_addr().expect("local_addr");
        (local, String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// The keys tune/sysctl.conf sets.
fn profile_keys() -> Vec<String> {
    std::fs::read_to_string(SYSCTL_CONF)
        .expect("read tune/sysctl.conf")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| l.split('=').next().unwrap().trim().to_owned())
        .collect()
}

/// Each key's value as this thread's network namespace shows it (None when
/// absent), whitespace squeezed.
fn read_sysctls(keys: &[String]) -> BTreeMap<String, Option<String>> {
    keys.iter()
        .map(|k| {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            let v = std::fs::read_to_string(path)
                .ok()
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "));
            (k.clone(), v)
        })
        .collect()
}

// ---------------------------------------------------------------- (a) idempotence

/// `up` twice leaves what `up` once leaves; `up`, `down`, `up` ends where the
/// first `up` did; `status` says 3, 0, 1 (a piece missing) and `up` repairs
/// it. Both backends, with most options in play.
#[test]
fn up_twice_is_up_once_and_up_down_up_is_identical() {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    for backend in BACKENDS {
        let opts = [
            "--backend",
            backend,
            "--in-iface",
            "rc",
            "--local",
            "--ports",
            "80,443,8000-8100",
            "--bypass",
            "198.18.9.0/24",
            "--bypass",
            "2001:2:0:9::/64",
        ];
        // nft's listing is stable for the nft backend; for iptables see
        // `snapshot`.
        let nft = backend == "nft";
        let before = snapshot(&lab, true);
        assert_eq!(rules_status(&lab), 3, "{backend}: status before up");

        rules_up(&lab, &opts);
        let once = snapshot(&lab, nft);
        assert_eq!(rules_status(&lab), 0, "{backend}: status after up");
        rules_up(&lab, &opts);
        assert_same(
            &once,
            &snapshot(&lab, nft),
            &format!("{backend}: up twice vs once"),
        );

        rules_down(&lab);
        assert_eq!(rules_status(&lab), 3, "{backend}: status after down");
        if nft {
            assert_same(&before, &snapshot(&lab, true), "nft: down after up");
        }
        rules_up(&lab, &opts);
        assert_same(
            &once,
            &snapshot(&lab, nft),
            &format!("{backend}: up, down, up"),
        );

        // Take one piece away: partial; up puts exactly it back.
        lab.sh(
            Role::Router,
            &[
                "ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100",
            ],
        );
        assert_eq!(
            rules_status(&lab),
            1,
            "{backend}: status with a route missing"
        );
        rules_up(&lab, &opts);
        assert_same(
            &once,
            &snapshot(&lab, nft),
            &format!("{backend}: up repairing"),
        );
        rules_down(&lab);
    }
}

/// Malformed or conflicting options: exit 2, one line on stderr naming the
/// option, and nothing changed.
#[test]
fn bad_options_fail_with_one_line_and_change_nothing() {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    let before = snapshot(&lab, true);
    for (args, needle) in [
        (&["up", "--port", "0"][..], "--port"),
        (&["up", "--port", "70000"], "--port"),
        (&["up", "--fwmark", "0"], "--fwmark"),
        (&["up", "--fwmark", "0x3/0x1"], "--fwmark"),
        (&["up", "--proxy-mark", "1"], "--proxy-mark"),
        (&["up", "--table", "254"], "--table"),
        (&["up", "--ports", "80,http"], "--ports"),
        (&["up", "--ports", "90-80"], "--ports"),
        (&["up", "--bypass", "10.1.2.3/8"], "--bypass"),
        (&["up", "--bypass", "2001:2::1/48"], "--bypass"),
        (&["up", "--bypass", "198.18.0.0/33"], "--bypass"),
        (&["up", "--in-iface", "lo"], "--in-iface"),
        (&["up", "--backend", "pf"], "--backend"),
        (&["up", "--frobnicate"], "--frobnicate"),
        (&["up", "--port"], "--port"),
        (&["sideways"], "sideways"),
    ] {
        let mut argv = vec![RULES];
        argv.extend_from_slice(args);
        let out = lab.exec(Role::Router, &argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(
            stderr.starts_with("rules: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
    }
    assert_same(
        &before,
        &snapshot(&lab, true),
        "bad options changed something",
    );
}

// ---------------------------------------------------------------- (b) foreign state

/// Someone else's iptables rules and chains (one named like ours), policy
/// rules (one with our very selector and table) and routes (some in our
/// table), for both families.
const FOREIGN: &[&str] = &[
    "iptables -w -t mangle -A PREROUTING -i rs -p tcp --dport 9 -j MARK --set-mark 0x100/0x100",
    "iptables -w -t mangle -N FOREIGN",
    "iptables -w -t mangle -A FOREIGN -p udp -j RETURN",
    "iptables -w -t mangle -A OUTPUT -j FOREIGN",
    "iptables -w -t mangle -N TPROXYD_FOREIGN",
    "iptables -w -t mangle -A PREROUTING -j TPROXYD_FOREIGN",
    "ip6tables -w -t mangle -A PREROUTING -i rs -p tcp --dport 9 -j MARK --set-mark 0x100/0x100",
    "ip6tables -w -t mangle -N FOREIGN",
    "ip6tables -w -t mangle -A FOREIGN -p udp -j RETURN",
    "ip6tables -w -t mangle -A OUTPUT -j FOREIGN",
    "ip6tables -w -t mangle -N TPROXYD_FOREIGN",
    "ip6tables -w -t mangle -A PREROUTING -j TPROXYD_FOREIGN",
    "ip -4 rule add fwmark 0x100/0x100 lookup 200 pref 1000",
    "ip -6 rule add fwmark 0x100/0x100 lookup 200 pref 1000",
    "ip -4 rule add fwmark 0x1/0x1 lookup 100 pref 2000",
    "ip -6 rule add fwmark 0x1/0x1 lookup 100 pref 2000",
    "ip -4 route add 198.18.7.0/24 dev rs table 200",
    "ip -6 route add 2001:2:0:7::/64 dev rs table 200",
    "ip -4 route add 198.18.8.0/24 dev rs table 100",
    "ip -6 route add 2001:2:0:8::/64 dev rs table 100",
];

/// Someone else's nft tables (one named like ours in another family),
/// iptables rules and chains (one named like ours), policy rules (one with
/// our very selector) and routes (some in our table) are byte for byte what
/// they were after `up` then `down`, with each backend.
#[test]
fn down_restores_foreign_tables_chains_rules_and_routes_byte_for_byte() {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    lab.nft(
        Role::Router,
        "table inet foreign {
            set blocked { type ipv4_addr; elements = { 198.18.5.5 } }
            chain pre {
                type filter hook prerouting priority mangle; policy accept;
                ip daddr @blocked counter drop
            }
            chain out {
                type route hook output priority mangle; policy accept;
                udp dport 9 meta mark set 0x100
            }
        }
        table ip tproxyd {
            chain keep {
            }
        }",
    );
    for cmd in FOREIGN {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        lab.sh(Role::Router, &argv);
    }

    for backend in BACKENDS {
        let before = snapshot(&lab, true);
        rules_up(&lab, &["--backend", backend, "--local"]);
        let up = snapshot(&lab, true);
        assert!(before != up, "{backend}: up changed nothing");
        rules_down(&lab);
        assert_same(
            &before,
            &snapshot(&lab, true),
            &format!("{backend}: down after up"),
        );
    }
}

// ---------------------------------------------------------------- (c) traffic

/// A lab whose router forwards everything, with `backend`'s rules
/// intercepting what comes in on the client's interface (rc) only.
fn lab_intercepting_rc(backend: &str) -> Lab {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    rules_up(
        &lab,
        &[
            "--backend",
            backend,
            "--in-iface",
            "rc",
            "--port",
            &PROXY_PORT.to_string(),
        ],
    );
    lab
}

/// A client's TCP connections (both families) reach the server through the
/// proxy: the server sees the router's address, not the client's (direct
/// forwarding would show the client's), and tproxyd logs each one. UDP too.
///
/// With `spoof` (`tproxyd --spoof-source`) the server sees the client's
/// own address instead, over TCP and UDP; its answers to that address come in on the server's
/// interface, which --in-iface does not list, and the rules' socket fast
/// path (on every interface) must deliver them to the proxy rather than let
/// the router forward them to the client.
fn client_traffic_passes_the_proxy(backend: &str, spoof: bool) {
    let lab = lab_intercepting_rc(backend);
    let mut args = vec!["--mark", PROXY_MARK, "--metrics", METRICS];
    if spoof {
        args.push("--spoof-source");
    }
    let proxy = Proxy::start(&lab, &args);
    let server = PeerServer::start(lab.listen_server(TCP_PORT));
    let udp = start_udp_peer_server(&lab);
    for v6 in [false, true] {
        let dst = server_addr(v6, TCP_PORT);
        let conn = lab
            .connect(dst)
            .unwrap_or_else(|e| panic!("{backend} {}: connect: {e}", family(v6)));
        let (local, seen) = ask_peer(conn);
        let (want, who) = if spoof {
            (local.ip(), "the client's own address")
        } else {
            (upstream_ip(v6), "the proxy, not the client")
        };
        assert_eq!(
            seen,
            want.to_string(),
            "{backend} {}: the server should see {who}",
            family(v6)
        );
        assert!(
            proxy.wait_log(&log_line(local, dst), LOG_WAIT),
            "{backend} {}: no log line for {local}; log:\n{}",
            family(v6),
            proxy.log()
        );
        // UDP: from the proxy's own address, or with --spoof-source from
        // the client's own address and port (the rules' UDP fast path
        // delivers the answer to the proxy's marked socket, and the client
        // gets it from the server's address, as without a proxy).
        let (local, seen) = udp_ask_peer(&lab, v6);
        let seen: SocketAddr = seen
            .parse()
            .unwrap_or_else(|e| panic!("{backend} {}: UDP answer {seen:?}: {e}", family(v6)));
        if spoof {
            let local = SocketAddr::new(local.ip().to_canonical(), local.port());
            let client = SocketAddr::new(
                if v6 {
                    CLIENT_V6.into()
                } else {
                    CLIENT_V4.into()
                },
                local.port(),
            );
            assert_eq!(
                seen,
                client,
                "{backend} {}: over UDP the server should see the client's own address and port",
                family(v6)
            );
        } else {
            assert_eq!(
                seen.ip(),
                upstream_ip(v6),
                "{backend} {}: UDP went around the proxy",
                family(v6)
            );
        }
    }
    assert_eq!(server.accepted(), 2);
    udp.join().expect("UDP server panicked");
    // Both UDP answers came through the proxy, not around it (the router
    // also forwards, so an answer to the client's own address could).
    let text = scrape_metrics(&lab, METRICS.parse().expect("address"));
    assert_eq!(
        metric_value(
            &text,
            "tproxyd_udp_datagrams_total{direction=\"upstream_to_client\"}"
        ),
        2,
        "{backend}: the UDP answers did not pass the proxy"
    );
}

#[test]
fn nft_backend_sends_client_tcp_and_udp_through_the_proxy() {
    client_traffic_passes_the_proxy("nft", false);
}

#[test]
fn iptables_backend_sends_client_tcp_and_udp_through_the_proxy() {
    client_traffic_passes_the_proxy("iptables", false);
}

#[test]
fn nft_backend_with_spoof_source_the_server_sees_the_client() {
    client_traffic_passes_the_proxy("nft", true);
}

#[test]
fn iptables_backend_with_spoof_source_the_server_sees_the_client() {
    client_traffic_passes_the_proxy("iptables", true);
}

// ---------------------------------------------------------------- (d) --local

/// With --local, the router's own connections to the server go through the
/// proxy (tproxyd logs them with the router's own client port) exactly once:
/// the proxy's upstream connection, marked with --mark, is not diverted back
/// to it. The router's own services still answer clients: their replies are
/// not diverted either. Both backends.
#[test]
fn local_proxies_the_routers_own_connections_without_a_loop() {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    let proxy = Proxy::start(&lab, &["--mark", PROXY_MARK]);
    let server = PeerServer::start(lab.listen_server(TCP_PORT));
    let service = PeerServer::start(lab.run_in(Role::Router, || {
        listen(SocketAddr::new(IpAddr::V4(ROUTER_V4), ROUTER_SERVICE_PORT))
    }));
    let mut made = 0;
    for backend in BACKENDS {
        rules_up(&lab, &["--backend", backend, "--in-iface", "rc", "--local"]);
        for v6 in [false, true] {
            let dst = server_addr(v6, TCP_PORT);
            let (local, seen) = lab.run_in(Role::Router, move || {
                ask_peer(connect(dst).unwrap_or_else(|e| panic!("router: connect {dst}: {e}")))
            });
            made += 1;
            assert_eq!(seen, upstream_ip(v6).to_string());
            assert!(
                proxy.wait_log(&log_line(local, dst), LOG_WAIT),
                "{backend} {}: the router's own connection from {local} was not proxied; log:\n{}",
                family(v6),
                proxy.log()
            );
            assert_eq!(
                server.accepted(),
                made,
                "{backend} {}: the server got more connections than were made",
                family(v6)
            );
            let proxied = proxy
                .log()
                .lines()
                .filter(|l| {
                    l.contains(&format!(" -> {}: ", server_addr(false, TCP_PORT)))
                        || l.contains(&format!(" -> {}: ", server_addr(true, TCP_PORT)))
                })
                .count();
            assert_eq!(proxied, made, "{backend}: a loop: {}", proxy.log());
        }
        let (_, seen) = ask_peer(
            lab.connect(SocketAddr::new(IpAddr::V4(ROUTER_V4), ROUTER_SERVICE_PORT))
                .expect("client: connect to the router's own service"),
        );
        assert_eq!(
            seen,
            common::CLIENT_V4.to_string(),
            "{backend}: the router's service"
        );
        rules_down(&lab);
    }
    drop(service);
}

// ---------------------------------------------------------------- NOTRACK

/// With tune/notrack given the same options as scripts/rules, proxied
/// connections still work, conntrack holds nothing of the client side
/// (client -> original destination), and the proxy's upstream connection is
/// still tracked (it comes from the router's own address). Both backends.
#[test]
fn notrack_leaves_only_the_proxied_client_side_untracked() {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    let proxy = Proxy::start(&lab, &["--mark", PROXY_MARK]);
    let server = PeerServer::start(lab.listen_server(TCP_PORT));
    for backend in BACKENDS {
        // --local makes conntrack run in the router (its output chain asks
        // `ct direction`), so "tracked" can be seen at all.
        let opts = ["--backend", backend, "--in-iface", "rc", "--local"];
        rules_up(&lab, &opts);
        let mut nt = vec!["up"];
        nt.extend_from_slice(&opts);
        run_ok(&lab, NOTRACK, &nt);
        assert_eq!(
            lab.exec(Role::Router, &[NOTRACK, "status"]).status.code(),
            Some(0)
        );

        let dst = server_addr(false, TCP_PORT);
        let (local, seen) = ask_peer(lab.connect(dst).expect("connect through the proxy"));
        assert_eq!(
            seen,
            ROUTER_UPSTREAM_V4.to_string(),
            "{backend}: not proxied"
        );
        assert!(
            proxy.wait_log(&log_line(local, dst), LOG_WAIT),
            "{backend}: no log line"
        );
        let table = router_stdout(&lab, &["cat", "/proc/net/nf_conntrack"]);
        let client_side = format!("sport={} dport={TCP_PORT}", local.port());
        assert!(
            !table
                .lines()
                .any(|l| l.contains(&client_side) && l.contains("src=198.18.0.2")),
            "{backend}: the client side is tracked:\n{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.contains("src=198.19.0.1 dst=198.19.0.2") && l.contains("dport=80 ")),
            "{backend}: the upstream side is not tracked:\n{table}"
        );
        run_ok(&lab, NOTRACK, &["down"]);
        assert_eq!(
            lab.exec(Role::Router, &[NOTRACK, "status"]).status.code(),
            Some(3)
        );
        rules_down(&lab);
    }
    drop(server);
}

/// tune/notrack.nft and tune/notrack.iptables are what the generator prints
/// with the default options (after their own header).
#[test]
fn shipped_notrack_files_are_what_the_generator_prints() {
    require_root();
    for (file, extra) in [
        (NOTRACK_NFT, &[][..]),
        (NOTRACK_IPTABLES, &["--backend", "iptables"]),
    ] {
        // A throwaway namespace: a dry run changes nothing, but even so.
        let out = Command::new("unshare")
            .args(["-n", NOTRACK, "up", "--dry-run"])
            .args(extra)
            .output()
            .expect("run unshare");
        assert!(out.status.success(), "{file}: {}", describe(&out));
        let printed = String::from_utf8(out.stdout).expect("utf-8");
        let shipped = std::fs::read_to_string(file).expect("read the shipped file");
        assert!(
            shipped.ends_with(&printed),
            "{file} is stale: regenerate it with tune/notrack up --dry-run {extra:?}"
        );
    }
}

// ---------------------------------------------------------------- (e) tune

/// tune/apply then tune/revert in the router namespace: every setting of the
/// profile is back where it was, the NOTRACK table is gone, the state file
/// is gone, and the host's own values never moved (global ones are skipped
/// in a namespace).
#[test]
fn tune_apply_then_revert_restores_every_per_namespace_sysctl_and_interface_setting() {
    let lab = Lab::up(Mode::Direct, PROXY_PORT);
    let keys = profile_keys();
    assert!(keys.len() > 10, "the profile has only {keys:?}");
    let host_before = read_sysctls(&keys);
    let ns_before = {
        let keys = keys.clone();
        lab.run_in(Role::Router, move || read_sysctls(&keys))
    };
    let nft_before = router_stdout(&lab, &["nft", "-s", "list", "ruleset"]);
    // The intercepted interface's offloads and coalescing (TUNE-5), and
    // one it must leave alone.
    let offloads = |iface: &str| {
        let k = router_stdout(&lab, &["ethtool", "-k", iface]);
        let on = |f: &str| k.lines().any(|l| l.starts_with(f) && l.contains(": on"));
        let flush = router_stdout(
            &lab,
            &["cat", &format!("/sys/class/net/{iface}/gro_flush_timeout")],
        );
        (
            on("generic-receive-offload:"),
            on("rx-udp-gro-forwarding:"),
            flush.trim().to_string(),
        )
    };
    let (rc_before, rs_before) = (offloads("rc"), offloads("rs"));
    assert_eq!(
        rc_before,
        (false, false, "0".to_string()),
        "veth's defaults"
    );
    let state = std::env::temp_dir().join(format!("{}.tune.state", lab.name()));
    let state = state.to_str().expect("utf-8 path").to_owned();

    let applied = run_ok(
        &lab,
        TUNE_APPLY,
        &["--state", &state, "--in-iface", "rc", "--coalesce-us", "50"],
    );
    assert!(
        applied.contains("skip fs.file-max: global"),
        "apply did not skip a global setting:\n{applied}"
    );
    let ns_during = {
        let keys = keys.clone();
        lab.run_in(Role::Router, move || read_sysctls(&keys))
    };
    assert_eq!(ns_during["net.core.somaxconn"].as_deref(), Some("65535"));
    assert_eq!(
        ns_during["net.ipv4.ip_local_port_range"].as_deref(),
        Some("1024 65535")
    );
    assert!(std::path::Path::new(&state).exists(), "no state file");
    assert_eq!(
        offloads("rc"),
        (true, true, "50000".to_string()),
        "{applied}"
    );
    assert_eq!(
        offloads("rs"),
        rs_before,
        "an interface not intercepted changed"
    );
    assert_eq!(
        lab.exec(Role::Router, &[NOTRACK, "status"]).status.code(),
        Some(0)
    );
    // Twice is once: the original values stay the ones recorded.
    run_ok(&lab, TUNE_APPLY, &["--state", &state, "--in-iface", "rc"]);

    run_ok(&lab, TUNE_REVERT, &["--state", &state]);
    assert_eq!(offloads("rc"), rc_before, "rc's offloads not restored");
    let ns_after = {
        let keys = keys.clone();
        lab.run_in(Role::Router, move || read_sysctls(&keys))
    };
    for k in &keys {
        assert_eq!(ns_before[k], ns_after[k], "{k} not restored");
    }
    assert_same(
        &nft_before,
        &router_stdout(&lab, &["nft", "-s", "list", "ruleset"]),
        "revert left nft rules behind",
    );
    assert!(!std::path::Path::new(&state).exists(), "state file left");
    assert_eq!(host_before, read_sysctls(&keys), "the host's values moved");
}
