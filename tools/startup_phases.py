#!/usr/bin/python3
"""Where one ipmpi start went: a phase table from the ranks' logs.

    tools/startup_phases.py LOGDIR [--launch T] [--furl T] [--answered T]

LOGDIR is a profile's log directory (IPMPI_DIR/log) holding the logs of
exactly one start. Every rank logs a "start-up:" line with wall-clock
stamps of its steps (engines just before READY, the controller once its
furls are written); the optional times are the launching process's own
(Cluster.startup_times: launcher started, furl files seen, N ids answered),
in seconds since the epoch. Without --launch, times count from the first
rank's main().

For each step the table gives the per-rank duration (median and max over
the engines) and when the last rank was past it, counted from the launch.
The engines' steps run side by side, so "last done" is the critical path;
the CPU column is the engines' CPU time summed (what 2 cores had to give).
"""
import argparse
import glob
import os
import re
import statistics
import sys

_LINE = re.compile(r"\[(controller|engine \d+)\] INFO: start-up: (.*)$")
_KV = re.compile(r"(\w+)=([0-9.]+)")

# (key of the stamp that ends the step, key of the CPU stamp there, label):
# in order, engines. The CPU time before main() and of the PMIx queries is
# counted with the step after.
ENGINE_STEPS = [
    ("main", None, "exec + dynamic linking (launch to main)"),
    ("mpi", "cpu_mpi", "MPI_Init_thread (CPU: since exec)"),
    ("pmix", None, "PMIx job queries"),
    ("node", "cpu_node", "comm dup + node doorbell window"),
    ("bound", "cpu_bound", "hwloc topology + bind"),
    ("python", "cpu_python", "Python interpreter start"),
    ("engine", "cpu", "import ipmpi._engine, Engine(), READY"),
]
CTL_STEPS = [
    ("setup", "controller: keys, certificate, listen"),
    ("first_ready", "controller: first READY seen"),
    ("last_ready", "controller: last READY seen"),
    ("furl", "controller: furl files written"),
]


def read_logs(logdir):
    """({engine id: stamps}, controller stamps or None) from LOGDIR."""
    engines, ctl = {}, None
    for path in glob.glob(os.path.join(logdir, "ip*.log")):
        with open(path, errors="replace") as f:
            for line in f:
                m = _LINE.search(line)
                if not m:
                    continue
                stamps = {k: float(v) for k, v in _KV.findall(m.group(2))}
                if m.group(1) == "controller":
                    ctl = stamps
                else:
                    engines[int(m.group(1).split()[1])] = stamps
    return engines, ctl


def table(logdir, launch=None, furl=None, answered=None):
    """The phase table as a list of text lines (raises ValueError if the
    logs hold no start-up line)."""
    engines, ctl = read_logs(logdir)
    if not engines:
        raise ValueError("no engine start-up lines in %s (ipmpi too old, or the start failed)" % logdir)
    ranks = list(engines.values()) + ([ctl] if ctl else [])
    t0 = launch if launch is not None else min(r["main"] for r in ranks)
    out = ["%d engines; times in s, from %s; CPU: median per engine and all engines' sum"
           % (len(engines), "the launch" if launch is not None else "the first rank's main()"),
           "  %-44s %8s %8s %10s %8s %8s" % ("step", "median", "max", "last done", "CPU med", "CPU sum")]
    prev, prev_cpu = None, None
    for key, cpu_key, label in ENGINE_STEPS:
        if key == "main":
            durs = [e["main"] - t0 for e in engines.values()]
        else:
            durs = [e[key] - e[prev] for e in engines.values()]
        done = max(e[key] for e in engines.values()) - t0
        cpu = ""
        if cpu_key and all(cpu_key in e for e in engines.values()):
            c = [e[cpu_key] - (e[prev_cpu] if prev_cpu else 0.0) for e in engines.values()]
            cpu = "%8.4f %8.2f" % (statistics.median(c), sum(c))
            prev_cpu = cpu_key
        out.append("  %-44s %8.3f %8.3f %10.3f %s" % (label, statistics.median(durs), max(durs), done, cpu))
        prev = key
    if ctl:
        out.append("  %-44s %8s %8s %10.3f" % ("controller: MPI_Init done", "", "", ctl["mpi"] - t0))
        for key, label in CTL_STEPS:
            out.append("  %-44s %8s %8s %10.3f" % (label, "", "", ctl[key] - t0))
    if furl is not None:
        out.append("  %-44s %8s %8s %10.3f" % ("ipcluster: furl files seen", "", "", furl - t0))
    if answered is not None:
        out.append("  %-44s %8s %8s %10.3f" % ("ipcluster: a client got the N ids", "", "", answered - t0))
    cpu = sum(e.get("cpu", 0.0) for e in engines.values())
    out.append("  CPU until READY: engines %.2f s in all (%.3f s median each)%s"
               % (cpu, statistics.median(e.get("cpu", 0.0) for e in engines.values()),
                  "; controller %.2f s until its furl" % ctl["cpu"] if ctl and "cpu" in ctl else ""))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir")
    ap.add_argument("--launch", type=float)
    ap.add_argument("--furl", type=float)
    ap.add_argument("--answered", type=float)
    a = ap.parse_args()
    try:
        lines = table(a.logdir, a.launch, a.furl, a.answered)
    except (OSError, ValueError) as e:
        print("startup_phases: %s" % e, file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
