//! The relay: the two directions of an established connection, each moving
//! bytes from its source socket to its sink — small messages by recv/send
//! through the worker's scratch buffer, bulk by splice through a pooled
//! pipe, or by copy through a buffer of its own where splice is refused —
//! with backpressure and half-close.
//!
//! Each direction (relay/direction.rs: where its bytes wait, and the fill
//! and drain rounds that move them) has its own half-close state (`Flow`):
//! `Open` -> `Eof` (the source sent FIN; what is in the pipe still goes
//! out) -> `Shut` (the FIN passed on). [`Relay::pump`] is generic over [`Kernel`], the calls it
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
//! - CONN-11 (the PROXY header first): with `--send-proxy`, the client ->
//!   upstream direction starts with a preface, the header naming the client
//!   and the original destination (proxy_header.rs), and writes it to the
//!   upstream socket once its connect has completed, ahead of every byte of
//!   the client's. The client's first bytes, when they are already there,
//!   are read once (one recv into the scratch buffer) and go out in the
//!   same write as the header (writev): one segment, and no syscall more
//!   than without the header. A partial write or EAGAIN keeps the rest of
//!   the preface (the header's, and those first bytes') for the upstream's
//!   next WRITABLE, and until the preface is all out the client's socket is
//!   not read again: what the client sends meanwhile waits in its receive
//!   queue (CONN-3), and its FIN with it; at most one scratch buffer's worth
//!   waits in the preface. A failed write of the preface is the upstream's
//!   reset, as any write to it (both ends are reset). Everything after it
//!   goes as without it, zero-copy included. The header is the proxy's, not
//!   the client's: it is not counted in the direction's bytes.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;

use mio::net::TcpStream;

use crate::stats::{EndKind, WorkerStats};
use crate::sys;
use crate::tcp::close::End;
use crate::tcp::pipe::{Buffers, Pipe, PipePool};
use crate::tcp::proxy_header::Header;
use crate::token::Side;

mod direction;
#[cfg(test)]
mod tests;

use direction::{Direction, Flow, PumpError};

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
    /// writev(2) of `bufs`, one after the other, in one write; may take
    /// less.
    fn send_vectored(&mut self, to: &Self::Socket, bufs: [&[u8]; 2]) -> io::Result<usize>;
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
    fn send_vectored(&mut self, mut to: &TcpStream, [a, b]: [&[u8]; 2]) -> io::Result<usize> {
        to.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
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
    /// `proxy_header`: the header to write upstream before any of the
    /// client's bytes (`--send-proxy`, CONN-11).
    pub fn new(splice: bool, proxy_header: Option<Header>) -> Relay {
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
            dirs: [
                Direction::new(splice, proxy_header),
                Direction::new(splice, None),
            ],
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
