//! Processes: programs the tests start in a lab namespace (daemons, killed
//! on drop; commands run to their end under a bound), this process's own
//! descriptor limit, and bounded waiting.
//!
//! Keeps LAB-1 (whatever is started here is killed when its owner is
//! dropped, also when a test panics) and LAB-3 (every wait has a bound);
//! see mod.rs.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::lab::{Lab, Role};
use super::streams::IO_TIMEOUT;

/// A finished command for a failure message: status, stdout, stderr.
pub fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
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

    /// The program's pid: with `ip netns exec`, which execs it, the pid of
    /// the program itself.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
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

/// How a command run under a bound ended.
#[derive(Debug)]
pub struct Bounded {
    /// What it wrote, and how it exited (SIGKILL when `killed`).
    pub out: Output,
    /// It still ran at the limit, and was killed with its process group.
    pub killed: bool,
}

/// Run `cmd` to its end, with no input and its output captured, killing it
/// and whatever it started (its process group) if it outlives `limit`
/// (LAB-3). The one bounded run: for a command that should end by itself,
/// where one that hangs (a client that never hears back, a tproxyd that
/// took bad flags for good ones and runs on) must fail the test in time.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Bounded {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // Read both pipes while it runs: a command that wrote more than a pipe
    // holds would otherwise block until it is killed.
    fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    }
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + limit;
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if Instant::now() >= deadline {
            // Its own group (process_group(0) above): the group id is its pid.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            killed = true;
            break child.wait().expect("waitpid");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let out = Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    Bounded { out, killed }
}

/// A gate that test threads are held at, so that what a test does (a
/// fault, a signal) happens while they are mid-transfer. Bounded (LAB-3):
/// a gate that never opens, or threads that never arrive, fail the test
/// after `IO_TIMEOUT`.
#[derive(Default)]
pub struct Gate {
    arrived: AtomicUsize,
    open: AtomicBool,
}

impl Gate {
    pub fn arrive_and_wait(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let opened = wait_until(IO_TIMEOUT, || self.open.load(Ordering::SeqCst));
        assert!(opened, "the gate never opened");
    }
    pub fn wait_for(&self, n: usize) {
        assert!(
            wait_until(IO_TIMEOUT, || self.arrived.load(Ordering::SeqCst) >= n),
            "only {} of {n} reached the gate",
            self.arrived.load(Ordering::SeqCst)
        );
    }
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}
