//! The descriptor budget: how RLIMIT_NOFILE is shared between TCP
//! connections and UDP sessions, decided once at start by the daemon and
//! reported the same way by `doctor`. Pure: the limit comes in as a number.
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
}
