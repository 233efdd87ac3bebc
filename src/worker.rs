//! One worker thread: its own listeners (SO_REUSEPORT), its own mio `Poll`,
//! a slab of connections, a pipe pool and a timer heap. Nothing in here is
//! shared with another worker except the global connection count used to
//! hold `--max-conns`, touched once per accept and once per close, and the
//! episodes of waiting (pause.rs), touched only while accepting is paused,
//! and the registry of the process's own upstream sockets (own_sockets),
//! touched once per accept, connect and close.
//!
//! The loop: poll -> dispatch events -> accept -> re-drive connections that
//! used up their budget -> fire timers -> reap finished connections ->
//! resume paused listeners.
//!
//! What must stay true:
//! - WRK-1 (no stale events): a finished connection keeps its slab slot until
//!   the end of the loop turn; only then is the slot freed, so an event later
//!   in the same batch can never reach a new connection in a reused slot.
//!   Timer entries carry a generation for the same reason (TIM-1).
//! - WRK-2 (never spin): when accepting is impossible (`--max-conns`, or
//!   EMFILE/ENFILE) the listener is deregistered and retried when a
//!   connection closes or after `ACCEPT_RETRY`, not on every loop turn.
//! - WRK-3 (bounded turns): accepting and driving each do a bounded amount
//!   per turn; leftover work makes the next poll non-blocking instead of
//!   being dropped (edge-triggered readiness is not repeated by the kernel).
//! - WRK-4 (drain): on shutdown, pending connections in the accept queue are
//!   taken before the listeners close, then open connections run until done
//!   or until the drain deadline, when they are reset. Every other way out
//!   of the loop resets what is open too: a failed poll through
//!   `abort_all`, a panic by unwinding into the drop of the slab and the
//!   parked clients, whose sockets are armed (conn.rs CONN-8).
//! - WRK-5 (wait, don't reset, when out of descriptors): a client accepted
//!   on the last descriptor, whose upstream socket cannot be made, is parked
//!   with its listeners paused and retried when a descriptor frees; waiting
//!   clients stay in the kernel's backlog meanwhile. Nobody is reset for the
//!   proxy's own shortage.
//! - WRK-6 (waiting is seen): a paused listener's accept queue is read when
//!   it pauses and at each retry, never while accepting (pause.rs PAUSE-2);
//!   what the reads find is the `accept_queue` gauge and this worker's part
//!   in the process's episode of waiting (pause.rs), which warns once when
//!   it starts and says how long it lasted and how many waited when it ends.
//! - WRK-7 (no loop through the host's rules): every upstream connection
//!   from this host's own address is in the registry of own sockets from
//!   just after its connect starts until its `Conn` drops (OWN-2); a
//!   spoofed one is not (see `connect`: it cannot loop, and a real client
//!   may reuse its address and port), and an accepted connection that is one
//!   of them coming back (its client and destination are an upstream
//!   socket's local address and peer, whichever worker made it) is reset
//!   and counted, never forwarded. A hop that another worker accepts in the
//!   instant between an upstream connect and its registration is forwarded
//!   once; its own upstream connection, the next hop, is checked the same
//!   way, so each slip costs one more connection and the first hop caught
//!   resets the whole chain back to the client (each hop's upstream is
//!   reset, which resets its client).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, error, info, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll};
use slab::Slab;

use crate::config::Config;
use crate::own_sockets::OwnSockets;
use crate::pause::{self, Pauses, Reason};
use crate::stats::{EndKind, WorkerStats};
use crate::tcp::accept::{ListenState, Listener, Waiting};
use crate::tcp::close::End;
use crate::tcp::conn::{Conn, Drive};
use crate::tcp::connect::{Connector, Failed};
use crate::tcp::pipe::Buffers;
use crate::tcp::source::Exhaustion;
use crate::timers::Timers;
use crate::token::{self, Kind, Side};

/// Events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// Empty pipes a worker keeps for reuse. Each costs two descriptors; 256
/// covers the connections that are moving bytes at any one instant on a busy
/// worker without holding thousands of fds idle.
const MAX_POOLED_PIPES: usize = 256;

/// Messages from the main thread.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting; let open connections finish until `deadline`.
    Shutdown { deadline: Instant },
}

/// Everything a worker starts with; built by main so that every error that
/// deserves an exit status happens before any thread starts.
pub struct Setup {
    pub id: usize,
    pub poll: Poll,
    pub listeners: Vec<std::net::TcpListener>,
    pub control: Receiver<Control>,
    pub stats: Arc<WorkerStats>,
    /// Open connections across all workers, for `--max-conns`.
    pub active: Arc<AtomicUsize>,
    pub max_conns: usize,
    /// Episodes of waiting, shared by all workers (WRK-6).
    pub pauses: Arc<Pauses>,
    pub cfg: Arc<Config>,
    /// The local addresses of the process's upstream sockets (WRK-7).
    pub own: Arc<OwnSockets>,
    /// Source-port exhaustion episodes, for the whole process (SRC-3).
    pub ports: Arc<Exhaustion>,
}

pub struct Worker {
    pub(crate) id: usize,
    pub(crate) poll: Poll,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) control: Receiver<Control>,
    pub(crate) conns: Slab<Conn>,
    pub(crate) bufs: Buffers,
    pub(crate) timers: Timers,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) active: Arc<AtomicUsize>,
    pub(crate) max_conns: usize,
    pub(crate) cfg: Arc<Config>,
    pub(crate) own: Arc<OwnSockets>,
    /// The upstream connects (SRC-*, WRK-7).
    pub(crate) connector: Connector,
    pub(crate) next_generation: u64,
    /// Connections that hit their budget this turn: (slot, generation).
    pub(crate) again: Vec<(usize, u64)>,
    /// Connections that ended this turn, reaped at its end (WRK-1).
    pub(crate) dead: Vec<(usize, End)>,
    pub(crate) drain_deadline: Option<Instant>,
    pub(crate) now: Instant,
    /// Accepted clients whose upstream socket could not be made for want of
    /// descriptors: (client, peer, destination). They hold their `active`
    /// reservation and wait, like clients in the backlog (WRK-5).
    pub(crate) parked: Vec<(TcpStream, SocketAddr, SocketAddr)>,
    pub(crate) parked_retry: Option<Instant>,
    pub(crate) pauses: Arc<Pauses>,
    /// This worker's part in the episode of waiting for each `Reason`.
    pub(crate) waiting: [Option<Waiting>; Reason::ALL.len()],
}

impl Worker {
    pub fn new(s: Setup) -> io::Result<Worker> {
        let mut listeners = Vec::with_capacity(s.listeners.len());
        for (i, l) in s.listeners.into_iter().enumerate() {
            let mut sock = TcpListener::from_std(l);
            s.poll
                .registry()
                .register(&mut sock, token::listener(i), Interest::READABLE)?;
            listeners.push(Listener {
                sock,
                state: ListenState::Active { more: true },
            });
        }
        Ok(Worker {
            id: s.id,
            poll: s.poll,
            listeners,
            control: s.control,
            conns: Slab::with_capacity(1024),
            bufs: Buffers::new(
                s.cfg.pipe_size,
                s.cfg.bulk_pipe_size.unwrap_or(s.cfg.pipe_size),
                MAX_POOLED_PIPES,
            ),
            timers: Timers::default(),
            stats: s.stats,
            active: s.active,
            max_conns: s.max_conns,
            connector: Connector::new(Arc::clone(&s.cfg), s.id, Arc::clone(&s.own), s.ports),
            cfg: s.cfg,
            own: s.own,
            next_generation: 0,
            again: Vec::new(),
            dead: Vec::new(),
            drain_deadline: None,
            now: Instant::now(),
            parked: Vec::new(),
            parked_retry: None,
            pauses: s.pauses,
            waiting: Default::default(),
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!(
                    "worker {}: poll failed: {e}; resetting its connections",
                    self.id
                );
                self.abort_all();
                return;
            }
            self.now = Instant::now();
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    Kind::Waker => self.on_control(),
                    Kind::Listener(i) => {
                        if let Some(l) = self.listeners.get_mut(i)
                            && let ListenState::Active { .. } = l.state
                        {
                            l.state = ListenState::Active { more: true };
                        }
                    }
                    Kind::Conn { slot, side } => self.on_conn_event(slot, side, ev),
                }
            }
            self.accept_ready();
            self.drive_again();
            self.fire_timers();
            let freed = self.reap();
            self.resume_listeners(freed);
            self.leave_quiet_episodes();
            if let Some(deadline) = self.drain_deadline {
                if self.conns.is_empty() && self.parked.is_empty() {
                    break;
                }
                if self.now >= deadline {
                    warn!(
                        "worker {}: drain deadline passed, resetting {} connection(s)",
                        self.id,
                        self.conns.len()
                    );
                    self.abort_all();
                    break;
                }
            }
        }
        debug!("worker {}: stopped", self.id);
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let busy = !self.again.is_empty()
            || self
                .listeners
                .iter()
                .any(|l| l.state == ListenState::Active { more: true });
        if busy {
            return Some(Duration::ZERO);
        }
        let paused = self.listeners.iter().filter_map(|l| match l.state {
            ListenState::Paused { retry, .. } => Some(retry),
            ListenState::Active { .. } => None,
        });
        let quiet = self
            .waiting
            .iter()
            .filter_map(|w| Some(w.as_ref()?.drained? + pause::QUIET));
        self.timers
            .next()
            .into_iter()
            .chain(paused)
            .chain(quiet)
            .chain(self.parked_retry)
            .chain(self.drain_deadline)
            .min()
            .map(|t| t.saturating_duration_since(self.now))
    }

    fn on_control(&mut self) {
        while let Ok(msg) = self.control.try_recv() {
            match msg {
                Control::Shutdown { deadline } => self.begin_drain(deadline),
            }
        }
    }

    /// WRK-4: take what is already in the accept queues, then close them.
    fn begin_drain(&mut self, deadline: Instant) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(deadline);
        for i in 0..self.listeners.len() {
            if let ListenState::Active { .. } = self.listeners[i].state {
                // Bounded so a flood cannot hold shutdown forever.
                for _ in 0..64 {
                    self.listeners[i].state = ListenState::Active { more: true };
                    self.accept_from(i);
                    if self.listeners[i].state != (ListenState::Active { more: true }) {
                        break;
                    }
                }
            }
        }
        for mut l in self.listeners.drain(..) {
            if let ListenState::Active { .. } = l.state {
                let _ = self.poll.registry().deregister(&mut l.sock);
            }
        }
        // Whoever still waits in the closed queues is reset by the kernel:
        // the episode ends here.
        self.stats.accept_queue.set(0);
        for r in Reason::ALL {
            self.leave_episode(r, true);
        }
        info!(
            "worker {}: stopped accepting; draining {} connection(s)",
            self.id,
            self.conns.len()
        );
    }

    /// Start the upstream connect for an admitted client and take the pair
    /// into the slab. Out of descriptors, the client is parked (WRK-5).
    pub(crate) fn connect(&mut self, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let upstream = match self.connector.start(peer, dst, self.now, &self.stats) {
            Ok(u) => u,
            Err(Failed::Exhausted(e)) => return self.park(client, peer, dst, &e),
            Err(Failed::Refused) => return self.refuse(client),
        };
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut conn = Conn::new(
            (client, peer),
            (upstream, dst),
            generation,
            self.now,
            self.cfg.splice,
        );
        let registry = self.poll.registry();
        let (c, u) = conn.sockets_mut();
        // PRIORITY: urgent data changes how a direction reads (CONN-7).
        let both = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
        let registered = if slot > token::MAX_SLOT {
            Err(io::Error::other("slab slot out of token range"))
        } else {
            registry
                .register(c, token::conn(slot, Side::Client), both)
                .and_then(|()| registry.register(u, token::conn(slot, Side::Upstream), both))
        };
        if let Err(e) = registered {
            warn!("{peer} -> {dst}: register: {e}");
            let end = End {
                kind: EndKind::LocalError,
                cause: Some(e),
            };
            self.stats.closed(EndKind::LocalError).add(1);
            conn.close(&end, &mut self.bufs.pipes, &self.stats);
            self.active.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        if let Some(d) = conn.deadline(self.cfg.idle_timeout) {
            self.timers.push(d, slot, generation);
            conn.armed = Some(d);
        }
        entry.insert(conn);
        self.stats.active.add(1);
    }

    fn on_conn_event(&mut self, slot: usize, side: Side, ev: &Event) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.is_finished() {
            return; // WRK-1
        }
        let d = conn.on_event(side, ev, self.now, &mut self.bufs, &self.stats);
        // TIM-3: once established, the idle deadline may come before the
        // connect deadline the timer holds.
        if let Some(due) = conn.deadline(self.cfg.idle_timeout)
            && conn.armed.is_none_or(|a| due < a)
        {
            self.timers.push(due, slot, conn.generation);
            conn.armed = Some(due);
        }
        self.settle(slot, d);
    }

    fn settle(&mut self, slot: usize, d: Drive) {
        match d {
            Drive::Open => {}
            Drive::Again => {
                if let Some(c) = self.conns.get(slot) {
                    self.again.push((slot, c.generation));
                }
            }
            Drive::Done(end) => self.finish(slot, end),
        }
    }

    fn finish(&mut self, slot: usize, end: End) {
        if let Some(c) = self.conns.get_mut(slot)
            && !c.is_finished()
        {
            c.mark_finished();
            self.dead.push((slot, end));
        }
    }

    fn drive_again(&mut self) {
        let batch = std::mem::take(&mut self.again);
        for (slot, generation) in batch {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != generation || conn.is_finished() {
                continue;
            }
            let d = conn.drive(self.now, &mut self.bufs, &self.stats);
            self.settle(slot, d);
        }
    }

    fn fire_timers(&mut self) {
        while let Some((slot, generation, when)) = self.timers.pop_due(self.now) {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.generation != generation || conn.is_finished() || conn.armed != Some(when) {
                continue; // TIM-1, TIM-3
            }
            match conn.deadline(self.cfg.idle_timeout) {
                None => conn.armed = None,
                Some(d) if d > self.now => {
                    conn.armed = Some(d);
                    self.timers.push(d, slot, generation);
                }
                Some(_) => {
                    let end = conn.timed_out();
                    self.finish(slot, end);
                }
            }
        }
    }

    /// Free the slots of connections that ended this turn. Returns whether
    /// any did (a reason to resume paused listeners).
    fn reap(&mut self) -> bool {
        let freed = !self.dead.is_empty();
        for (slot, end) in std::mem::take(&mut self.dead) {
            if !self.conns.contains(slot) {
                continue;
            }
            let conn = self.conns.remove(slot);
            let (up, down) = conn.bytes();
            debug!(
                "{} -> {}: {} after {:.3}s, {} bytes up, {} bytes down{}",
                conn.client_addr,
                conn.orig_dst,
                end.kind.name(),
                self.now
                    .saturating_duration_since(conn.started)
                    .as_secs_f64(),
                up,
                down,
                end.cause
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            self.stats.closed(end.kind).add(1);
            self.stats.active.sub(1);
            conn.close(&end, &mut self.bufs.pipes, &self.stats);
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
        freed
    }

    fn abort_all(&mut self) {
        self.stats.waiting.set(0);
        for (client, peer, dst) in std::mem::take(&mut self.parked) {
            debug!("{peer} -> {dst}: aborted while waiting for a descriptor");
            self.stats.closed(EndKind::Aborted).add(1);
            self.refuse(client);
        }
        self.parked_retry = None;
        let slots: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for slot in slots {
            self.finish(
                slot,
                End {
                    kind: EndKind::Aborted,
                    cause: None,
                },
            );
        }
        self.reap();
    }
}
