#!/usr/bin/env bash
# soak.sh: a long mixed load through a release tproxyd in a fresh lab, watching
# tproxyd's descriptors and memory for leaks. Run by hand (not in CI), as root:
#
#   scripts/soak.sh [--minutes N] [--rss-slack-mib M] [--keep]
#
# For N minutes (default 10; decimals allowed) it runs, all at once:
#   - churn: many short TCP connections from a few Python workers to an echo
#     server, IPv4 and IPv6; each sends 1 B..16 KiB and checks the echo byte
#     for byte; one in ten is aborted half-way with a RST, one in twenty goes
#     to a closed port (tproxyd resets the client);
#   - bulk: iperf3 back to back, IPv4 and IPv6 at the same time, alternating
#     directions, at a modest rate (the machine is shared);
#   - UDP: dig queries to dnsmasq, IPv4 and IPv6, each from a fresh source
#     port, so each is a new session that expires (--udp-timeout 5s);
#   - UDP through the full-cone NAT with the client's own address: tproxyd
#     runs with --spoof-source (and --mark 2, which the lab's rules know).
#     Client sockets each talk to two echo ports of the server, which must
#     see the client's own address and port; the server's third port writes
#     to each new client unasked, and full-cone must let that in;
#   - iperf3 -u at a modest rate, IPv4 and IPv6.
# Every 10 s it samples tproxyd's open descriptors (/proc/PID/fd), VmRSS and a
# few metrics. At the end it stops the load, waits until tproxyd is idle (no
# TCP connection, no UDP session), samples again and compares with the start:
#   - descriptors: back to the start, give or take the pipe pool (empty pipes
#     kept for reuse, two descriptors each, reported by the metrics) and 4;
#   - memory: VmRSS within --rss-slack-mib (default 16) of the start. The
#     allocator keeps freed memory, and the slabs keep the capacity the peak
#     needed: both are bounded by the peak, not by time. A leak grows with
#     the work done; ten minutes of churn make hundreds of thousands of
#     connections, so a leak of a few dozen bytes each shows.
# It prints one line per sample and a summary, and exits non-zero on a leak,
# on a tproxyd that died or panicked, or on a client check that failed.
# --keep leaves the work directory (logs) behind.
set -euo pipefail

readonly PORT=8080
readonly METRICS=127.0.0.1:9120
readonly SAMPLE_SECONDS=10
readonly IDLE_WAIT_SECONDS=90
readonly FD_SLACK=4
readonly CHURN_WORKERS=4
readonly IPERF_SECONDS=15
readonly IPERF_RATE=100M
readonly IPERF_UDP_RATE=20M

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
lab="$here/lab.sh"
name="soak$$"
minutes=10
rss_slack_mib=16
keep=0

usage() {
    echo "usage: $0 [--minutes N] [--rss-slack-mib M] [--keep]" >&2
    exit 2
}

while (($#)); do
    case $1 in
    --minutes)
        (($# >= 2)) || usage
        minutes=$2
        shift 2
        ;;
    --rss-slack-mib)
        (($# >= 2)) || usage
        rss_slack_mib=$2
        shift 2
        ;;
    --keep)
        keep=1
        shift
        ;;
    *) usage ;;
    esac
done
[[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "soak: --minutes '$minutes': a number of minutes" >&2; exit 2; }
[[ $rss_slack_mib =~ ^[0-9]+$ ]] || { echo "soak: --rss-slack-mib '$rss_slack_mib': a whole number" >&2; exit 2; }
seconds=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')
((seconds >= 30)) || { echo "soak: at least half a minute, please" >&2; exit 2; }

work=$(mktemp -d /tmp/tproxyd-soak.XXXXXX)
pids=()
lab_up=0
tproxyd_pid=

me=soak
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

[[ $EUID -eq 0 ]] || fail "needs root (network namespaces and TPROXY)"
for tool in cargo ip nft iperf3 python3 dig dnsmasq curl awk; do
    command -v "$tool" >/dev/null || fail "needs $tool"
done

say "building (cargo build --release)"
if ! (cd "$root" && cargo build --release --quiet) 2>"$work/build.log"; then
    cat "$work/build.log" >&2
    fail "cargo build failed"
fi
bin="$root/target/release/tproxyd"

say "lab $name up"
"$lab" up "$name" --port "$PORT" --mode tproxy || fail "lab up failed"
lab_up=1

# --------------------------------------------------------------- tproxyd

# Started directly (not through a shell function, which would fork a
# subshell): bash execs `ip netns exec`, which execs tproxyd, so $! is
# tproxyd's own pid.
ip netns exec "$name-r" "$bin" --port "$PORT" --metrics "$METRICS" --udp-timeout 5s \
    --mark 2 --spoof-source --log-level info >"$work/tproxyd.log" 2>&1 &
tproxyd_pid=$!
pids+=("$tproxyd_pid")
[[ $(readlink "/proc/$tproxyd_pid/exe" 2>/dev/null) == "$(readlink -f "$bin")" ]] ||
    sleep 0.2
[[ $(readlink "/proc/$tproxyd_pid/exe" 2>/dev/null) == "$(readlink -f "$bin")" ]] ||
    fail "pid $tproxyd_pid is not tproxyd"
for _ in $(seq 100); do
    in_ns r curl -sf "http://$METRICS/metrics" >/dev/null 2>&1 && break
    kill -0 "$tproxyd_pid" 2>/dev/null || fail "tproxyd exited at start"
    sleep 0.1
done
in_ns r curl -sf "http://$METRICS/metrics" >/dev/null || fail "tproxyd's metrics never answered"

metrics() { in_ns r curl -sf --max-time 5 "http://$METRICS/metrics" || true; }
# metric TEXT NAME: the value of the sample named exactly NAME (with labels).
metric() { awk -v n="$2" '$1 == n { print $2; found = 1 } END { if (!found) print 0 }' <<<"$1"; }
fds() { find "/proc/$tproxyd_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$tproxyd_pid/status" 2>/dev/null || echo 0; }

# --------------------------------------------------------------- servers

cat >"$work/echo_server.py" <<'EOF'
# A dual-stack TCP echo server: echoes until EOF, then closes.
import socket, socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(30)
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
Server(("::", int(sys.argv[1])), Echo).serve_forever()
EOF
in_ns s python3 "$work/echo_server.py" 7 >"$work/echo.log" 2>&1 &
pids+=($!)
cat >"$work/cone_server.py" <<'EOF'
# UDP for the full-cone clients: ports 7 and 8 echo each datagram prefixed
# with the address they saw it come from; port 9 writes once, unasked, to
# each client socket, when port 7 hears its first datagram ("0-7": a later
# socket may get an earlier one's port, so the address alone is not new).
import select, socket
def sock(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    return s
e7, e8, p9 = sock(7), sock(8), sock(9)
while True:
    for s in select.select([e7, e8], [], [])[0]:
        data, peer = s.recvfrom(2048)
        host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
        s.sendto(("%s %d|" % (host, peer[1])).encode() + data, peer)
        if s is e7 and data == b"0-7":
            p9.sendto(b"unasked", peer)
EOF
in_ns s python3 "$work/cone_server.py" >"$work/cone_server.log" 2>&1 &
pids+=($!)
in_ns s iperf3 -s -p 5203 >"$work/iperf3-s4u.log" 2>&1 &
pids+=($!)
in_ns s iperf3 -s -p 5204 >"$work/iperf3-s6u.log" 2>&1 &
pids+=($!)
in_ns s iperf3 -s -p 5201 >"$work/iperf3-s4.log" 2>&1 &
pids+=($!)
in_ns s iperf3 -s -p 5202 >"$work/iperf3-s6.log" 2>&1 &
pids+=($!)
in_ns s dnsmasq --no-daemon --conf-file=/dev/null --port=53 --no-resolv --no-hosts \
    --address=/soak.test/198.18.99.1 --address=/soak.test/2001:2::99 \
    --listen-address=198.19.0.2,2001:2:0:2::2 --bind-interfaces --pid-file= \
    >"$work/dnsmasq.log" 2>&1 &
pids+=($!)
sleep 1
for p in 7 5201 5202; do
    in_ns s ss -ltnH "sport = :$p" | grep -q . || fail "no server on TCP port $p (see $work)"
done

# --------------------------------------------------------------- load

cat >"$work/churn.py" <<'EOF'
# Many short connections; prints a summary line at the end.
import os, random, socket, struct, sys, threading, time
deadline = time.time() + float(sys.argv[1])
workers = int(sys.argv[2])
hosts = [("198.19.0.2", socket.AF_INET), ("2001:2:0:2::2", socket.AF_INET6)]
lock = threading.Lock()
count = {"ok": 0, "aborted": 0, "refused": 0, "failed": 0}
errors = []
def bump(k, err=None):
    with lock:
        count[k] += 1
        if err is not None and len(errors) < 10:
            errors.append(err)
def worker(n):
    rnd = random.Random(n)
    while time.time() < deadline:
        # A short pause: every connection leaves a TIME_WAIT socket behind
        # (in the client, and in the router for tproxyd's upstream side), and
        # a namespace has some 28,000 ephemeral ports for each destination.
        time.sleep(0.01)
        host, fam = rnd.choice(hosts)
        kind = rnd.random()
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(15)
        try:
            if kind < 0.05:
                # Nothing listens on port 9: the proxy must reset us.
                try:
                    s.connect((host, 9))
                    s.recv(1)
                    bump("failed", "port 9: no reset")
                except (ConnectionResetError, ConnectionRefusedError):
                    bump("refused")
                continue
            data = os.urandom(rnd.randint(1, 16384))
            s.connect((host, 7))
            if kind < 0.15:
                s.sendall(data[: len(data) // 2 + 1])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                bump("aborted")
                continue
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
            if bytes(got) == data:
                bump("ok")
            else:
                bump("failed", "echo of %d bytes came back as %d different bytes" % (len(data), len(got)))
        except OSError as e:
            bump("failed", "%s %s" % (host, e))
        finally:
            s.close()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("churn ok=%(ok)d aborted=%(aborted)d refused=%(refused)d failed=%(failed)d" % count)
for e in errors:
    print("churn error: " + e)
EOF

cat >"$work/cone.py" <<'EOF'
# Full-cone UDP clients, each socket for a few seconds: every datagram must
# come back from the port it went to, saying the server saw this socket's own
# address and port (--spoof-source), and the server's unasked datagram from
# port 9 must arrive (full-cone lets in a remote the client never addressed).
import socket, sys, time
deadline = time.time() + float(sys.argv[1])
host, me, fam_name = sys.argv[2], sys.argv[3], sys.argv[4]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
count = {"ok": 0, "failed": 0, "unasked": 0, "sockets": 0}
errors = []
while time.time() < deadline:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((me, 0))
    s.settimeout(2)
    port = s.getsockname()[1]
    count["sockets"] += 1
    got_unasked = False
    for i in range(100):
        for dport in (7, 8):
            msg = b"%d-%d" % (i, dport)
            s.sendto(msg, (host, dport))
            want = ("%s %d|" % (me, port)).encode() + msg
            while True:
                try:
                    data, peer = s.recvfrom(2048)
                except OSError as e:
                    count["failed"] += 1
                    errors.append("socket %d, %s to :%d: %s" % (port, msg, dport, e))
                    break
                if data == b"unasked" and peer[1] == 9:
                    got_unasked = True
                    continue
                if data == want and peer[1] == dport:
                    count["ok"] += 1
                else:
                    count["failed"] += 1
                    errors.append("socket %d: %r from %r, wanted %r" % (port, data, peer, want))
                break
        time.sleep(0.02)
    if not got_unasked:
        try:
            data, peer = s.recvfrom(2048)
            got_unasked = data == b"unasked" and peer[1] == 9
        except OSError:
            pass
    if got_unasked:
        count["unasked"] += 1
    else:
        count["failed"] += 1
        errors.append("socket %d: the unasked datagram from :9 never came" % port)
    s.close()
print("cone %s ok=%d unasked=%d/%d failed=%d" % (fam_name, count["ok"], count["unasked"], count["sockets"], count["failed"]))
for e in errors[:10]:
    print("cone error: " + e)
EOF

# The baseline: tproxyd idle, before any load.
fd_start=$(fds)
rss_start=$(rss_kib)
fd_peak=$fd_start
rss_peak=$rss_start

start_epoch=$(date +%s)
end_epoch=$((start_epoch + seconds))

bulk_loop() {
    local host=$1 port=$2 family=$3 n=0 ok=0 failed=0 left reverse
    while left=$((end_epoch - $(date +%s))); ((left > 2)); do
        reverse=()
        ((n % 2)) && reverse=(-R)
        if in_ns c timeout $((IPERF_SECONDS + 20)) iperf3 -c "$host" -p "$port" \
            -t "$((left < IPERF_SECONDS ? left : IPERF_SECONDS))" -P 2 -b "$IPERF_RATE" \
            "${reverse[@]}" >"$work/iperf3-$family-last.log" 2>&1; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
            cp "$work/iperf3-$family-last.log" "$work/iperf3-$family-failed-$n.log"
        fi
        n=$((n + 1))
        sleep 1
    done
    echo "bulk $family ok=$ok failed=$failed" >"$work/bulk-$family.result"
}

dns_loop() {
    local server=$1 qtype=$2 want=$3 family=$4 ok=0 failed=0 got
    while (($(date +%s) < end_epoch)); do
        got=$(in_ns c dig "@$server" soak.test "$qtype" +short +time=2 +tries=1 2>/dev/null || true)
        if [[ $got == "$want" ]]; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
        fi
        sleep 0.05
    done
    echo "udp $family ok=$ok failed=$failed" >"$work/dns-$family.result"
}

udp_bulk_loop() {
    local host=$1 port=$2 family=$3 n=0 ok=0 failed=0 left
    while left=$((end_epoch - $(date +%s))); ((left > 2)); do
        if in_ns c timeout $((IPERF_SECONDS + 20)) iperf3 -c "$host" -p "$port" -u \
            -t "$((left < IPERF_SECONDS ? left : IPERF_SECONDS))" -b "$IPERF_UDP_RATE" \
            >"$work/iperf3-udp-$family-last.log" 2>&1; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
            cp "$work/iperf3-udp-$family-last.log" "$work/iperf3-udp-$family-failed-$n.log"
        fi
        n=$((n + 1))
        sleep 1
    done
    echo "udp-bulk $family ok=$ok failed=$failed" >"$work/udp-bulk-$family.result"
}

say "load for $seconds s: churn ($CHURN_WORKERS workers), iperf3 (v4 + v6, ${IPERF_RATE}bit/s x 2 each; UDP ${IPERF_UDP_RATE}bit/s), dig (v4 + v6), full-cone UDP with the client's own address (v4 + v6)"

in_ns c python3 "$work/churn.py" "$seconds" "$CHURN_WORKERS" >"$work/churn.result" 2>&1 &
load=($!)
bulk_loop 198.19.0.2 5201 v4 &
load+=($!)
bulk_loop 2001:2:0:2::2 5202 v6 &
load+=($!)
dns_loop 198.19.0.2 A 198.18.99.1 v4 &
load+=($!)
dns_loop 2001:2:0:2::2 AAAA 2001:2::99 v6 &
load+=($!)
in_ns c python3 "$work/cone.py" "$seconds" 198.19.0.2 198.18.0.2 v4 >"$work/cone-v4.result" 2>&1 &
load+=($!)
in_ns c python3 "$work/cone.py" "$seconds" 2001:2:0:2::2 2001:2:0:1::2 v6 >"$work/cone-v6.result" 2>&1 &
load+=($!)
udp_bulk_loop 198.19.0.2 5203 v4 &
load+=($!)
udp_bulk_loop 2001:2:0:2::2 5204 v6 &
load+=($!)
pids+=("${load[@]}")

# --------------------------------------------------------------- sampling

printf '%6s %6s %9s %7s %7s %6s %6s\n' "t/s" "fds" "rss/KiB" "tcp" "udp" "pipes" "pooled"
sample() {
    local t=$1 m f r
    m=$(metrics)
    f=$(fds)
    r=$(rss_kib)
    ((f > fd_peak)) && fd_peak=$f
    ((r > rss_peak)) && rss_peak=$r
    printf '%6s %6s %9s %7s %7s %6s %6s\n' "$t" "$f" "$r" \
        "$(metric "$m" tproxyd_tcp_connections_active)" \
        "$(metric "$m" tproxyd_udp_sessions_active)" \
        "$(metric "$m" 'tproxyd_tcp_pipes{state="in_use"}')" \
        "$(metric "$m" 'tproxyd_tcp_pipes{state="pooled"}')"
}
sample 0
while (($(date +%s) < end_epoch)); do
    sleep "$SAMPLE_SECONDS"
    kill -0 "$tproxyd_pid" 2>/dev/null || fail "tproxyd died during the soak"
    sample $(($(date +%s) - start_epoch))
done

say "load done; waiting for the clients to finish"
for pid in "${load[@]}"; do
    wait "$pid" || true
done

say "waiting for tproxyd to be idle (no TCP connection, no UDP session)"
idle=0
for _ in $(seq "$IDLE_WAIT_SECONDS"); do
    m=$(metrics)
    if [[ $(metric "$m" tproxyd_tcp_connections_active) == 0 && $(metric "$m" tproxyd_udp_sessions_active) == 0 ]]; then
        idle=1
        break
    fi
    sleep 1
done
sample end
m=$(metrics)
fd_end=$(fds)
rss_end=$(rss_kib)
pooled=$(metric "$m" 'tproxyd_tcp_pipes{state="pooled"}')

# --------------------------------------------------------------- verdict

problems=()
((idle)) || problems+=("tproxyd not idle ${IDLE_WAIT_SECONDS}s after the load stopped")
kill -0 "$tproxyd_pid" 2>/dev/null || problems+=("tproxyd is gone")
grep -q "panicked" "$work/tproxyd.log" && problems+=("tproxyd panicked (see its log)")
fd_allowed=$((fd_start + 2 * pooled + FD_SLACK))
((fd_end <= fd_allowed)) || problems+=("descriptor leak: $fd_end open, at most $fd_allowed expected ($fd_start at start + 2 x $pooled pooled pipes + $FD_SLACK)")
rss_allowed=$((rss_start + rss_slack_mib * 1024))
((rss_end <= rss_allowed)) || problems+=("memory: VmRSS $rss_end KiB at the end, more than $rss_allowed KiB ($rss_start at start + $rss_slack_mib MiB)")

churn=$(grep '^churn ok=' "$work/churn.result" || echo "churn: no result")
results=("$churn")
for f in "$work"/bulk-v4.result "$work"/bulk-v6.result "$work"/dns-v4.result "$work"/dns-v6.result \
    "$work"/udp-bulk-v4.result "$work"/udp-bulk-v6.result; do
    results+=("$(cat "$f" 2>/dev/null || echo "$(basename "$f" .result): no result")")
done
for f in "$work"/cone-v4.result "$work"/cone-v6.result; do
    results+=("$(grep '^cone ' "$f" 2>/dev/null || echo "$(basename "$f" .result): no result")")
done
for r in "${results[@]}"; do
    [[ $r =~ failed=0$ ]] || problems+=("client checks failed: $r")
done

echo
echo "== soak summary: $minutes min ($seconds s), tproxyd $("$bin" --version | awk '{print $2}')"
printf '   descriptors  start %6d  peak %6d  end %6d  (pooled pipes at end: %s)\n' "$fd_start" "$fd_peak" "$fd_end" "$pooled"
printf '   VmRSS/KiB    start %6d  peak %6d  end %6d\n' "$rss_start" "$rss_peak" "$rss_end"
printf '   tcp: %s accepted, %s completed, %s client resets, %s upstream resets, %s refused, %s loops\n' \
    "$(metric "$m" tproxyd_tcp_connections_accepted_total)" \
    "$(metric "$m" 'tproxyd_tcp_connections_closed_total{end="completed"}')" \
    "$(metric "$m" 'tproxyd_tcp_connections_closed_total{end="client_reset"}')" \
    "$(metric "$m" 'tproxyd_tcp_connections_closed_total{end="upstream_reset"}')" \
    "$(metric "$m" 'tproxyd_tcp_connect_errors_total{kind="refused"}')" \
    "$(($(metric "$m" 'tproxyd_tcp_loop_refusals_total{reason="to_proxy"}') + $(metric "$m" 'tproxyd_tcp_loop_refusals_total{reason="own_upstream"}')))"
printf '   tcp bytes: %s up, %s down; splice fallbacks %s\n' \
    "$(metric "$m" 'tproxyd_tcp_bytes_total{direction="client_to_upstream"}')" \
    "$(metric "$m" 'tproxyd_tcp_bytes_total{direction="upstream_to_client"}')" \
    "$(metric "$m" tproxyd_tcp_splice_fallbacks_total)"
printf '   udp drops: %s\n' "$(awk '$1 ~ /^tproxyd_udp_drops_total/ && $2 != 0 { printf "%s=%s ", $1, $2 }' <<<"$m")"
printf '   udp: %s sessions, %s expired; %s datagrams up, %s down\n' \
    "$(metric "$m" tproxyd_udp_sessions_created_total)" \
    "$(metric "$m" 'tproxyd_udp_sessions_ended_total{reason="expired"}')" \
    "$(metric "$m" 'tproxyd_udp_datagrams_total{direction="client_to_upstream"}')" \
    "$(metric "$m" 'tproxyd_udp_datagrams_total{direction="upstream_to_client"}')"
for r in "${results[@]}"; do
    echo "   $r"
done
grep -h '^churn error\|^cone error' "$work/churn.result" "$work"/cone-v*.result | sed 's/^/   /' || true
if ((${#problems[@]})); then
    for p in "${problems[@]}"; do
        echo "FAIL: $p"
    done
    exit 1
fi
echo "OK: no leak; every client check passed"
