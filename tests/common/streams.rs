//! TCP byte streams for the tests: making connections and listeners with
//! bounded waits, a deterministic pattern and its verifier (so gigabytes
//! can be checked byte-exactly without being kept), exchanging streams both
//! ways, reading to the end, and telling a reset from a clean EOF.
//!
//! Keeps LAB-2 (make sockets inside their namespace) and LAB-3 (every
//! socket has `IO_TIMEOUT`, every accept a deadline); see mod.rs.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{Lab, server_addr};

/// Upper bound for any single blocking socket call in a test. Long enough for
/// a loaded 2-core machine, short enough that a stuck test fails in time.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Long enough for any answer the proxy owes; a proxy that swallows a reset
/// fails the test after this, not after `IO_TIMEOUT`.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A blocking connection with `IO_TIMEOUT` on connect, reads and writes.
/// Create it inside a namespace (LAB-2).
pub fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
    set_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

/// Like `connect`, from `src` (port 0: any): for a client with more than
/// one address. Create it inside a namespace (LAB-2).
pub fn connect_from(src: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let family = if dst.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // Linux bounds a blocking connect by the send timeout (LAB-3).
    let bound = nix::sys::time::TimeVal::new(IO_TIMEOUT.as_secs() as i64, 0);
    setsockopt(&fd, sockopt::SendTimeout, &bound)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))?;
    let s = TcpStream::from(fd);
    set_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

/// A listener on `addr`; an IPv6 wildcard is dual-stack. Create it inside a
/// namespace (LAB-2).
pub fn listen(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).expect("SO_RCVTIMEO");
    s.set_write_timeout(Some(t)).expect("SO_SNDTIMEO");
}

/// Accept one connection, giving up after `timeout` (LAB-3). The stream is
/// blocking with `IO_TIMEOUT`.
pub fn accept_timeout(l: &TcpListener, timeout: Duration) -> io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let res = loop {
        match l.accept() {
            Ok(pair) => break Ok(pair),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(io::Error::new(
                        ErrorKind::TimedOut,
                        "no connection to accept",
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    l.set_nonblocking(false)?;
    let (s, peer) = res?;
    s.set_nonblocking(false)?;
    set_timeouts(&s, IO_TIMEOUT);
    Ok((s, peer))
}

pub fn accept(l: &TcpListener) -> (TcpStream, SocketAddr) {
    accept_timeout(l, IO_TIMEOUT).expect("accept")
}

/// Close with an RST: SO_LINGER on with a zero timeout, then close.
pub fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
        .expect("SO_LINGER");
    drop(s);
}

/// How a read-until-the-end finished.
#[derive(Debug)]
pub enum End {
    /// A clean EOF after this many bytes.
    Eof(u64),
    /// An error after this many bytes.
    Error(u64, io::Error),
}

/// Read and discard until EOF or an error, counting bytes.
pub fn read_until_end(s: &mut TcpStream) -> End {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return End::Eof(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return End::Error(total, e),
        }
    }
}

/// Like `read_until_end`, checking every byte against `v` on the way
/// (counted from `v`'s offset): a byte that is not the stream's is a panic
/// naming `what`, since nothing may be corrupted, whatever else happens.
pub fn read_verified_until_end(r: &mut impl Read, v: &mut Verifier, what: &str) -> End {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return End::Eof(v.offset()),
            Ok(n) => v.check(&buf[..n]).unwrap_or_else(|e| panic!("{what}: {e}")),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return End::Error(v.offset(), e),
        }
    }
}

/// How `s` ends, read to its end: `Ok` with the bytes read before a
/// connection reset, or what came instead (a clean EOF, another error, a
/// timeout).
fn ends_in_reset(s: &mut TcpStream) -> Result<u64, String> {
    match read_until_end(s) {
        End::Error(n, e) if e.kind() == ErrorKind::ConnectionReset => Ok(n),
        End::Error(0, e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err("no reset within the read timeout: the client hangs".into())
        }
        End::Error(n, e) => Err(format!("expected a reset, got error {e} after {n} bytes")),
        End::Eof(n) => Err(format!("expected a reset, got a clean EOF after {n} bytes")),
    }
}

/// Assert that the stream ends in a connection reset (not a clean EOF, not a
/// timeout). Returns the bytes read before it.
pub fn expect_reset(s: &mut TcpStream, what: &str) -> u64 {
    ends_in_reset(s).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Whether a connection attempt was turned away with a reset before any
/// byte of answer: the connect reports the reset, or the write of `request`
/// does (when there is one: something to forward, were the proxy to forward
/// it), or the reads after it do, within `timeout`. The one check of a
/// connection that must not be served; `expect_refused_or_reset` also takes
/// a refused connect.
pub fn reset_before_any_byte(
    res: io::Result<TcpStream>,
    request: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let mut s = match res {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
        Err(e) => return Err(format!("connect failed with {e}, expected a reset")),
        Ok(s) => s,
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    if !request.is_empty() {
        // A write that meets the reset reports it (and consumes it).
        match s.write_all(request) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("write failed with {e}, expected a reset")),
            Ok(()) => {}
        }
    }
    match ends_in_reset(&mut s)? {
        0 => Ok(()),
        n => Err(format!("{n} bytes came back before the reset")),
    }
}

/// Assert `reset_before_any_byte`.
pub fn expect_reset_before_any_byte(
    res: io::Result<TcpStream>,
    request: &[u8],
    timeout: Duration,
    what: &str,
) {
    if let Err(e) = reset_before_any_byte(res, request, timeout) {
        panic!("{what}: {e}");
    }
}

/// Assert that a connection attempt was refused (nothing took it) or else
/// turned away with a reset before any byte (`reset_before_any_byte`).
pub fn expect_refused_or_reset(
    res: io::Result<TcpStream>,
    request: &[u8],
    timeout: Duration,
    what: &str,
) {
    if let Err(e) = &res
        && e.kind() == ErrorKind::ConnectionRefused
    {
        return;
    }
    expect_reset_before_any_byte(res, request, timeout, what);
}

/// A server that echoes every connection until EOF, one thread each, until
/// dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    /// Serve `listener` (made in the server namespace, LAB-2).
    pub fn start(listener: TcpListener) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let s = match accept_timeout(&listener, Duration::from_millis(50)) {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == ErrorKind::TimedOut => continue,
                        Err(e) => panic!("echo server: accept: {e}"),
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    thread::Builder::new()
                        .stack_size(ECHO_STACK)
                        .spawn(move || echo(s))
                        .expect("echo server: spawn");
                }
            })
        };
        EchoServer {
            stop,
            acceptor: Some(acceptor),
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Echo threads need little stack; a thousand of them should cost little.
const ECHO_STACK: usize = 128 * 1024;

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.acceptor.take() {
            let res = h.join();
            if res.is_err() && !thread::panicking() {
                panic!("echo server's acceptor panicked");
            }
        }
    }
}

/// A deterministic byte stream: xorshift64* words, little-endian. Two
/// `Pattern`s with the same seed produce the same bytes however the output is
/// cut into chunks.
pub struct Pattern {
    state: u64,
    block: Vec<u8>,
    pos: usize,
}

/// Bytes generated per refill: big enough to amortise the loop, small enough
/// to stay in cache.
const PATTERN_BLOCK: usize = 64 * 1024;

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // Zero is xorshift's one fixed point; mix the seed so that small
        // seeds differ from the first word on.
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Pattern {
            state,
            block: vec![0; PATTERN_BLOCK],
            pos: PATTERN_BLOCK,
        }
    }

    fn refill(&mut self) {
        let mut x = self.state;
        for word in self.block.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        self.state = x;
        self.pos = 0;
    }

    /// Fill `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.block.len() {
                self.refill();
            }
            let n = (out.len() - done).min(self.block.len() - self.pos);
            out[done..done + n].copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// A Pattern stream written through a non-blocking socket, a chunk at a
/// time, keeping what a short write left over.
pub struct PatternWriter {
    pattern: Pattern,
    chunk: Vec<u8>,
    pos: usize,
    /// Bytes of the stream written so far.
    pub written: u64,
}

impl PatternWriter {
    pub fn new(seed: u64) -> PatternWriter {
        PatternWriter {
            pattern: Pattern::new(seed),
            chunk: vec![0; 16 * 1024],
            pos: 16 * 1024,
            written: 0,
        }
    }

    /// Write what the socket takes, at most `limit` bytes in all. Returns
    /// whether anything was written; `WouldBlock` is not an error.
    pub fn push(&mut self, w: &mut impl Write, limit: u64) -> io::Result<bool> {
        let mut any = false;
        while self.written < limit {
            if self.pos == self.chunk.len() {
                self.pattern.fill(&mut self.chunk);
                self.pos = 0;
            }
            let room = (limit - self.written).min((self.chunk.len() - self.pos) as u64) as usize;
            match w.write(&self.chunk[self.pos..self.pos + room]) {
                Ok(n) => {
                    self.pos += n;
                    self.written += n as u64;
                    any = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(any)
    }
}

/// Checks received bytes against a `Pattern`, chunk by chunk.
pub struct Verifier {
    pattern: Pattern,
    offset: u64,
    scratch: Vec<u8>,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            pattern: Pattern::new(seed),
            offset: 0,
            scratch: Vec::new(),
        }
    }

    /// Bytes checked so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Check the next chunk; on a mismatch, the stream offset of the first
    /// wrong byte.
    pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
        self.scratch.resize(data.len(), 0);
        self.pattern.fill(&mut self.scratch);
        if self.scratch[..] != *data {
            let i = data
                .iter()
                .zip(&self.scratch)
                .position(|(a, b)| a != b)
                .expect("slices differ");
            return Err(format!(
                "stream differs at byte {}: got {:#04x}, expected {:#04x}",
                self.offset + i as u64,
                data[i],
                self.scratch[i]
            ));
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// Write `len` bytes of the stream for `seed`.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Read and check the bytes of `v`'s stream up to stream offset `upto`,
/// without reading past it.
pub fn recv_verified(r: &mut impl Read, v: &mut Verifier, upto: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 256 * 1024];
    while v.offset() < upto {
        let want = (upto - v.offset()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("EOF after {} of {upto} bytes", v.offset())),
            Ok(n) => v.check(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} after {} of {upto} bytes", v.offset())),
        }
    }
    Ok(())
}

/// The next read must be a clean EOF (after `len` bytes, for the message).
pub fn expect_eof(r: &mut impl Read, len: u64) -> Result<(), String> {
    let mut extra = [0u8; 1024];
    match r.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes more than the {len} expected")),
        Err(e) => Err(format!("{e} instead of EOF after all {len} bytes")),
    }
}

/// Read exactly `len` bytes and check them against the stream for `seed`.
/// Does not read past `len`.
pub fn recv_pattern(r: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    recv_verified(r, &mut Verifier::new(seed), len)
}

/// Read the stream for `seed` until EOF and check that exactly `len` bytes
/// came.
pub fn recv_pattern_to_eof(r: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    recv_pattern(r, seed, len)?;
    expect_eof(r, len)
}

/// Send `send_len` bytes (seed `send_seed`) and, at the same time, receive
/// and verify `recv_len` bytes (seed `recv_seed`) then EOF. The write side is
/// shut down after sending. Returns what went wrong, if anything.
pub fn exchange(
    s: TcpStream,
    send_seed: u64,
    send_len: u64,
    recv_seed: u64,
    recv_len: u64,
) -> Result<(), String> {
    let mut writer = s.try_clone().map_err(|e| format!("try_clone: {e}"))?;
    let sender = thread::spawn(move || {
        send_pattern(&mut writer, send_seed, send_len)
            .and_then(|()| writer.shutdown(Shutdown::Write))
            .map_err(|e| format!("send: {e}"))
    });
    let mut reader = s;
    let received =
        recv_pattern_to_eof(&mut reader, recv_seed, recv_len).map_err(|e| format!("receive: {e}"));
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err("sender panicked".into()));
    match (sent, received) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(a), Ok(())) | (Ok(()), Err(a)) => Err(a),
        (Err(a), Err(b)) => Err(format!("{a}; {b}")),
    }
}

/// One round trip of `msg` to an echo server on the server's IPv4 port 80,
/// through the proxy.
pub fn tcp_echo_round_trip(lab: &Lab, msg: &'static [u8]) {
    let mut c = lab
        .connect(server_addr(false, 80))
        .expect("connect through the proxy");
    c.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}
