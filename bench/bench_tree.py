#!/usr/bin/python3
"""Broadcast trees against flat sends (--tree-min), the controller's side:
for each N, clusters of N engines with flat sends and with --tree-min 2
(so every request to all engines goes as a tree), alternating, --rounds
times each, each measuring:

  execute all  execute('pass') on every engine: median of --requests
  ctl CPU/req  the controller's CPU time per such request
               (/proc/PID/schedstat over the --requests requests)
  gathered     (trees) the gathered reply frames the controller received
               per request, and the share of them it forwarded to the
               client whole (its log line at the end): the replies of N
               engines reach it and the client as that many frames
               instead of N

The peer: ipyparallel 7.1's BroadcastView (its tree: the scheduler sends
one message per broadcast) running the same execute('pass') on all, at the
Ns of --ipp-engines where it starts, in the same run. There is no
physical floor to print: a request's least cost is one MPI message per
engine, which both shapes pay.

On a node with fewer cores than engines (this VM: 2) each hop of a tree
waits for its engine's turn on a core, and the controller's CPU time is
mostly its waiting (spinning --busy-spin-us after each event, then its
bell), which grows with the request's duration; --no-spin adds
--busy-spin-us 0 --wait-spin-us 0 to every rank so that it sleeps at once
and its CPU time is closer to its work.

Usage: bench_tree.py [--engines 16,64,128] [--requests 300] [--rounds 2]
       [--no-spin] [--ipp-engines 16] [--ipp-timeout 120]
Environment: the build tree first on PYTHONPATH and PATH (make bench).
Exit status 1 if any measurement failed.
"""
import argparse
import os
import re

import benchlib
from bench_scale import controller_pid, cpu_seconds, median_seconds

GATHER_LINE = re.compile(r"trees: (\d+) gathered reply frames, (\d+) of them forwarded to the client whole")


def controller_log_text(cluster):
    text = ""
    for name in sorted(os.listdir(cluster.log_dir)):
        if name.startswith("ipcontroller-") and name.endswith(".log"):
            with open(os.path.join(cluster.log_dir, name), errors="replace") as f:
                text += f.read()
    return text


def ipmpi_at(n, tree, a):
    args = (("--tree-min", "2") if tree else ()) + (("--busy-spin-us", "0", "--wait-spin-us", "0") if a.no_spin else ())
    out = {}
    with benchlib.ipmpi_cluster(n, start_timeout=900, engine_args=args) as (c, _ready):
        mec = c.client(timeout=300)
        try:
            ctl = controller_pid(c)
            for _ in range(20):
                mec.execute("pass")
            c0 = cpu_seconds(ctl)
            out["exec_all"] = median_seconds(lambda: mec.execute("pass"), a.requests)
            out["ctl_cpu"] = (cpu_seconds(ctl) - c0) / a.requests
        finally:
            mec.close()
        c.stop()
        m = GATHER_LINE.findall(controller_log_text(c))
        if tree:
            if not m:
                raise RuntimeError("the controller logged no gathered replies: no request went as a tree")
            out["gathered"] = int(m[-1][0]) / (a.requests + 20)
            out["whole"] = int(m[-1][1]) / max(int(m[-1][0]), 1)
    return out


def ipyparallel_at(n, a):
    with benchlib.ipyparallel_client(n, timeout=a.ipp_timeout) as (rc, _ready):
        bv = rc.broadcast_view()
        bv.block = True
        bv.execute("pass")
        return {"exec_all": median_seconds(lambda: bv.execute("pass"), a.requests)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="16,64,128")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true")
    ap.add_argument("--ipp-engines", default="16")
    ap.add_argument("--ipp-timeout", type=float, default=120)
    a = ap.parse_args()
    ipp_ns = {int(x) for x in a.ipp_engines.split(",") if x}
    for n in [int(x) for x in a.engines.split(",")]:
        print("== %d engines%s" % (n, " (--no-spin)" if a.no_spin else ""), flush=True)
        rows = {False: [], True: []}
        for _ in range(a.rounds):
            for tree in (False, True):
                r = benchlib.measure("ipmpi %s at %d" % ("tree" if tree else "flat", n), ipmpi_at, n, tree, a)
                if r:
                    rows[tree].append(r)
        p = (benchlib.measure("ipyparallel BroadcastView at %d" % n, ipyparallel_at, n, a) or {}) if n in ipp_ns else {}
        for tree in (False, True):
            for r in rows[tree]:
                line = "  %-4s execute('pass') on all %.2f ms | controller CPU per request %.0f us (%.2f us per engine)" % (
                    "tree" if tree else "flat", r["exec_all"] * 1e3, r["ctl_cpu"] * 1e6, r["ctl_cpu"] * 1e6 / n)
                if tree:
                    line += " | %.1f gathered frames per request, %.0f%% forwarded whole" % (r["gathered"], r["whole"] * 100)
                if p:
                    line += " | ipyparallel BroadcastView %.2f ms (%s)" % (
                        p["exec_all"] * 1e3, benchlib.fmt_ratio(p["exec_all"], r["exec_all"]))
                print(line, flush=True)
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
