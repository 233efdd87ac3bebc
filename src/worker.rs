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

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
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
use crate::own_sockets::{OwnSockets, Proto};
use crate::pause::{self, Pauses, Reason};
use crate::stats::{EndKind, WorkerStats};
use crate::sys::{self, Source};
use crate::tcp::close::End;
use crate::tcp::conn::{Conn, Drive};
use crate::tcp::pipe::Buffers;
use crate::tcp::source::{Exhaustion, NoPort, Sources};
use crate::tcp::{self, Destination};
use crate::timers::Timers;
use crate::token::{self, Kind, Side};

/// Connections accepted from one listener per loop turn (WRK-3).
const ACCEPT_BATCH: usize = 64;
/// How long a paused listener waits before trying again when no connection
/// of this worker closed in the meantime (the limit may have been freed by
/// another worker or another process).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListenState {
    /// Registered; `more` when the last turn stopped before EAGAIN.
    Active { more: bool },
    /// Deregistered until `retry` or until a connection closes (WRK-2);
    /// `queued` clients were in its accept queue when last read (WRK-6).
    Paused { retry: Instant, queued: u64 },
}

struct Listener {
    sock: TcpListener,
    state: ListenState,
}

pub struct Worker {
    id: usize,
    poll: Poll,
    listeners: Vec<Listener>,
    control: Receiver<Control>,
    conns: Slab<Conn>,
    bufs: Buffers,
    timers: Timers,
    stats: Arc<WorkerStats>,
    active: Arc<AtomicUsize>,
    max_conns: usize,
    cfg: Arc<Config>,
    own: Arc<OwnSockets>,
    /// `--source` addresses, taken in turn (SRC-1).
    sources: Sources,
    /// Where no source port was free a moment ago (SRC-4).
    no_port: NoPort,
    ports: Arc<Exhaustion>,
    upstream_opts: sys::UpstreamOpts,
    next_generation: u64,
    /// Connections that hit their budget this turn: (slot, generation).
    again: Vec<(usize, u64)>,
    /// Connections that ended this turn, reaped at its end (WRK-1).
    dead: Vec<(usize, End)>,
    drain_deadline: Option<Instant>,
    now: Instant,
    /// Accepted clients whose upstream socket could not be made for want of
    /// descriptors: (client, peer, destination). They hold their `active`
    /// reservation and wait, like clients in the backlog (WRK-5).
    parked: Vec<(TcpStream, SocketAddr, SocketAddr)>,
    parked_retry: Option<Instant>,
    pauses: Arc<Pauses>,
    /// This worker's part in the episode of waiting for each `Reason`.
    waiting: [Option<Waiting>; Reason::ALL.len()],
}

/// A worker's part in an episode of waiting (pause.rs).
#[derive(Debug, Default)]
struct Waiting {
    /// Clients waiting for this worker, as last reported to the episode.
    reported: u64,
    /// Clients this worker accepted after they waited.
    accepted: u64,
    /// Nobody has waited for this worker since then (PAUSE-3).
    drained: Option<Instant>,
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
            upstream_opts: sys::UpstreamOpts { mark: s.cfg.mark },
            sources: Sources::new(&s.cfg.sources, s.id),
            no_port: NoPort::default(),
            cfg: s.cfg,
            own: s.own,
            ports: s.ports,
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

    fn accept_ready(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].state == (ListenState::Active { more: true }) {
                self.accept_from(i);
            }
        }
    }

    /// Accept up to `ACCEPT_BATCH` connections from listener `i`.
    fn accept_from(&mut self, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            // Reserve a place under --max-conns before taking a descriptor.
            if self.active.fetch_add(1, Ordering::AcqRel) >= self.max_conns {
                self.active.fetch_sub(1, Ordering::AcqRel);
                self.pause(i);
                let max = self.max_conns;
                self.update_waiting(Some((Reason::MaxConns, &max)));
                return;
            }
            match self.listeners[i].sock.accept() {
                Ok((stream, peer)) => {
                    self.count_waited();
                    self.admit(stream, peer);
                }
                Err(e) => {
                    self.active.fetch_sub(1, Ordering::AcqRel);
                    if e.kind() == io::ErrorKind::WouldBlock {
                        self.listeners[i].state = ListenState::Active { more: false };
                        if self.waiting.iter().any(Option::is_some) {
                            self.update_waiting(None);
                        }
                        return;
                    }
                    if sys::is_exhaustion(&e) {
                        self.pause(i);
                        self.update_waiting(Some((Reason::FdLimit, &e)));
                        return;
                    }
                    // ECONNABORTED, EPROTO, EINTR...: that one connection is
                    // gone; the next may be fine.
                    debug!("worker {}: accept: {e}", self.id);
                }
            }
        }
    }

    /// Clients waiting for this worker for `r`: in its paused listeners'
    /// queues as last read, and, out of descriptors, parked (WRK-5).
    fn waiting_for(&self, r: Reason) -> u64 {
        let queued = self.queued();
        match r {
            Reason::MaxConns => queued,
            Reason::FdLimit => queued + self.parked.len() as u64,
        }
    }

    /// Clients in the paused listeners' accept queues, as last read.
    fn queued(&self) -> u64 {
        self.listeners
            .iter()
            .map(|l| match l.state {
                ListenState::Paused { queued, .. } => queued,
                ListenState::Active { .. } => 0,
            })
            .sum()
    }

    /// WRK-6, after a listener paused or resumed or a client parked: publish
    /// who waits for this worker, join the episode for `why` (the reason,
    /// and the limit or error for its warning) if somebody waits for that
    /// reason, and note when nobody waits any more (PAUSE-3). Never called
    /// while accepting freely.
    fn update_waiting(&mut self, why: Option<(Reason, &dyn fmt::Display)>) {
        self.stats.accept_queue.set(self.queued());
        if let Some((r, cause)) = why
            && self.waiting_for(r) > 0
        {
            match &mut self.waiting[r as usize] {
                Some(w) => w.drained = None,
                None => {
                    self.waiting[r as usize] = Some(Waiting::default());
                    if self.pauses.join(r, self.now) {
                        self.start_episode(r, cause);
                    }
                }
            }
        }
        // Nobody waits: nothing is parked, and each listener either said
        // EAGAIN or is paused with an empty queue.
        let nobody = self.parked.is_empty()
            && self.listeners.iter().all(|l| {
                matches!(
                    l.state,
                    ListenState::Active { more: false } | ListenState::Paused { queued: 0, .. }
                )
            });
        for r in Reason::ALL {
            let n = self.waiting_for(r);
            if let Some(w) = &mut self.waiting[r as usize] {
                self.pauses.report(r, w.reported, n);
                w.reported = n;
                if nobody {
                    w.drained.get_or_insert(self.now);
                }
            }
        }
    }

    /// This worker started the process's episode for `r`: count it and say
    /// so, once for all workers (PAUSE-1).
    fn start_episode(&self, r: Reason, cause: &dyn fmt::Display) {
        match r {
            Reason::MaxConns => {
                self.stats.accept_pauses_max_conns.add(1);
                warn!(
                    "accepting paused at --max-conns {cause}: new clients wait in the accept \
                     queues until connections close"
                );
            }
            Reason::FdLimit => {
                self.stats.accept_pauses_fd.add(1);
                warn!("accepting paused: {cause}: new connections wait until a descriptor frees");
            }
        }
    }

    /// A client was accepted: if it waited, count it (WRK-6).
    fn count_waited(&mut self) {
        let mut waited = false;
        for w in self.waiting.iter_mut().flatten() {
            if w.drained.is_none() {
                w.accepted += 1;
                waited = true;
            }
        }
        if waited {
            self.stats.accepted_after_waiting.add(1);
        }
    }

    /// Leave the episodes nobody has waited in for `pause::QUIET` (PAUSE-3).
    fn leave_quiet_episodes(&mut self) {
        for r in Reason::ALL {
            if let Some(w) = &self.waiting[r as usize]
                && w.drained.is_some_and(|d| self.now >= d + pause::QUIET)
            {
                self.leave_episode(r, false);
            }
        }
    }

    /// Leave the episode for `r`; the last worker out says what it came to.
    fn leave_episode(&mut self, r: Reason, shutdown: bool) {
        let Some(w) = self.waiting[r as usize].take() else {
            return;
        };
        // Cut short by shutdown only if somebody still waited.
        let ended = if shutdown && w.drained.is_none() {
            "ended by shutdown"
        } else {
            "resumed"
        };
        let drained = w.drained.unwrap_or(self.now);
        let Some(s) = self.pauses.leave(r, w.reported, w.accepted, drained) else {
            return;
        };
        let (at, queues) = match r {
            Reason::MaxConns => (
                format!("at --max-conns {}", self.max_conns),
                "in the accept queues",
            ),
            Reason::FdLimit => (
                "out of descriptors".to_string(),
                "in the accept queues or for a descriptor",
            ),
        };
        warn!(
            "accepting {ended} after {:.1}s {at}: {} clients accepted after waiting, at most {} {queues} at once",
            s.lasted.as_secs_f64(),
            s.accepted,
            s.peak
        );
    }

    /// Retry the connects of parked clients when a connection of ours closed
    /// or their retry time has come. Each either proceeds or parks again.
    fn retry_parked(&mut self, freed: bool) {
        match self.parked_retry {
            None => return,
            Some(t) if !freed && self.now < t => return,
            Some(_) => {}
        }
        self.parked_retry = None;
        self.stats.waiting.set(0);
        for (client, peer, dst) in std::mem::take(&mut self.parked) {
            self.connect(client, peer, dst);
        }
    }

    /// Deregister listener `i` until `ACCEPT_RETRY` from now (WRK-2), and
    /// read how many clients wait in its queue (WRK-6). The caller says why
    /// with `update_waiting`.
    fn pause(&mut self, i: usize) {
        let l = &mut self.listeners[i];
        if let ListenState::Active { .. } = l.state
            && let Err(e) = self.poll.registry().deregister(&mut l.sock)
        {
            warn!("worker {}: deregister listener: {e}", self.id);
        }
        let queued = match sys::accept_queue(&l.sock) {
            Ok(q) => u64::from(q.len),
            Err(e) => {
                debug!("worker {}: accept queue: {e}", self.id);
                0
            }
        };
        l.state = ListenState::Paused {
            retry: self.now + ACCEPT_RETRY,
            queued,
        };
    }

    /// WRK-2: paused listeners come back when a connection of ours closed,
    /// or when their retry time has come.
    fn resume_listeners(&mut self, freed: bool) {
        self.retry_parked(freed);
        if !self.parked.is_empty() {
            return; // still out of descriptors: accepting would only park more
        }
        let mut changed = false;
        for i in 0..self.listeners.len() {
            let ListenState::Paused { retry, queued } = self.listeners[i].state else {
                continue;
            };
            if !freed && self.now < retry {
                continue;
            }
            if self.active.load(Ordering::Acquire) >= self.max_conns {
                self.pause(i);
                let max = self.max_conns;
                self.update_waiting(Some((Reason::MaxConns, &max)));
                continue;
            }
            let l = &mut self.listeners[i];
            match self
                .poll
                .registry()
                .register(&mut l.sock, token::listener(i), Interest::READABLE)
            {
                Ok(()) => {
                    l.state = ListenState::Active { more: true };
                    changed = true;
                }
                Err(e) => {
                    warn!("worker {}: re-register listener: {e}", self.id);
                    l.state = ListenState::Paused {
                        retry: self.now + ACCEPT_RETRY,
                        queued,
                    };
                }
            }
        }
        if changed {
            self.update_waiting(None);
        }
    }

    /// A new client: find where it was going, start the upstream connect and
    /// take it into the slab. Holds one `active` reservation, released here
    /// on every path that does not keep the connection.
    fn admit(&mut self, client: TcpStream, peer: SocketAddr) {
        let peer = sys::canonical(peer);
        self.stats.accepted.add(1);
        let dest = match client.local_addr() {
            Ok(local) => {
                let fd = client.as_raw_fd();
                let v6 = local.is_ipv6();
                tcp::destination(
                    local,
                    self.cfg.port,
                    &mut sys::is_local_address,
                    &mut || sys::nat_original_dst(fd, v6),
                )
            }
            Err(e) => {
                debug!("{peer}: getsockname: {e}");
                self.stats.closed(EndKind::ClientReset).add(1);
                self.refuse(client);
                return;
            }
        };
        let dst = match dest {
            Destination::Forward(d) => d,
            Destination::RefuseDirect | Destination::RefuseLoop => {
                debug!("{peer}: refused: {dest:?} (the destination is this proxy)");
                self.stats.refused_loop.add(1);
                self.refuse(client);
                return;
            }
        };
        if self.own.is_loop(Proto::Tcp, peer, dst) {
            self.refuse_own_upstream(client, peer, dst);
            return;
        }
        self.connect(client, peer, dst);
    }

    /// WRK-7: `client` is one of our own upstream connections, sent back to
    /// us by the host's rules. Forwarding it would start the next hop of a
    /// loop; resetting it resets the upstream connection it is, and so the
    /// client that upstream connection was for.
    fn refuse_own_upstream(&mut self, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        self.stats.refused_own_upstream.add(1);
        if self.own.first_loop() {
            let (exempt, mark) = match self.cfg.mark {
                Some(m) => (format!("tproxyd's --mark {m:#x}"), m),
                None => (
                    "a mark for tproxyd (it has none: start it with --mark 2)".into(),
                    2,
                ),
            };
            warn!(
                "{peer} -> {dst} is tproxyd's own upstream connection coming back: the host's rules \
                 send the proxy's own traffic back into it (a loop). Such connections are reset, and so \
                 are the clients they were for. Fix: exempt {exempt} in the rule that marks this host's \
                 own traffic (nft: `meta mark {mark:#x} return` first in the output chain; scripts/rules \
                 --local does it). Counted in tproxyd_tcp_loop_refusals_total{{reason=\"own_upstream\"}}; \
                 logged once."
            );
        } else {
            debug!("{peer} -> {dst}: refused: our own upstream connection (a loop)");
        }
        self.refuse(client);
    }

    /// Start the upstream connect for an accepted client and take the pair
    /// into the slab. Out of descriptors, the client is parked (WRK-5).
    fn connect(&mut self, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        // WRK-7: a spoofed upstream socket (the client's own address) is not
        // registered. A real client may open a connection from exactly its
        // address and port, which the router's kernel chose without seeing
        // the client's, to the same server (the soak met it 26 times in
        // 215,712 connections): not a loop, and it must be served. Nor can a
        // spoofed upstream loop: its SYN, sent back into the proxy, gets a
        // SYN-ACK addressed to the real client, which resets it, so no hop
        // is ever accepted.
        let spoofed = self.cfg.spoof_source && peer.is_ipv4() == dst.is_ipv4();
        let upstream = self.open_upstream(peer, dst).and_then(|s| {
            // WRK-7: the kernel chose the address and port in connect.
            let entry = if spoofed {
                None
            } else {
                let local = s.local_addr()?;
                Some(self.own.hold(Proto::Tcp, local, Some(dst)))
            };
            Ok((s, entry))
        });
        let (upstream, own_entry) = match upstream {
            Ok((s, entry)) => (TcpStream::from_std(s), entry),
            Err(e) if sys::is_exhaustion(&e) => {
                self.parked.push((client, peer, dst));
                self.stats.waiting.set(self.parked.len() as u64);
                self.parked_retry = Some(self.now + ACCEPT_RETRY);
                for i in 0..self.listeners.len() {
                    self.pause(i);
                }
                self.update_waiting(Some((Reason::FdLimit, &e)));
                return;
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                self.no_source_port(client, peer, dst, &e);
                return;
            }
            Err(e) => {
                let kind = if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                    EndKind::ConnectRefused
                } else {
                    EndKind::ConnectError
                };
                debug!("{peer} -> {dst}: connect: {e}");
                self.stats.closed(kind).add(1);
                self.refuse(client);
                return;
            }
        };
        if let Some(ep) = self.ports.succeeded(self.now) {
            info!(
                "source ports: connects succeed again; {} failed for want of a source port over \
                 {:.3} s, the first towards {}",
                ep.failed,
                ep.last_failure
                    .saturating_duration_since(ep.started)
                    .as_secs_f64(),
                ep.first_dst
            );
        }
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut conn = Conn::new(
            (client, peer),
            (upstream, dst),
            own_entry,
            generation,
            self.now,
            self.cfg.connect_timeout,
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

    /// The upstream socket for a client: with `--spoof-source` from the
    /// client's own address (same family, as TPROXY never changes it);
    /// otherwise from the family's next `--source` address in turn, and on
    /// EADDRNOTAVAIL from each of the others (SRC-1, SRC-2); with none, from
    /// wherever the host's routing says. A source that had no port towards
    /// `dst` a moment ago is skipped (SRC-4).
    fn open_upstream(
        &mut self,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<std::net::TcpStream> {
        let (opts, now) = (self.upstream_opts, self.now);
        if self.cfg.spoof_source && peer.is_ipv4() == dst.is_ipv4() {
            return sys::connect_upstream(dst, opts, Source::Foreign(peer.ip()));
        }
        let no_port = &mut self.no_port;
        let mut attempt = |src: Option<IpAddr>| -> io::Result<std::net::TcpStream> {
            if no_port.skip(now, src, dst) {
                return Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
            }
            let source = src.map_or(Source::Host, Source::Local);
            let r = sys::connect_upstream(dst, opts, source);
            match &r {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    no_port.failed(now, src, dst)
                }
                Ok(_) => no_port.succeeded(src, dst),
                Err(_) => {}
            }
            r
        };
        let mut last = None;
        for ip in self.sources.for_connection(dst.is_ipv6()) {
            match attempt(Some(ip)) {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => last = Some(e),
                other => return other,
            }
        }
        match last {
            Some(e) => Err(e),
            None => attempt(None),
        }
    }

    /// No source port is free towards `dst` from any address we may use:
    /// the client is reset (it learns at once, as it would from a refused
    /// connect), counted, and warned about once per episode (SRC-3).
    fn no_source_port(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        e: &io::Error,
    ) {
        self.stats.closed(EndKind::NoSourcePort).add(1);
        if self.ports.failed(self.now, dst) {
            let family: Vec<String> = self
                .cfg
                .sources
                .iter()
                .filter(|ip| ip.is_ipv6() == dst.is_ipv6())
                .map(|ip| ip.to_string())
                .collect();
            let from = if family.is_empty() {
                "from the host's own address".to_string()
            } else {
                format!("from --source {}", family.join(", "))
            };
            warn!(
                "{peer} -> {dst}: connect: {e}: no source port is free towards {dst} {from} (every \
                 local port is in use or in TIME_WAIT). Clients are reset until ports free; counted in \
                 tproxyd_tcp_connect_errors_total{{kind=\"no_source_port\"}}; logged once per episode. \
                 Fix: more --source addresses, net.ipv4.tcp_tw_reuse=1 (tune/sysctl.conf), a wider \
                 net.ipv4.ip_local_port_range; `tproxyd doctor` does the arithmetic."
            );
        } else {
            debug!("{peer} -> {dst}: connect: {e} (no source port)");
        }
        self.refuse(client);
    }

    /// Close a client we will not serve, with RST so it knows at once: its
    /// socket was born with linger 0 (CONN-8), so the close is the reset.
    /// The caller counts why.
    fn refuse(&mut self, client: TcpStream) {
        drop(client);
        self.active.fetch_sub(1, Ordering::AcqRel);
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
