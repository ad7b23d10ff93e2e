#!/usr/bin/python3
"""Broadcast trees against flat sends (--tree-min), the controller's side:
for each N, clusters of N engines with flat sends and with --tree-min 2
(so every request to all engines goes as a tree), alternating, --rounds
times each, each measuring:

  execute all  execute('pass') on every engine: median of --requests
  ctl CPU/req  the controller's CPU time per such request
               (/proc/PID/schedstat over the --requests requests), in the
               steady state: first enough requests ran to fill the
               controller's share of memory for delivered results
               (--result-memory / 64, 16 MiB), which its heap grows into
               once (page faults) and then reuses
  wake-ups     the controller's voluntary context switches per request
  by section   where that CPU went (the controller's --cpu-sections,
               logged on SIGUSR1 before and after the --requests):
               clients (requests read and routed, replies written; of
               them tree sends), MPI (progress and the engines' frames; of
               them gathered replies), scans (the bell's count, the
               ring-again scan), waiting (ppoll and the yield of spinning)
  gathered     (trees) the gathered reply frames the controller received
               per request, and the share of them it forwarded to the
               client whole: the replies of N engines reach it and the
               client as that many frames instead of N

  client read  the bytes the client read per request (its /proc/self/io):
               with trees, the relays fold replies that agree into runs
               (IPMPI_F_SAME), so this stays flat as N grows

And two controls in the tree cluster, --requests / 2 each, to tell the
controller's work for N engines from what the machine adds:

  16 engines   execute('pass') on engines 0..15 only (a tree of 16): the
               request of the 16-engine cluster, in this one
  contended    that again while the other N-16 engines run a loop of 2 ms
               sleeps, and while they spin: the same work while the
               node's cores (this VM: 2) are shared by N processes, as
               they are while a request to all N runs; the all-engine
               request's CPU beyond these is what its N engines cost the
               controller

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
import signal
import time

import benchlib
import scale_model
from bench_scale import controller_pid, cpu_seconds, median_seconds

GATHER_LINE = re.compile(r"trees: (\d+) gathered reply frames, (\d+) of them forwarded to the client whole")
SECTION_LINE = re.compile(r"CPU by section so far \(ms\): (.*)")
# The controller's memory for delivered results: --result-memory (1 GiB) / 64.
RESULT_SHARE = 16 << 20


def controller_log_text(cluster):
    text = ""
    for name in sorted(os.listdir(cluster.log_dir)):
        if name.startswith("ipcontroller-") and name.endswith(".log"):
            with open(os.path.join(cluster.log_dir, name), errors="replace") as f:
                text += f.read()
    return text


def read_bytes():
    """Bytes this process has read so far (its sockets included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def voluntary_switches(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))


def cpu_sections(cluster, pid, seen):
    """The controller's --cpu-sections totals (ms) logged after a SIGUSR1:
    a dict, once its (seen + 1)-th such line is in the log."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = SECTION_LINE.findall(controller_log_text(cluster))
        if len(lines) > seen:
            f = lines[seen].split()
            return {k: float(v) for k, v in zip(f[::2], f[1::2])}
        time.sleep(0.05)
    raise RuntimeError("the controller logged no CPU sections within 10 s of SIGUSR1")


# At most this many warm-up requests: folded tree replies are a few
# hundred bytes, which would take tens of thousands of requests to fill
# RESULT_SHARE, and grow the heap by a page every several requests anyway.
STEADY_MAX = 600


def steady(mec):
    """Runs execute('pass') on all until the controller's delivered-results
    memory is full (RESULT_SHARE bytes of replies), or STEADY_MAX times;
    returns the client's bytes read per request."""
    for _ in range(20):
        mec.execute("pass")
    b0 = read_bytes()
    for _ in range(20):
        mec.execute("pass")
    per = (read_bytes() - b0) / 20.0
    for _ in range(min(STEADY_MAX, int(RESULT_SHARE / max(per, 1.0)) + 1)):
        mec.execute("pass")
    return per


# The control's request: execute('pass') on this many engines (a tree).
CONTROL_ENGINES = 16


def part_cpu(mec, ctl, repeat):
    part = list(range(CONTROL_ENGINES))
    c0 = cpu_seconds(ctl)
    for _ in range(repeat):
        mec.execute("pass", targets=part)
    return (cpu_seconds(ctl) - c0) / repeat


def controls(mec, ctl, n, a):
    """The request of a CONTROL_ENGINES-engine cluster, in this one: quiet,
    and while the other engines sleep 2 ms in a loop."""
    out = {}
    for _ in range(20):
        mec.execute("pass", targets=list(range(CONTROL_ENGINES)))
    reps = max(a.requests // 2, 10)
    out["part_quiet"] = part_cpu(mec, ctl, reps)
    if n > CONTROL_ENGINES:
        others = list(range(CONTROL_ENGINES, n))
        for key, loop in (("part_contended", "time.sleep(0.002)"), ("part_saturated", "pass")):
            mec.execute("import time\n_t = time.time()\nwhile time.time() - _t < 600: " + loop,
                        targets=others, block=False)
            time.sleep(1.0)
            try:
                out[key] = part_cpu(mec, ctl, reps)
            finally:
                mec.interrupt(others)
            time.sleep(0.5)
    return out


def ipmpi_at(n, tree, a):
    args = (("--tree-min", "2") if tree else ()) + (("--busy-spin-us", "0", "--wait-spin-us", "0") if a.no_spin else ())
    args += ("--cpu-sections",)
    out = {}
    with benchlib.ipmpi_cluster(n, start_timeout=900, engine_args=args) as (c, _ready):
        mec = c.client(timeout=300)
        try:
            ctl = controller_pid(c)
            out["bytes"] = steady(mec)
            s0 = cpu_sections(c, ctl, 0)
            w0, c0 = voluntary_switches(ctl), cpu_seconds(ctl)
            out["exec_all"] = median_seconds(lambda: mec.execute("pass"), a.requests)
            out["ctl_cpu"] = (cpu_seconds(ctl) - c0) / a.requests
            out["wakeups"] = (voluntary_switches(ctl) - w0) / a.requests
            s1 = cpu_sections(c, ctl, 1)
            out["sections"] = {k: (s1[k] - s0[k]) * 1e-3 / a.requests for k in s1}
            if tree and n >= CONTROL_ENGINES:
                out.update(controls(mec, ctl, n, a))
        finally:
            mec.close()
        c.stop()
        m = GATHER_LINE.findall(controller_log_text(c))
        if tree:
            if not m:
                raise RuntimeError("the controller logged no gathered replies: no request went as a tree")
            out["gathered"] = out["sections"]["gathered-frames"] * 1e3
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
    curve = []
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
                line = ("  %-4s execute('pass') on all %.2f ms | controller CPU per request %.0f us (%.2f us per engine), "
                        "%.1f wake-ups | client read %.0f B" % ("tree" if tree else "flat", r["exec_all"] * 1e3,
                                                                r["ctl_cpu"] * 1e6, r["ctl_cpu"] * 1e6 / n,
                                                                r["wakeups"], r["bytes"]))
                if tree:
                    line += " | %.1f gathered frames per request, %.0f%% forwarded whole" % (r["gathered"], r["whole"] * 100)
                if p:
                    line += " | ipyparallel BroadcastView %.2f ms (%s)" % (
                        p["exec_all"] * 1e3, benchlib.fmt_ratio(p["exec_all"], r["exec_all"]))
                print(line, flush=True)
                sec = r["sections"]
                named = sum(sec[k] for k in ("clients", "mpi", "scans", "waiting"))
                print("        by section, us per request: clients %.0f (tree sends %.0f) | MPI %.0f (gathered replies "
                      "%.0f) | scans %.0f | waiting %.0f | the rest of the loop %.0f | %.1f loop turns"
                      % (sec["clients"] * 1e6, sec["tree-sends"] * 1e6, sec["mpi"] * 1e6, sec["gathered"] * 1e6,
                         sec["scans"] * 1e6, sec["waiting"] * 1e6, (sec["loop"] - named) * 1e6, sec["turns"] * 1e3),
                      flush=True)
                if tree:
                    curve.append((n, r["ctl_cpu"]))
                if "part_contended" in r:
                    print("        controls: execute('pass') on engines 0..%d only: controller CPU %.0f us; the same "
                          "while the other %d engines sleep 2 ms in a loop: %.0f us; while they spin: %.0f us"
                          % (CONTROL_ENGINES - 1, r["part_quiet"] * 1e6, n - CONTROL_ENGINES,
                             r["part_contended"] * 1e6, r["part_saturated"] * 1e6), flush=True)
    if len({n for n, _ in curve}) > 1:
        fa, fc, how = scale_model.fit_line([n for n, _ in curve], [y for _, y in curve])
        print("tree: controller CPU per request = a + c*N with a = %.0f us, c = %.2f us per engine (%s); the model of"
              % (fa * 1e6, fc * 1e6, how))
        print("  bench_scale.py with it: bench/scale_model.py --tree-per-engine-us %.2f" % (fc * 1e6))
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
