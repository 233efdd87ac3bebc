//! The relay driven by a scripted kernel: each test sets up what the two
//! peers have sent and how much their sockets take, scripts the odd answer
//! the real kernel gives (EAGAIN from a pipe out of slots, a GRO splice,
//! EINVAL, a reset), pumps, and checks what the relay did: the calls it
//! made, the readiness it kept, and the bytes each peer received. The model
//! panics on a byte sent after a FIN, so every test also checks that order.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;

use super::direction::{Channel, MAX_ROUNDS};
use super::*;
use crate::tcp::pipe::SCRATCH_SIZE;
use crate::tcp::proxy_header::{self, Version};

const C: Side = Side::Client;
const U: Side = Side::Upstream;
const EAGAIN: i32 = libc::EAGAIN;
/// The pipes of these tests (the kernel's default size).
const PIPE: usize = 64 * 1024;

/// One of the proxy's sockets, and its far end, as the model sees them.
#[derive(Debug)]
struct Peer {
    /// In-band bytes the far end sent that wait to be read.
    rx: VecDeque<u8>,
    /// The far end's FIN comes after `rx`.
    fin: bool,
    /// An urgent mark after this many of `rx`'s bytes; the urgent byte
    /// itself is out of band, not in `rx`.
    mark: Option<usize>,
    /// What the far end has received from the proxy.
    got: Vec<u8>,
    /// Bytes the socket takes before it says EAGAIN.
    room: usize,
    /// The proxy sent its FIN (shutdown, SHUT_WR).
    shut: bool,
    /// Every read and write fails with this errno (the far end reset).
    reset: Option<i32>,
}

impl Default for Peer {
    fn default() -> Peer {
        Peer {
            rx: VecDeque::new(),
            fin: false,
            mark: None,
            got: Vec::new(),
            room: usize::MAX,
            shut: false,
            reset: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Recv,
    Send,
    /// writev: its length is both buffers'.
    SendV,
    SpliceIn,
    SpliceOut,
    WritePipe,
    AtMark,
    Shutdown,
}

/// An answer scripted for the next call of an op on a socket, instead of
/// what the model would say.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Err(i32),
    /// Move exactly this many bytes (a splice may move more than it was
    /// asked for: GRO).
    Take(usize),
}

/// One call the relay made: op, socket (the pipe's for `WritePipe`), the
/// length asked for, and the result (bytes or errno).
type Call = (Op, Side, usize, Result<usize, i32>);

#[derive(Default)]
struct Script {
    peers: [Peer; 2],
    /// What each pipe holds, by its read descriptor.
    pipes: HashMap<RawFd, VecDeque<u8>>,
    answers: VecDeque<(Op, Side, Answer)>,
    log: Vec<Call>,
    /// Calls in this pump: a relay that spins fails the test instead of
    /// hanging it.
    this_pump: usize,
}

impl Script {
    fn peer(&mut self, s: Side) -> &mut Peer {
        &mut self.peers[s.index()]
    }

    /// Answer the next `op` on `s` with `a`.
    fn answer(&mut self, op: Op, s: Side, a: Answer) {
        self.answers.push_back((op, s, a));
    }

    fn scripted(&mut self, op: Op, s: Side) -> Option<Answer> {
        let i = self
            .answers
            .iter()
            .position(|&(o, x, _)| o == op && x == s)?;
        self.answers.remove(i).map(|(_, _, a)| a)
    }

    fn record(&mut self, op: Op, s: Side, asked: usize, r: io::Result<usize>) -> io::Result<usize> {
        self.this_pump += 1;
        assert!(
            self.this_pump < 10_000,
            "the relay spins: {:?}",
            &self.log[self.log.len() - 10..]
        );
        self.log
            .push((op, s, asked, r.as_ref().map(|n| *n).map_err(errno)));
        r
    }

    fn calls(&self, op: Op, s: Side) -> Vec<Call> {
        self.log
            .iter()
            .filter(|c| c.0 == op && c.1 == s)
            .copied()
            .collect()
    }

    /// Move up to `n` bytes of `s`'s receive queue into `out`, stopping
    /// at the urgent mark.
    fn take(&mut self, s: Side, n: usize) -> Vec<u8> {
        let p = self.peer(s);
        let n = n.min(p.rx.len()).min(p.mark.unwrap_or(usize::MAX));
        if let Some(m) = &mut p.mark {
            *m -= n;
        }
        p.rx.drain(..n).collect()
    }

    /// send or writev (`op`) of `buf` to `s`'s far end.
    fn send_as(&mut self, op: Op, s: Side, buf: &[u8]) -> io::Result<usize> {
        let room = self.peer(s).room;
        let r = match (self.scripted(op, s), self.peer(s).reset) {
            (Some(Answer::Err(e)), _) | (None, Some(e)) => Err(err(e)),
            (Some(Answer::Take(n)), _) => Ok(n.min(buf.len())),
            (None, None) if room == 0 => Err(err(EAGAIN)),
            (None, None) => Ok(buf.len().min(room)),
        };
        if let Ok(n) = r {
            self.deliver(s, &buf[..n]);
        }
        self.record(op, s, buf.len(), r)
    }

    fn deliver(&mut self, to: Side, bytes: &[u8]) {
        let p = self.peer(to);
        assert!(
            !p.shut,
            "{} bytes sent to {to:?} after its FIN",
            bytes.len()
        );
        p.room -= bytes.len();
        p.got.extend_from_slice(bytes);
    }

    fn pipe(&mut self, pipe: &Pipe) -> &mut VecDeque<u8> {
        self.pipes.entry(pipe.read_fd()).or_default()
    }

    /// The read side of `s` as both recv and splice see it: `None` when
    /// there is something to read.
    fn empty(&mut self, s: Side) -> Option<io::Result<usize>> {
        let p = self.peer(s);
        if let Some(e) = p.reset {
            return Some(Err(io::Error::from_raw_os_error(e)));
        }
        if p.rx.is_empty() {
            return Some(if p.fin { Ok(0) } else { Err(err(EAGAIN)) });
        }
        None
    }
}

fn err(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

impl Kernel for Script {
    type Socket = Side;

    fn recv(&mut self, from: &Side, buf: &mut [u8]) -> io::Result<usize> {
        let s = *from;
        let r = match self.scripted(Op::Recv, s) {
            Some(Answer::Err(e)) => Err(err(e)),
            Some(Answer::Take(n)) => Ok(n),
            None => {
                // At the mark, recv steps over the urgent byte and reads on.
                if self.peer(s).mark == Some(0) {
                    self.peer(s).mark = None;
                }
                match self.empty(s) {
                    Some(r) => r,
                    None => Ok(buf.len()),
                }
            }
        };
        let r = r.map(|n| {
            let bytes = self.take(s, n.min(buf.len()));
            buf[..bytes.len()].copy_from_slice(&bytes);
            bytes.len()
        });
        self.record(Op::Recv, s, buf.len(), r)
    }

    fn send(&mut self, to: &Side, buf: &[u8]) -> io::Result<usize> {
        self.send_as(Op::Send, *to, buf)
    }

    fn send_vectored(&mut self, to: &Side, [a, b]: [&[u8]; 2]) -> io::Result<usize> {
        let buf = [a, b].concat();
        self.send_as(Op::SendV, *to, &buf)
    }

    fn splice_in(&mut self, from: &Side, pipe: &Pipe, len: usize) -> io::Result<usize> {
        let s = *from;
        let held = self.pipe(pipe).len();
        let r = match self.scripted(Op::SpliceIn, s) {
            Some(Answer::Err(e)) => Err(err(e)),
            // GRO: one skb can hold more than was asked for.
            Some(Answer::Take(n)) => Ok(n),
            // splice stops at the mark: 0 there once the FIN is in too,
            // EAGAIN before.
            None if self.peer(s).mark == Some(0) && self.peer(s).fin => Ok(0),
            None if self.peer(s).mark == Some(0) => Err(err(EAGAIN)),
            None => match self.empty(s) {
                Some(r) => r,
                None if held >= pipe.capacity() => Err(err(EAGAIN)),
                None => Ok(len.min(pipe.capacity() - held)),
            },
        };
        let r = r.map(|n| {
            let bytes = self.take(s, n);
            self.pipe(pipe).extend(bytes.iter());
            bytes.len()
        });
        self.record(Op::SpliceIn, s, len, r)
    }

    fn splice_out(&mut self, pipe: &Pipe, to: &Side, len: usize) -> io::Result<usize> {
        let s = *to;
        let held = self.pipe(pipe).len();
        let room = self.peer(s).room;
        let r = match (self.scripted(Op::SpliceOut, s), self.peer(s).reset) {
            (Some(Answer::Err(e)), _) | (None, Some(e)) => Err(err(e)),
            (Some(Answer::Take(n)), _) => Ok(n.min(len).min(held)),
            (None, None) if room == 0 || held == 0 => Err(err(EAGAIN)),
            (None, None) => Ok(len.min(held).min(room)),
        };
        if let Ok(n) = r {
            let bytes: Vec<u8> = self.pipe(pipe).drain(..n).collect();
            self.deliver(s, &bytes);
        }
        self.record(Op::SpliceOut, s, len, r)
    }

    fn write_pipe(&mut self, pipe: &Pipe, buf: &[u8]) -> io::Result<usize> {
        let room = pipe.capacity() - self.pipe(pipe).len().min(pipe.capacity());
        let n = buf.len().min(room);
        let r = if n == 0 { Err(err(EAGAIN)) } else { Ok(n) };
        self.pipe(pipe).extend(buf[..n].iter());
        // A pipe belongs to one direction; which side does not matter here.
        self.record(Op::WritePipe, C, buf.len(), r)
    }

    fn at_urgent_mark(&mut self, s: &Side) -> io::Result<bool> {
        let at = self.peer(*s).mark == Some(0);
        self.record(Op::AtMark, *s, 0, Ok(usize::from(at)))
            .map(|n| n == 1)
    }

    fn shutdown_write(&mut self, s: &Side) -> io::Result<()> {
        let r = match (self.scripted(Op::Shutdown, *s), self.peer(*s).reset) {
            (Some(Answer::Err(e)), _) | (None, Some(e)) => Err(err(e)),
            _ => {
                self.peer(*s).shut = true;
                Ok(0)
            }
        };
        self.record(Op::Shutdown, *s, 0, r).map(|_| ())
    }
}

/// A relay between two established sockets, the scripted kernel under it,
/// and what a worker lends it.
struct Lab {
    k: Script,
    relay: Relay,
    bufs: Buffers,
    stats: WorkerStats,
}

impl Lab {
    fn new() -> Lab {
        let mut relay = Relay::new(true, None);
        // The upstream connect completed: its socket is writable.
        relay.ready_mut(U).writable = true;
        Lab {
            k: Script::default(),
            relay,
            bufs: Buffers::new(PIPE, PIPE, 4),
            stats: WorkerStats::default(),
        }
    }

    /// A relay whose client -> upstream direction starts with `header`
    /// (`--send-proxy`, CONN-11).
    fn with_header(header: Header) -> Lab {
        let mut lab = Lab::new();
        lab.relay = Relay::new(true, Some(header));
        lab.relay.ready_mut(U).writable = true;
        lab
    }

    /// A direction that has already turned bulk, so it splices (CONN-6).
    fn bulk(mut self, source: Side) -> Lab {
        match &mut self.relay.dirs[source.index()].chan {
            Channel::Splice { small, .. } => *small = false,
            Channel::Copy(_) => unreachable!("a splicing relay"),
        }
        self
    }

    fn pump(&mut self) -> Result<Pumped, End> {
        self.k.this_pump = 0;
        self.relay
            .pump(&mut self.k, (&C, &U), &mut self.bufs, &self.stats)
    }

    /// `source`'s far end sends `bytes` (and its socket says readable).
    fn send(&mut self, source: Side, bytes: &[u8]) {
        self.k.peer(source).rx.extend(bytes.iter());
        self.relay.ready_mut(source).readable = true;
    }

    /// `source`'s far end sends its FIN, reported with EPOLLRDHUP.
    fn fin(&mut self, source: Side) {
        self.k.peer(source).fin = true;
        let r = self.relay.ready_mut(source);
        r.readable = true;
        r.fin = true;
    }

    /// `sink`'s socket takes `room` more bytes (and says writable).
    fn room(&mut self, sink: Side, room: usize) {
        self.k.peer(sink).room = room;
        self.relay.ready_mut(sink).writable = true;
    }

    fn ready(&mut self, side: Side) -> Ready {
        *self.relay.ready_mut(side)
    }

    fn pending(&self, source: Side) -> usize {
        self.relay.dirs[source.index()].pending()
    }

    fn flow(&self, source: Side) -> Flow {
        self.relay.dirs[source.index()].flow
    }

    fn got(&mut self, sink: Side) -> &[u8] {
        &self.k.peer(sink).got
    }

    /// Pump until nothing moves; the sink's `room` is refilled each time.
    fn pump_until_quiet(&mut self) -> Pumped {
        loop {
            let p = self.pump().expect("no error");
            if !p.moved {
                return p;
            }
        }
    }
}

/// A stream whose every byte says where it is (a 251-cycle, so an offset
/// lost or repeated shows).
fn stream(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn eagain_from_splice_into_a_pipe_holding_bytes_keeps_the_source_readable() {
    // CONN-2: a pipe out of slots says EAGAIN while bytes are still in it;
    // that is not the socket running dry.
    let mut lab = Lab::new().bulk(C);
    let data = stream(100_000);
    lab.send(C, &data);
    lab.room(U, 0);
    lab.k.answer(Op::SpliceIn, C, Answer::Take(1_000));
    lab.k.answer(Op::SpliceIn, C, Answer::Err(EAGAIN));
    lab.pump().expect("no error");
    assert_eq!(lab.pending(C), 1_000);
    assert!(
        lab.k.calls(Op::SpliceIn, C).last().unwrap().3 == Err(EAGAIN),
        "{:?}",
        lab.k.log
    );
    assert!(lab.ready(C).readable, "pipe full is not socket empty");
    assert!(!lab.ready(U).writable, "the sink said EAGAIN");
    // The sink frees up: the pipe drains and reading goes on, with no new
    // readiness event from the source.
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &data[..]);
}

#[test]
fn eagain_from_splice_into_an_empty_pipe_clears_the_readiness() {
    let mut lab = Lab::new().bulk(C);
    let p = lab.pump().expect("no error");
    assert!(!p.moved);
    assert_eq!(
        lab.k.calls(Op::SpliceIn, C),
        vec![(Op::SpliceIn, C, PIPE, Err(EAGAIN))]
    );
    assert!(
        !lab.ready(C).readable,
        "an empty pipe proves the socket empty"
    );
}

#[test]
fn a_splice_that_moves_more_than_asked_is_delivered_whole() {
    // GRO: one splice brought 94 KB into a 64 KiB pipe. Nothing may assume
    // pending <= capacity.
    let mut lab = Lab::new().bulk(C);
    let data = stream(200_000);
    lab.send(C, &data);
    lab.room(U, 0);
    lab.k.answer(Op::SpliceIn, C, Answer::Take(PIPE + 30_000));
    lab.pump().expect("no error");
    assert_eq!(lab.pending(C), PIPE + 30_000);
    assert_eq!(
        lab.k.calls(Op::SpliceIn, C),
        vec![(Op::SpliceIn, C, PIPE, Ok(PIPE + 30_000))],
        "an over-full pipe is not read into"
    );
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    assert_eq!(
        lab.k.calls(Op::SpliceOut, U)[1],
        (Op::SpliceOut, U, PIPE + 30_000, Ok(PIPE + 30_000)),
        "the drain asks for all that is pending"
    );
    assert_eq!(lab.got(U), &data[..]);
}

#[test]
fn splice_refused_with_an_empty_pipe_falls_back_to_copying() {
    let mut lab = Lab::new().bulk(C);
    let data = stream(150_000);
    lab.send(C, &data);
    lab.fin(C);
    lab.k.answer(Op::SpliceIn, C, Answer::Err(libc::EINVAL));
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &data[..]);
    assert_eq!(lab.flow(C), Flow::Shut, "then the FIN");
    assert_eq!(lab.stats.splice_fallbacks.get(), 1);
    let first_refusal = lab.k.log.iter().position(|c| c.0 == Op::SpliceIn).unwrap();
    assert!(
        lab.k.log[first_refusal + 1..]
            .iter()
            .all(|c| !matches!(c.0, Op::SpliceIn | Op::SpliceOut)),
        "copies from then on: {:?}",
        lab.k.log
    );
    assert_eq!(
        lab.stats.pipes_in_use.get(),
        0,
        "its empty pipe went back to the pool"
    );
}

#[test]
fn splice_refused_with_bytes_in_the_pipe_resets_the_source() {
    // Copying now would send the new bytes ahead of those in the pipe; the
    // source is reset instead, so its sender learns (CONN-1).
    let mut lab = Lab::new().bulk(C);
    lab.send(C, &stream(10_000));
    lab.room(U, 0);
    lab.k.answer(Op::SpliceIn, C, Answer::Take(1_000));
    lab.k.answer(Op::SpliceIn, C, Answer::Err(libc::EINVAL));
    let end = lab.pump().expect_err("ends");
    assert_eq!(end.kind, EndKind::ClientReset);
    assert_eq!(lab.stats.splice_fallbacks.get(), 0);
    assert!(lab.got(U).is_empty());
}

#[test]
fn a_zero_from_splice_at_the_urgent_mark_is_not_eof_and_recv_steps_over_it() {
    // CONN-7: splice stops at the mark and, with the FIN in, reads 0 there.
    // The relay asks SIOCATMARK, and reads on with recv, which steps over.
    let mut lab = Lab::new().bulk(C);
    let data = stream(40_000);
    lab.send(C, &data);
    lab.k.peer(C).mark = Some(20_000);
    lab.fin(C);
    lab.pump_until_quiet();
    assert_eq!(
        lab.got(U),
        &data[..],
        "every in-band byte, the mark's after"
    );
    assert_eq!(lab.flow(C), Flow::Shut, "and only then the FIN");
    let ops: Vec<Op> = lab.k.log.iter().map(|c| c.0).collect();
    let at_mark = ops.iter().position(|o| *o == Op::AtMark).expect("asked");
    assert_eq!(lab.k.log[at_mark - 1].3, Ok(0), "the 0 from splice");
    assert_eq!(ops[at_mark + 1], Op::Recv, "{ops:?}");
    assert!(lab.ready(C).urgent, "urgent from then on");
}

#[test]
fn urgent_data_waits_for_the_pipe_to_empty_before_recv_steps_over_the_mark() {
    // The 5,000 bytes before the mark wait in the pipe when splice reads 0
    // at the mark (the FIN is in): not EOF, and recv now would overtake
    // them, so the direction waits, keeping its readiness, without spinning
    // on the 0.
    let mut lab = Lab::new().bulk(C);
    let data = stream(20_000);
    lab.send(C, &data);
    lab.k.peer(C).mark = Some(5_000);
    lab.fin(C);
    lab.room(U, 0);
    lab.pump().expect("no error");
    assert_eq!(lab.pending(C), 5_000);
    assert!(lab.k.calls(Op::Recv, C).is_empty(), "{:?}", lab.k.log);
    assert!(lab.ready(C).readable && lab.ready(C).urgent);
    assert_eq!(lab.flow(C), Flow::Open, "not EOF");
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &data[..]);
}

#[test]
fn with_urgent_data_a_short_read_does_not_end_the_drain() {
    // Reads stop short at a mark, so once urgent data was reported a short
    // read proves nothing: read on to EAGAIN.
    let mut lab = Lab::new();
    lab.relay.ready_mut(C).urgent = true;
    let data = stream(3_000);
    lab.send(C, &data);
    lab.k.peer(C).mark = Some(1_000);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &data[..]);
    let recvs = lab.k.calls(Op::Recv, C);
    assert_eq!(
        recvs.iter().map(|c| c.3).collect::<Vec<_>>(),
        vec![Ok(1_000), Ok(2_000), Err(EAGAIN)],
        "to the mark, over it, then EAGAIN"
    );
    assert!(!lab.ready(C).readable);
}

#[test]
fn a_short_read_ends_the_drain_without_another_recv() {
    // CONN-7: fewer bytes than asked for emptied the receive queue.
    let mut lab = Lab::new();
    let data = stream(100);
    lab.send(C, &data);
    lab.pump().expect("no error");
    assert_eq!(
        lab.k.calls(Op::Recv, C),
        vec![(Op::Recv, C, SCRATCH_SIZE, Ok(100))],
        "no recv that could only say EAGAIN"
    );
    assert!(!lab.ready(C).readable);
    assert_eq!(lab.got(U), &data[..]);
}

#[test]
fn a_short_read_after_the_peers_fin_ends_the_stream() {
    // CONN-7: with EPOLLRDHUP already seen, the short read was the last.
    let mut lab = Lab::new();
    let data = stream(100);
    lab.send(C, &data);
    lab.fin(C);
    lab.pump().expect("no error");
    assert_eq!(lab.k.calls(Op::Recv, C).len(), 1, "no recv to read the 0");
    assert_eq!(lab.got(U), &data[..]);
    assert!(lab.k.peer(U).shut, "the FIN passed on");
    assert_eq!(lab.flow(C), Flow::Shut);
}

#[test]
fn the_fin_is_passed_on_only_once_the_pipe_is_empty() {
    // CONN-1: EOF from the client while the upstream still has bytes of it
    // to take.
    let mut lab = Lab::new().bulk(C);
    let data = stream(50_000);
    lab.send(C, &data);
    lab.fin(C);
    lab.room(U, 10_000);
    lab.pump().expect("no error");
    assert_eq!(lab.flow(C), Flow::Eof);
    assert!(lab.pending(C) > 0);
    assert!(lab.k.calls(Op::Shutdown, U).is_empty(), "no FIN yet");
    while lab.got(U).len() < data.len() {
        assert!(!lab.k.peer(U).shut);
        lab.room(U, 30_000);
        lab.pump().expect("no error");
    }
    assert_eq!(lab.got(U), &data[..]);
    assert_eq!(lab.k.calls(Op::Shutdown, U).len(), 1);
    assert_eq!(lab.flow(C), Flow::Shut);
    assert!(!lab.relay.is_complete(), "the other way is still open");
}

#[test]
fn the_second_eof_completes_without_a_shutdown_call() {
    // The other way already passed its FIN on: the connection is complete
    // and its close sends this FIN (CONN-8), so no shutdown is made.
    let mut lab = Lab::new();
    lab.fin(U);
    lab.pump_until_quiet();
    assert_eq!(lab.flow(U), Flow::Shut);
    assert_eq!(lab.k.calls(Op::Shutdown, C).len(), 1);
    lab.send(C, &stream(10));
    lab.fin(C);
    lab.pump_until_quiet();
    assert!(lab.relay.is_complete());
    assert!(lab.k.calls(Op::Shutdown, U).is_empty(), "{:?}", lab.k.log);
    assert_eq!(lab.got(U), &stream(10)[..]);
}

#[test]
fn a_reset_is_blamed_on_the_side_it_came_from() {
    // Either peer resetting, seen while reading from it or while writing
    // to it, ends the connection as that peer's reset.
    for (source, reset, kind) in [
        (C, C, EndKind::ClientReset),
        (U, U, EndKind::UpstreamReset),
        (C, U, EndKind::UpstreamReset),
        (U, C, EndKind::ClientReset),
    ] {
        for bulk in [false, true] {
            let mut lab = Lab::new();
            if bulk {
                lab = lab.bulk(source);
            }
            lab.relay.ready_mut(C).readable = false;
            lab.send(source, &stream(40_000));
            let e = if reset == source {
                libc::ECONNRESET
            } else {
                libc::EPIPE
            };
            lab.k.peer(reset).reset = Some(e);
            let end = lab.pump().expect_err("ends");
            let what = format!("{source:?} sending, {reset:?} reset, bulk {bulk}");
            assert_eq!(end.kind, kind, "{what}");
            assert_eq!(end.cause.map(|c| errno(&c)), Some(e), "{what}");
        }
    }
}

#[test]
fn a_failed_shutdown_is_the_sinks_reset() {
    let mut lab = Lab::new();
    lab.fin(C);
    lab.k.answer(Op::Shutdown, U, Answer::Err(libc::ENOTCONN));
    let end = lab.pump().expect_err("ends");
    assert_eq!(end.kind, EndKind::UpstreamReset);
}

#[test]
fn the_scratch_relay_leaves_what_the_sink_did_not_take_in_the_pipe() {
    // CONN-6: one recv, one send, and the rest goes into the pipe before
    // the call returns; nothing waits in the scratch buffer.
    let mut lab = Lab::new();
    let data = stream(3_000);
    lab.send(C, &data);
    lab.room(U, 1_000);
    lab.pump().expect("no error");
    let ops: Vec<(Op, usize, Result<usize, i32>)> =
        lab.k.log.iter().map(|c| (c.0, c.2, c.3)).collect();
    assert_eq!(
        &ops[..3],
        &[
            (Op::Recv, SCRATCH_SIZE, Ok(3_000)),
            (Op::Send, 3_000, Ok(1_000)),
            (Op::WritePipe, 2_000, Ok(2_000)),
        ]
    );
    assert_eq!(lab.pending(C), 2_000);
    assert_eq!(lab.got(U), &data[..1_000]);
    // What comes next queues behind the pipe, never ahead of it.
    let more = stream(5_000);
    lab.send(C, &more);
    lab.pump().expect("no error");
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    let mut all = data.clone();
    all.extend_from_slice(&more);
    assert_eq!(lab.got(U), &all[..]);
    assert_eq!(lab.pending(C), 0);
    assert_eq!(lab.stats.pipes_in_use.get(), 0, "CONN-4: pipe given back");
}

#[test]
fn a_read_that_fills_the_scratch_buffer_turns_the_direction_to_splice() {
    // CONN-6: small reads are relayed, bulk is spliced.
    let mut lab = Lab::new();
    let data = stream(SCRATCH_SIZE + 50_000);
    lab.send(C, &data);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &data[..]);
    let first: Vec<Op> = lab.k.log.iter().take(3).map(|c| c.0).collect();
    assert_eq!(first, vec![Op::Recv, Op::Send, Op::SpliceIn]);
}

#[test]
fn a_small_first_splice_turns_the_direction_back_to_relaying() {
    let mut lab = Lab::new().bulk(C);
    lab.send(C, &stream(100));
    lab.pump_until_quiet();
    lab.send(C, &stream(200));
    lab.pump_until_quiet();
    assert_eq!(lab.k.calls(Op::SpliceIn, C).len(), 1, "{:?}", lab.k.log);
    assert_eq!(
        lab.k.calls(Op::Recv, C).last().unwrap().3,
        Ok(200),
        "the next message by recv"
    );
    assert_eq!(lab.got(U).len(), 300);
}

#[test]
fn one_pump_does_a_bounded_amount_of_work_then_asks_to_come_back() {
    // CONN-5: a source that never runs dry gets MAX_ROUNDS fills per pump.
    let mut lab = Lab::new().bulk(C);
    let data = stream(3 * MAX_ROUNDS * PIPE);
    lab.send(C, &data);
    let p = lab.pump().expect("no error");
    assert!(p.exhausted && p.moved);
    assert_eq!(lab.k.calls(Op::SpliceIn, C).len(), MAX_ROUNDS);
    assert_eq!(lab.got(U).len(), MAX_ROUNDS * PIPE);
    assert!(lab.ready(C).readable, "more to read");
    // The worker comes back, with no new event.
    while lab.pump().expect("no error").exhausted {}
    assert_eq!(lab.got(U), &data[..]);
}

#[test]
fn a_blocked_sink_stops_the_reads_until_it_takes_more() {
    // CONN-3: with the pipe full and the sink not writable, the source is
    // left unread: the kernel's window pushes back on its sender.
    let mut lab = Lab::new().bulk(C);
    let data = stream(10 * PIPE);
    lab.send(C, &data);
    lab.room(U, 0);
    let p = lab.pump().expect("no error");
    assert!(!p.exhausted);
    assert_eq!(lab.pending(C), PIPE);
    assert_eq!(lab.k.calls(Op::SpliceIn, C).len(), 1, "{:?}", lab.k.log);
    assert_eq!(
        lab.k.peer(C).rx.len(),
        9 * PIPE,
        "the rest stays in the kernel"
    );
    let calls = lab.k.log.len();
    lab.pump().expect("no error");
    assert_eq!(lab.k.log.len(), calls, "no syscall while nothing can move");
}

#[test]
fn a_relay_released_with_bytes_in_its_pipe_closes_it_instead_of_pooling_it() {
    // CONN-4, PIPE-1: only an empty pipe goes back to the pool.
    let mut lab = Lab::new().bulk(C);
    lab.send(C, &stream(1_000));
    lab.room(U, 0);
    lab.pump().expect("no error");
    assert_eq!(lab.pending(C), 1_000);
    lab.relay.release(&mut lab.bufs.pipes, &lab.stats);
    assert_eq!(lab.stats.pipes_in_use.get(), 0);
    assert_eq!(lab.stats.pipes_pooled.get(), 0, "not pooled");
}

/// A PROXY v2 header for an IPv6 client, 52 bytes: long enough to be cut
/// into pieces.
fn header() -> Header {
    proxy_header::encode(
        Version::V2,
        "[2001:2:0:1::2]:40000".parse().unwrap(),
        "[2001:2:0:2::2]:80".parse().unwrap(),
    )
}

/// What the upstream must receive: the header, then the client's bytes.
fn header_then(data: &[u8]) -> Vec<u8> {
    let mut want = header().as_bytes().to_vec();
    want.extend_from_slice(data);
    want
}

/// The calls that read the client's socket.
fn client_reads(lab: &Lab) -> usize {
    lab.k
        .log
        .iter()
        .filter(|c| c.1 == C && matches!(c.0, Op::Recv | Op::SpliceIn))
        .count()
}

/// The calls the relay made, without their lengths and results.
fn ops(lab: &Lab) -> Vec<(Op, Side)> {
    lab.k.log.iter().map(|c| (c.0, c.1)).collect()
}

#[test]
fn the_proxy_header_goes_out_first_in_one_write_with_the_clients_first_bytes() {
    // CONN-11: the client's request is already there when the upstream
    // connect completes: one recv, and one writev of header and request,
    // where the header alone would have cost a send more.
    let mut lab = Lab::with_header(header());
    let data = stream(100);
    lab.send(C, &data);
    lab.pump().expect("no error");
    let h = header().as_bytes().len();
    assert_eq!(
        &lab.k.log[..2],
        &[
            (Op::Recv, C, SCRATCH_SIZE, Ok(100)),
            (Op::SendV, U, h + 100, Ok(h + 100))
        ],
        "{:?}",
        lab.k.log
    );
    assert_eq!(lab.got(U), &header_then(&data)[..]);
    assert!(lab.k.calls(Op::Send, U).is_empty(), "no send of its own");
    assert_eq!(
        lab.relay.bytes(),
        (100, 0),
        "the header is not the client's"
    );
    assert!(!lab.ready(C).readable, "CONN-7: the short read drained it");
    assert!(lab.relay.dirs[0].preface.is_none(), "and is written once");
    // What follows goes the usual way.
    let more = stream(50);
    lab.send(C, &more);
    lab.pump().expect("no error");
    let mut all = data.clone();
    all.extend_from_slice(&more);
    assert_eq!(lab.got(U), &header_then(&all)[..]);
    assert_eq!(lab.k.calls(Op::SendV, U).len(), 1);
}

#[test]
fn with_nothing_from_the_client_the_header_goes_out_alone_at_once() {
    // A server that waits for the header before it speaks must get it
    // without the client saying anything.
    let mut lab = Lab::with_header(header());
    lab.pump().expect("no error");
    let h = header().as_bytes().len();
    assert_eq!(
        ops(&lab)[..2],
        [(Op::Recv, C), (Op::Send, U)],
        "{:?}",
        lab.k.log
    );
    assert_eq!(lab.k.log[1].3, Ok(h));
    assert_eq!(lab.got(U), header().as_bytes());
    assert!(!lab.ready(C).readable);
    lab.send(C, &stream(10));
    lab.pump().expect("no error");
    assert_eq!(lab.got(U), &header_then(&stream(10))[..]);
}

#[test]
fn a_partly_written_header_is_resumed_when_the_upstream_is_writable() {
    let mut lab = Lab::with_header(header());
    let data = stream(5_000);
    lab.send(C, &data);
    lab.room(U, 10);
    let p = lab.pump().expect("no error");
    assert!(!p.exhausted);
    assert_eq!(lab.got(U), &header().as_bytes()[..10], "10 bytes taken");
    assert!(!lab.ready(U).writable, "the upstream said EAGAIN");
    assert_eq!(
        client_reads(&lab),
        1,
        "the one read of the merged write: {:?}",
        lab.k.log
    );
    assert_eq!(lab.relay.bytes(), (0, 0));
    // Not writable: pumping again makes no call at all.
    let calls = lab.k.log.len();
    lab.pump().expect("no error");
    assert_eq!(lab.k.log.len(), calls);
    // 20 more bytes, then the rest: the header's, then the client's.
    lab.room(U, 20);
    lab.pump().expect("no error");
    assert_eq!(lab.got(U), &header().as_bytes()[..30]);
    let more = stream(700);
    lab.send(C, &more);
    lab.pump().expect("no error");
    assert_eq!(client_reads(&lab), 1, "not read while the preface waits");
    assert!(lab.ready(C).readable, "and its readiness kept");
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    let writes: Vec<(Op, usize, usize)> = lab
        .k
        .log
        .iter()
        .filter(|c| c.1 == U && matches!(c.0, Op::Send | Op::SendV))
        .filter_map(|c| Some((c.0, c.2, c.3.ok()?)))
        .collect();
    let h = header().as_bytes().len();
    let first = h + 5_000;
    assert_eq!(
        &writes[..3],
        &[
            (Op::SendV, first, 10),
            (Op::Send, first - 10, 20),
            (Op::Send, first - 30, first - 30)
        ],
        "each write asks for what is left: {:?}",
        lab.k.log
    );
    let mut all = data.clone();
    all.extend_from_slice(&more);
    assert_eq!(lab.got(U), &header_then(&all)[..]);
    assert_eq!(lab.relay.bytes().0, all.len() as u64);
}

#[test]
fn client_bytes_and_fin_that_came_early_queue_behind_the_header() {
    // The client sent a bulk upload and its FIN while the upstream took
    // nothing: one scratch buffer's worth waits in the preface, the rest in
    // the client's socket (CONN-3); then all follow the header in order,
    // spliced as ever, and the FIN last (CONN-1).
    let mut lab = Lab::with_header(header());
    let data = stream(3 * PIPE + 123);
    lab.send(C, &data);
    lab.fin(C);
    lab.room(U, 0);
    lab.pump().expect("no error");
    assert_eq!(client_reads(&lab), 1);
    assert_eq!(
        lab.k.peer(C).rx.len(),
        data.len() - SCRATCH_SIZE,
        "the rest still in the kernel"
    );
    assert_eq!(lab.flow(C), Flow::Open, "the FIN is not read");
    assert!(lab.got(U).is_empty() && !lab.k.peer(U).shut);
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &header_then(&data)[..]);
    assert!(lab.k.peer(U).shut, "then the FIN");
    assert_eq!(lab.flow(C), Flow::Shut);
    assert!(
        !lab.k.calls(Op::SpliceOut, U).is_empty(),
        "a full first read turns the direction bulk: zero-copy after it: {:?}",
        lab.k.log
    );
}

#[test]
fn a_client_that_closes_at_once_gets_the_header_then_its_fin_passed_on() {
    let mut lab = Lab::with_header(header());
    lab.fin(C);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), header().as_bytes());
    assert!(lab.k.peer(U).shut, "the FIN after the header");
    assert_eq!(lab.flow(C), Flow::Shut);
}

#[test]
fn the_server_speaking_first_is_not_held_up_by_a_waiting_header() {
    // Only the client -> upstream direction waits for the header.
    let mut lab = Lab::with_header(header());
    lab.room(U, 0);
    let banner = stream(300);
    lab.send(U, &banner);
    lab.pump().expect("no error");
    assert_eq!(lab.got(C), &banner[..]);
    assert!(lab.got(U).is_empty());
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), header().as_bytes());
}

#[test]
fn an_upstream_that_fails_while_the_header_is_written_resets_both_ends() {
    // EPIPE or ECONNRESET from the header's write (with the client's first
    // bytes, or alone, or its rest) is the upstream's reset, as from any
    // other write to it: the connection ends as UpstreamReset, and closing
    // it resets both peers (CONN-8), so the client learns its bytes did
    // not arrive (CONN-1).
    for e in [libc::EPIPE, libc::ECONNRESET] {
        for (client_sent, partly) in [(true, false), (false, false), (true, true)] {
            let mut lab = Lab::with_header(header());
            if client_sent {
                lab.send(C, &stream(1_000));
            }
            if partly {
                lab.room(U, 7);
                lab.pump().expect("no error");
                lab.room(U, usize::MAX);
            }
            lab.k.peer(U).reset = Some(e);
            let end = lab.pump().expect_err("ends");
            let what = format!("errno {e}, client sent {client_sent}, partly {partly}");
            assert_eq!(end.kind, EndKind::UpstreamReset, "{what}");
            assert_eq!(end.cause.map(|c| errno(&c)), Some(e), "{what}");
            assert_eq!(lab.got(U).len(), if partly { 7 } else { 0 }, "{what}");
        }
    }
}

#[test]
fn client_bytes_the_upstream_did_not_take_with_the_header_go_next() {
    // The writev took the header and part of the client's first bytes:
    // the rest waits in the preface, ahead of anything read after, and the
    // FIN that came with them (a short read with EPOLLRDHUP, CONN-7) goes
    // last.
    let mut lab = Lab::with_header(header());
    let h = header().as_bytes().len();
    let data = stream(5_000);
    lab.send(C, &data);
    lab.fin(C);
    lab.room(U, h + 100);
    lab.pump().expect("no error");
    assert_eq!(lab.got(U), &header_then(&data[..100])[..]);
    assert_eq!(lab.relay.bytes().0, 100, "the client's 100 counted");
    assert_eq!(lab.flow(C), Flow::Eof, "the short read saw the FIN");
    assert!(!lab.k.peer(U).shut, "but the rest comes first");
    lab.room(U, usize::MAX);
    lab.pump_until_quiet();
    assert_eq!(lab.got(U), &header_then(&data)[..]);
    assert_eq!(lab.relay.bytes().0, 5_000);
    assert!(lab.k.peer(U).shut);
    assert_eq!(client_reads(&lab), 1, "{:?}", lab.k.log);
}
