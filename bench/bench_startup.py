#!/usr/bin/python3
"""Time from nothing to 4 engines answering: ipmpi vs ipyparallel 7.1.

ipmpi: `ipcluster mpirun -n 4` as the Cluster API runs it — wall time from
Cluster(n=4).start() until a fresh MultiEngineClient's get_ids() returned 4
ids (start() itself returns only once the controller answers with all
engines). ipyparallel: Cluster(n=4) at its best settings (delay=0, short
heartbeat) from start until rc.wait_for_engines(4) returned. Floor:
`mpirun -n 5 true`, the launch of an MPI job of the same size doing nothing.
Each is run --runs times; min and median are printed (target: ipmpi < 1 s).

Usage: bench_startup.py [--engines 4] [--runs 3]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed.
"""
import argparse
import os
import sys
import time

import benchlib


def ipmpi_once(n):
    t0 = time.perf_counter()
    with benchlib.ipmpi_cluster(n) as (c, _):
        mec = c.client()
        try:
            ids = mec.get_ids()
            dt = time.perf_counter() - t0
        finally:
            mec.close()
        if sorted(ids) != list(range(n)):
            raise RuntimeError("get_ids() answered %r, expected 0..%d" % (ids, n - 1))
        return dt


def ipyparallel_once(n):
    t0 = time.perf_counter()
    with benchlib.ipyparallel_client(n) as (rc, _):
        dt = time.perf_counter() - t0
        if len(rc.ids) < n:
            raise RuntimeError("ipyparallel has %d engines, expected %d" % (len(rc.ids), n))
        return dt


def floor_once(n):
    cmd = ["mpirun", "-n", str(n + 1)]
    if n + 1 > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    t0 = time.perf_counter()
    benchlib.run_checked(cmd + ["true"], timeout=120)
    return time.perf_counter() - t0


def runs(fn, n, count):
    return [fn(n) for _ in range(count)]


def line(name, samples):
    print("  %-28s min %7.3f s   median %7.3f s   (%s)"
          % (name, min(samples), benchlib.median(samples), ", ".join("%.3f" % s for s in samples)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    n = a.engines

    floor = benchlib.measure("mpirun floor", runs, floor_once, n, a.runs)
    ipmpi = benchlib.measure("ipmpi start-up", runs, ipmpi_once, n, a.runs)
    peer = benchlib.measure("ipyparallel start-up", runs, ipyparallel_once, n, a.runs)

    print("start-up until %d engines answer, %d runs each" % (n, a.runs))
    if ipmpi:
        line("ipmpi (Cluster.start+get_ids)", ipmpi)
    if peer:
        line("ipyparallel 7.1 (tuned)", peer)
    if floor:
        line("floor: mpirun -n %d true" % (n + 1), floor)
    if ipmpi and peer:
        print("  ratio ipyparallel/ipmpi (median): %s" % benchlib.fmt_ratio(benchlib.median(peer),
                                                                           benchlib.median(ipmpi)))
    if ipmpi:
        print("  target ipmpi < 1 s (median): %s" % ("met" if benchlib.median(ipmpi) < 1.0 else "NOT met"))
    if ipmpi and floor:
        print("  ipmpi/floor (median): %s" % benchlib.fmt_ratio(benchlib.median(ipmpi), benchlib.median(floor)))
    return benchlib.finish()


if __name__ == "__main__":
    sys.exit(main())
