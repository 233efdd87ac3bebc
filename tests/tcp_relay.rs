//! The small-message relay (tcp/relay.rs CONN-6, CONN-7): messages under 16 KiB
//! go through the worker's scratch buffer with recv/send, bulk goes through
//! splice, and a direction switches between the two as its reads change
//! size. These tests aim at the seams: data and FIN in one go (the EOF is
//! inferred from a short read), a sink that stops taking bytes mid-relay
//! (the rest waits in the pipe, ahead of what follows), message sizes on
//! both sides of the threshold, and urgent data, whose mark stops reads
//! short and would stall splice.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use common::{Lab, Pattern, Proxy, accept, family, server_addr, set_timeouts};

/// Each case runs with splice (the relay and the switch to splice) and with
/// --no-splice (copying only, where the short-read rules apply too).
macro_rules! both_paths {
    ($case:ident, $spliced:ident, $copied:ident) => {
        #[test]
        fn $spliced() {
            $case(&[]);
        }
        #[test]
        fn $copied() {
            $case(&["--no-splice"]);
        }
    };
}

both_paths!(
    data_sent_with_its_fin_arrives_whole_then_eof_both_ways,
    data_and_fin_together_spliced,
    data_and_fin_together_copied
);
both_paths!(
    messages_of_mixed_sizes_survive_a_sink_that_stops_reading,
    mixed_sizes_stalled_sink_spliced,
    mixed_sizes_stalled_sink_copied
);
both_paths!(
    urgent_data_does_not_stall_the_stream,
    urgent_data_spliced,
    urgent_data_copied
);
both_paths!(
    urgent_data_inside_a_bulk_stream_loses_nothing_around_it,
    urgent_data_in_bulk_spliced,
    urgent_data_in_bulk_copied
);

/// How long a stalled stream may keep a test waiting before it fails.
const STALL: Duration = Duration::from_secs(5);

/// Sizes on both sides of the 16 KiB relay threshold, and far over it.
const SIZES: [usize; 8] = [1, 100, 1460, 16_383, 16_384, 16_385, 70_000, 1 << 20];

/// For each size and family: the client sends a request and its FIN at once,
/// the server reads to EOF, answers with its own FIN at once, and each side
/// must have the other's bytes exactly, then EOF.
fn data_sent_with_its_fin_arrives_whole_then_eof_both_ways(extra: &[&str]) {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, extra);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        for (i, &len) in SIZES.iter().enumerate() {
            let seed = 0xF1 + i as u64;
            let request = Pattern::bytes(seed, len);
            let answer = Pattern::bytes(!seed, len);
            let (req, ans) = (request.clone(), answer.clone());
            let l = listener.try_clone().expect("clone listener");
            let server = thread::spawn(move || {
                let (mut s, _) = accept(&l);
                let mut got = Vec::new();
                s.read_to_end(&mut got)
                    .map_err(|e| format!("server read: {e}"))?;
                if got != req {
                    return Err(format!(
                        "server got {} bytes, not the {} sent",
                        got.len(),
                        req.len()
                    ));
                }
                s.write_all(&ans)
                    .map_err(|e| format!("server write: {e}"))?;
                Ok::<(), String>(())
                // dropped: close() sends the FIN right behind the answer
            });
            let what = format!("{} {len} bytes", family(v6));
            let mut c = lab
                .connect(server_addr(v6, 80))
                .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            c.write_all(&request)
                .unwrap_or_else(|e| panic!("{what}: client write: {e}"));
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got)
                .unwrap_or_else(|e| panic!("{what}: client read: {e}"));
            let served = server.join().expect("server thread panicked");
            assert_eq!(served, Ok(()), "{what}");
            assert!(
                got == answer,
                "{what}: client got {} bytes, not the {} answered",
                got.len(),
                len
            );
        }
    }
}

/// The client writes messages of every size (1 byte to 40 KiB) while the
/// server reads nothing for a while, so relays find the sink full and leave
/// their rest in the pipe; then the server reads it all. The stream must be
/// exact and in order, and the proxy must not have reset anything.
fn messages_of_mixed_sizes_survive_a_sink_that_stops_reading(extra: &[&str]) {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, extra);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        const TOTAL: usize = 24 << 20;
        let stream = Pattern::bytes(0x5A11 + v6 as u64, TOTAL);
        let expect = stream.clone();
        let l = listener.try_clone().expect("clone listener");
        let server = thread::spawn(move || {
            let (mut s, _) = accept(&l);
            // Let the client fill every buffer on the way first.
            thread::sleep(Duration::from_millis(500));
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 3000];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("server read after {} bytes: {e}", got.len())),
                }
            }
            Ok(got)
        });
        let mut c = lab
            .connect(server_addr(v6, 80))
            .expect("connect through the proxy");
        // Sizes cycle through small and large: 1, 7, 49, ... up to 40 KiB.
        let (mut off, mut size) = (0usize, 1usize);
        while off < TOTAL {
            let n = size.min(TOTAL - off);
            c.write_all(&stream[off..off + n]).expect("client write");
            off += n;
            size = if size * 7 > 40_000 { 1 } else { size * 7 };
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let got = server
            .join()
            .expect("server thread panicked")
            .expect("server");
        assert_eq!(got.len(), TOTAL, "{}: bytes that arrived", family(v6));
        assert!(
            got == expect,
            "{}: the stream arrived corrupted or out of order",
            family(v6)
        );
        let mut rest = Vec::new();
        assert_eq!(
            c.read_to_end(&mut rest).map(|_| rest.len()).ok(),
            Some(0),
            "{}: EOF",
            family(v6)
        );
    }
}

/// Urgent data (MSG_OOB) stops reads short at its mark, and splice cannot
/// step over it at all. The proxy must still pass the rest of the stream
/// and the FIN, in both directions. The urgent byte itself is out of band:
/// a receiver without SO_OOBINLINE never reads it in-band, so the in-band
/// stream the server reads is the same with or without the proxy.
fn urgent_data_does_not_stall_the_stream(extra: &[&str]) {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, extra);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let l = listener.try_clone().expect("clone listener");
        let server = thread::spawn(move || {
            let (mut s, _) = accept(&l);
            set_timeouts(&s, STALL);
            let mut got = Vec::new();
            let end = s.read_to_end(&mut got).map(|_| got);
            // And the same the other way.
            let _ = s.write_all(b"abc");
            send_oob(&s, b'!');
            thread::sleep(Duration::from_millis(50));
            let _ = s.write_all(b"def");
            end.map_err(|e| e.to_string())
        });
        let mut c = lab
            .connect(server_addr(v6, 80))
            .expect("connect through the proxy");
        set_timeouts(&c, STALL);
        c.write_all(b"abc").unwrap();
        send_oob(&c, b'!');
        // A pause, so that the urgent byte surely reaches the proxy before
        // what follows: the mark is then at the head of its receive queue.
        thread::sleep(Duration::from_millis(50));
        c.write_all(b"def").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let served = server.join().expect("server thread panicked");
        assert_eq!(
            served,
            Ok(b"abcdef".to_vec()),
            "{}: what the server read",
            family(v6)
        );
        let mut got = Vec::new();
        let end = c
            .read_to_end(&mut got)
            .map(|_| got)
            .map_err(|e| e.to_string());
        assert_eq!(
            end,
            Ok(b"abcdef".to_vec()),
            "{}: what the client read",
            family(v6)
        );
    }
}

fn send_oob(s: &std::net::TcpStream, byte: u8) {
    // SAFETY: a one-byte buffer that outlives the call, on a socket we own.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            &byte as *const u8 as *const libc::c_void,
            1,
            libc::MSG_OOB,
        )
    };
    assert_eq!(n, 1, "send(MSG_OOB): {}", std::io::Error::last_os_error());
}

/// Urgent data in the middle of a bulk stream the sink is slow to take: the
/// proxy is splicing when it reaches the mark. Everything in-band before and
/// after the urgent byte must arrive, then EOF.
fn urgent_data_inside_a_bulk_stream_loses_nothing_around_it(extra: &[&str]) {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, extra);
    let listener = lab.listen_server(80);
    const HALF: usize = 2 << 20;
    for v6 in [false, true] {
        let head = Pattern::bytes(0x0B + v6 as u64, HALF);
        let tail = Pattern::bytes(0x0C + v6 as u64, HALF);
        let expect = [head.clone(), tail.clone()].concat();
        let l = listener.try_clone().expect("clone listener");
        let server = thread::spawn(move || {
            let (mut s, _) = accept(&l);
            set_timeouts(&s, STALL);
            thread::sleep(Duration::from_millis(300));
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .map(|_| got)
                .map_err(|e| e.to_string())
        });
        let mut c = lab
            .connect(server_addr(v6, 80))
            .expect("connect through the proxy");
        c.write_all(&head).unwrap();
        send_oob(&c, b'!');
        c.write_all(&tail).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let got = server
            .join()
            .expect("server thread panicked")
            .expect("server read");
        assert_eq!(
            got.len(),
            expect.len(),
            "{}: in-band bytes that arrived",
            family(v6)
        );
        assert!(
            got == expect,
            "{}: the stream arrived corrupted",
            family(v6)
        );
    }
}
