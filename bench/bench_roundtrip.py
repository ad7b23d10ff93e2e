#!/usr/bin/python3
"""Round trip of a trivial request to one engine: ipmpi vs ipyparallel 7.1.

Prints the median and p90 of `mec.execute('pass', targets=0)` (ipmpi) and of
`rc[0].execute('pass', block=True)` (ipyparallel), their ratio (target:
ipmpi at least 20x faster), and the floor: a bare TLS 1.3 echo of 64 bytes
over loopback between two Python processes (ssl module), measured in the
same run with blocking reads and with polling reads (the wake-up of a
sleeping reader costs more than the TLS itself here), with ipmpi's distance
from the polling one (DESIGN.md: within 2x, < 100 us).

Usage: bench_roundtrip.py [--calls 2000] [--peer-calls 200]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed.
"""
import argparse
import os
import socket
import ssl
import subprocess
import sys
import time

import benchlib


def us(seconds):
    return seconds * 1e6


def time_calls(fn, warmup, calls):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return benchlib.median(samples), benchlib.percentile(samples, 90)


def bench_ipmpi(calls):
    with benchlib.ipmpi_cluster(1) as (c, _):
        mec = c.client()
        try:
            mec.execute("x = 1", targets=0)
            return time_calls(lambda: mec.execute("pass", targets=0), 200, calls)
        finally:
            mec.close()


def bench_ipmpi_round_robin(calls, n=4):
    """execute('pass') to one engine at a time, round robin over n engines
    (more engines than cores here): each engine is idle between its turns,
    so this measures how fast an idle engine wakes (doorbells), next to
    one engine kept busy."""
    with benchlib.ipmpi_cluster(n) as (c, _):
        mec = c.client()
        try:
            mec.execute("x = 1")
            k = [0]

            def one():
                mec.execute("pass", targets=k[0] % n)
                k[0] += 1
            return time_calls(one, 4 * n, calls)
        finally:
            mec.close()


def bench_ipyparallel(calls):
    with benchlib.ipyparallel_client(1) as (rc, _):
        e = rc[0]
        return time_calls(lambda: e.execute("pass", block=True), 20, calls)


def bench_tls_floor(calls, workdir, spin):
    """64-byte echo over TLS 1.3 on loopback, Python ssl on both ends.

    spin=False: blocking reads, so each side sleeps in the kernel and is
    woken per message (the wake-up dominates on this machine). spin=True:
    both ends poll non-blocking sockets, the lower bound for a runtime
    that polls while it waits, as ipmpi's ranks do.
    """
    key, cert = benchlib.self_signed_cert(workdir)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE

    # The echo server is its own process, as the controller is: two threads
    # of one Python process would add GIL hand-offs to every round trip.
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, cert, key, "1" if spin else "0"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with cctx.wrap_socket(raw) as s:
            if s.version() != "TLSv1.3":
                raise RuntimeError("floor is not TLS 1.3 but %s" % s.version())
            if spin:
                s.setblocking(False)
            msg = b"x" * 64
            deadline = [0.0]

            def echo():
                s.sendall(msg)
                got = 0
                deadline[0] = time.monotonic() + 30
                while got < 64:
                    try:
                        chunk = s.recv(64 - got)
                    except ssl.SSLWantReadError:
                        if time.monotonic() > deadline[0]:
                            raise RuntimeError("echo server did not answer in 30 s")
                        continue
                    if not chunk:
                        raise RuntimeError("echo server closed the connection")
                    got += len(chunk)

            return time_calls(echo, 200, calls)
    finally:
        server.kill()
        server.wait()


ECHO_SERVER = r"""
import socket, ssl, sys, time
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
spin = sys.argv[3] == "1"
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
ls.settimeout(30)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
conn.settimeout(60)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s = ctx.wrap_socket(conn, server_side=True)
if spin:
    s.setblocking(False)
idle_since = time.monotonic()
while True:
    buf = b""
    while len(buf) < 64:
        try:
            chunk = s.recv(64 - len(buf))
        except ssl.SSLWantReadError:
            if time.monotonic() - idle_since > 60:
                sys.exit(1)  # the client is gone: never spin forever
            continue
        if not chunk:
            sys.exit(0)
        buf += chunk
    s.sendall(buf)
    idle_since = time.monotonic()
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed ipmpi calls and TLS echoes")
    ap.add_argument("--peer-calls", type=int, default=200, help="timed ipyparallel calls")
    a = ap.parse_args()

    with benchlib.tmpdir("bench-tls-") as d:
        floor_block = benchlib.measure("TLS 1.3 echo floor (blocking)", bench_tls_floor, a.calls, d, False)
        floor = benchlib.measure("TLS 1.3 echo floor (polling)", bench_tls_floor, a.calls, d, True)
    # One peer at a time, so neither competes with the other's processes.
    ipmpi = benchlib.measure("ipmpi execute round trip", bench_ipmpi, a.calls)
    rr = benchlib.measure("ipmpi execute round robin over 4 engines", bench_ipmpi_round_robin, a.calls // 4)
    peer = benchlib.measure("ipyparallel execute round trip", bench_ipyparallel, a.peer_calls)

    print("execute('pass') round trip to one engine, loopback, %d cores" % os.cpu_count())
    if ipmpi:
        print("  ipmpi            median %9.1f us   p90 %9.1f us   (%d calls)"
              % (us(ipmpi[0]), us(ipmpi[1]), a.calls))
    if rr:
        print("  ipmpi, round robin over 4 engines (each idle between turns)  median %9.1f us   p90 %9.1f us"
              "   (%d calls)" % (us(rr[0]), us(rr[1]), a.calls // 4))
        if ipmpi:
            print("  round robin/one engine (median): %s   target <= 3x: %s"
                  % (benchlib.fmt_ratio(rr[0], ipmpi[0]), "met" if rr[0] <= 3 * ipmpi[0] else "NOT met"))
    if peer:
        print("  ipyparallel 7.1  median %9.1f us   p90 %9.1f us   (%d calls)"
              % (us(peer[0]), us(peer[1]), a.peer_calls))
    if floor_block:
        print("  floor: TLS 1.3 64 B echo, blocking reads  median %9.1f us   p90 %9.1f us"
              % (us(floor_block[0]), us(floor_block[1])))
    if floor:
        print("  floor: TLS 1.3 64 B echo, polling reads   median %9.1f us   p90 %9.1f us"
              % (us(floor[0]), us(floor[1])))
    if ipmpi and peer:
        r = peer[0] / ipmpi[0]
        print("  ratio ipyparallel/ipmpi (median): %s   target >= 20x: %s"
              % (benchlib.fmt_ratio(peer[0], ipmpi[0]), "met" if r >= 20 else "NOT met"))
    if ipmpi and floor:
        print("  ipmpi/floor (polling, median): %s   target <= 2x: %s"
              % (benchlib.fmt_ratio(ipmpi[0], floor[0]), "met" if ipmpi[0] <= 2 * floor[0] else "NOT met"))
    if ipmpi and floor_block:
        print("  ipmpi/floor (blocking, median): %s" % benchlib.fmt_ratio(ipmpi[0], floor_block[0]))
    return benchlib.finish()


if __name__ == "__main__":
    sys.exit(main())
