//! UDP in batches: recvmmsg with the control messages the proxy needs
//! (original destination, incoming interface, GRO segment size), and
//! sendmmsg with UDP_SEGMENT (GSO).
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
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::RawFd;

use super::udp::{MAX_DATAGRAM, UDP_GRO, UDP_SEGMENT};
use super::{sockaddr_from, sockaddr_to};

/// Messages taken or sent per recvmmsg/sendmmsg call. With GRO one message
/// may hold up to 64 datagrams.
pub const BATCH: usize = 32;
/// The most datagrams one GSO send may carry: UDP_MAX_SEGMENTS of kernels
/// before 6.9 (later ones allow 128), and what GRO merges at most.
pub const MAX_SEGMENTS: usize = 64;
/// The most payload one GSO send may carry: the IPv4 limit for a UDP
/// payload (65,535 less the IP and UDP headers), which IPv6 also allows.
pub const MAX_GSO_BYTES: usize = 65_507;
/// Room for the control messages of one datagram (original destination,
/// incoming interface, GRO segment size; IPv6 sizes), as u64s so the buffer
/// is aligned for `cmsghdr`.
const CMSG_WORDS: usize = 24;

/// `struct in6_pktinfo` from <linux/ipv6.h>; not in the libc crate for
/// glibc Linux.
#[repr(C)]
#[derive(Clone, Copy)]
struct In6Pktinfo {
    addr: [u8; 16],
    ifindex: libc::c_int,
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
pub(super) fn cmsg_value<T: Copy>(c: &libc::cmsghdr) -> Option<T> {
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

#[cfg(test)]
mod tests {
    use super::super::udp::set_gro;
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn loopback_pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (a, b)
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
}
