"""The task layer of the client without a cluster: task objects and their
argument checks, the wire encoding (descriptor bytes, stage tuples, the
function cache), ResultNS/TaskResult, rebuilding remote exceptions, and
TaskClient against a fake controller (a TLS 1.3 server in a thread that
speaks doc/protocol.md section 6 and runs the tasks itself). Run by
`make check` with PYTHONPATH=<builddir>/pytree.
"""
import hashlib
import json
import pickle
import socket
import ssl
import struct
import threading
import time
import traceback

import cloudpickle
import pytest

from ipmpi import _ipmpi, _serialize, client, task

HDR = struct.Struct("<IBBHQiiIIQ")
KEY = "cd" * 32


# ---------------------------------------------------------------- task objects

def test_string_task_defaults_and_normalisation():
    t = client.StringTask("c = a * b", push=dict(a=6, b=7), pull="c")
    assert (t.expression, t.pull, t.push) == ("c = a * b", ("c",), {"a": 6, "b": 7})
    assert (t.clear_before, t.clear_after, t.retries, t.recovery_task, t.depend, t.taskid) == \
        (False, False, 0, None, None, None)
    assert client.StringTask("x").pull == () and client.StringTask("x").push == {}
    assert client.StringTask("x", pull=["a", "b"]).pull == ("a", "b")
    assert client.Task is client.StringTask


def test_map_task_defaults():
    f = lambda x, y: x ** y
    t = client.MapTask(f, args=(2, 10))
    assert (t.function, t.args, t.kwargs) == (f, (2, 10), {})
    assert client.MapTask(f).args == () and client.MapTask(f, kwargs=None).kwargs == {}
    assert client.MapTask(f, args=[1, 2]).args == [1, 2]


@pytest.mark.parametrize("make, message", [
    (lambda: client.StringTask(5), "a task expression must be a string"),
    (lambda: client.StringTask(b"x = 1"), "a task expression must be a string"),
    (lambda: client.StringTask("x", pull=5), "pull must be str or a sequence of strs"),
    (lambda: client.StringTask("x", pull=["a", 1]), "pull must be str or a sequence of strs"),
    (lambda: client.StringTask("x", push=[("a", 1)]), "push must be a dict"),
    (lambda: client.MapTask(5), "a task function must be a FunctionType"),
    (lambda: client.MapTask(len, args=5), "a task args must be a list or tuple"),
    (lambda: client.MapTask(len, args="abc"), "a task args must be a list or tuple"),
    (lambda: client.MapTask(len, kwargs=[1]), "a task kwargs must be a dict"),
    (lambda: client.MapTask(len, retries=1.5), "retries must be an int"),
    (lambda: client.MapTask(len, recovery_task=len), "a recovery_task must be a StringTask or MapTask"),
    (lambda: client.StringTask("x", depend=5), "depend must be a function"),
])
def test_task_argument_checks_raise_type_error(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_retries_out_of_range_is_value_error():
    with pytest.raises(ValueError, match="retries"):
        client.StringTask("x", retries=-1)
    with pytest.raises(ValueError, match="retries"):
        client.StringTask("x", retries=1001)
    assert client.StringTask("x", retries=1000).retries == 1000


def test_check_depend():
    assert client.StringTask("x").check_depend({}) is True
    t = client.StringTask("x", depend=lambda p: p.get("gpu"))
    assert t.check_depend({"gpu": 1}) is True and t.check_depend({}) is False


# ---------------------------------------------------------------- encoding

def stage_of(parts):
    return _serialize.loads(parts)


def test_descriptor_bytes_for_one_and_several_stages():
    assert task.descriptor(7, [(1, 0)]) == struct.pack("<QIIII", 7, 1, 0, 1, 0)
    assert task.descriptor(2 ** 40 + 3, [(1, 2), (3, 0)]) == \
        struct.pack("<QII", 2 ** 40 + 3, 2, 0) + struct.pack("<4I", 1, 2, 3, 0)
    assert len(task.descriptor(1, [(1, 0)] * 16)) == 16 + 16 * 8
    with pytest.raises(ValueError):
        task.descriptor(1, [])
    with pytest.raises(ValueError):
        task.descriptor(1, [(1, 0)] * 17)


def test_encode_string_task():
    t = client.StringTask("c = a * b", push=dict(a=6, b=7), pull="c", clear_after=True, retries=3)
    parts = task.encode(t, 9, task.FunctionCache())
    assert parts[0] == struct.pack("<QIIII", 9, 1, 0, 1, 3)
    assert stage_of(parts[1:]) == ("string", "c = a * b", {"a": 6, "b": 7}, ("c",),
                                   {"clear_before": False, "clear_after": True, "depend": None})


def test_encode_map_task_sends_the_function_pickled_once_with_its_digest():
    f = lambda x, y: x ** y
    cache = task.FunctionCache()
    p1 = task.encode(client.MapTask(f, args=(2, 10)), 1, cache)
    p2 = task.encode(client.MapTask(f, args=(3, 2), kwargs={"z": 1}), 2, cache)
    s1, s2 = stage_of(p1[1:]), stage_of(p2[1:])
    assert s1[0] == "map" and s1[2:] == ((2, 10), {}, {"clear_before": False, "clear_after": False,
                                                        "depend": None})
    assert s2[2:4] == ((3, 2), {"z": 1})
    tag, digest, data = s1[1]
    assert tag == "fn" and digest == hashlib.blake2b(data, digest_size=16).digest()
    assert s2[1] == s1[1]
    assert pickle.loads(data)(2, 10) == 1024
    # the cache hands out the same entry object: cloudpickle ran once
    assert cache.entry(f) is cache.entry(f)


def test_function_cache_sees_a_rebound_global_and_a_new_closure_value():
    ns = {}
    exec("a = 1\ndef f(x):\n    return x + a\n", ns)
    f = ns["f"]
    cache = task.FunctionCache()
    e1 = cache.entry(f)
    assert cache.entry(f) is e1
    ns["a"] = 2
    e2 = cache.entry(f)
    assert e2 is not e1 and pickle.loads(e2[2])(1) == 3

    def outer(k):
        def g(x):
            return x * k
        return g
    g = outer(3)
    e3 = cache.entry(g)
    g.__closure__[0].cell_contents = 4
    assert pickle.loads(cache.entry(g)[2])(1) == 4 and cache.entry(g) is not e3


def test_function_cache_is_bounded_and_keyed_by_identity():
    cache = task.FunctionCache(size=4)
    fs = [(lambda x, i=i: x + i) for i in range(10)]
    for f in fs:
        cache.entry(f)
    assert len(cache._d) == 4
    assert pickle.loads(cache.entry(fs[0])[2])(1) == 1


def test_plain_values_use_plain_pickle_and_others_cloudpickle():
    assert task._plain((1, 2.0, "x", b"y", None, True, 1j, range(3), [1, (2, {"a": {3}})]))
    assert not task._plain((lambda: 1,))
    assert not task._plain((object(),))

    class Local:
        pass
    # A class defined here cannot be imported by an engine: cloudpickle must send it by value.
    parts = task.encode(client.MapTask(len, args=(Local(),)), 1, task.FunctionCache())
    assert b"Local" in bytes(parts[1])
    assert isinstance(stage_of(parts[1:])[2][0], Local)


def test_map_task_args_with_a_function_go_by_cloudpickle():
    g = lambda y: y + 1
    parts = task.encode(client.MapTask(lambda h, v: h(v), args=(g, 1)), 1, task.FunctionCache())
    st = stage_of(parts[1:])
    assert pickle.loads(st[1][2])(*st[2]) == 2


def test_depend_travels_in_opts():
    t = client.MapTask(len, args=([1],), depend=lambda p: p.get("gpu"), clear_before=True)
    opts = stage_of(task.encode(t, 1, task.FunctionCache())[1:])[4]
    assert opts["clear_before"] is True and opts["depend"]({"gpu": 1}) == 1


def test_recovery_chain_is_encoded_stage_after_stage():
    r2 = client.StringTask("z = 3", pull="z", retries=2)
    r1 = client.MapTask(len, args=([1, 2],), recovery_task=r2)
    t = client.StringTask("1/0", retries=1, recovery_task=r1)
    parts = task.encode(t, 5, task.FunctionCache())
    assert parts[0] == struct.pack("<QII", 5, 3, 0) + struct.pack("<6I", 1, 1, 1, 0, 1, 2)
    assert [stage_of([p])[0] for p in parts[1:]] == ["string", "map", "string"]


def test_recovery_cycles_and_long_chains_are_refused():
    a = client.StringTask("x")
    b = client.StringTask("y", recovery_task=a)
    a.recovery_task = b
    with pytest.raises(ValueError, match="cycle"):
        task.encode(a, 1, task.FunctionCache())
    s = client.StringTask("s")
    s.recovery_task = s
    with pytest.raises(ValueError, match="cycle"):
        task.chain(s)
    t = None
    for i in range(16):
        t = client.StringTask("x%d" % i, recovery_task=t)
    assert len(task.chain(t)) == 16
    with pytest.raises(ValueError, match="at most 16"):
        task.chain(client.StringTask("top", recovery_task=t))
    with pytest.raises(TypeError):
        task.chain("not a task")


def test_split_is_contiguous_and_balanced():
    assert task.split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert task.split(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_chunk_runner_pickles_and_runs():
    c = task._Chunk(lambda x, y: x - y, True)
    c2 = pickle.loads(cloudpickle.dumps(c))
    assert c2([(3, 1), (5, 2)]) == [2, 3]
    assert task._Chunk(abs, False)([-1, 2]) == [1, 2]


def test_encoding_is_fast():
    f = lambda x: x
    cache = task.FunctionCache()
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        task.encode(client.MapTask(f, args=(i,)), i, cache)
    per = (time.perf_counter() - t0) / n
    assert per < 25e-6, "%.1f us per MapTask" % (per * 1e6)


# ---------------------------------------------------------------- results

def test_result_ns():
    ns = task.ResultNS({"a": 17, "foo": [0, 1, 2]})
    assert repr(ns) == "NS{'a': 17, 'foo': [0, 1, 2]}"
    assert ns.a == 17 and ns["foo"] == [0, 1, 2]
    with pytest.raises(KeyError):
        ns["nope"]


def test_task_result_success():
    tr = client.TaskResult({"c": 42}, 2, taskid=3, submitted="2024/01/02 03:04:05",
                           completed="2024/01/02 03:04:06", duration=1.0)
    assert repr(tr) == "TaskResult[ID:3]:{'c': 42}"
    assert tr.ns.c == 42 and tr["c"] == 42 and tr.results == {"c": 42} and tr.keys == ["c"]
    assert (tr.engineid, tr.taskid, tr.failure, tr.duration) == (2, 3, None, 1.0)
    tr.raise_exception()   # nothing
    with pytest.raises(AttributeError):
        tr.ns = 5
    with pytest.raises(KeyError):
        tr["d"]


def test_task_result_failure_raises_on_access():
    err = ZeroDivisionError("division by zero")
    tr = client.TaskResult(None, 1, err, taskid=4)
    assert tr.results == {} and tr.keys == [] and tr.failure is err
    assert repr(tr) == "TaskResult[ID:4]:ZeroDivisionError('division by zero')"
    for access in (lambda: tr.ns, lambda: tr["c"], tr.raise_exception):
        with pytest.raises(ZeroDivisionError):
            access()


def test_timing_strings():
    t0 = time.mktime((2024, 3, 4, 5, 6, 7, 0, 0, -1))
    sub, comp, dur = task.timing(t0, t0 + 2.5)
    assert (sub, comp, dur) == ("2024/03/04 05:06:07", "2024/03/04 05:06:09", 2.5)


# ---------------------------------------------------------------- remote exceptions

def remote_meta(exc, eid=1):
    try:
        raise exc
    except BaseException as e:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"id": eid, "etype": type(exc).__name__, "evalue": str(exc), "traceback": tb}


def test_rebuild_from_pickled_exception_keeps_type_args_and_traceback():
    m = remote_meta(KeyError("k"), 3)
    m["exc"] = pickle.dumps(KeyError("k"))
    e = client._rebuild_exception(m, 3)
    assert type(e) is KeyError and e.args == ("k",)
    assert e.engine_id == 3 and "Traceback" in e.remote_traceback
    assert any("remote traceback (engine 3)" in n for n in e.__notes__)


def test_rebuild_by_builtin_name_without_pickle():
    e = client._rebuild_exception({"id": 0, "etype": "ZeroDivisionError", "evalue": "division by zero",
                                   "traceback": "Traceback...\nZeroDivisionError: division by zero"}, 0)
    assert type(e) is ZeroDivisionError and str(e) == "division by zero"
    assert e.remote_traceback.startswith("Traceback")
    with pytest.raises(ZeroDivisionError):
        raise e


def test_rebuild_falls_back_to_remote_error():
    for m in ({"etype": "MyOwnError", "evalue": "boom", "traceback": "tb"},
              {"etype": "MyOwnError", "evalue": "boom", "traceback": "tb", "exc": b"not a pickle"},
              {"etype": "os.system", "evalue": "x"},
              {"etype": "SystemExit", "evalue": "3"},            # never stops the client
              {"etype": "print", "evalue": "x"}):              # builtins, not an exception
        e = client._rebuild_exception(m, 2)
        assert type(e) is client.RemoteError, m
        assert e.engine_id == 2 and e.etype == m["etype"]
    e = client._rebuild_exception({"exc": pickle.dumps(SystemExit(3)), "etype": "SystemExit"}, 1)
    assert type(e) is client.RemoteError
    # a builtin that cannot be built from one string (UnicodeDecodeError needs 5 args)
    e = client._rebuild_exception({"etype": "UnicodeDecodeError", "evalue": "bad"}, 1)
    assert type(e) is client.RemoteError
    assert client._rebuild_exception(None, 4).engine_id == 4


def test_rebuild_unpicklable_user_class_from_engine_falls_back():
    # an engine-side class the client cannot import: the pickle names a missing module
    data = pickle.dumps(ValueError("x")).replace(b"builtins", b"nomodxx_")
    e = client._rebuild_exception({"etype": "ValueError", "evalue": "x", "exc": data}, 0)
    assert type(e) is ValueError   # by its builtin name then


def test_error_classes():
    assert issubclass(client.EvictedError, IndexError)
    assert issubclass(client.TaskTimeoutError, TimeoutError)
    assert client.TaskAborted is client.AbortedError


# ---------------------------------------------------------------- fake controller

class FakeTaskController:
    """One tc session, served in a thread: hands out ids, runs each task
    itself as an engine would (stage by stage, recovery tasks included)
    and keeps the results; tests look at .frames and set .hold (task ids
    whose reply waits until the next request arrives) or .force (taskid
    -> (status, parts) to answer instead of running)."""

    def __init__(self, cert, engines=(0, 1), first_id=100):
        key, crt, self.fp = cert
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(crt, key)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.engines = list(engines)
        self.next_id = first_id
        self.owned = set()
        self.frames = []
        self.reserves = []
        self.results = {}        # taskid -> (target, status, parts)
        self.held = []
        self.hold = set()
        self.force = {}
        self.error = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def furl(self):
        return "ipmpi+tls://%s@127.0.0.1:%d/%s" % (self.fp, self.port, KEY)

    # -- wire
    def _read(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def read_frame(self):
        magic, ver, kind, flags, req, target, status, total, nparts, aux = HDR.unpack(self._read(HDR.size))
        lens = struct.unpack("<%dQ" % nparts, self._read(8 * nparts)) if nparts else ()
        return dict(kind=kind, req=req, target=target, parts=[self._read(n) for n in lens])

    def write(self, kind, req, target=-2, status=0, parts=(), aux=0):
        parts = [bytes(p) for p in parts]
        head = HDR.pack(_ipmpi.MAGIC, _ipmpi.PROTO_VERSION, kind, _ipmpi.F_REPLY, req, target, status,
                        1, len(parts), aux)
        self.sock.sendall(head + struct.pack("<%dQ" % len(parts), *[len(p) for p in parts]) + b"".join(parts))

    def _run(self):
        try:
            raw, _ = self.lsock.accept()
            with self.ctx.wrap_socket(raw, server_side=True) as self.sock:
                f = self.read_frame()
                assert f["kind"] == _ipmpi.K_HELLO
                self.write(_ipmpi.K_HELLO, f["req"], parts=[json.dumps(
                    {"capability": "tc", "engines": len(self.engines), "ids": self.engines,
                     "version": 1}).encode()])
                while True:
                    f = self.read_frame()
                    with self.lock:
                        self.frames.append(f)
                    if f["kind"] != _ipmpi.K_TASK_SUBMIT:
                        self._flush()
                    self.handle(f)
        except (EOFError, ConnectionError, ssl.SSLError, OSError):
            pass
        except Exception as e:  # surfaced by stop()
            self.error = e
            traceback.print_exc()

    def _flush(self):
        held, self.held = self.held, []
        for kind, req, reply in held:
            self.write(kind, req, reply[0], reply[1], reply[2])

    def stop(self):
        self.thread.join(10)
        self.lsock.close()
        if self.error:
            raise self.error

    def json(self, f, obj, status=0):
        self.write(f["kind"], f["req"], status=status, parts=[json.dumps(obj).encode()])

    def msg(self, f, status, text):
        self.write(f["kind"], f["req"], status=status, parts=[text.encode()])

    # -- kinds
    def handle(self, f):
        k, p = f["kind"], f["parts"]
        if k == _ipmpi.K_GET_IDS:
            self.json(f, self.engines)
        elif k == _ipmpi.K_TASK_RESERVE:
            (count,) = struct.unpack("<I", p[0])
            self.reserves.append(count)
            first = self.next_id
            self.next_id += count
            self.owned.update(range(first, first + count))
            self.json(f, {"first": first, "count": count})
        elif k == _ipmpi.K_TASK_SUBMIT:
            self.submit(f)
        elif k == _ipmpi.K_TASK_RESULT:
            assert len(p[0]) == 9
            tid, block = struct.unpack("<QB", p[0])
            if tid in self.results:
                r = self.results[tid]
                self.write(f["kind"], f["req"], r[0], r[1], r[2], aux=tid)
            elif tid == 999:
                self.msg(f, _ipmpi.EEVICTED, "task 999: result evicted")
            elif tid == 998:
                self.msg(f, _ipmpi.EAGAIN, "task 998 is not finished")
            else:
                self.msg(f, _ipmpi.ENOENT, "no task %d" % tid)
        elif k == _ipmpi.K_TASK_BARRIER:
            ids = struct.unpack("<%dQ" % (len(p[0]) // 8), p[0])
            bad = [i for i in ids if i not in self.results]
            if bad:
                self.msg(f, _ipmpi.ENOENT, "unknown task ids: %s" % ", ".join(map(str, bad)))
            else:
                self.json(f, {"done": len(ids)})
        elif k == _ipmpi.K_TASK_ABORT:
            (tid,) = struct.unpack("<Q", p[0])
            if tid in self.results:
                self.msg(f, _ipmpi.EINVAL, "task %d already completed" % tid)
            else:
                self.msg(f, _ipmpi.ENOENT, "no task %d" % tid)
        elif k == _ipmpi.K_TASK_STATUS:
            n = len(self.results)
            self.json(f, {"scheduled": [] if p[0] == b"\x01" else 0, "pending": [] if p[0] == b"\x01" else 0,
                          "succeeded": sorted(self.results) if p[0] == b"\x01" else n, "failed": 0})
        elif k == _ipmpi.K_TASK_CLEAR:
            ids = struct.unpack("<%dQ" % (len(p[0]) // 8), p[0]) if p else sorted(self.results)
            unknown = [i for i in ids if i not in self.results]
            for i in ids:
                self.results.pop(i, None)
            self.json(f, {"cleared": len(ids) - len(unknown), "unknown": unknown})
        elif k == _ipmpi.K_TASK_SPIN:
            self.json(f, {"scheduled": 0})
        else:
            self.msg(f, _ipmpi.EKIND, "unknown kind %d" % k)

    def submit(self, f):
        assert f["target"] == _ipmpi.TARGET_ALL
        p = f["parts"]
        tid, nstages, zero = struct.unpack_from("<QII", p[0])
        assert zero == 0 and 1 <= nstages <= 16 and len(p[0]) == 16 + 8 * nstages
        assert tid in self.owned and tid not in self.results, tid
        self.owned.discard(tid)
        stages, at = [], 1
        for i in range(nstages):
            nparts, retries = struct.unpack_from("<II", p[0], 16 + 8 * i)
            stages.append((p[at:at + nparts], retries))
            at += nparts
        assert at == len(p)
        if tid in self.force:
            reply = self.force[tid]
            reply = (-2,) + reply if len(reply) == 2 else reply
        else:
            reply = self.run_stages(tid, stages)
        self.results[tid] = reply
        if tid in self.hold:
            self.held.append((f["kind"], f["req"], reply))
        else:
            self.write(f["kind"], f["req"], reply[0], reply[1], reply[2], aux=tid)

    def run_stages(self, tid, stages):
        for n, (parts, retries) in enumerate(stages):
            for attempt in range(retries + 1):
                eid = self.engines[(tid + attempt) % len(self.engines)]
                reply = self.run_one(tid, eid, _serialize.loads(parts))
                if reply[1] == 0:
                    return reply
        return reply

    def run_one(self, tid, eid, st):
        t0 = time.time()
        meta = {"id": eid, "kind": "task_submit", "number": None, "input": "", "stdout": "", "stderr": "",
                "taskid": tid, "started": t0}
        try:
            if st[0] == "map":
                fn = st[1]
                if isinstance(fn, tuple) and fn[0] == "fn":
                    fn = pickle.loads(fn[2])
                value = fn(*st[2], **st[3])
            else:
                meta["input"] = st[1]
                ns = dict(st[2])
                exec(st[1], ns)
                value = {k: ns[k] for k in st[3]}
        except Exception as e:
            meta.update(etype=type(e).__name__, evalue=str(e),
                        traceback="".join(traceback.format_exception(type(e), e, e.__traceback__)),
                        exc=pickle.dumps(e), completed=time.time())
            return (eid, _ipmpi.EREMOTE, [pickle.dumps(meta)])
        meta["completed"] = time.time()
        return (eid, 0, [pickle.dumps(meta)] + _serialize.dumps(value))

    def kinds(self):
        with self.lock:
            return [f["kind"] for f in self.frames]


@pytest.fixture
def fake(cert):
    made = []

    def start(**kw):
        fc = FakeTaskController(cert, **kw)
        made.append(fc)
        return fc

    yield start
    for fc in made:
        fc.stop()


@pytest.fixture
def tc(fake):
    fc = fake()
    c = client.TaskClient(fc.furl(), timeout=20)
    c.fake = fc
    yield c
    c.close()


def test_string_task_round_trip(tc):
    tid = tc.run(client.StringTask("c = a * b", push=dict(a=6, b=7), pull="c"))
    assert tid == 100 and tc.fake.reserves == [64]
    tr = tc.get_task_result(tid, block=True)
    assert isinstance(tr, client.TaskResult)
    assert tr.ns.c == 42 and tr["c"] == 42 and tr.results == {"c": 42} and tr.keys == ["c"]
    assert tr.engineid in (0, 1) and tr.taskid == tid and tr.failure is None
    assert isinstance(tr.duration, float) and tr.duration >= 0
    time.strptime(tr.submitted, task.time_format)
    time.strptime(tr.completed, task.time_format)
    assert repr(tr) == "TaskResult[ID:100]:{'c': 42}"
    assert tc.get_task_result(tid) is tr          # kept until clear()


def test_map_task_and_blocking_run(tc):
    tid = tc.run(client.MapTask(lambda x, y: x ** y, args=(2, 10)))
    assert tc.get_task_result(tid, block=True) == 1024
    assert tc.run(client.MapTask(lambda x, y: x ** y, args=(3, 3)), block=True) == 27
    tr = tc.run(client.StringTask("b = 2 * 21", pull=["b"]), block=True)
    assert tr.ns.b == 42


def test_failed_map_task_raises_its_own_type_with_remote_traceback(tc):
    tid = tc.run(client.MapTask(lambda: 1 / 0))
    with pytest.raises(ZeroDivisionError) as ei:
        tc.get_task_result(tid, block=True)
    e = ei.value
    assert e.engine_id in (0, 1) and e.taskid == tid
    assert "ZeroDivisionError" in e.remote_traceback and "1 / 0" in e.remote_traceback
    with pytest.raises(ZeroDivisionError):   # again, from the client's own copy
        tc.get_task_result(tid)


def test_failed_string_task_gives_task_result_with_failure(tc):
    tr = tc.run(client.StringTask("c = undefined_name", pull="c"), block=True)
    assert isinstance(tr.failure, NameError) and tr.results == {}
    assert "TaskResult[ID:%d]:NameError" % tr.taskid in repr(tr)
    with pytest.raises(NameError):
        tr.ns
    with pytest.raises(NameError):
        tr["c"]
    with pytest.raises(NameError) as ei:
        tr.raise_exception()
    assert "undefined_name" in ei.value.remote_traceback


def test_retries_then_recovery_task(tc):
    rec = client.StringTask("r = 'recovered'", pull="r")
    tr = tc.run(client.StringTask("1/0", retries=2, recovery_task=rec), block=True)
    assert tr.ns.r == "recovered"
    # a chain mixing kinds: the result's kind comes from the engine's meta
    rec = client.MapTask(lambda: 7)
    assert tc.run(client.StringTask("1/0", recovery_task=rec), block=True) == 7


def test_block_false_before_finish_is_none_and_timeouts_lose_nothing(tc):
    tc.fake.hold = {100, 101}
    tid = tc.run(client.MapTask(lambda: 5))
    assert tc.get_task_result(tid) is None
    with pytest.raises(client.TaskTimeoutError) as ei:
        tc.get_task_result(tid, block=True, timeout=0.3)
    assert ei.value.taskids == [tid] and isinstance(ei.value, TimeoutError)
    tc.spin()                                    # the fake flushes held replies on any request
    assert tc.get_task_result(tid, block=True) == 5


def test_results_of_other_clients_come_by_task_result(tc):
    tc.fake.results[7] = (1, 0, [pickle.dumps({"id": 1, "input": "c = 1", "started": 1.0, "completed": 2.0})]
                          + _serialize.dumps({"c": 1}))
    tr = tc.get_task_result(7, block=True)
    assert tr.ns.c == 1 and tr.engineid == 1 and tr.duration == 1.0
    frame = [f for f in tc.fake.frames if f["kind"] == _ipmpi.K_TASK_RESULT][-1]
    assert frame["parts"] == [struct.pack("<QB", 7, 1)]
    assert tc.get_task_result(7) is tr            # cached: no second request
    assert tc.fake.kinds().count(_ipmpi.K_TASK_RESULT) == 1
    # a map result of someone else: meta with no input
    tc.fake.results[8] = (0, 0, [pickle.dumps({"id": 0, "input": ""})] + _serialize.dumps([1, 2]))
    assert tc.get_task_result(8, block=False) == [1, 2]
    assert [f for f in tc.fake.frames if f["kind"] == _ipmpi.K_TASK_RESULT][-1]["parts"] == \
        [struct.pack("<QB", 8, 0)]


def test_unknown_evicted_and_unfinished_ids(tc):
    with pytest.raises(IndexError, match="task ID not registered: 7"):
        tc.get_task_result(7, block=True)
    with pytest.raises(client.EvictedError, match="evicted"):
        tc.get_task_result(999)
    assert tc.get_task_result(998) is None
    with pytest.raises(TypeError):
        tc.get_task_result("3")


def test_reserve_blocks_double_and_are_fetched_ahead(tc):
    f = lambda x: x
    tids = [tc.run(client.MapTask(f, args=(i,))) for i in range(64 + 128 + 10)]
    assert tids == list(range(100, 100 + len(tids)))
    assert tc.fake.reserves[:3] == [64, 128, 256]
    assert [tc.get_task_result(t, block=True) for t in tids] == list(range(len(tids)))


def test_barrier_abort_spin_status_clear(tc):
    tids = [tc.run(client.MapTask(abs, args=(-i,))) for i in range(5)]
    assert tc.barrier(tids) is None
    assert tc.barrier(tids[0]) is None
    with pytest.raises(IndexError, match="5000"):
        tc.barrier([tids[0], 5000])
    with pytest.raises(IndexError, match="already completed"):
        tc.abort(tids[1])
    with pytest.raises(IndexError, match="task ID not registered: 4000"):
        tc.abort(4000)
    with pytest.raises(TypeError):
        tc.abort("x")
    assert tc.spin() is None
    assert tc.queue_status() == {"scheduled": 0, "pending": 0, "succeeded": 5, "failed": 0}
    assert tc.queue_status(True)["succeeded"] == tids
    assert tc.get_task_result(tids[0], block=True) == 0
    assert tc.clear([tids[0], tids[1]]) == 2
    with pytest.raises(IndexError):            # cleared here and there
        tc.get_task_result(tids[0])
    with pytest.raises(KeyError, match="no tasks found for ids: 6000"):
        tc.clear([tids[2], 6000])
    assert tc.clear() == 2
    assert tc.clear([]) == 0
    with pytest.raises(IndexError):
        tc.get_task_result(tids[4])


def test_aborted_and_dead_results(tc):
    tc.fake.force[100] = (_ipmpi.EABORTED, [b"task 100 aborted"])
    tc.fake.force[101] = (_ipmpi.EABORTED, [b"task 101 aborted"])
    tc.fake.force[102] = (3, _ipmpi.EDEAD, [b"engine 3 died (rank 4)"])
    tr = tc.run(client.StringTask("x = 1", pull="x"), block=True)
    assert isinstance(tr.failure, client.AbortedError) and tr.failure.code == _ipmpi.EABORTED
    with pytest.raises(client.AbortedError):
        tc.run(client.MapTask(abs, args=(1,)), block=True)
    with pytest.raises(client.DeadEngineError, match="died"):
        tc.run(client.MapTask(abs, args=(1,)), block=True)


def test_map_small_sequence_one_task_per_item(tc):
    assert tc.map(lambda x: x ** 10, range(16)) == [x ** 10 for x in range(16)]
    assert tc.fake.kinds().count(_ipmpi.K_TASK_SUBMIT) == 16
    assert tc.map(lambda x, y: x + y, [1, 2, 3], (10, 20, 30, 40)) == [11, 22, 33]
    assert tc.map(abs, []) == []


def test_map_long_sequence_goes_in_chunks(tc):
    n = 10000
    before = tc.fake.kinds().count(_ipmpi.K_TASK_SUBMIT)
    assert tc.map(lambda x: 2 * x, range(n)) == [2 * x for x in range(n)]
    assert tc.fake.kinds().count(_ipmpi.K_TASK_SUBMIT) - before == 2 * 8   # 2 engines, 8 chunks each
    assert tc._sent == {} and tc._done == {}                                # internal tasks not kept


def test_map_raises_the_first_failure(tc):
    with pytest.raises(ZeroDivisionError):
        tc.map(lambda x: 1 / (x - 50), range(1000))
    assert tc._sent == {}


def test_mapper_block_false_returns_task_ids_one_per_item(tc):
    m = tc.mapper(clear_before=True, clear_after=True, retries=1, block=False)
    tids = m.map(lambda x: x * x, range(40))
    assert len(tids) == 40 and all(isinstance(t, int) for t in tids)
    assert [tc.get_task_result(t, block=True) for t in tids] == [x * x for x in range(40)]
    sub = [f for f in tc.fake.frames if f["kind"] == _ipmpi.K_TASK_SUBMIT][-1]
    assert struct.unpack_from("<QIIII", sub["parts"][0])[3:] == (1, 1)
    assert _serialize.loads(sub["parts"][1:])[4] == {"clear_before": True, "clear_after": True,
                                                     "depend": None}


def test_parallel_decorator(tc):
    @tc.parallel()
    def f(x):
        return 10.0 * x ** 4
    assert f(range(32)) == [10.0 * x ** 4 for x in range(32)]
    assert f.__name__ == "f"


def test_map_with_recovery_task_runs_one_task_per_item(tc):
    rec = client.MapTask(lambda: -1)
    r = tc.mapper(recovery_task=rec).map(lambda x: 1 / x, range(3))
    assert r == [-1, 1.0, 0.5]


def test_run_refuses_cycles_before_sending(tc):
    a = client.StringTask("x")
    a.recovery_task = a
    with pytest.raises(ValueError):
        tc.run(a)
    with pytest.raises(TypeError):
        tc.run("x = 1")
    assert _ipmpi.K_TASK_SUBMIT not in tc.fake.kinds()


def test_threads_share_a_task_client(tc):
    out, errors = {}, []

    def worker(k):
        try:
            tids = [tc.run(client.MapTask(lambda a, b: a * b, args=(k, i))) for i in range(200)]
            out[k] = [tc.get_task_result(t, block=True) for t in tids]
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors and all(out[k] == [k * i for i in range(200)] for k in range(4))


def test_mec_property_methods_send_props_requests(cert):
    frames = []

    def serve(sock):
        def rd(n):
            buf = bytearray()
            while len(buf) < n:
                c = sock.recv(n - len(buf))
                if not c:
                    raise EOFError
                buf += c
            return bytes(buf)

        def read():
            h = HDR.unpack(rd(HDR.size))
            lens = struct.unpack("<%dQ" % h[8], rd(8 * h[8])) if h[8] else ()
            return h[2], h[4], h[5], [rd(n) for n in lens]

        def write(kind, req, target, parts, total):
            head = HDR.pack(_ipmpi.MAGIC, _ipmpi.PROTO_VERSION, kind, _ipmpi.F_REPLY, req, target, 0, total,
                            len(parts), 0)
            sock.sendall(head + struct.pack("<%dQ" % len(parts), *map(len, parts)) + b"".join(parts))

        kind, req, target, parts = read()
        write(kind, req, -2, [json.dumps({"capability": "mec", "engines": 2, "ids": [0, 1],
                                          "version": 1}).encode()], 1)
        props = {0: {}, 1: {}}
        while True:
            kind, req, target, parts = read()
            frames.append((kind, target, parts))
            assert kind == _ipmpi.K_PROPS
            op, arg = _serialize.loads(parts)
            ids = [0, 1] if target == _ipmpi.TARGET_ALL else [target]
            for eid in ids:
                p = props[eid]
                value = None
                if op == "set":
                    p.update(arg)
                elif op == "get":
                    value = dict(p) if arg is None else {k: p[k] for k in arg if k in p}
                elif op == "has":
                    value = [k in p for k in arg]
                elif op == "del":
                    for k in arg:
                        del p[k]
                elif op == "clear":
                    p.clear()
                write(kind, req, eid, [pickle.dumps({"id": eid, "kind": "props"})] + _serialize.dumps(value),
                      len(ids))

    key, crt, fp = cert
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def run():
        raw, _ = ls.accept()
        try:
            with ctx.wrap_socket(raw, server_side=True) as s:
                serve(s)
        except (EOFError, OSError, ssl.SSLError):
            pass

    th = threading.Thread(target=run, daemon=True)
    th.start()
    mec = client.MultiEngineClient("ipmpi+tls://%s@127.0.0.1:%d/%s" % (fp, ls.getsockname()[1], KEY),
                                   timeout=10)
    try:
        assert mec.set_properties({"gpu": True, "mem": 4}, targets=1) == [None]
        assert mec.get_properties() == [{}, {"gpu": True, "mem": 4}]
        assert mec.get_properties(targets=1) == [{"gpu": True, "mem": 4}]
        assert mec.get_properties("mem", targets=1) == [{"mem": 4}]
        assert mec.has_properties(["gpu", "x"]) == [[False, False], [True, False]]
        mec.del_properties("mem", targets=1)
        assert mec.get_properties(targets=1) == [{"gpu": True}]
        mec.clear_properties()
        assert mec.get_properties() == [{}, {}]
        assert frames[0][1] == 1 and _serialize.loads(frames[0][2]) == ("set", {"gpu": True, "mem": 4})
        with pytest.raises(TypeError):
            mec.set_properties([("a", 1)])
        assert hasattr(mec, "engine_info")
    finally:
        mec.close()
        th.join(10)
        ls.close()
