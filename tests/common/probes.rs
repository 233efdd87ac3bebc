//! What a process holds and what a namespace's sockets look like, read from
//! outside: /proc (resident memory, descriptors, CPU time), `ss` in a
//! namespace, and one sample of metrics exposition text.
//!
//! Read-only: nothing here changes the process or namespace it looks at.

use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::lab::{Lab, Role};
use super::process::wait_until;

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

/// UDP sockets bound to `port` in a namespace.
pub fn udp_listeners(lab: &Lab, role: Role, port: u16) -> usize {
    let filter = format!("sport = :{port}");
    let out = lab.exec(role, &["ss", "-ulnH", &filter]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// tproxyd's descriptor count once it has settled: it opens a last few
/// (the control loop's signalfd, say) after it starts listening, and
/// connections that ended are reaped at the end of a loop turn.
pub fn settled_fd_count(pid: Pid) -> usize {
    let mut last = (proc_fd_count(pid), Instant::now());
    wait_until(Duration::from_secs(5), || {
        let now = proc_fd_count(pid);
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= Duration::from_millis(300)
    });
    last.0
}
