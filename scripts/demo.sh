#!/usr/bin/env bash
# demo.sh: build tproxyd, put it in a fresh lab and drive real clients through
# it: curl over IPv4 and IPv6 to a Python web server, iperf3 both ways over
# both families. Prints the results and tproxyd's per-connection log lines.
# Exits non-zero if any step fails; the lab and every process it started are
# removed on any exit. First installs the Debian packages it needs that are
# missing (scripts/deps install demo).
#
#   scripts/demo.sh            (as root)
set -euo pipefail

readonly PORT=8080
readonly IPERF_SECONDS=3
readonly LISTEN_WAIT_SECONDS=10

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
lab="$here/lab.sh"
name="demo$$"
work=$(mktemp -d /tmp/tproxyd-demo.XXXXXX)
pids=()
lab_up=0

me=demo
# shellcheck source=scripts/lib.sh
source "$here/lib.sh"

[[ $EUID -eq 0 ]] || fail "needs root (network namespaces and TPROXY)"
# iperf3, curl, nft... (it says what it installs, and nothing when all are there).
"$here/deps" install demo || exit 1

say "building (cargo build --release)"
# The build's warnings are not the demo's business; its errors are.
if ! (cd "$root" && cargo build --release --quiet) 2>"$work/build.log"; then
    cat "$work/build.log" >&2
    fail "cargo build failed"
fi
bin="$root/target/release/tproxyd"

say "lab $name up (tproxy to :$PORT)"
"$lab" up "$name" --port "$PORT" --mode tproxy || fail "lab up failed"
lab_up=1

mkdir -p "$work/www"
echo "hello through tproxyd" >"$work/www/hello.txt"

# Background processes are started with `ip netns exec` itself, not through
# in_ns: a backgrounded function is a subshell, and $! would name the subshell
# rather than the process that gets signalled.
# Dual-stack web server; its access log is not part of the demo.
ip netns exec "$name-s" python3 -m http.server 80 --bind :: --directory "$work/www" >"$work/http.log" 2>&1 &
pids+=($!)
ip netns exec "$name-s" iperf3 -s >/dev/null 2>&1 &
pids+=($!)

ip netns exec "$name-r" "$bin" --port "$PORT" --log-level debug 2>"$work/tproxyd.log" &
tproxyd_pid=$!
pids+=("$tproxyd_pid")

# Wait until tproxyd, the web server and iperf3 all listen.
listening() {
    local role=$1 port=$2
    in_ns "$role" ss -ltnH "sport = :$port" | grep -q .
}
deadline=$((SECONDS + LISTEN_WAIT_SECONDS))
until listening r "$PORT" && listening s 80 && listening s 5201; do
    kill -0 "$tproxyd_pid" 2>/dev/null || fail "tproxyd exited before listening"
    ((SECONDS < deadline)) || fail "not listening after ${LISTEN_WAIT_SECONDS}s (tproxyd on :$PORT, http on :80, iperf3 on :5201)"
    sleep 0.1
done

for url in "http://198.19.0.2/hello.txt" "http://[2001:2:0:2::2]/hello.txt"; do
    body=$(in_ns c curl -sS --fail -m 5 "$url") || fail "curl $url failed"
    [[ $body == "hello through tproxyd" ]] || fail "curl $url: unexpected body '$body'"
    say "curl $url -> $body"
done

# One line per run: direction and receiver-side throughput.
iperf() {
    local server=$1 out summary dir="client->server"
    shift
    [[ $# -eq 0 ]] || dir="server->client"
    out=$(in_ns c iperf3 -c "$server" -t "$IPERF_SECONDS" -f g "$@" 2>&1) || {
        echo "$out" >&2
        fail "iperf3 -c $server $* failed"
    }
    summary=$(awk '/receiver$/ { print $(NF-2), $(NF-1) }' <<<"$out")
    [[ -n $summary ]] || {
        echo "$out" >&2
        fail "iperf3 -c $server $*: no summary line"
    }
    say "iperf3 $server $dir: $summary"
}
for server in 198.19.0.2 2001:2:0:2::2; do
    iperf "$server"
    iperf "$server" -R
done

kill -0 "$tproxyd_pid" 2>/dev/null || fail "tproxyd died during the demo"
kill -TERM "$tproxyd_pid"
wait "$tproxyd_pid" || fail "tproxyd exited with status $? after SIGTERM"

say "tproxyd log: connection lines"
# Per-connection lines read "CLIENT -> ORIGINAL_DST: ..."; show those rather
# than start-up chatter.
grep -F ' -> ' "$work/tproxyd.log" || echo "(no per-connection lines found)"
say "ok"
