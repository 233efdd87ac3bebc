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
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, error, info, warn};
use mio::event::Event;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll};

use crate::config::Config;
use crate::control::Control;
use crate::own_sockets::{OwnSockets, Proto};
use crate::stats::{UdpDrop, UdpEnd, UdpStats};
use crate::sys::{self, BATCH, Datagram, OutMsg, RecvBatch, UpstreamUdp};
use crate::token::{self, UdpKind};
use crate::udp::batch::{self, Msg, Part};
use crate::udp::nat::{NatMode, Peers, SessionKey};
use crate::udp::table::{Direction, Session, SessionId, SessionTable};

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
}

impl UdpWorker {
    pub fn new(s: Setup) -> io::Result<UdpWorker> {
        let limits = |e: crate::udp::table::LimitsError| {
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        };
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
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("udp worker {}: poll failed: {e}", self.id);
                break;
            }
            self.now = Instant::now();
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

    /// Datagrams from clients (UDP-4: bounded).
    fn read_listener(&mut self, i: usize) {
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        let mut runs = std::mem::take(&mut self.runs);
        for _ in 0..MAX_ROUNDS {
            let fd = self.listeners[i].0.as_raw_fd();
            match batch.recv(fd) {
                Ok(n) => {
                    runs.clear();
                    for k in 0..n {
                        let d = batch.get(k);
                        match self.mapping_for(&d) {
                            Some(run) => runs.push((
                                run,
                                Part {
                                    len: d.data.len(),
                                    segment: d.segment,
                                },
                            )),
                            // A placeholder keeps indices aligned with the batch.
                            None => runs.push((
                                Run {
                                    id: SessionId::from_bits(u64::MAX),
                                    to: SocketAddr::from(([0u8; 4], 0)),
                                },
                                Part { len: 0, segment: 0 },
                            )),
                        }
                    }
                    self.send_runs(&batch, &runs, Towards::Upstream);
                    // A short batch emptied the queue (recvmmsg stops at
                    // EAGAIN), so the call that would only say EAGAIN is
                    // skipped; the next datagram raises a new edge. The
                    // listener has no error queue that could cut a batch
                    // short instead (no IP_RECVERR).
                    if n < BATCH {
                        self.listeners[i].1 = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!("udp: receive on listener: {e}");
                    }
                    self.listeners[i].1 = false;
                    break;
                }
            }
        }
        self.runs = runs;
        self.batch = Some(batch);
    }

    /// The mapping a client's datagram belongs to, opened if new and
    /// refreshed, and where it goes; `None` (counted) when it is dropped.
    fn mapping_for(&mut self, d: &Datagram<'_>) -> Option<Run> {
        let (Some(client), Some(orig_dst)) = (d.from, d.orig_dst) else {
            self.stats.dropped(UdpDrop::NoOrigDst).add(d.count() as u64);
            return None;
        };
        if d.truncated {
            self.stats.dropped(UdpDrop::Truncated).add(1);
            return None;
        }
        let (client, orig_dst) = (sys::canonical(client), sys::canonical(orig_dst));
        // UDP-1: the same rule as TCP's DST-1.
        if orig_dst.port() == self.cfg.port && sys::is_local_address(orig_dst.ip()).unwrap_or(true)
        {
            self.stats.dropped(UdpDrop::Loop).add(d.count() as u64);
            return None;
        }
        // UDP-1: a loop comes back through this host itself, so only a
        // datagram that came in on lo is looked up (no shared lookup per
        // datagram from a real interface).
        if d.ifindex.is_some()
            && d.ifindex == self.loopback
            && self.own.contains(Proto::Udp, client)
        {
            self.stats.dropped(UdpDrop::Loop).add(d.count() as u64);
            if !self.warned_loop {
                warn!(
                    "udp {client} -> {orig_dst}: a datagram from one of tproxyd's own upstream sockets came back to it: the host's rules intercept the proxy's own traffic; exempt its --mark in the output chain (scripts/rules --local does)"
                );
                self.warned_loop = true;
            }
            return None;
        }
        let key = self.mode.key(client, orig_dst);
        // Consecutive datagrams are mostly one flow's: no hash lookup for
        // them (a stale id finds nothing, SES-3, and falls through).
        let cached = self
            .last_flow
            .filter(|(k, id)| *k == key && self.mappings.get(*id).is_some())
            .map(|(_, id)| id);
        let id = match cached.or_else(|| self.mappings.lookup(&key)) {
            Some(id) => id,
            None => match self.open(key, orig_dst) {
                Ok(id) => id,
                Err(e) => {
                    debug!("udp {client} -> {orig_dst}: no mapping: {e}");
                    self.stats.dropped(UdpDrop::NoSession).add(d.count() as u64);
                    return None;
                }
            },
        };
        self.last_flow = Some((key, id));
        // Refreshed now, so a mapping opened later in this batch cannot
        // evict it before its datagrams go out.
        self.mappings
            .touch_many(id, self.now, Direction::ToUpstream, d.count(), d.data.len());
        if self.mode.endpoint_independent()
            && let Some(m) = self.mappings.get_mut(id)
        {
            m.peers.sent(self.mode, orig_dst, self.now);
        }
        Some(Run { id, to: orig_dst })
    }

    /// A new mapping: its upstream socket, its table entry, its registration.
    fn open(&mut self, key: SessionKey, dst: SocketAddr) -> io::Result<SessionId> {
        let spec = UpstreamUdp {
            mark: self.cfg.mark,
            source: (self.cfg.spoof_source && key.client.is_ipv4() == dst.is_ipv4())
                .then_some(key.client),
            connect: key.dst,
        };
        let (sock, local) = match sys::udp_upstream(dst, spec) {
            Err(e) if sys::is_exhaustion(&e) && self.evict_one() => sys::udp_upstream(dst, spec)?,
            other => other?,
        };
        self.own.add(Proto::Udp, local);
        let mapping = Mapping {
            sock: UdpSocket::from_std(sock),
            local,
            peers: Peers::default(),
            gso: true,
        };
        let inserted = match self.mappings.insert(key, mapping, self.now) {
            Ok(i) => i,
            Err(occupied) => {
                // Cannot happen (the caller looked the key up): keep the
                // existing mapping, close the new socket.
                self.own.remove(Proto::Udp, occupied.value.local);
                return Ok(occupied.id);
            }
        };
        // The evicted mapping ends before the new one counts, so the gauge
        // never reads more than the cap.
        if let Some(old) = inserted.evicted {
            self.end(old, UdpEnd::Evicted);
        }
        self.stats.sessions_created.add(1);
        self.stats.sessions_active.add(1);
        let id = inserted.id;
        let registered = match self.mappings.get_mut(id) {
            Some(m) => {
                self.poll
                    .registry()
                    .register(&mut m.sock, token::session(id), Interest::READABLE)
            }
            None => Err(io::Error::other("mapping vanished")),
        };
        if let Err(e) = registered {
            self.end_id(id, UdpEnd::Error);
            return Err(e);
        }
        Ok(id)
    }

    /// Out of descriptors: give one back by ending the least recently used
    /// reply socket, or else mapping. Whether anything was freed.
    fn evict_one(&mut self) -> bool {
        if self.replies.evict_oldest().is_some() {
            return true;
        }
        match self.mappings.evict_oldest() {
            Some(s) => {
                self.end(s, UdpEnd::Evicted);
                true
            }
            None => false,
        }
    }

    /// Datagrams from the outside to a mapping, relayed to its client from
    /// the address they came from (UDP-2), if its filter lets them in.
    fn relay_to_client(&mut self, id: SessionId) {
        let Some(fd) = self.mappings.get(id).map(|s| s.value().sock.as_raw_fd()) else {
            return; // stale token: the mapping is gone
        };
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        let mut runs = std::mem::take(&mut self.runs);
        let mut finished = None;
        let mut rounds = 0;
        loop {
            if rounds == MAX_ROUNDS {
                self.again.push(id);
                break;
            }
            rounds += 1;
            let n = match batch.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Unconnected: an ICMP error for one remote, also queued on
                // the error queue, where it says which (NAT-4).
                Err(e) if is_unreachable(&e) && self.mode.endpoint_independent() => {
                    self.read_errors(id);
                    if self.mappings.get(id).is_none() {
                        break;
                    }
                    continue;
                }
                Err(e) if is_unreachable(&e) => {
                    finished = Some(UdpEnd::Unreachable);
                    break;
                }
                Err(e) => {
                    debug!("udp mapping {id:?}: receive: {e}");
                    finished = Some(UdpEnd::Error);
                    break;
                }
            };
            runs.clear();
            let Some(s) = self.mappings.get(id) else {
                break;
            };
            let key = s.key();
            for k in 0..n {
                let d = batch.get(k);
                let from = d.from.map(sys::canonical).or(key.dst);
                let part = Part {
                    len: d.data.len(),
                    segment: d.segment,
                };
                let admitted = match (from, self.mappings.get(id)) {
                    (Some(r), Some(s)) => {
                        key.dst.is_some()
                            || s.value()
                                .peers
                                .admits(self.mode, r, self.now, self.cfg.udp_timeout)
                    }
                    _ => false,
                };
                match from {
                    Some(r) if admitted => runs.push((Run { id, to: r }, part)),
                    _ => {
                        self.stats.dropped(UdpDrop::Filtered).add(d.count() as u64);
                        runs.push((
                            Run {
                                id: SessionId::from_bits(u64::MAX),
                                to: SocketAddr::from(([0u8; 4], 0)),
                            },
                            Part { len: 0, segment: 0 },
                        ));
                    }
                }
            }
            self.send_runs(&batch, &runs, Towards::Client(key.client));
            if n < BATCH {
                break; // a short batch emptied the queue
            }
        }
        self.runs = runs;
        self.batch = Some(batch);
        if let Some(why) = finished {
            self.end_id(id, why);
        }
    }

    /// ICMP errors queued on an unconnected mapping socket: each ends what
    /// it concerns, the mapping only when it serves no other remote (NAT-4).
    fn read_errors(&mut self, id: SessionId) {
        let Some(fd) = self.mappings.get(id).map(|s| s.value().sock.as_raw_fd()) else {
            return;
        };
        let mut ended = false;
        for _ in 0..64 {
            match sys::recv_error(fd) {
                Ok(Some(e)) => {
                    let Some(dst) = e.dst.map(sys::canonical) else {
                        continue;
                    };
                    if !(e.icmp && sys::is_unreachable_errno(e.errno)) {
                        continue;
                    }
                    self.stats.remote_unreachable.add(1);
                    let (now, timeout) = (self.now, self.cfg.udp_timeout);
                    let left = self
                        .mappings
                        .get_mut(id)
                        .is_some_and(|m| m.peers.forget(dst, now, timeout));
                    debug!("udp mapping {id:?}: {dst} unreachable (errno {})", e.errno);
                    if !left {
                        ended = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("udp mapping {id:?}: error queue: {e}");
                    break;
                }
            }
        }
        if ended {
            self.end_id(id, UdpEnd::Unreachable);
        }
    }

    /// Send the datagrams of `runs` (one entry per buffer of `batch`; an
    /// entry with a stale id is a dropped buffer) towards their upstream or
    /// their client, each run of one socket and destination as few
    /// messages as GSO allows (UDP-5).
    fn send_runs(&mut self, batch: &RecvBatch, runs: &[(Run, Part)], towards: Towards) {
        let mut start = 0;
        while start < runs.len() {
            let run = runs[start].0;
            let mut end = start + 1;
            while end < runs.len() && runs[end].0 == run {
                end += 1;
            }
            if self.mappings.get(run.id).is_some() {
                self.send_run(batch, start..end, &runs[start..end], run, towards);
            }
            start = end;
        }
    }

    fn send_run(
        &mut self,
        batch: &RecvBatch,
        idx: std::ops::Range<usize>,
        run: &[(Run, Part)],
        r: Run,
        towards: Towards,
    ) {
        let mut parts = [Part { len: 0, segment: 0 }; BATCH];
        let n = run.len().min(BATCH);
        for (slot, (_, p)) in parts.iter_mut().zip(run) {
            *slot = *p;
        }
        let parts = &parts[..n];
        let (fd, to, gso) = match towards {
            Towards::Upstream => {
                let Some(s) = self.mappings.get(r.id) else {
                    return;
                };
                let to = s.key().dst.is_none().then_some(r.to);
                (s.value().sock.as_raw_fd(), to, s.value().gso)
            }
            Towards::Client(client) => match self.reply_socket(r.to) {
                Some((fd, gso)) => (fd, Some(client), gso),
                None => {
                    let n: usize = parts.iter().map(|p| p.datagrams()).sum();
                    self.stats.dropped(UdpDrop::NoReplySocket).add(n as u64);
                    return;
                }
            },
        };
        let mut bufs: [&[u8]; BATCH] = [&[]; BATCH];
        for (slot, k) in bufs.iter_mut().zip(idx) {
            *slot = batch.get(k).data;
        }
        let plan = batch::plan::<BATCH>(parts, gso);
        let outcome = send_planned(fd, to, &bufs[..n], parts, plan.as_slice());
        if outcome.gso_refused {
            match towards {
                Towards::Upstream => {
                    if let Some(m) = self.mappings.get_mut(r.id) {
                        m.gso = false;
                    }
                }
                Towards::Client(_) => {
                    if let Some(rid) = self.replies.lookup(&r.to)
                        && let Some(rs) = self.replies.get_mut(rid)
                    {
                        rs.gso = false;
                    }
                }
            }
            debug!("udp: GSO refused on a socket; it sends datagram by datagram from now on");
        }
        let (dir, datagrams, bytes) = match towards {
            Towards::Upstream => (
                Direction::ToUpstream,
                &self.stats.datagrams_to_upstream,
                &self.stats.bytes_to_upstream,
            ),
            Towards::Client(_) => (
                Direction::ToClient,
                &self.stats.datagrams_to_client,
                &self.stats.bytes_to_client,
            ),
        };
        datagrams.add(outcome.datagrams as u64);
        bytes.add(outcome.bytes as u64);
        if outcome.failed > 0 {
            self.stats
                .dropped(UdpDrop::SendFailed)
                .add(outcome.failed as u64);
        }
        // Only what reached the client counts as forwarded (and as activity);
        // the upstream direction was counted on arrival.
        if dir == Direction::ToClient && outcome.datagrams > 0 {
            self.mappings
                .touch_many(r.id, self.now, dir, outcome.datagrams, outcome.bytes);
            if let Some(rid) = self.replies.lookup(&r.to) {
                self.replies
                    .touch_many(rid, self.now, dir, outcome.datagrams, outcome.bytes);
            }
        }
        if let Some(e) = outcome.error {
            if is_unreachable(&e) && !self.mode.endpoint_independent() {
                if matches!(towards, Towards::Upstream) {
                    self.end_id(r.id, UdpEnd::Unreachable);
                }
            } else if is_unreachable(&e) {
                self.read_errors(r.id);
            } else if e.kind() != io::ErrorKind::WouldBlock {
                debug!("udp mapping {:?}: send: {e}", r.id);
            }
        }
    }

    /// The reply socket for remote `r`, made if there is none (bounded:
    /// the table evicts the least recently used).
    fn reply_socket(&mut self, r: SocketAddr) -> Option<(RawFd, bool)> {
        if let Some(rid) = self.replies.lookup(&r) {
            return self
                .replies
                .get(rid)
                .map(|s| (s.value().sock.as_raw_fd(), s.value().gso));
        }
        let sock = match sys::udp_reply_socket(r) {
            Err(e) if sys::is_exhaustion(&e) && self.evict_one() => sys::udp_reply_socket(r),
            other => other,
        };
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                if e.raw_os_error() == Some(libc::EACCES) && !self.warned_privileged {
                    warn!(
                        "udp: cannot bind a reply socket to {r} ({e}): replies from ports below 1024 need CAP_NET_BIND_SERVICE"
                    );
                    self.warned_privileged = true;
                }
                debug!("udp: no reply socket for {r}: {e}");
                return None;
            }
        };
        let fd = sock.as_raw_fd();
        match self.replies.insert(r, Reply { sock, gso: true }, self.now) {
            Ok(_) => Some((fd, true)),
            Err(_) => None,
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

#[derive(Clone, Copy)]
enum Towards {
    Upstream,
    /// To this client, through a reply socket.
    Client(SocketAddr),
}

/// What sending a planned run did.
#[derive(Default)]
struct Outcome {
    datagrams: usize,
    bytes: usize,
    failed: usize,
    /// The kernel refused GSO on this socket (it was then sent without).
    gso_refused: bool,
    /// The error that stopped the run, if one did.
    error: Option<io::Error>,
}

/// Send `msgs` (planned over `parts`, whose data `bufs` holds) through
/// `fd`. A GSO message the kernel refuses is sent again datagram by
/// datagram; a send that fails otherwise drops the rest of the run.
fn send_planned(
    fd: RawFd,
    to: Option<SocketAddr>,
    bufs: &[&[u8]],
    parts: &[Part],
    msgs: &[Msg],
) -> Outcome {
    let mut out = Outcome::default();
    let total = |m: &Msg| -> usize { bufs[m.parts()].iter().map(|b| b.len()).sum() };
    let rest = |from: usize| -> usize { msgs[from..].iter().map(|m| m.datagrams).sum() };
    let mut i = 0;
    let mut retried_error = false;
    while i < msgs.len() {
        // A GRO buffer planned without GSO goes datagram by datagram.
        if msgs[i].segment.is_none() && msgs[i].datagrams > 1 {
            let p = msgs[i].start;
            if let Err((sent, e)) = send_each(fd, to, bufs[p], parts[p].segment) {
                out.datagrams += sent;
                out.failed += rest(i) - sent;
                out.error = Some(e);
                return out;
            }
            out.datagrams += msgs[i].datagrams;
            out.bytes += bufs[p].len();
            i += 1;
            continue;
        }
        let mut end = i;
        while end < msgs.len() && !(msgs[end].segment.is_none() && msgs[end].datagrams > 1) {
            end += 1;
        }
        let mut chunk: [OutMsg; BATCH] = std::array::from_fn(|_| OutMsg {
            parts: 0..0,
            segment: None,
        });
        for (slot, m) in chunk.iter_mut().zip(&msgs[i..end]) {
            *slot = OutMsg {
                parts: m.parts(),
                segment: m.segment,
            };
        }
        match sys::send_msgs(fd, to, &chunk[..end - i], bufs) {
            Ok(k) => {
                let k = k.clamp(1, end - i);
                for m in &msgs[i..i + k] {
                    out.datagrams += m.datagrams;
                    out.bytes += total(m);
                }
                i += k;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if msgs[i].segment.is_some() && sys::is_gso_refusal(&e) => {
                // Send this message's datagrams one by one instead.
                out.gso_refused = true;
                let m = msgs[i];
                let mut sent_here = 0;
                for p in m.parts() {
                    if let Err((sent, e)) = send_each(fd, to, bufs[p], parts[p].segment) {
                        out.datagrams += sent_here + sent;
                        out.failed += rest(i) - sent_here - sent;
                        out.error = Some(e);
                        return out;
                    }
                    sent_here += batch::datagrams_of(bufs[p].len(), parts[p].segment).count();
                    out.bytes += bufs[p].len();
                }
                out.datagrams += sent_here;
                i += 1;
            }
            // An unconnected socket reports an earlier ICMP error on the
            // next send (sk_err): the datagram itself was not sent. Once.
            Err(e) if is_unreachable(&e) && to.is_some() && !retried_error => {
                retried_error = true;
                out.error = Some(e);
            }
            Err(e) => {
                out.failed += rest(i);
                out.error = Some(e);
                return out;
            }
        }
    }
    out
}

/// Send the datagrams of one buffer one by one, up to `BATCH` per call.
/// On failure: how many went, and the error.
fn send_each(
    fd: RawFd,
    to: Option<SocketAddr>,
    buf: &[u8],
    segment: usize,
) -> Result<(), (usize, io::Error)> {
    let mut pieces: [&[u8]; BATCH] = [&[]; BATCH];
    let mut ranges = batch::datagrams_of(buf.len(), segment).peekable();
    let mut sent = 0;
    while ranges.peek().is_some() {
        let mut n = 0;
        for (slot, r) in pieces.iter_mut().zip(ranges.by_ref()) {
            *slot = &buf[r];
            n += 1;
        }
        let msgs: [OutMsg; BATCH] = std::array::from_fn(|k| OutMsg {
            parts: k..k + 1,
            segment: None,
        });
        let mut done = 0;
        while done < n {
            match sys::send_msgs(fd, to, &msgs[done..n], &pieces[..n]) {
                Ok(k) => done += k.clamp(1, n - done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((sent + done, e)),
            }
        }
        sent += n;
    }
    Ok(())
}
