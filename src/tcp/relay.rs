//! The relay: the two directions of an established connection, each moving
//! bytes from its source socket to its sink — small messages by recv/send
//! through the worker's scratch buffer, bulk by splice through a pooled
//! pipe, or by copy through a buffer of its own where splice is refused —
//! with backpressure and half-close.
//!
//! Each direction has its own half-close state ([`Flow`]): `Open` -> `Eof`
//! (the source sent FIN; what is in the pipe still goes out) -> `Shut` (the
//! FIN passed on). [`Relay::pump`] is generic over [`Kernel`], the calls it
//! makes on the two sockets and the pipe: the worker's connections use the
//! real one ([`Sys`], monomorphised: no `dyn`, no cost), and the unit tests
//! (relay/tests.rs) a scripted kernel that checks each invariant below.
//! What the kernel reported about each socket is [`Ready`], set by the
//! caller from its events and kept here.
//!
//! What must stay true (the names are the ones they had in conn.rs):
//! - CONN-1 (nothing lost): every byte read from one side is written to the
//!   other, or the side it came from is reset. EOF becomes a FIN on the other
//!   side only once that direction holds nothing: shutdown(SHUT_WR), or, when
//!   the other direction is already done, the graceful close that follows at
//!   once (CONN-8).
//! - CONN-2 (edge-triggered): a readiness flag is cleared only when the
//!   kernel said EAGAIN. EAGAIN from splicing *into* a pipe that already
//!   holds bytes may mean "pipe full" (HAProxy's lesson), so it does not
//!   clear the source's flag; only EAGAIN into an empty pipe does.
//! - CONN-3 (backpressure): a direction reads only while its pipe or buffer
//!   has room; when the sink blocks, the source is left unread and the
//!   kernel's receive window pushes back on the sender. Nothing buffers
//!   without bound. Sockets stay registered for both readiness kinds, so
//!   backpressure costs no epoll_ctl on the hot path.
//! - CONN-4 (pipes are scarce): a direction holds a pipe only while bytes
//!   are in it; it goes back to the pool as soon as it is empty.
//! - CONN-5 (fairness): one call to [`Relay::pump`] does a bounded amount of
//!   work; when the bound is hit it says so ([`Pumped::exhausted`], the
//!   connection's `Drive::Again`) and the worker comes back to it after
//!   serving others.
//! - CONN-6 (small messages are copied, bulk is spliced): while a
//!   direction's reads are small and its pipe is empty, it relays through
//!   the worker's scratch buffer: one recv, one send, and whatever the sink
//!   did not take is written into the direction's pipe at once, so the
//!   scratch buffer never holds bytes between calls and the pipe still
//!   orders everything that follows. A read that fills the scratch buffer
//!   switches the direction to splice; a splice into an empty pipe that
//!   brings less than that, as the first read of a drive, switches it back
//!   (HAProxy's splice-auto idea). Not any later read: the last splice of a
//!   bulk burst is short too.
//! - CONN-7 (a short read ends the drain): a recv that returns less than it
//!   asked for emptied the receive queue, so the readiness flag is cleared
//!   without the extra recv that would only say EAGAIN, and if the peer's
//!   FIN had already been reported (EPOLLRDHUP) the stream has ended, without
//!   the extra recv that would only say 0. The one exception is urgent data
//!   (EPOLLPRI): reads stop short at its mark, so once a socket has reported
//!   it, its reads go on until EAGAIN, and always by recv, which steps over
//!   the mark where splice cannot (splice stops there, and answers 0 when
//!   the FIN is in too, so a 0 from splice is taken for EOF only once
//!   SIOCATMARK says the socket is not at a mark). Short reads never count
//!   as drained for splice, whose reads also stop when the pipe runs out of
//!   slots.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;

use log::{debug, warn};
use mio::net::TcpStream;

use crate::stats::{EndKind, WorkerStats};
use crate::sys;
use crate::tcp::close::End;
use crate::tcp::pipe::{Buffers, Pipe, PipePool};
use crate::token::Side;

#[cfg(test)]
mod tests;

/// Fill/drain rounds per direction per drive before yielding (CONN-5).
/// With 64 KiB pipes that is up to 1 MiB per direction per turn.
const MAX_ROUNDS: usize = 16;
/// Copy-mode buffer per direction, allocated only while it holds bytes.
const COPY_BUF_SIZE: usize = 64 * 1024;

/// What the relay asks of the kernel: every operation it does on a
/// connection's two sockets and a direction's pipe. [`Sys`] is the real
/// one (the mio sockets and `sys`'s calls); the relay is generic over this
/// trait, so it is compiled for `Sys` alone, each call inlined, at no cost
/// (no `dyn`), and its unit tests drive it with a scripted kernel instead.
/// What readiness the kernel reported is [`Ready`], which the caller keeps.
pub trait Kernel {
    /// A TCP socket: the client's or the upstream one.
    type Socket;
    /// recv(2) into `buf`: `Ok(0)` is the end of the stream; reads stop
    /// short at an urgent mark, and one at the mark steps over it.
    fn recv(&mut self, from: &Self::Socket, buf: &mut [u8]) -> io::Result<usize>;
    /// send(2) of `buf`; may take less.
    fn send(&mut self, to: &Self::Socket, buf: &[u8]) -> io::Result<usize>;
    /// splice(2) from the socket into the pipe, asking for `len` bytes: GRO
    /// can make it move more. `Ok(0)` is EOF, or the urgent mark.
    fn splice_in(&mut self, from: &Self::Socket, pipe: &Pipe, len: usize) -> io::Result<usize>;
    /// splice(2) of up to `len` bytes from the pipe to the socket.
    fn splice_out(&mut self, pipe: &Pipe, to: &Self::Socket, len: usize) -> io::Result<usize>;
    /// write(2) of `buf` into the pipe; may take less.
    fn write_pipe(&mut self, pipe: &Pipe, buf: &[u8]) -> io::Result<usize>;
    /// SIOCATMARK: is the next byte to read the urgent mark?
    fn at_urgent_mark(&mut self, s: &Self::Socket) -> io::Result<bool>;
    /// shutdown(SHUT_WR): the FIN.
    fn shutdown_write(&mut self, s: &Self::Socket) -> io::Result<()>;
}

/// The real kernel: mio's sockets and `sys`.
pub struct Sys;

impl Kernel for Sys {
    type Socket = TcpStream;

    #[inline]
    fn recv(&mut self, mut from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        from.read(buf)
    }

    #[inline]
    fn send(&mut self, mut to: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        to.write(buf)
    }

    #[inline]
    fn splice_in(&mut self, from: &TcpStream, pipe: &Pipe, len: usize) -> io::Result<usize> {
        sys::splice(from.as_raw_fd(), pipe.write_fd(), len)
    }

    #[inline]
    fn splice_out(&mut self, pipe: &Pipe, to: &TcpStream, len: usize) -> io::Result<usize> {
        sys::splice(pipe.read_fd(), to.as_raw_fd(), len)
    }

    #[inline]
    fn write_pipe(&mut self, pipe: &Pipe, buf: &[u8]) -> io::Result<usize> {
        sys::write_pipe(pipe.write_fd(), buf)
    }

    #[inline]
    fn at_urgent_mark(&mut self, s: &TcpStream) -> io::Result<bool> {
        sys::at_urgent_mark(s.as_raw_fd())
    }

    #[inline]
    fn shutdown_write(&mut self, s: &TcpStream) -> io::Result<()> {
        s.shutdown(Shutdown::Write)
    }
}

/// What one [`Relay::pump`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pumped {
    /// Some byte moved, either way.
    pub moved: bool,
    /// The budget ran out with work left (CONN-5): pump again after the
    /// others.
    pub exhausted: bool,
}

/// Both directions of a connection, and what the kernel last said about
/// each of its two sockets.
pub struct Relay {
    /// Indexed by side: `[client, upstream]`.
    ready: [Ready; 2],
    /// Indexed by the source side: `[client -> upstream, upstream -> client]`.
    dirs: [Direction; 2],
}

impl Relay {
    /// `splice`: move bulk with splice(2) (`--no-splice` says no).
    pub fn new(splice: bool) -> Relay {
        Relay {
            // The client may have sent bytes before we registered it; assume
            // readable so the first drive looks (costs at most one EAGAIN).
            ready: [
                Ready {
                    readable: true,
                    writable: true,
                    ..Ready::default()
                },
                Ready::default(),
            ],
            dirs: [Direction::new(splice), Direction::new(splice)],
        }
    }

    /// What the kernel says about `side`'s socket: the caller records each
    /// readiness event here.
    pub fn ready_mut(&mut self, side: Side) -> &mut Ready {
        &mut self.ready[side.index()]
    }

    /// Bytes moved (client -> upstream, upstream -> client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.dirs[0].bytes, self.dirs[1].bytes)
    }

    /// Both streams finished: each source's FIN passed on after its last
    /// byte (CONN-1).
    pub fn is_complete(&self) -> bool {
        self.dirs.iter().all(|d| d.flow == Flow::Shut)
    }

    /// Pump both directions as far as the kernel and the budget allow. An
    /// error ends the connection: reset by the side it came from, or by
    /// the proxy itself (`LocalError`).
    pub fn pump<K: Kernel>(
        &mut self,
        k: &mut K,
        (client, upstream): (&K::Socket, &K::Socket),
        bufs: &mut Buffers,
        stats: &WorkerStats,
    ) -> Result<Pumped, End> {
        let mut done = Pumped {
            moved: false,
            exhausted: false,
        };
        for src_side in [Side::Client, Side::Upstream] {
            let i = src_side.index();
            let (src, dst) = match src_side {
                Side::Client => (client, upstream),
                Side::Upstream => (upstream, client),
            };
            let [r0, r1] = &mut self.ready;
            let (src_ready, dst_ready) = match src_side {
                Side::Client => (r0, r1),
                Side::Upstream => (r1, r0),
            };
            let other_shut = self.dirs[1 - i].flow == Flow::Shut;
            match self.dirs[i].pump(
                k,
                (src, src_ready),
                (dst, dst_ready),
                bufs,
                stats,
                other_shut,
            ) {
                Ok((moved, exhausted)) => {
                    if moved > 0 {
                        done.moved = true;
                        match src_side {
                            Side::Client => stats.bytes_client_to_upstream.add(moved),
                            Side::Upstream => stats.bytes_upstream_to_client.add(moved),
                        }
                    }
                    done.exhausted |= exhausted;
                }
                Err(PumpError::Src(e)) => return Err(End::reset_by(src_side, e)),
                Err(PumpError::Dst(e)) => return Err(End::reset_by(src_side.other(), e)),
                Err(PumpError::Local(e)) => return Err(End::new(EndKind::LocalError, Some(e))),
            }
        }
        Ok(done)
    }

    /// Give back whatever the directions hold; the connection is going
    /// away (CONN-4: a pipe still holding bytes is closed, not pooled).
    pub fn release(&mut self, pool: &mut PipePool, stats: &WorkerStats) {
        for d in &mut self.dirs {
            d.release(pool, stats);
        }
    }
}

/// Half-close state of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Open,
    /// The source sent FIN; bytes still in flight go out first.
    Eof,
    /// FIN passed on to the sink.
    Shut,
}

/// What the kernel last told us about one socket (CONN-2, CONN-7).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    /// The peer's FIN has arrived (EPOLLRDHUP without an error): once the
    /// receive queue is empty, its stream has ended.
    pub fin: bool,
    /// The peer sent urgent data (EPOLLPRI); sticky.
    pub urgent: bool,
}

struct CopyBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Where a direction's bytes wait between the two sockets.
enum Channel {
    /// `small`: recent reads were small; relay the next through the
    /// scratch buffer rather than splicing it (CONN-6).
    Splice {
        pipe: Option<Pipe>,
        pending: usize,
        small: bool,
    },
    Copy(Option<CopyBuf>),
}

struct Direction {
    flow: Flow,
    chan: Channel,
    bytes: u64,
}

enum Fill {
    /// Bytes now wait in the pipe or buffer. `drained`: the read came back
    /// short (CONN-7).
    Bytes {
        drained: bool,
    },
    /// Relayed through the scratch buffer (CONN-6): `sent` bytes reached the
    /// sink, any rest waits in the pipe.
    Relayed {
        sent: usize,
        drained: bool,
    },
    Eof,
    WouldBlock,
    /// Urgent data waits until the pipe is empty and the sink writable, so
    /// that recv can step over its mark (CONN-7); readiness stays as it is.
    Wait,
}

enum PumpError {
    Src(io::Error),
    Dst(io::Error),
    Local(io::Error),
}

fn is_splice_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

impl Direction {
    fn new(splice: bool) -> Direction {
        let chan = if splice {
            Channel::Splice {
                pipe: None,
                pending: 0,
                small: true,
            }
        } else {
            Channel::Copy(None)
        };
        Direction {
            flow: Flow::Open,
            chan,
            bytes: 0,
        }
    }

    fn pending(&self) -> usize {
        match &self.chan {
            Channel::Splice { pending, .. } => *pending,
            Channel::Copy(Some(b)) => b.end - b.start,
            Channel::Copy(None) => 0,
        }
    }

    fn has_room(&self) -> bool {
        match &self.chan {
            Channel::Splice {
                pipe: Some(p),
                pending,
                ..
            } => *pending < p.capacity(),
            Channel::Splice { pipe: None, .. } | Channel::Copy(None) => true,
            Channel::Copy(Some(b)) => b.end < b.buf.len(),
        }
    }

    /// Move what the source has into the pipe or buffer, or relay it
    /// straight to the sink (CONN-6). `first`: the first read of this drive,
    /// the one whose size says what kind of flow this is.
    fn fill<K: Kernel>(
        &mut self,
        k: &mut K,
        (src, src_ready): (&K::Socket, &mut Ready),
        (dst, dst_ready): (&K::Socket, &mut Ready),
        bufs: &mut Buffers,
        stats: &WorkerStats,
        first: bool,
    ) -> Result<Fill, PumpError> {
        loop {
            match &mut self.chan {
                Channel::Splice {
                    pipe,
                    pending,
                    small,
                } => {
                    // A direction that turned bulk trades its empty ordinary
                    // pipe for a bulk one while the budget allows (PIPE-4).
                    if !*small
                        && *pending == 0
                        && bufs.pipes.bulk_available()
                        && let Some(p) = pipe.take_if(|p| !bufs.pipes.is_bulk(p))
                    {
                        bufs.pipes.put(p, stats);
                    }
                    let p = match pipe {
                        Some(p) => p,
                        None => match bufs.pipes.get(!*small, stats) {
                            Ok(p) => pipe.insert(p),
                            Err(e) if sys::is_exhaustion(&e) => {
                                // Degrade: no pipe to be had, copy instead (pending is 0 here).
                                // Counted; the worker warns once per exhaustion episode.
                                debug!("no pipe ({e}): this direction falls back to copying");
                                stats.splice_fallbacks.add(1);
                                self.chan = Channel::Copy(None);
                                continue;
                            }
                            Err(e) => return Err(PumpError::Local(e)),
                        },
                    };
                    if *pending == 0 && dst_ready.writable && (*small || src_ready.urgent) {
                        return relay(
                            k,
                            (src, p, pending, small),
                            (dst, dst_ready),
                            &mut bufs.scratch,
                        );
                    }
                    if src_ready.urgent {
                        return Ok(Fill::Wait);
                    }
                    let room = p.capacity().saturating_sub(*pending).max(1);
                    return match k.splice_in(src, p, room) {
                        // Urgent data not yet reported: splice stopped at its
                        // mark, which with the FIN in also reads 0 (CONN-7).
                        Ok(0) if k.at_urgent_mark(src).unwrap_or(false) => {
                            src_ready.urgent = true;
                            continue;
                        }
                        Ok(0) => Ok(Fill::Eof),
                        Ok(n) => {
                            // Only the first read of a drive: the last one of
                            // a bulk burst is short too, and must not send the
                            // next burst's start through the copy path.
                            if first && *pending == 0 && n < bufs.scratch.len() {
                                *small = true;
                            }
                            *pending += n;
                            Ok(Fill::Bytes { drained: false })
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::WouldBlock),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        // With the pipe empty nothing is lost by switching,
                        // even after bytes went by relay (CONN-6).
                        Err(e) if is_splice_unsupported(&e) && *pending == 0 => {
                            warn!("splice refused ({e}): this direction falls back to copying");
                            stats.splice_fallbacks.add(1);
                            if let Some(p) = pipe.take() {
                                bufs.pipes.put(p, stats);
                            }
                            self.chan = Channel::Copy(None);
                            continue;
                        }
                        Err(e) => Err(PumpError::Src(e)),
                    };
                }
                Channel::Copy(slot) => {
                    let b = slot.get_or_insert_with(|| CopyBuf {
                        buf: vec![0u8; COPY_BUF_SIZE].into_boxed_slice(),
                        start: 0,
                        end: 0,
                    });
                    let want = b.buf.len() - b.end;
                    return match k.recv(src, &mut b.buf[b.end..]) {
                        Ok(0) => Ok(Fill::Eof),
                        Ok(n) => {
                            b.end += n;
                            Ok(Fill::Bytes { drained: n < want })
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::WouldBlock),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(PumpError::Src(e)),
                    };
                }
            }
        }
    }

    /// Move what is waiting to the sink. `Ok(0)` never means EOF here.
    fn drain<K: Kernel>(&mut self, k: &mut K, dst: &K::Socket) -> io::Result<usize> {
        loop {
            let r = match &mut self.chan {
                Channel::Splice {
                    pipe: Some(p),
                    pending,
                    ..
                } => k
                    .splice_out(p, dst, *pending)
                    .inspect(|n| *pending = pending.saturating_sub(*n)),
                Channel::Copy(Some(b)) => k.send(dst, &b.buf[b.start..b.end]).inspect(|n| {
                    b.start += n;
                    if b.start == b.end {
                        b.start = 0;
                        b.end = 0;
                    }
                }),
                _ => Ok(0),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Give back an empty pipe or buffer (CONN-4).
    fn release_if_empty(&mut self, pool: &mut PipePool, stats: &WorkerStats) {
        match &mut self.chan {
            Channel::Splice {
                pipe, pending: 0, ..
            } => {
                if let Some(p) = pipe.take() {
                    pool.put(p, stats);
                }
            }
            Channel::Copy(slot) if slot.as_ref().is_some_and(|b| b.start == b.end) => *slot = None,
            _ => {}
        }
    }

    /// Give back whatever this direction holds; the connection is going away.
    fn release(&mut self, pool: &mut PipePool, stats: &WorkerStats) {
        if let Channel::Splice { pipe, pending, .. } = &mut self.chan
            && let Some(p) = pipe.take()
        {
            if *pending == 0 {
                pool.put(p, stats);
            } else {
                pool.discard(p, stats);
            }
            *pending = 0;
        }
    }

    /// Pump until the kernel says wait, the budget runs out, or an error.
    /// Returns (bytes moved, budget exhausted).
    fn pump<K: Kernel>(
        &mut self,
        k: &mut K,
        (src, src_ready): (&K::Socket, &mut Ready),
        (dst, dst_ready): (&K::Socket, &mut Ready),
        bufs: &mut Buffers,
        stats: &WorkerStats,
        other_shut: bool,
    ) -> Result<(u64, bool), PumpError> {
        let mut moved = 0u64;
        let mut first = true;
        for _ in 0..MAX_ROUNDS {
            let mut progressed = false;
            if self.flow == Flow::Open && src_ready.readable && self.has_room() {
                let fill = self.fill(
                    k,
                    (src, &mut *src_ready),
                    (dst, dst_ready),
                    bufs,
                    stats,
                    first,
                )?;
                first = false;
                let drained = match fill {
                    Fill::Bytes { drained } => drained,
                    Fill::Relayed { sent, drained } => {
                        self.bytes += sent as u64;
                        moved += sent as u64;
                        drained
                    }
                    Fill::Eof => {
                        self.flow = Flow::Eof;
                        false
                    }
                    // CONN-2: only an empty pipe proves the socket is empty.
                    Fill::WouldBlock if self.pending() == 0 => {
                        src_ready.readable = false;
                        false
                    }
                    Fill::WouldBlock | Fill::Wait => false,
                };
                progressed = !matches!(fill, Fill::WouldBlock | Fill::Wait);
                if drained && !src_ready.urgent {
                    // CONN-7: the queue is empty; with the FIN in, for good.
                    src_ready.readable = false;
                    if src_ready.fin {
                        self.flow = Flow::Eof;
                    }
                }
            }
            if self.pending() > 0 && dst_ready.writable {
                match self.drain(k, dst) {
                    Ok(0) => {}
                    Ok(n) => {
                        self.bytes += n as u64;
                        moved += n as u64;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst_ready.writable = false,
                    Err(e) => return Err(PumpError::Dst(e)),
                }
            }
            if self.flow == Flow::Eof && self.pending() == 0 {
                // When the other way is already done, the connection is
                // Completed and closes in this loop turn: close(2) sends this
                // FIN itself once Conn::close has cleared the linger (CONN-8;
                // both receive queues are at EOF, so it is a FIN, not a RST).
                // A separate shutdown would be a wasted call per connection.
                if !other_shut {
                    k.shutdown_write(dst).map_err(PumpError::Dst)?;
                }
                self.flow = Flow::Shut;
                progressed = true;
            }
            if !progressed {
                self.release_if_empty(&mut bufs.pipes, stats);
                return Ok((moved, false));
            }
        }
        self.release_if_empty(&mut bufs.pipes, stats);
        Ok((moved, true))
    }
}

/// CONN-6: one recv into the scratch buffer and one send of what it got;
/// what the sink did not take goes into the pipe, which is empty and has
/// room for all of it, before this returns.
fn relay<K: Kernel>(
    k: &mut K,
    (src, pipe, pending, small): (&K::Socket, &Pipe, &mut usize, &mut bool),
    (dst, dst_ready): (&K::Socket, &mut Ready),
    scratch: &mut [u8],
) -> Result<Fill, PumpError> {
    let limit = pipe.capacity().min(scratch.len());
    let buf = &mut scratch[..limit];
    let n = loop {
        match k.recv(src, buf) {
            Ok(0) => return Ok(Fill::Eof),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Src(e)),
        }
    };
    let drained = n < limit;
    *small = drained;
    let sent = loop {
        match k.send(dst, &buf[..n]) {
            Ok(k) => break k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dst_ready.writable = false;
                break 0;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Dst(e)),
        }
    };
    let rest = &buf[sent..n];
    if !rest.is_empty() {
        match k.write_pipe(pipe, rest) {
            Ok(w) if w == rest.len() => *pending = w,
            // Cannot happen (an empty pipe of this capacity); if it did, the
            // bytes are lost and both peers must learn it (CONN-1).
            Ok(w) => {
                let e = io::Error::other(format!("pipe took {w} of {} bytes", rest.len()));
                return Err(PumpError::Local(e));
            }
            Err(e) => return Err(PumpError::Local(e)),
        }
    }
    Ok(Fill::Relayed { sent, drained })
}
