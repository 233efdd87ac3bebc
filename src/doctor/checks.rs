//! doctor's checks: each a pure function of the configuration and the
//! host's [`Facts`], giving one [`Check`], the line it prints. [`ALL`] is
//! the list, in the order they are printed (the source-port check and its
//! arithmetic are in ports.rs).
//!
//! What must stay true:
//! - DOC-2 (mod.rs): a check that cannot tell is a WARN, never a silent
//!   PASS.
//! - DOC-5: a check reads nothing but its arguments (no file, no command,
//!   no socket): the same configuration and facts give the same line, so
//!   each is unit-tested with hand-made facts.
//! - DOC-6: a line is one line (no newline), `STATUS  name: detail`, then
//!   ` -- fix: ...` when there is a fix.

use std::fmt;

use super::facts::{Facts, Routing, Transparent};
use super::parse::*;
use super::ports::source_ports;
use crate::budget;
use crate::config::Config;

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

fn check(status: Status, name: &str, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check {
        status,
        name: name.to_string(),
        detail: detail.into(),
        fix,
    }
}

impl Check {
    pub(super) fn pass(name: &str, detail: impl Into<String>) -> Check {
        check(Status::Pass, name, detail, None)
    }

    pub(super) fn warn(name: &str, detail: impl Into<String>, fix: Option<String>) -> Check {
        check(Status::Warn, name, detail, fix)
    }

    pub(super) fn fail(name: &str, detail: impl Into<String>, fix: Option<String>) -> Check {
        check(Status::Fail, name, detail, fix)
    }
}

/// A check: the configuration and the facts in, the line out (DOC-5).
pub type CheckFn = fn(&Config, &Facts) -> Check;

/// Every check, in the order they are printed.
pub const ALL: [CheckFn; 15] = [
    kernel_support,
    capability,
    policy_route_v4,
    policy_route_v6,
    rules_point_at_port,
    local_mark,
    spoof_return_path,
    listening,
    ip_forward,
    rp_filter,
    nofile,
    pipe_size,
    pipe_pages,
    notrack,
    source_ports,
];

/// The TPROXY rules in the host's nft ruleset and iptables tables.
fn tproxy_rules(f: &Facts) -> Vec<TproxyRule> {
    let mut rules = nft_tproxy_rules(&f.nft);
    rules.extend(iptables_tproxy_rules(&f.iptables));
    rules
}

fn kernel_support(_: &Config, f: &Facts) -> Check {
    const NAME: &str = "kernel TPROXY support";
    if !tproxy_rules(f).is_empty() {
        return Check::pass(NAME, "a TPROXY rule is loaded, so the kernel has it");
    }
    if !f.tproxy_modules.is_empty() {
        return Check::pass(NAME, format!("{} present", f.tproxy_modules.join(", ")));
    }
    if let Some(cfg) = &f.kernel_config {
        let has = |opt: &str| {
            cfg.lines()
                .any(|l| l == format!("{opt}=y") || l == format!("{opt}=m"))
        };
        let nft = has("CONFIG_NFT_TPROXY") && has("CONFIG_NFT_SOCKET");
        let xt =
            has("CONFIG_NETFILTER_XT_TARGET_TPROXY") && has("CONFIG_NETFILTER_XT_MATCH_SOCKET");
        return match (nft, xt) {
            (true, true) => Check::pass(NAME, "nft tproxy + socket and xt_TPROXY + xt_socket"),
            (true, false) => Check::pass(
                NAME,
                "nft tproxy + socket (no xt_TPROXY: use the nft backend)",
            ),
            (false, true) => Check::pass(
                NAME,
                "xt_TPROXY + xt_socket (no nft tproxy: use the iptables backend)",
            ),
            (false, false) => Check::fail(
                NAME,
                "this kernel has neither nft tproxy nor xt_TPROXY",
                Some(
                    "a kernel built with CONFIG_NFT_TPROXY or CONFIG_NETFILTER_XT_TARGET_TPROXY"
                        .into(),
                ),
            ),
        };
    }
    Check::warn(
        NAME,
        "cannot tell (no /proc/config.gz or /boot/config, modules not loaded)",
        Some("modprobe nft_tproxy nft_socket (or xt_TPROXY xt_socket)".into()),
    )
}

fn capability(_: &Config, f: &Facts) -> Check {
    const NAME: &str = "IP_TRANSPARENT allowed";
    match &f.transparent {
        Transparent::Allowed => Check::pass(NAME, "this process may open transparent sockets"),
        Transparent::NoCapability => Check::fail(
            NAME,
            "refused: CAP_NET_ADMIN is missing",
            Some("run tproxyd as root or with AmbientCapabilities=CAP_NET_ADMIN".into()),
        ),
        Transparent::Untested(e) => Check::warn(NAME, format!("could not test: {e}"), None),
    }
}

fn policy_route_v4(_: &Config, f: &Facts) -> Check {
    policy_route("IPv4", "-4", "0.0.0.0/0", &f.v4, f)
}

fn policy_route_v6(_: &Config, f: &Facts) -> Check {
    policy_route("IPv6", "-6", "::/0", &f.v6, f)
}

/// A fwmark rule for the TPROXY rules' mark (any, if they set none), and a
/// local default route in the table it looks up.
fn policy_route(family: &str, flag: &str, any: &str, routing: &Routing, f: &Facts) -> Check {
    let name = format!("policy route ({family})");
    let marks: Vec<u32> = tproxy_rules(f).iter().filter_map(|r| r.mark).collect();
    let found = fwmark_rules(&routing.rules);
    let wanted = |m: u32| marks.is_empty() || marks.contains(&m);
    let example_mark = marks.first().copied().unwrap_or(1);
    let fix = |table: &str| {
        Some(format!(
            "ip {flag} rule add fwmark {example_mark:#x} lookup {table}; ip {flag} route add local {any} dev lo table {table} (or scripts/rules up)"
        ))
    };
    let Some((mark, table)) = found.iter().find(|(m, _)| wanted(*m)) else {
        return Check::fail(&name, "no fwmark rule for the TPROXY mark", fix("100"));
    };
    if has_local_default(routing.table(table)) {
        Check::pass(
            &name,
            format!("fwmark {mark:#x} -> table {table} with local default"),
        )
    } else {
        Check::fail(
            &name,
            format!("fwmark {mark:#x} -> table {table}, but the table has no local default route"),
            fix(table),
        )
    }
}

fn rules_point_at_port(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "TPROXY rules";
    let rules = tproxy_rules(f);
    let fix = Some(format!("scripts/rules up --port {}", cfg.port));
    if rules.is_empty() {
        return Check::fail(NAME, "no TPROXY rule in nft or iptables", fix);
    }
    let mut ports: Vec<u16> = rules.iter().map(|r| r.port).collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.contains(&cfg.port) {
        Check::pass(
            NAME,
            format!("{} rule(s) divert to port {}", rules.len(), cfg.port),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "rules divert to port(s) {ports:?}, not to --port {}",
                cfg.port
            ),
            fix,
        )
    }
}

fn local_mark(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "own traffic";
    let Some(skips) = local_skip_marks(&f.nft, &f.iptables) else {
        return Check::pass(
            NAME,
            "this host's own traffic is not intercepted (no --local)",
        );
    };
    let fix =
        Some("run tproxyd with --mark equal to the rules' --proxy-mark (default 2)".to_string());
    match cfg.mark {
        None => Check::fail(
            NAME,
            "the rules intercept this host's own traffic but tproxyd has no --mark: its upstream connections would loop back into it",
            fix,
        ),
        Some(m) if skips.iter().any(|(v, mask)| m & mask == *v) => Check::pass(
            NAME,
            format!("--mark {m:#x} is let through by the local interception"),
        ),
        Some(m) => Check::fail(
            NAME,
            format!(
                "--mark {m:#x} is not among the marks the local interception lets through {skips:x?}: connections would loop"
            ),
            fix,
        ),
    }
}

fn spoof_return_path(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "spoof-source return path";
    if !cfg.spoof_source {
        return Check::pass(NAME, "not needed (no --spoof-source)");
    }
    let paths = socket_paths(&f.nft, &f.iptables);
    if cfg.tcp && !paths.tcp {
        return Check::fail(NAME, "no rule delivers TCP packets for transparent sockets on every interface: with --spoof-source the servers' answers to the clients' addresses would be forwarded past tproxyd", Some("scripts/rules up (its first rule), or: nft add rule inet tproxyd prerouting meta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set 0x1 accept (in a prerouting chain of priority mangle, before any interface match)".to_string()));
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
            return Check::fail(
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
    Check::pass(
        NAME,
        "packets for tproxyd's transparent sockets are delivered locally on every interface",
    )
}

fn listening(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "tproxyd listening";
    let ports: Vec<u16> = f
        .proc_net_tcp
        .iter()
        .flat_map(|t| listening_ports(t))
        .collect();
    if ports.contains(&cfg.port) {
        Check::pass(NAME, format!("something listens on TCP port {}", cfg.port))
    } else {
        Check::warn(
            NAME,
            format!("nothing listens on TCP port {} yet", cfg.port),
            Some(format!("start tproxyd --port {}", cfg.port)),
        )
    }
}

fn ip_forward(_: &Config, f: &Facts) -> Check {
    const NAME: &str = "ip_forward";
    match f.ip_forward.as_deref().map(str::trim) {
        Some("1") => Check::pass(NAME, "on: traffic that is not intercepted is routed"),
        Some(_) => Check::warn(
            NAME,
            "off: intercepted traffic still works, but if this host routes for others, the rest is dropped",
            Some(
                "sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 (only on a router)"
                    .into(),
            ),
        ),
        None => Check::warn(NAME, "cannot read /proc/sys/net/ipv4/ip_forward", None),
    }
}

/// With src_valid_mark on, the reverse-path check routes the source with the
/// packet's mark, which the policy rule sends to the local table: every
/// intercepted packet then fails it, whatever rp_filter says (seen on 6.18
/// with rp_filter 0, 1 and 2). The kernel ORs `all` with each interface.
fn rp_filter(_: &Config, f: &Facts) -> Check {
    const NAME: &str = "rp_filter / src_valid_mark";
    let Some(ifaces) = &f.src_valid_mark else {
        return Check::warn(NAME, "cannot read /proc/sys/net/ipv4/conf", None);
    };
    let mut on: Vec<&str> = ifaces
        .iter()
        .filter(|(_, v)| v.as_deref().map(str::trim) == Some("1"))
        .map(|(iface, _)| iface.as_str())
        .collect();
    on.sort();
    let rp = f.rp_filter.as_deref().unwrap_or_default();
    if on.is_empty() {
        Check::pass(
            NAME,
            format!("src_valid_mark off, all.rp_filter={}", rp.trim()),
        )
    } else {
        Check::fail(
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

fn nofile(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "RLIMIT_NOFILE";
    let hard = f.nofile_hard.unwrap_or(0);
    let plan =
        match budget::budget(cfg, hard) {
            Ok(p) => p,
            Err(e) => {
                return Check::fail(NAME, format!("hard limit {hard}: {e}"), Some(
                    "raise LimitNOFILE in the unit (or ulimit -Hn), or lower --udp-max-sessions"
                        .into(),
                ));
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
        Check::pass(
            NAME,
            format!(
                "hard limit {hard} covers the {} descriptors of {shares}",
                plan.needed
            ),
        )
    } else {
        Check::warn(
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

fn pipe_size(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "pipe-max-size";
    if !cfg.splice {
        return Check::pass(NAME, "--no-splice: no pipes");
    }
    let (bulk, _) = budget::bulk_pipe_size(cfg, &f.pipes);
    let exempt = f.pipes.exempt;
    // The largest pipe this configuration asks for, bulk ones included.
    let (want, what) = if bulk > cfg.pipe_size {
        (bulk, "the bulk pipe size")
    } else {
        (cfg.pipe_size, "--pipe-size")
    };
    match f.pipes.max_size {
        Some(max) if max >= want => {
            Check::pass(NAME, format!("fs.pipe-max-size {max} >= {what} {want}"))
        }
        Some(max) if exempt => Check::pass(
            NAME,
            format!(
                "fs.pipe-max-size {max} < {what} {want}, but this process has CAP_SYS_RESOURCE"
            ),
        ),
        Some(max) => Check::warn(
            NAME,
            format!(
                "fs.pipe-max-size {max} < {what} {want}: pipes stay smaller without CAP_SYS_RESOURCE"
            ),
            Some(format!("sysctl -w fs.pipe-max-size={want}")),
        ),
        None => Check::warn(NAME, "cannot read /proc/sys/fs/pipe-max-size", None),
    }
}

/// How many pipes of `pipe_size` bytes one user may hold before the kernel
/// gives new pipes only two pages and refuses F_SETPIPE_SZ
/// (fs.pipe-user-pages-soft, in pages; 0 means no limit).
pub fn pipes_within_soft_limit(soft_pages: u64, pipe_size: usize) -> Option<u64> {
    (soft_pages != 0).then(|| soft_pages / (pipe_size as u64).div_ceil(4096).max(1))
}

fn pipe_pages(cfg: &Config, f: &Facts) -> Check {
    const NAME: &str = "pipe-user-pages-soft";
    if !cfg.splice {
        return Check::pass(NAME, "--no-splice: no pipes");
    }
    let (bulk, _) = budget::bulk_pipe_size(cfg, &f.pipes);
    let exempt = f.pipes.exempt;
    let soft = f.pipes.soft_pages;
    let busy =
        2 * budget::budget(cfg, f.nofile_hard.unwrap_or(0)).map_or(0, |b| b.max_conns) as u64;
    if bulk > cfg.pipe_size && !exempt && soft.is_some_and(|s| s != 0) {
        return Check::warn(NAME, format!(
                "--bulk-pipe-size {bulk}: up to {} MiB of bulk pipes per worker count against this limit; past it an unprivileged tproxyd gets 8 KiB pipes",
                crate::tcp::pipe::BULK_BUDGET_BYTES >> 20
            ), Some("sysctl -w fs.pipe-user-pages-soft=0 (tune/sysctl.conf), or leave --bulk-pipe-size at its default".to_string()));
    }
    match soft.map(|s| pipes_within_soft_limit(s, cfg.pipe_size)) {
        None => Check::warn(NAME, "cannot read /proc/sys/fs/pipe-user-pages-soft", None),
        Some(None) => Check::pass(NAME, "no per-user pipe page limit"),
        Some(Some(n)) if n >= busy => Check::pass(NAME, format!("room for {n} pipes of {} bytes, enough for {busy}", cfg.pipe_size)),
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

fn notrack(_: &Config, f: &Facts) -> Check {
    const NAME: &str = "NOTRACK";
    if has_notrack(&f.nft) || has_notrack(&f.iptables) {
        Check::pass(NAME, "raw-table NOTRACK rules are in place")
    } else {
        Check::warn(
            NAME,
            "no NOTRACK rule: conntrack handles every intercepted packet",
            Some("tune/apply (installs tune/notrack.nft)".into()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{cfg, cfg_of};

    #[test]
    fn pipe_page_limit_arithmetic() {
        assert_eq!(pipes_within_soft_limit(0, 1 << 20), None);
        assert_eq!(pipes_within_soft_limit(16384, 64 * 1024), Some(1024));
        assert_eq!(pipes_within_soft_limit(16384, 1 << 20), Some(64));
        assert_eq!(pipes_within_soft_limit(16384, 5000), Some(8192));
    }

    #[test]
    fn check_lines_are_one_line_each() {
        let c = check(Status::Fail, "x", "broken", Some("mend it".into()));
        assert_eq!(c.to_string(), "FAIL  x: broken -- fix: mend it");
        assert!(!c.to_string().contains('\n'));
    }

    /// Facts with this nft ruleset, nothing else known.
    fn with_nft(nft: &str) -> Facts {
        Facts {
            nft: nft.to_string(),
            ..Facts::default()
        }
    }

    /// One check's status and line, for the assertions below.
    fn run(check: CheckFn, cfg: &Config, f: &Facts) -> (Status, String) {
        let c = check(cfg, f);
        let line = c.to_string();
        assert!(!line.contains('\n'), "DOC-6: {line}");
        (c.status, line)
    }

    const DIVERT_8080: &str = "table inet t {\n\tchain p {\n\t\tmeta l4proto tcp meta mark set 0x00000001 tproxy to :8080 accept\n\t}\n}\n";

    #[test]
    fn kernel_support_from_a_rule_a_module_or_the_kernel_config() {
        let c = cfg(&[]);
        let (st, line) = run(kernel_support, &c, &with_nft(DIVERT_8080));
        assert_eq!(st, Status::Pass, "{line}");
        assert!(line.contains("a TPROXY rule is loaded"), "{line}");
        let modules = Facts {
            tproxy_modules: vec!["xt_TPROXY"],
            ..Facts::default()
        };
        let (st, line) = run(kernel_support, &c, &modules);
        assert_eq!(
            (st, line.contains("xt_TPROXY present")),
            (Status::Pass, true)
        );
        let config = |text: &str| Facts {
            kernel_config: Some(text.to_string()),
            ..Facts::default()
        };
        let nft_only = config("CONFIG_NFT_TPROXY=m\nCONFIG_NFT_SOCKET=y\n");
        let (st, line) = run(kernel_support, &c, &nft_only);
        assert_eq!(st, Status::Pass);
        assert!(line.contains("use the nft backend"), "{line}");
        let xt_only =
            config("CONFIG_NETFILTER_XT_TARGET_TPROXY=m\nCONFIG_NETFILTER_XT_MATCH_SOCKET=m\n");
        let (st, line) = run(kernel_support, &c, &xt_only);
        assert_eq!(st, Status::Pass);
        assert!(line.contains("use the iptables backend"), "{line}");
        // Half of what nft needs is not nft support.
        let (st, line) = run(
            kernel_support,
            &c,
            &config("CONFIG_NFT_TPROXY=m\n# CONFIG_NFT_SOCKET is not set\n"),
        );
        assert_eq!(st, Status::Fail, "{line}");
        assert!(line.contains("-- fix: a kernel built with"), "{line}");
        // Nothing to go on: it cannot tell (DOC-2).
        let (st, line) = run(kernel_support, &c, &Facts::default());
        assert_eq!(st, Status::Warn, "{line}");
        assert!(line.contains("modprobe nft_tproxy"), "{line}");
    }

    #[test]
    fn capability_as_the_test_socket_found_it() {
        let c = cfg(&[]);
        let t = |transparent| Facts {
            transparent,
            ..Facts::default()
        };
        assert_eq!(
            run(capability, &c, &t(Transparent::Allowed)).0,
            Status::Pass
        );
        let (st, line) = run(capability, &c, &t(Transparent::NoCapability));
        assert_eq!(st, Status::Fail);
        assert!(
            line.contains("CAP_NET_ADMIN is missing -- fix: run tproxyd as root"),
            "{line}"
        );
        let (st, line) = run(
            capability,
            &c,
            &t(Transparent::Untested("Other(\"bind\", x)".into())),
        );
        assert_eq!(st, Status::Warn);
        assert!(
            line.ends_with("could not test: Other(\"bind\", x)"),
            "{line}"
        );
        assert_eq!(
            run(capability, &c, &Facts::default()).0,
            Status::Warn,
            "not probed"
        );
    }

    #[test]
    fn policy_route_needs_the_rules_mark_and_a_local_default_in_its_table() {
        let c = cfg(&[]);
        let routing = |rules: &str, table: &str, routes: &str| Routing {
            rules: rules.to_string(),
            tables: vec![(table.to_string(), routes.to_string())],
        };
        let rule =
            "0:\tfrom all lookup local\n32765:\tfrom all fwmark 0x1/0x1 lookup 100 proto 244\n";
        let local = "local default dev lo proto 244 scope host \n";
        let mut f = with_nft(DIVERT_8080);
        f.v4 = routing(rule, "100", local);
        let (st, line) = run(policy_route_v4, &c, &f);
        assert_eq!(st, Status::Pass, "{line}");
        assert!(
            line.contains("(IPv4): fwmark 0x1 -> table 100 with local default"),
            "{line}"
        );
        // IPv6 is judged on its own facts: none here.
        let (st, line) = run(policy_route_v6, &c, &f);
        assert_eq!(st, Status::Fail, "{line}");
        assert!(
            line.contains("(IPv6): no fwmark rule for the TPROXY mark"),
            "{line}"
        );
        assert!(
            line.contains("ip -6 rule add fwmark 0x1 lookup 100; ip -6 route add local ::/0"),
            "{line}"
        );
        // The table lacks the route.
        f.v6 = routing(rule, "100", "");
        let (st, line) = run(policy_route_v6, &c, &f);
        assert_eq!(st, Status::Fail);
        assert!(
            line.contains("but the table has no local default route"),
            "{line}"
        );
        // A fwmark rule for some other mark is not the rules' one.
        f.v4 = routing("32765:\tfrom all fwmark 0x5 lookup 7\n", "7", local);
        let (st, line) = run(policy_route_v4, &c, &f);
        assert_eq!(st, Status::Fail, "{line}");
        // A rule that sets its mark under a mask (--fwmark 0x10/0x30) asks
        // for that mark's fwmark rule, not any.
        f.nft = DIVERT_8080.replace(
            "meta mark set 0x00000001",
            "meta mark set meta mark & 0xffffffdf | 0x00000010",
        );
        f.v4 = routing(rule, "100", local);
        let (st, line) = run(policy_route_v4, &c, &f);
        assert_eq!(st, Status::Fail, "{line}");
        assert!(
            line.contains("ip -4 rule add fwmark 0x10 lookup 100"),
            "{line}"
        );
        let masked = "32765:\tfrom all fwmark 0x10/0x30 lookup 100 proto 244\n";
        f.v4 = routing(masked, "100", local);
        assert_eq!(run(policy_route_v4, &c, &f).0, Status::Pass);
        // No TPROXY rule sets a mark: any fwmark rule will do.
        f.nft = DIVERT_8080.replace("meta mark set 0x00000001 ", "");
        assert_eq!(run(policy_route_v4, &c, &f).0, Status::Pass);
    }

    #[test]
    fn rules_must_divert_to_the_port() {
        let (st, line) = run(rules_point_at_port, &cfg(&[]), &with_nft(DIVERT_8080));
        assert_eq!(st, Status::Pass);
        assert!(line.contains("1 rule(s) divert to port 8080"), "{line}");
        let (st, line) = run(
            rules_point_at_port,
            &cfg_of(vec!["--port", "9090"]),
            &with_nft(DIVERT_8080),
        );
        assert_eq!(st, Status::Fail);
        assert!(
            line.contains("rules divert to port(s) [8080], not to --port 9090"),
            "{line}"
        );
        assert!(
            line.ends_with("-- fix: scripts/rules up --port 9090"),
            "{line}"
        );
        let ipt = Facts {
            iptables: "-A TPROXYD_DIVERT -p tcp -j TPROXY --on-port 8080 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1\n".into(),
            ..Facts::default()
        };
        assert_eq!(run(rules_point_at_port, &cfg(&[]), &ipt).0, Status::Pass);
        let (st, line) = run(rules_point_at_port, &cfg(&[]), &Facts::default());
        assert_eq!(st, Status::Fail);
        assert!(line.contains("no TPROXY rule in nft or iptables"), "{line}");
    }

    const LOCAL: &str = "table inet tproxyd {\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t\tmeta mark & 0x00000002 == 0x00000002 counter packets 0 bytes 0 return\n\t}\n}\n";

    #[test]
    fn own_traffic_needs_a_mark_the_local_interception_lets_through() {
        let (st, line) = run(local_mark, &cfg(&[]), &Facts::default());
        assert_eq!(st, Status::Pass);
        assert!(line.contains("not intercepted (no --local)"), "{line}");
        let local = with_nft(LOCAL);
        let (st, line) = run(local_mark, &cfg(&[]), &local);
        assert_eq!(st, Status::Fail);
        assert!(line.contains("tproxyd has no --mark"), "{line}");
        let (st, line) = run(local_mark, &cfg(&["--mark", "2"]), &local);
        assert_eq!(st, Status::Pass);
        assert!(line.contains("--mark 0x2 is let through"), "{line}");
        // More bits than the mask asks for are fine; the wrong bit is not.
        assert_eq!(
            run(local_mark, &cfg(&["--mark", "0x6"]), &local).0,
            Status::Pass
        );
        let (st, line) = run(local_mark, &cfg(&["--mark", "4"]), &local);
        assert_eq!(st, Status::Fail);
        assert!(line.contains("--mark 0x4 is not among"), "{line}");
    }

    #[test]
    fn spoof_source_needs_socket_rules_on_every_interface() {
        let spoof = cfg(&["--spoof-source", "--mark", "2"]);
        assert_eq!(
            run(spoof_return_path, &cfg(&[]), &Facts::default()).0,
            Status::Pass
        );
        let (st, line) = run(spoof_return_path, &spoof, &Facts::default());
        assert_eq!(st, Status::Fail);
        assert!(line.contains("no rule delivers TCP packets"), "{line}");
        let tcp = "table inet tproxyd {\n\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\tmeta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set meta mark | 0x00000001 accept\n\t}\n}\n";
        let (st, line) = run(spoof_return_path, &spoof, &with_nft(tcp));
        assert_eq!(st, Status::Fail);
        assert!(
            line.contains("no rule delivers UDP packets for tproxyd's sockets (socket mark 0x2)"),
            "{line}"
        );
        assert_eq!(
            run(
                spoof_return_path,
                &cfg(&["--spoof-source", "--no-udp"]),
                &with_nft(tcp)
            )
            .0,
            Status::Pass
        );
        let both = tcp.replace(
            "\t}\n}\n",
            "\t\tmeta l4proto udp socket transparent 1 socket wildcard 0 socket mark & 0x00000002 == 0x00000002 meta mark set meta mark | 0x00000001 accept\n\t}\n}\n",
        );
        let (st, line) = run(spoof_return_path, &spoof, &with_nft(&both));
        assert_eq!(st, Status::Pass, "{line}");
        // A UDP rule for another mark does not take tproxyd's sockets.
        let (st, _) = run(
            spoof_return_path,
            &cfg(&["--spoof-source", "--mark", "4"]),
            &with_nft(&both),
        );
        assert_eq!(st, Status::Fail);
    }

    #[test]
    fn listening_on_the_port_in_either_family() {
        let header = "  sl  local_address rem_address   st\n";
        let f = Facts {
            proc_net_tcp: vec![
                format!("{header}   0: 0100007F:0050 00000000:0000 0A 0\n"),
                format!(
                    "{header}   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 0\n"
                ),
            ],
            ..Facts::default()
        };
        let (st, line) = run(listening, &cfg(&[]), &f);
        assert_eq!(st, Status::Pass);
        assert!(
            line.contains("something listens on TCP port 8080"),
            "{line}"
        );
        let (st, line) = run(listening, &cfg_of(vec!["--port", "81"]), &f);
        assert_eq!(st, Status::Warn);
        assert!(line.ends_with("-- fix: start tproxyd --port 81"), "{line}");
    }

    #[test]
    fn ip_forward_on_off_or_unknown() {
        let f = |v: Option<&str>| Facts {
            ip_forward: v.map(str::to_string),
            ..Facts::default()
        };
        assert_eq!(run(ip_forward, &cfg(&[]), &f(Some("1\n"))).0, Status::Pass);
        let (st, line) = run(ip_forward, &cfg(&[]), &f(Some("0\n")));
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("fix: sysctl -w net.ipv4.ip_forward=1"),
            "{line}"
        );
        let (st, line) = run(ip_forward, &cfg(&[]), &f(None));
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("cannot read /proc/sys/net/ipv4/ip_forward"),
            "{line}"
        );
    }

    #[test]
    fn src_valid_mark_on_any_interface_fails_the_reverse_path_check() {
        let f = |ifaces: &[(&str, Option<&str>)]| Facts {
            src_valid_mark: Some(
                ifaces
                    .iter()
                    .map(|(i, v)| (i.to_string(), v.map(str::to_string)))
                    .collect(),
            ),
            rp_filter: Some("2\n".into()),
            ..Facts::default()
        };
        let (st, line) = run(
            rp_filter,
            &cfg(&[]),
            &f(&[("all", Some("0\n")), ("lo", None)]),
        );
        assert_eq!(st, Status::Pass);
        assert!(
            line.ends_with("src_valid_mark off, all.rp_filter=2"),
            "{line}"
        );
        let on = f(&[
            ("eth1", Some("1\n")),
            ("all", Some("0\n")),
            ("eth0", Some("1\n")),
        ]);
        let (st, line) = run(rp_filter, &cfg(&[]), &on);
        assert_eq!(st, Status::Fail);
        assert!(line.contains("src_valid_mark=1 on eth0, eth1:"), "{line}");
        assert!(
            line.ends_with("-- fix: sysctl -w net.ipv4.conf.eth0.src_valid_mark=0 net.ipv4.conf.eth1.src_valid_mark=0"),
            "{line}"
        );
        let (st, line) = run(rp_filter, &cfg(&[]), &Facts::default());
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("cannot read /proc/sys/net/ipv4/conf"),
            "{line}"
        );
    }

    #[test]
    fn nofile_against_the_budget() {
        let f = |hard| Facts {
            nofile_hard: Some(hard),
            ..Facts::default()
        };
        let (st, line) = run(nofile, &cfg(&[]), &f(20_000));
        assert_eq!(st, Status::Pass, "{line}");
        assert!(line.contains("hard limit 20000 covers the"), "{line}");
        let (st, line) = run(nofile, &cfg(&["--max-conns", "100000"]), &f(20_000));
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("accepting will pause -- fix: LimitNOFILE="),
            "{line}"
        );
        let (st, line) = run(nofile, &cfg(&["--udp-max-sessions", "20000"]), &f(20_000));
        assert_eq!(st, Status::Fail);
        assert!(
            line.contains("hard limit 20000: --udp-max-sessions 20000 needs"),
            "{line}"
        );
    }

    fn pipes(exempt: bool, soft_pages: Option<u64>, max_size: Option<usize>) -> Facts {
        Facts {
            pipes: budget::PipeLimits {
                exempt,
                soft_pages,
                max_size,
            },
            nofile_hard: Some(20_000),
            ..Facts::default()
        }
    }

    #[test]
    fn pipe_max_size_against_the_largest_pipe_asked_for() {
        let mib = 1 << 20;
        let c = cfg(&[]);
        assert_eq!(
            run(pipe_size, &cfg(&["--no-splice"]), &pipes(false, None, None)).0,
            Status::Pass
        );
        // Exempt: bulk pipes of 1 MiB are the largest.
        let (st, line) = run(pipe_size, &c, &pipes(true, Some(16384), Some(mib)));
        assert_eq!(st, Status::Pass);
        assert!(
            line.contains("fs.pipe-max-size 1048576 >= the bulk pipe size 1048576"),
            "{line}"
        );
        let (st, line) = run(pipe_size, &c, &pipes(true, Some(16384), Some(65536)));
        assert_eq!(st, Status::Pass);
        assert!(
            line.contains("but this process has CAP_SYS_RESOURCE"),
            "{line}"
        );
        // Not exempt: no bulk pipes by default, --pipe-size is the largest.
        let (st, line) = run(pipe_size, &c, &pipes(false, Some(16384), Some(65536)));
        assert_eq!(st, Status::Pass);
        assert!(line.contains(">= --pipe-size 65536"), "{line}");
        let (st, line) = run(
            pipe_size,
            &cfg(&["--pipe-size", "256k"]),
            &pipes(false, Some(16384), Some(65536)),
        );
        assert_eq!(st, Status::Warn);
        assert!(
            line.ends_with("-- fix: sysctl -w fs.pipe-max-size=262144"),
            "{line}"
        );
        let (st, line) = run(pipe_size, &c, &pipes(false, Some(16384), None));
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("cannot read /proc/sys/fs/pipe-max-size"),
            "{line}"
        );
    }

    #[test]
    fn pipe_pages_against_the_pipes_at_max_conns() {
        let c = cfg(&["--max-conns", "100"]);
        assert_eq!(
            run(
                pipe_pages,
                &cfg(&["--no-splice"]),
                &pipes(false, None, None)
            )
            .0,
            Status::Pass
        );
        let (st, line) = run(pipe_pages, &c, &pipes(false, Some(0), Some(1 << 20)));
        assert_eq!(st, Status::Pass);
        assert!(line.contains("no per-user pipe page limit"), "{line}");
        // 16384 pages hold 1024 pipes of 64 KiB: enough for 200.
        let (st, line) = run(pipe_pages, &c, &pipes(false, Some(16384), Some(1 << 20)));
        assert_eq!(st, Status::Pass);
        assert!(
            line.contains("room for 1024 pipes of 65536 bytes, enough for 200"),
            "{line}"
        );
        // Not for 2 x 1000 at --max-conns 1000, unless exempt.
        let many = cfg(&["--max-conns", "1000"]);
        let (st, line) = run(pipe_pages, &many, &pipes(false, Some(16384), Some(1 << 20)));
        assert_eq!(st, Status::Warn);
        assert!(line.contains("2000 at --max-conns"), "{line}");
        assert!(
            line.contains("-- fix: sysctl -w fs.pipe-user-pages-soft=0"),
            "{line}"
        );
        let (st, line) = run(pipe_pages, &many, &pipes(true, Some(16384), Some(1 << 20)));
        assert_eq!(st, Status::Pass);
        assert!(line.contains("(this process is exempt"), "{line}");
        // Bulk pipes asked for by an unprivileged process under the limit.
        let bulk = cfg(&["--bulk-pipe-size", "1m"]);
        let (st, line) = run(pipe_pages, &bulk, &pipes(false, Some(16384), Some(1 << 20)));
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("--bulk-pipe-size 1048576: up to 32 MiB of bulk pipes"),
            "{line}"
        );
        let (st, line) = run(pipe_pages, &c, &pipes(false, None, None));
        assert_eq!(st, Status::Warn);
        assert!(
            line.contains("cannot read /proc/sys/fs/pipe-user-pages-soft"),
            "{line}"
        );
    }

    #[test]
    fn notrack_rules_in_either_backend() {
        let (st, line) = run(notrack, &cfg(&[]), &Facts::default());
        assert_eq!(st, Status::Warn);
        assert!(
            line.ends_with("-- fix: tune/apply (installs tune/notrack.nft)"),
            "{line}"
        );
        let ipt = Facts {
            iptables: "-A PREROUTING -p tcp -j CT --notrack\n".into(),
            ..Facts::default()
        };
        assert_eq!(run(notrack, &cfg(&[]), &ipt).0, Status::Pass);
    }

    #[test]
    fn every_check_answers_on_a_host_that_told_nothing() {
        // DOC-2: nothing known is never a crash, and every line is one line.
        for check in ALL {
            run(check, &cfg(&[]), &Facts::default());
        }
    }
}
