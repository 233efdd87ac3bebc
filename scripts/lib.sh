# lib.sh: what scripts/demo.sh and scripts/soak.sh share, sourced by both:
# the tear-down on any exit, and say/fail/in_ns.
#
# The sourcing script sets, before it sources this:
#   me      its name, for messages ("demo")
#   lab     the path of scripts/lab.sh
#   name    its lab's name (namespaces $name-c, $name-r, $name-s)
#   work    its scratch directory (tproxyd's log is $work/tproxyd.log)
#   pids=() and lab_up=0, which it keeps up to date
#   keep    optional: 1 keeps $work (and says where)
#
# What stays true: whatever exits the script (success, failure, a signal),
# every process it started and everything left running in its lab's
# namespaces is ended, the lab is taken down and $work removed (unless kept).

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if ((lab_up)); then
        # Anything else left in the lab's namespaces (a client that hung, a
        # server's child) would outlive them: end it by namespace.
        local ns
        for ns in "$name-c" "$name-r" "$name-s"; do
            ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        done
        "$lab" down "$name"
    fi
    if ((${keep:-0})); then
        echo "$me: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { printf '== %s\n' "$*"; }

# One line naming the problem, the end of tproxyd's log if there is one,
# exit 1.
fail() {
    echo "$me: $*" >&2
    if [[ -s $work/tproxyd.log ]]; then
        echo "--- tproxyd log (last 30 lines) ---" >&2
        tail -n 30 "$work/tproxyd.log" >&2
    fi
    exit 1
}

# in_ns ROLE CMD...: run CMD in the lab's namespace for ROLE (c, r, s).
in_ns() {
    local role=$1
    shift
    ip netns exec "$name-$role" "$@"
}
