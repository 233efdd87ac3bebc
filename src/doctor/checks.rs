//! doctor's checks, one function each, and the line each prints.

use std::fmt;
use std::net::SocketAddr;

use super::facts::{PortFacts, read, run};
use super::parse::*;
use crate::config::Config;
use crate::sys;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

pub struct Check {
    pub status: Status,
    pub name: String,
    pub detail: String,
    pub fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        write!(f, "{tag}  {}: {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " -- fix: {fix}")?;
        }
        Ok(())
    }
}

pub(super) fn check(
    status: Status,
    name: &str,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        status,
        name: name.to_string(),
        detail: detail.into(),
        fix,
    }
}

pub(super) fn kernel_support(rule_loaded: bool) -> Check {
    const NAME: &str = "kernel TPROXY support";
    if rule_loaded {
        return check(
            Status::Pass,
            NAME,
            "a TPROXY rule is loaded, so the kernel has it",
            None,
        );
    }
    let loaded: Vec<&str> = ["nft_tproxy", "xt_TPROXY", "nf_tproxy_ipv4"]
        .into_iter()
        .filter(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
        .collect();
    if !loaded.is_empty() {
        return check(
            Status::Pass,
            NAME,
            format!("{} present", loaded.join(", ")),
            None,
        );
    }
    let config = run("zcat", &["/proc/config.gz"]).or_else(|| {
        let release = read("/proc/sys/kernel/osrelease")?;
        read(&format!("/boot/config-{}", release.trim()))
    });
    if let Some(cfg) = config {
        let has = |opt: &str| {
            cfg.lines()
                .any(|l| l == format!("{opt}=y") || l == format!("{opt}=m"))
        };
        let nft = has("CONFIG_NFT_TPROXY") && has("CONFIG_NFT_SOCKET");
        let xt =
            has("CONFIG_NETFILTER_XT_TARGET_TPROXY") && has("CONFIG_NETFILTER_XT_MATCH_SOCKET");
        return match (nft, xt) {
            (true, true) => check(
                Status::Pass,
                NAME,
                "nft tproxy + socket and xt_TPROXY + xt_socket",
                None,
            ),
            (true, false) => check(
                Status::Pass,
                NAME,
                "nft tproxy + socket (no xt_TPROXY: use the nft backend)",
                None,
            ),
            (false, true) => check(
                Status::Pass,
                NAME,
                "xt_TPROXY + xt_socket (no nft tproxy: use the iptables backend)",
                None,
            ),
            (false, false) => check(
                Status::Fail,
                NAME,
                "this kernel has neither nft tproxy nor xt_TPROXY",
                Some(
                    "a kernel built with CONFIG_NFT_TPROXY or CONFIG_NETFILTER_XT_TARGET_TPROXY"
                        .into(),
                ),
            ),
        };
    }
    check(
        Status::Warn,
        NAME,
        "cannot tell (no /proc/config.gz or /boot/config, modules not loaded)",
        Some("modprobe nft_tproxy nft_socket (or xt_TPROXY xt_socket)".into()),
    )
}

pub(super) fn capability(cfg: &Config) -> Check {
    const NAME: &str = "IP_TRANSPARENT allowed";
    let ip = cfg.listen.first().copied().unwrap_or([0u8; 4].into());
    match sys::transparent_listener(SocketAddr::new(ip, 0)) {
        Ok(_) => check(
            Status::Pass,
            NAME,
            "this process may open transparent sockets",
            None,
        ),
        Err(sys::ListenError::NoCapability) => check(
            Status::Fail,
            NAME,
            "refused: CAP_NET_ADMIN is missing",
            Some("run tproxyd as root or with AmbientCapabilities=CAP_NET_ADMIN".into()),
        ),
        Err(e) => check(Status::Warn, NAME, format!("could not test: {e:?}"), None),
    }
}

pub(super) fn policy_route(family: &str, flag: &str, any: &str, marks: &[u32]) -> Check {
    let name = format!("policy route ({family})");
    let rules = run("ip", &[flag, "rule", "show"]).unwrap_or_default();
    let found = fwmark_rules(&rules);
    let wanted = |m: u32| marks.is_empty() || marks.contains(&m);
    let example_mark = marks.first().copied().unwrap_or(1);
    let fix = |table: &str| {
        Some(format!(
            "ip {flag} rule add fwmark {example_mark:#x} lookup {table}; ip {flag} route add local {any} dev lo table {table} (or scripts/rules up)"
        ))
    };
    let Some((mark, table)) = found.iter().find(|(m, _)| wanted(*m)) else {
        return check(
            Status::Fail,
            &name,
            "no fwmark rule for the TPROXY mark",
            fix("100"),
        );
    };
    let routes = run("ip", &[flag, "route", "show", "table", table]).unwrap_or_default();
    if has_local_default(&routes) {
        check(
            Status::Pass,
            &name,
            format!("fwmark {mark:#x} -> table {table} with local default"),
            None,
        )
    } else {
        check(
            Status::Fail,
            &name,
            format!("fwmark {mark:#x} -> table {table}, but the table has no local default route"),
            fix(table),
        )
    }
}

pub(super) fn rules_point_at_port(cfg: &Config, rules: &[TproxyRule]) -> Check {
    const NAME: &str = "TPROXY rules";
    let fix = Some(format!("scripts/rules up --port {}", cfg.port));
    if rules.is_empty() {
        return check(Status::Fail, NAME, "no TPROXY rule in nft or iptables", fix);
    }
    let mut ports: Vec<u16> = rules.iter().map(|r| r.port).collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.contains(&cfg.port) {
        check(
            Status::Pass,
            NAME,
            format!("{} rule(s) divert to port {}", rules.len(), cfg.port),
            None,
        )
    } else {
        check(
            Status::Fail,
            NAME,
            format!(
                "rules divert to port(s) {ports:?}, not to --port {}",
                cfg.port
            ),
            fix,
        )
    }
}

pub(super) fn local_mark(cfg: &Config, skips: Option<Vec<(u32, u32)>>) -> Check {
    const NAME: &str = "own traffic";
    let Some(skips) = skips else {
        return check(
            Status::Pass,
            NAME,
            "this host's own traffic is not intercepted (no --local)",
            None,
        );
    };
    let fix =
        Some("run tproxyd with --mark equal to the rules' --proxy-mark (default 2)".to_string());
    match cfg.mark {
        None => check(
            Status::Fail,
            NAME,
            "the rules intercept this host's own traffic but tproxyd has no --mark: its upstream connections would loop back into it",
            fix,
        ),
        Some(m) if skips.iter().any(|(v, mask)| m & mask == *v) => check(
            Status::Pass,
            NAME,
            format!("--mark {m:#x} is let through by the local interception"),
            None,
        ),
        Some(m) => check(
            Status::Fail,
            NAME,
            format!(
                "--mark {m:#x} is not among the marks the local interception lets through {skips:x?}: connections would loop"
            ),
            fix,
        ),
    }
}

pub(super) fn spoof_return_path(cfg: &Config, paths: &SocketPaths) -> Check {
    const NAME: &str = "spoof-source return path";
    if !cfg.spoof_source {
        return check(Status::Pass, NAME, "not needed (no --spoof-source)", None);
    }
    if cfg.tcp && !paths.tcp {
        return check(
            Status::Fail,
            NAME,
            "no rule delivers TCP packets for transparent sockets on every interface: with --spoof-source the servers' answers to the clients' addresses would be forwarded past tproxyd",
            Some("scripts/rules up (its first rule), or: nft add rule inet tproxyd prerouting meta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set 0x1 accept (in a prerouting chain of priority mangle, before any interface match)".to_string()),
        );
    }
    if cfg.udp {
        // The rule must take the sockets tproxyd marks (--mark), and those
        // only: config makes --mark required with UDP spoofing.
        let mark = cfg.mark.unwrap_or(0);
        let takes_ours = paths
            .udp_marks
            .iter()
            .any(|&(v, m)| m != 0 && mark & m == v);
        if !takes_ours {
            return check(
                Status::Fail,
                NAME,
                format!(
                    "no rule delivers UDP packets for tproxyd's sockets (socket mark {mark:#x}) on every interface: with --spoof-source the servers' UDP answers to the clients' addresses would be forwarded past tproxyd"
                ),
                Some(format!(
                    "scripts/rules up --proxy-mark {mark:#x}, or: nft add rule inet tproxyd prerouting meta l4proto udp socket transparent 1 socket wildcard 0 socket mark and {mark:#x} == {mark:#x} meta mark set 0x1 accept (before any interface match)"
                )),
            );
        }
    }
    check(
        Status::Pass,
        NAME,
        "packets for tproxyd's transparent sockets are delivered locally on every interface",
        None,
    )
}

pub(super) fn listening(cfg: &Config) -> Check {
    const NAME: &str = "tproxyd listening";
    let ports: Vec<u16> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| read(p))
        .flat_map(|t| listening_ports(&t))
        .collect();
    if ports.contains(&cfg.port) {
        check(
            Status::Pass,
            NAME,
            format!("something listens on TCP port {}", cfg.port),
            None,
        )
    } else {
        check(
            Status::Warn,
            NAME,
            format!("nothing listens on TCP port {} yet", cfg.port),
            Some(format!("start tproxyd --port {}", cfg.port)),
        )
    }
}

pub(super) fn ip_forward() -> Check {
    const NAME: &str = "ip_forward";
    match read("/proc/sys/net/ipv4/ip_forward")
        .as_deref()
        .map(str::trim)
    {
        Some("1") => check(
            Status::Pass,
            NAME,
            "on: traffic that is not intercepted is routed",
            None,
        ),
        Some(_) => check(
            Status::Warn,
            NAME,
            "off: intercepted traffic still works, but if this host routes for others, the rest is dropped",
            Some(
                "sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 (only on a router)"
                    .into(),
            ),
        ),
        None => check(
            Status::Warn,
            NAME,
            "cannot read /proc/sys/net/ipv4/ip_forward",
            None,
        ),
    }
}

/// With src_valid_mark on, the reverse-path check routes the source with the
/// packet's mark, which the policy rule sends to the local table: every
/// intercepted packet then fails it, whatever rp_filter says (seen on 6.18
/// with rp_filter 0, 1 and 2). The kernel ORs `all` with each interface.
pub(super) fn rp_filter() -> Check {
    const NAME: &str = "rp_filter / src_valid_mark";
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv4/conf") else {
        return check(
            Status::Warn,
            NAME,
            "cannot read /proc/sys/net/ipv4/conf",
            None,
        );
    };
    let mut on: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|iface| iface != "default")
        .filter(|iface| {
            read(&format!("/proc/sys/net/ipv4/conf/{iface}/src_valid_mark"))
                .as_deref()
                .map(str::trim)
                == Some("1")
        })
        .collect();
    on.sort();
    let rp = read("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
    if on.is_empty() {
        check(
            Status::Pass,
            NAME,
            format!("src_valid_mark off, all.rp_filter={}", rp.trim()),
            None,
        )
    } else {
        check(
            Status::Fail,
            NAME,
            format!(
                "src_valid_mark=1 on {}: intercepted packets fail the reverse-path check",
                on.join(", ")
            ),
            Some(format!(
                "sysctl -w {}",
                on.iter()
                    .map(|i| format!("net.ipv4.conf.{i}.src_valid_mark=0"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        )
    }
}

pub(super) fn nofile(cfg: &Config) -> Check {
    const NAME: &str = "RLIMIT_NOFILE";
    let hard = sys::nofile_hard_limit().unwrap_or(0);
    let plan = match crate::budget::budget(cfg, hard) {
        Ok(p) => p,
        Err(e) => {
            return check(
                Status::Fail,
                NAME,
                format!("hard limit {hard}: {e}"),
                Some(
                    "raise LimitNOFILE in the unit (or ulimit -Hn), or lower --udp-max-sessions"
                        .into(),
                ),
            );
        }
    };
    let mut shares = Vec::new();
    if cfg.tcp {
        shares.push(format!("--max-conns {}", plan.max_conns));
    }
    if cfg.udp {
        shares.push(format!("{} UDP sessions", plan.udp_sessions));
    }
    let shares = shares.join(", ");
    if plan.needed <= hard {
        check(
            Status::Pass,
            NAME,
            format!(
                "hard limit {hard} covers the {} descriptors of {shares}",
                plan.needed
            ),
            None,
        )
    } else {
        check(
            Status::Warn,
            NAME,
            format!(
                "hard limit {hard} is below the {} descriptors of {shares}: accepting will pause",
                plan.needed
            ),
            Some(format!(
                "LimitNOFILE={} in the unit (or ulimit -Hn), or a lower --max-conns",
                plan.needed
            )),
        )
    }
}

pub(super) fn pipe_size(cfg: &Config, bulk: usize, exempt: bool) -> Check {
    const NAME: &str = "pipe-max-size";
    if !cfg.splice {
        return check(Status::Pass, NAME, "--no-splice: no pipes", None);
    }
    // The largest pipe this configuration asks for, bulk ones included.
    let (want, what) = if bulk > cfg.pipe_size {
        (bulk, "the bulk pipe size")
    } else {
        (cfg.pipe_size, "--pipe-size")
    };
    match read("/proc/sys/fs/pipe-max-size").and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(max) if max >= want => check(
            Status::Pass,
            NAME,
            format!("fs.pipe-max-size {max} >= {what} {want}"),
            None,
        ),
        Some(max) if exempt => check(
            Status::Pass,
            NAME,
            format!(
                "fs.pipe-max-size {max} < {what} {want}, but this process has CAP_SYS_RESOURCE"
            ),
            None,
        ),
        Some(max) => check(
            Status::Warn,
            NAME,
            format!(
                "fs.pipe-max-size {max} < {what} {want}: pipes stay smaller without CAP_SYS_RESOURCE"
            ),
            Some(format!("sysctl -w fs.pipe-max-size={want}")),
        ),
        None => check(
            Status::Warn,
            NAME,
            "cannot read /proc/sys/fs/pipe-max-size",
            None,
        ),
    }
}

/// How many pipes of `pipe_size` bytes one user may hold before the kernel
/// gives new pipes only two pages and refuses F_SETPIPE_SZ
/// (fs.pipe-user-pages-soft, in pages; 0 means no limit).
pub fn pipes_within_soft_limit(soft_pages: u64, pipe_size: usize) -> Option<u64> {
    (soft_pages != 0).then(|| soft_pages / (pipe_size as u64).div_ceil(4096).max(1))
}

pub(super) fn pipe_pages(cfg: &Config, bulk: usize, exempt: bool) -> Check {
    const NAME: &str = "pipe-user-pages-soft";
    if !cfg.splice {
        return check(Status::Pass, NAME, "--no-splice: no pipes", None);
    }
    let soft = read("/proc/sys/fs/pipe-user-pages-soft").and_then(|s| s.trim().parse::<u64>().ok());
    let busy = 2 * crate::budget::budget(cfg, sys::nofile_hard_limit().unwrap_or(0))
        .map_or(0, |b| b.max_conns) as u64;
    if bulk > cfg.pipe_size && !exempt && soft.is_some_and(|s| s != 0) {
        return check(
            Status::Warn,
            NAME,
            format!(
                "--bulk-pipe-size {bulk}: up to {} MiB of bulk pipes per worker count against this limit; past it an unprivileged tproxyd gets 8 KiB pipes",
                crate::tcp::pipe::BULK_BUDGET_BYTES >> 20
            ),
            Some("sysctl -w fs.pipe-user-pages-soft=0 (tune/sysctl.conf), or leave --bulk-pipe-size at its default".to_string()),
        );
    }
    match soft.map(|s| pipes_within_soft_limit(s, cfg.pipe_size)) {
        None => check(Status::Warn, NAME, "cannot read /proc/sys/fs/pipe-user-pages-soft", None),
        Some(None) => check(Status::Pass, NAME, "no per-user pipe page limit", None),
        Some(Some(n)) if n >= busy => check(
            Status::Pass,
            NAME,
            format!("room for {n} pipes of {} bytes, enough for {busy}", cfg.pipe_size),
            None,
        ),
        Some(Some(n)) => check(
            if exempt { Status::Pass } else { Status::Warn },
            NAME,
            format!(
                "room for {n} pipes of {} bytes per user, {busy} at --max-conns; past that an unprivileged tproxyd gets 8 KiB pipes{}",
                cfg.pipe_size,
                if exempt { " (this process is exempt: CAP_SYS_RESOURCE/CAP_SYS_ADMIN)" } else { "" }
            ),
            (!exempt).then(|| "sysctl -w fs.pipe-user-pages-soft=0 (tune/sysctl.conf), or a smaller --pipe-size".to_string()),
        ),
    }
}

/// New connections per second to one server ip:port below which the
/// source-port check warns: about what one tproxyd on two cores sustains in
/// the benches (`Connection: close`, ~10,000/s), so a host under it can run
/// out of source ports towards a single busy server before it runs out of
/// CPU.
pub const MIN_SUSTAINED_CONNS_PER_S: f64 = 10_000.0;
/// How long a closed connection's 4-tuple stays in TIME_WAIT on Linux
/// (TCP_TIMEWAIT_LEN, not a sysctl).
pub const TIME_WAIT_SECS: f64 = 60.0;

/// How long a source port stays taken towards one server ip:port after the
/// proxy closed first, and why: TIME_WAIT's 60 s, or with tcp_tw_reuse=1
/// and timestamps on, about tcp_tw_reuse_delay (1 s) before connect may
/// reuse it.
pub fn port_hold_secs(f: &PortFacts) -> (f64, String) {
    match (f.tw_reuse, f.timestamps) {
        (Some(1), Some(ts)) if ts != 0 => {
            let ms = f.tw_reuse_delay_ms.unwrap_or(1000).max(1);
            (
                ms as f64 / 1000.0,
                format!("tcp_tw_reuse=1 with timestamps: reused after {ms} ms"),
            )
        }
        (Some(1), _) => (
            TIME_WAIT_SECS,
            "TIME_WAIT 60 s: tcp_tw_reuse=1 but tcp_timestamps is off, so nothing is reused".into(),
        ),
        (Some(2), _) => (
            TIME_WAIT_SECS,
            "TIME_WAIT 60 s: tcp_tw_reuse=2 reuses only on loopback".into(),
        ),
        (Some(r), _) => (TIME_WAIT_SECS, format!("TIME_WAIT 60 s: tcp_tw_reuse={r}")),
        (None, _) => (TIME_WAIT_SECS, "TIME_WAIT 60 s".into()),
    }
}

/// Sustainable new connections/s to one server ip:port: local ports ÷ the
/// seconds each stays taken × source addresses.
pub fn sustainable_rate(ports: u32, hold_secs: f64, sources: usize) -> f64 {
    ports as f64 * sources.max(1) as f64 / hold_secs
}

/// The source-port arithmetic for this configuration (pure: config and
/// facts in, the check out).
pub fn source_ports(cfg: &Config, f: &PortFacts) -> Check {
    const NAME: &str = "source ports";
    if !cfg.tcp {
        return check(
            Status::Pass,
            NAME,
            "--no-tcp: no upstream connections",
            None,
        );
    }
    let Some((lo, hi)) = f.range else {
        return check(
            Status::Warn,
            NAME,
            "cannot read net.ipv4.ip_local_port_range",
            None,
        );
    };
    let ports = (hi - lo + 1).saturating_sub(reserved_ports_in(&f.reserved, lo, hi));
    let (hold, why) = port_hold_secs(f);
    let families: Vec<(&str, usize)> = if cfg.spoof_source {
        vec![("per client address", 1)]
    } else {
        let n = |v6: bool| cfg.sources.iter().filter(|ip| ip.is_ipv6() == v6).count();
        if n(false) == n(true) {
            vec![("", n(false))]
        } else {
            vec![("IPv4", n(false)), ("IPv6", n(true))]
        }
    };
    let mut worst = f64::INFINITY;
    let parts: Vec<String> = families
        .iter()
        .map(|(label, n)| {
            let rate = sustainable_rate(ports, hold, *n);
            worst = worst.min(rate);
            let what = match n {
                0 => "the host's address".to_string(),
                1 => "1 --source address".to_string(),
                n => format!("{n} --source addresses"),
            };
            let what = if cfg.spoof_source {
                "--spoof-source".to_string()
            } else {
                what
            };
            format!(
                "{}{} × {ports} ports ÷ {hold} s = {rate:.0} new connections/s",
                if label.is_empty() {
                    String::new()
                } else {
                    format!("{label}: ")
                },
                what,
            )
        })
        .collect();
    let detail = format!(
        "{} per server ip:port sustained, after a burst of {} (ports {lo}-{hi}; {why})",
        parts.join("; "),
        ports as u64
            * families
                .iter()
                .map(|(_, n)| (*n).max(1) as u64)
                .min()
                .unwrap_or(1),
    );
    if worst >= MIN_SUSTAINED_CONNS_PER_S {
        return check(Status::Pass, NAME, detail, None);
    }
    let mut fixes = Vec::new();
    if hold >= TIME_WAIT_SECS {
        fixes.push(if f.timestamps == Some(0) {
            "sysctl -w net.ipv4.tcp_timestamps=1 net.ipv4.tcp_tw_reuse=1 (tune/sysctl.conf): a port is reused after ~1 s instead of 60"
        } else {
            "sysctl -w net.ipv4.tcp_tw_reuse=1 (tune/sysctl.conf): a port is reused after ~1 s instead of 60"
        }
        .to_string());
    }
    if !cfg.spoof_source {
        fixes.push(format!(
            "more --source addresses of this host ({:.0}/s each)",
            sustainable_rate(ports, hold, 1)
        ));
    }
    if ports < 60_000 {
        fixes.push("a wider net.ipv4.ip_local_port_range (1024 65535)".to_string());
    }
    check(
        Status::Warn,
        NAME,
        format!(
            "{detail}: below {MIN_SUSTAINED_CONNS_PER_S:.0}/s, clients are reset once the ports run out"
        ),
        Some(fixes.join("; ")),
    )
}

pub(super) fn notrack(nft: &str, ipt: &str) -> Check {
    const NAME: &str = "NOTRACK";
    if has_notrack(nft) || has_notrack(ipt) {
        check(
            Status::Pass,
            NAME,
            "raw-table NOTRACK rules are in place",
            None,
        )
    } else {
        check(
            Status::Warn,
            NAME,
            "no NOTRACK rule: conntrack handles every intercepted packet",
            Some("tune/apply (installs tune/notrack.nft)".into()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_page_limit_arithmetic() {
        assert_eq!(pipes_within_soft_limit(0, 1 << 20), None);
        assert_eq!(pipes_within_soft_limit(16384, 64 * 1024), Some(1024));
        assert_eq!(pipes_within_soft_limit(16384, 1 << 20), Some(64));
        assert_eq!(pipes_within_soft_limit(16384, 5000), Some(8192));
    }

    fn facts(range: (u32, u32), tw_reuse: u32, timestamps: u32) -> PortFacts {
        PortFacts {
            range: Some(range),
            reserved: String::new(),
            tw_reuse: Some(tw_reuse),
            tw_reuse_delay_ms: Some(1000),
            timestamps: Some(timestamps),
        }
    }

    fn cfg(args: &[&str]) -> Config {
        let mut all = vec!["--port", "8080"];
        all.extend_from_slice(args);
        match crate::config::parse(all) {
            Ok(crate::config::Command::Run(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn source_port_arithmetic_default_sysctls_warn_with_the_fix() {
        // The kernel's defaults: 28,232 ports, each held 60 s.
        let c = source_ports(&cfg(&[]), &facts((32768, 60999), 2, 1));
        assert_eq!(c.status, Status::Warn, "{c}");
        assert!(c.detail.contains("= 471 new connections/s"), "{c}");
        assert!(c.detail.contains("after a burst of 28232"), "{c}");
        assert!(c.detail.contains("only on loopback"), "{c}");
        let fix = c.fix.as_deref().unwrap_or("");
        assert!(
            fix.contains("tcp_tw_reuse=1") && fix.contains("--source"),
            "{c}"
        );
        assert!(!c.to_string().contains('\n'));
    }

    #[test]
    fn source_port_arithmetic_counts_reuse_sources_and_families() {
        assert!((sustainable_rate(28232, 60.0, 1) - 470.53).abs() < 0.01);
        assert_eq!(
            sustainable_rate(100, 1.0, 0),
            100.0,
            "no --source: the host's one"
        );
        // tw_reuse=1 with timestamps: ~1 s, so 28,232/s: above the bar.
        let c = source_ports(&cfg(&[]), &facts((32768, 60999), 1, 1));
        assert_eq!(c.status, Status::Pass, "{c}");
        assert!(c.detail.contains("28232 new connections/s"), "{c}");
        // ... but not without timestamps.
        let c = source_ports(&cfg(&[]), &facts((32768, 60999), 1, 0));
        assert_eq!(c.status, Status::Warn, "{c}");
        assert!(c.fix.unwrap().contains("tcp_timestamps=1"));
        // A longer reuse delay (tcp_tw_reuse_delay, ms) counts.
        let mut f = facts((1024, 65535), 1, 1);
        f.tw_reuse_delay_ms = Some(10_000);
        let c = source_ports(&cfg(&[]), &f);
        assert!(c.detail.contains("6451 new connections/s"), "{c}");
        // Two IPv4 sources, none for IPv6: each family on its own, the
        // worse one decides.
        let two = cfg(&["--source", "198.19.0.1", "--source", "198.19.0.3"]);
        let c = source_ports(&two, &facts((1024, 65535), 2, 1));
        assert!(
            c.detail
                .contains("IPv4: 2 --source addresses × 64512 ports ÷ 60 s = 2150"),
            "{c}"
        );
        assert!(
            c.detail
                .contains("IPv6: the host's address × 64512 ports ÷ 60 s = 1075"),
            "{c}"
        );
        assert_eq!(c.status, Status::Warn);
        // Reserved ports are not the kernel's to pick.
        let mut f = facts((40000, 40039), 1, 1);
        f.reserved = "40000-40009".into();
        assert!(source_ports(&cfg(&[]), &f).detail.contains("30 ports"));
        // --spoof-source: per client address; --no-tcp: nothing to check.
        let c = source_ports(
            &cfg(&["--spoof-source", "--mark", "2"]),
            &facts((32768, 60999), 2, 1),
        );
        assert!(
            c.detail.starts_with("per client address: --spoof-source"),
            "{c}"
        );
        assert!(!c.fix.unwrap().contains("--source"));
        let c = source_ports(&cfg(&["--no-tcp"]), &PortFacts::default());
        assert_eq!(c.status, Status::Pass);
        let c = source_ports(&cfg(&[]), &PortFacts::default());
        assert_eq!(c.status, Status::Warn);
    }

    #[test]
    fn check_lines_are_one_line_each() {
        let c = check(Status::Fail, "x", "broken", Some("mend it".into()));
        assert_eq!(c.to_string(), "FAIL  x: broken -- fix: mend it");
        assert!(!c.to_string().contains('\n'));
    }
}
