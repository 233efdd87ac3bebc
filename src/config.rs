//! Command-line options -> a validated [`Config`]. Pure: no I/O, so every
//! rule here is unit-tested. The flags are declared in `config/options.rs`,
//! single values read in `config/values.rs`; this file combines them and
//! checks the combinations.
//!
//! What must stay true:
//! - CFG-1: a bad value, an unknown flag, a stray argument or a conflict
//!   yields exactly one [`UsageError`] naming the flag; main prints it on one
//!   line and exits 2. Nothing here panics on user input.
//! - CFG-2: a `Config` that comes out of [`parse`] is internally consistent
//!   (no zero workers, no empty listen list, no duplicate listen address);
//!   what can only be checked against the running host (capabilities, limits)
//!   is the daemon's job (daemon.rs).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use log::LevelFilter;

use crate::tcp::proxy_header;
use crate::udp::nat::NatMode;

mod options;
mod values;

use options::options;
pub use options::usage;
use values::{
    check_utf8, opt_duration, parse_client_prefix, parse_count, parse_listen, parse_mark,
    parse_port, parse_size, parse_source,
};

/// How long to wait for the upstream's SYN-ACK. Long enough for a lossy path
/// (one SYN retransmission at 1 s, a second at 3 s), short enough that a
/// client behind a blackholed destination hears about it in seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A transparent proxy must not cut long-quiet sessions (ssh, databases) that
/// would have lived without it; one hour reclaims dead peers eventually
/// without surprising anybody. `0` turns it off.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long SIGTERM waits for open connections before resetting them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pipe capacity per direction. 64 KiB is the kernel's default and every pipe
/// gets it without privileges; bigger pipes move more per splice call but
/// are charged against fs.pipe-user-pages-soft (see tune/).
pub const DEFAULT_PIPE_SIZE: usize = 64 * 1024;
/// Pipe capacity for directions moving bulk, where the kernel allows it
/// (see `budget::bulk_pipe_size`): a splice then moves up to 1 MiB at a time.
/// Measured: +13-22% throughput and 12-32% less CPU per GB than 64 KiB.
pub const DEFAULT_BULK_PIPE_SIZE: usize = 1 << 20;
/// A UDP flow with no datagram either way for this long is forgotten; the
/// same order as conntrack's udp_timeout_stream (120 s) and most NATs (30-60 s).
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest `--busy-poll` window: past it a worker is a spinning core
/// rather than a poller waiting a moment for the next packet.
pub const MAX_BUSY_POLL: Duration = Duration::from_secs(1);
/// Sessions the UDP table holds before it evicts the least recently used.
/// Each holds one upstream socket, so this is also a descriptor budget.
pub const DEFAULT_UDP_MAX_SESSIONS: usize = 4096;
pub const MIN_PIPE_SIZE: usize = 4096;
pub const MAX_PIPE_SIZE: usize = 256 * 1024 * 1024;
pub const MAX_WORKERS: usize = 1024;
/// UDP workers: one unless asked (the design's separate UDP worker); more
/// spread clients over cores, each client address and port staying on one.
pub const DEFAULT_UDP_WORKERS: usize = 1;
/// How `--max-conns-per-client` groups clients by default: each IPv4
/// address, and each IPv6 /64, the block one host or one site's LAN gets
/// (RFC 6177), so a host cannot step past its cap by using more of its
/// own addresses.
pub const DEFAULT_CLIENT_PREFIX: ClientPrefix = ClientPrefix { v4: 32, v6: 64 };

/// `--client-prefix V4LEN,V6LEN`: the prefix length that makes two client
/// addresses of a family one client for `--max-conns-per-client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientPrefix {
    pub v4: u8,
    pub v6: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub port: u16,
    pub listen: Vec<IpAddr>,
    /// True when `--listen` was not given: an unavailable family (IPv6
    /// disabled on the host) is then skipped with a warning, not fatal.
    pub listen_defaulted: bool,
    pub workers: usize,
    pub pin: bool,
    pub mark: Option<u32>,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// `None`: derived from RLIMIT_NOFILE at start.
    pub max_conns: Option<usize>,
    /// `--max-conns-per-client`: open TCP connections one client (one
    /// `client_prefix` block) may hold, all workers together; `None`: no cap.
    pub max_conns_per_client: Option<u32>,
    pub client_prefix: ClientPrefix,
    pub pipe_size: usize,
    /// `None`: chosen at start from what the kernel allows this process.
    pub bulk_pipe_size: Option<usize>,
    pub drain_timeout: Duration,
    /// `--busy-poll`: how long a worker keeps polling without sleeping
    /// after an event (busy_poll.rs); `None`: it sleeps at once.
    pub busy_poll: Option<Duration>,
    pub log_level: LevelFilter,
    pub splice: bool,
    /// TCP upstream connections come from the client's address.
    pub spoof_source: bool,
    /// `--send-proxy`: write a PROXY protocol header of this version first
    /// on every TCP upstream connection.
    pub send_proxy: Option<proxy_header::Version>,
    /// `--source`: this host's addresses TCP upstream connections come from,
    /// per family in turn; empty: the host's default.
    pub sources: Vec<IpAddr>,
    pub tcp: bool,
    pub udp: bool,
    pub udp_timeout: Duration,
    /// All UDP workers together.
    pub udp_max_sessions: usize,
    /// True when `--udp-max-sessions` was given: a limit that cannot hold
    /// it is then an error, not a reason to lower it (budget FD-2).
    pub udp_max_sessions_given: bool,
    pub udp_nat: NatMode,
    pub udp_workers: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Config),
    /// `tproxyd doctor [options]`: check the host for this configuration.
    Doctor(Config),
    Help(String),
    Version,
}

/// A command-line mistake: one line, naming the flag.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parse the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut args: Vec<std::ffi::OsString> =
        args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let doctor = args.first().is_some_and(|a| a == "doctor");
    if doctor {
        args.remove(0);
    }
    check_utf8(&args)?;
    let m = options()
        .parse(args)
        .map_err(|e| UsageError(fail_message(&e)))?;
    if m.opt_present("help") {
        return Ok(Command::Help(usage()));
    }
    if m.opt_present("version") {
        return Ok(Command::Version);
    }
    if let Some(stray) = m.free.first() {
        return Err(UsageError(format!("unexpected argument '{stray}'")));
    }

    let port = match m.opt_str("port") {
        None => return Err(UsageError("--port is required".into())),
        Some(s) => parse_port(&s)?,
    };
    let (listen, listen_defaulted) = {
        let given = m.opt_strs("listen");
        if given.is_empty() {
            (vec![IpAddr::from([0u8; 4]), IpAddr::from([0u16; 8])], true)
        } else {
            let mut out: Vec<IpAddr> = Vec::with_capacity(given.len());
            for s in &given {
                let ip = parse_listen(s)?;
                if out.contains(&ip) {
                    return Err(UsageError(format!("--listen {s} is given twice")));
                }
                out.push(ip);
            }
            (out, false)
        }
    };
    let workers = match m.opt_str("workers") {
        None => default_workers(),
        Some(s) => parse_count("--workers", &s, 1, MAX_WORKERS)?,
    };
    let mark = m.opt_str("mark").map(|s| parse_mark(&s)).transpose()?;
    let connect_timeout = opt_duration(&m, "connect-timeout", DEFAULT_CONNECT_TIMEOUT)?;
    if connect_timeout.is_zero() {
        return Err(UsageError("--connect-timeout must be more than 0".into()));
    }
    let idle = opt_duration(&m, "idle-timeout", DEFAULT_IDLE_TIMEOUT)?;
    let idle_timeout = (!idle.is_zero()).then_some(idle);
    let max_conns = m
        .opt_str("max-conns")
        .map(|s| parse_count("--max-conns", &s, 1, 10_000_000))
        .transpose()?;
    let max_conns_per_client = m
        .opt_str("max-conns-per-client")
        .map(|s| parse_count("--max-conns-per-client", &s, 1, 10_000_000).map(|n| n as u32))
        .transpose()?;
    let client_prefix = match m.opt_str("client-prefix") {
        None => DEFAULT_CLIENT_PREFIX,
        // Without a cap the grouping changes nothing: an operator who set it
        // believes something is limited, so say it is not.
        Some(_) if max_conns_per_client.is_none() => {
            return Err(UsageError(
                "--client-prefix has no effect without --max-conns-per-client".into(),
            ));
        }
        Some(s) => parse_client_prefix(&s)?,
    };
    let pipe_size = match m.opt_str("pipe-size") {
        None => DEFAULT_PIPE_SIZE,
        Some(s) => parse_size("--pipe-size", &s, MIN_PIPE_SIZE, MAX_PIPE_SIZE)?,
    };
    let bulk_pipe_size = m
        .opt_str("bulk-pipe-size")
        .map(|s| parse_size("--bulk-pipe-size", &s, MIN_PIPE_SIZE, MAX_PIPE_SIZE))
        .transpose()?;
    if let Some(b) = bulk_pipe_size
        && b < pipe_size
    {
        return Err(UsageError(format!(
            "--bulk-pipe-size {b} is smaller than the pipe size {pipe_size}"
        )));
    }
    let drain_timeout = opt_duration(&m, "drain-timeout", DEFAULT_DRAIN_TIMEOUT)?;
    let busy_poll = opt_duration(&m, "busy-poll", Duration::ZERO)?;
    if busy_poll > MAX_BUSY_POLL {
        return Err(UsageError(format!(
            "--busy-poll {busy_poll:?}: at most {MAX_BUSY_POLL:?} (it is how long a worker spins after each event)"
        )));
    }
    let busy_poll = (!busy_poll.is_zero()).then_some(busy_poll);
    let log_level = match m.opt_str("log-level") {
        None => LevelFilter::Info,
        Some(s) => s.parse::<LevelFilter>().map_err(|_| {
            UsageError(format!(
                "--log-level '{s}': expected off, error, warn, info, debug or trace"
            ))
        })?,
    };
    let splice = !m.opt_present("no-splice");
    for o in ["pipe-size", "bulk-pipe-size"] {
        if !splice && m.opt_present(o) {
            return Err(UsageError(format!(
                "--{o} has no effect with --no-splice: give one or the other"
            )));
        }
    }

    let (tcp, udp) = (!m.opt_present("no-tcp"), !m.opt_present("no-udp"));
    if !tcp && !udp {
        return Err(UsageError(
            "--no-tcp and --no-udp together leave nothing to proxy".into(),
        ));
    }
    // Like --pipe-size with --no-splice: an option that cannot take effect
    // is a mistake worth naming, not something to ignore.
    let off = |proto_off: bool, flag: &str, opts: &[&str]| -> Result<(), UsageError> {
        match opts.iter().find(|o| proto_off && m.opt_present(o)) {
            Some(o) => Err(UsageError(format!("--{o} has no effect with {flag}"))),
            None => Ok(()),
        }
    };
    off(
        !tcp,
        "--no-tcp",
        &[
            "workers",
            "no-pin",
            "connect-timeout",
            "idle-timeout",
            "max-conns",
            "max-conns-per-client",
            "client-prefix",
            "pipe-size",
            "bulk-pipe-size",
            "no-splice",
            "source",
            "send-proxy",
        ],
    )?;
    off(
        !udp,
        "--no-udp",
        &["udp-timeout", "udp-max-sessions", "udp-nat", "udp-workers"],
    )?;
    let udp_timeout = opt_duration(&m, "udp-timeout", DEFAULT_UDP_TIMEOUT)?;
    if udp_timeout.is_zero() {
        return Err(UsageError("--udp-timeout must be more than 0".into()));
    }
    let udp_max_sessions = match m.opt_str("udp-max-sessions") {
        None => DEFAULT_UDP_MAX_SESSIONS,
        Some(s) => parse_count("--udp-max-sessions", &s, 1, 1_000_000)?,
    };
    let udp_nat = match m.opt_str("udp-nat") {
        None => NatMode::default(),
        Some(s) => NatMode::parse(&s).ok_or_else(|| {
            UsageError(format!(
                "--udp-nat '{s}': expected full-cone, restricted, port-restricted or symmetric"
            ))
        })?,
    };
    let udp_workers = match m.opt_str("udp-workers") {
        None => DEFAULT_UDP_WORKERS,
        Some(s) => parse_count("--udp-workers", &s, 1, MAX_WORKERS)?,
    };
    if udp_workers > udp_max_sessions {
        return Err(UsageError(format!(
            "--udp-workers {udp_workers} is more than --udp-max-sessions {udp_max_sessions}: each worker needs at least one"
        )));
    }
    let spoof_source = m.opt_present("spoof-source");
    let mut sources: Vec<IpAddr> = Vec::new();
    for s in m.opt_strs("source") {
        let ip = parse_source(&s)?;
        if sources.contains(&ip) {
            return Err(UsageError(format!("--source {s} is given twice")));
        }
        sources.push(ip);
    }
    if spoof_source && !sources.is_empty() {
        return Err(UsageError(
            "--source and --spoof-source both choose where upstream connections come from: give one"
                .into(),
        ));
    }
    let send_proxy = m
        .opt_str("send-proxy")
        .map(|s| {
            proxy_header::Version::parse(&s)
                .ok_or_else(|| UsageError(format!("--send-proxy '{s}': expected v1 or v2")))
        })
        .transpose()?;
    if spoof_source && send_proxy.is_some() {
        return Err(UsageError(
            "--send-proxy and --spoof-source: with spoofing the server already sees the client's address as the connection's source; choose one".into(),
        ));
    }
    // The rules tell the proxy's spoofed UDP sockets (whose answers must be
    // delivered to them) from its reply sockets (which must never take a
    // client's datagram) by the socket mark alone.
    if spoof_source && udp && mark.is_none() {
        return Err(UsageError(
            "--spoof-source with UDP needs --mark (the rules deliver the servers' answers to the proxy's sockets by it), or add --no-udp".into(),
        ));
    }

    let metrics = m
        .opt_str("metrics")
        .map(|s| {
            s.parse::<SocketAddr>().map_err(|_| {
                UsageError(format!(
                    "--metrics '{s}': expected ADDR:PORT, e.g. 127.0.0.1:9120 or [::1]:9120"
                ))
            })
        })
        .transpose()?;
    if let Some(ma) = metrics
        && ma.port() == port
    {
        return Err(UsageError(format!(
            "--metrics {ma}: port {port} is the proxy's own (--port)"
        )));
    }
    let cfg = Config {
        port,
        listen,
        listen_defaulted,
        workers,
        pin: !m.opt_present("no-pin"),
        mark,
        connect_timeout,
        idle_timeout,
        max_conns,
        max_conns_per_client,
        client_prefix,
        pipe_size,
        bulk_pipe_size,
        drain_timeout,
        busy_poll,
        log_level,
        splice,
        spoof_source,
        send_proxy,
        sources,
        tcp,
        udp,
        udp_timeout,
        udp_max_sessions,
        udp_max_sessions_given: m.opt_present("udp-max-sessions"),
        udp_nat,
        udp_workers,
        metrics,
    };
    Ok(if doctor {
        Command::Doctor(cfg)
    } else {
        Command::Run(cfg)
    })
}

fn fail_message(e: &getopts::Fail) -> String {
    use getopts::Fail::*;
    match e {
        ArgumentMissing(f) => format!("{} needs a value", dashed(f)),
        UnrecognizedOption(f) => format!("unknown option {}", dashed(f)),
        OptionMissing(f) => format!("{} is required", dashed(f)),
        OptionDuplicated(f) => format!("{} is given more than once", dashed(f)),
        UnexpectedArgument(f) => format!("{} takes no value", dashed(f)),
    }
}

fn dashed(f: &str) -> String {
    if f.starts_with('-') {
        f.to_string()
    } else if f.chars().count() == 1 {
        format!("-{f}")
    } else {
        format!("--{f}")
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_WORKERS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, UsageError> {
        match parse(args)? {
            Command::Run(c) => Ok(c),
            other => panic!("expected a run config, got {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        run(args).unwrap_err().0
    }

    #[test]
    fn defaults() {
        let c = run(&["--port", "8080"]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(
            c.listen,
            vec!["0.0.0.0".parse::<IpAddr>().unwrap(), "::".parse().unwrap()]
        );
        assert!(c.listen_defaulted);
        assert!(c.workers >= 1);
        assert!(c.pin && c.splice);
        assert_eq!(c.mark, None);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!(c.pipe_size, DEFAULT_PIPE_SIZE);
        assert_eq!(c.bulk_pipe_size, None);
        assert!(!c.spoof_source);
        assert_eq!(c.send_proxy, None);
        assert!(c.sources.is_empty());
        assert_eq!(c.log_level, LevelFilter::Info);
        assert!(c.tcp && c.udp);
        assert_eq!(c.udp_timeout, DEFAULT_UDP_TIMEOUT);
        assert_eq!(c.udp_max_sessions, DEFAULT_UDP_MAX_SESSIONS);
        assert_eq!(c.udp_nat, NatMode::FullCone);
        assert_eq!(c.busy_poll, None);
        assert_eq!(c.udp_workers, DEFAULT_UDP_WORKERS);
        assert_eq!(c.max_conns_per_client, None);
        assert_eq!(c.client_prefix, DEFAULT_CLIENT_PREFIX);
    }

    #[test]
    fn a_cap_per_client_with_its_grouping() {
        let c = run(&["--port", "1", "--max-conns-per-client", "5"]).unwrap();
        assert_eq!(c.max_conns_per_client, Some(5));
        assert_eq!(c.client_prefix, ClientPrefix { v4: 32, v6: 64 });
        let c = run(&[
            "--port",
            "1",
            "--max-conns-per-client",
            "1",
            "--client-prefix",
            "24,48",
        ])
        .unwrap();
        assert_eq!(c.client_prefix, ClientPrefix { v4: 24, v6: 48 });
        let c = run(&[
            "--port",
            "1",
            "--max-conns-per-client",
            "1",
            "--client-prefix",
            "1,128",
        ])
        .unwrap();
        assert_eq!(c.client_prefix, ClientPrefix { v4: 1, v6: 128 });
    }

    #[test]
    fn every_option_parses() {
        let c = run(&[
            "--port",
            "9",
            "--listen",
            "198.18.0.1",
            "--listen",
            "[2001:2::1]",
            "--workers",
            "3",
            "--no-pin",
            "--mark",
            "0x1f",
            "--connect-timeout",
            "500ms",
            "--idle-timeout",
            "0",
            "--max-conns",
            "100",
            "--pipe-size",
            "1m",
            "--bulk-pipe-size",
            "4m",
            "--spoof-source",
            "--drain-timeout",
            "2m",
            "--busy-poll",
            "50us",
            "--log-level",
            "debug",
            "--udp-timeout",
            "30s",
            "--udp-max-sessions",
            "10",
            "--udp-nat",
            "port-restricted",
            "--udp-workers",
            "2",
        ])
        .unwrap();
        assert_eq!(c.listen.len(), 2);
        assert!(!c.listen_defaulted);
        assert_eq!(c.workers, 3);
        assert!(!c.pin);
        assert_eq!(c.mark, Some(31));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.max_conns, Some(100));
        assert_eq!(c.pipe_size, 1 << 20);
        assert_eq!(c.bulk_pipe_size, Some(4 << 20));
        assert!(c.spoof_source);
        assert_eq!(c.drain_timeout, Duration::from_secs(120));
        assert_eq!(c.busy_poll, Some(Duration::from_micros(50)));
        assert_eq!(c.log_level, LevelFilter::Debug);
        assert!(c.tcp && c.udp);
        assert_eq!(c.udp_timeout, Duration::from_secs(30));
        assert_eq!(c.udp_max_sessions, 10);
        assert_eq!(c.udp_nat, NatMode::PortRestricted);
        assert_eq!(c.udp_workers, 2);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--port is required"),
            (&["--port", "abc"], "--port 'abc'"),
            (&["--port", "0"], "--port '0'"),
            (&["--port", "65536"], "--port '65536'"),
            (&["--port", "1", "--workers", "0"], "--workers '0'"),
            (&["--port", "1", "--workers", "x"], "--workers 'x'"),
            (
                &["--port", "1", "--connect-timeout", "5x"],
                "--connect-timeout '5x'",
            ),
            (
                &["--port", "1", "--connect-timeout", "0"],
                "--connect-timeout must be",
            ),
            (
                &["--port", "1", "--idle-timeout", "soon"],
                "--idle-timeout 'soon'",
            ),
            (
                &["--port", "1", "--drain-timeout", "3"],
                "--drain-timeout '3'",
            ),
            (&["--port", "1", "--busy-poll", "50"], "--busy-poll '50'"),
            (
                &["--port", "1", "--busy-poll", "2s"],
                "--busy-poll 2s: at most 1s",
            ),
            (&["--port", "1", "--mark", "0"], "--mark '0'"),
            (&["--port", "1", "--mark", "0xzz"], "--mark '0xzz'"),
            (
                &["--port", "1", "--mark", "4294967296"],
                "--mark '4294967296'",
            ),
            (&["--port", "1", "--max-conns", "0"], "--max-conns '0'"),
            (
                &["--port", "1", "--max-conns-per-client", "0"],
                "--max-conns-per-client '0'",
            ),
            (
                &["--port", "1", "--max-conns-per-client", "-1"],
                "--max-conns-per-client '-1'",
            ),
            (
                &["--port", "1", "--client-prefix", "32,64"],
                "--client-prefix has no effect without --max-conns-per-client",
            ),
            (
                &["--port", "1", "--no-tcp", "--max-conns-per-client", "5"],
                "--max-conns-per-client has no effect",
            ),
            (&["--port", "1", "--pipe-size", "1"], "--pipe-size '1'"),
            (&["--port", "1", "--pipe-size", "1g"], "--pipe-size '1g'"),
            (
                &["--port", "1", "--listen", "nowhere"],
                "--listen 'nowhere'",
            ),
            (
                &["--port", "1", "--listen", "1.2.3.4:80"],
                "--listen '1.2.3.4:80'",
            ),
            (
                &["--port", "1", "--listen", "::", "--listen", "::"],
                "--listen :: is given twice",
            ),
            (
                &["--port", "1", "--log-level", "loud"],
                "--log-level 'loud'",
            ),
            (
                &["--port", "1", "--no-splice", "--pipe-size", "1m"],
                "--pipe-size has no effect",
            ),
            (&["--port", "1", "--bogus"], "unknown option --bogus"),
            (
                &[
                    "--port",
                    "1",
                    "--max-conns-per-client",
                    "5",
                    "--client-prefix",
                    "33,64",
                ],
                "--client-prefix '33,64'",
            ),
            (
                &[
                    "--port",
                    "1",
                    "--max-conns-per-client",
                    "5",
                    "--client-prefix",
                    "32,129",
                ],
                "--client-prefix '32,129'",
            ),
            (
                &[
                    "--port",
                    "1",
                    "--max-conns-per-client",
                    "5",
                    "--client-prefix",
                    "0,64",
                ],
                "--client-prefix '0,64'",
            ),
            (
                &[
                    "--port",
                    "1",
                    "--max-conns-per-client",
                    "5",
                    "--client-prefix",
                    "32",
                ],
                "--client-prefix '32'",
            ),
            (
                &[
                    "--port",
                    "1",
                    "--max-conns-per-client",
                    "5",
                    "--client-prefix",
                    "32,64,1",
                ],
                "--client-prefix '32,64,1'",
            ),
            (&["--port", "1", "--metrics", "9120"], "--metrics '9120'"),
            (
                &["--port", "9120", "--metrics", "127.0.0.1:9120"],
                "--metrics 127.0.0.1:9120",
            ),
            (
                &["--port", "1", "--listen", "::ffff:127.0.0.1"],
                "--listen '::ffff:127.0.0.1'",
            ),
            (
                &["--port", "1", "--no-tcp", "--max-conns", "5"],
                "--max-conns has no effect",
            ),
            (
                &["--port", "1", "--no-udp", "--udp-timeout", "5s"],
                "--udp-timeout has no effect",
            ),
            (
                &["--port", "1", "--no-tcp", "--no-udp"],
                "--no-tcp and --no-udp",
            ),
            (
                &["--port", "1", "--udp-timeout", "0"],
                "--udp-timeout must be",
            ),
            (
                &["--port", "1", "--udp-timeout", "1d"],
                "--udp-timeout '1d'",
            ),
            (
                &["--port", "1", "--udp-max-sessions", "0"],
                "--udp-max-sessions '0'",
            ),
            (&["--port", "1", "--udp-nat", "cone"], "--udp-nat 'cone'"),
            (&["--port", "1", "--udp-workers", "0"], "--udp-workers '0'"),
            (
                &[
                    "--port",
                    "1",
                    "--udp-workers",
                    "4",
                    "--udp-max-sessions",
                    "3",
                ],
                "--udp-workers 4 is more than --udp-max-sessions 3",
            ),
            (
                &["--port", "1", "--no-udp", "--udp-nat", "symmetric"],
                "--udp-nat has no effect",
            ),
            (
                &["--port", "1", "--spoof-source"],
                "--spoof-source with UDP needs --mark",
            ),
            (&["--port"], "--port needs a value"),
            (
                &["--port", "1", "--port", "2"],
                "--port is given more than once",
            ),
            (&["--port", "1", "stray"], "unexpected argument 'stray'"),
            (&["--port", "1", "--no-pin=yes"], "--no-pin takes no value"),
            (
                &["--port", "1", "--source", "nowhere"],
                "--source 'nowhere'",
            ),
            (
                &["--port", "1", "--source", "198.19.0.1:80"],
                "--source '198.19.0.1:80'",
            ),
            (
                &["--port", "1", "--source", "0.0.0.0"],
                "--source '0.0.0.0'",
            ),
            (&["--port", "1", "--source", "::"], "--source '::'"),
            (
                &["--port", "1", "--source", "224.0.0.1"],
                "--source '224.0.0.1'",
            ),
            (
                &["--port", "1", "--source", "::ffff:198.19.0.1"],
                "--source '::ffff:198.19.0.1'",
            ),
            (
                &[
                    "--port",
                    "1",
                    "--source",
                    "198.19.0.1",
                    "--source",
                    "198.19.0.1",
                ],
                "--source 198.19.0.1 is given twice",
            ),
            (
                &["--port", "1", "--source", "198.19.0.1", "--spoof-source"],
                "--source and --spoof-source",
            ),
            (
                &["--port", "1", "--no-tcp", "--source", "198.19.0.1"],
                "--source has no effect",
            ),
            (
                &["--port", "1", "--send-proxy", "v3"],
                "--send-proxy 'v3': expected v1 or v2",
            ),
            (
                &["--port", "1", "--send-proxy"],
                "--send-proxy needs a value",
            ),
            (
                &[
                    "--port",
                    "1",
                    "--no-udp",
                    "--spoof-source",
                    "--send-proxy",
                    "v2",
                ],
                "--send-proxy and --spoof-source",
            ),
            (
                &["--port", "1", "--no-tcp", "--send-proxy", "v1"],
                "--send-proxy has no effect",
            ),
        ];
        for (args, want) in cases {
            let got = err(args);
            assert!(
                got.starts_with(want),
                "{args:?}: got {got:?}, want {want:?}"
            );
            assert!(
                !got.contains('\n'),
                "{args:?}: message must be one line: {got:?}"
            );
        }
    }

    #[test]
    fn send_proxy_takes_v1_or_v2() {
        for (v, want) in [
            ("v1", proxy_header::Version::V1),
            ("v2", proxy_header::Version::V2),
        ] {
            let c = run(&["--port", "1", "--send-proxy", v]).unwrap();
            assert_eq!(c.send_proxy, Some(want));
        }
    }

    #[test]
    fn sources_are_kept_in_order_for_both_families() {
        let c = run(&[
            "--port",
            "1",
            "--source",
            "198.19.0.1",
            "--source",
            "[2001:2:0:2::1]",
            "--source",
            "198.19.0.3",
        ])
        .unwrap();
        let want: Vec<IpAddr> = ["198.19.0.1", "2001:2:0:2::1", "198.19.0.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(c.sources, want);
    }

    #[test]
    fn doctor_takes_the_daemon_options() {
        match parse(["doctor", "--port", "8080", "--pipe-size", "1m"]) {
            Ok(Command::Doctor(c)) => assert_eq!((c.port, c.pipe_size), (8080, 1 << 20)),
            other => panic!("{other:?}"),
        }
        assert!(parse(["doctor", "--port", "x"]).is_err());
    }

    #[test]
    fn a_value_that_is_not_utf8_is_named_by_its_flag() {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"\xff80");
        let e = parse([
            std::ffi::OsStr::new("--port"),
            std::ffi::OsStr::new("1"),
            std::ffi::OsStr::new("--workers"),
            bad,
        ])
        .unwrap_err();
        assert!(
            e.0.starts_with("--workers: the value is not valid UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(parse(["--help"]), Ok(Command::Help(_))));
        assert_eq!(parse(["-V"]), Ok(Command::Version));
        assert!(usage().contains("--connect-timeout"));
    }
}
