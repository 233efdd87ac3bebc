#!/usr/bin/env python3
"""Turns a bench run (results.json) into figures: medians per setup, ratios to
direct and to HAProxy, the issue's targets, a text table, results.md and a
hand-drawn SVG of the ratios.

    python3 benches/harness/report.py [DIR]     re-render DIR/results.json

Every figure is the median over the repetitions of one case's metric. A ratio
is always tproxyd's value divided by the baseline's (so for a lower-is-better
figure, below 1 is good); the chart flips lower-is-better ratios so that its
bars read "longer is better for tproxyd".
"""

import html
import json
import math
import os
import statistics
import sys
from collections import namedtuple

# section: "main" (the main table) or "udp" (the UDP table); chart: drawn in
# the SVG.
Figure = namedtuple("Figure", "key label unit case metric better decimals targets section chart",
                    defaults=("main", True))

# Issue 11's UDP rows: (case, flows, datagram bytes, datagrams/s offered or
# None for as fast as the sender can). 1 flow is iperf3; 1,000 flows is
# examples/udp_load.rs (iperf3 stops at 128 streams). bench.py runs them.
UDP_FIXED_DPS = 100_000
UDP_MANY_FLOWS = 1000
UDP_CASES = [
    (f"udp{'1' if flows == 1 else '1k'}_{length}_{'max' if rate is None else '100k'}_v4", flows, length, rate)
    for flows in (1, UDP_MANY_FLOWS) for length in (64, 1200) for rate in (None, UDP_FIXED_DPS)
]
# The names older results.json files (and --cases) gave the 1-flow 64-byte rows.
CASE_ALIASES = {"udp_max_v4": "udp1_64_max_v4", "udp_fixed_v4": "udp1_64_100k_v4"}
# Issue 11: half of the ~4.5 µs per datagram measured before it.
UDP_PROXY_CPU_US = 2.25


def udp_case_text(flows, length, rate):
    return (f"{'1 flow' if flows == 1 else f'{flows:,} flows'}, {length} B, "
            + ("full rate" if rate is None else f"{rate // 1000}k/s offered"))


def udp_figures():
    out = []
    for case, flows, length, rate in UDP_CASES:
        t = "UDP " + udp_case_text(flows, length, rate)
        full = rate is None
        dps_targets = [("direct", ">=", 0.7)] if full and length == 64 else []
        out += [
            Figure(f"{case}_sent", f"{t}: sent/s", "dgram/s", case, "sent_dps", "hi", 0, [], "udp", False),
            Figure(f"{case}_dps", f"{t}: delivered/s", "dgram/s", case, "delivered_dps", "hi", 0, dps_targets,
                   "udp"),
        ]
        if length == 1200:
            out.append(Figure(f"{case}_gbps", f"{t}: Gbit/s delivered", "Gbit/s", case, "delivered_gbps", "hi", 3,
                              [("direct", ">=", 0.8)] if full else [], "udp", False))
        out += [
            Figure(f"{case}_loss", f"{t}: loss", "%", case, "loss_pct", "lo", 2,
                   [] if full else [("abs", "<", 1.0)], "udp", False),
            Figure(f"{case}_rdrop", f"{t}: dropped at the proxy's listeners (router's full receive buffers)", "%",
                   case, "router_drop_pct", "lo", 2, [], "udp", False),
            Figure(f"{case}_sdrop", f"{t}: dropped at the receiver's socket (server's full receive buffer)", "%",
                   case, "server_drop_pct", "lo", 2, [], "udp", False),
            Figure(f"{case}_pcpu", f"{t}: proxy CPU per forwarded datagram", "µs", case,
                   "proxy_cpu_us_per_dgram", "lo", 2, [("abs", "<=", UDP_PROXY_CPU_US)], "udp", False),
            Figure(f"{case}_mcpu", f"{t}: machine CPU per delivered datagram", "µs", case,
                   "machine_cpu_us_per_dgram", "lo", 2, [], "udp"),
            Figure(f"{case}_lcpu", f"{t}: load tools' CPU per delivered datagram", "µs", case,
                   "loadgen_cpu_us_per_dgram", "lo", 2, [], "udp", False),
        ]
    return out


def udp_derived(m, length):
    """A UDP run's figures computed from what it recorded: the proxy's CPU per
    datagram it forwarded (those that reached the server's namespace), the
    machine's and the load tools' CPU per datagram delivered, the delivered
    payload in Gbit/s, and the shares of the datagrams sent that full
    receive buffers dropped in the router (the proxy's listeners) and in the
    server (the receiver's socket)."""
    out = {}
    sent = m.get("datagrams_sent") or 0
    delivered = sent - (m.get("datagrams_lost") or 0)
    if sent > 0:
        for where in ("router", "server"):
            if f"{where}_UdpRcvbufErrors" in m:
                out[f"{where}_drop_pct"] = round(100.0 * m[f"{where}_UdpRcvbufErrors"] / sent, 3)
    fwd = m.get("forwarded_datagrams")
    if fwd is None and "server_UdpInDatagrams" in m:
        fwd = m["server_UdpInDatagrams"] + m.get("server_UdpRcvbufErrors", 0)
    if m.get("proxy_cpu_s") is not None and fwd:
        out["proxy_cpu_us_per_dgram"] = round(1e6 * m["proxy_cpu_s"] / fwd, 3)
    mc = m.get("machine_cpu_s")
    if isinstance(mc, dict) and delivered > 0:
        out["machine_cpu_us_per_dgram"] = round(1e6 * mc["busy"] / delivered, 3)
    if m.get("loadgen_cpu_s") is not None and delivered > 0:
        out["loadgen_cpu_us_per_dgram"] = round(1e6 * m["loadgen_cpu_s"] / delivered, 3)
    if m.get("delivered_dps") is not None:
        out["delivered_gbps"] = round(m["delivered_dps"] * length * 8 / 1e9, 4)
    return out


ONE_STREAM = [("haproxy", ">=", 1.25), ("direct", ">=", 0.85)]
FIGURES = [
    Figure("tcp1_up_v4", "TCP 1 stream, client→server, IPv4", "Gbit/s", "tcp1_up_v4", "gbps", "hi", 2, ONE_STREAM),
    Figure("tcp1_down_v4", "TCP 1 stream, server→client (-R), IPv4", "Gbit/s", "tcp1_down_v4", "gbps", "hi", 2, ONE_STREAM),
    Figure("tcp4_up_v4", "TCP 4 streams, IPv4", "Gbit/s", "tcp4_up_v4", "gbps", "hi", 2, [("haproxy", ">=", 1.25)]),
    Figure("tcp1_up_v6", "TCP 1 stream, client→server, IPv6", "Gbit/s", "tcp1_up_v6", "gbps", "hi", 2, ONE_STREAM),
    Figure("tcp1_down_v6", "TCP 1 stream, server→client (-R), IPv6", "Gbit/s", "tcp1_down_v6", "gbps", "hi", 2, ONE_STREAM),
    Figure("tcp4_up_v6", "TCP 4 streams, IPv6", "Gbit/s", "tcp4_up_v6", "gbps", "hi", 2, [("haproxy", ">=", 1.25)]),
    Figure("cpu_full", "proxy CPU per GB, full rate (1 stream, v4)", "s/GB", "tcp1_up_v4", "proxy_cpu_s_per_gb", "lo", 3,
           [("haproxy", "<=", 0.75)]),
    Figure("cpu_fixed", "proxy CPU per GB at -b 2G (1 stream, v4)", "s/GB", "tcp1_2g_v4", "proxy_cpu_s_per_gb", "lo", 3,
           [("haproxy", "<=", 0.75)]),
    Figure("rate_fixed", "rate reached at -b 2G", "Gbit/s", "tcp1_2g_v4", "gbps", "hi", 2, []),
    Figure("mcpu_full", "machine CPU per GB, full rate (all of /proc/stat)", "s/GB", "tcp1_up_v4", "machine_cpu_s_per_gb",
           "lo", 3, []),
    Figure("mcpu_fixed", "machine CPU per GB at -b 2G (all of /proc/stat)", "s/GB", "tcp1_2g_v4", "machine_cpu_s_per_gb",
           "lo", 3, []),
    Figure("ka_rps", "HTTP keep-alive requests/s", "req/s", "http_ka", "rps", "hi", 0, [("haproxy", ">=", 1.2)]),
    Figure("ka_p50", "HTTP keep-alive latency p50", "ms", "http_ka", "p50_ms", "lo", 3, []),
    Figure("ka_p99", "HTTP keep-alive latency p99", "ms", "http_ka", "p99_ms", "lo", 3, []),
    Figure("ka_cpu", "proxy CPU per keep-alive request", "µs", "http_ka", "proxy_cpu_us_per_req", "lo", 2, []),
    Figure("close_cps", "HTTP Connection: close, connections/s", "conn/s", "http_close", "rps", "hi", 0,
           [("haproxy", ">=", 1.1), ("direct", ">=", 0.85)]),
    Figure("close_p99", "HTTP Connection: close latency p99", "ms", "http_close", "p99_ms", "lo", 3, []),
    Figure("close_cpu", "proxy CPU per Connection: close connection", "µs", "http_close", "proxy_cpu_us_per_req", "lo",
           2, []),
    Figure("close_mcpu", "machine CPU per Connection: close connection (all processes)", "µs", "http_close",
           "machine_cpu_us_per_req", "lo", 1, []),
    Figure("close_idle", "machine idle during the Connection: close run", "%", "http_close", "machine_idle_pct", "lo",
           1, []),
    Figure("close_synre", "client SYN retransmissions (close run)", "count", "http_close", "client_syn_retrans", "lo", 0,
           [("abs", "==", 0)]),
    Figure("rr_p50", "1-byte request/response p50", "µs", "rr_v4", "p50_us", "lo", 1, []),
    Figure("rr_p99", "1-byte request/response p99", "µs", "rr_v4", "p99_us", "lo", 1, [("haproxy", "<=", 1.0)]),
    Figure("rss_idle", "proxy RSS per idle connection", "bytes", "idle_v4", "rss_bytes_per_conn", "lo", 0,
           [("abs", "<=", 1024)]),
    Figure("cf_first", "client closing first: new connections/s to one server ip:port, first 10 s", "conn/s",
           "close_first_v4", "first10_cps", "hi", 0, []),
    Figure("cf_last", "… last 10 s (of 120)", "conn/s", "close_first_v4", "last10_cps", "hi", 0, []),
    Figure("cf_mean", "… over the whole run", "conn/s", "close_first_v4", "mean_cps", "hi", 0, []),
    Figure("cf_failed", "… connections failed (reset, refused, timed out)", "count", "close_first_v4", "failed",
           "lo", 0, []),
    Figure("cf_csyn", "… client SYN retransmissions", "count", "close_first_v4", "client_syn_retrans", "lo", 0, []),
    Figure("cf_rsyn", "… router SYN retransmissions (the proxy's upstream SYNs)", "count", "close_first_v4",
           "router_syn_retrans", "lo", 0, []),
] + udp_figures()
SETUPS = ("direct", "tproxyd", "haproxy", "haproxy_auto")
CPUS = os.cpu_count()
HAPROXIES = ("haproxy", "haproxy_auto")


# ---------------------------------------------------------------- numbers

UDP_DERIVED = ("proxy_cpu_us_per_dgram", "machine_cpu_us_per_dgram", "loadgen_cpu_us_per_dgram", "delivered_gbps",
               "router_drop_pct", "server_drop_pct")


def case_of(run):
    return CASE_ALIASES.get(run["case"], run["case"])


def derived(m, metric):
    """Figures computed from what a run recorded (so older results.json
    files get them too)."""
    if metric in UDP_DERIVED:
        # Runs from before these figures were recorded were all 64-byte ones.
        return udp_derived(m, m.get("len", 64)).get(metric)
    mc = m.get("machine_cpu_s")
    if not isinstance(mc, dict) or not mc.get("wall"):
        return None
    if metric == "machine_cpu_us_per_req" and m.get("requests"):
        return round(1e6 * mc["busy"] / m["requests"], 1)
    if metric == "machine_idle_pct":
        cpus = CPUS or 1
        return round(max(0.0, 100 * (1 - mc["busy"] / (cpus * mc["wall"]))), 1)
    return None


def values(results, pname, setup, fig):
    out = []
    for r in results["runs"]:
        if r["pass"] == pname and r["setup"] == setup and case_of(r) == fig.case and r.get("ok"):
            v = r["metrics"].get(fig.metric)
            if v is None:
                v = derived(r["metrics"], fig.metric)
            if v is not None:
                out.append(v)
    return out


def summarize(results):
    """{pass: {figure key: {setup: {median, min, max, n, runs}}}}."""
    s = {}
    cases = {CASE_ALIASES.get(c, c) for c in results["cases"]}
    for pname in results["passes"]:
        s[pname] = {}
        for fig in FIGURES:
            if fig.case not in cases:
                continue
            row = {}
            for setup in results["setups"]:
                v = values(results, pname, setup, fig)
                if v:
                    row[setup] = {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v),
                                  "runs": v, "setup": setup}
            # HAProxy at its best: whichever of its two splice configurations
            # did better on this figure.
            hs = [row[h] for h in HAPROXIES if h in row]
            if hs:
                pick = max if fig.better == "hi" else min
                row["haproxy_best"] = pick(hs, key=lambda x: x["median"])
            s[pname][fig.key] = row
    return s


def ratio(row, num, den):
    a, b = row.get(num), row.get(den)
    if not a or not b or b["median"] == 0:
        return None
    return a["median"] / b["median"]


def check_target(row, t):
    base, op, x = t
    if "tproxyd" not in row:
        return None
    base = "haproxy_best" if base == "haproxy" else base
    if base == "abs":
        v = row["tproxyd"]["median"]
    else:
        v = ratio(row, "tproxyd", base)
        if v is None:
            return None
    return {">=": v >= x, "<=": v <= x, "<": v < x, "==": v == x}[op]


def target_text(t):
    base, op, x = t
    op_s = {">=": "≥", "<=": "≤", "<": "<", "==": "="}[op]
    if base == "abs":
        return f"{op_s} {x:g}"
    return f"{op_s} {x:g}× {base}"


def ratios_of(results, summary):
    out = {}
    for pname, figs in summary.items():
        out[pname] = {}
        for key, row in figs.items():
            out[pname][key] = {
                "tproxyd/direct": ratio(row, "tproxyd", "direct"),
                "tproxyd/haproxy_best": ratio(row, "tproxyd", "haproxy_best"),
                "haproxy_best": row["haproxy_best"]["setup"] if "haproxy_best" in row else None,
                "tproxyd/haproxy": ratio(row, "tproxyd", "haproxy"),
                "tproxyd/haproxy_auto": ratio(row, "tproxyd", "haproxy_auto"),
                "haproxy_best/direct": ratio(row, "haproxy_best", "direct"),
            }
    return out


def fmt(v, decimals):
    if v is None:
        return "n/a"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:.{decimals}f}"


def fmt_ratio(v):
    return "n/a" if v is None else f"{v:.2f}×"


def table_rows(results, summary, pname):
    rows = []
    for fig in FIGURES:
        row = summary[pname].get(fig.key)
        if row is None or fig.section != "main":
            continue
        cells = [fig.label, fig.unit + (" ↑" if fig.better == "hi" else " ↓")]
        best = row.get("haproxy_best", {}).get("setup")
        for setup in SETUPS:
            c = fmt(row[setup]["median"], fig.decimals) if setup in row else "n/a"
            if setup == best and all(h in row for h in HAPROXIES):
                c += "*"
            cells.append(c)
        cells.append(fmt_ratio(ratio(row, "tproxyd", "direct")))
        cells.append(fmt_ratio(ratio(row, "tproxyd", "haproxy_best")))
        tt, met = [], []
        for t in fig.targets:
            tt.append(target_text(t))
            met.append(met_text(check_target(row, t)))
        cells.append("; ".join(tt) or "")
        cells.append("; ".join(met) or "")
        rows.append(cells)
    return rows


def met_text(ok):
    return "?" if ok is None else ("yes" if ok else "MISSED")


UDP_HEAD = ["UDP case", "sent/s direct / tproxyd", "direct: delivered/s (loss)", "tproxyd: delivered/s (loss)",
            "tproxyd÷direct", "% dropped at tproxyd's listeners", "% dropped at the receiver direct / tproxyd",
            "proxy CPU µs per forwarded datagram", "machine CPU µs per datagram direct / tproxyd",
            "load tools' CPU µs per datagram direct / tproxyd", "targets (met)"]


def udp_rows(summary, pname):
    """One row per UDP case, the shape of README › Performance: direct and
    tproxyd side by side (HAProxy has no UDP)."""
    figs = {f.key: f for f in FIGURES}
    rows = []
    for case, flows, length, rate in UDP_CASES:
        got = {k[len(case) + 1:]: summary[pname][k] for k in summary[pname] if k.startswith(case + "_")}
        if not got:
            continue

        def med(what, setup, decimals):
            row = got.get(what, {})
            return fmt(row[setup]["median"], decimals) if setup in row else "n/a"

        def delivered(setup):
            if setup not in got.get("dps", {}):
                return "n/a"
            cell = f"{med('dps', setup, 0)} ({med('loss', setup, 2)}%"
            if "gbps" in got:
                cell += f", {med('gbps', setup, 3)} Gbit/s"
            return cell + ")"

        targets = []
        for what in ("dps", "gbps", "loss", "pcpu"):
            if what not in got:
                continue
            for t in figs[f"{case}_{what}"].targets:
                unit = {"gbps": " Gbit/s", "loss": " % loss", "pcpu": " µs"}.get(what, " delivered/s")
                targets.append(f"{target_text(t)}{unit}: {met_text(check_target(got[what], t))}")
        rows.append([
            udp_case_text(flows, length, rate),
            f"{med('sent', 'direct', 0)} / {med('sent', 'tproxyd', 0)}",
            delivered("direct"),
            delivered("tproxyd"),
            fmt_ratio(ratio(got.get("dps", {}), "tproxyd", "direct")),
            med("rdrop", "tproxyd", 2),
            f"{med('sdrop', 'direct', 2)} / {med('sdrop', 'tproxyd', 2)}",
            med("pcpu", "tproxyd", 2),
            f"{med('mcpu', 'direct', 2)} / {med('mcpu', 'tproxyd', 2)}",
            f"{med('lcpu', 'direct', 2)} / {med('lcpu', 'tproxyd', 2)}",
            "; ".join(targets),
        ])
    return rows


TARGETS_HEAD = ["issue", "figure", "target", "tproxyd", "met"]


def target_rows(summary, pname):
    """Every target of issues 5 and 11 in one list."""
    rows = []
    for fig in FIGURES:
        row = summary[pname].get(fig.key)
        if row is None:
            continue
        for t in fig.targets:
            base = t[0]
            if base == "abs":
                v = fmt(row["tproxyd"]["median"], fig.decimals) + f" {fig.unit}" if "tproxyd" in row else "n/a"
            else:
                v = fmt_ratio(ratio(row, "tproxyd", "haproxy_best" if base == "haproxy" else base))
            unit = f" {fig.unit}" if base == "abs" else ""
            rows.append(["11" if fig.section == "udp" else "5", fig.label, target_text(t) + unit, v,
                         met_text(check_target(row, t))])
    return rows


HEAD = ["figure", "unit", "direct", "tproxyd", "haproxy", "haproxy auto", "tproxyd÷direct", "tproxyd÷haproxy",
        "target", "met"]


def text_table(results):
    summary = summarize(results)
    out = []
    for pname in results["passes"]:
        out.append(f"\n[{pname}] medians of {results['params']['reps']} repetition(s)")
        rows = table_rows(results, summary, pname)
        if rows:
            widths = [max(len(str(r[i])) for r in rows + [HEAD]) for i in range(len(HEAD))]
            for r in [HEAD] + rows:
                out.append("  ".join(str(c).ljust(w) if i < 2 or i > 7 else str(c).rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))))
        rows = udp_rows(summary, pname)
        if rows:
            out.append("")
            widths = [max(len(str(r[i])) for r in rows + [UDP_HEAD]) for i in range(len(UDP_HEAD))]
            for r in [UDP_HEAD] + rows:
                out.append("  ".join(str(c).ljust(w) if i in (0, len(UDP_HEAD) - 1) else str(c).rjust(w)
                                     for i, (c, w) in enumerate(zip(r, widths))))
    failed = [r for r in results["runs"] if not r.get("ok")]
    for r in failed:
        out.append(f"FAILED: {r['pass']} rep{r['rep']} {r['setup']} {r['case']}: {r.get('error')}")
    return "\n".join(out)


def one_line(rec):
    """A run's headline numbers, for the console while the bench runs."""
    name = f"{rec['case']:<17}"
    if not rec.get("ok"):
        return f"{name} FAILED: {rec.get('error')}"
    m = rec["metrics"]
    parts = []
    if "gbps" in m:
        parts.append(f"{m['gbps']:.2f} Gbit/s")
    if "delivered_dps" in m:
        parts.append(f"{m.get('sent_dps', 0):,.0f} sent/s, {m['delivered_dps']:,.0f} delivered/s, loss {m['loss_pct']}%")
        for key, who in (("proxy_cpu_us_per_dgram", "proxy"), ("machine_cpu_us_per_dgram", "machine"),
                         ("loadgen_cpu_us_per_dgram", "load tools")):
            if m.get(key) is not None:
                parts.append(f"{who} {m[key]:.2f} µs/dgram")
    if "rps" in m:
        parts.append(f"{m['rps']:,.0f}/s p50 {m.get('p50_ms')} ms p99 {m.get('p99_ms')} ms"
                     f" synretrans {m.get('client_syn_retrans')} errors {m.get('socket_errors')}")
    if "first10_cps" in m:
        parts.append(f"first 10 s {m['first10_cps']:,.0f}/s, last 10 s {m['last10_cps']:,.0f}/s, "
                     f"mean {m['mean_cps']:,.0f}/s, failed {m['failed']} {m['failures']}, "
                     f"SYN retrans client {m['client_syn_retrans']} router {m['router_syn_retrans']}")
    if "p50_us" in m:
        parts.append(f"p50 {m['p50_us']:.1f} µs p99 {m['p99_us']:.1f} µs")
    if "rss_bytes_per_conn" in m:
        parts.append(f"{m['rss_bytes_per_conn']:.0f} B/conn ({m['rss_before_kib']}→{m['rss_after_kib']} KiB, "
                     f"{m['conns']} conns)")
    if m.get("proxy_cpu_s_per_gb") is not None:
        parts.append(f"proxy {m['proxy_cpu_s_per_gb']:.3f} s/GB")
    elif m.get("proxy_cpu_s") is not None:
        parts.append(f"proxy cpu {m['proxy_cpu_s']:.2f} s")
    if m.get("machine_cpu_s_per_gb") is not None:
        parts.append(f"machine {m['machine_cpu_s_per_gb']:.3f} s/GB")
    return f"{name} " + ", ".join(parts) + f"  [{rec['seconds']} s]"


# ---------------------------------------------------------------- markdown

def method_md(results):
    mach, p, v = results["machine"], results["params"], results["versions"]
    order = ", ".join(results["setups"])
    lines = [
        "## Method",
        "",
        f"- Machine: {mach['nproc']} CPUs ({mach['cpu_model']}), {mach['memory_gib']} GiB, kernel {mach['kernel']}"
        + (f", a {mach['virtualization']} virtual machine" if mach.get("virtualization") else "")
        + f"; load average at start {' '.join(mach['loadavg_at_start'])}. Client, router and server are network"
        " namespaces on these same CPUs (scripts/lab.sh: veth pairs client↔router↔server), so every"
        " setup's figures include the cost of the load generators and servers too.",
        f"- Setups: **direct** = `lab.sh --mode direct`, the router forwards in the kernel (no proxy);"
        f" **tproxyd** = `lab.sh --mode tproxy` + `tproxyd --port 8080 --drain-timeout 2s"
        f"{(' ' + results['tproxyd_args']) if results.get('tproxyd_args') else ''}` in the router namespace;"
        f" **haproxy** = the same tproxy lab + HAProxy (`bind :8080 transparent`, `bind :::8080 v6only transparent`,"
        f" `server s 0.0.0.0`, mode tcp, `option splice-request` + `option splice-response`,"
        f" nbthread 2, tune.pipesize 1048576, maxconn {results['haproxy_maxconn']}, no logging"
        + (f", global `{results['haproxy_global']}`" if results.get("haproxy_global") else "")
        + "; benches/conf/haproxy.cfg);"
        " **haproxy auto** = the same with `option splice-auto` instead (HAProxy's heuristic: it splices only"
        " when it expects a lot of data, so small messages take recv/send); it runs the HTTP, 1-byte and memory"
        " cases only, since on bulk it loses to splice-request/response by 30-40% at twice the CPU per GB."
        " Each figure compares tproxyd with the better of the two HAProxy configurations (marked *), 'HAProxy"
        " at its best'. Before each setup's cases, one curl per family through it must return nginx's file.",
        "- Pinning: tproxyd pins worker *i* to CPU *i* (its default); HAProxy's two threads are pinned the same way"
        " (`cpu-map auto:1/1-2 0-1`). Load generators and servers are not pinned: the scheduler places them.",
        f"- Repetitions: each case {p['reps']}× per setup; the figure is the median. Each setup has a lab of its own"
        " with its own servers and its proxy running for the whole run; each case runs on all setups back to back,"
        f" in the order ({order}) rotated from one case and repetition to the next, so a burst of other work on"
        " the shared machine lands on neighbouring setups alike and no setup always goes first."
        + (" With --pause-idle, every other setup's proxy is stopped (SIGSTOP) while one setup runs its case and"
           " continued (SIGCONT) for its own, so a proxy that spins when idle takes no CPU from the others."
           if results.get("pause_idle") else ""),
        f"- iperf3: `-t {p['duration']}`, one run per case, TCP throughput from the receiver side"
        " (`end.sum_received`); fixed rate `-b 2G` (one stream, IPv4).",
        udp_method(p),
        f"- CPU per GB: the proxy's utime+stime from /proc/PID/stat (all threads; the kernel scales their sum to"
        " the scheduler's exact runtime) over the iperf3 run, divided by the GB received. This kernel has no"
        " IRQ_TIME_ACCOUNTING, so softirq work (TCP receive, veth transmit into the next namespace) done on a proxy"
        " thread's time is charged to the proxy. Direct has no proxy process: its row is n/a. The 'machine CPU"
        " per GB' rows give every setup's whole-machine busy time: CPUs × wall time − idle time from /proc/stat"
        " (client, server, router and anything else running on the machine). Not /proc/stat's user+system+softirq"
        " fields: they are tick samples, and on this tickless kernel they are off by up to 10× for a paced load"
        " such as `-b 2G`, where idle time is exact.",
        f"- wrk: `wrk -t1 -c{p['wrk_conns']} -d{p['duration']}s --latency` for a {SMALL_FILE_BYTES_TEXT} file"
        " from nginx (1 worker) at 198.19.0.2:80; `Connection: close` adds `-H 'Connection: close'` (then"
        " requests/s = connections/s). SYN retransmissions: TcpExtTCPSynRetrans delta in the client namespace.",
        f"- 1-byte request/response: benches/harness/tools.py, {p['rr_count']:,} timed round trips over"
        f" {p.get('rr_conns', 1)} TCP connection(s) (TCP_NODELAY) opened one after the other, each after"
        f" {p['rr_warmup']:,} untimed ones; per-request time with perf_counter_ns. Several connections because each"
        " lands on a proxy worker, and so a CPU, picked by SO_REUSEPORT's hash. Python: the figures include"
        " ~10-20 µs of interpreter time on each side, the same for every setup.",
        "- Client closing first (`close_first_v4`, run only when asked for): examples/close_first.rs, 64"
        " connections in flight, each one HTTP/1.1 keep-alive request for the same file, the whole answer read,"
        f" then closed by the client (FIN), for {p.get('close_first_s', 120)} s; served/failed per second. The"
        " client namespace gets tcp_tw_reuse=1 and ports 1024-65535 in every setup so that its own TIME_WAITs"
        " are not the limit; the router keeps its namespace's defaults (tune/ with --tune).",
        f"- Memory: the proxy is restarted, then its VmRSS is read before and after {p['idle_conns']:,} idle"
        " connections are opened through it"
        " (each has moved the server's 1-byte greeting, so its upstream side exists), divided by the count."
        " Kernel memory (socket buffers, pipes) is not in RSS.",
        f"- Versions: {'; '.join(val if val.lower().startswith(k) else f'{k} {val}' for k, val in v.items())}.",
        f"- Run: `{results['command']}` started {results['started']}, took {results.get('seconds', 0):.0f} s."
        + load_text(results),
    ]
    return "\n".join(lines)


SMALL_FILE_BYTES_TEXT = "128-byte"


def udp_method(p):
    if "udp_fixed_rate" in p:  # a results.json from before issue 11's rows
        return (f"- UDP: `iperf3 -u -l 64`, `-b 0` (as fast as the client can send) and `-b {p['udp_fixed_rate']}`"
                " (100,000 datagrams/s); delivered = sent − lost (server's count).")
    return (
        f"- UDP (IPv4; direct and tproxyd, HAProxy has none): 64- and 1200-byte datagrams, as fast as the sender"
        f" can and at {p['udp_fixed_dps']:,} datagrams/s offered, with 1 flow (`iperf3 -u -l LEN -t {p['duration']}`,"
        f" `-b 0` or `-b` LEN×8×{p['udp_fixed_dps']:,} bit/s) and with {p['udp_many_flows']:,} flows"
        f" (examples/udp_load.rs for {p['duration']} s: one client socket and port per flow, round-robin, one"
        " datagram per flow per round, paced from the clock; one receiving socket in the server namespace"
        " reading with recvmmsg; the client ports stay the same from run to run, so the proxy's mappings"
        " persist and the rows measure forwarding, not flow set-up). Each UDP run starts after a"
        f" {p.get('udp_settle_s', 1.0):g} s pause, so that a proxy's backlog from the run before has drained."
        " Delivered = sent − lost (the receiver's count), per second of the sender's run. The proxy's CPU"
        " (utime+stime) is per datagram forwarded, i.e. reaching the server's namespace (its UdpInDatagrams +"
        " UdpRcvbufErrors); the machine's (busy time from /proc/stat, all processes) and the load tools' (iperf3's"
        " own cpu_utilization_percent, client and server; udp_load's getrusage, sender and receiver) per datagram"
        " delivered. Like the proxy's, the load tools' CPU includes the kernel work run on their time: in direct"
        " the router's forwarding runs in the sender's softirq, through tproxyd the delivery to its listener"
        " does.")


def load_text(results):
    """How busy the machine was with other work: the 1-minute load average
    when each case started (the bench itself adds about 1-2)."""
    loads = sorted(r["loadavg1_at_start"] for r in results["runs"] if "loadavg1_at_start" in r)
    if not loads:
        return ""
    return (f" 1-minute load average when each case started: median {statistics.median(loads):.1f},"
            f" max {loads[-1]:.1f} (the bench alone keeps it near 1-2; more means other work shared the CPUs).")


def md_table(rows, head=HEAD, align=None):
    align = align or ["---"] * 2 + ["--:"] * 6 + ["---"] * 2
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def runs_md(results, summary, pname):
    out = ["| figure | " + " | ".join(results["setups"]) + " |", "|---|" + "---|" * len(results["setups"])]
    for fig in FIGURES:
        row = summary[pname].get(fig.key)
        if row is None:
            continue
        cells = []
        for setup in results["setups"]:
            if setup in row:
                cells.append(", ".join(fmt(x, fig.decimals) for x in row[setup]["runs"]))
            else:
                cells.append("n/a")
        out.append(f"| {fig.label} ({fig.unit}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_md(results, summary, out_dir):
    lines = ["# tproxyd vs direct forwarding vs HAProxy", ""]
    lines.append("Medians; ↑ higher is better, ↓ lower is better. Ratios are tproxyd's median over the baseline's;"
                 " the HAProxy ratio is to the better of its two configurations (marked *; see Method)."
                 " Targets are issue 5's (TCP, HTTP, memory) and issue 11's (UDP). n/a: the figure does not apply"
                 " (no proxy process in direct; HAProxy has no UDP) or the case was not run.")
    lines.append("")
    for pname in results["passes"]:
        if len(results["passes"]) > 1:
            lines += [f"## Pass: {pname}" + (" (tune/apply in the lab namespaces)" if pname == "tuned" else ""), ""]
        rows = table_rows(results, summary, pname)
        if rows:
            lines += [md_table(rows), ""]
        rows = udp_rows(summary, pname)
        if rows:
            lines += ["UDP: direct and tproxyd (HAProxy has no UDP). Loss is against what the sender sent; the"
                      " proxy's CPU is per datagram that reached the server's namespace, the machine's (all"
                      " processes) and the load tools' per datagram delivered (see Method).", "",
                      md_table(rows, UDP_HEAD, ["---"] + ["--:"] * (len(UDP_HEAD) - 2) + ["---"]), ""]
        rows = target_rows(summary, pname)
        if rows:
            lines += [f"Targets{f' ({pname})' if len(results['passes']) > 1 else ''}:", "",
                      md_table(rows, TARGETS_HEAD, ["--:", "---", "---", "--:", "---"]), ""]
        svg = "ratios.svg" if pname == "base" else f"ratios-{pname}.svg"
        lines += [f"![tproxyd's ratios to direct and HAProxy]({svg})", ""]
    if "tuned" in results["passes"]:
        lines += ["## Tuned ÷ base, per setup", "", "| figure | " + " | ".join(results["setups"]) + " |",
                  "|---|" + "--:|" * len(results["setups"])]
        for fig in FIGURES:
            b, t = summary["base"].get(fig.key), summary["tuned"].get(fig.key)
            if not b or not t:
                continue
            cells = []
            for s in results["setups"]:
                cells.append(fmt_ratio(t[s]["median"] / b[s]["median"]) if s in b and s in t and b[s]["median"]
                             else "n/a")
            lines.append(f"| {fig.label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [method_md(results), ""]
    for pname in results["passes"]:
        lines += [f"## Every repetition ({pname})", "", runs_md(results, summary, pname), ""]
    failed = [r for r in results["runs"] if not r.get("ok")]
    if failed or results.get("notes"):
        lines += ["## Notes and failures", ""]
        lines += [f"- {n}" for n in results.get("notes", [])]
        lines += [f"- FAILED {r['pass']} rep{r['rep']} {r['setup']} {r['case']}: {r.get('error')}" for r in failed
                  if not any(r['case'] in n and r['setup'] in n for n in results.get("notes", []))]
        lines.append("")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------- SVG

def write_svg(results, summary, pname, path):
    """Horizontal bars, two per figure: tproxyd against direct and against
    HAProxy, oriented so that a bar past the 1.0 line means tproxyd is better."""
    items = []
    for fig in FIGURES:
        row = summary[pname].get(fig.key)
        if row is None or not fig.chart:
            continue
        pair = []
        for base in ("direct", "haproxy_best"):
            r = ratio(row, "tproxyd", base)
            if r is not None and r > 0:
                pair.append((base, r if fig.better == "hi" else 1.0 / r))
        if pair:
            items.append((fig, pair))
    colors = {"direct": "#4c78a8", "haproxy_best": "#f58518"}
    names = {"direct": "vs direct", "haproxy_best": "vs HAProxy (its better config)"}
    label_w, bar_h, gap, top, right = 330, 13, 10, 70, 90
    plot_w = 480
    vmax = max([2.0] + [min(v, 4.0) for _, pair in items for _, v in pair])
    vmax = float(int(vmax + 0.999))
    height = top + sum(len(p) * bar_h + gap for _, p in items) + 40
    width = label_w + plot_w + right
    x = lambda v: label_w + plot_w * min(v, vmax) / vmax  # noqa: E731
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="10" y="20" font-size="14" font-weight="bold">tproxyd relative to direct and to HAProxy'
         f' ({html.escape(pname)}, medians)</text>',
         '<text x="10" y="38">Past the 1.0 line = tproxyd better. Lower-is-better figures (CPU, latency, loss,'
         ' memory) are drawn as baseline ÷ tproxyd.</text>']
    lx = 10
    for base in ("direct", "haproxy_best"):
        o.append(f'<rect x="{lx}" y="48" width="12" height="10" fill="{colors[base]}"/>')
        o.append(f'<text x="{lx + 16}" y="57">{names[base]}</text>')
        lx += 110
    y = top
    grid_bottom = height - 30
    for i in range(0, int(vmax * 2) + 1):
        v = i / 2
        gx = x(v)
        stroke = "#333" if v == 1.0 else "#ddd"
        o.append(f'<line x1="{gx:.1f}" y1="{top - 6}" x2="{gx:.1f}" y2="{grid_bottom}" stroke="{stroke}"/>')
        o.append(f'<text x="{gx:.1f}" y="{grid_bottom + 14}" text-anchor="middle">{v:g}</text>')
    for fig, pair in items:
        block = len(pair) * bar_h
        o.append(f'<text x="{label_w - 8}" y="{y + block / 2 + 4:.1f}" text-anchor="end">'
                 f'{html.escape(fig.label)}</text>')
        for base, v in pair:
            w = x(v) - label_w
            o.append(f'<rect x="{label_w}" y="{y}" width="{max(w, 1):.1f}" height="{bar_h - 2}" fill="{colors[base]}"/>')
            txt = f"{v:.2f}" + ("+" if v > vmax else "")
            o.append(f'<text x="{x(v) + 4:.1f}" y="{y + bar_h - 3}">{txt}</text>')
            y += bar_h
        y += gap
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def write_all(results, out_dir):
    summary = summarize(results)
    results["medians"] = {p: {k: {s: v["median"] for s, v in row.items()} for k, row in figs.items()}
                          for p, figs in summary.items()}
    results["ratios"] = ratios_of(results, summary)
    results["targets"] = {
        p: {fig.key: [{"target": target_text(t), "met": check_target(summary[p][fig.key], t)} for t in fig.targets]
            for fig in FIGURES if fig.key in summary[p] and fig.targets}
        for p in results["passes"]}
    results["figures"] = [{"key": f.key, "label": f.label, "unit": f.unit, "case": f.case, "metric": f.metric,
                           "better": "higher" if f.better == "hi" else "lower"} for f in FIGURES]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_md(results, summary, out_dir)
    for pname in results["passes"]:
        write_svg(results, summary, pname,
                  os.path.join(out_dir, "ratios.svg" if pname == "base" else f"ratios-{pname}.svg"))


# ---------------------------------------------------------------- line charts

SETUP_COLORS = {"direct": "#4c78a8", "tproxyd": "#54a24b", "haproxy": "#f58518", "haproxy_auto": "#b279a2"}


def nice_step(span, ticks=5):
    """A 1-2-5 step that cuts span into about `ticks` parts."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def tick_text(v):
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    if a >= 1:
        return f"{v:,.0f}" if v == int(v) else f"{v:g}"
    return f"{v:.3g}"


def line_chart(path, title, subtitle, xlabel, xs, log_x, panels, marked_label=""):
    """A hand-drawn SVG: one panel per figure, stacked, sharing the x axis.

    xs: the points measured (the x ticks; with log_x, a log scale). Each
    panel: {"ylabel": str (its title, above it, with the unit), "series": [{"name", "color", "dash" (bool),
    "band" (bool: a min-max band instead of whiskers), "points": [(x,
    median, min, max)]}]}. The line joins the medians; the spread is drawn
    as min-max whiskers at each point (or a band). A series' "marked" x
    values (a different setup, e.g. two proxy instances: its last points)
    are drawn as open squares joined by a dashed line, past a dotted
    boundary labelled `marked_label`, which the legend names."""
    left, right, top, ph, gap, width = 70, 190, 78, 190, 70, 820
    pw = width - left - right
    # The subtitle in lines of at most ~130 characters.
    sub, line = [], ""
    for word in subtitle.split():
        if line and len(line) + len(word) > 130:
            sub.append(line)
            line = ""
        line = f"{line} {word}".strip()
    sub.append(line)
    top += 16 * (len(sub) - 1)
    height = top + len(panels) * (ph + gap) + 10
    xmin, xmax = (min(xs), max(xs)) if xs else (0, 1)
    if not log_x:
        xmin = 0
    if log_x:
        llo, lhi = math.log10(xmin), math.log10(xmax)
        xpos = lambda v: left + pw * ((math.log10(v) - llo) / (lhi - llo) if lhi > llo else 0.5)  # noqa: E731
        xticks = list(xs)
    else:
        step = nice_step(xmax - xmin, 6)
        xpos = lambda v: left + pw * ((v - xmin) / (xmax - xmin) if xmax > xmin else 0.5)  # noqa: E731
        xticks = [xmin + i * step for i in range(int((xmax - xmin) / step + 1e-9) + 1)]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="10" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>',
         ] + [f'<text x="10" y="{38 + 16 * i}">{html.escape(t)}</text>' for i, t in enumerate(sub)]
    for i, panel in enumerate(panels):
        y0 = top + i * (ph + gap)
        vals = [v for s in panel["series"] for p in s["points"] for v in p[1:] if v is not None]
        ymax = max(vals) if vals else 1.0
        ystep = nice_step(ymax * 1.05 or 1.0, 5)
        ytop = ystep * math.ceil(ymax * 1.05 / ystep) if ymax > 0 else ystep
        ypos = lambda v: y0 + ph - ph * min(v, ytop) / ytop  # noqa: E731
        o.append(f'<rect x="{left}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        k = 0
        while k * ystep <= ytop + 1e-9:
            v = k * ystep
            gy = ypos(v)
            o.append(f'<line x1="{left}" y1="{gy:.1f}" x2="{left + pw}" y2="{gy:.1f}" stroke="#eee"/>')
            o.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">{tick_text(v)}</text>')
            k += 1
        last = None
        for xv in xticks:
            gx = xpos(xv)
            o.append(f'<line x1="{gx:.1f}" y1="{y0}" x2="{gx:.1f}" y2="{y0 + ph}" stroke="#eee"/>')
            # A label too close to the one before (log scale: 7,000 and
            # 10,000) goes a line lower.
            low = last is not None and gx - last < 30
            o.append(f'<text x="{gx:.1f}" y="{y0 + ph + (25 if low else 14)}" text-anchor="middle">'
                     f'{tick_text(xv)}</text>')
            last = None if low else gx
        o.append(f'<text x="{left + pw / 2}" y="{y0 + ph + 30}" text-anchor="middle">{html.escape(xlabel)}</text>')
        o.append(f'<text x="{left}" y="{y0 - 8}" font-weight="bold">{html.escape(panel["ylabel"])}</text>')
        ly = y0 + 10
        for s in panel["series"]:
            pts = sorted(p for p in s["points"] if p[1] is not None)
            if not pts:
                continue
            dash = ' stroke-dasharray="6,4"' if s.get("dash") else ""
            col = s["color"]
            marked = s.get("marked", ())
            plain = [p for p in pts if p[0] not in marked]
            if len(plain) < len(pts):
                # Into the marked points: dashed, from the last plain one.
                tail = plain[-1:] + [p for p in pts if p[0] in marked]
                o.append(f'<polyline points="{" ".join(f"{xpos(x):.1f},{ypos(m):.1f}" for x, m, _, _ in tail)}"'
                         f' fill="none" stroke="{col}" stroke-width="2" stroke-dasharray="3,3"/>')
                pts_line = plain
            else:
                pts_line = pts
            if s.get("band"):
                ring = [(xpos(x), ypos(hi if hi is not None else m)) for x, m, _, hi in pts]
                ring += [(xpos(x), ypos(lo if lo is not None else m)) for x, m, lo, _ in reversed(pts)]
                o.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in ring)}" fill="{col}"'
                         ' fill-opacity="0.15" stroke="none"/>')
            line = " ".join(f"{xpos(x):.1f},{ypos(m):.1f}" for x, m, _, _ in pts_line)
            o.append(f'<polyline points="{line}" fill="none" stroke="{col}" stroke-width="2"{dash}/>')
            for x, m, lo, hi in pts:
                px = xpos(x)
                if not s.get("band") and lo is not None and hi is not None and hi > lo:
                    o.append(f'<line x1="{px:.1f}" y1="{ypos(lo):.1f}" x2="{px:.1f}" y2="{ypos(hi):.1f}"'
                             f' stroke="{col}"/>')
                    for yy in (lo, hi):
                        o.append(f'<line x1="{px - 3:.1f}" y1="{ypos(yy):.1f}" x2="{px + 3:.1f}"'
                                 f' y2="{ypos(yy):.1f}" stroke="{col}"/>')
                if not s.get("band") and x in marked:
                    o.append(f'<rect x="{px - 3.5:.1f}" y="{ypos(m) - 3.5:.1f}" width="7" height="7" fill="white"'
                             f' stroke="{col}" stroke-width="1.5"/>')
                elif not s.get("band"):
                    o.append(f'<circle cx="{px:.1f}" cy="{ypos(m):.1f}" r="2.5" fill="{col}"/>')
            lx = left + pw + 12
            o.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 22}" y2="{ly}" stroke="{col}" stroke-width="2"{dash}/>')
            o.append(f'<text x="{lx + 28}" y="{ly + 4}">{html.escape(s["name"])}</text>')
            ly += 16
        marked = {x for s in panel["series"] for x in s.get("marked", ())}
        inside = [x for x in xs if x not in marked]
        if marked and inside and len(inside) < len(xs):
            # The boundary: half-way between the last plain and the first
            # marked point, labelled on its left (the marked side may be
            # narrow).
            bx = (xpos(max(inside)) + xpos(min(marked))) / 2
            o.append(f'<line x1="{bx:.1f}" y1="{y0}" x2="{bx:.1f}" y2="{y0 + ph}" stroke="#777"'
                     ' stroke-dasharray="2,3"/>')
            o.append(f'<text x="{bx - 4:.1f}" y="{y0 + 12}" text-anchor="end" fill="#555">'
                     f'{html.escape(marked_label)} past this line →</text>')
            lx = left + pw + 12
            o.append(f'<rect x="{lx + 7.5}" y="{ly - 3.5}" width="7" height="7" fill="white" stroke="#555"'
                     ' stroke-width="1.5"/>')
            o.append(f'<text x="{lx + 28}" y="{ly + 4}">{html.escape(marked_label)}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           "results")
    with open(os.path.join(d, "results.json")) as f:
        res = json.load(f)
    write_all(res, d)
    print(text_table(res))
