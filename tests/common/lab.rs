//! The namespace lab: three network namespaces (client, router, server)
//! made by scripts/lab.sh, or four with a second router (`--routers 2`,
//! the client reaching a service address over an ECMP route through
//! both), their addresses, running code and commands inside one of them,
//! loading nft rules there, and setting the client's ECMP group.
//!
//! Keeps LAB-1 (a lab per test, unique names, torn down on drop), LAB-2
//! (sockets are made inside the namespace they belong to), LAB-4 (no root:
//! fail, never skip) and LAB-5 (missing packages: one line, then stop); see
//! mod.rs.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use super::process::{Bounded, describe, run_bounded};
use super::streams::{connect, listen};

/// The port the lab's TPROXY rules divert to and tproxyd listens on.
pub const PROXY_PORT: u16 = 8080;

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
/// More client addresses, for tests that need more than one client: none
/// is on the client until a test adds it (`Lab::add_client_address`). A
/// second IPv4 client, an IPv6 one in the client's own /64, and an IPv6 one
/// in another /64 (2001:2:0:3::/64, which no lab link uses).
pub const CLIENT2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
pub const CLIENT2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x12);
pub const CLIENT_OTHER64_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 3, 0, 0, 0, 2);
/// The router's address on the client side: where a client reaches the proxy
/// itself rather than through it.
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
/// The router's own source address towards the server.
pub const ROUTER_UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const ROUTER_UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2);

// A two-router lab (`Lab::two_routers`, scripts/lab.sh --routers 2) also has:
/// The second router's address on the client side.
pub const ROUTER2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const ROUTER2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 3);
/// The second router's own source address towards the server (its own link).
pub const ROUTER2_UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub const ROUTER2_UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 4, 0, 0, 0, 1);
/// The service address on the server's lo, which the client reaches over
/// its ECMP route through both routers.
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 5, 0, 0, 0, 2);
/// The client's resilient nexthop groups for the service prefix, one per
/// family (scripts/lab.sh `second_router`).
const ECMP_GROUP_V4: u32 = 10;
const ECMP_GROUP_V6: u32 = 11;
/// Buckets in each group (lab.sh makes them with 64).
pub const ECMP_BUCKETS: usize = 64;

/// The service address in a family, with a port.
pub fn service_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(SERVICE_V6), port)
    } else {
        SocketAddr::new(IpAddr::V4(SERVICE_V4), port)
    }
}

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
pub(super) fn require_packages() {
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

/// A unique name for a lab (LAB-1).
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Short: lab.sh allows 13 characters (pid up to 7 digits).
    format!("{prefix}{}_{n}", std::process::id())
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
                .or(ns.strip_suffix("-r2"))
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

/// The namespaces of one lab: three, and `Router2` in a two-router lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Router,
    Server,
    /// The second router of `Lab::two_routers`.
    Router2,
}

impl Role {
    fn suffix(self) -> &'static str {
        match self {
            Role::Client => "c",
            Role::Router => "r",
            Role::Server => "s",
            Role::Router2 => "r2",
        }
    }

    /// A router's own address towards the server, in a family: the source
    /// the server sees on what that router's proxy connects (without
    /// `--spoof-source`). None for a role that is not a router.
    pub fn upstream_address(self, v6: bool) -> Option<IpAddr> {
        match (self, v6) {
            (Role::Router, false) => Some(IpAddr::V4(ROUTER_UPSTREAM_V4)),
            (Role::Router, true) => Some(IpAddr::V6(ROUTER_UPSTREAM_V6)),
            (Role::Router2, false) => Some(IpAddr::V4(ROUTER2_UPSTREAM_V4)),
            (Role::Router2, true) => Some(IpAddr::V6(ROUTER2_UPSTREAM_V6)),
            _ => None,
        }
    }

    /// The router whose upstream address `ip` is (an IPv4-mapped address
    /// counts as IPv4, as a dual-stack listener reports it).
    pub fn router_from(ip: IpAddr) -> Option<Role> {
        let ip = ip.to_canonical();
        [Role::Router, Role::Router2]
            .into_iter()
            .find(|r| r.upstream_address(ip.is_ipv6()) == Some(ip))
    }

    /// A router's nexthop in the client's ECMP group of a family
    /// (scripts/lab.sh: 1 and 2 for IPv4, 3 and 4 for IPv6).
    fn nexthop_id(self, v6: bool) -> u32 {
        let base = if v6 { 3 } else { 1 };
        match self {
            Role::Router => base,
            Role::Router2 => base + 1,
            other => panic!("{other:?} is not a router: no nexthop"),
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

    /// A TPROXY lab with two routers (scripts/lab.sh --routers 2), both
    /// diverting to `PROXY_PORT`: `Role::Router` and `Role::Router2`, the
    /// client reaching `service_addr` through either over a resilient ECMP
    /// group (see `set_ecmp` and `ecmp_buckets`).
    pub fn two_routers() -> Lab {
        Lab::up_with(Mode::Tproxy, PROXY_PORT, 2)
    }

    pub fn up(mode: Mode, port: u16) -> Lab {
        Lab::up_with(mode, port, 1)
    }

    fn up_with(mode: Mode, port: u16, routers: u8) -> Lab {
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
            .args(["--routers", &routers.to_string()])
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

    /// Like `exec`, under a bound: killed if it still runs after `limit`
    /// (LAB-3).
    pub fn exec_bounded(&self, role: Role, limit: Duration, args: &[&str]) -> Bounded {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role)]).args(args);
        run_bounded(&mut cmd, limit)
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

    /// Make the client's ECMP group of a family (two-router lab) hold the
    /// nexthops of `routers`, e.g. `&[Role::Router2]` to withdraw the first
    /// router. The group stays resilient (`type resilient` must be given
    /// again, or the replace fails) with its 64 buckets: the kernel moves
    /// only the buckets whose nexthop left.
    pub fn set_ecmp(&self, v6: bool, routers: &[Role]) {
        let group = if v6 { ECMP_GROUP_V6 } else { ECMP_GROUP_V4 };
        let members: Vec<String> = routers
            .iter()
            .map(|r| r.nexthop_id(v6).to_string())
            .collect();
        self.sh(
            Role::Client,
            &[
                "ip",
                "nexthop",
                "replace",
                "id",
                &group.to_string(),
                "group",
                &members.join("/"),
                "type",
                "resilient",
            ],
        );
    }

    /// How many of the client's ECMP buckets of a family (two-router lab)
    /// each router holds: (Router, Router2).
    pub fn ecmp_buckets(&self, v6: bool) -> (usize, usize) {
        let group = if v6 { ECMP_GROUP_V6 } else { ECMP_GROUP_V4 };
        let out = self.sh(
            Role::Client,
            &["ip", "nexthop", "bucket", "show", "id", &group.to_string()],
        );
        // One line a bucket: "id 10 index 0 idle_time 1.23 nhid 2".
        let (a, b) = (Role::Router.nexthop_id(v6), Role::Router2.nexthop_id(v6));
        let mut counts = (0, 0);
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let nhid: u32 = line
                .split_whitespace()
                .skip_while(|w| *w != "nhid")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no nhid in bucket line {line:?}"));
            match nhid {
                n if n == a => counts.0 += 1,
                n if n == b => counts.1 += 1,
                n => panic!("bucket of group {group} on nexthop {n}, neither router's: {line:?}"),
            }
        }
        counts
    }

    /// One more address on the client's link (eth0), for a second client.
    /// One outside the link's prefixes (198.18.0.0/24, 2001:2:0:1::/64) is
    /// added alone (/32, /128), and the router routes it back over the link
    /// through the client's first address. Gone with the lab.
    pub fn add_client_address(&self, ip: IpAddr) {
        let on_link = match ip {
            IpAddr::V4(a) => a.octets()[..3] == CLIENT_V4.octets()[..3],
            IpAddr::V6(a) => a.segments()[..4] == CLIENT_V6.segments()[..4],
        };
        let (len, via) = match ip {
            IpAddr::V4(_) => (if on_link { 24 } else { 32 }, IpAddr::V4(CLIENT_V4)),
            IpAddr::V6(_) => (if on_link { 64 } else { 128 }, IpAddr::V6(CLIENT_V6)),
        };
        let cidr = format!("{ip}/{len}");
        let mut add = vec!["ip", "addr", "add", &cidr, "dev", "eth0"];
        if ip.is_ipv6() {
            add.push("nodad");
        }
        self.sh(Role::Client, &add);
        if !on_link {
            let via = via.to_string();
            self.sh(
                Role::Router,
                &["ip", "route", "add", &cidr, "via", &via, "dev", "rc"],
            );
        }
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
