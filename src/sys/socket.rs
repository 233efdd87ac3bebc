//! TCP sockets: the transparent listeners, the accept queue of a paused
//! one, the upstream connect (mark, source address, transparent bind), the
//! socket options every proxied socket carries (TCP_NODELAY, the armed
//! SO_LINGER of tcp/close.rs CONN-8), the original destination behind REDIRECT,
//! and whether an address is this host's.
//!
//! What must stay true: SYS-1..3 (mod.rs); every listener and every
//! upstream socket is born with SO_LINGER 0, so any close before the
//! connection completes is a reset (CONN-8).

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use super::{
    ListenError, bind, bind_listener, domain, set_transparent, setsockopt, sockaddr_from,
    sockaddr_to, socket, transparent_socket,
};

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number 80 (linux/netfilter_ipv4.h,
/// linux/netfilter_ipv6/ip6_tables.h); libc does not export either.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The listen(2) backlog. The kernel caps it at net.core.somaxconn, so asking
/// for more than the default costs nothing and lets tune/ raise the ceiling.
pub const LISTEN_BACKLOG: libc::c_int = 65_535;

/// A non-blocking TCP listener on `addr` for TPROXY: IP_TRANSPARENT (or
/// IPV6_TRANSPARENT), SO_REUSEPORT so that every worker and a second tproxyd
/// can share the port, and IPV6_V6ONLY on IPv6 so `::` and `0.0.0.0` are two
/// listeners rather than one fighting the other.
pub fn transparent_listener(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    let v6 = addr.is_ipv6();
    let fd = transparent_socket(&addr, libc::SOCK_STREAM)?;
    let raw = fd.as_raw_fd();
    let one: libc::c_int = 1;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, one)
        .map_err(|e| ListenError::Other("SO_REUSEADDR", e))?;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, one)
        .map_err(|e| ListenError::Other("SO_REUSEPORT", e))?;
    if v6 {
        setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, one)
            .map_err(|e| ListenError::Other("IPV6_V6ONLY", e))?;
    }
    // Accepted sockets inherit TCP_NODELAY and SO_LINGER from their
    // listener (the kernel clones the listener's socket for each client):
    // one setsockopt each here instead of one each per client. The linger
    // arms every client socket from birth (tcp/close.rs CONN-8); on the listener
    // itself it changes nothing, a listener's close never lingers.
    set_nodelay(raw).map_err(|e| ListenError::Other("TCP_NODELAY", e))?;
    set_linger_zero(raw).map_err(|e| ListenError::Other("SO_LINGER", e))?;
    bind_listener(raw, &addr)?;
    syscall!(listen(raw, LISTEN_BACKLOG)).map_err(|e| ListenError::Other("listen", e))?;
    Ok(std::net::TcpListener::from(fd))
}

/// A listening socket's accept queue as the kernel keeps it: clients whose
/// handshake is complete and who wait for accept(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptQueue {
    /// Waiting now.
    pub len: u32,
    /// The most that can wait: the listen(2) backlog capped at
    /// net.core.somaxconn. Past it the kernel drops new handshakes.
    pub max: u32,
}

/// TCP_LISTEN from <netinet/tcp.h>'s tcp_states (the libc crate lacks it).
const TCP_STATE_LISTEN: u8 = 10;

/// The accept queue of a listening TCP socket. On a listener, TCP_INFO
/// reports the queue in two fields it otherwise uses for the send side:
/// `tcpi_unacked` is its length (sk_ack_backlog) and `tcpi_sacked` its
/// capacity (sk_max_ack_backlog) (net/ipv4/tcp.c, tcp_get_info). One
/// getsockopt: meant for a paused listener, not for every accept.
pub fn accept_queue(listener: &impl AsFd) -> io::Result<AcceptQueue> {
    // SAFETY: tcp_info is plain old data; all-zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    syscall!(getsockopt(
        listener.as_fd().as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        &mut info as *mut _ as *mut libc::c_void,
        &mut len,
    ))?;
    let filled = mem::offset_of!(libc::tcp_info, tcpi_sacked) + mem::size_of::<u32>();
    if (len as usize) < filled {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TCP_INFO returned {len} bytes, fewer than the {filled} it always has"),
        ));
    }
    if info.tcpi_state != TCP_STATE_LISTEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    Ok(AcceptQueue {
        len: info.tcpi_unacked,
        max: info.tcpi_sacked,
    })
}

/// Options for the proxy's own connection to the original destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamOpts {
    /// SO_MARK for the upstream socket, so host rules can tell proxy traffic.
    pub mark: Option<u32>,
}

/// Where an upstream connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Wherever the host's routing says (an unbound socket).
    Host,
    /// This address of the host's own (`--source`).
    Local(IpAddr),
    /// This address, which need not be the host's (`--spoof-source`: the
    /// client's); the socket is made transparent.
    Foreign(IpAddr),
}

/// Start a non-blocking connect to `dst`. Returns as soon as the SYN is on its
/// way (EINPROGRESS); completion is learnt from a WRITABLE event without an
/// error (or `take_error()` when the event is less clear).
///
/// With a `Source::Local` or `Source::Foreign` address the socket is bound
/// to it with port 0 and IP_BIND_ADDRESS_NO_PORT (honoured for IPv6 sockets
/// too: tested below), so the port is still chosen at connect time by the
/// whole 4-tuple, as for an unbound socket, rather than from the ports free
/// on that address alone. EADDRNOTAVAIL from here means no source port is
/// free towards `dst` (all in use or in TIME_WAIT).
pub fn connect_upstream(
    dst: SocketAddr,
    opts: UpstreamOpts,
    source: Source,
) -> io::Result<std::net::TcpStream> {
    let fd = socket(domain(&dst), libc::SOCK_STREAM)?;
    let raw = fd.as_raw_fd();
    if let Some(mark) = opts.mark {
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    }
    set_nodelay(raw)?;
    // Armed from birth (tcp/close.rs CONN-8): until the connection completes, any
    // close of this socket, the process's death included, is a reset.
    set_linger_zero(raw)?;
    if let Source::Local(ip) | Source::Foreign(ip) = source {
        if let Source::Foreign(_) = source {
            set_transparent(raw, dst.is_ipv6())?;
        }
        setsockopt(
            raw,
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            1 as libc::c_int,
        )?;
        bind(raw, &SocketAddr::new(ip, 0))?;
    }
    let (storage, len) = sockaddr_from(&dst);
    match syscall!(connect(
        raw,
        &storage as *const _ as *const libc::sockaddr,
        len
    )) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(std::net::TcpStream::from(fd))
}

/// TCP_NODELAY: the peers' own stacks already decided when to send; the
/// proxy must not add a Nagle delay of its own on top of theirs.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1 as libc::c_int)
}

/// SO_LINGER {on, 0}: any close(2) of this socket, including the one the
/// kernel does when the process dies, sends RST instead of FIN and drops
/// whatever is still unsent or unacknowledged, so the peer learns that the
/// stream did not finish.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    set_linger(fd, 1)
}

/// SO_LINGER off: close(2) is graceful again (a FIN after everything queued,
/// which the kernel goes on sending). Needed before any close meant to end a
/// finished stream: a close with linger 0 throws away what the peer has not
/// acknowledged yet, even after shutdown(SHUT_WR).
pub fn set_linger_off(fd: RawFd) -> io::Result<()> {
    set_linger(fd, 0)
}

fn set_linger(fd: RawFd, on: libc::c_int) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        libc::linger {
            l_onoff: on,
            l_linger: 0,
        },
    )
}

/// The destination the connection had before REDIRECT/DNAT rewrote it
/// (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST). ENOENT when conntrack holds no
/// NAT mapping for it: the client dialled this address itself.
pub fn nat_original_dst(fd: RawFd, v6: bool) -> io::Result<SocketAddr> {
    // SAFETY: all-zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    syscall!(getsockopt(
        fd,
        level,
        SO_ORIGINAL_DST,
        &mut storage as *mut _ as *mut libc::c_void,
        &mut len,
    ))?;
    sockaddr_to(&storage)
}

/// Whether `ip` is one of this host's (this namespace's) own addresses: an
/// ordinary, non-transparent socket may bind only to those.
pub fn is_local_address(ip: IpAddr) -> io::Result<bool> {
    let addr = SocketAddr::new(ip, 0);
    let fd = socket(domain(&addr), libc::SOCK_DGRAM)?;
    match bind(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn loopback_is_local_and_benchmark_range_is_not() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local_address("198.18.255.254".parse().unwrap()).unwrap());
    }

    #[test]
    fn linger_zero_makes_close_a_reset() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        set_linger_zero(b.as_raw_fd()).unwrap();
        drop(b);
        let mut buf = [0u8; 1];
        let e = a.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn nat_original_dst_without_nat_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(nat_original_dst(a.as_raw_fd(), false).is_err());
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        // admit() relies on this instead of a setsockopt per client. Needs
        // CAP_NET_ADMIN for IP_TRANSPARENT, like the whole test suite.
        let l = transparent_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        syscall!(getsockopt(
            a.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len
        ))
        .unwrap();
        assert_eq!(v, 1);
    }

    fn linger_of(fd: RawFd) -> (libc::c_int, libc::c_int) {
        let mut v = libc::linger {
            l_onoff: -1,
            l_linger: -1,
        };
        let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
        syscall!(getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len
        ))
        .unwrap();
        (v.l_onoff, v.l_linger)
    }

    #[test]
    fn accepted_sockets_inherit_linger_zero_from_the_listener() {
        // CONN-8 relies on this: every client socket is armed from birth
        // without a setsockopt per client. Needs CAP_NET_ADMIN, like the
        // test above.
        let l = transparent_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert_eq!(linger_of(a.as_raw_fd()), (1, 0));
        // And it does what it is there for: a plain close resets the peer.
        drop(a);
        let mut buf = [0u8; 1];
        let e = c.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn upstream_sockets_are_born_with_linger_zero() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = connect_upstream(
            l.local_addr().unwrap(),
            UpstreamOpts::default(),
            Source::Host,
        )
        .unwrap();
        assert_eq!(linger_of(s.as_raw_fd()), (1, 0));
    }

    /// Fill `w`'s send queue towards a peer that does not read, shut it down
    /// for writing, close it, then read everything the peer gets: (bytes
    /// written, bytes received, how the stream ended).
    fn shut_then_close(clear: bool) -> (usize, usize, io::Result<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut r = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut w, _) = l.accept().unwrap();
        // A window smaller than loopback's 64 KiB MSS would make the reader wait
        // for zero-window probes: keep it above that, and bounded.
        setsockopt(
            r.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            262144 as libc::c_int,
        )
        .unwrap();
        set_linger_zero(w.as_raw_fd()).unwrap();
        w.set_nonblocking(true).unwrap();
        let chunk = [7u8; 16384];
        let mut written = 0;
        loop {
            match w.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        if clear {
            set_linger_off(w.as_raw_fd()).unwrap();
        }
        drop(w);
        r.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        let end = loop {
            match r.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) => break Err(e),
            }
        };
        (written, got, end)
    }

    #[test]
    fn linger_zero_drops_what_a_shut_socket_still_holds_and_clearing_it_delivers_it() {
        // Why Conn::close clears the linger before a graceful close: with it
        // armed, even a socket already shut down for writing loses its
        // unsent tail and the FIN, and the peer is reset.
        let (written, got, end) = shut_then_close(false);
        assert!(got < written, "{got} of {written} bytes arrived");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        // Cleared, the close lets the kernel deliver everything, then the FIN.
        let (written, got, end) = shut_then_close(true);
        assert_eq!((got, end.is_ok()), (written, true));
    }

    #[test]
    fn accept_queue_counts_clients_waiting_to_be_accepted() {
        // transparent_listener asks for LISTEN_BACKLOG, so the capacity is
        // that capped by this namespace's somaxconn. Needs CAP_NET_ADMIN,
        // like the whole test suite.
        let l = transparent_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let q = accept_queue(&l).unwrap();
        assert_eq!(
            q,
            AcceptQueue {
                len: 0,
                max: somaxconn.min(LISTEN_BACKLOG as u32)
            }
        );
        let addr = l.local_addr().unwrap();
        let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // The listener's side of a handshake completes when the client's
        // last ACK is processed, which on loopback may trail connect(2).
        let len_becomes = |want: u32| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let len = accept_queue(&l).unwrap().len;
                if len == want || std::time::Instant::now() > deadline {
                    return len;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        assert_eq!(len_becomes(3), 3);
        let (first, _) = l.accept().unwrap();
        assert_eq!(len_becomes(2), 2, "an accepted client leaves the queue");
        drop(clients);
        // A connected socket is not a listener.
        let e = accept_queue(&first).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn connect_upstream_reaches_a_loopback_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = connect_upstream(
            l.local_addr().unwrap(),
            UpstreamOpts { mark: Some(7) },
            Source::Host,
        )
        .unwrap();
        let (_peer, from) = l.accept().unwrap();
        assert_eq!(from, s.local_addr().unwrap());
    }

    #[test]
    fn bind_address_no_port_leaves_the_port_to_connect_in_both_families() {
        // --source relies on it: bound to an address, the socket has no port
        // until connect picks one by the whole 4-tuple. SOL_IP's option on
        // an AF_INET6 socket, too.
        for (src, listen) in [("127.0.0.2", "127.0.0.1:0"), ("::1", "[::1]:0")] {
            let src: IpAddr = src.parse().unwrap();
            let l = TcpListener::bind(listen).unwrap();
            let dst = l.local_addr().unwrap();
            let fd = socket(domain(&dst), libc::SOCK_STREAM).unwrap();
            setsockopt(
                fd.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                1 as libc::c_int,
            )
            .unwrap();
            bind(fd.as_raw_fd(), &SocketAddr::new(src, 0)).unwrap();
            let s = TcpStream::from(fd);
            assert_eq!(s.local_addr().unwrap(), SocketAddr::new(src, 0), "{src}");
            let s = connect_upstream(dst, UpstreamOpts::default(), Source::Local(src)).unwrap();
            let (_peer, from) = l.accept().unwrap();
            assert_eq!(from.ip(), src);
            assert_ne!(from.port(), 0);
            assert_eq!(from, s.local_addr().unwrap());
        }
    }
}
