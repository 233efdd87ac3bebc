//! Where upstream connections come from (`--source`), and what happens when
//! no source port is left towards a destination.
//!
//! Every connection to one server ip:port needs a local (address, port) of
//! its own, and an upstream socket the proxy closes first holds its 4-tuple
//! in TIME_WAIT for 60 s. With one source address and the default port range
//! (28,232 ports) that is ~470 new connections/s per server ip:port, after a
//! burst of 28,232. Each `--source` address brings a port range of its own;
//! `tcp_tw_reuse=1` lets a port be reused after about a second.
//!
//! What must stay true:
//! - SRC-1 (in turn, per family): a worker takes its family's `--source`
//!   addresses in turn, one step per connection, starting from its worker
//!   id so that workers do not all begin on the same one. With none for a
//!   family, the host chooses (an unbound socket).
//! - SRC-2 (try the others before failing): when connect says EADDRNOTAVAIL
//!   (no port left towards that destination from that address), the next
//!   address of the family is tried, each at most once per connection.
//! - SRC-3 (one warning per episode, for the whole process): the first
//!   connect that fails for want of a source port begins an episode and is
//!   warned about; the episode ends at the first connect that succeeds
//!   `EPISODE_QUIET` or more after the last failure, which is logged with how
//!   many failed and for how long. Failures in between only count.
//!   Successes towards other servers during the episode do not end it.
//! - SRC-4 (no search that cannot succeed): after EADDRNOTAVAIL from a
//!   (source address, destination), that pair is not tried again for
//!   `NO_PORT_BACKOFF`; its clients are reset as if it had been. A connect
//!   that finds no port has searched the whole port range (28,232 lookups,
//!   measured at several ms of kernel CPU each here), while ports come free
//!   only as TIME_WAITs expire: without the pause, the clients of one
//!   exhausted server would take the proxy's CPUs from everyone else.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long without a failure before a success ends an episode (SRC-3):
/// connects to other servers keep succeeding while one server's ports are
/// gone, and each of those must not end the episode and let the next
/// failure warn again.
pub const EPISODE_QUIET: Duration = Duration::from_secs(1);

/// How long a (source, destination) that had no free port is left alone
/// (SRC-4). Ports free at the rate the TIME_WAITs were made a minute
/// earlier; those that free meanwhile wait at most this long, and the
/// clients that come after the pause take them, so a busy server loses no
/// throughput. At this length a worker spends at most ten whole-range
/// searches a second on an exhausted destination.
pub const NO_PORT_BACKOFF: Duration = Duration::from_millis(100);
/// Pairs remembered before the expired ones are swept out.
const NO_PORT_SWEEP: usize = 1024;

/// One worker's memory of where no port was free (SRC-4). `None`: the
/// host's own choice of source address.
#[derive(Debug, Default)]
pub struct NoPort {
    until: HashMap<(Option<IpAddr>, SocketAddr), Instant>,
}

impl NoPort {
    /// Should a connect from `src` to `dst` be skipped for now?
    pub fn skip(&self, now: Instant, src: Option<IpAddr>, dst: SocketAddr) -> bool {
        !self.until.is_empty() && self.until.get(&(src, dst)).is_some_and(|t| now < *t)
    }

    /// A connect from `src` to `dst` found no free port.
    pub fn failed(&mut self, now: Instant, src: Option<IpAddr>, dst: SocketAddr) {
        if self.until.len() >= NO_PORT_SWEEP {
            self.until.retain(|_, t| *t > now);
        }
        self.until.insert((src, dst), now + NO_PORT_BACKOFF);
    }

    /// A connect from `src` to `dst` found a port.
    pub fn succeeded(&mut self, src: Option<IpAddr>, dst: SocketAddr) {
        if !self.until.is_empty() {
            self.until.remove(&(src, dst));
        }
    }
}

/// One worker's view of the `--source` addresses (SRC-1).
#[derive(Debug)]
pub struct Sources {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    next_v4: usize,
    next_v6: usize,
}

impl Sources {
    /// `start`: where this worker begins in each family's list (its id).
    pub fn new(all: &[IpAddr], start: usize) -> Sources {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = all.iter().partition(|ip| ip.is_ipv4());
        Sources {
            next_v4: if v4.is_empty() { 0 } else { start % v4.len() },
            next_v6: if v6.is_empty() { 0 } else { start % v6.len() },
            v4,
            v6,
        }
    }

    /// The addresses to try, in order, for one connection to a destination
    /// of this family (SRC-2); empty when the host chooses. Advances the turn.
    pub fn for_connection(&mut self, v6: bool) -> impl Iterator<Item = IpAddr> + '_ {
        let (list, next) = if v6 {
            (&self.v6, &mut self.next_v6)
        } else {
            (&self.v4, &mut self.next_v4)
        };
        let start = *next;
        if !list.is_empty() {
            *next = (start + 1) % list.len();
        }
        (0..list.len()).map(move |i| list[(start + i) % list.len()])
    }
}

/// A run of connects that failed for want of a source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Episode {
    pub started: Instant,
    pub last_failure: Instant,
    pub failed: u64,
    /// The destination of the first failure, for the warning.
    pub first_dst: SocketAddr,
}

/// The episode logic of SRC-3, without locks: unit-tested on its own.
#[derive(Debug, Default)]
pub struct EpisodeState(Option<Episode>);

impl EpisodeState {
    /// A connect failed for want of a source port. `true`: an episode
    /// begins with it (warn).
    pub fn failed(&mut self, now: Instant, dst: SocketAddr) -> bool {
        match &mut self.0 {
            Some(e) => {
                e.failed += 1;
                e.last_failure = now;
                false
            }
            None => {
                self.0 = Some(Episode {
                    started: now,
                    last_failure: now,
                    failed: 1,
                    first_dst: dst,
                });
                true
            }
        }
    }

    /// A connect succeeded. The episode that this ends, if it does.
    pub fn succeeded(&mut self, now: Instant) -> Option<Episode> {
        match self.0 {
            Some(e) if now.saturating_duration_since(e.last_failure) >= EPISODE_QUIET => {
                self.0 = None;
                Some(e)
            }
            _ => None,
        }
    }

    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }
}

/// [`EpisodeState`] shared by the workers: a connect that succeeds while no
/// episode runs costs one relaxed load of a flag that is rarely written.
#[derive(Debug, Default)]
pub struct Exhaustion {
    active: AtomicBool,
    state: Mutex<EpisodeState>,
}

impl Exhaustion {
    fn lock(&self) -> std::sync::MutexGuard<'_, EpisodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See [`EpisodeState::failed`].
    pub fn failed(&self, now: Instant, dst: SocketAddr) -> bool {
        let mut s = self.lock();
        let began = s.failed(now, dst);
        self.active.store(true, Ordering::Release);
        began
    }

    /// See [`EpisodeState::succeeded`].
    pub fn succeeded(&self, now: Instant) -> Option<Episode> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        let mut s = self.lock();
        let ended = s.succeeded(now);
        self.active.store(s.is_active(), Ordering::Release);
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn each_family_takes_its_own_addresses_in_turn() {
        let all = ips(&["198.19.0.1", "2001:2::1", "198.19.0.3", "198.19.0.4"]);
        let mut s = Sources::new(&all, 0);
        let first: Vec<IpAddr> = (0..4)
            .map(|_| s.for_connection(false).next().unwrap())
            .collect();
        assert_eq!(
            first,
            ips(&["198.19.0.1", "198.19.0.3", "198.19.0.4", "198.19.0.1"])
        );
        assert_eq!(
            s.for_connection(true).collect::<Vec<_>>(),
            ips(&["2001:2::1"])
        );
        assert_eq!(
            s.for_connection(true).collect::<Vec<_>>(),
            ips(&["2001:2::1"])
        );
    }

    #[test]
    fn a_connection_may_try_every_address_of_its_family_once_starting_at_its_turn() {
        let all = ips(&["198.19.0.1", "198.19.0.3", "198.19.0.4"]);
        let mut s = Sources::new(&all, 0);
        let _ = s.for_connection(false);
        assert_eq!(
            s.for_connection(false).collect::<Vec<_>>(),
            ips(&["198.19.0.3", "198.19.0.4", "198.19.0.1"])
        );
    }

    #[test]
    fn workers_start_at_different_addresses_and_none_means_the_host_chooses() {
        let all = ips(&["198.19.0.1", "198.19.0.3"]);
        let mut w0 = Sources::new(&all, 0);
        let mut w1 = Sources::new(&all, 1);
        let mut w2 = Sources::new(&all, 2);
        assert_eq!(w0.for_connection(false).next(), Some(all[0]));
        assert_eq!(w1.for_connection(false).next(), Some(all[1]));
        assert_eq!(w2.for_connection(false).next(), Some(all[0]));
        assert_eq!(w0.for_connection(true).next(), None, "no IPv6 source");
        assert_eq!(Sources::new(&[], 3).for_connection(false).count(), 0);
    }

    #[test]
    fn a_pair_without_ports_is_left_alone_for_a_while_and_only_that_pair() {
        let t0 = Instant::now();
        let dst: SocketAddr = "198.19.0.2:80".parse().unwrap();
        let other: SocketAddr = "198.19.0.2:81".parse().unwrap();
        let a: Option<IpAddr> = Some("198.19.0.1".parse().unwrap());
        let b: Option<IpAddr> = Some("198.19.0.3".parse().unwrap());
        let mut n = NoPort::default();
        assert!(!n.skip(t0, a, dst));
        n.failed(t0, a, dst);
        assert!(n.skip(t0, a, dst));
        assert!(n.skip(t0 + NO_PORT_BACKOFF / 2, a, dst));
        assert!(
            !n.skip(t0 + NO_PORT_BACKOFF, a, dst),
            "tried again after the pause"
        );
        assert!(!n.skip(t0, b, dst), "another source has its own ports");
        assert!(!n.skip(t0, a, other), "so has another destination");
        assert!(!n.skip(t0, None, dst));
        n.succeeded(a, dst);
        assert!(!n.skip(t0, a, dst));
        // Expired pairs are swept out instead of piling up.
        for port in 0..(NO_PORT_SWEEP as u16 + 10) {
            n.failed(t0, a, SocketAddr::new(dst.ip(), port));
        }
        n.failed(t0 + NO_PORT_BACKOFF, b, dst);
        assert!(n.until.len() < NO_PORT_SWEEP, "{}", n.until.len());
    }

    #[test]
    fn an_episode_warns_once_and_ends_only_after_a_quiet_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let dst: SocketAddr = "198.19.0.2:80".parse().unwrap();
        let other: SocketAddr = "198.19.0.9:80".parse().unwrap();
        let mut e = EpisodeState::default();
        assert_eq!(e.succeeded(at(0)), None, "no episode, nothing ends");
        assert!(e.failed(at(10), dst), "the first failure begins one");
        assert!(!e.failed(at(20), dst));
        // Connections to another server succeed meanwhile: not the end.
        assert_eq!(e.succeeded(at(30)), None);
        assert!(!e.failed(at(500), other));
        assert_eq!(e.succeeded(at(1400)), None, "only 0.9 s since a failure");
        let ended = e.succeeded(at(1500)).expect("a quiet second: it ends");
        assert_eq!(
            ended,
            Episode {
                started: at(10),
                last_failure: at(500),
                failed: 3,
                first_dst: dst
            }
        );
        assert!(!e.is_active());
        assert_eq!(e.succeeded(at(1600)), None);
        assert!(e.failed(at(2000), dst), "a new episode warns again");
    }

    #[test]
    fn shared_state_raises_its_flag_only_during_an_episode() {
        let t0 = Instant::now();
        let x = Exhaustion::default();
        let dst: SocketAddr = "[2001:2::2]:443".parse().unwrap();
        assert_eq!(x.succeeded(t0), None);
        assert!(x.failed(t0, dst));
        assert!(x.active.load(Ordering::Relaxed));
        assert!(!x.failed(t0, dst));
        let ended = x.succeeded(t0 + EPISODE_QUIET).expect("ends");
        assert_eq!(ended.failed, 2);
        assert!(!x.active.load(Ordering::Relaxed));
    }
}
