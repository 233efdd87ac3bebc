//! The pure parsers behind doctor's facts: what `nft list ruleset`,
//! `iptables-save`, `ip rule`, `ip route`, /proc/net/tcp and the port
//! sysctls print, turned into what the checks judge. Unit-tested on
//! captured output.
//!
//! What must stay true:
//! - DOC-3: every parser is pure and total: text in, what it found out; a
//!   line it does not understand is skipped, never a panic.

/// A TPROXY rule as found in a ruleset: the port it diverts to and the mark
/// it sets (if it sets one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TproxyRule {
    pub port: u16,
    pub mark: Option<u32>,
}

fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// TPROXY rules in `nft list ruleset` output.
pub fn nft_tproxy_rules(ruleset: &str) -> Vec<TproxyRule> {
    let mut out = Vec::new();
    for line in ruleset.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(t) = words.iter().position(|w| *w == "tproxy") else {
            continue;
        };
        // "tproxy to :8080", "tproxy ip to 127.0.0.1:8080", "tproxy ip6 to [::1]:8080"
        let Some(to) = words[t..].iter().position(|w| *w == "to").map(|i| t + i) else {
            continue;
        };
        let Some(port) = words
            .get(to + 1)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
        else {
            continue;
        };
        // "meta mark set 0x1", or a masked set: "meta mark set meta mark |
        // 0x1" or "meta mark set meta mark & 0xffffffcf | 0x10" (how nft
        // lists it, and how scripts/rules writes it, when the mask is more
        // than the mark's own bits).
        let mark = words
            .windows(3)
            .position(|w| w == ["meta", "mark", "set"])
            .and_then(|i| match words.get(i + 3) {
                Some(&"meta") => match words.get(i + 5) {
                    Some(&"|") => words.get(i + 6),
                    Some(&"&") => words.get(i + 8).filter(|_| words.get(i + 7) == Some(&"|")),
                    _ => None,
                },
                other => other,
            })
            .and_then(|v| parse_u32(v));
        out.push(TproxyRule { port, mark });
    }
    out
}

/// TPROXY rules in `iptables-save` / `ip6tables-save` output.
pub fn iptables_tproxy_rules(save: &str) -> Vec<TproxyRule> {
    let mut out = Vec::new();
    for line in save.lines() {
        if !line.contains("-j TPROXY") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let arg = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let Some(port) = arg("--on-port").and_then(|p| p.parse().ok()) else {
            continue;
        };
        let mark = arg("--tproxy-mark").and_then(|m| parse_u32(m.split('/').next().unwrap_or(m)));
        out.push(TproxyRule { port, mark });
    }
    out
}

/// `fwmark M[/MASK] lookup TABLE` rules in `ip rule show` output.
pub fn fwmark_rules(rules: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for line in rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mark = words
            .iter()
            .position(|w| *w == "fwmark")
            .and_then(|i| words.get(i + 1))
            .and_then(|m| parse_u32(m.split('/').next().unwrap_or(m)));
        let table = words
            .iter()
            .position(|w| *w == "lookup" || *w == "table")
            .and_then(|i| words.get(i + 1));
        if let (Some(m), Some(t)) = (mark, table) {
            out.push((m, t.to_string()));
        }
    }
    out
}

/// Does `ip route show table T` output hold a `local default` route?
pub fn has_local_default(routes: &str) -> bool {
    routes.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("local") && matches!(w.next(), Some("default" | "0.0.0.0/0" | "::/0"))
    })
}

/// Is there a NOTRACK (raw-table) rule in an nft ruleset or iptables-save?
pub fn has_notrack(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        l.split_whitespace().any(|w| w == "notrack")
            || l.contains("-j NOTRACK")
            || l.contains("--notrack")
    })
}

/// When the rules also intercept this host's own traffic (an nft `output`
/// hook chain in `table inet tproxyd`, or iptables' `TPROXYD_OUT`), the
/// marks they let through untouched as (value, mask): tproxyd's own
/// upstream sockets must carry one, or its connections loop back into it.
/// `None` when there is no local interception.
pub fn local_skip_marks(nft: &str, ipt: &str) -> Option<Vec<(u32, u32)>> {
    let mut found = false;
    let mut marks = Vec::new();
    let mut in_ours = false;
    let mut in_output = false;
    for line in nft.lines() {
        let l = line.trim();
        if l.starts_with("table ") {
            in_ours = l.starts_with("table inet tproxyd {");
            in_output = false;
        } else if in_ours && l.starts_with("chain ") {
            in_output = false;
        } else if in_ours && l.contains("hook output") {
            in_output = true;
            found = true;
        } else if in_output && l.ends_with("return") {
            // meta mark & 0x00000002 == 0x00000002 ... return
            let w: Vec<&str> = l.split_whitespace().collect();
            if let Some(i) = w.windows(3).position(|x| x[0] == "mark" && x[1] == "&")
                && let (Some(mask), Some(val)) = (
                    w.get(i + 2).and_then(|m| parse_u32(m)),
                    w.get(i + 4).and_then(|v| parse_u32(v)),
                )
            {
                marks.push((val, mask));
            }
        }
    }
    for line in ipt.lines() {
        if line.starts_with(":TPROXYD_OUT") {
            found = true;
        }
        if let Some(rest) = line.strip_prefix("-A TPROXYD_OUT -m mark --mark ")
            && rest.ends_with("-j RETURN")
        {
            let spec = rest.split_whitespace().next().unwrap_or("");
            let (v, m) = spec.split_once('/').unwrap_or((spec, "0xffffffff"));
            if let (Some(v), Some(m)) = (parse_u32(v), parse_u32(m)) {
                marks.push((v, m));
            }
        }
    }
    found.then_some(marks)
}

/// The socket fast path scripts/rules puts first in prerouting, as found:
/// rules that mark, on every interface, packets for a transparent socket of
/// this host. With `--spoof-source` the servers' answers to the clients'
/// addresses reach tproxyd only through such rules, and they come in on the
/// server's interface, so a rule limited to some interfaces does not count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SocketPaths {
    /// A rule that takes TCP (or any protocol).
    pub tcp: bool,
    /// Rules for UDP that take only sockets carrying a mark, as (value,
    /// mask): tproxyd's reply sockets are transparent too and must not get
    /// clients' datagrams, so a UDP rule without that match is not one.
    pub udp_marks: Vec<(u32, u32)>,
}

/// `socket mark & 0xM == 0xV` (nft) in a rule's words, as (value, mask).
fn nft_socket_mark(words: &[&str]) -> Option<(u32, u32)> {
    let i = words
        .windows(3)
        .position(|x| x[0] == "socket" && x[1] == "mark" && x[2] == "&")?;
    let mask = parse_u32(words.get(i + 3)?)?;
    (words.get(i + 4) == Some(&"==")).then_some(())?;
    Some((parse_u32(words.get(i + 5)?)?, mask))
}

pub fn socket_paths(nft: &str, ipt: &str) -> SocketPaths {
    let mut out = SocketPaths::default();
    let mut in_prerouting = false;
    for line in nft.lines() {
        let l = line.trim();
        if l.starts_with("chain ") || l.starts_with("table ") {
            in_prerouting = false;
        } else if l.contains("hook prerouting") {
            in_prerouting = true;
        } else if in_prerouting
            && l.contains("socket transparent 1")
            && l.contains("mark set")
            && !l.contains("iifname")
            && !l.contains("iif ")
        {
            if l.contains("l4proto udp") {
                let words: Vec<&str> = l.split_whitespace().collect();
                out.udp_marks.extend(nft_socket_mark(&words));
            } else {
                out.tcp = true;
            }
        }
    }
    // iptables-save: in PREROUTING itself, or in scripts/rules' chain that
    // PREROUTING jumps to for every packet.
    let pre_jumps_to_ours = ipt.lines().any(|l| l == "-A PREROUTING -j TPROXYD_PRE");
    for l in ipt.lines() {
        let in_chain = l.starts_with("-A PREROUTING ")
            || (pre_jumps_to_ours && l.starts_with("-A TPROXYD_PRE "));
        if !(in_chain && l.contains("-m socket --transparent") && !l.contains(" -i ")) {
            continue;
        }
        if !l.contains("-p udp") {
            out.tcp = true;
        } else if l.contains("--restore-skmark")
            && let Some(spec) = l
                .split_once("-m mark --mark ")
                .and_then(|(_, r)| r.split_whitespace().next())
        {
            let (v, m) = spec.split_once('/').unwrap_or((spec, "0xffffffff"));
            if let (Some(v), Some(m)) = (parse_u32(v), parse_u32(m)) {
                out.udp_marks.push((v, m));
            }
        }
    }
    out
}

/// Ports with a listening TCP socket in /proc/net/tcp{,6} text.
pub fn listening_ports(proc_net_tcp: &str) -> Vec<u16> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN.
            (f.get(3) == Some(&"0A"))
                .then(|| f.get(1)?.rsplit(':').next())
                .flatten()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
        })
        .collect()
}

/// "32768\t60999" -> (32768, 60999).
pub fn parse_port_range(s: &str) -> Option<(u32, u32)> {
    let mut w = s.split_whitespace().map(|n| n.parse::<u32>().ok());
    match (w.next()??, w.next()??) {
        (lo, hi) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// How many ports of `lo..=hi` the reserved list ("8080,9000-9010") holds:
/// connect never picks those.
pub fn reserved_ports_in(list: &str, lo: u32, hi: u32) -> u32 {
    list.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
        })
        .map(|(a, b)| {
            let (a, b) = (a.max(lo), b.min(hi));
            if a <= b { b - a + 1 } else { 0 }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_counts_only_on_every_interface() {
        let ours = "table inet tproxyd {\n\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\tmeta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set meta mark & 0xfffffffe | 0x00000001 counter packets 0 bytes 0 accept\n\t\tmeta l4proto udp socket transparent 1 socket wildcard 0 socket mark & 0x00000002 == 0x00000002 meta mark set meta mark & 0xfffffffe | 0x00000001 counter packets 0 bytes 0 accept\n\t\tiifname != \"lo\" counter packets 0 bytes 0 jump divert\n\t}\n\tchain divert {\n\t\tfib daddr type local return\n\t}\n}\n";
        let found = socket_paths(ours, "");
        assert!(found.tcp);
        assert_eq!(found.udp_marks, vec![(2, 2)]);
        // Only on one interface, or in a chain that is not prerouting: no.
        let one_iface = ours.replace(
            "meta l4proto tcp socket",
            "iifname \"eth1\" meta l4proto tcp socket",
        );
        assert!(!socket_paths(&one_iface, "").tcp);
        let in_divert = "table inet t {\n\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\tiifname \"eth1\" jump divert\n\t}\n\tchain divert {\n\t\tmeta l4proto tcp socket transparent 1 meta mark set 0x1 accept\n\t}\n}\n";
        assert_eq!(socket_paths(in_divert, ""), SocketPaths::default());
        // A UDP rule without a socket mark match does not count for UDP.
        let unmarked = ours.replace("socket mark & 0x00000002 == 0x00000002 ", "");
        assert!(socket_paths(&unmarked, "").udp_marks.is_empty());
        // iptables: scripts/rules' layout, and the same rule limited to eth1.
        let ipt = "*mangle\n:TPROXYD_PRE - [0:0]\n-A PREROUTING -j TPROXYD_PRE\n-A TPROXYD_PRE -p tcp -m socket --transparent --nowildcard -j TPROXYD_EST\n-A TPROXYD_PRE -p udp -m socket --transparent --nowildcard --restore-skmark -m mark --mark 0x2/0x2 -j TPROXYD_EST\n-A TPROXYD_PRE ! -i lo -j TPROXYD_DIVERT\nCOMMIT\n";
        let found = socket_paths("", ipt);
        assert!(found.tcp);
        assert_eq!(found.udp_marks, vec![(2, 2)]);
        let ipt_eth1 = ipt.replace("-A TPROXYD_PRE -p tcp", "-A TPROXYD_PRE -i eth1 -p tcp");
        assert!(!socket_paths("", &ipt_eth1).tcp);
        assert_eq!(socket_paths("", ""), SocketPaths::default());
    }

    #[test]
    fn finds_nft_tproxy_rules() {
        let ruleset = "table inet lab {\n\tchain pre {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\tiifname \"rc\" meta l4proto { tcp, udp } tproxy to :8080 meta mark set 0x00000001 accept\n\t\tmeta l4proto tcp tproxy ip to 127.0.0.1:9000\n\t}\n}\n";
        assert_eq!(
            nft_tproxy_rules(ruleset),
            vec![
                TproxyRule {
                    port: 8080,
                    mark: Some(1)
                },
                TproxyRule {
                    port: 9000,
                    mark: None
                }
            ]
        );
    }

    #[test]
    fn finds_masked_nft_marks_and_the_local_skip_marks() {
        let nft = "table inet tproxyd {\n\tchain divert {\n\t\tmeta l4proto { tcp, udp } meta mark set meta mark | 0x00000001 tproxy to :8080 counter packets 0 bytes 0 accept\n\t}\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t\tmeta mark & 0x00000002 == 0x00000002 counter packets 0 bytes 0 return\n\t}\n}\ntable inet other {\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t}\n}\n";
        assert_eq!(
            nft_tproxy_rules(nft),
            vec![TproxyRule {
                port: 8080,
                mark: Some(1)
            }]
        );
        assert_eq!(local_skip_marks(nft, ""), Some(vec![(2, 2)]));
        let ipt = ":TPROXYD_OUT - [0:0]\n-A OUTPUT -j TPROXYD_OUT\n-A TPROXYD_OUT -m mark --mark 0x2/0x2 -j RETURN\n";
        assert_eq!(local_skip_marks("", ipt), Some(vec![(2, 2)]));
        assert_eq!(
            local_skip_marks(
                "table inet other {\n chain output {\n type route hook output priority mangle;\n }\n}",
                ""
            ),
            None
        );
    }

    #[test]
    fn finds_iptables_tproxy_rules() {
        let save = "*mangle\n-A TPROXYD_PRE -p tcp -j TPROXY --on-port 8080 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1\n-A X -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            iptables_tproxy_rules(save),
            vec![TproxyRule {
                port: 8080,
                mark: Some(1)
            }]
        );
    }

    #[test]
    fn finds_fwmark_rules_and_local_routes() {
        let rules = "0:\tfrom all lookup local\n32765:\tfrom all fwmark 0x1 lookup 100\n32764:\tfrom all fwmark 0x2/0xff lookup tproxy\n32766:\tfrom all lookup main\n";
        assert_eq!(
            fwmark_rules(rules),
            vec![(1, "100".to_string()), (2, "tproxy".to_string())]
        );
        assert!(has_local_default("local default dev lo scope host \n"));
        assert!(has_local_default(
            "local ::/0 dev lo metric 1024 pref medium\n"
        ));
        assert!(!has_local_default(
            "default via 198.18.0.1 dev eth0\nlocal 198.18.0.1 dev eth0\n"
        ));
    }

    #[test]
    fn finds_notrack_and_listeners() {
        assert!(has_notrack(
            "table inet tproxyd_raw {\n chain pre {\n  tcp dport 80 notrack\n }\n}"
        ));
        assert!(has_notrack("-A PREROUTING -p tcp -j CT --notrack"));
        assert!(!has_notrack("table inet x {\n chain y {\n  accept\n }\n}"));
        let tcp = "  sl  local_address rem_address   st\n   0: 00000000:1F90 00000000:0000 0A 0\n   1: 0100007F:0050 0200007F:C000 01 0\n";
        assert_eq!(listening_ports(tcp), vec![8080]);
    }

    #[test]
    fn source_port_facts_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range(""), None);
        assert_eq!(reserved_ports_in("", 32768, 60999), 0);
        assert_eq!(
            reserved_ports_in("8080,40000-40009,60990-61010\n", 32768, 60999),
            20
        );
        assert_eq!(reserved_ports_in("junk,1-", 1, 10), 0);
    }

    #[test]
    fn finds_the_mark_an_nft_rule_sets_under_a_mask() {
        // scripts/rules writes `meta mark & ~MASK | MARK`; nft lists it so
        // unless the mask is the mark's one bit (then `meta mark | MARK`).
        let listed = "\t\tmeta l4proto { tcp, udp } meta mark set meta mark & 0xffffffdf | 0x00000010 tproxy to :8080 counter packets 0 bytes 0 accept\n";
        let written = "\t\tmeta l4proto { tcp, udp } meta mark set meta mark & 0xfffffffe | 0x1 tproxy to :8080 counter accept\n";
        let rule = |mark| vec![TproxyRule { port: 8080, mark }];
        assert_eq!(nft_tproxy_rules(listed), rule(Some(0x10)));
        assert_eq!(nft_tproxy_rules(written), rule(Some(0x1)));
        // Clearing bits sets no mark of its own.
        let cleared = "meta mark set meta mark & 0xfffffffe tproxy to :8080 accept";
        assert_eq!(nft_tproxy_rules(cleared), rule(None));
    }
}
