//! The one codec between mio `Token`s and what they name in a worker.
//!
//! Layout of the `usize`:
//! - `0`: the worker's `Waker`;
//! - `1 ..= MAX_LISTENERS`: listener `n - 1`;
//! - `CONN_BASE + (slot << 1 | side)`: one side of the connection in slab
//!   slot `slot`, `side` 0 for the client socket, 1 for the upstream one.
//!
//! What must stay true:
//! - TOK-1: encode and decode are inverse for every value they accept; two
//!   sockets never share a token (the side bit tells the two of a connection
//!   apart).
//! - TOK-2: a connection token never decodes as the waker or a listener, and
//!   decoding is total: any `usize` decodes without panicking (a stale one is
//!   caught by the worker's slot check, not here).

use mio::Token;

pub const WAKER: Token = Token(0);
/// More listeners than any host has addresses worth listening on.
pub const MAX_LISTENERS: usize = 63;
const CONN_BASE: usize = MAX_LISTENERS + 1;
/// The largest slab slot that still fits the layout.
pub const MAX_SLOT: usize = (usize::MAX - CONN_BASE) >> 1;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Waker,
    Listener(usize),
    Conn { slot: usize, side: Side },
}

pub fn listener(index: usize) -> Token {
    debug_assert!(index < MAX_LISTENERS);
    Token(1 + index)
}

pub fn conn(slot: usize, side: Side) -> Token {
    debug_assert!(slot <= MAX_SLOT);
    Token(CONN_BASE + ((slot << 1) | side as usize))
}

pub fn decode(t: Token) -> Kind {
    match t.0 {
        0 => Kind::Waker,
        n if n < CONN_BASE => Kind::Listener(n - 1),
        n => {
            let v = n - CONN_BASE;
            let side = if v & 1 == 0 {
                Side::Client
            } else {
                Side::Upstream
            };
            Kind::Conn { slot: v >> 1, side }
        }
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
        for t in [usize::MAX, usize::MAX - 1, CONN_BASE - 1, CONN_BASE] {
            let _ = decode(Token(t));
        }
        assert_eq!(Side::Client.other(), Side::Upstream);
    }
}
