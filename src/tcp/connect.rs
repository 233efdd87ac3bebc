//! Connecting: the upstream socket for an admitted client — from which
//! source address (`--source` in turn, `--spoof-source`, or the host's
//! choice), in the registry of own sockets or not — its deadline, and how
//! its completion is learnt. Non-blocking, the mio way: the SYN goes out in
//! [`Connector::start`], WRITABLE says the handshake ended, and
//! [`completed`] asks the socket only when the event is less clear.
//!
//! What must stay true:
//! - SRC-1 to SRC-4 (source.rs): the addresses are taken in turn per
//!   family, each tried at most once per connection on EADDRNOTAVAIL; a
//!   source that had no port towards a destination a moment ago is skipped;
//!   running out of source ports is warned about once per episode.
//! - WRK-7 (accept.rs; this is the connect's half of it): every upstream
//!   socket from this host's own address is in the registry of own sockets
//!   from just after its connect starts until its connection drops (OWN-2);
//!   a spoofed one is never registered.
//! - CONNECT-1 (a connect is bounded): an upstream connect that has not
//!   completed `--connect-timeout` after its SYN left ends as
//!   `ConnectTimeout` (the connection's deadline, kept by the worker's
//!   timer); refused, reset or unreachable, it ends as the kernel said
//!   (`ConnectRefused`, `ConnectError`). Either way the client is reset.
//! - CONNECT-2 (failure is sorted once): [`Connector::start`] counts and logs
//!   every failure it reports except [`Failed::Exhausted`], which is not the
//!   client's failure but the proxy's shortage: that client waits (WRK-5).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::event::Event;
use mio::net::TcpStream;

use crate::config::Config;
use crate::own_sockets::{self, OwnSockets, Proto};
use crate::stats::{EndKind, WorkerStats};
use crate::sys::{self, Source};
use crate::tcp::close::End;
use crate::tcp::source::{Exhaustion, NoPort, Sources};

/// An upstream connect on its way.
pub struct Upstream {
    pub sock: TcpStream,
    /// Its place in the registry of own sockets (WRK-7); `None` when
    /// spoofed.
    pub registered: Option<own_sockets::Entry>,
    /// When it must have completed (CONNECT-1).
    pub deadline: Instant,
}

/// Why no upstream connect could start.
#[derive(Debug)]
pub enum Failed {
    /// The process or system is out of descriptors or memory: not the
    /// client's failure; it should wait for one to free (WRK-5).
    Exhausted(io::Error),
    /// Counted and logged here (CONNECT-2): reset the client.
    Refused,
}

/// One worker's connects: its view of the `--source` addresses and of
/// where no source port was free.
pub struct Connector {
    cfg: Arc<Config>,
    opts: sys::UpstreamOpts,
    /// `--source` addresses, taken in turn (SRC-1).
    sources: Sources,
    /// Where no source port was free a moment ago (SRC-4).
    no_port: NoPort,
    /// Source-port exhaustion episodes, for the whole process (SRC-3).
    ports: Arc<Exhaustion>,
    /// The local addresses of the process's upstream sockets (WRK-7).
    own: Arc<OwnSockets>,
}

impl Connector {
    /// `worker`: the worker's id, where it starts in the `--source` lists.
    pub fn new(
        cfg: Arc<Config>,
        worker: usize,
        own: Arc<OwnSockets>,
        ports: Arc<Exhaustion>,
    ) -> Connector {
        Connector {
            opts: sys::UpstreamOpts { mark: cfg.mark },
            sources: Sources::new(&cfg.sources, worker),
            no_port: NoPort::default(),
            cfg,
            ports,
            own,
        }
    }

    /// Start the connect for a client at `peer` whose original destination
    /// is `dst`.
    pub fn start(
        &mut self,
        peer: SocketAddr,
        dst: SocketAddr,
        now: Instant,
        stats: &WorkerStats,
    ) -> Result<Upstream, Failed> {
        // WRK-7: a spoofed upstream socket (the client's own address) is not
        // registered. A real client may open a connection from exactly its
        // address and port, which the router's kernel chose without seeing
        // the client's, to the same server (the soak met it 26 times in
        // 215,712 connections): not a loop, and it must be served. Nor can a
        // spoofed upstream loop: its SYN, sent back into the proxy, gets a
        // SYN-ACK addressed to the real client, which resets it, so no hop
        // is ever accepted.
        let spoofed = self.spoofs(peer, dst);
        let upstream = self.open(peer, dst, now).and_then(|s| {
            // WRK-7: the kernel chose the address and port in connect.
            let entry = if spoofed {
                None
            } else {
                let local = s.local_addr()?;
                Some(self.own.hold(Proto::Tcp, local, Some(dst)))
            };
            Ok((s, entry))
        });
        let (sock, registered) = match upstream {
            Ok((s, entry)) => (TcpStream::from_std(s), entry),
            Err(e) if sys::is_exhaustion(&e) => return Err(Failed::Exhausted(e)),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                self.no_source_port(peer, dst, &e, now, stats);
                return Err(Failed::Refused);
            }
            Err(e) => {
                let kind = if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                    EndKind::ConnectRefused
                } else {
                    EndKind::ConnectError
                };
                debug!("{peer} -> {dst}: connect: {e}");
                stats.closed(kind).add(1);
                return Err(Failed::Refused);
            }
        };
        if let Some(ep) = self.ports.succeeded(now) {
            info!(
                "source ports: connects succeed again; {} failed for want of a source port over \
                 {:.3} s, the first towards {}",
                ep.failed,
                ep.last_failure
                    .saturating_duration_since(ep.started)
                    .as_secs_f64(),
                ep.first_dst
            );
        }
        Ok(Upstream {
            sock,
            registered,
            deadline: deadline(now, self.cfg.connect_timeout),
        })
    }

    /// `--spoof-source` applies: same family, as TPROXY never changes it.
    fn spoofs(&self, peer: SocketAddr, dst: SocketAddr) -> bool {
        self.cfg.spoof_source && peer.is_ipv4() == dst.is_ipv4()
    }

    /// The upstream socket for a client: with `--spoof-source` from the
    /// client's own address; otherwise from the family's next `--source`
    /// address in turn, and on EADDRNOTAVAIL from each of the others (SRC-1,
    /// SRC-2); with none, from wherever the host's routing says. A source
    /// that had no port towards `dst` a moment ago is skipped (SRC-4).
    fn open(
        &mut self,
        peer: SocketAddr,
        dst: SocketAddr,
        now: Instant,
    ) -> io::Result<std::net::TcpStream> {
        let opts = self.opts;
        if self.spoofs(peer, dst) {
            return sys::connect_upstream(dst, opts, Source::Foreign(peer.ip()));
        }
        let no_port = &mut self.no_port;
        let mut attempt = |src: Option<IpAddr>| -> io::Result<std::net::TcpStream> {
            if no_port.skip(now, src, dst) {
                return Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
            }
            let source = src.map_or(Source::Host, Source::Local);
            let r = sys::connect_upstream(dst, opts, source);
            match &r {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                    no_port.failed(now, src, dst)
                }
                Ok(_) => no_port.succeeded(src, dst),
                Err(_) => {}
            }
            r
        };
        let mut last = None;
        for ip in self.sources.for_connection(dst.is_ipv6()) {
            match attempt(Some(ip)) {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => last = Some(e),
                other => return other,
            }
        }
        match last {
            Some(e) => Err(e),
            None => attempt(None),
        }
    }

    /// No source port is free towards `dst` from any address we may use:
    /// the client is to be reset (it learns at once, as it would from a
    /// refused connect), counted, and warned about once per episode (SRC-3).
    fn no_source_port(
        &self,
        peer: SocketAddr,
        dst: SocketAddr,
        e: &io::Error,
        now: Instant,
        stats: &WorkerStats,
    ) {
        stats.closed(EndKind::NoSourcePort).add(1);
        if self.ports.failed(now, dst) {
            let family: Vec<String> = self
                .cfg
                .sources
                .iter()
                .filter(|ip| ip.is_ipv6() == dst.is_ipv6())
                .map(|ip| ip.to_string())
                .collect();
            let from = if family.is_empty() {
                "from the host's own address".to_string()
            } else {
                format!("from --source {}", family.join(", "))
            };
            warn!(
                "{peer} -> {dst}: connect: {e}: no source port is free towards {dst} {from} (every \
                 local port is in use or in TIME_WAIT). Clients are reset until ports free; counted in \
                 tproxyd_tcp_connect_errors_total{{kind=\"no_source_port\"}}; logged once per episode. \
                 Fix: more --source addresses, net.ipv4.tcp_tw_reuse=1 (tune/sysctl.conf), a wider \
                 net.ipv4.ip_local_port_range; `tproxyd doctor` does the arithmetic."
            );
        } else {
            debug!("{peer} -> {dst}: connect: {e} (no source port)");
        }
    }
}

/// When a connect whose SYN left at `now` must have completed (CONNECT-1).
pub fn deadline(now: Instant, connect_timeout: Duration) -> Instant {
    now + connect_timeout
}

/// What an event on a connecting upstream socket says: `Ok(true)`, the
/// connect completed; `Ok(false)`, not yet (a spurious wake-up); `Err`, it
/// failed, and how (CONNECT-1).
pub fn completed(upstream: &TcpStream, ev: &Event) -> Result<bool, End> {
    // A connecting socket reports nothing until the handshake ends;
    // writable with no error or hang-up means it completed, with no
    // syscall to ask. Anything else, ask the socket.
    if ev.is_writable() && !ev.is_error() && !ev.is_write_closed() {
        return Ok(true);
    }
    let connect_end = |e: io::Error| {
        let kind = match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => EndKind::ConnectRefused,
            Some(libc::ETIMEDOUT) => EndKind::ConnectTimeout,
            _ => EndKind::ConnectError,
        };
        End::new(kind, Some(e))
    };
    match upstream.take_error() {
        Ok(Some(e)) | Err(e) => return Err(connect_end(e)),
        Ok(None) => {}
    }
    match upstream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(connect_end(e)),
    }
}
