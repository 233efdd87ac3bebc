//! A connection's life through the proxy: a half-close travels on its own
//! without ending the other direction, and SIGTERM lets open transfers finish
//! before tproxyd exits 0.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use common::{
    Lab, Proxy, Role, Verifier, accept, accept_timeout, expect_eof, family, recv_pattern,
    recv_pattern_to_eof, recv_verified, send_pattern, server_addr, wait_until,
};
use nix::sys::signal::Signal;

const REQUEST_LEN: u64 = 1 << 20;
const ANSWER_LEN: u64 = 4 << 20;
const REQUEST_SEED: u64 = 0x4E0;
const ANSWER_SEED: u64 = 0xA45;

/// The client sends its request and shuts down writing; the server reads to
/// EOF, then answers at length. The client must get all of the answer.
#[test]
fn half_close_delivers_the_servers_whole_answer() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let server = {
            let listener = listener.try_clone().expect("clone listener");
            thread::spawn(move || -> Result<(), String> {
                let (mut s, _) = accept(&listener);
                recv_pattern_to_eof(&mut s, REQUEST_SEED, REQUEST_LEN)
                    .map_err(|e| format!("server reading the request: {e}"))?;
                send_pattern(&mut s, ANSWER_SEED, ANSWER_LEN)
                    .and_then(|()| s.write_all(&REQUEST_LEN.to_le_bytes()))
                    .map_err(|e| format!("server answering: {e}"))
                // Dropped: a normal close.
            })
        };
        let mut client = lab
            .connect(server_addr(v6, 80))
            .expect("connect through the proxy");
        send_pattern(&mut client, REQUEST_SEED, REQUEST_LEN).expect("client sending the request");
        client
            .shutdown(Shutdown::Write)
            .expect("client shutdown(Write)");
        let answer = recv_pattern(&mut client, ANSWER_SEED, ANSWER_LEN);
        let server_res = server.join().expect("server thread panicked");
        assert!(
            answer.is_ok() && server_res.is_ok(),
            "{}: client: {answer:?}; server: {server_res:?}",
            family(v6)
        );
        let mut count = [0u8; 8];
        client.read_exact(&mut count).expect("the byte count");
        assert_eq!(
            u64::from_le_bytes(count),
            REQUEST_LEN,
            "bytes the server got"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("EOF after the answer");
        assert!(rest.is_empty(), "{} bytes after the answer", rest.len());
    }
}

const DRAIN_LEN: u64 = 32 << 20;
const DRAIN_SEED: u64 = 0xD4A1;
/// Read at first in small steps with pauses, so the transfer is surely open
/// when SIGTERM comes.
const SLOW_STEP: usize = 64 * 1024;
const SLOW_STEPS: usize = 16;
const SLOW_PAUSE: Duration = Duration::from_millis(20);

/// SIGTERM in the middle of a transfer: tproxyd stops listening, serves no
/// new connection, lets the open one finish byte-exact and exits 0.
#[test]
fn sigterm_lets_an_open_transfer_finish_then_exits_0() {
    let lab = Lab::tproxy();
    let mut proxy = Proxy::start(&lab, &["--drain-timeout", "20s"]);
    let listener = lab.listen_server(80);
    let late_listener = lab.listen_server(81);
    let server = thread::spawn(move || {
        let (mut s, _) = accept(&listener);
        send_pattern(&mut s, DRAIN_SEED, DRAIN_LEN)
    });
    let mut client = lab
        .connect(server_addr(false, 80))
        .expect("connect through the proxy");

    let mut v = Verifier::new(DRAIN_SEED);
    let mut buf = vec![0u8; SLOW_STEP];
    for _ in 0..SLOW_STEPS {
        let n = client.read(&mut buf).expect("slow read");
        assert!(n > 0, "EOF after {} bytes", v.offset());
        v.check(&buf[..n]).expect("slow part of the stream");
        thread::sleep(SLOW_PAUSE);
    }
    assert!(
        v.offset() < DRAIN_LEN / 2,
        "the transfer should still be open"
    );

    proxy.signal(Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(5), || !lab
            .is_listening(Role::Router, lab.port)),
        "tproxyd still listens 5s after SIGTERM"
    );
    assert!(
        proxy.wait_exit(Duration::ZERO).is_none(),
        "tproxyd exited with a transfer open"
    );

    // A connection made now must not reach the server.
    let late = server_addr(false, 81);
    let _ = lab.client(move || connect_briefly(late));
    let reached = accept_timeout(&late_listener, Duration::from_millis(500));
    assert!(
        reached.is_err(),
        "a connection made after SIGTERM reached the server"
    );

    // The rest at full speed.
    recv_verified(&mut client, &mut v, DRAIN_LEN).expect("rest of the stream");
    expect_eof(&mut client, DRAIN_LEN).expect("end of the stream");
    // The server's EOF ended one direction; closing ours ends the other, and
    // with it the last connection the drain waits for.
    drop(client);
    server
        .join()
        .expect("server thread panicked")
        .expect("server sending");

    let status = proxy.wait_exit(Duration::from_secs(10));
    match status {
        Some(st) => assert!(st.success(), "tproxyd exited with {st} after draining"),
        None => panic!("tproxyd still running 10s after the last connection closed"),
    }
}

/// Try to connect and to get a byte through, for at most about a second.
fn connect_briefly(dst: std::net::SocketAddr) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"late")
}
