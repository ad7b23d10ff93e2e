#!/usr/bin/python3
"""ipmpi at N engines on this machine (issue 11's goals), next to
ipyparallel 7.1 at the N it reaches, in the same run, and a model that
projects the measured costs to 1,024 and 16,384 engines (scale_model.py).

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
  ctl CPU/long req  the same for execute('import time; time.sleep(0.05)')
               on every engine (5 requests), with its median wall time: the
               controller's CPU while the engines work is its waiting (it
               polls --busy-spin-us after the last event, then sleeps on its
               bell until an engine rings it)
  push 32 KB, 2 MB, 64 MB  push of a numpy array of that size to every
               engine: median of 5 (64 MB: of 3, and only when N * 64 MiB * 3
               fits in MemAvailable; otherwise the row says what it needs)
  shared 64 MB push(..., shared=True) of a 64 MB array: seconds, and the
               PSS of the segment over all engines (one node: 64 MiB is one
               copy per node)
ipyparallel: the same execute-all and pushes through a DirectView and its
BroadcastView (its best for pushes to many engines), at the Ns of
--ipp-engines (default 16,64) that are measured; a start that takes longer
than --ipp-timeout is a failed measurement.
Then the model (scale_model.py): the controller's CPU per request fitted
as a + b*N over the Ns measured, execute-all per engine at the largest N,
and an on-node MPI ping-pong (mpirun -n 2, before the clusters), projected to --project engines
over nodes of --cores-per-node cores, flat and through a per-node tree.

Goals (issue 11, at 256 on this machine): ready within 1.25x of bare
mpirun (bench_startup.py), idle <= 5%, execute on all < 50 ms, 2 MB to
all < 0.2 s, shared 64 MB = 64 MiB per node.

Usage: bench_scale.py [--engines 16,64] [--requests 50] [--idle 5] [--ipp-engines 16,64]
       [--ipp-timeout 120] [--no-ipyparallel] [--ipmpi-args ARGS] [model options: scale_model.py]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed.
"""
import argparse
import os
import time

import benchlib
import scale_model

MiB = 1 << 20
# (key, bytes, how many pushes the median is of); the 64 MB one only when
# it fits in memory (big_push_room).
PUSHES = (("push32k", 32 * 1024, 5), ("push2", 2 * MiB, 5), ("push64", 64 * MiB, 3))
PUSH_LABELS = {"push32k": "32 KB", "push2": "2 MB", "push64": "64 MB"}
LONG_CODE = "import time; time.sleep(0.05)"
LONG_REQUESTS = 5


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


def big_push_room(n, nbytes):
    """None if n engines can take pushes of nbytes each (the engines' old
    and new copy and the senders' buffers: 3 per engine) within
    MemAvailable now; else why not, in words."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    need = n * nbytes * 3
    if need <= avail:
        return None
    return "not measured: needs %.1f GiB, MemAvailable %.1f GiB" % (need / 2.0 ** 30, avail / 2.0 ** 30)


def median_seconds(fn, repeat):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return benchlib.median(ts)


def time_pushes(n, out, views, clear):
    """Each size of PUSHES through each (key suffix, push function) of
    views into out; a size that does not fit leaves its reason instead.
    clear(): drops the pushed name on the engines after each size."""
    import numpy as np
    for _suffix, push in views:
        push(dict(x=np.ones(1)))    # the engines' first array imports numpy (~0.4 s at 16 here)
    clear()
    for key, nbytes, repeat in PUSHES:
        why = big_push_room(n, nbytes) if nbytes > 2 * MiB else None
        if why:
            out[key + "_why"] = why
            continue
        arr = np.ones(nbytes // 8)
        for suffix, push in views:
            # One push of the size first, timed apart, for every view
            # alike: memory this VM's guest has not used lately costs far
            # more than the bytes (src/pyext/bigbuf.h), so without it the
            # view timed first paid for the others' warm memory (ipmpi
            # 0.4x of a BroadcastView timed after a DirectView, at 64 MB);
            # before it, as much memory as it will take is touched and
            # freed, so every first push meets guest memory alike.
            if nbytes > 2 * MiB:
                benchlib.warm_guest_memory(n * nbytes * 2)
            t = time.perf_counter()
            push(dict(x=arr))
            out[key + suffix + "_first"] = time.perf_counter() - t
            out[key + suffix] = median_seconds(lambda: push(dict(x=arr)), repeat)
            clear()


def ipmpi_at(n, a):
    import numpy as np
    out = {}
    ncpu = os.cpu_count()
    with benchlib.ipmpi_cluster(n, start_timeout=900, engine_args=a.ipmpi_args) as (c, ready):
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
            c0 = cpu_seconds(ctl) if ctl else None
            out["exec_all"] = median_seconds(lambda: mec.execute("pass"), a.requests)
            if ctl:
                out["ctl_cpu"] = (cpu_seconds(ctl) - c0) / a.requests
            mec.execute(LONG_CODE)                  # imports time once
            c0 = cpu_seconds(ctl) if ctl else None
            out["long_wall"] = median_seconds(lambda: mec.execute(LONG_CODE), LONG_REQUESTS)
            if ctl:
                out["long_ctl_cpu"] = (cpu_seconds(ctl) - c0) / LONG_REQUESTS
            time_pushes(n, out, (("", mec.push),), lambda: mec.execute("del x"))
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
    out = {}
    with benchlib.ipyparallel_client(n, timeout=a.ipp_timeout) as (rc, ready):
        out["ready"] = ready
        dv = rc[:]
        dv.block = True
        dv.execute("pass")
        out["exec_all"] = median_seconds(lambda: dv.execute("pass"), a.requests)
        bv = rc.broadcast_view()
        bv.block = True
        time_pushes(n, out, (("", dv.push), ("_bcast", bv.push)), lambda: dv.execute("del x"))
    return out


def ms(v):
    return "n/a" if v is None else "%.1f ms" % (v * 1e3)


def print_pushes(r, p):
    for key, _nbytes, _repeat in PUSHES:
        label = PUSH_LABELS[key]
        if key not in r:
            print("  ipmpi  push %s to all: %s" % (label, r.get(key + "_why", "n/a")))
            continue
        peer = p.get(key + "_why") or "DirectView %s = %s, BroadcastView %s = %s" % (
            ms(p.get(key)), benchlib.fmt_ratio(p.get(key), r[key]),
            ms(p.get(key + "_bcast")), benchlib.fmt_ratio(p.get(key + "_bcast"), r[key]))
        print("  ipmpi  push %s to all: %s%s" % (label, ms(r[key]), " (ipyparallel %s)" % peer if p else ""))
        first = "         its first push: ipmpi %s" % ms(r.get(key + "_first"))
        if p and key in p:
            first += ", ipyparallel DirectView %s, BroadcastView %s" % (ms(p.get(key + "_first")),
                                                                       ms(p.get(key + "_bcast_first")))
        print(first + (" (after as much memory was touched: time_pushes)" if key == "push64" else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="16,64")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--ipp-engines", default="16,64", help="the Ns at which ipyparallel is measured too")
    ap.add_argument("--ipp-timeout", type=float, default=120)
    ap.add_argument("--no-ipyparallel", action="store_true")
    ap.add_argument("--ipmpi-args", default="", help="more options for every ipmpi rank, e.g. '--busy-spin-us off'")
    scale_model.add_model_args(ap)
    a = ap.parse_args()
    ipp_ns = set() if a.no_ipyparallel else {int(x) for x in a.ipp_engines.split(",")}
    # The model's on-node latency, measured first, while none of our
    # clusters runs or winds down.
    l_node = benchlib.measure("on-node MPI ping-pong", scale_model.measure_p2p)
    points = []
    for n in [int(x) for x in a.engines.split(",")]:
        print("== %d engines" % n, flush=True)
        t_n = time.monotonic()
        r = benchlib.measure("ipmpi at %d" % n, ipmpi_at, n, a) or {}
        p = (benchlib.measure("ipyparallel at %d" % n, ipyparallel_at, n, a) or {}) if n in ipp_ns else {}
        if r:
            print("  ipmpi  ready %.2f s | idle busy %.1f%% of the machine | wake-up after %.0f s idle %s"
                  % (r["ready"], r["idle"] * 100, a.idle, ms(r["wake"])))
            peer = " (ipyparallel %s, %s)" % (ms(p.get("exec_all")), benchlib.fmt_ratio(p.get("exec_all"), r["exec_all"]))
            print("  ipmpi  execute('pass') on all: %s%s | controller CPU per request %s"
                  % (ms(r["exec_all"]), peer if p else "", ms(r.get("ctl_cpu"))))
            print("  ipmpi  execute(%r) on all: %s | controller CPU per request %s (%s of the wall time)"
                  % (LONG_CODE, ms(r["long_wall"]), ms(r.get("long_ctl_cpu")),
                     "n/a" if "long_ctl_cpu" not in r else "%.0f%%" % (100 * r["long_ctl_cpu"] / r["long_wall"])))
            print_pushes(r, p)
            print("  ipmpi  shared push 64 MB: %s, segment PSS over all engines %.1f MiB (one copy: 64)"
                  % (ms(r["shared_s"]), r["shared_pss"]))
            if "ctl_cpu" in r:
                points.append((n, r["ctl_cpu"], r["exec_all"]))
        if p:
            print("  ipyparallel ready %.2f s" % p["ready"])
        print("  (%d engines took %.0f s)" % (n, time.monotonic() - t_n), flush=True)
    if points and l_node is not None:
        scale_model.report(points, l_node, a, "measured in this run")
        print("  the same model alone: scale_model.py --p2p-us %.3f --points %s"
              % (l_node * 1e6, ",".join("%d:%.1f:%.3f" % (n, c * 1e6, w * 1e3) for n, c, w in points)))
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
