//! The TCP half of the data path, one file per stage of a connection's life:
//! where an accepted connection is going ([`destination`](mod@destination)), where its
//! upstream connection comes from ([`source`]), the connection itself
//! ([`conn`]) and its pipes ([`pipe`]).
//!
//! What must stay true: each stage's header names its invariants
//! (DST-1 in [`destination`](mod@destination)).

pub mod accept;
pub mod close;
pub mod conn;
pub mod connect;
pub mod destination;
pub mod pipe;
pub mod relay;
pub mod source;

pub use destination::{Destination, destination};
