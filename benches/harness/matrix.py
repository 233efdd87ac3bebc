#!/usr/bin/env python3
"""benches/run --tune-matrix: one knob at a time against the untuned
baseline, on a few figures (see benches/README.md, "--tune-matrix").

One tproxy lab with tproxyd (its own servers, as bench.py's), and a list of
arms: the baseline (nothing changed) and one arm per knob. Each repetition
visits every arm in an order rotated from one repetition to the next, the
baseline twice (first and half-way), so that the baseline is sampled across
the run like every knob; a visit applies the knob (in the lab's namespaces
only), runs the cases below once, and reverts it. A knob's figure is the
median of its visits; its change is that median over the baseline's, in %,
with the spread of its visits, and it is marked as noise when its visits'
range overlaps the baseline's.

Knobs (KNOBS below): tune/apply as a whole; NOTRACK alone; every setting of
tune/sysctl.conf alone (through tune/apply --conf with that one line, so
that TUNE-1..4 hold: recorded, reverted, per-namespace only; the global
ones are listed as skipped, TUNE-2); GRO, GRO with rx-udp-gro-forwarding
and --coalesce-us 50 (TUNE-5) on the router's veths; BIG TCP (GSO/GRO
limits 185,000 on every veth of the path, IPv4 ones through rtnetlink);
RPS and XPS (all CPUs) on every veth; larger default TCP buffers; and
tproxyd's own options, --busy-poll among them. busy_poll/busy_read and
rmem_max/wmem_max are global on this kernel (absent or read-only in a
namespace): skipped, and said so; tproxyd's --busy-poll (user-space
polling) is measured in their place.

The lab is deleted at the end (bench.tear_down), so whatever a knob leaves
behind in it dies with its namespaces; the host's namespace is never
touched.
"""

import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time
import html

import bench
import report
from bench import BenchError

# (key, label, case, metric, better, decimals)
FIGS = [
    ("tcp_gbps", "TCP 1 stream up (Gbit/s)", "tcp1_up_v4", "gbps", "hi", 2),
    ("tcp_cpu", "proxy CPU per GB (s)", "tcp1_up_v4", "proxy_cpu_s_per_gb", "lo", 3),
    ("close_cps", "Connection: close (conn/s)", "http_close", "rps", "hi", 0),
    ("ka_rps", "keep-alive (req/s)", "http_ka", "rps", "hi", 0),
    ("udp_dps", "UDP 1 flow 64 B flat out (delivered/s)", "udp1_64_max_v4", "delivered_dps", "hi", 0),
    ("rr_p99", "1-byte RR p99 (µs)", "rr_v4", "p99_us", "lo", 1),
]
CASES = ["tcp1_up_v4", "http_close", "http_ka", "udp1_64_max_v4", "rr_v4"]
BIG_TCP = 185000
BIG_BUFFERS = "4096 1048576 33554432"
# The lab's veths: (namespace role, interface).
VETHS = [("c", "eth0"), ("r", "rc"), ("r", "rs"), ("s", "eth0")]


class Knob:
    """kind: base | apply (tune/apply ARGS in the router) | ethtool (features
    on the router's veths) | bigtcp | queues (sysfs file under each veth's
    queue) | proxy (tproxyd options) | skip (why)."""

    def __init__(self, key, label, kind, arg=None, why=""):
        self.key, self.label, self.kind, self.arg, self.why = key, label, kind, arg, why
        self.change = ""  # what the knob changed, as the lab showed it


def sysctl_knobs(conf_path, work, lab):
    """One knob per setting of tune/sysctl.conf (conf.all.X and
    conf.default.X together), each a one-setting profile for tune/apply."""
    knobs, pending, groups = [], [], {}
    order = []
    with open(conf_path) as f:
        for line in f:
            s = line.strip()
            if s.startswith("#@"):
                pending.append(s)
                continue
            if not s or s.startswith("#"):
                if not s:
                    pending = []
                continue
            key = s.split("=", 1)[0].strip()
            name = re.sub(r"\.conf\.(all|default)\.", ".conf.*.", key)
            if name not in groups:
                groups[name] = []
                order.append(name)
            groups[name].append((list(pending), s, key))
            pending = []
    for name in order:
        lines = groups[name]
        annotations = {a for ann, _, _ in lines for a in ann}
        keys = [k for _, _, k in lines]
        value = lines[0][1].split("=", 1)[1].strip()
        label = f"{name} = {value}"
        path = "/proc/sys/" + keys[0].replace(".", "/")
        probe = lab.run("r", ["sh", "-c", f"test -w {shlex.quote(path)} && echo w || (test -e {shlex.quote(path)}"
                              " && echo ro || echo absent)"], 5).stdout.strip()
        if "#@ global" in annotations or not keys[0].startswith("net."):
            knobs.append(Knob(name, label, "skip", why="global (#@ global): one value for the whole machine,"
                              " tune/apply leaves it alone in a namespace (TUNE-2)"))
            continue
        if probe != "w":
            knobs.append(Knob(name, label, "skip", why=f"global on this kernel ({probe} in a namespace)"))
            continue
        conf = os.path.join(work, f"knob-{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.conf")
        with open(conf, "w") as f:
            for ann, text, _ in lines:
                f.write("".join(a + "\n" for a in ann) + text + "\n")
        knobs.append(Knob(name, label, "apply", ["--conf", conf, "--no-notrack", "--no-offloads"]))
    return knobs


def all_knobs(opts, work, lab):
    empty = os.path.join(work, "empty.conf")
    open(empty, "w").close()
    cpus = format((1 << (os.cpu_count() or 1)) - 1, "x")
    knobs = [
        Knob("profile", "tune/apply: the whole profile (per-namespace sysctls, NOTRACK, offloads)", "apply", []),
        Knob("notrack", "NOTRACK alone (tune/apply --conf empty --no-offloads)", "apply",
             ["--conf", empty, "--no-offloads"]),
    ]
    knobs += sysctl_knobs(os.path.join(opts.tune_dir, "sysctl.conf"), work, lab)
    big = os.path.join(work, "knob-big-buffers.conf")
    with open(big, "w") as f:
        f.write(f"net.ipv4.tcp_rmem = {BIG_BUFFERS}\nnet.ipv4.tcp_wmem = {BIG_BUFFERS}\n")
    knobs += [
        Knob("tcp_buffers_1m", f"tcp_rmem = tcp_wmem = {BIG_BUFFERS} (1 MiB to start with)", "apply",
             ["--conf", big, "--no-notrack", "--no-offloads"]),
        Knob("gro", "GRO on the router's veths (ethtool -K gro on)", "ethtool", {"generic-receive-offload": "on"}),
        Knob("gro_udp_fwd", "GRO + rx-udp-gro-forwarding on the router's veths", "ethtool",
             {"generic-receive-offload": "on", "rx-udp-gro-forwarding": "on"}),
        Knob("coalesce50", "tune/apply --coalesce-us 50 alone (GRO, gro_flush_timeout 50 µs, napi_defer_hard_irqs 2)",
             "apply", ["--conf", empty, "--no-notrack", "--coalesce-us", "50"]),
        Knob("bigtcp", f"BIG TCP: gso/gro_max_size and gso/gro_ipv4_max_size {BIG_TCP:,} on every veth", "bigtcp",
             BIG_TCP),
        Knob("rps", f"RPS: rps_cpus {cpus} on every veth's rx queue", "queues", ("rx-0/rps_cpus", cpus)),
        Knob("xps", f"XPS: xps_cpus {cpus} on every veth's tx queue", "queues", ("tx-0/xps_cpus", cpus)),
    ]
    for name in ("busy_poll", "busy_read"):
        path = f"/proc/sys/net/core/{name}"
        probe = lab.run("r", ["sh", "-c", f"test -e {path} && echo present || echo absent"], 5).stdout.strip()
        if probe == "present":
            knobs.append(Knob(name, f"net.core.{name} = 50", "skip", why="present in a namespace but not measured"))
        else:
            knobs.append(Knob(name, f"net.core.{name} = 50", "skip",
                              why="global on this kernel (absent in a namespace): it would change the host"))
    knobs += [
        Knob("pipe_1m", "tproxyd --pipe-size 1m (default 64k; bulk pipes are 1 MiB already)", "proxy",
             ["--pipe-size", "1m"]),
        Knob("bulk_64k", "tproxyd --bulk-pipe-size 64k (no 1 MiB bulk pipes)", "proxy", ["--bulk-pipe-size", "64k"]),
        Knob("workers1", "tproxyd --workers 1 (default: one per core, 2)", "proxy", ["--workers", "1"]),
        Knob("no_splice", "tproxyd --no-splice (read/write copies)", "proxy", ["--no-splice"]),
        # User-space busy polling: what the lab can measure where the
        # kernel's busy_poll/busy_read sysctls are the host's alone.
        Knob("busy_poll_50us", "tproxyd --busy-poll 50us (poll 50 µs more after events before sleeping)", "proxy",
             ["--busy-poll", "50us"]),
        Knob("busy_poll_200us", "tproxyd --busy-poll 200us", "proxy", ["--busy-poll", "200us"]),
    ]
    return knobs


# ---------------------------------------------------------------- apply / revert

class NoChange(BenchError):
    """A knob that changes nothing in this lab: not measured."""


class Applied:
    """What a knob changed in the lab, so that revert puts exactly it back."""

    def __init__(self, knob):
        self.knob = knob
        self.state = None
        self.undo = []  # (role, argv) to run, in reverse order


def apply_knob(knob, lab, proxy, work, visit):
    a = Applied(knob)
    if knob.kind == "base":
        return a
    if knob.kind == "apply":
        a.state = os.path.join(work, f"tune-{knob.key}-{visit}.state")
        r = lab.run("r", [os.path.join(TUNE_DIR[0], "apply"), "--state", a.state] + knob.arg, 60, check=True)
        changed = [ln for ln in r.stdout.splitlines() if ln.startswith(("set ", "notrack up")) or " -> " in ln]
        if not changed:
            revert_knob(a, lab, proxy)
            raise NoChange("already at that value (or above it, for an at-least setting) here: tune/apply"
                           " changed nothing")
        knob.change = "; ".join(changed)[:300]
        return a
    if knob.kind == "ethtool":
        for role, dev in (("r", "rc"), ("r", "rs")):
            cur = lab.run(role, ["ethtool", "-k", dev], 10, check=True).stdout
            was = {}
            for feat in knob.arg:
                g = re.search(rf"^{re.escape(feat)}: (on|off)( \[fixed\])?", cur, re.M)
                if not g:
                    raise BenchError(f"{dev}: no feature {feat}")
                was[feat] = g.group(1)
            argv = ["ethtool", "-K", dev]
            for feat, v in knob.arg.items():
                argv += [feat, v]
            a.undo.append((role, ["ethtool", "-K", dev] + [x for f, v in was.items() for x in (f, v)]))
            lab.run(role, argv, 10, check=True)
        knob.change = ", ".join(f"{f} {v}" for f, v in knob.arg.items()) + " on rc, rs"
        return a
    if knob.kind == "bigtcp":
        for role, dev in VETHS:
            r = lab.run(role, [sys.executable, bench.TOOLS, "link-size", "--dev", dev], 10, check=True)
            was = json.loads(r.stdout)
            a.undo.append((role, [sys.executable, bench.TOOLS, "link-size", "--dev", dev]
                           + [x for k, v in was.items() for x in (f"--{k.replace('_', '-')}", str(v))]))
            lab.run(role, [sys.executable, bench.TOOLS, "link-size", "--dev", dev, "--gso", str(knob.arg),
                           "--gro", str(knob.arg), "--gso-ipv4", str(knob.arg), "--gro-ipv4", str(knob.arg)], 10,
                    check=True)
        knob.change = f"GSO/GRO limits {knob.arg:,} (IPv6 and IPv4) on {len(VETHS)} veths"
        return a
    if knob.kind == "queues":
        rel, val = knob.arg
        for role, dev in VETHS:
            path = f"/sys/class/net/{dev}/queues/{rel}"
            was = lab.run(role, ["cat", path], 5, check=True).stdout.strip()
            a.undo.append((role, ["sh", "-c", f"echo {shlex.quote(was)} > {path}"]))
            lab.run(role, ["sh", "-c", f"echo {val} > {path}"], 5, check=True)
        knob.change = f"{rel} = {val} on {len(VETHS)} veths"
        return a
    if knob.kind == "proxy":
        restart(proxy, lab, knob.arg)
        a.undo.append(("proxy", []))
        knob.change = "tproxyd " + " ".join(knob.arg)
        return a
    raise BenchError(f"knob {knob.key}: cannot apply a '{knob.kind}'")


def revert_knob(a, lab, proxy):
    if a.state and os.path.exists(a.state):
        lab.run("r", [os.path.join(TUNE_DIR[0], "revert"), "--state", a.state], 60, check=True)
    for role, argv in reversed(a.undo):
        if role == "proxy":
            restart(proxy, lab, [])
        else:
            lab.run(role, argv, 10, check=True)


def restart(proxy, lab, extra):
    proxy.stop()
    proxy.extra_args = list(extra)
    proxy.start()
    try:
        bench.verify_forwarding(lab, proxy, lab.expect)
    except BenchError:
        bench.verify_forwarding(lab, proxy, lab.expect)  # once more: see curves.use_variant


TUNE_DIR = [bench.TUNE_DIR]


# ---------------------------------------------------------------- main

def estimate_s(n_visits, params):
    d = params.duration
    per_visit = (d + 0.3) + 2 * (d + 0.2) + (bench.UDP_SETTLE_S + d + 0.3) + (0.3 if params.quick else 1.0) + 0.5
    return n_visits * per_visit + 15


def main(opts, argv):
    quick = opts.quick
    params = bench.Params(quick, opts.reps or (1 if quick else 3), opts.duration or (1 if quick else 3))
    out = os.path.abspath(opts.out)
    if out == os.path.abspath(os.path.join(bench.BENCHES, "results")):
        out = os.path.join(out, "tune-matrix")
    os.makedirs(out, exist_ok=True)
    raw = os.path.join(out, "raw-matrix")
    shutil.rmtree(raw, ignore_errors=True)
    work = os.path.join(raw, "lab")
    os.makedirs(work, exist_ok=True)
    TUNE_DIR[0] = opts.tune_dir
    bench.check_tune(opts, "--tune-matrix")
    if not shutil.which("ethtool"):
        raise BenchError("--tune-matrix needs ethtool (the offload knobs); install it with: scripts/deps install benches")
    bench.build(opts, raw, [])
    started = time.time()
    results = {
        **bench.run_header(argv, opts, params, started, kind="tune-matrix"),
        "figures": [{"key": k, "label": lab_, "case": c, "metric": m, "better": b} for k, lab_, c, m, b, _ in FIGS],
        "knobs": [],
        "runs": [],
        "notes": [],
    }
    labs, proxies, tune_states = {}, {}, []
    knobs = []
    tag = f"cur{os.getpid() % 100000}m"
    try:
        lab, proxy = bench.lab_up(tag + "t", "tproxyd", False, opts, work, labs, proxies, tune_states, "tproxyd")
        knobs = [Knob("base", "baseline: the lab's defaults, tproxyd's defaults", "base")] + all_knobs(opts, work, lab)
        measured = [k for k in knobs if k.kind not in ("skip", "base")]
        visits = params.reps * (len(measured) + 2)
        est = estimate_s(visits, params)
        finish = datetime.datetime.now() + datetime.timedelta(seconds=est)
        print(f"== tune matrix: {len(measured)} knobs ({len(knobs) - 1 - len(measured)} skipped),"
              f" {params.reps} repetition(s), {params.duration} s runs: about {est / 60:.0f} min (until ~{finish:%H:%M})",
              flush=True)
        results["estimate_s"] = round(est)
        visit = 0
        for rep in range(1, params.reps + 1):
            k = ((rep - 1) * len(measured)) // params.reps
            order = measured[k:] + measured[:k]
            half = len(order) // 2
            order = [knobs[0]] + order[:half] + [knobs[0]] + order[half:]
            for knob in order:
                visit += 1
                print(f"== [{rep}/{params.reps}] {knob.key}: {knob.label}", flush=True)
                try:
                    applied = apply_knob(knob, lab, proxy, work, visit)
                except NoChange as e:
                    print(f"   skipped: {e}", flush=True)
                    knob.kind, knob.why = "skip", str(e)
                    measured.remove(knob)
                    continue
                except BenchError as e:
                    results["notes"].append(f"rep{rep} {knob.key}: could not apply: {e}")
                    print(f"   ! could not apply {knob.key}: {e}", flush=True)
                    knob.kind, knob.why = "skip", f"could not apply: {e}"
                    measured.remove(knob)
                    continue
                try:
                    for case in CASES:
                        ctx = bench.Ctx(raw, knob.key, rep, "tproxyd", lab, proxy, params, results["notes"])
                        ctx.case = case
                        rec = bench.measure(ctx, {"knob": knob.key, "rep": rep, "visit": visit, "case": case},
                                            lambda: bench.run_case(ctx, case), results["runs"])
                        print(f"   {report.one_line(rec)}", flush=True)
                        if not proxy.alive():
                            raise BenchError(f"tproxyd died during {knob.key} {case}")
                finally:
                    revert_knob(applied, lab, proxy)
        proxy.stop()
    finally:
        bench.tear_down(opts, labs, tune_states)
        results["seconds"] = round(time.time() - started, 1)
        results["knobs"] = [{"key": k.key, "label": k.label, "kind": k.kind, "why": k.why, "change": k.change}
                            for k in knobs]
        with open(os.path.join(out, "results-tune-matrix.json"), "w") as f:
            json.dump(results, f, indent=1)
    write_all(results, out)
    print(f"\nwrote {out}/results-tune-matrix.json, results-tune-matrix.md, tune-matrix.svg"
          f" ({results['seconds']:.0f} s, estimated {results.get('estimate_s', 0)} s)")
    return 1 if any(not r["ok"] for r in results["runs"]) else 0


# ---------------------------------------------------------------- report

def values(results, knob, fig):
    _, _, case, metric, _, _ = fig
    return [r["metrics"][metric] for r in results["runs"]
            if r["knob"] == knob and r["case"] == case and r.get("ok") and r["metrics"].get(metric) is not None]


def cells(results):
    """{knob: {figure key: {median, min, max, change_pct, lo_pct, hi_pct,
    noise, better}}} against the baseline's visits."""
    out = {}
    for k in results["knobs"]:
        if k["kind"] == "skip":
            continue
        row = {}
        for fig in FIGS:
            base = values(results, "base", fig)
            v = values(results, k["key"], fig)
            if not v or not base:
                continue
            bm = statistics.median(base)
            m = statistics.median(v)
            c = {"median": m, "min": min(v), "max": max(v), "n": len(v), "base_median": bm,
                 "base_min": min(base), "base_max": max(base)}
            if bm:
                c["change_pct"] = 100 * (m / bm - 1)
                c["lo_pct"] = 100 * (min(v) / bm - 1)
                c["hi_pct"] = 100 * (max(v) / bm - 1)
            # Noise: this knob's visits fall within the range the baseline
            # showed on its own (or overlap it).
            c["noise"] = not (min(v) > max(base) or max(v) < min(base))
            better = (m > bm) if fig[4] == "hi" else (m < bm)
            c["better"] = better
            row[fig[0]] = c
        out[k["key"]] = row
    return out


def cell_text(c):
    if "change_pct" not in c:
        return "n/a"
    t = f"{c['change_pct']:+.0f}% ({c['lo_pct']:+.0f}…{c['hi_pct']:+.0f})"
    return ("≈ " + t) if c["noise"] else t


def write_all(results, out):
    table = cells(results)
    results["cells"] = table
    with open(os.path.join(out, "results-tune-matrix.json"), "w") as f:
        json.dump(results, f, indent=1)
    p, mach = results["params"], results["machine"]
    lines = ["# The tuning matrix: one knob at a time (benches/run --tune-matrix)", "",
             "tproxyd in the lab; every knob applied alone, in the lab's namespaces only, against the untuned"
             " baseline. Each cell: the knob's median change against the baseline's median, in %, with the range"
             " of its visits in brackets. **≈** marks noise: the knob's visits overlap the range the baseline's own"
             " visits covered. ↑ higher is better, ↓ lower is better (for CPU and p99 a negative change is a gain).",
             "", "![tune matrix](tune-matrix.svg)", ""]
    head = ["knob"] + [f"{lab_} {'↑' if b == 'hi' else '↓'}" for _, lab_, _, _, b, _ in FIGS]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "--:|" * len(FIGS)]
    base = {fig[0]: values(results, "base", fig) for fig in FIGS}
    lines.append("| **baseline** (median, range) | " + " | ".join(
        f"{report.fmt(statistics.median(v), fig[5])} ({report.fmt(min(v), fig[5])}–{report.fmt(max(v), fig[5])})"
        if v else "n/a" for fig, v in ((f, base[f[0]]) for f in FIGS)) + " |")
    for k in results["knobs"]:
        if k["kind"] in ("skip", "base"):
            continue
        row = table.get(k["key"], {})
        lines.append(f"| {k['label']} | " + " | ".join(cell_text(row[f[0]]) if f[0] in row else "n/a" for f in FIGS)
                     + " |")
    lines += ["", "What each knob changed in the lab (as tune/apply or the harness reported it):", ""]
    for k in results["knobs"]:
        if k["kind"] not in ("skip", "base"):
            lines.append(f"- `{k['key']}`: {k['change'] or '?'}")
    skipped = [k for k in results["knobs"] if k["kind"] == "skip"]
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {k['label']}: {k['why']}" for k in skipped]
    loads = sorted(r["loadavg1_at_start"] for r in results["runs"])
    lines += ["", "## Method", "",
              f"- Machine: {mach['nproc']} CPUs ({mach['cpu_model']}), kernel {mach['kernel']}, shared with other"
              " work: the client, router and server namespaces and everything else on the machine use the same"
              " CPUs."
              + (f" 1-minute load average when each case started: median {statistics.median(loads):.1f}, max"
                 f" {loads[-1]:.1f} (the bench alone keeps it near 1-2)." if loads else ""),
              f"- {p['reps']} repetition(s); each visits every knob once and the baseline twice, in an order"
              " rotated from one repetition to the next; a visit applies the knob, runs"
              f" {', '.join(CASES)} once ({p['duration']} s per iperf3/wrk run, {p['rr_count']:,} round trips),"
              " and reverts it.",
              "- Sysctl knobs go through `tune/apply --conf ONE-SETTING --no-notrack --no-offloads` in the router"
              " namespace (recorded and reverted by tune/revert; a setting already at the value changes nothing,"
              " and says so above). Interface knobs are set and put back by the harness.",
              f"- Run: `{results['command']}` started {results['started']}, took {results.get('seconds', 0):.0f} s"
              f" (estimated {results.get('estimate_s', 0)} s).", ""]
    if results.get("notes") or any(not r.get("ok") for r in results["runs"]):
        lines += ["## Notes and failures", ""] + [f"- {n}" for n in results["notes"]] + [""]
    with open(os.path.join(out, "results-tune-matrix.md"), "w") as f:
        f.write("\n".join(lines))
    write_svg(results, table, os.path.join(out, "tune-matrix.svg"))


def write_svg(results, table, path):
    knobs = [k for k in results["knobs"] if k["kind"] not in ("skip", "base")]
    label_w, cw, ch, top = 400, 132, 22, 96
    short = {"tcp_gbps": ("TCP 1 stream up", "Gbit/s ↑"), "tcp_cpu": ("proxy CPU per GB", "s ↓"),
             "close_cps": ("Connection: close", "conn/s ↑"), "ka_rps": ("keep-alive", "req/s ↑"),
             "udp_dps": ("UDP 1 flow, 64 B", "delivered/s ↑"), "rr_p99": ("1-byte RR p99", "µs ↓")}
    width = label_w + cw * len(FIGS) + 10
    height = top + ch * len(knobs) + 40
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         '<text x="10" y="20" font-size="14" font-weight="bold">One knob at a time against the untuned baseline'
         ' (tproxyd, medians)</text>',
         f'<text x="10" y="38">Change of the median, %; green = better, red = worse; grey with ≈ = within the'
         f' baseline\'s own range (noise). {results["params"]["reps"]} repetition(s), kernel'
         f' {html.escape(results["machine"]["kernel"])}, shared CPUs.</text>']
    for j, (key, _, _, _, _, _) in enumerate(FIGS):
        x = label_w + j * cw + cw / 2
        name, unit = short[key]
        o.append(f'<text x="{x:.0f}" y="{top - 26}" text-anchor="middle" font-weight="bold">'
                 f'{html.escape(name)}</text>')
        o.append(f'<text x="{x:.0f}" y="{top - 12}" text-anchor="middle">{html.escape(unit)}</text>')
    for i, k in enumerate(knobs):
        y = top + i * ch
        label = k["label"] if len(k["label"]) < 58 else k["label"][:56] + "…"
        o.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>')
        for j, fig in enumerate(FIGS):
            c = table.get(k["key"], {}).get(fig[0])
            x = label_w + j * cw
            if not c or "change_pct" not in c:
                fill, text = "#f4f4f4", "n/a"
            elif c["noise"]:
                fill, text = "#e6e6e6", f"≈ {c['change_pct']:+.0f}%"
            else:
                a = min(1.0, 0.25 + abs(c["change_pct"]) / 40)
                fill = ("#54a24b" if c["better"] else "#e45756") + f'" fill-opacity="{a:.2f}'
                text = f"{c['change_pct']:+.0f}% ({c['lo_pct']:+.0f}…{c['hi_pct']:+.0f})"
            o.append(f'<rect x="{x + 1}" y="{y + 1}" width="{cw - 2}" height="{ch - 2}" fill="{fill}"/>')
            o.append(f'<text x="{x + cw / 2:.0f}" y="{y + 15}" text-anchor="middle" font-size="10">'
                     f'{html.escape(text)}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(bench.BENCHES, "results", "tune-matrix")
    with open(os.path.join(d, "results-tune-matrix.json")) as f:
        res = json.load(f)
    write_all(res, d)
    print(f"re-rendered {d}/results-tune-matrix.md and tune-matrix.svg")
