//! Scaling past one host (issue 14, README › Scaling past one host): two
//! routers, each running its own tproxyd with the same rules, and a client
//! that reaches a service address over a resilient ECMP nexthop group
//! through both (scripts/lab.sh --routers 2). tproxyd keeps no state
//! across hosts; the network spreads the flows, and draining one host
//! (SIGTERM to its tproxyd, then its nexthop withdrawn) touches nobody on
//! the other.
//!
//! Both drain orders, each in both families (IPv4 through group 10, IPv6
//! through group 11), each test with its own lab:
//! - 200 long-lived flows, each a paced byte stream up and a verified answer
//!   down, spread over both routers: each carries at least a quarter. The
//!   server tells the routers apart by the address each proxy connects
//!   from (no `--spoof-source`: the router's own address on its link).
//! - SIGTERM first: router A's tproxyd gets SIGTERM while every flow is
//!   mid-stream, and all of A's flows finish byte-exact within the drain
//!   (in any case: finished or reset, never a clean EOF short of the end);
//!   A exits 0. Flows opened while A drains (it has stopped accepting, its
//!   nexthop is still in the group) and hashed to A are not served by it:
//!   over IPv4 A's kernel drops their SYNs (nothing listens, and it may
//!   not send a reset from the service's address), so they wait, and the
//!   first SYN they send after the withdrawal reaches B; over IPv6 A's
//!   kernel refuses them with a reset. The rest go to B at once. Then A's
//!   nexthop is withdrawn: every bucket moves to B.
//! - Withdrawal first: A's nexthop is withdrawn while every flow is
//!   mid-stream. The kernel moves its buckets at once, so A's flows reach
//!   B, which has no state for them and resets every one (never a clean
//!   EOF); then SIGTERM, and A's drain deadline resets the halves it still
//!   held towards the server.
//! - Either way, B's flows stream on across both steps, each on the one
//!   server-side connection it started on, byte-exact, and 100 flows opened
//!   after the withdrawal all go through B, byte-exact.
//!
//! No timing is asserted: the flows pace themselves so that they are
//! mid-stream when things happen, and every wait is bounded (LAB-3).

mod common;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::{
    ECMP_BUCKETS, End, Gate, IO_TIMEOUT, Lab, PROXY_PORT, PatternWriter, Proxy, Role, Verifier,
    accept_timeout, connect, family, listen, read_verified_until_end, reset, send_pattern,
    service_addr, wait_until,
};

/// The long-lived flows, spread over both routers.
const FLOWS: u64 = 200;
/// Each router must carry at least this many of them. With working ECMP
/// each flow is a coin toss (lab.sh's group gives each router 32 of its 64
/// buckets): fewer than 50 of 200 on either side has a probability of
/// 3e-13.
const MIN_SHARE: usize = FLOWS as usize / 4;
/// Flows opened while router A drains, before its nexthop is withdrawn.
const DRAIN_FLOWS: u64 = 40;
/// Flows opened after the withdrawal.
const NEW_FLOWS: u64 = 100;
/// Flow ids: the long-lived ones from 0, then these.
const DRAIN_BASE: u64 = 1_000;
const NEW_BASE: u64 = 2_000;

/// Where the flows go: the service address on the server (any TCP port
/// arriving on a router's client side is diverted to its proxy).
const SERVICE_PORT: u16 = 9000;

/// A flow's upload, in steps: HEAD before the start gate, MID paced across
/// the SIGTERM, TAIL paced across the withdrawal. 176 KiB a flow, 35 MiB
/// for the 200.
const STEP: u64 = 4 * 1024;
const HEAD_STEPS: u64 = 4;
const MID_STEPS: u64 = 20;
const TAIL_STEPS: u64 = 20;
const UP_LEN: u64 = (HEAD_STEPS + MID_STEPS + TAIL_STEPS) * STEP;
/// Between paced steps: MID and TAIL each last about a second.
const PACE: Duration = Duration::from_millis(50);
/// The server's answer, sent once the whole upload has arrived.
const ANSWER_LEN: u64 = 64 * 1024;
/// Draining must outlast the flows on A by far; what is measured is whether
/// they finish, not how fast.
const DRAIN_TIMEOUT: &str = "30s";
const EXIT_WAIT: Duration = Duration::from_secs(60);
/// The server's threads, one a flow (up to 340 at once), need little stack.
const FLOW_STACK: usize = 256 * 1024;

fn up_seed(id: u64) -> u64 {
    0xEC_0000_0000 | id
}

fn down_seed(id: u64) -> u64 {
    0xEC_D000_0000 | id
}

// ------------------------------------------------------------- the server

/// How a flow ended at the server.
#[derive(Clone)]
enum ServerEnd {
    /// The whole upload, byte-exact, then EOF; the answer sent.
    Complete,
    /// A clean EOF short of the upload: the failure this test exists to
    /// rule out.
    ShortEof(u64),
    /// A connection reset after this many bytes.
    Reset(u64),
    Error(String),
}

#[derive(Default)]
struct ServerLog {
    /// Every connection the server accepted: the flow id it carried and
    /// the router it came through.
    accepted: Vec<(u64, Role)>,
    ends: HashMap<u64, ServerEnd>,
    /// Connections it could not place: from an unexpected address, or no
    /// flow header.
    strays: Vec<String>,
}

/// The service: accepts on both families, reads a flow's header (its id and
/// upload length), tells the client which router it came through (one
/// byte), verifies the upload to EOF and answers.
struct Server {
    log: Arc<Mutex<ServerLog>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    fn start(lab: &Lab) -> Server {
        let listener = lab.server(|| {
            listen(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                SERVICE_PORT,
            ))
        });
        let log = Arc::new(Mutex::new(ServerLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (log, stop) = (log.clone(), stop.clone());
            thread::spawn(move || accept_loop(listener, log, stop))
        };
        Server {
            log,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn with_log<T>(&self, f: impl FnOnce(&ServerLog) -> T) -> T {
        f(&self.log.lock().expect("server log"))
    }

    /// The router each flow among `ids` came through, and how many came
    /// through each.
    fn routers(&self, ids: std::ops::Range<u64>) -> (usize, usize) {
        self.with_log(|log| {
            let on = |r| {
                log.accepted
                    .iter()
                    .filter(|(id, role)| ids.contains(id) && *role == r)
                    .count()
            };
            (on(Role::Router), on(Role::Router2))
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.acceptor.take()
            && h.join().is_err()
            && !thread::panicking()
        {
            panic!("the server's acceptor panicked");
        }
    }
}

fn accept_loop(listener: TcpListener, log: Arc<Mutex<ServerLog>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let (s, peer) = match accept_timeout(&listener, Duration::from_millis(50)) {
            Ok(pair) => pair,
            Err(e) if e.kind() == ErrorKind::TimedOut => continue,
            Err(e) => panic!("server: accept: {e}"),
        };
        let log = log.clone();
        thread::Builder::new()
            .stack_size(FLOW_STACK)
            .spawn(move || {
                // A corrupted stream panics in its verifier: say so, rather
                // than leave a flow with no end at the server.
                let caught = panic::catch_unwind(AssertUnwindSafe(|| serve(s, peer, log.clone())));
                if let Err(p) = caught {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    l.strays.push(format!("{peer}: the server panicked: {why}"));
                }
            })
            .expect("server: spawn");
    }
}

fn serve(mut s: TcpStream, peer: SocketAddr, log: Arc<Mutex<ServerLog>>) {
    let record = |f: &mut dyn FnMut(&mut ServerLog)| f(&mut log.lock().expect("server log"));
    let Some(router) = Role::router_from(peer.ip()) else {
        record(&mut |l| l.strays.push(format!("a connection from {peer}")));
        return;
    };
    let mut head = [0u8; 16];
    if let Err(e) = s.read_exact(&mut head) {
        record(&mut |l| l.strays.push(format!("{peer}: no flow header: {e}")));
        return;
    }
    let id = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    record(&mut |l| l.accepted.push((id, router)));
    let which = [u8::from(router == Role::Router2)];
    let end = match s.write_all(&which) {
        Err(e) => ServerEnd::Error(format!("writing the router byte: {e}")),
        Ok(()) => {
            let what = format!("flow {id} at the server");
            match read_verified_until_end(&mut s, &mut Verifier::new(up_seed(id)), &what) {
                End::Eof(n) if n == len => match send_pattern(&mut s, down_seed(id), ANSWER_LEN) {
                    Ok(()) => ServerEnd::Complete,
                    Err(e) => ServerEnd::Error(format!("answering: {e}")),
                },
                End::Eof(n) => ServerEnd::ShortEof(n),
                End::Error(n, e) if e.kind() == ErrorKind::ConnectionReset => ServerEnd::Reset(n),
                End::Error(n, e) => ServerEnd::Error(format!("{e} after {n} bytes")),
            }
        }
    };
    let complete = matches!(end, ServerEnd::Complete);
    record(&mut |l| {
        l.ends.insert(id, end.clone());
    });
    if complete {
        let _ = s.shutdown(Shutdown::Write);
    } else {
        // Whatever went wrong, the client must not take the end of the
        // answer for a finished one.
        reset(s);
    }
}

// ------------------------------------------------------------- the clients

/// Where the long-lived flows wait, and how far they have got.
#[derive(Default)]
struct Gates {
    /// Every long-lived flow has sent its HEAD and waits here.
    start: Gate,
    /// Flows that have sent a MID step (streaming when A gets SIGTERM).
    in_mid: AtomicUsize,
    /// B's flows wait here after MID until A is gone; A's go straight on.
    finish: Gate,
    /// B's flows that have sent a TAIL step (streaming across the
    /// withdrawal).
    in_tail: AtomicUsize,
}

/// How a flow ended at the client.
enum Outcome {
    /// Every byte up, the whole answer back byte-exact, then EOF.
    Done,
    /// Reset (or refused) at some point: the client knows it did not finish.
    Reset(String),
    /// Anything else: a clean EOF short of the answer, a timeout, an error.
    Failed(String),
}

struct Flow {
    id: u64,
    /// The router it went through, as the server told it.
    router: Option<Role>,
    /// How long its connect took (a SYN that was dropped shows here).
    connect: Duration,
    outcome: Outcome,
}

fn broken(what: &str, e: &io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionRefused
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => Outcome::Reset(format!("{what}: {e}")),
        _ => Outcome::Failed(format!("{what}: {e}")),
    }
}

/// One flow from the client to `dst`. Long-lived ones (`gates` given) wait
/// at the start gate after HEAD, pace MID and TAIL, and on B wait at the
/// finish gate between them; the others stream straight through.
fn spawn_flow(lab: &Lab, dst: SocketAddr, id: u64, gates: Option<Arc<Gates>>) -> JoinHandle<Flow> {
    lab.spawn_client(move || {
        let mut flow = Flow {
            id,
            router: None,
            connect: Duration::ZERO,
            outcome: Outcome::Done,
        };
        if let Err(outcome) = run_flow(dst, id, gates.as_deref(), &mut flow) {
            flow.outcome = outcome;
        }
        flow
    })
}

fn run_flow(
    dst: SocketAddr,
    id: u64,
    gates: Option<&Gates>,
    flow: &mut Flow,
) -> Result<(), Outcome> {
    let t = Instant::now();
    let mut s = connect(dst).map_err(|e| broken("connect", &e))?;
    flow.connect = t.elapsed();
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&id.to_le_bytes());
    head[8..].copy_from_slice(&UP_LEN.to_le_bytes());
    s.write_all(&head).map_err(|e| broken("header", &e))?;
    let mut which = [0u8; 1];
    s.read_exact(&mut which)
        .map_err(|e| broken("the router byte", &e))?;
    let router = if which[0] == 1 {
        Role::Router2
    } else {
        Role::Router
    };
    flow.router = Some(router);

    let mut w = PatternWriter::new(up_seed(id));
    let step = |s: &mut TcpStream, w: &mut PatternWriter| -> Result<(), Outcome> {
        let want = w.written + STEP;
        w.push(s, want)
            .map_err(|e| broken(&format!("upload at byte {}", w.written), &e))?;
        if w.written < want {
            // A blocking socket's write timed out (SO_SNDTIMEO).
            return Err(Outcome::Failed(format!(
                "upload stuck at byte {} for {IO_TIMEOUT:?}",
                w.written
            )));
        }
        Ok(())
    };
    for _ in 0..HEAD_STEPS {
        step(&mut s, &mut w)?;
    }
    if let Some(g) = gates {
        g.start.arrive_and_wait();
    }
    for i in 0..MID_STEPS {
        step(&mut s, &mut w)?;
        if let Some(g) = gates {
            if i == 0 {
                g.in_mid.fetch_add(1, Ordering::SeqCst);
            }
            thread::sleep(PACE);
        }
    }
    if let Some(g) = gates
        && router == Role::Router2
    {
        g.finish.arrive_and_wait();
    }
    for i in 0..TAIL_STEPS {
        step(&mut s, &mut w)?;
        if let Some(g) = gates {
            if i == 0 && router == Role::Router2 {
                g.in_tail.fetch_add(1, Ordering::SeqCst);
            }
            thread::sleep(PACE);
        }
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| broken("shutdown", &e))?;
    let what = format!("flow {id}'s answer");
    match read_verified_until_end(&mut s, &mut Verifier::new(down_seed(id)), &what) {
        End::Eof(n) if n == ANSWER_LEN => Ok(()),
        End::Eof(n) => Err(Outcome::Failed(format!(
            "a clean EOF after {n} of the answer's {ANSWER_LEN} bytes"
        ))),
        End::Error(n, e) => Err(broken(&format!("answer, after {n} bytes"), &e)),
    }
}

fn join(flows: Vec<JoinHandle<Flow>>) -> Vec<Flow> {
    flows
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

// ------------------------------------------------------------------ tests

/// Which comes first when router A is drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// SIGTERM to A's tproxyd, its drain to the end, then its nexthop
    /// withdrawn.
    SigtermFirst,
    /// A's nexthop withdrawn while its flows stream, then SIGTERM.
    WithdrawFirst,
}

#[test]
fn sigterm_then_withdrawal_finishes_the_drained_routers_flows_and_leaves_the_other_untouched_ipv4()
{
    drain_one_router(false, Order::SigtermFirst);
}

#[test]
fn sigterm_then_withdrawal_finishes_the_drained_routers_flows_and_leaves_the_other_untouched_ipv6()
{
    drain_one_router(true, Order::SigtermFirst);
}

#[test]
fn withdrawal_then_sigterm_resets_the_withdrawn_routers_flows_and_leaves_the_other_untouched_ipv4()
{
    drain_one_router(false, Order::WithdrawFirst);
}

#[test]
fn withdrawal_then_sigterm_resets_the_withdrawn_routers_flows_and_leaves_the_other_untouched_ipv6()
{
    drain_one_router(true, Order::WithdrawFirst);
}

fn drain_one_router(v6: bool, order: Order) {
    let fam = format!("{} {order:?}", family(v6));
    let lab = Lab::two_routers();
    let drain = match order {
        Order::SigtermFirst => DRAIN_TIMEOUT,
        // What A still holds once its flows have moved away is the half
        // towards the server, which nothing will finish: its deadline
        // resets it.
        Order::WithdrawFirst => "2s",
    };
    let mut a = Proxy::start_on(&lab, Role::Router, &["--drain-timeout", drain]);
    let _b = Proxy::start_on(&lab, Role::Router2, &[]);
    let server = Server::start(&lab);
    let dst = service_addr(v6, SERVICE_PORT);
    let buckets = lab.ecmp_buckets(v6);
    assert!(
        buckets.0 > 0 && buckets.1 > 0 && buckets.0 + buckets.1 == ECMP_BUCKETS,
        "{fam}: the group should hold both routers' buckets, has {buckets:?}"
    );

    // 200 long-lived flows, spread over both routers.
    let gates = Arc::new(Gates::default());
    let flows: Vec<_> = (0..FLOWS)
        .map(|id| spawn_flow(&lab, dst, id, Some(gates.clone())))
        .collect();
    gates.start.wait_for(FLOWS as usize);
    let (on_a, on_b) = server.routers(0..FLOWS);
    assert_eq!(
        on_a + on_b,
        FLOWS as usize,
        "{fam}: every flow reached the server once"
    );
    assert!(
        on_a >= MIN_SHARE && on_b >= MIN_SHARE,
        "{fam}: ECMP should spread 200 flows over both routers; A has {on_a}, B {on_b}"
    );

    // Every flow streams (MID) when the first step of the drain lands.
    gates.start.open();
    assert!(
        wait_until(IO_TIMEOUT, || gates.in_mid.load(Ordering::SeqCst)
            >= FLOWS as usize),
        "{fam}: only {} of {FLOWS} flows are streaming",
        gates.in_mid.load(Ordering::SeqCst)
    );
    let withdraw = || {
        lab.set_ecmp(v6, &[Role::Router2]);
        assert_eq!(
            lab.ecmp_buckets(v6),
            (0, ECMP_BUCKETS),
            "{fam}: every bucket should be B's once A's nexthop is withdrawn"
        );
    };
    let during = match order {
        Order::SigtermFirst => {
            a.signal(Signal::SIGTERM);
            // New flows while A drains: once it has stopped accepting, with
            // its nexthop still in the group.
            assert!(
                wait_until(IO_TIMEOUT, || !lab.is_listening(Role::Router, PROXY_PORT)),
                "{fam}: A still listens after SIGTERM"
            );
            let during: Vec<_> = (0..DRAIN_FLOWS)
                .map(|i| spawn_flow(&lab, dst, DRAIN_BASE + i, None))
                .collect();
            // A's flows go on to their end (B's wait at the finish gate).
            let sigterm = Instant::now();
            let status = a.wait_exit(EXIT_WAIT);
            println!("{fam}: A drained in {:.1?}", sigterm.elapsed());
            assert!(
                status.is_some_and(|s| s.success()),
                "{fam}: A should drain and exit 0, got {status:?}"
            );
            // Withdraw A's nexthop while B's flows stream (TAIL).
            gates.finish.open();
            assert!(
                wait_until(IO_TIMEOUT, || gates.in_tail.load(Ordering::SeqCst) >= on_b),
                "{fam}: only {} of B's {on_b} flows are streaming again",
                gates.in_tail.load(Ordering::SeqCst)
            );
            withdraw();
            during
        }
        Order::WithdrawFirst => {
            // Withdraw while every flow streams (MID): A's move to B.
            withdraw();
            a.signal(Signal::SIGTERM);
            let status = a.wait_exit(EXIT_WAIT);
            assert!(
                status.is_some_and(|s| s.success()),
                "{fam}: A should drain and exit 0, got {status:?}"
            );
            gates.finish.open();
            Vec::new()
        }
    };
    let after: Vec<_> = (0..NEW_FLOWS)
        .map(|i| spawn_flow(&lab, dst, NEW_BASE + i, None))
        .collect();

    let flows = join(flows);
    let during = join(during);
    let after = join(after);
    // A client learns its end only after the server recorded it, except
    // when a reset reached it first: wait for the server's side of those.
    let accepted: Vec<u64> = server.with_log(|l| l.accepted.iter().map(|(id, _)| *id).collect());
    wait_until(IO_TIMEOUT, || {
        server.with_log(|l| accepted.iter().all(|id| l.ends.contains_key(id)))
    });

    let (a_done, a_reset) = check(&fam, &server, &flows, &during, &after, on_a, on_b);
    match order {
        // The drain (30 s) outlasts what A's flows had left (a second) by
        // far: all of them finish.
        Order::SigtermFirst => assert_eq!(
            (a_done, a_reset),
            (on_a, 0),
            "{fam}: every flow on A should finish within its drain"
        ),
        // Moved to B, which has no state for them, A's flows are reset:
        // the kernel moves a withdrawn nexthop's buckets at once.
        Order::WithdrawFirst => assert_eq!(
            (a_done, a_reset),
            (0, on_a),
            "{fam}: every flow on A should be reset once its buckets move to B"
        ),
    }
}

/// A connect that took this long lost at least its first SYN (the first
/// retransmission is after a second); for the printed figures only.
const SYN_LOST: Duration = Duration::from_millis(900);

/// What holds whatever the order: B's long-lived flows finish byte-exact,
/// each on the one server-side connection it started on; A's finish or are
/// reset, never a clean EOF short of the end; flows opened during the drain
/// are served by B or refused; flows opened after the withdrawal all go
/// through B. Prints the figures; returns how many of A's flows finished
/// and how many were reset.
fn check(
    fam: &str,
    server: &Server,
    flows: &[Flow],
    during: &[Flow],
    after: &[Flow],
    on_a: usize,
    on_b: usize,
) -> (usize, usize) {
    let mut problems = Vec::new();
    server.with_log(|l| {
        problems.extend(l.strays.iter().map(|s| format!("server: {s}")));
        let mut times: HashMap<u64, usize> = HashMap::new();
        for (id, _) in &l.accepted {
            *times.entry(*id).or_default() += 1;
        }
        for (id, n) in times.into_iter().filter(|&(_, n)| n > 1) {
            problems.push(format!("flow {id} reached the server {n} times"));
        }
    });
    let server_end = |id: u64| server.with_log(|l| l.ends.get(&id).cloned());
    let describe = |f: &Flow, end: &Option<ServerEnd>| {
        let end = end
            .as_ref()
            .map_or("nothing".to_string(), |e| e.to_string());
        format!(
            "flow {} through {:?}: the client {}, the server {end}",
            f.id, f.router, f.outcome
        )
    };

    // The long-lived flows: B's all finish; A's finish or are reset.
    let (mut a_done, mut a_reset) = (0, 0);
    for f in flows {
        let end = server_end(f.id);
        match (f.router, &f.outcome, &end) {
            (Some(Role::Router2), Outcome::Done, Some(ServerEnd::Complete)) => {}
            (Some(Role::Router), Outcome::Done, Some(ServerEnd::Complete)) => a_done += 1,
            (
                Some(Role::Router),
                Outcome::Reset(_),
                None | Some(ServerEnd::Reset(_) | ServerEnd::Complete),
            ) => a_reset += 1,
            _ => problems.push(describe(f, &end)),
        }
    }
    // None moved: each reached the server once, through the router it had.
    let now = server.routers(0..FLOWS);
    if now != (on_a, on_b) {
        problems.push(format!(
            "the long-lived flows were on (A, B) = {:?}, now {now:?}",
            (on_a, on_b)
        ));
    }

    // Opened while A drained: served by B, at once or after waiting; or
    // refused.
    let (mut d_done, mut d_waited, mut d_refused) = (0, 0, 0);
    let mut longest = Duration::ZERO;
    for f in during {
        let end = server_end(f.id);
        match (f.router, &f.outcome, &end) {
            (Some(Role::Router2), Outcome::Done, Some(ServerEnd::Complete)) => {
                d_done += 1;
                if f.connect >= SYN_LOST {
                    d_waited += 1;
                }
                longest = longest.max(f.connect);
            }
            (None, Outcome::Reset(why), None) if why.starts_with("connect") => d_refused += 1,
            _ => problems.push(format!("opened during the drain: {}", describe(f, &end))),
        }
    }

    // Opened after the withdrawal: all through B.
    let mut after_b = 0;
    for f in after {
        let end = server_end(f.id);
        match (f.router, &f.outcome, &end) {
            (Some(Role::Router2), Outcome::Done, Some(ServerEnd::Complete)) => after_b += 1,
            _ => problems.push(format!(
                "opened after the withdrawal: {}",
                describe(f, &end)
            )),
        }
    }

    let during_line = if during.is_empty() {
        String::new()
    } else {
        format!(
            "; {} opened during the drain: {d_done} served by B ({d_waited} of them after a \
             lost SYN, the longest connect {longest:.1?}), {d_refused} refused",
            during.len()
        )
    };
    println!(
        "{fam}: {FLOWS} flows, {on_a} through A and {on_b} through B; A's: {a_done} finished, \
         {a_reset} reset{during_line}; {} opened after the withdrawal: {after_b} finished \
         through B",
        after.len()
    );
    assert!(
        problems.is_empty(),
        "{fam}: {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    (a_done, a_reset)
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done => write!(f, "finished"),
            Outcome::Reset(why) => write!(f, "was reset ({why})"),
            Outcome::Failed(why) => write!(f, "failed ({why})"),
        }
    }
}

impl fmt::Display for ServerEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerEnd::Complete => write!(f, "had the whole upload"),
            ServerEnd::ShortEof(n) => write!(f, "had a clean EOF after {n} bytes"),
            ServerEnd::Reset(n) => write!(f, "was reset after {n} bytes"),
            ServerEnd::Error(e) => write!(f, "failed ({e})"),
        }
    }
}
