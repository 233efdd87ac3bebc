//! One proxied TCP connection: the client socket, the upstream socket, and the
//! two directions between them (client -> upstream, upstream -> client).
//!
//! Life: `Connecting` (our SYN is out) -> `Established` (bytes move) -> the
//! worker reaps it once [`Drive::Done`] says how it ended. Each direction has
//! its own half-close state ([`Flow`]): `Open` -> `Eof` (the source sent FIN;
//! what is in the pipe still goes out) -> `Shut` (we sent FIN on).
//!
//! What must stay true:
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
//! - CONN-5 (fairness): one call to [`Conn::drive`] does a bounded amount of
//!   work; when the bound is hit it answers `Again` and the worker comes back
//!   to it after serving others.
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
//! - CONN-8 (armed linger: only a finished stream gets a FIN): both sockets
//!   carry SO_LINGER {on, 0} from birth (the client's inherited from its
//!   listener, the upstream's set in `connect_upstream`), so however they are
//!   closed — a connection that ends any way but `Completed`, a panicking
//!   worker dropping its slab, exit(1), a signal, SIGKILL, the OOM killer —
//!   the kernel resets both peers. shutdown(SHUT_WR) sends its FIN whatever
//!   the linger, so half-closes pass as always. Only [`Conn::close`] of a
//!   `Completed` connection clears the linger, on both sockets, just before
//!   the close that sends the last FIN (a close with linger 0 would throw
//!   away what the peer has not acknowledged yet, shut down or not). If the
//!   process dies, each peer sees, by the state of the two directions:
//!   - `Connecting`: the client is reset; the server got at most our SYN
//!     (its SYN-ACK, if any, draws a RST from the kernel).
//!   - both directions `Open` or `Eof`: both peers are reset. Each has what
//!     it had read; its next read or write fails (ECONNRESET, then EPIPE).
//!   - one direction `Shut` (every byte of it, then its FIN, handed to the
//!     sink's socket), the other still moving: both peers are reset. The sink of the shut direction
//!     read that stream to its EOF — or, if the tail was still
//!     unacknowledged, is reset before it, never handed a FIN for less; its
//!     own stream, the unfinished one, ends in the reset for both.
//!   - both `Shut`, the close not yet done (same loop turn): the last FIN
//!     has not gone out, so its peer is reset; the other peer had its EOF.
//!   - closed as `Completed`: FIN to both, every stream finished.
//!
//!   So a FIN reaches a peer only for a stream of which every byte was
//!   handed to its socket first; every stream not yet finished ends in RST.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::event::Event;
use mio::net::TcpStream;

use crate::own_sockets;
use crate::stats::{EndKind, WorkerStats};
use crate::sys;
use crate::tcp::pipe::{Buffers, Pipe, PipePool};
use crate::token::Side;

/// Fill/drain rounds per direction per drive before yielding (CONN-5).
/// With 64 KiB pipes that is up to 1 MiB per direction per turn.
const MAX_ROUNDS: usize = 16;
/// Copy-mode buffer per direction, allocated only while it holds bytes.
const COPY_BUF_SIZE: usize = 64 * 1024;

/// How a connection ended, and what its sockets get on the way out.
#[derive(Debug)]
pub struct End {
    pub kind: EndKind,
    /// The error behind it, for the log line.
    pub cause: Option<io::Error>,
}

impl End {
    fn new(kind: EndKind, cause: Option<io::Error>) -> End {
        End { kind, cause }
    }
    fn reset_by(side: Side, e: io::Error) -> End {
        let kind = match side {
            Side::Client => EndKind::ClientReset,
            Side::Upstream => EndKind::UpstreamReset,
        };
        End::new(kind, Some(e))
    }
    /// Whether both streams finished, so both sockets close with FIN. Any
    /// other end leaves the linger armed (CONN-8) and resets both: each
    /// peer learns its bytes may not have arrived (a side that failed itself
    /// has no connection left to reset).
    fn is_graceful(&self) -> bool {
        self.kind == EndKind::Completed
    }
}

/// What [`Conn::drive`] and friends tell the worker.
#[derive(Debug)]
pub enum Drive {
    /// Waiting for the kernel.
    Open,
    /// Work left that the budget cut short: drive again after the others.
    Again,
    Done(End),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting { deadline: Instant },
    Established,
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
struct Ready {
    readable: bool,
    writable: bool,
    /// The peer's FIN has arrived (EPOLLRDHUP without an error): once the
    /// receive queue is empty, its stream has ended.
    fin: bool,
    /// The peer sent urgent data (EPOLLPRI); sticky.
    urgent: bool,
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
    fn fill(
        &mut self,
        (src, src_ready): (&TcpStream, &mut Ready),
        (dst, dst_ready): (&TcpStream, &mut Ready),
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
                            (src, p, pending, small),
                            (dst, dst_ready),
                            &mut bufs.scratch,
                        );
                    }
                    if src_ready.urgent {
                        return Ok(Fill::Wait);
                    }
                    let room = p.capacity().saturating_sub(*pending).max(1);
                    return match sys::splice(src.as_raw_fd(), p.write_fd(), room) {
                        // Urgent data not yet reported: splice stopped at its
                        // mark, which with the FIN in also reads 0 (CONN-7).
                        Ok(0) if sys::at_urgent_mark(src.as_raw_fd()).unwrap_or(false) => {
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
                    let mut src = src;
                    return match src.read(&mut b.buf[b.end..]) {
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
    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        loop {
            let r = match &mut self.chan {
                Channel::Splice {
                    pipe: Some(p),
                    pending,
                    ..
                } => sys::splice(p.read_fd(), dst.as_raw_fd(), *pending)
                    .inspect(|n| *pending = pending.saturating_sub(*n)),
                Channel::Copy(Some(b)) => {
                    let mut dst = dst;
                    dst.write(&b.buf[b.start..b.end]).inspect(|n| {
                        b.start += n;
                        if b.start == b.end {
                            b.start = 0;
                            b.end = 0;
                        }
                    })
                }
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
    fn pump(
        &mut self,
        (src, src_ready): (&TcpStream, &mut Ready),
        (dst, dst_ready): (&TcpStream, &mut Ready),
        bufs: &mut Buffers,
        stats: &WorkerStats,
        other_shut: bool,
    ) -> Result<(u64, bool), PumpError> {
        let mut moved = 0u64;
        let mut first = true;
        for _ in 0..MAX_ROUNDS {
            let mut progressed = false;
            if self.flow == Flow::Open && src_ready.readable && self.has_room() {
                let fill =
                    self.fill((src, &mut *src_ready), (dst, dst_ready), bufs, stats, first)?;
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
                match self.drain(dst) {
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
                    dst.shutdown(Shutdown::Write).map_err(PumpError::Dst)?;
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
fn relay(
    (src, pipe, pending, small): (&TcpStream, &Pipe, &mut usize, &mut bool),
    (dst, dst_ready): (&TcpStream, &mut Ready),
    scratch: &mut [u8],
) -> Result<Fill, PumpError> {
    let limit = pipe.capacity().min(scratch.len());
    let buf = &mut scratch[..limit];
    let mut src = src;
    let n = loop {
        match src.read(buf) {
            Ok(0) => return Ok(Fill::Eof),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Src(e)),
        }
    };
    let drained = n < limit;
    *small = drained;
    let mut dst = dst;
    let sent = loop {
        match dst.write(&buf[..n]) {
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
        match sys::write_pipe(pipe.write_fd(), rest) {
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

pub struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    /// The upstream socket's place in the registry of own sockets, for as
    /// long as this connection lives (worker.rs WRK-7, own_sockets OWN-2);
    /// `None` for a spoofed upstream, which is never registered.
    _registered: Option<own_sockets::Entry>,
    pub client_addr: SocketAddr,
    pub orig_dst: SocketAddr,
    state: State,
    ready: [Ready; 2],
    /// Indexed by the source side: `[client -> upstream, upstream -> client]`.
    dirs: [Direction; 2],
    pub generation: u64,
    /// When this connection's live timer entry falls due (TIM-3).
    pub armed: Option<Instant>,
    pub started: Instant,
    last_active: Instant,
    /// Set once the worker has decided the end; events after it are stale.
    finished: bool,
}

impl Conn {
    /// `client` and `upstream` each with the address of its far end.
    pub fn new(
        (client, client_addr): (TcpStream, SocketAddr),
        (upstream, orig_dst): (TcpStream, SocketAddr),
        registered: Option<own_sockets::Entry>,
        generation: u64,
        now: Instant,
        connect_timeout: Duration,
        splice: bool,
    ) -> Conn {
        Conn {
            client,
            upstream,
            _registered: registered,
            client_addr,
            orig_dst,
            state: State::Connecting {
                deadline: now + connect_timeout,
            },
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
            generation,
            armed: None,
            started: now,
            last_active: now,
            finished: false,
        }
    }

    pub fn sockets_mut(&mut self) -> (&mut TcpStream, &mut TcpStream) {
        (&mut self.client, &mut self.upstream)
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn mark_finished(&mut self) {
        self.finished = true;
    }

    /// Bytes moved (client -> upstream, upstream -> client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.dirs[0].bytes, self.dirs[1].bytes)
    }

    /// When this connection should next be looked at by the timer, given the
    /// idle timeout; `None` if never.
    pub fn deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        match self.state {
            State::Connecting { deadline } => Some(deadline),
            State::Established => idle.map(|d| self.last_active + d),
        }
    }

    /// The timer said this connection's deadline passed.
    pub fn timed_out(&self) -> End {
        match self.state {
            State::Connecting { .. } => End::new(EndKind::ConnectTimeout, None),
            State::Established => End::new(EndKind::IdleTimeout, None),
        }
    }

    /// Record what an event says about one side, then make progress.
    pub fn on_event(
        &mut self,
        side: Side,
        ev: &Event,
        now: Instant,
        bufs: &mut Buffers,
        stats: &WorkerStats,
    ) -> Drive {
        let r = &mut self.ready[side.index()];
        r.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
        r.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
        r.fin |= ev.is_read_closed() && !ev.is_error();
        r.urgent |= ev.is_priority();
        if let State::Connecting { .. } = self.state {
            if side == Side::Client {
                // Bytes from the client wait in its socket until upstream is up.
                return Drive::Open;
            }
            // A connecting socket reports nothing until the handshake ends;
            // writable with no error or hang-up means it completed, with no
            // syscall to ask. Anything else, ask the socket.
            let connected = if ev.is_writable() && !ev.is_error() && !ev.is_write_closed() {
                Ok(true)
            } else {
                self.finish_connect()
            };
            match connected {
                Ok(true) => {
                    self.state = State::Established;
                    self.last_active = now;
                }
                Ok(false) => return Drive::Open,
                Err(end) => return Drive::Done(end),
            }
        } else if ev.is_error() {
            // An error on a socket no direction is reading or writing would
            // otherwise go unnoticed (e.g. RST after both FINs were sent).
            let sock = match side {
                Side::Client => &self.client,
                Side::Upstream => &self.upstream,
            };
            if let Ok(Some(e)) | Err(e) = sock.take_error() {
                return Drive::Done(End::reset_by(side, e));
            }
        }
        self.drive(now, bufs, stats)
    }

    /// Has our connect to the original destination completed?
    /// `Ok(false)`: not yet (a spurious wake-up).
    fn finish_connect(&mut self) -> Result<bool, End> {
        let connect_end = |e: io::Error| {
            let kind = match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => EndKind::ConnectRefused,
                Some(libc::ETIMEDOUT) => EndKind::ConnectTimeout,
                _ => EndKind::ConnectError,
            };
            End::new(kind, Some(e))
        };
        match self.upstream.take_error() {
            Ok(Some(e)) | Err(e) => return Err(connect_end(e)),
            Ok(None) => {}
        }
        match self.upstream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
            Err(e) => Err(connect_end(e)),
        }
    }

    /// Pump both directions as far as the kernel and the budget allow.
    pub fn drive(&mut self, now: Instant, bufs: &mut Buffers, stats: &WorkerStats) -> Drive {
        if let State::Connecting { .. } = self.state {
            return Drive::Open;
        }
        let mut again = false;
        for src_side in [Side::Client, Side::Upstream] {
            let i = src_side.index();
            let (src, dst) = match src_side {
                Side::Client => (&self.client, &self.upstream),
                Side::Upstream => (&self.upstream, &self.client),
            };
            let [r0, r1] = &mut self.ready;
            let (src_ready, dst_ready) = match src_side {
                Side::Client => (r0, r1),
                Side::Upstream => (r1, r0),
            };
            let other_shut = self.dirs[1 - i].flow == Flow::Shut;
            match self.dirs[i].pump((src, src_ready), (dst, dst_ready), bufs, stats, other_shut) {
                Ok((moved, exhausted)) => {
                    if moved > 0 {
                        self.last_active = now;
                        match src_side {
                            Side::Client => stats.bytes_client_to_upstream.add(moved),
                            Side::Upstream => stats.bytes_upstream_to_client.add(moved),
                        }
                    }
                    again |= exhausted;
                }
                Err(PumpError::Src(e)) => return Drive::Done(End::reset_by(src_side, e)),
                Err(PumpError::Dst(e)) => return Drive::Done(End::reset_by(src_side.other(), e)),
                Err(PumpError::Local(e)) => {
                    return Drive::Done(End::new(EndKind::LocalError, Some(e)));
                }
            }
        }
        if self.dirs.iter().all(|d| d.flow == Flow::Shut) {
            Drive::Done(End::new(EndKind::Completed, None))
        } else if again {
            Drive::Again
        } else {
            Drive::Open
        }
    }

    /// Close both sockets as `end` says and give back the pipes: FIN to both
    /// for a completed connection, RST to both otherwise (CONN-8).
    pub fn close(mut self, end: &End, pool: &mut PipePool, stats: &WorkerStats) {
        if end.is_graceful() {
            // A failed setsockopt leaves the linger armed: a reset for a
            // connection that finished, a false alarm but never a loss.
            let _ = sys::set_linger_off(self.client.as_raw_fd());
            let _ = sys::set_linger_off(self.upstream.as_raw_fd());
        }
        for d in &mut self.dirs {
            d.release(pool, stats);
        }
        // Dropping the streams closes them, which also takes them out of epoll.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::pipe::Buffers;
    use std::io::ErrorKind;
    use std::net::TcpListener;

    /// A connection between a real client and a real server on loopback,
    /// built as the worker builds one, and the two far ends.
    fn conn() -> (Conn, std::net::TcpStream, std::net::TcpStream) {
        // Needs CAP_NET_ADMIN for the transparent listener, like sys's tests.
        let front = sys::transparent_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (accepted, peer) = front.accept().unwrap();
        let back = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = back.local_addr().unwrap();
        let upstream =
            sys::connect_upstream(dst, sys::UpstreamOpts::default(), sys::Source::Host).unwrap();
        let (server, _) = back.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let own = std::sync::Arc::new(own_sockets::OwnSockets::new());
        let registered = Some(own.hold(
            own_sockets::Proto::Tcp,
            upstream.local_addr().unwrap(),
            Some(dst),
        ));
        let c = Conn::new(
            (TcpStream::from_std(accepted), peer),
            (TcpStream::from_std(upstream), dst),
            registered,
            0,
            now,
            Duration::from_secs(5),
            true,
        );
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        (c, client, server)
    }

    fn read_end(mut s: &std::net::TcpStream) -> io::Result<usize> {
        let mut buf = [0u8; 64];
        s.read(&mut buf)
    }

    #[test]
    fn a_connection_dropped_unclosed_resets_both_peers() {
        // What a panicking worker does to its slab, and what the kernel does
        // to every socket when the process dies: CONN-8's armed linger.
        let (c, client, server) = conn();
        drop(c);
        for (who, s) in [("client", &client), ("server", &server)] {
            let e = read_end(s).expect_err(who);
            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{who}");
        }
    }

    #[test]
    fn only_a_completed_close_sends_fins() {
        let stats = WorkerStats::default();
        let mut bufs = Buffers::new(65536, 65536, 4);
        let (c, client, server) = conn();
        c.close(&End::new(EndKind::Completed, None), &mut bufs.pipes, &stats);
        for (who, s) in [("client", &client), ("server", &server)] {
            assert_eq!(read_end(s).expect(who), 0, "{who}: EOF");
        }
        for kind in EndKind::ALL
            .into_iter()
            .filter(|k| *k != EndKind::Completed)
        {
            let (c, client, server) = conn();
            c.close(&End::new(kind, None), &mut bufs.pipes, &stats);
            for (who, s) in [("client", &client), ("server", &server)] {
                let e = read_end(s).expect_err(who);
                assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{kind:?}: {who}");
            }
        }
    }
}
