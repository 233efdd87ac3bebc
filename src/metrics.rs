//! Prometheus text exposition of the workers' counters, and the little
//! HTTP/1.1 exchange that serves it (`GET /metrics`).
//!
//! Rendering reads the per-worker atomics with relaxed loads: a scrape takes
//! no lock and never stops a worker (STAT-1). The HTTP side is pure parsing
//! and formatting here; the sockets live in the control loop.
//!
//! What must stay true:
//! - MET-1: names follow Prometheus conventions: `tproxyd_` prefix, counters
//!   end in `_total`, every family has one HELP and one TYPE line before its
//!   samples, label values are from fixed sets (no addresses: bounded
//!   cardinality).
//! - MET-2: a request is answered from at most `MAX_REQUEST` bytes; anything
//!   larger or malformed gets a 4xx and the connection closes.

use std::fmt::Write;
use std::sync::Arc;

use crate::stats::{Counter, EndKind, UdpDrop, UdpEnd, UdpStats, WorkerStats};

/// The largest request head a scrape may send.
pub const MAX_REQUEST: usize = 8192;

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP tproxyd_{name} {help}");
        let _ = writeln!(self.out, "# TYPE tproxyd_{name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, value: u64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "tproxyd_{name} {value}");
        } else {
            let _ = writeln!(self.out, "tproxyd_{name}{{{labels}}} {value}");
        }
    }
}

/// The exposition text for all TCP workers and the UDP worker.
pub fn render(tcp: &[Arc<WorkerStats>], udp: &[Arc<UdpStats>]) -> String {
    let mut out = String::with_capacity(4096);
    let mut f = Family { out: &mut out };
    let sum = |c: fn(&WorkerStats) -> &Counter| tcp.iter().map(|s| c(s).get()).sum::<u64>();

    f.head("build_info", "gauge", "Version of the running tproxyd.");
    f.sample(
        "build_info",
        &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );

    f.head(
        "tcp_connections_accepted_total",
        "counter",
        "TCP connections accepted from the listeners.",
    );
    f.sample("tcp_connections_accepted_total", "", sum(|s| &s.accepted));
    f.head(
        "tcp_connections_active",
        "gauge",
        "TCP connections open now.",
    );
    f.sample("tcp_connections_active", "", sum(|s| &s.active));
    f.head(
        "tcp_connections_waiting",
        "gauge",
        "Accepted TCP clients waiting for a descriptor for their upstream connection.",
    );
    f.sample("tcp_connections_waiting", "", sum(|s| &s.waiting));
    f.head(
        "tcp_connections_closed_total",
        "counter",
        "TCP connections closed, by how they ended.",
    );
    for k in EndKind::ALL {
        let v = tcp.iter().map(|s| s.closed(k).get()).sum();
        f.sample(
            "tcp_connections_closed_total",
            &format!("end=\"{}\"", k.name()),
            v,
        );
    }
    f.head(
        "tcp_connect_errors_total",
        "counter",
        "Upstream connects that failed, by kind (a subset of closed_total).",
    );
    for (kind, k) in [
        ("refused", EndKind::ConnectRefused),
        ("timeout", EndKind::ConnectTimeout),
        ("no_source_port", EndKind::NoSourcePort),
        ("other", EndKind::ConnectError),
    ] {
        let v = tcp.iter().map(|s| s.closed(k).get()).sum();
        f.sample("tcp_connect_errors_total", &format!("kind=\"{kind}\""), v);
    }
    f.head(
        "tcp_loop_refusals_total",
        "counter",
        "TCP connections refused as loops, by reason: to_proxy (the destination was the proxy itself), own_upstream (the client was one of the proxy's own upstream connections, sent back by the host's rules).",
    );
    f.sample(
        "tcp_loop_refusals_total",
        "reason=\"to_proxy\"",
        sum(|s| &s.refused_loop),
    );
    f.sample(
        "tcp_loop_refusals_total",
        "reason=\"own_upstream\"",
        sum(|s| &s.refused_own_upstream),
    );
    f.head(
        "tcp_client_limit_total",
        "counter",
        "TCP connections reset because their client already held --max-conns-per-client.",
    );
    f.sample("tcp_client_limit_total", "", sum(|s| &s.client_limit));
    f.head(
        "tcp_bytes_total",
        "counter",
        "Bytes forwarded over TCP, by direction.",
    );
    f.sample(
        "tcp_bytes_total",
        "direction=\"client_to_upstream\"",
        sum(|s| &s.bytes_client_to_upstream),
    );
    f.sample(
        "tcp_bytes_total",
        "direction=\"upstream_to_client\"",
        sum(|s| &s.bytes_upstream_to_client),
    );
    f.head(
        "tcp_splice_fallbacks_total",
        "counter",
        "Connection directions that fell back from splice to copying.",
    );
    f.sample(
        "tcp_splice_fallbacks_total",
        "",
        sum(|s| &s.splice_fallbacks),
    );
    f.head(
        "tcp_pipes",
        "gauge",
        "Splice pipes held by connections (bulk_in_use: of those, the bulk ones) or pooled.",
    );
    f.sample("tcp_pipes", "state=\"in_use\"", sum(|s| &s.pipes_in_use));
    f.sample(
        "tcp_pipes",
        "state=\"bulk_in_use\"",
        sum(|s| &s.pipes_bulk_in_use),
    );
    f.sample("tcp_pipes", "state=\"pooled\"", sum(|s| &s.pipes_pooled));
    f.head(
        "tcp_accept_pauses_total",
        "counter",
        "Episodes of accepting paused, by reason.",
    );
    f.sample(
        "tcp_accept_pauses_total",
        "reason=\"fd_limit\"",
        sum(|s| &s.accept_pauses_fd),
    );
    f.sample(
        "tcp_accept_pauses_total",
        "reason=\"max_conns\"",
        sum(|s| &s.accept_pauses_max_conns),
    );
    f.head(
        "tcp_accept_queue",
        "gauge",
        "TCP clients waiting in the accept queues of paused listeners, as last read while paused (0 while accepting).",
    );
    f.sample("tcp_accept_queue", "", sum(|s| &s.accept_queue));
    f.head(
        "tcp_connections_accepted_after_waiting_total",
        "counter",
        "TCP clients accepted after waiting while accepting was paused (of accepted_total).",
    );
    f.sample(
        "tcp_connections_accepted_after_waiting_total",
        "",
        sum(|s| &s.accepted_after_waiting),
    );

    if !udp.is_empty() {
        let usum = |c: fn(&UdpStats) -> &Counter| udp.iter().map(|s| c(s).get()).sum::<u64>();
        f.head(
            "udp_workers",
            "gauge",
            "UDP worker threads (--udp-workers).",
        );
        f.sample("udp_workers", "", udp.len() as u64);
        f.head(
            "udp_sessions_active",
            "gauge",
            "UDP sessions (NAT mappings) open now.",
        );
        f.sample("udp_sessions_active", "", usum(|s| &s.sessions_active));
        f.head(
            "udp_sessions_created_total",
            "counter",
            "UDP sessions (NAT mappings) opened.",
        );
        f.sample(
            "udp_sessions_created_total",
            "",
            usum(|s| &s.sessions_created),
        );
        f.head(
            "udp_worker_sessions_created_total",
            "counter",
            "UDP sessions opened, by UDP worker: how the kernel spread the clients.",
        );
        for (i, u) in udp.iter().enumerate() {
            f.sample(
                "udp_worker_sessions_created_total",
                &format!("worker=\"{i}\""),
                u.sessions_created.get(),
            );
        }
        f.head(
            "udp_sessions_ended_total",
            "counter",
            "UDP sessions ended, by reason.",
        );
        for e in UdpEnd::ALL {
            let v = udp.iter().map(|s| s.ended(e).get()).sum();
            f.sample(
                "udp_sessions_ended_total",
                &format!("reason=\"{}\"", e.name()),
                v,
            );
        }
        f.head(
            "udp_datagrams_total",
            "counter",
            "UDP datagrams forwarded, by direction.",
        );
        f.sample(
            "udp_datagrams_total",
            "direction=\"client_to_upstream\"",
            usum(|s| &s.datagrams_to_upstream),
        );
        f.sample(
            "udp_datagrams_total",
            "direction=\"upstream_to_client\"",
            usum(|s| &s.datagrams_to_client),
        );
        f.head(
            "udp_bytes_total",
            "counter",
            "UDP payload bytes forwarded, by direction.",
        );
        f.sample(
            "udp_bytes_total",
            "direction=\"client_to_upstream\"",
            usum(|s| &s.bytes_to_upstream),
        );
        f.sample(
            "udp_bytes_total",
            "direction=\"upstream_to_client\"",
            usum(|s| &s.bytes_to_client),
        );
        f.head(
            "udp_drops_total",
            "counter",
            "UDP datagrams dropped, by reason.",
        );
        for d in UdpDrop::ALL {
            let v = udp.iter().map(|s| s.dropped(d).get()).sum();
            f.sample("udp_drops_total", &format!("reason=\"{}\"", d.name()), v);
        }
        f.head(
            "udp_remote_unreachable_total",
            "counter",
            "ICMP errors that said one remote of a UDP mapping cannot be reached.",
        );
        f.sample(
            "udp_remote_unreachable_total",
            "",
            usum(|s| &s.remote_unreachable),
        );
    }
    out
}

/// What to do with the bytes of a request head read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep reading.
    Incomplete,
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

/// Parse a request head (MET-2).
pub fn parse_request(buf: &[u8]) -> Request {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_REQUEST {
            Request::Bad
        } else {
            Request::Incomplete
        };
    };
    let head = &buf[..end];
    let line = head.split(|b| *b == b'\n').next().unwrap_or(head);
    let line = std::str::from_utf8(line)
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    if method != "GET" {
        return Request::BadMethod;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path == "/metrics" {
        Request::Metrics
    } else {
        Request::NotFound
    }
}

/// The whole response for a parsed request; the connection closes after it.
pub fn response(req: &Request, body: impl FnOnce() -> String) -> Vec<u8> {
    let (status, ctype, body) = match req {
        Request::Metrics => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body()),
        Request::NotFound => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        Request::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
        Request::Bad | Request::Incomplete => {
            ("400 Bad Request", "text/plain", "bad request\n".to_string())
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let w = Arc::new(WorkerStats::default());
        w.accepted.add(3);
        w.closed(EndKind::ConnectRefused).add(2);
        w.refused_own_upstream.add(1);
        w.client_limit.add(3);
        let u = Arc::new(UdpStats::default());
        u.dropped(UdpDrop::Loop).add(1);
        let text = render(&[w.clone(), w], &[u.clone(), u]);
        let mut declared = std::collections::HashSet::new();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                assert!(
                    declared.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut p = rest.split(' ');
                let (name, kind) = (p.next().unwrap(), p.next().unwrap());
                assert!(typed.insert(name.to_string()));
                assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with("tproxyd_"), "{line}");
                assert!(
                    declared.contains(name) && typed.contains(name),
                    "undeclared: {line}"
                );
                line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
            }
        }
        assert!(text.contains("tproxyd_tcp_connections_accepted_total 6\n"));
        assert!(text.contains("tproxyd_tcp_connect_errors_total{kind=\"refused\"} 4\n"));
        assert!(text.contains("tproxyd_udp_drops_total{reason=\"loop\"} 2\n"));
        assert!(text.contains("tproxyd_udp_workers 2\n"));
        assert!(text.contains("tproxyd_udp_worker_sessions_created_total{worker=\"1\"} 0\n"));
        assert!(text.contains("tproxyd_tcp_loop_refusals_total{reason=\"own_upstream\"} 2\n"));
        assert!(text.contains("tproxyd_tcp_loop_refusals_total{reason=\"to_proxy\"} 0\n"));
        assert!(text.contains("tproxyd_tcp_client_limit_total 6\n"));
    }

    #[test]
    fn requests() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::BadMethod
        );
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\n"),
            Request::Incomplete
        );
        assert_eq!(parse_request(b"garbage\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(&[b'a'; MAX_REQUEST]), Request::Bad);
        let r = response(&Request::Metrics, || "x 1\n".into());
        let r = String::from_utf8(r).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n")
                && r.contains("Content-Length: 4\r\n")
                && r.ends_with("\r\n\r\nx 1\n")
        );
    }
}
