#!/usr/bin/env python3
"""benches/run --curves: how cost grows with work, direct / tproxyd / HAProxy
side by side (see benches/README.md, "--curves").

Five curves, each a list of points; at every point each setup runs once per
repetition, back to back, in an order rotated from one point and repetition
to the next (bench.py's method):

  tcp_streams  TCP throughput and CPU per GB against concurrent streams:
               iperf3 -P N (iperf3 3.12 takes at most 128 streams a client,
               so 256 is two clients of 128 at once, each to a server of its
               own);
  http_close   `Connection: close` connections/s, p99 and CPU per
               connection against client concurrency: wrk -t1 -cN;
  idle         RSS and idle CPU against idle connections held through a
               freshly started proxy: tools.py idle-client / hold-server;
  udp_flows    UDP delivered/s and CPU per datagram against flows:
               examples/udp_load.rs, 64-byte datagrams, flat out (HAProxy
               has no UDP);
  churn        new connections/s to one server ip:port over 2 minutes, the
               client closing first (bench.case_close_first), per 10 s
               window, once at the namespace's defaults and once with
               tune/apply in the router (labs of their own), one repetition:
               the spread drawn is that of the 1 s rates within a window.

Sizes and the descriptor limit (20,000 per process): an idle proxied
connection holds 2 descriptors in the proxy, so one process holds 9,000
(18,000); the proxies run with a variant for it (tproxyd --max-conns 9500,
HAProxy maxconn 9300 with tune.maxpipes 100). A UDP session holds up to 2
(FD-1, src/budget.rs) and next to TCP UDP may have three quarters of what
the limit leaves, 7,404 sessions (tproxyd --udp-max-sessions 7400). Beyond
that (idle 13,000 and 18,000, UDP 10,000 flows) a point is served by two
instances of the proxy on SO_REUSEPORT (`instances`), marked as such in
the tables and charts, its figures summed over both processes.

Everything started is ended by pid and every lab deleted on any way out
(bench.tear_down in a finally).
"""

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import bench
import report
from bench import PROCS, SERVER, BenchError

IPERF_MAX_STREAMS = 128
# Servers for the clients past the first 128 streams (the first is bench's
# IPERF_PORT).
IPERF_EXTRA_PORTS = (5202,)

UDP_MAX_SESSIONS = 7400
VARIANTS = {
    "default": {},
    "idle": {"tproxyd": ["--max-conns", "9500"], "haproxy_maxconn": 9300, "haproxy_global": ["maxpipes 100"]},
    # With metrics (on the router namespace's loopback): a two-instance
    # point reads how many datagrams each instance took.
    "udp": {"tproxyd": ["--udp-max-sessions", str(UDP_MAX_SESSIONS)], "metrics": True},
}
# The first instance's metrics port; a second instance's is the next.
METRICS_PORT = 9101
CHURN_WINDOW_S = 10
# The idle curve's hold starts this long after the last connection is up:
# both proxies keep a connection's 5 s connect timeout (tproxyd's
# --connect-timeout default, `timeout connect 5s` in haproxy.cfg) in a timer
# structure that is cleaned lazily (tproxyd: TIM-3's stale heap entry, popped
# when due; HAProxy: a task woken at its old expiry to re-queue itself), so 5 s
# after the connections came up both spend a one-off burst (O(log n) per
# connection) that a hold starting 1 s after them caught, and that grows with
# n: the 9,000-connection "jump" of the first curves. Measured per 1 s slice
# (idle_cpu_ms_per_s_series) it was all in one slice, 0 before and after.
IDLE_SETTLE_S = 6.0


class Curve:
    def __init__(self, key, title, xlabel, log_x, points, quick_points, setups, variant, metrics, run, twin=(),
                 quick_twin=()):
        self.key, self.title, self.xlabel, self.log_x = key, title, xlabel, log_x
        self.points, self.quick_points, self.setups, self.variant = points, quick_points, setups, variant
        # The points served by two proxy instances on SO_REUSEPORT (beyond
        # what one process's descriptors hold), and those of --quick.
        self.twin, self.quick_twin = twin, quick_twin
        # (metric, label with unit, decimals, better: "hi"/"lo")
        self.metrics = metrics
        self.run = run


# ---------------------------------------------------------------- points

def restart_iperfs(lab):
    lab.start_iperf()
    for port in IPERF_EXTRA_PORTS:
        old = lab.servers.get(f"iperf3-{port}")
        if old is not None:
            PROCS.stop(old, grace=3.0)
        lab.servers[f"iperf3-{port}"] = PROCS.spawn(
            lab.cmd("s", ["iperf3", "-s", "-p", str(port)]), os.path.join(lab.dir, f"iperf3-server-{port}.log"))
        lab.wait_listening("s", port, proc=lab.servers[f"iperf3-{port}"])


def chunks(n, size):
    out = []
    while n > 0:
        out.append(min(n, size))
        n -= out[-1]
    return out


def point_tcp_streams(ctx, n):
    """iperf3 -P n, client to server, IPv4; above 128 streams several
    clients at once. Gbit/s at the receivers, summed."""
    d = ctx.params.duration
    ports = (bench.IPERF_PORT,) + IPERF_EXTRA_PORTS
    parts = chunks(n, IPERF_MAX_STREAMS)
    if len(parts) > len(ports):
        raise BenchError(f"{n} streams need {len(parts)} iperf3 servers, there are {len(ports)}")
    for attempt in (1, 2):
        c0, m0 = ctx.proxy.cpu(), bench.machine_cpu()
        t0 = time.monotonic()
        procs = []
        for i, k in enumerate(parts):
            argv = ["iperf3", "-c", SERVER[4], "-p", str(ports[i]), "-t", str(d), "-J", "--connect-timeout", "3000"]
            argv += ["-P", str(k)] if k > 1 else []
            procs.append(PROCS.spawn(ctx.lab.cmd("c", argv), ctx.raw_path(f"{i}.stderr"), stdout=subprocess.PIPE))
        outs, errs = [], []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=d + 30)
            except subprocess.TimeoutExpired:
                out = b""
            PROCS.stop(p, grace=3.0)
            text = out.decode(errors="replace")
            outs.append(text)
            try:
                j = bench.parse_iperf(text)
            except Exception:
                j = {"error": text.strip()[:200] or f"exit {p.returncode}"}
            if p.returncode != 0 or "error" in j:
                errs.append(str(j.get("error", f"exit {p.returncode}")))
            outs[-1] = j
        wall = time.monotonic() - t0
        c1, m1 = ctx.proxy.cpu(), bench.machine_cpu()
        ctx.save_raw(json.dumps(outs), "json" if attempt == 1 else "retry.json")
        if not errs:
            break
        if attempt == 2 or not ctx.proxy.alive():
            raise BenchError(f"iperf3: {'; '.join(errs)}")
        ctx.note(f"iperf3 failed ({'; '.join(errs)}); restarting the iperf3 servers and retrying once")
        restart_iperfs(ctx.lab)
    bits = sum(j["end"]["sum_received"]["bits_per_second"] for j in outs)
    moved = sum(j["end"]["sum_received"]["bytes"] for j in outs)
    m = {"streams": n, "clients": len(parts), "wall_s": round(wall, 3), "gbps": round(bits / 1e9, 3),
         "bytes": moved, "retransmits": sum(j["end"]["sum_sent"].get("retransmits") or 0 for j in outs),
         "machine_cpu_s": bench.machine_busy(m0, m1)}
    m["machine_cpu_s_per_gb"] = round(m["machine_cpu_s"]["busy"] / (moved / 1e9), 3) if moved else None
    if c0 is not None:
        m["proxy_cpu_s"] = round(c1 - c0, 3)
        m["proxy_cpu_s_per_gb"] = round((c1 - c0) / (moved / 1e9), 3) if moved else None
    return m


def point_http_close(ctx, n):
    ctx.params.wrk_conns = n
    m = bench.case_wrk(ctx, close=True)
    if m.get("requests"):
        m["machine_cpu_us_per_req"] = round(1e6 * m["machine_cpu_s"]["busy"] / m["requests"], 1)
    m["concurrency"] = n
    return m


def sched_cpu_s(pid):
    """CPU time of every thread of pid from /proc/PID/task/*/schedstat, in
    seconds: nanosecond resolution, where /proc/PID/stat counts in ticks
    (10 ms) and would show an idle proxy's few milliseconds as 0."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total / 1e9


class Instances:
    """What ctx.proxy is during a two-instance point: the setup's proxy and a
    second instance of it, the figures bench.py reads (cpu, fds, alive)
    summed over both."""

    def __init__(self, members):
        self.members = members
        self.setup = members[0].setup

    def cpu(self):
        return sum(p.cpu() for p in self.members)

    def fds(self):
        return sum(p.fds() or 0 for p in self.members)

    def alive(self):
        return all(p.alive() for p in self.members)


@contextlib.contextmanager
def instances(ctx, variant):
    """For the block, the proxies serving the point, as a list: the setup's
    own, and at a two-instance point (ctx.two) also a second instance of it
    with the same variant, in the same router namespace on the same port
    (tproxyd and HAProxy both set SO_REUSEPORT on their listeners, so the
    kernel spreads connections and UDP flows over both processes' sockets
    by a hash of the 4-tuple). The second is started for the block and
    stopped after it; ctx.proxy sums over both meanwhile."""
    own = ctx.proxy
    if not ctx.two or own.setup == "direct":
        yield [own] if own.setup != "direct" else []
        return
    second = bench.Proxy(own.setup, ctx.lab, ctx.lab.dir, own.opts, own.tuned, instance=2)
    set_variant(second, variant)
    try:
        second.start()
        ctx.proxy = Instances([own, second])
        yield [own, second]
    finally:
        ctx.proxy = own
        second.stop()


def check_shares(what, shares):
    """Each instance must have carried a real share of the point's work
    (SO_REUSEPORT's hash gives each about half): else the point did not
    measure two instances."""
    total = sum(shares)
    if len(shares) > 1 and (total <= 0 or min(shares) < total / (2 * len(shares))):
        raise BenchError(f"{what} were not spread over the instances: {shares}")


def point_idle(ctx, n):
    """n idle connections through a proxy started afresh for this point (one
    that has held connections keeps the memory they used), or through two
    (ctx.two): its RSS with them up, the growth per connection, and the CPU
    it spends holding them, summed over the instances."""
    use_variant(ctx, "idle", fresh=True)
    with instances(ctx, "idle") as procs:
        pids = [p.pid for p in procs]
        time.sleep(0.5)
        rss0, fds0 = [bench.proc_rss_kib(q) for q in pids], [bench.proc_fds(q) for q in pids]
        # Up to 18,000 connections from one client address to one server
        # port, with the last point's still in TIME_WAIT (the client closes
        # first, and so does the proxy upstream): the namespaces' default
        # 28,232 ports would run out, so every port, TIME_WAITs reused.
        with bench.ns_sysctls_set(ctx.lab, "cr", bench.WIDE_PORTS), \
                bench.idle_connections(ctx, SERVER[4], n, sum(fds0), grace=15.0):
            s0 = [sched_cpu_s(q) for q in pids]
            time.sleep(ctx.params.idle_settle_s)
            rss1, fds1 = [bench.proc_rss_kib(q) for q in pids], [bench.proc_fds(q) for q in pids]
            hold = ctx.params.idle_hold_s
            # The hold in 1 s slices, so that a proxy (or kernel) still
            # settling after the connections came up shows as a decay.
            c0, m0 = [sched_cpu_s(q) for q in pids], bench.machine_cpu()
            series, last = [], sum(c0)
            for _ in range(max(1, round(hold))):
                time.sleep(hold / max(1, round(hold)))
                now = sum(sched_cpu_s(q) for q in pids)
                series.append(round(1000 * (now - last) / (hold / max(1, round(hold))), 3))
                last = now
            c1, m1 = [sched_cpu_s(q) for q in pids], bench.machine_cpu()
        # 2 descriptors per idle connection in the proxy.
        held = [(b - a) // 2 for a, b in zip(fds0, fds1)]
        check_shares("idle connections", held)
    m = {
        "conns": n,
        "instances": len(pids),
        "rss_before_kib": sum(rss0),
        "rss_after_kib": sum(rss1),
        "rss_mib": round(sum(rss1) / 1024, 2),
        "rss_bytes_per_conn": round((sum(rss1) - sum(rss0)) * 1024 / n, 1),
        "fds_before": sum(fds0),
        "fds_after": sum(fds1),
        "settle_s": ctx.params.idle_settle_s,
        # What the proxy spent between the connections being up and the
        # hold (the connect-timeout burst, with the default settle).
        "settle_cpu_ms": round(1000 * (sum(c0) - sum(s0)), 3),
        "hold_s": hold,
        "idle_cpu_ms_per_s": round(1000 * (sum(c1) - sum(c0)) / hold, 3),
        "idle_cpu_ms_per_s_series": series,
        "machine_busy_pct": round(100 * bench.machine_busy(m0, m1)["busy"] / ((os.cpu_count() or 1) * hold), 1),
    }
    if len(pids) > 1:
        m["per_instance"] = [
            {"rss_before_kib": r0, "rss_after_kib": r1, "fds_before": f0, "fds_after": f1, "conns_held": h,
             "idle_cpu_ms_per_s": round(1000 * (b - a) / hold, 3)}
            for r0, r1, f0, f1, h, a, b in zip(rss0, rss1, fds0, fds1, held, c0, c1)]
    return m


def udp_forwarded(ctx, procs):
    """Datagrams each tproxyd instance has taken from clients so far (its
    metrics: tproxyd_udp_datagrams_total{direction="client_to_upstream"})."""
    out = []
    for p in procs:
        r = ctx.lab.run("r", ["curl", "-sS", "-m", "3", f"http://{metrics_addr(p)}/metrics"], 10)
        g = re.search(r'^tproxyd_udp_datagrams_total\{direction="client_to_upstream"\} (\d+)', r.stdout, re.M)
        if r.returncode != 0 or not g:
            raise BenchError(f"{p.name}: no UDP datagram count from its metrics ({r.stderr.strip()[:200]})")
        out.append(int(g.group(1)))
    return out


def point_udp_flows(ctx, n):
    use_variant(ctx, "udp")
    with instances(ctx, "udp") as procs:
        if len(procs) > 1:
            # A second instance starts with no mappings, and the flows are
            # spread anew over both: one short paced run first (2 datagrams a
            # flow, not measured) sets them up, as the earlier points' runs
            # have for a single instance (the same client ports every run).
            time.sleep(bench.UDP_SETTLE_S)
            case = ctx.case
            ctx.case = f"{case}-warmup"
            bench.udp_load_run(ctx, 4, n, 64, 2 * n, 1)
            ctx.case = case
        time.sleep(bench.UDP_SETTLE_S)
        f0 = udp_forwarded(ctx, procs) if len(procs) > 1 else None
        c0 = [p.cpu() for p in procs]
        m = bench.udp_load_run(ctx, 4, n, 64, None, ctx.params.duration)
        if len(procs) > 1:
            f1, c1 = udp_forwarded(ctx, procs), [p.cpu() for p in procs]
            took = [b - a for a, b in zip(f0, f1)]
            check_shares("UDP datagrams", took)
            m["per_instance"] = [{"datagrams_taken": t, "proxy_cpu_s": round(b - a, 3)}
                                 for t, a, b in zip(took, c0, c1)]
    m["flows"] = n
    m["instances"] = len(procs)
    return m


def point_churn(ctx, _x):
    return bench.case_close_first(ctx, 4)


CURVES = [
    Curve("tcp_streams", "TCP throughput and CPU per GB against concurrent streams (iperf3 -P, IPv4, client→server)",
          "concurrent TCP streams (log scale)", True, (1, 4, 16, 64, 256), (1, 16, 256),
          ("direct", "tproxyd", "haproxy", "haproxy_auto"), "default",
          [("gbps", "throughput (Gbit/s, at the receiver)", 2, "hi"),
           ("proxy_cpu_s_per_gb", "proxy CPU per GB (s/GB)", 3, "lo"),
           ("machine_cpu_s_per_gb", "machine CPU per GB, all processes (s/GB)", 3, "lo")],
          point_tcp_streams),
    Curve("http_close", "HTTP Connection: close against client concurrency (wrk -t1 -cN, 128-byte file)",
          "concurrent client connections (log scale)", True, (10, 25, 50, 100, 200, 400), (10, 100, 400),
          ("direct", "tproxyd", "haproxy", "haproxy_auto"), "default",
          [("rps", "connections/s", 0, "hi"), ("p99_ms", "latency p99 (ms)", 2, "lo"),
           ("proxy_cpu_us_per_req", "proxy CPU per connection (µs)", 1, "lo"),
           ("machine_cpu_us_per_req", "machine CPU per connection, all processes (µs)", 1, "lo")],
          point_http_close),
    Curve("idle", "Proxy memory and idle CPU against idle connections held (each moved 1 byte, then idle)",
          "idle connections through the proxy", False, (1000, 5000, 9000, 13000, 18000), (500, 2000),
          ("tproxyd", "haproxy", "haproxy_auto"), "idle",
          [("rss_mib", "proxy RSS with the connections up (MiB)", 1, "lo"),
           ("rss_bytes_per_conn", "RSS growth per connection (bytes)", 0, "lo"),
           ("idle_cpu_ms_per_s", "proxy CPU while holding them (ms per s, from schedstat)", 3, "lo")],
          point_idle, twin=(13000, 18000), quick_twin=(2000,)),
    Curve("udp_flows", "UDP, 64-byte datagrams flat out, against flows (examples/udp_load.rs, IPv4)",
          "UDP flows (log scale)", True, (1, 10, 100, 1000, 7000, 10000), (1, 100, 1000),
          ("direct", "tproxyd"), "udp",
          [("delivered_dps", "datagrams delivered per second", 0, "hi"),
           ("loss_pct", "loss (% of sent)", 1, "lo"),
           ("proxy_cpu_us_per_dgram", "proxy CPU per forwarded datagram (µs)", 2, "lo"),
           ("machine_cpu_us_per_dgram", "machine CPU per delivered datagram, all processes (µs)", 2, "lo")],
          point_udp_flows, twin=(10000,), quick_twin=(1000,)),
]
CHURN = Curve("churn", "New connections/s to one server ip:port, the client closing first (examples/close_first.rs)",
              "seconds into the run", False, (0,), (0,), ("direct", "tproxyd", "haproxy", "haproxy_auto"), "default",
              [("served_per_s", "connections served per second (per window)", 0, "hi")], point_churn)


def metrics_addr(proxy):
    """Where a tproxyd instance of a variant with "metrics" serves them, in
    the router namespace: a port per instance."""
    return f"127.0.0.1:{METRICS_PORT + (0 if proxy.name == proxy.setup else 1)}"


def set_variant(proxy, name):
    """Give a (stopped) proxy the options of variant `name` of VARIANTS."""
    v = VARIANTS[name]
    proxy.extra_args = list(v.get("tproxyd", []))
    if v.get("metrics"):
        proxy.extra_args += ["--metrics", metrics_addr(proxy)]
    proxy.maxconn = v.get("haproxy_maxconn", bench.HAPROXY_MAXCONN)
    proxy.extra_global = list(v.get("haproxy_global", []))
    proxy.variant = name


def use_variant(ctx, name, fresh=False):
    """Run the setup's proxy as variant `name` of VARIANTS (restarting it
    only when it runs another, or always with fresh), checked with curl."""
    proxy = ctx.proxy
    if proxy.setup == "direct" or (getattr(proxy, "variant", "default") == name and not fresh):
        return
    proxy.stop()
    set_variant(proxy, name)
    proxy.start()
    try:
        bench.verify_forwarding(ctx.lab, proxy, ctx.lab.expect)
    except BenchError as e:
        # Seen once on the loaded machine: a restarted tproxyd's first IPv6
        # connection not answered within curl's 5 s. Noted, and tried again.
        ctx.note(f"after restarting {proxy.setup} as '{name}': {e}; checking again")
        bench.verify_forwarding(ctx.lab, proxy, ctx.lab.expect)


# ---------------------------------------------------------------- sizing

def curve_points(curve, quick):
    return curve.quick_points if quick else curve.points


def twin_points(curve, quick):
    return curve.quick_twin if quick else curve.twin


def estimate_s(setups, params, quick, chosen, churn):
    """Seconds the run should take: per point and setup, the run itself plus
    what it costs around it (measured on this machine)."""
    d = params.duration
    per = {
        "tcp_streams": lambda x: d + 0.3 + (0.5 if x >= 64 else 0),
        "http_close": lambda x: d + 0.2,
        "idle": lambda x: 2.5 + x / 2500 + params.idle_hold_s + params.idle_settle_s,
        "udp_flows": lambda x: bench.UDP_SETTLE_S + d + 0.4,
    }
    # A two-instance point starts the second; UDP's also runs its warm-up.
    twin = {"idle": 0.5, "udp_flows": 0.5 + bench.UDP_SETTLE_S + 1 + 0.4}
    t = 0.0
    for c in chosen:
        n = len([s for s in setups if s in c.setups])
        t += params.reps * n * sum(per[c.key](x) + (twin[c.key] if x in twin_points(c, quick) else 0)
                                   for x in curve_points(c, quick))
    if churn:
        t += 2 * len(setups) * (params.close_first_s + 1)
    t += (2 if churn else 1) * len(setups) * 3  # labs up
    return t


# ---------------------------------------------------------------- main

def main(opts, argv):
    quick = opts.quick
    params = bench.Params(quick, opts.reps or (1 if quick else 3), opts.duration)
    params.idle_hold_s = 1 if quick else 5
    # --quick keeps 1 s: its idle CPU then includes that burst (a smoke).
    params.idle_settle_s = 1.0 if quick else IDLE_SETTLE_S
    params.close_first_s = 6 if quick else 120
    params.churn_window_s = 1 if quick else CHURN_WINDOW_S
    out = os.path.abspath(opts.out)
    raw = os.path.join(out, "raw-curves")
    shutil.rmtree(raw, ignore_errors=True)
    work = os.path.join(raw, "lab")
    os.makedirs(work, exist_ok=True)
    setups = [s for s in opts.setup_list]
    chosen = [c for c in CURVES if c.key in opts.curve_list]
    churn = CHURN.key in opts.curve_list
    if churn:
        bench.check_tune(opts, "--curves (the churn curve's tuned labs)")
    bench.build(opts, raw, [bench.UDP_LOAD, bench.CLOSE_FIRST])
    est = estimate_s(setups, params, quick, chosen, churn)
    finish = datetime.datetime.now() + datetime.timedelta(seconds=est)
    print(f"== curves: {params.reps} repetition(s), {params.duration} s runs, setups {','.join(setups)}:"
          f" about {est / 60:.0f} min (until ~{finish:%H:%M})", flush=True)
    started = time.time()
    results = {
        **bench.run_header(argv, opts, params, started, kind="curves"),
        "estimate_s": round(est),
        "setups": setups,
        "curves": {c.key: list(curve_points(c, quick)) for c in chosen},
        "two_instances": {c.key: list(twin_points(c, quick)) for c in chosen if twin_points(c, quick)},
        "variants": VARIANTS,
        "tproxyd_args": opts.tproxyd_args,
        "haproxy_global": opts.haproxy_global,
        "tune": {"dir": opts.tune_dir, "roles": opts.tune_roles, "args": opts.tune_args},
        "runs": [],
        "notes": [],
    }
    tag = f"cur{os.getpid() % 100000}"
    labs, proxies, tune_states = {}, {}, []
    try:
        for pname in ("base", "tuned") if churn else ("base",):
            for setup in setups:
                lab, _ = bench.lab_up(f"{tag}{pname[0]}{bench.SETUP_LETTER[setup]}", setup, pname == "tuned", opts,
                                      work, labs, proxies, tune_states, (pname, setup))
                if pname == "base":
                    restart_iperfs(lab)

        def one(curve, pname, rep, setup, x):
            lab, proxy = labs[(pname, setup)], proxies[(pname, setup)]
            ctx = bench.Ctx(raw, pname, rep, setup, lab, proxy, params, results["notes"])
            ctx.case = f"{curve.key}-{x}"
            ctx.two = x in twin_points(curve, quick)
            def point():
                if curve.variant != "idle":
                    use_variant(ctx, curve.variant)
                return curve.run(ctx, x)

            rec = bench.measure(ctx, {"curve": curve.key, "x": x, "pass": pname, "rep": rep, "setup": setup},
                                point, results["runs"])
            print(f"   [{rep}/{params.reps}] {curve.key:<11} {str(x):>5} {setup:<12}{'(tuned) ' if pname == 'tuned' else ''}"
                  + one_line(rec), flush=True)
            if not proxy.alive():
                raise BenchError(f"{setup} died during {curve.key} {x} (log: {os.path.join(lab.dir, setup + '.log')})")

        step = 0
        for rep in range(1, params.reps + 1):
            for curve in chosen:
                print(f"== {curve.key}, repetition {rep}", flush=True)
                for x in curve_points(curve, quick):
                    ss = [s for s in setups if s in curve.setups]
                    k = step % len(ss) if ss else 0
                    step += 1
                    for setup in ss[k:] + ss[:k]:
                        one(curve, "base", rep, setup, x)
        # The churn curve: one repetition of 2 minutes per setup and pass,
        # base and tuned alternating, setups in turn.
        if churn:
            print("== churn", flush=True)
        for i, setup in enumerate(setups if churn else []):
            for pname in (("base", "tuned") if i % 2 == 0 else ("tuned", "base")):
                one(CHURN, pname, 1, setup, 0)
        for proxy in proxies.values():
            proxy.stop()
    finally:
        bench.tear_down(opts, labs, tune_states)
        results["seconds"] = round(time.time() - started, 1)
        with open(os.path.join(out, "results-curves.json"), "w") as f:
            json.dump(results, f, indent=1)
    write_all(results, out)
    print(f"\nwrote {out}/results-curves.json, results-curves.md, curve-*.svg ({results['seconds']:.0f} s,"
          f" estimated {est:.0f} s)")
    return 1 if any(not r["ok"] for r in results["runs"]) else 0


def one_line(rec):
    if not rec.get("ok"):
        return f"FAILED: {rec.get('error')}  [{rec['seconds']} s]"
    m = rec["metrics"]
    keys = [("gbps", "Gbit/s", 2), ("rps", "conn/s", 0), ("p99_ms", "ms p99", 2), ("delivered_dps", "dgram/s", 0),
            ("loss_pct", "% loss", 1), ("rss_mib", "MiB", 1), ("rss_bytes_per_conn", "B/conn", 0),
            ("idle_cpu_ms_per_s", "ms/s idle CPU", 2), ("first10_cps", "conn/s first 10 s", 0),
            ("last10_cps", "conn/s last 10 s", 0), ("mean_cps", "conn/s mean", 0), ("failed", "failed", 0),
            ("proxy_cpu_s_per_gb", "s/GB proxy", 3), ("proxy_cpu_us_per_req", "µs/conn proxy", 1),
            ("proxy_cpu_us_per_dgram", "µs/dgram proxy", 2), ("machine_cpu_us_per_dgram", "µs/dgram machine", 2)]
    parts = [f"{report.fmt(m[k], dec)} {unit}" for k, unit, dec in keys if m.get(k) is not None]
    shares = [p.get("conns_held", p.get("datagrams_taken")) for p in m.get("per_instance", [])]
    if shares:
        parts.append(f"2 instances ({' + '.join(f'{v:,}' for v in shares)})")
    return ", ".join(parts) + f"  [{rec['seconds']} s]"


# ---------------------------------------------------------------- report

def curve_by_key(key):
    return next(c for c in CURVES + [CHURN] if c.key == key)


def summarize(results):
    """{curve: {metric: {(pass, setup): [(x, median, min, max, runs)]}}}."""
    out = {}
    for key, xs in results["curves"].items():
        c = curve_by_key(key)
        out[key] = {}
        for metric, *_ in c.metrics:
            rows = {}
            for setup in results["setups"]:
                pts = []
                for x in xs:
                    v = [r["metrics"][metric] for r in results["runs"]
                         if r["curve"] == key and r["x"] == x and r["setup"] == setup and r["pass"] == "base"
                         and r.get("ok") and r["metrics"].get(metric) is not None]
                    if v:
                        pts.append((x, statistics.median(v), min(v), max(v), v))
                if pts:
                    rows[("base", setup)] = pts
            out[key][metric] = rows
    return out


def churn_windows(results, window):
    """{(pass, setup): [(window start s, median 1 s rate, min, max)]} from
    each churn run's per-second series."""
    out = {}
    for r in results["runs"]:
        if r["curve"] != "churn" or not r.get("ok"):
            continue
        ok = r["metrics"]["served_per_s"]
        pts = []
        for i in range(0, len(ok), window):
            w = ok[i:i + window]
            if w:
                pts.append((i, statistics.median(w), min(w), max(w), sum(w) / len(w)))
        out[(r["pass"], r["setup"])] = pts
    return out


def ratio_text(a, b):
    return report.fmt_ratio(a / b) if a is not None and b else "n/a"


def write_all(results, out):
    summary = summarize(results)
    window = results["params"].get("churn_window_s", CHURN_WINDOW_S)
    churn = churn_windows(results, window)
    twins = results.get("two_instances", {})
    results["summary"] = {
        key: {metric: {f"{p}/{s}": [{"x": x, "median": m, "min": lo, "max": hi, "runs": v,
                                     "instances": 0 if s == "direct" else 2 if x in twins.get(key, ()) else 1}
                                    for x, m, lo, hi, v in pts] for (p, s), pts in rows.items()}
              for metric, rows in figs.items()}
        for key, figs in summary.items()}
    results["churn_windows"] = {f"{p}/{s}": [{"t": t, "median": m, "min": lo, "max": hi, "mean": mean}
                                             for t, m, lo, hi, mean in pts] for (p, s), pts in churn.items()}
    with open(os.path.join(out, "results-curves.json"), "w") as f:
        json.dump(results, f, indent=1)
    files = {}
    for c in [c for c in CURVES if c.key in summary]:
        path = f"curve-{c.key.replace('_', '-')}.svg"
        files[c.key] = path
        panels = []
        for metric, label, _, better in c.metrics:
            series = []
            for setup in results["setups"]:
                pts = summary[c.key][metric].get(("base", setup))
                if pts:
                    series.append({"name": setup, "color": report.SETUP_COLORS.get(setup, "#333"),
                                   "points": [(x, m, lo, hi) for x, m, lo, hi, _ in pts],
                                   # Direct is the kernel at every point.
                                   "marked": () if setup == "direct" else twins.get(c.key, ())})
            if series:
                panels.append({"ylabel": label + (" ↑" if better == "hi" else " ↓"), "series": series})
        if panels:
            sub = spread_text(results) + (f" {TWIN_NOTE}" if twins.get(c.key) else "")
            report.line_chart(os.path.join(out, path), c.title, sub, c.xlabel, results["curves"][c.key], c.log_x,
                              panels, TWIN_LABEL)
    if churn:
        series = []
        for pname in ("base", "tuned"):
            for setup in results["setups"]:
                pts = churn.get((pname, setup))
                if pts:
                    series.append({"name": f"{setup}{', tuned' if pname == 'tuned' else ''}",
                                   "color": report.SETUP_COLORS.get(setup, "#333"), "dash": pname == "tuned",
                                   "band": True, "points": [(t + window / 2, m, lo, hi) for t, m, lo, hi, _ in pts]})
        xs = [0, results["params"]["close_first_s"]]
        files["churn"] = "curve-churn.svg"
        report.line_chart(os.path.join(out, "curve-churn.svg"), CHURN.title,
                          f"Median of the 1 s rates in each {window} s window, band: their min-max. Solid: the router"
                          " namespace's defaults; dashed: tune/apply in the router. One run each.",
                          CHURN.xlabel, xs, False,
                          [{"ylabel": "new connections/s served ↑", "series": series}])
    write_md(results, summary, churn, window, files, out)


TWIN_LABEL = "two instances"
TWIN_NOTE = ("Open squares past the dotted line: two proxy instances on SO_REUSEPORT (one process's 20,000"
             " descriptors hold no more), their figures summed: a different setup, not the curve of one"
             " process (direct: the kernel, as everywhere).")


def point_label(results, key, x):
    """A table's x cell: the point, marked when two instances served it."""
    return f"{x:,} (2 instances)" if x in results.get("two_instances", {}).get(key, ()) else f"{x:,}"


def spread_text(results):
    return (f"Medians of {results['params']['reps']} rotated repetition(s); whiskers: min-max."
            f" {results['machine']['nproc']} shared CPUs, kernel {results['machine']['kernel']}.")


def write_md(results, summary, churn, window, files, out):
    setups = results["setups"]
    lines = ["# How cost grows: curves (benches/run --curves)", "",
             "Medians over the repetitions (min-max in brackets). Ratios are to direct (and tproxyd to HAProxy),"
             " medians over medians. ↑ higher is better, ↓ lower is better.", ""]
    for c in CURVES:
        if c.key not in summary:
            continue
        lines += [f"## {c.title}", "", f"![{c.key}]({files[c.key]})", ""]
        if results.get("two_instances", {}).get(c.key):
            lines += ["Rows marked *(2 instances)*: served by two proxy instances on SO_REUSEPORT in the same router"
                      " namespace (one process's 20,000 descriptors hold no more), each proxy figure summed over"
                      " both processes (RSS counts each one's own base memory); a different setup from the rows"
                      " above it, so read the step there as the second process, not as the proxy's curve. Direct"
                      " is the kernel either way. See Method.", ""]
        for metric, label, dec, better in c.metrics:
            rows = summary[c.key][metric]
            have = [s for s in setups if ("base", s) in rows]
            if not have:
                continue
            head = [c.xlabel.replace(" (log scale)", "")] + have
            ratios = []
            if "direct" in have:
                ratios += [(s, "direct") for s in have if s != "direct"]
            if "tproxyd" in have and "haproxy" in have:
                ratios.append(("tproxyd", "haproxy"))
            head += [f"{a}÷{b}" for a, b in ratios]
            lines += [f"{label} {'↑' if better == 'hi' else '↓'}:", "",
                      "| " + " | ".join(head) + " |", "|" + "--:|" * len(head)]
            for x in results["curves"][c.key]:
                cells = [point_label(results, c.key, x)]
                med = {}
                for s in have:
                    p = next((p for p in rows[("base", s)] if p[0] == x), None)
                    if p:
                        med[s] = p[1]
                        cells.append(f"{report.fmt(p[1], dec)} ({report.fmt(p[2], dec)}–{report.fmt(p[3], dec)})")
                    else:
                        cells.append("n/a")
                cells += [ratio_text(med.get(a), med.get(b)) for a, b in ratios]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    if churn:
        lines += [f"## {CHURN.title}", "", f"![churn]({files['churn']})", "",
                  f"New connections/s served, per {window} s window (median of its 1 s rates, min-max), at the"
                  " router namespace's defaults (base) and with tune/apply in the router (tuned); one run each,"
                  " the client namespace with tcp_tw_reuse=1 and ports 1024-65535 in every setup"
                  " (bench.case_close_first).", ""]
        keys = [(p, s) for p in ("base", "tuned") for s in setups if (p, s) in churn]
        head = ["window (s)"] + [f"{s}{' tuned' if p == 'tuned' else ''}" for p, s in keys]
        lines += ["| " + " | ".join(head) + " |", "|" + "--:|" * len(head)]
        n = max(len(churn[k]) for k in keys)
        for i in range(n):
            t = churn[keys[0]][i][0] if i < len(churn[keys[0]]) else i * window
            cells = [f"{t}–{t + window}"]
            for k in keys:
                p = churn[k][i] if i < len(churn[k]) else None
                cells.append(f"{p[1]:,.0f} ({p[2]:,}–{p[3]:,})" if p else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Over the whole run:", "", "| setup | pass | mean conn/s | failed | proxy CPU (s) |",
                  "|---|---|--:|--:|--:|"]
        for r in results["runs"]:
            if r["curve"] == "churn" and r.get("ok"):
                m = r["metrics"]
                lines.append(f"| {r['setup']} | {r['pass']} | {m['mean_cps']:,.0f} | {m['failed']:,} |"
                             f" {report.fmt(m.get('proxy_cpu_s'), 1)} |")
        lines.append("")
    lines += method_md(results)
    failed = [r for r in results["runs"] if not r.get("ok")]
    if failed or results.get("notes"):
        lines += ["## Notes and failures", ""] + [f"- {n}" for n in results.get("notes", [])]
        lines += [f"- FAILED {r['pass']} rep{r['rep']} {r['setup']} {r['curve']} {r['x']}: {r.get('error')}"
                  for r in failed]
        lines.append("")
    with open(os.path.join(out, "results-curves.md"), "w") as f:
        f.write("\n".join(lines))


def twin_method(results, key, what):
    """The Method's words for a curve's two-instance points."""
    xs = results.get("two_instances", {}).get(key)
    if not xs:
        return ""
    common = (f" {', '.join(f'{x:,}' for x in xs)} {what} (2 instances): a second proxy process of the same"
              " variant started for the point in the same router namespace, on the same port; both set"
              " SO_REUSEPORT on their listeners, so the kernel spreads new connections and UDP flows over the two"
              " processes' sockets by a hash of the 4-tuple (checked at each point: the point fails unless each"
              " instance carried at least a quarter, per_instance in the JSON). Its figures are summed over both"
              " processes, CPU and RSS (each process's base memory counted once per process) and growth per"
              " connection (summed growth over N): a different setup from one process, marked as such in the"
              " tables and drawn as open squares.")
    if key == "udp_flows":
        common += (" The second instance starts without mappings and the flows are spread anew, so one short"
                   " paced run (2 datagrams a flow, not measured) comes first; the share is each instance's"
                   " tproxyd_udp_datagrams_total{direction=\"client_to_upstream\"}; CPU per datagram is both"
                   " instances' CPU over the datagrams both forwarded.")
    else:
        common += " The share is each instance's descriptors held (2 a connection)."
    return common


def method_md(results):
    mach, p, v = results["machine"], results["params"], results["versions"]
    loads = sorted(r["loadavg1_at_start"] for r in results["runs"] if "loadavg1_at_start" in r)
    load = (f" 1-minute load average when each point started: median {statistics.median(loads):.1f}, max"
            f" {loads[-1]:.1f} (the bench alone keeps it near 1-2; more means other work shared the CPUs)."
            if loads else "")
    return [
        "## Method", "",
        f"- Machine: {mach['nproc']} CPUs ({mach['cpu_model']}), kernel {mach['kernel']}; load average at start"
        f" {' '.join(mach['loadavg_at_start'])}. The machine is shared: other work runs beside the bench, and the"
        " client, router and server namespaces share these CPUs with it. Compare setups within a point, not"
        " points across runs.",
        "- Setups as in results.md's Method (benches/README.md): direct = the kernel forwards; tproxyd and"
        " HAProxy (splice both ways, 1 MiB pipes, nbthread 2, pinned) in the router namespace of a tproxy lab."
        " Each setup has its own lab for the whole run.",
        f"- Repetitions: {p['reps']} per point and setup, back to back, the setup order rotated from one point to"
        f" the next; {p['duration']} s per iperf3/wrk/udp_load run.",
        "- TCP streams: `iperf3 -c 198.19.0.2 -P N -t D -J`; above 128 streams (iperf3's limit), clients of 128"
        " at once against servers of their own, summed. Proxy CPU = utime+stime of its process; machine CPU ="
        " busy time from /proc/stat (all processes).",
        "- Connection: close: `wrk -t1 -cN --latency -H 'Connection: close'`, nginx's 128-byte file.",
        f"- Idle: the proxy is restarted for each point (tproxyd {' '.join(VARIANTS['idle']['tproxyd'])};"
        f" HAProxy maxconn {VARIANTS['idle']['haproxy_maxconn']}, {'; '.join(VARIANTS['idle']['haproxy_global'])}:"
        " 2 descriptors per idle connection within the 20,000 limit); N connections each get the server's 1 byte"
        " (client and router namespaces with every port, 1024-65535, and tcp_tw_reuse=1 for the point, so that"
        f" the last point's TIME_WAITs do not run them out); {p.get('idle_settle_s')} s after the last is up RSS is"
        " read (the settle lets both proxies' 5 s connect timeouts fall due first: a one-off, lazily cleaned"
        " timer pass per connection, in the JSON as settle_cpu_ms), then the proxy's CPU (all threads' schedstat"
        f" run time, in ns) over {p.get('idle_hold_s')} s of holding them (per 1 s slice in the JSON). Kernel"
        " memory (socket buffers) is not in RSS."
        + twin_method(results, "idle", "connections"),
        f"- UDP: examples/udp_load.rs, 64-byte datagrams, no rate limit, N flows (one client socket and port each,"
        f" the same ports every run), tproxyd with --udp-max-sessions {UDP_MAX_SESSIONS} (2 descriptors a session"
        " next to TCP's share: 7,404 fit in 20,000) and --metrics on the router's loopback. Not HAProxy (no UDP)."
        + twin_method(results, "udp_flows", "flows"),
        f"- Churn: examples/close_first.rs, {p.get('close_first_conns')} connections in flight for"
        f" {p.get('close_first_s')} s, the client closing first; base labs at the namespace defaults, tuned labs"
        " with tune/apply in the router namespace.",
        f"- Versions: {'; '.join(f'{k} {val}' for k, val in v.items())}.",
        f"- Run: `{results['command']}` started {results['started']}, took {results.get('seconds', 0):.0f} s"
        f" (estimated {results.get('estimate_s', 0)} s).{load}", ""]


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(bench.BENCHES, "results")
    with open(os.path.join(d, "results-curves.json")) as f:
        res = json.load(f)
    write_all(res, d)
    print(f"re-rendered {d}/results-curves.md and curve-*.svg")
