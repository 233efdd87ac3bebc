//! Per-worker deadlines (connect timeout, idle timeout) as a min-heap of
//! `(when, slot, generation)`, checked lazily.
//!
//! A connection has at most one entry. When an entry falls due, the worker
//! asks the connection for its *current* deadline: a connection that moved
//! bytes since, or changed state, gets a fresh entry instead of being
//! expired. So refreshing activity on the data path costs one store of an
//! `Instant`, never a heap operation.
//!
//! What must stay true:
//! - TIM-1: an entry names its connection by slot *and* generation; an entry
//!   whose slot was freed and reused is recognised as stale and dropped.
//! - TIM-3: a connection's live entry is the one whose time equals the
//!   connection's `armed` time. When a deadline moves earlier (the idle
//!   deadline of a freshly established connection can come before its
//!   connect deadline) a new entry is pushed and the old one, popped later,
//!   is recognised as stale by its time.
//! - TIM-2: the cost of a tick is O(log n) per entry that falls due; nothing
//!   scans all connections.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    pub fn push(&mut self, when: Instant, slot: usize, generation: u64) {
        self.heap.push(Reverse((when, slot, generation)));
    }

    /// The earliest deadline, to bound the poll timeout.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((when, _, _))| *when)
    }

    /// Take one entry that is due at `now`, if any: (slot, generation, when).
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, u64, Instant)> {
        match self.heap.peek() {
            Some(Reverse((when, _, _))) if *when <= now => self
                .heap
                .pop()
                .map(|Reverse((when, slot, generation))| (slot, generation, when)),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.push(t0 + Duration::from_secs(3), 3, 30);
        t.push(t0 + Duration::from_secs(1), 1, 10);
        t.push(t0 + Duration::from_secs(2), 2, 20);
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.pop_due(t0), None);
        let now = t0 + Duration::from_secs(2);
        assert_eq!(t.pop_due(now), Some((1, 10, t0 + Duration::from_secs(1))));
        assert_eq!(t.pop_due(now), Some((2, 20, t0 + Duration::from_secs(2))));
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.len(), 1);
    }
}
