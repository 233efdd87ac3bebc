//! Sending: the runs of datagrams one batch produced go out with as few
//! system calls as the kernel allows (sendmmsg, and UDP_SEGMENT where a run
//! is of equal-sized datagrams), through a mapping's upstream socket or a
//! reply socket.
//!
//! What must stay true here: UDP-5 (datagrams leave whole and in order per
//! flow; a GSO message the kernel refuses is sent again datagram by
//! datagram and GSO is then off for that socket) and UDP-3 (a send error
//! that means the mapping is dead ends it, releasing its socket).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use log::debug;

use crate::stats::{UdpDrop, UdpEnd};
use crate::sys::{self, BATCH, OutMsg, RecvBatch};
use crate::udp::batch::{self, Msg, Part};
use crate::udp::table::Direction;

use super::{Run, UdpWorker, is_unreachable};

impl UdpWorker {
    /// Send the datagrams of `runs` (one entry per buffer of `batch`; an
    /// entry with a stale id is a dropped buffer) towards their upstream or
    /// their client, each run of one socket and destination as few
    /// messages as GSO allows (UDP-5).
    pub(super) fn send_runs(&mut self, batch: &RecvBatch, runs: &[(Run, Part)], towards: Towards) {
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

    pub(super) fn send_run(
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
}

#[derive(Clone, Copy)]
pub(super) enum Towards {
    Upstream,
    /// To this client, through a reply socket.
    Client(SocketAddr),
}

/// What sending a planned run did.
#[derive(Default)]
pub(super) struct Outcome {
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
pub(super) fn send_planned(
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
pub(super) fn send_each(
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
