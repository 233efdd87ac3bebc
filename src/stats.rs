//! Per-worker counters, written only by their worker and readable from any
//! thread (for the shutdown summary now, metrics later).
//!
//! What must stay true:
//! - STAT-1: one writer per counter (its worker), so an update is a relaxed
//!   load and store, never a locked read-modify-write on the data path.
//! - STAT-2: each worker's block sits on its own cache lines, so one worker's
//!   updates never invalidate another's.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A counter or gauge with a single writer (STAT-1).
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// How a proxied connection ended; one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// Both directions finished with FIN.
    Completed,
    /// The client reset or failed; the upstream was reset.
    ClientReset,
    /// The upstream reset or failed; the client was reset.
    UpstreamReset,
    /// The upstream refused the connection (RST to our SYN).
    ConnectRefused,
    /// No answer within --connect-timeout.
    ConnectTimeout,
    /// Network or host unreachable, or another connect error.
    ConnectError,
    /// No source port was free towards the destination (EADDRNOTAVAIL from
    /// connect, from every `--source` address of the family).
    NoSourcePort,
    /// Nothing moved for --idle-timeout.
    IdleTimeout,
    /// Still open when the drain deadline passed.
    Aborted,
    /// A local failure (descriptors, memory).
    LocalError,
}

impl EndKind {
    pub const ALL: [EndKind; 10] = [
        EndKind::Completed,
        EndKind::ClientReset,
        EndKind::UpstreamReset,
        EndKind::ConnectRefused,
        EndKind::ConnectTimeout,
        EndKind::ConnectError,
        EndKind::NoSourcePort,
        EndKind::IdleTimeout,
        EndKind::Aborted,
        EndKind::LocalError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EndKind::Completed => "completed",
            EndKind::ClientReset => "client_reset",
            EndKind::UpstreamReset => "upstream_reset",
            EndKind::ConnectRefused => "connect_refused",
            EndKind::ConnectTimeout => "connect_timeout",
            EndKind::ConnectError => "connect_error",
            EndKind::NoSourcePort => "no_source_port",
            EndKind::IdleTimeout => "idle_timeout",
            EndKind::Aborted => "aborted",
            EndKind::LocalError => "local_error",
        }
    }
}

#[derive(Default, Debug)]
#[repr(align(128))]
pub struct WorkerStats {
    pub accepted: Counter,
    pub active: Counter,
    pub closed: [Counter; EndKind::ALL.len()],
    /// Connections whose destination was the proxy itself (dialled directly,
    /// or a loop): closed with a reset.
    pub refused_loop: Counter,
    /// Connections whose client was one of the proxy's own upstream
    /// connections, caught by the host's rules and sent back (own_sockets):
    /// closed with a reset.
    pub refused_own_upstream: Counter,
    /// Connections reset because their client held `--max-conns-per-client`
    /// (tcp/accept/client_limit.rs ACC-3).
    pub client_limit: Counter,
    pub bytes_client_to_upstream: Counter,
    pub bytes_upstream_to_client: Counter,
    pub splice_fallbacks: Counter,
    pub pipes_in_use: Counter,
    pub pipes_pooled: Counter,
    /// Of `pipes_in_use`, the bulk ones (pipe.rs PIPE-4).
    pub pipes_bulk_in_use: Counter,
    pub accept_pauses_fd: Counter,
    /// Accepted clients waiting for a descriptor for their upstream (WRK-5).
    pub waiting: Counter,
    pub accept_pauses_max_conns: Counter,
    /// Clients in the accept queues of this worker's paused listeners, as
    /// last read while paused; 0 while it accepts (tcp/accept.rs WRK-6).
    pub accept_queue: Counter,
    /// Clients accepted after waiting while accepting was paused.
    pub accepted_after_waiting: Counter,
}

impl WorkerStats {
    pub fn closed(&self, kind: EndKind) -> &Counter {
        &self.closed[kind as usize]
    }
}

/// Why a UDP session ended; one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpEnd {
    /// No datagram either way for --udp-timeout.
    Expired,
    /// Pushed out by a new flow at --udp-max-sessions.
    Evicted,
    /// The destination answered with an ICMP error (port unreachable...).
    Unreachable,
    /// A send or receive failed on the session's socket.
    Error,
    /// tproxyd stopped.
    Shutdown,
}

impl UdpEnd {
    pub const ALL: [UdpEnd; 5] = [
        UdpEnd::Expired,
        UdpEnd::Evicted,
        UdpEnd::Unreachable,
        UdpEnd::Error,
        UdpEnd::Shutdown,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UdpEnd::Expired => "expired",
            UdpEnd::Evicted => "evicted",
            UdpEnd::Unreachable => "unreachable",
            UdpEnd::Error => "error",
            UdpEnd::Shutdown => "shutdown",
        }
    }
}

/// Why a datagram was dropped; one counter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpDrop {
    /// No (or a malformed) original-destination control message.
    NoOrigDst,
    /// Its original destination is this proxy.
    Loop,
    /// Larger than the largest datagram (cannot happen; counted if it does).
    Truncated,
    /// No session could be opened (socket, bind, connect failed).
    NoSession,
    /// The socket's send buffer was full, or the send failed.
    SendFailed,
    /// From a remote the mapping's NAT filter does not let in (`--udp-nat
    /// restricted` or `port-restricted`).
    Filtered,
    /// No reply socket could be bound to the remote's address.
    NoReplySocket,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 7] = [
        UdpDrop::NoOrigDst,
        UdpDrop::Loop,
        UdpDrop::Truncated,
        UdpDrop::NoSession,
        UdpDrop::SendFailed,
        UdpDrop::Filtered,
        UdpDrop::NoReplySocket,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UdpDrop::NoOrigDst => "no_orig_dst",
            UdpDrop::Loop => "loop",
            UdpDrop::Truncated => "truncated",
            UdpDrop::NoSession => "no_session",
            UdpDrop::SendFailed => "send_failed",
            UdpDrop::Filtered => "filtered",
            UdpDrop::NoReplySocket => "no_reply_socket",
        }
    }
}

/// One UDP worker's counters (one writer: that worker).
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct UdpStats {
    pub sessions_active: Counter,
    pub sessions_created: Counter,
    pub sessions_ended: [Counter; UdpEnd::ALL.len()],
    pub drops: [Counter; UdpDrop::ALL.len()],
    pub datagrams_to_upstream: Counter,
    pub datagrams_to_client: Counter,
    pub bytes_to_upstream: Counter,
    pub bytes_to_client: Counter,
    /// ICMP errors that said one remote of a mapping cannot be reached.
    pub remote_unreachable: Counter,
}

impl UdpStats {
    pub fn ended(&self, why: UdpEnd) -> &Counter {
        &self.sessions_ended[why as usize]
    }
    pub fn dropped(&self, why: UdpDrop) -> &Counter {
        &self.drops[why as usize]
    }
}

/// Sum of one counter over all workers.
pub fn total(all: &[std::sync::Arc<WorkerStats>], f: impl Fn(&WorkerStats) -> &Counter) -> u64 {
    all.iter().map(|s| f(s).get()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_and_kinds_index_their_slot() {
        let s = WorkerStats::default();
        s.accepted.add(2);
        s.accepted.sub(1);
        s.closed(EndKind::IdleTimeout).add(1);
        assert_eq!(s.accepted.get(), 1);
        assert_eq!(s.closed[EndKind::IdleTimeout as usize].get(), 1);
        for (i, k) in EndKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        assert!(std::mem::align_of::<WorkerStats>() >= 128);
    }
}
