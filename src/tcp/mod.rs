//! The TCP half of the data path, one room per stage of a connection's
//! life, in the order a client meets them:
//!
//! - [`accept`]: taking clients from the listeners under `--max-conns` (a
//!   [`accept::Reservation`] per client), the loop checks, refusing,
//!   parking clients the proxy has no descriptor for; `accept/waiting.rs`,
//!   the episodes of waiting; `accept/client_limit.rs`,
//!   `--max-conns-per-client` (an [`accept::ClientPlace`] per client, its
//!   counts shared by the workers, and the episodes of clients at their
//!   cap).
//! - [`destination`](mod@destination): where an accepted connection was
//!   going (pure, unit-tested).
//! - [`connect`]: the upstream connect, from which source address
//!   ([`source`]: `--source` in turn, running out of ports), its deadline
//!   and completion.
//! - [`conn`]: the connection itself, its state machine, composing the
//!   stages.
//! - [`relay`]: both directions, by splice, scratch relay or copy, with
//!   backpressure and half-close; generic over the kernel, unit-tested with
//!   a scripted one (`relay/direction.rs`: one direction's rounds).
//! - [`proxy_header`]: the PROXY protocol header `--send-proxy` writes
//!   first on each upstream connection (pure, unit-tested).
//! - [`pipe`]: the splice pipes and the worker's pool.
//! - [`close`]: how a connection ended and what its sockets get.
//!
//! The worker's loop that drives them is worker.rs.
//!
//! What must stay true: each room's header names its invariants (ACC-1,
//! WRK-2, WRK-5..7 in accept; ACC-2..5 in accept/client_limit; DST-1 in
//! destination; CONNECT-1, CONNECT-2 in connect; SRC-1..4 in source; CONN-9,
//! CONN-10 in conn; CONN-1..7 and CONN-11 in relay; PPH-1..3 in
//! proxy_header; PIPE-1..4 in pipe; CONN-8 in close).

pub mod accept;
pub mod close;
pub mod conn;
pub mod connect;
pub mod destination;
pub mod pipe;
pub mod proxy_header;
pub mod relay;
pub mod source;

pub use destination::{Destination, destination};
