//! To the client: what comes back on a mapping's upstream socket is read,
//! filtered by the mapping (full-cone lets every remote through; the
//! restricted modes only remotes the client sent to, the rest dropped and
//! counted) and sent to the client through a reply socket bound to the
//! remote's own address. ICMP errors queued on the socket end only what
//! they concern.
//!
//! What must stay true here: UDP-2 (a datagram reaches the client from the
//! exact address and port it came from), UDP-3 (reply sockets are made on
//! demand, bounded and expire like mappings) and UDP-4 (reading is bounded
//! per turn; a mapping with more to read goes to `again`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use log::{debug, warn};

use crate::stats::{UdpDrop, UdpEnd};
use crate::sys::{self, BATCH};
use crate::udp::batch::Part;
use crate::udp::table::SessionId;

use super::send::Towards;
use super::{MAX_ROUNDS, Reply, Run, UdpWorker, is_unreachable};

impl UdpWorker {
    /// Datagrams from the outside to a mapping, relayed to its client from
    /// the address they came from (UDP-2), if its filter lets them in.
    pub(super) fn relay_to_client(&mut self, id: SessionId) {
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
    pub(super) fn read_errors(&mut self, id: SessionId) {
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

    /// The reply socket for remote `r`, made if there is none (bounded:
    /// the table evicts the least recently used).
    pub(super) fn reply_socket(&mut self, r: SocketAddr) -> Option<(RawFd, bool)> {
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
}
