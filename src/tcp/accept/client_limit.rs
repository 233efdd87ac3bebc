//! `--max-conns-per-client`: how many TCP connections one client may hold
//! open, all workers together, so that one client cannot take every place
//! under `--max-conns`. A client is a [`Key`]: its address cut to
//! `--client-prefix` (each IPv4 address and each IPv6 /64 by default; a
//! v4-mapped IPv6 address is its IPv4 address). SO_REUSEPORT spreads one
//! client's connections over all workers, so the counts are shared: a fixed
//! array of mutex-guarded maps, sharded by a hash of the key, touched once
//! when a client is admitted and once when its connection drops, never on
//! the data path. Over the cap the new connection is reset before any
//! upstream connect, counted, and its episode is logged.
//!
//! What must stay true (numbered after accept.rs's ACC-1):
//! - ACC-2 (one client place per admitted client): a client admitted under
//!   a cap holds exactly one [`ClientPlace`] for its key, taken after its
//!   `--max-conns` place (ACC-1) and the loop checks, held by the admitted
//!   client, a parked one, then its connection, and given back when that
//!   drops — closed, failed connect, reset, drained, aborted, unwound by a
//!   panic — exactly once. A key's count never passes the cap, whichever
//!   workers hold its places.
//! - ACC-3 (over the cap: reset, holding nothing): a client whose key holds
//!   the cap is reset (its socket was born with linger 0, close.rs CONN-8:
//!   RST, never FIN) before any upstream connect, and counted; its
//!   `--max-conns` place is given back with it, so a client reset for its
//!   own cap never holds a place another client could have had.
//! - ACC-4 (bounded memory): a key has an entry only while it holds a place
//!   (an entry at zero is removed, and a shard's table shrinks when mostly
//!   empty), so the counts cost what the live connections do; episodes are
//!   at most [`MAX_EPISODES`].
//! - ACC-5 (seen once, never a flood): the first reset of a key starts its
//!   episode with one warning naming the key as a prefix
//!   (`198.18.0.2/32`, `2001:2:0:1::/64`); the episode ends once its key
//!   has gone [`EPISODE_QUIET`] without a reset, logged with how long it
//!   lasted and how many were reset. At most [`LOG_BURST`] episodes are
//!   logged per [`LOG_WINDOW`]; the others are counted and summed up in one
//!   line when the window ends. Episodes are looked at only on a reset and
//!   by a worker's sweep while one is open, never per byte.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;

use crate::config::ClientPrefix;

/// Shards of the counts. Two workers per core contend on one only when
/// their clients' keys hash alike; 64 keeps that rare on any core count we
/// run on, at 64 empty maps' cost.
const SHARDS: usize = 64;
/// A key's episode ends after this long without a reset (ACC-5): long
/// against a client's retries (so a client hammering at its cap has one
/// episode, not one per retry), short against an operator's attention.
pub const EPISODE_QUIET: Duration = Duration::from_secs(1);
/// Episodes logged one by one per `LOG_WINDOW` (ACC-5). A few clients at
/// their cap are each worth a line; a thousand are a pattern worth one.
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(60);
/// Episodes tracked at once; resets of other keys beyond it are only
/// counted (ACC-4: a flood of distinct clients each at its cap cannot grow
/// the table without bound).
pub const MAX_EPISODES: usize = 4096;
/// How often a worker looks for episodes to end while any is open.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// One client, as `--max-conns-per-client` counts it: an address cut to
/// its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    net: IpAddr,
    len: u8,
}

impl Key {
    /// The client `ip` belongs to: a v4-mapped IPv6 address counts as its
    /// IPv4 address, and the address is cut to its family's prefix length.
    pub fn of(ip: IpAddr, prefix: ClientPrefix) -> Key {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let len = prefix.v4.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Key {
                    net: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)),
                    len,
                }
            }
            IpAddr::V6(a) => {
                let len = prefix.v6.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                Key {
                    net: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
                    len,
                }
            }
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// One shard's counts (ACC-2, ACC-4): pure accounting, unit-tested here.
#[derive(Debug, Default)]
struct Counts(HashMap<Key, u32>);

impl Counts {
    /// Take a place for `key` under `max`; false, taking none, at the cap.
    fn take(&mut self, key: Key, max: u32) -> bool {
        match self.0.get_mut(&key) {
            Some(n) if *n >= max => false,
            Some(n) => {
                *n += 1;
                true
            }
            None => {
                self.0.insert(key, 1);
                true
            }
        }
    }

    /// Give back a place of `key`; the entry goes at zero (ACC-4).
    fn release(&mut self, key: Key) {
        let Some(n) = self.0.get_mut(&key) else {
            return; // cannot happen: every place was counted when taken
        };
        *n -= 1;
        if *n == 0 {
            self.0.remove(&key);
            // A table keeps its size after a crowd has gone: shrink it once
            // it is three quarters empty (amortised: the next shrink needs
            // half of what is left to go).
            let (len, cap) = (self.0.len(), self.0.capacity());
            if cap > 64 && len < cap / 4 {
                self.0.shrink_to(len * 2);
            }
        }
    }

    #[cfg(test)]
    fn get(&self, key: &Key) -> u32 {
        self.0.get(key).copied().unwrap_or(0)
    }
}

/// One key's stretch of resets at its cap (ACC-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Episode {
    started: Instant,
    last: Instant,
    resets: u64,
    /// Logged one by one (within `LOG_BURST`), or only counted.
    logged: bool,
}

/// What the log is to say (ACC-5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// `key` was reset at its cap for the first time in a while.
    Started(Key),
    /// `key` went `EPISODE_QUIET` without a reset, or the process is
    /// stopping (`shutdown`): `resets` over `lasted` (from the first reset
    /// to the last).
    Ended {
        key: Key,
        lasted: Duration,
        resets: u64,
        shutdown: bool,
    },
    /// The log window is over, and in it `clients` episodes beyond
    /// `LOG_BURST` began unlogged; `resets` connections were reset that no
    /// line of their own told about.
    Unlogged { clients: u64, resets: u64 },
}

/// The episodes of the whole process, without locks: unit-tested here.
#[derive(Debug, Default)]
struct Episodes {
    open: HashMap<Key, Episode>,
    /// When the log window began: the first episode that started in it,
    /// or the first reset not tracked (`MAX_EPISODES`).
    window: Option<Instant>,
    logged_in_window: u32,
    unlogged_clients: u64,
    unlogged_resets: u64,
}

impl Episodes {
    /// `key` was reset at its cap.
    fn reset(&mut self, key: Key, now: Instant, notes: &mut Vec<Note>) {
        self.roll_window(now, notes);
        if let Some(e) = self.open.get_mut(&key) {
            e.resets += 1;
            e.last = now;
            if !e.logged {
                self.unlogged_resets += 1;
            }
            return;
        }
        if self.open.len() >= MAX_EPISODES {
            // Summed up when this window ends, like an unlogged episode's.
            self.window.get_or_insert(now);
            self.unlogged_resets += 1;
            return;
        }
        self.window.get_or_insert(now);
        let logged = self.logged_in_window < LOG_BURST;
        if logged {
            self.logged_in_window += 1;
            notes.push(Note::Started(key));
        } else {
            self.unlogged_clients += 1;
            self.unlogged_resets += 1;
        }
        self.open.insert(
            key,
            Episode {
                started: now,
                last: now,
                resets: 1,
                logged,
            },
        );
    }

    /// End the episodes quiet for `EPISODE_QUIET` (all of them if `all`:
    /// shutdown), and close the log window if it is over.
    fn sweep(&mut self, now: Instant, all: bool, notes: &mut Vec<Note>) {
        self.open.retain(|key, e| {
            let over = all || now.saturating_duration_since(e.last) >= EPISODE_QUIET;
            if over && e.logged {
                notes.push(Note::Ended {
                    key: *key,
                    lasted: e.last.saturating_duration_since(e.started),
                    resets: e.resets,
                    shutdown: all,
                });
            }
            !over
        });
        if all {
            self.close_window(notes);
        } else {
            self.roll_window(now, notes);
        }
    }

    /// A window that is over says what it did not log, and a new one can
    /// begin.
    fn roll_window(&mut self, now: Instant, notes: &mut Vec<Note>) {
        if self
            .window
            .is_some_and(|w| now.saturating_duration_since(w) >= LOG_WINDOW)
        {
            self.close_window(notes);
        }
    }

    fn close_window(&mut self, notes: &mut Vec<Note>) {
        if self.unlogged_clients > 0 || self.unlogged_resets > 0 {
            notes.push(Note::Unlogged {
                clients: self.unlogged_clients,
                resets: self.unlogged_resets,
            });
        }
        self.window = None;
        self.logged_in_window = 0;
        self.unlogged_clients = 0;
        self.unlogged_resets = 0;
    }

    /// Anything left to end or to sum up.
    fn pending(&self) -> bool {
        !self.open.is_empty() || self.window.is_some()
    }
}

/// The counts and episodes all TCP workers share.
pub struct ClientLimits {
    max: u32,
    prefix: ClientPrefix,
    /// Picks a key's shard; seeded per process, so nobody outside can aim
    /// their keys at one shard.
    hasher: RandomState,
    shards: Box<[Mutex<Counts>]>,
    episodes: Mutex<Episodes>,
    /// `episodes.pending()`, readable without the lock.
    pending: AtomicBool,
}

impl fmt::Debug for ClientLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientLimits")
            .field("max", &self.max)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A lock whose holder panicked left a consistent record (every update is
/// a few plain assignments): use it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClientLimits {
    pub fn new(max: u32, prefix: ClientPrefix) -> ClientLimits {
        ClientLimits {
            max,
            prefix,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            episodes: Mutex::default(),
            pending: AtomicBool::new(false),
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    fn shard(&self, key: &Key) -> &Mutex<Counts> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// A place for the client at `ip` (ACC-2), or, at its cap, its key
    /// (ACC-3), taking none.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<ClientPlace, Key> {
        let key = Key::of(ip, self.prefix);
        if lock(self.shard(&key)).take(key, self.max) {
            Ok(ClientPlace {
                limits: Arc::clone(self),
                key,
            })
        } else {
            Err(key)
        }
    }

    /// Places `key` holds now.
    #[cfg(test)]
    pub fn count(&self, key: &Key) -> u32 {
        lock(self.shard(key)).get(key)
    }

    /// Places the client at `ip` holds now.
    #[cfg(test)]
    pub fn count_of(&self, ip: IpAddr) -> u32 {
        self.count(&Key::of(ip, self.prefix))
    }

    /// `key` was reset at its cap: its episode, logged (ACC-5).
    pub fn over(&self, key: Key, now: Instant) {
        let mut notes = Vec::new();
        {
            let mut e = lock(&self.episodes);
            e.reset(key, now, &mut notes);
            self.pending.store(e.pending(), Ordering::Release);
        }
        self.log(&notes);
    }

    /// Whether an episode is open or a window not yet summed up: then a
    /// worker sweeps every `SWEEP_EVERY`.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// End the quiet episodes (or, at shutdown, `all`), and log them.
    pub fn sweep(&self, now: Instant, all: bool) {
        if !self.pending() {
            return;
        }
        let mut notes = Vec::new();
        {
            let mut e = lock(&self.episodes);
            e.sweep(now, all, &mut notes);
            self.pending.store(e.pending(), Ordering::Release);
        }
        self.log(&notes);
    }

    fn log(&self, notes: &[Note]) {
        let max = self.max;
        for n in notes {
            match n {
                Note::Started(key) => warn!(
                    "client {key} is at --max-conns-per-client {max}: its new connections are \
                     reset until some of its {max} close (counted in tproxyd_tcp_client_limit_total)"
                ),
                Note::Ended {
                    key,
                    lasted,
                    resets,
                    shutdown: false,
                } => warn!(
                    "client {key}: no reset at --max-conns-per-client {max} for {}s: {resets} \
                     connections reset over {:.1}s",
                    EPISODE_QUIET.as_secs(),
                    lasted.as_secs_f64()
                ),
                Note::Ended {
                    key,
                    lasted,
                    resets,
                    shutdown: true,
                } => warn!(
                    "client {key}: {resets} connections reset at --max-conns-per-client {max} over \
                     {:.1}s, until tproxyd stopped",
                    lasted.as_secs_f64()
                ),
                Note::Unlogged { clients, resets } => warn!(
                    "--max-conns-per-client {max}: {clients} more clients reached their cap within \
                     {}s and {resets} connections were reset without a line of their own (at most \
                     {LOG_BURST} clients are logged one by one per {}s)",
                    LOG_WINDOW.as_secs(),
                    LOG_WINDOW.as_secs()
                ),
            }
        }
    }
}

/// One client's place under `--max-conns-per-client` (ACC-2), given back
/// when it drops.
pub struct ClientPlace {
    limits: Arc<ClientLimits>,
    key: Key,
}

impl fmt::Debug for ClientPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientPlace({})", self.key)
    }
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        lock(self.limits.shard(&self.key)).release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: ClientPrefix = ClientPrefix { v4: 32, v6: 64 };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(s: &str, prefix: ClientPrefix) -> String {
        Key::of(ip(s), prefix).to_string()
    }

    #[test]
    fn a_client_is_its_address_cut_to_its_familys_prefix() {
        assert_eq!(key("198.18.0.2", DEFAULT), "198.18.0.2/32");
        assert_eq!(key("2001:2:0:1::2", DEFAULT), "2001:2:0:1::/64");
        assert_eq!(key("2001:2:0:1:ffff:1:2:3", DEFAULT), "2001:2:0:1::/64");
        let wide = ClientPrefix { v4: 24, v6: 48 };
        assert_eq!(key("198.18.0.77", wide), "198.18.0.0/24");
        assert_eq!(key("2001:2:0:1::2", wide), "2001:2::/48");
        let odd = ClientPrefix { v4: 1, v6: 127 };
        assert_eq!(key("198.18.0.77", odd), "128.0.0.0/1");
        assert_eq!(key("2001:2::3", odd), "2001:2::2/127");
        let full = ClientPrefix { v4: 32, v6: 128 };
        assert_eq!(key("2001:2::3", full), "2001:2::3/128");
        // Same /64, same client; another /64, another.
        assert_eq!(
            Key::of(ip("2001:2:0:1::2"), DEFAULT),
            Key::of(ip("2001:2:0:1::12"), DEFAULT)
        );
        assert_ne!(
            Key::of(ip("2001:2:0:1::2"), DEFAULT),
            Key::of(ip("2001:2:0:3::2"), DEFAULT)
        );
    }

    #[test]
    fn a_v4_mapped_client_counts_as_its_ipv4_address() {
        assert_eq!(
            Key::of(ip("::ffff:198.18.0.2"), DEFAULT),
            Key::of(ip("198.18.0.2"), DEFAULT)
        );
        assert_eq!(key("::ffff:198.18.0.2", DEFAULT), "198.18.0.2/32");
    }

    #[test]
    fn counts_hold_the_cap_and_drop_entries_at_zero() {
        let a = Key::of(ip("198.18.0.2"), DEFAULT);
        let b = Key::of(ip("198.18.0.3"), DEFAULT);
        let mut c = Counts::default();
        assert!(c.take(a, 2) && c.take(a, 2));
        assert!(!c.take(a, 2), "at the cap");
        assert_eq!(c.get(&a), 2, "the refusal took nothing");
        assert!(c.take(b, 2), "another client has its own cap");
        c.release(a);
        assert!(c.take(a, 2), "a place freed is a place again");
        c.release(a);
        c.release(a);
        assert_eq!(c.get(&a), 0);
        assert!(!c.0.contains_key(&a), "no entry at zero");
        c.release(b);
        assert!(c.0.is_empty());
    }

    #[test]
    fn a_table_emptied_after_a_crowd_shrinks() {
        let mut c = Counts::default();
        let keys: Vec<Key> = (0..10_000u32)
            .map(|i| Key::of(IpAddr::V4(Ipv4Addr::from(0xC612_0000 + i)), DEFAULT))
            .collect();
        for k in &keys {
            assert!(c.take(*k, 1));
        }
        let peak = c.0.capacity();
        for k in &keys[10..] {
            c.release(*k);
        }
        assert_eq!(c.0.len(), 10);
        assert!(c.0.capacity() < peak / 16, "{} of {peak}", c.0.capacity());
        for k in &keys[..10] {
            c.release(*k);
        }
        assert!(c.0.is_empty());
    }

    #[test]
    fn places_are_given_back_when_they_drop_and_shared_across_threads() {
        let l = Arc::new(ClientLimits::new(5, DEFAULT));
        let a = ip("2001:2:0:1::2");
        let same = ip("2001:2:0:1::12");
        let other = ip("2001:2:0:3::2");
        let held: Vec<ClientPlace> = (0..5).map(|_| l.take(a).unwrap()).collect();
        let k = l.take(same).unwrap_err();
        assert_eq!(k.to_string(), "2001:2:0:1::/64");
        assert_eq!(l.count(&k), 5, "a refusal takes nothing");
        let o = l.take(other).expect("another /64 has its own cap");
        drop(held);
        assert_eq!(l.count(&k), 0);
        drop(o);
        // Four threads race for one client's 50 places.
        let max = 50;
        let l = Arc::new(ClientLimits::new(max, DEFAULT));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..2_000 {
                        if let Ok(p) = l.take(ip("198.18.0.2")) {
                            held.push(p);
                        }
                        if round % 3 == 0 {
                            held.pop();
                        }
                    }
                    held
                })
            })
            .collect();
        let held: Vec<Vec<ClientPlace>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let total: usize = held.iter().map(Vec::len).sum();
        let k = Key::of(ip("198.18.0.2"), DEFAULT);
        assert!(total <= max as usize, "{total} places under a cap of {max}");
        assert_eq!(l.count(&k) as usize, total);
        drop(held);
        assert_eq!(l.count(&k), 0, "every place given back");
        assert!(l.shards.iter().all(|s| lock(s).0.is_empty()));
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_episode_warns_once_and_ends_after_a_quiet_spell_with_its_count() {
        let t0 = Instant::now();
        let a = Key::of(ip("198.18.0.2"), DEFAULT);
        let b = Key::of(ip("2001:2:0:1::2"), DEFAULT);
        let mut e = Episodes::default();
        let mut notes = Vec::new();
        e.reset(a, at(t0, 0), &mut notes);
        e.reset(a, at(t0, 100), &mut notes);
        e.reset(b, at(t0, 150), &mut notes);
        e.reset(a, at(t0, 900), &mut notes);
        assert_eq!(notes, vec![Note::Started(a), Note::Started(b)]);
        notes.clear();
        e.sweep(at(t0, 1500), false, &mut notes);
        assert_eq!(
            notes,
            vec![Note::Ended {
                key: b,
                lasted: Duration::ZERO,
                resets: 1,
                shutdown: false
            }],
            "b is quiet since 0.15 s; a was reset 0.6 s ago"
        );
        notes.clear();
        e.sweep(at(t0, 1900), false, &mut notes);
        assert_eq!(
            notes,
            vec![Note::Ended {
                key: a,
                lasted: Duration::from_millis(900),
                resets: 3,
                shutdown: false
            }]
        );
        notes.clear();
        e.reset(a, at(t0, 2000), &mut notes);
        assert_eq!(notes, vec![Note::Started(a)], "a new episode warns again");
    }

    #[test]
    fn a_flood_of_clients_costs_a_burst_of_lines_then_one_per_window() {
        let t0 = Instant::now();
        let mut e = Episodes::default();
        let mut notes = Vec::new();
        let keys: Vec<Key> = (0..100u32)
            .map(|i| Key::of(IpAddr::V4(Ipv4Addr::from(0xC612_0000 + i)), DEFAULT))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            e.reset(*k, at(t0, i as u64), &mut notes);
            e.reset(*k, at(t0, i as u64), &mut notes);
        }
        let started = notes
            .iter()
            .filter(|n| matches!(n, Note::Started(_)))
            .count();
        assert_eq!(started, LOG_BURST as usize);
        assert_eq!(notes.len(), LOG_BURST as usize);
        notes.clear();
        e.sweep(at(t0, 5_000), false, &mut notes);
        assert_eq!(
            notes.len(),
            LOG_BURST as usize,
            "only the logged ones end aloud"
        );
        assert!(e.open.is_empty());
        notes.clear();
        e.sweep(at(t0, 30_000), false, &mut notes);
        assert!(notes.is_empty(), "the window is not over");
        e.sweep(at(t0, 60_000), false, &mut notes);
        assert_eq!(
            notes,
            vec![Note::Unlogged {
                clients: 100 - u64::from(LOG_BURST),
                resets: 2 * (100 - u64::from(LOG_BURST))
            }]
        );
        assert!(!e.pending(), "nothing left: workers stop sweeping");
        notes.clear();
        e.reset(keys[0], at(t0, 61_000), &mut notes);
        assert_eq!(
            notes,
            vec![Note::Started(keys[0])],
            "a new window logs again"
        );
    }

    #[test]
    fn episodes_are_bounded_and_shutdown_ends_them_all() {
        let t0 = Instant::now();
        let mut e = Episodes::default();
        let mut notes = Vec::new();
        for i in 0..(MAX_EPISODES as u32 + 100) {
            let k = Key::of(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)), DEFAULT);
            e.reset(k, t0, &mut notes);
        }
        assert_eq!(e.open.len(), MAX_EPISODES);
        notes.clear();
        e.sweep(t0, true, &mut notes);
        assert!(e.open.is_empty());
        assert!(
            notes[..LOG_BURST as usize]
                .iter()
                .all(|n| matches!(n, Note::Ended { shutdown: true, .. })),
            "{notes:?}"
        );
        assert_eq!(
            notes.len(),
            LOG_BURST as usize + 1,
            "the logged ones end, then the sum of the rest"
        );
        assert_eq!(
            notes.last(),
            Some(&Note::Unlogged {
                clients: (MAX_EPISODES - LOG_BURST as usize) as u64,
                resets: (MAX_EPISODES + 100 - LOG_BURST as usize) as u64
            })
        );
        assert!(!e.pending());
    }
}
