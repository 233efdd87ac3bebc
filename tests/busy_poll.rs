//! `--busy-poll DUR` (busy_poll.rs SPIN-1..3): after traffic a worker keeps
//! polling without sleeping, then sleeps once the window has passed with
//! nothing; and forwarding stays byte-exact while it spins.
//!
//! What a worker does between events is only visible in its system calls,
//! so the first test watches them with strace attached to the running
//! proxy: a zero-timeout epoll_wait that returns nothing is a spin, and a
//! thread whose last call is not one is asleep.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::udp::{UdpEcho, udp_round_trip};
use common::{
    EchoServer, Lab, Proxy, exchange, family, server_addr, set_timeouts, tcp_echo_round_trip,
    wait_until,
};

/// One epoll_wait as strace saw it, joined from its unfinished and resumed
/// halves: the thread, when it began (seconds since the epoch), and the
/// call's text from its arguments on.
struct Poll {
    tid: u32,
    at: f64,
    call: String,
}

impl Poll {
    /// A zero-timeout poll that came back with nothing: a spin.
    fn is_spin(&self) -> bool {
        self.call.ends_with(", 0) = 0")
    }
}

/// strace -f -ttt output (each line "TID SECONDS syscall..."): every
/// epoll_wait, whole. A call still blocked when strace detached has no end;
/// it is kept as it is, and it is not a spin.
fn polls(trace: &str) -> Vec<Poll> {
    let mut open: HashMap<u32, (f64, String)> = HashMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        // strace pads the thread id to 5 columns ("4680  1796139559.1 ..."),
        // so the fields are split on runs of white space.
        let Some((tid, rest)) = line.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        let Some((at, rest)) = rest.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        let (Ok(tid), Ok(at)) = (tid.parse::<u32>(), at.parse::<f64>()) else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            open.insert(tid, (at, head.to_string()));
        } else if let Some(tail) = rest.strip_prefix("<... epoll_wait resumed>") {
            let (at, head) = open.remove(&tid).unwrap_or((at, String::new()));
            out.push(Poll {
                tid,
                at,
                call: format!("{head}{tail}"),
            });
        } else if rest.starts_with("epoll_wait(") {
            out.push(Poll {
                tid,
                at,
                call: rest.to_string(),
            });
        }
    }
    out.extend(
        open.into_iter()
            .map(|(tid, (at, call))| Poll { tid, at, call }),
    );
    out
}

/// strace attached to every thread of `pid`, tracing epoll_wait only.
fn attach_strace(pid: i32, out: &str) -> Child {
    let child = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-ttt",
            "-e",
            "trace=epoll_wait,epoll_pwait",
            "-o",
            out,
        ])
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace (Debian package strace; scripts/deps tests)");
    // Attached once every thread shows up in the trace or its status says so.
    let attached = wait_until(Duration::from_secs(5), || {
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|t| {
                    fs::read_to_string(t.path().join("status"))
                        .map(|s| {
                            s.lines()
                                .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
                        })
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    });
    assert!(attached, "strace did not attach to tproxyd {pid}");
    child
}

fn thread_names(pid: i32) -> HashMap<u32, String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let name = fs::read_to_string(t.path().join("comm")).ok()?;
            Some((tid, name.trim().to_string()))
        })
        .collect()
}

/// What each worker thread did while strace watched one TCP and one UDP
/// round trip and then `quiet` of nothing: its spins, and how long before
/// strace left its last spin was.
fn watch_workers(extra: &[&str], quiet: Duration) -> HashMap<String, (usize, Option<f64>)> {
    let lab = Lab::tproxy();
    let _echo = EchoServer::start(lab.listen_server(80));
    let _udp = UdpEcho::start(&lab, 5353);
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&lab, &args);
    let trace = format!(
        "/tmp/tproxyd-busy-poll-{}-{}.strace",
        std::process::id(),
        lab.name()
    );
    let mut strace = attach_strace(proxy.pid().as_raw(), &trace);
    // Let the attach's own wake-ups pass: what follows is the traffic's.
    thread::sleep(Duration::from_millis(300));
    tcp_echo_round_trip(&lab, b"ping over tcp");
    assert_eq!(
        udp_round_trip(&lab, server_addr(false, 5353), b"ping over udp"),
        b"ping over udp"
    );
    thread::sleep(quiet);
    let names = thread_names(proxy.pid().as_raw());
    let left = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    // SIGTERM makes strace detach and flush; tproxyd runs on.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = strace.wait();
    let text = fs::read_to_string(&trace).expect("the strace output");
    let _ = fs::remove_file(&trace);
    let polls = polls(&text);
    let mut out = HashMap::new();
    for (tid, name) in names {
        if !name.starts_with("tproxyd-w") && !name.starts_with("tproxyd-udp") {
            continue;
        }
        // Every worker polls at least once (it was blocked in a poll when
        // strace came): none read means the trace was not understood.
        assert!(
            polls.iter().any(|p| p.tid == tid),
            "no epoll_wait of {name} ({tid}) read from strace's output:\n{}",
            text.lines().take(5).collect::<Vec<_>>().join("\n")
        );
        let spins: Vec<&Poll> = polls
            .iter()
            .filter(|p| p.tid == tid && p.is_spin())
            .collect();
        let last = spins
            .iter()
            .map(|p| p.at)
            .reduce(f64::max)
            .map(|at| left - at);
        out.insert(name, (spins.len(), last));
    }
    assert_eq!(out.len(), 2, "one TCP and one UDP worker in {out:?}");
    out
}

#[test]
fn a_busy_polling_worker_spins_after_traffic_then_sleeps_again() {
    // The window (100 ms) is long enough for many spins even under strace
    // on a loaded machine; the quiet after the traffic (1.5 s) far longer.
    let on = watch_workers(&["--busy-poll", "100ms"], Duration::from_millis(1500));
    let off = watch_workers(&[], Duration::from_millis(1500));
    eprintln!(
        "(spins, seconds from the last spin to the end): with --busy-poll 100ms {on:?}; without {off:?}"
    );
    for (name, &(spins, last)) in &on {
        // SPIN-2's first half: it kept polling after the traffic...
        assert!(
            spins >= 50,
            "{name} with --busy-poll 100ms: {spins} empty zero-timeout polls after a round trip; without it {:?}",
            off.get(name)
        );
        // ...and its second half: once the window passed, it went to sleep.
        // The traffic ended 1.5 s before strace left; spins within the last
        // second mean the window did not end.
        assert!(
            last.is_some_and(|s| s > 1.0),
            "{name} with --busy-poll 100ms still spun {last:?} s before the end, 1.5 s after the last packet"
        );
    }
    // SPIN-1: without the option a worker does not spin (a poll or two with
    // a zero timeout while an accept batch or a drive is pending).
    for (name, &(spins, _)) in &off {
        assert!(
            spins <= 10,
            "{name} without --busy-poll: {spins} empty zero-timeout polls"
        );
    }
}

#[test]
fn while_spinning_both_directions_arrive_byte_exact() {
    let lab = Lab::tproxy();
    let _proxy = Proxy::start(&lab, &["--busy-poll", "200us"]);
    let listener = lab.listen_server(9000);
    const LEN: u64 = 8 << 20;
    const TRIPS: u32 = 1000;
    for v6 in [false, true] {
        let server = thread::spawn({
            let listener = listener.try_clone().expect("dup listener");
            move || {
                let (mut s, _) = common::accept(&listener);
                set_timeouts(&s, Duration::from_secs(10));
                // One-byte round trips first (the spin's own case), then
                // 8 MiB each way at once and EOF both ways.
                let mut b = [0u8; 1];
                for _ in 0..TRIPS {
                    s.read_exact(&mut b).expect("one byte");
                    s.write_all(&b).expect("echo it");
                }
                exchange(s, 2, LEN, 1, LEN)
            }
        });
        let mut c = lab
            .connect(server_addr(v6, 9000))
            .expect("connect through the proxy");
        set_timeouts(&c, Duration::from_secs(10));
        let mut b = [0u8; 1];
        for i in 0..TRIPS {
            c.write_all(&[i as u8]).expect("one byte");
            c.read_exact(&mut b).expect("its echo");
            assert_eq!(b[0], i as u8, "round trip {i}");
        }
        let client = exchange(c, 1, LEN, 2, LEN);
        let server = server.join().expect("server");
        assert_eq!(
            (client, server),
            (Ok(()), Ok(())),
            "client, server ({})",
            family(v6)
        );
    }
}

#[test]
fn strace_lines_join_into_whole_polls() {
    let trace = "\
101   1.5 epoll_wait(3, [], 1024, 0) = 0
102 1.6 epoll_wait(5,  <unfinished ...>
101 1.7 epoll_wait(3, [{events=EPOLLIN, data=0x1}], 1024, -1) = 1
102 1.8 <... epoll_wait resumed>[], 1024, 0) = 0
101 1.9 epoll_wait(3,  <unfinished ...>
";
    let p = polls(trace);
    let spins: Vec<(u32, f64)> = p
        .iter()
        .filter(|p| p.is_spin())
        .map(|p| (p.tid, p.at))
        .collect();
    // A resumed call keeps the time it began.
    assert_eq!(spins, vec![(101, 1.5), (102, 1.6)]);
    assert_eq!(p.len(), 4);
    assert!(
        !p.last().expect("a poll").is_spin(),
        "a call still blocked is not a spin"
    );
}
