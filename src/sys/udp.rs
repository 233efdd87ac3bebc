//! The UDP sockets: transparent listeners, the NAT's upstream and reply
//! sockets, and the ICMP errors of the socket error queue. Receiving and
//! sending in batches (recvmmsg, sendmmsg with GRO and GSO) is mmsg.rs.
//!
//! What must stay true: SYS-1..3 of the parent module.

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use super::mmsg::cmsg_value;
use super::{
    ListenError, bind, bind_listener, domain, set_transparent, setsockopt, sockaddr_from,
    sockaddr_to, socket, transparent_socket,
};

/// The largest UDP payload: 65,535 minus the 8-byte UDP header (IPv6 without
/// jumbograms; IPv4's is 20 bytes smaller still).
pub const MAX_DATAGRAM: usize = 65_527;
/// Receive buffer for a UDP listener: every client's datagrams queue here
/// while the worker is busy. Small datagrams cost ~1 KiB of buffer each
/// (skb overhead), so 4 MiB rides out a few milliseconds of a 1 Mpps flood
/// where the 208 KiB default drops after ~0.2 ms.
pub const UDP_LISTENER_RCVBUF: libc::c_int = 4 << 20;

/// From <linux/udp.h>; the libc crate has them only for uclibc.
pub(super) const UDP_SEGMENT: libc::c_int = 103;
pub(super) const UDP_GRO: libc::c_int = 104;

fn set_flag(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    setsockopt(fd, level, name, 1 as libc::c_int)
}

/// UDP_GRO: the kernel may hand this socket several datagrams of one flow
/// merged into one buffer, with their segment size in a control message.
pub(super) fn set_gro(fd: RawFd) -> io::Result<()> {
    set_flag(fd, libc::SOL_UDP, UDP_GRO)
}

/// IP_RECVERR / IPV6_RECVERR: ICMP errors for datagrams this socket sent
/// queue on its error queue with the destination they concern, also when
/// the socket is not connected (without it the kernel drops them).
fn set_recverr(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        set_flag(fd, libc::SOL_IPV6, libc::IPV6_RECVERR)
    } else {
        set_flag(fd, libc::SOL_IP, libc::IP_RECVERR)
    }
}

/// A transparent UDP socket on `addr` that reports each datagram's original
/// destination (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR) and incoming
/// interface (IP_PKTINFO / IPV6_RECVPKTINFO), and takes GRO-merged buffers.
pub fn transparent_udp_listener(addr: SocketAddr) -> Result<std::net::UdpSocket, ListenError> {
    let v6 = addr.is_ipv6();
    let fd = transparent_socket(&addr, libc::SOCK_DGRAM)?;
    let raw = fd.as_raw_fd();
    let r = if v6 {
        set_flag(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
            .and_then(|()| set_flag(raw, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR))
            .and_then(|()| set_flag(raw, libc::SOL_IPV6, libc::IPV6_RECVPKTINFO))
    } else {
        set_flag(raw, libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
            .and_then(|()| set_flag(raw, libc::SOL_IP, libc::IP_PKTINFO))
    };
    r.map_err(|e| ListenError::Other("IP_RECVORIGDSTADDR", e))?;
    set_flag(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .and_then(|()| set_flag(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT))
        .map_err(|e| ListenError::Other("SO_REUSEPORT", e))?;
    set_gro(raw).map_err(|e| ListenError::Other("UDP_GRO", e))?;
    // SO_RCVBUFFORCE may exceed net.core.rmem_max (it needs CAP_NET_ADMIN,
    // which this socket already proved it has); SO_RCVBUF is capped by it.
    setsockopt(
        raw,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        UDP_LISTENER_RCVBUF,
    )
    .or_else(|_| setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, UDP_LISTENER_RCVBUF))
    .map_err(|e| ListenError::Other("SO_RCVBUF", e))?;
    bind_listener(raw, &addr)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// How to make a NAT mapping's upstream socket.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamUdp {
    /// SO_MARK, so host rules can tell the proxy's traffic.
    pub mark: Option<u32>,
    /// Send from this address and port, which need not be this host's
    /// (`--spoof-source`: the client's own): transparent, SO_REUSEADDR
    /// because the symmetric mode binds it once per destination.
    pub source: Option<SocketAddr>,
    /// Connect to this destination (one mapping per destination: the
    /// kernel then filters what comes back and reports ICMP errors on the
    /// socket itself). `None`: unconnected, one socket for every
    /// destination, with IP_RECVERR for the errors.
    pub connect: Option<SocketAddr>,
}

/// A mapping's upstream socket for destinations of `dst`'s family, and its
/// local address (bound now, so it is known before the first datagram
/// goes out).
pub fn udp_upstream(
    dst: SocketAddr,
    spec: UpstreamUdp,
) -> io::Result<(std::net::UdpSocket, SocketAddr)> {
    let v6 = dst.is_ipv6();
    let fd = socket(domain(&dst), libc::SOCK_DGRAM)?;
    let raw = fd.as_raw_fd();
    if let Some(mark) = spec.mark {
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    }
    if v6 {
        set_flag(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
    }
    match spec.source {
        Some(src) => {
            set_transparent(raw, v6)?;
            set_flag(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
            bind(raw, &src)?;
        }
        None => {
            let any = if v6 {
                SocketAddr::from(([0u16; 8], 0))
            } else {
                SocketAddr::from(([0u8; 4], 0))
            };
            bind(raw, &any)?;
        }
    }
    // GRO merges the server's datagrams of one flow; harmless where the
    // device does no GRO.
    set_gro(raw)?;
    match spec.connect {
        Some(d) => {
            let (storage, len) = sockaddr_from(&d);
            syscall!(connect(
                raw,
                &storage as *const _ as *const libc::sockaddr,
                len
            ))?;
        }
        None => set_recverr(raw, v6)?,
    }
    let sock = std::net::UdpSocket::from(fd);
    let local = sock.local_addr()?;
    Ok((sock, local))
}

/// A UDP socket bound (transparently) to `src`, a foreign address: replies
/// sent through it reach the client from the original destination.
/// SO_REUSEADDR so a second tproxyd during a restart, or another UDP
/// worker, can bind it too. It is only ever sent on: a drop-all socket
/// filter keeps anything the host might deliver to it (a stray rule, a
/// local sender) from queueing there unread. UDP_GRO because the kernel's
/// GRO looks sockets up by the datagram's destination, finds this one for
/// the client's datagrams to `src`, and merges them only if it has GRO on
/// (they then still go to the listener, whole).
pub fn udp_reply_socket(src: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let fd = socket(domain(&src), libc::SOCK_DGRAM)?;
    let raw = fd.as_raw_fd();
    set_transparent(raw, src.is_ipv6())?;
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `drop_all` outlives it.
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, prog)?;
    set_flag(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    if src.is_ipv6() {
        set_flag(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
    }
    set_gro(raw)?;
    bind(raw, &src)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// The index of the loopback interface, for telling datagrams that came
/// back through this host itself (a routing loop) from clients'.
pub fn loopback_ifindex() -> Option<u32> {
    // SAFETY: a NUL-terminated string literal; if_nametoindex only reads it.
    let i = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    (i != 0).then_some(i)
}

/// An ICMP error (or a local one) about a datagram this socket sent, from
/// its error queue (IP_RECVERR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendError {
    /// The destination of the datagram that failed.
    pub dst: Option<SocketAddr>,
    pub errno: i32,
    /// The error came from the network (ICMP or ICMPv6), not this host.
    pub icmp: bool,
    /// Who sent the ICMP error.
    pub offender: Option<IpAddr>,
}

/// The next error on `fd`'s error queue; `Ok(None)` when it is empty.
pub fn recv_error(fd: RawFd) -> io::Result<Option<SendError>> {
    // SAFETY: sockaddr_storage is plain old data; all-zeroes is a valid
    // value.
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut ctrl = [0u64; 32];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: byte.len(),
    };
    // SAFETY: all-zeroes is a valid msghdr (null pointers, zero lengths);
    // the fields recvmsg reads are set below.
    let mut mh: libc::msghdr = unsafe { mem::zeroed() };
    mh.msg_name = &mut name as *mut _ as *mut libc::c_void;
    mh.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
    mh.msg_controllen = mem::size_of_val(&ctrl);
    match syscall!(recvmsg(
        fd,
        &mut mh,
        libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT
    )) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    }
    let dst = (mh.msg_namelen > 0)
        .then(|| sockaddr_to(&name).ok())
        .flatten();
    let mut out = SendError {
        dst,
        errno: 0,
        icmp: false,
        offender: None,
    };
    // SAFETY: as in `Cmsgs::of`: the walk stays inside our control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&mh) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg points inside our control buffer.
        let c = unsafe { &*cmsg };
        let ours = matches!(
            (c.cmsg_level, c.cmsg_type),
            (libc::SOL_IP, libc::IP_RECVERR) | (libc::SOL_IPV6, libc::IPV6_RECVERR)
        );
        if ours && let Some(ee) = cmsg_value::<libc::sock_extended_err>(c) {
            out.errno = ee.ee_errno as i32;
            out.icmp = matches!(
                ee.ee_origin,
                libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
            );
            out.offender = offender(c);
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&mh, cmsg) };
    }
    Ok(Some(out))
}

/// SO_EE_OFFENDER: the address that follows the extended error in its
/// control message, if the message is long enough to hold one.
fn offender(c: &libc::cmsghdr) -> Option<IpAddr> {
    let ee = mem::size_of::<libc::sock_extended_err>();
    // SAFETY: CMSG_LEN is a pure computation.
    let base = unsafe { libc::CMSG_LEN(ee as libc::c_uint) } as usize;
    let family_room = base + mem::size_of::<libc::sa_family_t>();
    if c.cmsg_len < family_room {
        return None;
    }
    // SAFETY: the family field lies inside the message (checked above).
    let family: libc::sa_family_t =
        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).add(ee) as *const libc::sa_family_t) };
    let size = match family as libc::c_int {
        libc::AF_INET => mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => mem::size_of::<libc::sockaddr_in6>(),
        _ => return None,
    };
    if c.cmsg_len < base + size {
        return None;
    }
    // SAFETY: sockaddr_storage is plain old data; all-zeroes is a valid
    // value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    // SAFETY: `size` bytes of address lie inside the message (checked), and
    // storage is at least that large.
    unsafe {
        std::ptr::copy_nonoverlapping(
            libc::CMSG_DATA(c).add(ee),
            &mut storage as *mut _ as *mut u8,
            size,
        );
    }
    sockaddr_to(&storage).ok().map(|a| a.ip())
}

/// Errors a datagram's destination answers with: ICMP unreachable on a
/// connected socket, or the same learnt from the error queue.
pub fn is_unreachable_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN
    )
}

/// Errors a GSO send can fail with where a plain one would not: the route
/// or device cannot segment (EIO: no checksum offload; EINVAL: a segment
/// larger than the path MTU; ENOPROTOOPT: no UDP_SEGMENT).
pub fn is_gso_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn udp_reply_socket_sends_but_never_queues_what_it_is_sent() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let reply = udp_reply_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let reply_addr = reply.local_addr().unwrap();
        reply
            .send_to(b"answer", peer.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 16];
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"answer"[..], reply_addr));
        peer.send_to(b"stray", reply_addr).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        reply.set_nonblocking(true).unwrap();
        let e = reply.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "the filter dropped it");
    }

    #[test]
    fn unconnected_socket_learns_which_destination_was_unreachable() {
        // A port nobody listens on answers with ICMP port unreachable.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = closed.local_addr().unwrap();
        drop(closed);
        let (s, local) = udp_upstream(
            dst,
            UpstreamUdp {
                mark: None,
                source: None,
                connect: None,
            },
        )
        .unwrap();
        assert_eq!(local.ip(), IpAddr::from([0u8; 4]));
        assert_ne!(local.port(), 0, "bound at once");
        s.send_to(b"x", dst).unwrap();
        let mut got = None;
        for _ in 0..100 {
            if let Some(e) = recv_error(s.as_raw_fd()).unwrap() {
                got = Some(e);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = got.expect("an error on the queue");
        assert_eq!(e.dst, Some(dst));
        assert_eq!(e.errno, libc::ECONNREFUSED);
        assert!(e.icmp);
        assert_eq!(recv_error(s.as_raw_fd()).unwrap(), None);
    }
}
