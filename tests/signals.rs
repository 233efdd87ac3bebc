//! Signals (issue 12): every signal whose default action would end tproxyd
//! is handled, and however it stops, no peer is handed a FIN for a stream
//! that did not finish (tcp/close.rs CONN-8, main.rs MAIN-3).
//!
//! Each test has an upload (client -> server, IPv4) and a download (server
//! -> client, IPv6) of 64 MiB each moving through the proxy when the signal
//! lands, and checks what each end of each sees:
//! - SIGHUP, SIGUSR1, SIGUSR2, SIGALRM, SIGRTMIN, and one test for every
//!   other signal tproxyd takes: it logs the signal, keeps running and
//!   serving, and both transfers complete byte-exact.
//! - SIGTERM, SIGINT: it drains; both complete byte-exact, then exit 0.
//! - a second SIGTERM or SIGINT during the drain, SIGQUIT: both ends of both
//!   transfers are reset (the receiver's read fails with ECONNRESET, never a
//!   clean EOF; the sender's write fails), exit status 1.
//! - SIGKILL, and each fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP,
//!   SIGABRT, SIGSYS) sent with kill(2): both ends of both are reset; the
//!   process died of that signal.
//!
//! A flood of signals costs one log line per signal number (control.rs
//! CTL-4).

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{
    End, Lab, Pattern, Proxy, Verifier, accept, read_until_end, read_verified_until_end,
    server_addr,
};
use libc::c_int;

const LEN: u64 = 64 << 20;
const UP_SEED: u64 = 0x51_6E41;
const DOWN_SEED: u64 = 0xD0_4E41;
/// Before the signal each receiver reads this much, a step at a time with a
/// pause between: both transfers are then surely moving through the proxy,
/// and neither sender can be done (64 MiB is far more than the kernel
/// buffers between them; `assert_in_flight` checks it anyway).
const HEAD_STEP: usize = 64 * 1024;
const HEAD_STEPS: usize = 16;
const HEAD_PAUSE: Duration = Duration::from_millis(10);
/// Generous bounds for a small shared machine, not measurements.
const EXIT_WAIT: Duration = Duration::from_secs(30);
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A signal's name as tproxyd logs it: nix's name for the standard ones,
/// and the real-time ones counted from SIGRTMIN (SIGRTMAX by that name).
fn name(signo: c_int) -> String {
    match nix::sys::signal::Signal::try_from(signo) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if signo == libc::SIGRTMAX() => "SIGRTMAX".to_string(),
        Err(_) if signo == libc::SIGRTMIN() => "SIGRTMIN".to_string(),
        Err(_) => format!("SIGRTMIN+{}", signo - libc::SIGRTMIN()),
    }
}

/// A fault's default action dumps core, in the current directory (the
/// worktree) with the usual core_pattern: not for tests. Inherited by the
/// tproxyd each test starts afterwards.
fn no_core_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_CORE).expect("getrlimit RLIMIT_CORE");
    setrlimit(Resource::RLIMIT_CORE, 0, hard).expect("setrlimit RLIMIT_CORE");
}

/// How a sending end fared: its send and shutdown, and, when those worked,
/// how its read of the quiet reverse direction ended.
struct Sent {
    send: io::Result<()>,
    then: Option<End>,
}

fn send_all(mut s: TcpStream, seed: u64, written: Arc<AtomicU64>) -> Sent {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut send = Ok(());
    let mut done = 0;
    while done < LEN {
        let n = (LEN - done).min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        if let Err(e) = s.write_all(&buf[..n]) {
            send = Err(e);
            break;
        }
        done += n as u64;
        written.store(done, Ordering::Relaxed);
    }
    let send = send.and_then(|()| s.shutdown(Shutdown::Write));
    let then = send.is_ok().then(|| read_until_end(&mut s));
    Sent { send, then }
}

/// One transfer through the proxy: its receiving end, read here, and its
/// sending end, on a thread.
struct Transfer {
    what: &'static str,
    rx: TcpStream,
    verifier: Verifier,
    tx: JoinHandle<Sent>,
    written: Arc<AtomicU64>,
}

impl Transfer {
    fn start(what: &'static str, tx: TcpStream, rx: TcpStream, seed: u64) -> Transfer {
        let written = Arc::new(AtomicU64::new(0));
        let tx = {
            let written = written.clone();
            thread::spawn(move || send_all(tx, seed, written))
        };
        Transfer {
            what,
            rx,
            verifier: Verifier::new(seed),
            tx,
            written,
        }
    }

    /// Read the head of the stream slowly.
    fn head(&mut self) {
        let mut buf = vec![0u8; HEAD_STEP];
        for _ in 0..HEAD_STEPS {
            let n = self
                .rx
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("{}: reading the head: {e}", self.what));
            assert!(n > 0, "{}: EOF after {}", self.what, self.verifier.offset());
            self.verifier
                .check(&buf[..n])
                .unwrap_or_else(|e| panic!("{}: {e}", self.what));
            thread::sleep(HEAD_PAUSE);
        }
    }

    /// A test whose sender had finished before the signal would prove
    /// nothing about what the signal does to an open transfer.
    fn assert_in_flight(&self) {
        let w = self.written.load(Ordering::Relaxed);
        assert!(
            w < LEN,
            "{}: all {LEN} bytes were written before the signal",
            self.what
        );
    }

    /// Read and check the rest: how many bytes came in all, and how the
    /// stream ended (`Ok` for a clean EOF). Wrong bytes fail the test.
    fn read_rest(&mut self, label: &str) -> (u64, io::Result<()>) {
        let what = format!("{label}: {}", self.what);
        match read_verified_until_end(&mut self.rx, &mut self.verifier, &what) {
            End::Eof(n) => (n, Ok(())),
            End::Error(n, e) => (n, Err(e)),
        }
    }

    /// Both ends finish: every byte, then EOF, at the receiver; the sender's
    /// send worked and, once the receiver closes, it reads EOF too.
    fn expect_complete(mut self, label: &str) {
        let (got, end) = self.read_rest(label);
        assert!(
            got == LEN && end.is_ok(),
            "{label}: {}: the receiver got {got} of {LEN} bytes, then {end:?}",
            self.what
        );
        drop(self.rx);
        let sent = self.tx.join().expect("sender panicked");
        assert!(
            sent.send.is_ok() && matches!(sent.then, Some(End::Eof(0))),
            "{label}: {}: the sender's send: {:?}, then: {:?}",
            self.what,
            sent.send,
            sent.then
        );
    }

    /// Both ends are reset: the receiver's read fails with ECONNRESET after
    /// what it got (never a clean EOF), and the sender's write fails
    /// (ECONNRESET, or EPIPE once that error was taken).
    fn expect_reset(mut self, label: &str) {
        let (got, end) = self.read_rest(label);
        match end {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!(
                "{label}: {}: the receiver got {e} after {got} bytes; expected a reset",
                self.what
            ),
            Ok(()) => panic!(
                "{label}: {}: the receiver got a clean EOF after {got} of {LEN} bytes: a FIN \
                 for a stream that did not finish",
                self.what
            ),
        }
        let sent = self.tx.join().expect("sender panicked");
        match sent.send {
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
            Err(e) => panic!(
                "{label}: {}: the sender got {e}; expected a reset",
                self.what
            ),
            Ok(()) => panic!(
                "{label}: {}: the sender's whole send went out, then {:?}; expected a reset",
                self.what, sent.then
            ),
        }
    }
}

/// An upload and a download through the proxy, both moving (heads read).
fn open_transfers(lab: &Lab, listener: &TcpListener) -> (Transfer, Transfer) {
    // One at a time, so the server knows which accepted connection is which.
    let up_client = lab
        .connect(server_addr(false, 80))
        .expect("connect for the upload");
    let (up_server, _) = accept(listener);
    let down_client = lab
        .connect(server_addr(true, 80))
        .expect("connect for the download");
    let (down_server, _) = accept(listener);
    let mut up = Transfer::start("upload (IPv4)", up_client, up_server, UP_SEED);
    let mut down = Transfer::start("download (IPv6)", down_server, down_client, DOWN_SEED);
    up.head();
    down.head();
    up.assert_in_flight();
    down.assert_in_flight();
    (up, down)
}

/// A new connection still gets through.
fn still_serves(lab: &Lab, listener: &TcpListener, label: &str) {
    let mut client = lab
        .connect(server_addr(false, 80))
        .unwrap_or_else(|e| panic!("{label}: a new connection: {e}"));
    let (mut server, _) = accept(listener);
    client.write_all(b"still there?").expect("write");
    let mut buf = [0u8; 12];
    server
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{label}: a new connection's bytes: {e}"));
    assert_eq!(&buf, b"still there?", "{label}");
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Keeps running, having logged this; both transfers complete.
    Runs(&'static str),
    /// Drains: both transfers complete, then exit status 0.
    Drains,
    /// Both ends of both transfers are reset; exit status 1, logged.
    StopsAtOnce,
    /// Both ends of both transfers are reset; the process died of this.
    DiesOf(c_int),
}

/// Send `signals` in turn while both transfers are open, and check
/// `expect`. More than one is a drain and what comes during it: the next
/// goes once the log says the drain began.
fn signal_case(signals: &[c_int], expect: Expect) {
    no_core_files();
    let label: Vec<String> = signals.iter().map(|s| name(*s)).collect();
    let label = label.join(" then ");
    let lab = Lab::tproxy();
    let mut proxy = Proxy::start(&lab, &["--drain-timeout", "120s"]);
    let listener = lab.listen_server(80);
    let (up, down) = open_transfers(&lab, &listener);
    for (i, &signo) in signals.iter().enumerate() {
        proxy.signal_number(signo);
        if i + 1 < signals.len() {
            assert!(
                proxy.wait_log("stopping accepting", LOG_WAIT),
                "{label}: the drain did not begin (tproxyd: {:?})",
                proxy.wait_exit(Duration::ZERO)
            );
        }
    }
    match expect {
        Expect::Runs(logged) => {
            assert!(
                proxy.wait_log(logged, LOG_WAIT),
                "{label}: no {logged:?} in the log (tproxyd: {:?})",
                proxy.wait_exit(Duration::ZERO)
            );
            up.expect_complete(&label);
            down.expect_complete(&label);
            let status = proxy.wait_exit(Duration::ZERO);
            assert!(status.is_none(), "{label}: tproxyd ended: {status:?}");
            still_serves(&lab, &listener, &label);
        }
        Expect::Drains => {
            up.expect_complete(&label);
            down.expect_complete(&label);
            let status = proxy.wait_exit(EXIT_WAIT);
            assert!(
                status.is_some_and(|s| s.success()),
                "{label}: tproxyd ended with {status:?} after the drain; expected exit status 0"
            );
        }
        Expect::StopsAtOnce => {
            let status = proxy.wait_exit(EXIT_WAIT);
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(1),
                "{label}: tproxyd ended with {status:?}; expected exit status 1"
            );
            up.expect_reset(&label);
            down.expect_reset(&label);
            assert!(
                proxy.log().contains("stopping at once"),
                "{label}: the log does not say it stopped at once"
            );
        }
        Expect::DiesOf(signo) => {
            let status = proxy.wait_exit(EXIT_WAIT);
            assert_eq!(
                status.and_then(|s| s.signal()),
                Some(signo),
                "{label}: tproxyd ended with {status:?}; expected death by {}",
                name(signo)
            );
            up.expect_reset(&label);
            down.expect_reset(&label);
        }
    }
}

// ----------------------------------------------- it keeps running

#[test]
fn sighup_is_logged_and_transfers_complete() {
    signal_case(&[libc::SIGHUP], Expect::Runs("nothing to reload"));
}

#[test]
fn sigusr1_logs_the_counters_and_transfers_complete() {
    signal_case(
        &[libc::SIGUSR1],
        Expect::Runs("tproxyd_tcp_connections_accepted_total"),
    );
}

#[test]
fn sigusr2_is_logged_and_ignored() {
    signal_case(&[libc::SIGUSR2], Expect::Runs("SIGUSR2 from pid"));
}

#[test]
fn sigalrm_is_logged_and_ignored() {
    signal_case(&[libc::SIGALRM], Expect::Runs("SIGALRM from pid"));
}

#[test]
fn a_real_time_signal_is_logged_and_ignored() {
    signal_case(&[libc::SIGRTMIN()], Expect::Runs("SIGRTMIN from pid"));
}

/// Every other signal tproxyd takes, one after the other during the same
/// transfers, each logged before the next; then glibc's own two real-time
/// signals (32, 33), ignored without a line.
#[test]
fn every_other_signal_that_would_end_it_is_logged_and_ignored() {
    let mut signals = vec![
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
    ];
    signals.extend(libc::SIGRTMIN() + 1..=libc::SIGRTMAX());
    let lab = Lab::tproxy();
    let mut proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    let (up, down) = open_transfers(&lab, &listener);
    for &signo in &signals {
        proxy.signal_number(signo);
        let logged = format!("{} from pid", name(signo));
        assert!(
            proxy.wait_log(&logged, LOG_WAIT),
            "{}: no {logged:?} in the log (tproxyd: {:?})",
            name(signo),
            proxy.wait_exit(Duration::ZERO)
        );
    }
    for signo in 32..libc::SIGRTMIN() {
        proxy.signal_number(signo);
    }
    let label = "every other signal";
    up.expect_complete(label);
    down.expect_complete(label);
    let status = proxy.wait_exit(Duration::ZERO);
    assert!(status.is_none(), "{label}: tproxyd ended: {status:?}");
    still_serves(&lab, &listener, label);
}

/// CTL-4: a thousand each of three signals, one line each.
#[test]
fn a_flood_of_signals_costs_one_log_line_per_signal() {
    let lab = Lab::tproxy();
    let mut proxy = Proxy::start(&lab, &[]);
    let listener = lab.listen_server(80);
    let flood = [libc::SIGHUP, libc::SIGUSR2, libc::SIGRTMIN() + 1];
    for _ in 0..1000 {
        for signo in flood {
            proxy.signal_number(signo);
        }
    }
    // Pending signals are taken lowest number first: once the highest is
    // logged, everything sent before it has been taken.
    proxy.signal_number(libc::SIGRTMAX());
    assert!(
        proxy.wait_log("SIGRTMAX from pid", LOG_WAIT),
        "the last signal was not logged"
    );
    let log = proxy.log();
    for signo in flood {
        let lines = log
            .lines()
            .filter(|l| l.contains(&format!("{} from pid", name(signo))))
            .count();
        assert_eq!(lines, 1, "{} was logged {lines} times", name(signo));
    }
    assert!(
        proxy.wait_exit(Duration::ZERO).is_none(),
        "tproxyd ended during the flood"
    );
    still_serves(&lab, &listener, "after the flood");
}

// ----------------------------------------------- it drains

#[test]
fn sigterm_drains_transfers_complete_then_exit_0() {
    signal_case(&[libc::SIGTERM], Expect::Drains);
}

#[test]
fn sigint_drains_transfers_complete_then_exit_0() {
    signal_case(&[libc::SIGINT], Expect::Drains);
}

// ----------------------------------------------- it stops at once

#[test]
fn a_second_sigterm_during_the_drain_resets_both_ends_and_exits_1() {
    signal_case(&[libc::SIGTERM, libc::SIGTERM], Expect::StopsAtOnce);
}

#[test]
fn a_second_sigint_during_the_drain_resets_both_ends_and_exits_1() {
    signal_case(&[libc::SIGINT, libc::SIGINT], Expect::StopsAtOnce);
}

#[test]
fn sigquit_resets_both_ends_and_exits_1() {
    signal_case(&[libc::SIGQUIT], Expect::StopsAtOnce);
}

// ----------------------------------------------- it dies

#[test]
fn sigkill_resets_both_ends() {
    signal_case(&[libc::SIGKILL], Expect::DiesOf(libc::SIGKILL));
}

#[test]
fn sigsegv_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGSEGV], Expect::DiesOf(libc::SIGSEGV));
}

#[test]
fn sigbus_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGBUS], Expect::DiesOf(libc::SIGBUS));
}

#[test]
fn sigill_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGILL], Expect::DiesOf(libc::SIGILL));
}

#[test]
fn sigfpe_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGFPE], Expect::DiesOf(libc::SIGFPE));
}

#[test]
fn sigtrap_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGTRAP], Expect::DiesOf(libc::SIGTRAP));
}

#[test]
fn sigabrt_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGABRT], Expect::DiesOf(libc::SIGABRT));
}

#[test]
fn sigsys_sent_with_kill_resets_both_ends_and_it_dies_of_it() {
    signal_case(&[libc::SIGSYS], Expect::DiesOf(libc::SIGSYS));
}
