//! The tproxyd process under test: started in a lab's router namespace (or
//! either router's, in a two-router lab),
//! waited for until it listens, signalled, its log read, killed on drop;
//! and its metrics endpoint, scraped from inside the router namespace.
//!
//! Keeps LAB-1 (declare the `Proxy` after its `Lab`: it is killed first)
//! and LAB-5 (the binary is handed out only once the packages are known to
//! be there); see mod.rs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::lab::{Lab, Role, require_packages};
use super::probes::metric_value;
use super::process::{Daemon, wait_until};
use super::streams::set_timeouts;

/// How long tproxyd may take to start listening.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// The tproxyd binary cargo built for these tests (once the tests' packages
/// are known to be there: LAB-5).
pub fn tproxyd_bin() -> &'static str {
    require_packages();
    env!("CARGO_BIN_EXE_tproxyd")
}

/// A tproxyd process in a lab's router namespace, killed on drop (it is a
/// `Daemon`: its log is shown if the test is failing).
pub struct Proxy {
    daemon: Daemon,
}

impl Proxy {
    /// Start tproxyd on the lab's port with `extra` arguments and wait until
    /// it listens (and serves metrics, if `extra` asks for them).
    pub fn start(lab: &Lab, extra: &[&str]) -> Proxy {
        Proxy::start_wrapped(lab, &[], extra)
    }

    /// Like `start`, in the namespace of `router` (`Role::Router2` in a
    /// two-router lab).
    pub fn start_on(lab: &Lab, router: Role, extra: &[&str]) -> Proxy {
        Proxy::launch(lab, router, &[], extra)
    }

    /// Like `start`, with `wrapper` (e.g. `setpriv ...`) between
    /// `ip netns exec NS` and the binary; the wrapper must exec it, so the
    /// child's pid is still tproxyd's.
    pub fn start_wrapped(lab: &Lab, wrapper: &[&str], extra: &[&str]) -> Proxy {
        Proxy::launch(lab, Role::Router, wrapper, extra)
    }

    fn launch(lab: &Lab, router: Role, wrapper: &[&str], extra: &[&str]) -> Proxy {
        // `ip netns exec` execs the binary: the child's pid is tproxyd's, so
        // signals reach it directly.
        // Debug logging names every connection's end and cause: what a
        // failing test needs to show. A test may still choose its own level.
        let level: &[&str] = if extra.contains(&"--log-level") {
            &[]
        } else {
            &["--log-level", "debug"]
        };
        let port = lab.port.to_string();
        let mut args = wrapper.to_vec();
        args.extend_from_slice(&[tproxyd_bin(), "--port", &port]);
        args.extend_from_slice(level);
        args.extend_from_slice(extra);
        let mut proxy = Proxy {
            daemon: Daemon::start(
                lab,
                router,
                &format!("tproxyd in {}", lab.ns(router)),
                &args,
            ),
        };
        // Its TCP listeners come up before its metrics endpoint: a test that
        // scrapes at once must not find the endpoint refusing.
        let metrics_port = extra
            .iter()
            .position(|a| *a == "--metrics")
            .and_then(|i| extra.get(i + 1)?.parse::<SocketAddr>().ok())
            .map(|addr| addr.port());
        let up = wait_until(LISTEN_WAIT, || {
            proxy.daemon.exited().is_none()
                && lab.is_listening(router, lab.port)
                && metrics_port.is_none_or(|port| lab.is_listening(router, port))
        });
        if !up {
            let why = match proxy.daemon.exited() {
                Some(st) => format!("exited with {st}"),
                None => format!("not listening after {LISTEN_WAIT:?}"),
            };
            panic!(
                "tproxyd {extra:?} in {} {why}; its log:\n{}",
                lab.ns(router),
                proxy.log()
            );
        }
        proxy
    }

    pub fn pid(&self) -> Pid {
        self.daemon.pid()
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill {sig}: {e}"));
    }

    /// Send a signal by number: real-time ones too, which nix's `Signal`
    /// lacks.
    pub fn signal_number(&self, signo: libc::c_int) {
        // SAFETY: kill(2) takes no pointers; the worst a wrong pid could do
        // is signal another process, and this one is our child.
        if unsafe { libc::kill(self.pid().as_raw(), signo) } != 0 {
            panic!("kill {signo}: {}", io::Error::last_os_error());
        }
    }

    /// Wait up to `timeout` for tproxyd to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.daemon.wait(timeout)
    }

    /// Wait up to `timeout` until the log holds `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Everything tproxyd wrote to stderr so far.
    pub fn log(&self) -> String {
        self.daemon.stderr()
    }
}

/// One HTTP/1.1 GET of `path` from tproxyd's `--metrics` address, from
/// inside the router namespace (where it listens), bounded (LAB-3): the
/// whole response, status line and all, or why there was none. The one
/// scrape; `scrape_metrics` and `Metrics` are built on it.
pub fn http_get(lab: &Lab, addr: SocketAddr, path: &'static str) -> io::Result<String> {
    lab.run_in(Role::Router, move || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        set_timeouts(&s, Duration::from_secs(10));
        write!(s, "GET {path} HTTP/1.1\r\nHost: tproxyd\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// GET /metrics from tproxyd's `--metrics` address, from inside the router
/// namespace (where it listens). Returns the exposition text (the body).
pub fn scrape_metrics(lab: &Lab, addr: SocketAddr) -> String {
    let resp = http_get(lab, addr, "/metrics")
        .unwrap_or_else(|e| panic!("scrape http://{addr}/metrics: {e}"));
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_string(),
        _ => panic!("scrape http://{addr}/metrics: unexpected response:\n{resp}"),
    }
}

// ------------------------------------------------- metrics the tests read

/// Where tproxyd serves metrics, inside the router namespace.
pub const METRICS: &str = "127.0.0.1:9120";

// Samples more than one test file reads, named exactly as the exposition
// writes them (README's metrics table), labels and all.
pub const ACTIVE: &str = "tproxyd_tcp_connections_active";
pub const ACCEPTED: &str = "tproxyd_tcp_connections_accepted_total";
pub const PIPES_IN_USE: &str = "tproxyd_tcp_pipes{state=\"in_use\"}";
pub const PIPES_POOLED: &str = "tproxyd_tcp_pipes{state=\"pooled\"}";
pub const PIPES_BULK: &str = "tproxyd_tcp_pipes{state=\"bulk_in_use\"}";
pub const LOOP_REFUSALS: &str = "tproxyd_tcp_loop_refusals_total{reason=\"to_proxy\"}";
pub const PAUSES_FD: &str = "tproxyd_tcp_accept_pauses_total{reason=\"fd_limit\"}";
pub const PAUSES_MAX_CONNS: &str = "tproxyd_tcp_accept_pauses_total{reason=\"max_conns\"}";
pub const FALLBACKS: &str = "tproxyd_tcp_splice_fallbacks_total";
pub const UDP_ACTIVE: &str = "tproxyd_udp_sessions_active";
pub const UDP_CREATED: &str = "tproxyd_udp_sessions_created_total";
pub const WAITING: &str = "tproxyd_tcp_connections_waiting";
pub const ACCEPT_QUEUE: &str = "tproxyd_tcp_accept_queue";
pub const ACCEPTED_AFTER_WAITING: &str = "tproxyd_tcp_connections_accepted_after_waiting_total";
pub const UDP_EVICTED: &str = "tproxyd_udp_sessions_ended_total{reason=\"evicted\"}";
pub const UDP_LOOP_DROPS: &str = "tproxyd_udp_drops_total{reason=\"loop\"}";

/// The sample counting connections closed with `end` (completed,
/// idle_timeout, upstream_reset, ...).
pub fn closed(end: &str) -> String {
    format!("tproxyd_tcp_connections_closed_total{{end=\"{end}\"}}")
}

/// One scrape of tproxyd's metrics.
pub struct Metrics(String);

impl Metrics {
    pub fn of(lab: &Lab) -> Metrics {
        Metrics(scrape_metrics(
            lab,
            METRICS.parse().expect("metrics address"),
        ))
    }
    pub fn get(&self, name: &str) -> u64 {
        metric_value(&self.0, name)
    }
}

/// Poll the metrics until `cond` holds; the last scrape either way.
pub fn wait_metrics(
    lab: &Lab,
    timeout: Duration,
    cond: impl Fn(&Metrics) -> bool,
) -> (bool, Metrics) {
    let deadline = Instant::now() + timeout;
    loop {
        let m = Metrics::of(lab);
        if cond(&m) {
            return (true, m);
        }
        if Instant::now() >= deadline {
            return (false, m);
        }
        thread::sleep(Duration::from_millis(100));
    }
}
