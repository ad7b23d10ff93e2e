"""Same-host shared memory (doc/protocol.md section 5) on one real cluster.

A client on the controller's node sends parts of 1 MiB or more in memfds
and gets large reply parts back in the controller's memfds, which it copies
out and RELEASEs. Checked here: when the path is on and when it is off
(shm=False, IPMPI_SHM=0); that every round trip gives the same values as
the TLS path; that released memfds do not pile up in the controller; that
hand-made frames naming fds the controller must not trust are refused with
EACCES (connection kept) and malformed shm tables with EPROTO (connection
closed); and that a client that leaves without releasing costs nothing
lasting.

One 2-engine cluster for the module; every wait is bounded (client
timeouts, socket timeouts, wait_for).
"""
import fcntl
import json
import os
import socket
import struct
import tempfile
import time

import numpy as np
import pytest

from conftest import (E2BIG, EACCES, EPROTO, F_REPLY, K_GET_IDS, TARGET_CONTROLLER, closed_by_peer, connected_client,
                      frame, hello, job_processes, parse_furl, read_frame, running_cluster, tls_connect,
                      wait_for)
from ipmpi import _consts, _serialize
from ipmpi import _ipmpi

MIB = 1 << 20
# Protocol constants of section 5 (include/ipmpi/protocol.h, through the
# generated ipmpi._consts).
F_SHM, F_SHM_OK = _consts.F_SHM, _consts.F_SHM_OK
K_PUSH, K_PULL = _consts.K_PUSH, _consts.K_PULL
K_SHM_PROBE, K_RELEASE = _consts.K_SHM_PROBE, _consts.K_RELEASE
SHMREF = struct.Struct("<IIQQQ")
assert SHMREF.size == 32
# The bound on the controller's open memfds the release tests hold it to.
MEMFD_BOUND = 8
ENGINES = [0, 1]
TIMEOUT = 120


def main_function(src, name):
    """A function defined in __main__ (as at the prompt), so cloudpickle sends it by value."""
    ns = {"__name__": "__main__"}
    exec(src, ns)
    return ns[name]


def floats(nbytes, seed):
    return np.random.default_rng(seed).random(nbytes // 8)


def assert_same_array(got, want):
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def own_host_id():
    """This process's host id as HELLO's "host" spells it: "<boot_id>/<pidns inode>"."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return "%s/%d" % (boot, os.stat("/proc/self/ns/pid").st_ino)


def furl_text(path):
    with open(path) as f:
        return f.read().strip()


# ---- fixtures ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster2():
    yield from running_cluster(2)


@pytest.fixture(scope="module", autouse=True)
def no_ipmpi_shm_from_outside():
    """An IPMPI_SHM=0 in the caller's environment would turn off what this
    module tests; tests that want it set it themselves (monkeypatch)."""
    saved = os.environ.pop("IPMPI_SHM", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["IPMPI_SHM"] = saved


@pytest.fixture(scope="module")
def mec_shm(cluster2):
    """The default client: co-located, so shared memory is on, by process
    memory (process_vm_readv) since nothing forbids ptrace here."""
    yield from connected_client(cluster2)


def memfd_client(cluster):
    """A client made with IPMPI_SHM=memfd (the environment is restored)."""
    os.environ["IPMPI_SHM"] = "memfd"
    try:
        return cluster.client(timeout=TIMEOUT)
    finally:
        del os.environ["IPMPI_SHM"]


@pytest.fixture(scope="module")
def mec_memfd(cluster2):
    """A client told to use memfds only (IPMPI_SHM=memfd), the path taken
    where ptrace between client and controller is forbidden."""
    m = memfd_client(cluster2)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(scope="module")
def mec_tls(cluster2):
    m = cluster2.client(timeout=TIMEOUT, shm=False)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(params=["vm", "memfd", "tls"])
def anymec(request, mec_shm, mec_memfd, mec_tls):
    """Each round-trip test runs once per path."""
    m, path = {"vm": (mec_shm, "process memory"), "memfd": (mec_memfd, "memfd"),
               "tls": (mec_tls, None)}[request.param]
    assert m.shm is (path is not None)
    assert m.shm_path == path, (m.shm_path, m.shm_note)
    return m


# ---- the controller's memfds ------------------------------------------------

def controller_info(cluster):
    """The HELLO reply JSON of a raw mec session (it names the controller's pid)."""
    s = tls_connect(cluster.mec_furl)
    try:
        kind, flags, req_id, target, status, total, parts = hello(s, parse_furl(cluster.mec_furl)[3])
        assert status == 0, parts
        return json.loads(parts[0])
    finally:
        s.close()


@pytest.fixture(scope="module")
def controller_pid(cluster2):
    pid = int(controller_info(cluster2)["pid"])
    assert pid in job_processes(cluster2.pid), "HELLO's pid %d is not a process of the cluster" % pid
    return pid


def fd_link(pid, fd):
    try:
        return os.readlink("/proc/%d/fd/%d" % (pid, fd))
    except OSError:
        return None


def controller_memfds(pid):
    """{fd: inode} of the controller's open memfds named ipmpi*."""
    out = {}
    for e in os.listdir("/proc/%d/fd" % pid):
        link = fd_link(pid, int(e))
        if link is not None and link.startswith("/memfd:ipmpi"):
            try:
                out[int(e)] = os.stat("/proc/%d/fd/%s" % (pid, e)).st_ino
            except OSError:
                pass
    return out


def memfd_sizes(pid):
    """Sizes of the ipmpi memfds process pid has open."""
    out = []
    for fd in controller_memfds(pid):
        try:
            out.append(os.stat("/proc/%d/fd/%d" % (pid, fd)).st_size)
        except OSError:
            pass
    return out


def bounded_memfds(pid, timeout=15):
    """Waits until the controller holds at most MEMFD_BOUND ipmpi memfds; returns their count."""
    n = [None]

    def ok():
        n[0] = len(controller_memfds(pid))
        return n[0] <= MEMFD_BOUND

    try:
        wait_for(ok, timeout, what="controller memfds <= %d" % MEMFD_BOUND)
    except AssertionError:
        raise AssertionError("controller %d still holds %d ipmpi memfds (bound %d) after %g s"
                             % (pid, n[0], MEMFD_BOUND, timeout))
    return n[0]


# ---- raw frames with shm tables ---------------------------------------------

def table(*entries):
    """Shm table of (part, fd, offset, length[, reserved]) entries."""
    return b"".join(SHMREF.pack(*(tuple(e) + (0,) * (5 - len(e)))) for e in entries)


def memfd_with(data, name="ipmpi-test", size=None, offset=0, seal=True):
    """A memfd of this process holding data at offset (size defaults to the
    end of data), sealed against shrinking as the controller requires
    (src/common/shm.h: a peer could otherwise truncate it under a mapping)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data).cast("B")
        os.ftruncate(fd, offset + len(view) if size is None else size)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_shm_parts(parts, pid):
    """Parts of an F_SHM frame from pid with the named parts read from its
    memfds and the table removed; also the fds it named."""
    tab = parts[-1]
    assert len(tab) % SHMREF.size == 0 and tab, "shm table of %d bytes" % len(tab)
    out, fds, prev = list(parts[:-1]), [], -1
    for off in range(0, len(tab), SHMREF.size):
        idx, fd, offset, length, reserved = SHMREF.unpack_from(tab, off)
        assert reserved == 0 and prev < idx < len(out), (idx, prev, len(out), reserved)
        assert out[idx] == b"", "part %d is named in the table but has %d wire bytes" % (idx, len(out[idx]))
        prev = idx
        link = fd_link(pid, fd)
        assert link is not None and link.startswith("/memfd:ipmpi"), "fd %d of %d is %r" % (fd, pid, link)
        with open("/proc/%d/fd/%d" % (pid, fd), "rb") as f:
            f.seek(offset)
            data = f.read(length)
        assert len(data) == length
        out[idx] = data
        fds.append(fd)
    return out, fds


class RawSession:
    """A mec session over a raw TLS socket: HELLO, then frames by hand."""

    def __init__(self, cluster, probe=True, furl=None):
        furl = furl or cluster.mec_furl
        self.s = tls_connect(furl, timeout=30)
        self.s.settimeout(30)
        kind, flags, req_id, target, status, total, parts = hello(self.s, parse_furl(furl)[3])
        assert status == 0, parts
        self.info = json.loads(parts[0])
        self.ctl_pid = int(self.info["pid"])
        self.next_id = 100
        if probe:
            self.probe()

    def send(self, kind, target, parts, flags=0, aux=0, lens=None):
        self.next_id += 1
        self.s.sendall(frame(kind, self.next_id, target=target, parts=parts, flags=flags, aux=aux, lens=lens))
        return self.next_id

    def send_shm(self, kind, target, parts, tab, flags=F_SHM, pid=None):
        """parts with the table appended, F_SHM set and aux the sender pid."""
        return self.send(kind, target, list(parts) + [tab], flags=flags | F_SHM,
                         aux=os.getpid() if pid is None else pid)

    def read(self):
        return read_frame(self.s)

    def get_ids(self):
        """GET_IDS answers, and its reply is the next frame (no stray reply came before it)."""
        rid = self.send(K_GET_IDS, TARGET_CONTROLLER, [])
        kind, flags, req_id, target, status, total, parts = self.read()
        assert (kind, req_id, status) == (K_GET_IDS, rid, 0), (kind, req_id, status, parts)
        return json.loads(parts[0])

    def release(self, fds):
        self.send(K_RELEASE, TARGET_CONTROLLER, [struct.pack("<%dI" % len(fds), *fds)])

    def probe(self, nonce=None):
        """SHM_PROBE as section 5 says: HELLO's 32-byte shm_nonce by shm each way."""
        nonce = bytes.fromhex(self.info["shm_nonce"]) if nonce is None else nonce
        fd = memfd_with(nonce)
        try:
            rid = self.send_shm(K_SHM_PROBE, TARGET_CONTROLLER, [b""], table((0, fd, 0, 32)),
                                flags=F_SHM | F_SHM_OK)
            kind, flags, req_id, target, status, total, parts = self.read()
        finally:
            os.close(fd)
        assert (kind, req_id, status) == (K_SHM_PROBE, rid, 0), (kind, req_id, status, parts)
        assert flags & F_REPLY and flags & F_SHM, flags
        got, fds = read_shm_parts(parts, self.ctl_pid)
        assert got[0] == nonce
        self.release(fds)

    def close(self):
        self.s.close()


@pytest.fixture
def raw(cluster2):
    r = RawSession(cluster2)
    try:
        yield r
    finally:
        r.close()


def push_parts(name, arr):
    """PUSH parts {name: arr}: [pickle, the array's buffer]."""
    parts = _serialize.dumps({name: arr})
    assert len(parts) == 2 and parts[1].nbytes == arr.nbytes
    return parts


# ---- 1. who gets shared memory ----------------------------------------------

def test_hello_names_host_pid_and_uid(cluster2, controller_pid):
    info = controller_info(cluster2)
    assert info["host"] == own_host_id()
    assert int(info["uid"]) == os.geteuid()
    assert int(info["pid"]) == controller_pid


def test_shm_before_a_probe_is_refused(cluster2, mec_tls):
    """Shared memory is bound to the pid that showed HELLO's nonce: none
    before a probe, and only that pid's after it."""
    a = floats(2 * MIB, 31)
    head, buf = push_parts("unprobed", a)
    fd = memfd_with(buf)
    r = RawSession(cluster2, probe=False)
    try:
        for attempt in ("before", "other-pid"):
            if attempt == "other-pid":
                r.probe()
            pid = os.getpid() if attempt == "before" else os.getppid()
            rid = r.send_shm(K_PUSH, 0, [head, b""], table((1, fd, 0, a.nbytes)), pid=pid)
            kind, flags, req_id, target, status, total, parts = r.read()
            assert (kind, req_id, status) == (K_PUSH, rid, EACCES), (attempt, status, parts[:1])
            assert b"SHM_PROBE" in parts[0], parts[0]
            assert r.get_ids() == ENGINES
        with pytest.raises(Exception):
            mec_tls.pull("unprobed", targets=0)
    finally:
        os.close(fd)
        r.close()


@pytest.mark.parametrize("nonce", ["random", "inline"])
def test_probe_without_the_session_nonce_in_shared_memory_is_refused(cluster2, nonce):
    """A probe must show HELLO's nonce from shared memory: another value, or
    the right one inline, proves nothing and is refused."""
    r = RawSession(cluster2, probe=False)
    try:
        if nonce == "random":
            with pytest.raises(AssertionError):
                r.probe(nonce=os.urandom(32))
        else:
            rid = r.send(K_SHM_PROBE, TARGET_CONTROLLER, [bytes.fromhex(r.info["shm_nonce"])],
                         flags=F_SHM_OK)
            kind, flags, req_id, target, status, total, parts = r.read()
            assert (kind, req_id, status) == (K_SHM_PROBE, rid, EACCES), (status, parts)
        assert r.get_ids() == ENGINES
        r.probe()  # the right nonce still works afterwards
    finally:
        r.close()


def test_shm_probe_with_the_tc_capability(cluster2):
    r = RawSession(cluster2, probe=False, furl=cluster2.tc_furl)
    try:
        assert r.info["capability"] == "tc"
        r.probe()
        r.probe()
        assert r.get_ids() == ENGINES
    finally:
        r.close()


def test_colocated_client_uses_shm_unless_told_not_to(cluster2, mec_shm, mec_memfd, mec_tls, monkeypatch):
    assert mec_shm.shm is True
    assert mec_shm.shm_path == "process memory" and mec_shm.shm_note is None
    assert mec_memfd.shm is True and mec_memfd.shm_path == "memfd"
    assert "IPMPI_SHM=memfd" in mec_memfd.shm_note
    assert mec_tls.shm is False and mec_tls.shm_path is None
    assert "shm=False" in mec_tls.shm_note
    monkeypatch.setenv("IPMPI_SHM", "0")
    m = cluster2.client(timeout=TIMEOUT)
    try:
        assert m.shm is False
        assert m.get_ids() == ENGINES
    finally:
        m.close()
    monkeypatch.delenv("IPMPI_SHM")
    m = cluster2.client(timeout=TIMEOUT)
    try:
        assert m.shm is True
    finally:
        m.close()


def test_connection_shm_keyword_and_environment(cluster2, monkeypatch):
    furl = furl_text(cluster2.mec_furl)
    monkeypatch.delenv("IPMPI_SHM", raising=False)
    for kw, want in (({}, True), ({"shm": True}, True), ({"shm": False}, False)):
        conn = _ipmpi.Connection(furl, 30.0, **kw)
        try:
            assert conn.shm is want, kw
        finally:
            conn.close()
    monkeypatch.setenv("IPMPI_SHM", "0")
    conn = _ipmpi.Connection(furl, 30.0)
    try:
        assert conn.shm is False
    finally:
        conn.close()


# ---- 2. round trips, each path ----------------------------------------------

def test_8mib_array_to_one_engine(anymec):
    a = floats(8 * MIB, 1)
    anymec.push(dict(a8=a), targets=0)
    assert_same_array(anymec.pull("a8", targets=0)[0], a)


def test_8mib_array_to_all_engines(anymec):
    a = floats(8 * MIB, 2)
    anymec.push(dict(b8=a), targets="all")
    got = anymec.pull("b8", targets="all")
    assert len(got) == len(ENGINES)
    for g in got:
        assert_same_array(g, a)


def test_several_arrays_and_small_values_in_one_push(anymec):
    arrs = [floats(2 * MIB, 10 + i) for i in range(3)]
    ns = dict(x0=arrs[0], x1=arrs[1], x2=arrs[2], small=42, text="hi", tiny=np.arange(5))
    anymec.push(ns, targets=1)
    got = anymec.pull(["x0", "small", "x1", "text", "x2", "tiny"], targets=1)[0]
    for g, w in zip(got[0::2], arrs):
        assert_same_array(g, w)
    assert got[1] == 42 and got[3] == "hi"
    assert_same_array(got[5], np.arange(5))


@pytest.mark.parametrize("nbytes", [MIB - 8, MIB, MIB + 8], ids=["under-1MiB", "1MiB", "over-1MiB"])
def test_sizes_at_the_shm_threshold(anymec, nbytes):
    a = floats(nbytes, nbytes)
    anymec.push(dict(edge=a), targets=0)
    assert_same_array(anymec.pull("edge", targets=0)[0], a)


def test_bytes_and_bytearray_of_3mib(anymec):
    b = os.urandom(3 * MIB)          # bytes pickle in band: a 3 MiB part 0
    ba = bytearray(os.urandom(3 * MIB))  # bytearray goes out of band
    anymec.push(dict(bb=b, bba=ba, n=7), targets=0)
    got = anymec.pull(["bb", "bba", "n"], targets=0)[0]
    assert got[0] == b and bytes(got[1]) == bytes(ba) and got[2] == 7


def test_array_computed_on_the_engine(anymec):
    anymec.execute("import numpy as np; made = np.arange(%d, dtype=np.float64) * 0.5" % (4 * MIB // 8), targets=1)
    assert_same_array(anymec.pull("made", targets=1)[0], np.arange(4 * MIB // 8, dtype=np.float64) * 0.5)


def test_scatter_and_gather_of_8mib(anymec):
    a = floats(8 * MIB, 3)
    anymec.scatter("part", a)
    anymec.execute("part2 = part * 2")
    assert_same_array(anymec.gather("part2"), a * 2)


def test_map_with_large_arguments_and_results(anymec):
    f = main_function("def twice(v):\n    return v * 2\n", "twice")
    seq = [floats(2 * MIB, 20), floats(2 * MIB, 21)]
    got = anymec.map(f, seq)
    assert len(got) == 2
    for g, w in zip(got, seq):
        assert_same_array(g, w * 2)


def test_pipelined_pushes_and_pulls_keep_each_value(anymec):
    """Requests in flight together: each must see its own bytes."""
    arrs = {("p%d" % i): floats(2 * MIB, 30 + i) for i in range(6)}
    pend = [anymec.push({k: v}, targets=i % 2, block=False) for i, (k, v) in enumerate(arrs.items())]
    for p in pend:
        p.get_result(timeout=TIMEOUT)
    pulls = [(k, anymec.pull(k, targets=i % 2, block=False)) for i, k in enumerate(arrs)]
    for k, p in pulls:
        assert_same_array(p.get_result(timeout=TIMEOUT)[0], arrs[k])


def test_pulled_arrays_outlive_the_release(anymec):
    """A pulled array is the client's own copy: later pulls, released
    memfds and changes on the engine leave it alone."""
    a = floats(8 * MIB, 4)
    anymec.push(dict(keep=a), targets=0)
    first = anymec.pull("keep", targets=0)[0]
    anymec.execute("keep[:] = -1.0", targets=0)
    for _ in range(3):
        later = anymec.pull("keep", targets=0)[0]
    assert_same_array(first, a)
    assert (later == -1.0).all()
    first[:] = 0.0  # writable, and not the engine's
    assert (anymec.pull("keep", targets=0)[0] == -1.0).all()


def test_all_paths_agree_crosswise(mec_shm, mec_memfd, mec_tls):
    """What one path pushed, the others pull, and all pull the same."""
    a, b, c = floats(8 * MIB, 5), floats(8 * MIB, 6), floats(8 * MIB, 26)
    mec_shm.push(dict(cross_a=a), targets="all")
    mec_tls.push(dict(cross_b=b), targets="all")
    mec_memfd.push(dict(cross_c=c), targets="all")
    for m in (mec_shm, mec_memfd, mec_tls):
        got = m.pull(["cross_a", "cross_b", "cross_c"], targets="all")
        assert len(got) == len(ENGINES)
        for ga, gb, gc in got:
            assert_same_array(ga, a)
            assert_same_array(gb, b)
            assert_same_array(gc, c)


def test_process_memory_push_does_not_wait_for_a_busy_engine(mec_shm):
    """The controller copies a process-memory push as it arrives (and acks
    it): a push to a busy engine returns its PendingResult at once, and the
    caller may overwrite its array right away without changing what the
    engine gets."""
    a = floats(16 * MIB, 27)
    keep = a.copy()
    busy = mec_shm.execute("import time; time.sleep(2)", targets=0, block=False)
    t0 = time.monotonic()
    pend = mec_shm.push(dict(early=a), targets=0, block=False)
    assert time.monotonic() - t0 < 1.5, "push(block=False) waited for the busy engine"
    a[:] = -1.0  # the caller's buffer is the caller's again
    busy.get_result(timeout=TIMEOUT)
    pend.get_result(timeout=TIMEOUT)
    assert_same_array(mec_shm.pull("early", targets=0)[0], keep)


def test_big_parts_really_travel_by_memfd(mec_memfd, controller_pid):
    """mec.shm is not just a flag: a queued 24 MiB push sits in a memfd of
    this process until its reply, and a 24 MiB pull comes back in a memfd
    of the controller. 24 MiB is more than any other test moves, so no
    memfd the controller keeps for reuse can be mistaken for this one."""
    big = 24 * MIB
    assert not [n for n in memfd_sizes(controller_pid) if n >= big]
    a = floats(big, 16)
    busy = mec_memfd.execute("import time; time.sleep(1.5)", targets=0, block=False)
    pend = mec_memfd.push(dict(really=a), targets=0, block=False)
    mine = [n for n in memfd_sizes(os.getpid()) if n >= big]
    busy.get_result(timeout=TIMEOUT)
    pend.get_result(timeout=TIMEOUT)
    assert mine, "no ipmpi memfd of >= 24 MiB in the client while its push was queued"
    p = mec_memfd.pull("really", targets=0, block=False)
    wait_for(lambda: [n for n in memfd_sizes(controller_pid) if n >= big], 30, interval=0.002,
             what="the controller's memfd for a 24 MiB reply")
    assert_same_array(p.get_result(timeout=TIMEOUT)[0], a)


# ---- 3. released memfds do not pile up --------------------------------------

def test_released_reply_memfds_stay_bounded(mec_memfd, controller_pid):
    mec_shm = mec_memfd
    assert mec_shm.shm_path == "memfd"
    a = floats(8 * MIB, 7)
    mec_shm.push(dict(rel=a), targets="all")
    most = 0
    for i in range(30):
        assert_same_array(mec_shm.pull("rel", targets=0)[0], a)
        most = max(most, len(controller_memfds(controller_pid)))
    for i in range(10):
        for g in mec_shm.pull("rel", targets="all"):
            assert_same_array(g, a)
        most = max(most, len(controller_memfds(controller_pid)))
    assert most <= MEMFD_BOUND, "controller held %d ipmpi memfds during the pulls" % most
    bounded_memfds(controller_pid)


# ---- 4. refusals of hand-made shm frames ------------------------------------

def free_fd():
    """An fd number not open in this process."""
    n = max(int(e) for e in os.listdir("/proc/self/fd")) + 1000
    while True:
        try:
            os.fstat(n)
        except OSError:
            return n
        n += 1


def dead_pid():
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while os.path.exists("/proc/%d" % pid):
        pid -= 1
    return pid


SHM_VM = 0x80000000  # an entry naming process memory (protocol.h IPMPI_SHM_VM)


def refused_case(name, arr):
    """(shm table, pid for aux, fds to close) for a refusal case; the frame
    otherwise is a good PUSH of arr whose buffer (part 1) goes by shm."""
    n = arr.nbytes
    data = memoryview(arr).cast("B")
    if name == "regular-file-etc-hostname":
        fd = os.open("/etc/hostname", os.O_RDONLY)
        return table((1, fd, 0, max(1, os.fstat(fd).st_size))), None, [fd]
    if name == "own-regular-file-named-ipmpi":
        f = tempfile.TemporaryFile(prefix="ipmpi")
        f.write(data)
        f.flush()
        fd = os.dup(f.fileno())
        f.close()
        return table((1, fd, 0, n)), None, [fd]
    if name == "memfd-not-named-ipmpi":
        fd = memfd_with(data, name="other")
        return table((1, fd, 0, n)), None, [fd]
    if name == "fd-not-open":
        return table((1, free_fd(), 0, n)), None, []
    if name == "pid-not-existing":
        fd = memfd_with(data)
        return table((1, fd, 0, n)), dead_pid(), [fd]
    if name == "length-beyond-memfd":
        fd = memfd_with(data[: n // 2])
        return table((1, fd, 0, n)), None, [fd]
    if name == "offset-plus-length-beyond-memfd":
        fd = memfd_with(data)
        return table((1, fd, 4096, n)), None, [fd]
    if name == "memfd-of-another-uid":
        fd = memfd_with(data)
        os.fchown(fd, 65534, 65534)
        return table((1, fd, 0, n)), None, [fd]
    if name == "memfd-not-sealed-against-shrinking":
        fd = memfd_with(data, seal=False)
        return table((1, fd, 0, n)), None, [fd]
    if name == "pipe":
        rfd, wfd = os.pipe()
        return table((1, rfd, 0, n)), None, [rfd, wfd]
    if name == "socket":
        a, b = socket.socketpair()
        fds = [a.detach(), b.detach()]
        return table((1, fds[0], 0, n)), None, fds
    if name == "process-memory-unmapped-address":
        return table((1, SHM_VM, 4096, n)), None, []
    if name == "process-memory-of-a-dead-pid":
        return table((1, SHM_VM, arr.ctypes.data, n)), dead_pid(), []
    raise ValueError(name)


EACCES_CASES = ["process-memory-unmapped-address", "process-memory-of-a-dead-pid", "regular-file-etc-hostname", "own-regular-file-named-ipmpi", "memfd-not-named-ipmpi",
                "fd-not-open", "pid-not-existing", "length-beyond-memfd", "offset-plus-length-beyond-memfd",
                "memfd-of-another-uid", "memfd-not-sealed-against-shrinking", "pipe", "socket"]


@pytest.mark.parametrize("offset", [0, 4096, 24])
def test_raw_shm_push_is_accepted(cluster2, raw, mec_tls, offset):
    """The control for the refusals: the same frame naming a good memfd works."""
    a = floats(2 * MIB, 8)
    head, buf = push_parts("rawok", a)
    fd = memfd_with(buf, offset=offset)
    try:
        rid = raw.send_shm(K_PUSH, 0, [head, b""], table((1, fd, offset, a.nbytes)))
        kind, flags, req_id, target, status, total, parts = raw.read()
    finally:
        os.close(fd)
    assert (kind, req_id, status) == (K_PUSH, rid, 0), (kind, req_id, status, parts[:1])
    assert_same_array(mec_tls.pull("rawok", targets=0)[0], a)
    assert raw.get_ids() == ENGINES


@pytest.mark.parametrize("case", EACCES_CASES)
def test_untrusted_fd_gets_eacces_and_the_connection_stays(cluster2, raw, mec_tls, case):
    if case == "memfd-of-another-uid":
        assert os.geteuid() == 0, "this case needs root (to give a memfd to another uid); the suite runs as root"
    a = floats(2 * MIB, 9)
    name = "refused_" + case.replace("-", "_")
    head, _buf = push_parts(name, a)
    tab, pid, fds = refused_case(case, a)
    try:
        rid = raw.send_shm(K_PUSH, 0, [head, b""], tab, pid=pid)
        kind, flags, req_id, target, status, total, parts = raw.read()
    finally:
        for fd in fds:
            os.close(fd)
    assert flags & F_REPLY and req_id == rid
    assert status == EACCES, (status, parts[:1])
    assert parts and parts[0], "the refusal says why"
    assert raw.get_ids() == ENGINES  # still open, and exactly one reply came
    assert name not in mec_tls.keys(targets=0)[0]


# name -> (parts after the pickle head, table entries): each breaks one rule
def eproto_frame(case, head, fd, n):
    if case == "table-of-31-bytes":
        return [head, b""], table((1, fd, 0, n))[:31]
    if case == "table-of-33-bytes":
        return [head, b""], table((1, fd, 0, n)) + b"\0"
    if case == "index-out-of-range":
        return [head, b""], table((5, fd, 0, n))
    if case == "index-names-the-table":
        return [head, b""], table((2, fd, 0, n))
    if case == "not-ascending":
        return [head, b"", b""], table((2, fd, 0, n), (1, fd, 0, n))
    if case == "index-twice":
        return [head, b""], table((1, fd, 0, n), (1, fd, 0, n))
    if case == "named-part-with-wire-bytes":
        return [head, b"wire"], table((1, fd, 0, n))
    if case == "reserved-not-zero":
        return [head, b""], table((1, fd, 0, n, 1))
    raise ValueError(case)


EPROTO_CASES = ["table-of-31-bytes", "table-of-33-bytes", "index-out-of-range", "index-names-the-table",
                "not-ascending", "index-twice", "named-part-with-wire-bytes", "reserved-not-zero"]


@pytest.mark.parametrize("case", EPROTO_CASES)
def test_malformed_shm_table_gets_eproto_and_a_close(cluster2, raw, case):
    a = floats(2 * MIB, 11)
    head, buf = push_parts("malformed", a)
    fd = memfd_with(buf)
    try:
        parts, tab = eproto_frame(case, head, fd, a.nbytes)
        rid = raw.send_shm(K_PUSH, 0, parts, tab)
        kind, flags, req_id, target, status, total, rparts = raw.read()
        assert flags & F_REPLY and req_id == rid
        assert status == EPROTO, (status, rparts[:1])
        assert closed_by_peer(raw.s, 10)
    finally:
        os.close(fd)


def test_named_part_over_the_limits_gets_e2big_and_a_close(cluster2, raw):
    a = floats(2 * MIB, 15)
    head, buf = push_parts("huge", a)
    fd = memfd_with(buf)
    try:
        raw.send_shm(K_PUSH, 0, [head, b""], table((1, fd, 0, 1 << 62)))
        kind, flags, req_id, target, status, total, parts = raw.read()
        assert status in (E2BIG, EPROTO), (status, parts[:1])
        assert closed_by_peer(raw.s, 10)
    finally:
        os.close(fd)


def test_shm_flag_without_any_part_gets_eproto_and_a_close(cluster2, raw):
    raw.send(K_PUSH, 0, [], flags=F_SHM, aux=os.getpid())
    kind, flags, req_id, target, status, total, parts = raw.read()
    assert status == EPROTO, (status, parts[:1])
    assert closed_by_peer(raw.s, 10)


def test_release_of_fds_never_lent_is_ignored(cluster2, raw, controller_pid):
    raw.release([3, 999, 123456, 0xFFFFFFFF])
    assert raw.get_ids() == ENGINES  # no reply to RELEASE came first, still open
    # Every fd the controller has (its listening socket, TLS and MPI links...):
    # none is a lent memfd of this session, so none may be closed.
    # Sockets of other sessions may close on their own meanwhile, so only
    # the rest is compared; the listening socket is checked by connecting.
    before = {int(e): fd_link(controller_pid, int(e)) for e in os.listdir("/proc/%d/fd" % controller_pid)}
    raw.release(sorted(before))
    assert raw.get_ids() == ENGINES
    closed = [(fd, link) for fd, link in sorted(before.items())
              if link and not link.startswith("socket:") and fd_link(controller_pid, fd) != link]
    assert not closed, "RELEASE closed controller fds it never lent: %r" % closed
    m = cluster2.client(timeout=TIMEOUT)  # the listening socket still accepts
    try:
        assert m.get_ids() == ENGINES
    finally:
        m.close()


def test_a_normal_client_works_after_the_refusals(cluster2):
    m = cluster2.client(timeout=TIMEOUT)
    try:
        assert m.shm is True
        a = floats(8 * MIB, 12)
        m.push(dict(after=a), targets=0)
        assert_same_array(m.pull("after", targets=0)[0], a)
    finally:
        m.close()


# ---- 5. a client that leaves without releasing ------------------------------

def raw_pull(raw, name, target):
    """PULL name with F_SHM_OK; (value, fds lent) read from the controller's memfds."""
    rid = raw.send(K_PULL, target, _serialize.dumps([name]), flags=F_SHM_OK)
    kind, flags, req_id, tgt, status, total, parts = raw.read()
    assert (kind, req_id, status) == (K_PULL, rid, 0), (kind, req_id, status)
    assert flags & F_REPLY and flags & F_SHM, "an 8 MiB reply to F_SHM_OK comes by shm (flags %#x)" % flags
    got, fds = read_shm_parts(parts, raw.ctl_pid)
    return _serialize.loads(got[1:])[0], fds


def test_release_from_another_session_is_ignored(cluster2, mec_shm):
    a = floats(8 * MIB, 13)
    mec_shm.push(dict(lent=a), targets=0)
    owner, other = RawSession(cluster2), RawSession(cluster2)
    try:
        value, fds = raw_pull(owner, "lent", 0)
        assert_same_array(value, a)
        inodes = {fd: os.stat("/proc/%d/fd/%d" % (owner.ctl_pid, fd)).st_ino for fd in fds}
        other.release(fds)
        assert other.get_ids() == ENGINES
        now = controller_memfds(owner.ctl_pid)
        for fd, ino in inodes.items():
            assert now.get(fd) == ino, "another session's RELEASE closed lent memfd %d" % fd
        owner.release(fds)
        assert owner.get_ids() == ENGINES
    finally:
        owner.close()
        other.close()


def test_client_leaving_without_release(cluster2, mec_shm, controller_pid):
    a = floats(8 * MIB, 14)
    mec_shm.push(dict(gone=a), targets="all")
    raw = RawSession(cluster2)
    lent = {}
    try:
        for i in range(6):
            value, fds = raw_pull(raw, "gone", i % 2)
            assert_same_array(value, a)
            for fd in fds:
                lent[fd] = os.stat("/proc/%d/fd/%d" % (controller_pid, fd)).st_ino
        # Unreleased, so the controller still holds every one of them.
        held = controller_memfds(controller_pid)
        for fd, ino in lent.items():
            assert held.get(fd) == ino, "memfd %d was closed before RELEASE or the session's end" % fd
    finally:
        raw.close()  # no RELEASE
    # The controller keeps serving, and the session's memfds go with it
    # (the controller may keep a few in a pool for reuse: within the bound).
    assert mec_shm.get_ids() == ENGINES
    for g in mec_shm.pull("gone", targets="all"):
        assert_same_array(g, a)
    bounded_memfds(controller_pid)


def client_memfd_mappings(pid):
    """Mappings of client memfds ('/memfd:ipmpi-part') in process pid."""
    with open("/proc/%d/maps" % pid) as f:
        return [line for line in f if "/memfd:ipmpi-part" in line]


def test_controller_lets_go_of_idle_client_memfds(cluster2, controller_pid):
    """The controller maps a memfd client's memfds for reuse, but lets go of
    them after 10 s unused, so memory the client freed is not kept alive."""
    m = memfd_client(cluster2)
    try:
        assert m.shm_path == "memfd"
        a = floats(8 * MIB, 41)
        m.push(dict(idle_map=a), targets=0)
        assert client_memfd_mappings(controller_pid), "the push did not go through a mapped memfd"
        wait_for(lambda: not client_memfd_mappings(controller_pid), 25, interval=0.5,
                 what="the controller unmapping the client's idle memfds")
        assert_same_array(m.pull("idle_map", targets=0)[0], a)
    finally:
        m.close()
