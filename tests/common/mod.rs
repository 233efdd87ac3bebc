//! Shared scaffolding for the integration tests: the namespace lab, the
//! tproxyd process, running code inside a namespace, and byte streams that
//! can be checked byte-exactly without being kept in memory. One room per
//! subject, each helper once, all re-exported here so that a test file
//! imports `common::{Lab, Proxy, ...}`:
//!
//! - `lab`: the namespaces (one router or two), their addresses, exec and
//!   nft inside them, the two-router lab's ECMP group;
//! - `proxy`: the tproxyd process, its log, its metrics endpoint;
//! - `streams`: TCP connections, patterns and verifiers, how a stream ends;
//! - `probes`: /proc and `ss` readings, metric samples;
//! - `process`: daemons, bounded runs, bounded waits;
//! - `udp`: UDP sockets and datagram checks (used as `common::udp::...`).
//!
//! What holds, for every helper here:
//! - LAB-1: every test gets its own lab (`Lab::up`) with a name unique in the
//!   test process and across processes (pid + counter), and the lab is torn
//!   down when the `Lab` is dropped, also when the test panics. Declare the
//!   `Proxy` after the `Lab` so it is dropped (killed) first.
//! - LAB-2: a socket belongs to the network namespace of the thread that
//!   created it, whatever thread uses it later. So sockets are made inside
//!   `Lab::client`/`Lab::server` closures and used from anywhere.
//! - LAB-3: nothing here blocks without a bound: sockets get read and write
//!   timeouts (`IO_TIMEOUT`), accepts and waits poll against a deadline.
//! - LAB-4: without root the tests fail with one clear message; they never
//!   pass by skipping.
//! - LAB-5: without the Debian packages the tests use, a test process stops
//!   before its first lab or tproxyd with one line (from `scripts/deps check
//!   tests`, run once per process) naming the missing packages and
//!   `scripts/deps install tests`, rather than failing test after test, each
//!   in its own way.
#![allow(dead_code)] // Each test file uses its own subset of these helpers.

mod lab;
mod probes;
mod process;
mod proxy;
mod streams;
pub mod udp;

// A test file uses some of these; the rest would warn as unused imports.
#[allow(unused_imports)]
pub use self::{lab::*, probes::*, process::*, proxy::*, streams::*};
