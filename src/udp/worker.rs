//! The UDP worker: one thread, its own `Poll`, the transparent UDP listeners
//! and the NAT session table.
//!
//! A datagram from a client arrives on a listener with its original
//! destination in an IP_ORIGDSTADDR control message. Its session — one per
//! (client, original destination) — owns an upstream socket connected to the
//! destination and carrying `--mark`, so the server sees one steady peer per
//! flow and ICMP errors for the flow come back on that socket. Replies are
//! sent to the client through a socket bound (transparently) to the original
//! destination, one per destination, shared by the sessions that use it.
//!
//! What must stay true:
//! - UDP-1: a datagram whose original destination is missing, malformed or
//!   this proxy itself is dropped and counted, never forwarded.
//! - UDP-2: a reply reaches the client from the exact address and port the
//!   client sent to.
//! - UDP-3: every session's upstream socket and reply-socket reference are
//!   released on every way out (expiry, eviction, ICMP error, send error,
//!   shutdown): the fd count follows the session count.
//! - UDP-4: the cost of a tick does not grow with the number of sessions
//!   (the table's SES-4); reading is bounded per turn and leftover readiness
//!   makes the next poll non-blocking (edge-triggered).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{debug, error, info, warn};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use crate::config::Config;
use crate::stats::{UdpDrop, UdpEnd, UdpStats};
use crate::sys::{self, BATCH, Datagram, RecvBatch};
use crate::token::{self, Kind};
use crate::udp::table::{Direction, Session, SessionId, SessionKey, SessionTable};
use crate::worker::Control;

/// recvmmsg batches per socket per loop turn before serving others.
const MAX_ROUNDS: usize = 8;
/// After SIGTERM the listeners close at once; replies already on their way
/// are still relayed for this long (or until the drain deadline, if sooner).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Session tokens start above the waker and listener tokens; a session's
/// token is this plus its 64-bit id, which cannot overflow because slots stay
/// below `--udp-max-sessions` (at most a million).
const SESSION_BASE: usize = token::MAX_LISTENERS + 1;

fn session_token(id: SessionId) -> Token {
    Token(SESSION_BASE + id.to_bits() as usize)
}

/// An ICMP error reported on a connected UDP socket: the destination cannot
/// be reached, so its session ends now rather than at its timeout.
fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN)
    )
}

/// What a session holds.
struct Flow {
    upstream: UdpSocket,
}

/// A socket bound to one original destination, for replies.
struct ReplySocket {
    sock: std::net::UdpSocket,
    users: usize,
}

pub struct Setup {
    pub poll: Poll,
    pub listeners: Vec<std::net::UdpSocket>,
    pub control: Receiver<Control>,
    pub stats: Arc<UdpStats>,
    pub cfg: Arc<Config>,
}

pub struct UdpWorker {
    poll: Poll,
    listeners: Vec<(UdpSocket, bool)>,
    control: Receiver<Control>,
    stats: Arc<UdpStats>,
    cfg: Arc<Config>,
    table: SessionTable<Flow>,
    replies: HashMap<SocketAddr, ReplySocket>,
    /// Taken out while its datagrams are handled, so `self` stays free.
    batch: Option<Box<RecvBatch>>,
    upstream_opts: sys::UpstreamOpts,
    /// Sessions whose upstream socket had more to read than one turn allows.
    again: Vec<SessionId>,
    stop_at: Option<Instant>,
    now: Instant,
    /// Said once: replying from a privileged port was refused.
    warned_privileged: bool,
}

impl UdpWorker {
    pub fn new(s: Setup) -> io::Result<UdpWorker> {
        let table = SessionTable::new(s.cfg.udp_max_sessions, s.cfg.udp_timeout)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut listeners = Vec::with_capacity(s.listeners.len());
        for (i, l) in s.listeners.into_iter().enumerate() {
            let mut sock = UdpSocket::from_std(l);
            s.poll
                .registry()
                .register(&mut sock, token::listener(i), Interest::READABLE)?;
            listeners.push((sock, true));
        }
        Ok(UdpWorker {
            poll: s.poll,
            listeners,
            control: s.control,
            stats: s.stats,
            upstream_opts: sys::UpstreamOpts { mark: s.cfg.mark },
            cfg: s.cfg,
            table,
            replies: HashMap::new(),
            batch: Some(Box::new(RecvBatch::new())),
            again: Vec::new(),
            stop_at: None,
            now: Instant::now(),
            warned_privileged: false,
        })
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let busy = !self.again.is_empty() || self.listeners.iter().any(|(_, more)| *more);
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                self.table
                    .next_deadline()
                    .into_iter()
                    .chain(self.stop_at)
                    .min()
                    .map(|t| t.saturating_duration_since(self.now))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("udp worker: poll failed: {e}");
                break;
            }
            self.now = Instant::now();
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    Kind::Waker => self.on_control(),
                    Kind::Listener(i) => {
                        if let Some(l) = self.listeners.get_mut(i) {
                            l.1 = true;
                        }
                    }
                    Kind::Conn { .. } => {
                        let bits = (ev.token().0 - SESSION_BASE) as u64;
                        self.relay_to_client(SessionId::from_bits(bits));
                    }
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
            let expired: Vec<Session<Flow>> = self.table.expire(self.now).collect();
            for s in expired {
                self.end(s, UdpEnd::Expired);
            }
            if let Some(stop) = self.stop_at
                && (self.now >= stop || self.table.is_empty())
            {
                break;
            }
        }
        // Every session is idle for a whole timeout as seen from a timeout ahead.
        let rest: Vec<Session<Flow>> = self.table.expire(self.now + self.cfg.udp_timeout).collect();
        for s in rest {
            self.end(s, UdpEnd::Shutdown);
        }
        debug!("udp worker: stopped");
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
                        "udp worker: stopped receiving; relaying replies for {} session(s)",
                        self.table.len()
                    );
                }
            }
        }
    }

    /// Datagrams from clients (UDP-4: bounded).
    fn read_listener(&mut self, i: usize) {
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        for _ in 0..MAX_ROUNDS {
            let fd = self.listeners[i].0.as_raw_fd();
            match batch.recv(fd) {
                Ok(n) => {
                    // Consecutive datagrams of one flow go out in one sendmmsg.
                    let mut run: Option<SessionId> = None;
                    let mut bufs: [&[u8]; BATCH] = [&[]; BATCH];
                    let mut len = 0;
                    for k in 0..n {
                        let d = batch.get(k);
                        let Some(id) = self.session_for(&d) else {
                            continue;
                        };
                        if let Some(prev) = run
                            && prev != id
                        {
                            self.send_upstream(prev, &bufs[..len]);
                            len = 0;
                        }
                        run = Some(id);
                        bufs[len] = d.data;
                        len += 1;
                    }
                    if let Some(id) = run {
                        self.send_upstream(id, &bufs[..len]);
                    }
                    // A short batch emptied the queue (recvmmsg stops at
                    // EAGAIN), so the call that would only say EAGAIN is
                    // skipped; the next datagram raises a new edge. The
                    // listener has no error queue that could cut a batch
                    // short instead (unconnected, no IP_RECVERR).
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
        self.batch = Some(batch);
    }

    /// The session a client's datagram belongs to, opened if new and
    /// refreshed; `None` (counted) when the datagram is to be dropped.
    fn session_for(&mut self, d: &Datagram<'_>) -> Option<SessionId> {
        let (Some(client), Some(orig_dst)) = (d.from, d.orig_dst) else {
            self.stats.dropped(UdpDrop::NoOrigDst).add(1);
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
            self.stats.dropped(UdpDrop::Loop).add(1);
            return None;
        }
        let key = SessionKey { client, orig_dst };
        let id = match self.table.lookup(&key) {
            Some(id) => id,
            None => match self.open(key) {
                Ok(id) => id,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EACCES) && !self.warned_privileged {
                        warn!(
                            "udp {client} -> {orig_dst}: cannot bind the reply socket ({e}): replies from ports below 1024 need CAP_NET_BIND_SERVICE"
                        );
                        self.warned_privileged = true;
                    }
                    debug!("udp {client} -> {orig_dst}: no session: {e}");
                    self.stats.dropped(UdpDrop::NoSession).add(1);
                    return None;
                }
            },
        };
        // Refreshed now, so a session opened later in this batch cannot
        // evict it before its datagrams go out.
        self.table
            .touch(id, self.now, Direction::ToUpstream, d.data.len());
        Some(id)
    }

    /// Send a run of one session's datagrams to its destination.
    fn send_upstream(&mut self, id: SessionId, bufs: &[&[u8]]) {
        let Some(fd) = self.table.get(id).map(|s| s.value().upstream.as_raw_fd()) else {
            self.stats
                .dropped(UdpDrop::SendFailed)
                .add(bufs.len() as u64);
            return;
        };
        let mut sent = 0;
        while sent < bufs.len() {
            match sys::send_batch(fd, None, &bufs[sent..]) {
                Ok(k) => {
                    let k = k.max(1).min(bufs.len() - sent);
                    self.stats.datagrams_to_upstream.add(k as u64);
                    let bytes: usize = bufs[sent..sent + k].iter().map(|b| b.len()).sum();
                    self.stats.bytes_to_upstream.add(bytes as u64);
                    sent += k;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats
                        .dropped(UdpDrop::SendFailed)
                        .add((bufs.len() - sent) as u64);
                    if is_unreachable(&e) {
                        self.end_id(id, UdpEnd::Unreachable);
                    } else if e.kind() != io::ErrorKind::WouldBlock {
                        debug!("udp session {id:?}: send: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// A new session: its upstream socket, a reference to the reply socket
    /// for its destination, its table entry and its registration.
    fn open(&mut self, key: SessionKey) -> io::Result<SessionId> {
        let upstream = UdpSocket::from_std(sys::udp_upstream(key.orig_dst, self.upstream_opts)?);
        match self.replies.entry(key.orig_dst) {
            Entry::Occupied(mut o) => o.get_mut().users += 1,
            Entry::Vacant(v) => {
                v.insert(ReplySocket {
                    sock: sys::udp_reply_socket(key.orig_dst)?,
                    users: 1,
                });
            }
        }
        let inserted = match self.table.insert(key, Flow { upstream }, self.now) {
            Ok(i) => i,
            Err(occupied) => {
                // Cannot happen (the caller looked the key up): keep the
                // existing session, close the new socket, undo the reference.
                drop(occupied.value);
                self.release_reply(key.orig_dst);
                return Ok(occupied.id);
            }
        };
        // The evicted session ends before the new one counts, so the gauge
        // never reads more than the cap.
        if let Some(old) = inserted.evicted {
            self.end(old, UdpEnd::Evicted);
        }
        self.stats.sessions_created.add(1);
        self.stats.sessions_active.add(1);
        let id = inserted.id;
        let registered = match self.table.get_mut(id) {
            Some(flow) => self.poll.registry().register(
                &mut flow.upstream,
                session_token(id),
                Interest::READABLE,
            ),
            None => Err(io::Error::other("session vanished")),
        };
        if let Err(e) = registered {
            self.end_id(id, UdpEnd::Error);
            return Err(e);
        }
        Ok(id)
    }

    /// Replies from a destination, relayed to the client from that
    /// destination's address (UDP-2).
    fn relay_to_client(&mut self, id: SessionId) {
        let Some(session) = self.table.get(id) else {
            return; // stale token: the session is gone
        };
        let key = session.key();
        let up_fd = session.value().upstream.as_raw_fd();
        let Some(reply_fd) = self.replies.get(&key.orig_dst).map(|r| r.sock.as_raw_fd()) else {
            self.end_id(id, UdpEnd::Error);
            return;
        };
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        let mut finished = None;
        let mut rounds = 0;
        loop {
            if rounds == MAX_ROUNDS {
                self.again.push(id);
                break;
            }
            rounds += 1;
            let n = match batch.recv(up_fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_unreachable(&e) => {
                    finished = Some(UdpEnd::Unreachable);
                    break;
                }
                Err(e) => {
                    debug!("udp {} -> {}: receive: {e}", key.client, key.orig_dst);
                    finished = Some(UdpEnd::Error);
                    break;
                }
            };
            let mut bufs: [&[u8]; BATCH] = [&[]; BATCH];
            for (k, b) in bufs.iter_mut().enumerate().take(n) {
                *b = batch.get(k).data;
            }
            let mut sent = 0;
            while sent < n {
                match sys::send_batch(reply_fd, Some(key.client), &bufs[sent..n]) {
                    Ok(k) => sent += k.clamp(1, n - sent),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            debug!("udp {} <- {}: send: {e}", key.client, key.orig_dst);
                        }
                        self.stats
                            .dropped(UdpDrop::SendFailed)
                            .add((n - sent) as u64);
                        break;
                    }
                }
            }
            // Only what reached the client counts as forwarded (and as activity).
            for b in &bufs[..sent] {
                self.table.touch(id, self.now, Direction::ToClient, b.len());
                self.stats.bytes_to_client.add(b.len() as u64);
            }
            self.stats.datagrams_to_client.add(sent as u64);
        }
        self.batch = Some(batch);
        if let Some(why) = finished {
            self.end_id(id, why);
        }
    }

    fn end_id(&mut self, id: SessionId, why: UdpEnd) {
        if let Some(s) = self.table.remove(id) {
            self.end(s, why);
        }
    }

    /// Close a session that has left the table (UDP-3).
    fn end(&mut self, s: Session<Flow>, why: UdpEnd) {
        let key = s.key();
        let (up, down) = (
            s.traffic(Direction::ToUpstream),
            s.traffic(Direction::ToClient),
        );
        debug!(
            "udp {} -> {}: {} after {:.3}s, {} datagrams ({} bytes) up, {} datagrams ({} bytes) down",
            key.client,
            key.orig_dst,
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
        drop(s.into_value()); // closes the upstream socket, which leaves epoll
        self.release_reply(key.orig_dst);
    }

    fn release_reply(&mut self, dst: SocketAddr) {
        if let Entry::Occupied(mut o) = self.replies.entry(dst) {
            o.get_mut().users = o.get().users.saturating_sub(1);
            if o.get().users == 0 {
                o.remove();
            }
        }
    }
}
