"""ipcluster ssh across two "hosts": network namespaces A and B joined by
their own veth pair (addresses only inside them, ENVIRONMENT.md), with a
real sshd in B. ipcluster runs in A with an IPython 0.10 clusterfile that
puts the engines on B; the controller stays in A. The engines must really
run in B's network namespace, be reached by a client, have a death
detected while the job goes on, and leave nothing behind.

Needs root, iproute2 and openssh-server (sshd); without them the tests
fail, they never skip.
"""
import contextlib
import os
import re
import shutil
import subprocess

import pytest

from conftest import (IPCLUSTER, PYTHON, bell_counts, child_env, controller_log, kill_dir_jobs, need_sshd, new_dir,
                      ns_add, ns_del, ns_link, processes_with, sh, sshd_config, stop_sshd, wait_for)

ADDR_A, ADDR_B, ADDR_NONE = "198.51.100.1", "198.51.100.2", "198.51.100.3"
NET = "198.51.100.0/24"
# Host B's /dev/shm (a tmpfs of its own): room for Open MPI's segments and
# a 16 MiB shared array, not for a 96 MiB one.
B_SHM_MIB = 64




@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    need_sshd()
    tmp = tmp_path_factory.mktemp("sshbed")
    tag = str(os.getpid())
    a, b = "ipmpi-sa-" + tag, "ipmpi-sb-" + tag
    va, vb = "vsa" + tag[-8:], "vsb" + tag[-8:]
    key, hostkey = str(tmp / "key"), str(tmp / "hostkey")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey)
    shutil.copy(key + ".pub", str(tmp / "authorized_keys"))
    config, pidfile = sshd_config(tmp, ADDR_B, hostkey)
    try:
        ns_add(a, b)
        ns_link(a, va, ADDR_A, b, vb, ADDR_B)
        # B is a host of its own: its own /dev/shm (Open MPI's shared-memory
        # segments and ipmpi's node-shared arrays are per node; in the
        # machine's /dev/shm B's segments would collide with A's) and its
        # own host name, for sshd and everything started through it.
        sh("ip", "netns", "exec", b, "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
           "mount -t tmpfs -o mode=1777,size=%dm tmpfs /dev/shm && hostname ipmpi-host-b && "
           "exec /usr/sbin/sshd -f %s" % (B_SHM_MIB, config))
        wait_for(lambda: os.path.exists(pidfile), 10, what="sshd in namespace B")
        ssh = ("ssh -F /dev/null -i %s -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
               "-o BatchMode=yes -o ConnectTimeout=3 -o LogLevel=ERROR" % key)
        yield {"a": a, "b": b, "ssh": ssh, "tmp": tmp}
    finally:
        stop_sshd(pidfile)
        ns_del(a, b)


def in_ns(ns, argv, timeout=180):
    return subprocess.run(["ip", "netns", "exec", ns] + argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, env=child_env())


@contextlib.contextmanager
def ssh_cluster(hosts, engines, name, stopped=None, extra=()):
    """`ipcluster ssh` from A with the clusterfile engines (host -> count);
    yields (profile directory, ipcluster's output), then stops it, calls
    stopped(directory) if given (its logs are complete then) and checks
    that nothing is left on either host; always cleans up."""
    d = new_dir()
    try:
        cf = clusterfile(hosts, engines, name)
        r = in_ns(hosts["a"], [IPCLUSTER, "ssh", "--clusterfile", cf, "--client-ip", ADDR_A, "--ipmpi-dir", d]
                  + list(extra))
        assert r.returncode == 0, r.stdout + r.stderr
        yield d, r.stdout
        st = in_ns(hosts["a"], [IPCLUSTER, "stop", "--ipmpi-dir", d])
        assert st.returncode == 0, st.stdout + st.stderr
        if stopped:
            stopped(d)
        wait_for(lambda: processes_with("--ipmpi-dir " + d) == [], 15, what="nothing left on either host")
    finally:
        kill_dir_jobs(d)
        shutil.rmtree(d, ignore_errors=True)


def client_in_a(hosts, code, d):
    """Runs Python code in A with the cluster's mec furl as argument; its output."""
    c = in_ns(hosts["a"], [PYTHON, "-c", code, os.path.join(d, "security", "ipcontroller-mec.furl")])
    assert c.returncode == 0, c.stdout + c.stderr
    return c.stdout


def clusterfile(hosts, engines, name="cluster.py"):
    p = hosts["tmp"] / name
    p.write_text("send_furl = True\nengines = %r\nssh = %r\ncontroller_host = %r\nnetwork = %r\n"
                 % (engines, hosts["ssh"], ADDR_A, NET))
    return str(p)


CLIENT = r"""
import os, signal, sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
print("IDS", mec.get_ids())
info = mec.engine_info()
print("HOSTS", sorted(set(d["host"] for d in info)))
mec.execute("import os; ns = os.readlink('/proc/self/ns/net')")
print("NS", sorted(set(mec.pull("ns"))))
os.kill(info[0]["pid"], signal.SIGKILL)
deadline = time.monotonic() + 30
while mec.get_ids() != [1] and time.monotonic() < deadline:
    time.sleep(0.1)
print("AFTER", mec.get_ids())
mec.execute("z = 9", targets=[1])
print("PULL", mec.pull("z", targets=[1]))
mec.close()
"""


def test_engines_on_the_second_host_are_reached_and_a_death_is_detected(hosts):
    with ssh_cluster(hosts, {ADDR_B: 2}, "cluster.py") as (d, started):
        assert "2 engines ready" in started and ADDR_B in started
        b_ns = in_ns(hosts["b"], ["readlink", "/proc/self/ns/net"]).stdout.strip()
        a_ns = in_ns(hosts["a"], ["readlink", "/proc/self/ns/net"]).stdout.strip()
        assert b_ns != a_ns
        out = client_in_a(hosts, CLIENT, d)
        assert "IDS [0, 1]" in out and "HOSTS ['%s']" % ADDR_B in out, out
        assert "NS ['%s']" % b_ns in out, out
        assert "AFTER [1]" in out and "PULL [9]" in out, out
        s = in_ns(hosts["a"], [IPCLUSTER, "status", "--ipmpi-dir", d])
        assert s.returncode == 0 and "1 of 2 engines alive" in s.stdout, s.stdout + s.stderr


def test_unreachable_host_is_named_with_ssh_words_and_nothing_starts(hosts):
    d = new_dir()
    try:
        cf = clusterfile(hosts, {ADDR_B: 1, ADDR_NONE: 1}, "bad.py")
        r = in_ns(hosts["a"], [IPCLUSTER, "ssh", "--clusterfile", cf, "--ipmpi-dir", d], timeout=120)
        assert r.returncode == 1
        assert "cannot reach %s" % ADDR_NONE in r.stderr, r.stderr
        assert ("ssh: connect to host %s" % ADDR_NONE) in r.stderr, r.stderr
        assert ADDR_B + ":" not in r.stderr
        assert processes_with("--ipmpi-dir " + d) == []
    finally:
        kill_dir_jobs(d)
        shutil.rmtree(d, ignore_errors=True)


SHARED_CLIENT = r"""
import sys
import numpy as np
from ipmpi import client
from ipmpi.shared import segment_pss_kb as segment_pss

mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
info = {d["id"]: d for d in mec.engine_info()}
a = np.arange(2 << 20, dtype=np.float64)   # 16 MiB
report = mec.push(dict(a=a), shared=True)
print("REPORT", sorted((v["engines"], v["bytes"]) for v in report.values()))
print("SUMS", sorted(set(r["stdout"] for r in mec.execute("print(a.sum() == %r)" % float(a.sum())))))
for host, v in sorted(report.items()):
    print("HOSTPSS", v["engines"], sum(segment_pss(info[i]["pid"]) for i in v["engines"]))
mec.reset()
print("AFTER", sum(segment_pss(d["pid"]) for d in info.values()))
big = np.zeros(12 << 20)   # 96 MiB: more than host B's /dev/shm
try:
    mec.push(dict(big=big), shared=True)
except client.RemoteError as e:
    print("TOOBIG", str(e).replace("\n", " | "))
print("KEYS", [("big" in k) for k in mec.keys()])
print("LEFT", sum(segment_pss(d["pid"]) for d in info.values()))
mec.close()
"""


def test_a_shared_array_is_held_once_on_each_host(hosts):
    # Two engines on A (with the controller) and two on B: two nodes, each
    # holding the array once (issue: node-shared data across nodes).
    with ssh_cluster(hosts, {ADDR_A: 2, ADDR_B: 2}, "shared.py") as (d, _started):
        out = client_in_a(hosts, SHARED_CLIENT, d)
        mib16 = 16 << 20
        assert "REPORT [([0, 1], %d), ([2, 3], %d)]" % (mib16, mib16) in out, out
        assert "SUMS ['True\\n']" in out, out
        for line in out.splitlines():
            if line.startswith("HOSTPSS"):
                kb = int(line.split()[-1])
                assert abs(kb - 16 * 1024) < 512, line
        assert "AFTER 0" in out, out
        # Too big for B's shared memory: an error naming B and its limit,
        # nothing bound anywhere, A's segment gone too.
        assert "TOOBIG engine 2: MemoryError" in out, out
        assert "node ipmpi-host-b: /dev/shm has" in out and "of %d MiB" % B_SHM_MIB in out, out
        assert "the shared arrays need 96 MiB" in out, out
        assert "KEYS [False, False, False, False]" in out and "LEFT 0" in out, out


WAKE_CLIENT = r"""
import statistics, sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
info = mec.engine_info()
lat = {}
for d in info:
    mec.execute("pass", targets=d["id"])
    samples = []
    for _ in range(12):
        time.sleep(0.3)                      # past the engine's spin window: it sleeps
        t = time.perf_counter()
        mec.execute("pass", targets=d["id"])
        samples.append(time.perf_counter() - t)
    lat[d["host"]] = statistics.median(samples)
time.sleep(0.5)
wchan = sorted(set(open("/proc/%d/wchan" % d["pid"]).read() for d in info))
print("LAT", " ".join("%s=%.2f" % (h, v * 1e3) for h, v in sorted(lat.items())))
print("WCHAN", wchan)
mec.close()
"""


INTERRUPT_CLIENT = r"""
import sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
info = {d["id"]: d["host"] for d in mec.engine_info()}
far = [i for i in sorted(info) if info[i] != info[0]]
print("FAR", far)


def etypes(pr):
    try:
        pr.get_result(timeout=30)
        return "ok"
    except Exception as e:
        return sorted(set(getattr(x, "etype", type(x).__name__) for x in getattr(e, "errors", [e])))


pr = mec.execute("import time; time.sleep(30)", block=False)
time.sleep(0.5)
t0 = time.monotonic()
print("INTERRUPT", mec.interrupt())
print("RESULT", etypes(pr), "%.1f" % (time.monotonic() - t0))
# Sent before the far engines start it: it lands when they do, once.
late = []
for i in range(4):
    pr = mec.execute("import time; time.sleep(30)", targets=far, block=False)
    time.sleep((0, 0.002, 0.01, 0.05)[i])
    mec.interrupt(targets=far)
    late.append(etypes(pr))
print("LATE", late)
print("NEXT", [r["stdout"] for r in mec.execute("print('on')")])
# Ctrl-C's interrupt of one request: a far engine runs it, one queued
# behind it is aborted.
pr = mec.execute("import time; time.sleep(30)", targets=far[0], block=False)
queued = mec.execute("import time; time.sleep(30)", targets=far[0], block=False)
time.sleep(0.5)
r = mec._interrupt_requests([far[0]], pr._pending + queued._pending, timeout=10)
print("OWN", r["interrupted"], r["aborted"], etypes(pr))
try:
    queued.get_result(timeout=30)
except client.AbortedError:
    print("QUEUED aborted")
# A busy engine on B is killed at once, not after its 30 s.
pr = mec.execute("import time; time.sleep(30)", targets=far[-1], block=False)
time.sleep(0.5)
t0 = time.monotonic()
mec.kill(targets=far[-1])
while far[-1] in mec.get_ids() and time.monotonic() - t0 < 20:
    time.sleep(0.05)
print("KILLED", mec.get_ids(), "%.1f" % (time.monotonic() - t0))
try:
    pr.get_result(timeout=30)
except client.EngineError as e:
    print("RAN", type(e).__name__)
print("STILL", [r["stdout"] for r in mec.execute("print('on')")])
mec.close()
"""


def test_engines_on_another_host_sleep_wake_at_once_and_are_interrupted_and_killed_while_busy(hosts):
    # Engines on B cannot be rung through the controller's node-shared
    # doorbell; they sleep in poll() on a UDP socket and the controller's
    # datagram wakes them: a request after an idle is answered in about the
    # time of a busy one, not at the next poll of a back-off (up to 25 ms).
    with ssh_cluster(hosts, {ADDR_A: 1, ADDR_B: 2}, "wake.py") as (d, _started):
        out = client_in_a(hosts, WAKE_CLIENT, d)
        print(out)
        lat = dict(kv.split("=") for kv in out.split("LAT ")[1].splitlines()[0].split())
        assert set(lat) == {ADDR_B, next(h for h in lat if h != ADDR_B)}, out
        assert float(lat[ADDR_B]) < 5.0, "an idle engine on the other host answered in %s ms (median)" % lat[ADDR_B]
        assert "poll" in out.split("WCHAN ")[1], out
        # No SIGINT reaches engines on B from the controller on A: a keyed
        # INTERRUPT datagram to their wake-up socket does (a thread of the
        # engine watches it while a request runs, src/engine/wake.c), and
        # a KILL datagram ends a busy one at once.
        out = client_in_a(hosts, INTERRUPT_CLIENT, d)
        print(out)
        assert "FAR [1, 2]" in out, out
        assert "'interrupted': [0, 1, 2], 'idle': [], 'unreachable': []" in out, out
        line = out.split("RESULT ")[1].splitlines()[0]
        assert line.startswith("['KeyboardInterrupt']") and float(line.split()[-1]) < 5, out
        assert "LATE " + repr([["KeyboardInterrupt"]] * 4) in out, out
        assert "NEXT ['on\\n', 'on\\n', 'on\\n']" in out, out
        assert "OWN [1] 1 ['KeyboardInterrupt']" in out and "QUEUED aborted" in out, out
        killed = out.split("KILLED ")[1].split()
        assert killed[:2] == ["[0,", "1]"] and float(killed[2]) < 10, out
        assert "RAN DeadEngineError" in out and "STILL ['on\\n', 'on\\n']" in out, out


FAR_CLIENT = r"""
import sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
info = {d["id"]: d["host"] for d in mec.engine_info()}
far = [i for i in sorted(info) if info[i] != info[0]]
print("FAR", far)
for i in range(5):
    mec.execute("import time; time.sleep(0.2); w = %d" % i, targets=far)
mec.execute("import time; time.sleep(0.2); w = 7")
print("PULL", mec.pull("w"))
"""


def test_the_controller_sleeps_while_engines_on_another_host_work(hosts):
    # Engines on B cannot count their frames in the controller's node-shared
    # memory: after each frame they ring its bell by a datagram to where its
    # wake-ups came from, and the controller sleeps instead of polling while
    # they work (src/controller/wake.c). Its log counts those rings.
    counts = {}

    def read_bell_line(d):
        counts.update(zip(("sleeps", "rung", "far"), bell_counts(os.path.join(d, "log"))))

    with ssh_cluster(hosts, {ADDR_A: 1, ADDR_B: 2}, "far.py", stopped=read_bell_line) as (d, _started):
        out = client_in_a(hosts, FAR_CLIENT, d)
        print(out)
        assert "FAR [1, 2]" in out, out
        assert "PULL [7, 7, 7]" in out, out
    print("bell:", counts)
    assert counts["far"] > 0 and counts["sleeps"] > 0 and counts["rung"] > 0, counts




TREE_CLIENT = r"""
import os, signal, sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
info = sorted(mec.engine_info(), key=lambda d: d["id"])
print("HOSTS", [d["host"] for d in info])
pids = [d["pid"] for d in info]
for i in range(20):
    mec.execute("import os; w = os.getpid() + %d" % i)
print("VALUES", mec.pull("w") == [p + 19 for p in pids])
mec.push(dict(a=list(range(100000))))
print("SUMS", mec.execute("s = sum(a)") is not None and mec.pull("s"))
# The root of the other host's subtree dies while its subtree runs: the
# engines below it still answer (directly), the rest goes on.
pr = mec.execute("import time; time.sleep(1.5); v = 5", block=False)
time.sleep(0.5)
os.kill(pids[1], signal.SIGKILL)
try:
    pr.get_result(timeout=60)
    print("NOERROR")
except client.CompositeError as e:
    print("FAILED", [x.engine_id for x in e.errors])
print("AFTER", mec.pull("v", targets=[0, 2, 3]))
print("STILL", [r["stdout"] for r in mec.execute("print('on')")])
"""


def test_a_request_to_engines_on_two_hosts_travels_as_one_tree_per_host(hosts):
    # --tree-min 2: engine 0 on A is one subtree, engines 1-3 on B another
    # rooted at engine 1 (woken by datagram; it wakes 2 and 3 on B's
    # doorbells): the controller sends 2 messages per request, not 4.
    sends = []

    def read_tree_lines(d):
        sends.extend(re.findall(r"sent as a tree of (\d+) engines in (\d+) sends",
                                controller_log(os.path.join(d, "log"))))

    with ssh_cluster(hosts, {ADDR_A: 1, ADDR_B: 3}, "tree.py", stopped=read_tree_lines,
                     extra=("--engine-args", "--tree-min 2 --log-level 3")) as (d, _started):
        out = client_in_a(hosts, TREE_CLIENT, d)
        print(out)
        hosts_line = out.split("HOSTS ")[1].splitlines()[0]
        assert hosts_line.count("'") == 8 and len(set(eval(hosts_line)[1:])) == 1, out
        assert eval(hosts_line)[0] != eval(hosts_line)[1], out
        assert "VALUES True" in out, out
        assert "SUMS [4999950000, 4999950000, 4999950000, 4999950000]" in out, out
        assert "FAILED [1]" in out, out
        assert "AFTER [5, 5, 5]" in out, out
        assert "STILL ['on\\n', 'on\\n', 'on\\n']" in out, out
    print("tree sends:", sends[:5], len(sends))
    assert ("4", "2") in sends, sends
    assert all(s == "2" for n, s in sends if n == "4"), sends


JOIN_CLIENT = r"""
import os, signal, sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
print("IDS", mec.get_ids())
info = {d["id"]: d for d in mec.engine_info()}
print("HOSTS", [info[i]["host"] for i in sorted(info)])
mec.execute("import os; ns = os.readlink('/proc/self/ns/net')")
print("NS", mec.pull("ns"))
mec.push(dict(a=list(range(5))))
print("PULL", mec.pull("a", targets=[1, 2]))
# Idle joined engines on B sleep and the controller's datagram wakes them.
samples = []
for _ in range(10):
    time.sleep(0.3)
    t = time.perf_counter()
    mec.execute("pass", targets=1)
    samples.append(time.perf_counter() - t)
print("WAKE %.2f" % (sorted(samples)[len(samples) // 2] * 1e3))
# Joined engines are interrupted too (by datagram: no signal reaches them).
pr = mec.execute("import time; time.sleep(30)", targets=[1, 2], block=False)
time.sleep(0.5)
print("INTERRUPT", mec.interrupt(targets=[1, 2]))
try:
    pr.get_result(timeout=30)
except client.CompositeError as e:
    print("ETYPES", sorted(set(x.etype for x in e.errors)))
os.kill(info[2]["pid"], signal.SIGKILL)
deadline = time.monotonic() + 30
while mec.get_ids() != [0, 1] and time.monotonic() < deadline:
    time.sleep(0.05)
print("AFTER", mec.get_ids())
print("STILL", [r["stdout"] for r in mec.execute("print('on')")])
mec.close()
"""


def log_tails(d):
    """The end of every log of profile d, for a failure's message."""
    out = []
    for name in sorted(os.listdir(os.path.join(d, "log"))):
        with open(os.path.join(d, "log", name), errors="replace") as f:
            out.append("\n--- %s\n%s" % (name, "".join(f.readlines()[-15:])))
    return "".join(out)


def test_engines_on_the_second_host_join_a_cluster_on_the_first(hosts):
    # The cluster (controller and one engine) runs on A; `ipcluster engines
    # --mode ssh` starts two more on B (ssh runs mpirun there: a joining job
    # stays on one node, open-mpi/ompi#6818), and they join through A's
    # ompi-server and the controller's liveness port.
    d = new_dir()
    try:
        r = in_ns(hosts["a"], [IPCLUSTER, "mpirun", "-n", "1", "--client-ip", ADDR_A, "--ipmpi-dir", d])
        assert r.returncode == 0, r.stdout + r.stderr
        cf = clusterfile(hosts, {ADDR_B: 2}, "join.py")
        j = in_ns(hosts["a"], [IPCLUSTER, "engines", "--mode", "ssh", "--clusterfile", cf, "--ipmpi-dir", d])
        assert j.returncode == 0, j.stdout + j.stderr + log_tails(d)
        assert "2 engines joined" in j.stdout and "ids 1..2 (ssh job" in j.stdout, j.stdout
        b_ns = in_ns(hosts["b"], ["readlink", "/proc/self/ns/net"]).stdout.strip()
        a_ns = in_ns(hosts["a"], ["readlink", "/proc/self/ns/net"]).stdout.strip()
        out = client_in_a(hosts, JOIN_CLIENT, d)
        assert "IDS [0, 1, 2]" in out, out
        assert "NS ['%s', '%s', '%s']" % (a_ns, b_ns, b_ns) in out, out
        # mpirun runs on B itself (one node per joining job), so B names itself.
        assert "HOSTS ['vm', 'ipmpi-host-b', 'ipmpi-host-b']" in out or \
            out.split("HOSTS ")[1].splitlines()[0].count("ipmpi-host-b") == 2, out
        assert "PULL [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]" in out, out
        assert float(out.split("WAKE ")[1].split()[0]) < 5.0, "an idle joined engine answered late: " + out
        assert "'interrupted': [1, 2]" in out and "ETYPES ['KeyboardInterrupt']" in out, out
        # A joined engine on B killed: seen at once, the rest answer.
        assert "AFTER [0, 1]" in out and "STILL ['on\\n', 'on\\n']" in out, out
        st = in_ns(hosts["a"], [IPCLUSTER, "stop", "--engines", "all", "--ipmpi-dir", d])
        assert st.returncode == 0 and "ids 1..2" in st.stdout, st.stdout + st.stderr
        # Nothing of the joined job is left on B; the cluster on A goes on.
        left = in_ns(hosts["b"], ["pgrep", "-f", "--", "--ipmpi-dir %s .*--join" % d])
        assert left.stdout.strip() == "", left.stdout
        s = in_ns(hosts["a"], [IPCLUSTER, "status", "--ipmpi-dir", d])
        assert s.returncode == 0 and "1 of 1 engines alive" in s.stdout, s.stdout + s.stderr
        stop = in_ns(hosts["a"], [IPCLUSTER, "stop", "--ipmpi-dir", d])
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_for(lambda: processes_with(d) == [], 15, what="nothing left on either host")
    finally:
        kill_dir_jobs(d)
        shutil.rmtree(d, ignore_errors=True)
