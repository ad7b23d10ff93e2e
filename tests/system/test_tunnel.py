"""The client link through an ssh tunnel: MultiEngineClient(furl, sshserver=..., sshkey=...).

Three "hosts" made of network namespaces (addresses only inside them,
ENVIRONMENT.md):

    laptop L 192.0.2.1 --- 192.0.2.2 login G 203.0.113.2 --- 203.0.113.1 cluster C

G runs a real sshd (on 192.0.2.2 only) and does not forward packets, so L
has no route to C: the only way from the laptop to the controller is an ssh
local forward through the login node. The cluster runs in C with
--client-ip 203.0.113.1; the client runs in L with only the furl file. The
certificate pin and the key must still hold end to end, a refusing tunnel
host or a wrong ssh key must give a clear error in ssh's own words, and no
ssh process may be left once the client is closed, its Python exits or is
killed. Needs root, iproute2 and openssh (client and server); without them
the tests fail, they never skip.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import (IPCLUSTER, PYTHON, child_env, kill_dir_jobs, need_sshd, new_dir, ns_add, ns_del, ns_link,
                      processes_with, sh, sshd_config, stop_sshd, wait_for)

ADDR_L, ADDR_GL = "192.0.2.1", "192.0.2.2"
ADDR_GC, ADDR_C = "203.0.113.2", "203.0.113.1"




@pytest.fixture(scope="module")
def net(tmp_path_factory):
    need_sshd()
    tmp = tmp_path_factory.mktemp("tunnelbed")
    tag = str(os.getpid())
    lap, login, clu = "ipmpi-tl-" + tag, "ipmpi-tg-" + tag, "ipmpi-tc-" + tag
    key, wrong, hostkey = str(tmp / "userkey"), str(tmp / "wrongkey"), str(tmp / "hostkey")
    for k in (key, wrong, hostkey):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k)
    shutil.copy(key + ".pub", str(tmp / "authorized_keys"))
    with open(hostkey + ".pub") as f:
        (tmp / "known_hosts").write_text("%s %s\n" % (ADDR_GL, " ".join(f.read().split()[:2])))
    # The laptop's ssh configuration: real host key checking against the
    # login node's key, nothing from the machine's own ~/.ssh.
    (tmp / "ssh_config").write_text("UserKnownHostsFile %s\nStrictHostKeyChecking yes\nGlobalKnownHostsFile /dev/null\n"
                                    % (tmp / "known_hosts"))
    config, pidfile = sshd_config(tmp, ADDR_GL, hostkey, "AllowTcpForwarding yes\n")
    links = (("l" + tag[-8:], lap, ADDR_L, "gl" + tag[-8:], login, ADDR_GL),
             ("gc" + tag[-8:], login, ADDR_GC, "c" + tag[-8:], clu, ADDR_C))
    try:
        ns_add(lap, login, clu)
        for d1, n1, a1, d2, n2, a2 in links:
            ns_link(n1, d1, a1, n2, d2, a2)
        # The login node routes nothing (a new namespace has forwarding off):
        assert sh("ip", "netns", "exec", login, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0"
        sh("ip", "netns", "exec", login, "/usr/sbin/sshd", "-f", config)
        wait_for(lambda: os.path.exists(pidfile), 10, what="sshd on the login node")
        yield {"laptop": lap, "login": login, "cluster": clu, "tmp": tmp, "key": key, "wrong": wrong,
               "ssh": "ssh -F %s" % (tmp / "ssh_config")}
    finally:
        stop_sshd(pidfile)
        ns_del(lap, login, clu)


@pytest.fixture(scope="module")
def cluster(net):
    d = new_dir()
    try:
        r = subprocess.run(["ip", "netns", "exec", net["cluster"], IPCLUSTER, "mpirun", "-n", "2", "--ipmpi-dir", d,
                            "--client-ip", ADDR_C, "--timeout", "120"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180, env=child_env())
        assert r.returncode == 0, "ipcluster in the cluster namespace failed:\n" + r.stdout
        sec = os.path.join(d, "security")
        furls = {c: os.path.join(sec, "ipcontroller-%s.furl" % c) for c in ("mec", "tc")}
        with open(furls["mec"]) as f:
            assert "@%s:" % ADDR_C in f.read()
        yield furls
    finally:
        try:
            subprocess.run(["ip", "netns", "exec", net["cluster"], IPCLUSTER, "stop", "--ipmpi-dir", d],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60, env=child_env())
        finally:
            kill_dir_jobs(d)
            shutil.rmtree(d, ignore_errors=True)


def on_laptop(net, code, *args, timeout=90):
    """Runs Python code on the laptop; returns (rc, output, {NAME: json value} of 'NAME json' lines)."""
    env = child_env()
    env["IPMPI_SSH"] = net["ssh"]
    r = subprocess.run(["ip", "netns", "exec", net["laptop"], PYTHON, "-c", code] + [str(a) for a in args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, env=env)
    vals = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^([A-Z_]+) (.*)$", line)
        if m:
            try:
                vals[m.group(1)] = json.loads(m.group(2))
            except ValueError:
                pass
    return r.returncode, r.stdout, vals


def ssh_left(marker):
    """Processes still running ssh with marker (a key path) on their command line."""
    left = []
    for p in processes_with(re.escape(marker)):
        try:
            with open("/proc/%d/cmdline" % p, "rb") as f:
                if b"ssh" in f.read():
                    left.append(p)
        except OSError:
            pass
    return left


def nothing_left(marker):
    wait_for(lambda: not ssh_left(marker), 10, what="no ssh process left with %s" % marker)
    return True


USE = r"""
import json, sys, time, numpy
from ipmpi import client
mec_furl, tc_furl, key = sys.argv[1:4]
def say(k, v): print(k, json.dumps(v), flush=True)
try:                                  # no route from the laptop to the cluster
    client.MultiEngineClient(mec_furl, connect_timeout=3)
    say("DIRECT", "connected")
except Exception as e:
    say("DIRECT", "%s: %s" % (type(e).__name__, e))
t0 = time.monotonic()
mec = client.MultiEngineClient(mec_furl, sshserver="root@%s" % sys.argv[4], sshkey=key, timeout=60, shm=False)
say("CONNECT_S", time.monotonic() - t0)
t = mec.tunnel
say("TUNNEL", [t.local_port, t.proc.pid, t.alive, mec._conn.host, mec._conn.port, repr(mec)])
say("IDS", mec.get_ids())
r = mec.execute("import socket, os; ns = os.readlink('/proc/self/ns/net')")
a = numpy.arange(1 << 20, dtype=numpy.float64)          # 8 MiB each way through ssh
mec.push(dict(a=a))
back = mec.pull("a")
say("ARRAY", [bool((b == a).all()) for b in back])
tc = client.TaskClient(tc_furl, sshserver="root@%s" % sys.argv[4], sshkey=key, timeout=60)
tid = tc.run(client.StringTask("y = 6 * 7", pull="y"))
say("TASK", tc.get_task_result(tid, block=True)["y"])
say("TC_TUNNEL", tc.tunnel.local_port != t.local_port)
tc.close()
say("TC_CLOSED", tc.tunnel.alive)
mec.close()
say("MEC_CLOSED", t.alive)
mec2 = client.MultiEngineClient(mec_furl, sshserver="root@%s:22" % sys.argv[4], sshkey=key, timeout=60)
say("AGAIN", [mec2.get_ids(), mec2.tunnel.local_port])
say("EXITING", mec2.tunnel.proc.pid)   # exits without close(): atexit ends ssh
"""


def test_mec_and_tc_through_the_login_node(net, cluster):
    rc, out, v = on_laptop(net, USE, cluster["mec"], cluster["tc"], net["key"], ADDR_GL)
    assert rc == 0, out
    assert "unreachable" in v["DIRECT"].lower() and "connected" != v["DIRECT"], out
    port, pid, alive, host, cport, rep = v["TUNNEL"]
    assert alive and host == "127.0.0.1" and cport == port, out
    assert "via ssh root@%s" % ADDR_GL in rep and ADDR_C in rep, out
    assert v["IDS"] == [0, 1] and v["ARRAY"] == [True, True], out
    assert v["TASK"] == 42 and v["TC_TUNNEL"] is True and v["TC_CLOSED"] is False, out
    assert v["MEC_CLOSED"] is False, out
    assert v["AGAIN"][0] == [0, 1], out
    assert not os.path.exists("/proc/%d" % v["EXITING"]) or nothing_left(net["key"])
    assert nothing_left(net["key"])


MODERN = r"""
import json, sys
import ipmpi
mec_furl, key, login = sys.argv[1:4]
def say(k, v): print(k, json.dumps(v), flush=True)
rc = ipmpi.Client(mec_furl, sshserver="root@%s" % login, sshkey=key, progress=False)
say("IDS", rc.ids)
say("APPLY", rc[:].apply_sync(lambda x: 2 * x, 21))
say("LVIEW", rc.load_balanced_view().map_sync(lambda x: x * x, range(6)))
say("TUNNELS", [rc._mec.tunnel.alive, rc._tc.tunnel.alive, rc._mec.tunnel.local_port != rc._tc.tunnel.local_port])
t1, t2 = rc._mec.tunnel, rc._tc.tunnel
rc.close()
say("CLOSED", [t1.alive, t2.alive])
"""


def test_modern_client_through_the_login_node(net, cluster):
    # ipmpi.Client(url_file, sshserver=...) uses MultiEngineClient's tunnels,
    # one for its direct views and one for its load-balanced view.
    rc, out, v = on_laptop(net, MODERN, cluster["mec"], net["key"], ADDR_GL)
    assert rc == 0, out
    assert v["IDS"] == [0, 1] and v["APPLY"] == [42, 42], out
    assert v["LVIEW"] == [0, 1, 4, 9, 16, 25], out
    assert v["TUNNELS"] == [True, True, True] and v["CLOSED"] == [False, False], out
    assert nothing_left(net["key"])


def test_the_pin_and_the_key_still_hold_through_the_tunnel(net, cluster):
    code = r"""
import json, sys
from ipmpi import client
furl = open(sys.argv[1]).read().strip()
fp, rest = furl[len("ipmpi+tls://"):].split("@", 1)
key = rest.rsplit("/", 1)[1]
bad_fp = "ipmpi+tls://" + ("0" if fp[0] != "0" else "1") + fp[1:] + "@" + rest
bad_key = furl[: -len(key)] + ("0" if key[0] != "0" else "1") + key[1:]
for name, f in (("FP", bad_fp), ("KEY", bad_key), ("TCCAP", open(sys.argv[3]).read().strip())):
    try:
        client.MultiEngineClient(f, sshserver="root@" + sys.argv[2], sshkey=sys.argv[4], connect_timeout=15)
        print(name, json.dumps("connected"))
    except Exception as e:
        print(name, json.dumps("%s: %s" % (type(e).__name__, e)), flush=True)
"""
    rc, out, v = on_laptop(net, code, cluster["mec"], ADDR_GL, cluster["tc"], net["key"])
    assert rc == 0, out
    assert v["FP"].startswith("ConnectionError") and "fingerprint" in v["FP"].lower(), out
    assert v["KEY"].startswith("PermissionError: through the ssh tunnel via root@%s" % ADDR_GL), out
    assert "wrong key" in v["KEY"], out
    assert v["TCCAP"].startswith("PermissionError") and "TaskClient" in v["TCCAP"], out
    assert nothing_left(net["key"])


BAD = r"""
import json, sys, time
from ipmpi import client
t0 = time.monotonic()
try:
    client.MultiEngineClient(sys.argv[1], sshserver=sys.argv[2], sshkey=sys.argv[3], connect_timeout=20)
    print("R", json.dumps("connected"))
except Exception as e:
    print("R", json.dumps("%s: %s" % (type(e).__name__, e)))
print("S", json.dumps(time.monotonic() - t0))
"""


def test_a_tunnel_host_that_refuses_is_named_in_ssh_words(net, cluster):
    rc, out, v = on_laptop(net, BAD, cluster["mec"], "root@%s:2222" % ADDR_GL, net["key"])
    assert rc == 0, out
    assert v["R"].startswith("ConnectionError: ssh tunnel through root@%s:2222 failed" % ADDR_GL), out
    assert "ssh: connect to host %s port 2222: Connection refused" % ADDR_GL in v["R"], out
    assert v["S"] < 10, out
    assert nothing_left(net["key"])


def test_a_wrong_ssh_key_is_named_in_ssh_words(net, cluster):
    rc, out, v = on_laptop(net, BAD, cluster["mec"], "root@%s" % ADDR_GL, net["wrong"])
    assert rc == 0, out
    assert v["R"].startswith("ConnectionError: ssh tunnel through root@%s failed (ssh exited with status 255)"
                             % ADDR_GL), out
    assert "Permission denied (publickey" in v["R"], out
    assert v["S"] < 10, out
    assert nothing_left(net["wrong"])


def test_a_login_node_that_cannot_reach_the_controller_says_so(net, cluster):
    code = r"""
import json, sys
from ipmpi import client
furl = open(sys.argv[1]).read().strip()
furl = furl.replace(":%s/" % furl.split(":")[-1].split("/")[0], ":9/")     # a port nobody listens on
try:
    client.MultiEngineClient(furl, sshserver="root@" + sys.argv[2], sshkey=sys.argv[3], connect_timeout=10)
    print("R", json.dumps("connected"))
except Exception as e:
    print("R", json.dumps("%s: %s" % (type(e).__name__, e)))
"""
    rc, out, v = on_laptop(net, code, cluster["mec"], ADDR_GL, net["key"])
    assert rc == 0, out
    assert v["R"].startswith("ConnectionError: through the ssh tunnel via root@%s to %s:9" % (ADDR_GL, ADDR_C)), out
    assert "open failed" in v["R"] and "Connection refused" in v["R"], out
    assert nothing_left(net["key"])


def test_ssh_ends_when_the_client_process_is_killed(net, cluster):
    code = r"""
import sys, time
from ipmpi import client
mec = client.MultiEngineClient(sys.argv[1], sshserver="root@" + sys.argv[2], sshkey=sys.argv[3], timeout=60)
print("PID", mec.tunnel.proc.pid, mec.get_ids(), flush=True)
time.sleep(120)
"""
    env = child_env()
    env["IPMPI_SSH"] = net["ssh"]
    p = subprocess.Popen(["ip", "netns", "exec", net["laptop"], PYTHON, "-c", code, cluster["mec"], ADDR_GL,
                          net["key"]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("PID"), line + p.stdout.read()
        assert line.split()[2:] == ["[0,", "1]"], line
        assert ssh_left(net["key"]), "no ssh running while the client is connected"
        p.kill()                     # SIGKILL: no atexit, no close()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert nothing_left(net["key"])
