#!/usr/bin/env bash
# lab.sh: a three-namespace TPROXY lab (client -> router -> server).
#
#   scripts/lab.sh up NAME [--port PORT] [--mode tproxy|direct] [--routers 1|2]
#   scripts/lab.sh down NAME            (idempotent: a missing lab is fine)
#   scripts/lab.sh exec NAME c|r|r2|s CMD...
#
# Namespaces NAME-c, NAME-r, NAME-s. Every lab has the same addresses; the
# namespaces keep them apart, and the veth pairs are made from inside the
# router namespace so that no interface name ever appears in the root
# namespace, where two labs running in parallel would collide.
#
#   NAME-c eth0 198.18.0.2/24 2001:2:0:1::2/64
#          |
#   NAME-r rc   198.18.0.1/24 2001:2:0:1::1/64   (tproxyd runs here)
#          rs   198.19.0.1/24 2001:2:0:2::1/64
#          |
#   NAME-s eth0 198.19.0.2/24 2001:2:0:2::2/64
#
# Mode tproxy (default): TCP and UDP arriving on rc are diverted to :PORT
# (default 8080) with fwmark 1, routed locally by table 100; forwarding is off
# and the forward chain drops, so nothing reaches the server except through a
# proxy in the router. Mode direct: the router just forwards (the baseline).
#
# --routers 2 (scaling past one host, ECMP): a second router NAME-r2, the
# same as NAME-r. The client side becomes one LAN with two gateways (the
# client's addresses move to a bridge br0 holding both routers' links);
# each router has a server link of its own:
#
#   NAME-c  br0 198.18.0.2/24 2001:2:0:1::2/64 (eth0 -> NAME-r, eth1 -> NAME-r2)
#   NAME-r2 rc 198.18.0.3/24 2001:2:0:1::3/64, rs 198.19.1.1/24 2001:2:0:4::1/64
#   NAME-s  eth1 198.19.1.2/24 2001:2:0:4::2/64
#
# The server also holds a service address on its lo, 198.19.2.2 and
# 2001:2:0:5::2 (an anycast-like name for "the servers"), which each router
# routes to over its own server link. The client reaches it over a
# resilient ECMP nexthop group (one nexthop per router, 64 buckets, hashed
# on the 5-tuple: fib_multipath_hash_policy 1), so each flow takes one
# router and stays on it, and removing one router's nexthop moves only the
# flows that were on it.
#
# Nothing in the root namespace is touched: no rules, routes or sysctls.
set -euo pipefail

readonly TABLE=tproxyd_lab
readonly MARK=1
# What the tests give tproxyd as --mark: the lab's rules tell the proxy's own
# UDP sockets by it.
readonly PROXY_MARK=0x2
readonly ROUTE_TABLE=100
# See wait_ipv6_ready: normally well under a second; allow for a busy host.
readonly IPV6_READY_SECONDS=5

prog=${0##*/}

usage() {
    echo "usage: $prog up NAME [--port PORT] [--mode tproxy|direct] [--routers 1|2] | down NAME | exec NAME c|r|r2|s CMD..." >&2
    exit 2
}

die() {
    echo "$prog: $*" >&2
    exit 1
}

check_name() {
    # NAME-c, NAME-r and NAME-s become file names under /run/netns: keep
    # them plain and short.
    [[ $1 =~ ^[A-Za-z0-9_.]{1,13}$ ]] || die "bad lab name '$1' (1-13 of [A-Za-z0-9_.])"
}

ns_exists() {
    [[ -e /run/netns/$1 ]]
}

down() {
    local name=$1 role ns
    for role in c r r2 s; do
        ns=$name-$role
        if ns_exists "$ns"; then
            # Deleting a namespace drops its veth ends, rules and routes with it.
            ip netns delete "$ns" 2>/dev/null || true
        fi
    done
    # `ip netns delete` can fail if a mount is busy; try once more so "down"
    # leaves nothing behind when it can.
    for role in c r r2 s; do
        ns=$name-$role
        if ns_exists "$ns"; then
            ip netns delete "$ns" 2>/dev/null || true
        fi
    done
    return 0
}

# Run a set-up step; on failure say which one (with the tool's own message) and
# exit non-zero. The EXIT trap in `up` tears the half-made lab down.
step() {
    local what=$1 out
    shift
    if ! out=$("$@" 2>&1); then
        die "up $lab_name: $what failed: $(echo "$out" | head -n1)"
    fi
}

sysctl_ns() {
    local ns=$1 kv=$2
    ip netns exec "$ns" sysctl -qw "$kv" >/dev/null
}

# A link set up is not yet a link IPv6 can use: the kernel starts IPv6 on it
# (addrconf) only once it sees the carrier, and carrier events go through
# linkwatch, which can hold them back for up to a second. Until then the router
# does not answer neighbour solicitations: measured here, the first IPv6
# connection of a fresh lab lost its first SYN (or NS) and took 1s instead of
# 0.3ms. The sign that addrconf has started on a link is its link-local
# address; wait for it on every link. Arguments: pairs of NAMESPACE IFACE.
wait_ipv6_ready() {
    local deadline=$((SECONDS + IPV6_READY_SECONDS)) ns dev ready
    while :; do
        ready=1
        local i=1 args=("$@")
        while ((i < ${#args[@]})); do
            ns=${args[i - 1]} dev=${args[i]}
            if ! ip -n "$ns" -6 -o addr show dev "$dev" scope link | grep -v tentative | grep -q inet6; then
                ready=0
                break
            fi
            i=$((i + 2))
        done
        ((ready)) && return 0
        if ((SECONDS >= deadline)); then
            echo "no IPv6 link-local address on $dev in $ns after ${IPV6_READY_SECONDS}s" >&2
            return 1
        fi
        sleep 0.02
    done
}

nft_tproxy_rules() {
    local port=$1
    # One inet table covers IPv4 and IPv6: with only a port given, `tproxy to`
    # takes the family of the packet. `meta l4proto` matches TCP and UDP in one
    # rule; tproxy needs it to know which socket table to look in.
    cat <<EOF
table inet $TABLE {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        # On every interface: a TCP packet for a transparent socket of the
        # proxy (with --spoof-source, the server's answers to the client's
        # address) is delivered locally, as scripts/rules does.
        meta l4proto tcp socket transparent 1 socket wildcard 0 meta mark set $MARK accept
        # UDP only for the proxy's upstream sockets (tproxyd --mark 2): its
        # reply sockets are transparent too and must not take clients' datagrams.
        meta l4proto udp socket transparent 1 socket wildcard 0 socket mark & $PROXY_MARK == $PROXY_MARK meta mark set $MARK accept
        iifname "rc" meta l4proto { tcp, udp } meta mark set $MARK tproxy to :$port accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
}
EOF
}

nft_direct_rules() {
    cat <<EOF
table inet $TABLE {
    chain forward {
        type filter hook forward priority filter; policy accept;
    }
}
EOF
}

# One router's part: reverse-path checks off, the TPROXY policy routing (or
# plain forwarding in direct mode) and the nft rules.
router_rules() {
    local r=$1 mode=$2 port=$3 fwd rules
    # TPROXY'd packets are addressed elsewhere: strict reverse-path checks would
    # drop them before the socket lookup.
    step "rp_filter" sysctl_ns "$r" net.ipv4.conf.all.rp_filter=0
    step "rp_filter" sysctl_ns "$r" net.ipv4.conf.default.rp_filter=0
    step "rp_filter" sysctl_ns "$r" net.ipv4.conf.rc.rp_filter=0
    step "rp_filter" sysctl_ns "$r" net.ipv4.conf.rs.rp_filter=0

    if [[ $mode == tproxy ]]; then
        fwd=0
        rules=$(nft_tproxy_rules "$port")
        step "policy routing (v4)" ip -n "$r" rule add fwmark "$MARK" lookup "$ROUTE_TABLE"
        step "policy routing (v4)" ip -n "$r" route add local 0.0.0.0/0 dev lo table "$ROUTE_TABLE"
        step "policy routing (v6)" ip -n "$r" -6 rule add fwmark "$MARK" lookup "$ROUTE_TABLE"
        step "policy routing (v6)" ip -n "$r" -6 route add local ::/0 dev lo table "$ROUTE_TABLE"
    else
        fwd=1
        rules=$(nft_direct_rules)
    fi
    step "forwarding sysctls" sysctl_ns "$r" net.ipv4.ip_forward="$fwd"
    step "forwarding sysctls" sysctl_ns "$r" net.ipv6.conf.all.forwarding="$fwd"
    step "nft rules" ip netns exec "$r" nft -f - <<<"$rules"
}

# --routers 2: the second router, its links, the service address, and the
# client's ECMP route over both routers (see the header).
second_router() {
    local c=$1 r2=$2 s=$3 mode=$4 port=$5 r=${2%2}
    step "ip netns add $r2" ip netns add "$r2"
    step "lo up in $r2" ip -n "$r2" link set lo up
    step "sysctls in $r2" sysctl_ns "$r2" net.ipv6.conf.all.accept_dad=0
    step "sysctls in $r2" sysctl_ns "$r2" net.ipv6.conf.default.accept_dad=0

    # The client side is one LAN with two gateways: the client's addresses
    # move to a bridge holding both routers' links, so a flow's source
    # address is the same whichever router its hash picks.
    step "client bridge" ip -n "$c" link add br0 type bridge
    step "client bridge" ip -n "$c" addr flush dev eth0
    step "client bridge" ip -n "$c" link set eth0 master br0
    step "veth rc<->$c" ip -n "$r2" link add rc type veth peer name eth1 netns "$c"
    step "client bridge" ip -n "$c" link set eth1 master br0
    step "client addresses" ip -n "$c" addr add 198.18.0.2/24 dev br0
    step "client addresses" ip -n "$c" -6 addr add 2001:2:0:1::2/64 dev br0 nodad
    step "router addresses" ip -n "$r2" addr add 198.18.0.3/24 dev rc
    step "router addresses" ip -n "$r2" -6 addr add 2001:2:0:1::3/64 dev rc nodad

    step "veth rs<->$s" ip -n "$r2" link add rs type veth peer name eth1 netns "$s"
    step "router addresses" ip -n "$r2" addr add 198.19.1.1/24 dev rs
    step "router addresses" ip -n "$r2" -6 addr add 2001:2:0:4::1/64 dev rs nodad
    step "server addresses" ip -n "$s" addr add 198.19.1.2/24 dev eth1
    step "server addresses" ip -n "$s" -6 addr add 2001:2:0:4::2/64 dev eth1 nodad
    step "service address" ip -n "$s" addr add 198.19.2.2/32 dev lo
    step "service address" ip -n "$s" -6 addr add 2001:2:0:5::2/128 dev lo nodad

    step "links up" ip -n "$c" link set eth1 up
    step "links up" ip -n "$c" link set br0 up
    step "links up" ip -n "$s" link set eth1 up
    step "links up" ip -n "$r2" link set rc up
    step "links up" ip -n "$r2" link set rs up
    step "IPv6 ready" wait_ipv6_ready "$c" br0 "$r2" rc "$r2" rs "$s" eth1

    # Each router reaches the service over its own server link; the server
    # answers each router on the link it came from (connected routes), and
    # with direct forwarding reaches the clients through the first router.
    step "service routes" ip -n "$r" route add 198.19.2.2/32 via 198.19.0.2
    step "service routes" ip -n "$r" -6 route add 2001:2:0:5::2/128 via 2001:2:0:2::2
    step "service routes" ip -n "$r2" route add 198.19.2.2/32 via 198.19.1.2
    step "service routes" ip -n "$r2" -6 route add 2001:2:0:5::2/128 via 2001:2:0:4::2

    # The client: one resilient group per family, a nexthop per router,
    # hashed on the 5-tuple, for the service prefix (the single-router
    # default route stays for everything else).
    step "ECMP hash" sysctl_ns "$c" net.ipv4.fib_multipath_hash_policy=1
    step "ECMP hash" sysctl_ns "$c" net.ipv6.fib_multipath_hash_policy=1
    step "client routes" ip -n "$c" route replace default via 198.18.0.1 dev br0
    step "client routes" ip -n "$c" -6 route replace default via 2001:2:0:1::1 dev br0
    step "nexthops" ip -n "$c" nexthop add id 1 via 198.18.0.1 dev br0
    step "nexthops" ip -n "$c" nexthop add id 2 via 198.18.0.3 dev br0
    step "nexthops" ip -n "$c" nexthop add id 3 via 2001:2:0:1::1 dev br0
    step "nexthops" ip -n "$c" nexthop add id 4 via 2001:2:0:1::3 dev br0
    step "nexthops" ip -n "$c" nexthop add id 10 group 1/2 type resilient buckets 64
    step "nexthops" ip -n "$c" nexthop add id 11 group 3/4 type resilient buckets 64
    step "client routes" ip -n "$c" route add 198.19.2.0/24 nhid 10
    step "client routes" ip -n "$c" -6 route add 2001:2:0:5::/64 nhid 11

    router_rules "$r2" "$mode" "$port"
}

up() {
    local name=$1
    shift
    local port=8080 mode=tproxy routers=1
    while (($#)); do
        case $1 in
        --routers)
            (($# >= 2)) || usage
            routers=$2
            shift 2
            ;;
        --port)
            (($# >= 2)) || usage
            port=$2
            shift 2
            ;;
        --mode)
            (($# >= 2)) || usage
            mode=$2
            shift 2
            ;;
        *) usage ;;
        esac
    done
    if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
        die "bad --port '$port'"
    fi
    port=$((10#$port))
    [[ $mode == tproxy || $mode == direct ]] || die "bad --mode '$mode' (tproxy or direct)"
    [[ $routers == 1 || $routers == 2 ]] || die "bad --routers '$routers' (1 or 2)"
    [[ $EUID -eq 0 ]] || die "up needs root (network namespaces)"

    local c=$name-c r=$name-r r2=$name-r2 s=$name-s ns
    for ns in "$c" "$r" "$r2" "$s"; do
        ! ns_exists "$ns" || die "namespace $ns already exists (lab '$name' is up; run '$prog down $name')"
    done

    lab_name=$name
    # From here on any failure removes what was made. `down` only removes this
    # lab's namespaces, all of which this call has just checked did not exist.
    trap 'rc=$?; if ((rc != 0)); then down "$lab_name"; fi' EXIT

    for ns in "$c" "$r" "$s"; do
        step "ip netns add $ns" ip netns add "$ns"
        step "lo up in $ns" ip -n "$ns" link set lo up
    done

    # IPv6 addresses must be usable at once: no DAD anywhere.
    for ns in "$c" "$r" "$s"; do
        step "sysctls in $ns" sysctl_ns "$ns" net.ipv6.conf.all.accept_dad=0
        step "sysctls in $ns" sysctl_ns "$ns" net.ipv6.conf.default.accept_dad=0
    done

    step "veth rc<->$c" ip -n "$r" link add rc type veth peer name eth0 netns "$c"
    step "veth rs<->$s" ip -n "$r" link add rs type veth peer name eth0 netns "$s"

    step "client addresses" ip -n "$c" addr add 198.18.0.2/24 dev eth0
    step "client addresses" ip -n "$c" -6 addr add 2001:2:0:1::2/64 dev eth0 nodad
    step "router addresses" ip -n "$r" addr add 198.18.0.1/24 dev rc
    step "router addresses" ip -n "$r" -6 addr add 2001:2:0:1::1/64 dev rc nodad
    step "router addresses" ip -n "$r" addr add 198.19.0.1/24 dev rs
    step "router addresses" ip -n "$r" -6 addr add 2001:2:0:2::1/64 dev rs nodad
    step "server addresses" ip -n "$s" addr add 198.19.0.2/24 dev eth0
    step "server addresses" ip -n "$s" -6 addr add 2001:2:0:2::2/64 dev eth0 nodad

    step "links up" ip -n "$c" link set eth0 up
    step "links up" ip -n "$s" link set eth0 up
    step "links up" ip -n "$r" link set rc up
    step "links up" ip -n "$r" link set rs up

    step "IPv6 ready" wait_ipv6_ready "$c" eth0 "$r" rc "$r" rs "$s" eth0

    step "client routes" ip -n "$c" route add default via 198.18.0.1
    step "client routes" ip -n "$c" -6 route add default via 2001:2:0:1::1
    step "server routes" ip -n "$s" route add default via 198.19.0.1
    step "server routes" ip -n "$s" -6 route add default via 2001:2:0:2::1

    router_rules "$r" "$mode" "$port"

    if ((routers == 2)); then
        second_router "$c" "$r2" "$s" "$mode" "$port"
    fi

    trap - EXIT
}

main() {
    (($# >= 2)) || usage
    local cmd=$1 name=$2
    shift 2
    check_name "$name"
    case $cmd in
    up) up "$name" "$@" ;;
    down) down "$name" ;;
    exec)
        (($# >= 2)) || usage
        local role=$1
        shift
        [[ $role == c || $role == r || $role == r2 || $role == s ]] || usage
        ns_exists "$name-$role" || die "no namespace $name-$role (is lab '$name' up?)"
        exec ip netns exec "$name-$role" "$@"
        ;;
    *) usage ;;
    esac
}

main "$@"
