#!/usr/bin/python3
"""Task throughput and load balance: ipmpi's TaskClient vs ipyparallel 7.1 and mpi4py.futures.

Three figures, each peer measured in the same run, one after the other:

(a) --tasks (2000) small tasks (`lambda x: x + 1`) submitted without
    blocking, then collected, on ONE engine, tasks/s:
    ipmpi `tc.run(client.MapTask(f, args=(i,)))` then
    `tc.get_task_result(tid, block=True)`; ipyparallel
    `load_balanced_view().apply_async(f, i)` then `.get()`, under
    `--TaskScheduler.hwm=0` and under `--TaskScheduler.scheme_name=pure`
    (the better one is its figure); mpi4py.futures
    `MPIPoolExecutor(max_workers=1).submit(f, i)` then `.result()`.
    Targets: ipmpi >= 50x ipyparallel and >= 5x mpi4py.futures.
(b) `tc.map(f, range(--map-len))` (100,000 items, same f) on --engines (4)
    engines, items/s, against ipyparallel's
    `load_balanced_view().map_sync(f, seq, chunksize=c)` and mpi4py.futures'
    `executor.map(f, seq, chunksize=c)` with 4 workers, each at its best
    chunk size of --chunksizes (default len/100, len/20, len/(2*engines),
    len/engines), all printed; reference: `list(map(f, seq))` in this
    process (the work itself, without distribution).
(c) makespan of --makespan-tasks (200) tasks sleeping uniform 5-50 ms
    (random.Random(--seed)) on 4 engines, from the first submission to the
    last result, against the ideal max(sum/4, longest). Target: ipmpi
    within 10% of it. The peers are measured too (ipyparallel at hwm=0 and
    at its default hwm=1, the better one counted).

Every figure is the best of --repeat runs after a warm-up task, and every
result is checked. ipmpi and ipyparallel run on clusters this script starts
(benchlib); mpi4py.futures runs in a child `mpirun -n 1 --oversubscribe
python3 SCRIPT` whose MPIPoolExecutor spawns its workers (MPI_Comm_spawn;
`python3 -m mpi4py.futures` with the workers in the same job measured the
same within noise on this machine). Each peer's session is bounded by
--timeout seconds and every process it started is ended whatever happens.

Usage: bench_tasks.py [--tasks 2000] [--map-len 100000] [--makespan-tasks 200]
                      [--engines 4] [--repeat 3] [--seed 1] [--chunksizes 1000,5000,...]
                      [--timeout 300]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed (a missing peer package included).
"""
import argparse
import contextlib
import heapq
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import benchlib


# The task of (a) and (b), as a user types it. cloudpickle sends it by
# value (it lives in __main__) to ipmpi and ipyparallel; mpi4py.futures,
# whose pickle cannot send a lambda, gets the same body as a def (SCRIPT).
SMALL = lambda x: x + 1  # noqa: E731


def sleeper(d):
    import time
    time.sleep(d)
    return d


# Debian packages of peers that could not be imported; printed at the end.
missing = set()


def peer_missing(package, what, err):
    missing.add(package)
    return RuntimeError("peer package missing: Debian package %s (%s: %s)" % (package, what, err))


class MeasurementTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds, what):
    """Raises MeasurementTimeout in this (main) thread after seconds.

    A backstop for waits that have no timeout of their own; ipmpi's client
    checks for signals while it waits, so the alarm interrupts it."""
    def on_alarm(signum, frame):
        raise MeasurementTimeout("%s took more than %g s" % (what, seconds))
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def best_of(repeat, fn, setup=None):
    """Smallest of repeat timed calls of fn (seconds). fn may return a
    check, called after the clock stopped; setup runs before each untimed."""
    best = None
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        check = fn()
        dt = time.perf_counter() - t0
        if check is not None:
            check()  # after the clock stopped
        best = dt if best is None or dt < best else best
    return best


def expect_list(got, want, what):
    got = list(got)
    if got != want:
        bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        raise RuntimeError("%s: wrong results (length %d, want %d; first difference at %d)"
                           % (what, len(got), len(want), bad))


def durations(a):
    rng = random.Random(a.seed)
    return [rng.uniform(0.005, 0.050) for _ in range(a.makespan_tasks)]


def ideal_makespan(ds, engines):
    return max(sum(ds) / engines, max(ds))


def greedy_makespan(ds, engines):
    """Makespan of handing each task, in submission order, to the first
    engine free, at no cost: what a perfect dynamic scheduler achieves."""
    free = [0.0] * engines
    for d in ds:
        t = heapq.heappop(free)
        heapq.heappush(free, t + d)
    return max(free)


# -- ipmpi ----------------------------------------------------------------

def ipmpi_session(n, a, fn, with_cluster=False):
    """Runs fn(client, tc) on a new n-engine ipmpi cluster (client: the
    ipmpi.client module, tc: a TaskClient), bounded by --timeout; with
    with_cluster, fn(client, tc, cluster)."""
    from ipmpi import client
    with benchlib.ipmpi_cluster(n) as (c, _):
        tc = client.TaskClient(furl_file=c.tc_furl, timeout=a.timeout)
        try:
            with deadline(a.timeout, "ipmpi on %d engine(s)" % n):
                return fn(client, tc, c) if with_cluster else fn(client, tc)
        finally:
            with contextlib.suppress(Exception):
                tc.close()


def tc_clear(tc):
    # Results stay in the controller until cleared; each run starts empty.
    clear = getattr(tc, "clear", None)
    if clear is not None:
        clear()


def ipmpi_tasks(a):
    def run(client, tc):
        f = SMALL
        if tc.run(client.MapTask(f, args=(0,)), block=True) != 1:
            raise RuntimeError("ipmpi: warm-up task gave a wrong result")
        want = [i + 1 for i in range(a.tasks)]

        def once():
            tids = [tc.run(client.MapTask(f, args=(i,))) for i in range(a.tasks)]
            got = [tc.get_task_result(t, block=True) for t in tids]
            return lambda: expect_list(got, want, "ipmpi tasks")
        return best_of(a.repeat, once, lambda: tc_clear(tc))
    return ipmpi_session(1, a, run)


def _cpu_s(pid):
    """CPU seconds of process pid so far, all its threads (schedstat: ns,
    where /proc/PID/stat counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _rank_pids(mpirun_pid):
    """{MPI rank: pid} of the job under mpirun_pid (from each process's
    OMPI_COMM_WORLD_RANK)."""
    out = {}
    for pid in benchlib._descendants(mpirun_pid):
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(kv.split(b"=", 1)[1])] = pid
    return out


def ipmpi_cpu_split(a):
    """Where the time of (a) goes: CPU microseconds per task of this client
    process, the controller (rank 0) and the engine (rank 1), and the wall
    time per task, over one run of a.tasks tasks."""
    def run(client, tc, cluster):
        f = SMALL
        tc.run(client.MapTask(f, args=(0,)), block=True)
        ranks = _rank_pids(cluster.pid)
        if 0 not in ranks or 1 not in ranks:
            raise RuntimeError("cannot find the ranks of the ipmpi job under mpirun %d" % cluster.pid)
        before = {r: _cpu_s(p) for r, p in ranks.items()}
        me, t0 = _cpu_s(os.getpid()), time.perf_counter()
        tids = [tc.run(client.MapTask(f, args=(i,))) for i in range(a.tasks)]
        got = [tc.get_task_result(t, block=True) for t in tids]
        wall, me = time.perf_counter() - t0, _cpu_s(os.getpid()) - me
        expect_list(got, [i + 1 for i in range(a.tasks)], "ipmpi tasks")
        us = lambda s: 1e6 * s / a.tasks
        return {"client": us(me), "controller": us(_cpu_s(ranks[0]) - before[0]),
                "engine": us(_cpu_s(ranks[1]) - before[1]), "wall": us(wall)}
    return ipmpi_session(1, a, run, with_cluster=True)


def ipmpi_many(a):
    """(map seconds, makespan seconds) on a.engines engines."""
    ds = durations(a)
    seq = range(a.map_len)
    want = [i + 1 for i in seq]

    def run(client, tc):
        f = SMALL
        expect_list(tc.map(f, range(100)), [i + 1 for i in range(100)], "ipmpi warm-up map")

        def map_once():
            got = tc.map(f, seq)
            return lambda: expect_list(got, want, "ipmpi map")
        t_map = best_of(a.repeat, map_once, lambda: tc_clear(tc))

        def makespan_once():
            tids = [tc.run(client.MapTask(sleeper, args=(d,))) for d in ds]
            got = [tc.get_task_result(t, block=True) for t in tids]
            return lambda: expect_list(got, ds, "ipmpi makespan tasks")
        tc.run(client.MapTask(sleeper, args=(0.0,)), block=True)
        return t_map, best_of(a.repeat, makespan_once, lambda: tc_clear(tc))
    return ipmpi_session(a.engines, a, run)


# -- ipyparallel ----------------------------------------------------------

def import_ipyparallel():
    try:
        import ipyparallel
    except ImportError as e:
        raise peer_missing("python3-ipyparallel", "import ipyparallel failed", e) from None
    return ipyparallel


@contextlib.contextmanager
def ipp_client(n, extra_controller_args, timeout):
    """A client of a local ipyparallel cluster of n engines at benchlib's
    best settings plus extra_controller_args; stopped whatever happens."""
    import_ipyparallel()
    with benchlib.ipyparallel_client(n, timeout, extra_controller_args) as (rc, _ready):
        yield rc


IPP_SETTINGS_ONE = [("hwm=0", ["--TaskScheduler.hwm=0"]),
                    ("scheme pure", ["--TaskScheduler.scheme_name=pure"])]
IPP_SETTINGS_MANY = [("hwm=0", ["--TaskScheduler.hwm=0"]),
                     ("hwm=1 (default)", [])]


def ipp_tasks(a, extra):
    with ipp_client(1, extra, a.timeout) as rc, deadline(a.timeout, "ipyparallel tasks"):
        v = rc.load_balanced_view()
        f = SMALL
        if v.apply_async(f, 0).get(timeout=a.timeout) != 1:
            raise RuntimeError("ipyparallel: warm-up task gave a wrong result")
        want = [i + 1 for i in range(a.tasks)]

        def once():
            ars = [v.apply_async(f, i) for i in range(a.tasks)]
            got = [r.get(timeout=a.timeout) for r in ars]
            return lambda: expect_list(got, want, "ipyparallel tasks")
        return best_of(a.repeat, once)


def ipp_many(a, extra):
    """({chunksize: map seconds}, makespan seconds)."""
    ds = durations(a)
    seq = range(a.map_len)
    want = [i + 1 for i in seq]
    with ipp_client(a.engines, extra, a.timeout) as rc, deadline(a.timeout, "ipyparallel map/makespan"):
        v = rc.load_balanced_view()
        f = SMALL
        expect_list(v.map_sync(f, range(100)), [i + 1 for i in range(100)], "ipyparallel warm-up map")
        maps = {}
        for cs in a.chunksizes:
            def map_once():
                got = v.map_sync(f, seq, chunksize=cs)
                return lambda: expect_list(got, want, "ipyparallel map")
            maps[cs] = best_of(a.repeat, map_once)
        v.apply_async(sleeper, 0.0).get(timeout=a.timeout)

        def makespan_once():
            ars = [v.apply_async(sleeper, d) for d in ds]
            got = [r.get(timeout=a.timeout) for r in ars]
            return lambda: expect_list(got, ds, "ipyparallel makespan tasks")
        return maps, best_of(a.repeat, makespan_once)


# -- mpi4py.futures -------------------------------------------------------

# Runs under `mpirun -n 1`; the executor spawns its workers, which import
# this file as their main module (so small and sleeper are found by name).
# Its argument is a JSON file of what to measure; prints one line
# "RESULT {json}".
SCRIPT = r'''
import json, sys, time
from mpi4py.futures import MPIPoolExecutor


def small(x):
    return x + 1


def sleeper(d):
    time.sleep(d)
    return d


def best_of(repeat, fn):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        check = fn()
        dt = time.perf_counter() - t0
        check()
        best = dt if best is None or dt < best else best
    return best


def expect(got, want, what):
    if list(got) != want:
        raise SystemExit("mpi4py.futures %s: wrong results" % what)


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    to = cfg["timeout"]
    out = {}
    with MPIPoolExecutor(max_workers=cfg["workers"]) as ex:
        expect([ex.submit(small, 0).result(timeout=to)], [1], "warm-up")   # spawns the workers
        if "tasks" in cfg:
            n = cfg["tasks"]
            want = [i + 1 for i in range(n)]

            def once():
                fs = [ex.submit(small, i) for i in range(n)]
                got = [f.result(timeout=to) for f in fs]
                return lambda: expect(got, want, "tasks")
            out["tasks"] = best_of(cfg["repeat"], once)
        if "map_len" in cfg:
            seq = range(cfg["map_len"])
            want = [i + 1 for i in seq]
            expect(ex.map(small, range(100), timeout=to), [i + 1 for i in range(100)], "warm-up map")
            out["map"] = {}
            for cs in cfg["chunksizes"]:
                def once():
                    got = list(ex.map(small, seq, chunksize=cs, timeout=to))
                    return lambda: expect(got, want, "map")
                out["map"][str(cs)] = best_of(cfg["repeat"], once)
        if "durations" in cfg:
            ds = cfg["durations"]
            ex.submit(sleeper, 0.0).result(timeout=to)

            def once():
                fs = [ex.submit(sleeper, d) for d in ds]
                got = [f.result(timeout=to) for f in fs]
                return lambda: expect(got, ds, "makespan tasks")
            out["makespan"] = best_of(cfg["repeat"], once)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
'''


def mpi4py_version():
    try:
        import mpi4py
    except ImportError as e:
        raise peer_missing("python3-mpi4py", "import mpi4py failed", e) from None
    # Only looked up: importing mpi4py.futures imports mpi4py.MPI, which
    # would make this process an MPI singleton (with a helper process of
    # its own); mpi4py runs in the child job only.
    if importlib.util.find_spec("mpi4py.futures") is None:
        raise peer_missing("python3-mpi4py", "mpi4py.futures", "not found")
    if shutil.which("mpirun") is None:
        raise peer_missing("openmpi-bin", "mpirun", "not on PATH")
    return mpi4py.__version__


def mpi4py_run(a, cfg):
    """Runs SCRIPT with cfg under mpirun; its RESULT dict. Bounded by
    --timeout; on any failure every process it started is ended."""
    mpi4py_version()
    cfg = dict(cfg, repeat=a.repeat, timeout=a.timeout)
    with benchlib.tmpdir("mpi4py-bench-") as d:
        script = os.path.join(d, "bench_mpi4py_futures.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        cfg_file = os.path.join(d, "cfg.json")
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)
        cmd = ["mpirun", "-n", "1", "--oversubscribe", sys.executable, script, cfg_file]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=benchlib.ompi_env(), cwd=d)
        try:
            out, _ = p.communicate(timeout=a.timeout)
        finally:
            if p.poll() is None:
                # mpirun and the workers it spawned are the only processes
                # this script has running now (peers run one at a time).
                benchlib.kill_descendants()
                p.wait()
        text = out.decode(errors="replace")
        if p.returncode != 0:
            raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, text[-2000:]))
        for line in text.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError("no RESULT line from the mpi4py.futures run:\n%s" % text[-2000:])


def mpi4py_tasks(a):
    return mpi4py_run(a, dict(workers=1, tasks=a.tasks))["tasks"]


def mpi4py_many(a):
    r = mpi4py_run(a, dict(workers=a.engines, map_len=a.map_len, chunksizes=a.chunksizes,
                           durations=durations(a)))
    return {int(k): v for k, v in r["map"].items()}, r["makespan"]


def local_map(a):
    seq = range(a.map_len)
    want = [i + 1 for i in seq]
    f = SMALL

    def once():
        got = list(map(f, seq))
        return lambda: expect_list(got, want, "local map")
    return best_of(a.repeat, once)


# -- report ---------------------------------------------------------------

def rate(count, seconds):
    return None if seconds is None else count / seconds


def ratio2(num, den):
    return "n/a" if num is None or den is None or den == 0 else "%.2fx" % (num / den)


def best_setting(results):
    """(label, value) of the smallest value among results {label: seconds or None}."""
    ok = [(v, k) for k, v in results.items() if v is not None]
    if not ok:
        return None, None
    v, k = min(ok)
    return k, v


def versions():
    out = []
    with contextlib.suppress(Exception):
        import ipyparallel
        out.append("ipyparallel %s" % ipyparallel.__version__)
    with contextlib.suppress(Exception):
        out.append("mpi4py %s" % mpi4py_version())
    return ", ".join(out) or "peer versions unknown"


def target_line(label, num, den, goal):
    if num is None or den is None:
        return "  %s: n/a" % label
    r = num / den
    return "  %s: %s   target >= %gx: %s" % (label, benchlib.fmt_ratio(num, den), goal,
                                             "met" if r >= goal else "NOT met")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000, help="tasks of (a)")
    ap.add_argument("--map-len", type=int, default=100_000, help="items mapped in (b)")
    ap.add_argument("--makespan-tasks", type=int, default=200, help="sleeping tasks of (c)")
    ap.add_argument("--engines", type=int, default=4, help="engines (workers) of (b) and (c)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each figure; the best counts")
    ap.add_argument("--seed", type=int, default=1, help="seed of (c)'s durations")
    ap.add_argument("--chunksizes", default=None,
                    help="comma-separated chunk sizes tried for the peers' map (default: "
                         "len/100, len/20, len/(2*engines), len/engines)")
    ap.add_argument("--timeout", type=float, default=300, help="bound of each peer's session, seconds")
    a = ap.parse_args()
    if a.chunksizes:
        a.chunksizes = [int(x) for x in a.chunksizes.split(",")]
    else:
        n = a.map_len
        a.chunksizes = sorted({max(1, n // 100), max(1, n // 20), max(1, n // (2 * a.engines)),
                               max(1, n // a.engines)})
    ds = durations(a)
    ideal = ideal_makespan(ds, a.engines)

    # One peer at a time, so none competes with another's processes.
    ip_a = benchlib.measure("ipmpi tasks (1 engine)", ipmpi_tasks, a)
    ip_split = benchlib.measure("ipmpi CPU per task (1 engine)", ipmpi_cpu_split, a)
    ip_bc = benchlib.measure("ipmpi map and makespan (%d engines)" % a.engines, ipmpi_many, a)
    ipp_a = {k: benchlib.measure("ipyparallel tasks (1 engine, %s)" % k, ipp_tasks, a, x)
             for k, x in IPP_SETTINGS_ONE}
    ipp_bc = {k: benchlib.measure("ipyparallel map and makespan (%d engines, %s)" % (a.engines, k),
                                  ipp_many, a, x)
              for k, x in IPP_SETTINGS_MANY}
    mp_a = benchlib.measure("mpi4py.futures tasks (1 worker)", mpi4py_tasks, a)
    mp_bc = benchlib.measure("mpi4py.futures map and makespan (%d workers)" % a.engines, mpi4py_many, a)
    loc = benchlib.measure("local map", local_map, a)

    print("task throughput and load balance, loopback, %d cores; %s; each figure the best of %d runs"
          % (os.cpu_count(), versions(), a.repeat))

    # (a)
    print("(a) %d tasks `lambda x: x + 1`, all submitted without blocking, then collected, on 1 engine"
          % a.tasks)
    ip_rate = rate(a.tasks, ip_a)
    if ip_a is not None:
        print("  ipmpi TaskClient                       %10.0f tasks/s  (%.3f s)" % (ip_rate, ip_a))
    if ip_split is not None:
        print("  ipmpi: where a task's time goes (one run, CPU us per task): client %.1f (Python, TLS), "
              "controller %.1f (TLS, scheduler, MPI), engine %.1f (MPI, Python); wall %.1f us per task on %d cores"
              % (ip_split["client"], ip_split["controller"], ip_split["engine"], ip_split["wall"],
                 os.cpu_count()))
    for k, v in ipp_a.items():
        if v is not None:
            print("  ipyparallel apply_async, %-16s %8.0f tasks/s  (%.3f s)" % (k, rate(a.tasks, v), v))
    ipp_k, ipp_v = best_setting(ipp_a)
    if mp_a is not None:
        print("  mpi4py.futures submit, 1 worker        %10.0f tasks/s  (%.3f s)" % (rate(a.tasks, mp_a), mp_a))
    if ipp_v is not None:
        print(target_line("ratio ipmpi/ipyparallel (%s)" % ipp_k, ip_rate, rate(a.tasks, ipp_v), 50))
    if mp_a is not None:
        print(target_line("ratio ipmpi/mpi4py.futures", ip_rate, rate(a.tasks, mp_a), 5))

    # (b)
    print("(b) map `lambda x: x + 1` over range(%d) on %d engines, items/s" % (a.map_len, a.engines))
    ip_map = ip_bc[0] if ip_bc else None
    if ip_map is not None:
        print("  ipmpi tc.map                           %10.0f items/s  (%.3f s)" % (rate(a.map_len, ip_map), ip_map))
    ipp_map = {}
    for k, r in ipp_bc.items():
        if r is None:
            continue
        print("  ipyparallel map_sync, %s, by chunksize: %s" % (k, ", ".join(
            "%d: %.0f/s" % (cs, rate(a.map_len, t)) for cs, t in sorted(r[0].items()))))
        for cs, t in r[0].items():
            ipp_map["%s, chunksize %d" % (k, cs)] = t
    ippm_k, ippm_v = best_setting(ipp_map)
    if ippm_v is not None:
        print("  ipyparallel map_sync, best (%s)  %10.0f items/s  (%.3f s)"
              % (ippm_k, rate(a.map_len, ippm_v), ippm_v))
    mpm_k = mpm_v = None
    if mp_bc is not None:
        print("  mpi4py.futures executor.map, %d workers, by chunksize: %s" % (a.engines, ", ".join(
            "%d: %.0f/s" % (cs, rate(a.map_len, t)) for cs, t in sorted(mp_bc[0].items()))))
        mpm_k, mpm_v = best_setting(mp_bc[0])
        print("  mpi4py.futures executor.map, best (chunksize %d)  %10.0f items/s  (%.3f s)"
              % (mpm_k, rate(a.map_len, mpm_v), mpm_v))
    if loc is not None:
        print("  reference: list(map(f, seq)) in this process, no distribution  %10.0f items/s  (%.3f s)"
              % (rate(a.map_len, loc), loc))
    print("  ratio ipmpi/ipyparallel (best): %s   ipmpi/mpi4py.futures (best): %s   ipmpi/local: %s"
          % (benchlib.fmt_ratio(rate(a.map_len, ip_map), rate(a.map_len, ippm_v)),
             benchlib.fmt_ratio(rate(a.map_len, ip_map), rate(a.map_len, mpm_v)),
             benchlib.fmt_ratio(rate(a.map_len, ip_map), rate(a.map_len, loc))))

    # (c)
    print("(c) makespan of %d tasks sleeping uniform 5-50 ms (seed %d, %.3f s in all) on %d engines"
          % (len(ds), a.seed, sum(ds), a.engines))
    print("  floor: ideal max(sum/%d, longest)       %8.3f s" % (a.engines, ideal))
    print("  reference: first-free engine in submission order, zero overhead %.3f s   %.3f x ideal"
          % (greedy_makespan(ds, a.engines), greedy_makespan(ds, a.engines) / ideal))
    ip_ms = ip_bc[1] if ip_bc else None
    if ip_ms is not None:
        r = ip_ms / ideal
        print("  ipmpi TaskClient                        %8.3f s   %.3f x ideal   target <= 1.10: %s"
              % (ip_ms, r, "met" if r <= 1.10 else "NOT met"))
    ipp_ms = {k: r[1] for k, r in ipp_bc.items() if r is not None}
    for k, v in ipp_ms.items():
        print("  ipyparallel apply_async, %-16s %6.3f s   %.3f x ideal" % (k, v, v / ideal))
    if mp_bc is not None:
        print("  mpi4py.futures submit, %d workers        %8.3f s   %.3f x ideal" % (a.engines, mp_bc[1], mp_bc[1] / ideal))
    ippms_k, ippms_v = best_setting(ipp_ms)
    print("  ratio of makespans peer/ipmpi: ipyparallel%s %s   mpi4py.futures %s"
          % (" (%s)" % ippms_k if ippms_k else "", ratio2(ippms_v, ip_ms),
             ratio2(mp_bc[1] if mp_bc else None, ip_ms)))
    if missing:
        print("peer packages missing (install them; their figures are not measured): %s"
              % ", ".join(sorted(missing)))
    return benchlib.finish()


if __name__ == "__main__":
    sys.exit(main())
