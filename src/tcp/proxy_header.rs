//! The PROXY protocol header (`--send-proxy v1|v2`): what tproxyd writes at
//! the start of an upstream connection so that the server learns the
//! client's address and port, and the address and port the client dialled,
//! without source spoofing. The format is HAProxy's published one
//! (proxy-protocol.txt, "The PROXY protocol, Versions 1 & 2"), the one
//! nginx's `listen ... proxy_protocol` and HAProxy's `accept-proxy` parse.
//! Pure: addresses in, bytes out; the relay writes them (relay.rs CONN-11).
//!
//! What must stay true:
//! - PPH-1 (the spec's bytes): v1 is one line, `PROXY TCP4|TCP6 <src ip>
//!   <dst ip> <src port> <dst port>\r\n`, addresses in their usual text
//!   form, ports in decimal, single spaces, at most 107 bytes. v2 is the
//!   12-byte signature `\r\n\r\n\0\r\nQUIT\n`, version 2 and command PROXY
//!   (0x21), the family and transport (0x11 TCP over IPv4, 0x21 TCP over
//!   IPv6), the length of what follows (12 or 36) and then source address,
//!   destination address, source port, destination port: every number in
//!   network byte order. v2 carries no TLVs.
//! - PPH-2 (one family): both addresses are written in one family. An
//!   IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) counts as the IPv4 address
//!   it maps, so when both ends are IPv4, mapped or not, the header is TCP4
//!   / AF_INET, which is what the server would have seen without a proxy;
//!   when either is truly IPv6 both are written as IPv6, an IPv4 one mapped
//!   (as HAProxy does). TPROXY never changes a connection's family, and
//!   tproxyd's IPv6 listeners are V6ONLY, so in tproxyd both ends are
//!   always of one family already; the rule makes the codec total.
//! - PPH-3 (no allocation, no failure): a header is a fixed buffer of at
//!   most [`MAX_LEN`] bytes; encoding cannot fail.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// Which version of the header to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The human-readable line.
    V1,
    /// The binary header.
    V2,
}

impl Version {
    /// `v1` or `v2`, as `--send-proxy` takes them.
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "v1" => Some(Version::V1),
            "v2" => Some(Version::V2),
            _ => None,
        }
    }
}

/// v2's signature: the 12 bytes every binary header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 (high nibble), command PROXY (low nibble).
const V2_VERSION_PROXY: u8 = 0x21;
/// AF_INET (high nibble), STREAM (low nibble).
const V2_TCP4: u8 = 0x11;
/// AF_INET6, STREAM.
const V2_TCP6: u8 = 0x21;
/// The spec's bound for a v1 line, CRLF included.
const V1_MAX_LEN: usize = 107;
/// v2 over IPv6: 16 bytes of fixed header, 36 of addresses.
const V2_MAX_LEN: usize = 16 + 36;
/// The largest header either version makes (PPH-3).
pub const MAX_LEN: usize = V1_MAX_LEN;

/// One encoded header.
#[derive(Clone, Copy)]
pub struct Header {
    buf: [u8; MAX_LEN],
    len: u8,
}

impl Header {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Header({:?})",
            self.as_bytes().escape_ascii().to_string()
        )
    }
}

/// The addresses in one family (PPH-2).
enum Family {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

fn family(src: IpAddr, dst: IpAddr) -> Family {
    match (src.to_canonical(), dst.to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Family::V4(s.octets(), d.octets()),
        (s, d) => Family::V6(v6(s), v6(d)),
    }
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The header announcing a connection from `src` (the client) to `dst`
/// (its original destination).
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Header {
    let mut buf = [0u8; MAX_LEN];
    let fam = family(src.ip(), dst.ip());
    let len = match version {
        Version::V1 => {
            let mut out = &mut buf[..];
            // A [u8] writer cannot fail but by running out of room, and
            // the longest line (two full IPv6 addresses, two 5-digit ports)
            // is 104 bytes: the result is ignored without loss (PPH-3).
            let _ = match fam {
                Family::V4(s, d) => write!(
                    out,
                    "PROXY TCP4 {} {} {} {}\r\n",
                    std::net::Ipv4Addr::from(s),
                    std::net::Ipv4Addr::from(d),
                    src.port(),
                    dst.port()
                ),
                Family::V6(s, d) => write!(
                    out,
                    "PROXY TCP6 {} {} {} {}\r\n",
                    std::net::Ipv6Addr::from(s),
                    std::net::Ipv6Addr::from(d),
                    src.port(),
                    dst.port()
                ),
            };
            MAX_LEN - out.len()
        }
        Version::V2 => {
            buf[..12].copy_from_slice(&V2_SIGNATURE);
            buf[12] = V2_VERSION_PROXY;
            let addrs: &[&[u8]] = match &fam {
                Family::V4(s, d) => {
                    buf[13] = V2_TCP4;
                    &[s, d]
                }
                Family::V6(s, d) => {
                    buf[13] = V2_TCP6;
                    &[s, d]
                }
            };
            let mut at = 16;
            for part in addrs
                .iter()
                .copied()
                .chain([&src.port().to_be_bytes()[..], &dst.port().to_be_bytes()[..]])
            {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            let rest = (at - 16) as u16;
            buf[14..16].copy_from_slice(&rest.to_be_bytes());
            debug_assert!(at <= V2_MAX_LEN);
            at
        }
    };
    Header {
        buf,
        len: len as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v1(src: &str, dst: &str) -> Vec<u8> {
        encode(Version::V1, sa(src), sa(dst)).as_bytes().to_vec()
    }

    fn v2(src: &str, dst: &str) -> Vec<u8> {
        encode(Version::V2, sa(src), sa(dst)).as_bytes().to_vec()
    }

    #[test]
    fn v1_tcp4_is_the_specs_line() {
        // proxy-protocol.txt, 2.1: "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        assert_eq!(
            v1("192.168.0.1:56324", "192.168.0.11:443"),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
    }

    #[test]
    fn v1_tcp6_writes_addresses_in_their_short_form() {
        assert_eq!(
            v1("[2001:2:0:1::2]:40000", "[2001:2:0:2::2]:80"),
            b"PROXY TCP6 2001:2:0:1::2 2001:2:0:2::2 40000 80\r\n"
        );
    }

    #[test]
    fn v1_at_its_longest_fits_the_specs_bound() {
        let h = v1(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        assert_eq!(
            h,
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe \
              ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
        );
        assert_eq!(h.len(), 104);
        assert!(h.len() <= V1_MAX_LEN);
    }

    #[test]
    fn v2_tcp4_is_signature_0x21_0x11_length_12_then_addresses_and_ports() {
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12]);
        want.extend_from_slice(&[198, 18, 0, 2, 198, 19, 0, 2]);
        want.extend_from_slice(&[0xc3, 0x50, 0x01, 0xbb]); // 50000, 443
        assert_eq!(v2("198.18.0.2:50000", "198.19.0.2:443"), want);
    }

    #[test]
    fn v2_tcp6_is_signature_0x21_0x21_length_36_then_addresses_and_ports() {
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0, 36]);
        want.extend_from_slice(&[0x20, 0x01, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(&[0x20, 0x01, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(&[0x01, 0x02, 0x00, 0x50]); // 258, 80
        assert_eq!(v2("[2001:2:0:1::2]:258", "[2001:2:0:2::2]:80"), want);
        assert_eq!(want.len(), 16 + 36);
    }

    #[test]
    fn both_ends_v4_mapped_are_written_as_ipv4() {
        // PPH-2: what the server would have seen without the proxy.
        assert_eq!(
            v1("[::ffff:198.18.0.2]:1234", "[::ffff:198.19.0.2]:80"),
            b"PROXY TCP4 198.18.0.2 198.19.0.2 1234 80\r\n"
        );
        assert_eq!(
            v2("[::ffff:198.18.0.2]:1234", "[::ffff:198.19.0.2]:80"),
            v2("198.18.0.2:1234", "198.19.0.2:80")
        );
        // One mapped end and one IPv4 end are IPv4 too.
        assert_eq!(
            v1("[::ffff:198.18.0.2]:1234", "198.19.0.2:80"),
            b"PROXY TCP4 198.18.0.2 198.19.0.2 1234 80\r\n"
        );
    }

    #[test]
    fn mixed_families_are_written_as_ipv6_with_the_ipv4_end_mapped() {
        assert_eq!(
            v1("198.18.0.2:1234", "[2001:2:0:2::2]:80"),
            b"PROXY TCP6 ::ffff:198.18.0.2 2001:2:0:2::2 1234 80\r\n"
        );
        let h = v2("198.18.0.2:1234", "[2001:2:0:2::2]:80");
        assert_eq!(h[13], 0x21);
        assert_eq!(&h[16..32], &v6("198.18.0.2".parse().unwrap()));
    }

    #[test]
    fn only_v1_and_v2_parse() {
        assert_eq!(Version::parse("v1"), Some(Version::V1));
        assert_eq!(Version::parse("v2"), Some(Version::V2));
        for bad in ["", "1", "2", "V1", "v3", "v2 ", "v1,v2"] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }
}
