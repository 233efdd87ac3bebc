//! The rules `scripts/rules up --dry-run` prints, checked in as golden
//! files (src/doctor/golden/), fed to doctor's parsers, and regenerated
//! from the script to prove they are still what it prints: the shell
//! generator and the Rust parser cannot drift apart unseen.
//!
//! For each option set in [`CASES`], the dry run's output is cut in two
//! files, so that each is exactly what one parser reads:
//! - `rules-CASE.routing`: the policy routing (`ip rule add fwmark ...`,
//!   the same for both backends), which `fwmark_rules` reads;
//! - `rules-CASE.nft` (the nft backend): the ruleset `nft -f -` is given,
//!   which the nft parsers read;
//! - `rules-CASE.iptables` (the iptables backend): the
//!   `ip{,6}tables-restore --noflush` payloads, with the comments naming
//!   the jumps `up` adds to PREROUTING and OUTPUT, which the iptables
//!   parsers read once those jumps are in place ([`as_installed`]).
//!
//! The routing file followed by a backend's file is byte for byte the dry
//! run of that backend. What must stay true:
//! - GOLD-1: the golden files are what scripts/rules prints today
//!   ([`golden_files_are_what_scripts_rules_prints`]); regenerate them with
//!   `TPROXYD_BLESS=1 cargo test --bins doctor::golden` after changing the
//!   script, and read the diff.
//! - GOLD-2: doctor's parsers find in them every mark and port the options
//!   asked for, so the checks judge the generator's rules as written.

use std::process::Command;

use super::checks::{ALL, Status};
use super::facts::Facts;
use super::parse::*;
use crate::doctor::cfg;

/// One option set: its name in the file names, the dry run's options, and
/// what the parsers must find: the fwmark, the proxy mark (value, mask),
/// and whether the host's own traffic is intercepted (`--local`).
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    fwmark: u32,
    proxy_mark: (u32, u32),
    local: bool,
    routing: &'static str,
    nft: &'static str,
    iptables: &'static str,
}

macro_rules! golden {
    ($file:literal) => {
        include_str!(concat!("golden/", $file))
    };
}

const CASES: [Case; 4] = [
    Case {
        name: "default",
        args: &["--port", "8080"],
        fwmark: 0x1,
        proxy_mark: (0x2, 0x2),
        local: false,
        routing: golden!("rules-default.routing"),
        nft: golden!("rules-default.nft"),
        iptables: golden!("rules-default.iptables"),
    },
    Case {
        name: "in-iface",
        args: &["--port", "8080", "--in-iface", "eth1", "--in-iface", "eth2"],
        fwmark: 0x1,
        proxy_mark: (0x2, 0x2),
        local: false,
        routing: golden!("rules-in-iface.routing"),
        nft: golden!("rules-in-iface.nft"),
        iptables: golden!("rules-in-iface.iptables"),
    },
    Case {
        name: "local",
        args: &["--port", "8080", "--local"],
        fwmark: 0x1,
        proxy_mark: (0x2, 0x2),
        local: true,
        routing: golden!("rules-local.routing"),
        nft: golden!("rules-local.nft"),
        iptables: golden!("rules-local.iptables"),
    },
    Case {
        name: "masked",
        args: &[
            "--port",
            "8080",
            "--local",
            "--fwmark",
            "0x10/0x30",
            "--proxy-mark",
            "0x4/0x6",
        ],
        fwmark: 0x10,
        proxy_mark: (0x4, 0x6),
        local: true,
        routing: golden!("rules-masked.routing"),
        nft: golden!("rules-masked.nft"),
        iptables: golden!("rules-masked.iptables"),
    },
];

/// `scripts/rules up --dry-run` with `args`, in a network namespace of its
/// own (a dry run changes nothing, but the host's namespace is not ours to
/// run the script in).
fn dry_run(args: &[&str], backend: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rules");
    let out = Command::new("unshare")
        .args(["-n", script, "up", "--dry-run", "--backend", backend])
        .args(args)
        .output()
        .expect("run unshare (util-linux)");
    assert!(
        out.status.success(),
        "unshare -n scripts/rules up --dry-run --backend {backend} {args:?} (needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The dry run cut where the firewall part begins: (routing, firewall).
fn cut(printed: &str) -> (&str, &str) {
    let at = printed
        .find("\n# nft -f -\n")
        .or_else(|| printed.find("\n# iptables-restore --noflush\n"))
        .expect("a firewall section after the policy routing");
    printed.split_at(at + 1)
}

/// An iptables golden file as `iptables-save` shows it once `up` has run:
/// the jumps its comments announce added to the built-in chains.
fn as_installed(golden: &str) -> String {
    let mut out = golden.to_string();
    for line in golden.lines() {
        let jump = line
            .strip_prefix("# then, unless present: -t mangle ")
            .or_else(|| line.strip_prefix("# and: -t mangle "));
        if let Some(jump) = jump {
            out.push_str(jump);
            out.push('\n');
        }
    }
    out
}

#[test]
fn golden_files_are_what_scripts_rules_prints() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/doctor/golden");
    let bless = std::env::var_os("TPROXYD_BLESS").is_some();
    for case in &CASES {
        for (backend, shipped) in [("nft", case.nft), ("iptables", case.iptables)] {
            let printed = dry_run(case.args, backend);
            let (routing, firewall) = cut(&printed);
            if bless {
                let write = |ext: &str, text: &str| {
                    std::fs::write(format!("{dir}/rules-{}.{ext}", case.name), text)
                        .expect("write a golden file");
                };
                write("routing", routing);
                write(backend, firewall);
                continue;
            }
            assert!(
                routing == case.routing && firewall == shipped,
                "GOLD-1: src/doctor/golden/rules-{}.{{routing,{backend}}} are not what \
                 scripts/rules up --dry-run --backend {backend} {:?} prints: regenerate \
                 them with TPROXYD_BLESS=1 cargo test --bins doctor::golden, and check \
                 that doctor's parsers still read them",
                case.name,
                case.args
            );
        }
    }
}

#[test]
fn the_routing_files_name_the_fwmark_and_the_table() {
    for case in &CASES {
        let want = vec![(case.fwmark, "100".to_string()); 2];
        assert_eq!(fwmark_rules(case.routing), want, "{}", case.name);
    }
}

#[test]
fn nft_parsers_read_the_generated_ruleset() {
    for case in &CASES {
        let n = case.name;
        assert_eq!(
            nft_tproxy_rules(case.nft),
            vec![TproxyRule {
                port: 8080,
                mark: Some(case.fwmark)
            }],
            "{n}"
        );
        // The fast path is on every interface, whatever --in-iface says.
        let paths = socket_paths(case.nft, "");
        assert!(paths.tcp, "{n}");
        assert_eq!(paths.udp_marks, vec![case.proxy_mark], "{n}");
        let skips = local_skip_marks(case.nft, "");
        assert_eq!(skips, case.local.then(|| vec![case.proxy_mark]), "{n}");
        assert!(!has_notrack(case.nft), "{n}");
    }
}

#[test]
fn iptables_parsers_read_the_generated_payloads() {
    for case in &CASES {
        let n = case.name;
        let ipt = as_installed(case.iptables);
        let rule = TproxyRule {
            port: 8080,
            mark: Some(case.fwmark),
        };
        // TCP and UDP, IPv4 and IPv6.
        assert_eq!(iptables_tproxy_rules(&ipt), vec![rule; 4], "{n}");
        let paths = socket_paths("", &ipt);
        assert!(paths.tcp, "{n}");
        assert_eq!(paths.udp_marks, vec![case.proxy_mark; 2], "{n}");
        let skips = local_skip_marks("", &ipt);
        assert_eq!(skips, case.local.then(|| vec![case.proxy_mark; 2]), "{n}");
        assert!(!has_notrack(&ipt), "{n}");
        // Without the jump from PREROUTING the chain catches nothing.
        assert!(!socket_paths("", case.iptables).tcp, "{n}");
    }
}

/// The checks that judge the firewall, on facts made of a golden file.
#[test]
fn checks_pass_the_generated_rules_with_the_matching_tproxyd_options() {
    let judge = |f: &Facts, args: &[&str], check: &str| {
        let cfg = cfg(args);
        let lines: Vec<_> = ALL.iter().map(|c| c(&cfg, f)).collect();
        let c = lines
            .into_iter()
            .find(|c| c.name == check)
            .unwrap_or_else(|| panic!("no check named {check}"));
        (c.status, c.to_string())
    };
    for case in &CASES {
        let n = case.name;
        let (value, _) = case.proxy_mark;
        let mark = value.to_string();
        for f in [
            Facts {
                nft: case.nft.to_string(),
                ..Facts::default()
            },
            Facts {
                iptables: as_installed(case.iptables),
                ..Facts::default()
            },
        ] {
            for check in ["kernel TPROXY support", "TPROXY rules"] {
                let (st, line) = judge(&f, &[], check);
                assert_eq!(st, Status::Pass, "{n}: {line}");
            }
            let (st, line) = judge(
                &f,
                &["--spoof-source", "--mark", &mark],
                "spoof-source return path",
            );
            assert_eq!(st, Status::Pass, "{n}: {line}");
            let (st, line) = judge(&f, &["--mark", &mark], "own traffic");
            assert_eq!(st, Status::Pass, "{n}: {line}");
            if case.local {
                // The wrong mark loops, and doctor says so.
                let (st, line) = judge(&f, &["--mark", "0x1"], "own traffic");
                assert_eq!(st, Status::Fail, "{n}: {line}");
            }
        }
    }
}
