//! `tproxyd doctor`: checks that this host is set up for the configuration
//! the same options would run, one line per check (PASS, WARN or FAIL) with
//! the fix for each.
//!
//! Three rooms: facts.rs probes the host once into a plain `Facts` (the
//! kernel's /proc and /sys, a test socket, the host's own `ip`, `nft` and
//! `iptables-save`); parse.rs holds the pure parsers for what those print;
//! checks.rs judges, each check a pure function of the configuration and
//! the facts. This file runs facts, then checks, then the report.
//!
//! What must stay true:
//! - DOC-1: doctor changes nothing on the host: it only reads, and the one
//!   socket it opens is closed again.
//! - DOC-2: the exit status is 0 exactly when no check failed; a check that
//!   cannot tell is a WARN, never a silent PASS.

use crate::config::Config;

mod checks;
mod facts;
#[cfg(test)]
mod golden;
mod parse;
mod ports;

use checks::{Check, Status};
use facts::Facts;

/// Probe the host once, then every check, in the order they are printed.
fn checks(cfg: &Config) -> Vec<Check> {
    let facts = Facts::probe(cfg);
    checks::ALL.iter().map(|check| check(cfg, &facts)).collect()
}

/// Run every check, print one line each; true when none failed (DOC-2).
pub fn run_doctor(cfg: &Config) -> bool {
    let results = checks(cfg);
    for c in &results {
        println!("{c}");
    }
    let failed = results.iter().filter(|c| c.status == Status::Fail).count();
    let warned = results.iter().filter(|c| c.status == Status::Warn).count();
    println!(
        "{} checks: {} passed, {} warned, {} failed",
        results.len(),
        results.len() - failed - warned,
        warned,
        failed
    );
    failed == 0
}

#[cfg(test)]
pub(crate) fn cfg(args: &[&str]) -> Config {
    let mut all = vec!["--port", "8080"];
    all.extend_from_slice(args);
    cfg_of(all)
}

#[cfg(test)]
pub(crate) fn cfg_of(args: Vec<&str>) -> Config {
    match crate::config::parse(args) {
        Ok(crate::config::Command::Run(c)) => c,
        other => panic!("{other:?}"),
    }
}
