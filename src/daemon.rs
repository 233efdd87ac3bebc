//! Starting, running and summarising the daemon: the listeners, the TCP
//! and UDP workers and their threads, the control loop, and the summary
//! logged when they have all stopped.
//!
//! It keeps main.rs's MAIN-1..3: everything that can fail with an exit
//! status is done before the first thread starts, the signals are blocked
//! before then too, and every way out leaves the open connections armed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;

use core_affinity::CoreId;
use crossbeam_channel::Sender;
use log::{info, warn};
use mio::{Poll, Waker};

use crate::budget::Budget;
use crate::config::Config;
use crate::control::{Control, ControlLoop};
use crate::own_sockets::OwnSockets;
use crate::stats::{self, EndKind, UdpStats, WorkerStats};
use crate::sys::{self, ListenError, SignalSet};
use crate::tcp::accept::ClientLimits;
use crate::udp::worker::UdpWorker;
use crate::worker::{Setup, Worker};
use crate::{budget, control, pause, tcp, token, udp};

/// Why `run` gave up, and with which exit status (MAIN-1).
pub struct Failure {
    pub status: u8,
    pub msg: String,
}

/// Anything the host refused: status 1.
impl From<String> for Failure {
    fn from(msg: String) -> Failure {
        Failure { status: 1, msg }
    }
}

impl From<&str> for Failure {
    fn from(msg: &str) -> Failure {
        Failure::from(msg.to_string())
    }
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

/// Run the daemon until every worker has stopped: `Ok` after a drain,
/// `Err` with the exit status for what could not start (MAIN-1).
pub fn run(cfg: Config) -> Result<(), Failure> {
    let (nofile, plan) = descriptor_budget(&cfg)?;
    check_sources(&cfg)?;
    let signals = take_signals()?;
    let mut cfg = cfg;
    let (bulk, bulk_why) = budget::bulk_pipe_size(&cfg, &budget::PipeLimits::of_this_process());
    cfg.bulk_pipe_size = Some(bulk);
    let cfg = Arc::new(cfg);
    // Every upstream socket of the process, for the loop check at accept
    // (tcp/accept.rs WRK-7) and the UDP workers' (udp/worker.rs UDP-1).
    let own = Arc::new(OwnSockets::new());
    let mut workers = Workers::default();
    let clients = tcp_workers(&cfg, &own, plan.max_conns, &mut workers)?;
    udp_workers(&cfg, &own, plan.udp_sessions, &mut workers)?;
    let (control, done) = control_loop(&cfg, signals, &mut workers)?;
    let tcp_stats = workers.tcp_stats.clone();
    let udp_stats = workers.udp_stats.clone();
    let started = Started {
        tcp: workers.tcp.len(),
        pinned: workers.tcp.iter().any(|(_, core)| core.is_some()),
        udp: workers.udp.len(),
        listening: std::mem::take(&mut workers.listening),
    };
    let handles = start_threads(workers, &done)?;
    log_start(&cfg, &started, &plan, nofile, (bulk, bulk_why));
    // MAIN-2: signals, metrics and the workers' stop notices, until all stopped.
    control.run();

    let mut failed = false;
    for h in handles {
        failed |= h.join().is_err();
    }
    // ACC-5: the client episodes still open end with the process.
    if let Some(c) = &clients {
        c.sweep(std::time::Instant::now(), true);
    }
    log_summary(&cfg, &tcp_stats, &udp_stats);
    if failed {
        return Err("a worker thread failed".into());
    }
    Ok(())
}

/// RLIMIT_NOFILE, raised to its hard limit, and what it allows this
/// configuration (FD-1, FD-2).
fn descriptor_budget(cfg: &Config) -> Result<(u64, Budget), Failure> {
    if cfg.listen.len() > token::MAX_LISTENERS {
        return Err(Failure {
            status: 2,
            msg: format!("at most {} --listen addresses", token::MAX_LISTENERS),
        });
    }
    let nofile = match sys::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!("cannot raise RLIMIT_NOFILE: {e}");
            sys::nofile_limit().map_err(|e| format!("getrlimit: {e}"))?
        }
    };
    // FD-2: a configuration the limit cannot hold is a usage error.
    let plan = budget::budget(cfg, nofile).map_err(|msg| Failure { status: 2, msg })?;
    if plan.needed > nofile {
        warn!(
            "max-conns {} may need {} descriptors, more than RLIMIT_NOFILE {nofile}: \
             when they run out, accepting pauses and new pipes fall back to copying",
            plan.max_conns, plan.needed
        );
    }
    Ok((nofile, plan))
}

/// MAIN-1: a --source that is not this host's would fail every connect.
fn check_sources(cfg: &Config) -> Result<(), Failure> {
    for ip in &cfg.sources {
        match sys::is_local_address(*ip) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "--source {ip}: not an address of this host (a socket cannot bind to it)"
                )
                .into());
            }
            Err(e) => return Err(format!("--source {ip}: cannot check it: {e}").into()),
        }
    }
    Ok(())
}

/// MAIN-2, before any thread starts: the faults get their default action
/// back, glibc's reserved signals are ignored, and every signal the
/// control loop takes is blocked (and so blocked in every thread started
/// after).
fn take_signals() -> Result<SignalSet, Failure> {
    sys::default_action(&control::FAULTS)
        .map_err(|e| format!("cannot restore the faults' default action: {e}"))?;
    sys::ignore_reserved_signals()
        .map_err(|e| format!("cannot ignore glibc's reserved signals: {e}"))?;
    let signals = sys::SignalSet::of(&control::taken_signals())
        .and_then(|set| sys::block_signals(&set).map(|()| set))
        .map_err(|e| format!("cannot block signals: {e}"))?;
    Ok(signals)
}

/// The workers, made and not yet started, and what the control loop keeps
/// of them.
#[derive(Default)]
struct Workers {
    /// Each TCP worker with the core it is pinned to.
    tcp: Vec<(Worker, Option<CoreId>)>,
    udp: Vec<UdpWorker>,
    /// Every worker's channel and waker: the TCP workers', then the UDP
    /// workers'.
    controls: Vec<(Sender<Control>, Waker)>,
    tcp_stats: Vec<Arc<WorkerStats>>,
    udp_stats: Vec<Arc<UdpStats>>,
    /// The addresses the first worker listens on, for the start-up line.
    listening: Vec<SocketAddr>,
    /// IPv6 missing has been warned about (once for all listeners).
    warned_v6: bool,
}

/// A worker's poll, and the waker the control loop wakes it with.
fn poll_and_waker() -> Result<(Poll, Waker), Failure> {
    let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let waker = Waker::new(poll.registry(), token::WAKER).map_err(|e| format!("eventfd: {e}"))?;
    Ok((poll, waker))
}

/// `--workers` TCP workers (none with `--no-tcp`), each with its own
/// listeners, sharing the connection count, the per-client counts (which
/// are returned, for their episodes' last lines), the pause episodes, the
/// registry of own sockets and the source-port episodes.
fn tcp_workers(
    cfg: &Arc<Config>,
    own: &Arc<OwnSockets>,
    max_conns: usize,
    w: &mut Workers,
) -> Result<Option<Arc<ClientLimits>>, Failure> {
    let active = Arc::new(AtomicUsize::new(0));
    let pauses = Arc::new(pause::Pauses::default());
    let ports = Arc::new(tcp::source::Exhaustion::default());
    let clients = cfg
        .max_conns_per_client
        .map(|n| Arc::new(ClientLimits::new(n, cfg.client_prefix)));
    let cores = if cfg.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let count = if cfg.tcp { cfg.workers } else { 0 };
    for id in 0..count {
        let (poll, waker) = poll_and_waker()?;
        let listeners = make_listeners(cfg, &mut w.warned_v6, sys::transparent_listener)?;
        if id == 0 {
            w.listening = listeners
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
            clients: clients.clone(),
            pauses: pauses.clone(),
            cfg: cfg.clone(),
            own: own.clone(),
            ports: ports.clone(),
        })
        .map_err(|e| format!("worker {id}: {e}"))?;
        w.tcp
            .push((worker, cores.get(id % cores.len().max(1)).copied()));
        w.controls.push((tx, waker));
        w.tcp_stats.push(stats);
    }
    Ok(clients)
}

/// `--udp-workers` UDP workers (none with `--no-udp`), each with its own
/// listeners and its share of `sessions`.
fn udp_workers(
    cfg: &Arc<Config>,
    own: &Arc<OwnSockets>,
    sessions: usize,
    w: &mut Workers,
) -> Result<(), Failure> {
    let count = if cfg.udp { cfg.udp_workers } else { 0 };
    for id in 0..count {
        let (poll, waker) = poll_and_waker()?;
        let listeners = make_listeners(cfg, &mut w.warned_v6, sys::transparent_udp_listener)?;
        if w.listening.is_empty() {
            w.listening = listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect();
        }
        let (tx, rx) = crossbeam_channel::bounded(4);
        let stats = Arc::new(UdpStats::default());
        w.udp.push(
            UdpWorker::new(udp::worker::Setup {
                id,
                poll,
                listeners,
                control: rx,
                stats: stats.clone(),
                cfg: cfg.clone(),
                own: own.clone(),
                max_sessions: budget::per_udp_worker(sessions, count),
            })
            .map_err(|e| format!("udp worker {id}: {e}"))?,
        );
        w.udp_stats.push(stats);
        w.controls.push((tx, waker));
    }
    Ok(())
}

/// How a worker's thread tells the control loop it has stopped.
struct DoneNotice {
    tx: Sender<usize>,
    waker: Arc<Waker>,
}

/// Each thread says when it stops, even by panicking, so the control loop
/// knows when to end (CTL-2).
struct Done(Sender<usize>, Arc<Waker>, usize);

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.0.send(self.2);
        let _ = self.1.wake();
    }
}

/// The control loop, made before any thread starts so that its failure
/// (and the metrics address's) has an exit status (MAIN-1); it runs once
/// they are all up.
fn control_loop(
    cfg: &Config,
    signals: SignalSet,
    w: &mut Workers,
) -> Result<(ControlLoop, DoneNotice), Failure> {
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
    let control = ControlLoop::new(control::Setup {
        poll: main_poll,
        signals,
        metrics,
        workers: std::mem::take(&mut w.controls),
        done: done_rx,
        drain_timeout: cfg.drain_timeout,
        tcp_stats: w.tcp_stats.clone(),
        udp_stats: w.udp_stats.clone(),
    })
    .map_err(|e| format!("signalfd: {e}"))?;
    Ok((
        control,
        DoneNotice {
            tx: done_tx,
            waker: main_waker,
        },
    ))
}

/// One thread per worker: the UDP workers', then the TCP workers', each
/// TCP worker pinned to its core.
fn start_threads(w: Workers, done: &DoneNotice) -> Result<Vec<JoinHandle<()>>, Failure> {
    let mut handles = Vec::with_capacity(w.tcp.len() + w.udp.len());
    for (id, worker) in w.udp.into_iter().enumerate() {
        let done = Done(done.tx.clone(), done.waker.clone(), usize::MAX - id);
        let h = std::thread::Builder::new()
            .name(format!("tproxyd-udp{id}"))
            .spawn(move || {
                let _done = done;
                worker.run();
            })
            .map_err(|e| format!("cannot start udp worker {id}: {e}"))?;
        handles.push(h);
    }
    for (id, (worker, core)) in w.tcp.into_iter().enumerate() {
        let done = Done(done.tx.clone(), done.waker.clone(), id);
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
    Ok(handles)
}

/// What was started, for the start-up line.
struct Started {
    tcp: usize,
    pinned: bool,
    udp: usize,
    listening: Vec<SocketAddr>,
}

/// The start-up line, then what `--metrics`, `--source` and
/// `--spoof-source` do.
fn log_start(cfg: &Config, s: &Started, plan: &Budget, nofile: u64, bulk: (usize, &str)) {
    let (bulk, bulk_why) = bulk;
    info!(
        "tproxyd {} on port {}: {} TCP worker(s){}, {}, listening on {}, max-conns {}, RLIMIT_NOFILE {}, {}",
        env!("CARGO_PKG_VERSION"),
        cfg.port,
        s.tcp,
        if s.pinned { " pinned" } else { "" },
        if cfg.udp {
            format!(
                "{} UDP worker(s) ({} NAT, timeout {:?}, max {} sessions{})",
                s.udp,
                cfg.udp_nat,
                cfg.udp_timeout,
                plan.udp_sessions,
                plan.udp_reduced
                    .as_ref()
                    .map(|why| format!(": {why}"))
                    .unwrap_or_default()
            )
        } else {
            "no UDP".to_string()
        },
        s.listening
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        plan.max_conns,
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
    if let Some(d) = cfg.busy_poll {
        info!(
            "--busy-poll {d:?}: each worker keeps polling for {d:?} after events before it sleeps (it spins while traffic flows)"
        );
    }
    if let Some(n) = cfg.max_conns_per_client
        && cfg.tcp
    {
        let p = cfg.client_prefix;
        info!(
            "--max-conns-per-client {n}: a client (an IPv4 /{} or an IPv6 /{}) holding {n} TCP connections has its new ones reset",
            p.v4, p.v6
        );
        if n as usize >= plan.max_conns {
            warn!(
                "--max-conns-per-client {n} is not below max-conns {}: one client can still take every place",
                plan.max_conns
            );
        }
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
    if cfg.spoof_source {
        info!(
            "--spoof-source: upstream {} come from each client's own address",
            match (cfg.tcp, cfg.udp) {
                (true, true) => "TCP connections and UDP flows",
                (true, false) => "TCP connections",
                _ => "UDP flows",
            }
        );
    }
}

/// The stop summary: TCP's totals, and UDP's with its drops by reason.
fn log_summary(cfg: &Config, tcp_stats: &[Arc<WorkerStats>], udp_stats: &[Arc<UdpStats>]) {
    let total = |f: fn(&WorkerStats) -> &stats::Counter| stats::total(tcp_stats, f);
    info!(
        "stopped: {} connections accepted, {} completed, {} refused as loops, {} bytes up, {} bytes down",
        total(|s| &s.accepted),
        total(|s| s.closed(EndKind::Completed)),
        total(|s| &s.refused_loop) + total(|s| &s.refused_own_upstream),
        total(|s| &s.bytes_client_to_upstream),
        total(|s| &s.bytes_upstream_to_client),
    );
    if let Some(n) = cfg.max_conns_per_client
        && cfg.tcp
    {
        info!(
            "stopped: {} connections reset at --max-conns-per-client {n}",
            total(|s| &s.client_limit)
        );
    }
    if cfg.udp {
        let udp = |f: fn(&UdpStats) -> &stats::Counter| -> u64 {
            udp_stats.iter().map(|s| f(s).get()).sum()
        };
        let drops: Vec<String> = stats::UdpDrop::ALL
            .iter()
            .map(|d| {
                let n: u64 = udp_stats.iter().map(|s| s.dropped(*d).get()).sum();
                (d.name(), n)
            })
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{n} {name}"))
            .collect();
        info!(
            "udp: {} sessions, {} datagrams up, {} down, dropped: {}",
            udp(|s| &s.sessions_created),
            udp(|s| &s.datagrams_to_upstream),
            udp(|s| &s.datagrams_to_client),
            if drops.is_empty() {
                "none".to_string()
            } else {
                drops.join(", ")
            },
        );
    }
}
