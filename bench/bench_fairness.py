#!/usr/bin/python3
"""Fair service under load: the round trip of a small request from one
client while another client pushes 256 MiB arrays without pause (issue 13
part 5). The controller copies a push out of the pusher's memory 1 MiB per
loop turn, so the small request waits at most one step.

Prints p50/p99/p99.9/max of `execute('pass')` to engine 1 with the machine
otherwise idle, then while client 2 pushes 256 MiB arrays to engine 0, and
the push rate meanwhile. No peer: ipyparallel has no same-host copy path
to compare (its pushes go through ZMQ and its single hub).

Usage: bench_fairness.py [--seconds 4]
"""
import argparse
import os
import sys
import threading
import time

import benchlib


def pct(samples, q):
    return benchlib.percentile(samples, q) * 1e3


def run(seconds):
    import numpy as np
    with benchlib.ipmpi_cluster(2) as (c, _):
        big, small = c.client(timeout=300), c.client(timeout=300)
        try:
            a = np.ones((256 << 20) // 8)
            small.execute("pass", targets=1)
            # One untimed push first: the engine's first one also imports
            # numpy and gets fresh memory, and took longer than the whole
            # loaded window on a busy machine (0 pushes measured).
            big.push({"a": a}, targets=0)
            idle = []
            for _ in range(500):
                t0 = time.perf_counter()
                small.execute("pass", targets=1)
                idle.append(time.perf_counter() - t0)
            stop, pushes = threading.Event(), [0]

            def pusher():
                while not stop.is_set():
                    big.push({"a": a}, targets=0)
                    pushes[0] += 1
            th = threading.Thread(target=pusher)
            th.start()
            time.sleep(0.5)
            loaded, t_start = [], time.perf_counter()
            n0 = pushes[0]
            while time.perf_counter() - t_start < seconds:
                t0 = time.perf_counter()
                small.execute("pass", targets=1)
                loaded.append(time.perf_counter() - t0)
            elapsed, n = time.perf_counter() - t_start, pushes[0] - n0
            stop.set()
            th.join(120)
            return big.shm_path, idle, loaded, n * 256 / elapsed, n
        finally:
            big.close()
            small.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    r = benchlib.measure("small requests while 256 MiB pushes run", run, a.seconds)
    print("small request round trip while another client pushes 256 MiB arrays, loopback, %d cores"
          % os.cpu_count())
    if r:
        path, idle, loaded, rate, n = r
        print("  pusher's path: %s; pushes meanwhile %.0f MiB/s (%d pushes of 256 MiB)" % (path, rate, n))
        print("  idle:    p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  max %6.2f ms  (%d requests)"
              % (pct(idle, 50), pct(idle, 99), pct(idle, 99.9), max(idle) * 1e3, len(idle)))
        print("  loaded:  p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  max %6.2f ms  (%d requests)"
              % (pct(loaded, 50), pct(loaded, 99), pct(loaded, 99.9), max(loaded) * 1e3, len(loaded)))
        print("  target: p99 within a few milliseconds: %s" % ("met" if pct(loaded, 99) < 5 else "NOT met"))
    return benchlib.finish()


if __name__ == "__main__":
    sys.exit(main())
