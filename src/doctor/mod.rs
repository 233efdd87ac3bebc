//! `tproxyd doctor`: checks that this host is set up for the configuration
//! the same options would run, one line per check (PASS, WARN or FAIL) with
//! the fix for each.
//!
//! The facts come from the kernel (/proc, /sys, a test socket) and from the
//! host's own tools (`ip`, `nft`, `iptables-save`); what is read is parsed by
//! pure functions below, unit-tested on captured output.
//!
//! What must stay true:
//! - DOC-1: doctor changes nothing on the host: it only reads, and the one
//!   socket it opens is closed again.
//! - DOC-2: the exit status is 0 exactly when no check failed; a check that
//!   cannot tell is a WARN, never a silent PASS.

use crate::config::Config;

mod checks;
mod facts;
mod parse;

use checks::*;
use facts::*;
use parse::*;

/// Every check, in the order they are printed.
pub fn checks(cfg: &Config) -> Vec<Check> {
    let nft = run("nft", &["list", "ruleset"]).unwrap_or_default();
    let ipt = [run("iptables-save", &[]), run("ip6tables-save", &[])]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("\n");
    let mut rules = nft_tproxy_rules(&nft);
    rules.extend(iptables_tproxy_rules(&ipt));

    let mut out = vec![kernel_support(!rules.is_empty()), capability(cfg)];
    let marks: Vec<u32> = rules.iter().filter_map(|r| r.mark).collect();
    for (family, flag, any) in [("IPv4", "-4", "0.0.0.0/0"), ("IPv6", "-6", "::/0")] {
        out.push(policy_route(family, flag, any, &marks));
    }
    out.push(rules_point_at_port(cfg, &rules));
    out.push(local_mark(cfg, local_skip_marks(&nft, &ipt)));
    out.push(spoof_return_path(cfg, &socket_paths(&nft, &ipt)));
    out.push(listening(cfg));
    out.push(ip_forward());
    out.push(rp_filter());
    out.push(nofile(cfg));
    // Both pipe checks judge the same privilege and bulk size: learnt once.
    let exempt = crate::budget::process_exempt_from_pipe_limit();
    let (bulk, _) = crate::budget::bulk_pipe_size(cfg);
    out.push(pipe_size(cfg, bulk, exempt));
    out.push(pipe_pages(cfg, bulk, exempt));
    out.push(notrack(&nft, &ipt));
    out.push(source_ports(cfg, &port_facts()));
    out
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
