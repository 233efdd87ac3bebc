//! The NAT's behaviour, as RFC 4787 names it: how datagrams from a client
//! are grouped into mappings (one upstream socket each), and which
//! datagrams from the outside a mapping lets back in. Pure logic: no
//! sockets, time comes in as `now`; every rule is unit-tested below.
//!
//! | `--udp-nat`       | mapping (RFC 4787 §4.1)   | filtering (§5)           |
//! |-------------------|---------------------------|--------------------------|
//! | `full-cone`       | endpoint-independent      | endpoint-independent     |
//! | `restricted`      | endpoint-independent      | address-dependent        |
//! | `port-restricted` | endpoint-independent      | address-and-port-dependent |
//! | `symmetric`       | address-and-port-dependent| address-and-port-dependent |
//!
//! What must stay true:
//! - NAT-1: in the endpoint-independent modes a client address and port has
//!   one mapping, whatever it sends to; in `symmetric` one per destination.
//! - NAT-2: `restricted` lets a datagram from R in only if the client sent
//!   to R's address within the idle timeout; `port-restricted` only if it
//!   sent to R's address and port; `full-cone` lets everything in. (In
//!   `symmetric` the kernel filters: the socket is connected.) A remote's
//!   time is renewed at most once per `RENEW`, so a permission may lapse up
//!   to that much early.
//! - NAT-3: a mapping remembers at most `MAX_PEERS` remotes; the one sent to
//!   least recently is forgotten first, so memory per mapping is bounded
//!   whatever a client does.
//! - NAT-4: an ICMP error about one remote forgets only that remote; the
//!   mapping ends only when no remote it serves is left.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The most remotes one mapping remembers (NAT-3): enough for a peer-to-peer
/// client's working set, small enough that 4096 mappings at the cap cost a
/// few tens of MiB at worst.
pub const MAX_PEERS: usize = 256;
/// How often a remote the client keeps sending to has its time renewed: a
/// flow's datagrams after the first in this span cost no map update (the
/// data path), and a permission lapses at most this much before
/// `--udp-timeout` after its last renewal.
pub const RENEW: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NatMode {
    #[default]
    FullCone,
    Restricted,
    PortRestricted,
    Symmetric,
}

impl NatMode {
    pub const ALL: [NatMode; 4] = [
        NatMode::FullCone,
        NatMode::Restricted,
        NatMode::PortRestricted,
        NatMode::Symmetric,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NatMode::FullCone => "full-cone",
            NatMode::Restricted => "restricted",
            NatMode::PortRestricted => "port-restricted",
            NatMode::Symmetric => "symmetric",
        }
    }

    pub fn parse(s: &str) -> Option<NatMode> {
        NatMode::ALL.into_iter().find(|m| m.name() == s)
    }

    /// One mapping per client, whatever the destination (NAT-1).
    pub fn endpoint_independent(self) -> bool {
        self != NatMode::Symmetric
    }

    /// The mapping a datagram from `client` to `dst` belongs to (NAT-1).
    pub fn key(self, client: SocketAddr, dst: SocketAddr) -> SessionKey {
        SessionKey {
            client,
            dst: (!self.endpoint_independent()).then_some(dst),
        }
    }
}

impl fmt::Display for NatMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a mapping is found by: who sent the datagram (as the proxy saw it,
/// canonical), and in `symmetric` mode where it was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub client: SocketAddr,
    pub dst: Option<SocketAddr>,
}

/// The remotes a mapping's client has sent to, and when last: the filter of
/// the restricted modes (NAT-2) and what an ICMP error can end (NAT-4).
#[derive(Debug, Default)]
pub struct Peers {
    by_addr: HashMap<SocketAddr, Instant>,
    /// `restricted` only: the latest send to any port of each address.
    by_ip: HashMap<IpAddr, Instant>,
    /// The first remote the client sent to, for the log line (kept when
    /// that remote is forgotten).
    first: Option<SocketAddr>,
    /// The remote last renewed, and when (`RENEW`).
    last: Option<(SocketAddr, Instant)>,
}

impl Peers {
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn first(&self) -> Option<SocketAddr> {
        self.first
    }

    /// The client sent a datagram to `to` at `now`. Returns whether `to` is
    /// a remote this mapping had not (or no longer) remembered.
    pub fn sent(&mut self, mode: NatMode, to: SocketAddr, now: Instant) -> bool {
        if let Some((a, t)) = self.last
            && a == to
            && now.saturating_duration_since(t) < RENEW
        {
            return false;
        }
        self.last = Some((to, now));
        self.first.get_or_insert(to);
        let new = self.by_addr.insert(to, now).is_none();
        if mode == NatMode::Restricted {
            self.by_ip.insert(to.ip(), now);
        }
        if new && self.by_addr.len() > MAX_PEERS {
            // NAT-3: O(MAX_PEERS), only when a new remote overflows the set.
            if let Some(oldest) = self
                .by_addr
                .iter()
                .filter(|(a, _)| **a != to)
                .min_by_key(|(_, t)| **t)
                .map(|(a, _)| *a)
            {
                self.drop_addr(oldest);
            }
        }
        new
    }

    /// Whether a datagram from `from` may reach the client (NAT-2).
    pub fn admits(&self, mode: NatMode, from: SocketAddr, now: Instant, timeout: Duration) -> bool {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < timeout;
        match mode {
            NatMode::FullCone => true,
            NatMode::Restricted => self.by_ip.get(&from.ip()).is_some_and(fresh),
            NatMode::PortRestricted | NatMode::Symmetric => {
                self.by_addr.get(&from).is_some_and(fresh)
            }
        }
    }

    /// An ICMP error said `dst` cannot be reached: forget it (NAT-4).
    /// Returns whether any remote sent to within `timeout` is left.
    pub fn forget(&mut self, dst: SocketAddr, now: Instant, timeout: Duration) -> bool {
        self.drop_addr(dst);
        self.by_addr
            .values()
            .any(|t| now.saturating_duration_since(*t) < timeout)
    }

    fn drop_addr(&mut self, addr: SocketAddr) {
        self.by_addr.remove(&addr);
        if self.last.is_some_and(|(a, _)| a == addr) {
            self.last = None;
        }
        if self.by_ip.contains_key(&addr.ip()) {
            match self
                .by_addr
                .iter()
                .filter(|(a, _)| a.ip() == addr.ip())
                .map(|(_, t)| *t)
                .max()
            {
                Some(t) => {
                    self.by_ip.insert(addr.ip(), t);
                }
                None => {
                    self.by_ip.remove(&addr.ip());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn modes_parse_by_name_and_back() {
        for m in NatMode::ALL {
            assert_eq!(NatMode::parse(m.name()), Some(m));
        }
        assert_eq!(NatMode::parse("cone"), None);
        assert_eq!(NatMode::default(), NatMode::FullCone);
    }

    #[test]
    fn endpoint_independent_modes_key_by_client_alone() {
        let (c, d1, d2) = (
            sa("198.18.0.2:5000"),
            sa("198.19.0.2:53"),
            sa("198.19.0.3:53"),
        );
        for m in [
            NatMode::FullCone,
            NatMode::Restricted,
            NatMode::PortRestricted,
        ] {
            assert_eq!(m.key(c, d1), m.key(c, d2), "{m}");
        }
        let s = NatMode::Symmetric;
        assert_ne!(s.key(c, d1), s.key(c, d2));
        assert_eq!(s.key(c, d1).dst, Some(d1));
    }

    #[test]
    fn each_mode_filters_as_rfc_4787_says() {
        let t0 = Instant::now();
        let a = sa("198.19.0.2:3478");
        let same_ip_other_port = sa("198.19.0.2:3479");
        let other_ip = sa("198.19.0.3:3478");
        // (mode, admits a, same ip other port, other ip)
        let cases = [
            (NatMode::FullCone, [true, true, true]),
            (NatMode::Restricted, [true, true, false]),
            (NatMode::PortRestricted, [true, false, false]),
        ];
        for (mode, want) in cases {
            let mut p = Peers::default();
            assert!(p.sent(mode, a, t0));
            let got = [a, same_ip_other_port, other_ip].map(|r| p.admits(mode, r, t0, T));
            assert_eq!(got, want, "{mode}");
        }
    }

    #[test]
    fn filter_permissions_lapse_after_the_idle_timeout() {
        let t0 = Instant::now();
        let a = sa("198.19.0.2:3478");
        for mode in [NatMode::Restricted, NatMode::PortRestricted] {
            let mut p = Peers::default();
            p.sent(mode, a, t0);
            assert!(p.admits(mode, a, t0 + T - Duration::from_millis(1), T));
            assert!(!p.admits(mode, a, t0 + T, T), "{mode}");
            p.sent(mode, a, t0 + T);
            assert!(p.admits(mode, a, t0 + T, T), "{mode}: renewed");
        }
    }

    #[test]
    fn a_flows_later_datagrams_renew_its_remote_at_most_once_a_second() {
        let t0 = Instant::now();
        let a = sa("198.19.0.2:3478");
        let mode = NatMode::PortRestricted;
        let mut p = Peers::default();
        assert!(p.sent(mode, a, t0));
        // Within RENEW: no update, so the permission dates from t0 ...
        p.sent(mode, a, t0 + RENEW / 2);
        assert!(!p.admits(mode, a, t0 + T, T));
        // ... after it, renewed.
        p.sent(mode, a, t0 + RENEW);
        assert!(p.admits(mode, a, t0 + T, T));
        // Another remote in between breaks the run and is recorded.
        let b = sa("198.19.0.2:3479");
        assert!(p.sent(mode, b, t0 + RENEW));
        assert!(p.admits(mode, b, t0 + RENEW, T));
    }

    #[test]
    fn remotes_per_mapping_are_bounded_and_the_oldest_goes_first() {
        let t0 = Instant::now();
        let mode = NatMode::PortRestricted;
        let mut p = Peers::default();
        let remote = |i: usize| SocketAddr::from(([198, 19, (i / 250) as u8, (i % 250) as u8], 9));
        for i in 0..MAX_PEERS + 10 {
            p.sent(mode, remote(i), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(p.len(), MAX_PEERS);
        for i in 0..10 {
            assert!(
                !p.admits(mode, remote(i), t0, T),
                "remote {i} was the oldest"
            );
        }
        assert!(p.admits(mode, remote(10), t0, T));
        assert!(p.admits(mode, remote(MAX_PEERS + 9), t0, T));
    }

    #[test]
    fn an_unreachable_remote_ends_only_itself_until_none_is_left() {
        let t0 = Instant::now();
        let (a, b) = (sa("198.19.0.2:53"), sa("198.19.0.2:54"));
        let mode = NatMode::Restricted;
        let mut p = Peers::default();
        p.sent(mode, a, t0);
        p.sent(mode, b, t0);
        assert!(p.forget(a, t0, T), "b is still served");
        assert!(!p.admits(NatMode::PortRestricted, a, t0, T));
        assert!(p.admits(mode, a, t0, T), "b keeps the address open");
        assert_eq!(p.first(), Some(a), "the log still names the first remote");
        assert!(!p.forget(b, t0, T), "nothing left");
        assert!(!p.admits(mode, a, t0, T));
        // A remote not sent to within the timeout does not keep a mapping.
        let mut q = Peers::default();
        q.sent(mode, a, t0);
        q.sent(mode, b, t0 + T);
        assert!(!q.forget(b, t0 + T + T / 2, T));
    }
}
