//! An LRU table with one idle timeout: the UDP worker's NAT mappings (keyed
//! by [`crate::udp::nat::SessionKey`]) and its reply sockets (keyed by the
//! remote address they answer from). For each key it holds the worker's
//! state (generic `V`, the table never looks inside), when the key was last
//! active either way, and what it moved each way.
//! Pure logic: no sockets, and time comes in as `now`, so every rule here is
//! unit-tested below, down to a seeded simulation against a naive model.
//!
//! Layout: sessions live in a [`Slab`]; a `HashMap` finds them by
//! key (generic `K`); an intrusive doubly-linked list, threaded through the slab
//! by index, orders them from least to most recently active. All sessions
//! share one idle timeout, so least recently active is also first to expire:
//! expiry and eviction pop from the head, traffic moves a session to the
//! tail.
//!
//! Keys are compared as given: the worker canonicalises addresses (an
//! IPv4-mapped IPv6 client is the IPv4 one) before it builds a key.
//!
//! What must stay true:
//! - SES-1: the list holds every session exactly once, ordered by last
//!   activity, least recent at the head; ties keep the order in which they
//!   were touched. A `now` older than the newest recorded activity is raised
//!   to it, so a caller's stale clock cannot break the order: it can only
//!   make a session look a little younger.
//! - SES-2: the slab, the map and the list hold the same sessions, and the
//!   map's id for a key is the id of that key's session.
//! - SES-3: a [`SessionId`] names one session for its whole life: once the
//!   session is gone, its id finds nothing, even after its slot is reused.
//!   This holds across 2^32 insertions (the generation counter wraps); the
//!   worker keeps an id for an event batch, not for that long.
//! - SES-4: nothing scans the table. `expire` looks at one session more than
//!   it removes, so a tick with nothing due costs O(1) however many sessions
//!   are open; every other operation is O(1) (amortised: map and slab grow).
//! - SES-5: `len() <= max_sessions()`. Inserting into a full table evicts the
//!   least recently active session and hands it back, never drops it unseen.
//! - SES-6: nothing here panics on the data path: a broken internal link is
//!   a `debug_assert!` in tests and a no-op in release, never an abort.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::iter::FusedIterator;
use std::time::{Duration, Instant};

use slab::Slab;

/// The largest table: a slot must fit the 32 bits a [`SessionId`] gives it.
pub const MAX_SESSIONS: usize = u32::MAX as usize;

/// Names one session for its whole life (SES-3): slab slot plus generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId {
    slot: u32,
    generation: u32,
}

impl SessionId {
    /// The id in 64 bits, e.g. to ride in a mio `Token`.
    pub fn to_bits(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.generation)
    }

    /// The inverse of [`to_bits`](Self::to_bits). Total: any value decodes,
    /// and one that names no live session is simply stale.
    pub fn from_bits(bits: u64) -> SessionId {
        SessionId {
            slot: (bits >> 32) as u32,
            generation: bits as u32,
        }
    }

    fn slot(self) -> usize {
        self.slot as usize
    }
}

/// Which way a datagram went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client, forwarded to the original destination.
    ToUpstream,
    /// A reply from upstream, forwarded back to the client.
    ToClient,
}

/// What one direction of a session has moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    fn count(&mut self, bytes: usize) {
        // Saturating: a counter that would wrap is wrong either way, and
        // overflow must not panic in a debug build of the data path.
        self.packets = self.packets.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes as u64);
    }
}

/// One session, as the table holds it or as it comes out when removed,
/// expired or evicted. Only the value can be changed from outside, through
/// [`SessionTable::get_mut`]: id, key and activity belong to the table.
#[derive(Debug)]
pub struct Session<K, V> {
    id: SessionId,
    key: K,
    value: V,
    started: Instant,
    last_activity: Instant,
    to_upstream: Traffic,
    to_client: Traffic,
}

impl<K: Copy, V> Session<K, V> {
    #[cfg(test)]
    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn key(&self) -> K {
        self.key
    }

    pub fn value(&self) -> &V {
        &self.value
    }

    pub fn into_value(self) -> V {
        self.value
    }

    /// When the session was inserted.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The last insert or touch, either way (SES-1 may have raised it).
    #[cfg(test)]
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    pub fn traffic(&self, direction: Direction) -> Traffic {
        match direction {
            Direction::ToUpstream => self.to_upstream,
            Direction::ToClient => self.to_client,
        }
    }

    fn traffic_mut(&mut self, direction: Direction) -> &mut Traffic {
        match direction {
            Direction::ToUpstream => &mut self.to_upstream,
            Direction::ToClient => &mut self.to_client,
        }
    }
}

/// A session and its place in the LRU list (SES-1).
#[derive(Debug)]
struct Node<K, V> {
    session: Session<K, V>,
    /// Toward the head: less recently active.
    prev: Option<usize>,
    /// Toward the tail: more recently active.
    next: Option<usize>,
}

/// Limits [`SessionTable::new`] refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitsError {
    ZeroSessions,
    TooManySessions,
    ZeroTimeout,
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitsError::ZeroSessions => f.write_str("the UDP session limit must be at least 1"),
            LimitsError::TooManySessions => {
                write!(f, "the UDP session limit must be at most {MAX_SESSIONS}")
            }
            LimitsError::ZeroTimeout => f.write_str("the UDP idle timeout must be more than 0"),
        }
    }
}

impl std::error::Error for LimitsError {}

/// [`SessionTable::insert`] refused: the key has a session already. The
/// value comes back so the caller decides what becomes of it.
pub struct Occupied<V> {
    /// The session the key already has.
    pub id: SessionId,
    pub value: V,
}

// By hand so that `Occupied<V>` is a `std::error::Error` whatever `V` is.
impl<V> fmt::Debug for Occupied<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Occupied")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<V> fmt::Display for Occupied<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a UDP session for this client and destination exists already")
    }
}

impl<V> std::error::Error for Occupied<V> {}

/// What [`SessionTable::insert`] did.
#[derive(Debug)]
pub struct Inserted<K, V> {
    pub id: SessionId,
    /// The least recently active session, pushed out because the table was
    /// full (SES-5): close its socket and count it.
    pub evicted: Option<Session<K, V>>,
}

/// The sessions of one worker; see the module header for the invariants.
#[derive(Debug)]
pub struct SessionTable<K, V> {
    nodes: Slab<Node<K, V>>,
    by_key: HashMap<K, SessionId>,
    /// Least recently active: the next to expire or be evicted.
    head: Option<usize>,
    /// Most recently active.
    tail: Option<usize>,
    next_generation: u32,
    max_sessions: usize,
    idle_timeout: Duration,
    /// Sessions `expire` has looked at, so that tests can hold it to SES-4.
    #[cfg(test)]
    expire_visits: usize,
}

impl<K: Copy + Eq + Hash, V> SessionTable<K, V> {
    /// An empty table holding at most `max_sessions`, each expiring after
    /// `idle_timeout` without traffic either way.
    ///
    /// # Errors
    /// [`LimitsError`] for no sessions, more than [`MAX_SESSIONS`], or a zero
    /// timeout.
    pub fn new(max_sessions: usize, idle_timeout: Duration) -> Result<Self, LimitsError> {
        if max_sessions == 0 {
            return Err(LimitsError::ZeroSessions);
        }
        if max_sessions > MAX_SESSIONS {
            return Err(LimitsError::TooManySessions);
        }
        if idle_timeout.is_zero() {
            return Err(LimitsError::ZeroTimeout);
        }
        Ok(SessionTable {
            // Not preallocated: a generous limit must not cost memory up front.
            nodes: Slab::new(),
            by_key: HashMap::new(),
            head: None,
            tail: None,
            next_generation: 0,
            max_sessions,
            idle_timeout,
            #[cfg(test)]
            expire_visits: 0,
        })
    }

    #[cfg(test)]
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    #[cfg(test)]
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn lookup(&self, key: &K) -> Option<SessionId> {
        self.by_key.get(key).copied()
    }

    /// The session `id` names, or `None` if it is gone (SES-3).
    pub fn get(&self, id: SessionId) -> Option<&Session<K, V>> {
        self.nodes
            .get(id.slot())
            .map(|node| &node.session)
            .filter(|session| session.id == id)
    }

    /// The value of the session `id` names, or `None` if it is gone (SES-3).
    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut V> {
        self.live_node_mut(id).map(|node| &mut node.session.value)
    }

    /// Opens a session for `key`, active as of `now`, with no traffic yet
    /// (touch it for the datagram that opened it). A full table first evicts
    /// its least recently active session and returns it (SES-5).
    ///
    /// # Errors
    /// [`Occupied`], with `value` handed back, if `key` has a session
    /// already; the table is then unchanged.
    pub fn insert(
        &mut self,
        key: K,
        value: V,
        now: Instant,
    ) -> Result<Inserted<K, V>, Occupied<V>> {
        if let Some(&id) = self.by_key.get(&key) {
            return Err(Occupied { id, value });
        }
        let evicted = if self.nodes.len() >= self.max_sessions {
            self.pop_front()
        } else {
            None
        };
        let now = self.not_before_newest(now);
        let slot = self.nodes.vacant_key();
        // The slab reuses freed slots before growing and holds at most
        // `max_sessions <= MAX_SESSIONS` (SES-5), so the slot fits in a u32.
        debug_assert!(
            slot < self.max_sessions,
            "slot {slot} beyond the limit (SES-5)"
        );
        let id = SessionId {
            slot: slot as u32,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1);
        self.nodes.insert(Node {
            session: Session {
                id,
                key,
                value,
                started: now,
                last_activity: now,
                to_upstream: Traffic::default(),
                to_client: Traffic::default(),
            },
            prev: None,
            next: None,
        });
        self.push_back(slot);
        self.by_key.insert(key, id);
        Ok(Inserted { id, evicted })
    }

    /// Records a datagram of `bytes` going `direction` at `now`: traffic
    /// either way keeps a session alive. `false` if `id` is stale (SES-3).
    pub fn touch(
        &mut self,
        id: SessionId,
        now: Instant,
        direction: Direction,
        bytes: usize,
    ) -> bool {
        let now = self.not_before_newest(now);
        let Some(node) = self.live_node_mut(id) else {
            return false;
        };
        node.session.last_activity = now;
        node.session.traffic_mut(direction).count(bytes);
        let slot = id.slot();
        if self.tail != Some(slot) {
            self.unlink(slot);
            self.push_back(slot);
        }
        true
    }

    /// Like [`touch`](Self::touch) for `packets` datagrams of `bytes` in
    /// all (a GRO buffer, or a run sent at once).
    pub fn touch_many(
        &mut self,
        id: SessionId,
        now: Instant,
        direction: Direction,
        packets: usize,
        bytes: usize,
    ) -> bool {
        if !self.touch(id, now, direction, bytes) {
            return false;
        }
        if let Some(node) = self.live_node_mut(id) {
            let t = node.session.traffic_mut(direction);
            t.packets = t.packets.saturating_add(packets.saturating_sub(1) as u64);
        }
        true
    }

    /// Removes the least recently active session and hands it back (to
    /// free what it holds, e.g. when descriptors run out).
    pub fn evict_oldest(&mut self) -> Option<Session<K, V>> {
        self.pop_front()
    }

    /// Closes the session `id` names and hands it back; `None` if it is gone.
    pub fn remove(&mut self, id: SessionId) -> Option<Session<K, V>> {
        self.get(id)?;
        self.take(id.slot())
    }

    /// Removes, as the iterator is consumed, every session idle for at least
    /// the timeout at `now`, least recently active first. Costs O(1) plus
    /// O(1) per session removed (SES-4). Sessions the iterator has not yet
    /// yielded when it is dropped stay in the table.
    pub fn expire(&mut self, now: Instant) -> Expired<'_, K, V> {
        Expired { table: self, now }
    }

    /// When the least recently active session will be due, to bound the
    /// poll timeout; `None` for an empty table (or a timeout beyond what an
    /// `Instant` can represent, which never falls due).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.front()?.last_activity.checked_add(self.idle_timeout)
    }

    fn front(&self) -> Option<&Session<K, V>> {
        let node = self.nodes.get(self.head?);
        debug_assert!(node.is_some(), "head names a vacant slot (SES-2)");
        node.map(|node| &node.session)
    }

    fn pop_expired(&mut self, now: Instant) -> Option<Session<K, V>> {
        #[cfg(test)]
        {
            self.expire_visits += 1;
        }
        let idle = now.saturating_duration_since(self.front()?.last_activity);
        if idle >= self.idle_timeout {
            self.pop_front()
        } else {
            None
        }
    }

    fn pop_front(&mut self) -> Option<Session<K, V>> {
        self.take(self.head?)
    }

    fn live_node_mut(&mut self, id: SessionId) -> Option<&mut Node<K, V>> {
        self.nodes
            .get_mut(id.slot())
            .filter(|node| node.session.id == id)
    }

    /// `now`, raised to the newest recorded activity if older (SES-1).
    fn not_before_newest(&self, now: Instant) -> Instant {
        match self.tail.and_then(|slot| self.nodes.get(slot)) {
            Some(newest) => now.max(newest.session.last_activity),
            None => now,
        }
    }

    /// Unlinks and frees `slot`, keeping SES-2.
    fn take(&mut self, slot: usize) -> Option<Session<K, V>> {
        self.unlink(slot);
        let node = self.nodes.try_remove(slot);
        debug_assert!(node.is_some(), "took a vacant slot (SES-2)");
        let session = node?.session;
        let indexed = self.by_key.remove(&session.key);
        debug_assert_eq!(indexed, Some(session.id), "map and slab disagree (SES-2)");
        Some(session)
    }

    fn unlink(&mut self, slot: usize) {
        let Some(node) = self.nodes.get_mut(slot) else {
            debug_assert!(false, "unlinking vacant slot {slot} (SES-2)");
            return;
        };
        let (prev, next) = (node.prev.take(), node.next.take());
        self.set_next(prev, next);
        self.set_prev(next, prev);
    }

    fn push_back(&mut self, slot: usize) {
        let old_tail = self.tail;
        let Some(node) = self.nodes.get_mut(slot) else {
            debug_assert!(false, "linking vacant slot {slot} (SES-2)");
            return;
        };
        node.prev = old_tail;
        node.next = None;
        self.set_next(old_tail, Some(slot));
        self.tail = Some(slot);
    }

    /// Points `slot`'s `next` at `next`; no slot (before the head) means the
    /// head itself.
    fn set_next(&mut self, slot: Option<usize>, next: Option<usize>) {
        match slot {
            None => self.head = next,
            Some(slot) => match self.nodes.get_mut(slot) {
                Some(node) => node.next = next,
                None => debug_assert!(false, "link to vacant slot {slot} (SES-1)"),
            },
        }
    }

    /// Points `slot`'s `prev` at `prev`; no slot (after the tail) means the
    /// tail itself.
    fn set_prev(&mut self, slot: Option<usize>, prev: Option<usize>) {
        match slot {
            None => self.tail = prev,
            Some(slot) => match self.nodes.get_mut(slot) {
                Some(node) => node.prev = prev,
                None => debug_assert!(false, "link to vacant slot {slot} (SES-1)"),
            },
        }
    }
}

/// The sessions [`SessionTable::expire`] removes, least recently active
/// first.
#[derive(Debug)]
#[must_use = "sessions expire only as the iterator is consumed"]
pub struct Expired<'a, K, V> {
    table: &'a mut SessionTable<K, V>,
    now: Instant,
}

impl<K: Copy + Eq + Hash, V> Iterator for Expired<'_, K, V> {
    type Item = Session<K, V>;

    fn next(&mut self) -> Option<Session<K, V>> {
        self.table.pop_expired(self.now)
    }
}

// Once the head is not due at `now`, nothing behind it is (SES-1).
impl<K: Copy + Eq + Hash, V> FusedIterator for Expired<'_, K, V> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct SessionKey {
        client: SocketAddr,
        orig_dst: SocketAddr,
    }

    const TIMEOUT: Duration = Duration::from_secs(30);
    const NS: Duration = Duration::from_nanos(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn traffic(packets: u64, bytes: u64) -> Traffic {
        Traffic { packets, bytes }
    }

    /// A distinct key for each `n < 2^24`.
    fn key(n: u32) -> SessionKey {
        let [_, a, b, c] = n.to_be_bytes();
        SessionKey {
            client: SocketAddr::from(([10, a, b, c], 40_000)),
            orig_dst: SocketAddr::from(([192, 0, 2, 53], 53)),
        }
    }

    fn table<V>(max_sessions: usize) -> SessionTable<SessionKey, V> {
        SessionTable::new(max_sessions, TIMEOUT).expect("valid limits")
    }

    fn insert<V>(
        t: &mut SessionTable<SessionKey, V>,
        key: SessionKey,
        value: V,
        now: Instant,
    ) -> SessionId {
        let inserted = t.insert(key, value, now).expect("new key");
        assert!(inserted.evicted.is_none(), "unexpected eviction");
        inserted.id
    }

    fn keys<V>(sessions: &[Session<SessionKey, V>]) -> Vec<SessionKey> {
        sessions.iter().map(Session::key).collect()
    }

    impl<V> SessionTable<SessionKey, V> {
        /// Walks everything (tests only) and checks SES-1, SES-2 and SES-5.
        fn check_invariants(&self) {
            let mut count = 0;
            let mut prev: Option<usize> = None;
            let mut last_seen: Option<Instant> = None;
            let mut cursor = self.head;
            while let Some(slot) = cursor {
                let node = self.nodes.get(slot).expect("list names a live slot");
                assert_eq!(node.prev, prev, "back link of slot {slot}");
                let at = node.session.last_activity;
                assert!(
                    last_seen.is_none_or(|before| before <= at),
                    "list out of order"
                );
                assert_eq!(self.by_key.get(&node.session.key), Some(&node.session.id));
                assert_eq!(node.session.id.slot(), slot);
                last_seen = Some(at);
                prev = Some(slot);
                cursor = node.next;
                count += 1;
                assert!(count <= self.nodes.len(), "cycle in the list");
            }
            assert_eq!(self.tail, prev, "tail is the last node");
            assert_eq!(count, self.nodes.len());
            assert_eq!(count, self.by_key.len());
            assert!(count <= self.max_sessions);
        }
    }

    #[test]
    fn new_refuses_limits_that_cannot_work() {
        assert_eq!(
            SessionTable::<SessionKey, ()>::new(0, TIMEOUT).err(),
            Some(LimitsError::ZeroSessions)
        );
        assert_eq!(
            SessionTable::<SessionKey, ()>::new(1, Duration::ZERO).err(),
            Some(LimitsError::ZeroTimeout)
        );
        if let Some(too_many) = MAX_SESSIONS.checked_add(1) {
            assert_eq!(
                SessionTable::<SessionKey, ()>::new(too_many, TIMEOUT).err(),
                Some(LimitsError::TooManySessions)
            );
        }
        let t = SessionTable::<SessionKey, ()>::new(7, TIMEOUT).expect("valid limits");
        assert_eq!((t.max_sessions(), t.idle_timeout()), (7, TIMEOUT));
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn session_expires_at_exactly_the_timeout_and_not_before() {
        let t0 = Instant::now();
        let mut t = table(10);
        let id = insert(&mut t, key(1), "a", t0);
        assert_eq!(t.next_deadline(), Some(t0 + TIMEOUT));

        assert_eq!(t.expire(t0 + TIMEOUT - NS).count(), 0);
        assert_eq!(t.lookup(&key(1)), Some(id));

        let gone: Vec<_> = t.expire(t0 + TIMEOUT).collect();
        assert_eq!(keys(&gone), [key(1)]);
        assert_eq!(*gone[0].value(), "a");
        assert!(t.is_empty());
        assert_eq!((t.lookup(&key(1)), t.get(id).is_none()), (None, true));
        assert_eq!(t.next_deadline(), None);
        t.check_invariants();
    }

    #[test]
    fn traffic_either_way_postpones_expiry_and_is_counted_per_direction() {
        for (direction, other) in [
            (Direction::ToUpstream, Direction::ToClient),
            (Direction::ToClient, Direction::ToUpstream),
        ] {
            let t0 = Instant::now();
            let mut t = table(10);
            let id = insert(&mut t, key(1), (), t0);
            assert!(t.touch(id, t0 + secs(20), direction, 100));
            assert!(t.touch(id, t0 + secs(20), direction, 20));

            assert_eq!(t.expire(t0 + TIMEOUT).count(), 0, "{direction:?}");
            assert_eq!(t.next_deadline(), Some(t0 + secs(20) + TIMEOUT));
            assert_eq!(t.expire(t0 + secs(20) + TIMEOUT - NS).count(), 0);

            let gone: Vec<_> = t.expire(t0 + secs(20) + TIMEOUT).collect();
            assert_eq!(keys(&gone), [key(1)], "{direction:?}");
            let s = &gone[0];
            assert_eq!(s.traffic(direction), traffic(2, 120));
            assert_eq!(s.traffic(other), Traffic::default());
            assert_eq!((s.started(), s.last_activity()), (t0, t0 + secs(20)));
        }
    }

    #[test]
    fn expiry_takes_every_due_session_least_recent_first_and_no_others() {
        let t0 = Instant::now();
        let mut t = table(10);
        let ids: Vec<_> = (0..5)
            .map(|n| insert(&mut t, key(n), n, t0 + secs(u64::from(n))))
            .collect();
        assert!(t.touch(ids[0], t0 + secs(10), Direction::ToClient, 1));
        let gone: Vec<_> = t.expire(t0 + secs(3) + TIMEOUT).collect();
        assert_eq!(keys(&gone), [key(1), key(2), key(3)]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.next_deadline(), Some(t0 + secs(4) + TIMEOUT));
        t.check_invariants();
    }

    #[test]
    fn full_table_evicts_the_least_recently_used_not_the_first_inserted() {
        let t0 = Instant::now();
        let mut t = table(3);
        let a = insert(&mut t, key(0), 'a', t0);
        let b = insert(&mut t, key(1), 'b', t0 + secs(1));
        let c = insert(&mut t, key(2), 'c', t0 + secs(2));
        assert!(t.touch(a, t0 + secs(3), Direction::ToUpstream, 1));

        let mut evicted = Vec::new();
        for (n, at) in [(3, 4), (4, 5), (5, 6)] {
            let inserted = t.insert(key(n), 'x', t0 + secs(at)).expect("new key");
            evicted.push(inserted.evicted.expect("table was full").id());
            assert_eq!(t.len(), 3);
            t.check_invariants();
        }
        assert_eq!(evicted, [b, c, a]);
    }

    #[test]
    fn eviction_hands_back_the_evicted_key_value_and_counters() {
        let t0 = Instant::now();
        let mut t = table(2);
        let old = insert(&mut t, key(1), String::from("socket 1"), t0);
        insert(&mut t, key(2), String::from("socket 2"), t0);
        assert!(t.touch(old, t0, Direction::ToUpstream, 64));
        let young = t.lookup(&key(2)).expect("present");
        assert!(t.touch(young, t0 + secs(1), Direction::ToClient, 1));

        let inserted = t
            .insert(key(3), String::from("socket 3"), t0 + secs(2))
            .expect("new key");
        let evicted = inserted.evicted.expect("table was full");
        assert_eq!((evicted.id(), evicted.key()), (old, key(1)));
        assert_eq!(evicted.traffic(Direction::ToUpstream), traffic(1, 64));
        assert_eq!(evicted.into_value(), "socket 1");
        assert_eq!((t.lookup(&key(1)), t.get(old).is_none()), (None, true));
        assert_eq!(t.len(), 2);
        t.check_invariants();
    }

    #[test]
    fn a_single_session_table_evicts_on_every_new_key() {
        let t0 = Instant::now();
        let mut t = table(1);
        let mut previous = insert(&mut t, key(0), 0, t0);
        for n in 1..5 {
            let inserted = t.insert(key(n), n, t0).expect("new key");
            let evicted = inserted.evicted.expect("table was full");
            assert_eq!((evicted.id(), evicted.into_value()), (previous, n - 1));
            previous = inserted.id;
            t.check_invariants();
        }
    }

    #[test]
    fn inserting_an_existing_key_is_refused_and_hands_the_value_back() {
        let t0 = Instant::now();
        let mut t = table(1);
        let id = insert(&mut t, key(1), "first", t0);
        let refused = t.insert(key(1), "second", t0).expect_err("key is taken");
        assert_eq!((refused.id, refused.value), (id, "second"));
        assert_eq!(t.get(id).map(Session::value), Some(&"first"));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn stale_id_is_rejected_after_removal_and_after_its_slot_is_reused() {
        let t0 = Instant::now();
        let mut t = table(4);
        let old = insert(&mut t, key(1), 1, t0);
        let removed = t.remove(old).expect("live");
        assert_eq!((removed.key(), removed.into_value()), (key(1), 1));

        assert!(t.get(old).is_none());
        assert!(t.get_mut(old).is_none());
        assert!(!t.touch(old, t0, Direction::ToClient, 1));
        assert!(t.remove(old).is_none());

        let new = insert(&mut t, key(2), 2, t0);
        assert_eq!(new.slot, old.slot, "the slab reuses the freed slot");
        assert!(t.get(old).is_none());
        assert!(t.get_mut(old).is_none());
        assert!(!t.touch(old, t0 + secs(1), Direction::ToClient, 1));
        assert!(t.remove(old).is_none());
        assert!(t.remove(SessionId::from_bits(old.to_bits())).is_none());

        let session = t.get(new).expect("untouched by the stale id");
        assert_eq!((*session.value(), session.last_activity()), (2, t0));
        assert_eq!(session.traffic(Direction::ToClient), Traffic::default());
        *t.get_mut(new).expect("live") = 20;
        assert_eq!(t.get(new).map(Session::value), Some(&20));
        t.check_invariants();
    }

    #[test]
    fn session_id_survives_a_round_trip_through_64_bits() {
        let t0 = Instant::now();
        let mut t = table(4);
        for n in 0..4 {
            let id = insert(&mut t, key(n), n, t0);
            assert_eq!(SessionId::from_bits(id.to_bits()), id);
            assert_eq!(
                t.get(SessionId::from_bits(id.to_bits())).map(Session::id),
                Some(id)
            );
        }
        for bits in [0, u64::MAX, 1 << 32, u64::from(u32::MAX)] {
            let _ = t.get(SessionId::from_bits(bits));
        }
    }

    #[test]
    fn a_clock_from_the_past_cannot_reorder_the_list() {
        let t0 = Instant::now();
        let mut t = table(3);
        let a = insert(&mut t, key(0), 'a', t0 + secs(10));
        let b = insert(&mut t, key(1), 'b', t0);
        assert_eq!(t.get(b).map(Session::last_activity), Some(t0 + secs(10)));
        assert!(t.touch(a, t0 + secs(5), Direction::ToUpstream, 1));
        assert_eq!(t.get(a).map(Session::last_activity), Some(t0 + secs(10)));
        t.check_invariants();
        let gone: Vec<_> = t.expire(t0 + secs(10) + TIMEOUT).map(|s| s.id()).collect();
        assert_eq!(gone, [b, a]);
    }

    #[test]
    fn expire_looks_at_one_session_when_none_of_100k_is_due() {
        const SESSIONS: u32 = 100_000;
        let t0 = Instant::now();
        let mut t = table(SESSIONS as usize);
        let step = Duration::from_micros(1);
        for n in 0..SESSIONS {
            insert(&mut t, key(n), n, t0 + step * n);
        }

        t.expire_visits = 0;
        assert_eq!(t.expire(t0 + TIMEOUT - NS).count(), 0);
        assert_eq!(t.expire_visits, 1, "SES-4: nothing due costs one look");

        // Sessions 0..=9 are due: ten removed, one more looked at.
        t.expire_visits = 0;
        let gone: Vec<u32> = t
            .expire(t0 + TIMEOUT + step * 9)
            .map(Session::into_value)
            .collect();
        assert_eq!(gone, (0..10).collect::<Vec<_>>());
        assert_eq!(
            t.expire_visits, 11,
            "SES-4: one look per expired session, plus one"
        );
        assert_eq!(t.len(), SESSIONS as usize - 10);
        t.check_invariants();
    }

    /// xorshift64: deterministic, so a failing seed replays exactly.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The naive reference: a Vec, scanned for everything.
    struct ModelSession {
        id: SessionId,
        key: SessionKey,
        value: u64,
        started: Instant,
        last_activity: Instant,
        /// Order of last insert or touch: the LRU order, ties included.
        stamp: u64,
        traffic: [Traffic; 2],
    }

    type Snapshot = (SessionId, SessionKey, u64, Instant, Instant, [Traffic; 2]);

    impl ModelSession {
        fn snapshot(&self) -> Snapshot {
            (
                self.id,
                self.key,
                self.value,
                self.started,
                self.last_activity,
                self.traffic,
            )
        }
    }

    fn snapshot(s: &Session<SessionKey, u64>) -> Snapshot {
        let traffic = [
            s.traffic(Direction::ToUpstream),
            s.traffic(Direction::ToClient),
        ];
        (
            s.id(),
            s.key(),
            *s.value(),
            s.started(),
            s.last_activity(),
            traffic,
        )
    }

    fn direction_index(direction: Direction) -> usize {
        match direction {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        }
    }

    /// How often the simulation hit each interesting case, so that a test
    /// which never evicts or never meets a stale id cannot pass unnoticed.
    #[derive(Debug, Default)]
    struct Seen {
        duplicates: usize,
        evictions: usize,
        expired: usize,
        stale_touches: usize,
        stale_removes: usize,
    }

    fn simulate(seed: u64, steps: usize) -> Seen {
        const MAX: usize = 24;
        const KEYS: u64 = 40;
        let timeout = Duration::from_millis(2_000);
        let mut rng = XorShift(seed);
        let mut t = SessionTable::<SessionKey, u64>::new(MAX, timeout).expect("valid limits");
        let mut model: Vec<ModelSession> = Vec::new();
        let mut issued: Vec<SessionId> = Vec::new();
        let mut stamp = 0;
        let mut now = Instant::now();
        let mut seen = Seen::default();

        for step in 0..steps {
            let ctx = format!("seed {seed} step {step}");
            // Small steps fill the table (evictions) and zero ones make ties in
            // last activity; a rare long gap expires many sessions at once.
            now += Duration::from_millis(match rng.below(100) {
                0 => rng.below(3_000),
                _ => rng.below(3) * rng.below(20),
            });
            stamp += 1;
            // Mostly live ids, sometimes any id ever issued (likely stale).
            let pick_id = |rng: &mut XorShift, model: &[ModelSession]| {
                if !model.is_empty() && rng.below(3) != 0 {
                    model[rng.below(model.len() as u64) as usize].id
                } else if issued.is_empty() {
                    SessionId::from_bits(rng.below(u64::MAX))
                } else {
                    issued[rng.below(issued.len() as u64) as usize]
                }
            };
            match rng.below(100) {
                0..35 => {
                    let k = key(rng.below(KEYS) as u32);
                    let value = step as u64;
                    match model.iter().find(|m| m.key == k) {
                        Some(m) => {
                            let refused = t.insert(k, value, now).expect_err(&ctx);
                            assert_eq!((refused.id, refused.value), (m.id, value), "{ctx}");
                            seen.duplicates += 1;
                        }
                        None => {
                            let expected_evicted = (model.len() == MAX).then(|| {
                                let lru = (0..model.len()).min_by_key(|&i| model[i].stamp);
                                model
                                    .remove(lru.expect("full model is not empty"))
                                    .snapshot()
                            });
                            let inserted = t.insert(k, value, now).expect(&ctx);
                            assert_eq!(
                                inserted.evicted.as_ref().map(snapshot),
                                expected_evicted,
                                "{ctx}"
                            );
                            seen.evictions += usize::from(inserted.evicted.is_some());
                            issued.push(inserted.id);
                            model.push(ModelSession {
                                id: inserted.id,
                                key: k,
                                value,
                                started: now,
                                last_activity: now,
                                stamp,
                                traffic: [Traffic::default(); 2],
                            });
                        }
                    }
                }
                35..70 => {
                    let id = pick_id(&mut rng, &model);
                    let direction = if rng.below(2) == 0 {
                        Direction::ToUpstream
                    } else {
                        Direction::ToClient
                    };
                    let bytes = rng.below(1500) as usize;
                    let live = model.iter_mut().find(|m| m.id == id);
                    let expected = live.is_some();
                    if let Some(m) = live {
                        m.last_activity = now;
                        m.stamp = stamp;
                        m.traffic[direction_index(direction)].count(bytes);
                    }
                    assert_eq!(t.touch(id, now, direction, bytes), expected, "{ctx}");
                    seen.stale_touches += usize::from(!expected);
                }
                70..80 => {
                    let id = pick_id(&mut rng, &model);
                    let expected = model
                        .iter()
                        .position(|m| m.id == id)
                        .map(|i| model.remove(i).snapshot());
                    seen.stale_removes += usize::from(expected.is_none());
                    assert_eq!(t.remove(id).as_ref().map(snapshot), expected, "{ctx}");
                }
                80..95 => {
                    let mut expected: Vec<&ModelSession> = model
                        .iter()
                        .filter(|m| now.duration_since(m.last_activity) >= timeout)
                        .collect();
                    expected.sort_by_key(|m| m.stamp);
                    let expected: Vec<Snapshot> = expected.iter().map(|m| m.snapshot()).collect();
                    model.retain(|m| now.duration_since(m.last_activity) < timeout);
                    let got: Vec<Snapshot> = t.expire(now).map(|s| snapshot(&s)).collect();
                    assert_eq!(got, expected, "{ctx}");
                    seen.expired += got.len();
                }
                _ => {
                    let k = key(rng.below(KEYS) as u32);
                    let expected = model.iter().find(|m| m.key == k).map(|m| m.id);
                    assert_eq!(t.lookup(&k), expected, "{ctx}");
                }
            }

            t.check_invariants();
            assert_eq!(t.len(), model.len(), "{ctx}");
            let lru = model.iter().min_by_key(|m| m.stamp);
            assert_eq!(
                t.next_deadline(),
                lru.map(|m| m.last_activity + timeout),
                "{ctx}"
            );
            for m in &model {
                assert_eq!(t.get(m.id).map(snapshot), Some(m.snapshot()), "{ctx}");
                assert_eq!(t.lookup(&m.key), Some(m.id), "{ctx}");
            }
            // A sample, not all: checking every id ever issued each step
            // would make the test quadratic.
            for _ in 0..4.min(issued.len()) {
                let id = issued[rng.below(issued.len() as u64) as usize];
                let live = model.iter().any(|m| m.id == id);
                assert_eq!(t.get(id).is_some(), live, "{ctx}: SES-3 for {id:?}");
            }
        }
        seen
    }

    #[test]
    fn random_operations_match_a_naive_model() {
        for seed in [1, 0x9e37_79b9_7f4a_7c15, 0xdead_beef, 42] {
            let seen = simulate(seed, 5_000);
            let Seen {
                duplicates,
                evictions,
                expired,
                stale_touches,
                stale_removes,
            } = seen;
            assert!(
                [duplicates, evictions, expired, stale_touches, stale_removes]
                    .iter()
                    .all(|&n| n > 0),
                "seed {seed} missed a case: {seen:?}"
            );
        }
    }
}
