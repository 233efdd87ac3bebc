//! Bytes go through tproxyd intact: both directions at once, both address
//! families, the splice path and the copy fallback, many connections at once.
//! Every connection here is diverted by the lab's TPROXY rules; the router
//! forwards nothing by itself, so nothing can pass around the proxy.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::thread;

use common::{
    EchoServer, Lab, Pattern, Proxy, ROUTER_UPSTREAM_V4, ROUTER_UPSTREAM_V6, accept, connect,
    exchange, family, raise_nofile, server_addr,
};

/// Per direction: big enough to cycle any pipe and socket buffer many times.
const BULK_LEN: u64 = 64 << 20;
const CLIENT_SEED: u64 = 0xC11E;
const SERVER_SEED: u64 = 0x5E4E;

/// The client and the server each send BULK_LEN bytes while reading the
/// other's; both check every byte.
fn both_ways_at_once(v6: bool, extra: &[&str]) {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, extra);
    let listener = lab.listen_server(80);
    let server = thread::spawn(move || {
        let (s, _) = accept(&listener);
        exchange(s, SERVER_SEED, BULK_LEN, CLIENT_SEED, BULK_LEN)
    });
    let client = lab
        .connect(server_addr(v6, 80))
        .unwrap_or_else(|e| panic!("{}: connect through the proxy: {e}", family(v6)));
    let client_res = exchange(client, CLIENT_SEED, BULK_LEN, SERVER_SEED, BULK_LEN);
    let server_res = server.join().expect("server thread panicked");
    assert!(
        client_res.is_ok() && server_res.is_ok(),
        "{} {extra:?}: client: {client_res:?}; server: {server_res:?}",
        family(v6)
    );
}

#[test]
fn ipv4_64mib_each_way_at_once_arrives_byte_exact() {
    both_ways_at_once(false, &[]);
}

#[test]
fn ipv6_64mib_each_way_at_once_arrives_byte_exact() {
    both_ways_at_once(true, &[]);
}

#[test]
fn ipv4_64mib_each_way_at_once_arrives_byte_exact_without_splice() {
    both_ways_at_once(false, &["--no-splice"]);
}

#[test]
fn ipv6_64mib_each_way_at_once_arrives_byte_exact_without_splice() {
    both_ways_at_once(true, &["--no-splice"]);
}

/// The server is reached from the router's own address (the proxy connects
/// upstream itself), while the client believes it talks to the server.
#[test]
fn upstream_comes_from_the_router_and_the_client_sees_the_original_destination() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let dst = server_addr(v6, 80);
        let mut client = lab.connect(dst).expect("connect through the proxy");
        let (mut upstream, peer) = accept(&listener);
        let router: IpAddr = if v6 {
            ROUTER_UPSTREAM_V6.into()
        } else {
            ROUTER_UPSTREAM_V4.into()
        };
        // A dual-stack listener sees IPv4 peers as v4-mapped IPv6.
        let peer_ip = match peer.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            a => a,
        };
        assert_eq!(peer_ip, router, "{}: upstream source", family(v6));
        assert_eq!(client.peer_addr().expect("peer_addr"), dst);
        assert_eq!(
            client.local_addr().expect("local_addr").ip(),
            if v6 {
                IpAddr::from(common::CLIENT_V6)
            } else {
                IpAddr::from(common::CLIENT_V4)
            }
        );
        client.write_all(b"ping").expect("client write");
        let mut buf = [0u8; 4];
        upstream.read_exact(&mut buf).expect("server read");
        assert_eq!(&buf, b"ping");
        upstream.write_all(b"pong").expect("server write");
        client.read_exact(&mut buf).expect("client read");
        assert_eq!(&buf, b"pong");
    }
}

/// With --spoof-source the server sees the client's own address, as if no
/// proxy were there; bytes flow both ways (the server's answers to the
/// client's address are routed back into the proxy by the lab's socket
/// rule), and a closed connection is a clean EOF at both ends. Many in a
/// row, so that ports are picked (and reused) over and over.
#[test]
fn with_spoof_source_the_server_sees_the_clients_own_address() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &["--spoof-source", "--mark", "2"]);
    let listener = lab.listen_server(80);
    for v6 in [false, true] {
        let client_ip: IpAddr = if v6 {
            common::CLIENT_V6.into()
        } else {
            common::CLIENT_V4.into()
        };
        for i in 0..200u64 {
            let what = format!("{} connection {i}", family(v6));
            let dst = server_addr(v6, 80);
            let mut client = lab
                .connect(dst)
                .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            let (mut upstream, peer) = accept(&listener);
            // An IPv4 peer of a dual-stack listener shows as v4-mapped IPv6.
            assert_eq!(
                peer.ip().to_canonical(),
                client_ip,
                "{what}: upstream source"
            );
            let len = if i % 50 == 0 { 1 << 20 } else { 100 };
            let (up, down) = (Pattern::bytes(i, len), Pattern::bytes(!i, len));
            let sent = up.clone();
            let server = thread::spawn(move || {
                let mut got = vec![0u8; sent.len()];
                upstream.read_exact(&mut got).map_err(|e| e.to_string())?;
                upstream.write_all(&down).map_err(|e| e.to_string())?;
                Ok::<_, String>((got == sent, upstream))
            });
            client
                .write_all(&up)
                .unwrap_or_else(|e| panic!("{what}: write: {e}"));
            let mut got = vec![0u8; len];
            client
                .read_exact(&mut got)
                .unwrap_or_else(|e| panic!("{what}: read: {e}"));
            let (server_ok, upstream) = server.join().expect("server thread").expect(&what);
            assert!(server_ok, "{what}: the server got other bytes");
            assert!(
                got == Pattern::bytes(!i, len),
                "{what}: the client got other bytes"
            );
            drop(upstream); // FIN from the server: the client reads EOF
            let mut rest = Vec::new();
            client
                .read_to_end(&mut rest)
                .unwrap_or_else(|e| panic!("{what}: EOF: {e}"));
            assert!(rest.is_empty(), "{what}: bytes after the answer");
        }
    }
}

const MANY: usize = 1000;
const MANY_LEN: usize = 1024;

/// MANY connections are open at the same time, each sends its own bytes, and
/// each gets exactly its own bytes back.
#[test]
fn a_thousand_concurrent_connections_are_all_served() {
    // Client and server ends of every connection live in this process.
    raise_nofile((2 * MANY + 512) as u64);
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &[]);
    let echo = EchoServer::start(lab.listen_server(80));
    let dst = server_addr(false, 80);
    let mut conns = lab.client(move || {
        (0..MANY)
            .map(|i| connect(dst).unwrap_or_else(|e| panic!("connection {i}: connect: {e}")))
            .collect::<Vec<_>>()
    });
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&Pattern::bytes(i as u64, MANY_LEN))
            .unwrap_or_else(|e| panic!("connection {i}: write: {e}"));
    }
    let mut buf = vec![0u8; MANY_LEN];
    for (i, c) in conns.iter_mut().enumerate() {
        c.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("connection {i}: read its echo: {e}"));
        assert!(
            buf == Pattern::bytes(i as u64, MANY_LEN),
            "connection {i} got bytes that are not its own"
        );
    }
    assert_eq!(echo.accepted(), MANY, "connections the server accepted");
}
