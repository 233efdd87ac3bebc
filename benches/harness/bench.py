#!/usr/bin/env python3
"""The side-by-side bench: direct forwarding, tproxyd and HAProxy on the same
three-namespace lab, in one run. Started by benches/run (see benches/README.md).

Shape of a run:
  - build tproxyd (cargo build --release);
  - per setup (and per pass: "base", and "tuned" with --tune) one lab of its
    own, all up at once, each with the same servers in its server namespace
    (iperf3, nginx, a 1-byte echo server, a connection-holding server) and
    its proxy started once and checked with curl;
  - for each repetition, for each case, every setup back to back, in an order
    rotated from one case and repetition to the next, so that a burst of
    other work on this shared machine hits neighbouring setups alike and no
    setup always goes first;
  - medians over the repetitions, ratios, targets: report.py writes
    results.json, results.md and ratios.svg and prints the table.

Everything started here is tracked and ended by its pid; the labs are torn
down on every way out (normal end, error, SIGINT, SIGTERM, SIGHUP).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCHES)
LAB = os.path.join(ROOT, "scripts", "lab.sh")
TOOLS = os.path.join(HERE, "tools.py")
# examples/udp_load.rs, built with tproxyd (cargo build --release --bins --examples).
UDP_LOAD = os.path.join(ROOT, "target", "release", "examples", "udp_load")
# examples/close_first.rs, built with tproxyd (built with the examples above).
CLOSE_FIRST = os.path.join(ROOT, "target", "release", "examples", "close_first")
CONF = os.path.join(BENCHES, "conf")
TUNE_DIR = os.path.join(ROOT, "tune")

sys.path.insert(0, HERE)
# curves.py and matrix.py import this module as `bench`: let them share this
# run's instance (its PROCS) rather than load a second copy.
sys.modules.setdefault("bench", sys.modules[__name__])
import report  # noqa: E402

PROXY_PORT = 8080
IPERF_PORT = 5201
HTTP_PORT = 80
RR_PORT = 7001
HOLD_PORT = 7002
UDP_LOAD_PORT = 7003
# The many-flow sender's client ports: UDP_LOAD_BASE_PORT.. one per flow,
# below the client namespace's ephemeral range. The same ports every run, so
# a proxy's mappings carry over and the rows measure forwarding, not set-up.
UDP_LOAD_BASE_PORT = 20000
SERVER = {4: "198.19.0.2", 6: "2001:2:0:2::2"}
CLIENT = {4: "198.18.0.2", 6: "2001:2:0:1::2"}
SMALL_FILE = "small.txt"
SMALL_FILE_BYTES = 128

# HAProxy: 2 sockets per connection plus maxconn/4 pipes of 2 fds must fit in
# the 20,000-descriptor limit (checked at start by `haproxy -c`).
HAPROXY_MAXCONN = 7500
HAPROXY_SPLICE = {
    "both": "    option splice-request\n    option splice-response",
    "auto": "    option splice-auto",
}

SETUPS = ("direct", "tproxyd", "haproxy", "haproxy_auto")
SETUP_LETTER = {"direct": "d", "tproxyd": "t", "haproxy": "h", "haproxy_auto": "a"}

# Case -> which setups it applies to. HAProxy has no UDP; direct has no proxy
# whose memory could be measured.
CASES = [
    "tcp1_up_v4", "tcp1_down_v4", "tcp4_up_v4",
    "tcp1_up_v6", "tcp1_down_v6", "tcp4_up_v6",
    "tcp1_2g_v4",
    "http_ka", "http_close",
    "rr_v4",
] + [c for c, _, _, _ in report.UDP_CASES] + [
    "idle_v4",
    "close_first_v4",
]
UDP = {c: (flows, length, rate) for c, flows, length, rate in report.UDP_CASES}
# Run only when asked for (--cases): two minutes per setup and repetition,
# and it leaves the router's ports in TIME_WAIT for a minute after.
OPT_IN_CASES = ("close_first_v4",)
GROUPS = {
    "tcp": [c for c in CASES if c.startswith("tcp") and "2g" not in c],
    "cpu": ["tcp1_up_v4", "tcp1_2g_v4"],
    "http": ["http_ka", "http_close"],
    "rr": ["rr_v4"],
    "udp": list(UDP),
    "udp1": [c for c in UDP if UDP[c][0] == 1],
    "udp1k": [c for c in UDP if UDP[c][0] > 1],
    "idle": ["idle_v4"],
    "mem": ["idle_v4"],
    "churn": ["close_first_v4"],
}
# --quick without --cases (CI's smoke) runs three of the eight UDP cases: one
# of each tool at each pacing (iperf3 flat out and paced, udp_load paced), so
# that it stays about as short as before issue 11's rows.
QUICK_UDP = ("udp1_64_max_v4", "udp1_64_100k_v4", "udp1k_64_100k_v4")
# --curves LIST: the names of curves.py's curves.
CURVE_NAMES = ("tcp_streams", "http_close", "idle", "udp_flows", "churn")


# splice-auto only differs from splice-request/response where messages are
# small; on bulk it loses (30-40% less throughput, twice the CPU per GB in
# this lab), so by default it runs only the cases where it can be HAProxy's
# better configuration. --cases runs whatever is asked.
HAPROXY_AUTO_DEFAULT_CASES = ("http_ka", "http_close", "rr_v4", "idle_v4")


def applies(case, setup, explicit=False):
    if setup == "haproxy_auto" and not explicit and case not in HAPROXY_AUTO_DEFAULT_CASES:
        return False
    if case.startswith("udp") and setup.startswith("haproxy"):
        return False
    if case.startswith("idle") and setup == "direct":
        return False
    return True


class Params:
    """Durations and sizes; --quick shrinks them to a smoke run."""

    def __init__(self, quick, reps, duration):
        self.quick = quick
        self.reps = reps if reps else (1 if quick else 5)
        self.duration = duration if duration else (1 if quick else 4)
        self.wrk_conns = 32
        self.rr_count = 2000 if quick else 20000
        self.rr_warmup = 200 if quick else 500
        # Round trips are split over this many connections, one after the
        # other: each lands on a worker (and CPU) chosen by SO_REUSEPORT's
        # hash, so one connection alone makes a bimodal figure.
        self.rr_conns = 2 if quick else 8
        self.idle_conns = 1000 if quick else 3000
        self.fixed_tcp_rate = "2G"
        self.udp_fixed_dps = report.UDP_FIXED_DPS
        self.udp_many_flows = report.UDP_MANY_FLOWS
        self.udp_settle_s = UDP_SETTLE_S
        # close_first_v4: long enough for the router's ports to run out
        # (28,232 at ~10,000/s) and for the first TIME_WAITs to expire (60 s).
        self.close_first_s = 10 if quick else 120
        self.close_first_conns = 64

    def as_dict(self):
        return dict(self.__dict__)


# ---------------------------------------------------------------- processes

class Procs:
    """Every background process this run starts, so that all of them and only
    they are ended, by pid, on the way out."""

    def __init__(self):
        self.live = []

    def spawn(self, argv, log_path, stdin=subprocess.DEVNULL, stdout=None):
        log = open(log_path, "ab")
        p = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        p.argv_text = " ".join(shlex.quote(a) for a in argv)
        self.live.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, grace=10.0):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def stop_all(self):
        for p in list(self.live):
            try:
                self.stop(p, grace=3.0)
            except Exception as e:  # keep going: the rest must be ended too
                print(f"bench: could not stop pid {p.pid}: {e}", file=sys.stderr)


PROCS = Procs()


def run(argv, timeout, check=False):
    """Run a bounded foreground command; returns CompletedProcess (text)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        r = subprocess.CompletedProcess(argv, 124, e.stdout or "", (e.stderr or "") + "\n(timed out)")
        if isinstance(r.stdout, bytes):
            r.stdout = r.stdout.decode(errors="replace")
        if isinstance(r.stderr, bytes):
            r.stderr = r.stderr.decode(errors="replace")
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:400]}")
    return r


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- /proc

def proc_cpu_seconds(pid):
    """utime + stime of a process, all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def machine_cpu():
    """A sample for machine_busy(): wall clock and all CPUs' idle time.

    Busy time is taken as CPUs x wall time minus idle time, not as the sum of
    /proc/stat's user/system/softirq fields: those are sampled at the tick,
    and on a tickless kernel a CPU that is busy in short bursts between idle
    periods (a paced iperf3, say) is sampled badly -- by 10x either way here.
    The idle (and iowait) times of a tickless CPU are measured exactly."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    v = [int(x) for x in parts[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return {"t": time.monotonic(), "idle": (v[3] + v[4]) / hz, "softirq_ticks": v[6] / hz}


def machine_busy(a, b):
    """Machine-wide CPU seconds used between two machine_cpu() samples."""
    wall = b["t"] - a["t"]
    return {
        "busy": round(max(0.0, (os.cpu_count() or 1) * wall - (b["idle"] - a["idle"])), 3),
        "wall": round(wall, 3),
        "softirq_sampled": round(b["softirq_ticks"] - a["softirq_ticks"], 3),
    }


# ---------------------------------------------------------------- the lab

class Lab:
    def __init__(self, name, mode, workdir):
        self.name = name
        self.mode = mode
        self.dir = workdir
        self.up_done = False
        self.servers = {}
        self.expect = None  # the small file's text, once the servers are up

    def ns(self, role):
        return f"{self.name}-{role}"

    def cmd(self, role, argv):
        return ["ip", "netns", "exec", self.ns(role)] + list(argv)

    def run(self, role, argv, timeout, check=False):
        return run(self.cmd(role, argv), timeout, check)

    def up(self):
        argv = [LAB, "up", self.name, "--mode", self.mode]
        if self.mode == "tproxy":
            argv += ["--port", str(PROXY_PORT)]
        self.up_done = True  # even a failed "up" may need a "down"
        run(argv, 60, check=True)

    def down(self):
        if not self.up_done:
            return
        # Anything still running inside the lab's namespaces was started by
        # this run (the namespaces are ours): end it before deleting them.
        for role in "crs":
            r = run(["ip", "netns", "pids", self.ns(role)], 10)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        run([LAB, "down", self.name], 60)
        self.up_done = False

    def wait_listening(self, role, port, proto="t", timeout=10.0, proc=None):
        """Until something listens on port (with proc: proc itself, by its
        pid in `ss -p`, so that a second instance on a port already taken
        through SO_REUSEPORT is not taken for listening by the first's
        socket)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{proc.argv_text} exited ({proc.returncode}) before listening on {port}")
            r = self.run(role, ["ss", "-Hlnp" + proto, f"sport = :{port}"], 5)
            if r.stdout.strip() and (proc is None or f"pid={proc.pid}," in r.stdout):
                return
            time.sleep(0.05)
        raise BenchError(f"nothing listening on {port}/{proto} in {self.ns(role)} after {timeout}s")

    def start_servers(self):
        d = self.dir
        os.makedirs(os.path.join(d, "www"), exist_ok=True)
        os.makedirs(os.path.join(d, "nginx.tmp"), exist_ok=True)
        with open(os.path.join(d, "www", SMALL_FILE), "w") as f:
            f.write(("tproxyd bench " * 20)[: SMALL_FILE_BYTES - 1] + "\n")
        with open(os.path.join(CONF, "nginx.conf")) as f:
            conf = f.read().replace("@DIR@", d)
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(conf)
        self.start_iperf()
        self.servers["nginx"] = PROCS.spawn(
            self.cmd("s", ["nginx", "-e", os.path.join(d, "nginx.error.log"), "-p", d, "-c", os.path.join(d, "nginx.conf")]),
            os.path.join(d, "nginx.out"))
        self.servers["rr"] = PROCS.spawn(
            self.cmd("s", [sys.executable, TOOLS, "rr-server", "--port", str(RR_PORT)]), os.path.join(d, "rr-server.log"))
        self.servers["hold"] = PROCS.spawn(
            self.cmd("s", [sys.executable, TOOLS, "hold-server", "--port", str(HOLD_PORT)]), os.path.join(d, "hold-server.log"))
        self.wait_listening("s", HTTP_PORT, proc=self.servers["nginx"])
        self.wait_listening("s", RR_PORT, proc=self.servers["rr"])
        self.wait_listening("s", HOLD_PORT, proc=self.servers["hold"])

    def start_iperf(self):
        old = self.servers.get("iperf3")
        if old is not None:
            PROCS.stop(old, grace=3.0)
        self.servers["iperf3"] = PROCS.spawn(
            self.cmd("s", ["iperf3", "-s", "-p", str(IPERF_PORT)]), os.path.join(self.dir, "iperf3-server.log"))
        self.wait_listening("s", IPERF_PORT, proc=self.servers["iperf3"])

    def counters(self, role):
        """TCP counters of one namespace: TcpExt (netstat) and Tcp (snmp)."""
        r = self.run(role, ["cat", "/proc/net/netstat", "/proc/net/snmp"], 5)
        out = {}
        lines = r.stdout.splitlines()
        for head, vals in zip(lines[0::2], lines[1::2]):
            hk, hv = head.split(), vals.split()
            if not hk or hk[0] != hv[0]:
                continue
            prefix = hk[0].rstrip(":")
            for k, v in zip(hk[1:], hv[1:]):
                try:
                    out[prefix + k] = int(v)
                except ValueError:
                    pass
        return out


# ---------------------------------------------------------------- proxies

class Proxy:
    """The setup's forwarding element in the router namespace (or none)."""

    def __init__(self, setup, lab, workdir, opts, tuned, instance=1):
        self.setup = setup
        # A second instance of the setup's proxy in the same namespace, on
        # the same port (SO_REUSEPORT: curves.py), has files of its own.
        self.name = setup if instance == 1 else f"{setup}-{instance}"
        self.lab = lab
        self.dir = workdir
        self.opts = opts
        self.tuned = tuned
        self.p = None
        self.argv = None
        # A variant for one experiment (curves.py, matrix.py): extra tproxyd
        # options, HAProxy's maxconn and extra global lines.
        self.extra_args = []
        self.maxconn = HAPROXY_MAXCONN
        self.extra_global = []

    @property
    def pid(self):
        return self.p.pid if self.p else None

    def start(self):
        if self.setup == "direct":
            return
        log = os.path.join(self.dir, f"{self.name}.log")
        if self.setup == "tproxyd":
            argv = [self.opts.bin, "--port", str(PROXY_PORT), "--drain-timeout", "2s"]
            argv += shlex.split(self.opts.tproxyd_args or "")
            targs = os.path.join(self.opts.tune_dir, "tproxyd.args")
            if self.tuned and os.path.exists(targs):
                with open(targs) as f:
                    argv += shlex.split(f.read(), comments=True)
            argv += self.extra_args
        else:
            cfg = os.path.join(self.dir, f"{self.name}.cfg")
            with open(os.path.join(CONF, "haproxy.cfg")) as f:
                text = f.read()
            text = (text.replace("@PORT@", str(PROXY_PORT))
                    .replace("@MAXCONN@", str(self.maxconn))
                    .replace("@SPLICE@", HAPROXY_SPLICE["auto" if self.setup == "haproxy_auto" else "both"])
                    .replace("@GLOBAL@", "".join(f"    {g.strip()}\n" for g in self.opts.haproxy_global.split(";")
                                                 + self.extra_global if g.strip())))
            with open(cfg, "w") as f:
                f.write(text)
            chk = self.lab.run("r", ["haproxy", "-c", "-f", cfg], 20)
            if chk.returncode != 0 or "WARNING" in (chk.stdout + chk.stderr):
                raise BenchError(f"haproxy -c: {(chk.stdout + chk.stderr).strip()[:600]}")
            argv = ["haproxy", "-db", "-f", cfg]
        self.argv = argv
        self.p = PROCS.spawn(self.lab.cmd("r", argv), log)
        self.lab.wait_listening("r", PROXY_PORT, proc=self.p)
        if self.setup == "tproxyd" and "--no-udp" not in argv:
            self.lab.wait_listening("r", PROXY_PORT, proto="u", proc=self.p)

    def alive(self):
        return self.setup == "direct" or (self.p is not None and self.p.poll() is None)

    def freeze(self, frozen):
        """SIGSTOP (or SIGCONT) the proxy, all its threads: --pause-idle."""
        if self.p is not None and self.p.poll() is None:
            try:
                os.kill(self.p.pid, signal.SIGSTOP if frozen else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self):
        if self.p is not None:
            self.freeze(False)  # a stopped process would hold SIGTERM pending
            rc = PROCS.stop(self.p, grace=10.0)
            self.p = None
            return rc
        return None

    def cpu(self):
        return proc_cpu_seconds(self.p.pid) if self.p else None

    def fds(self):
        return proc_fds(self.p.pid) if self.p else None


def verify_forwarding(lab, proxy, expect):
    """One curl per family through the setup: the file must come back whole.
    In the tproxy lab the router's forward chain drops everything, so an answer
    proves the proxy connected to the original destination."""
    for fam in (4, 6):
        host = SERVER[fam] if fam == 4 else f"[{SERVER[fam]}]"
        r = lab.run("c", ["curl", "-sS", "-m", "5", f"http://{host}/{SMALL_FILE}"], 10)
        if r.returncode != 0 or r.stdout != expect:
            raise BenchError(
                f"{proxy.setup}: curl over IPv{fam} did not get the file back "
                f"(rc {r.returncode}: {r.stderr.strip()[:200]})")


# ---------------------------------------------------------------- cases

def parse_iperf(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # iperf3 may print a second object or a trailing error; take the first.
        dec = json.JSONDecoder()
        obj, _ = dec.raw_decode(text.lstrip())
        return obj


def case_iperf_tcp(ctx, fam, streams, reverse, rate=None):
    d = ctx.params.duration
    argv = ["iperf3", "-c", SERVER[fam], "-p", str(IPERF_PORT), "-t", str(d), "-J", "--connect-timeout", "3000"]
    if streams > 1:
        argv += ["-P", str(streams)]
    if reverse:
        argv.append("-R")
    if rate:
        argv += ["-b", rate]
    return iperf_run(ctx, argv, d)


def iperf_run(ctx, argv, d, udp_len=None):
    """One iperf3 client run (TCP, or UDP with datagrams of udp_len bytes),
    retried once after restarting the server if iperf3 itself failed."""
    udp = udp_len is not None
    for attempt in (1, 2):
        k0 = {role: ctx.lab.counters(role) for role in "rs"} if udp else None
        c0, m0 = ctx.proxy.cpu(), machine_cpu()
        t0 = time.monotonic()
        r = ctx.lab.run("c", argv, d + 20)
        wall = time.monotonic() - t0
        c1, m1 = ctx.proxy.cpu(), machine_cpu()
        k1 = {role: ctx.lab.counters(role) for role in "rs"} if udp else None
        ctx.save_raw(r.stdout + ("\n--- stderr\n" + r.stderr if r.stderr else ""),
                     "json" if attempt == 1 else "retry.json")
        try:
            j = parse_iperf(r.stdout)
        except Exception:
            j = {"error": (r.stderr or r.stdout).strip()[:300] or f"exit {r.returncode}"}
        if r.returncode == 0 and "error" not in j:
            break
        err = j.get("error", f"exit {r.returncode}")
        if attempt == 2 or not ctx.proxy.alive():
            raise BenchError(f"iperf3: {err}")
        # A client that failed can leave iperf3's server stuck "busy": restart it.
        ctx.note(f"iperf3 failed ({err}); restarting the iperf3 server and retrying once")
        ctx.lab.start_iperf()
    end = j["end"]
    m = {"wall_s": round(wall, 3), "machine_cpu_s": machine_busy(m0, m1)}
    if udp:
        s = end["sum"]
        secs = s.get("seconds") or d
        # iperf3's own CPU, client (host) and server (remote), in % of one CPU.
        cpu = end.get("cpu_utilization_percent") or {}
        loadgen = None
        if "host_total" in cpu and "remote_total" in cpu:
            loadgen = round((cpu["host_total"] + cpu["remote_total"]) / 100 * secs, 3)
        return udp_metrics(udp_len, 1, s.get("packets", 0), s.get("lost_packets", 0), secs, wall,
                           (c0, c1), (m0, m1), (k0, k1), loadgen, {"jitter_ms": s.get("jitter_ms")})
    recv = end["sum_received"]
    sent = end["sum_sent"]
    m.update({
        "gbps": round(recv["bits_per_second"] / 1e9, 3),
        "bytes": recv["bytes"],
        "retransmits": sent.get("retransmits"),
    })
    moved = recv["bytes"]
    mc = m["machine_cpu_s"]["busy"]
    m["machine_cpu_s_per_gb"] = round(mc / (moved / 1e9), 3) if moved else None
    if c0 is not None:
        m["proxy_cpu_s"] = round(c1 - c0, 3)
        m["proxy_cpu_s_per_gb"] = round((c1 - c0) / (moved / 1e9), 3) if moved else None
        m["proxy_cpu_util"] = round((c1 - c0) / wall, 3)
    return m


def udp_metrics(length, flows, sent, lost, secs, wall, cpu, machine, counters, loadgen_cpu_s, extra):
    """A UDP run's metrics, the same for iperf3 and udp_load: counts and rates,
    where datagrams were dropped, and the CPU figures per datagram
    (report.udp_derived)."""
    (c0, c1), (m0, m1), (k0, k1) = cpu, machine, counters
    m = {
        "len": length,
        "flows": flows,
        "wall_s": round(wall, 3),
        "seconds": round(secs, 3),
        "datagrams_sent": sent,
        "datagrams_lost": lost,
        "loss_pct": round(100.0 * lost / sent, 3) if sent else None,
        "delivered_dps": round((sent - lost) / secs, 1),
        "sent_dps": round(sent / secs, 1),
        "machine_cpu_s": machine_busy(m0, m1),
        "loadgen_cpu_s": loadgen_cpu_s,
    }
    m.update(extra)
    # Where datagrams were dropped: receive-buffer overflows per namespace
    # (router: the proxy's listeners, or forwarding; server: the receiver's
    # socket).
    for role, where in (("r", "router"), ("s", "server")):
        for key in ("UdpRcvbufErrors", "UdpInErrors", "UdpSndbufErrors", "UdpInDatagrams"):
            m[f"{where}_{key}"] = k1[role].get(key, 0) - k0[role].get(key, 0)
    # What the proxy (or the kernel, in direct) forwarded: every datagram that
    # reached the server's namespace, queued or dropped at a full socket.
    m["forwarded_datagrams"] = m["server_UdpInDatagrams"] + m["server_UdpRcvbufErrors"]
    if c0 is not None:
        m["proxy_cpu_s"] = round(c1 - c0, 3)
        m["proxy_cpu_util"] = round((c1 - c0) / wall, 3)
    m.update(report.udp_derived(m, length))
    return m


# iperf3's UDP server takes the first datagram that reaches its port as the
# next test's stream. A proxy that fell behind in the previous run may still
# be delivering that run's backlog (its listener buffers hold thousands of
# 64-byte datagrams); the server then answers the old flow and the new client
# waits forever. Seen here with tproxyd; a pause lets the backlog drain.
UDP_SETTLE_S = 1.0


def case_udp(ctx, fam, flows, length, rate):
    """rate: datagrams/s offered, or None for as fast as the sender can."""
    time.sleep(UDP_SETTLE_S)
    d = ctx.params.duration
    if flows > 1:
        return udp_load_run(ctx, fam, flows, length, rate, d)
    bits = 0 if rate is None else rate * length * 8
    argv = ["iperf3", "-c", SERVER[fam], "-p", str(IPERF_PORT), "-u", "-l", str(length),
            "-b", str(bits), "-t", str(d), "-J", "--connect-timeout", "3000"]
    return iperf_run(ctx, argv, d, udp_len=length)


def tool_json(text, what, keys):
    """A load tool's one-line JSON answer, with the keys the harness reads."""
    try:
        j = json.loads(text)
    except ValueError:
        raise BenchError(f"{what}: not JSON: {text.strip()[:200]!r}") from None
    missing = [k for k in keys if k not in j]
    if missing:
        raise BenchError(f"{what}: no {', '.join(missing)} in its answer")
    return j


def host_port(fam, host, port):
    return f"{host}:{port}" if fam == 4 else f"[{host}]:{port}"


def udp_load_run(ctx, fam, flows, length, rate, d):
    """One run of examples/udp_load.rs: the receiver in the server namespace,
    the sender in the client's for d seconds, then the sender's per-flow
    counts to the receiver, which answers with what it got per flow. A run id
    of its own keeps an earlier run's datagrams (a proxy's backlog) out of the
    counts."""
    run_id = random.randrange(1, 2**32)
    common = ["--flows", str(flows), "--len", str(length), "--run", str(run_id)]
    recv = PROCS.spawn(
        ctx.lab.cmd("s", [UDP_LOAD, "recv", "--listen", host_port(fam, "0.0.0.0" if fam == 4 else "::", UDP_LOAD_PORT)]
                    + common),
        ctx.raw_path("recv.log"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([recv.stdout], [], [], 10)
        line = recv.stdout.readline().decode().strip() if ready else ""
        if line != "ready":
            raise BenchError(f"udp_load recv did not start ({line or 'no answer'}; see {ctx.raw_path('recv.log')})")
        k0 = {role: ctx.lab.counters(role) for role in "rs"}
        c0, m0 = ctx.proxy.cpu(), machine_cpu()
        t0 = time.monotonic()
        argv = [UDP_LOAD, "send", "--to", host_port(fam, SERVER[fam], UDP_LOAD_PORT), "--seconds", str(d),
                "--rate", str(rate or 0), "--base-port", str(UDP_LOAD_BASE_PORT)] + common
        s = ctx.lab.run("c", argv, d + 30)
        ctx.save_raw(s.stdout + ("\n--- stderr\n" + s.stderr if s.stderr else ""), "send.json")
        if s.returncode != 0:
            raise BenchError(f"udp_load send exit {s.returncode}: {(s.stderr or s.stdout).strip()[:300]}")
        sent = tool_json(s.stdout, "udp_load send", ("sent", "sent_per_flow", "seconds", "cpu_s", "send_errors"))
        counts = "sent " + " ".join(str(n) for n in sent["sent_per_flow"]) + "\n"
        # The receiver has written nothing since "ready", so nothing of its
        # answer sits in stdout's buffer where communicate() would miss it.
        try:
            out, _ = recv.communicate(counts.encode(), timeout=15)
        except subprocess.TimeoutExpired:
            raise BenchError(f"udp_load recv did not finish (see {ctx.raw_path('recv.log')})") from None
        wall = time.monotonic() - t0
        c1, m1 = ctx.proxy.cpu(), machine_cpu()
        k1 = {role: ctx.lab.counters(role) for role in "rs"}
        ctx.save_raw(out.decode(errors="replace"), "recv.json")
        if recv.returncode != 0:
            raise BenchError(f"udp_load recv exit {recv.returncode} (see {ctx.raw_path('recv.log')})")
        got = tool_json(out.decode(errors="replace"), "udp_load recv",
                        ("sent", "lost", "stale", "malformed", "reordered", "flows_with_loss", "max_flow_loss_pct",
                         "cpu_s"))
    finally:
        PROCS.stop(recv, grace=3.0)
    if got["sent"] != sent["sent"]:
        raise BenchError(f"udp_load: the receiver counted {got['sent']} sent, the sender said {sent['sent']}")
    extra = {
        "send_errors": sent["send_errors"],
        "stale": got["stale"],
        "malformed": got["malformed"],
        "reordered": got["reordered"],
        "flows_with_loss": got["flows_with_loss"],
        "max_flow_loss_pct": got["max_flow_loss_pct"],
        "sender_cpu_s": sent["cpu_s"],
        "receiver_cpu_s": got["cpu_s"],
    }
    return udp_metrics(length, flows, sent["sent"], got["lost"], sent["seconds"], wall, (c0, c1), (m0, m1),
                       (k0, k1), round(sent["cpu_s"] + got["cpu_s"], 3), extra)


UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text):
    m = {}
    g = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not g:
        raise BenchError(f"wrk: no Requests/sec in output: {text.strip()[-300:]}")
    m["rps"] = float(g.group(1))
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        m[f"p{pct}_ms"] = round(float(val) * UNIT_MS[unit], 4)
    g = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    if g:
        m["requests"] = int(g.group(1))
    g = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    m["socket_errors"] = sum(int(x) for x in g.groups()) if g else 0
    if g:
        m["socket_errors_detail"] = dict(zip(("connect", "read", "write", "timeout"), (int(x) for x in g.groups())))
    g = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    m["non_2xx"] = int(g.group(1)) if g else 0
    return m


def case_wrk(ctx, close):
    d = ctx.params.duration
    argv = ["wrk", "-t1", f"-c{ctx.params.wrk_conns}", f"-d{d}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{SERVER[4]}/{SMALL_FILE}")
    k0c, k0r = ctx.lab.counters("c"), ctx.lab.counters("r")
    c0, m0 = ctx.proxy.cpu(), machine_cpu()
    r = ctx.lab.run("c", argv, d + 30)
    c1, m1 = ctx.proxy.cpu(), machine_cpu()
    k1c, k1r = ctx.lab.counters("c"), ctx.lab.counters("r")
    ctx.save_raw(r.stdout + ("\n--- stderr\n" + r.stderr if r.stderr else ""), "txt")
    if r.returncode != 0:
        raise BenchError(f"wrk exit {r.returncode}: {r.stderr.strip()[:300]}")
    m = parse_wrk(r.stdout)
    m["client_syn_retrans"] = k1c.get("TcpExtTCPSynRetrans", 0) - k0c.get("TcpExtTCPSynRetrans", 0)
    m["client_retrans_segs"] = k1c.get("TcpRetransSegs", 0) - k0c.get("TcpRetransSegs", 0)
    m["router_syn_retrans"] = k1r.get("TcpExtTCPSynRetrans", 0) - k0r.get("TcpExtTCPSynRetrans", 0)
    m["router_listen_drops"] = k1r.get("TcpExtListenDrops", 0) - k0r.get("TcpExtListenDrops", 0)
    m["machine_cpu_s"] = machine_busy(m0, m1)
    if c0 is not None:
        m["proxy_cpu_s"] = round(c1 - c0, 3)
        if m.get("requests"):
            m["proxy_cpu_us_per_req"] = round(1e6 * (c1 - c0) / m["requests"], 2)
    return m


def case_rr(ctx, fam):
    p = ctx.params
    argv = [sys.executable, TOOLS, "rr-client", "--host", SERVER[fam], "--port", str(RR_PORT),
            "--count", str(p.rr_count), "--warmup", str(p.rr_warmup), "--conns", str(p.rr_conns)]
    r = ctx.lab.run("c", argv, 90)
    ctx.save_raw(r.stdout + r.stderr, "json")
    if r.returncode != 0:
        raise BenchError(f"rr-client exit {r.returncode}: {r.stderr.strip()[:300]}")
    return json.loads(r.stdout)


def ns_sysctls(lab, role, values):
    """Set per-namespace sysctls; returns the old values, for restore."""
    old = {}
    for k, v in values.items():
        r = lab.run(role, ["sysctl", "-n", k], 5, check=True)
        old[k] = r.stdout.strip()
        lab.run(role, ["sysctl", "-qw", f"{k}={v}"], 5, check=True)
    return old


@contextlib.contextmanager
def ns_sysctls_set(lab, roles, values):
    """Per-namespace sysctls in each of roles for the block, put back after."""
    olds = []
    try:
        for role in roles:
            olds.append((role, ns_sysctls(lab, role, values)))
        yield
    finally:
        for role, old in olds:
            for k, v in old.items():
                lab.run(role, ["sysctl", "-qw", f"{k}={v}"], 5)


# Every port for the client's (and the proxy's upstream) connections, and
# TIME_WAIT ports reused for new connections: what close_first_v4 gives the
# client, and the idle curve both (curves.py).
WIDE_PORTS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"}


def time_waits(lab, role, port):
    r = lab.run(role, ["ss", "-Htan", "state", "time-wait", f"( dport = :{port} )"], 10)
    return len(r.stdout.splitlines())


def case_close_first(ctx, fam):
    """New connections/s sustained to one server ip:port, the client closing
    first, so that whatever faces the server (the proxy's upstream socket; in
    direct, the client itself) holds each 4-tuple in TIME_WAIT. The client
    namespace gets tcp_tw_reuse=1 and the widest port range in every setup,
    so that the client's own TIME_WAITs are not what is measured; the
    router keeps the namespace's defaults (or tune/ with --tune)."""
    p = ctx.params
    secs = p.close_first_s
    lab = ctx.lab
    with ns_sysctls_set(lab, "c", WIDE_PORTS):
        # An earlier repetition's TIME_WAITs would start this one exhausted
        # (the few the curl checks leave do not matter).
        deadline = time.monotonic() + 75
        while time.monotonic() < deadline and time_waits(lab, "r", HTTP_PORT) > 100:
            time.sleep(1)
        k0c, k0r = lab.counters("c"), lab.counters("r")
        c0, m0 = ctx.proxy.cpu(), machine_cpu()
        argv = [CLOSE_FIRST, "--addr", f"{SERVER[fam]}:{HTTP_PORT}", "--path", f"/{SMALL_FILE}",
                "--seconds", str(secs), "--conns", str(p.close_first_conns)]
        r = lab.run("c", argv, secs + 30)
        c1, m1 = ctx.proxy.cpu(), machine_cpu()
        k1c, k1r = lab.counters("c"), lab.counters("r")
        tw_router = time_waits(lab, "r", HTTP_PORT)
    ctx.save_raw(r.stdout + ("\n--- stderr\n" + r.stderr if r.stderr else ""), "json")
    if r.returncode != 0:
        raise BenchError(f"close_first exit {r.returncode}: {r.stderr.strip()[:300]}")
    j = json.loads(r.stdout)
    ok, fail = j["served_per_s"], j["failed_per_s"]
    w = min(10, len(ok))
    m = {
        "seconds": secs,
        "served": j["served"],
        "failed": j["failed"],
        "failures": j["failures"],
        "first10_cps": round(sum(ok[:w]) / w, 1),
        "last10_cps": round(sum(ok[-w:]) / w, 1),
        "mean_cps": round(j["served"] / secs, 1),
        "min_1s_cps": min(ok),
        "max_1s_cps": max(ok),
        "served_per_s": ok,
        "failed_per_s": fail,
        "client_syn_retrans": k1c.get("TcpExtTCPSynRetrans", 0) - k0c.get("TcpExtTCPSynRetrans", 0),
        "router_syn_retrans": k1r.get("TcpExtTCPSynRetrans", 0) - k0r.get("TcpExtTCPSynRetrans", 0),
        "router_time_wait_at_end": tw_router,
        "machine_cpu_s": machine_busy(m0, m1),
    }
    if c0 is not None:
        m["proxy_cpu_s"] = round(c1 - c0, 3)
    return m


def run_header(argv, opts, params, started, kind=None):
    """What every results.json starts with: the schema, the kind of run
    (none for the default run), when, the command, the machine, the tools'
    versions and the parameters."""
    head = {"schema": 1}
    if kind:
        head["kind"] = kind
    head.update({
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "command": ("benches/run " + " ".join(shlex.quote(a) for a in argv)).strip(),
        "machine": machine_info(),
        "versions": tool_versions(opts.bin),
        "params": params.as_dict(),
    })
    return head


@contextlib.contextmanager
def idle_connections(ctx, host, n, fds0, grace):
    """n idle connections from the client namespace to `host` through the
    proxy (tools.py idle-client), up when the block starts and held while it
    runs; then closed, and the proxy given `grace` seconds to see every
    close (its descriptors, ctx.proxy.fds(), back within 8 of `fds0`)
    before the next case."""
    client = PROCS.spawn(
        ctx.lab.cmd("c", [sys.executable, TOOLS, "idle-client", "--host", host, "--port", str(HOLD_PORT),
                          "--count", str(n)]),
        ctx.raw_path("log"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([client.stdout], [], [], 60)
        line = client.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("ready"):
            raise BenchError(f"idle-client did not get {n} connections up ({line or 'no answer'}; see {ctx.raw_path('log')})")
        yield
    finally:
        try:
            client.stdin.close()
        except OSError:
            pass
        PROCS.stop(client, grace=grace)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (ctx.proxy.fds() or 0) > fds0 + 8:
        time.sleep(0.1)


def case_idle(ctx, fam):
    n = ctx.params.idle_conns
    # A fresh proxy: one that has already held many connections keeps the
    # memory they used (allocator free lists, grown tables) and would show
    # nothing for the next thousands.
    ctx.proxy.stop()
    ctx.proxy.start()
    verify_forwarding(ctx.lab, ctx.proxy, ctx.lab.expect)
    pid = ctx.proxy.pid
    time.sleep(0.5)
    rss0, fds0 = proc_rss_kib(pid), proc_fds(pid)
    with idle_connections(ctx, SERVER[fam], n, fds0, grace=10.0):
        time.sleep(1.0)
        rss1, fds1 = proc_rss_kib(pid), proc_fds(pid)
    return {
        "conns": n,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "fds_before": fds0,
        "fds_after": fds1,
        "rss_bytes_per_conn": round((rss1 - rss0) * 1024 / n, 1),
    }


def measure(ctx, rec, run, runs):
    """One case, curve point or knob visit into `rec`: the 1-minute load
    average when it starts (other work on the machine shows here first),
    then `run()`'s metrics or its error (noted in ctx), and its seconds;
    `rec` is appended to `runs` and returned. The default run, --curves and
    --tune-matrix all record runs this way."""
    rec["loadavg1_at_start"] = float(open("/proc/loadavg").read().split()[0])
    t0 = time.monotonic()
    try:
        rec["metrics"] = run()
        rec["ok"] = True
    except BenchError as e:
        rec["ok"], rec["error"] = False, str(e)
        ctx.note(f"failed: {e}")
    rec["seconds"] = round(time.monotonic() - t0, 2)
    runs.append(rec)
    return rec


def run_case(ctx, case):
    if case.startswith("tcp"):
        g = re.match(r"tcp(\d)_(up|down|2g)_v(\d)", case)
        streams, kind, fam = int(g.group(1)), g.group(2), int(g.group(3))
        rate = ctx.params.fixed_tcp_rate if kind == "2g" else None
        return case_iperf_tcp(ctx, fam, streams, kind == "down", rate)
    if case == "http_ka":
        return case_wrk(ctx, close=False)
    if case == "http_close":
        return case_wrk(ctx, close=True)
    if case == "rr_v4":
        return case_rr(ctx, 4)
    if case in UDP:
        return case_udp(ctx, 4, *UDP[case])
    if case == "idle_v4":
        return case_idle(ctx, 4)
    if case == "close_first_v4":
        return case_close_first(ctx, 4)
    raise BenchError(f"unknown case {case}")


class Ctx:
    def __init__(self, out, pass_name, rep, setup, lab, proxy, params, notes):
        self.out, self.pass_name, self.rep, self.setup = out, pass_name, rep, setup
        self.lab, self.proxy, self.params, self.notes = lab, proxy, params, notes
        self.case = None

    def raw_path(self, ext):
        d = os.path.join(self.out, "raw", self.pass_name, f"rep{self.rep}", self.setup)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"{self.case}.{ext}")

    def save_raw(self, text, ext):
        with open(self.raw_path(ext), "w") as f:
            f.write(text)

    def note(self, msg):
        line = f"{self.pass_name} rep{self.rep} {self.setup} {self.case}: {msg}"
        print("   ! " + line, flush=True)
        self.notes.append(line)


def build(opts, raw_dir, need):
    """cargo build --release of tproxyd and the examples (udp_load.rs, the
    many-flow UDP load; close_first.rs), unless --no-build; then check that
    tproxyd and what the run needs (need: paths) are there."""
    opts.bin = os.path.join(ROOT, "target", "release", "tproxyd")
    if not opts.no_build:
        print("== cargo build --release --bins --examples", flush=True)
        r = run(["cargo", "build", "--release", "--bins", "--examples",
                 "--manifest-path", os.path.join(ROOT, "Cargo.toml")], 900)
        os.makedirs(raw_dir, exist_ok=True)
        with open(os.path.join(raw_dir, "build.log"), "w") as f:
            f.write(r.stdout + r.stderr)
        if r.returncode != 0:
            raise BenchError("cargo build --release failed:\n" + r.stderr[-2000:])
    for path in [opts.bin] + list(need):
        if not os.access(path, os.X_OK):
            raise BenchError(f"no {path} (build it, or drop --no-build)")


def check_tune(opts, what):
    for name in ("apply", "revert"):
        path = os.path.join(opts.tune_dir, name)
        if not os.access(path, os.X_OK):
            raise BenchError(f"{what} needs an executable {path} (not there yet?)")


def lab_up(name, setup, tuned, opts, work, labs, proxies, tune_states, key):
    """One setup's lab: up (recorded in labs before anything can fail, so
    that tear_down deletes it), tune/apply in opts.tune_roles if tuned
    (recorded in tune_states), its servers, its proxy started and checked
    with curl (recorded in proxies)."""
    lab = Lab(name, "direct" if setup == "direct" else "tproxy", os.path.join(work, name))
    os.makedirs(lab.dir, exist_ok=True)
    labs[key] = lab
    print(f"== lab {name} up: {setup}{', tuned' if tuned else ''}", flush=True)
    lab.up()
    if tuned:
        for role in opts.tune_roles:
            state = os.path.join(lab.dir, f"tune-{role}.state")
            tune_states.append((lab, role, state))
            lab.run(role, [os.path.join(opts.tune_dir, "apply"), "--state", state] + opts.tune_args.split(), 60,
                    check=True)
    lab.start_servers()
    lab.expect = open(os.path.join(lab.dir, "www", SMALL_FILE)).read()
    proxy = Proxy(setup, lab, lab.dir, opts, tuned)
    proxies[key] = proxy
    try:
        proxy.start()
        verify_forwarding(lab, proxy, lab.expect)
    except BenchError as e:
        raise BenchError(f"{setup} does not forward: {e} (log: {os.path.join(lab.dir, setup + '.log')})")
    return lab, proxy


def tear_down(opts, labs, tune_states):
    """Every way out: revert what tune/apply changed, end every process this
    run started (by pid), delete every lab it made."""
    for lab, role, state in reversed(tune_states):
        if not os.path.exists(state):
            continue  # apply never got to write it, or revert already ran
        r = lab.run(role, [os.path.join(opts.tune_dir, "revert"), "--state", state], 60)
        if r.returncode != 0:
            print(f"bench: tune/revert in {lab.ns(role)} failed: {r.stderr.strip()[:200]}", file=sys.stderr)
    PROCS.stop_all()
    for lab in labs.values():
        lab.down()


# ---------------------------------------------------------------- main

def tool_versions(bin_path):
    def first_line(argv, pattern=None):
        r = run(argv, 10)
        text = (r.stdout + r.stderr).strip()
        if pattern:
            g = re.search(pattern, text)
            return g.group(0) if g else text.splitlines()[0] if text else "?"
        return text.splitlines()[0] if text else "?"
    rev = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], 10).stdout.strip()
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"], 10).stdout.strip()
    return {
        "tproxyd": first_line([bin_path, "--version"]) + f" (git {rev}{', uncommitted changes in src/' if dirty else ''})",
        "haproxy": first_line(["haproxy", "-v"], r"HAProxy version \S+"),
        "nginx": first_line(["nginx", "-v"], r"nginx/\S+"),
        "iperf3": first_line(["iperf3", "--version"], r"iperf \S+"),
        "wrk": first_line(["wrk", "-v"], r"wrk \S+"),
        "python": platform.python_version(),
    }


def machine_info():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    # lscpu names the hypervisor (systemd-detect-virt would say "docker" in a
    # container on a VM, which hides the VM).
    virt = ""
    if shutil.which("lscpu"):
        g = re.search(r"Hypervisor vendor:\s*(\S+)", run(["lscpu"], 5).stdout)
        virt = g.group(1) if g else ""
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1048576, 1),
        "virtualization": virt or None,
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
    }


def check_tools():
    if not shutil.which("cargo"):
        raise BenchError("needs cargo (a Rust toolchain)")
    need = {"ip": "iproute2", "ss": "iproute2", "nft": "nftables", "iperf3": "iperf3", "wrk": "wrk",
            "nginx": "nginx-light", "haproxy": "haproxy", "curl": "curl"}
    missing = sorted({pkg for cmd, pkg in need.items() if not shutil.which(cmd)})
    if missing:
        raise BenchError("missing packages " + " ".join(missing) + "; install them with: scripts/deps install benches")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benches/run", description="tproxyd vs direct forwarding vs HAProxy, side by side.")
    p.add_argument("--quick", action="store_true", help="1 repetition, 1 s durations, fewer requests (the CI smoke)")
    p.add_argument("--tune", action="store_true", help="run everything twice: without and with tune/apply (A/B)")
    p.add_argument("--curves", nargs="?", const="all", metavar="LIST",
                   help="how cost grows with work: throughput, connections/s, memory, UDP and churn against"
                        " streams, concurrency, idle connections, flows and time (harness/curves.py); LIST, if"
                        " given, runs only those of " + ",".join(CURVE_NAMES) + " (comma-separated)")
    p.add_argument("--tune-matrix", action="store_true",
                   help="one knob at a time against the untuned baseline, on a few figures (harness/matrix.py)")
    p.add_argument("--cases", help="comma-separated cases or groups (default: all but "
                   + ", ".join(OPT_IN_CASES) + "): " + ", ".join(CASES + sorted(GROUPS)))
    p.add_argument("--setups",
                   help="comma-separated subset of direct,tproxyd,haproxy,haproxy_auto (haproxy: splice-request and"
                        " splice-response; haproxy_auto: splice-auto); --curves: direct,tproxyd,haproxy by default")
    p.add_argument("--out", default=os.path.join(BENCHES, "results"), help="output directory (default benches/results)")
    p.add_argument("--reps", type=int, help="repetitions per case (default 5, --quick 1)")
    p.add_argument("--duration", type=int, help="seconds per iperf3/wrk run (default 4, --quick 1)")
    p.add_argument("--tproxyd-args", default="",
                   help="extra tproxyd options, e.g. --tproxyd-args='--pipe-size 256k' (with '=' when they start with --)")
    p.add_argument("--haproxy-global", default="",
                   help="extra lines for HAProxy's global section, ';'-separated, e.g. \"tune.bufsize 32768\"")
    p.add_argument("--tune-dir", default=TUNE_DIR, help="where apply, revert and tproxyd.args are (default tune/)")
    p.add_argument("--tune-args", default="",
                   help="extra options for tune/apply with --tune, e.g. --tune-args='--coalesce-us 50' "
                        "(write the =: the value starts with --)")
    p.add_argument("--tune-roles", default="r",
                   help="namespaces tune/apply runs in with --tune: letters of c (client), r (router), s (server); default r")
    p.add_argument("--no-build", action="store_true", help="use target/release/tproxyd as it is")
    p.add_argument("--pause-idle", action="store_true",
                   help="SIGSTOP every other setup's proxy while one setup runs a case, so that a proxy that spins"
                        " when idle (HAProxy's busy-polling) takes no CPU from the others' cases")
    a = p.parse_args(argv)
    a.curve_list = list(CURVE_NAMES) if a.curves in (None, "all") else [c.strip() for c in a.curves.split(",")]
    bad = [c for c in a.curve_list if c not in CURVE_NAMES]
    if bad or not a.curve_list:
        p.error(f"unknown curve '{','.join(bad)}' in --curves (curves: {','.join(CURVE_NAMES)})")
    a.curves = a.curves is not None
    if sum((a.tune, a.curves, a.tune_matrix)) > 1:
        p.error("--tune, --curves and --tune-matrix are separate runs: give one")
    if (a.curves or a.tune_matrix) and a.cases:
        p.error("--cases is for the default run; --curves and --tune-matrix have their own")
    cases = []
    default = [c for c in CASES
               if c not in OPT_IN_CASES and not (a.quick and c in UDP and c not in QUICK_UDP)]
    for c in (a.cases.split(",") if a.cases else default):
        c = report.CASE_ALIASES.get(c.strip(), c.strip())
        if not c:
            continue
        if c in GROUPS:
            cases += GROUPS[c]
        elif c in CASES:
            cases.append(c)
        else:
            p.error(f"unknown case '{c}'")
    a.case_list = [c for c in CASES if c in cases]
    a.tune_roles = [r for r in a.tune_roles if r in "crs"]
    if a.setups is None:
        a.setups = "direct,tproxyd,haproxy" if a.curves else ",".join(SETUPS)
    a.setup_list = [s for s in SETUPS if s in a.setups.split(",")]
    bad = set(a.setups.split(",")) - set(SETUPS)
    if bad or not a.setup_list:
        p.error(f"bad --setups '{a.setups}'")
    if a.reps is not None and a.reps < 1 or a.duration is not None and a.duration < 1:
        p.error("--reps and --duration must be at least 1")
    return a


def main(argv):
    opts = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, TPROXY)")
    check_tools()
    if opts.curves:
        import curves
        return curves.main(opts, argv)
    if opts.tune_matrix:
        import matrix
        return matrix.main(opts, argv)
    params = Params(opts.quick, opts.reps, opts.duration)
    out = os.path.abspath(opts.out)
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(os.path.join(out, "raw"), ignore_errors=True)
    work = os.path.join(out, "raw", "lab")
    os.makedirs(work, exist_ok=True)
    started = time.time()

    if opts.tune:
        check_tune(opts, "--tune")

    need = [UDP_LOAD] if any(UDP.get(c, (1,))[0] > 1 for c in opts.case_list) else []
    need += [CLOSE_FIRST] if "close_first_v4" in opts.case_list else []
    build(opts, os.path.join(out, "raw"), need)

    passes = ["base", "tuned"] if opts.tune else ["base"]
    tag = f"b{os.getpid() % 100000}"
    labs = {}
    tune_states = []
    results = {
        **run_header(argv, opts, params, started),
        "setups": opts.setup_list,
        "cases": opts.case_list,
        "passes": passes,
        "haproxy_maxconn": HAPROXY_MAXCONN,
        "tproxyd_args": opts.tproxyd_args,
        "haproxy_global": opts.haproxy_global,
        "pause_idle": opts.pause_idle,
        "tune": {"dir": opts.tune_dir, "roles": opts.tune_roles, "args": opts.tune_args} if opts.tune else None,
        "runs": [],
        "notes": [],
    }
    proxies = {}
    try:
        # One lab per setup (and pass), all up for the whole run, each with
        # its own servers and its proxy running throughout: then every case
        # runs on all setups back to back, and a burst of other work on the
        # machine lands on neighbouring setups alike instead of on one.
        for pname in passes:
            for setup in opts.setup_list:
                lab_up(f"{tag}{pname[0]}{SETUP_LETTER[setup]}", setup, pname == "tuned", opts, work,
                       labs, proxies, tune_states, (pname, setup))

        for rep in range(1, params.reps + 1):
            for ci, case in enumerate(opts.case_list):
                for pname in passes:
                    setups = [s for s in opts.setup_list if applies(case, s, explicit=bool(opts.cases))]
                    if not setups:
                        continue
                    k = (rep - 1 + ci) % len(setups)
                    for setup in setups[k:] + setups[:k]:
                        lab, proxy = labs[(pname, setup)], proxies[(pname, setup)]
                        if opts.pause_idle:
                            for key, other in proxies.items():
                                other.freeze(key != (pname, setup))
                        ctx = Ctx(out, pname, rep, setup, lab, proxy, params, results["notes"])
                        ctx.case = case
                        rec = measure(ctx, {"pass": pname, "rep": rep, "setup": setup, "case": case},
                                      lambda: run_case(ctx, case), results["runs"])
                        tag_s = f"{pname[0]}{rep}" if len(passes) > 1 else f"{rep}"
                        print(f"   [{tag_s}/{params.reps}] {setup:<12} " + report.one_line(rec), flush=True)
                        if not proxy.alive():
                            raise BenchError(f"{setup} died during {case} (log: {os.path.join(lab.dir, setup + '.log')})")
        for (pname, setup), proxy in proxies.items():
            proxy.freeze(False)
            rc = proxy.stop()
            # HAProxy in the foreground (-db) ends on SIGTERM by the signal.
            if rc not in (None, 0) and setup == "tproxyd":
                results["notes"].append(f"{pname} {setup} exited {rc} on SIGTERM")
    finally:
        tear_down(opts, labs, tune_states)
        results["seconds"] = round(time.time() - started, 1)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    report.write_all(results, out)
    print(report.text_table(results))
    print(f"\nwrote {out}/results.json, results.md, ratios.svg ({results['seconds']:.0f} s)")
    failed = [r for r in results["runs"] if not r["ok"]]
    return 1 if failed else 0


def _on_signal(signum, _frame):
    # Turn the signal into an exception so that main's finally tears down.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
