//! One proxied TCP connection: the client socket, the upstream socket, and the
//! two directions between them (client -> upstream, upstream -> client).
//!
//! Life: `Connecting` (our SYN is out) -> `Established` (bytes move) -> the
//! worker reaps it once [`Drive::Done`] says how it ended. Each direction has
//! its own half-close state ([`Flow`]): `Open` -> `Eof` (the source sent FIN;
//! what is in the pipe still goes out) -> `Shut` (we sent FIN on).
//!
//! What must stay true: CONN-1 to CONN-7 are the relay's (relay.rs), CONN-8
//! is closing's (close.rs).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;

use crate::own_sockets;
use crate::stats::{EndKind, WorkerStats};
use crate::tcp::close::End;
use crate::tcp::pipe::Buffers;
use crate::tcp::relay::{Direction, Flow, PumpError, Ready};
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
    Connecting { deadline: Instant },
    Established,
}

pub struct Conn {
    pub(super) client: TcpStream,
    pub(super) upstream: TcpStream,
    /// The upstream socket's place in the registry of own sockets, for as
    /// long as this connection lives (worker.rs WRK-7, own_sockets OWN-2);
    /// `None` for a spoofed upstream, which is never registered.
    _registered: Option<own_sockets::Entry>,
    pub client_addr: SocketAddr,
    pub orig_dst: SocketAddr,
    state: State,
    ready: [Ready; 2],
    /// Indexed by the source side: `[client -> upstream, upstream -> client]`.
    pub(super) dirs: [Direction; 2],
    pub generation: u64,
    /// When this connection's live timer entry falls due (TIM-3).
    pub armed: Option<Instant>,
    pub started: Instant,
    last_active: Instant,
    /// Set once the worker has decided the end; events after it are stale.
    finished: bool,
}

impl Conn {
    /// `client` and `upstream` each with the address of its far end.
    pub fn new(
        (client, client_addr): (TcpStream, SocketAddr),
        (upstream, orig_dst): (TcpStream, SocketAddr),
        registered: Option<own_sockets::Entry>,
        generation: u64,
        now: Instant,
        connect_timeout: Duration,
        splice: bool,
    ) -> Conn {
        Conn {
            client,
            upstream,
            _registered: registered,
            client_addr,
            orig_dst,
            state: State::Connecting {
                deadline: now + connect_timeout,
            },
            // The client may have sent bytes before we registered it; assume
            // readable so the first drive looks (costs at most one EAGAIN).
            ready: [
                Ready {
                    readable: true,
                    writable: true,
                    ..Ready::default()
                },
                Ready::default(),
            ],
            dirs: [Direction::new(splice), Direction::new(splice)],
            generation,
            armed: None,
            started: now,
            last_active: now,
            finished: false,
        }
    }

    pub fn sockets_mut(&mut self) -> (&mut TcpStream, &mut TcpStream) {
        (&mut self.client, &mut self.upstream)
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn mark_finished(&mut self) {
        self.finished = true;
    }

    /// Bytes moved (client -> upstream, upstream -> client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.dirs[0].bytes, self.dirs[1].bytes)
    }

    /// When this connection should next be looked at by the timer, given the
    /// idle timeout; `None` if never.
    pub fn deadline(&self, idle: Option<Duration>) -> Option<Instant> {
        match self.state {
            State::Connecting { deadline } => Some(deadline),
            State::Established => idle.map(|d| self.last_active + d),
        }
    }

    /// The timer said this connection's deadline passed.
    pub fn timed_out(&self) -> End {
        match self.state {
            State::Connecting { .. } => End::new(EndKind::ConnectTimeout, None),
            State::Established => End::new(EndKind::IdleTimeout, None),
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
        let r = &mut self.ready[side.index()];
        r.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
        r.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
        r.fin |= ev.is_read_closed() && !ev.is_error();
        r.urgent |= ev.is_priority();
        if let State::Connecting { .. } = self.state {
            if side == Side::Client {
                // Bytes from the client wait in its socket until upstream is up.
                return Drive::Open;
            }
            // A connecting socket reports nothing until the handshake ends;
            // writable with no error or hang-up means it completed, with no
            // syscall to ask. Anything else, ask the socket.
            let connected = if ev.is_writable() && !ev.is_error() && !ev.is_write_closed() {
                Ok(true)
            } else {
                self.finish_connect()
            };
            match connected {
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
        let mut again = false;
        for src_side in [Side::Client, Side::Upstream] {
            let i = src_side.index();
            let (src, dst) = match src_side {
                Side::Client => (&self.client, &self.upstream),
                Side::Upstream => (&self.upstream, &self.client),
            };
            let [r0, r1] = &mut self.ready;
            let (src_ready, dst_ready) = match src_side {
                Side::Client => (r0, r1),
                Side::Upstream => (r1, r0),
            };
            let other_shut = self.dirs[1 - i].flow == Flow::Shut;
            match self.dirs[i].pump((src, src_ready), (dst, dst_ready), bufs, stats, other_shut) {
                Ok((moved, exhausted)) => {
                    if moved > 0 {
                        self.last_active = now;
                        match src_side {
                            Side::Client => stats.bytes_client_to_upstream.add(moved),
                            Side::Upstream => stats.bytes_upstream_to_client.add(moved),
                        }
                    }
                    again |= exhausted;
                }
                Err(PumpError::Src(e)) => return Drive::Done(End::reset_by(src_side, e)),
                Err(PumpError::Dst(e)) => return Drive::Done(End::reset_by(src_side.other(), e)),
                Err(PumpError::Local(e)) => {
                    return Drive::Done(End::new(EndKind::LocalError, Some(e)));
                }
            }
        }
        if self.dirs.iter().all(|d| d.flow == Flow::Shut) {
            Drive::Done(End::new(EndKind::Completed, None))
        } else if again {
            Drive::Again
        } else {
            Drive::Open
        }
    }
}
