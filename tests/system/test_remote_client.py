"""A client on another host reaches the controller; a loopback furl is refused loudly.

Two "hosts" on this machine: network namespaces A and B joined by their own
veth pair (198.51.100.1 in A, 198.51.100.2 in B; ENVIRONMENT.md: addresses
only inside the namespaces, never on the machine's own interfaces). The
cluster runs in A, the client in B, so every byte of the client link
crosses a network between two hosts, as from a laptop or login node.
Needs root and iproute2 (`ip`); without them the test fails, it never skips.
"""
import os
import shutil
import subprocess
import time

import pytest

from conftest import IPCLUSTER, PYTHON, child_env, kill_dir_jobs, new_dir, ns_add, ns_del, ns_link, sh

ADDR_A, ADDR_B = "198.51.100.1", "198.51.100.2"

CLIENT = r"""
import sys, time
from ipmpi import client
try:
    mec = client.MultiEngineClient(furl_file=sys.argv[1], connect_timeout=10, timeout=60)
except Exception as e:
    print("CONNECT-FAILED %s: %s" % (type(e).__name__, e))
    sys.exit(3)
print("IDS", mec.get_ids())
r = mec.execute('import os; print(open("/proc/self/net/dev").read().count("veth-a"))')
print("OUT", r[0]["stdout"].strip())
print("PULL", mec.pull("x") if mec.push(dict(x=41)) == [None] * len(mec.get_ids()) else None)
mec.close()
"""




@pytest.fixture(scope="module")
def hosts():
    tag = str(os.getpid())
    a, b = "ipmpi-a-" + tag, "ipmpi-b-" + tag
    try:
        ns_add(a, b)
        ns_link(a, "veth-a", ADDR_A, b, "veth-b", ADDR_B)
        yield a, b
    finally:
        ns_del(a, b)


def in_ns(ns, argv, timeout):
    return subprocess.run(["ip", "netns", "exec", ns] + argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=child_env())


def run_cluster(ns, extra):
    d = new_dir()
    r = in_ns(ns, [IPCLUSTER, "mpirun", "-n", "2", "--ipmpi-dir", d, "--timeout", "120"] + extra, 180)
    assert r.returncode == 0, "ipcluster in namespace %s failed:\n%s" % (ns, r.stdout)
    return d, r.stdout


def stop_cluster(ns, d):
    try:
        in_ns(ns, [IPCLUSTER, "stop", "--ipmpi-dir", d], 60)
    finally:
        kill_dir_jobs(d)
        shutil.rmtree(d, ignore_errors=True)


def furl_of(d):
    with open(os.path.join(d, "security", "ipcontroller-mec.furl")) as f:
        return f.read().strip()


def test_client_on_another_host_uses_the_default_furl(hosts):
    a, b = hosts
    d, out = run_cluster(a, [])
    try:
        # Inside A the host name resolves to loopback only, so the controller
        # must have written A's routable address into the furl.
        assert "@%s:" % ADDR_A in furl_of(d), furl_of(d)
        assert "loopback" not in out
        r = in_ns(b, [PYTHON, "-c", CLIENT, os.path.join(d, "security", "ipcontroller-mec.furl")], 120)
        assert r.returncode == 0, r.stdout
        assert "IDS [0, 1]" in r.stdout, r.stdout
        assert "OUT 1" in r.stdout, r.stdout  # the engine runs in A, beside veth-a
        assert "PULL [41, 41]" in r.stdout, r.stdout
    finally:
        stop_cluster(a, d)


def test_loopback_furl_is_flagged_and_refused_from_another_host(hosts):
    a, b = hosts
    d, out = run_cluster(a, ["--client-ip", "127.0.0.1"])
    try:
        assert "@127.0.0.1:" in furl_of(d)
        assert "loopback" in out, out  # ipcluster says remote clients cannot connect
        log = "".join(open(os.path.join(d, "log", f)).read()
                      for f in os.listdir(os.path.join(d, "log")) if f.startswith("ipcontroller-"))
        assert "loopback" in log, log
        r = in_ns(b, [PYTHON, "-c", CLIENT, os.path.join(d, "security", "ipcontroller-mec.furl")], 60)
        assert r.returncode == 3 and "CONNECT-FAILED" in r.stdout, r.stdout
    finally:
        stop_cluster(a, d)


WAITER = r"""
import sys, time
from ipmpi import client
mec = client.MultiEngineClient(furl_file=sys.argv[1], connect_timeout=10)   # no timeout: waits forever
print("CONNECTED", mec.get_ids(), flush=True)
t0 = time.monotonic()
try:
    r = mec.execute("import time; time.sleep(%s); print('slept')" % sys.argv[2], targets=0)
    print("RETURNED after %.1f s: %r" % (time.monotonic() - t0, r[0]["stdout"]), flush=True)
    print("THEN", mec.execute("print(6 * 7)", targets=0)[0]["stdout"].strip(), flush=True)
except Exception as e:
    print("RAISED %s after %.1f s: %s" % (type(e).__name__, time.monotonic() - t0, e), flush=True)
"""

# The client's keepalive (src/common/tls.c, ipmpi_tcp_tune(fd, 5)): 5 s idle,
# then 3 probes 2 s apart: a silent partition is an error after ~11 s. The
# controller's: 24 s idle, ~30 s in all.
CLIENT_KEEPALIVE_S = 11
CONTROLLER_KEEPALIVE_S = 30


def test_a_silently_lost_link_raises_instead_of_hanging(hosts, tmp_path):
    # A partition (packets dropped, nothing closed) while a request runs:
    # the client's keepalive turns it into a connection error within ~11 s.
    a, b = hosts
    d, _out = run_cluster(a, [])
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    try:
        furl = os.path.join(d, "security", "ipcontroller-mec.furl")
        p = subprocess.Popen(["ip", "netns", "exec", b, PYTHON, str(script), furl, "300"], env=child_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        try:
            first = p.stdout.readline()
            assert first.startswith("CONNECTED"), first + p.stdout.read()
            time.sleep(1)
            sh("ip", "-n", a, "link", "set", "veth-a", "down")   # silently: no FIN, no RST
            out, _ = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            sh("ip", "-n", a, "link", "set", "veth-a", "up", check=False)
        print(out.strip())
        assert "RAISED ConnectionError" in out, out
        took = float(out.split(" after ")[1].split(" s")[0])
        # ~11 s (measured 11-12 s), and a second for the client to find the
        # controller unreachable; the margin is for a loaded machine.
        assert CLIENT_KEEPALIVE_S - 2 < took < CLIENT_KEEPALIVE_S + 7, out
        assert "timed out" in out and "the controller is unreachable" in out, out
    finally:
        stop_cluster(a, d)


def test_a_long_request_on_a_healthy_silent_link_is_not_cut(hosts, tmp_path):
    # Nothing crosses the link while the request runs, for longer than both
    # keepalive spans: the kernel answers the probes, so nothing is cut.
    a, b = hosts
    d, _out = run_cluster(a, [])
    script = tmp_path / "waiter.py"
    script.write_text(WAITER)
    sleep = CONTROLLER_KEEPALIVE_S + 5
    try:
        furl = os.path.join(d, "security", "ipcontroller-mec.furl")
        r = in_ns(b, [PYTHON, str(script), furl, str(sleep)], sleep + 60)
        assert "RETURNED" in r.stdout and "'slept\\n'" in r.stdout, r.stdout
        assert float(r.stdout.split("RETURNED after ")[1].split(" s")[0]) >= sleep
        assert "THEN 42" in r.stdout, r.stdout
    finally:
        stop_cluster(a, d)
