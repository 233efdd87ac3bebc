//! A load client for benches/harness/bench.py's `close_first_v4` case: new
//! connections as fast as it can, each sending one HTTP/1.1 keep-alive
//! request, reading the whole answer, then closing first (FIN), so that the
//! side facing the client's server is the one left in TIME_WAIT. wrk's
//! `Connection: close` has the server close first instead, and Python is
//! too slow for ~10,000 connections/s.
//!
//!     close_first --addr 198.19.0.2:80 [--path /small.txt] [--seconds 120]
//!                 [--conns 64] [--timeout-ms 3000]
//!
//! One thread, one mio loop, `--conns` connections in flight. Prints one
//! JSON object: per-second counts of connections served and failed (by when
//! they ended), the totals and the failures by kind. A connection is served
//! when its whole answer (headers and Content-Length bytes) came back.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

struct Args {
    addr: SocketAddr,
    path: String,
    seconds: u64,
    conns: usize,
    timeout: Duration,
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "close_first: {msg}\nusage: close_first --addr IP:PORT [--path P] [--seconds S] [--conns N] [--timeout-ms MS]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "0.0.0.0:0".parse().expect("literal"),
        path: "/small.txt".into(),
        seconds: 120,
        conns: 64,
        timeout: Duration::from_secs(3),
    };
    let mut have_addr = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag} '{v}': a number")))
        };
        match flag.as_str() {
            "--addr" => {
                let v = val();
                a.addr = v
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--addr '{v}': IP:PORT")));
                have_addr = true;
            }
            "--path" => a.path = val(),
            "--seconds" => a.seconds = num(val()).max(1),
            "--conns" => a.conns = num(val()).clamp(1, 10_000) as usize,
            "--timeout-ms" => a.timeout = Duration::from_millis(num(val()).max(1)),
            other => usage(&format!("unknown option {other}")),
        }
    }
    if !have_addr {
        usage("--addr is required");
    }
    a
}

enum Phase {
    Connecting,
    Reading,
}

struct Conn {
    sock: TcpStream,
    phase: Phase,
    started: Instant,
    got: Vec<u8>,
}

/// Bytes of a complete answer in `buf`, once the head is in: head +
/// Content-Length.
fn answer_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    Some(end + len)
}

struct Counts {
    start: Instant,
    ok: Vec<u64>,
    fail: Vec<u64>,
    kinds: BTreeMap<String, u64>,
}

impl Counts {
    fn second(&self, now: Instant) -> usize {
        now.saturating_duration_since(self.start).as_secs() as usize
    }
    fn served(&mut self, now: Instant) {
        let s = self.second(now);
        if s < self.ok.len() {
            self.ok[s] += 1;
        }
    }
    fn failed(&mut self, now: Instant, kind: &str) {
        let s = self.second(now);
        if s < self.fail.len() {
            self.fail[s] += 1;
            *self.kinds.entry(kind.to_string()).or_insert(0) += 1;
        }
    }
}

fn kind_of(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EADDRNOTAVAIL) => "client_no_port".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::EPIPE) => "reset".into(),
        _ => format!("other:{}", e.kind()),
    }
}

fn main() {
    let args = parse_args();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: close_first\r\n\r\n",
        args.path,
        args.addr.ip()
    );
    let mut poll = Poll::new().expect("epoll");
    let mut events = Events::with_capacity(1024);
    let mut slots: Vec<Option<Conn>> = (0..args.conns).map(|_| None).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let mut counts = Counts {
        start,
        ok: vec![0; args.seconds as usize],
        fail: vec![0; args.seconds as usize],
        kinds: BTreeMap::new(),
    };
    // Slots whose connect failed at once wait here a moment before the next
    // try, so a client out of its own ports does not spin.
    let mut retry_at: Vec<Option<Instant>> = vec![None; args.conns];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Open a connection in every free slot.
        for i in 0..slots.len() {
            if slots[i].is_some() || retry_at[i].is_some_and(|t| t > now) {
                continue;
            }
            retry_at[i] = None;
            match TcpStream::connect(args.addr) {
                Ok(mut sock) => {
                    if let Err(e) = poll.registry().register(
                        &mut sock,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        eprintln!("close_first: register: {e}");
                        std::process::exit(1);
                    }
                    slots[i] = Some(Conn {
                        sock,
                        phase: Phase::Connecting,
                        started: now,
                        got: Vec::new(),
                    });
                }
                Err(e) => {
                    counts.failed(now, &kind_of(&e));
                    retry_at[i] = Some(now + Duration::from_millis(1));
                }
            }
        }
        let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        let now = Instant::now();
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = slots[i].as_mut() else { continue };
            let mut done: Option<Result<(), String>> = None;
            if let Phase::Connecting = c.phase
                && (ev.is_error() || ev.is_write_closed() || ev.is_writable())
            {
                match c.sock.take_error() {
                    Ok(Some(e)) | Err(e) => done = Some(Err(kind_of(&e))),
                    Ok(None) => match c.sock.peer_addr() {
                        Ok(_) => match c.sock.write(request.as_bytes()) {
                            Ok(n) if n == request.len() => c.phase = Phase::Reading,
                            Ok(_) => done = Some(Err("short_write".into())),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => done = Some(Err(kind_of(&e))),
                        },
                        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
                        Err(e) => done = Some(Err(kind_of(&e))),
                    },
                }
            }
            if done.is_none() && matches!(c.phase, Phase::Reading) {
                loop {
                    match c.sock.read(&mut buf) {
                        Ok(0) => {
                            done = Some(Err("eof".into()));
                            break;
                        }
                        Ok(n) => {
                            c.got.extend_from_slice(&buf[..n]);
                            if answer_len(&c.got).is_some_and(|want| c.got.len() >= want) {
                                done = Some(Ok(()));
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            done = Some(Err(kind_of(&e)));
                            break;
                        }
                    }
                }
            }
            match done {
                None => {}
                Some(Ok(())) => {
                    counts.served(now);
                    // Dropping closes: we close first, with a FIN.
                    slots[i] = None;
                }
                Some(Err(kind)) => {
                    counts.failed(now, &kind);
                    slots[i] = None;
                }
            }
        }
        // Connections stuck past the timeout fail (SYN retransmissions, a
        // proxy holding a client).
        for slot in slots.iter_mut() {
            if slot
                .as_ref()
                .is_some_and(|c| now.saturating_duration_since(c.started) >= args.timeout)
            {
                counts.failed(now, "timeout");
                *slot = None;
            }
        }
    }
    let list = |v: &[u64]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let kinds = counts
        .kinds
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "{{\"seconds\":{},\"conns\":{},\"served\":{},\"failed\":{},\"served_per_s\":[{}],\"failed_per_s\":[{}],\"failures\":{{{}}}}}",
        args.seconds,
        args.conns,
        counts.ok.iter().sum::<u64>(),
        counts.fail.iter().sum::<u64>(),
        list(&counts.ok),
        list(&counts.fail),
        kinds
    );
}
