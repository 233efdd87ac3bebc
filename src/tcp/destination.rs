//! The original destination of an accepted connection: under TPROXY the
//! accepted socket's own name; under REDIRECT/DNAT what conntrack kept
//! (SO_ORIGINAL_DST). Pure: the two lookups are passed in, so every case is
//! unit-tested below without a socket.
//!
//! What must stay true:
//! - DST-1: tproxyd never connects to one of its own listening addresses: a
//!   connection whose destination is this host at the proxy port (dialled
//!   directly, or a loop) is refused, never forwarded.

use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::sys;

/// Where an accepted connection goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// Connect here.
    Forward(SocketAddr),
    /// The client dialled the proxy port itself (no TPROXY, no NAT).
    RefuseDirect,
    /// The original destination is the proxy itself: forwarding would loop.
    RefuseLoop,
}

/// Work out the original destination of an accepted connection.
///
/// `local` is getsockname() of the accepted socket: under TPROXY it *is* the
/// original destination. Only when it names this host at the proxy port can
/// the connection have come another way: through REDIRECT/DNAT (then
/// `nat_dst`, SO_ORIGINAL_DST, knows where it was going) or straight to us.
pub fn destination(
    local: SocketAddr,
    listen_port: u16,
    is_local_ip: &mut dyn FnMut(IpAddr) -> io::Result<bool>,
    nat_dst: &mut dyn FnMut() -> io::Result<SocketAddr>,
) -> Destination {
    let local = sys::canonical(local);
    let is_ours = |a: SocketAddr, f: &mut dyn FnMut(IpAddr) -> io::Result<bool>| {
        // An address we cannot classify is treated as ours: refusing is safe,
        // looping is not (DST-1).
        a.port() == listen_port && f(a.ip()).unwrap_or(true)
    };
    if !is_ours(local, is_local_ip) {
        return Destination::Forward(local);
    }
    match nat_dst() {
        Ok(d) => {
            let d = sys::canonical(d);
            if is_ours(d, is_local_ip) {
                Destination::RefuseLoop
            } else {
                Destination::Forward(d)
            }
        }
        Err(_) => Destination::RefuseDirect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn run(local: &str, nat: Option<&str>) -> Destination {
        let mut is_local = |ip: IpAddr| {
            Ok(ip.to_string().starts_with("198.18.0.1") || ip.to_string() == "2001:2:0:1::1")
        };
        let mut nat_dst = || {
            nat.map(sa)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        };
        destination(sa(local), 8080, &mut is_local, &mut nat_dst)
    }

    #[test]
    fn tproxy_destination_is_the_socket_name() {
        assert_eq!(
            run("198.19.0.2:80", None),
            Destination::Forward(sa("198.19.0.2:80"))
        );
        assert_eq!(
            run("[2001:2:0:2::2]:443", None),
            Destination::Forward(sa("[2001:2:0:2::2]:443"))
        );
    }

    #[test]
    fn remote_host_on_the_proxy_port_is_still_forwarded() {
        assert_eq!(
            run("198.19.0.2:8080", None),
            Destination::Forward(sa("198.19.0.2:8080"))
        );
    }

    #[test]
    fn our_own_address_on_another_port_is_forwarded() {
        assert_eq!(
            run("198.18.0.1:22", None),
            Destination::Forward(sa("198.18.0.1:22"))
        );
    }

    #[test]
    fn direct_connection_to_the_proxy_is_refused() {
        assert_eq!(run("198.18.0.1:8080", None), Destination::RefuseDirect);
        assert_eq!(run("[2001:2:0:1::1]:8080", None), Destination::RefuseDirect);
    }

    #[test]
    fn redirected_connection_uses_the_nat_destination() {
        assert_eq!(
            run("198.18.0.1:8080", Some("198.19.0.2:80")),
            Destination::Forward(sa("198.19.0.2:80"))
        );
    }

    #[test]
    fn redirect_back_to_the_proxy_is_a_loop() {
        assert_eq!(
            run("198.18.0.1:8080", Some("198.18.0.1:8080")),
            Destination::RefuseLoop
        );
        assert_eq!(
            run("198.18.0.1:8080", Some("[::ffff:198.18.0.1]:8080")),
            Destination::RefuseLoop
        );
    }

    #[test]
    fn unclassifiable_address_is_refused_not_forwarded() {
        let mut is_local = |_: IpAddr| Err(io::Error::from_raw_os_error(libc::ENOMEM));
        let mut nat = || Err(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            destination(sa("198.19.0.2:8080"), 8080, &mut is_local, &mut nat),
            Destination::RefuseDirect
        );
    }
}
