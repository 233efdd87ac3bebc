//! From the client: a UDP worker reads its listeners (a batch of datagrams
//! at a time, each with its original destination), finds or opens each
//! datagram's mapping (the NAT mode says what a mapping is keyed by) and
//! hands the runs of datagrams to `send` towards the upstream.
//!
//! What must stay true here: UDP-1 (a datagram with no usable destination,
//! to the proxy itself, or looped back from one of our own sockets is
//! dropped and counted), UDP-3 (a mapping that cannot get a descriptor
//! evicts the least recently used one; an opened mapping's socket is in
//! `OwnSockets` and the table before anything is sent through it) and
//! UDP-4 (reading is bounded per turn: after `MAX_ROUNDS` batches a
//! listener with more to read is marked so, and the next poll does not
//! block).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use log::{debug, warn};
use mio::Interest;
use mio::net::UdpSocket;

use crate::own_sockets::Proto;
use crate::stats::{UdpDrop, UdpEnd};
use crate::sys::{self, BATCH, Datagram, UpstreamUdp};
use crate::token::{self};
use crate::udp::batch::Part;
use crate::udp::nat::{Peers, SessionKey};
use crate::udp::table::{Direction, SessionId};

use super::send::Towards;
use super::{MAX_ROUNDS, Mapping, Run, UdpWorker};

impl UdpWorker {
    /// Datagrams from clients (UDP-4: bounded).
    pub(super) fn read_listener(&mut self, i: usize) {
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
    pub(super) fn mapping_for(&mut self, d: &Datagram<'_>) -> Option<Run> {
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
    pub(super) fn open(&mut self, key: SessionKey, dst: SocketAddr) -> io::Result<SessionId> {
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
    pub(super) fn evict_one(&mut self) -> bool {
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
}
