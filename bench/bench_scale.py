#!/usr/bin/python3
"""ipmpi at N engines on this machine (issue 11's goals), next to
ipyparallel 7.1 at the N it reaches, in the same run.

For each N (default 16, 64):
  ready        Cluster(n=N).start() until the engines answer (ipcluster mpirun)
  idle busy    share of the machine (all cores) the controller and engines
               use while idle for --idle seconds (/proc/PID/schedstat)
  wake-up      execute('pass') on engine 0 after that idle (the first request
               after a long idle; the doorbell's work)
  execute all  execute('pass') on every engine: median of --requests
  ctl CPU/req  the controller's CPU time per execute-on-all (schedstat over
               the --requests requests, / requests): flat or O(log N) is
               the goal, O(N) is what N point-to-point sends cost
  push 2 MB    push of a 2 MB array to every engine: median of 5
  shared 64 MB push(..., shared=True) of a 64 MB array: seconds, and the
               PSS of the segment over all engines (one node: 64 MiB is one
               copy per node)
ipyparallel: the same execute-all and 2 MB push through a DirectView and
its BroadcastView (its best for pushes to many engines), at the Ns it
starts within --ipp-timeout (ENVIRONMENT.md: 64 did not).

Goals (issue 11, at 256 on this machine): ready within 1.25x of bare
mpirun (bench_startup.py), idle <= 5%, execute on all < 50 ms, 2 MB to
all < 0.2 s, shared 64 MB = 64 MiB per node.

Usage: bench_scale.py [--engines 16,64] [--requests 50] [--idle 5] [--no-ipyparallel]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed.
"""
import argparse
import os
import time

import benchlib

MiB = 1 << 20


def cpu_seconds(pid):
    """CPU time of pid so far, in ns resolution (/proc/PID/schedstat)."""
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0]) / 1e9




def controller_pid(cluster):
    """From the controller's log file name (ipcontroller-PID.log)."""
    import re
    for name in os.listdir(cluster.log_dir):
        m = re.match(r"ipcontroller-(\d+)\.log$", name)
        if m:
            return int(m.group(1))
    return None


def ipmpi_at(n, a):
    import numpy as np
    out = {}
    ncpu = os.cpu_count()
    with benchlib.ipmpi_cluster(n, start_timeout=900) as (c, ready):
        out["ready"] = ready
        mec = c.client(timeout=300)
        try:
            pids = [d["pid"] for d in mec.engine_info()]
            ctl = controller_pid(c)
            ranks = pids + ([ctl] if ctl else [])
            mec.execute("pass")
            t0 = time.monotonic()
            before = sum(cpu_seconds(p) for p in ranks)
            time.sleep(a.idle)
            used = sum(cpu_seconds(p) for p in ranks) - before
            out["idle"] = used / ((time.monotonic() - t0) * ncpu)
            t = time.perf_counter()
            mec.execute("pass", targets=0)
            out["wake"] = time.perf_counter() - t
            lat = []
            c0 = cpu_seconds(ctl) if ctl else None
            for _ in range(a.requests):
                t = time.perf_counter()
                mec.execute("pass")
                lat.append(time.perf_counter() - t)
            if ctl:
                out["ctl_cpu"] = (cpu_seconds(ctl) - c0) / a.requests
            out["exec_all"] = benchlib.median(lat)
            arr = np.ones(2 * MiB // 8)
            ps = []
            for _ in range(5):
                t = time.perf_counter()
                mec.push(dict(x=arr))
                ps.append(time.perf_counter() - t)
            out["push2"] = benchlib.median(ps)
            mec.execute("del x")
            big = np.ones(64 * MiB // 8)
            t = time.perf_counter()
            mec.push(dict(big=big), shared=True)
            out["shared_s"] = time.perf_counter() - t
            mec.execute("s = float(big.sum())")   # every engine touches every page
            from ipmpi.shared import segment_pss_kb
            out["shared_pss"] = sum(segment_pss_kb(p) for p in pids) / 1024.0
            mec.execute("del big")
        finally:
            mec.close()
    return out


def ipyparallel_at(n, a):
    import numpy as np
    out = {}
    with benchlib.ipyparallel_client(n, timeout=a.ipp_timeout) as (rc, ready):
        out["ready"] = ready
        dv = rc[:]
        dv.block = True
        dv.execute("pass")
        lat = []
        for _ in range(a.requests):
            t = time.perf_counter()
            dv.execute("pass")
            lat.append(time.perf_counter() - t)
        out["exec_all"] = benchlib.median(lat)
        arr = np.ones(2 * MiB // 8)
        for name, view in (("push2", dv), ("push2_bcast", rc.broadcast_view())):
            view.block = True
            ps = []
            for _ in range(5):
                t = time.perf_counter()
                view.push(dict(x=arr))
                ps.append(time.perf_counter() - t)
            out[name] = benchlib.median(ps)
    return out


def ms(v):
    return "n/a" if v is None else "%.1f ms" % (v * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="16,64")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--ipp-timeout", type=float, default=120)
    ap.add_argument("--no-ipyparallel", action="store_true")
    a = ap.parse_args()
    for n in [int(x) for x in a.engines.split(",")]:
        print("== %d engines" % n, flush=True)
        r = benchlib.measure("ipmpi at %d" % n, ipmpi_at, n, a) or {}
        p = {} if a.no_ipyparallel else (benchlib.measure("ipyparallel at %d" % n, ipyparallel_at, n, a) or {})
        if r:
            print("  ipmpi  ready %.2f s | idle busy %.1f%% of the machine | wake-up after %.0f s idle %s"
                  % (r["ready"], r["idle"] * 100, a.idle, ms(r["wake"])))
            print("  ipmpi  execute('pass') on all: %s (ipyparallel %s, %s) | controller CPU per request %s"
                  % (ms(r["exec_all"]), ms(p.get("exec_all")), benchlib.fmt_ratio(p.get("exec_all"), r["exec_all"]),
                     ms(r.get("ctl_cpu"))))
            print("  ipmpi  push 2 MB to all: %s (ipyparallel DirectView %s = %s, BroadcastView %s = %s)"
                  % (ms(r["push2"]), ms(p.get("push2")), benchlib.fmt_ratio(p.get("push2"), r["push2"]),
                     ms(p.get("push2_bcast")), benchlib.fmt_ratio(p.get("push2_bcast"), r["push2"])))
            print("  ipmpi  shared push 64 MB: %s, segment PSS over all engines %.1f MiB (one copy: 64)"
                  % (ms(r["shared_s"]), r["shared_pss"]))
        if p:
            print("  ipyparallel ready %.2f s" % p["ready"])
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
