//! This worker's part in the episodes of waiting (moved from accept.rs):
//! who waits for it, joining and leaving the process's episode for each
//! reason (pause.rs), and the lines that start and end one. Its invariant
//! is WRK-6 (accept.rs), with pause.rs's PAUSE-1 and PAUSE-3.

use std::fmt;
use std::time::Instant;

use log::warn;

use super::{Admission, ListenState};
use crate::pause::{self, Reason};

/// A worker's part in an episode of waiting (pause.rs).
#[derive(Debug, Default)]
pub(super) struct Waiting {
    /// Clients waiting for this worker, as last reported to the episode.
    reported: u64,
    /// Clients this worker accepted after they waited.
    accepted: u64,
    /// Nobody has waited for this worker since then (PAUSE-3).
    pub(super) drained: Option<Instant>,
}

impl Admission {
    /// Clients waiting for this worker for `r`: in its paused listeners'
    /// queues as last read, and, out of descriptors, parked (WRK-5).
    pub(super) fn waiting_for(&self, r: Reason) -> u64 {
        let queued = self.queued();
        match r {
            Reason::MaxConns => queued,
            Reason::FdLimit => queued + self.parked.len() as u64,
        }
    }

    /// Clients in the paused listeners' accept queues, as last read.
    pub(super) fn queued(&self) -> u64 {
        self.listeners
            .iter()
            .map(|l| match l.state {
                ListenState::Paused { queued, .. } => queued,
                ListenState::Active { .. } => 0,
            })
            .sum()
    }

    /// WRK-6, after a listener paused or resumed or a client parked: publish
    /// who waits for this worker, join the episode for `why` (the reason,
    /// and the limit or error for its warning) if somebody waits for that
    /// reason, and note when nobody waits any more (PAUSE-3). Never called
    /// while accepting freely.
    pub(super) fn update_waiting(
        &mut self,
        why: Option<(Reason, &dyn fmt::Display)>,
        now: Instant,
    ) {
        self.stats.accept_queue.set(self.queued());
        if let Some((r, cause)) = why
            && self.waiting_for(r) > 0
        {
            match &mut self.waiting[r as usize] {
                Some(w) => w.drained = None,
                None => {
                    self.waiting[r as usize] = Some(Waiting::default());
                    if self.pauses.join(r, now) {
                        self.start_episode(r, cause);
                    }
                }
            }
        }
        // Nobody waits: nothing is parked, and each listener either said
        // EAGAIN or is paused with an empty queue.
        let nobody = self.parked.is_empty()
            && self.listeners.iter().all(|l| {
                matches!(
                    l.state,
                    ListenState::Active { more: false } | ListenState::Paused { queued: 0, .. }
                )
            });
        for r in Reason::ALL {
            let n = self.waiting_for(r);
            if let Some(w) = &mut self.waiting[r as usize] {
                self.pauses.report(r, w.reported, n);
                w.reported = n;
                if nobody {
                    w.drained.get_or_insert(now);
                }
            }
        }
    }

    /// This worker started the process's episode for `r`: count it and say
    /// so, once for all workers (PAUSE-1).
    pub(super) fn start_episode(&self, r: Reason, cause: &dyn fmt::Display) {
        match r {
            Reason::MaxConns => {
                self.stats.accept_pauses_max_conns.add(1);
                warn!(
                    "accepting paused at --max-conns {cause}: new clients wait in the accept \
                     queues until connections close"
                );
            }
            Reason::FdLimit => {
                self.stats.accept_pauses_fd.add(1);
                warn!("accepting paused: {cause}: new connections wait until a descriptor frees");
            }
        }
    }

    /// A client was accepted: if it waited, count it (WRK-6).
    pub(super) fn count_waited(&mut self) {
        let mut waited = false;
        for w in self.waiting.iter_mut().flatten() {
            if w.drained.is_none() {
                w.accepted += 1;
                waited = true;
            }
        }
        if waited {
            self.stats.accepted_after_waiting.add(1);
        }
    }

    /// Leave the episodes nobody has waited in for `pause::QUIET` (PAUSE-3).
    pub fn leave_quiet_episodes(&mut self, now: Instant) {
        for r in Reason::ALL {
            if let Some(w) = &self.waiting[r as usize]
                && w.drained.is_some_and(|d| now >= d + pause::QUIET)
            {
                self.leave_episode(r, false, now);
            }
        }
    }

    /// Leave the episode for `r`; the last worker out says what it came to.
    pub(super) fn leave_episode(&mut self, r: Reason, shutdown: bool, now: Instant) {
        let Some(w) = self.waiting[r as usize].take() else {
            return;
        };
        // Cut short by shutdown only if somebody still waited.
        let ended = if shutdown && w.drained.is_none() {
            "ended by shutdown"
        } else {
            "resumed"
        };
        let drained = w.drained.unwrap_or(now);
        let Some(s) = self.pauses.leave(r, w.reported, w.accepted, drained) else {
            return;
        };
        let (at, queues) = match r {
            Reason::MaxConns => (
                format!("at --max-conns {}", self.max_conns),
                "in the accept queues",
            ),
            Reason::FdLimit => (
                "out of descriptors".to_string(),
                "in the accept queues or for a descriptor",
            ),
        };
        warn!(
            "accepting {ended} after {:.1}s {at}: {} clients accepted after waiting, at most {} {queues} at once",
            s.lasted.as_secs_f64(),
            s.accepted,
            s.peak
        );
    }
}
