//! One direction of the relay (split from relay.rs): what its bytes wait
//! in between its source and its sink (a pipe, the scratch buffer for one
//! call, or a copy buffer), and the fill and drain rounds that move them.
//! Its invariants are the relay's, CONN-1 to CONN-7 and CONN-11 (relay.rs).

use std::io;

use log::{debug, warn};

use super::{Kernel, Ready};
use crate::stats::WorkerStats;
use crate::sys;
use crate::tcp::pipe::{Buffers, Pipe, PipePool};
use crate::tcp::proxy_header::Header;

/// Fill/drain rounds per direction per drive before yielding (CONN-5).
/// With 64 KiB pipes that is up to 1 MiB per direction per turn.
pub(super) const MAX_ROUNDS: usize = 16;
/// Copy-mode buffer per direction, allocated only while it holds bytes.
const COPY_BUF_SIZE: usize = 64 * 1024;

/// Half-close state of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Open,
    /// The source sent FIN; bytes still in flight go out first.
    Eof,
    /// FIN passed on to the sink.
    Shut,
}

pub(super) struct CopyBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Where a direction's bytes wait between the two sockets.
pub(super) enum Channel {
    /// `small`: recent reads were small; relay the next through the
    /// scratch buffer rather than splicing it (CONN-6).
    Splice {
        pipe: Option<Pipe>,
        pending: usize,
        small: bool,
    },
    Copy(Option<CopyBuf>),
}

/// What a direction writes to its sink before anything else (CONN-11):
/// the PROXY header, then whatever of the source's first read the sink did
/// not take along with it.
pub(super) struct Preface {
    bytes: Vec<u8>,
    /// `bytes[..header]` are the header's, the rest the source's.
    header: usize,
    /// `bytes[..written]` are out.
    written: usize,
    /// The source's first bytes were looked for, to go out with the header.
    merged: bool,
}

impl Preface {
    fn new(header: Header) -> Preface {
        let bytes = header.as_bytes().to_vec();
        Preface {
            header: bytes.len(),
            bytes,
            written: 0,
            merged: false,
        }
    }

    /// `n` more bytes are out: how many of them were the source's.
    fn advance(&mut self, n: usize) -> usize {
        let n = n.min(self.bytes.len() - self.written);
        let theirs = (self.written + n).saturating_sub(self.written.max(self.header));
        self.written += n;
        theirs
    }

    fn is_out(&self) -> bool {
        self.written == self.bytes.len()
    }
}

pub(super) struct Direction {
    pub(super) flow: Flow,
    pub(super) chan: Channel,
    pub(super) bytes: u64,
    /// Boxed, and dropped once out: without `--send-proxy` it costs a
    /// word per direction.
    pub(super) preface: Option<Box<Preface>>,
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

pub(super) enum PumpError {
    Src(io::Error),
    Dst(io::Error),
    Local(io::Error),
}

fn is_splice_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

/// `call`, made again while a signal interrupts it (EINTR).
fn restarted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

impl Direction {
    /// `preface`: bytes of the proxy's own to write to the sink before any
    /// of the source's (CONN-11).
    pub(super) fn new(splice: bool, preface: Option<Header>) -> Direction {
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
            preface: preface.map(|header| Box::new(Preface::new(header))),
        }
    }

    /// CONN-11: write what is left of the preface while the sink takes it.
    /// The first time the sink is writable, the source's first bytes, if
    /// they are there, are read and go out with the header in one write
    /// (and one segment, as HAProxy's MSG_MORE does it): a recv and a
    /// writev where the header alone would cost a send more. What the
    /// sink does not take of them stays in the preface, never in the
    /// scratch buffer (CONN-6). Returns whether the preface is all out (or
    /// there was none), so that the source may be read, and how many of
    /// the source's bytes went out. An error is the sink's or the
    /// source's, as any other write's or read's.
    fn write_preface<K: Kernel>(
        &mut self,
        k: &mut K,
        (src, src_ready): (&K::Socket, &mut Ready),
        (dst, dst_ready): (&K::Socket, &mut Ready),
        scratch: &mut [u8],
    ) -> Result<(bool, usize), PumpError> {
        let Some(p) = self.preface.as_deref_mut() else {
            return Ok((true, 0));
        };
        let mut moved = 0;
        if !p.merged && dst_ready.writable {
            p.merged = true;
            // Urgent data is left to the fills, which know its mark.
            let n = if src_ready.readable && !src_ready.urgent {
                match restarted(|| k.recv(src, scratch)) {
                    Ok(0) => {
                        self.flow = Flow::Eof;
                        0
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        src_ready.readable = false;
                        0
                    }
                    Err(e) => return Err(PumpError::Src(e)),
                }
            } else {
                0
            };
            if n > 0 {
                if n < scratch.len() {
                    // CONN-7: a short read drained the queue.
                    src_ready.readable = false;
                    if src_ready.fin {
                        self.flow = Flow::Eof;
                    }
                } else if let Channel::Splice { small, .. } = &mut self.chan {
                    // CONN-6: a read that fills the scratch buffer is bulk.
                    *small = false;
                }
                let data = &scratch[..n];
                let w = match restarted(|| k.send_vectored(dst, [&p.bytes[p.written..], data])) {
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst_ready.writable = false;
                        0
                    }
                    Err(e) => return Err(PumpError::Dst(e)),
                };
                let rest = p.bytes.len() - p.written;
                if w >= rest {
                    // The header is out, and `sent` of the source's bytes.
                    let sent = (w - rest).min(n);
                    moved += sent;
                    p.bytes.clear();
                    p.bytes.extend_from_slice(&data[sent..]);
                    p.header = 0;
                    p.written = 0;
                } else {
                    p.written += w;
                    p.bytes.extend_from_slice(data);
                }
            }
        }
        // Each turn writes at least one byte or stops: bounded by the
        // preface's length (CONN-5).
        while !p.is_out() && dst_ready.writable {
            match k.send(dst, &p.bytes[p.written..]) {
                // A stream socket never takes 0 of a non-empty buffer; if it
                // did, waiting would hang the connection.
                Ok(0) => return Err(PumpError::Dst(io::ErrorKind::WriteZero.into())),
                Ok(n) => moved += p.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst_ready.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Dst(e)),
            }
        }
        let out = p.is_out();
        if out {
            self.preface = None;
        }
        Ok((out, moved))
    }

    pub(super) fn pending(&self) -> usize {
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
    pub(super) fn release(&mut self, pool: &mut PipePool, stats: &WorkerStats) {
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
    pub(super) fn pump<K: Kernel>(
        &mut self,
        k: &mut K,
        (src, src_ready): (&K::Socket, &mut Ready),
        (dst, dst_ready): (&K::Socket, &mut Ready),
        bufs: &mut Buffers,
        stats: &WorkerStats,
        other_shut: bool,
    ) -> Result<(u64, bool), PumpError> {
        let (out, early) = self.write_preface(
            k,
            (src, &mut *src_ready),
            (dst, &mut *dst_ready),
            &mut bufs.scratch,
        )?;
        self.bytes += early as u64;
        let mut moved = early as u64;
        if !out {
            // CONN-11: no more of the source's is read before the preface
            // is out; it waits in the source's socket, whose window pushes
            // back on its sender (CONN-3), and its readiness is kept for
            // when the sink takes the rest.
            return Ok((moved, false));
        }
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
