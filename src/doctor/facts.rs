//! What doctor learns from the host: files under /proc and /sys, the
//! host's own tools (`nft`, `iptables-save`, `ip`), a test socket.

use std::process::Command;

use super::parse::parse_port_range;

pub(super) fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
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

/// [`PortFacts`] of this host's namespace.
pub fn port_facts() -> PortFacts {
    let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
    PortFacts {
        range: read("/proc/sys/net/ipv4/ip_local_port_range").and_then(|s| parse_port_range(&s)),
        reserved: read("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default(),
        tw_reuse: num("/proc/sys/net/ipv4/tcp_tw_reuse").map(|n| n as u32),
        tw_reuse_delay_ms: num("/proc/sys/net/ipv4/tcp_tw_reuse_delay"),
        timestamps: num("/proc/sys/net/ipv4/tcp_timestamps").map(|n| n as u32),
    }
}
