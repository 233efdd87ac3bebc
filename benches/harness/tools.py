#!/usr/bin/env python3
"""Small load tools the bench runs inside the lab's namespaces.

    tools.py rr-server   --port P              echo 1 byte back, one thread per connection
    tools.py rr-client   --host H --port P --count N [--warmup W] [--conns C]
                         1-byte request/response, N round trips over C
                         connections made one after the other; prints JSON
                         with per-request latency percentiles (microseconds)
    tools.py hold-server --port P              accept, send 1 byte, hold until the peer closes
    tools.py idle-client --host H --port P --count N
                         open N connections, read the server's byte on each (so
                         every connection is proxied end to end), print "ready N",
                         then hold them until stdin closes or a line arrives

    tools.py link-size   --dev IFACE [--gso N --gro N --gso-ipv4 N --gro-ipv4 N]
                         print the device's GSO/GRO size limits as JSON, after
                         setting those given (rtnetlink: iproute2 6.1 knows
                         gso_max_size and gro_max_size but not the IPv4 ones,
                         which BIG TCP for IPv4 needs, kernel 6.3+)

Servers listen on both families (an IPv6 socket with IPV6_V6ONLY off) and run
until killed. Everything here is bounded: clients stop after their count or a
timeout, and exit non-zero on any error.
"""

import argparse
import json
import math
import os
import selectors
import socket
import sys
import threading
import time

# A client that cannot finish in this long has hit a bug, not a slow machine.
CLIENT_TIMEOUT_S = 60.0


def listener(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(4096)
    return s


def rr_serve_one(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            b = conn.recv(1)
            if not b:
                break
            conn.sendall(b)
    except OSError:
        pass
    finally:
        conn.close()


def rr_server(args):
    s = listener(args.port)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=rr_serve_one, args=(conn,), daemon=True).start()


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def rr_client(args):
    """`count` timed round trips (after `warmup` untimed ones per connection),
    spread over `conns` connections made one after the other."""
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    clock = time.perf_counter_ns
    lat = []
    one = b"x"
    per_conn = max(1, args.count // args.conns)
    for _ in range(args.conns):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(5.0)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((args.host, args.port))
        send, recv = s.send, s.recv
        for i in range(args.warmup + per_conn):
            t0 = clock()
            send(one)
            if not recv(1):
                raise SystemExit("rr-client: server closed the connection")
            t1 = clock()
            if i >= args.warmup:
                lat.append((t1 - t0) / 1000.0)
            if (i & 1023) == 0 and time.monotonic() > deadline:
                raise SystemExit("rr-client: timed out")
        s.close()
    lat.sort()
    out = {
        "count": len(lat),
        "conns": args.conns,
        "p50_us": percentile(lat, 50),
        "p90_us": percentile(lat, 90),
        "p99_us": percentile(lat, 99),
        "p999_us": percentile(lat, 99.9),
        "max_us": lat[-1],
        "mean_us": sum(lat) / len(lat),
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


def hold_server(args):
    s = listener(args.port)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                while True:
                    try:
                        conn, _ = s.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    try:
                        conn.send(b"h")
                    except OSError:
                        conn.close()
                        continue
                    sel.register(conn, selectors.EVENT_READ, "c")
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()


def idle_client(args):
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    conns = []
    for _ in range(args.count):
        c = socket.socket(fam, socket.SOCK_STREAM)
        c.settimeout(5.0)
        c.connect((args.host, args.port))
        conns.append(c)
        if time.monotonic() > deadline:
            raise SystemExit("idle-client: timed out connecting")
    for c in conns:
        # The server's byte may be late on a loaded machine (an upstream SYN
        # dropped at a full accept queue is retried after 1 s, 3 s...): wait
        # for it until the client's deadline, not a socket timeout's 5 s.
        c.settimeout(max(1.0, deadline - time.monotonic()))
        if c.recv(1) != b"h":
            raise SystemExit("idle-client: a connection closed before the server's byte")
    print(f"ready {len(conns)}", flush=True)
    # Hold until told (a line or EOF on stdin), at most CLIENT_TIMEOUT_S.
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    sel.select(timeout=CLIENT_TIMEOUT_S)
    for c in conns:
        c.close()


# rtnetlink (linux/rtnetlink.h, linux/if_link.h).
RTM_NEWLINK, RTM_GETLINK, NLMSG_ERROR = 16, 18, 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
LINK_SIZES = {"gso": 41, "gro": 58, "gso_ipv4": 63, "gro_ipv4": 64}  # IFLA_*_MAX_SIZE


def netlink_link(index, attrs):
    """One RTM_NEWLINK (with attrs: {IFLA type: u32}) or RTM_GETLINK (attrs
    empty) for interface `index`; returns the answer's u32 attributes."""
    import struct
    payload = struct.pack("=BxHiII", 0, 0, index, 0, 0)
    for t, v in attrs.items():
        payload += struct.pack("=HHI", 8, t, v)
    kind, flags = (RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK) if attrs else (RTM_GETLINK, NLM_F_REQUEST)
    msg = struct.pack("=IHHII", 16 + len(payload), kind, flags, 1, 0) + payload
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
        s.settimeout(5.0)
        s.send(msg)
        data = s.recv(65536)
    length, kind = struct.unpack_from("=IH", data, 0)
    if kind == NLMSG_ERROR:
        err = struct.unpack_from("=i", data, 16)[0]
        if err:
            raise SystemExit(f"link-size: netlink: {os.strerror(-err)}")
        return {}
    out, off = {}, 16 + 16
    while off + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        if alen == 8:
            out[atype] = struct.unpack_from("=I", data, off + 4)[0]
        off += (alen + 3) & ~3
    return out


def link_size(args):
    index = socket.if_nametoindex(args.dev)
    want = {LINK_SIZES[k]: v for k, v in (("gso", args.gso), ("gro", args.gro), ("gso_ipv4", args.gso_ipv4),
                                          ("gro_ipv4", args.gro_ipv4)) if v is not None}
    if want:
        netlink_link(index, want)
    got = netlink_link(index, {})
    json.dump({k: got.get(t) for k, t in LINK_SIZES.items()}, sys.stdout)
    sys.stdout.write("\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("rr-server")
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("rr-client")
    a.add_argument("--host", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--count", type=int, default=20000)
    a.add_argument("--warmup", type=int, default=500, help="untimed round trips per connection")
    a.add_argument("--conns", type=int, default=1)
    a = sub.add_parser("hold-server")
    a.add_argument("--port", type=int, required=True)
    a = sub.add_parser("idle-client")
    a.add_argument("--host", required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--count", type=int, default=3000)
    a = sub.add_parser("link-size")
    a.add_argument("--dev", required=True)
    for k in LINK_SIZES:
        a.add_argument(f"--{k.replace('_', '-')}", type=int)
    args = p.parse_args()
    {
        "link-size": link_size,
        "rr-server": rr_server,
        "rr-client": rr_client,
        "hold-server": hold_server,
        "idle-client": idle_client,
    }[args.cmd](args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
