//! One worker thread: its own listeners (SO_REUSEPORT), its own mio `Poll`,
//! a slab of connections, a pipe pool and a timer heap. Nothing in here is
//! shared with another worker except the global connection count used to
//! hold `--max-conns` and the per-client counts of `--max-conns-per-client`
//! (tcp/accept/client_limit.rs), each touched once per accept and once per
//! close, the episodes of waiting (pause.rs), touched only while accepting
//! is paused, and the registry of the process's own upstream sockets
//! (own_sockets), touched once per accept, connect and close.
//!
//! The loop: poll -> dispatch events -> accept -> re-drive connections that
//! used up their budget -> fire timers -> reap finished connections ->
//! resume paused listeners. Each stage of a connection is in its own room
//! under tcp/: accepting and admission (accept.rs), where it goes
//! (destination.rs), connecting (connect.rs), the connection's state machine
//! (conn.rs), the relay (relay.rs) and closing (close.rs). This file holds
//! only the loop and the slab the stages meet in.
//!
//! What must stay true:
//! - WRK-1 (no stale events): a finished connection keeps its slab slot until
//!   the end of the loop turn; only then is the slot freed, so an event later
//!   in the same batch can never reach a new connection in a reused slot.
//!   Timer entries carry a generation for the same reason (TIM-1).
//! - WRK-3 (bounded turns): accepting and driving each do a bounded amount
//!   per turn; leftover work makes the next poll non-blocking instead of
//!   being dropped (edge-triggered readiness is not repeated by the kernel).
//! - WRK-4 (drain): on shutdown, pending connections in the accept queue are
//!   taken before the listeners close, then open connections run until done
//!   or until the drain deadline, when they are reset. Every other way out
//!   of the loop resets what is open too: a failed poll through
//!   `abort_all`, a panic by unwinding into the drop of the slab and the
//!   parked clients, whose sockets are armed (close.rs CONN-8).
//! - WRK-2 (never spin), WRK-5 (wait, don't reset, when out of
//!   descriptors), WRK-6 (waiting is seen) and WRK-7 (no loop through the
//!   host's rules) are admission's: see tcp/accept.rs, and tcp/connect.rs
//!   for WRK-7's registration of the upstream sockets.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, error, info, warn};
use mio::event::Event;
use mio::{Events, Interest, Poll};
use slab::Slab;

use crate::busy_poll::BusyPoll;
use crate::config::Config;
use crate::control::Control;
use crate::own_sockets::OwnSockets;
use crate::pause::Pauses;
use crate::stats::{EndKind, WorkerStats};
use crate::tcp::accept::{Accept, Admission, Admitted, ClientLimits};
use crate::tcp::close::End;
use crate::tcp::conn::{Conn, Drive};
use crate::tcp::connect::{Connector, Failed};
use crate::tcp::pipe::Buffers;
use crate::tcp::source::Exhaustion;
use crate::timers::Timers;
use crate::token::{self, Kind, Side};

/// Connections accepted from one listener per loop turn (WRK-3).
const ACCEPT_BATCH: usize = 64;
/// Events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// Empty pipes a worker keeps for reuse. Each costs two descriptors; 256
/// covers the connections that are moving bytes at any one instant on a busy
/// worker without holding thousands of fds idle.
const MAX_POOLED_PIPES: usize = 256;

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
    /// `--max-conns-per-client`, shared by all workers (accept.rs ACC-2).
    pub clients: Option<Arc<ClientLimits>>,
    /// Episodes of waiting, shared by all workers (WRK-6).
    pub pauses: Arc<Pauses>,
    pub cfg: Arc<Config>,
    /// The local addresses of the process's upstream sockets (WRK-7).
    pub own: Arc<OwnSockets>,
    /// Source-port exhaustion episodes, for the whole process (SRC-3).
    pub ports: Arc<Exhaustion>,
}

pub struct Worker {
    id: usize,
    poll: Poll,
    control: Receiver<Control>,
    /// The listeners and the clients taken from them (tcp/accept.rs).
    admission: Admission,
    /// The upstream connects (tcp/connect.rs).
    connector: Connector,
    conns: Slab<Conn>,
    bufs: Buffers,
    timers: Timers,
    stats: Arc<WorkerStats>,
    cfg: Arc<Config>,
    next_generation: u64,
    /// Connections that hit their budget this turn: (slot, generation).
    again: Vec<(usize, u64)>,
    /// Connections that ended this turn, reaped at its end (WRK-1).
    dead: Vec<(usize, End)>,
    drain_deadline: Option<Instant>,
    now: Instant,
    /// `--busy-poll`: poll without sleeping for a while after events.
    busy: BusyPoll,
}

impl Worker {
    pub fn new(s: Setup) -> io::Result<Worker> {
        let admission = Admission::new(
            s.id,
            s.listeners,
            s.poll.registry(),
            (s.active, s.max_conns),
            s.clients,
            s.pauses,
            Arc::clone(&s.cfg),
            Arc::clone(&s.own),
            Arc::clone(&s.stats),
        )?;
        Ok(Worker {
            id: s.id,
            poll: s.poll,
            control: s.control,
            admission,
            connector: Connector::new(Arc::clone(&s.cfg), s.id, s.own, s.ports),
            conns: Slab::with_capacity(1024),
            bufs: Buffers::new(
                s.cfg.pipe_size,
                s.cfg.bulk_pipe_size.unwrap_or(s.cfg.pipe_size),
                MAX_POOLED_PIPES,
            ),
            timers: Timers::default(),
            stats: s.stats,
            busy: BusyPoll::new(s.cfg.busy_poll),
            cfg: s.cfg,
            next_generation: 0,
            again: Vec::new(),
            dead: Vec::new(),
            drain_deadline: None,
            now: Instant::now(),
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let timeout = self.busy.timeout(self.poll_timeout());
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
            if !events.is_empty() {
                self.busy.saw_events(self.now);
            }
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    Kind::Waker => self.on_control(),
                    Kind::Listener(i) => self.admission.readable(i),
                    Kind::Conn { slot, side } => self.on_conn_event(slot, side, ev),
                }
            }
            self.accept_ready();
            self.drive_again();
            self.fire_timers();
            let freed = self.reap();
            self.resume_listeners(freed);
            self.admission.leave_quiet_episodes(self.now);
            self.admission.sweep_client_episodes(self.now);
            if let Some(deadline) = self.drain_deadline {
                if self.conns.is_empty() && !self.admission.has_parked() {
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
        if !self.again.is_empty() || self.admission.busy() {
            return Some(Duration::ZERO);
        }
        self.timers
            .next()
            .into_iter()
            .chain(self.admission.next_wakeup())
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
        for i in 0..self.admission.listeners() {
            // Bounded so a flood cannot hold shutdown forever.
            for _ in 0..64 {
                if !self.admission.rearm(i) {
                    break; // paused: not taking any more now
                }
                self.accept_from(i);
                if !self.admission.has_more(i) {
                    break;
                }
            }
        }
        self.admission.close(self.poll.registry(), self.now);
        info!(
            "worker {}: stopped accepting; draining {} connection(s)",
            self.id,
            self.conns.len()
        );
    }

    fn accept_ready(&mut self) {
        for i in 0..self.admission.listeners() {
            if self.admission.has_more(i) {
                self.accept_from(i);
            }
        }
    }

    /// Accept up to `ACCEPT_BATCH` clients from listener `i` (WRK-3) and
    /// start their connects.
    fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            match self.admission.accept(i, self.poll.registry(), self.now) {
                Accept::Admitted(a) => self.connect(a),
                Accept::Skipped => {}
                Accept::Stop => return,
            }
        }
    }

    /// Start the upstream connect for an admitted client and take the pair
    /// into the slab. Out of descriptors, the client is parked (WRK-5);
    /// refused, dropping it resets it and frees its place.
    fn connect(&mut self, a: Admitted) {
        let upstream = match self.connector.start(a.peer, a.dst, self.now, &self.stats) {
            Ok(u) => u,
            Err(Failed::Exhausted(e)) => {
                return self.admission.park(a, &e, self.poll.registry(), self.now);
            }
            Err(Failed::Refused) => return,
        };
        let (peer, dst) = (a.peer, a.dst);
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut conn = Conn::new(
            (a.client, peer),
            (upstream, dst),
            (a.place, a.client_place),
            generation,
            self.now,
            self.cfg.splice,
            self.cfg.send_proxy,
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
            // Closing drops the connection, and with it its place under
            // --max-conns (ACC-1).
            conn.close(&end, &mut self.bufs.pipes, &self.stats);
        }
        freed
    }

    /// WRK-2: retry the parked clients' connects when a connection of ours
    /// closed or their retry time has come, then bring back the paused
    /// listeners.
    fn resume_listeners(&mut self, freed: bool) {
        for a in self.admission.take_parked(freed, self.now) {
            self.connect(a);
        }
        self.admission.resume(freed, self.poll.registry(), self.now);
    }

    fn abort_all(&mut self) {
        self.admission.abort_parked();
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
