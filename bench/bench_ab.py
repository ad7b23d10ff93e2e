#!/usr/bin/python3
"""Two ipmpi executables against each other on one measurement, for a
change's before and after: for each N, clusters of N engines with each
executable in turn, --rounds times (interleaved, so a drift of the
machine falls on both), each measuring after a warm-up of --warmup
requests:

  ctl CPU/req  the controller's CPU time per execute('pass') on all
               (/proc/PID/schedstat over --requests requests)
  execute all  the median wall time of those requests

Both run the build tree's Python package (PYTHONPATH), so a change to the
engine's or the client's Python is in both. The machine's run-to-run
spread is the figure to beat: run the same executable as A and B once to
see it (on the 2-core test VM, 1.4x at 256 engines).

Usage: bench_ab.py A_IPMPI B_IPMPI [--engines 64,256] [--rounds 2]
       [--requests 300] [--warmup 600] [--engine-args "--tree-min 2
       --busy-spin-us 0 --wait-spin-us 0"]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed.
"""
import argparse
import shlex
import time

import benchlib
from bench_scale import controller_pid, cpu_seconds


def one_cluster(n, binary, a):
    with benchlib.ipmpi_cluster(n, start_timeout=900, engine_args=tuple(shlex.split(a.engine_args)),
                                ipmpi_bin=binary) as (c, _ready):
        mec = c.client(timeout=300)
        try:
            for _ in range(a.warmup):
                mec.execute("pass")
            ctl = controller_pid(c)
            c0, times = cpu_seconds(ctl), []
            for _ in range(a.requests):
                t = time.perf_counter()
                mec.execute("pass")
                times.append(time.perf_counter() - t)
            cpu = (cpu_seconds(ctl) - c0) / a.requests
        finally:
            mec.close()
    times.sort()
    return {"cpu": cpu, "median": times[len(times) // 2]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--engines", default="64,256")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=600)
    ap.add_argument("--engine-args", default="--tree-min 2 --busy-spin-us 0 --wait-spin-us 0")
    a = ap.parse_args()
    for n in [int(x) for x in a.engines.split(",")]:
        got = {"A": [], "B": []}
        for rnd in range(a.rounds):
            for label, binary in (("A", a.a), ("B", a.b)):
                r = benchlib.measure("%s at %d engines, round %d" % (label, n, rnd), one_cluster, n, binary, a)
                if r:
                    got[label].append(r)
                    print("  %d engines, round %d, %s: controller CPU per request %.0f us, execute('pass') on all "
                          "median %.2f ms" % (n, rnd, label, r["cpu"] * 1e6, r["median"] * 1e3), flush=True)
        for label in ("A", "B"):
            if got[label]:
                print("%d engines, %s (%s): controller CPU per request %s us" % (
                    n, label, a.a if label == "A" else a.b,
                    ", ".join("%.0f" % (r["cpu"] * 1e6) for r in got[label])), flush=True)
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
