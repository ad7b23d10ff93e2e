#!/usr/bin/python3
"""The controller's instructions per request to all engines, counted by
callgrind: the curve of its own work in N without the 2-core VM's noise.

CPU time per request (bench_tree.py, bench_ab.py) moves by up to 1.4x
between runs at 256 engines on this machine, and grows with N also because
hundreds of engine processes take the caches between the controller's
turns. Instructions do neither: the same build, request and N give the
same count within a few per cent. This runs the controller (rank 0) under
`valgrind --tool=callgrind` with instrumentation off, warms up with
--warmup requests, turns it on for --requests `execute('pass')` on all
(trees, the controller never spinning: `--tree-min 2 --busy-spin-us 0
--wait-spin-us 0`), and prints per request:

  loop         instructions of the controller's loop thread (everything
               under ipmpi_controller_run: TLS, MPI, our code)
  table        of them, the PMIx process table queries: valgrind 3.19
               does not know pidfd_open, so under it the controller polls
               the table every 250 ms as for engines it cannot watch; a
               real run watches them by pidfd and asks every 10 s. Left
               out of `work`.
  work         loop - table: the controller's own work per request
  total        every thread of the process (PMIx's and Open MPI's
               progress threads included)

then the fit work = a + c*N over the Ns measured and, at the largest N,
our functions whose inclusive count grows most with N (instructions per
engine per request against the smallest N). With two executables (--b)
both run at each N, one after the other.

Usage: bench_ctl_instr.py [--engines 16,64,256] [--requests 200]
       [--warmup 100] [--a IPMPI] [--b IPMPI] [--top 12]
Needs: Debian package valgrind. Environment: the build tree first on
PYTHONPATH and PATH (make bench BENCH=ctl_instr). Exit status 1 if any
measurement failed. About 5 minutes at 16, 64 and 256 engines.
"""
import argparse
import os
import re
import shutil
import subprocess
import time

import benchlib
import scale_model
from bench_scale import controller_pid

ENGINE_ARGS = ("--tree-min", "2", "--busy-spin-us", "0", "--wait-spin-us", "0")
OWN = re.compile(r"/src/[^ ]*\.[ch]:([A-Za-z_0-9.]+)")


def wrapper(workdir, binary):
    """A script mpirun starts instead of ipmpi: rank 0 under callgrind."""
    path = os.path.join(workdir, "ipmpi-under-callgrind")
    out = os.path.join(workdir, "callgrind.%p.out")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                "if [ \"$OMPI_COMM_WORLD_RANK\" = 0 ]; then\n"
                "  exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=%s %s \"$@\"\n"
                "fi\n"
                "exec %s \"$@\"\n" % (out, binary, binary))
    os.chmod(path, 0o755)
    return path


def inclusive(path):
    """{function: inclusive instructions} of our functions, and the totals."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no", path], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    fns, total = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) ", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in line:
            total = n
            continue
        f = OWN.search(line)
        if f and f.group(1) not in fns:
            fns[f.group(1)] = n
    if total is None or "ipmpi_controller_run" not in fns:
        raise RuntimeError("callgrind_annotate of %s: no totals or no ipmpi_controller_run" % path)
    return fns, total


def one_cluster(n, binary, a):
    with benchlib.tmpdir("ipmpi-cg-") as w:
        with benchlib.ipmpi_cluster(n, start_timeout=1500, engine_args=ENGINE_ARGS,
                                    ipmpi_bin=wrapper(w, binary)) as (c, _ready):
            mec = c.client(timeout=600)
            try:
                for _ in range(a.warmup):
                    mec.execute("pass")
                pid = controller_pid(c)
                subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, timeout=60,
                               capture_output=True)
                t0 = time.perf_counter()
                for _ in range(a.requests):
                    mec.execute("pass")
                wall = (time.perf_counter() - t0) / a.requests
                subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, timeout=60,
                               capture_output=True)
                subprocess.run(["callgrind_control", "-d", "measured", str(pid)], check=True, timeout=120,
                               capture_output=True)
            finally:
                mec.close()
        dumps = [f for f in os.listdir(w) if re.match(r"callgrind\.\d+\.out\.1$", f)]
        if len(dumps) != 1:
            raise RuntimeError("expected one callgrind dump in %s, found %s" % (w, os.listdir(w)))
        fns, total = inclusive(os.path.join(w, dumps[0]))
    r = a.requests
    loop = fns["ipmpi_controller_run"] / r
    table = fns.get("ipmpi_ctl_watch_poll", 0) / r
    return {"loop": loop, "table": table, "work": loop - table, "total": total / r, "wall": wall,
            "fns": {k: v / r for k, v in fns.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="16,64,256")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--a", default=os.environ.get("IPMPI_BIN"))
    ap.add_argument("--b")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            print("FAILED: %s is not installed (Debian package valgrind)" % tool)
            return 1
    ns = [int(x) for x in a.engines.split(",")]
    bins = [("A", a.a)] + ([("B", a.b)] if a.b else [])
    got = {label: {} for label, _ in bins}
    for n in ns:
        for label, binary in bins:
            r = benchlib.measure("%s at %d engines" % (label, n), one_cluster, n, os.path.abspath(binary), a)
            if r:
                got[label][n] = r
                print("%d engines, %s: instructions per execute('pass') on all: work %.0f (loop %.0f, table "
                      "queries %.0f), all threads %.0f; wall %.2f ms under callgrind" % (
                          n, label, r["work"], r["loop"], r["table"], r["total"], r["wall"] * 1e3), flush=True)
    for label, binary in bins:
        pts = sorted(got[label].items())
        print("%s = %s" % (label, binary))
        if len(pts) >= 2:
            fa, fc, how = scale_model.fit_line([n for n, _ in pts], [r["work"] for _, r in pts])
            print("  fit of work per request: %.0f + %.0f * N instructions (%s)" % (fa, fc, how))
            lo, hi = pts[0], pts[-1]
            grow = sorted(((hi[1]["fns"].get(f, 0) - lo[1]["fns"].get(f, 0)) / (hi[0] - lo[0]), f)
                          for f in hi[1]["fns"])
            print("  growth per engine from %d to %d engines, inclusive, our functions:" % (lo[0], hi[0]))
            for per, f in reversed(grow[-a.top:]):
                print("    %8.0f  %s" % (per, f))
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
