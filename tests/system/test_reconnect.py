"""Reconnect with results kept (issue 13 part 4; doc/protocol.md section 7).

Every MultiEngine request has an id the user can see (pr.req_ids); the
controller keeps its replies, so a client whose link dropped reconnects
(mec.reconnect()) and still gets its pending results, and a new client
with the same furl -- in another process, after the first one was killed
-- fetches them by id. Tasks alike, by task id. Bad ids (unknown, of
another controller, evicted, malformed) and a reconnect with a wrong key
each get a clear error, and nobody else notices.

Real clusters, real processes: the killed client is a subprocess that gets
SIGKILL; the dropped link goes through a TCP relay in this process whose
connections the test cuts.
"""
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
import threading
import time

import pytest

from conftest import PYTHON, child_env, running_cluster
from ipmpi import client
from ipmpi.connect import _FURL_ADDR
from ipmpi.errors import EvictedError, InvalidDeferredID

T = 120   # generous bound of every wait: the machine is shared
ID_RE = re.compile(r"^[0-9a-f]{16}:\d+:\d+$")


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(2)


def furl_text(path):
    with open(path) as f:
        return f.read().strip()


# ---------------------------------------------------------------- a link that can be cut

class Relay:
    """127.0.0.1:port -> the controller of furl: every byte relayed as is
    (TLS end to end: the certificate pin and the key check still hold).
    cut() closes every relayed connection, as a network that drops would;
    new connections are still relayed afterwards."""

    def __init__(self, furl):
        m = _FURL_ADDR.match(furl)
        self.dest = (m.group(2), int(m.group(3)))
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.furl = "%s127.0.0.1:%d%s" % (m.group(1), self.port, m.group(4))
        self.socks = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            b = socket.create_connection(self.dest, 10)
            with self.lock:
                self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.closed = True
        self.cut()
        self.lsock.close()


@pytest.fixture
def relay(cluster):
    r = Relay(furl_text(cluster.mec_furl))
    yield r
    r.close()


# ---------------------------------------------------------------- ids

def test_every_request_has_an_id_naming_this_controller_and_session(cluster):
    with client.MultiEngineClient(cluster.mec_furl, timeout=T) as mec:
        hello = json.loads(mec._conn.hello)
        pr = mec.execute("x = 1", block=False)
        ids = pr.req_ids
        assert len(ids) == 1 and ID_RE.match(ids[0]), ids
        assert ids[0].startswith("%s:%d:" % (hello["instance"], hello["session"]))
        assert pr.msg_ids == ids
        pr.get_result()
        # scatter is one request per engine: one id each, all different
        sc = mec.scatter("s", list(range(8)), block=False)
        assert len(sc.req_ids) == 2 and len(set(sc.req_ids)) == 2
        sc.get_result()
        # The same client fetches a finished result again by id.
        again = mec.get_result_by_id(ids[0])
        assert [r["id"] for r in again] == [0, 1] and again[0]["input"]["raw"] == "x = 1"
        with client.MultiEngineClient(cluster.mec_furl, timeout=T) as other:
            assert json.loads(other._conn.hello)["session"] != hello["session"]


# ---------------------------------------------------------------- a killed client

KILLED_MEC = textwrap.dedent("""
    import json, sys, time
    from ipmpi import client
    mec = client.MultiEngineClient(sys.argv[1], timeout=120)
    a = mec.execute("import time; time.sleep(3); x = 41 + 1; print('slept')", targets=0, block=False)
    b = mec.pull("x", targets=0, block=False)
    c = mec.execute("print('all', 7)", block=False)
    print(json.dumps([a.req_ids[0], b.req_ids[0], c.req_ids[0]]), flush=True)
    time.sleep(600)
""")


def run_and_kill(script, *args):
    """Runs script in a client process of its own until it prints its first
    line (JSON), then SIGKILLs it, as a crash or `kill -9` would; the line."""
    p = subprocess.Popen([PYTHON, "-c", script] + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        line = p.stdout.readline()
        if not line:
            raise AssertionError("client process said nothing: %s" % p.stderr.read())
        p.send_signal(signal.SIGKILL)
        p.wait(T)
        return json.loads(line)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(T)
        p.stdout.close()
        p.stderr.close()


def test_a_killed_clients_results_are_fetched_by_a_new_client_with_the_same_furl(cluster):
    a, b, c = run_and_kill(KILLED_MEC, cluster.mec_furl)
    with client.MultiEngineClient(cluster.mec_furl, timeout=T) as mec:
        ra = mec.get_result_by_id(a)        # still running when the client died
        assert isinstance(ra, client.ResultList) and len(ra) == 1
        assert ra[0]["id"] == 0 and ra[0]["stdout"] == "slept\n"
        assert mec.get_result_by_id(b) == [[42]]    # pull: the values per engine, one per name
        rc = mec.get_result_by_id(c)
        assert [r["stdout"] for r in rc] == ["all 7\n", "all 7\n"]
        # IPython 0.10's spelling, and several ids at once
        assert mec.get_pending_deferred(b, True) == [[42]]
        assert mec.get_result_by_id([b, b]) == [[[42]], [[42]]]


KILLED_TC = textwrap.dedent("""
    import json, sys, time
    from ipmpi import client
    tc = client.TaskClient(sys.argv[1], timeout=120)
    def slow(x):
        import time
        time.sleep(2)
        return x * 2
    tid = tc.run(client.MapTask(slow, args=(21,)))
    print(json.dumps(tid), flush=True)
    time.sleep(600)
""")


def test_a_killed_clients_task_is_fetched_by_a_new_task_client(cluster):
    tid = run_and_kill(KILLED_TC, cluster.tc_furl)
    with client.TaskClient(cluster.tc_furl, timeout=T) as tc:
        assert tc.get_task_result(tid, block=True) == 42


def test_modern_get_result_by_msg_ids_of_a_killed_client(cluster):
    import ipmpi
    a, b, c = run_and_kill(KILLED_MEC, cluster.mec_furl)
    tid = run_and_kill(KILLED_TC, cluster.tc_furl)
    rc = ipmpi.Client(cluster.mec_furl, progress=False, stream_output=False)
    try:
        assert rc.get_result(b, block=True) == [42]          # one pull on one engine: the values asked
        ar = rc.get_result([a, c])
        assert isinstance(ar, ipmpi.AsyncResult) and ar.msg_ids == [a, c]
        assert ar.get(timeout=T) == [None, None, None]        # execute: None per engine
        assert ar.stdout == ["slept\n", "all 7\n", "all 7\n"]
        assert rc.get_result(tid, block=True) == 42          # a task id
        bogus = a.rsplit(":", 1)[0] + ":99999"
        with pytest.raises(client.InvalidDeferredID):
            rc.get_result(bogus, block=True)
        with pytest.raises(TypeError):
            rc.get_result()
    finally:
        rc.close()


# ---------------------------------------------------------------- a dropped link, same process

def test_pending_results_arrive_after_reconnect_when_the_link_dropped(cluster, relay):
    with client.MultiEngineClient(relay.furl, timeout=T) as mec:
        mec.push(dict(y=5))
        done = mec.execute("w = 1", block=False)
        done.get_result()
        slow = mec.execute("import time; time.sleep(2); z = y * 3", block=False)
        pulled = mec.pull(("y", "z"), block=False)          # queued behind it
        ids = slow.req_ids + pulled.req_ids
        mec.get_ids()   # a round trip: the requests before it reached the controller
        relay.cut()
        with pytest.raises(ConnectionError):
            slow.get_result(timeout=T)
        mec.reconnect()
        r = slow.get_result(timeout=T)
        assert [x["id"] for x in r] == [0, 1]
        assert pulled.get_result(timeout=T) == [[5, 15], [5, 15]]   # the call's own shape
        assert slow.req_ids + pulled.req_ids == ids
        assert done.get_result() is not None
        assert mec.execute("q = z", block=True)[0]["id"] == 0       # the new link works


def test_a_blocking_call_cut_off_names_the_ids_to_fetch(cluster, relay):
    def cut_while_it_runs():
        # Another client (not through the relay) sees engine 0 run it.
        with client.MultiEngineClient(cluster.mec_furl, timeout=T) as watcher:
            deadline = time.monotonic() + T
            while watcher.queue_status(targets=0)[0][1]["running"] != "execute" and time.monotonic() < deadline:
                time.sleep(0.05)
        relay.cut()

    with client.MultiEngineClient(relay.furl, timeout=T) as mec:
        t = threading.Thread(target=cut_while_it_runs)
        t.start()
        try:
            with pytest.raises(ConnectionError) as ei:
                mec.execute("import time; time.sleep(3); v = 9", targets=0)
        finally:
            t.join(T)
        m = re.search(r"get_result_by_id\('([^']+)'\)", str(ei.value))
        assert m, str(ei.value)
        assert "the controller keeps the result" in str(ei.value)   # it still takes connections
        mec.reconnect()
        assert mec.get_result_by_id(m.group(1))[0]["input"]["raw"].endswith("v = 9")


def test_modern_client_reconnect_keeps_async_results(cluster, relay):
    from ipmpi import Client
    rc = Client(relay.furl, timeout=T)
    try:
        ar = rc[:].apply_async(lambda: __import__("time").sleep(2) or 6 * 7)
        assert ar.msg_ids and all(ID_RE.match(i) for i in ar.msg_ids)
        rc.ids   # a round trip: the request before it reached the controller
        relay.cut()
        rc.reconnect()
        assert ar.get(timeout=T) == [42, 42]
    finally:
        rc.close()


def test_task_client_reconnect_gets_tasks_submitted_before(cluster):
    r = Relay(furl_text(cluster.tc_furl))
    try:
        with client.TaskClient(r.furl, timeout=T) as tc:
            tid = tc.run(client.StringTask("import time; time.sleep(1); c = 6 * 7", pull="c"))
            tc.queue_status()   # a round trip: the task reached the controller
            r.cut()
            tc.reconnect()
            assert tc.get_task_result(tid, block=True).ns.c == 42
            assert tc.run(client.MapTask(abs, args=(-3,)), block=True) == 3   # ids reserved anew
    finally:
        r.close()


# ---------------------------------------------------------------- bad input

def test_unknown_foreign_and_malformed_ids_are_clear_errors_and_harm_nobody(cluster):
    with client.MultiEngineClient(cluster.mec_furl, timeout=T) as mec, \
            client.MultiEngineClient(cluster.mec_furl, timeout=T) as bystander:
        pr = bystander.execute("import time; time.sleep(1); k = 1", block=False)
        good = mec.execute("u = 2", block=False)
        good.get_result()
        inst, sess, req = good.req_ids[0].split(":")
        with pytest.raises(InvalidDeferredID, match="no request .* in this controller"):
            mec.get_result_by_id("%s:%s:%d" % (inst, sess, int(req) + 1000))
        other = ("0" * 16 if inst != "0" * 16 else "1" * 16) + ":%s:%s" % (sess, req)
        with pytest.raises(InvalidDeferredID, match="belongs to another controller"):
            mec.get_result_by_id(other)
        for bad in ("nonsense", "12:3:4", None, "%s:%s:%d" % (inst, sess, 1 << 40)):
            with pytest.raises(ValueError, match="not a request id"):
                mec.get_result_by_id(bad)
        # cleared: then unknown
        assert mec.purge_results(good) == {"cleared": 1, "unknown": []}
        with pytest.raises(InvalidDeferredID):
            mec.get_result_by_id(good.req_ids[0])
        assert mec.purge_results([other])["unknown"] == [other]
        assert [r["id"] for r in pr.get_result()] == [0, 1]          # the bystander never noticed
        assert mec.execute("u", block=True)[0]["id"] == 0


def test_a_task_id_of_another_controller_is_refused_not_answered_with_another_task(cluster):
    """Task ids are ints whose high 32 bits name the controller (protocol.md
    section 6): cluster B refuses cluster A's task id -- in TaskClient, in
    ipmpi.Client.get_result and on the wire -- instead of answering with
    its own task of the same number."""
    import ipmpi
    from ipmpi import _consts as K
    from conftest import frame, parse_furl, read_frame, start_cluster, stop_cluster, tls_connect

    other = start_cluster(1)
    try:
        with client.TaskClient(cluster.tc_furl, timeout=T) as ta:
            tid_a = ta.run(client.MapTask(lambda: "result of cluster A"))
            assert ta.get_task_result(tid_a, block=True) == "result of cluster A"
        with client.TaskClient(other.tc_furl, timeout=T) as tb:
            tid_b = tb.run(client.MapTask(lambda: "result of cluster B"))
            assert tb.get_task_result(tid_b, block=True) == "result of cluster B"
        with client.TaskClient(other.tc_furl, timeout=T) as fresh:
            with pytest.raises(InvalidDeferredID, match="task %d belongs to another controller" % tid_a):
                fresh.get_task_result(tid_a, block=True)
            assert fresh.get_task_result(tid_b, block=True) == "result of cluster B"
        rc = ipmpi.Client(other.mec_furl, progress=False, stream_output=False)
        try:
            with pytest.raises(InvalidDeferredID, match="belongs to another controller"):
                rc.get_result(tid_a, block=True)
            assert rc.get_result(tid_b, block=True) == "result of cluster B"
        finally:
            rc.close()
        assert isinstance(tid_a, int) and tid_a >> 32 != tid_b >> 32
        # The controller checks too (a client that does not): ENOENT naming it.
        s = tls_connect(other.tc_furl)
        try:
            def ask(rid, kind, parts):
                s.sendall(frame(kind, rid, target=K.TARGET_ALL, parts=parts))
                rkind, flags, req_id, target, status, total, rparts = read_frame(s)
                assert req_id == rid and rkind == kind
                return status, (rparts[0].decode("utf-8", "replace") if rparts else "")
            assert ask(1, K.K_HELLO, [parse_furl(other.tc_furl)[3].encode()])[0] == 0
            for rid, kind, part in ((2, K.K_TASK_RESULT, struct.pack("<QB", tid_a, 1)),
                                    (3, K.K_TASK_ABORT, struct.pack("<Q", tid_a)),
                                    (4, K.K_TASK_BARRIER, struct.pack("<Q", tid_a))):
                status, text = ask(rid, kind, [part])
                assert status == K.ENOENT and str(tid_a) in text and "another controller" in text, text
            status, text = ask(5, K.K_TASK_RESULT, [struct.pack("<QB", tid_b, 1)])
            assert status == 0
        finally:
            s.close()
    finally:
        stop_cluster(other)
        shutil.rmtree(other.ipmpi_dir, ignore_errors=True)


def test_a_reconnect_with_a_wrong_key_is_refused_like_any_wrong_key(cluster):
    good = furl_text(cluster.mec_furl)
    wrong = good[:-1] + ("0" if good[-1] != "0" else "1")
    with client.MultiEngineClient(cluster.mec_furl, timeout=T) as bystander:
        mec = client.MultiEngineClient(good, timeout=T)
        pr = bystander.execute("import time; time.sleep(1)", block=False)
        mec._link_args = (wrong,) + mec._link_args[1:]
        with pytest.raises(PermissionError, match="wrong key"):
            mec.reconnect()
        mec._link_args = (good,) + mec._link_args[1:]
        mec.reconnect()
        assert len(mec.execute("1")) == 2
        mec.close()
        assert len(pr.get_result()) == 2


SMALL = 1 << 20     # --result-memory of the small cluster: 1 MiB


@pytest.fixture(scope="module")
def small():
    yield from running_cluster(1, engine_args=("--result-memory", str(SMALL)))


def stale_pull(c, name):
    """A pull whose client went away before its reply came: the id."""
    m = client.MultiEngineClient(c.mec_furl, timeout=T)
    m.execute("import time; time.sleep(1)", block=False)
    rid = m.pull(name, block=False).req_ids[0]
    m.close()
    return rid


def test_an_evicted_result_says_so_naming_the_id_and_the_budget(small):
    with client.MultiEngineClient(small.mec_furl, timeout=T) as mec:
        mec.push(dict(big=b"x" * (600 << 10)))
        first = stale_pull(small, "big")
        second = stale_pull(small, "big")
        time.sleep(3)   # both pulls ran (each after a 1 s sleep): 1.2 MiB > 1 MiB
        with pytest.raises(EvictedError) as ei:
            mec.get_result_by_id(first)
        assert first in str(ei.value) and "--result-memory 1 MiB" in str(ei.value)
        assert mec.get_result_by_id(second) == [[b"x" * (600 << 10)]]
        # A reply larger than the whole budget is not kept, but reaches its client.
        mec.execute("huge = b'y' * (2 << 20)")
        pr = mec.pull("huge", block=False)
        assert len(pr.get_result()[0]) == 2 << 20
        with pytest.raises(EvictedError):
            mec.get_result_by_id(pr.req_ids[0])
        assert mec.execute("1")[0]["id"] == 0
