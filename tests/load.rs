//! Load (issue 7): 3,000 connections open and transferring at once, 64 KiB
//! each way, every byte checked. tproxyd may run short of pipes and copy
//! instead (CONN-4); it may not lose or mix up a byte (CONN-1).
//!
//! Each test builds its own lab (tests/common, LAB-1..4) and reads tproxyd's
//! state from its metrics endpoint (scraped inside the router namespace) and
//! from /proc. Timing is never asserted beyond generous bounds: the machine
//! is shared and small.

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    ACTIVE, FALLBACKS, Lab, METRICS, Metrics, Pattern, Proxy, closed, proc_fd_count, raise_nofile,
    server_addr, wait_metrics, wait_until,
};

/// Connections in the load test, all open and transferring at once.
const LOAD_CONNS: usize = 3000;
/// Bytes each way per connection.
const LOAD_LEN: usize = 64 * 1024;
/// Client connects in flight at once while the load test opens connections.
const LOAD_CONNECTING: usize = 256;

fn load_seed(i: usize, up: bool) -> u64 {
    (if up {
        0x10AD_0000_0000
    } else {
        0x10AD_8000_0000
    }) | i as u64
}

/// The streams of the load test, made once (generating them on the fly at
/// both ends would cost twice as much CPU in a debug build).
struct LoadStreams {
    up: Vec<Vec<u8>>,
    down: Vec<Vec<u8>>,
}

impl LoadStreams {
    fn new() -> Arc<LoadStreams> {
        let make = |up: bool| {
            thread::spawn(move || {
                (0..LOAD_CONNS)
                    .map(|i| Pattern::bytes(load_seed(i, up), LOAD_LEN))
                    .collect::<Vec<_>>()
            })
        };
        let (up, down) = (make(true), make(false));
        Arc::new(LoadStreams {
            up: up.join().expect("pattern thread"),
            down: down.join().expect("pattern thread"),
        })
    }
}

/// One end of a load-test connection, driven by readiness.
struct LoadEnd {
    sock: mio::net::TcpStream,
    /// The connection's index: the client knows it; the server learns it
    /// from the first 8 bytes the client sends.
    index: Option<usize>,
    connected: bool,
    header: Vec<u8>,
    header_pos: usize,
    sent: usize,
    shut: bool,
    received: usize,
    eof: bool,
    readable: bool,
    writable: bool,
}

impl LoadEnd {
    fn new(sock: mio::net::TcpStream, index: Option<usize>, connected: bool) -> LoadEnd {
        let header = index
            .map(|i| (i as u64).to_le_bytes().to_vec())
            .unwrap_or_default();
        LoadEnd {
            sock,
            index,
            connected,
            header,
            header_pos: 0,
            sent: 0,
            shut: false,
            received: 0,
            eof: false,
            readable: true,
            writable: true,
        }
    }

    fn done(&self) -> bool {
        self.shut && self.eof
    }

    /// Make what progress the socket allows. `client`: this is the client
    /// end (it sends `up` and receives `down`); `go`: payloads may move.
    /// Returns whether the end just became ready (connected and, for the
    /// server, knows its index).
    fn drive(
        &mut self,
        client: bool,
        go: bool,
        streams: &LoadStreams,
        buf: &mut [u8],
    ) -> Result<bool, String> {
        let mut became_ready = false;
        if !self.connected {
            if !self.writable {
                return Ok(false);
            }
            if let Ok(Some(e)) | Err(e) = self.sock.take_error() {
                return Err(format!("connect: {e}"));
            }
            match self.sock.peer_addr() {
                Ok(_) => {
                    self.connected = true;
                    became_ready = true;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                    self.writable = false;
                    return Ok(false);
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        loop {
            let mut progressed = false;
            // The client's header first.
            if client && self.header_pos < self.header.len() && self.writable {
                match self.sock.write(&self.header[self.header_pos..]) {
                    Ok(n) => {
                        self.header_pos += n;
                        progressed = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                    Err(e) => return Err(format!("write the index: {e}")),
                }
            }
            // The server learns the index.
            if !client && self.index.is_none() && self.readable {
                let mut h = [0u8; 8];
                let need = 8 - self.header.len();
                match self.sock.read(&mut h[..need]) {
                    Ok(0) => return Err("EOF before the index".into()),
                    Ok(n) => {
                        self.header.extend_from_slice(&h[..n]);
                        if self.header.len() == 8 {
                            let i = u64::from_le_bytes(self.header[..].try_into().expect("8 bytes"))
                                as usize;
                            if i >= LOAD_CONNS {
                                return Err(format!("bad index {i}"));
                            }
                            self.index = Some(i);
                            became_ready = true;
                        }
                        progressed = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) => return Err(format!("read the index: {e}")),
                }
            }
            let Some(i) = self.index else {
                return Ok(became_ready);
            };
            let (out, inp) = if client {
                (&streams.up[i], &streams.down[i])
            } else {
                (&streams.down[i], &streams.up[i])
            };
            let header_done = !client || self.header_pos == self.header.len();
            if go && header_done && self.writable && !self.shut {
                if self.sent < out.len() {
                    match self.sock.write(&out[self.sent..]) {
                        Ok(n) => {
                            self.sent += n;
                            progressed = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => self.writable = false,
                        Err(e) => return Err(format!("write after {} bytes: {e}", self.sent)),
                    }
                }
                if self.sent == out.len() {
                    self.sock
                        .shutdown(Shutdown::Write)
                        .map_err(|e| format!("shutdown: {e}"))?;
                    self.shut = true;
                    progressed = true;
                }
            }
            if self.readable && !self.eof {
                match self.sock.read(buf) {
                    Ok(0) => {
                        if self.received != inp.len() {
                            return Err(format!(
                                "EOF after {} of {} bytes",
                                self.received,
                                inp.len()
                            ));
                        }
                        self.eof = true;
                        progressed = true;
                    }
                    Ok(n) => {
                        let end = self.received + n;
                        if end > inp.len() {
                            return Err(format!("{end} bytes, more than the {} sent", inp.len()));
                        }
                        if buf[..n] != inp[self.received..end] {
                            let k = (0..n)
                                .find(|&k| buf[k] != inp[self.received + k])
                                .expect("a differing byte");
                            return Err(format!("stream differs at byte {}", self.received + k));
                        }
                        self.received = end;
                        progressed = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) => return Err(format!("read after {} bytes: {e}", self.received)),
                }
            }
            if !progressed {
                return Ok(became_ready);
            }
        }
    }
}

/// What one side of the load test shares with the test thread.
#[derive(Default)]
struct LoadProgress {
    ready: AtomicUsize,
    done: AtomicUsize,
    go: AtomicBool,
    abort: AtomicBool,
}

/// Drive every end until all are done or the test gives up. `listener`:
/// the server side, which accepts its ends; otherwise the client side,
/// which connects to `dst(i)`.
fn load_side(
    listener: Option<TcpListener>,
    dst: fn(usize) -> SocketAddr,
    streams: Arc<LoadStreams>,
    progress: Arc<LoadProgress>,
) -> Vec<String> {
    use mio::{Events, Interest, Poll, Token};
    const LISTENER: Token = Token(usize::MAX);
    let client = listener.is_none();
    let mut poll = Poll::new().expect("epoll");
    let mut events = Events::with_capacity(4096);
    let mut listener = listener.map(|l| {
        l.set_nonblocking(true).expect("O_NONBLOCK");
        let mut l = mio::net::TcpListener::from_std(l);
        poll.registry()
            .register(&mut l, LISTENER, Interest::READABLE)
            .expect("register the listener");
        l
    });
    let mut ends: Vec<LoadEnd> = Vec::with_capacity(LOAD_CONNS);
    let mut failures = Vec::new();
    let mut finished = vec![false; LOAD_CONNS];
    let mut buf = vec![0u8; 64 * 1024];
    let mut kicked = false;
    let mut connecting = 0;
    while failures.len() + progress.done.load(Ordering::SeqCst) < LOAD_CONNS
        && !progress.abort.load(Ordering::SeqCst)
    {
        // The client opens connections, a bounded number in flight.
        while client && ends.len() < LOAD_CONNS && connecting < LOAD_CONNECTING {
            let i = ends.len();
            let mut s = mio::net::TcpStream::connect(dst(i)).expect("socket");
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
                .expect("register");
            ends.push(LoadEnd::new(s, Some(i), false));
            connecting += 1;
        }
        poll.poll(&mut events, Some(Duration::from_millis(10)))
            .expect("poll");
        let go = progress.go.load(Ordering::SeqCst);
        let mut touched: Vec<usize> = Vec::with_capacity(events.iter().count());
        for ev in events.iter() {
            if ev.token() == LISTENER {
                let l = listener.as_mut().expect("the server has a listener");
                loop {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let k = ends.len();
                            poll.registry()
                                .register(&mut s, Token(k), Interest::READABLE | Interest::WRITABLE)
                                .expect("register");
                            ends.push(LoadEnd::new(s, None, true));
                            touched.push(k);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                continue;
            }
            let k = ev.token().0;
            let e = &mut ends[k];
            e.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
            e.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            touched.push(k);
        }
        // Edge-triggered: once payloads may move, every end gets a look.
        if go && !kicked {
            kicked = true;
            touched = (0..ends.len()).collect();
        }
        for k in touched {
            if finished[k] {
                continue;
            }
            let e = &mut ends[k];
            match e.drive(client, go, &streams, &mut buf) {
                Ok(ready) => {
                    if ready {
                        progress.ready.fetch_add(1, Ordering::SeqCst);
                        if client {
                            connecting -= 1;
                        }
                    }
                    if e.done() {
                        finished[k] = true;
                        progress.done.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Err(err) => {
                    finished[k] = true;
                    if client && !e.connected {
                        connecting -= 1;
                    }
                    failures.push(format!(
                        "{} end of connection {:?}: {err}",
                        if client { "client" } else { "server" },
                        e.index
                    ));
                }
            }
        }
    }
    failures
}

/// 3,000 connections open at once, each moving 64 KiB each way at the same
/// time, every byte checked. tproxyd may run short of pipes (two sockets and
/// up to two pipes, six descriptors, per connection, under a limit of
/// 20,000) and copy instead; it may not lose or mix up a byte.
#[test]
fn three_thousand_connections_transferring_at_once_are_all_byte_exact() {
    // This process holds both ends of every connection.
    raise_nofile((2 * LOAD_CONNS + 1024) as u64);
    let streams = LoadStreams::new();
    let lab = Lab::tproxy();
    let proxy = Proxy::start(&lab, &["--metrics", METRICS, "--log-level", "info"]);
    let pid = proxy.pid();
    let listener = lab.listen_server(80);
    // Room in the accept queue for every connection at once.
    // SAFETY: listen(2) on a socket this test owns; raising the backlog of
    // a listening socket is allowed.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    assert_eq!(rc, 0, "listen(4096): {}", io::Error::last_os_error());

    let server_progress = Arc::new(LoadProgress::default());
    let client_progress = Arc::new(LoadProgress::default());
    let dst = |i: usize| server_addr(i % 2 == 1, 80);
    let server = {
        let (streams, p) = (streams.clone(), server_progress.clone());
        thread::spawn(move || load_side(Some(listener), dst, streams, p))
    };
    let client = {
        let (streams, p) = (streams.clone(), client_progress.clone());
        lab.spawn_client(move || load_side(None, dst, streams, p))
    };
    let both = |f: &dyn Fn(&LoadProgress) -> bool| f(&server_progress) && f(&client_progress);
    let abort = || {
        server_progress.abort.store(true, Ordering::SeqCst);
        client_progress.abort.store(true, Ordering::SeqCst);
    };

    // All open, then all at once.
    let t0 = Instant::now();
    let open = wait_until(Duration::from_secs(60), || {
        both(&|p| p.ready.load(Ordering::SeqCst) == LOAD_CONNS)
    });
    let opened_in = t0.elapsed();
    let m_open = Metrics::of(&lab);
    let fds_open = proc_fd_count(pid);
    if !open {
        abort();
    }
    assert!(
        open,
        "after 60 s: {} connections connected, {} reached the server; tproxyd has {} open",
        client_progress.ready.load(Ordering::SeqCst),
        server_progress.ready.load(Ordering::SeqCst),
        m_open.get(ACTIVE)
    );
    assert_eq!(
        m_open.get(ACTIVE),
        LOAD_CONNS as u64,
        "connections open in tproxyd"
    );
    let t1 = Instant::now();
    server_progress.go.store(true, Ordering::SeqCst);
    client_progress.go.store(true, Ordering::SeqCst);
    let mut fds_peak = fds_open;
    // Both sides end when each of their ends is done or failed. If one side
    // ends and the other does not follow, the other is stuck on connections
    // the first gave up on: stop it after a while.
    let mut one_ended: Option<Instant> = None;
    wait_until(Duration::from_secs(120), || {
        fds_peak = fds_peak.max(proc_fd_count(pid));
        let (c, s) = (client.is_finished(), server.is_finished());
        if c != s {
            one_ended.get_or_insert_with(Instant::now);
        }
        (c && s) || one_ended.is_some_and(|t| t.elapsed() > Duration::from_secs(10))
    });
    abort();
    let client_failures = client.join().expect("client side panicked");
    let server_failures = server.join().expect("server side panicked");
    let moved_in = t1.elapsed();
    let m = Metrics::of(&lab);
    eprintln!(
        "{LOAD_CONNS} connections opened in {opened_in:?}, moved {} MiB each way in {moved_in:?}; \
         tproxyd fds {fds_open} when all open, peak {fds_peak}; splice fallbacks {}; completed {}",
        (LOAD_CONNS * LOAD_LEN) >> 20,
        m.get(FALLBACKS),
        m.get(&closed("completed"))
    );
    let failures: Vec<String> = client_failures.into_iter().chain(server_failures).collect();
    assert!(
        failures.is_empty(),
        "{} failures, the first: {}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert!(
        both(&|p| p.done.load(Ordering::SeqCst) == LOAD_CONNS),
        "not every connection finished: client {}, server {}",
        client_progress.done.load(Ordering::SeqCst),
        server_progress.done.load(Ordering::SeqCst)
    );
    let (all_closed, m) = wait_metrics(&lab, Duration::from_secs(20), |m| m.get(ACTIVE) == 0);
    assert!(
        all_closed,
        "{} connections still open in tproxyd",
        m.get(ACTIVE)
    );
    assert_eq!(
        m.get(&closed("completed")),
        LOAD_CONNS as u64,
        "completed connections"
    );
}
