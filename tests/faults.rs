//! Faults (issue 7): a peer that fails or misbehaves ends its own
//! connection the way it would have ended without a proxy, and nobody
//! else's. Every byte of a connection that finishes arrives; a failed one
//! ends in a reset, never in a clean EOF that would pass for a complete
//! answer (CONN-1, CONN-8); what it held is freed.
//!
//! - An upstream that resets (before or mid-transfer), is refused, does not
//!   answer (`--connect-timeout`), closes early or half-closes.
//! - A client that vanishes without FIN or RST (`--idle-timeout`).
//! - A peer at either end that stops reading (zero window): it stalls only
//!   itself (CONN-3), and two hundred of them at once keep tproxyd's memory
//!   and pipes bounded (CONN-4, PIPE-4), then drain byte-exact.
//!
//! Each test builds its own lab (tests/common, LAB-1..4) and reads tproxyd's
//! state from its metrics endpoint (scraped inside the router namespace) and
//! from /proc. Timing is never asserted beyond generous bounds: the machine
//! is shared and small.

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};

use common::{
    ACTIVE, ANSWER_TIMEOUT, EchoServer, End, FALLBACKS, Gate, Lab, METRICS, Metrics, Mode,
    PIPES_BULK, PIPES_IN_USE, PIPES_POOLED, PROXY_PORT, PatternWriter, Proxy, Role, Verifier,
    accept, closed, connect, expect_reset, expect_reset_before_any_byte, family, proc_fd_count,
    proc_vm_rss_kib, read_verified_until_end, reset, server_addr, settled_fd_count, wait_metrics,
    wait_until,
};

/// Small socket buffers on a test's own end of a connection, so that a
/// stalled connection stalls after little data rather than after the many
/// megabytes autotuning would allow (the kernel's buffering is not what
/// these tests are about, and it is shared with everyone on the machine).
fn small_buffers(s: &impl AsFd) {
    const SMALL: usize = 64 * 1024;
    setsockopt(s, sockopt::RcvBuf, &SMALL).expect("SO_RCVBUF");
    setsockopt(s, sockopt::SndBuf, &SMALL).expect("SO_SNDBUF");
}

/// Cap the router's TCP buffer autotuning (per namespace) so that hundreds
/// of stalled connections hold a few hundred KiB each in the kernel rather
/// than megabytes: the test is about tproxyd's memory, not the kernel's, and
/// the machine's TCP memory is shared with other work.
fn cap_router_tcp_buffers(lab: &Lab) {
    for kv in [
        "net.ipv4.tcp_rmem=4096 65536 262144",
        "net.ipv4.tcp_wmem=4096 16384 262144",
    ] {
        lab.sh(Role::Router, &["sysctl", "-qw", kv]);
    }
}

/// Bytes each bystander sends (and gets back from the echo server).
const BYSTANDER_LEN: u64 = 1 << 20;

/// A connection through the proxy to the echo server on `port` that sends
/// half its stream, waits at `gate`, sends the rest, and must get every byte
/// back, then EOF. Alternates IPv4 and IPv6 by `i`.
fn bystander(lab: &Lab, port: u16, i: u64, gate: Arc<Gate>) -> JoinHandle<Result<(), String>> {
    let dst = server_addr(i % 2 == 1, port);
    lab.spawn_client(move || {
        let what = format!("bystander {i} ({dst})");
        let s = common::connect(dst).map_err(|e| format!("{what}: connect: {e}"))?;
        let mut writer = s.try_clone().map_err(|e| format!("{what}: clone: {e}"))?;
        let seed = 0xB75 << 32 | i;
        let sender = thread::spawn(move || -> io::Result<()> {
            let mut p = PatternWriter::new(seed);
            p.push(&mut writer, BYSTANDER_LEN / 2)?;
            gate.arrive_and_wait();
            p.push(&mut writer, BYSTANDER_LEN)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut reader = s;
        let got = common::recv_pattern_to_eof(&mut reader, seed, BYSTANDER_LEN);
        let sent = sender
            .join()
            .map_err(|_| format!("{what}: sender panicked"))?;
        sent.map_err(|e| format!("{what}: send: {e}"))?;
        got.map_err(|e| format!("{what}: echo: {e}"))
    })
}

fn join_all(handles: Vec<JoinHandle<Result<(), String>>>) {
    let failures: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .filter_map(Result::err)
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn server_reset_reaches_the_client_as_a_reset() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let mut client = lab
            .connect(server_addr(v6, 80))
            .expect("connect through the proxy");
        client
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("SO_RCVTIMEO");
        let (mut upstream, _) = accept(&listener);
        client.write_all(b"request").expect("client write");
        let mut buf = [0u8; 7];
        upstream.read_exact(&mut buf).expect("server read");
        upstream.write_all(b"partial answer").expect("server write");
        reset(upstream);
        // The partial answer may or may not arrive before the reset; the end
        // must be a reset.
        let got = expect_reset(&mut client, family(v6));
        assert!(got <= 14, "{}: {got} bytes of a 14-byte answer", family(v6));
    }
}

#[test]
fn refused_upstream_resets_the_client_within_a_second() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    // Nothing listens on port 82 in the server namespace.
    for v6 in [false, true] {
        let start = Instant::now();
        let res = lab.connect(server_addr(v6, 82));
        expect_reset_before_any_byte(res, b"", ANSWER_TIMEOUT, family(v6));
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{}: the reset took {took:?}",
            family(v6)
        );
    }
}

#[test]
fn blackholed_upstream_resets_the_client_after_the_connect_timeout() {
    let lab = Lab::tproxy();
    // The server drops everything to port 81: SYNs go unanswered.
    lab.nft(
        Role::Server,
        "table inet blackhole {
            chain input {
                type filter hook input priority filter; policy accept;
                tcp dport 81 drop
            }
        }",
    );
    let _proxy = Proxy::start(&lab, &["--connect-timeout", "1s"]);
    // Both families at once: each waits out the timeout.
    let waits: Vec<_> = [false, true]
        .into_iter()
        .map(|v6| {
            let dst = server_addr(v6, 81);
            lab.spawn_client(move || {
                let start = Instant::now();
                let res = connect(dst);
                expect_reset_before_any_byte(res, b"", Duration::from_secs(15), family(v6));
                (v6, start.elapsed())
            })
        })
        .collect();
    for w in waits {
        let (v6, took) = w.join().expect("client thread panicked");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "{}: reset after {took:?}, expected about 1s",
            family(v6)
        );
    }
}

/// An upstream that resets mid-transfer resets its client, whichever way the
/// bytes were going (the client reads a reset, or its writes fail), and the
/// connections around it carry on to the last byte.
#[test]
fn upstream_reset_mid_transfer_resets_its_client_and_no_other_connection() {
    const BYSTANDERS: u64 = 4;
    /// What the victims move before the server resets.
    const BEFORE_RESET: u64 = 256 * 1024;
    let lab = Lab::tproxy();
    let proxy = Proxy::start(&lab, &[]);
    let _echo = EchoServer::start(lab.listen_server(80));
    let gate = Arc::new(Gate::default());
    let bystanders: Vec<_> = (0..BYSTANDERS)
        .map(|i| bystander(&lab, 80, i, gate.clone()))
        .collect();
    gate.wait_for(BYSTANDERS as usize);

    // Download victim (IPv4, port 81): the server streams until the client
    // has read BEFORE_RESET bytes, then resets.
    let listener = lab.listen_server(81);
    let client_has_read = Arc::new(AtomicBool::new(false));
    let server = {
        let flag = client_has_read.clone();
        thread::spawn(move || {
            let (mut s, _) = accept(&listener);
            s.set_nonblocking(true).expect("O_NONBLOCK");
            let mut w = PatternWriter::new(81);
            while !flag.load(Ordering::SeqCst) {
                match w.push(&mut s, u64::MAX) {
                    Ok(true) => {}
                    Ok(false) => thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("download server: {e}"),
                }
            }
            reset(s);
            w.written
        })
    };
    let mut c = lab
        .connect(server_addr(false, 81))
        .expect("download victim: connect");
    let mut v = Verifier::new(81);
    common::recv_verified(&mut c, &mut v, BEFORE_RESET).expect("download victim: first bytes");
    client_has_read.store(true, Ordering::SeqCst);
    let server_wrote = server.join().expect("download server panicked");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("SO_RCVTIMEO");
    let end = read_verified_until_end(&mut c, &mut v, "download victim");
    assert!(
        matches!(&end, End::Error(_, e) if e.kind() == ErrorKind::ConnectionReset),
        "download victim: expected a reset after at most {server_wrote} bytes, got {end:?} after {}",
        v.offset()
    );

    // Upload victim (IPv6, port 82): the client streams; the server reads
    // BEFORE_RESET bytes and resets. The client's writes must fail.
    let listener = lab.listen_server(82);
    let server = thread::spawn(move || {
        let (mut s, _) = accept(&listener);
        common::recv_pattern(&mut s, 82, BEFORE_RESET).expect("upload server: first bytes");
        reset(s);
    });
    let mut c = lab
        .connect(server_addr(true, 82))
        .expect("upload victim: connect");
    c.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("SO_SNDTIMEO");
    let mut w = PatternWriter::new(82);
    let deadline = Instant::now() + Duration::from_secs(20);
    let end = loop {
        if Instant::now() >= deadline {
            break Ok(w.written);
        }
        // Blocking writes, 64 KiB at a time (a write that times out is a
        // WouldBlock, and the deadline decides).
        if let Err(e) = w.push(&mut c, w.written + 64 * 1024) {
            break Err(e);
        }
    };
    server.join().expect("upload server panicked");
    assert!(
        matches!(&end, Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "upload victim: expected its writes to fail with a reset, got {end:?}"
    );

    gate.open();
    join_all(bystanders);
    let log = proxy.log();
    for (dst, what) in [
        ("198.19.0.2:81", "download victim"),
        ("[2001:2:0:2::2]:82", "upload victim"),
    ] {
        assert!(
            log.contains(&format!("-> {dst}: upstream_reset after")),
            "{what}: no upstream_reset line in the log"
        );
    }
}

/// How a client fared when its server answered and closed while the client
/// still had more to send.
#[derive(Debug, PartialEq, Eq)]
struct EarlyClose {
    /// The answer arrived whole.
    answer: bool,
    /// Then a clean EOF.
    eof: bool,
    /// How the client's later writes ended (none: they never failed).
    write_error: Option<ErrorKind>,
}

/// The server reads the client's request, answers, and closes its socket
/// (FIN: nothing unread, so no RST at close). The client reads the answer
/// and the EOF, then sends more, every 20 ms, for at most 5 s.
fn early_close(lab: &Lab, v6: bool) -> EarlyClose {
    const REQUEST: u64 = 64 * 1024;
    const ANSWER: u64 = 1024;
    let listener = lab.listen_server(80);
    let server = thread::spawn(move || {
        let (mut s, _) = accept(&listener);
        common::recv_pattern(&mut s, 1, REQUEST).expect("server: request");
        common::send_pattern(&mut s, 2, ANSWER).expect("server: answer");
        // Dropped: close(2) with nothing unread sends FIN. What the client
        // sends after this meets a closed socket and draws a RST.
    });
    let mut c = lab.connect(server_addr(v6, 80)).expect("connect");
    common::send_pattern(&mut c, 1, REQUEST).expect("client: request");
    server.join().expect("server panicked");
    let answer = common::recv_pattern(&mut c, 2, ANSWER).is_ok();
    let mut b = [0u8; 1];
    let eof = matches!(c.read(&mut b), Ok(0));
    let mut write_error = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Err(e) = c.write_all(&[0x55; 16 * 1024]) {
            write_error = Some(e.kind());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    EarlyClose {
        answer,
        eof,
        write_error,
    }
}

/// An upstream that answers and closes (FIN) while the client still has
/// more to say. Without a proxy the client reads the whole answer, then EOF;
/// its next write reaches a closed socket, which answers with RST, and the
/// write after that fails: EPIPE ("broken pipe"), because a socket that has
/// received FIN (CLOSE_WAIT) reports a RST as EPIPE rather than ECONNRESET.
///
/// Through the proxy the same must happen for the same reasons: the FIN is
/// passed on once the answer is out (CONN-1); the client's later bytes go
/// upstream, draw the server's RST, and the proxy resets the client, whose
/// next write fails with EPIPE. Both runs are made and compared.
#[test]
fn upstream_close_while_the_client_sends_ends_as_it_would_without_a_proxy() {
    let expected = EarlyClose {
        answer: true,
        eof: true,
        write_error: Some(ErrorKind::BrokenPipe),
    };
    for v6 in [false, true] {
        let direct = {
            let lab = Lab::up(Mode::Direct, PROXY_PORT);
            early_close(&lab, v6)
        };
        let proxied = {
            let lab = Lab::tproxy();
            let _proxy = Proxy::start(&lab, &[]);
            early_close(&lab, v6)
        };
        eprintln!(
            "{}: without a proxy {direct:?}; through it {proxied:?}",
            family(v6)
        );
        assert_eq!(
            direct,
            expected,
            "{}: without a proxy (the baseline itself changed)",
            family(v6)
        );
        assert_eq!(
            proxied,
            direct,
            "{}: through the proxy vs without one",
            family(v6)
        );
    }
}

/// An upstream that half-closes (shutdown(SHUT_WR) after its answer) and
/// goes on reading: the client gets the answer and EOF, and can still send
/// its whole stream, which the server receives to the last byte.
#[test]
fn upstream_half_close_lets_the_client_send_to_the_end() {
    const ANSWER: u64 = 256 * 1024;
    const UPLOAD: u64 = 8 << 20;
    let lab = Lab::tproxy();
    let proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let l = listener.try_clone().expect("clone listener");
        let server = thread::spawn(move || -> Result<(), String> {
            let (mut s, _) = accept(&l);
            common::send_pattern(&mut s, 3, ANSWER).map_err(|e| format!("answer: {e}"))?;
            s.shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            common::recv_pattern_to_eof(&mut s, 4, UPLOAD).map_err(|e| format!("upload: {e}"))
        });
        let c = lab.connect(server_addr(v6, 80)).expect("connect");
        let mut reader = c.try_clone().expect("clone");
        let answer = thread::spawn(move || common::recv_pattern_to_eof(&mut reader, 3, ANSWER));
        let mut w = c;
        common::send_pattern(&mut w, 4, UPLOAD).expect("the client's upload");
        w.shutdown(Shutdown::Write).expect("client shutdown");
        let answer = answer.join().expect("reader panicked");
        let server = server.join().expect("server panicked");
        assert!(
            answer.is_ok() && server.is_ok(),
            "{}: client got {answer:?}; server {server:?}",
            family(v6)
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || proxy
            .log()
            .matches(": completed after")
            .count()
            == 2),
        "both connections should complete:\n{}",
        proxy.log()
    );
}

/// A client that vanishes mid-transfer (its packets dropped: no FIN, no RST,
/// nothing) is reset by `--idle-timeout` once nothing has moved for that
/// long, and everything it held is given back: the connection, its pipes,
/// its descriptors. The server sees the reset.
#[test]
fn vanished_client_is_freed_by_the_idle_timeout() {
    let lab = Lab::tproxy();
    let proxy = Proxy::start(&lab, &["--idle-timeout", "2s", "--metrics", METRICS]);
    let pid = proxy.pid();
    let listener = lab.listen_server(80);
    let fds_idle = settled_fd_count(pid);
    let server = thread::spawn(move || {
        let (mut s, _) = accept(&listener);
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("SO_SNDTIMEO");
        let mut w = PatternWriter::new(5);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Err(e) = w.push(&mut s, w.written + 64 * 1024) {
                return (w.written, e);
            }
        }
        (
            w.written,
            io::Error::new(ErrorKind::TimedOut, "no reset in 60 s"),
        )
    });
    let mut c = lab.connect(server_addr(false, 80)).expect("connect");
    common::recv_pattern(&mut c, 5, 1 << 20).expect("the first MiB");
    // The client vanishes: everything to or from it is dropped in its own
    // namespace, so its socket neither acknowledges nor resets anything.
    lab.nft(
        Role::Client,
        "table inet vanish {
            chain input { type filter hook input priority filter; policy drop; }
            chain output { type filter hook output priority filter; policy drop; }
        }",
    );
    let vanished = Instant::now();
    let (gone, m) = wait_metrics(&lab, Duration::from_secs(20), |m| {
        m.get(ACTIVE) == 0 && m.get(PIPES_IN_USE) == 0
    });
    assert!(
        gone,
        "20 s after the client vanished: {} connection(s) active, {} pipe(s) in use",
        m.get(ACTIVE),
        m.get(PIPES_IN_USE)
    );
    let took = vanished.elapsed();
    eprintln!("the vanished client's connection was freed {took:?} after it vanished");
    assert_eq!(
        m.get(&closed("idle_timeout")),
        1,
        "ended by the idle timeout"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "freed after {took:?}, before the 2 s idle timeout could have passed"
    );
    let (written, err) = server.join().expect("server panicked");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ),
        "the server should see a reset, got {err} after {written} bytes"
    );
    // Pooled pipes (empty, kept for reuse) are not held by any connection.
    let fds = proc_fd_count(pid);
    let pooled = m.get(PIPES_POOLED) as usize;
    assert!(
        fds <= fds_idle + 2 * pooled,
        "tproxyd holds {fds} descriptors: {fds_idle} when idle + {pooled} pooled pipe(s)"
    );
    drop(c);
}

/// Bytes the stalled connection's writer offers: far more than the kernel
/// buffers on the way (a few MiB at most), so that it must stall.
const STALL_LEN: u64 = 32 << 20;

/// One connection whose receiving end stops reading. `reader_is_client`:
/// the client stops reading what the server sends; otherwise the server
/// stops reading what the client sends. Meanwhile bystanders must finish;
/// then the reader resumes and gets every byte and EOF.
fn stalled_reader(reader_is_client: bool) {
    const BYSTANDERS: u64 = 4;
    let lab = Lab::tproxy();
    // What must stop the writer is tproxyd's backpressure, not the kernel's
    // buffers filling: newer kernels let a receive buffer autotune to
    // 32 MiB (tcp_rmem's default maximum), as much as the whole stream, so
    // the router's sockets are capped to a few hundred KiB.
    cap_router_tcp_buffers(&lab);
    let _proxy = Proxy::start(&lab, &[]);
    let _echo = EchoServer::start(lab.listen_server(80));
    let listener = lab.listen_server(81);
    let client = lab.connect(server_addr(false, 81)).expect("connect");
    let (server, _) = accept(&listener);
    small_buffers(&client);
    small_buffers(&server);
    let (mut writer, mut reader) = if reader_is_client {
        (server, client)
    } else {
        (client, server)
    };
    let progress = Arc::new(AtomicU64::new(0));
    let pushing = {
        let progress = progress.clone();
        writer
            .set_write_timeout(Some(Duration::from_secs(60)))
            .expect("SO_SNDTIMEO");
        thread::spawn(move || -> io::Result<()> {
            let mut w = PatternWriter::new(6);
            while w.written < STALL_LEN {
                w.push(&mut writer, (w.written + 64 * 1024).min(STALL_LEN))?;
                progress.store(w.written, Ordering::SeqCst);
            }
            writer.shutdown(Shutdown::Write)
        })
    };
    // Stalled: no progress for two seconds.
    let stalled = |progress: &AtomicU64| {
        let mut last = (progress.load(Ordering::SeqCst), Instant::now());
        wait_until(Duration::from_secs(20), || {
            let now = progress.load(Ordering::SeqCst);
            if now != last.0 {
                last = (now, Instant::now());
            }
            last.1.elapsed() > Duration::from_secs(2)
        })
    };
    assert!(stalled(&progress), "the writer never stalled");
    let at_stall = progress.load(Ordering::SeqCst);
    eprintln!("the writer stalled after {at_stall} of {STALL_LEN} bytes");
    assert!(
        at_stall < STALL_LEN,
        "all {STALL_LEN} bytes were taken while nobody read: something buffers without bound"
    );

    // Everyone else goes on.
    let gate = Arc::new(Gate::default());
    let bystanders: Vec<_> = (0..BYSTANDERS)
        .map(|i| bystander(&lab, 80, i, gate.clone()))
        .collect();
    gate.open();
    join_all(bystanders);
    assert_eq!(
        progress.load(Ordering::SeqCst),
        at_stall,
        "the stalled writer moved while its reader was not reading"
    );

    // The reader resumes and gets it all.
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("SO_RCVTIMEO");
    let got = common::recv_pattern_to_eof(&mut reader, 6, STALL_LEN);
    let pushed = pushing.join().expect("writer panicked");
    assert!(
        got.is_ok() && pushed.is_ok(),
        "after resuming: reader {got:?}, writer {pushed:?} (stalled at {at_stall} bytes)"
    );
}

/// A client that stops reading (its window closes) holds up nobody but
/// itself, and gets every byte, in order, once it reads again.
#[test]
fn client_that_stops_reading_stalls_only_itself_and_gets_every_byte_when_it_resumes() {
    stalled_reader(true);
}

/// The same with the server as the one that stops reading.
#[test]
fn server_that_stops_reading_stalls_only_itself_and_gets_every_byte_when_it_resumes() {
    stalled_reader(false);
}

/// Both ends of `n` connections through the proxy, paired: the client end
/// of connection i sent its index (8 bytes) first, which the server end has
/// read. Alternates IPv4 and IPv6.
fn connection_pairs(lab: &Lab, listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let clients: Vec<TcpStream> = lab.client(move || {
        (0..n)
            .map(|i| {
                let mut c = common::connect(server_addr(i % 2 == 1, 80))
                    .unwrap_or_else(|e| panic!("connection {i}: connect: {e}"));
                c.write_all(&(i as u64).to_le_bytes())
                    .unwrap_or_else(|e| panic!("connection {i}: index: {e}"));
                c
            })
            .collect()
    });
    let mut servers: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (mut s, _) = accept(listener);
        let mut idx = [0u8; 8];
        s.read_exact(&mut idx).expect("read a connection's index");
        let i = u64::from_le_bytes(idx) as usize;
        assert!(i < n && servers[i].is_none(), "bad index {i}");
        servers[i] = Some(s);
    }
    clients
        .into_iter()
        .zip(servers)
        .map(|(c, s)| (c, s.expect("every index once")))
        .collect()
}

/// Many connections whose readers have stopped while their writers keep
/// pushing. Half push client -> server, half server -> client. tproxyd must
/// push back (each writer stalls after what the kernel buffers on the way),
/// hold at most one pipe per stalled direction, no more bulk pipes than its
/// budget (32 MiB per worker: 32 of 1 MiB), and keep its own memory flat;
/// then, once the readers read again, every byte arrives.
fn stalled_many(extra: &[&str]) {
    const CONNS: usize = 200;
    /// A writer that gets this far was never pushed back: with the router's
    /// buffers capped (about 0.7 MiB per connection in the kernel, all told)
    /// it should stall far sooner.
    const LIMIT: u64 = 16 << 20;
    /// tproxyd's own memory may grow by this much. Splice moves no payload
    /// through user space, and even copying (`--no-splice`) holds at most a
    /// 64 KiB buffer per direction: 200 x 64 KiB = 12.5 MiB. A proxy that
    /// buffered what the writers push would need up to 200 x 16 MiB.
    const RSS_GROWTH_MAX_KIB: u64 = 64 * 1024;

    let lab = Lab::tproxy();
    cap_router_tcp_buffers(&lab);
    let mut args = vec!["--metrics", METRICS, "--log-level", "info"];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&lab, &args);
    let pid = proxy.pid();
    let listener = lab.listen_server(80);
    let fds_before = settled_fd_count(pid);
    let rss_before = proc_vm_rss_kib(pid);

    let pairs = connection_pairs(&lab, &listener, CONNS);
    // Even: the client writes, the server has stopped reading. Odd: the
    // server writes, the client has stopped reading.
    let mut writers = Vec::with_capacity(CONNS);
    let mut readers = Vec::with_capacity(CONNS);
    for (i, (c, s)) in pairs.into_iter().enumerate() {
        small_buffers(&c);
        small_buffers(&s);
        let (w, r) = if i % 2 == 0 { (c, s) } else { (s, c) };
        w.set_nonblocking(true).expect("O_NONBLOCK");
        writers.push((w, PatternWriter::new(0x5_7A11 << 16 | i as u64)));
        readers.push(r);
    }

    let push_all = |writers: &mut Vec<(TcpStream, PatternWriter)>| -> bool {
        let mut any = false;
        for (i, (s, w)) in writers.iter_mut().enumerate() {
            any |= w
                .push(s, LIMIT)
                .unwrap_or_else(|e| panic!("connection {i}: write: {e}"));
        }
        any
    };
    // Push until nothing moves for two seconds.
    let mut quiet_since = Instant::now();
    let started = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(2) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the writers never stalled"
        );
        if push_all(&mut writers) {
            quiet_since = Instant::now();
        } else {
            thread::sleep(Duration::from_millis(10));
        }
    }
    // And keep pushing for two more, watching tproxyd.
    let mut rss_peak = 0;
    let mut fds_peak = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        push_all(&mut writers);
        rss_peak = rss_peak.max(proc_vm_rss_kib(pid));
        fds_peak = fds_peak.max(proc_fd_count(pid));
        thread::sleep(Duration::from_millis(50));
    }
    let m = Metrics::of(&lab);
    let written: Vec<u64> = writers.iter().map(|(_, w)| w.written).collect();
    let total: u64 = written.iter().sum();
    let most = written.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{CONNS} stalled connections {extra:?}: writers pushed {} MiB in all, at most {} KiB each; \
         tproxyd RSS {rss_before} -> {rss_peak} KiB, fds {fds_before} -> {fds_peak}, \
         pipes in use {} ({} bulk), pooled {}, splice fallbacks {}",
        total >> 20,
        most >> 10,
        m.get(PIPES_IN_USE),
        m.get(PIPES_BULK),
        m.get(PIPES_POOLED),
        m.get(FALLBACKS),
    );
    assert!(
        most < LIMIT,
        "a writer pushed {most} bytes while its reader did not read: something buffers without bound"
    );
    assert_eq!(m.get(ACTIVE), CONNS as u64, "connections open");
    assert!(
        m.get(PIPES_IN_USE) <= CONNS as u64,
        "{} pipes in use for {CONNS} stalled directions",
        m.get(PIPES_IN_USE)
    );
    // The lab's tproxyd runs as root, one worker per core: 1 MiB bulk
    // pipes, 32 per worker at most (pipe.rs PIPE-4).
    let cores = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let bulk_max = if extra.contains(&"--no-splice") {
        0
    } else {
        32 * cores
    };
    assert!(
        m.get(PIPES_BULK) <= bulk_max,
        "{} bulk pipes in use, over the budget of {bulk_max}",
        m.get(PIPES_BULK)
    );
    assert!(
        rss_peak.saturating_sub(rss_before) < RSS_GROWTH_MAX_KIB,
        "tproxyd's RSS grew from {rss_before} KiB to {rss_peak} KiB"
    );
    // Two sockets per connection, at most two pipe descriptors per stalled
    // direction, plus the pool.
    let fds_max = fds_before + 4 * CONNS + 2 * m.get(PIPES_POOLED) as usize;
    assert!(
        fds_peak <= fds_max,
        "tproxyd held {fds_peak} descriptors, more than {fds_max}"
    );

    // The readers read again: every byte, in order, then EOF.
    let expect: Vec<(TcpStream, u64, u64)> = readers
        .into_iter()
        .zip(&written)
        .enumerate()
        .map(|(i, (r, &len))| (r, 0x5_7A11 << 16 | i as u64, len))
        .collect();
    let (mut evens, mut odds): (Vec<_>, Vec<_>) = expect
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let drain = |set: Vec<(usize, (TcpStream, u64, u64))>| {
        thread::spawn(move || {
            set.into_iter()
                .map(|(i, (mut r, seed, len))| {
                    common::recv_pattern(&mut r, seed, len)
                        .map(|()| r)
                        .map_err(|e| format!("connection {i}: {e}"))
                })
                .collect::<Result<Vec<TcpStream>, String>>()
        })
    };
    let (a, b) = (
        drain(std::mem::take(&mut evens)),
        drain(std::mem::take(&mut odds)),
    );
    let mut readers = a.join().expect("reader panicked").expect("drain");
    readers.extend(b.join().expect("reader panicked").expect("drain"));
    for (s, _) in &writers {
        s.shutdown(Shutdown::Write).expect("writer shutdown");
    }
    for (i, r) in readers.iter_mut().enumerate() {
        common::expect_eof(r, 0).unwrap_or_else(|e| panic!("reader {i}: {e}"));
    }
    drop(writers);
    drop(readers);
    let (idle, m) = wait_metrics(&lab, Duration::from_secs(20), |m| {
        m.get(ACTIVE) == 0 && m.get(PIPES_IN_USE) == 0
    });
    assert!(
        idle,
        "after every connection closed: {} active, {} pipes in use",
        m.get(ACTIVE),
        m.get(PIPES_IN_USE)
    );
    assert_eq!(m.get(&closed("completed")), CONNS as u64, "completed");
}

#[test]
fn two_hundred_stalled_connections_keep_memory_and_pipes_bounded_then_drain_byte_exact() {
    stalled_many(&[]);
}

#[test]
fn two_hundred_stalled_connections_without_splice_keep_memory_bounded_then_drain_byte_exact() {
    stalled_many(&["--no-splice"]);
}
