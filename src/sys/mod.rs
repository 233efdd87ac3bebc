//! Every system call tproxyd makes that std and mio do not wrap, one room
//! per subject, as mio keeps `sys/unix`:
//! - this file: the `syscall!` macro, socket addresses, and the socket
//!   helpers the TCP and UDP rooms share (a socket, an option, a bind, a
//!   transparent listener's start and its [`ListenError`]);
//! - socket.rs: TCP listeners and their accept queue, the upstream connect,
//!   marks, linger, the original destination;
//! - splice.rs: splice and pipes;
//! - signal.rs: signal sets, the mask, the signalfd, signal actions;
//! - limits.rs: RLIMIT_NOFILE and running out of descriptors;
//! - udp.rs: UDP listeners, the NAT's sockets, the error queue;
//! - mmsg.rs: recvmmsg/sendmmsg with GRO and GSO.
//!
//! Every room's public items are re-exported here, so the crate says
//! `sys::splice`, never `sys::splice::splice`.
//!
//! What must stay true:
//! - SYS-1: all `unsafe` in the crate lives in this module and its rooms
//!   (the crate root denies `unsafe_code` everywhere else), and each block
//!   says why it holds in a `// SAFETY:` comment (clippy's
//!   `undocumented_unsafe_blocks` enforces that there is one).
//! - SYS-2: a descriptor returned from here is owned (`OwnedFd`, std or mio
//!   types); nothing hands out a bare `c_int` that somebody must remember to
//!   close.
//! - SYS-3: every call returns `io::Result`; errno is never dropped and never
//!   panics.

use std::io;
use std::mem;
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

mod limits;
mod mmsg;
mod signal;
mod socket;
mod splice;
mod udp;

pub use limits::*;
pub use mmsg::*;
pub use signal::*;
pub use socket::*;
pub use splice::*;
pub use udp::*;

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
/// `io::Error` so that the daemon can tell the user which privilege is missing.
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
/// of every listener, with the errors the daemon turns into exit statuses.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
