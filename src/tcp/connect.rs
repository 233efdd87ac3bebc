//! Connecting (moved from worker.rs and conn.rs): the upstream socket for an
//! admitted client, from its source address, and the connect's completion.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;

use crate::own_sockets::Proto;
use crate::pause::Reason;
use crate::stats::EndKind;
use crate::sys::{self, Source};
use crate::tcp::accept::ACCEPT_RETRY;
use crate::tcp::close::End;
use crate::tcp::conn::Conn;
use crate::token::{self, Side};
use crate::worker::Worker;

impl Worker {
    /// Start the upstream connect for an accepted client and take the pair
    /// into the slab. Out of descriptors, the client is parked (WRK-5).
    pub(crate) fn connect(&mut self, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        // WRK-7: a spoofed upstream socket (the client's own address) is not
        // registered. A real client may open a connection from exactly its
        // address and port, which the router's kernel chose without seeing
        // the client's, to the same server (the soak met it 26 times in
        // 215,712 connections): not a loop, and it must be served. Nor can a
        // spoofed upstream loop: its SYN, sent back into the proxy, gets a
        // SYN-ACK addressed to the real client, which resets it, so no hop
        // is ever accepted.
        let spoofed = self.cfg.spoof_source && peer.is_ipv4() == dst.is_ipv4();
        let upstream = self.open_upstream(peer, dst).and_then(|s| {
            // WRK-7: the kernel chose the address and port in connect.
            let entry = if spoofed {
                None
            } else {
                let local = s.local_addr()?;
                Some(self.own.hold(Proto::Tcp, local, Some(dst)))
            };
            Ok((s, entry))
        });
        let (upstream, own_entry) = match upstream {
            Ok((s, entry)) => (TcpStream::from_std(s), entry),
            Err(e) if sys::is_exhaustion(&e) => {
                self.parked.push((client, peer, dst));
                self.stats.waiting.set(self.parked.len() as u64);
                self.parked_retry = Some(self.now + ACCEPT_RETRY);
                for i in 0..self.listeners.len() {
                    self.pause(i);
                }
                self.update_waiting(Some((Reason::FdLimit, &e)));
                return;
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                self.no_source_port(client, peer, dst, &e);
                return;
            }
            Err(e) => {
                let kind = if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                    EndKind::ConnectRefused
                } else {
                    EndKind::ConnectError
                };
                debug!("{peer} -> {dst}: connect: {e}");
                self.stats.closed(kind).add(1);
                self.refuse(client);
                return;
            }
        };
        if let Some(ep) = self.ports.succeeded(self.now) {
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
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut conn = Conn::new(
            (client, peer),
            (upstream, dst),
            own_entry,
            generation,
            self.now,
            self.cfg.connect_timeout,
            self.cfg.splice,
        );
        let registry = self.poll.registry();
        let (c, u) = conn.sockets_mut();
        // PRIORITY: urgent data changes how a direction reads (CONN-7).
        let both = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
        let registered = if slot > token::MAX_SLOT {
            Err(io::Error::other("slab slot out of token range"))
        } else {
            registry
                .register(c, token::conn(slot, Side::Client), both)
                .and_then(|()| registry.register(u, token::conn(slot, Side::Upstream), both))
        };
        if let Err(e) = registered {
            warn!("{peer} -> {dst}: register: {e}");
            let end = End {
                kind: EndKind::LocalError,
                cause: Some(e),
            };
            self.stats.closed(EndKind::LocalError).add(1);
            conn.close(&end, &mut self.bufs.pipes, &self.stats);
            self.active.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        if let Some(d) = conn.deadline(self.cfg.idle_timeout) {
            self.timers.push(d, slot, generation);
            conn.armed = Some(d);
        }
        entry.insert(conn);
        self.stats.active.add(1);
    }

    /// The upstream socket for a client: with `--spoof-source` from the
    /// client's own address (same family, as TPROXY never changes it);
    /// otherwise from the family's next `--source` address in turn, and on
    /// EADDRNOTAVAIL from each of the others (SRC-1, SRC-2); with none, from
    /// wherever the host's routing says. A source that had no port towards
    /// `dst` a moment ago is skipped (SRC-4).
    pub(crate) fn open_upstream(
        &mut self,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<std::net::TcpStream> {
        let (opts, now) = (self.upstream_opts, self.now);
        if self.cfg.spoof_source && peer.is_ipv4() == dst.is_ipv4() {
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
    /// the client is reset (it learns at once, as it would from a refused
    /// connect), counted, and warned about once per episode (SRC-3).
    pub(crate) fn no_source_port(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        e: &io::Error,
    ) {
        self.stats.closed(EndKind::NoSourcePort).add(1);
        if self.ports.failed(self.now, dst) {
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
        self.refuse(client);
    }
}

impl Conn {
    /// Has our connect to the original destination completed?
    /// `Ok(false)`: not yet (a spurious wake-up).
    pub(super) fn finish_connect(&mut self) -> Result<bool, End> {
        let connect_end = |e: io::Error| {
            let kind = match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => EndKind::ConnectRefused,
                Some(libc::ETIMEDOUT) => EndKind::ConnectTimeout,
                _ => EndKind::ConnectError,
            };
            End::new(kind, Some(e))
        };
        match self.upstream.take_error() {
            Ok(Some(e)) | Err(e) => return Err(connect_end(e)),
            Ok(None) => {}
        }
        match self.upstream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
            Err(e) => Err(connect_end(e)),
        }
    }
}
