//! Episodes of paused accepting: the stretches of time in which clients wait
//! in tproxyd's accept queues (or, accepted on the last descriptor, for an
//! upstream socket) because it will not accept more — at `--max-conns`, or
//! out of descriptors. The kernel completes their handshakes, so nothing
//! refuses them and nothing tells them: the log and the metrics must.
//!
//! Both limits are the process's, not a worker's, so an episode is too. The
//! workers share one [`Pauses`]: the first worker to pause with somebody
//! waiting starts the episode (it warns, once for the whole process); each
//! worker that joins reports how many wait in its own queues as it reads them
//! while paused; the last one to see its queues drained ends it, with how
//! long it lasted and how many waited. This is pure bookkeeping, unit-tested
//! here; the worker reads the queues (sys::accept_queue) and logs.
//!
//! What must stay true:
//! - PAUSE-1: one start and one end per episode per process, whichever and
//!   however many workers take part; an episode ends only when every worker
//!   in it has left.
//! - PAUSE-2: nothing here is on the data path: a worker takes an episode's
//!   lock when it joins or leaves and when what it reports changes, all of
//!   which happen only while it is paused (at most every `ACCEPT_RETRY` per
//!   listener, or once per accept at the limit), never per byte.
//! - PAUSE-3: a worker leaves only after nobody has waited for it for
//!   [`QUIET`]: a tproxyd that hovers at its limit, a client now and then
//!   waiting for a moment, has one long episode, not two log lines per client.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long nobody must wait before a worker's part in an episode ends
/// (PAUSE-3). Long against the 100 ms between retries of a paused listener
/// (so a client arriving in a lull is seen in time to keep the episode
/// going), short against the minutes an overload lasts.
pub const QUIET: Duration = Duration::from_secs(1);

/// Why accepting paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `--max-conns` connections are open.
    MaxConns,
    /// accept(2) or socket(2) ran out of descriptors (EMFILE/ENFILE) or memory.
    FdLimit,
}

impl Reason {
    pub const ALL: [Reason; 2] = [Reason::MaxConns, Reason::FdLimit];
}

/// One episode, as all its workers together have seen it.
#[derive(Debug, Default)]
struct Episode {
    /// Workers taking part now; 0 between episodes.
    workers: usize,
    started: Option<Instant>,
    /// Clients waiting now: the sum of what each worker last reported.
    waiting: u64,
    /// The most `waiting` has been in this episode.
    peak: u64,
    /// Clients accepted, by the workers that have left, after waiting.
    accepted: u64,
    /// When the last nobody-waits was seen by a worker that left.
    drained: Option<Instant>,
}

/// What an episode came to, for its end line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// From the first pause with a client waiting to the moment the last
    /// worker saw nobody waiting (the `QUIET` after it is not counted).
    pub lasted: Duration,
    /// The most clients waiting at once, summed over the workers.
    pub peak: u64,
    /// Clients accepted after waiting.
    pub accepted: u64,
}

impl Episode {
    /// A worker joins; true when that starts the episode.
    fn join(&mut self, now: Instant) -> bool {
        self.workers += 1;
        if self.workers > 1 {
            return false;
        }
        *self = Episode {
            workers: 1,
            started: Some(now),
            ..Episode::default()
        };
        true
    }

    /// A worker that reported `old` waiting clients now sees `new`.
    fn report(&mut self, old: u64, new: u64) {
        self.waiting = (self.waiting + new).saturating_sub(old);
        self.peak = self.peak.max(self.waiting);
    }

    /// A worker leaves, having last reported `reported`, accepted `accepted`
    /// clients after they waited, and seen nobody waiting since `drained`.
    /// The summary when it was the last one in.
    fn leave(&mut self, reported: u64, accepted: u64, drained: Instant) -> Option<Summary> {
        self.report(reported, 0);
        self.accepted += accepted;
        self.drained = Some(self.drained.map_or(drained, |d| d.max(drained)));
        self.workers = self.workers.saturating_sub(1);
        if self.workers > 0 {
            return None;
        }
        let started = self.started.take()?;
        Some(Summary {
            lasted: self
                .drained
                .unwrap_or(drained)
                .saturating_duration_since(started),
            peak: self.peak,
            accepted: self.accepted,
        })
    }
}

/// The episodes all TCP workers share, one per reason.
#[derive(Debug, Default)]
pub struct Pauses {
    episodes: [Mutex<Episode>; Reason::ALL.len()],
}

impl Pauses {
    fn episode(&self, r: Reason) -> MutexGuard<'_, Episode> {
        // A worker that panicked holding the lock left a consistent record
        // (every update is a few plain assignments): use it.
        self.episodes[r as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A worker starts taking part; true when it starts the episode and so
    /// is the one to say so (PAUSE-1).
    pub fn join(&self, r: Reason, now: Instant) -> bool {
        self.episode(r).join(now)
    }

    /// A worker in the episode counts `new` clients waiting for it, where it
    /// last reported `old`.
    pub fn report(&self, r: Reason, old: u64, new: u64) {
        if old != new {
            self.episode(r).report(old, new);
        }
    }

    /// A worker leaves (see `Episode::leave`); the summary when the episode
    /// is over.
    pub fn leave(
        &self,
        r: Reason,
        reported: u64,
        accepted: u64,
        drained: Instant,
    ) -> Option<Summary> {
        self.episode(r).leave(reported, accepted, drained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn one_start_and_one_end_whatever_the_number_of_workers() {
        let p = Pauses::default();
        let t0 = Instant::now();
        assert!(p.join(Reason::MaxConns, t0), "the first worker starts it");
        assert!(!p.join(Reason::MaxConns, at(t0, 10)), "the second joins it");
        p.report(Reason::MaxConns, 0, 3);
        p.report(Reason::MaxConns, 0, 4);
        p.report(Reason::MaxConns, 3, 1); // worker one accepted two
        assert_eq!(p.leave(Reason::MaxConns, 1, 3, at(t0, 500)), None);
        let s = p
            .leave(Reason::MaxConns, 4, 4, at(t0, 400))
            .expect("the last one out ends it");
        assert_eq!(
            s,
            Summary {
                lasted: Duration::from_millis(500),
                peak: 7,
                accepted: 7
            }
        );
        // The other reason was never involved.
        assert!(p.join(Reason::FdLimit, t0));
    }

    #[test]
    fn a_new_episode_starts_from_nothing() {
        let p = Pauses::default();
        let t0 = Instant::now();
        assert!(p.join(Reason::FdLimit, t0));
        p.report(Reason::FdLimit, 0, 9);
        assert!(p.leave(Reason::FdLimit, 9, 9, at(t0, 100)).is_some());
        assert!(p.join(Reason::FdLimit, at(t0, 5000)), "a new episode");
        p.report(Reason::FdLimit, 0, 2);
        let s = p.leave(Reason::FdLimit, 2, 2, at(t0, 5250)).unwrap();
        assert_eq!(
            s,
            Summary {
                lasted: Duration::from_millis(250),
                peak: 2,
                accepted: 2
            }
        );
    }

    #[test]
    fn the_peak_is_of_the_sum_at_one_time_not_of_each_workers_peak() {
        let p = Pauses::default();
        let t0 = Instant::now();
        p.join(Reason::MaxConns, t0);
        p.join(Reason::MaxConns, t0);
        p.report(Reason::MaxConns, 0, 5); // A: 5
        p.report(Reason::MaxConns, 5, 0); // A drained
        p.report(Reason::MaxConns, 0, 5); // then B: 5
        let _ = p.leave(Reason::MaxConns, 0, 5, t0);
        let s = p.leave(Reason::MaxConns, 5, 5, t0).unwrap();
        assert_eq!((s.peak, s.accepted), (5, 10));
    }
}
