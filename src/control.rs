//! The main thread's own event loop, once the workers run: signals (through
//! a signalfd), the metrics endpoint, and the workers' "I have stopped"
//! notices. It never touches the data path.
//!
//! Signals (MAIN-2: all of them are taken here; none runs a handler). Every
//! signal whose default action would end the process has an action
//! ([`action`]):
//! - SIGINT, SIGTERM: drain. Every worker is told over its channel and
//!   woken; exit status 0 once open connections have finished, or once the
//!   drain deadline has reset what was left.
//! - SIGQUIT, and a second SIGINT or SIGTERM during a drain: stop at once,
//!   exit status 1, logged. The exit itself resets every open TCP connection
//!   (armed linger, tcp/close.rs CONN-8); nothing is closed one by one.
//! - SIGHUP: there is nothing to reload — tproxyd has no configuration
//!   file, its options are its command line — so it is logged and changes
//!   nothing (a closed terminal or a log rotation does no harm).
//! - SIGUSR1: the counters go to the log.
//! - every other one: SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO (SIGPOLL),
//!   SIGPWR, SIGSTKFLT, SIGXCPU, SIGXFSZ and SIGRTMIN..=SIGRTMAX: logged
//!   (CTL-4) and ignored.
//!
//! Not taken here: SIGKILL and SIGSTOP, which cannot be; SIGPIPE, which
//! Rust's runtime ignores (a write to a closed socket comes back as EPIPE);
//! the synchronous faults ([`FAULTS`]), which keep their default action, a
//! core for a bug (the daemon takes back the handler Rust's runtime puts on
//! SIGSEGV and SIGBUS); the real-time signals glibc keeps for itself, 32
//! and 33 (`sys::ignore_reserved_signals`); and the stop signals (SIGTSTP,
//! SIGTTIN, SIGTTOU), whose default pauses the process until SIGCONT.
//! Whatever ends the process, armed linger resets its open connections. A
//! signal sent to one thread rather than the process (tgkill) stays pending
//! in that thread, blocked: it does nothing at all.
//!
//! What must stay true:
//! - CTL-1: a metrics client can hold at most `MAX_SCRAPERS` connections,
//!   each for at most `SCRAPE_TIMEOUT`, and never more than `MAX_REQUEST`
//!   bytes of request: a slow or hostile scraper costs bounded memory and
//!   nothing on the data path.
//! - CTL-2: the loop ends when every worker has said it stopped.
//! - CTL-3: metrics answer even when the process is out of descriptors: one
//!   is held in reserve for that, and a scrape left waiting is retried.
//! - CTL-4: a flood of signals cannot flood the log: a signal that is only
//!   logged (SIGHUP and the ignored ones) gets at most one line per signal
//!   number per `SIGNAL_LOG_INTERVAL`; the ones in between are counted, and
//!   the count is logged once that interval is over.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use libc::c_int;
use log::{error, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::metrics::{self, MAX_REQUEST, Request};
use crate::stats::{UdpStats, WorkerStats};
use crate::sys::{self, SignalFd, SignalInfo, SignalSet};

/// Messages from the control loop to the workers, TCP and UDP.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting; let open connections finish until `deadline`.
    Shutdown { deadline: Instant },
}

const SIGNALS: Token = Token(0);
pub const DONE: Token = Token(1);
const METRICS: Token = Token(2);
const SCRAPER_BASE: usize = 3;
const MAX_SCRAPERS: usize = 16;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// CTL-4: how often a signal that is only logged may be logged, per signal
/// number. Long enough that a flood costs a line a minute, short enough
/// that an operator trying something again soon sees it again.
const SIGNAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Signals whose default action would end the process and that are not
/// faults; with SIGRTMIN..=SIGRTMAX, what the control loop takes
/// ([`taken_signals`]).
const TERMINATING: [c_int; 14] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGTERM,
    libc::SIGSTKFLT,
    libc::SIGIO,
    libc::SIGPROF,
    libc::SIGVTALRM,
    libc::SIGPWR,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

/// The synchronous faults: left to their default action (a core dump), so a
/// bug is caught where it happened. kill(2) can send them too; the process
/// then dies the same way, and its peers are reset (CONN-8).
pub const FAULTS: [c_int; 7] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGABRT,
    libc::SIGSYS,
];

/// Every signal the daemon blocks and the control loop takes from its signalfd.
pub fn taken_signals() -> Vec<c_int> {
    let mut v = TERMINATING.to_vec();
    v.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    v
}

/// What a signal taken from the signalfd does (see the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Drain,
    StopNow,
    NothingToReload,
    Counters,
    Ignore,
}

fn action(signo: c_int, draining: bool) -> Action {
    match signo {
        libc::SIGINT | libc::SIGTERM if draining => Action::StopNow,
        libc::SIGINT | libc::SIGTERM => Action::Drain,
        libc::SIGQUIT => Action::StopNow,
        libc::SIGHUP => Action::NothingToReload,
        libc::SIGUSR1 => Action::Counters,
        _ => Action::Ignore,
    }
}

/// Who sent a signal, for the log.
fn sender(info: &SignalInfo) -> String {
    if info.pid == 0 {
        "from the kernel".to_string()
    } else {
        format!("from pid {} (uid {})", info.pid, info.uid)
    }
}

/// CTL-4: per signal number, when its last line was written and what came
/// since without one.
#[derive(Default)]
struct SignalLog {
    seen: HashMap<c_int, Seen>,
}

struct Seen {
    logged: Instant,
    unlogged: u64,
    last: SignalInfo,
}

impl SignalLog {
    /// Note one signal. `Some(n)` when it gets a line now, `n` being how
    /// many of that number came since the last line without one (normally
    /// already logged by [`SignalLog::due`]; 0 then).
    fn note(&mut self, info: SignalInfo, now: Instant) -> Option<u64> {
        match self.seen.get_mut(&info.signo) {
            None => {
                self.seen.insert(
                    info.signo,
                    Seen {
                        logged: now,
                        unlogged: 0,
                        last: info,
                    },
                );
                Some(0)
            }
            Some(s) if now.saturating_duration_since(s.logged) >= SIGNAL_LOG_INTERVAL => {
                let n = s.unlogged;
                *s = Seen {
                    logged: now,
                    unlogged: 0,
                    last: info,
                };
                Some(n)
            }
            Some(s) => {
                s.unlogged += 1;
                s.last = info;
                None
            }
        }
    }

    /// The counts whose interval is over, each with the last of its
    /// signals; they start a new interval.
    fn due(&mut self, now: Instant) -> Vec<(SignalInfo, u64)> {
        let mut out = Vec::new();
        for s in self.seen.values_mut() {
            if s.unlogged > 0 && now.saturating_duration_since(s.logged) >= SIGNAL_LOG_INTERVAL {
                out.push((s.last, s.unlogged));
                s.logged = now;
                s.unlogged = 0;
            }
        }
        out.sort_by_key(|(info, _)| info.signo);
        out
    }

    /// When the next count falls due.
    fn next_due(&self) -> Option<Instant> {
        self.seen
            .values()
            .filter(|s| s.unlogged > 0)
            .map(|s| s.logged + SIGNAL_LOG_INTERVAL)
            .min()
    }
}

struct Scraper {
    stream: TcpStream,
    request: Vec<u8>,
    response: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

pub struct ControlLoop {
    poll: Poll,
    signals: SignalFd,
    metrics: Option<TcpListener>,
    scrapers: Slab<Scraper>,
    workers: Vec<(Sender<Control>, Waker)>,
    done: Receiver<usize>,
    running: usize,
    drain_timeout: Duration,
    draining: bool,
    tcp_stats: Vec<Arc<WorkerStats>>,
    udp_stats: Vec<Arc<UdpStats>>,
    /// A descriptor held in reserve, given up to take a scrape when the
    /// process is out of them (CTL-3).
    spare: Option<std::fs::File>,
    /// A scrape waits in the listener's queue for a descriptor.
    metrics_blocked: bool,
    signal_log: SignalLog,
}

pub struct Setup {
    pub poll: Poll,
    /// The blocked signals the signalfd takes ([`taken_signals`]).
    pub signals: SignalSet,
    pub metrics: Option<std::net::TcpListener>,
    pub workers: Vec<(Sender<Control>, Waker)>,
    pub done: Receiver<usize>,
    pub drain_timeout: Duration,
    pub tcp_stats: Vec<Arc<WorkerStats>>,
    pub udp_stats: Vec<Arc<UdpStats>>,
}

/// CTL-4: the signals of one number that came without a line of their own.
fn log_unlogged(info: &SignalInfo, n: u64) {
    warn!(
        "{}: {n} more in the last {}s, the last {}; ignored",
        sys::signal_name(info.signo),
        SIGNAL_LOG_INTERVAL.as_secs(),
        sender(info)
    );
}

impl ControlLoop {
    pub fn new(s: Setup) -> io::Result<ControlLoop> {
        let signals = sys::signal_fd(&s.signals)?;
        s.poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        let metrics = match s.metrics {
            Some(l) => {
                l.set_nonblocking(true)?;
                let mut l = TcpListener::from_std(l);
                s.poll
                    .registry()
                    .register(&mut l, METRICS, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        Ok(ControlLoop {
            poll: s.poll,
            signals,
            metrics,
            scrapers: Slab::new(),
            running: s.workers.len(),
            workers: s.workers,
            done: s.done,
            drain_timeout: s.drain_timeout,
            draining: false,
            tcp_stats: s.tcp_stats,
            udp_stats: s.udp_stats,
            spare: std::fs::File::open("/dev/null").ok(),
            metrics_blocked: false,
            signal_log: SignalLog::default(),
        })
    }

    fn render(&self) -> String {
        metrics::render(&self.tcp_stats, &self.udp_stats)
    }

    /// Run until every worker has stopped (CTL-2).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(64);
        while self.running > 0 {
            let timeout = if self.metrics_blocked {
                Some(Duration::from_millis(100))
            } else {
                (!self.scrapers.is_empty()).then_some(Duration::from_secs(1))
            };
            let counts = self
                .signal_log
                .next_due()
                .map(|t| t.saturating_duration_since(Instant::now()));
            let timeout = timeout.into_iter().chain(counts).min();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("control loop: poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    DONE => {
                        while self.done.try_recv().is_ok() {
                            self.running = self.running.saturating_sub(1);
                        }
                    }
                    METRICS => self.accept_scrapers(),
                    Token(t) => self.serve(t - SCRAPER_BASE),
                }
            }
            if self.metrics_blocked {
                self.accept_scrapers();
            }
            let now = Instant::now();
            for (info, n) in self.signal_log.due(now) {
                log_unlogged(&info, n);
            }
            let late: Vec<usize> = self
                .scrapers
                .iter()
                .filter(|(_, s)| s.deadline <= now)
                .map(|(k, _)| k)
                .collect();
            for k in late {
                self.scrapers.remove(k);
                self.restore_spare();
            }
        }
    }

    fn on_signals(&mut self) {
        loop {
            let info = match sys::read_signal(&self.signals) {
                Ok(Some(info)) => info,
                Ok(None) => return,
                Err(e) => {
                    warn!("signalfd: {e}");
                    return;
                }
            };
            let name = sys::signal_name(info.signo);
            let from = sender(&info);
            match action(info.signo, self.draining) {
                Action::Counters => {
                    for line in self.render().lines().filter(|l| !l.starts_with('#')) {
                        info!("{line}");
                    }
                }
                Action::StopNow => {
                    let open: u64 = self.tcp_stats.iter().map(|s| s.active.get()).sum();
                    error!(
                        "{name} {from}{}: stopping at once; the exit resets {open} open TCP \
                         connection(s); exit status 1",
                        if self.draining {
                            " during the drain"
                        } else {
                            ""
                        }
                    );
                    // Armed linger (CONN-8): the kernel resets every proxied
                    // socket as the process goes; a completed connection
                    // being closed right now still gets its FINs.
                    std::process::exit(1);
                }
                Action::Drain => {
                    info!(
                        "{name} {from}: stopping accepting, draining for up to {:?}; \
                         a second SIGINT or SIGTERM, or a SIGQUIT, stops at once",
                        self.drain_timeout
                    );
                    self.draining = true;
                    let deadline = Instant::now() + self.drain_timeout;
                    for (tx, waker) in &self.workers {
                        // A worker that already stopped dropped its receiver.
                        let _ = tx.send(Control::Shutdown { deadline });
                        let _ = waker.wake();
                    }
                    // No new scrapes while stopping; open ones finish.
                    if let Some(mut l) = self.metrics.take() {
                        let _ = self.poll.registry().deregister(&mut l);
                    }
                }
                Action::NothingToReload => {
                    if self.take_line(info) {
                        info!(
                            "{name} {from}: nothing to reload (tproxyd has no configuration \
                             file; its options are its command line), carrying on; repeats \
                             within a minute are counted, not logged"
                        );
                    }
                }
                Action::Ignore => {
                    if self.take_line(info) {
                        warn!(
                            "{name} {from}: ignored, it means nothing to tproxyd; repeats \
                             within a minute are counted, not logged"
                        );
                    }
                }
            }
        }
    }

    /// CTL-4: whether a signal that is only logged gets its line now; what
    /// came before it without one is logged first.
    fn take_line(&mut self, info: SignalInfo) -> bool {
        match self.signal_log.note(info, Instant::now()) {
            None => false,
            Some(n) => {
                if n > 0 {
                    log_unlogged(&info, n);
                }
                true
            }
        }
    }

    fn accept_scrapers(&mut self) {
        loop {
            let Some(listener) = &self.metrics else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.scrapers.len() >= MAX_SCRAPERS {
                        continue; // dropped: CTL-1
                    }
                    let entry = self.scrapers.vacant_entry();
                    let token = Token(SCRAPER_BASE + entry.key());
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(Scraper {
                            stream,
                            request: Vec::new(),
                            response: None,
                            deadline: Instant::now() + SCRAPE_TIMEOUT,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.metrics_blocked = false;
                    // accept(2) reports EMFILE before it looks at the queue:
                    // the spare may have been given up for nothing.
                    self.restore_spare();
                    return;
                }
                // CTL-3: out of descriptors, give up the spare one so a
                // scrape can be taken; without a spare, retry on a timer
                // (edge-triggered: no new event comes for a queued scrape).
                Err(e) if sys::is_exhaustion(&e) => {
                    if self.spare.take().is_none() {
                        self.metrics_blocked = true;
                        return;
                    }
                }
                Err(_) => continue,
            }
        }
    }

    fn restore_spare(&mut self) {
        if self.spare.is_none() {
            self.spare = std::fs::File::open("/dev/null").ok();
        }
    }

    fn serve(&mut self, k: usize) {
        let body = self.render_if_ready(k);
        let Some(s) = self.scrapers.get_mut(k) else {
            return;
        };
        if s.response.is_none()
            && let Some(req) = body
        {
            s.response = Some((req, 0));
        }
        let done = match &mut s.response {
            None => false,
            Some((out, sent)) => loop {
                match s.stream.write(&out[*sent..]) {
                    Ok(n) => {
                        *sent += n;
                        if *sent == out.len() {
                            break true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break true,
                }
            },
        };
        if done {
            self.scrapers.remove(k);
            self.restore_spare();
        }
    }

    /// Read what the scraper sent; once the head is complete, the response.
    fn render_if_ready(&mut self, k: usize) -> Option<Vec<u8>> {
        let s = self.scrapers.get_mut(k)?;
        if s.response.is_some() {
            return None;
        }
        let mut buf = [0u8; 1024];
        loop {
            match s.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = MAX_REQUEST - s.request.len().min(MAX_REQUEST);
                    s.request.extend_from_slice(&buf[..n.min(room)]);
                    if room <= n {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let req = metrics::parse_request(&s.request);
        if req == Request::Incomplete {
            return None;
        }
        Some(metrics::response(&req, || self.render()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signals whose default action does not end the process (signal(7)).
    const STOP_OR_IGNORE: [c_int; 8] = [
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGURG,
        libc::SIGWINCH,
    ];

    #[test]
    fn every_signal_that_would_end_the_process_is_taken_or_kept_on_purpose() {
        let taken = taken_signals();
        for signo in 1..=libc::SIGRTMAX() {
            if STOP_OR_IGNORE.contains(&signo) {
                assert!(!taken.contains(&signo), "{signo} needs no handling");
                continue;
            }
            let why = if taken.contains(&signo) {
                "taken"
            } else if FAULTS.contains(&signo) {
                "a fault: default action"
            } else if signo == libc::SIGKILL {
                "cannot be caught"
            } else if signo == libc::SIGPIPE {
                "ignored by Rust's runtime"
            } else if (32..libc::SIGRTMIN()).contains(&signo) {
                "glibc's own: sys::ignore_reserved_signals"
            } else {
                panic!(
                    "signal {signo} ({}) would end tproxyd",
                    sys::signal_name(signo)
                );
            };
            assert!(
                !(taken.contains(&signo) && FAULTS.contains(&signo)),
                "{signo}: {why}, and a fault too"
            );
        }
        assert!(taken.contains(&libc::SIGRTMIN()) && taken.contains(&libc::SIGRTMAX()));
    }

    #[test]
    fn what_each_signal_does() {
        let cases = [
            (libc::SIGTERM, false, Action::Drain),
            (libc::SIGINT, false, Action::Drain),
            (libc::SIGTERM, true, Action::StopNow),
            (libc::SIGINT, true, Action::StopNow),
            (libc::SIGQUIT, false, Action::StopNow),
            (libc::SIGQUIT, true, Action::StopNow),
            (libc::SIGHUP, false, Action::NothingToReload),
            (libc::SIGHUP, true, Action::NothingToReload),
            (libc::SIGUSR1, false, Action::Counters),
            (libc::SIGUSR2, false, Action::Ignore),
            (libc::SIGALRM, true, Action::Ignore),
            (libc::SIGRTMIN(), false, Action::Ignore),
            (libc::SIGRTMAX(), true, Action::Ignore),
        ];
        for (signo, draining, want) in cases {
            assert_eq!(
                action(signo, draining),
                want,
                "{} (draining: {draining})",
                sys::signal_name(signo)
            );
        }
    }

    #[test]
    fn a_flood_of_one_signal_costs_a_line_per_interval() {
        let info = |signo| SignalInfo {
            signo,
            pid: 42,
            uid: 0,
        };
        let t0 = Instant::now();
        let mut log = SignalLog::default();
        assert_eq!(log.note(info(libc::SIGUSR2), t0), Some(0));
        assert_eq!(log.next_due(), None, "nothing counted yet");
        // Another number has its own line.
        assert_eq!(log.note(info(libc::SIGHUP), t0), Some(0));
        for i in 1..=1000 {
            let t = t0 + Duration::from_millis(i);
            assert_eq!(log.note(info(libc::SIGUSR2), t), None);
        }
        assert_eq!(log.next_due(), Some(t0 + SIGNAL_LOG_INTERVAL));
        assert!(log.due(t0 + SIGNAL_LOG_INTERVAL / 2).is_empty());
        let t1 = t0 + SIGNAL_LOG_INTERVAL;
        assert_eq!(log.due(t1), vec![(info(libc::SIGUSR2), 1000)]);
        assert_eq!(log.next_due(), None);
        // The count started a new interval: the next one is counted too...
        assert_eq!(log.note(info(libc::SIGUSR2), t1), None);
        // ...and once it is over, a signal gets its line with the count.
        let t2 = t1 + SIGNAL_LOG_INTERVAL;
        assert_eq!(log.note(info(libc::SIGUSR2), t2), Some(1));
        assert_eq!(
            log.note(info(libc::SIGUSR2), t2 + 2 * SIGNAL_LOG_INTERVAL),
            Some(0)
        );
    }
}
