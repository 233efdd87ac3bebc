//! What someone running tproxyd at the edge relies on: the metrics endpoint
//! and SIGUSR1 report what happened, tproxyd works as an ordinary user with
//! only CAP_NET_ADMIN (and without it exits 1, saying so in one line), and a
//! second tproxyd can take over the port while the first drains, with no
//! connection refused or cut.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::udp::{UdpEcho, udp_round_trip};
use common::{
    EchoServer, Lab, METRICS, Proxy, Role, accept, http_get, metric_value, recv_pattern,
    run_bounded, send_pattern, server_addr, tcp_echo_round_trip, tproxyd_bin, wait_until,
};
use nix::sys::signal::Signal;

/// One HTTP/1.1 GET of the metrics endpoint: the whole response.
fn scrape(lab: &Lab, path: &'static str) -> String {
    let addr = METRICS.parse().expect("metrics address");
    http_get(lab, addr, path).unwrap_or_else(|e| panic!("GET http://{METRICS}{path}: {e}"))
}

#[test]
fn metrics_endpoint_and_sigusr1_report_what_happened() {
    let lab = Lab::tproxy();
    let proxy = Proxy::start(&lab, &["--metrics", METRICS]);
    let _echo = EchoServer::start(lab.listen_server(80));
    let _udp = UdpEcho::start(&lab, 5353);
    for _ in 0..3 {
        tcp_echo_round_trip(&lab, b"hello");
    }
    // Refused: nothing listens on port 82.
    let _ = lab
        .connect(server_addr(false, 82))
        .and_then(|mut s| s.read(&mut [0u8; 1]));
    assert_eq!(
        udp_round_trip(&lab, server_addr(false, 5353), b"ping"),
        b"ping"
    );

    let closed_and_counted = wait_until(Duration::from_secs(5), || {
        let text = scrape(&lab, "/metrics");
        metric_value(
            &text,
            "tproxyd_tcp_connections_closed_total{end=\"completed\"}",
        ) >= 3
    });
    let resp = scrape(&lab, "/metrics");
    assert!(
        closed_and_counted,
        "connections not counted as completed:\n{resp}"
    );
    let (head, text) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        metric_value(text, "tproxyd_tcp_connections_accepted_total"),
        4
    );
    assert_eq!(
        metric_value(text, "tproxyd_tcp_connect_errors_total{kind=\"refused\"}"),
        1
    );
    assert_eq!(metric_value(text, "tproxyd_tcp_connections_active"), 0);
    assert_eq!(
        metric_value(
            text,
            "tproxyd_tcp_bytes_total{direction=\"client_to_upstream\"}"
        ),
        15
    );
    assert_eq!(
        metric_value(
            text,
            "tproxyd_tcp_bytes_total{direction=\"upstream_to_client\"}"
        ),
        15
    );
    assert!(
        metric_value(
            text,
            "tproxyd_udp_datagrams_total{direction=\"client_to_upstream\"}"
        ) >= 1
    );
    assert!(
        metric_value(
            text,
            "tproxyd_udp_datagrams_total{direction=\"upstream_to_client\"}"
        ) >= 1
    );
    assert_eq!(metric_value(text, "tproxyd_udp_sessions_active"), 1);
    assert_eq!(
        metric_value(text, "tproxyd_build_info{version=\"0.1.0\"}"),
        1
    );
    // Every sample is declared (HELP and TYPE) before it appears.
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(typed.contains(name), "sample before its TYPE: {line}");
        }
    }
    assert!(scrape(&lab, "/nothing").starts_with("HTTP/1.1 404"));

    proxy.signal(Signal::SIGUSR1);
    assert!(
        proxy.wait_log(
            "tproxyd_tcp_connections_accepted_total 4",
            Duration::from_secs(5)
        ),
        "SIGUSR1 did not log the counters:\n{}",
        proxy.log()
    );
}

/// CapEff from /proc/PID/status.
fn effective_caps(pid: i32) -> (u32, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let uid = field("Uid:").parse().unwrap();
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    (uid, caps)
}

#[test]
fn runs_as_an_ordinary_user_holding_only_cap_net_admin() {
    const CAP_NET_ADMIN: u64 = 1 << 12;
    let lab = Lab::tproxy();
    let proxy = Proxy::start_wrapped(
        &lab,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
        ],
        &[],
    );
    let (uid, caps) = effective_caps(proxy.pid().as_raw());
    assert_eq!(uid, 65534, "tproxyd runs as nobody");
    assert_eq!(
        caps, CAP_NET_ADMIN,
        "tproxyd holds CAP_NET_ADMIN and nothing else"
    );

    let _echo = EchoServer::start(lab.listen_server(80));
    tcp_echo_round_trip(&lab, b"unprivileged tcp");
    let _udp = UdpEcho::start(&lab, 5353);
    assert_eq!(
        udp_round_trip(&lab, server_addr(false, 5353), b"unprivileged udp"),
        b"unprivileged udp"
    );
}

/// A missing capability is found before anything else happens; this is
/// plenty.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Run `cmd` to completion, killing it if it outlives `EXIT_WAIT` (a tproxyd
/// that wrongly accepted its flags would run forever).
fn run_exiting(mut cmd: Command) -> Output {
    let ran = run_bounded(&mut cmd, EXIT_WAIT);
    assert!(
        !ran.killed,
        "{cmd:?} still ran after {EXIT_WAIT:?}; stderr: {}",
        String::from_utf8_lossy(&ran.out.stderr)
    );
    ran.out
}

/// Without CAP_NET_ADMIN tproxyd cannot make transparent sockets; it says so
/// and exits 1 instead of running without them.
#[test]
fn missing_capability_exits_1_with_one_line() {
    let lab = Lab::tproxy();
    // An unprivileged user must be able to reach the binary: copy it to a
    // fresh directory anyone can read.
    let dir = std::env::temp_dir().join(format!("{}-bin", lab.name()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bin = dir.join("tproxyd");
    std::fs::copy(tproxyd_bin(), &bin).expect("copy tproxyd");
    for p in [&dir, &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(Role::Router)])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"])
        .arg(&bin)
        .args(["--port", "8080"]);
    let out = run_exiting(cmd);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        out.status.code() == Some(1) && lines.len() == 1,
        "want exit 1 and one line; got {}, stderr {lines:?}",
        out.status
    );
    assert!(
        lines[0].contains("CAP_NET_ADMIN"),
        "the message should name the capability: {}",
        lines[0]
    );
}

/// Zero-downtime restart: a second tproxyd shares the port (SO_REUSEPORT),
/// the first is told to stop, drains, and exits 0; a loop of connections
/// running all along sees none refused and none cut, and a long transfer
/// through the first finishes byte-exact.
#[test]
fn second_instance_takes_over_while_the_first_drains_with_nothing_lost() {
    let lab = Lab::tproxy();
    // Connections still in the old listener's accept queue when it closes
    // move to the new one (Linux 5.14+) instead of being reset.
    lab.sh(
        Role::Router,
        &["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"],
    );
    let mut first = Proxy::start(&lab, &["--drain-timeout", "20s"]);
    let _echo = EchoServer::start(lab.listen_server(80));

    // A long transfer through the first instance: 16 MiB the server sends
    // slowly enough that it is still running across the handover.
    let bulk_listener = lab.listen_server(81);
    let bulk_server = thread::spawn(move || {
        let (mut s, _) = accept(&bulk_listener);
        for i in 0..16u64 {
            send_pattern(&mut s, 100 + i, 1 << 20).expect("bulk send");
            thread::sleep(Duration::from_millis(100));
        }
    });
    let bulk_client = lab.spawn_client(|| {
        let mut c = common::connect(server_addr(false, 81)).expect("bulk connect");
        for i in 0..16u64 {
            recv_pattern(&mut c, 100 + i, 1 << 20).expect("bulk bytes");
        }
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("bulk EOF");
        assert!(rest.is_empty());
    });

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let loops: Vec<_> = (0..4u64)
        .map(|t| {
            let (stop, ok) = (stop.clone(), ok.clone());
            lab.spawn_client(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let seed = t << 32 | n;
                    let mut c = common::connect(server_addr(n % 2 == 1, 80))
                        .unwrap_or_else(|e| panic!("connection {t}/{n} refused: {e}"));
                    send_pattern(&mut c, seed, 4096)
                        .unwrap_or_else(|e| panic!("{t}/{n} send: {e}"));
                    recv_pattern(&mut c, seed, 4096).unwrap_or_else(|e| panic!("{t}/{n} cut: {e}"));
                    ok.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(300));
    let second = Proxy::start(&lab, &["--metrics", common::METRICS]);
    assert!(second.wait_log("listening on", Duration::from_secs(5)));
    thread::sleep(Duration::from_millis(300));
    let before = ok.load(Ordering::Relaxed);
    first.signal(Signal::SIGTERM);
    let t0 = Instant::now();
    let status = first.wait_exit(Duration::from_secs(25));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "first instance: {status:?}"
    );
    let drained_in = t0.elapsed();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().expect("a connection loop failed");
    }
    bulk_client.join().expect("the long transfer failed");
    bulk_server.join().expect("bulk server");
    let total = ok.load(Ordering::Relaxed);
    assert!(total > before, "no connection completed after the handover");
    let served_by_second =
        common::Metrics::of(&lab).get("tproxyd_tcp_connections_closed_total{end=\"completed\"}");
    assert!(served_by_second > 0, "the second instance served nothing");
    assert!(
        drained_in > Duration::from_millis(200),
        "the first instance exited before its transfer could finish ({drained_in:?})"
    );
    eprintln!(
        "{total} connections, {} after SIGTERM; second instance completed {served_by_second}; first drained in {drained_in:?}",
        total - before
    );
}
