#!/usr/bin/python3
"""A key holder's round trip while strangers load the controller (issue 13,
"Unauthenticated load hurts key holders").

Prints p50/p99/max of `execute('pass', targets=0)` from a client holding
the key, idle and then while --conns connections (--procs processes of
tests/system/unauth_load.py) do TLS 1.3 handshakes with a wrong key in a
loop; the handshakes the controller completed per second meanwhile; and
the bytes and lines the controller's log grew by (refusals are logged
rate-limited: the first few per source, then a summary line per interval).
No peer: ipyparallel has no key check at connect time to compare.

Usage: bench_unauth.py [--seconds 10] [--conns 200] [--procs 2]
"""
import argparse
import os
import re
import subprocess
import sys
import time

import benchlib

LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "system", "unauth_load.py")


def controller_log(c):
    for name in os.listdir(c.log_dir):
        if re.match(r"ipcontroller-\d+\.log$", name):
            return os.path.join(c.log_dir, name)
    raise RuntimeError("no controller log in %s" % c.log_dir)


def log_size(path):
    with open(path, "rb") as f:
        data = f.read()
    return len(data), data.count(b"\n")


def samples_for(mec, seconds=None, count=None):
    out, t_end = [], time.perf_counter() + (seconds or 0)
    while (count is not None and len(out) < count) or (seconds is not None and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        mec.execute("pass", targets=0)
        out.append(time.perf_counter() - t0)
    return out


def run(seconds, conns, procs):
    with benchlib.ipmpi_cluster(1) as (c, _):
        mec = c.client(timeout=60)
        try:
            samples_for(mec, count=200)
            idle = samples_for(mec, count=2000)
            log = controller_log(c)
            b0, l0 = log_size(log)
            ps = [subprocess.Popen([sys.executable, LOAD, c.mec_furl, "--conns", str(conns // procs),
                                    "--seconds", str(seconds + 1.5)],
                                   stdout=subprocess.PIPE, text=True, env=benchlib.ompi_env())
                  for _ in range(procs)]
            counts = [0, 0, 0, 0]
            try:
                for p in ps:
                    assert p.stdout.readline().strip() == "started"
                time.sleep(1.0)
                loaded = samples_for(mec, seconds=seconds)
                for p in ps:
                    out, _ = p.communicate(timeout=120)
                    m = re.search(r"handshakes (\d+) refusals (\d+) errors (\d+) busy (\d+)", out)
                    for i in range(4):
                        counts[i] += int(m.group(i + 1)) if m else 0
            finally:
                for p in ps:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            b1, l1 = log_size(log)
            return (idle, loaded, counts[0] / (seconds + 1.5),
                    "handshakes %d, refused for the wrong key %d, refused at once as busy %d (64 before HELLO "
                    "from one address), other errors %d" % (counts[0], counts[1], counts[3], counts[2]),
                    b1 - b0, l1 - l0)
        finally:
            mec.close()


def line(name, s):
    return ("  %-7s p50 %7.2f ms  p99 %7.2f ms  p99.9 %7.2f ms  max %7.2f ms  (%d requests, %d over 10 ms)"
            % (name, benchlib.percentile(s, 50) * 1e3, benchlib.percentile(s, 99) * 1e3,
               benchlib.percentile(s, 99.9) * 1e3, max(s) * 1e3, len(s), sum(1 for x in s if x > 0.01)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2)
    a = ap.parse_args()
    r = benchlib.measure("key holder under wrong-key handshakes", run, a.seconds, a.conns, a.procs)
    print("execute('pass') round trip of a key holder while %d connections (%d processes) do wrong-key TLS "
          "handshakes, loopback, %d cores" % (a.conns, a.procs, os.cpu_count()))
    if r:
        idle, loaded, hs_rate, load_out, log_bytes, log_lines = r
        print(line("idle:", idle))
        print(line("loaded:", loaded))
        print("  load: %s (%.0f handshakes/s)" % (load_out, hs_rate))
        print("  controller log grew by %d bytes, %d lines (%.1f KiB/s)"
              % (log_bytes, log_lines, log_bytes / 1024.0 / (a.seconds + 1.5)))
        print("  target: max while loaded under 100 ms: %s"
              % ("met" if max(loaded) < 0.1 else "NOT met"))
    return benchlib.finish()


if __name__ == "__main__":
    sys.exit(main())
