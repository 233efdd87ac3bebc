//! udp_load: UDP load with many flows, for the 1,000-flow rows of
//! benches/run (iperf3 stops at 128 streams). Std and libc only.
//!
//! ```text
//! udp_load send --to ADDR:PORT --flows N --len BYTES --seconds S --run ID [--rate PER_S] [--base-port P]
//! udp_load recv --listen ADDR:PORT --flows N --len BYTES --run ID [--idle-ms MS]
//! ```
//!
//! `send` opens N sockets, one per flow (so N distinct client ports), each
//! connected to --to, and sends round-robin, one datagram per flow per round,
//! for S seconds: PER_S datagrams a second in all, or as fast as it can
//! without --rate (or with --rate 0). The client ports are P, P+1, ... with
//! --base-port (the same flows from one run to the next), else ephemeral
//! ones. Each datagram carries the run id, its
//! flow id and its sequence number within the flow. At the end it prints one
//! JSON object: what it sent, per flow and in sum, and its own CPU time.
//!
//! `recv` binds one socket, prints `ready`, and counts this run's datagrams
//! per flow until it has read the sender's counts on stdin, as one line
//! `sent C0 C1 ... C(N-1)`, and then no datagram has come for --idle-ms
//! (default 250; at most [`MAX_DRAIN`] after the counts). Then it prints one
//! JSON object: sent, received and lost per flow and in sum, and its own CPU
//! time. Lost is sent minus received, so a duplicated datagram would show as
//! a negative loss rather than hide one that was lost.
//!
//! What must stay true:
//! - LOAD-1: `send` sends only to --to, and refuses a --to outside the
//!   benchmarking ranges the lab uses (198.18.0.0/15, RFC 2544; 2001:2::/48,
//!   RFC 5180). `recv` sends nothing.
//! - LOAD-2: pacing reads the clock. The datagrams due are rate × elapsed
//!   time and are sent back to back when due; the sender sleeps only when it
//!   is ahead, until the next one is due, never once per datagram.
//! - LOAD-3: a datagram counts as sent only when send(2) took it. A failed
//!   send is counted under its error, and the flow's sequence number is not
//!   used up, so a flow's sequence numbers are 0..sent.
//! - LOAD-4: `recv` counts a datagram for a flow only if it has this run's
//!   id, exactly the given length and a flow id below N. Datagrams of an
//!   earlier run (a proxy's backlog) are counted apart as stale, anything
//!   else as malformed.
//! - LOAD-5: both report their own CPU time (getrusage), so that the load
//!   tool's cost is never mistaken for the proxy's.
//! - LOAD-6: all `unsafe` lives in `mod sys` below, each block with its
//!   `// SAFETY:` line.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// First bytes of every datagram: tells ours from anything else on the port.
const MAGIC: [u8; 4] = *b"tpld";
/// Magic, run id (u32), flow id (u32), sequence number (u64), big-endian.
const HEADER_LEN: usize = 20;
/// Up to one IPv4 datagram in a 1500-byte MTU without fragments.
const MAX_LEN: usize = 1472;
/// More flows than this would not fit the machine's 20,000-descriptor limit
/// next to a proxy anyway.
const MAX_FLOWS: usize = 16_384;
const MAX_SECONDS: f64 = 3600.0;
/// Datagrams sent between two looks at the clock when sending flat out or
/// catching up: small enough that the run ends on time, large enough that
/// reading the clock costs nothing per datagram.
const BURST: u64 = 256;
/// Datagrams per recvmmsg(2).
const RECV_BATCH: usize = 64;
const DEFAULT_IDLE_MS: u64 = 250;
/// After the sender's counts arrive, stop at the first quiet gap or after
/// this long, whichever comes first: a stream that never goes quiet (some
/// other sender) must not keep the receiver up.
const MAX_DRAIN: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("send") => parse_send(&args[1..]).map(|c| run_send(&c)),
        Some("recv") => parse_recv(&args[1..]).map(|c| run_recv(&c)),
        _ => Err("expected 'send' or 'recv' (see the header of examples/udp_load.rs)".into()),
    };
    match result {
        Err(usage) => {
            eprintln!("udp_load: {usage}");
            ExitCode::from(2)
        }
        Ok(Err(e)) => {
            eprintln!("udp_load: {e}");
            ExitCode::from(1)
        }
        Ok(Ok(())) => ExitCode::SUCCESS,
    }
}

// ---------------------------------------------------------------- options

#[derive(Debug, PartialEq)]
struct SendConfig {
    to: SocketAddr,
    flows: usize,
    len: usize,
    duration: Duration,
    /// Datagrams a second in all; `None`: as fast as it can.
    rate: Option<u64>,
    run: u32,
    /// Flow i's client port is base_port + i; `None`: ephemeral ports.
    base_port: Option<u16>,
}

#[derive(Debug, PartialEq)]
struct RecvConfig {
    listen: SocketAddr,
    flows: usize,
    len: usize,
    run: u32,
    idle: Duration,
}

/// `--name value` pairs, each name among `known` and given once.
fn options(args: &[String], known: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a
            .strip_prefix("--")
            .filter(|n| known.contains(n))
            .ok_or_else(|| format!("unknown argument '{a}'"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        if out.insert(name.to_string(), value.clone()).is_some() {
            return Err(format!("--{name} given twice"));
        }
    }
    Ok(out)
}

fn required<'a>(o: &'a HashMap<String, String>, name: &str) -> Result<&'a str, String> {
    o.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("--{name} is required"))
}

fn number<T: std::str::FromStr>(name: &str, s: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("--{name} '{s}': expected a number"))
}

fn in_range(name: &str, v: usize, lo: usize, hi: usize) -> Result<usize, String> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("--{name} {v}: expected {lo} to {hi}"))
    }
}

fn address(name: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("--{name} '{s}': expected ADDR:PORT ([ADDR]:PORT for IPv6)"))
}

/// LOAD-1: the lab's benchmarking ranges, and nothing else.
fn is_benchmarking(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] == 18 || o[1] == 19)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0
        }
    }
}

fn common(o: &HashMap<String, String>) -> Result<(usize, usize, u32), String> {
    let flows = in_range(
        "flows",
        number("flows", required(o, "flows")?)?,
        1,
        MAX_FLOWS,
    )?;
    let len = in_range(
        "len",
        number("len", required(o, "len")?)?,
        HEADER_LEN,
        MAX_LEN,
    )?;
    let run = number("run", required(o, "run")?)?;
    Ok((flows, len, run))
}

fn parse_send(args: &[String]) -> Result<SendConfig, String> {
    let o = options(
        args,
        &["to", "flows", "len", "seconds", "rate", "run", "base-port"],
    )?;
    let to = address("to", required(&o, "to")?)?;
    if !is_benchmarking(to.ip()) || to.port() == 0 {
        return Err(format!(
            "--to {to}: only a port in 198.18.0.0/15 or 2001:2::/48 (the lab's benchmarking ranges)"
        ));
    }
    let (flows, len, run) = common(&o)?;
    let secs: f64 = number("seconds", required(&o, "seconds")?)?;
    if !(secs > 0.0 && secs <= MAX_SECONDS) {
        return Err(format!(
            "--seconds {secs}: expected more than 0, at most {MAX_SECONDS}"
        ));
    }
    let rate = match o.get("rate") {
        None => None,
        Some(s) => match number::<u64>("rate", s)? {
            0 => None,
            r => Some(r),
        },
    };
    let base_port = match o.get("base-port") {
        None => None,
        Some(s) => {
            let p: usize = number("base-port", s)?;
            in_range("base-port", p, 1, 65_536 - flows)?;
            Some(p as u16)
        }
    };
    Ok(SendConfig {
        to,
        flows,
        len,
        duration: Duration::from_secs_f64(secs),
        rate,
        run,
        base_port,
    })
}

fn parse_recv(args: &[String]) -> Result<RecvConfig, String> {
    let o = options(args, &["listen", "flows", "len", "run", "idle-ms"])?;
    let listen = address("listen", required(&o, "listen")?)?;
    let (flows, len, run) = common(&o)?;
    let idle_ms: u64 = match o.get("idle-ms") {
        None => DEFAULT_IDLE_MS,
        Some(s) => number("idle-ms", s)?,
    };
    if !(1..=10_000).contains(&idle_ms) {
        return Err(format!("--idle-ms {idle_ms}: expected 1 to 10000"));
    }
    Ok(RecvConfig {
        listen,
        flows,
        len,
        run,
        idle: Duration::from_millis(idle_ms),
    })
}

/// The receiver's stdin line: `sent` and one count per flow.
fn parse_sent_line(line: &str, flows: usize) -> Result<Vec<u64>, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("sent") {
        return Err("stdin: expected a line 'sent C0 C1 ...'".into());
    }
    let counts = words
        .map(|w| w.parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "stdin: a sent count is not a number".to_string())?;
    if counts.len() != flows {
        return Err(format!(
            "stdin: {} sent counts for {flows} flows",
            counts.len()
        ));
    }
    Ok(counts)
}

// ---------------------------------------------------------------- datagrams

fn encode(buf: &mut [u8], run: u32, flow: u32, seq: u64) {
    buf[0..4].copy_from_slice(&MAGIC);
    buf[4..8].copy_from_slice(&run.to_be_bytes());
    buf[8..12].copy_from_slice(&flow.to_be_bytes());
    buf[12..20].copy_from_slice(&seq.to_be_bytes());
}

#[derive(Debug, PartialEq)]
enum Datagram {
    Ours { flow: usize, seq: u64 },
    Stale,
    Malformed,
}

/// LOAD-4: what a received datagram is.
fn classify(d: &[u8], len: usize, run: u32, flows: usize) -> Datagram {
    if d.len() < HEADER_LEN || d[0..4] != MAGIC {
        return Datagram::Malformed;
    }
    let field = |r: std::ops::Range<usize>| d[r].iter().fold(0u64, |a, &b| a << 8 | b as u64);
    if field(4..8) != run as u64 {
        return Datagram::Stale;
    }
    let flow = field(8..12) as usize;
    if d.len() != len || flow >= flows {
        return Datagram::Malformed;
    }
    Datagram::Ours {
        flow,
        seq: field(12..20),
    }
}

// ---------------------------------------------------------------- pacing

/// LOAD-2: datagrams due after `elapsed` at `rate` a second.
fn due(rate: u64, elapsed: Duration) -> u64 {
    (rate as u128 * elapsed.as_nanos() / 1_000_000_000) as u64
}

/// When (since the start) the `n`th datagram falls due: the first instant
/// at which `due(rate, t) >= n`.
fn due_at(rate: u64, n: u64) -> Duration {
    let ns = (n as u128 * 1_000_000_000).div_ceil(rate as u128);
    Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
}

// ---------------------------------------------------------------- send

#[derive(Default)]
struct SendErrors {
    refused: u64,
    no_buffers: u64,
    other: u64,
    last_other: Option<String>,
}

fn run_send(c: &SendConfig) -> io::Result<()> {
    let any: IpAddr = match c.to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let mut socks = Vec::with_capacity(c.flows);
    let mut ports = HashSet::with_capacity(c.flows);
    for i in 0..c.flows {
        // parse_send keeps base + flows - 1 within u16.
        let port = c.base_port.map_or(0, |b| b + i as u16);
        let s = UdpSocket::bind((any, port))
            .and_then(|s| s.connect(c.to).map(|_| s))
            .map_err(|e| io::Error::new(e.kind(), format!("socket for flow {i}: {e}")))?;
        ports.insert(s.local_addr()?.port());
        socks.push(s);
    }
    if ports.len() != c.flows {
        return Err(io::Error::other("two flows got the same client port"));
    }

    let mut buf = vec![0u8; c.len];
    let mut sent = vec![0u64; c.flows];
    let mut errors = SendErrors::default();
    let mut attempts: u64 = 0;
    let mut flow = 0usize;
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= c.duration {
            break;
        }
        let burst = match c.rate {
            None => BURST,
            Some(rate) => {
                let d = due(rate, elapsed);
                if d <= attempts {
                    let wake = due_at(rate, attempts + 1).min(c.duration);
                    thread::sleep(wake.saturating_sub(elapsed));
                    continue;
                }
                (d - attempts).min(BURST)
            }
        };
        for _ in 0..burst {
            encode(&mut buf, c.run, flow as u32, sent[flow]);
            match socks[flow].send(&buf) {
                Ok(_) => sent[flow] += 1,
                Err(e) => match e.raw_os_error() {
                    Some(libc::ECONNREFUSED) => errors.refused += 1,
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) => errors.no_buffers += 1,
                    _ => {
                        errors.other += 1;
                        errors.last_other = Some(e.to_string());
                    }
                },
            }
            attempts += 1;
            flow = if flow + 1 == c.flows { 0 } else { flow + 1 };
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let total: u64 = sent.iter().sum();
    let per_flow: Vec<String> = sent.iter().map(u64::to_string).collect();
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{{\"tool\": \"udp_load send\", \"to\": \"{}\", \"flows\": {}, \"len\": {}, \"rate\": {}, \
         \"seconds\": {:.6}, \"sent\": {}, \"sent_dps\": {:.1}, \
         \"send_errors\": {{\"refused\": {}, \"no_buffers\": {}, \"other\": {}, \"last_other\": {}}}, \
         \"cpu_s\": {:.6}, \"sent_per_flow\": [{}]}}",
        c.to,
        c.flows,
        c.len,
        c.rate.map_or("null".into(), |r| r.to_string()),
        seconds,
        total,
        total as f64 / seconds,
        errors.refused,
        errors.no_buffers,
        errors.other,
        errors
            .last_other
            .map_or("null".into(), |e| format!("\"{}\"", e.replace('"', "'"))),
        sys::cpu_seconds()?,
        per_flow.join(", "),
    )?;
    out.flush()?;
    if total == 0 {
        return Err(io::Error::other("no datagram could be sent"));
    }
    Ok(())
}

// ---------------------------------------------------------------- recv

fn run_recv(c: &RecvConfig) -> io::Result<()> {
    let sock = UdpSocket::bind(c.listen)?;
    // A quiet gap of this long ends the run once the sender's counts are in.
    sock.set_read_timeout(Some(c.idle))?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let (tx, rx) = mpsc::channel();
    let flows = c.flows;
    thread::spawn(move || {
        let mut line = String::new();
        let r = match io::stdin().lock().read_line(&mut line) {
            Ok(0) => Err("stdin closed before the sender's counts".to_string()),
            Ok(_) => parse_sent_line(&line, flows),
            Err(e) => Err(format!("stdin: {e}")),
        };
        let _ = tx.send(r);
    });

    let mut received = vec![0u64; c.flows];
    let mut next_seq = vec![0u64; c.flows];
    let (mut stale, mut malformed, mut reordered) = (0u64, 0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut batch = sys::RecvBatch::new(RECV_BATCH, c.len + 1);
    let mut counts: Option<(Vec<u64>, Instant)> = None;
    loop {
        let quiet = match batch.recv(&sock) {
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                for i in 0..n {
                    match classify(batch.datagram(i), c.len, c.run, c.flows) {
                        Datagram::Ours { flow, seq } => {
                            received[flow] += 1;
                            if seq < next_seq[flow] {
                                reordered += 1;
                            } else {
                                next_seq[flow] = seq + 1;
                            }
                        }
                        Datagram::Stale => stale += 1,
                        Datagram::Malformed => malformed += 1,
                    }
                }
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err(e),
        };
        if counts.is_none() {
            match rx.try_recv() {
                Ok(Ok(v)) => counts = Some((v, Instant::now())),
                Ok(Err(msg)) => return Err(io::Error::other(msg)),
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(io::Error::other("stdin reader ended without the counts"));
                }
            }
        }
        if let Some((_, at)) = &counts
            && (quiet || at.elapsed() >= MAX_DRAIN)
        {
            break;
        }
    }
    let (sent, _) = counts.expect("the loop ends only with the counts");
    let total_sent: u64 = sent.iter().sum();
    let total_received: u64 = received.iter().sum();
    let lost = |i: usize| sent[i] as i64 - received[i] as i64;
    let flows_with_loss = (0..c.flows).filter(|&i| lost(i) > 0).count();
    let max_flow_loss_pct = (0..c.flows)
        .filter(|&i| sent[i] > 0)
        .map(|i| 100.0 * lost(i) as f64 / sent[i] as f64)
        .fold(0.0f64, f64::max);
    let per_flow: Vec<String> = (0..c.flows)
        .map(|i| {
            format!(
                "{{\"flow\": {i}, \"sent\": {}, \"received\": {}, \"lost\": {}}}",
                sent[i],
                received[i],
                lost(i)
            )
        })
        .collect();
    let total_lost = total_sent as i64 - total_received as i64;
    let loss_pct = if total_sent > 0 {
        format!("{:.4}", 100.0 * total_lost as f64 / total_sent as f64)
    } else {
        "null".into()
    };
    let window = match (first, last) {
        (Some(a), Some(b)) => format!("{:.6}", (b - a).as_secs_f64()),
        _ => "null".into(),
    };
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{{\"tool\": \"udp_load recv\", \"listen\": \"{}\", \"flows\": {}, \"len\": {}, \
         \"sent\": {total_sent}, \"received\": {total_received}, \"lost\": {total_lost}, \
         \"loss_pct\": {loss_pct}, \"stale\": {stale}, \"malformed\": {malformed}, \
         \"reordered\": {reordered}, \"flows_with_loss\": {flows_with_loss}, \
         \"max_flow_loss_pct\": {max_flow_loss_pct:.4}, \"receive_window_s\": {window}, \
         \"cpu_s\": {:.6}, \"per_flow\": [{}]}}",
        c.listen,
        c.flows,
        c.len,
        sys::cpu_seconds()?,
        per_flow.join(", "),
    )?;
    out.flush()
}

// ---------------------------------------------------------------- sys

/// LOAD-6: the two calls std does not wrap.
mod sys {
    use std::io;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// This process's user + system CPU time, all threads (LOAD-5).
    pub fn cpu_seconds() -> io::Result<f64> {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is a valid, writable rusage for the call to fill.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: getrusage succeeded, so it wrote the whole struct (and it
        // was zeroed before).
        let ru = unsafe { ru.assume_init() };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(secs(ru.ru_utime) + secs(ru.ru_stime))
    }

    /// Buffers for recvmmsg(2): `n` slots of `slot` bytes each.
    pub struct RecvBatch {
        bufs: Vec<u8>,
        lens: Vec<usize>,
        slot: usize,
    }

    impl RecvBatch {
        pub fn new(n: usize, slot: usize) -> Self {
            RecvBatch {
                bufs: vec![0; n * slot],
                lens: vec![0; n],
                slot,
            }
        }

        /// Wait for at least one datagram (up to the socket's read timeout),
        /// then take what else is queued, up to the batch's size. A datagram
        /// longer than a slot keeps its true length here, past the slot, and
        /// `datagram()` returns it cut to the slot: longer than the length
        /// expected, so it is malformed either way.
        pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
            let n = self.lens.len();
            let mut iov: Vec<libc::iovec> = self
                .bufs
                .chunks_mut(self.slot)
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: mmsghdr is plain data; all-zero is a valid value (no
            // name, no control data), completed below.
            let mut hdrs: Vec<libc::mmsghdr> =
                (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
            for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `hdrs` holds `n` headers, each pointing at one iovec of
            // `iov`, each of which points at its own `slot`-byte part of
            // `self.bufs`; all of them outlive the call. The descriptor is
            // the socket's, borrowed for the call.
            let r = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_WAITFORONE | libc::MSG_TRUNC,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            let got = r as usize;
            for (l, h) in self.lens.iter_mut().zip(&hdrs).take(got) {
                *l = h.msg_len as usize;
            }
            Ok(got)
        }

        /// The `i`th datagram of the last `recv`, cut to its slot.
        pub fn datagram(&self, i: usize) -> &[u8] {
            let len = self.lens[i];
            let start = i * self.slot;
            if len > self.slot {
                // Truncated: make it longer than any expected length.
                &self.bufs[start..start + self.slot]
            } else {
                &self.bufs[start..start + len]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn send_options_parse_and_rate_zero_means_flat_out() {
        let c = parse_send(&args(
            "--to 198.19.0.2:7003 --flows 1000 --len 64 --seconds 0.5 --rate 0 --run 7",
        ))
        .unwrap();
        assert_eq!(
            c,
            SendConfig {
                to: "198.19.0.2:7003".parse().unwrap(),
                flows: 1000,
                len: 64,
                duration: Duration::from_millis(500),
                rate: None,
                run: 7,
                base_port: None,
            }
        );
        let c = parse_send(&args(
            "--to [2001:2:0:2::2]:9 --flows 1 --len 1200 --seconds 4 --rate 100000 --run 1 --base-port 65535",
        ))
        .unwrap();
        assert_eq!(c.base_port, Some(65_535));
        assert_eq!(c.rate, Some(100_000));
        assert_eq!(c.duration, Duration::from_secs(4));
    }

    #[test]
    fn send_refuses_destinations_outside_the_benchmarking_ranges() {
        for to in [
            "10.0.0.1:9",
            "198.20.0.1:9",
            "127.0.0.1:9",
            "[2001:3::1]:9",
            "[2001:2:1::1]:9",
            "198.19.0.2:0",
        ] {
            let e = parse_send(&args(&format!(
                "--to {to} --flows 1 --len 64 --seconds 1 --run 1"
            )))
            .unwrap_err();
            assert!(e.contains("benchmarking ranges"), "{to}: {e}");
        }
        assert!(is_benchmarking("198.18.0.2".parse().unwrap()));
        assert!(is_benchmarking("2001:2:0:ffff::1".parse().unwrap()));
    }

    #[test]
    fn bad_options_name_the_problem() {
        let cases = [
            (
                "--to 198.19.0.2:9 --flows 1 --len 64 --seconds 1",
                "--run is required",
            ),
            (
                "--to 198.19.0.2:9 --flows 0 --len 64 --seconds 1 --run 1",
                "--flows 0",
            ),
            (
                "--to 198.19.0.2:9 --flows 1 --len 19 --seconds 1 --run 1",
                "--len 19",
            ),
            (
                "--to 198.19.0.2:9 --flows 1 --len 64 --seconds 0 --run 1",
                "--seconds 0",
            ),
            (
                "--to 198.19.0.2:9 --flows x --len 64 --seconds 1 --run 1",
                "--flows 'x'",
            ),
            (
                "--to 198.19.0.2:9 --flows 1 --flows 2",
                "--flows given twice",
            ),
            (
                "--to 198.19.0.2:9 --flows 2 --len 64 --seconds 1 --run 1 --base-port 65535",
                "--base-port 65535: expected 1 to 65534",
            ),
            ("--to 198.19.0.2:9 --bogus 1", "unknown argument '--bogus'"),
            ("--to", "--to needs a value"),
            ("--to nowhere --flows 1", "--to 'nowhere'"),
        ];
        for (a, want) in cases {
            let e = parse_send(&args(a)).unwrap_err();
            assert!(e.contains(want), "{a}: got '{e}', want '{want}'");
        }
        let e = parse_recv(&args(
            "--listen 0.0.0.0:9 --flows 1 --len 64 --run 1 --idle-ms 0",
        ))
        .unwrap_err();
        assert!(e.contains("--idle-ms 0"), "{e}");
        let c = parse_recv(&args("--listen 0.0.0.0:9 --flows 3 --len 64 --run 5")).unwrap();
        assert_eq!(c.idle, Duration::from_millis(DEFAULT_IDLE_MS));
    }

    #[test]
    fn sent_line_needs_one_count_per_flow() {
        assert_eq!(parse_sent_line("sent 3 0 7\n", 3).unwrap(), vec![3, 0, 7]);
        assert!(parse_sent_line("sent 3 0\n", 3).is_err());
        assert!(parse_sent_line("sent 3 x 1\n", 3).is_err());
        assert!(parse_sent_line("3 0 1\n", 3).is_err());
    }

    #[test]
    fn datagrams_of_this_run_are_told_from_stale_and_malformed_ones() {
        let mut b = vec![0u8; 64];
        encode(&mut b, 9, 41, 1 << 40);
        assert_eq!(
            classify(&b, 64, 9, 1000),
            Datagram::Ours {
                flow: 41,
                seq: 1 << 40
            }
        );
        assert_eq!(classify(&b, 64, 8, 1000), Datagram::Stale);
        assert_eq!(classify(&b[..63], 64, 8, 1000), Datagram::Stale);
        assert_eq!(classify(&b, 64, 9, 41), Datagram::Malformed);
        assert_eq!(classify(&b[..63], 64, 9, 1000), Datagram::Malformed);
        assert_eq!(classify(&b[..10], 64, 9, 1000), Datagram::Malformed);
        b[0] = b'x';
        assert_eq!(classify(&b, 64, 9, 1000), Datagram::Malformed);
    }

    #[test]
    fn pacing_follows_the_clock() {
        assert_eq!(due(100_000, Duration::ZERO), 0);
        assert_eq!(due(100_000, Duration::from_micros(9)), 0);
        assert_eq!(due(100_000, Duration::from_micros(10)), 1);
        assert_eq!(due(100_000, Duration::from_secs(1)), 100_000);
        assert_eq!(due(3, Duration::from_secs(1)), 3);
        assert_eq!(due_at(100_000, 1), Duration::from_micros(10));
        assert_eq!(due_at(3, 1), Duration::from_nanos(333_333_334));
        for n in [1, 2, 3, 99, 1000] {
            let t = due_at(3, n);
            assert!(due(3, t) >= n && due(3, t - Duration::from_nanos(1)) < n);
        }
    }

    #[test]
    fn a_receiver_batch_reads_every_queued_datagram() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let mut b = vec![0u8; 64];
        for seq in 0..3 {
            encode(&mut b, 1, 0, seq);
            tx.send(&b).unwrap();
        }
        tx.send(&[0u8; 100]).unwrap();
        let mut batch = sys::RecvBatch::new(8, 65);
        let mut got = Vec::new();
        while got.len() < 4 {
            let n = batch.recv(&rx).unwrap();
            got.extend((0..n).map(|i| classify(batch.datagram(i), 64, 1, 1)));
        }
        assert_eq!(
            got,
            vec![
                Datagram::Ours { flow: 0, seq: 0 },
                Datagram::Ours { flow: 0, seq: 1 },
                Datagram::Ours { flow: 0, seq: 2 },
                Datagram::Malformed,
            ]
        );
    }
}
