//! The helpers the other tests rely on, held to what those tests assume of
//! them. The byte streams that prove byte-exact delivery: generation must
//! not depend on how the stream is cut, and a mismatch must name its
//! offset. The one bounded run (LAB-3): a command that ends by itself gives
//! back all it wrote, however much, and its status; one that outlives its
//! limit is killed, with whatever it started.
//!
//! No lab and no root needed: these run plain local processes.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Pattern, Verifier, run_bounded, wait_until};

#[test]
fn pattern_is_the_same_however_it_is_cut() {
    let cuts = [1usize, 7, 8, 9, 65_535, 65_537, 3, 100_000];
    let whole = Pattern::bytes(7, cuts.iter().sum());
    let mut p = Pattern::new(7);
    let mut pieces = Vec::new();
    for n in cuts {
        let mut b = vec![0; n];
        p.fill(&mut b);
        pieces.extend_from_slice(&b);
    }
    // Not assert_eq: a failure would print hundreds of kilobytes.
    assert!(pieces == whole, "chunked output differs from the whole");
    assert_ne!(Pattern::bytes(1, 64), Pattern::bytes(2, 64));
}

#[test]
fn verifier_names_the_first_wrong_byte() {
    let mut data = Pattern::bytes(3, 100_000);
    data[70_001] ^= 0x40;
    let mut v = Verifier::new(3);
    v.check(&data[..50_000]).expect("first half is intact");
    let err = v
        .check(&data[50_000..])
        .expect_err("second half is corrupt");
    assert!(err.contains("byte 70001"), "{err}");
}

#[test]
fn a_bounded_run_gives_back_all_a_command_wrote_and_how_it_exited() {
    let ran = run_bounded(
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        Duration::from_secs(30),
    );
    assert!(!ran.killed, "killed: {ran:?}");
    assert_eq!(ran.out.status.code(), Some(3));
    assert_eq!(ran.out.stdout, b"out\n");
    assert_eq!(ran.out.stderr, b"err\n");
    // Far more than a pipe holds: read while it runs, or it would block
    // until killed.
    const MUCH: usize = 4 << 20;
    let ran = run_bounded(
        Command::new("head").args(["-c", &MUCH.to_string(), "/dev/zero"]),
        Duration::from_secs(30),
    );
    assert!(
        !ran.killed,
        "killed with {} bytes read",
        ran.out.stdout.len()
    );
    assert_eq!(ran.out.stdout.len(), MUCH);
}

#[test]
fn a_bounded_run_kills_a_command_that_outlives_its_limit_and_what_it_started() {
    // The shell starts a sleeper of its own (its output elsewhere, so that
    // only the kill can end it), says its pid, and sleeps too.
    let ran = run_bounded(
        Command::new("sh").args([
            "-c",
            "sleep 60 </dev/null >/dev/null 2>&1 & echo $!; exec sleep 60",
        ]),
        Duration::from_millis(500),
    );
    assert!(ran.killed, "not killed: {ran:?}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&ran.out.status),
        Some(libc::SIGKILL)
    );
    let pid: u32 = String::from_utf8_lossy(&ran.out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("the sleeper's pid: {e}: {ran:?}"));
    // Killed: gone, or a zombie until whoever inherited it reaps it.
    let dead = wait_until(Duration::from_secs(10), || {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    });
    assert!(dead, "the command's own child {pid} outlived the kill");
}
