//! The UDP system calls: transparent listeners, the NAT's upstream and reply
//! sockets, recvmmsg with the control messages the proxy needs (original
//! destination, incoming interface, GRO segment size), sendmmsg with
//! UDP_SEGMENT (GSO), and the ICMP errors of the socket error queue.
//!
//! What must stay true (with SYS-1..3 of the parent module):
//! - UDPSYS-1: a received buffer is handed out with the segment size the
//!   kernel's GRO merged it by (`Datagram::segment`), so the caller can cut
//!   it back into the datagrams the sender sent, byte-exact; without GRO the
//!   segment size is the buffer's length.
//! - UDPSYS-2: a message sent with a segment size carries only datagrams of
//!   exactly that size but for the last, which may be shorter, at most
//!   `MAX_SEGMENTS` of them and at most `MAX_GSO_BYTES` in all, so the
//!   kernel cuts it into the same datagrams (`send_msgs` checks it and sends
//!   nothing rather than something else).

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use super::{
    ListenError, bind, bind_listener, domain, set_transparent, setsockopt, sockaddr_from,
    sockaddr_to, socket, transparent_socket,
};

/// The largest UDP payload: 65,535 minus the 8-byte UDP header (IPv6 without
/// jumbograms; IPv4's is 20 bytes smaller still).
pub const MAX_DATAGRAM: usize = 65_527;
/// Messages taken or sent per recvmmsg/sendmmsg call. With GRO one message
/// may hold up to 64 datagrams.
pub const BATCH: usize = 32;
/// The most datagrams one GSO send may carry: UDP_MAX_SEGMENTS of kernels
/// before 6.9 (later ones allow 128), and what GRO merges at most.
pub const MAX_SEGMENTS: usize = 64;
/// The most payload one GSO send may carry: the IPv4 limit for a UDP
/// payload (65,535 less the IP and UDP headers), which IPv6 also allows.
pub const MAX_GSO_BYTES: usize = 65_507;
/// Receive buffer for a UDP listener: every client's datagrams queue here
/// while the worker is busy. Small datagrams cost ~1 KiB of buffer each
/// (skb overhead), so 4 MiB rides out a few milliseconds of a 1 Mpps flood
/// where the 208 KiB default drops after ~0.2 ms.
pub const UDP_LISTENER_RCVBUF: libc::c_int = 4 << 20;
/// Room for the control messages of one datagram (original destination,
/// incoming interface, GRO segment size; IPv6 sizes), as u64s so the buffer
/// is aligned for `cmsghdr`.
const CMSG_WORDS: usize = 24;

/// From <linux/udp.h>; the libc crate has them only for uclibc.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// `struct in6_pktinfo` from <linux/ipv6.h>; not in the libc crate for
/// glibc Linux.
#[repr(C)]
#[derive(Clone, Copy)]
struct In6Pktinfo {
    addr: [u8; 16],
    ifindex: libc::c_int,
}

fn set_flag(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    setsockopt(fd, level, name, 1 as libc::c_int)
}

/// UDP_GRO: the kernel may hand this socket several datagrams of one flow
/// merged into one buffer, with their segment size in a control message.
fn set_gro(fd: RawFd) -> io::Result<()> {
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

/// One received buffer: a datagram, or with GRO several of one flow.
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub from: Option<SocketAddr>,
    /// From the IP_ORIGDSTADDR control message; `None` when it was missing
    /// or malformed.
    pub orig_dst: Option<SocketAddr>,
    /// The interface it came in on (IP_PKTINFO), where asked for.
    pub ifindex: Option<u32>,
    /// The size of each datagram in `data` but the last, which may be
    /// shorter (UDPSYS-1). At least 1.
    pub segment: usize,
    /// The datagram was larger than the buffer (cannot happen below
    /// MAX_DATAGRAM; counted and dropped if it does).
    pub truncated: bool,
}

impl Datagram<'_> {
    /// How many datagrams the buffer holds (an empty datagram is one).
    pub fn count(&self) -> usize {
        self.data.len().div_ceil(self.segment).max(1)
    }
}

/// Reusable buffers for recvmmsg(2): `BATCH` buffers of up to
/// `MAX_DATAGRAM` bytes (a GRO-merged buffer never exceeds it) with their
/// source and control messages.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; CMSG_WORDS]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into this
// batch's own heap buffers (which do not move when the batch does), and
// `recv` rewrites every one of them before each use. Nothing is shared.
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        // SAFETY: sockaddr_storage is plain old data; all-zeroes is a valid
        // value.
        let zero_name: libc::sockaddr_storage = unsafe { mem::zeroed() };
        // SAFETY: all-zeroes is a valid mmsghdr (null pointers, zero
        // lengths); the pointers are set before each use.
        let zero_hdr: libc::mmsghdr = unsafe { mem::zeroed() };
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; MAX_DATAGRAM + 1].into_boxed_slice())
                .collect(),
            names: vec![zero_name; BATCH],
            ctrl: vec![[0u64; CMSG_WORDS]; BATCH],
            iovs: (0..BATCH)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            hdrs: vec![zero_hdr; BATCH],
            len: 0,
        }
    }

    /// Take up to `BATCH` buffers without blocking. `WouldBlock` when none.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr() as *mut libc::c_void,
                iov_len: self.bufs[i].len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = &mut self.names[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = mem::size_of::<[u64; CMSG_WORDS]>();
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        self.len = 0;
        let n = syscall!(recvmmsg(
            fd,
            self.hdrs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        ))? as usize;
        self.len = n;
        Ok(n)
    }

    /// Buffer `i` of the last `recv`.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(MAX_DATAGRAM);
        let from = (h.msg_hdr.msg_namelen > 0)
            .then(|| sockaddr_to(&self.names[i]).ok())
            .flatten();
        let c = Cmsgs::of(&h.msg_hdr);
        Datagram {
            data: &self.bufs[i][..len],
            from,
            orig_dst: c.orig_dst,
            ifindex: c.ifindex,
            segment: c
                .segment
                .filter(|&s| s > 0 && s < len)
                .unwrap_or(len.max(1)),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0
                || h.msg_len as usize > MAX_DATAGRAM,
        }
    }
}

/// What the control messages of one received datagram said.
#[derive(Default)]
struct Cmsgs {
    orig_dst: Option<SocketAddr>,
    ifindex: Option<u32>,
    segment: Option<usize>,
}

impl Cmsgs {
    fn of(msg: &libc::msghdr) -> Cmsgs {
        let mut out = Cmsgs::default();
        // SAFETY: msg was filled in by recvmmsg; CMSG_FIRSTHDR/NXTHDR only
        // walk within msg_control..msg_control+msg_controllen, which we own.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
        while !cmsg.is_null() {
            // SAFETY: non-null cmsg points inside our control buffer (above).
            let c = unsafe { &*cmsg };
            match (c.cmsg_level, c.cmsg_type) {
                (libc::SOL_IP, libc::IP_ORIGDSTADDR) => {
                    out.orig_dst = cmsg_addr(c, mem::size_of::<libc::sockaddr_in>());
                }
                (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    out.orig_dst = cmsg_addr(c, mem::size_of::<libc::sockaddr_in6>());
                }
                (libc::SOL_IP, libc::IP_PKTINFO) => {
                    out.ifindex = cmsg_value::<libc::in_pktinfo>(c).map(|p| p.ipi_ifindex as u32);
                }
                (libc::SOL_IPV6, libc::IPV6_PKTINFO) => {
                    out.ifindex = cmsg_value::<In6Pktinfo>(c).map(|p| p.ifindex as u32);
                }
                (libc::SOL_UDP, UDP_GRO) => {
                    out.segment = cmsg_value::<libc::c_int>(c).map(|s| s.max(0) as usize);
                }
                _ => {}
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
        }
        out
    }
}

/// The `T` a control message carries, if it is long enough to hold one.
fn cmsg_value<T: Copy>(c: &libc::cmsghdr) -> Option<T> {
    // SAFETY: CMSG_LEN is a pure computation.
    let expected = unsafe { libc::CMSG_LEN(mem::size_of::<T>() as libc::c_uint) } as usize;
    if c.cmsg_len < expected {
        return None;
    }
    // SAFETY: the length check above proved that `size_of::<T>()` bytes of
    // data follow the header, inside the control buffer; read_unaligned
    // because cmsg data is only aligned for the header, and every T used
    // here is plain old data, valid for any bytes.
    Some(unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const T) })
}

/// A socket address of `size` bytes carried by a control message.
fn cmsg_addr(c: &libc::cmsghdr, size: usize) -> Option<SocketAddr> {
    // SAFETY: CMSG_LEN is a pure computation.
    let expected = unsafe { libc::CMSG_LEN(size as libc::c_uint) } as usize;
    if c.cmsg_len < expected || size > mem::size_of::<libc::sockaddr_storage>() {
        return None;
    }
    // SAFETY: sockaddr_storage is plain old data; all-zeroes is a valid
    // value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    // SAFETY: we copy `size` bytes that the length check above proved are
    // inside the message, into storage at least that large.
    unsafe {
        std::ptr::copy_nonoverlapping(libc::CMSG_DATA(c), &mut storage as *mut _ as *mut u8, size);
    }
    sockaddr_to(&storage).ok()
}

/// One message for [`send_msgs`]: the buffers `parts` (indices into the
/// caller's slice of buffers) sent as one, cut into datagrams of `segment`
/// bytes when it is `Some` (GSO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMsg {
    pub parts: Range<usize>,
    pub segment: Option<u16>,
}

/// Room for one UDP_SEGMENT control message, aligned for `cmsghdr`.
const SEG_CMSG_WORDS: usize = 4;

/// Send `msgs` (at most `BATCH`; the `parts` of all of them at most
/// `BATCH` buffers), all to `to` (or the connected peer), with one
/// sendmmsg(2). Returns how many messages went; `WouldBlock` when none
/// could. A message that breaks UDPSYS-2 is refused with `InvalidInput`
/// before anything is sent. Only what the call uses is initialised: it runs
/// once per run of datagrams, up to once per datagram.
pub fn send_msgs(
    fd: RawFd,
    to: Option<SocketAddr>,
    msgs: &[OutMsg],
    bufs: &[&[u8]],
) -> io::Result<usize> {
    let n = msgs.len().min(BATCH);
    let mut iovs = [MaybeUninit::<libc::iovec>::uninit(); BATCH];
    let mut hdrs = [MaybeUninit::<libc::mmsghdr>::uninit(); BATCH];
    let mut ctrl = [MaybeUninit::<[u64; SEG_CMSG_WORDS]>::uninit(); BATCH];
    let mut name = to.map(|a| sockaddr_from(&a));
    let (name_ptr, name_len) = match &mut name {
        Some((s, l)) => (s as *mut _ as *mut libc::c_void, *l),
        None => (std::ptr::null_mut(), 0),
    };
    let mut next_iov = 0;
    for (i, m) in msgs.iter().take(n).enumerate() {
        let parts = bufs.get(m.parts.clone()).ok_or_else(invalid)?;
        if next_iov + parts.len() > BATCH || !gso_shape_ok(parts, m.segment) {
            return Err(invalid());
        }
        let first = next_iov;
        for p in parts {
            iovs[next_iov].write(libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            });
            next_iov += 1;
        }
        // SAFETY: all-zeroes is a valid mmsghdr (null pointers, zero lengths).
        let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
        h.msg_hdr.msg_name = name_ptr;
        h.msg_hdr.msg_namelen = name_len;
        h.msg_hdr.msg_iov = iovs[first].as_mut_ptr();
        h.msg_hdr.msg_iovlen = parts.len();
        if let Some(seg) = m.segment {
            let buf = ctrl[i].write([0u64; SEG_CMSG_WORDS]);
            let space = write_segment_cmsg(buf, seg);
            h.msg_hdr.msg_control = buf.as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = space;
        }
        hdrs[i].write(h);
    }
    // SAFETY: entries 0..n of `hdrs` were written above, and each points
    // only at iovecs, a name and a control buffer written above, which live
    // until the call returns; the kernel reads no entry past n.
    syscall!(sendmmsg(
        fd,
        hdrs.as_mut_ptr() as *mut libc::mmsghdr,
        n as libc::c_uint,
        libc::MSG_DONTWAIT
    ))
    .map(|k| k as usize)
}

fn invalid() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "malformed UDP send")
}

/// UDPSYS-2: with a segment size, every datagram but the last is exactly
/// that long, there are at most MAX_SEGMENTS, and the whole fits one send.
pub fn gso_shape_ok(parts: &[&[u8]], segment: Option<u16>) -> bool {
    let Some(seg) = segment else {
        return true;
    };
    let seg = seg as usize;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    // Every part but the last must end on a segment boundary of the whole.
    let mut at = 0;
    for (i, p) in parts.iter().enumerate() {
        at += p.len();
        if i + 1 < parts.len() && at % seg != 0 {
            return false;
        }
    }
    seg > 0 && total > 0 && total <= MAX_GSO_BYTES && total.div_ceil(seg) <= MAX_SEGMENTS
}

/// Write a UDP_SEGMENT control message into `buf`; returns its space.
fn write_segment_cmsg(buf: &mut [u64; SEG_CMSG_WORDS], seg: u16) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as libc::c_uint) } as usize;
    // SAFETY: CMSG_LEN is a pure computation.
    let len = unsafe { libc::CMSG_LEN(mem::size_of::<u16>() as libc::c_uint) } as usize;
    debug_assert!(space <= mem::size_of_val(buf));
    // SAFETY: an all-zeroes msghdr whose control buffer is `buf` (aligned
    // for cmsghdr, `space` bytes, checked above), so CMSG_FIRSTHDR returns
    // a header inside `buf`, and its data has room for the u16.
    unsafe {
        let mut mh: libc::msghdr = mem::zeroed();
        mh.msg_control = buf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = len;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
    }
    space
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

    fn loopback_pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (a, b)
    }

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
    fn gso_send_arrives_as_the_datagrams_it_was_cut_from() {
        let (a, b) = loopback_pair();
        let to = b.local_addr().unwrap();
        // Three parts: 2 datagrams of 100, 1 of 100, and a short last one.
        let (p0, p1, p2) = (vec![1u8; 200], vec![2u8; 100], vec![3u8; 42]);
        let bufs: [&[u8]; 3] = [&p0, &p1, &p2];
        let msgs = [OutMsg {
            parts: 0..3,
            segment: Some(100),
        }];
        assert_eq!(send_msgs(a.as_raw_fd(), Some(to), &msgs, &bufs).unwrap(), 1);
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        for _ in 0..4 {
            let (n, _) = b.recv_from(&mut buf).unwrap();
            got.push((n, buf[0]));
        }
        assert_eq!(got, vec![(100, 1), (100, 1), (100, 2), (42, 3)]);
    }

    #[test]
    fn gso_shape_is_checked_before_sending() {
        let (a, b) = loopback_pair();
        let to = b.local_addr().unwrap();
        let (p0, p1) = (vec![0u8; 150], vec![0u8; 100]);
        let bufs: [&[u8]; 2] = [&p0, &p1];
        // 150 is not a multiple of 100: the kernel would cut it differently.
        let msgs = [OutMsg {
            parts: 0..2,
            segment: Some(100),
        }];
        let e = send_msgs(a.as_raw_fd(), Some(to), &msgs, &bufs).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(gso_shape_ok(&bufs[1..], Some(100)));
        assert!(!gso_shape_ok(&[&[0u8; 65]], Some(1)), "over MAX_SEGMENTS");
        assert!(gso_shape_ok(&bufs, None));
    }

    #[test]
    fn gro_buffers_report_their_segment_size_and_plain_ones_their_length() {
        let l = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_gro(l.as_raw_fd()).unwrap();
        l.set_nonblocking(true).unwrap();
        let (a, _) = loopback_pair();
        a.send_to(&[7u8; 33], l.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut batch = RecvBatch::new();
        let n = batch.recv(l.as_raw_fd()).unwrap();
        assert!(n >= 1);
        let d = batch.get(0);
        assert_eq!((d.data.len(), d.segment, d.count()), (33, 33, 1));
        assert_eq!(d.from, Some(a.local_addr().unwrap()));
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
