//! The descriptor and pipe budget: how RLIMIT_NOFILE is shared between TCP
//! connections and UDP sessions, and how large bulk pipes may be, decided
//! once at start by the daemon and reported the same way by `doctor`. Pure:
//! the descriptor limit comes in as a number, the pipe limits as
//! [`PipeLimits`] (which [`PipeLimits::of_this_process`] reads from /proc).
//!
//! What must stay true:
//! - FD-1: UDP never holds more than its share (`2 * udp_sessions`: each
//!   session a socket, and at most as many reply sockets), so the
//!   descriptors TCP's share needs are never taken by UDP; when both run,
//!   that share is at most three quarters of what the limit leaves.
//! - FD-2: a configuration the limit cannot hold is refused (one line,
//!   exit 2): an explicit `--udp-max-sessions` whose share does not fit.
//!   A default is reduced to fit, and says so. TCP may be given more
//!   `--max-conns` than descriptors (it waits for descriptors rather than
//!   failing, WRK-5): that is a warning, not an error.

use crate::config::Config;

/// Descriptors kept back for listeners, pollers, wakers, pooled pipes and
/// logging.
pub const RESERVED_FDS: u64 = 256;
/// Descriptors one TCP connection holds while it moves bytes: two sockets
/// and, on average, one pipe of two fds (a connection moving both ways at
/// once holds two pipes; an idle one none).
pub const FDS_PER_CONN: u64 = 4;
/// Descriptors one UDP session may hold: its upstream socket, and a reply
/// socket (the reply-socket table is as large as the session table).
pub const FDS_PER_UDP_SESSION: u64 = 2;

/// What the limit allows this configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// `--max-conns`, given or derived.
    pub max_conns: usize,
    /// UDP sessions, all workers together (0 without UDP).
    pub udp_sessions: usize,
    /// Descriptors the configuration may hold at its limits.
    pub needed: u64,
    /// Why the UDP sessions are fewer than the default, if they are.
    pub udp_reduced: Option<String>,
}

/// The budget for `cfg` under a descriptor limit of `nofile`, or the one
/// line that says why it cannot be held (FD-2).
pub fn budget(cfg: &Config, nofile: u64) -> Result<Budget, String> {
    let usable = nofile.saturating_sub(RESERVED_FDS);
    let per = FDS_PER_UDP_SESSION;
    let (udp_sessions, udp_reduced) = if !cfg.udp {
        (0, None)
    } else {
        // FD-1: next to TCP, UDP may have at most three quarters; by
        // default a quarter, so TCP keeps most of a small limit.
        let (cap, default_cap) = if cfg.tcp {
            (usable / 4 * 3, usable / 4)
        } else {
            (usable, usable)
        };
        let want = cfg.udp_max_sessions as u64;
        let workers = cfg.udp_workers as u64;
        if cfg.udp_max_sessions_given {
            if want * per > cap {
                return Err(format!(
                    "--udp-max-sessions {want} needs up to {} descriptors ({per} each), more than the {cap} RLIMIT_NOFILE {nofile} leaves UDP{}: give at most {} or raise the limit",
                    want * per,
                    if cfg.tcp { " beside TCP" } else { "" },
                    cap / per
                ));
            }
            (want, None)
        } else {
            let fit = (default_cap / per).min(want);
            if fit < workers {
                return Err(format!(
                    "RLIMIT_NOFILE {nofile} leaves no room for {workers} UDP worker(s): raise the limit or add --no-udp"
                ));
            }
            let why = (fit < want).then(|| {
                format!(
                    "UDP sessions limited to {fit} (from {want}): {} of RLIMIT_NOFILE {nofile}, {per} descriptors each",
                    if cfg.tcp { "a quarter" } else { "all" }
                )
            });
            (fit, why)
        }
    };
    let udp_fds = udp_sessions * per;
    let max_conns = match cfg.max_conns {
        Some(m) => m,
        None if cfg.tcp => (usable.saturating_sub(udp_fds) / FDS_PER_CONN).max(1) as usize,
        None => 0,
    };
    let tcp_fds = if cfg.tcp {
        max_conns as u64 * FDS_PER_CONN
    } else {
        0
    };
    Ok(Budget {
        max_conns,
        udp_sessions: udp_sessions as usize,
        needed: tcp_fds + udp_fds + RESERVED_FDS,
        udp_reduced,
    })
}

/// One UDP worker's share of `total` sessions (at least one each).
pub fn per_udp_worker(total: usize, workers: usize) -> usize {
    total.div_ceil(workers.max(1)).max(1)
}

/// The bulk pipe size when `--bulk-pipe-size` is not given (pipe.rs PIPE-4),
/// and why. 1 MiB where big pipes cost nothing in the per-user pipe
/// accounting: tproxyd is exempt from fs.pipe-user-pages-soft
/// (CAP_SYS_RESOURCE or CAP_SYS_ADMIN), or that limit is off (0) and
/// fs.pipe-max-size allows 1 MiB. Otherwise no bulk pipes (the ordinary
/// size): an unprivileged tproxyd would spend the user's pipe pages (64 MiB
/// by default) on a few dozen bulk pipes, and every pipe after that would
/// get two pages.
pub fn default_bulk_pipe_size(
    pipe_size: usize,
    exempt: bool,
    soft_pages: Option<u64>,
    pipe_max: Option<usize>,
) -> (usize, &'static str) {
    let bulk = crate::config::DEFAULT_BULK_PIPE_SIZE;
    if pipe_size >= bulk {
        (pipe_size, "--pipe-size is already that large")
    } else if exempt {
        (bulk, "exempt from fs.pipe-user-pages-soft")
    } else if soft_pages == Some(0) && pipe_max.is_some_and(|m| m >= bulk) {
        (bulk, "fs.pipe-user-pages-soft is 0")
    } else {
        (
            pipe_size,
            "off: fs.pipe-user-pages-soft applies to this process (tune/sysctl.conf sets it to 0)",
        )
    }
}

/// What this host allows pipes, as the bulk pipe size depends on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipeLimits {
    /// The process is exempt from fs.pipe-user-pages-soft (CAP_SYS_RESOURCE
    /// or CAP_SYS_ADMIN).
    pub exempt: bool,
    /// fs.pipe-user-pages-soft, in pages (0: no limit); `None` if unreadable.
    pub soft_pages: Option<u64>,
    /// fs.pipe-max-size, in bytes; `None` if unreadable.
    pub max_size: Option<usize>,
}

impl PipeLimits {
    /// This process's, read from /proc.
    pub fn of_this_process() -> PipeLimits {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
        PipeLimits {
            exempt: read("/proc/self/status").is_some_and(|s| exempt_from_pipe_limit(&s)),
            soft_pages: num("/proc/sys/fs/pipe-user-pages-soft"),
            max_size: num("/proc/sys/fs/pipe-max-size").map(|n| n as usize),
        }
    }
}

/// Resolve `--bulk-pipe-size` under `limits`, as the daemon and `doctor`
/// see it.
pub fn bulk_pipe_size(cfg: &Config, limits: &PipeLimits) -> (usize, &'static str) {
    if let Some(b) = cfg.bulk_pipe_size {
        return (b, "--bulk-pipe-size");
    }
    default_bulk_pipe_size(
        cfg.pipe_size,
        limits.exempt,
        limits.soft_pages,
        limits.max_size,
    )
}

/// Does CapEff (from /proc/self/status) hold CAP_SYS_ADMIN (21) or
/// CAP_SYS_RESOURCE (24), which exempt a process from the pipe page limit?
pub fn exempt_from_pipe_limit(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 21 | 1 << 24) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Command};

    fn cfg(args: &[&str]) -> Config {
        let mut all = vec!["--port", "1"];
        all.extend_from_slice(args);
        match config::parse(all) {
            Ok(Command::Run(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_share_a_generous_limit_and_udp_takes_its_whole_default() {
        let b = budget(&cfg(&[]), 1 << 20).unwrap();
        assert_eq!(b.udp_sessions, config::DEFAULT_UDP_MAX_SESSIONS);
        let udp = config::DEFAULT_UDP_MAX_SESSIONS as u64 * FDS_PER_UDP_SESSION;
        assert_eq!(
            b.max_conns as u64,
            ((1 << 20) - RESERVED_FDS - udp) / FDS_PER_CONN
        );
        assert!(b.needed <= 1 << 20);
        assert_eq!(b.udp_reduced, None);
    }

    #[test]
    fn under_a_small_limit_the_default_udp_share_is_a_quarter_and_says_so() {
        let b = budget(&cfg(&[]), 4096).unwrap();
        let quarter = (4096 - RESERVED_FDS) / 4;
        assert_eq!(b.udp_sessions as u64, quarter / FDS_PER_UDP_SESSION);
        assert!(b.udp_reduced.as_deref().unwrap().contains("limited to"));
        assert!(b.max_conns > 500, "TCP still gets most of it");
        assert!(b.needed <= 4096);
        // The 20,000 of this machine's hard limit.
        let b = budget(&cfg(&[]), 20_000).unwrap();
        assert!(b.needed <= 20_000);
    }

    #[test]
    fn an_explicit_udp_share_that_does_not_fit_is_refused_in_one_line() {
        // The case the issue measured: every descriptor for UDP.
        let e = budget(&cfg(&["--udp-max-sessions", "20000"]), 20_000).unwrap_err();
        assert!(e.starts_with("--udp-max-sessions 20000 needs"), "{e}");
        assert!(!e.contains('\n'));
        // Three quarters of what is left is the most UDP may take beside TCP.
        let most = (20_000 - RESERVED_FDS) / 4 * 3 / FDS_PER_UDP_SESSION;
        let ok = budget(&cfg(&["--udp-max-sessions", &most.to_string()]), 20_000).unwrap();
        assert_eq!(ok.udp_sessions as u64, most);
        assert!(ok.needed <= 20_000);
        let over = (most + 1).to_string();
        assert!(budget(&cfg(&["--udp-max-sessions", &over]), 20_000).is_err());
        // Alone, UDP may take all of it.
        let alone = budget(&cfg(&["--no-tcp", "--udp-max-sessions", "9000"]), 20_000).unwrap();
        assert_eq!((alone.udp_sessions, alone.max_conns), (9000, 0));
    }

    #[test]
    fn tcp_may_be_given_more_than_the_limit_and_udp_keeps_its_share() {
        let b = budget(&cfg(&["--max-conns", "100000"]), 20_000).unwrap();
        assert_eq!(b.max_conns, 100_000);
        assert!(b.needed > 20_000, "a warning for the daemon, not an error");
        assert!(b.udp_sessions > 0);
        let b = budget(&cfg(&["--no-udp"]), 20_000).unwrap();
        assert_eq!(b.udp_sessions, 0);
        assert_eq!(b.max_conns as u64, (20_000 - RESERVED_FDS) / FDS_PER_CONN);
    }

    #[test]
    fn workers_split_the_sessions() {
        assert_eq!(per_udp_worker(4096, 1), 4096);
        assert_eq!(per_udp_worker(4097, 2), 2049);
        assert_eq!(per_udp_worker(1, 4), 1);
    }

    #[test]
    fn bulk_pipes_only_where_they_cost_no_pipe_pages() {
        let (small, mib) = (64 * 1024, 1 << 20);
        // (pipe size, exempt, pipe-user-pages-soft, pipe-max-size) -> bulk size
        let cases = [
            // Privileged: the soft limit does not apply.
            ((small, true, Some(16384), Some(mib)), mib),
            // Unprivileged under the default soft limit: no bulk pipes.
            ((small, false, Some(16384), Some(mib)), small),
            // tune/ lifted the soft limit.
            ((small, false, Some(0), Some(mib)), mib),
            // ... but pipe-max-size still caps an unprivileged F_SETPIPE_SZ.
            ((small, false, Some(0), Some(small)), small),
            // Unknown (no /proc): the safe answer.
            ((small, false, None, None), small),
            // Pipes already that big: nothing bigger.
            ((2 * mib, true, Some(0), Some(mib)), 2 * mib),
        ];
        for ((pipe, exempt, soft, max), want) in cases {
            assert_eq!(
                default_bulk_pipe_size(pipe, exempt, soft, max).0,
                want,
                "{:?}",
                (pipe, exempt, soft, max)
            );
        }
    }

    #[test]
    fn an_explicit_bulk_pipe_size_wins_over_the_limits() {
        let limits = PipeLimits::default();
        assert_eq!(
            bulk_pipe_size(&cfg(&[]), &limits).0,
            64 * 1024,
            "no privilege, no limits known: no bulk pipes"
        );
        let given = cfg(&["--bulk-pipe-size", "256k"]);
        assert_eq!(
            bulk_pipe_size(&given, &limits),
            (256 * 1024, "--bulk-pipe-size")
        );
    }

    #[test]
    fn pipe_limit_exemption() {
        assert!(exempt_from_pipe_limit(
            "Name:\tx\nCapEff:\t000001ffffffffff\n"
        ));
        assert!(!exempt_from_pipe_limit("CapEff:\t0000000000001000\n"));
        assert!(!exempt_from_pipe_limit("no caps here"));
    }
}
