//! Every system call tproxyd makes that std and mio do not wrap: transparent
//! sockets, the original destination, splice and pipes, marks, lingering
//! resets, resource limits, signal masks, actions and the signalfd.
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
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    // Accepted sockets inherit TCP_NODELAY and SO_LINGER from their
    // listener (the kernel clones the listener's socket for each client):
    // one setsockopt each here instead of one each per client. The linger
    // arms every client socket from birth (conn.rs CONN-8); on the listener
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
    // Armed from birth (conn.rs CONN-8): until the connection completes, any
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

mod udp;
pub use udp::*;

// ---------------------------------------------------------------- signals

/// A set of signal numbers, real-time ones included (nix's `Signal` has none
/// of those).
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    pub fn of(signals: &[libc::c_int]) -> io::Result<SignalSet> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        syscall!(sigemptyset(set.as_mut_ptr()))?;
        // SAFETY: sigemptyset succeeded, so it initialised the set.
        let mut set = unsafe { set.assume_init() };
        for &signo in signals {
            syscall!(sigaddset(&mut set, signo))?;
        }
        Ok(SignalSet(set))
    }
}

/// Block `set` in the calling thread, and so in every thread it starts
/// afterwards: those signals then wait for a [`SignalFd`] and never run a
/// handler or a default action.
pub fn block_signals(set: &SignalSet) -> io::Result<()> {
    // SAFETY: `set` is an initialised sigset_t; no old mask is asked for.
    // pthread_sigmask returns its error rather than setting errno.
    match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set.0, std::ptr::null_mut()) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// A non-blocking signalfd for a blocked set, to poll with mio.
pub struct SignalFd(OwnedFd);

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

pub fn signal_fd(set: &SignalSet) -> io::Result<SignalFd> {
    let fd = syscall!(signalfd(-1, &set.0, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC))?;
    // SAFETY: signalfd(2) just returned this descriptor and nothing else owns it.
    Ok(SignalFd(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One signal taken from a signalfd, and who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalInfo {
    pub signo: libc::c_int,
    /// The sender's pid and uid; 0 when the kernel raised it.
    pub pid: u32,
    pub uid: u32,
}

/// The next pending signal on `fd`; `Ok(None)` when there is none.
pub fn read_signal(fd: &SignalFd) -> io::Result<Option<SignalInfo>> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    let size = mem::size_of::<libc::signalfd_siginfo>();
    loop {
        match syscall!(read(
            fd.as_raw_fd(),
            info.as_mut_ptr() as *mut libc::c_void,
            size
        )) {
            Ok(n) if n as usize == size => {
                // SAFETY: the kernel filled in the whole struct.
                let info = unsafe { info.assume_init() };
                return Ok(Some(SignalInfo {
                    signo: info.ssi_signo as libc::c_int,
                    pid: info.ssi_pid,
                    uid: info.ssi_uid,
                }));
            }
            Ok(n) => return Err(io::Error::other(format!("signalfd: read {n} bytes"))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A signal's name for the log: `SIGHUP`, `SIGRTMIN+3`, `SIGRTMAX`.
pub fn signal_name(signo: libc::c_int) -> String {
    if let Ok(s) = nix::sys::signal::Signal::try_from(signo) {
        return s.as_str().to_string();
    }
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    match signo {
        s if s == min => "SIGRTMIN".to_string(),
        s if s == max => "SIGRTMAX".to_string(),
        s if min < s && s < max => format!("SIGRTMIN+{}", s - min),
        s => format!("signal {s}"),
    }
}

/// Give `signals` their default action. Rust's runtime catches SIGSEGV and
/// SIGBUS to report stack overflows; for anything else its handler only
/// puts the default back and returns, so a SIGSEGV sent with kill(2) does
/// nothing the first time.
pub fn default_action(signals: &[libc::c_int]) -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    for &signo in signals {
        let sig = nix::sys::signal::Signal::try_from(signo).map_err(io::Error::from)?;
        let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: SIG_DFL runs no code of ours, and nothing in tproxyd relies
        // on the handler it replaces.
        unsafe { sigaction(sig, &dfl) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// The kernel's first real-time signal. glibc keeps the numbers from here up
/// to its SIGRTMIN() for itself (SIGCANCEL, SIGSETXID).
const KERNEL_SIGRTMIN: libc::c_int = 32;

/// The kernel's `struct sigaction` on x86_64 and arm64 (not glibc's): the
/// raw rt_sigaction(2) takes it.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Ignore the real-time signals glibc keeps for itself that have no
/// handler: their default action ends the process, and glibc will neither
/// block them nor set their action (it answers EINVAL), so the raw system
/// call does it. tproxyd never uses them: 32, SIGCANCEL, serves only
/// pthread_cancel. One with a handler is left alone (glibc's own for 33,
/// SIGSETXID, ignores a signal it did not send itself). Returns the
/// signals it set to ignored.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn ignore_reserved_signals() -> io::Result<Vec<libc::c_int>> {
    let size_of_mask = mem::size_of::<u64>();
    let mut ignored = Vec::new();
    for signo in KERNEL_SIGRTMIN..libc::SIGRTMIN() {
        let mut old = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // A null new action only reads the current one into `old`, which is
        // the kernel's struct, with the kernel's mask size.
        syscall!(syscall(
            libc::SYS_rt_sigaction,
            signo as libc::c_long,
            std::ptr::null::<KernelSigaction>(),
            &mut old as *mut KernelSigaction,
            size_of_mask
        ))?;
        if old.handler != libc::SIG_DFL {
            continue;
        }
        let ignore = KernelSigaction {
            handler: libc::SIG_IGN,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SIG_IGN needs no restorer: no handler is ever entered.
        syscall!(syscall(
            libc::SYS_rt_sigaction,
            signo as libc::c_long,
            &ignore as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            size_of_mask
        ))?;
        ignored.push(signo);
    }
    Ok(ignored)
}

/// Elsewhere the kernel's struct differs; those signals keep their action.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn ignore_reserved_signals() -> io::Result<Vec<libc::c_int>> {
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn signals_are_named_for_the_log() {
        let min = libc::SIGRTMIN();
        assert_eq!(signal_name(libc::SIGHUP), "SIGHUP");
        assert_eq!(signal_name(min), "SIGRTMIN");
        assert_eq!(signal_name(min + 3), "SIGRTMIN+3");
        assert_eq!(signal_name(libc::SIGRTMAX()), "SIGRTMAX");
        assert_eq!(signal_name(32), "signal 32");
    }

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
