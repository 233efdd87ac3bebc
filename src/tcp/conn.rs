//! One proxied TCP connection: the client socket, the upstream socket, and
//! the stages between them, composed here: the connect (connect.rs), the
//! relay of the two directions (relay.rs), the close (close.rs). The worker
//! feeds it events and timer expiries; it answers with a [`Drive`].
//!
//! Life: `Connecting` (our SYN is out; a WRITABLE event, or a look at the
//! socket, says how it went) -> `Established` (bytes move; each direction
//! has its own half-close state, relay.rs's `Flow`: `Open` -> `Eof` ->
//! `Shut`) -> `Closing` once the worker has decided how it ends, until it is
//! closed at the end of the loop turn (worker.rs WRK-1).
//!
//! What must stay true:
//! - CONN-1 to CONN-7 are the relay's (relay.rs), CONN-8 is closing's
//!   (close.rs); the names are the ones they had here.
//! - CONN-9 (what an event says is kept): readiness from every event is
//!   recorded before anything else, in every state, so none is lost to a
//!   connection that was still connecting (edge-triggered: the kernel will
//!   not say it again); once established, an error on a socket that no
//!   direction is reading or writing ends the connection as that side's
//!   reset.
//! - CONN-10 (one end): a connection is ended once; from `Closing` on no
//!   event or timer moves it (the worker checks `is_finished`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;

use crate::own_sockets;
use crate::stats::{EndKind, WorkerStats};
use crate::tcp::accept::{ClientPlace, Reservation};
use crate::tcp::close::{self, End};
use crate::tcp::connect::{self, Upstream};
use crate::tcp::pipe::{Buffers, PipePool};
use crate::tcp::proxy_header::{self, Version};
use crate::tcp::relay::{self, Relay};
use crate::token::Side;

/// What [`Conn::drive`] and friends tell the worker.
#[derive(Debug)]
pub enum Drive {
    /// Waiting for the kernel.
    Open,
    /// Work left that the budget cut short: drive again after the others.
    Again,
    Done(End),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Our SYN is out; the connect must complete by `deadline`.
    Connecting {
        deadline: Instant,
    },
    Established,
    /// The worker has decided how it ends; it is closed and freed at the
    /// end of the loop turn, and events until then are stale (WRK-1).
    Closing,
}

pub struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    /// The upstream socket's place in the registry of own sockets, for as
    /// long as this connection lives (accept.rs WRK-7, own_sockets OWN-2);
    /// `None` for a spoofed upstream, which is never registered.
    _registered: Option<own_sockets::Entry>,
    pub client_addr: SocketAddr,
    pub orig_dst: SocketAddr,
    state: State,
    relay: Relay,
    pub generation: u64,
    /// When this connection's live timer entry falls due (TIM-3).
    pub armed: Option<Instant>,
    pub started: Instant,
    last_active: Instant,
    /// Its place under `--max-conns-per-client`, if there is a cap
    /// (accept/client_limit.rs ACC-2), and under `--max-conns` (accept.rs
    /// ACC-1), given back when the connection drops, after its sockets
    /// have closed.
    _client_place: Option<ClientPlace>,
    _place: Reservation,
}

impl Conn {
    /// `client` and `upstream` each with the address of its far end;
    /// `send_proxy`: start the upstream stream with a PROXY header naming
    /// them (relay.rs CONN-11).
    pub fn new(
        (client, client_addr): (TcpStream, SocketAddr),
        (upstream, orig_dst): (Upstream, SocketAddr),
        (place, client_place): (Reservation, Option<ClientPlace>),
        generation: u64,
        now: Instant,
        splice: bool,
        send_proxy: Option<Version>,
    ) -> Conn {
        let header = send_proxy.map(|v| proxy_header::encode(v, client_addr, orig_dst));
        Conn {
            client,
            upstream: upstream.sock,
            _registered: upstream.registered,
            client_addr,
            orig_dst,
            state: State::Connecting {
                deadline: upstream.deadline,
            },
            relay: Relay::new(splice, header),
            generation,
            armed: None,
            started: now,
            last_active: now,
            _client_place: client_place,
            _place: place,
        }
    }

    pub fn sockets_mut(&mut self) -> (&mut TcpStream, &mut TcpStream) {
        (&mut self.client, &mut self.upstream)
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Closing
    }

    /// The worker has decided the end: nothing more happens until it closes
    /// this connection.
    pub fn mark_finished(&mut self) {
        self.state = State::Closing;
    }

    /// Bytes moved (client -> upstream, upstream -> client).
    pub fn bytes(&self) -> (u64, u64) {
        self.relay.bytes()
    }

    /// When this connection should next be looked at by the timer, given the
    /// idle timeout; `None` if never.
    pub fn deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        match self.state {
            State::Connecting { deadline } => Some(deadline),
            State::Established => idle.map(|d| self.last_active + d),
            State::Closing => None,
        }
    }

    /// The timer said this connection's deadline passed.
    pub fn timed_out(&self) -> End {
        match self.state {
            State::Connecting { .. } => End::new(EndKind::ConnectTimeout, None),
            State::Established | State::Closing => End::new(EndKind::IdleTimeout, None),
        }
    }

    /// Record what an event says about one side, then make progress.
    pub fn on_event(
        &mut self,
        side: Side,
        ev: &Event,
        now: Instant,
        bufs: &mut Buffers,
        stats: &WorkerStats,
    ) -> Drive {
        let r = self.relay.ready_mut(side);
        r.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
        r.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
        r.fin |= ev.is_read_closed() && !ev.is_error();
        r.urgent |= ev.is_priority();
        if let State::Connecting { .. } = self.state {
            if side == Side::Client {
                // Bytes from the client wait in its socket until upstream is up.
                return Drive::Open;
            }
            match connect::completed(&self.upstream, ev) {
                Ok(true) => {
                    self.state = State::Established;
                    self.last_active = now;
                }
                Ok(false) => return Drive::Open,
                Err(end) => return Drive::Done(end),
            }
        } else if ev.is_error() {
            // An error on a socket no direction is reading or writing would
            // otherwise go unnoticed (e.g. RST after both FINs were sent).
            let sock = match side {
                Side::Client => &self.client,
                Side::Upstream => &self.upstream,
            };
            if let Ok(Some(e)) | Err(e) = sock.take_error() {
                return Drive::Done(End::reset_by(side, e));
            }
        }
        self.drive(now, bufs, stats)
    }

    /// Pump both directions as far as the kernel and the budget allow.
    pub fn drive(&mut self, now: Instant, bufs: &mut Buffers, stats: &WorkerStats) -> Drive {
        if let State::Connecting { .. } = self.state {
            return Drive::Open;
        }
        let sockets = (&self.client, &self.upstream);
        match self.relay.pump(&mut relay::Sys, sockets, bufs, stats) {
            Err(end) => Drive::Done(end),
            Ok(p) => {
                if p.moved {
                    self.last_active = now;
                }
                if self.relay.is_complete() {
                    Drive::Done(End::new(EndKind::Completed, None))
                } else if p.exhausted {
                    Drive::Again
                } else {
                    Drive::Open
                }
            }
        }
    }

    /// Close both sockets as `end` says and give back the pipes (CONN-8).
    pub fn close(self, end: &End, pool: &mut PipePool, stats: &WorkerStats) {
        let Conn {
            client,
            upstream,
            mut relay,
            ..
        } = self;
        relay.release(pool, stats);
        close::sockets(end, client, upstream);
    }
}
