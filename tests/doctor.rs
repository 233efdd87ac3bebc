//! `tproxyd doctor` tells a host that cannot intercept from one that can:
//! it fails, naming the missing pieces, in a router with no TPROXY set-up
//! (including the return path `--spoof-source` needs), and passes once
//! `scripts/rules up` has installed it; and it catches the
//! one misconfiguration that makes tproxyd loop (local interception without
//! the proxy's own mark).

mod common;

use std::process::Output;
use std::time::Duration;

use common::{Lab, Mode, Role, tproxyd_bin};

fn rules() -> String {
    format!("{}/scripts/rules", env!("CARGO_MANIFEST_DIR"))
}

/// Doctor only reads the host: it ends by itself, well within this (LAB-3).
const DOCTOR_WAIT: Duration = Duration::from_secs(30);

fn doctor(lab: &Lab, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![tproxyd_bin(), "doctor", "--port", "8080"];
    args.extend_from_slice(extra);
    let out: Output = lab.exec_bounded(Role::Router, DOCTOR_WAIT, &args).out;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), text)
}

fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l[4..].trim_start().starts_with(check))
        .unwrap_or_else(|| panic!("no '{check}' line in:\n{report}"))
}

#[test]
fn doctor_fails_without_the_route_and_rules_and_passes_after_rules_up() {
    let lab = Lab::up(Mode::Direct, 8080);
    let (code, report) = doctor(&lab, &["--spoof-source", "--mark", "2"]);
    assert_eq!(code, Some(1), "doctor must fail:\n{report}");
    for check in [
        "policy route (IPv4)",
        "policy route (IPv6)",
        "TPROXY rules",
        "spoof-source return path",
    ] {
        let l = line(&report, check);
        assert!(l.starts_with("FAIL") && l.contains("fix:"), "{l}");
    }
    assert!(report.lines().all(|l| l.starts_with("PASS")
        || l.starts_with("WARN")
        || l.starts_with("FAIL")
        || l.contains(" checks: ")));

    lab.sh(
        Role::Router,
        &[&rules(), "up", "--port", "8080", "--in-iface", "rc"],
    );
    let (code, report) = doctor(&lab, &["--spoof-source", "--mark", "2"]);
    assert_eq!(code, Some(0), "doctor must pass after rules up:\n{report}");
    for check in [
        "kernel TPROXY support",
        "IP_TRANSPARENT allowed",
        "policy route (IPv4)",
        "policy route (IPv6)",
        "TPROXY rules",
        "spoof-source return path",
    ] {
        assert!(line(&report, check).starts_with("PASS"), "{report}");
    }
    // The rules point at 8080; a daemon configured for another port is told.
    let out = lab
        .exec_bounded(
            Role::Router,
            DOCTOR_WAIT,
            &[tproxyd_bin(), "doctor", "--port", "9090"],
        )
        .out;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        line(&report, "TPROXY rules").contains("not to --port 9090"),
        "{report}"
    );
}

#[test]
fn doctor_fails_local_interception_without_the_proxys_own_mark() {
    let lab = Lab::up(Mode::Direct, 8080);
    lab.sh(
        Role::Router,
        &[
            &rules(),
            "up",
            "--port",
            "8080",
            "--in-iface",
            "rc",
            "--local",
        ],
    );
    let (code, report) = doctor(&lab, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(line(&report, "own traffic").starts_with("FAIL"), "{report}");
    let (code, report) = doctor(&lab, &["--mark", "3"]);
    assert_eq!(
        code,
        Some(0),
        "0x3 carries the 0x2 bit the rules let through:\n{report}"
    );
    let (code, report) = doctor(&lab, &["--mark", "4"]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        line(&report, "own traffic").contains("--mark 0x4 is not among"),
        "{report}"
    );
}

/// The source-port check does the arithmetic with the namespace's own
/// sysctls: the kernel's defaults (28,232 ports held 60 s each) warn with
/// the fix; tcp_tw_reuse=1 (a port reused after ~1 s) passes; `--source`
/// multiplies by the addresses given.
#[test]
fn doctor_warns_when_source_ports_cannot_sustain_a_busy_server() {
    let lab = Lab::up(Mode::Direct, 8080);
    let sysctl = |kv: &str| {
        lab.sh(Role::Router, &["sysctl", "-qw", kv]);
    };
    sysctl("net.ipv4.ip_local_port_range=32768 60999");
    sysctl("net.ipv4.tcp_tw_reuse=2");
    let (_, report) = doctor(&lab, &[]);
    let l = line(&report, "source ports");
    assert!(
        l.starts_with("WARN") && l.contains("= 471 new connections/s"),
        "{l}"
    );
    assert!(l.contains("fix:") && l.contains("tcp_tw_reuse=1"), "{l}");
    let (_, report) = doctor(&lab, &["--source", "198.19.0.1"]);
    assert!(
        line(&report, "source ports").contains("IPv4: 1 --source address"),
        "{report}"
    );
    sysctl("net.ipv4.tcp_tw_reuse=1");
    let (_, report) = doctor(&lab, &[]);
    let l = line(&report, "source ports");
    assert!(
        l.starts_with("PASS") && l.contains("28232 new connections/s"),
        "{l}"
    );
}
