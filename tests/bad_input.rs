//! Bad input on the command line (issue 7): every flag given a malformed,
//! out-of-range or conflicting value, an unknown flag, a stray argument, and
//! the same mistakes after `doctor`. Each must end the same way (CFG-1,
//! MAIN-1): exit status 2, nothing on stdout, exactly one line on stderr,
//! and that line names the flag (or the argument) at fault.
//!
//! This is the one table of bad flags in tests/, and `check` the one place
//! where how tproxyd ends on a usage error is checked end to end (the
//! parser's own unit test, src/config.rs's `bad_values_name_their_flag`,
//! checks the messages without running the binary).
//!
//! No lab is needed and none is made: a usage error is found before tproxyd
//! touches the network. In case a mistake were taken for a good option,
//! every case also names a loopback `--listen` address where it can, and,
//! when running as root, tproxyd runs in a fresh, empty network namespace
//! (`unshare --net`), so it could touch nothing outside it; without root it
//! cannot make transparent sockets and would exit 1, which fails the case as
//! surely. Nothing is skipped either way.

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use common::{run_bounded, tproxyd_bin};

/// A usage error is reported at once; a tproxyd still running after this
/// took its arguments for good ones.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Run tproxyd with `c`'s arguments, under its wrapper if it has one, to
/// completion (killed after `EXIT_WAIT`). `None`: it was still running.
fn run(c: &Case) -> Option<Output> {
    let mut line: Vec<&OsStr> = c.wrapper.iter().map(OsString::as_os_str).collect();
    line.push(tproxyd_bin().as_ref());
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--"]).args(&line);
        cmd
    } else {
        let mut cmd = Command::new(line[0]);
        cmd.args(&line[1..]);
        cmd
    };
    let ran = run_bounded(cmd.args(&c.args), EXIT_WAIT);
    (!ran.killed).then_some(ran.out)
}

/// One case: the arguments, what the error line must name, and what (if
/// anything) runs tproxyd (`prlimit ... --`, say).
struct Case {
    args: Vec<OsString>,
    names: Vec<&'static str>,
    wrapper: Vec<OsString>,
}

fn case(args: &[&str], names: &'static str) -> Case {
    Case {
        args: args.iter().map(OsString::from).collect(),
        names: vec![names],
        wrapper: Vec::new(),
    }
}

/// What is wrong with how tproxyd handled `c`, if anything.
fn check(c: &Case) -> Option<String> {
    let shown: Vec<String> = c
        .wrapper
        .iter()
        .chain(&c.args)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(out) = run(c) else {
        return Some(format!(
            "{shown:?}: still running after {EXIT_WAIT:?}: the arguments were taken as good"
        ));
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let mut wrong = Vec::new();
    if out.status.code() != Some(2) {
        wrong.push(format!("exit {}", out.status));
    }
    if !out.stdout.is_empty() {
        wrong.push(format!("stdout {:?}", String::from_utf8_lossy(&out.stdout)));
    }
    if lines.len() != 1 {
        wrong.push(format!("{} lines on stderr", lines.len()));
    }
    for names in &c.names {
        if !lines.iter().any(|l| l.contains(names)) {
            wrong.push(format!("no mention of {names}"));
        }
    }
    (!wrong.is_empty()).then(|| format!("{shown:?}: {} (stderr: {lines:?})", wrong.join(", ")))
}

/// Cases run this many at a time: each is a process that should exit at
/// once, but one that wrongly runs holds its slot for `EXIT_WAIT`.
const PARALLEL: usize = 16;

fn check_all(cases: &[Case]) {
    let failures: Vec<String> = cases
        .chunks(PARALLEL)
        .flat_map(|chunk| {
            thread::scope(|s| {
                let running: Vec<_> = chunk.iter().map(|c| s.spawn(|| check(c))).collect();
                running
                    .into_iter()
                    .map(|h| h.join().expect("case thread panicked"))
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases went wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `--port 8080 --listen 127.0.0.1` and then `rest`: everything valid but
/// what the case is about.
fn with_base(rest: &[&str], names: &'static str) -> Case {
    let mut args = vec!["--port", "8080", "--listen", "127.0.0.1"];
    args.extend_from_slice(rest);
    case(&args, names)
}

#[test]
fn every_flag_with_a_bad_value_exits_2_with_one_line_naming_it() {
    let mut cases = vec![
        // --port: the one required option.
        case(&["--listen", "127.0.0.1"], "--port"),
        case(&["--port", "abc", "--listen", "127.0.0.1"], "--port"),
        case(&["--port", "0", "--listen", "127.0.0.1"], "--port"),
        case(&["--port", "65536", "--listen", "127.0.0.1"], "--port"),
        case(&["--port", "-1", "--listen", "127.0.0.1"], "--port"),
        case(&["--port", "", "--listen", "127.0.0.1"], "--port"),
        case(&["--port=http", "--listen", "127.0.0.1"], "--port"),
        case(&["-p", "80x", "--listen", "127.0.0.1"], "--port"),
        case(&["--listen", "127.0.0.1", "--port"], "--port"),
        case(
            &["--port", "1", "--port", "2", "--listen", "127.0.0.1"],
            "--port",
        ),
        // --listen
        case(&["--port", "8080", "--listen", "127.0.0.1:80"], "--listen"),
        case(&["--port", "8080", "--listen", "localhost"], "--listen"),
        case(&["--port", "8080", "--listen", ""], "--listen"),
        case(&["--port", "8080", "--listen", "fe80::1%1"], "--listen"),
        case(&["--port", "8080", "--listen", "300.1.2.3"], "--listen"),
        case(
            &[
                "--port",
                "8080",
                "--listen",
                "127.0.0.1",
                "--listen",
                "127.0.0.1",
            ],
            "--listen",
        ),
        case(
            &["--port", "8080", "--listen", "::1", "--listen", "[::1]"],
            "--listen",
        ),
    ];
    let per_flag: &[(&[&str], &str)] = &[
        // --workers
        (&["--workers", "0"], "--workers"),
        (&["--workers", "1025"], "--workers"),
        (&["--workers", "two"], "--workers"),
        (&["--workers", "-1"], "--workers"),
        (&["--workers", " 2"], "--workers"),
        (&["--workers"], "--workers"),
        // --no-pin
        (&["--no-pin=yes"], "--no-pin"),
        (&["--no-pin", "--no-pin"], "--no-pin"),
        // --mark
        (&["--mark", "0"], "--mark"),
        (&["--mark", "0x"], "--mark"),
        (&["--mark", "0xzz"], "--mark"),
        (&["--mark", "-1"], "--mark"),
        (&["--mark", "4294967296"], "--mark"),
        (&["--mark", "0x100000000"], "--mark"),
        // --connect-timeout
        (&["--connect-timeout", "0"], "--connect-timeout"),
        (&["--connect-timeout", "0ms"], "--connect-timeout"),
        (&["--connect-timeout", "5"], "--connect-timeout"),
        (&["--connect-timeout", "5x"], "--connect-timeout"),
        (&["--connect-timeout", "1.5s"], "--connect-timeout"),
        (&["--connect-timeout", "-1s"], "--connect-timeout"),
        (&["--connect-timeout", "ms"], "--connect-timeout"),
        (
            &["--connect-timeout", "99999999999999h"],
            "--connect-timeout",
        ),
        // --idle-timeout (0 is allowed: off)
        (&["--idle-timeout", "10"], "--idle-timeout"),
        (&["--idle-timeout", "1d"], "--idle-timeout"),
        (&["--idle-timeout", "-5m"], "--idle-timeout"),
        (&["--idle-timeout", "876000h"], "--idle-timeout"),
        // --max-conns
        (&["--max-conns", "0"], "--max-conns"),
        (&["--max-conns", "10000001"], "--max-conns"),
        (&["--max-conns", "many"], "--max-conns"),
        (&["--max-conns", "1e3"], "--max-conns"),
        // --max-conns-per-client, --client-prefix (which needs it: without
        // a cap it would change nothing)
        (&["--max-conns-per-client", "0"], "--max-conns-per-client"),
        (&["--max-conns-per-client", "-1"], "--max-conns-per-client"),
        (
            &["--max-conns-per-client", "10000001"],
            "--max-conns-per-client",
        ),
        (
            &["--max-conns-per-client", "five"],
            "--max-conns-per-client",
        ),
        (&["--max-conns-per-client"], "--max-conns-per-client"),
        (
            &["--max-conns-per-client", "5", "--no-tcp"],
            "--max-conns-per-client",
        ),
        (&["--client-prefix", "32,64"], "--client-prefix"),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "33,64"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "32,129"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "0,64"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "24"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "24,48,8"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "/24,/48"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix", "24, 48"],
            "--client-prefix",
        ),
        (
            &["--max-conns-per-client", "5", "--client-prefix"],
            "--client-prefix",
        ),
        // --pipe-size
        (&["--pipe-size", "4095"], "--pipe-size"),
        (&["--pipe-size", "257m"], "--pipe-size"),
        (&["--pipe-size", "1g"], "--pipe-size"),
        (&["--pipe-size", "64kb"], "--pipe-size"),
        (&["--pipe-size", "0x1000"], "--pipe-size"),
        (&["--pipe-size", "99999999999999999999k"], "--pipe-size"),
        (&["--pipe-size", "128k", "--no-splice"], "--pipe-size"),
        // --bulk-pipe-size
        (&["--bulk-pipe-size", "4095"], "--bulk-pipe-size"),
        (&["--bulk-pipe-size", "1q"], "--bulk-pipe-size"),
        (
            &["--pipe-size", "256k", "--bulk-pipe-size", "128k"],
            "--bulk-pipe-size",
        ),
        (
            &["--bulk-pipe-size", "1m", "--no-splice"],
            "--bulk-pipe-size",
        ),
        (&["--bulk-pipe-size", "1m", "--no-tcp"], "--bulk-pipe-size"),
        (&["--spoof-source", "--no-tcp"], "--spoof-source"),
        // --source: an address of this host (checked at start, exit 1), so
        // only what can never be one is a usage error here.
        (&["--source", "here"], "--source"),
        (&["--source", "198.19.0.1:80"], "--source"),
        (&["--source", "0.0.0.0"], "--source"),
        (&["--source", "ff02::1"], "--source"),
        (&["--source", "::ffff:127.0.0.1"], "--source"),
        (
            &["--source", "127.0.0.1", "--source", "127.0.0.1"],
            "--source",
        ),
        (&["--source", "127.0.0.1", "--spoof-source"], "--source"),
        (&["--source", "127.0.0.1", "--no-tcp"], "--source"),
        (&["--source"], "--source"),
        // --send-proxy: v1 or v2, TCP only, and not with spoofing (the
        // server would see the client's address twice over)
        (&["--send-proxy", "v3"], "--send-proxy"),
        (&["--send-proxy", "V2"], "--send-proxy"),
        (&["--send-proxy", ""], "--send-proxy"),
        (&["--send-proxy"], "--send-proxy"),
        (
            &["--send-proxy", "v1", "--send-proxy", "v2"],
            "--send-proxy",
        ),
        // (the conflict is named before --spoof-source's want of --mark)
        (&["--send-proxy", "v2", "--spoof-source"], "choose one"),
        (
            &["--send-proxy", "v1", "--spoof-source", "--no-udp"],
            "choose one",
        ),
        (&["--send-proxy", "v1", "--no-tcp"], "--send-proxy"),
        // --drain-timeout
        (&["--drain-timeout", "30"], "--drain-timeout"),
        (&["--drain-timeout", "1w"], "--drain-timeout"),
        (&["--drain-timeout", "s"], "--drain-timeout"),
        // --busy-poll
        (&["--busy-poll", "50"], "--busy-poll"),
        (&["--busy-poll", "2s"], "--busy-poll"),
        (&["--busy-poll", "-1us"], "--busy-poll"),
        // --log-level
        (&["--log-level", "loud"], "--log-level"),
        (&["--log-level", ""], "--log-level"),
        (&["--log-level", "5"], "--log-level"),
        (&["--log-level"], "--log-level"),
        // --no-splice
        (&["--no-splice=1"], "--no-splice"),
        (&["--no-splice", "--no-splice"], "--no-splice"),
        // --no-tcp and --no-udp: each alone is fine, not both, not with a value
        (&["--no-tcp", "--no-udp"], "--no-"),
        (&["--no-tcp=1"], "--no-tcp"),
        (&["--no-udp=0"], "--no-udp"),
        // --udp-timeout
        (&["--udp-timeout", "0"], "--udp-timeout"),
        (&["--udp-timeout", "60"], "--udp-timeout"),
        (&["--udp-timeout", "soon"], "--udp-timeout"),
        // --udp-max-sessions
        (&["--udp-max-sessions", "0"], "--udp-max-sessions"),
        (&["--udp-max-sessions", "1000001"], "--udp-max-sessions"),
        (&["--udp-max-sessions", "x"], "--udp-max-sessions"),
        // --udp-nat, --udp-workers
        (&["--udp-nat", "cone"], "--udp-nat"),
        (&["--udp-nat", ""], "--udp-nat"),
        (&["--udp-workers", "0"], "--udp-workers"),
        (&["--udp-workers", "two"], "--udp-workers"),
        (
            &["--udp-workers", "3", "--udp-max-sessions", "2"],
            "--udp-workers",
        ),
        // --spoof-source with UDP tells its sockets by their mark
        (&["--spoof-source"], "--mark"),
        // --metrics
        (&["--metrics", "localhost:9120"], "--metrics"),
        (&["--metrics", "127.0.0.1"], "--metrics"),
        (&["--metrics", "127.0.0.1:99999"], "--metrics"),
        (&["--metrics", ":9120"], "--metrics"),
        (&["--metrics", "[::1]"], "--metrics"),
        // --help and --version take no value
        (&["--help=1"], "--help"),
        (&["--version=1"], "--version"),
        // Unknown flags
        (&["--frobnicate"], "--frobnicate"),
        (&["--PORT", "80"], "--PORT"),
        (&["-x"], "-x"),
        (&["--udp-max-session", "10"], "--udp-max-session"),
    ];
    cases.extend(per_flag.iter().map(|(rest, names)| with_base(rest, names)));
    // Stray arguments
    cases.push(with_base(&["stray"], "stray"));
    cases.push(with_base(&["--", "stray"], "stray"));
    cases.push(with_base(&["-"], "'-'"));
    cases.push(case(&["8080"], "8080"));
    check_all(&cases);
}

/// `tproxyd doctor` takes the daemon's options and refuses bad ones the
/// same way.
#[test]
fn doctor_with_a_bad_flag_exits_2_with_one_line_naming_it() {
    check_all(&[
        case(&["doctor", "--frobnicate"], "--frobnicate"),
        case(&["doctor", "--port", "x"], "--port"),
        case(&["doctor"], "--port"),
        case(&["doctor", "--port", "8080", "--workers", "0"], "--workers"),
        case(
            &["doctor", "--port", "8080", "--pipe-size", "1"],
            "--pipe-size",
        ),
        case(
            &["doctor", "--port", "8080", "--metrics", "nowhere"],
            "--metrics",
        ),
        case(
            &["doctor", "--port", "8080", "--no-tcp", "--no-udp"],
            "--no-",
        ),
        case(&["doctor", "--port", "8080", "stray"], "stray"),
        case(&["doctor", "--port", "8080", "doctor"], "doctor"),
    ]);
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) cannot be listened on:
/// IPv6 listeners are IPV6_V6ONLY, and bind(2) refuses it with EINVAL
/// whatever the host. That is a malformed `--listen`, known from the
/// command line alone: exit 2 naming the flag, not exit 1 "cannot listen".
#[test]
fn ipv4_mapped_listen_address_is_a_usage_error() {
    check_all(&[
        case(
            &["--port", "8080", "--listen", "::ffff:127.0.0.1"],
            "--listen",
        ),
        case(
            &[
                "--port",
                "8080",
                "--listen",
                "127.0.0.1",
                "--listen",
                "::ffff:127.0.0.1",
            ],
            "--listen",
        ),
    ]);
}

/// `--metrics` on the address and port tproxyd's own TCP listeners take can
/// never work: the conflict is in the options, so it is a usage error (exit
/// 2 naming the flag), not a failure to bind found at start (exit 1).
#[test]
fn metrics_on_the_proxy_port_is_a_usage_error() {
    check_all(&[
        case(
            &[
                "--port",
                "9120",
                "--listen",
                "127.0.0.1",
                "--metrics",
                "127.0.0.1:9120",
            ],
            "--metrics",
        ),
        case(
            &["--port", "9120", "--metrics", "127.0.0.1:9120"],
            "--metrics",
        ),
    ]);
}

/// An option that cannot have any effect is refused, as `--pipe-size` with
/// `--no-splice` is ("has no effect with --no-splice: give one or the
/// other"): the UDP options with `--no-udp`, the TCP-only ones with
/// `--no-tcp`. Accepting them silently hides a mistake in a unit file.
#[test]
fn options_for_a_protocol_that_is_off_are_refused_like_pipe_size_with_no_splice() {
    check_all(&[
        with_base(&["--no-udp", "--udp-timeout", "5s"], "--udp-timeout"),
        with_base(
            &["--no-udp", "--udp-max-sessions", "10"],
            "--udp-max-sessions",
        ),
        with_base(&["--no-tcp", "--max-conns", "10"], "--max-conns"),
        with_base(&["--no-tcp", "--pipe-size", "128k"], "--pipe-size"),
        with_base(
            &["--no-tcp", "--connect-timeout", "1s"],
            "--connect-timeout",
        ),
        with_base(&["--no-tcp", "--idle-timeout", "1m"], "--idle-timeout"),
        with_base(&["--no-tcp", "--no-splice"], "--no-splice"),
    ]);
}

/// A value that is not UTF-8 is a bad value of its flag, and the message
/// says which flag: not "unknown option" with the value quoted as if it
/// were one.
#[test]
fn value_that_is_not_utf8_is_reported_against_its_flag() {
    let bad = OsStr::from_bytes(b"\xff80").to_os_string();
    let with = |flag: &str| {
        let mut args: Vec<OsString> = ["--port", "8080", "--listen", "127.0.0.1"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(flag.into());
        args.push(bad.clone());
        args
    };
    check_all(&[
        Case {
            args: with("--workers"),
            names: vec!["--workers"],
            wrapper: Vec::new(),
        },
        Case {
            args: with("--log-level"),
            names: vec!["--log-level"],
            wrapper: Vec::new(),
        },
    ]);
}

/// A UDP share the descriptor limit cannot hold is refused at start (budget
/// FD-2): exit 2, one line naming the flag and the limit. It used to start
/// and take every descriptor, so that TCP connections waited for one.
#[test]
fn a_udp_session_limit_the_descriptor_limit_cannot_hold_exits_2_with_one_line() {
    let under = |limit: &'static str, rest: &[&str]| {
        let mut c = with_base(rest, "--udp-max-sessions");
        c.names.push(limit);
        c.wrapper = ["prlimit", &format!("--nofile={limit}:{limit}"), "--"]
            .iter()
            .map(OsString::from)
            .collect();
        c
    };
    check_all(&[
        under("20000", &["--udp-max-sessions", "20000"]),
        under("1024", &["--no-tcp", "--udp-max-sessions", "600"]),
    ]);
}
