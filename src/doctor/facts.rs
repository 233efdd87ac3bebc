//! What doctor learns from the host, probed once into a plain [`Facts`]:
//! files under /proc and /sys, the host's own tools (`nft`,
//! `iptables-save`, `ip`), and one test socket. The checks (checks.rs) only
//! judge these facts; nothing here decides anything.
//!
//! What must stay true:
//! - DOC-1 (mod.rs): probing changes nothing on the host: it only reads,
//!   and the one socket it opens is closed again.
//! - DOC-4: a fact that cannot be learnt is recorded as unknown (`None`,
//!   empty text, [`Transparent::Untested`]), never guessed, so that the
//!   check can say it cannot tell (DOC-2).

use std::net::SocketAddr;
use std::process::Command;

use super::parse::{fwmark_rules, parse_port_range};
use crate::budget::PipeLimits;
use crate::config::Config;
use crate::sys;

/// The TPROXY modules whose presence in /sys/module shows kernel support.
pub const TPROXY_MODULES: [&str; 3] = ["nft_tproxy", "xt_TPROXY", "nf_tproxy_ipv4"];

/// Everything the checks judge.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// `nft list ruleset`; empty when nft is missing or fails.
    pub nft: String,
    /// `iptables-save` then `ip6tables-save`, those that ran, joined.
    pub iptables: String,
    /// Which of [`TPROXY_MODULES`] are loaded.
    pub tproxy_modules: Vec<&'static str>,
    /// The kernel's build configuration: /proc/config.gz, else
    /// /boot/config-RELEASE.
    pub kernel_config: Option<String>,
    /// Whether this process may open a transparent socket.
    pub transparent: Transparent,
    /// Policy routing, IPv4.
    pub v4: Routing,
    /// Policy routing, IPv6.
    pub v6: Routing,
    /// /proc/net/tcp and /proc/net/tcp6, those that could be read.
    pub proc_net_tcp: Vec<String>,
    /// /proc/sys/net/ipv4/ip_forward, as read.
    pub ip_forward: Option<String>,
    /// Each interface under /proc/sys/net/ipv4/conf but `default`, with its
    /// src_valid_mark as read; `None` when the directory cannot be read.
    pub src_valid_mark: Option<Vec<(String, Option<String>)>>,
    /// /proc/sys/net/ipv4/conf/all/rp_filter, as read.
    pub rp_filter: Option<String>,
    /// The hard RLIMIT_NOFILE.
    pub nofile_hard: Option<u64>,
    /// The process's exemption and the pipe sysctls.
    pub pipes: PipeLimits,
    /// The sysctls that decide the source ports.
    pub ports: PortFacts,
}

/// The answer of a test transparent listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transparent {
    Allowed,
    /// IP_TRANSPARENT was refused: CAP_NET_ADMIN is missing.
    NoCapability,
    /// The test itself failed, for this reason.
    Untested(String),
}

impl Default for Transparent {
    fn default() -> Transparent {
        Transparent::Untested("not probed".into())
    }
}

/// One family's policy routing, as `ip` prints it.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// `ip -4 rule show` (or `-6`); empty when it fails.
    pub rules: String,
    /// `ip route show table T` for each table a fwmark rule looks up.
    pub tables: Vec<(String, String)>,
}

impl Routing {
    /// The routes of `table`, as probed (empty when unknown).
    pub fn table(&self, table: &str) -> &str {
        self.tables
            .iter()
            .find(|(t, _)| t == table)
            .map_or("", |(_, routes)| routes.as_str())
    }
}

/// What the kernel says about the ports upstream connections come from
/// (/proc/sys/net/ipv4; the same settings apply to IPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortFacts {
    /// ip_local_port_range.
    pub range: Option<(u32, u32)>,
    /// ip_local_reserved_ports, as the kernel prints it ("8080,9000-9010").
    pub reserved: String,
    pub tw_reuse: Option<u32>,
    /// tcp_tw_reuse_delay (ms; kernels from 6.13); `None`: the 1 s before it.
    pub tw_reuse_delay_ms: Option<u64>,
    pub timestamps: Option<u32>,
}

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl Facts {
    /// Probe this host for `cfg` (whose first listen address picks the
    /// family of the test socket).
    pub fn probe(cfg: &Config) -> Facts {
        Facts {
            nft: run("nft", &["list", "ruleset"]).unwrap_or_default(),
            iptables: [run("iptables-save", &[]), run("ip6tables-save", &[])]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n"),
            tproxy_modules: TPROXY_MODULES
                .into_iter()
                .filter(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
                .collect(),
            kernel_config: run("zcat", &["/proc/config.gz"]).or_else(|| {
                let release = read("/proc/sys/kernel/osrelease")?;
                read(&format!("/boot/config-{}", release.trim()))
            }),
            transparent: transparent(cfg),
            v4: routing("-4"),
            v6: routing("-6"),
            proc_net_tcp: ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .filter_map(|p| read(p))
                .collect(),
            ip_forward: read("/proc/sys/net/ipv4/ip_forward"),
            src_valid_mark: src_valid_mark(),
            rp_filter: read("/proc/sys/net/ipv4/conf/all/rp_filter"),
            nofile_hard: sys::nofile_hard_limit().ok(),
            pipes: PipeLimits::of_this_process(),
            ports: port_facts(),
        }
    }
}

/// Open (and close, DOC-1) a transparent listener on the first listen
/// address's family.
fn transparent(cfg: &Config) -> Transparent {
    let ip = cfg.listen.first().copied().unwrap_or([0u8; 4].into());
    match sys::transparent_listener(SocketAddr::new(ip, 0)) {
        Ok(_) => Transparent::Allowed,
        Err(sys::ListenError::NoCapability) => Transparent::NoCapability,
        Err(e) => Transparent::Untested(format!("{e:?}")),
    }
}

/// `flag` is `-4` or `-6`.
fn routing(flag: &str) -> Routing {
    let rules = run("ip", &[flag, "rule", "show"]).unwrap_or_default();
    let mut tables: Vec<(String, String)> = Vec::new();
    for (_, table) in fwmark_rules(&rules) {
        if tables.iter().all(|(t, _)| *t != table) {
            let routes = run("ip", &[flag, "route", "show", "table", &table]).unwrap_or_default();
            tables.push((table, routes));
        }
    }
    Routing { rules, tables }
}

fn src_valid_mark() -> Option<Vec<(String, Option<String>)>> {
    let dir = std::fs::read_dir("/proc/sys/net/ipv4/conf").ok()?;
    Some(
        dir.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|iface| iface != "default")
            .map(|iface| {
                let v = read(&format!("/proc/sys/net/ipv4/conf/{iface}/src_valid_mark"));
                (iface, v)
            })
            .collect(),
    )
}

/// [`PortFacts`] of this host's namespace.
fn port_facts() -> PortFacts {
    let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
    PortFacts {
        range: read("/proc/sys/net/ipv4/ip_local_port_range").and_then(|s| parse_port_range(&s)),
        reserved: read("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default(),
        tw_reuse: num("/proc/sys/net/ipv4/tcp_tw_reuse").map(|n| n as u32),
        tw_reuse_delay_ms: num("/proc/sys/net/ipv4/tcp_tw_reuse_delay"),
        timestamps: num("/proc/sys/net/ipv4/tcp_timestamps").map(|n| n as u32),
    }
}
