//! Busy polling (`--busy-poll DUR`): after a poll that brought events, a
//! worker polls again with a zero timeout, without sleeping, until DUR has
//! passed with no event; only then does it block in epoll_wait again.
//!
//! Why: a thread that sleeps in epoll_wait is woken by the scheduler when a
//! packet lands, and where waking a sleeping CPU is slow (a virtual
//! machine's halted vCPU woken by an IPI through the hypervisor, deep
//! C-states) that wake-up is most of a proxy hop's latency. A worker that
//! is still polling sees the packet without one. The price is CPU: a
//! worker spins for DUR after every event, so under steady traffic it
//! never sleeps. HAProxy's `busy-polling` is the same idea without the
//! window (it always polls with a zero timeout).
//!
//! This is user-space polling of the epoll set: it works on every kernel
//! and device (veth included), and it is not the kernel's NAPI busy
//! polling (`net.core.busy_poll`, SO_BUSY_POLL), which needs a driver with
//! NAPI IDs and, for the sysctls, the host's own namespace.
//!
//! What must stay true:
//! - SPIN-1: without a window (the default) the worker's timeout is exactly
//!   the one it asked for: nothing changes.
//! - SPIN-2: a spin ends DUR after the last poll that brought events: an
//!   idle worker goes back to sleep, it never spins for ever.
//! - SPIN-3: spinning only ever shortens a timeout (to zero), so no
//!   deadline (timers, drain, paused listeners) is ever served late.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BusyPoll {
    window: Option<Duration>,
    last_event: Option<Instant>,
}

impl BusyPoll {
    /// `window` None or zero: busy polling off.
    pub fn new(window: Option<Duration>) -> BusyPoll {
        BusyPoll {
            window: window.filter(|w| !w.is_zero()),
            last_event: None,
        }
    }

    /// The last poll, at `now`, returned at least one event.
    pub fn saw_events(&mut self, now: Instant) {
        if self.window.is_some() {
            self.last_event = Some(now);
        }
    }

    /// The timeout to poll with now, given the one the worker wants; the
    /// clock is read only when busy polling is on.
    pub fn timeout(&self, wanted: Option<Duration>) -> Option<Duration> {
        if self.window.is_none() {
            return wanted;
        }
        self.timeout_at(Instant::now(), wanted)
    }

    /// The timeout to poll with at `now`, given the one the worker wants.
    pub fn timeout_at(&self, now: Instant, wanted: Option<Duration>) -> Option<Duration> {
        match (self.window, self.last_event) {
            (Some(w), Some(t)) if now.saturating_duration_since(t) < w => Some(Duration::ZERO),
            _ => wanted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn off_leaves_every_timeout_alone() {
        // SPIN-1
        let t0 = Instant::now();
        for window in [None, Some(Duration::ZERO)] {
            let mut b = BusyPoll::new(window);
            b.saw_events(t0);
            for wanted in [None, Some(Duration::ZERO), Some(Duration::from_secs(3))] {
                assert_eq!(b.timeout_at(t0, wanted), wanted);
                assert_eq!(b.timeout_at(t0 + US, wanted), wanted);
                assert_eq!(b.timeout(wanted), wanted);
            }
        }
    }

    #[test]
    fn spins_until_the_window_after_the_last_event_then_sleeps() {
        // SPIN-2
        let t0 = Instant::now();
        let mut b = BusyPoll::new(Some(50 * US));
        // Before any event: the worker sleeps as it asked.
        assert_eq!(b.timeout_at(t0, None), None);
        b.saw_events(t0);
        assert_eq!(b.timeout_at(t0, None), Some(Duration::ZERO));
        assert_eq!(b.timeout_at(t0 + 49 * US, None), Some(Duration::ZERO));
        assert_eq!(b.timeout_at(t0 + 50 * US, None), None);
        // A later event restarts the window from itself.
        b.saw_events(t0 + 40 * US);
        assert_eq!(b.timeout_at(t0 + 80 * US, None), Some(Duration::ZERO));
        assert_eq!(b.timeout_at(t0 + 90 * US, None), None);
    }

    #[test]
    fn only_ever_shortens_a_timeout() {
        // SPIN-3
        let t0 = Instant::now();
        let mut b = BusyPoll::new(Some(Duration::from_millis(1)));
        b.saw_events(t0);
        for wanted in [
            None,
            Some(Duration::ZERO),
            Some(US),
            Some(Duration::from_secs(1)),
        ] {
            let got = b.timeout_at(t0 + US, wanted);
            assert_eq!(got, Some(Duration::ZERO));
            assert!(wanted.is_none_or(|w| got.is_some_and(|g| g <= w)));
        }
        // A clock that seems to step back (saturating) still spins, never panics.
        assert_eq!(b.timeout_at(t0, None), Some(Duration::ZERO));
    }
}
