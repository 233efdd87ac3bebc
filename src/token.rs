//! The one codec between mio `Token`s and what they name in a worker, TCP
//! or UDP.
//!
//! Layout of the `usize`, the same in both kinds of worker up to the
//! entries:
//! - `0`: the worker's `Waker`;
//! - `1 ..= MAX_LISTENERS`: listener `n - 1`;
//! - from `ENTRY_BASE` on, an entry of the worker's slab or table:
//!   - in a TCP worker ([`decode`]), `ENTRY_BASE + (slot << 1 | side)`: one
//!     side of the connection in slab slot `slot`, `side` 0 for the client
//!     socket, 1 for the upstream one;
//!   - in a UDP worker ([`decode_udp`]), `ENTRY_BASE + id`: the upstream
//!     socket of the NAT mapping whose [`SessionId`] is `id` in 64 bits.
//!
//! What must stay true:
//! - TOK-1: encode and decode are inverse for every value they accept; two
//!   sockets never share a token (the side bit tells the two of a connection
//!   apart, a session id names one mapping for its whole life, udp/table.rs
//!   SES-3).
//! - TOK-2: an entry's token never decodes as the waker or a listener, and
//!   decoding is total: any `usize` decodes without panicking (a stale one is
//!   caught by the worker's slot check or the table's generation, not here).

use mio::Token;

use crate::udp::table::SessionId;

pub const WAKER: Token = Token(0);
/// More listeners than any host has addresses worth listening on.
pub const MAX_LISTENERS: usize = 63;
const ENTRY_BASE: usize = MAX_LISTENERS + 1;
/// The largest slab slot that still fits the layout.
pub const MAX_SLOT: usize = (usize::MAX - ENTRY_BASE) >> 1;

// A session id is 64 bits wide and rides whole in a token. Its slot is
// below udp/table.rs MAX_SESSIONS (u32::MAX), so `ENTRY_BASE + id` cannot
// overflow (TOK-1).
const _: () = assert!(
    usize::BITS == 64,
    "a UDP session token holds a 64-bit SessionId"
);

/// Which of a connection's two sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What a token names in a TCP worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Waker,
    Listener(usize),
    Conn { slot: usize, side: Side },
}

/// What a token names in a UDP worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpKind {
    Waker,
    Listener(usize),
    /// A mapping's upstream socket.
    Session(SessionId),
}

pub fn listener(index: usize) -> Token {
    debug_assert!(index < MAX_LISTENERS);
    Token(1 + index)
}

pub fn conn(slot: usize, side: Side) -> Token {
    debug_assert!(slot <= MAX_SLOT);
    Token(ENTRY_BASE + ((slot << 1) | side as usize))
}

/// The token of a UDP mapping's upstream socket.
pub fn session(id: SessionId) -> Token {
    Token(ENTRY_BASE + id.to_bits() as usize)
}

/// What the layout says before the worker's kind matters.
enum Common {
    Waker,
    Listener(usize),
    /// An entry, as its offset from `ENTRY_BASE`.
    Entry(usize),
}

fn decode_common(t: Token) -> Common {
    match t.0 {
        0 => Common::Waker,
        n if n < ENTRY_BASE => Common::Listener(n - 1),
        n => Common::Entry(n - ENTRY_BASE),
    }
}

/// A token of a TCP worker.
pub fn decode(t: Token) -> Kind {
    match decode_common(t) {
        Common::Waker => Kind::Waker,
        Common::Listener(i) => Kind::Listener(i),
        Common::Entry(v) => {
            let side = if v & 1 == 0 {
                Side::Client
            } else {
                Side::Upstream
            };
            Kind::Conn { slot: v >> 1, side }
        }
    }
}

/// A token of a UDP worker.
pub fn decode_udp(t: Token) -> UdpKind {
    match decode_common(t) {
        Common::Waker => UdpKind::Waker,
        Common::Listener(i) => UdpKind::Listener(i),
        Common::Entry(v) => UdpKind::Session(SessionId::from_bits(v as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(decode(WAKER), Kind::Waker);
        for i in [0, 1, MAX_LISTENERS - 1] {
            assert_eq!(decode(listener(i)), Kind::Listener(i));
        }
        for slot in [0, 1, 2, 1000, MAX_SLOT] {
            for side in [Side::Client, Side::Upstream] {
                assert_eq!(decode(conn(slot, side)), Kind::Conn { slot, side });
            }
        }
    }

    #[test]
    fn sides_of_one_connection_differ_and_neighbours_do_not_collide() {
        assert_ne!(conn(5, Side::Client), conn(5, Side::Upstream));
        assert_ne!(conn(5, Side::Upstream), conn(6, Side::Client));
        assert!(conn(0, Side::Client).0 > listener(MAX_LISTENERS - 1).0);
    }

    #[test]
    fn every_token_decodes_without_panic() {
        for t in [usize::MAX, usize::MAX - 1, ENTRY_BASE - 1, ENTRY_BASE] {
            let _ = decode(Token(t));
        }
        assert_eq!(Side::Client.other(), Side::Upstream);
    }

    /// Ids as a table hands them out: slot in the high half, generation in
    /// the low; the largest slot udp/table.rs MAX_SESSIONS allows.
    fn ids() -> [SessionId; 5] {
        let max_slot = u64::from(u32::MAX - 1);
        [
            0,
            1,
            7 << 32 | 3,
            7 << 32 | 4,
            max_slot << 32 | u64::from(u32::MAX),
        ]
        .map(SessionId::from_bits)
    }

    #[test]
    fn udp_tokens_round_trip_and_name_one_mapping_each() {
        assert_eq!(decode_udp(WAKER), UdpKind::Waker);
        for i in [0, 1, MAX_LISTENERS - 1] {
            assert_eq!(decode_udp(listener(i)), UdpKind::Listener(i));
        }
        for id in ids() {
            assert_eq!(decode_udp(session(id)), UdpKind::Session(id), "{id:?}");
        }
        // One slot, two generations (a reused slot): two tokens (TOK-1).
        let [.., a, b, _] = ids();
        assert_ne!(session(a), session(b));
    }

    #[test]
    fn a_session_token_is_never_the_waker_or_a_listener_and_every_token_decodes() {
        for id in ids() {
            assert!(session(id).0 > listener(MAX_LISTENERS - 1).0, "{id:?}");
        }
        for t in [usize::MAX, usize::MAX - 1, ENTRY_BASE - 1, ENTRY_BASE] {
            let _ = decode_udp(Token(t));
        }
    }
}
