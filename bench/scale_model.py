#!/usr/bin/python3
"""A model of a request to all engines beyond one node (issue 11 part 6):
measured per-message costs, projected to 1,024 and 16,384 engines over
64-core nodes (one engine per core: 16 and 256 nodes).

Inputs, each printed with where it came from:
  a, b      the controller's CPU per execute('pass') on all engines:
            a + b*N, least squares over the Ns measured (bench_scale.py's
            "controller CPU per request", from /proc/PID/schedstat)
  c         the controller's CPU per engine of a tree request: its own
            work per engine is ~30 instructions (gangs settle runs of
            engines at once; bench_ctl_instr.py), so on this VM c is
            mostly what the rest costs more while N engines share 2
            cores: the slope of
            bench_tree.py's tree CPU per request on one node, a parameter
            (--tree-per-engine-us, default the figure of
            doc/performance.rst)
  e         execute('pass') on all, wall time per engine at the largest N
            measured on one node (engines sharing this machine's cores, the
            client's handling of N results included; it grows faster than
            N there, so a line fitted to it would not pass near 0)
  l_node    one-way MPI latency between two ranks of one node: half the
            round trip of an 8-byte mpi4py ping-pong, the best of 10
            batches of 2,000 (mpirun -n 2; mpi4py's Python call overhead
            included, so above MPI's own)
  l_net     one-way latency between nodes: a parameter (default 2 us,
            InfiniBand-class), not measured here; --tcp-us adds the rows
            for a second figure (e.g. TCP between hosts)

Shapes (M = nodes = ceil(N / cores per node), f = fan-out,
d = ceil(log_f(cores per node)) hops inside a node):
  flat      the controller sends to and hears from each engine itself:
            CPU a + b*N; latency a + b*N + 2*l_net (controller-bound), and
            e*N at the one-node rate measured here
  node tree the controller sends one message per node root and receives
            one gathered reply from it; inside a node a tree of fan-out f:
            CPU a + b*M + c*N; latency that + 2*l_net + 2*d*f*l_node (down
            and gather back up, each parent handling f children in turn)

Run alone it measures l_node itself (unless --p2p-us) and takes a, b, e
from --points, by default the figures of doc/performance.rst's scale
table. bench_scale.py calls report() with the figures of its own run.

Usage: scale_model.py [--points N:CTL_CPU_US:EXEC_ALL_MS,...] [--p2p-us X]
       [--inter-node-us 2] [--tcp-us X] [--cores-per-node 64] [--fanout 4]
       [--tree-per-engine-us C] [--project 1024,16384]
Exit status 1 if the ping-pong could not be measured.
"""
import argparse
import math
import os
import sys

import benchlib

PINGPONG = "--pingpong-child"

# doc/performance.rst's scale table (make bench BENCH=scale, 2-core VM):
# engines, controller CPU per execute-all (us), execute-all (ms).
DOC_POINTS = "16:100:0.5,64:200:2.0,256:1900:17.9"
# doc/performance.rst's tree curve (make bench BENCH=tree, --no-spin, steady
# state): the slope of the controller's CPU per tree request, us per engine.
DOC_TREE_PER_ENGINE_US = 0.6


def add_model_args(ap):
    """The model's parameters, shared by this script and bench_scale.py."""
    ap.add_argument("--inter-node-us", type=float, default=2.0,
                    help="one-way latency between nodes, us (default 2: InfiniBand-class)")
    ap.add_argument("--tcp-us", type=float, default=None,
                    help="a second inter-node latency, us, projected too (e.g. TCP between hosts)")
    ap.add_argument("--cores-per-node", type=int, default=64)
    ap.add_argument("--fanout", type=int, default=4)
    ap.add_argument("--tree-per-engine-us", type=float, default=DOC_TREE_PER_ENGINE_US,
                    help="the controller's CPU per engine of a tree request, us (default %.1f: doc/performance.rst,"
                         " from bench_tree.py)" % DOC_TREE_PER_ENGINE_US)
    ap.add_argument("--project", default="1024,16384", help="engine counts to project to")


def fit_line(xs, ys):
    """(intercept, slope, how) of the least-squares line through the
    points; one point gives the line through the origin, said in how."""
    n = len(xs)
    if n == 1:
        return 0.0, ys[0] / xs[0], "one N only: line through the origin (fixed part taken as 0)"
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope, "least squares over N = %s" % ",".join(str(x) for x in xs)


def pingpong_child(rounds=2000, batches=12):
    import time
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    buf = np.zeros(8, dtype=np.uint8)
    peer = 1 - rank
    one_way = []
    for b in range(batches):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(rounds):
            if rank == 0:
                comm.Send(buf, dest=peer, tag=3)
                comm.Recv(buf, source=peer, tag=3)
            else:
                comm.Recv(buf, source=peer, tag=3)
                comm.Send(buf, dest=peer, tag=3)
        if b >= 2:                              # the first two warm up
            one_way.append((time.perf_counter() - t0) / rounds / 2)
    if rank == 0:       # the best batch: a busy core only ever adds
        print("P2P %.9f" % min(one_way), flush=True)


def measure_p2p():
    """One-way on-node MPI latency in seconds (8-byte ping-pong, 2 ranks,
    the best of 10 batches)."""
    env = dict(os.environ)
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    out = benchlib.run_checked(["mpirun", "-n", "2", sys.executable, os.path.abspath(__file__), PINGPONG],
                               timeout=120, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in out.splitlines():
        if line.startswith("P2P "):
            return float(line.split()[1])
    raise RuntimeError("the ping-pong printed no P2P line:\n" + out[-2000:])


def us(v):
    return "%.1f us" % (v * 1e6) if abs(v) < 1e-3 else "%.2f ms" % (v * 1e3)


def report(points, l_node, a, source):
    """Prints the model's inputs, assumptions and projection.

    points: [(N, controller CPU per execute-all s, execute-all s)];
    l_node: on-node one-way latency s; a: the parsed model arguments;
    source: where points and l_node came from (printed)."""
    points = sorted(points)
    ns = [p[0] for p in points]
    ca, cb, chow = fit_line(ns, [p[1] for p in points])
    if ca < 0:
        # Noise, or a cost that grows faster than N: a fixed part below
        # zero would make small trees cost less than nothing.
        ys = [p[1] for p in points]
        chow += "; a fitted below 0 (%s), so refitted through the origin" % us(ca)
        ca, cb = 0.0, sum(x * y for x, y in zip(ns, ys)) / sum(x * x for x in ns)
    e_n, e_wall = points[-1][0], points[-1][2]
    e = e_wall / e_n
    cpn, f = a.cores_per_node, a.fanout
    d = max(1, math.ceil(math.log(cpn) / math.log(f) - 1e-9))
    nets = [("l_net %.1f us" % a.inter_node_us, a.inter_node_us * 1e-6)]
    if a.tcp_us is not None:
        nets.append(("l_net %.1f us (--tcp-us)" % a.tcp_us, a.tcp_us * 1e-6))

    print("== model: a request to all engines beyond one node (a model, not a measurement)")
    print("  inputs (%s):" % source)
    print("    controller CPU per execute-all = a + b*N: a = %s, b = %s per engine (%s)" % (us(ca), us(cb), chow))
    print("    execute-all on one node: e = %s per engine (%s at N=%d)" % (us(e), us(e_wall), e_n))
    c_eng = a.tree_per_engine_us * 1e-6
    print("    c = %s per engine of a tree request (--tree-per-engine-us: bench_tree.py's slope on one node)"
          % us(c_eng))
    print("    l_node = %s one way between 2 ranks of a node (8-byte mpi4py ping-pong, best batch)" % us(l_node))
    print("    l_net = %.1f us one way between nodes: a parameter, InfiniBand-class, not measured here%s"
          % (a.inter_node_us, "" if a.tcp_us is None else "; also %.1f us (--tcp-us)" % a.tcp_us))
    print("  check at the measured Ns: flat latency a + b*N + 2*l_node against the measured execute-all")
    for n, cpu, wall in points:
        print("    N=%-5d model %s, measured %s, controller CPU measured %s, fit %s"
              % (n, us(ca + cb * n + 2 * l_node), us(wall), us(cpu), us(ca + cb * n)))
    if cb <= 0:
        print("  no projection: the controller's CPU did not grow with N in these figures (b <= 0; noise,")
        print("    e.g. a busy machine): measure again on a quiet machine")
        return
    print("  shapes (N engines, M = ceil(N/%d) nodes, fan-out f = %d, d = ceil(log_%d(%d)) = %d hops in a node):"
          % (cpn, f, f, cpn, d))
    print("    flat:      controller CPU = a + b*N; latency = a + b*N + 2*l_net (controller-bound)")
    print("               and e*N (the one-node rate: engines sharing cores, client included)")
    print("    node tree: controller CPU = a + b*M + c*N; latency = that + 2*l_net + 2*d*f*l_node")
    print("  %-28s %7s %6s %13s %16s %16s %13s %14s"
          % ("", "engines", "nodes", "flat CPU", "flat latency", "flat (e*N)", "tree CPU", "tree latency"))
    for label, l_net in nets:
        for n in [int(x) for x in a.project.split(",")]:
            m = math.ceil(n / cpn)
            flat_cpu, tree_cpu = ca + cb * n, ca + cb * m + c_eng * n
            print("  %-28s %7d %6d %13s %16s %16s %13s %14s"
                  % (label, n, m, us(flat_cpu), us(flat_cpu + 2 * l_net), us(e * n),
                     us(tree_cpu), us(tree_cpu + 2 * l_net + 2 * d * f * l_node)))
    print("  assumptions: one engine per core, so no engine waits for a core (this machine's measured e does);")
    print("    b, measured on one node, is also the controller's cost of a message to another node;")
    print("    inside a tree each send costs about l_node and a parent sends to its f children in turn;")
    print("    c*N is the CPU-time slope measured on one node whose 2 cores N engines share: the controller's")
    print("    own work per engine is ~30 instructions since gangs (bench_ctl_instr.py: a request to all")
    print("    settles each run of agreeing engines at once), so c is almost all what every system call and")
    print("    cache line costs more there, and over-states a node with a core per engine;")
    print("    no contention on the network, no stragglers (one slow engine delays every shape);")
    print("    a fit over Ns of one oversubscribed node extrapolated 64-1,000x beyond them.")


def main():
    if PINGPONG in sys.argv:
        pingpong_child()
        return 0
    ap = argparse.ArgumentParser(description="Projects a request to all engines to many nodes.")
    ap.add_argument("--points", default=None,
                    help="N:CTL_CPU_US:EXEC_ALL_MS,... from bench_scale.py (default: doc/performance.rst's table)")
    ap.add_argument("--p2p-us", type=float, default=None, help="on-node one-way latency, us (default: measure it)")
    add_model_args(ap)
    a = ap.parse_args()
    points = []
    for item in (a.points or DOC_POINTS).split(","):
        n, cpu_us, wall_ms = item.split(":")
        points.append((int(n), float(cpu_us) * 1e-6, float(wall_ms) * 1e-3))
    source = "--points" if a.points else "doc/performance.rst's scale table (%s), not measured now" % DOC_POINTS
    if a.p2p_us is not None:
        l_node, how = a.p2p_us * 1e-6, "--p2p-us"
    else:
        l_node, how = benchlib.measure("on-node MPI ping-pong", measure_p2p), "measured now"
        if l_node is None:
            return benchlib.finish()
    report(points, l_node, a, "%s; l_node %s" % (source, how))
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
