#!/usr/bin/python3
"""Push then pull of a 256 MiB float64 numpy array to one engine.

ipmpi (`mec.push(dict(a=arr), targets=0)`, `mec.pull('a', targets=0)`) vs
ipyparallel 7.1 (`rc[0].push(dict(a=arr), block=True)`,
`rc[0].pull('a', block=True)`): MiB/s each way, best of --repeat runs, the
values checked after every pull, and the ratio (target: ipmpi >= 5x each
way). ipmpi is measured twice, each on its own cluster: the default
client, which co-located with the controller uses same-host shared memory
(doc/protocol.md section 5), and a client with shm=False ("ipmpi over
TLS"); each row says which path its client used (mec.shm). The 5x target
is for the default client. Floors measured in the same run: a memcpy of the
same array in numpy (np.copyto), and, unless --no-mpi, an MPI ping of the
same size between two ranks of one node through mpi4py (shared memory), and
one TLS 1.3 stream (the bound of the TLS path, not of shared memory).

Usage: bench_pushpull.py [--mib 256] [--repeat 3] [--no-mpi]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed or a pulled array was wrong.
"""
import argparse
import os
import socket
import ssl
import subprocess
import sys
import time

import numpy as np

import benchlib

MIB = 1 << 20


def best_rate(nbytes, fn, repeat):
    """Best MiB/s of repeat calls of fn (each moves nbytes)."""
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return nbytes / MIB / best


def check_same(got, arr):
    got = benchlib.unwrap_single(got)
    if not isinstance(got, np.ndarray) or got.shape != arr.shape or got.dtype != arr.dtype:
        raise RuntimeError("pulled %r, not a %s array of shape %s" % (type(got), arr.dtype, arr.shape))
    if not np.array_equal(got, arr):
        raise RuntimeError("pulled array differs from the pushed one")


def push_pull(push, pull, arr, repeat):
    """(push MiB/s, pull MiB/s); every pull is checked against arr.

    Each pull is timed alone, checked after its clock stopped and dropped
    before the next one, as a user pulls, uses and drops a result; the
    same for every peer. (Keeping every result alive would make each pull
    land in memory the process never used: on this VM that costs ~600 ms
    per 256 MiB from the host, for any peer, and measures the VM instead.)
    """
    push()  # warm-up: first touch of the engine's memory, connection set-up
    check_same(pull(), arr)
    up = best_rate(arr.nbytes, push, repeat)
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = pull()
        dt = time.perf_counter() - t0
        check_same(got, arr)
        del got
        best = dt if best is None or dt < best else best
    return up, arr.nbytes / MIB / best


def bench_ipmpi(arr, repeat, **client_kw):
    """(push MiB/s, pull MiB/s, mec.shm) of a client made with client_kw
    (none: the default client; shm=False: TLS only)."""
    with benchlib.ipmpi_cluster(1) as (c, _):
        mec = c.client(**client_kw)
        try:
            up, down = push_pull(lambda: mec.push(dict(a=arr), targets=0),
                                 lambda: mec.pull("a", targets=0), arr, repeat)
            return up, down, getattr(mec, "shm_path", None) or (False if mec.shm is False else None)
        finally:
            mec.close()


def path_name(path):
    """Which path a client used, from its mec.shm_path."""
    if not path:
        return "path: TLS (mec.shm_path=None)"
    return "path: same-host %s (mec.shm_path=%r)" % (path, path)


def bench_ipyparallel(arr, repeat):
    with benchlib.ipyparallel_client(1) as (rc, _):
        e = rc[0]
        return push_pull(lambda: e.push(dict(a=arr), block=True),
                         lambda: e.pull("a", block=True), arr, repeat)


def bench_memcpy(arr, repeat):
    dst = np.empty_like(arr)
    np.copyto(dst, arr)  # first touch of dst outside the clock
    return best_rate(arr.nbytes, lambda: np.copyto(dst, arr), repeat)


MPI_PING = r"""
import sys, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
n = int(sys.argv[1]); repeat = int(sys.argv[2])
buf = np.ones(n, dtype=np.uint8)
best = None
for i in range(repeat + 1):
    comm.Barrier()
    t0 = MPI.Wtime()
    if comm.rank == 0:
        comm.Send(buf, dest=1)
        comm.Recv(buf[:1], source=1)
    else:
        comm.Recv(buf, source=0)
        comm.Send(buf[:1], dest=0)
    dt = MPI.Wtime() - t0
    if i > 0 and (best is None or dt < best):
        best = dt
if comm.rank == 0:
    print("%.6f" % best, flush=True)
"""


def bench_mpi(nbytes, repeat):
    """One-way MiB/s of an nbytes MPI message between two ranks (best of repeat)."""
    with benchlib.tmpdir("bench-mpi-") as d:
        script = os.path.join(d, "ping.py")
        with open(script, "w") as f:
            f.write(MPI_PING)
        out = benchlib.run_checked(["mpirun", "-n", "2", sys.executable, script, str(nbytes), str(repeat)],
                                   timeout=300)
        best = float(out.strip().splitlines()[-1])
        return nbytes / MIB / best


SINK_SERVER = r"""
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
n = int(sys.argv[3])
buf = bytearray(n)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
s = ctx.wrap_socket(ls.accept()[0], server_side=True)
view = memoryview(buf)
while True:
    got = 0
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if not k:
            sys.exit(0)
        got += k
    s.sendall(b"k")
"""


def bench_tls_bulk(nbytes, repeat):
    """The bare-TLS floor for a large transfer: nbytes one way over TLS 1.3
    on loopback (OpenSSL through Python's ssl, each end its own process,
    received into one preallocated buffer), best of repeat. ipmpi's client
    link is one such stream, so push and pull cannot beat it."""
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    payload = memoryview(bytearray(b"\x01") * nbytes)
    with benchlib.tmpdir("bench-tlsbulk-") as d:
        key, cert = benchlib.self_signed_cert(d)
        server = subprocess.Popen([sys.executable, "-c", SINK_SERVER, cert, key, str(nbytes)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            with cctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60)) as s:
                def once():
                    s.sendall(payload)
                    if s.recv(1) != b"k":
                        raise RuntimeError("TLS sink closed early")
                return best_rate(nbytes, once, repeat)
        finally:
            server.kill()
            server.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="array size in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs each way; the best counts")
    ap.add_argument("--no-mpi", action="store_true", help="skip the MPI shared-memory floor")
    a = ap.parse_args()

    arr = np.arange(a.mib * MIB // 8, dtype=np.float64)
    memcpy = benchlib.measure("memcpy floor", bench_memcpy, arr, a.repeat)
    mpi = None if a.no_mpi else benchlib.measure("MPI shared-memory floor", bench_mpi, arr.nbytes, a.repeat)
    tls = benchlib.measure("TLS bulk floor", bench_tls_bulk, arr.nbytes, a.repeat)
    ipmpi_run = benchlib.measure("ipmpi push/pull", bench_ipmpi, arr, a.repeat)
    ipmpi_tls_run = benchlib.measure("ipmpi over TLS push/pull", bench_ipmpi, arr, a.repeat, shm=False)
    ipmpi = ipmpi_run[:2] if ipmpi_run else None
    ipmpi_tls = ipmpi_tls_run[:2] if ipmpi_tls_run else None
    peer = benchlib.measure("ipyparallel push/pull", bench_ipyparallel, arr, a.repeat)

    print("push / pull of a %d MiB float64 array to one engine, best of %d, loopback"
          % (a.mib, a.repeat))
    if ipmpi:
        print("  ipmpi            push %8.0f MiB/s   pull %8.0f MiB/s   %s"
              % (ipmpi + (path_name(ipmpi_run[2]),)))
    if ipmpi_tls:
        print("  ipmpi over TLS   push %8.0f MiB/s   pull %8.0f MiB/s   %s"
              % (ipmpi_tls + (path_name(ipmpi_tls_run[2]),)))
    if peer:
        print("  ipyparallel 7.1  push %8.0f MiB/s   pull %8.0f MiB/s" % peer)
    if ipmpi and peer:
        rp, rl = ipmpi[0] / peer[0], ipmpi[1] / peer[1]
        print("  ratio ipmpi/ipyparallel   push %.1fx   pull %.1fx   target >= 5x each way: %s"
              % (rp, rl, "met" if min(rp, rl) >= 5 else "NOT met"))
    if ipmpi_tls and peer:
        print("  ratio ipmpi over TLS/ipyparallel   push %.1fx   pull %.1fx   (no target)"
              % (ipmpi_tls[0] / peer[0], ipmpi_tls[1] / peer[1]))
    if ipmpi and ipmpi_tls:
        print("  ratio ipmpi/ipmpi over TLS   push %.1fx   pull %.1fx"
              % (ipmpi[0] / ipmpi_tls[0], ipmpi[1] / ipmpi_tls[1]))
    if memcpy:
        print("  floor: memcpy (np.copyto)       %8.0f MiB/s" % memcpy)
    if mpi:
        print("  floor: MPI shared memory, 2 ranks %6.0f MiB/s (one way)" % mpi)
    if tls:
        print("  floor: TLS 1.3 stream, one way %7.0f MiB/s (Python ssl, loopback)" % tls)
    if ipmpi and tls:
        print("  ipmpi/TLS      push %.2f   pull %.2f" % (ipmpi[0] / tls, ipmpi[1] / tls))
    if ipmpi_tls and tls:
        print("  ipmpi over TLS/TLS   push %.2f   pull %.2f" % (ipmpi_tls[0] / tls, ipmpi_tls[1] / tls))
    if ipmpi_tls and memcpy:
        print("  ipmpi over TLS/memcpy   push %.2f   pull %.2f" % (ipmpi_tls[0] / memcpy, ipmpi_tls[1] / memcpy))
    if ipmpi and memcpy:
        print("  ipmpi/memcpy   push %.2f   pull %.2f" % (ipmpi[0] / memcpy, ipmpi[1] / memcpy))
    if ipmpi and mpi:
        print("  ipmpi/MPI      push %.2f   pull %.2f" % (ipmpi[0] / mpi, ipmpi[1] / mpi))
    return benchlib.finish()


if __name__ == "__main__":
    sys.exit(main())
