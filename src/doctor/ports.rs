//! The source-port arithmetic: how many new connections per second one
//! server ip:port can take before the upstream sockets' ports run out, from
//! the port range, the reserved ports, TIME_WAIT reuse and the --source
//! addresses; and the doctor check that warns below
//! [`MIN_SUSTAINED_CONNS_PER_S`].
//!
//! What must stay true: DOC-5 (checks.rs): pure, the facts come in as
//! [`PortFacts`].

use super::checks::Check;
use super::facts::{Facts, PortFacts};
use super::parse::reserved_ports_in;
use crate::config::Config;

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
pub(super) fn source_ports(cfg: &Config, facts: &Facts) -> Check {
    const NAME: &str = "source ports";
    let f = &facts.ports;
    if !cfg.tcp {
        return Check::pass(NAME, "--no-tcp: no upstream connections");
    }
    let Some((lo, hi)) = f.range else {
        return Check::warn(NAME, "cannot read net.ipv4.ip_local_port_range", None);
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
        return Check::pass(NAME, detail);
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
    Check::warn(
        NAME,
        format!(
            "{detail}: below {MIN_SUSTAINED_CONNS_PER_S:.0}/s, clients are reset once the ports run out"
        ),
        Some(fixes.join("; ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::cfg;
    use crate::doctor::checks::Status;

    /// Facts with these port sysctls, nothing else known.
    fn facts(range: (u32, u32), tw_reuse: u32, timestamps: u32) -> Facts {
        Facts {
            ports: PortFacts {
                range: Some(range),
                reserved: String::new(),
                tw_reuse: Some(tw_reuse),
                tw_reuse_delay_ms: Some(1000),
                timestamps: Some(timestamps),
            },
            ..Facts::default()
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
        f.ports.tw_reuse_delay_ms = Some(10_000);
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
        f.ports.reserved = "40000-40009".into();
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
        let c = source_ports(&cfg(&["--no-tcp"]), &Facts::default());
        assert_eq!(c.status, Status::Pass);
        let c = source_ports(&cfg(&[]), &Facts::default());
        assert_eq!(c.status, Status::Warn);
    }
}
