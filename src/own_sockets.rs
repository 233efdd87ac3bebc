//! The local addresses of this process's own upstream sockets, shared by
//! every worker (TCP and UDP), so that a connection or datagram whose client
//! is one of them can be recognised as tproxyd's own traffic coming back: a
//! loop that the host's rules built (an output chain that marks the proxy's
//! own connections and sends them back into TPROXY).
//!
//! Two ways to look: [`OwnSockets::contains`] asks "is this address one of
//! our sockets' local addresses?" (any destination), and
//! [`OwnSockets::is_loop`] asks "is a connection from `from` to `to` one of
//! ours?". TCP uses the second: a local address:port is unique only together
//! with its destination (connect picks the port by the whole 4-tuple, and
//! with IP_BIND_ADDRESS_NO_PORT two upstream sockets to different servers
//! share one), so a client of the host's own (under `scripts/rules --local`)
//! may use the same address:port as one of ours towards another server, and
//! must not be taken for a loop.
//!
//! What must stay true:
//! - OWN-1 (a multiset): each entry is counted; an address is forgotten only
//!   when every socket that added it has removed it.
//! - OWN-2 (nothing forgotten): an [`Entry`] removes what it added when it
//!   drops, so a holder (the TCP `Conn`) cannot leave a stale address behind
//!   on any way out. Stale entries would refuse innocent clients; missing
//!   ones would let a loop through.
//! - OWN-3 (canonical): addresses are kept as IPv6 octets, IPv4 as
//!   IPv4-mapped, so `198.18.0.1` and `::ffff:198.18.0.1` are one address
//!   (as `sys::canonical` has it); flow labels and scope ids are ignored.
//! - OWN-4 (wildcards): an entry at the family's unspecified address
//!   (`0.0.0.0`, `::`) matches every address of that family at its port: an
//!   unconnected UDP socket bound to `0.0.0.0:p` sends from whichever
//!   address routing picks, at port p. A dual-stack socket is two entries.
//!   Such an entry also matches a remote client that happens to use port p,
//!   so a caller that has wildcard entries checks that a match is a local
//!   address (`sys::is_local_address`) before it refuses anything:
//!   [`OwnSockets::lookup`] says which kind of entry matched.
//! - OWN-5 (cheap): entries are spread over `SHARDS` shards by port, each a
//!   mutex over two small maps on its own cache lines; every operation takes
//!   exactly one lock, and looks for wildcard or unconnected entries only
//!   while there are any.
//! - OWN-6 (small): what is kept of an entry is two 64-bit digests (of its
//!   local address, and of its local address and peer) under a key drawn at
//!   random for the process (std's SipHash `RandomState`), 16 bytes in each
//!   map and 32 in the `Entry` a connection holds. Two different entries
//!   share a digest with a chance of about 2^-64 per pair, and nobody outside
//!   the process can pick addresses that do: a wrong match would reset one
//!   connection, and a match can never be missed.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards of the registry. Two workers contend on one only when their
/// sockets' ports fall into the same shard at the same instant; 16 keeps
/// that rare on the machines tproxyd runs on (a worker per core) and costs
/// 16 × 128 bytes.
const SHARDS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    /// The UDP worker's, wired in with its rewrite.
    #[allow(dead_code)]
    Udp,
}

impl Proto {
    fn index(self) -> usize {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
        }
    }
}

/// An address and port, canonical (OWN-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Addr {
    ip: [u8; 16],
    port: u16,
}

impl Addr {
    fn of(a: SocketAddr) -> Addr {
        let ip = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        Addr {
            ip: ip.octets(),
            port: a.port(),
        }
    }

    fn is_unspecified(&self) -> bool {
        let ip = Ipv6Addr::from(self.ip);
        ip.is_unspecified() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_unspecified())
    }

    /// The unspecified address of this one's family, at its port (OWN-4).
    fn wildcard(&self) -> Addr {
        let ip = match Ipv6Addr::from(self.ip).to_ipv4_mapped() {
            Some(_) => Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(),
            None => Ipv6Addr::UNSPECIFIED,
        };
        Addr {
            ip: ip.octets(),
            port: self.port,
        }
    }
}

/// What [`OwnSockets::lookup`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// A socket with exactly this local address.
    Exact,
    /// Only a socket bound to the family's unspecified address at this port
    /// (OWN-4): the address may be a remote one that uses the same port.
    Wildcard,
}

/// What an entry is kept as, and what undoing it needs (OWN-6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stored {
    /// Digest of (protocol, local address).
    local: u64,
    /// Digest of (protocol, local address, peer or none).
    flow: u64,
    /// The local port: which shard.
    port: u16,
    proto: Proto,
    wildcard: bool,
    unconnected: bool,
}

/// The digests are SipHash outputs already: the maps use them as they are.
#[derive(Default)]
struct AsIs(u64);

impl Hasher for AsIs {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Counts = HashMap<u64, u32, BuildHasherDefault<AsIs>>;

fn increment(m: &mut Counts, k: u64) {
    *m.entry(k).or_insert(0) += 1;
}

fn decrement(m: &mut Counts, k: u64) {
    if let Some(n) = m.get_mut(&k) {
        if *n > 1 {
            *n -= 1;
        } else {
            m.remove(&k);
        }
    }
}

/// One shard: sockets counted by local address and by (local, peer).
#[derive(Default)]
struct Maps {
    locals: Counts,
    flows: Counts,
}

/// Each shard on its own cache lines (OWN-5), as stats.rs keeps workers'
/// counters apart.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Maps>);

/// The registry. Share it as an `Arc`; see the module header.
pub struct OwnSockets {
    shards: [Shard; SHARDS],
    digest: RandomState,
    /// Entries at an unspecified address, per protocol (OWN-4, OWN-5).
    wildcards: [AtomicUsize; 2],
    /// Entries without a peer, per protocol.
    unconnected: [AtomicUsize; 2],
    /// A loop was reported: the warning is given once per process.
    warned: AtomicBool,
}

impl Default for OwnSockets {
    fn default() -> Self {
        OwnSockets::new()
    }
}

impl OwnSockets {
    pub fn new() -> OwnSockets {
        OwnSockets {
            shards: Default::default(),
            digest: RandomState::new(),
            wildcards: Default::default(),
            unconnected: Default::default(),
            warned: AtomicBool::new(false),
        }
    }

    fn shard(&self, port: u16) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave a map half-changed in
        // a way that matters here: keep going with what is there.
        self.shards[port as usize % SHARDS]
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn local_digest(&self, proto: Proto, local: Addr) -> u64 {
        self.digest.hash_one((proto, local))
    }

    fn flow_digest(&self, proto: Proto, local: Addr, peer: Option<Addr>) -> u64 {
        self.digest.hash_one((proto, local, peer))
    }

    fn stored(&self, proto: Proto, local: SocketAddr, peer: Option<SocketAddr>) -> Stored {
        let (local, peer) = (Addr::of(local), peer.map(Addr::of));
        Stored {
            local: self.local_digest(proto, local),
            flow: self.flow_digest(proto, local, peer),
            port: local.port,
            proto,
            wildcard: local.is_unspecified(),
            unconnected: peer.is_none(),
        }
    }

    fn insert(&self, e: Stored) {
        let i = e.proto.index();
        if e.wildcard {
            self.wildcards[i].fetch_add(1, Ordering::AcqRel);
        }
        if e.unconnected {
            self.unconnected[i].fetch_add(1, Ordering::AcqRel);
        }
        let mut maps = self.shard(e.port);
        increment(&mut maps.locals, e.local);
        increment(&mut maps.flows, e.flow);
    }

    fn delete(&self, e: Stored) {
        {
            let mut maps = self.shard(e.port);
            // Removing what is not there changes nothing (OWN-1).
            if !maps.flows.contains_key(&e.flow) {
                return;
            }
            decrement(&mut maps.flows, e.flow);
            decrement(&mut maps.locals, e.local);
        }
        let i = e.proto.index();
        if e.wildcard {
            self.wildcards[i].fetch_sub(1, Ordering::AcqRel);
        }
        if e.unconnected {
            self.unconnected[i].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Add an entry that removes itself when the returned [`Entry`] drops
    /// (OWN-2). `peer`: the socket's peer if it is connected.
    pub fn hold(
        self: &Arc<Self>,
        proto: Proto,
        local: SocketAddr,
        peer: Option<SocketAddr>,
    ) -> Entry {
        let stored = self.stored(proto, local, peer);
        self.insert(stored);
        Entry {
            registry: Arc::clone(self),
            stored,
        }
    }

    /// Is a connection (or datagram) from `from` to `to` one of ours coming
    /// back: a socket of ours at `from` (or at the wildcard of its port,
    /// OWN-4) that is connected to `to` or unconnected?
    pub fn is_loop(&self, proto: Proto, from: SocketAddr, to: SocketAddr) -> bool {
        let (from, to) = (Addr::of(from), Addr::of(to));
        let i = proto.index();
        let wild = self.wildcards[i].load(Ordering::Acquire) > 0;
        let unconnected = self.unconnected[i].load(Ordering::Acquire) > 0;
        let has = |maps: &Maps, local: Addr| {
            maps.flows
                .contains_key(&self.flow_digest(proto, local, Some(to)))
                || (unconnected
                    && maps
                        .flows
                        .contains_key(&self.flow_digest(proto, local, None)))
        };
        let maps = self.shard(from.port);
        has(&maps, from) || (wild && has(&maps, from.wildcard()))
    }

    /// True exactly once per process: whoever finds the first loop warns.
    pub fn first_loop(&self) -> bool {
        !self.warned.swap(true, Ordering::AcqRel)
    }

    /// Entries held now, all protocols.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.0.lock()
                    .map(|m| m.flows.values().sum::<u32>())
                    .unwrap_or(0) as usize
            })
            .sum()
    }
}

/// The UDP worker's side of the API (and `contains`, which the spec of
/// issue 12 names): wired in with that worker's rewrite. The TCP workers
/// use [`OwnSockets::hold`] and [`OwnSockets::is_loop`].
#[allow(dead_code)]
impl OwnSockets {
    /// One more socket of ours at `local`, unconnected or used towards many
    /// peers (an unconnected UDP socket). Undo with [`remove`](Self::remove).
    pub fn add(&self, proto: Proto, local: SocketAddr) {
        self.insert(self.stored(proto, local, None));
    }

    /// Undo one [`add`](Self::add). Removing what was not added does nothing.
    pub fn remove(&self, proto: Proto, local: SocketAddr) {
        self.delete(self.stored(proto, local, None));
    }

    /// One more socket of ours at `local` connected to `peer`. Undo with
    /// [`remove_connected`](Self::remove_connected), or use [`hold`](Self::hold).
    pub fn add_connected(&self, proto: Proto, local: SocketAddr, peer: SocketAddr) {
        self.insert(self.stored(proto, local, Some(peer)));
    }

    /// Undo one [`add_connected`](Self::add_connected).
    pub fn remove_connected(&self, proto: Proto, local: SocketAddr, peer: SocketAddr) {
        self.delete(self.stored(proto, local, Some(peer)));
    }

    /// Is `addr` the local address of one of our sockets (any peer)?
    pub fn contains(&self, proto: Proto, addr: SocketAddr) -> bool {
        self.lookup(proto, addr).is_some()
    }

    /// Like [`contains`](Self::contains), saying whether the match was exact
    /// or only a wildcard entry at that port (OWN-4).
    pub fn lookup(&self, proto: Proto, addr: SocketAddr) -> Option<Match> {
        let a = Addr::of(addr);
        let wild = self.wildcards[proto.index()].load(Ordering::Acquire) > 0;
        let (exact, wildcard) = (
            self.local_digest(proto, a),
            wild.then(|| self.local_digest(proto, a.wildcard())),
        );
        let maps = self.shard(a.port);
        if maps.locals.contains_key(&exact) {
            Some(Match::Exact)
        } else if wildcard.is_some_and(|w| maps.locals.contains_key(&w)) {
            Some(Match::Wildcard)
        } else {
            None
        }
    }
}

/// An entry in the registry for as long as this lives (OWN-2).
pub struct Entry {
    registry: Arc<OwnSockets>,
    stored: Stored,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.registry.delete(self.stored);
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("stored", &self.stored)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_is_there_until_every_socket_that_added_it_removed_it() {
        let r = OwnSockets::new();
        let a = sa("198.19.0.1:40000");
        assert!(!r.contains(Proto::Tcp, a));
        r.add(Proto::Tcp, a);
        r.add(Proto::Tcp, a);
        assert!(r.contains(Proto::Tcp, a));
        r.remove(Proto::Tcp, a);
        assert!(r.contains(Proto::Tcp, a), "one socket still has it");
        r.remove(Proto::Tcp, a);
        assert!(!r.contains(Proto::Tcp, a));
        // Removing again is harmless and cannot go below zero.
        r.remove(Proto::Tcp, a);
        r.add(Proto::Tcp, a);
        assert!(r.contains(Proto::Tcp, a));
        r.remove(Proto::Tcp, a);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn protocols_and_ports_are_apart() {
        let r = OwnSockets::new();
        r.add(Proto::Udp, sa("198.19.0.1:40000"));
        assert!(!r.contains(Proto::Tcp, sa("198.19.0.1:40000")));
        assert!(!r.contains(Proto::Udp, sa("198.19.0.1:40001")));
        assert!(!r.contains(Proto::Udp, sa("198.19.0.2:40000")));
        // Ports in the same shard are still different ports.
        assert!(!r.contains(Proto::Udp, sa("198.19.0.1:40016")));
    }

    #[test]
    fn mapped_and_plain_ipv4_are_one_address() {
        let r = OwnSockets::new();
        r.add(Proto::Tcp, sa("[::ffff:198.19.0.1]:40000"));
        assert!(r.contains(Proto::Tcp, sa("198.19.0.1:40000")));
        r.remove(Proto::Tcp, sa("198.19.0.1:40000"));
        assert!(!r.contains(Proto::Tcp, sa("[::ffff:198.19.0.1]:40000")));
        // Scope ids and flow labels do not make another address.
        r.add(Proto::Tcp, sa("[2001:2::1]:7"));
        let mut scoped = match sa("[2001:2::1]:7") {
            SocketAddr::V6(v) => v,
            _ => unreachable!(),
        };
        scoped.set_flowinfo(9);
        assert!(r.contains(Proto::Tcp, SocketAddr::V6(scoped)));
    }

    #[test]
    fn a_wildcard_entry_matches_its_family_at_its_port_and_says_so() {
        let r = OwnSockets::new();
        r.add(Proto::Udp, sa("0.0.0.0:5000"));
        assert_eq!(
            r.lookup(Proto::Udp, sa("198.19.0.1:5000")),
            Some(Match::Wildcard)
        );
        assert_eq!(r.lookup(Proto::Udp, sa("198.19.0.1:5001")), None);
        assert_eq!(r.lookup(Proto::Udp, sa("[2001:2::1]:5000")), None, "not v6");
        r.add(Proto::Udp, sa("198.19.0.1:5000"));
        assert_eq!(
            r.lookup(Proto::Udp, sa("198.19.0.1:5000")),
            Some(Match::Exact)
        );
        r.add(Proto::Udp, sa("[::]:6000"));
        assert!(r.contains(Proto::Udp, sa("[2001:2::1]:6000")));
        assert!(!r.contains(Proto::Udp, sa("198.19.0.1:6000")), "not v4");
        assert!(!r.contains(Proto::Tcp, sa("198.19.0.1:5000")), "not TCP");
        r.remove(Proto::Udp, sa("0.0.0.0:5000"));
        r.remove(Proto::Udp, sa("198.19.0.1:5000"));
        r.remove(Proto::Udp, sa("[::]:6000"));
        assert_eq!(r.lookup(Proto::Udp, sa("198.19.0.1:5000")), None);
        assert_eq!(r.wildcards[Proto::Udp.index()].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_connected_entry_is_a_loop_only_towards_its_own_peer() {
        let r = OwnSockets::new();
        let (local, server, other) = (
            sa("198.19.0.1:40000"),
            sa("198.19.0.2:80"),
            sa("198.19.0.9:443"),
        );
        r.add_connected(Proto::Tcp, local, server);
        assert!(r.is_loop(Proto::Tcp, local, server));
        // Another socket of the host may share the address:port towards
        // another server: not ours.
        assert!(!r.is_loop(Proto::Tcp, local, other));
        assert!(r.contains(Proto::Tcp, local), "but the address is ours");
        // Two of ours sharing it (IP_BIND_ADDRESS_NO_PORT).
        r.add_connected(Proto::Tcp, local, other);
        r.remove_connected(Proto::Tcp, local, server);
        assert!(!r.is_loop(Proto::Tcp, local, server));
        assert!(r.is_loop(Proto::Tcp, local, other));
        r.remove_connected(Proto::Tcp, local, other);
        assert!(!r.contains(Proto::Tcp, local));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn an_unconnected_entry_is_a_loop_towards_anyone() {
        let r = OwnSockets::new();
        r.add(Proto::Udp, sa("0.0.0.0:5000"));
        assert!(r.is_loop(Proto::Udp, sa("198.19.0.1:5000"), sa("198.19.0.2:53")));
        assert!(!r.is_loop(Proto::Udp, sa("198.19.0.1:5001"), sa("198.19.0.2:53")));
        r.remove(Proto::Udp, sa("0.0.0.0:5000"));
        assert!(!r.is_loop(Proto::Udp, sa("198.19.0.1:5000"), sa("198.19.0.2:53")));
    }

    #[test]
    fn an_entry_removes_itself_when_it_drops() {
        let r = Arc::new(OwnSockets::new());
        let (local, peer) = (sa("[2001:2:0:2::1]:40000"), sa("[2001:2:0:2::2]:80"));
        let a = r.hold(Proto::Tcp, local, Some(peer));
        let b = r.hold(Proto::Tcp, local, Some(peer));
        assert!(r.is_loop(Proto::Tcp, local, peer));
        drop(a);
        assert!(r.is_loop(Proto::Tcp, local, peer));
        drop(b);
        assert!(!r.is_loop(Proto::Tcp, local, peer));
        assert_eq!(r.len(), 0);
        assert_eq!(
            Arc::strong_count(&r),
            1,
            "entries gave their reference back"
        );
    }

    #[test]
    fn workers_adding_and_removing_at_once_leave_nothing_behind() {
        let r = Arc::new(OwnSockets::new());
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    let peer = sa("198.19.0.2:80");
                    for i in 0..2000u16 {
                        let local = SocketAddr::new([198, 19, 0, 1].into(), 1024 + (i % 300));
                        let e = r.hold(Proto::Tcp, local, Some(peer));
                        assert!(r.is_loop(Proto::Tcp, local, peer), "thread {t}");
                        drop(e);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn the_first_loop_is_reported_once() {
        let r = OwnSockets::new();
        assert!(r.first_loop());
        assert!(!r.first_loop());
    }

    #[test]
    fn an_entry_is_small() {
        // A Conn holds one; keep the per-connection memory low.
        assert!(
            std::mem::size_of::<Entry>() <= 32,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }
}
