//! The main thread's own event loop, once the workers run: signals (through
//! a signalfd), the metrics endpoint, and the workers' "I have stopped"
//! notices. It never touches the data path.
//!
//! Signals: the first SIGINT/SIGTERM starts the drain (every worker is told
//! over its channel and woken); a second one exits at once with status 1.
//! SIGUSR1 writes the counters to the log.
//!
//! What must stay true:
//! - CTL-1: a metrics client can hold at most `MAX_SCRAPERS` connections,
//!   each for at most `SCRAPE_TIMEOUT`, and never more than `MAX_REQUEST`
//!   bytes of request: a slow or hostile scraper costs bounded memory and
//!   nothing on the data path.
//! - CTL-2: the loop ends when every worker has said it stopped.
//! - CTL-3: metrics answer even when the process is out of descriptors: one
//!   is held in reserve for that, and a scrape left waiting is retried.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::metrics::{self, MAX_REQUEST, Request};
use crate::stats::{UdpStats, WorkerStats};
use crate::sys::{self, SigSet, Signal, SignalFd};
use crate::worker::Control;

const SIGNALS: Token = Token(0);
pub const DONE: Token = Token(1);
const METRICS: Token = Token(2);
const SCRAPER_BASE: usize = 3;
const MAX_SCRAPERS: usize = 16;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

pub struct Setup {
    pub poll: Poll,
    pub signals: SigSet,
    pub metrics: Option<std::net::TcpListener>,
    pub workers: Vec<(Sender<Control>, Waker)>,
    pub done: Receiver<usize>,
    pub drain_timeout: Duration,
    pub tcp_stats: Vec<Arc<WorkerStats>>,
    pub udp_stats: Vec<Arc<UdpStats>>,
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
            let sig = match sys::read_signal(&self.signals) {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(e) => {
                    warn!("signalfd: {e}");
                    return;
                }
            };
            match sig {
                Signal::SIGUSR1 => {
                    for line in self.render().lines().filter(|l| !l.starts_with('#')) {
                        info!("{line}");
                    }
                }
                s @ (Signal::SIGINT | Signal::SIGTERM) if self.draining => {
                    eprintln!("tproxyd: {s} again: exiting without draining");
                    std::process::exit(1);
                }
                s @ (Signal::SIGINT | Signal::SIGTERM) => {
                    info!(
                        "{s}: stopping accepting, draining for up to {:?}",
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
                _ => {}
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
