//! Accepting and admission (moved from worker.rs): taking connections from
//! a worker's listeners under `--max-conns`, the loop checks at accept,
//! refusing, parking clients out of descriptors, and the episodes of waiting.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::Interest;
use mio::net::{TcpListener, TcpStream};

use crate::own_sockets::Proto;
use crate::pause::{self, Reason};
use crate::stats::EndKind;
use crate::sys;
use crate::tcp::{self, Destination};
use crate::token;
use crate::worker::Worker;

/// Connections accepted from one listener per loop turn (WRK-3).
pub(crate) const ACCEPT_BATCH: usize = 64;
/// How long a paused listener waits before trying again when no connection
/// of this worker closed in the meantime (the limit may have been freed by
/// another worker or another process).
pub(crate) const ACCEPT_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListenState {
    /// Registered; `more` when the last turn stopped before EAGAIN.
    Active { more: bool },
    /// Deregistered until `retry` or until a connection closes (WRK-2);
    /// `queued` clients were in its accept queue when last read (WRK-6).
    Paused { retry: Instant, queued: u64 },
}

pub(crate) struct Listener {
    pub(crate) sock: TcpListener,
    pub(crate) state: ListenState,
}

/// A worker's part in an episode of waiting (pause.rs).
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    /// Clients waiting for this worker, as last reported to the episode.
    pub(crate) reported: u64,
    /// Clients this worker accepted after they waited.
    pub(crate) accepted: u64,
    /// Nobody has waited for this worker since then (PAUSE-3).
    pub(crate) drained: Option<Instant>,
}

impl Worker {
    pub(crate) fn accept_ready(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].state == (ListenState::Active { more: true }) {
                self.accept_from(i);
            }
        }
    }

    /// Accept up to `ACCEPT_BATCH` connections from listener `i`.
    pub(crate) fn accept_from(&mut self, i: usize) {
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
    pub(crate) fn waiting_for(&self, r: Reason) -> u64 {
        let queued = self.queued();
        match r {
            Reason::MaxConns => queued,
            Reason::FdLimit => queued + self.parked.len() as u64,
        }
    }

    /// Clients in the paused listeners' accept queues, as last read.
    pub(crate) fn queued(&self) -> u64 {
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
    pub(crate) fn update_waiting(&mut self, why: Option<(Reason, &dyn fmt::Display)>) {
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
    pub(crate) fn start_episode(&self, r: Reason, cause: &dyn fmt::Display) {
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
    pub(crate) fn count_waited(&mut self) {
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
    pub(crate) fn leave_quiet_episodes(&mut self) {
        for r in Reason::ALL {
            if let Some(w) = &self.waiting[r as usize]
                && w.drained.is_some_and(|d| self.now >= d + pause::QUIET)
            {
                self.leave_episode(r, false);
            }
        }
    }

    /// Leave the episode for `r`; the last worker out says what it came to.
    pub(crate) fn leave_episode(&mut self, r: Reason, shutdown: bool) {
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
    pub(crate) fn retry_parked(&mut self, freed: bool) {
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

    /// Out of descriptors for `client`'s upstream socket: it waits, holding
    /// its reservation, with the listeners paused, until one frees (WRK-5).
    pub(crate) fn park(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        e: &io::Error,
    ) {
        self.parked.push((client, peer, dst));
        self.stats.waiting.set(self.parked.len() as u64);
        self.parked_retry = Some(self.now + ACCEPT_RETRY);
        for i in 0..self.listeners.len() {
            self.pause(i);
        }
        self.update_waiting(Some((Reason::FdLimit, e)));
    }

    /// Deregister listener `i` until `ACCEPT_RETRY` from now (WRK-2), and
    /// read how many clients wait in its queue (WRK-6). The caller says why
    /// with `update_waiting`.
    pub(crate) fn pause(&mut self, i: usize) {
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
    pub(crate) fn resume_listeners(&mut self, freed: bool) {
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
    pub(crate) fn admit(&mut self, client: TcpStream, peer: SocketAddr) {
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
    pub(crate) fn refuse_own_upstream(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) {
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

    /// Close a client we will not serve, with RST so it knows at once: its
    /// socket was born with linger 0 (CONN-8), so the close is the reset.
    /// The caller counts why.
    pub(crate) fn refuse(&mut self, client: TcpStream) {
        drop(client);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}
