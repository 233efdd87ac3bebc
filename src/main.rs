//! tproxyd: a transparent TCP proxy for Linux TPROXY, thread-per-core and
//! zero-copy.
//!
//! This file turns the command line into a [`config::Config`], checks what
//! only the running host can tell (capabilities, limits, address families),
//! starts one pinned worker per core with its own listeners, and turns
//! SIGINT/SIGTERM into a drain.
//!
//! What must stay true:
//! - MAIN-1: every failure that has an exit status happens before the first
//!   worker starts: 2 for a usage error, 1 for anything the host refused
//!   (missing capability, address in use). Each is one line on stderr.
//! - MAIN-2: signals are blocked in every thread and taken synchronously by
//!   the control loop through a signalfd, so no code runs in a signal handler.

mod config;
mod control;
mod doctor;
mod metrics;
mod own_sockets;
mod stats;
mod sys;
mod tcp;
mod timers;
mod token;
mod udp;
mod worker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use log::{info, warn};
use mio::{Poll, Waker};

use crate::config::{Command, Config};
use crate::stats::{EndKind, WorkerStats};
use crate::sys::{ListenError, Signal};
use crate::worker::{Setup, Worker};

/// Descriptors kept back from `--max-conns` for listeners, pollers, wakers,
/// pooled pipes and logging.
const RESERVED_FDS: u64 = 256;
/// Descriptors one connection holds while it moves bytes: two sockets and,
/// on average, one pipe of two fds (a connection moving both ways at once
/// holds two pipes; an idle one none).
const FDS_PER_CONN: u64 = 4;

fn main() -> ExitCode {
    let cfg = match config::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Doctor(c)) => {
            return if doctor::run_doctor(&c) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        Ok(Command::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("tproxyd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tproxyd: {e} (see --help)");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new()
        .filter_level(cfg.log_level)
        .format_timestamp_millis()
        .init();
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("tproxyd: {msg}");
            ExitCode::from(1)
        }
    }
}

/// The default `--max-conns` for a descriptor limit.
fn default_max_conns(nofile: u64) -> usize {
    (nofile.saturating_sub(RESERVED_FDS) / FDS_PER_CONN).max(1) as usize
}

/// Descriptors set aside for the UDP worker under a limit of `nofile`: one
/// per session, but never more than a quarter of what the limit leaves, so a
/// small limit still leaves TCP most of it.
fn udp_share(cfg: &Config, nofile: u64) -> u64 {
    if cfg.udp {
        (cfg.udp_max_sessions as u64).min(nofile.saturating_sub(RESERVED_FDS) / 4)
    } else {
        0
    }
}

/// `--max-conns`, or its default under a descriptor limit of `nofile` once
/// the UDP worker's share is set aside.
pub fn max_conns_for(cfg: &Config, nofile: u64) -> usize {
    cfg.max_conns
        .unwrap_or_else(|| default_max_conns(nofile.saturating_sub(udp_share(cfg, nofile))))
}

/// Descriptors a configuration may hold at its limits.
pub fn fds_needed(cfg: &Config, max_conns: usize) -> u64 {
    let tcp = if cfg.tcp {
        max_conns as u64 * FDS_PER_CONN
    } else {
        0
    };
    let udp = if cfg.udp {
        cfg.udp_max_sessions as u64
    } else {
        0
    };
    tcp + udp + RESERVED_FDS
}

/// The bulk pipe size when `--bulk-pipe-size` is not given (pipe.rs PIPE-4),
/// and why. 1 MiB where big pipes cost nothing in the per-user pipe
/// accounting: tproxyd is exempt from fs.pipe-user-pages-soft
/// (CAP_SYS_RESOURCE or CAP_SYS_ADMIN), or that limit is off (0) and
/// fs.pipe-max-size allows 1 MiB. Otherwise no bulk pipes (the ordinary
/// size): an unprivileged tproxyd would spend the user's pipe pages (64 MiB
/// by default) on a few dozen bulk pipes, and every pipe after that would
/// get two pages.
pub fn default_bulk_pipe_size(
    pipe_size: usize,
    exempt: bool,
    soft_pages: Option<u64>,
    pipe_max: Option<usize>,
) -> (usize, &'static str) {
    let bulk = config::DEFAULT_BULK_PIPE_SIZE;
    if pipe_size >= bulk {
        (pipe_size, "--pipe-size is already that large")
    } else if exempt {
        (bulk, "exempt from fs.pipe-user-pages-soft")
    } else if soft_pages == Some(0) && pipe_max.is_some_and(|m| m >= bulk) {
        (bulk, "fs.pipe-user-pages-soft is 0")
    } else {
        (
            pipe_size,
            "off: fs.pipe-user-pages-soft applies to this process (tune/sysctl.conf sets it to 0)",
        )
    }
}

/// Resolve `--bulk-pipe-size` for this process, as `run` and `doctor` see it.
pub fn bulk_pipe_size(cfg: &Config) -> (usize, &'static str) {
    if let Some(b) = cfg.bulk_pipe_size {
        return (b, "--bulk-pipe-size");
    }
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
    default_bulk_pipe_size(
        cfg.pipe_size,
        doctor::process_exempt_from_pipe_limit(),
        num("/proc/sys/fs/pipe-user-pages-soft"),
        num("/proc/sys/fs/pipe-max-size").map(|n| n as usize),
    )
}

fn listen_error(addr: SocketAddr, e: ListenError) -> String {
    match e {
        ListenError::NoCapability => "IP_TRANSPARENT was refused: tproxyd needs CAP_NET_ADMIN \
             (run it as root, or grant the capability, e.g. AmbientCapabilities=CAP_NET_ADMIN)"
            .to_string(),
        ListenError::NoFamily(e) => format!("cannot listen on {addr}: {e}"),
        ListenError::Other(what, e) => match e.raw_os_error() {
            Some(libc::EADDRINUSE) => format!(
                "cannot listen on {addr}: address in use by a socket that is not a transparent SO_REUSEPORT listener of this user"
            ),
            _ => format!("cannot listen on {addr}: {what}: {e}"),
        },
    }
}

/// Make one worker's listeners with `make` (TCP or UDP). IPv6 missing on the host is skipped when the
/// listen addresses were defaulted, fatal when the user asked for it.
fn make_listeners<L>(
    cfg: &Config,
    warned_v6: &mut bool,
    make: fn(SocketAddr) -> Result<L, ListenError>,
) -> Result<Vec<L>, String> {
    let mut out = Vec::with_capacity(cfg.listen.len());
    for ip in &cfg.listen {
        let addr = SocketAddr::new(*ip, cfg.port);
        match make(addr) {
            Ok(l) => out.push(l),
            Err(ListenError::NoFamily(e)) if cfg.listen_defaulted && ip.is_ipv6() => {
                if !*warned_v6 {
                    warn!("IPv6 is not available here ({e}); listening on IPv4 only");
                    *warned_v6 = true;
                }
            }
            Err(e) => return Err(listen_error(addr, e)),
        }
    }
    if out.is_empty() {
        return Err("no address to listen on".into());
    }
    Ok(out)
}

fn run(cfg: Config) -> Result<(), String> {
    if cfg.listen.len() > token::MAX_LISTENERS {
        return Err(format!(
            "at most {} --listen addresses",
            token::MAX_LISTENERS
        ));
    }
    let nofile = match sys::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!("cannot raise RLIMIT_NOFILE: {e}");
            sys::nofile_limit().map_err(|e| format!("getrlimit: {e}"))?
        }
    };
    let max_conns = max_conns_for(&cfg, nofile);
    let needed = fds_needed(&cfg, max_conns);
    if needed > nofile {
        warn!(
            "max-conns {max_conns} and udp-max-sessions {} may need {needed} descriptors, more than \
             RLIMIT_NOFILE {nofile}: when they run out, accepting pauses, new pipes fall back to \
             copying and new UDP flows are dropped",
            if cfg.udp { cfg.udp_max_sessions } else { 0 }
        );
    }
    // MAIN-1: a --source that is not this host's would fail every connect.
    for ip in &cfg.sources {
        match sys::is_local_address(*ip) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "--source {ip}: not an address of this host (a socket cannot bind to it)"
                ));
            }
            Err(e) => return Err(format!("--source {ip}: cannot check it: {e}")),
        }
    }
    let signals = sys::block_signals(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1])
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let mut cfg = cfg;
    let (bulk, bulk_why) = bulk_pipe_size(&cfg);
    cfg.bulk_pipe_size = Some(bulk);
    let cfg = Arc::new(cfg);
    let active = Arc::new(AtomicUsize::new(0));
    // Every upstream socket of the process, for the loop check at accept
    // (worker.rs WRK-6). The UDP worker is to use it too.
    let own = Arc::new(own_sockets::OwnSockets::new());
    let ports = Arc::new(tcp::source::Exhaustion::default());
    let cores = if cfg.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut warned_v6 = false;
    let mut workers = Vec::with_capacity(cfg.workers);
    let mut controls = Vec::with_capacity(cfg.workers);
    let mut all_stats = Vec::with_capacity(cfg.workers);
    let mut listening: Vec<SocketAddr> = Vec::new();
    let tcp_workers = if cfg.tcp { cfg.workers } else { 0 };
    for id in 0..tcp_workers {
        let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
        let waker =
            Waker::new(poll.registry(), token::WAKER).map_err(|e| format!("eventfd: {e}"))?;
        let listeners = make_listeners(&cfg, &mut warned_v6, sys::transparent_listener)?;
        if id == 0 {
            listening = listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect();
        }
        let (tx, rx) = crossbeam_channel::bounded(4);
        let stats = Arc::new(WorkerStats::default());
        let worker = Worker::new(Setup {
            id,
            poll,
            listeners,
            control: rx,
            stats: stats.clone(),
            active: active.clone(),
            max_conns,
            cfg: cfg.clone(),
            own: own.clone(),
            ports: ports.clone(),
        })
        .map_err(|e| format!("worker {id}: {e}"))?;
        workers.push((worker, cores.get(id % cores.len().max(1)).copied()));
        controls.push((tx, waker));
        all_stats.push(stats);
    }

    let udp_stats = Arc::new(stats::UdpStats::default());
    let mut udp_worker = None;
    if cfg.udp {
        let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
        let waker =
            Waker::new(poll.registry(), token::WAKER).map_err(|e| format!("eventfd: {e}"))?;
        let listeners = make_listeners(&cfg, &mut warned_v6, sys::transparent_udp_listener)?;
        if listening.is_empty() {
            listening = listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect();
        }
        let (tx, rx) = crossbeam_channel::bounded(4);
        udp_worker = Some(
            udp::worker::UdpWorker::new(udp::worker::Setup {
                poll,
                listeners,
                control: rx,
                stats: udp_stats.clone(),
                cfg: cfg.clone(),
            })
            .map_err(|e| format!("udp worker: {e}"))?,
        );
        controls.push((tx, waker));
    }

    // Each thread says when it stops, even by panicking, so the control
    // loop knows when to end (CTL-2).
    struct Done(crossbeam_channel::Sender<usize>, Arc<Waker>, usize);
    impl Drop for Done {
        fn drop(&mut self) {
            let _ = self.0.send(self.2);
            let _ = self.1.wake();
        }
    }
    let main_poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let main_waker = Arc::new(
        Waker::new(main_poll.registry(), control::DONE).map_err(|e| format!("eventfd: {e}"))?,
    );
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let metrics = match cfg.metrics {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?,
        ),
        None => None,
    };

    let mut handles = Vec::with_capacity(workers.len() + 1);
    if let Some(w) = udp_worker {
        let done = Done(done_tx.clone(), main_waker.clone(), usize::MAX);
        let h = std::thread::Builder::new()
            .name("tproxyd-udp".into())
            .spawn(move || {
                let _done = done;
                w.run();
            })
            .map_err(|e| format!("cannot start the udp worker: {e}"))?;
        handles.push(h);
    }
    for (id, (worker, core)) in workers.into_iter().enumerate() {
        let done = Done(done_tx.clone(), main_waker.clone(), id);
        let h = std::thread::Builder::new()
            .name(format!("tproxyd-w{id}"))
            .spawn(move || {
                let _done = done;
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    warn!("worker {id}: could not pin to core {}", core.id);
                }
                worker.run();
            })
            .map_err(|e| format!("cannot start worker {id}: {e}"))?;
        handles.push(h);
    }
    info!(
        "tproxyd {} on port {}: {} TCP worker(s){}, {}, listening on {}, max-conns {}, RLIMIT_NOFILE {}, {}",
        env!("CARGO_PKG_VERSION"),
        cfg.port,
        tcp_workers,
        if cores.is_empty() || tcp_workers == 0 {
            ""
        } else {
            " pinned"
        },
        if cfg.udp {
            format!(
                "UDP worker (timeout {:?}, max {} sessions)",
                cfg.udp_timeout, cfg.udp_max_sessions
            )
        } else {
            "no UDP".to_string()
        },
        listening
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        max_conns,
        nofile,
        if cfg.splice {
            format!(
                "splice with {} byte pipes, {bulk} for bulk ({bulk_why})",
                cfg.pipe_size
            )
        } else {
            "copying (--no-splice)".to_string()
        }
    );

    if let Some(addr) = cfg.metrics {
        info!("metrics on http://{addr}/metrics");
    }
    if !cfg.sources.is_empty() && cfg.tcp {
        let list = |v6: bool| {
            let l: Vec<String> = cfg
                .sources
                .iter()
                .filter(|ip| ip.is_ipv6() == v6)
                .map(|ip| ip.to_string())
                .collect();
            match l.len() {
                0 => "the address the host chooses".to_string(),
                1 => l[0].clone(),
                _ => format!("{} in turn", l.join(", ")),
            }
        };
        info!(
            "--source: TCP upstream connections come, for IPv4, from {}; for IPv6, from {}",
            list(false),
            list(true)
        );
    }
    if cfg.spoof_source && cfg.tcp {
        info!(
            "--spoof-source: TCP upstream connections come from each client's own address{}",
            if cfg.udp {
                "; UDP flows still come from this host's"
            } else {
                ""
            }
        );
    }
    // MAIN-2: signals, metrics and the workers' stop notices, until all stopped.
    control::ControlLoop::new(control::Setup {
        poll: main_poll,
        signals,
        metrics,
        workers: controls,
        done: done_rx,
        drain_timeout: cfg.drain_timeout,
        tcp_stats: all_stats.clone(),
        udp_stats: cfg.udp.then(|| udp_stats.clone()),
    })
    .map_err(|e| format!("signalfd: {e}"))?
    .run();

    let mut failed = false;
    for h in handles {
        failed |= h.join().is_err();
    }
    let total = |f: fn(&WorkerStats) -> &stats::Counter| stats::total(&all_stats, f);
    info!(
        "stopped: {} connections accepted, {} completed, {} refused as loops, {} bytes up, {} bytes down",
        total(|s| &s.accepted),
        total(|s| s.closed(EndKind::Completed)),
        total(|s| &s.refused_loop) + total(|s| &s.refused_own_upstream),
        total(|s| &s.bytes_client_to_upstream),
        total(|s| &s.bytes_upstream_to_client),
    );
    if cfg.udp {
        let drops: Vec<String> = stats::UdpDrop::ALL
            .iter()
            .map(|d| (d.name(), udp_stats.dropped(*d).get()))
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{n} {name}"))
            .collect();
        info!(
            "udp: {} sessions, {} datagrams up, {} down, dropped: {}",
            udp_stats.sessions_created.get(),
            udp_stats.datagrams_to_upstream.get(),
            udp_stats.datagrams_to_client.get(),
            if drops.is_empty() {
                "none".to_string()
            } else {
                drops.join(", ")
            },
        );
    }
    if failed {
        return Err("a worker thread failed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_pipes_only_where_they_cost_no_pipe_pages() {
        let (small, mib) = (64 * 1024, 1 << 20);
        // (pipe size, exempt, pipe-user-pages-soft, pipe-max-size) -> bulk size
        let cases = [
            // Privileged: the soft limit does not apply.
            ((small, true, Some(16384), Some(mib)), mib),
            // Unprivileged under the default soft limit: no bulk pipes.
            ((small, false, Some(16384), Some(mib)), small),
            // tune/ lifted the soft limit.
            ((small, false, Some(0), Some(mib)), mib),
            // ... but pipe-max-size still caps an unprivileged F_SETPIPE_SZ.
            ((small, false, Some(0), Some(small)), small),
            // Unknown (no /proc): the safe answer.
            ((small, false, None, None), small),
            // Pipes already that big: nothing bigger.
            ((2 * mib, true, Some(0), Some(mib)), 2 * mib),
        ];
        for ((pipe, exempt, soft, max), want) in cases {
            assert_eq!(
                default_bulk_pipe_size(pipe, exempt, soft, max).0,
                want,
                "{:?}",
                (pipe, exempt, soft, max)
            );
        }
    }

    #[test]
    fn udp_takes_at_most_a_quarter_of_a_small_limit() {
        let Ok(Command::Run(cfg)) = config::parse(["--port", "1"]) else {
            panic!()
        };
        // A 4096 limit, common as a default hard limit, still serves TCP.
        assert_eq!(
            max_conns_for(&cfg, 4096),
            ((4096 - 256) - (4096 - 256) / 4) / 4
        );
        assert!(max_conns_for(&cfg, 4096) > 500);
        // A generous limit gives UDP its whole --udp-max-sessions.
        assert_eq!(max_conns_for(&cfg, 1 << 20), ((1 << 20) - 256 - 4096) / 4);
    }

    #[test]
    fn default_max_conns_fits_the_descriptor_limit() {
        assert_eq!(default_max_conns(20_000), (20_000 - 256) / 4);
        assert_eq!(default_max_conns(10), 1);
        let n = default_max_conns(1024) as u64;
        assert!(n * FDS_PER_CONN + RESERVED_FDS <= 1024);
    }
}
