//! The values of single flags: ports, addresses, counts, durations, sizes,
//! marks and prefixes, each read from its text into its type or refused
//! with the one line that names the flag (CFG-1). Pure, no I/O.
//!
//! What must stay true: CFG-1 (a bad value is one `UsageError` naming its
//! flag, never a panic), and CFG-4: a parser accepts only what can work
//! (an IPv4-mapped IPv6 address, which a V6ONLY socket can never bind, is
//! refused with the address to give instead).

use std::net::IpAddr;
use std::time::Duration;

use super::{ClientPrefix, UsageError};

pub(super) fn parse_port(s: &str) -> Result<u16, UsageError> {
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(UsageError(format!(
            "--port '{s}': expected a port from 1 to 65535"
        ))),
    }
}

/// An IP address given to `flag`, bare or in brackets. IPv4-mapped IPv6
/// addresses are refused: IPv6 sockets here are V6ONLY, so one could never
/// be bound; the IPv4 address itself is what works.
pub(super) fn parse_ip(flag: &str, s: &str, expected: &str) -> Result<IpAddr, UsageError> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    let ip = bare
        .parse::<IpAddr>()
        .map_err(|_| UsageError(format!("{flag} '{s}': expected {expected}")))?;
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(UsageError(format!(
            "{flag} '{s}': an IPv4-mapped address; give the IPv4 address {v4}"
        )));
    }
    Ok(ip)
}

pub(super) fn parse_listen(s: &str) -> Result<IpAddr, UsageError> {
    parse_ip("--listen", s, "an IP address (the port comes from --port)")
}

/// An address of this host to connect upstream from. Whether it is one is
/// for the daemon to check (it needs the host); here only what can never work.
pub(super) fn parse_source(s: &str) -> Result<IpAddr, UsageError> {
    let ip = parse_ip(
        "--source",
        s,
        "an IP address of this host (no port: the kernel picks it)",
    )?;
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255u8; 4]) {
        return Err(UsageError(format!(
            "--source '{s}': not an address a connection can come from"
        )));
    }
    Ok(ip)
}

/// getopts cannot carry a value that is not UTF-8 and would report it as an
/// unknown option; name the flag it belongs to instead (CFG-1).
pub(super) fn check_utf8(args: &[std::ffi::OsString]) -> Result<(), UsageError> {
    for (i, a) in args.iter().enumerate() {
        if a.to_str().is_some() {
            continue;
        }
        let lossy = a.to_string_lossy();
        let flag = if lossy.starts_with("--") {
            lossy.split('=').next().unwrap_or(&lossy).to_string()
        } else {
            match i.checked_sub(1).and_then(|p| args[p].to_str()) {
                Some(prev) if prev.starts_with('-') => prev.to_string(),
                _ => return Err(UsageError(format!("argument '{lossy}' is not valid UTF-8"))),
            }
        };
        return Err(UsageError(format!("{flag}: the value is not valid UTF-8")));
    }
    Ok(())
}

pub(super) fn parse_count(
    flag: &str,
    s: &str,
    min: usize,
    max: usize,
) -> Result<usize, UsageError> {
    match s.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(UsageError(format!(
            "{flag} '{s}': expected a whole number from {min} to {max}"
        ))),
    }
}

/// `V4LEN,V6LEN`, e.g. `32,64` or `24,48`. A length of 0 would make every
/// client of a family one, which is `--max-conns`: refused as a mistake.
pub(super) fn parse_client_prefix(s: &str) -> Result<ClientPrefix, UsageError> {
    let len = |t: &str, max: u8| t.parse::<u8>().ok().filter(|n| (1..=max).contains(n));
    s.split_once(',')
        .and_then(|(a, b)| {
            Some(ClientPrefix {
                v4: len(a, 32)?,
                v6: len(b, 128)?,
            })
        })
        .ok_or_else(|| {
            UsageError(format!(
                "--client-prefix '{s}': expected V4LEN,V6LEN, an IPv4 prefix length from 1 to 32 and an IPv6 one from 1 to 128 (e.g. 32,64)"
            ))
        })
}

pub(super) fn parse_mark(s: &str) -> Result<u32, UsageError> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    match parsed {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(UsageError(format!(
            "--mark '{s}': expected a non-zero 32-bit number, decimal or 0x hex"
        ))),
    }
}

pub(super) fn opt_duration(
    m: &getopts::Matches,
    name: &str,
    default: Duration,
) -> Result<Duration, UsageError> {
    match m.opt_str(name) {
        None => Ok(default),
        Some(s) => parse_duration(&s).ok_or_else(|| {
            UsageError(format!(
                "--{name} '{s}': expected a duration like 50us, 500ms, 5s, 2m or 1h"
            ))
        }),
    }
}

/// `50us`, `500ms`, `5s`, `2m`, `1h`, or a bare `0`. A bare non-zero number
/// is refused: seconds or milliseconds would be a guess.
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let us = match unit {
        "us" => Some(n),
        "ms" => n.checked_mul(1_000),
        "s" => n.checked_mul(1_000_000),
        "m" => n.checked_mul(60_000_000),
        "h" => n.checked_mul(3_600_000_000),
        _ => None,
    }?;
    // Beyond ~10 years a timeout is a typo, and Instant arithmetic could overflow.
    (us <= 315_360_000_000_000).then(|| Duration::from_micros(us))
}

/// Bytes with an optional k/m suffix (binary units).
pub(super) fn parse_size(flag: &str, s: &str, min: usize, max: usize) -> Result<usize, UsageError> {
    let err = || {
        UsageError(format!(
            "{flag} '{s}': expected bytes from {min} to {max}, optionally with k or m (e.g. 256k)"
        ))
    };
    let lower = s.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix('k') {
        (n, 1024)
    } else if let Some(n) = lower.strip_suffix('m') {
        (n, 1024 * 1024)
    } else {
        (lower.as_str(), 1)
    };
    let n: usize = num.parse().map_err(|_| err())?;
    let v = n.checked_mul(mult).ok_or_else(err)?;
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50us"), Some(Duration::from_micros(50)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in [
            "",
            "5",
            "5x",
            "5µs",
            "5US",
            "s",
            "-1s",
            "1.5s",
            "5 s",
            "99999999999999999999s",
            "4000000h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
