//! Every system call tproxyd makes that std and mio do not wrap: transparent
//! sockets, the original destination, splice and pipes, marks, lingering
//! resets, resource limits and signal masks.
//!
//! What must stay true:
//! - SYS-1: all `unsafe` in the crate lives in this module, and each block
//!   says why it holds in a `// SAFETY:` comment.
//! - SYS-2: a descriptor returned from here is owned (`OwnedFd`, std or mio
//!   types); nothing hands out a bare `c_int` that somebody must remember to
//!   close.
//! - SYS-3: every call returns `io::Result`; errno is never dropped and never
//!   panics.

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Call a libc function, turning `-1` into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($fn:ident($($arg:expr),* $(,)?)) => {{
        // SAFETY: every caller passes pointers to live, correctly sized
        // buffers and descriptors it owns for the duration of the call.
        #[allow(unused_unsafe)]
        let res = unsafe { libc::$fn($($arg),*) };
        if res < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number 80 (linux/netfilter_ipv4.h,
/// linux/netfilter_ipv6/ip6_tables.h); libc does not export either.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The listen(2) backlog. The kernel caps it at net.core.somaxconn, so asking
/// for more than the default costs nothing and lets tune/ raise the ceiling.
pub const LISTEN_BACKLOG: libc::c_int = 65_535;

// ---------------------------------------------------------------- addresses

/// A `sockaddr_storage` holding `addr`, with its length.
fn sockaddr_from(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address in a `sockaddr_storage` the kernel filled in.
pub(crate) fn sockaddr_to(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected address family {f}"),
        )),
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is;
/// anything else unchanged. Addresses are compared and logged in this form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn domain(addr: &SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

// ---------------------------------------------------------------- sockets

fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    let fd = syscall!(socket(
        domain,
        ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0
    ))?;
    // SAFETY: socket(2) just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: T) -> io::Result<()> {
    syscall!(setsockopt(
        fd,
        level,
        name,
        &value as *const T as *const libc::c_void,
        mem::size_of::<T>() as libc::socklen_t,
    ))
    .map(drop)
}

fn bind(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr_from(addr);
    syscall!(bind(fd, &storage as *const _ as *const libc::sockaddr, len)).map(drop)
}

/// Why a transparent listener could not be made. Kept apart from a plain
/// `io::Error` so that main can tell the user which privilege is missing.
#[derive(Debug)]
pub enum ListenError {
    /// IP_TRANSPARENT / IPV6_TRANSPARENT was refused: CAP_NET_ADMIN is missing.
    NoCapability,
    /// The address family is not available on this host (IPv6 disabled).
    NoFamily(io::Error),
    Other(&'static str, io::Error),
}

/// Mark a socket transparent: it may accept connections addressed to any
/// destination and bind to addresses that are not the host's.
fn set_transparent(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1 as libc::c_int)
    } else {
        setsockopt(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1 as libc::c_int)
    }
}

/// A socket of type `ty` for `addr`'s family, marked transparent: the start
/// of every listener, with the errors main turns into exit statuses.
fn transparent_socket(addr: &SocketAddr, ty: libc::c_int) -> Result<OwnedFd, ListenError> {
    let fd = socket(domain(addr), ty).map_err(|e| match e.raw_os_error() {
        Some(libc::EAFNOSUPPORT) => ListenError::NoFamily(e),
        _ => ListenError::Other("socket", e),
    })?;
    set_transparent(fd.as_raw_fd(), addr.is_ipv6()).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => ListenError::NoCapability,
        _ => ListenError::Other("IP_TRANSPARENT", e),
    })?;
    Ok(fd)
}

/// Bind a listener, an unavailable IPv6 address counting as a missing family.
fn bind_listener(fd: RawFd, addr: &SocketAddr) -> Result<(), ListenError> {
    bind(fd, addr).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) if addr.is_ipv6() => ListenError::NoFamily(e),
        _ => ListenError::Other("bind", e),
    })
}

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
    // Accepted sockets inherit TCP_NODELAY from their listener: one
    // setsockopt here instead of one per client (see set_nodelay).
    set_nodelay(raw).map_err(|e| ListenError::Other("TCP_NODELAY", e))?;
    bind_listener(raw, &addr)?;
    syscall!(listen(raw, LISTEN_BACKLOG)).map_err(|e| ListenError::Other("listen", e))?;
    Ok(std::net::TcpListener::from(fd))
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

/// SO_LINGER {on, 0}: the next close(2) of this socket sends RST instead of
/// FIN, so the peer learns that what it sent was not (all) delivered.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        libc::linger {
            l_onoff: 1,
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

// ---------------------------------------------------------------- splice

/// One splice(2) call, non-blocking, moving pages rather than copying them.
/// `Ok(0)` from a socket means end of stream.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    syscall!(splice(
        from,
        std::ptr::null_mut(),
        to,
        std::ptr::null_mut(),
        len,
        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
    ))
    .map(|n| n as usize)
}

/// SIOCATMARK from <asm-generic/sockios.h>; the libc crate has it only for
/// BSDs.
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Is the next byte to read from this TCP socket its urgent mark? splice(2)
/// stops there and, when the FIN is in too, answers 0 as if at EOF.
pub fn at_urgent_mark(fd: RawFd) -> io::Result<bool> {
    let mut at: libc::c_int = 0;
    syscall!(ioctl(fd, SIOCATMARK as _, &mut at as *mut libc::c_int))?;
    Ok(at != 0)
}

/// Copy `buf` into a pipe with write(2); `Ok(n)` may be short when the pipe
/// has less room than `buf`.
pub fn write_pipe(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    syscall!(write(fd, buf.as_ptr() as *const libc::c_void, buf.len())).map(|n| n as usize)
}

/// A non-blocking pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    syscall!(pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC))?;
    // SAFETY: pipe2(2) just returned these two descriptors, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ask for a pipe capacity of `size` bytes and return what the kernel granted
/// (it rounds up to a power-of-two number of pages, and refuses sizes over
/// fs.pipe-max-size without CAP_SYS_RESOURCE).
pub fn set_pipe_size(fd: RawFd, size: usize) -> io::Result<usize> {
    syscall!(fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int))?;
    pipe_size(fd)
}

pub fn pipe_size(fd: RawFd) -> io::Result<usize> {
    syscall!(fcntl(fd, libc::F_GETPIPE_SZ)).map(|n| n as usize)
}

// ---------------------------------------------------------------- process

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so it filled the struct in.
    let mut lim = unsafe { lim.assume_init() };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    }
    Ok(lim.rlim_cur)
}

/// The hard RLIMIT_NOFILE: what the soft limit can be raised to.
pub fn nofile_hard_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so it filled the struct in.
    Ok(unsafe { lim.assume_init() }.rlim_max)
}

/// The current soft RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    syscall!(getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()))?;
    // SAFETY: getrlimit succeeded, so it filled the struct in.
    Ok(unsafe { lim.assume_init() }.rlim_cur)
}

/// Is errno one that says "the process or system ran out of descriptors or
/// memory": a reason to pause accepting, not to give up.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

// ---------------------------------------------------------------- UDP

/// The largest UDP payload: 65,535 minus the 8-byte UDP header (IPv6 without
/// jumbograms; IPv4's is 20 bytes smaller still).
pub const MAX_DATAGRAM: usize = 65_527;
/// Datagrams taken or sent per recvmmsg/sendmmsg call.
pub const BATCH: usize = 32;
/// Receive buffer for a UDP listener: every client's datagrams queue here
/// while the worker is busy. Small datagrams cost ~1 KiB of buffer each
/// (skb overhead), so 4 MiB rides out a few milliseconds of a 1 Mpps flood
/// where the 208 KiB default drops after ~0.2 ms.
pub const UDP_LISTENER_RCVBUF: libc::c_int = 4 << 20;
/// Room for one IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message, as u64s
/// so the buffer is aligned for `cmsghdr`.
const CMSG_WORDS: usize = 8;

/// A transparent UDP socket on `addr` that reports each datagram's original
/// destination (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR).
pub fn transparent_udp_listener(addr: SocketAddr) -> Result<std::net::UdpSocket, ListenError> {
    let v6 = addr.is_ipv6();
    let fd = transparent_socket(&addr, libc::SOCK_DGRAM)?;
    let raw = fd.as_raw_fd();
    let one: libc::c_int = 1;
    let r = if v6 {
        setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, one)
            .and_then(|()| setsockopt(raw, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, one))
    } else {
        setsockopt(raw, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, one)
    };
    r.map_err(|e| ListenError::Other("IP_RECVORIGDSTADDR", e))?;
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, one)
        .and_then(|()| setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, one))
        .map_err(|e| ListenError::Other("SO_REUSEPORT", e))?;
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

/// A UDP socket connected to `dst`, carrying the mark: one per session, so
/// the server sees one steady peer per client flow and ICMP errors for the
/// flow come back on it.
pub fn udp_upstream(dst: SocketAddr, opts: UpstreamOpts) -> io::Result<std::net::UdpSocket> {
    let fd = socket(domain(&dst), libc::SOCK_DGRAM)?;
    let raw = fd.as_raw_fd();
    if let Some(mark) = opts.mark {
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    }
    let (storage, len) = sockaddr_from(&dst);
    syscall!(connect(
        raw,
        &storage as *const _ as *const libc::sockaddr,
        len
    ))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// A UDP socket bound (transparently) to `src`, a foreign address: replies
/// sent through it reach the client from the original destination.
/// SO_REUSEADDR so a second tproxyd during a restart can bind it too. It is
/// only ever sent on: a drop-all socket filter keeps anything the host might
/// deliver to it (a stray rule, a local sender) from queueing there unread.
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
    setsockopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1 as libc::c_int)?;
    if src.is_ipv6() {
        setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1 as libc::c_int)?;
    }
    bind(raw, &src)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// One received datagram.
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub from: Option<SocketAddr>,
    /// From the IP_ORIGDSTADDR control message; `None` when it was missing
    /// or malformed.
    pub orig_dst: Option<SocketAddr>,
    /// The datagram was larger than the buffer (cannot happen below
    /// MAX_DATAGRAM; counted and dropped if it does).
    pub truncated: bool,
}

/// Reusable buffers for recvmmsg(2): `BATCH` datagrams of up to
/// `MAX_DATAGRAM` bytes with their source and original-destination.
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

impl RecvBatch {
    pub fn new() -> RecvBatch {
        // SAFETY: all-zeroes is a valid sockaddr_storage and mmsghdr (null
        // pointers, zero lengths); the pointers are set before each use.
        let zero_name: libc::sockaddr_storage = unsafe { mem::zeroed() };
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

    /// Take up to `BATCH` datagrams without blocking. `WouldBlock` when none.
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

    /// Datagram `i` of the last `recv`.
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(MAX_DATAGRAM);
        let from = (h.msg_hdr.msg_namelen > 0)
            .then(|| sockaddr_to(&self.names[i]).ok())
            .flatten();
        Datagram {
            data: &self.bufs[i][..len],
            from,
            orig_dst: orig_dst_from_cmsg(&h.msg_hdr),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0
                || h.msg_len as usize > MAX_DATAGRAM,
        }
    }
}

/// The IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message of a received
/// datagram, if there is a well-formed one.
fn orig_dst_from_cmsg(msg: &libc::msghdr) -> Option<SocketAddr> {
    // SAFETY: msg was filled in by recvmmsg; CMSG_FIRSTHDR/NXTHDR only walk
    // within msg_control..msg_control+msg_controllen, which we own.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg points inside our control buffer (above).
        let c = unsafe { &*cmsg };
        let want = match (c.cmsg_level, c.cmsg_type) {
            (libc::SOL_IP, libc::IP_ORIGDSTADDR) => Some(mem::size_of::<libc::sockaddr_in>()),
            (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => Some(mem::size_of::<libc::sockaddr_in6>()),
            _ => None,
        };
        if let Some(size) = want {
            // SAFETY: CMSG_LEN is a pure computation.
            let expected = unsafe { libc::CMSG_LEN(size as libc::c_uint) } as usize;
            if c.cmsg_len < expected {
                return None;
            }
            // SAFETY: all-zeroes is valid; we copy `size` bytes that the
            // length check above proved are inside the message.
            let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
            unsafe {
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    &mut storage as *mut _ as *mut u8,
                    size,
                );
            }
            return sockaddr_to(&storage).ok();
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// Send `bufs` (at most `BATCH`) with one sendmmsg(2), to `to` or, for a
/// connected socket, to its peer. Returns how many went; `WouldBlock` when
/// none could.
pub fn send_batch(fd: RawFd, to: Option<SocketAddr>, bufs: &[&[u8]]) -> io::Result<usize> {
    let n = bufs.len().min(BATCH);
    let (mut name, namelen) = match to {
        Some(a) => {
            let (s, l) = sockaddr_from(&a);
            (Some(s), l)
        }
        None => (None, 0),
    };
    let name_ptr = name
        .as_mut()
        .map_or(std::ptr::null_mut(), |s| s as *mut _ as *mut libc::c_void);
    let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: all-zeroes is a valid mmsghdr.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_ptr() as *mut libc::c_void,
            iov_len: bufs[i].len(),
        };
        hdrs[i].msg_hdr.msg_name = name_ptr;
        hdrs[i].msg_hdr.msg_namelen = namelen;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    syscall!(sendmmsg(
        fd,
        hdrs.as_mut_ptr(),
        n as libc::c_uint,
        libc::MSG_DONTWAIT
    ))
    .map(|k| k as usize)
}

// ---------------------------------------------------------------- signals

pub use nix::sys::signal::{SigSet, Signal};

/// Block `signals` in the calling thread (and so in every thread it spawns
/// afterwards); they are then taken one at a time with [`wait_signal`].
pub fn block_signals(signals: &[Signal]) -> io::Result<SigSet> {
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set.thread_block().map_err(io::Error::from)?;
    Ok(set)
}

pub use nix::sys::signalfd::SignalFd;

/// A non-blocking signalfd for the blocked `set`, to poll with mio.
pub fn signal_fd(set: &SigSet) -> io::Result<SignalFd> {
    use nix::sys::signalfd::SfdFlags;
    SignalFd::with_flags(set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(io::Error::from)
}

/// The next pending signal on `fd`; `Ok(None)` when there is none. A signal
/// number nix does not know is skipped.
pub fn read_signal(fd: &SignalFd) -> io::Result<Option<Signal>> {
    loop {
        match fd.read_signal().map_err(io::Error::from)? {
            None => return Ok(None),
            Some(info) => {
                if let Ok(s) = Signal::try_from(info.ssi_signo as i32) {
                    return Ok(Some(s));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn sockaddr_round_trips_both_families() {
        for s in [
            "198.18.0.1:8080",
            "[2001:2::1]:443",
            "[::ffff:198.18.0.9]:1",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            let (st, _) = sockaddr_from(&a);
            assert_eq!(sockaddr_to(&st).unwrap(), a);
        }
    }

    #[test]
    fn canonical_unmaps_v4_mapped_v6() {
        let a: SocketAddr = "[::ffff:198.18.0.9]:80".parse().unwrap();
        assert_eq!(canonical(a), "198.18.0.9:80".parse::<SocketAddr>().unwrap());
        let b: SocketAddr = "[2001:2::9]:80".parse().unwrap();
        assert_eq!(canonical(b), b);
    }

    #[test]
    fn loopback_is_local_and_benchmark_range_is_not() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local_address("198.18.255.254".parse().unwrap()).unwrap());
    }

    #[test]
    fn splice_moves_socket_bytes_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (mut c, d) = {
            let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
            (c, l2.accept().unwrap().0)
        };
        let (r, w) = pipe().unwrap();
        let cap = set_pipe_size(w.as_raw_fd(), 128 * 1024).unwrap();
        assert!(cap >= 128 * 1024);
        a.write_all(b"hello through a pipe").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let n = splice(b.as_raw_fd(), w.as_raw_fd(), cap).unwrap();
        assert_eq!(n, 20);
        assert_eq!(splice(r.as_raw_fd(), d.as_raw_fd(), n).unwrap(), 20);
        let mut buf = [0u8; 20];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello through a pipe");
        // An empty pipe read non-blocking is EAGAIN, not end of stream.
        let e = splice(r.as_raw_fd(), d.as_raw_fd(), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
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
    fn udp_reply_socket_sends_but_never_queues_what_it_is_sent() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let reply = udp_reply_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let reply_addr = reply.local_addr().unwrap();
        reply
            .send_to(b"answer", peer.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 16];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"answer"[..], reply_addr));
        peer.send_to(b"stray", reply_addr).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        reply.set_nonblocking(true).unwrap();
        let e = reply.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "the filter dropped it");
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
