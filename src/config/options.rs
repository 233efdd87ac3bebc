//! The option table (getopts) and the help text built from it. Every flag
//! tproxyd takes is declared here once, with its help line; config.rs reads
//! the matches and validates them.
//!
//! What must stay true: CFG-3: each flag is declared once, here, and its
//! help line says its unit and default where it has one (README › Options
//! says the same; keep them together).

pub(super) fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.parsing_style(getopts::ParsingStyle::StopAtFirstFree);
    o.optopt(
        "p",
        "port",
        "port the TPROXY rules divert to (required)",
        "PORT",
    );
    o.optmulti(
        "l",
        "listen",
        "address to listen on; repeatable (default: 0.0.0.0 and ::)",
        "ADDR",
    );
    o.optopt(
        "w",
        "workers",
        "worker threads (default: one per core)",
        "N",
    );
    o.optflag("", "no-pin", "do not pin workers to cores");
    o.optopt(
        "m",
        "mark",
        "SO_MARK on every upstream socket (decimal or 0x hex)",
        "N",
    );
    o.optopt(
        "",
        "connect-timeout",
        "give up on an upstream that has not answered (default 5s)",
        "DUR",
    );
    o.optopt(
        "",
        "idle-timeout",
        "reset connections that moved nothing for this long; 0 = never (default 1h)",
        "DUR",
    );
    o.optopt(
        "",
        "max-conns",
        "stop accepting at this many connections (default: from RLIMIT_NOFILE)",
        "N",
    );
    o.optopt(
        "",
        "max-conns-per-client",
        "reset a client's new TCP connections while it holds this many (default: no cap)",
        "N",
    );
    o.optopt(
        "",
        "client-prefix",
        "what one client is for --max-conns-per-client: prefix lengths for IPv4 and IPv6 (default 32,64)",
        "V4LEN,V6LEN",
    );
    o.optopt(
        "",
        "pipe-size",
        "splice pipe capacity per direction, bytes, k or m suffix (default 64k)",
        "BYTES",
    );
    o.optflag(
        "",
        "spoof-source",
        "connect upstream (TCP) and send (UDP) from the client's own address; needs the return route and, with UDP, --mark (see README)",
    );
    o.optopt(
        "",
        "send-proxy",
        "start every upstream (TCP) connection with a PROXY protocol header, v1 (text) or v2 (binary), naming the client and the original destination",
        "v1|v2",
    );
    o.optmulti(
        "",
        "source",
        "connect upstream (TCP) from this address of the host; repeatable, used in turn per family (default: the host's choice)",
        "ADDR",
    );
    o.optopt(
        "",
        "bulk-pipe-size",
        "pipe capacity for directions moving bulk (default 1m where the kernel allows it, else --pipe-size)",
        "BYTES",
    );
    o.optopt(
        "",
        "drain-timeout",
        "on SIGTERM, wait this long for open connections (default 30s)",
        "DUR",
    );
    o.optopt(
        "",
        "log-level",
        "off, error, warn, info, debug or trace (default info)",
        "LEVEL",
    );
    o.optopt(
        "",
        "busy-poll",
        "after each event, poll without sleeping for this long before blocking: lower latency where waking a thread is slow (VMs), at the cost of CPU; at most 1s (default: off)",
        "DUR",
    );
    o.optflag(
        "",
        "no-splice",
        "forward by read/write copies instead of splice (for comparison)",
    );
    o.optflag("", "no-tcp", "do not proxy TCP");
    o.optflag("", "no-udp", "do not proxy UDP");
    o.optopt(
        "",
        "udp-timeout",
        "forget a UDP flow idle for this long (default 60s)",
        "DUR",
    );
    o.optopt(
        "",
        "udp-max-sessions",
        "UDP flows tracked at once; the least recently used goes first (default 4096)",
        "N",
    );
    o.optopt(
        "",
        "udp-nat",
        "UDP NAT behaviour: full-cone, restricted, port-restricted or symmetric (default full-cone)",
        "MODE",
    );
    o.optopt(
        "",
        "udp-workers",
        "UDP worker threads, each with its own listeners and sessions (default 1)",
        "N",
    );
    o.optopt(
        "",
        "metrics",
        "serve Prometheus metrics at http://ADDR:PORT/metrics (default: off)",
        "ADDR:PORT",
    );
    o.optflag("h", "help", "print this help");
    o.optflag("V", "version", "print the version");
    o
}

pub fn usage() -> String {
    options().usage(
        "Usage: tproxyd --port PORT [options]\n       \
         tproxyd doctor --port PORT [options]  (check this host for that configuration)\n\n\
         Forwards the TCP connections and UDP flows that TPROXY rules divert to\n\
         PORT to their original destinations. Durations take us, ms, s, m or h.",
    )
}
