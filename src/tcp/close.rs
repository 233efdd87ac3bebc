//! Closing a connection: how it ended ([`End`]), and what each of its
//! sockets gets on the way out: FIN for a connection whose two streams both
//! finished, RST for any other (the invariant's name is the one it had in
//! conn.rs).
//!
//! What must stay true:
//! - CONN-8 (armed linger: only a finished stream gets a FIN): both sockets
//!   carry SO_LINGER {on, 0} from birth (the client's inherited from its
//!   listener, the upstream's set in `connect_upstream`), so however they are
//!   closed — a connection that ends any way but `Completed`, a panicking
//!   worker dropping its slab, exit(1), a signal, SIGKILL, the OOM killer —
//!   the kernel resets both peers. shutdown(SHUT_WR) sends its FIN whatever
//!   the linger, so half-closes pass as always. Only `Conn::close` of a
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

use std::io;
use std::os::fd::AsRawFd;

use mio::net::TcpStream;

use crate::stats::EndKind;
use crate::sys;
use crate::token::Side;

/// How a connection ended, and what its sockets get on the way out.
#[derive(Debug)]
pub struct End {
    pub kind: EndKind,
    /// The error behind it, for the log line.
    pub cause: Option<io::Error>,
}

impl End {
    pub(super) fn new(kind: EndKind, cause: Option<io::Error>) -> End {
        End { kind, cause }
    }
    pub(super) fn reset_by(side: Side, e: io::Error) -> End {
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

/// Close a connection's two sockets as `end` says: FIN to both for a
/// completed connection, RST to both otherwise (CONN-8).
pub(super) fn sockets(end: &End, client: TcpStream, upstream: TcpStream) {
    if end.is_graceful() {
        // A failed setsockopt leaves the linger armed: a reset for a
        // connection that finished, a false alarm but never a loss.
        let _ = sys::set_linger_off(client.as_raw_fd());
        let _ = sys::set_linger_off(upstream.as_raw_fd());
    }
    // Dropping the streams closes them, which also takes them out of epoll.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::own_sockets;
    use crate::stats::WorkerStats;
    use crate::tcp::accept::{ClientLimits, Reservation};
    use crate::tcp::conn::Conn;
    use crate::tcp::connect::Upstream;
    use crate::tcp::pipe::Buffers;
    use std::io::{ErrorKind, Read};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// A connection between a real client and a real server on loopback,
    /// built as the worker builds one, and the two far ends.
    fn conn() -> (Conn, std::net::TcpStream, std::net::TcpStream) {
        conn_counted(&Arc::new(AtomicUsize::new(0)), None)
    }

    /// [`conn`], holding a place among those `active` counts, and one of
    /// its client's under `clients`, if given.
    fn conn_counted(
        active: &Arc<AtomicUsize>,
        clients: Option<&Arc<ClientLimits>>,
    ) -> (Conn, std::net::TcpStream, std::net::TcpStream) {
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
        let upstream = Upstream {
            sock: TcpStream::from_std(upstream),
            registered,
            deadline: now + Duration::from_secs(5),
        };
        let place = Reservation::take(active, usize::MAX).unwrap();
        let client_place = clients.map(|l| l.take(peer.ip()).unwrap());
        let c = Conn::new(
            (TcpStream::from_std(accepted), peer),
            (upstream, dst),
            (place, client_place),
            0,
            now,
            true,
            None,
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

    #[test]
    fn closing_or_dropping_a_connection_gives_its_places_back() {
        // accept.rs ACC-1 and client_limit.rs ACC-2: the places under
        // --max-conns and --max-conns-per-client go with the connection,
        // however it goes.
        let stats = WorkerStats::default();
        let mut bufs = Buffers::new(65536, 65536, 4);
        let active = Arc::new(AtomicUsize::new(0));
        let prefix = crate::config::DEFAULT_CLIENT_PREFIX;
        let clients = Arc::new(ClientLimits::new(5, prefix));
        let loopback = "127.0.0.1".parse().unwrap();
        let (a, _c1, _s1) = conn_counted(&active, Some(&clients));
        let (b, _c2, _s2) = conn_counted(&active, Some(&clients));
        let (c, _c3, _s3) = conn_counted(&active, Some(&clients));
        assert_eq!(active.load(Ordering::Acquire), 3);
        assert_eq!(clients.count_of(loopback), 3);
        a.close(&End::new(EndKind::Completed, None), &mut bufs.pipes, &stats);
        assert_eq!(active.load(Ordering::Acquire), 2);
        assert_eq!(clients.count_of(loopback), 2);
        c.close(
            &End::new(EndKind::ConnectRefused, None),
            &mut bufs.pipes,
            &stats,
        );
        assert_eq!(clients.count_of(loopback), 1);
        drop(b);
        assert_eq!(active.load(Ordering::Acquire), 0);
        assert_eq!(clients.count_of(loopback), 0);
    }
}
