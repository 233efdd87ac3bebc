//! One UDP worker: its own `Poll`, its own transparent UDP listeners
//! (SO_REUSEPORT: with `--udp-workers N` the kernel spreads clients over
//! the workers by a hash of the client's address and port, so each client
//! address and port always reaches the same worker), its NAT mappings and
//! its reply sockets.
//!
//! A datagram from a client arrives on a listener with its original
//! destination in a control message. Its mapping ([`nat`]: one per client
//! address and port, or per destination in `symmetric` mode) owns an
//! upstream socket carrying `--mark`, bound to this host's address (or with
//! `--spoof-source` to the client's own address and port) and, in
//! `symmetric` mode, connected to the destination. What comes back on it
//! from a remote R is let through or not by the mapping's filter, and sent
//! to the client through a reply socket bound (transparently) to R, so it
//! comes from exactly the address the client sees R at. Reply sockets are
//! made on demand, shared by the mappings, and bounded like the mappings.
//!
//! This file holds the loop, the worker's state and a mapping's end; each
//! stage of a datagram's trip has a room: `worker/from_client.rs` (read,
//! find or open the mapping), `worker/to_client.rs` (read replies, filter,
//! reply as the remote) and `worker/send.rs` (batched sends, GSO).
//!
//! What must stay true:
//! - UDP-1: a datagram whose original destination is missing, malformed or
//!   this proxy itself, or which came back through this host from one of
//!   the proxy's own upstream sockets (a routing loop, `OwnSockets`), is
//!   dropped and counted, never forwarded.
//! - UDP-2: a datagram reaches the client from the exact address and port
//!   it came from (in `symmetric` mode, the one the client sent to).
//! - UDP-3: every mapping's upstream socket and registration are released
//!   on every way out (expiry, eviction, ICMP error, send error, shutdown),
//!   and reply sockets are bounded and expire: the worker's descriptors stay
//!   within `2 * max_sessions` plus its listeners.
//! - UDP-4: the cost of a tick does not grow with the number of mappings
//!   (the table's SES-4); reading is bounded per turn and leftover
//!   readiness makes the next poll non-blocking (edge-triggered).
//! - UDP-5: datagrams are forwarded whole and in order per flow; GRO and GSO
//!   change how many system calls and packets carry them, never the
//!   datagrams themselves (batch BAT-1, sys UDPSYS-1/2).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, error, info};
use mio::event::Event;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll};

use crate::busy_poll::BusyPoll;
use crate::config::Config;
use crate::control::Control;
use crate::own_sockets::{OwnSockets, Proto};
use crate::stats::{UdpEnd, UdpStats};
use crate::sys::{self, BATCH, RecvBatch};
use crate::token::{self, UdpKind};
use crate::udp::batch::Part;
use crate::udp::nat::{NatMode, Peers, SessionKey};
use crate::udp::table::{Direction, Session, SessionId, SessionTable};

mod from_client;
mod send;
mod to_client;

/// recvmmsg batches per socket per loop turn before serving others.
const MAX_ROUNDS: usize = 8;
/// After SIGTERM the listeners close at once; replies already on their way
/// are still relayed for this long (or until the drain deadline, if sooner).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// An ICMP error reported on a socket: the destination cannot be reached.
fn is_unreachable(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(sys::is_unreachable_errno)
}

/// What a mapping holds.
struct Mapping {
    sock: UdpSocket,
    /// The socket's own address, as registered in `OwnSockets`.
    local: SocketAddr,
    /// Endpoint-independent modes: the remotes the client sent to.
    peers: Peers,
    /// UDP_SEGMENT works from this socket (cleared the first time the
    /// kernel refuses it).
    gso: bool,
}

/// A socket bound to one remote's address, for sending to clients as it.
struct Reply {
    sock: std::net::UdpSocket,
    gso: bool,
}

pub struct Setup {
    pub id: usize,
    pub poll: Poll,
    pub listeners: Vec<std::net::UdpSocket>,
    pub control: Receiver<Control>,
    pub stats: Arc<UdpStats>,
    pub cfg: Arc<Config>,
    pub own: Arc<OwnSockets>,
    /// This worker's share of `--udp-max-sessions`.
    pub max_sessions: usize,
}

/// A datagram run to send: which socket (mapping), to where.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Run {
    id: SessionId,
    to: SocketAddr,
}

pub struct UdpWorker {
    id: usize,
    poll: Poll,
    listeners: Vec<(UdpSocket, bool)>,
    control: Receiver<Control>,
    stats: Arc<UdpStats>,
    cfg: Arc<Config>,
    mode: NatMode,
    mappings: SessionTable<SessionKey, Mapping>,
    replies: SessionTable<SocketAddr, Reply>,
    /// Taken out while its datagrams are handled, so `self` stays free.
    batch: Option<Box<RecvBatch>>,
    own: Arc<OwnSockets>,
    loopback: Option<u32>,
    /// Mappings whose upstream socket had more to read than one turn allows.
    again: Vec<SessionId>,
    stop_at: Option<Instant>,
    now: Instant,
    /// Said once: replying from a privileged port was refused.
    warned_privileged: bool,
    /// Said once: a datagram came back from one of our own sockets.
    warned_loop: bool,
    /// Per batch: where each buffer goes (kept to reuse its allocation).
    runs: Vec<(Run, Part)>,
    /// The mapping of the last client datagram, to skip the lookup for the
    /// next one of the same flow.
    last_flow: Option<(SessionKey, SessionId)>,
    /// `--busy-poll`: poll without sleeping for a while after events.
    busy: BusyPoll,
}

impl UdpWorker {
    pub fn new(s: Setup) -> io::Result<UdpWorker> {
        let limits = |e: crate::udp::table::LimitsError| {
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        };
        let busy = BusyPoll::new(s.cfg.busy_poll);
        let mappings = SessionTable::new(s.max_sessions, s.cfg.udp_timeout).map_err(limits)?;
        let replies = SessionTable::new(s.max_sessions, s.cfg.udp_timeout).map_err(limits)?;
        let mut listeners = Vec::with_capacity(s.listeners.len());
        for (i, l) in s.listeners.into_iter().enumerate() {
            let mut sock = UdpSocket::from_std(l);
            s.poll
                .registry()
                .register(&mut sock, token::listener(i), Interest::READABLE)?;
            listeners.push((sock, true));
        }
        Ok(UdpWorker {
            id: s.id,
            poll: s.poll,
            listeners,
            control: s.control,
            stats: s.stats,
            mode: s.cfg.udp_nat,
            cfg: s.cfg,
            mappings,
            replies,
            batch: Some(Box::new(RecvBatch::new())),
            own: s.own,
            loopback: sys::loopback_ifindex(),
            again: Vec::new(),
            stop_at: None,
            now: Instant::now(),
            warned_privileged: false,
            warned_loop: false,
            runs: Vec::with_capacity(BATCH),
            last_flow: None,
            busy,
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let busy = !self.again.is_empty() || self.listeners.iter().any(|(_, more)| *more);
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                self.mappings
                    .next_deadline()
                    .into_iter()
                    .chain(self.replies.next_deadline())
                    .chain(self.stop_at)
                    .min()
                    .map(|t| t.saturating_duration_since(self.now))
            };
            if let Err(e) = self.poll.poll(&mut events, self.busy.timeout(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("udp worker {}: poll failed: {e}", self.id);
                break;
            }
            self.now = Instant::now();
            if !events.is_empty() {
                self.busy.saw_events(self.now);
            }
            for ev in events.iter() {
                match token::decode_udp(ev.token()) {
                    UdpKind::Waker => self.on_control(),
                    UdpKind::Listener(i) => {
                        if let Some(l) = self.listeners.get_mut(i) {
                            l.1 = true;
                        }
                    }
                    UdpKind::Session(id) => self.on_mapping_event(id, ev),
                }
            }
            for i in 0..self.listeners.len() {
                if self.listeners[i].1 {
                    self.read_listener(i);
                }
            }
            for id in std::mem::take(&mut self.again) {
                self.relay_to_client(id);
            }
            let expired: Vec<Session<SessionKey, Mapping>> =
                self.mappings.expire(self.now).collect();
            for s in expired {
                self.end(s, UdpEnd::Expired);
            }
            self.replies.expire(self.now).for_each(drop);
            if let Some(stop) = self.stop_at
                && (self.now >= stop || self.mappings.is_empty())
            {
                break;
            }
        }
        // Every mapping is idle for a whole timeout as seen from a timeout ahead.
        let rest: Vec<Session<SessionKey, Mapping>> = self
            .mappings
            .expire(self.now + self.cfg.udp_timeout)
            .collect();
        for s in rest {
            self.end(s, UdpEnd::Shutdown);
        }
        debug!("udp worker {}: stopped", self.id);
    }

    fn on_control(&mut self) {
        while let Ok(msg) = self.control.try_recv() {
            match msg {
                Control::Shutdown { deadline } => {
                    for (mut l, _) in self.listeners.drain(..) {
                        let _ = self.poll.registry().deregister(&mut l);
                    }
                    self.stop_at = Some(deadline.min(self.now + SHUTDOWN_GRACE));
                    info!(
                        "udp worker {}: stopped receiving; relaying replies for {} mapping(s)",
                        self.id,
                        self.mappings.len()
                    );
                }
            }
        }
    }

    fn on_mapping_event(&mut self, id: SessionId, ev: &Event) {
        if ev.is_error() && self.mode.endpoint_independent() {
            self.read_errors(id);
        }
        if ev.is_readable() || ev.is_error() {
            self.relay_to_client(id);
        }
    }

    fn end_id(&mut self, id: SessionId, why: UdpEnd) {
        if let Some(s) = self.mappings.remove(id) {
            self.end(s, why);
        }
    }

    /// Close a mapping that has left the table (UDP-3).
    fn end(&mut self, s: Session<SessionKey, Mapping>, why: UdpEnd) {
        let key = s.key();
        let (up, down) = (
            s.traffic(Direction::ToUpstream),
            s.traffic(Direction::ToClient),
        );
        let m = s.value();
        let dst = key.dst.or(m.peers.first());
        let more = m.peers.len().saturating_sub(1);
        debug!(
            "udp {} -> {}{}: {} after {:.3}s, {} datagrams ({} bytes) up, {} datagrams ({} bytes) down",
            key.client,
            dst.map_or_else(|| "-".to_string(), |d| d.to_string()),
            if more > 0 {
                format!(" (+{more} remotes, via {})", m.local)
            } else {
                format!(" (via {})", m.local)
            },
            why.name(),
            self.now
                .saturating_duration_since(s.started())
                .as_secs_f64(),
            up.packets,
            up.bytes,
            down.packets,
            down.bytes
        );
        self.stats.ended(why).add(1);
        self.stats.sessions_active.sub(1);
        self.own.remove(Proto::Udp, m.local);
        drop(s.into_value()); // closes the upstream socket, which leaves epoll
    }
}
