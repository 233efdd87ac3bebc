//! Shared scaffolding for the integration tests: the namespace lab, the
//! tproxyd process, running code inside a namespace, and byte streams that
//! can be checked byte-exactly without being kept in memory.
//!
//! What holds:
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

pub mod udp;

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The port the lab's TPROXY rules divert to and tproxyd listens on.
pub const PROXY_PORT: u16 = 8080;

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
/// The router's address on the client side: where a client reaches the proxy
/// itself rather than through it.
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
/// The router's own source address towards the server.
pub const ROUTER_UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const ROUTER_UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2);

/// Upper bound for any single blocking socket call in a test. Long enough for
/// a loaded 2-core machine, short enough that a stuck test fails in time.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long tproxyd may take to start listening.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// The server's address in a family, with a port.
pub fn server_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(SERVER_V6), port)
    } else {
        SocketAddr::new(IpAddr::V4(SERVER_V4), port)
    }
}

/// "IPv4" or "IPv6", for messages.
pub fn family(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// LAB-4: fail, not skip, when the tests cannot do their job.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("integration tests need root: network namespaces and TPROXY; run as root");
    }
    require_packages();
}

/// LAB-5: the packages the tests use are installed, or this process stops
/// with one line that says which are not and how to install them. Every test
/// comes through here (from `Lab::up`, or `tproxyd_bin` for those without a
/// lab) before it starts a process, so stopping leaves nothing behind.
fn require_packages() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let script = manifest_dir().join("scripts/deps");
        let line = match Command::new("bash")
            .arg(&script)
            .args(["check", "tests"])
            .output()
        {
            Ok(out) if out.status.success() => return,
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stderr);
                match text.trim() {
                    "" => format!("{} check tests: {}", script.display(), describe(&out)),
                    line => line.to_string(),
                }
            }
            Err(e) => format!("cannot run {}: {e}", script.display()),
        };
        // Straight to the process's stderr: the test harness captures what
        // eprintln! writes and would drop it when the process exits.
        let _ = writeln!(io::stderr(), "{line}");
        std::process::exit(1);
    });
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn lab_script() -> PathBuf {
    manifest_dir().join("scripts/lab.sh")
}

/// The tproxyd binary cargo built for these tests (once the tests' packages
/// are known to be there: LAB-5).
pub fn tproxyd_bin() -> &'static str {
    require_packages();
    env!("CARGO_BIN_EXE_tproxyd")
}

/// A unique name for a lab or a temporary file (LAB-1).
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Short: lab.sh allows 13 characters (pid up to 7 digits).
    format!("{prefix}{}_{n}", std::process::id())
}

/// A finished command for a failure message: status, stdout, stderr.
pub fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Lab names are LAB_PREFIX, the test process's pid, '_', a counter.
const LAB_PREFIX: &str = "tp";

/// Remove the labs of test processes that no longer exist (killed before
/// their `Drop` ran, e.g. by a timeout). Labs of live processes, this one's
/// or a parallel run's, are left alone.
fn sweep_stale_labs() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let mut stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|ns| {
            let lab = ns
                .strip_suffix("-c")
                .or(ns.strip_suffix("-r"))
                .or(ns.strip_suffix("-s"))?;
            let (pid, n) = lab.strip_prefix(LAB_PREFIX)?.split_once('_')?;
            let pid: u32 = pid.parse().ok()?;
            n.parse::<u32>().ok()?;
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            (!alive).then(|| lab.to_string())
        })
        .collect();
    stale.sort();
    stale.dedup();
    for lab in stale {
        eprintln!("removing lab {lab} left by a test process that is gone");
        let _ = Command::new("bash")
            .arg(lab_script())
            .args(["down", &lab])
            .output();
    }
}

/// What the router does with the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// TCP and UDP from the client are diverted to the proxy port; the router
    /// forwards nothing else.
    Tproxy,
    /// Plain forwarding, no proxy: the baseline.
    Direct,
}

/// The three namespaces of one lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Router,
    Server,
}

impl Role {
    fn suffix(self) -> &'static str {
        match self {
            Role::Client => "c",
            Role::Router => "r",
            Role::Server => "s",
        }
    }
}

/// A lab from scripts/lab.sh, torn down on drop (LAB-1).
pub struct Lab {
    name: String,
    pub port: u16,
}

impl Lab {
    /// A TPROXY lab diverting to `PROXY_PORT`.
    pub fn tproxy() -> Lab {
        Lab::up(Mode::Tproxy, PROXY_PORT)
    }

    pub fn up(mode: Mode, port: u16) -> Lab {
        require_root();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale_labs);
        let name = unique_name(LAB_PREFIX);
        let mode_arg = match mode {
            Mode::Tproxy => "tproxy",
            Mode::Direct => "direct",
        };
        let out = Command::new("bash")
            .arg(lab_script())
            .args(["up", &name, "--port", &port.to_string(), "--mode", mode_arg])
            .output()
            .expect("cannot run scripts/lab.sh");
        assert!(
            out.status.success(),
            "lab.sh up {name} failed: {}",
            describe(&out)
        );
        Lab { name, port }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace name of a role, e.g. "tp1234_0-r".
    pub fn ns(&self, role: Role) -> String {
        format!("{}-{}", self.name, role.suffix())
    }

    /// Run `f` on a new thread inside the role's namespace and return what it
    /// returns; a panic in `f` is re-raised here.
    pub fn run_in<T, F>(&self, role: Role, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self.spawn_in(role, f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Start `f` on a new thread inside the role's namespace. Threads that `f`
    /// spawns are in the same namespace.
    pub fn spawn_in<T, F>(&self, role: Role, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let ns = self.ns(role);
        let path = format!("/run/netns/{ns}");
        thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn(move || {
                let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                drop(fd);
                f()
            })
            .expect("cannot spawn a thread")
    }

    pub fn client<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.run_in(Role::Client, f)
    }

    pub fn server<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.run_in(Role::Server, f)
    }

    pub fn spawn_client<T, F>(&self, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.spawn_in(Role::Client, f)
    }

    pub fn spawn_server<T, F>(&self, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.spawn_in(Role::Server, f)
    }

    /// A TCP connection from the client to `dst`, with `IO_TIMEOUT` set.
    pub fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.client(move || connect(dst))
    }

    /// A listener in the server namespace on every address (dual-stack).
    pub fn listen_server(&self, port: u16) -> TcpListener {
        self.server(move || listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)))
    }

    /// Run a command in the role's namespace and return its output.
    pub fn exec(&self, role: Role, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"))
    }

    /// Like `exec`, but the command must succeed.
    pub fn sh(&self, role: Role, args: &[&str]) -> String {
        let out = self.exec(role, args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.ns(role),
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Load an nft ruleset in the role's namespace.
    pub fn nft(&self, role: Role, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run nft");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(ruleset.as_bytes())
            .expect("cannot write the ruleset to nft");
        let out = child.wait_with_output().expect("cannot wait for nft");
        assert!(
            out.status.success(),
            "nft -f in {}: {}",
            self.ns(role),
            describe(&out)
        );
    }

    /// Whether a TCP socket listens on `port` in the role's namespace.
    pub fn is_listening(&self, role: Role, port: u16) -> bool {
        let filter = format!("sport = :{port}");
        let out = self.exec(role, &["ss", "-ltnH", &filter]);
        assert!(out.status.success(), "ss failed: {}", describe(&out));
        !out.stdout.iter().all(u8::is_ascii_whitespace)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let res = Command::new("bash")
            .arg(lab_script())
            .args(["down", &self.name])
            .output();
        match res {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("lab.sh down {}: {}", self.name, describe(&out)),
            Err(e) => eprintln!("cannot run lab.sh down {}: {e}", self.name),
        }
    }
}

/// A blocking connection with `IO_TIMEOUT` on connect, reads and writes.
/// Create it inside a namespace (LAB-2).
pub fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
    set_timeouts(&s, IO_TIMEOUT);
    Ok(s)
}

/// A listener on `addr`; an IPv6 wildcard is dual-stack. Create it inside a
/// namespace (LAB-2).
pub fn listen(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).expect("SO_RCVTIMEO");
    s.set_write_timeout(Some(t)).expect("SO_SNDTIMEO");
}

/// Accept one connection, giving up after `timeout` (LAB-3). The stream is
/// blocking with `IO_TIMEOUT`.
pub fn accept_timeout(l: &TcpListener, timeout: Duration) -> io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let res = loop {
        match l.accept() {
            Ok(pair) => break Ok(pair),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(io::Error::new(
                        ErrorKind::TimedOut,
                        "no connection to accept",
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    l.set_nonblocking(false)?;
    let (s, peer) = res?;
    s.set_nonblocking(false)?;
    set_timeouts(&s, IO_TIMEOUT);
    Ok((s, peer))
}

pub fn accept(l: &TcpListener) -> (TcpStream, SocketAddr) {
    accept_timeout(l, IO_TIMEOUT).expect("accept")
}

/// Close with an RST: SO_LINGER on with a zero timeout, then close.
pub fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
        .expect("SO_LINGER");
    drop(s);
}

/// How a read-until-the-end finished.
#[derive(Debug)]
pub enum End {
    /// A clean EOF after this many bytes.
    Eof(u64),
    /// An error after this many bytes.
    Error(u64, io::Error),
}

/// Read and discard until EOF or an error, counting bytes.
pub fn read_until_end(s: &mut TcpStream) -> End {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return End::Eof(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return End::Error(total, e),
        }
    }
}

/// Assert that the stream ends in a connection reset (not a clean EOF, not a
/// timeout). Returns the bytes read before it.
pub fn expect_reset(s: &mut TcpStream, what: &str) -> u64 {
    match read_until_end(s) {
        End::Error(n, e) if e.kind() == ErrorKind::ConnectionReset => n,
        End::Error(n, e) => panic!("{what}: expected a reset, got error {e} after {n} bytes"),
        End::Eof(n) => panic!("{what}: expected a reset, got a clean EOF after {n} bytes"),
    }
}

/// Assert that a connection attempt ends in a reset: either the connect
/// itself reports it (the reset came before connect returned) or the first
/// read does. No byte may arrive before it.
pub fn expect_reset_from(res: io::Result<TcpStream>, timeout: Duration, what: &str) {
    match res {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: connect failed with {e}, expected a reset"),
        Ok(mut s) => {
            s.set_read_timeout(Some(timeout)).expect("SO_RCVTIMEO");
            let got = expect_reset(&mut s, what);
            assert_eq!(got, 0, "{what}: {got} bytes before the reset");
        }
    }
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Raise RLIMIT_NOFILE's soft limit to at least `want`, or fail saying why.
pub fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= want {
        return;
    }
    assert!(
        hard >= want,
        "this test needs {want} descriptors; RLIMIT_NOFILE hard limit is {hard}"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit RLIMIT_NOFILE");
}

/// A server that echoes every connection until EOF, one thread each, until
/// dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
}

impl EchoServer {
    /// Serve `listener` (made in the server namespace, LAB-2).
    pub fn start(listener: TcpListener) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let s = match accept_timeout(&listener, Duration::from_millis(50)) {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == ErrorKind::TimedOut => continue,
                        Err(e) => panic!("echo server: accept: {e}"),
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    thread::Builder::new()
                        .stack_size(ECHO_STACK)
                        .spawn(move || echo(s))
                        .expect("echo server: spawn");
                }
            })
        };
        EchoServer {
            stop,
            acceptor: Some(acceptor),
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Echo threads need little stack; a thousand of them should cost little.
const ECHO_STACK: usize = 128 * 1024;

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.acceptor.take() {
            let res = h.join();
            if res.is_err() && !thread::panicking() {
                panic!("echo server's acceptor panicked");
            }
        }
    }
}

/// A tproxyd process in a lab's router namespace, killed on drop.
pub struct Proxy {
    child: Child,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Proxy {
    /// Start tproxyd on the lab's port with `extra` arguments and wait until
    /// it listens.
    pub fn start(lab: &Lab, extra: &[&str]) -> Proxy {
        Proxy::start_wrapped(lab, &[], extra)
    }

    /// Like `start`, with `wrapper` (e.g. `setpriv ...`) between
    /// `ip netns exec NS` and the binary; the wrapper must exec it, so the
    /// child's pid is still tproxyd's.
    pub fn start_wrapped(lab: &Lab, wrapper: &[&str], extra: &[&str]) -> Proxy {
        let log_path =
            std::env::temp_dir().join(format!("{}.tproxyd.log", unique_name(LAB_PREFIX)));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        // `ip netns exec` execs the binary: the child's pid is tproxyd's, so
        // signals reach it directly.
        // Debug logging names every connection's end and cause: what a
        // failing test needs to show. A test may still choose its own level.
        let level: &[&str] = if extra.contains(&"--log-level") {
            &[]
        } else {
            &["--log-level", "debug"]
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Role::Router)])
            .args(wrapper)
            .arg(tproxyd_bin())
            .args(["--port", &lab.port.to_string()])
            .args(level)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tproxyd: {e}"));
        let mut proxy = Proxy {
            child,
            log_path,
            status: None,
        };
        let up = wait_until(LISTEN_WAIT, || {
            proxy.poll_exit().is_none() && lab.is_listening(Role::Router, lab.port)
        });
        if !up {
            let why = match proxy.status {
                Some(st) => format!("exited with {st}"),
                None => format!("not listening after {LISTEN_WAIT:?}"),
            };
            panic!("tproxyd {extra:?} {why}; its log:\n{}", proxy.log());
        }
        proxy
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill {sig}: {e}"));
    }

    /// Send a signal by number: real-time ones too, which nix's `Signal`
    /// lacks.
    pub fn signal_number(&self, signo: libc::c_int) {
        // SAFETY: kill(2) takes no pointers; the worst a wrong pid could do
        // is signal another process, and this one is our child.
        if unsafe { libc::kill(self.pid().as_raw(), signo) } != 0 {
            panic!("kill {signo}: {}", io::Error::last_os_error());
        }
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    /// Wait up to `timeout` for tproxyd to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.poll_exit().is_some());
        self.status
    }

    /// Wait up to `timeout` until the log holds `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Everything tproxyd wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        if thread::panicking() {
            eprintln!(
                "--- tproxyd log ({}) ---\n{}--- end of tproxyd log ---",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// A deterministic byte stream: xorshift64* words, little-endian. Two
/// `Pattern`s with the same seed produce the same bytes however the output is
/// cut into chunks.
pub struct Pattern {
    state: u64,
    block: Vec<u8>,
    pos: usize,
}

/// Bytes generated per refill: big enough to amortise the loop, small enough
/// to stay in cache.
const PATTERN_BLOCK: usize = 64 * 1024;

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // Zero is xorshift's one fixed point; mix the seed so that small
        // seeds differ from the first word on.
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Pattern {
            state,
            block: vec![0; PATTERN_BLOCK],
            pos: PATTERN_BLOCK,
        }
    }

    fn refill(&mut self) {
        let mut x = self.state;
        for word in self.block.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        self.state = x;
        self.pos = 0;
    }

    /// Fill `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.block.len() {
                self.refill();
            }
            let n = (out.len() - done).min(self.block.len() - self.pos);
            out[done..done + n].copy_from_slice(&self.block[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// Checks received bytes against a `Pattern`, chunk by chunk.
pub struct Verifier {
    pattern: Pattern,
    offset: u64,
    scratch: Vec<u8>,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            pattern: Pattern::new(seed),
            offset: 0,
            scratch: Vec::new(),
        }
    }

    /// Bytes checked so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Check the next chunk; on a mismatch, the stream offset of the first
    /// wrong byte.
    pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
        self.scratch.resize(data.len(), 0);
        self.pattern.fill(&mut self.scratch);
        if self.scratch[..] != *data {
            let i = data
                .iter()
                .zip(&self.scratch)
                .position(|(a, b)| a != b)
                .expect("slices differ");
            return Err(format!(
                "stream differs at byte {}: got {:#04x}, expected {:#04x}",
                self.offset + i as u64,
                data[i],
                self.scratch[i]
            ));
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// Write `len` bytes of the stream for `seed`.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Read and check the bytes of `v`'s stream up to stream offset `upto`,
/// without reading past it.
pub fn recv_verified(r: &mut impl Read, v: &mut Verifier, upto: u64) -> Result<(), String> {
    let mut buf = vec![0u8; 256 * 1024];
    while v.offset() < upto {
        let want = (upto - v.offset()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("EOF after {} of {upto} bytes", v.offset())),
            Ok(n) => v.check(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} after {} of {upto} bytes", v.offset())),
        }
    }
    Ok(())
}

/// The next read must be a clean EOF (after `len` bytes, for the message).
pub fn expect_eof(r: &mut impl Read, len: u64) -> Result<(), String> {
    let mut extra = [0u8; 1024];
    match r.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} bytes more than the {len} expected")),
        Err(e) => Err(format!("{e} instead of EOF after all {len} bytes")),
    }
}

/// Read exactly `len` bytes and check them against the stream for `seed`.
/// Does not read past `len`.
pub fn recv_pattern(r: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    recv_verified(r, &mut Verifier::new(seed), len)
}

/// Read the stream for `seed` until EOF and check that exactly `len` bytes
/// came.
pub fn recv_pattern_to_eof(r: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    recv_pattern(r, seed, len)?;
    expect_eof(r, len)
}

/// Send `send_len` bytes (seed `send_seed`) and, at the same time, receive
/// and verify `recv_len` bytes (seed `recv_seed`) then EOF. The write side is
/// shut down after sending. Returns what went wrong, if anything.
pub fn exchange(
    s: TcpStream,
    send_seed: u64,
    send_len: u64,
    recv_seed: u64,
    recv_len: u64,
) -> Result<(), String> {
    let mut writer = s.try_clone().map_err(|e| format!("try_clone: {e}"))?;
    let sender = thread::spawn(move || {
        send_pattern(&mut writer, send_seed, send_len)
            .and_then(|()| writer.shutdown(Shutdown::Write))
            .map_err(|e| format!("send: {e}"))
    });
    let mut reader = s;
    let received =
        recv_pattern_to_eof(&mut reader, recv_seed, recv_len).map_err(|e| format!("receive: {e}"));
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err("sender panicked".into()));
    match (sent, received) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(a), Ok(())) | (Ok(()), Err(a)) => Err(a),
        (Err(a), Err(b)) => Err(format!("{a}; {b}")),
    }
}

// ------------------------------------------------- process and metrics probes
// Added for tests/reliability.rs: what tproxyd holds (memory, descriptors,
// CPU), read from /proc, and its metrics endpoint, read from the router.

/// GET /metrics from tproxyd's `--metrics` address, from inside the router
/// namespace (where it listens). Returns the exposition text (the body).
pub fn scrape_metrics(lab: &Lab, addr: SocketAddr) -> String {
    let resp = lab.run_in(Role::Router, move || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        set_timeouts(&s, Duration::from_secs(10));
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tproxyd\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    let resp = resp.unwrap_or_else(|e| panic!("scrape http://{addr}/metrics: {e}"));
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body.to_string(),
        _ => panic!("scrape http://{addr}/metrics: unexpected response:\n{resp}"),
    }
}

/// The value of one sample in exposition text, named exactly as it appears
/// (with its labels, e.g. `tproxyd_tcp_pipes{state="in_use"}`).
pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("sample {name}: {e}"))
}

/// A process's resident memory in KiB (VmRSS in /proc/PID/status).
pub fn proc_vm_rss_kib(pid: Pid) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}"))
}

/// A process's open descriptors (entries of /proc/PID/fd).
pub fn proc_fd_count(pid: Pid) -> usize {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .count()
}

/// CPU time a process has used so far, user plus system, all threads
/// (utime + stime from /proc/PID/stat).
pub fn proc_cpu_time(pid: Pid) -> Duration {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("{path}: no ')' in {stat:?}"));
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11, 12.
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{path}: bad field {i} in {stat:?}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

// ------------------------------------------------- daemons in a namespace

/// A program running in a lab namespace, its stdout and stderr in files,
/// killed when dropped (and its output shown if the test is failing).
pub struct Daemon {
    what: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    pub fn start(lab: &Lab, role: Role, what: &str, args: &[&str]) -> Daemon {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("tpd{}_{n}", std::process::id()));
        let (out, err) = (base.with_extension("out"), base.with_extension("err"));
        let file =
            |p: &PathBuf| File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(role)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Daemon {
            what: what.to_string(),
            child,
            out,
            err,
            status: None,
        }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.exited().is_some());
        self.status
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- {} stdout ---\n{}--- {} stderr ---\n{}--- end of {} ---",
                self.what,
                self.stdout(),
                self.what,
                self.stderr(),
                self.what
            );
        }
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
    }
}

/// Run a command in a namespace under coreutils' `timeout`, so a client
/// that hangs is killed (LAB-3).
pub fn run_bounded(lab: &Lab, role: Role, limit: Duration, args: &[&str]) -> Output {
    let secs = limit.as_secs().max(1).to_string();
    let mut full = vec!["timeout", "-k", "2", &secs];
    full.extend_from_slice(args);
    lab.exec(role, &full)
}

/// UDP sockets bound to `port` in a namespace.
pub fn udp_listeners(lab: &Lab, role: Role, port: u16) -> usize {
    let filter = format!("sport = :{port}");
    let out = lab.exec(role, &["ss", "-ulnH", &filter]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}
