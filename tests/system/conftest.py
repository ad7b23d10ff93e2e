"""Shared pieces of the system tests: real clusters, raw protocol frames.

Every test here runs real processes: `ipcluster mpirun` (the build tree's,
found next to $IPMPI_BIN), mpirun, the controller and engines, TLS and the
Python client. make check sets PYTHONPATH, PATH and IPMPI_BIN (Makefile.am's
AM_TESTS_ENVIRONMENT). Each cluster gets its own temporary IPMPI_DIR; the
fixtures always stop their cluster and, as a last resort, kill every process
of its session. Every wait is bounded.
"""
import contextlib
import glob
import hashlib
import os
import pty
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tools"))
from netbed import need_sshd, ns_add, ns_del, ns_link, sh, sshd_config, stop_sshd  # noqa: E402
# The test modules take these from here (`from conftest import ...`).
NETBED = (need_sshd, ns_add, ns_del, ns_link, sh, sshd_config, stop_sshd)
from ipmpi import _consts, _ipmpi
from ipmpi import cluster as ipcluster_mod

IPMPI_BIN = os.environ.get("IPMPI_BIN")
if not IPMPI_BIN or not os.path.exists(IPMPI_BIN):
    raise RuntimeError("IPMPI_BIN must name the build tree's ipmpi: run these tests with `make check`")
BUILD_DIR = os.path.dirname(os.path.abspath(IPMPI_BIN))
IPCLUSTER = os.path.join(BUILD_DIR, "ipcluster")
PYTHON = os.environ.get("PYTHON") or "/usr/bin/python3"
# Tests only ever talk to this machine's loopback.
LOOPBACK = "127.0.0.1"

# Protocol constants for raw frames: the C headers' tables, as the
# generated ipmpi._consts and the client module carry them.
MAGIC = _ipmpi.MAGIC
VERSION = _ipmpi.PROTO_VERSION
HDR = struct.Struct("<IBBHQiiIIQ")
assert HDR.size == _ipmpi.HDR_SIZE
F_REPLY = _consts.F_REPLY
K_HELLO, K_EXECUTE, K_GET_IDS = _consts.K_HELLO, _consts.K_EXECUTE, _consts.K_GET_IDS
TARGET_ALL, TARGET_CONTROLLER = _consts.TARGET_ALL, _consts.TARGET_CONTROLLER
EPROTO, E2BIG, EACCES = _consts.EPROTO, _consts.E2BIG, _consts.EACCES


def child_env():
    """Environment for child processes: the build tree first, Open MPI as root allowed."""
    env = dict(os.environ)
    env["PATH"] = BUILD_DIR + os.pathsep + env.get("PATH", "")
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


# Profile directories this session made (new_dir) and the Open MPI
# shared-memory segments there were before it: pytest_sessionfinish removes
# what the session left behind.
_made_dirs = []
_shm_before = set()
SHM_GLOB = "/dev/shm/vader_segment.*"


def new_dir(prefix="ipmpi-test-"):
    d = tempfile.mkdtemp(prefix=prefix)
    _made_dirs.append(d)
    return d


def _shm_mapped():
    """The /dev/shm files some live process maps (another test program's
    running job among them)."""
    mapped = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/maps" % pid) as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        mapped.add(line[i:].rstrip("\n").replace(" (deleted)", ""))
        except OSError:
            pass
    return mapped


def pytest_sessionstart(session):
    _shm_before.update(glob.glob(SHM_GLOB))


def pytest_sessionfinish(session, exitstatus):
    """Removes the profile directories of this session (kept, with their
    logs, when a test failed) and the shared-memory segments its killed
    jobs left in /dev/shm (Open MPI removes them only on a clean exit); a
    segment a live process maps stays."""
    if exitstatus == 0:
        for d in _made_dirs:
            shutil.rmtree(d, ignore_errors=True)
    mapped = _shm_mapped()
    for path in set(glob.glob(SHM_GLOB)) - _shm_before - mapped:
        try:
            os.unlink(path)
        except OSError:
            pass


def ipcluster(*args, timeout=180, ipmpi_dir=None, check=False):
    """Runs the build tree's ipcluster; returns the CompletedProcess."""
    argv = [IPCLUSTER] + [str(a) for a in args]
    if ipmpi_dir is not None:
        argv += ["--ipmpi-dir", ipmpi_dir]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout, env=child_env())
    if check and r.returncode != 0:
        raise AssertionError("ipcluster %s failed (%d):\n%s\n%s" % (args, r.returncode, r.stdout, r.stderr))
    return r


def job_processes(sid):
    return ipcluster_mod.job_processes(sid)


def processes_with(text):
    """PIDs of live processes whose command line contains text (pgrep -f)."""
    r = subprocess.run(["pgrep", "-f", "--", text], stdout=subprocess.PIPE, text=True, timeout=10)
    mine = {os.getpid()}
    return [int(p) for p in r.stdout.split() if int(p) not in mine]


def kill_dir_jobs(ipmpi_dir):
    """Last resort: SIGKILL every process whose command line names ipmpi_dir."""
    for pid in processes_with(ipmpi_dir):
        try:
            st = ipcluster_mod._proc_stat(pid)
            if st is not None:
                for p in job_processes(st[3]):
                    os.kill(p, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def controller_log(log_dir):
    """The text of the controller's log(s) in log_dir (ipcontroller-PID.log)."""
    text = ""
    for name in sorted(os.listdir(log_dir)):
        if name.startswith("ipcontroller-"):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                text += f.read()
    return text


BELL_LINE = re.compile(r"slept on its bell (\d+) times while engines worked, woken by a ring (\d+) times; "
                       r"(\d+) rings from other nodes")


def controller_pid(cluster):
    """The controller's pid: the one its log file is named after."""
    for name in os.listdir(cluster.log_dir):
        m = re.match(r"ipcontroller-(\d+)\.log$", name)
        if m:
            return int(m.group(1))
    raise AssertionError("no controller log in %s" % cluster.log_dir)


def proc_status_kb(pid, field):
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for pid %d" % (field, pid))


def bell_counts(log_dir):
    """(sleeps, rings that ended one, rings from other nodes) from the line
    a stopped controller logs about its bell (src/doorbell.h)."""
    text = controller_log(log_dir)
    m = BELL_LINE.search(text)
    assert m, "no bell line in the controller's log:\n" + text[-3000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def wait_for(pred, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(interval)


def start_cluster(n=4, **kw):
    """A started Cluster in a fresh IPMPI_DIR, on loopback."""
    kw.setdefault("client_ip", LOOPBACK)
    kw.setdefault("ipmpi_bin", IPMPI_BIN)
    d = kw.pop("ipmpi_dir", None) or new_dir()
    c = ipcluster_mod.Cluster(n=n, ipmpi_dir=d, **kw)
    c.start(timeout=180)
    return c


def stop_cluster(c):
    """Stops c, whatever state it is in; nothing of it survives."""
    try:
        c.stop(timeout=20)
    finally:
        if c.pid is not None:
            for p in job_processes(c.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        kill_dir_jobs(c.ipmpi_dir)


def running_cluster(n, **kw):
    """Generator for fixtures: a started n-engine cluster (kw as for
    start_cluster), always stopped and removed."""
    c = start_cluster(n, **kw)
    try:
        yield c
    finally:
        stop_cluster(c)
        shutil.rmtree(c.ipmpi_dir, ignore_errors=True)


def connected_client(c):
    """Generator for fixtures: a MultiEngineClient of cluster c, always closed."""
    m = c.client(timeout=120)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(scope="module")
def cluster4():
    """One 4-engine cluster shared by the tests of a module."""
    yield from running_cluster(4)


@pytest.fixture(scope="module")
def mec(cluster4):
    yield from connected_client(cluster4)


# ---- raw protocol, for the refusal tests ---------------------------------

def parse_furl(path):
    with open(path) as f:
        text = f.read().strip()
    assert text.startswith("ipmpi+tls://"), text
    rest = text[len("ipmpi+tls://"):]
    fp, rest = rest.split("@", 1)
    hostport, key = rest.split("/", 1)
    host, port = hostport.rsplit(":", 1)
    return fp, host.strip("[]"), int(port), key


def frame(kind, req_id, target=TARGET_CONTROLLER, parts=(), status=0, flags=0, version=VERSION,
          magic=MAGIC, lens=None, total=0, aux=0):
    parts = [bytes(p) for p in parts]
    if lens is None:
        lens = [len(p) for p in parts]
    head = HDR.pack(magic, version, kind, flags, req_id, target, status, total, len(lens), aux)
    return head + b"".join(struct.pack("<Q", n) for n in lens) + b"".join(parts)


def tls_connect(furl_path, max_version=None, timeout=10):
    """A TLS socket to the controller of furl_path, with its certificate pinned."""
    fp, host, port, _ = parse_furl(furl_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        s = ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    der = s.getpeercert(binary_form=True)
    assert hashlib.sha256(der).hexdigest() == fp.lower(), "controller certificate does not match furl"
    return s


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def read_frame(s):
    """(kind, flags, req_id, target, status, total, parts) of the next frame."""
    magic, version, kind, flags, req_id, target, status, total, nparts, _aux = HDR.unpack(recv_exact(s, 40))
    assert magic == MAGIC and version == VERSION
    lens = [struct.unpack("<Q", recv_exact(s, 8))[0] for _ in range(nparts)]
    parts = [recv_exact(s, n) for n in lens]
    return kind, flags, req_id, target, status, total, parts


def hello(s, key, req_id=1):
    s.sendall(frame(K_HELLO, req_id, parts=[key.encode()]))
    return read_frame(s)


def closed_by_peer(s, timeout):
    """True if the peer closes s within timeout (frames sent before the close are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except socket.timeout:
            return False
        except (ssl.SSLError, ConnectionError, OSError):
            return True
        if not data:
            return True
    return False


# ---- hosts made of network namespaces: tools/netbed.py -------------------

# ---- profile directories for ipcluster runs -------------------------------

@pytest.fixture
def ipdir():
    """A fresh IPMPI_DIR; afterwards whatever a test left behind is stopped
    (ipcluster stop, which also cancels batch jobs), then every process
    still naming it is killed and it is removed."""
    d = new_dir()
    try:
        yield d
    finally:
        if os.path.exists(os.path.join(d, "run", "ipcluster.json")):
            ipcluster("stop", "--timeout", "10", ipmpi_dir=d, timeout=90)
        kill_dir_jobs(d)
        shutil.rmtree(d, ignore_errors=True)


def run_record(d):
    """The run file ipcluster keeps for the job of profile directory d."""
    import json
    with open(os.path.join(d, "run", "ipcluster.json")) as f:
        return json.load(f)


def pty_run(argv, env, timeout, stdin_text=None, sigint_after=None, events=None):
    """Runs argv with stdout and stderr a pty (a terminal, as a user's), stdin
    stdin_text (or nothing); returns (exit status, [(time.monotonic(), text)]
    of what it wrote, as it came). Killed after timeout s.

    sigint_after=(pattern, delay): delay s after its output first matched
    the regular expression pattern, the process gets SIGINT, as from a
    user's Ctrl-C; events (a list) then gets ('SIGINT', time.monotonic())."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                         stdout=slave, stderr=slave, env=env, close_fds=True, text=True)
    os.close(slave)
    if stdin_text is not None:
        p.stdin.write(stdin_text)
        p.stdin.close()
    seen = []
    deadline = time.monotonic() + timeout
    text, fire_at = "", None
    try:
        while time.monotonic() < deadline:
            if sigint_after is not None:
                if fire_at is None and re.search(sigint_after[0], text):
                    fire_at = time.monotonic() + sigint_after[1]
                if fire_at is not None and time.monotonic() >= fire_at:
                    p.send_signal(signal.SIGINT)
                    if events is not None:
                        events.append(("SIGINT", time.monotonic()))
                    sigint_after = None
            r, _w, _x = select.select([master], [], [], 0.05 if fire_at is not None and sigint_after else 0.5)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                seen.append((time.monotonic(), data.decode("utf-8", "replace")))
                text += seen[-1][1]
            elif p.poll() is not None:
                break
        p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        os.close(master)
    return p.returncode, seen


@contextlib.contextmanager
def jupyter_kernel(env):
    """A real Jupyter kernel (the python3 kernel spec, which must run
    PYTHON) started with env; yields its blocking client; always shut
    down."""
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="python3")
    if km.kernel_spec.argv[0] != PYTHON:
        raise AssertionError("the python3 kernel runs %s, not %s" % (km.kernel_spec.argv[0], PYTHON))
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def jupyter_run(kc, code, timeout):
    """Executes code in kernel client kc; (the reply's content, [(time,
    stream name, text)] of the stream messages, as they came)."""
    streams = []

    def on_msg(msg):
        if msg["msg_type"] == "stream":
            streams.append((time.monotonic(), msg["content"]["name"], msg["content"]["text"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=on_msg)
    return reply["content"], streams


# A real IPython shell as a user starts it, without colours or history.
IPYTHON_ARGV = [PYTHON, "-m", "IPython", "--no-banner", "--colors=NoColor", "--HistoryManager.enabled=False",
                "--TerminalInteractiveShell.confirm_exit=False"]


def ipython_on_a_pty(cluster, session, timeout, env=None, **kw):
    """Types session into a real IPython shell on a pty (stdout a
    terminal) whose IPMPI_DIR is cluster's: pty_run's (status, seen)."""
    env = dict(child_env() if env is None else env)
    env["IPMPI_DIR"] = cluster.ipmpi_dir
    return pty_run(IPYTHON_ARGV + ["--simple-prompt"], env, timeout, stdin_text=session, **kw)


def progress_env(mode):
    """The environment of a client whose progress display is "auto" (as
    installed), "plain" (one line, no tqdm) or "off" (IPMPI_PROGRESS=0)."""
    env = child_env()
    env.pop("IPMPI_PROGRESS", None)
    if mode == "plain":
        env["IPMPI_PROGRESS"] = "plain"
    elif mode == "off":
        env["IPMPI_PROGRESS"] = "0"
    return env


def px_streams_in_jupyter(cluster, setup, engines, timeout, then=()):
    """In a real Jupyter kernel whose IPMPI_DIR is cluster's: runs setup
    (which activates the magics), then a %px of 3 s that prints tick and
    tock, then the cells of then (each must succeed); checks that the
    engines (and only they) showed both and that tick was shown while the
    code still ran. Returns the streamed text of the %px."""
    env = child_env()
    env["IPMPI_DIR"] = cluster.ipmpi_dir
    with jupyter_kernel(env) as kc:
        content, _s = jupyter_run(kc, setup, timeout)
        assert content["status"] == "ok", content
        t0 = time.monotonic()
        content, streams = jupyter_run(kc, "%px import time; print('tick'); time.sleep(3); print('tock')", timeout)
        t_end = time.monotonic()
        for cell in then:
            after, _s = jupyter_run(kc, cell, timeout)
            assert after["status"] == "ok", (cell, after)
    assert content["status"] == "ok", content
    text = "".join(s for _t, _n, s in streams)
    for i in range(4):
        shown = "[%d] tick" % i in text and "[%d] tock" % i in text
        assert shown == (i in engines), text
    t_tick = min(t for t, _n, s in streams if "tick" in s)
    assert t_tick < t_end - 1.5, "tick shown %.2f s after the start, %.2f s before the end" % (
        t_tick - t0, t_end - t_tick)
    return text


def first_seen(seen, pattern):
    """When (time.monotonic()) the output pty_run recorded first matched
    the regular expression pattern (the text so far), or None."""
    acc = ""
    rx = re.compile(pattern)
    for t, s in seen:
        acc += s
        if rx.search(acc):
            return t
    return None


def run_ctrl_c(argv, delays, timeout):
    """Runs argv (a client that prints READY when it is waiting), then sends
    it SIGINT after each of delays (seconds, one after the other), as a user
    pressing Ctrl-C; returns its output (stdout and stderr)."""
    p = subprocess.Popen(argv, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        first = p.stdout.readline()
        assert first.startswith("READY"), first + p.stdout.read()
        for d in delays:
            time.sleep(d)
            p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out
