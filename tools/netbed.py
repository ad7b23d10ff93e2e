"""Hosts made of network namespaces (ENVIRONMENT.md), for the system tests
(tests/system/conftest.py imports these) and the benchmarks that span
"nodes" (bench/bench_bcast.py --nodes 2): namespaces joined by their own
veth pair, addresses only inside them, and a real sshd in one of them.
Needs root, iproute2 and openssh-server; without them the callers fail,
naming the package.
"""
import os
import shutil
import signal
import subprocess


def sh(*argv, timeout=30, check=True, **kw):
    """Runs argv; its output (stdout and stderr together) in .stdout. With
    check, a failure raises AssertionError with that output."""
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d): %s" % (" ".join(argv), r.returncode, r.stdout))
    return r


def ns_add(*names):
    """New network namespaces with their loopback up (mpirun needs it)."""
    if shutil.which("ip") is None:
        raise RuntimeError("iproute2's `ip` is missing: apt-get install iproute2")
    for ns in names:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def ns_link(ns1, dev1, addr1, ns2, dev2, addr2, prefix=24):
    """A veth pair between two namespaces, addresses only inside them (never
    on the machine's own interfaces)."""
    sh("ip", "link", "add", dev1, "netns", ns1, "type", "veth", "peer", "name", dev2, "netns", ns2)
    for ns, dev, addr in ((ns1, dev1, addr1), (ns2, dev2, addr2)):
        sh("ip", "-n", ns, "addr", "add", "%s/%d" % (addr, prefix), "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def ns_del(*names):
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)


def need_sshd():
    """ip, ssh, ssh-keygen and sshd, or a failure naming the package."""
    for tool, pkg in (("ip", "iproute2"), ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            raise RuntimeError("%s is missing: apt-get install %s" % (tool, pkg))
    if not os.path.exists("/usr/sbin/sshd"):
        raise RuntimeError("/usr/sbin/sshd is missing: apt-get install openssh-server")


def sshd_config(tmp, listen, hostkey, extra=""):
    """Writes tmp/sshd_config for a test sshd on address listen (keys only,
    root allowed, the client keys in tmp/authorized_keys); returns (its
    path, the pid file it will write)."""
    pidfile = str(tmp / "sshd.pid")
    (tmp / "sshd_config").write_text(
        "ListenAddress %s\nHostKey %s\nAuthorizedKeysFile %s\nPidFile %s\nStrictModes no\n"
        "UsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n%s"
        % (listen, hostkey, tmp / "authorized_keys", pidfile, extra))
    os.makedirs("/run/sshd", exist_ok=True)
    return str(tmp / "sshd_config"), pidfile


def stop_sshd(pidfile):
    """Ends the sshd that wrote pidfile, if it did."""
    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
