//! Accepting and admission: taking clients from a worker's listeners under
//! `--max-conns`, finding where each was going and refusing those that must
//! not be forwarded (the proxy itself, a loop, one of our own upstream
//! connections come back, a client over `--max-conns-per-client`), parking
//! clients the proxy has no descriptor for, pausing and resuming the
//! listeners, and this worker's part in the episodes of waiting (pause.rs,
//! `accept/waiting.rs`) and of clients at their cap
//! (`accept/client_limit.rs`).
//!
//! A client's place under `--max-conns` is a [`Reservation`], taken before
//! its descriptor and held by the client from then on: by the [`Admitted`]
//! client, by a parked one, then by its connection. Dropping it gives the
//! place back, so every way a client goes — refused, reset, closed,
//! aborted, unwound by a panic — frees its place exactly once. Its place
//! under `--max-conns-per-client`, a [`ClientPlace`], goes the same way
//! beside it (ACC-2).
//!
//! The order of the checks: the `--max-conns` place first (it must be had
//! before accept(2), ACC-1, when the client's address is not yet known),
//! then where the client was going and the loop checks (so a loop is
//! counted as a loop, whoever it came from), then its own cap (ACC-3). A
//! client over its cap gives its `--max-conns` place back as it is reset:
//! at `--max-conns` the capped client waits in the backlog like any other,
//! and once taken it holds no place another client could have had.
//!
//! What must stay true (the WRK names are the ones they had in worker.rs):
//! - ACC-1 (one place per client): a client holds exactly one reservation
//!   from before accept(2) until its connection is dropped; the count of
//!   places taken never passes `--max-conns`.
//! - ACC-2..ACC-5 (`--max-conns-per-client`: one client place per admitted
//!   client, reset over the cap holding nothing, bounded memory, episodes
//!   seen once and never a flood): see `accept/client_limit.rs`.
//! - WRK-2 (never spin): when accepting is impossible (`--max-conns`, or
//!   EMFILE/ENFILE) the listener is deregistered and retried when a
//!   connection closes or after [`ACCEPT_RETRY`], not on every loop turn.
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
//!   just after its connect starts until its `Conn` drops (OWN-2; see
//!   connect.rs); a spoofed one is not (it cannot loop, and a real client
//!   may reuse its address and port), and an accepted connection that is one
//!   of them coming back (its client and destination are an upstream
//!   socket's local address and peer, whichever worker made it) is reset
//!   and counted, never forwarded. A hop that another worker accepts in the
//!   instant between an upstream connect and its registration is forwarded
//!   once; its own upstream connection, the next hop, is checked the same
//!   way, so each slip costs one more connection and the first hop caught
//!   resets the whole chain back to the client (each hop's upstream is
//!   reset, which resets its client).
//! - DST-1 (destination.rs): a connection to the proxy itself is refused.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use crate::config::Config;
use crate::own_sockets::{OwnSockets, Proto};
use crate::pause::{self, Pauses, Reason};
use crate::stats::{EndKind, WorkerStats};
use crate::sys;
use crate::tcp::{self, Destination};
use crate::token;

mod client_limit;
mod waiting;

pub use client_limit::{ClientLimits, ClientPlace};
use waiting::Waiting;

/// How long a paused listener waits before trying again when no connection
/// of this worker closed in the meantime (the limit may have been freed by
/// another worker or another process).
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// One place under `--max-conns` (ACC-1), given back when it drops.
#[derive(Debug)]
pub struct Reservation {
    active: Arc<AtomicUsize>,
}

impl Reservation {
    /// Take a place among the `max` that `active` counts across all
    /// workers; `None`, taking none, when all are taken.
    pub fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Reservation> {
        let before = active.fetch_add(1, Ordering::AcqRel);
        let r = Reservation {
            active: Arc::clone(active),
        };
        (before < max).then_some(r)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client taken in: where it was going, and its place (ACC-1). Dropping
/// it resets the client (its socket was born with linger 0, close.rs
/// CONN-8) and gives the place back.
#[derive(Debug)]
pub struct Admitted {
    pub client: TcpStream,
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    pub place: Reservation,
    /// Its place under `--max-conns-per-client` (ACC-2), if there is a cap.
    pub client_place: Option<ClientPlace>,
}

/// What one accept from a listener came to.
#[derive(Debug)]
pub enum Accept {
    /// A client to connect upstream.
    Admitted(Admitted),
    /// Nobody to connect: a client refused (and counted), or an accept that
    /// failed for that one connection. The next may be fine.
    Skipped,
    /// Nothing more from this listener this turn: it said EAGAIN, or it is
    /// paused (WRK-2).
    Stop,
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

/// One worker's listeners and the clients it takes from them.
pub struct Admission {
    id: usize,
    listeners: Vec<Listener>,
    /// Places taken under `--max-conns`, across all workers (ACC-1).
    active: Arc<AtomicUsize>,
    max_conns: usize,
    cfg: Arc<Config>,
    /// The local addresses of the process's upstream sockets (WRK-7).
    own: Arc<OwnSockets>,
    stats: Arc<WorkerStats>,
    /// Clients whose upstream socket could not be made for want of
    /// descriptors. They hold their place and wait, like clients in the
    /// backlog (WRK-5).
    parked: Vec<Admitted>,
    parked_retry: Option<Instant>,
    /// Episodes of waiting, shared by all workers (WRK-6).
    pauses: Arc<Pauses>,
    /// This worker's part in the episode of waiting for each `Reason`.
    waiting: [Option<Waiting>; Reason::ALL.len()],
    /// `--max-conns-per-client`, shared by all workers (ACC-2).
    clients: Option<Arc<ClientLimits>>,
    /// When this worker next looks for client episodes to end (ACC-5).
    next_client_sweep: Instant,
}

impl Admission {
    /// Take the worker's listeners, registered with `registry` under their
    /// tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        listeners: Vec<std::net::TcpListener>,
        registry: &Registry,
        (active, max_conns): (Arc<AtomicUsize>, usize),
        clients: Option<Arc<ClientLimits>>,
        pauses: Arc<Pauses>,
        cfg: Arc<Config>,
        own: Arc<OwnSockets>,
        stats: Arc<WorkerStats>,
    ) -> io::Result<Admission> {
        let mut ls = Vec::with_capacity(listeners.len());
        for (i, l) in listeners.into_iter().enumerate() {
            let mut sock = TcpListener::from_std(l);
            registry.register(&mut sock, token::listener(i), Interest::READABLE)?;
            ls.push(Listener {
                sock,
                state: ListenState::Active { more: true },
            });
        }
        Ok(Admission {
            id,
            listeners: ls,
            active,
            max_conns,
            cfg,
            own,
            stats,
            parked: Vec::new(),
            parked_retry: None,
            pauses,
            waiting: Default::default(),
            clients,
            next_client_sweep: Instant::now(),
        })
    }

    pub fn listeners(&self) -> usize {
        self.listeners.len()
    }

    /// Listener `i` said readable.
    pub fn readable(&mut self, i: usize) {
        if let Some(l) = self.listeners.get_mut(i)
            && let ListenState::Active { .. } = l.state
        {
            l.state = ListenState::Active { more: true };
        }
    }

    /// Has listener `i` clients to take, as far as we know (WRK-3)?
    pub fn has_more(&self, i: usize) -> bool {
        self.listeners[i].state == (ListenState::Active { more: true })
    }

    /// Is any listener known to have clients to take?
    pub fn busy(&self) -> bool {
        (0..self.listeners.len()).any(|i| self.has_more(i))
    }

    /// Look at listener `i` again as if it said readable, if it is
    /// registered; `false` if it is paused.
    pub fn rearm(&mut self, i: usize) -> bool {
        let active = matches!(self.listeners[i].state, ListenState::Active { .. });
        self.readable(i);
        active
    }

    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// When the worker must look in again without an event: a paused
    /// listener's retry, the end of a quiet spell (PAUSE-3), the parked
    /// clients' retry, the next look for client episodes to end (ACC-5).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let paused = self.listeners.iter().filter_map(|l| match l.state {
            ListenState::Paused { retry, .. } => Some(retry),
            ListenState::Active { .. } => None,
        });
        let quiet = self
            .waiting
            .iter()
            .filter_map(|w| Some(w.as_ref()?.drained? + pause::QUIET));
        let clients = self
            .clients
            .as_ref()
            .filter(|c| c.pending())
            .map(|_| self.next_client_sweep);
        paused
            .chain(quiet)
            .chain(self.parked_retry)
            .chain(clients)
            .min()
    }

    /// ACC-5: while a client episode is open, end the quiet ones every
    /// `SWEEP_EVERY` (whichever worker comes first logs them).
    pub fn sweep_client_episodes(&mut self, now: Instant) {
        if let Some(c) = &self.clients
            && c.pending()
            && now >= self.next_client_sweep
        {
            c.sweep(now, false);
            self.next_client_sweep = now + client_limit::SWEEP_EVERY;
        }
    }

    /// Take one client from listener `i`, under `--max-conns`.
    pub fn accept(&mut self, i: usize, registry: &Registry, now: Instant) -> Accept {
        // Paused since the caller looked, by a client parked in between: an
        // EAGAIN from it now would mark it active while it is deregistered,
        // and nothing would ever register it again (WRK-2).
        if let ListenState::Paused { .. } = self.listeners[i].state {
            return Accept::Stop;
        }
        // Reserve a place under --max-conns before taking a descriptor.
        let Some(place) = Reservation::take(&self.active, self.max_conns) else {
            self.pause(i, registry, now);
            let max = self.max_conns;
            self.update_waiting(Some((Reason::MaxConns, &max)), now);
            return Accept::Stop;
        };
        match self.listeners[i].sock.accept() {
            Ok((client, peer)) => {
                self.count_waited();
                self.admit(client, peer, place, now)
            }
            Err(e) => {
                drop(place);
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.listeners[i].state = ListenState::Active { more: false };
                    if self.waiting.iter().any(Option::is_some) {
                        self.update_waiting(None, now);
                    }
                    return Accept::Stop;
                }
                if sys::is_exhaustion(&e) {
                    self.pause(i, registry, now);
                    self.update_waiting(Some((Reason::FdLimit, &e)), now);
                    return Accept::Stop;
                }
                // ECONNABORTED, EPROTO, EINTR...: that one connection is
                // gone; the next may be fine.
                debug!("worker {}: accept: {e}", self.id);
                Accept::Skipped
            }
        }
    }

    /// A new client: find where it was going, and whether it may go there.
    fn admit(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        place: Reservation,
        now: Instant,
    ) -> Accept {
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
                return refuse(client, place);
            }
        };
        let dst = match dest {
            Destination::Forward(d) => d,
            Destination::RefuseDirect | Destination::RefuseLoop => {
                debug!("{peer}: refused: {dest:?} (the destination is this proxy)");
                self.stats.refused_loop.add(1);
                return refuse(client, place);
            }
        };
        if self.own.is_loop(Proto::Tcp, peer, dst) {
            self.refuse_own_upstream(peer, dst);
            return refuse(client, place);
        }
        // ACC-3: over its own cap, reset before any upstream connect; the
        // refusal gives its --max-conns place back too.
        let client_place = match &self.clients {
            None => None,
            Some(limits) => match limits.take(peer.ip()) {
                Ok(p) => Some(p),
                Err(key) => {
                    self.stats.client_limit.add(1);
                    debug!(
                        "{peer} -> {dst}: reset: client {key} holds --max-conns-per-client {}",
                        limits.max()
                    );
                    limits.over(key, now);
                    return refuse(client, place);
                }
            },
        };
        Accept::Admitted(Admitted {
            client,
            peer,
            dst,
            place,
            client_place,
        })
    }

    /// WRK-7: the client at `peer` is one of our own upstream connections,
    /// sent back to us by the host's rules. Forwarding it would start the
    /// next hop of a loop; resetting it resets the upstream connection it
    /// is, and so the client that upstream connection was for.
    fn refuse_own_upstream(&self, peer: SocketAddr, dst: SocketAddr) {
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
    }

    /// Out of descriptors for `a`'s upstream socket: it waits, holding its
    /// place, with the listeners paused, until one frees (WRK-5).
    pub fn park(&mut self, a: Admitted, e: &io::Error, registry: &Registry, now: Instant) {
        self.parked.push(a);
        self.stats.waiting.set(self.parked.len() as u64);
        self.parked_retry = Some(now + ACCEPT_RETRY);
        for i in 0..self.listeners.len() {
            self.pause(i, registry, now);
        }
        self.update_waiting(Some((Reason::FdLimit, e)), now);
    }

    /// The parked clients, to connect again, when a connection of ours
    /// closed or their retry time has come. Each either proceeds or parks
    /// again.
    pub fn take_parked(&mut self, freed: bool, now: Instant) -> Vec<Admitted> {
        match self.parked_retry {
            None => return Vec::new(),
            Some(t) if !freed && now < t => return Vec::new(),
            Some(_) => {}
        }
        self.parked_retry = None;
        self.stats.waiting.set(0);
        std::mem::take(&mut self.parked)
    }

    /// Reset the parked clients: the worker is going away.
    pub fn abort_parked(&mut self) {
        self.stats.waiting.set(0);
        for a in std::mem::take(&mut self.parked) {
            debug!(
                "{} -> {}: aborted while waiting for a descriptor",
                a.peer, a.dst
            );
            self.stats.closed(EndKind::Aborted).add(1);
        }
        self.parked_retry = None;
    }

    /// Deregister listener `i` until `ACCEPT_RETRY` from now (WRK-2), and
    /// read how many clients wait in its queue (WRK-6). The caller says why
    /// with `update_waiting`.
    fn pause(&mut self, i: usize, registry: &Registry, now: Instant) {
        let l = &mut self.listeners[i];
        if let ListenState::Active { .. } = l.state
            && let Err(e) = registry.deregister(&mut l.sock)
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
            retry: now + ACCEPT_RETRY,
            queued,
        };
    }

    /// WRK-2: paused listeners come back when a connection of ours closed,
    /// or when their retry time has come; not while clients are parked.
    pub fn resume(&mut self, freed: bool, registry: &Registry, now: Instant) {
        if !self.parked.is_empty() {
            return; // still out of descriptors: accepting would only park more
        }
        let mut changed = false;
        for i in 0..self.listeners.len() {
            let ListenState::Paused { retry, queued } = self.listeners[i].state else {
                continue;
            };
            if !freed && now < retry {
                continue;
            }
            if self.active.load(Ordering::Acquire) >= self.max_conns {
                self.pause(i, registry, now);
                let max = self.max_conns;
                self.update_waiting(Some((Reason::MaxConns, &max)), now);
                continue;
            }
            let l = &mut self.listeners[i];
            match registry.register(&mut l.sock, token::listener(i), Interest::READABLE) {
                Ok(()) => {
                    l.state = ListenState::Active { more: true };
                    changed = true;
                }
                Err(e) => {
                    warn!("worker {}: re-register listener: {e}", self.id);
                    l.state = ListenState::Paused {
                        retry: now + ACCEPT_RETRY,
                        queued,
                    };
                }
            }
        }
        if changed {
            self.update_waiting(None, now);
        }
    }

    /// Close the listeners (WRK-4): whoever still waits in their queues is
    /// reset by the kernel, so this worker's episodes end here.
    pub fn close(&mut self, registry: &Registry, now: Instant) {
        for mut l in self.listeners.drain(..) {
            if let ListenState::Active { .. } = l.state {
                let _ = registry.deregister(&mut l.sock);
            }
        }
        self.stats.accept_queue.set(0);
        for r in Reason::ALL {
            self.leave_episode(r, true, now);
        }
    }
}

/// Refuse a client: its close is the reset (its socket was born with
/// linger 0, close.rs CONN-8), then its place is given back. The caller
/// counts why.
fn refuse(client: TcpStream, place: Reservation) -> Accept {
    drop(client);
    drop(place);
    Accept::Skipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Command};

    /// An admission with one listener on loopback, and its address.
    fn admission(poll: &mio::Poll) -> (Admission, SocketAddr) {
        let cfg = match config::parse(["--port", "1"]) {
            Ok(Command::Run(c)) => c,
            other => panic!("{other:?}"),
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let a = Admission::new(
            0,
            vec![l],
            poll.registry(),
            (Arc::new(AtomicUsize::new(0)), 100),
            None,
            Arc::new(Pauses::default()),
            Arc::new(cfg),
            Arc::new(OwnSockets::new()),
            Arc::new(WorkerStats::default()),
        )
        .unwrap();
        (a, addr)
    }

    #[test]
    fn a_listener_paused_by_a_parked_client_comes_back_when_it_goes() {
        // WRK-2, WRK-5: the worker goes on accepting from a listener after
        // connecting a client; if that client was parked, the listener was
        // paused meanwhile, and must not be taken for an active one that
        // has run dry: deregistered but never resumed, it would be lost.
        let poll = mio::Poll::new().unwrap();
        let (mut adm, addr) = admission(&poll);
        let now = Instant::now();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let a = loop {
            match adm.accept(0, poll.registry(), now) {
                Accept::Admitted(a) => break a,
                Accept::Stop => std::thread::sleep(Duration::from_millis(1)),
                Accept::Skipped => panic!("loopback client refused"),
            }
        };
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        adm.park(a, &emfile, poll.registry(), now);
        assert!(!adm.has_more(0), "paused");
        // The rest of the worker's batch for this listener.
        assert!(matches!(adm.accept(0, poll.registry(), now), Accept::Stop));
        // A descriptor frees: the parked client goes on, then the listener
        // comes back.
        let parked = adm.take_parked(true, now);
        assert_eq!(parked.len(), 1);
        drop(parked);
        adm.resume(true, poll.registry(), now);
        assert!(adm.has_more(0), "the listener is back");
    }

    #[test]
    fn a_reservation_gives_its_place_back_when_it_drops() {
        let active = Arc::new(AtomicUsize::new(0));
        let a = Reservation::take(&active, 2).expect("room for two");
        let b = Reservation::take(&active, 2).expect("room for two");
        assert_eq!(active.load(Ordering::Acquire), 2);
        drop(a);
        assert_eq!(active.load(Ordering::Acquire), 1);
        drop(b);
        assert_eq!(active.load(Ordering::Acquire), 0);
    }

    #[test]
    fn at_the_limit_no_place_is_taken() {
        let active = Arc::new(AtomicUsize::new(0));
        let held: Vec<Reservation> = (0..3)
            .map(|_| Reservation::take(&active, 3).expect("under the limit"))
            .collect();
        assert!(Reservation::take(&active, 3).is_none());
        assert_eq!(active.load(Ordering::Acquire), 3, "the refusal took none");
        drop(held);
        assert_eq!(active.load(Ordering::Acquire), 0);
        assert!(Reservation::take(&active, 3).is_some());
    }

    #[test]
    fn places_are_shared_by_all_workers_and_never_over_the_limit() {
        let active = Arc::new(AtomicUsize::new(0));
        let max = 50;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let active = Arc::clone(&active);
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..2_000 {
                        if let Some(r) = Reservation::take(&active, max) {
                            held.push(r);
                        }
                        assert!(active.load(Ordering::Acquire) <= max + 4);
                        if round % 3 == 0 {
                            held.pop();
                        }
                    }
                    held
                })
            })
            .collect();
        // Every thread's places are still held here.
        let held: Vec<Vec<Reservation>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let total: usize = held.iter().map(Vec::len).sum();
        assert!(total <= max, "{total} places held under a limit of {max}");
        assert_eq!(active.load(Ordering::Acquire), total);
        drop(held);
        assert_eq!(active.load(Ordering::Acquire), 0, "every place given back");
    }
}
