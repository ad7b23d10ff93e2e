"""The task interface on real clusters (doc/protocol.md section 6): every
example of IPython 0.10's parallel_task.txt, every TaskClient method, load
balancing, abort, retries, recovery tasks, depend and engine properties,
results fetched by a second client, engines dying under a task stream, a
MultiEngineClient at the same time, and bad input.

Task code is written as lambdas or functions nested in the tests (with
their imports inside): cloudpickle sends those by value, while a function
at the top of this module would be sent by reference to a module the
engines cannot import.
"""
import json
import os
import shutil
import struct
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from ipmpi import client

from conftest import controller_log, running_cluster, start_cluster, stop_cluster, wait_for

T = 120   # the bound of every wait that should be quick


@pytest.fixture(scope="module")
def tc(cluster4):
    c = client.TaskClient(cluster4.tc_furl, timeout=T)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def shared_dir():
    d = tempfile.mkdtemp(prefix="ipmpi-tasks-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clean_properties(mec):
    mec.clear_properties()
    yield
    mec.clear_properties()


def engine_pids(mec):
    return {d["id"]: d["pid"] for d in mec.engine_info()}


def getpid_task(**kw):
    def pid():
        import os
        return os.getpid()
    return client.MapTask(pid, **kw)


# ---------------------------------------------------------------- parallel_task.txt

def test_task_client_from_furl_file_and_default_location(cluster4, monkeypatch):
    monkeypatch.setenv("IPMPI_DIR", cluster4.ipmpi_dir)
    with client.TaskClient(timeout=T) as t:
        assert t.get_ids() == [0, 1, 2, 3]
    with client.TaskClient(cluster4.tc_furl, timeout=T) as t:
        assert t.get_ids() == [0, 1, 2, 3]


def test_docs_parallel_map(tc):
    serial_result = list(map(lambda x: x ** 10, range(32)))
    parallel_result = tc.map(lambda x: x ** 10, range(32))
    assert serial_result == parallel_result


def test_docs_parallel_function_decorator(tc):
    @tc.parallel()
    def f(x):
        return 10.0 * x ** 4

    r = f(range(32))
    assert r[:3] == [0.0, 10.0, 160.0] and r == [10.0 * x ** 4 for x in range(32)]


def test_docs_string_task_and_task_result(tc):
    tid = tc.run(client.StringTask("c = a * b", push=dict(a=6, b=7), pull="c"))
    assert isinstance(tid, int)
    tr = tc.get_task_result(tid, block=True)
    assert tr.ns.c == 42 and tr["c"] == 42 and tr.results == {"c": 42} and tr.keys == ["c"]
    assert tr.engineid in (0, 1, 2, 3) and tr.taskid == tid and tr.failure is None
    time.strptime(tr.submitted, "%Y/%m/%d %H:%M:%S")
    time.strptime(tr.completed, "%Y/%m/%d %H:%M:%S")
    assert isinstance(tr.duration, float) and 0 <= tr.duration < 60
    assert repr(tr) == "TaskResult[ID:%d]:{'c': 42}" % tid
    assert repr(tr.ns) == "NS{'c': 42}"
    assert client.Task is client.StringTask


def test_docs_map_task(tc):
    tid = tc.run(client.MapTask(lambda x, y: x ** y, args=(2, 10)))
    assert tc.get_task_result(tid, block=True) == 1024
    assert tc.run(client.MapTask(lambda x, y=1: x * y, args=[3], kwargs={"y": 5}), block=True) == 15


def test_string_task_pull_several_and_none(tc):
    tr = tc.run(client.StringTask("a = 1\nb = [a, 2]", pull=("a", "b")), block=True)
    assert tr.results == {"a": 1, "b": [1, 2]} and tr.ns.b == [1, 2]
    tr = tc.run(client.StringTask("z = 3"), block=True)
    assert tr.results == {} and tr.failure is None


# ---------------------------------------------------------------- results and failures

def test_failed_map_task_raises_the_remote_exception_as_its_own_type(tc):
    tid = tc.run(client.MapTask(lambda: 1 / 0))
    with pytest.raises(ZeroDivisionError) as ei:
        tc.get_task_result(tid, block=True)
    e = ei.value
    assert e.engine_id in (0, 1, 2, 3)
    assert "ZeroDivisionError" in e.remote_traceback and "1 / 0" in e.remote_traceback
    with pytest.raises(ZeroDivisionError):
        tc.run(client.MapTask(lambda: 1 / 0), block=True)


def test_failed_string_task_keeps_its_failure_in_the_task_result(tc):
    tr = tc.run(client.StringTask("c = 1/0", pull="c"), block=True)
    assert isinstance(tr.failure, ZeroDivisionError) and tr.results == {}
    assert repr(tr).startswith("TaskResult[ID:%d]:ZeroDivisionError" % tr.taskid)
    with pytest.raises(ZeroDivisionError):
        tr.ns
    with pytest.raises(ZeroDivisionError):
        tr["c"]
    with pytest.raises(ZeroDivisionError) as ei:
        tr.raise_exception()
    assert "c = 1/0" in ei.value.remote_traceback
    tr = tc.run(client.StringTask("raise KeyError('k')"), block=True)
    assert type(tr.failure) is KeyError and tr.failure.args == ("k",)


def test_a_user_exception_class_comes_back_with_its_name(tc):
    def boom():
        class Custom(Exception):
            pass
        raise Custom("mine")
    with pytest.raises(Exception) as ei:
        tc.run(client.MapTask(boom), block=True)
    assert "mine" in str(ei.value) and "Custom" in (type(ei.value).__name__ + str(ei.value)
                                                     + getattr(ei.value, "remote_traceback", ""))


def test_block_false_is_none_until_finished_and_timeouts_lose_nothing(tc):
    tid = tc.run(client.MapTask(lambda: __import__("time").sleep(1.5) or "slept"))
    assert tc.get_task_result(tid) is None
    assert tc.get_task_result(tid, block=False) is None
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        tc.get_task_result(tid, block=True, timeout=0.2)
    assert time.monotonic() - t0 < 1.0 and ei.value.taskids == [tid]
    with pytest.raises(TimeoutError):
        tc.barrier([tid], timeout=0.1)
    assert tc.get_task_result(tid, block=True, timeout=T) == "slept"
    assert tc.get_task_result(tid) == "slept"


def test_barrier_waits_for_every_task(tc):
    tids = [tc.run(client.MapTask(lambda s: __import__("time").sleep(s) or s, args=(0.1 * (i % 4),)))
            for i in range(12)]
    t0 = time.monotonic()
    assert tc.barrier(tids, timeout=T) is None
    assert time.monotonic() - t0 < 30
    assert [tc.get_task_result(t) for t in tids] == [0.1 * (i % 4) for i in range(12)]
    assert tc.barrier(tids[0], timeout=T) is None


def test_unknown_task_ids(tc):
    first = tc.run(client.MapTask(abs, args=(0,)))
    never = first + 10 ** 9     # this controller's (same high bits), never handed out
    with pytest.raises(IndexError, match="task ID not registered: %d" % never):
        tc.get_task_result(never, block=True)
    with pytest.raises(IndexError, match="task ID not registered"):
        tc.get_task_result(never)
    with pytest.raises(IndexError, match=str(never)):
        tc.barrier([never], timeout=T)
    tid = tc.run(client.MapTask(abs, args=(-1,)))
    with pytest.raises(IndexError, match=str(never + 1)):
        tc.barrier([tid, never + 1], timeout=T)
    with pytest.raises(IndexError):
        tc.abort(never)
    with pytest.raises(KeyError, match=str(never)):
        tc.clear([never])
    with pytest.raises(TypeError):
        tc.abort("1")
    # An id whose high 32 bits name another controller: InvalidDeferredID.
    with pytest.raises(client.InvalidDeferredID, match="belongs to another controller"):
        tc.get_task_result(first ^ (1 << 40), block=True)
    assert tc.get_task_result(tid, block=True) == 1


def test_queue_status_counts_and_lists(tc):
    tc.clear()
    tids = [tc.run(client.MapTask(abs, args=(-i,))) for i in range(6)]
    bad = tc.run(client.MapTask(lambda: 1 / 0))
    tc.barrier(tids + [bad], timeout=T)
    s = tc.queue_status()
    assert set(s) == {"scheduled", "pending", "succeeded", "failed"}
    assert all(isinstance(v, int) for v in s.values())
    v = tc.queue_status(True)
    assert set(v) == {"scheduled", "pending", "succeeded", "failed"}
    assert set(tids) <= set(v["succeeded"]) and bad in v["failed"]
    assert s["succeeded"] >= 6 and s["failed"] >= 1


def test_clear_forgets_results_here_and_in_the_controller(tc):
    tids = [tc.run(client.MapTask(abs, args=(-i,))) for i in range(5)]
    tc.barrier(tids, timeout=T)
    assert tc.get_task_result(tids[0], block=True) == 0
    assert tc.clear(tids[:2]) == 2
    for t in tids[:2]:
        with pytest.raises(IndexError):
            tc.get_task_result(t, block=True)
    with pytest.raises(KeyError):
        tc.clear(tids[:1])
    assert tc.clear() >= 3
    for t in tids[2:]:
        with pytest.raises(IndexError):
            tc.get_task_result(t)
    s = tc.queue_status()
    assert s["succeeded"] == 0 and s["failed"] == 0
    assert tc.clear([]) == 0


def test_clear_refuses_unfinished_tasks(tc):
    tid = tc.run(client.MapTask(lambda: __import__("time").sleep(1) or 1))
    with pytest.raises(KeyError, match=str(tid)):
        tc.clear([tid])
    assert tc.get_task_result(tid, block=True) == 1


# ---------------------------------------------------------------- load balancing and speed

def test_sixteen_quarter_second_tasks_on_four_engines_are_balanced(tc):
    def nap():
        import os
        import time
        time.sleep(0.25)
        return os.getpid()
    tc.run(client.MapTask(abs, args=(1,)), block=True)   # ids reserved, function cache warm
    t0 = time.monotonic()
    tids = [tc.run(client.MapTask(nap)) for _ in range(16)]
    pids = [tc.get_task_result(t, block=True) for t in tids]
    elapsed = time.monotonic() - t0
    assert elapsed < 1.6, "16 x 0.25 s on 4 engines took %.2f s" % elapsed
    assert len(set(pids)) == 4


def test_map_of_a_long_sequence_goes_in_chunks(tc):
    tc.clear()
    before = tc.queue_status()
    n = 100000
    t0 = time.monotonic()
    r = tc.map(lambda x: x + 1, range(n))
    elapsed = time.monotonic() - t0
    assert r == list(range(1, n + 1))
    after = tc.queue_status()
    tasks = after["succeeded"] - before["succeeded"]
    assert 4 <= tasks <= 4 * 8, "100000 items took %d tasks" % tasks
    assert elapsed < 30
    assert tc.map(lambda x, y: x * y, range(1000), range(1000)) == [x * x for x in range(1000)]
    tc.clear()


def test_twenty_thousand_small_tasks_all_come_back_in_order(tc):
    # The rate is bench/bench_tasks.py's business; this checks that a
    # stream of many small tasks loses and mixes up nothing.
    tc.clear()
    f = lambda x: x
    n = 20000
    tids = [tc.run(client.MapTask(f, args=(i,))) for i in range(n)]
    assert len(set(tids)) == n
    got = [tc.get_task_result(t, block=True, timeout=T) for t in tids]
    assert got == list(range(n))
    assert tc.queue_status()["succeeded"] == n
    tc.clear()


def test_mapper_block_false_returns_task_ids(tc):
    m = tc.mapper(clear_before=True, clear_after=True, retries=1, block=False)
    tids = m.map(lambda x: x * 3, range(20))
    assert len(tids) == 20 and len(set(tids)) == 20
    assert [tc.get_task_result(t, block=True) for t in tids] == [x * 3 for x in range(20)]
    assert tc.mapper(block=True).map(lambda a, b: a - b, [5, 6], [1, 1]) == [4, 5]


def test_map_raises_the_first_failure(tc):
    with pytest.raises(ZeroDivisionError):
        tc.map(lambda x: 1 / (x - 7), range(50))
    assert tc.map(lambda x: x, range(3)) == [0, 1, 2]


def test_function_cache_sees_a_rebound_closure_value(tc):
    def make(k):
        def f(x):
            return x * k
        return f
    f = make(2)
    assert tc.run(client.MapTask(f, args=(5,)), block=True) == 10
    f.__closure__[0].cell_contents = 3
    assert tc.run(client.MapTask(f, args=(5,)), block=True) == 15


# ---------------------------------------------------------------- abort

def test_abort_a_scheduled_task(tc):
    tc.clear()
    sleeper = lambda: __import__("time").sleep(0.6)
    busy = [tc.run(client.MapTask(sleeper)) for _ in range(20)]   # more than engines and their depth
    last_map = tc.run(client.MapTask(lambda: "ran"))
    last_str = tc.run(client.StringTask("r = 'ran'", pull="r"))
    st = tc.queue_status(True)
    assert last_map in st["scheduled"] and last_str in st["scheduled"], st
    assert tc.abort(last_map) is None
    assert tc.abort(last_str) is None
    with pytest.raises(IndexError):
        tc.abort(last_map)                         # already aborted
    with pytest.raises(client.AbortedError):
        tc.get_task_result(last_map, block=True)
    tr = tc.get_task_result(last_str, block=True)
    assert isinstance(tr.failure, client.AbortedError)
    with pytest.raises(client.AbortedError):
        tr.ns
    assert last_map in tc.queue_status(True)["failed"]
    tc.barrier(busy, timeout=T)
    with pytest.raises(IndexError):
        tc.abort(busy[0])                          # completed
    tc.clear()


def test_abort_a_pending_task_discards_its_result(tc, shared_dir):
    mark = os.path.join(shared_dir, "ran")

    def slow(path):
        import time
        time.sleep(1.0)
        open(path, "w").close()
        return "done"
    tid = tc.run(client.MapTask(slow, args=(mark,)))
    wait_for(lambda: tid in tc.queue_status(True)["pending"], 30, what="the task to be pending")
    assert tc.abort(tid) is None
    with pytest.raises(client.AbortedError):
        tc.get_task_result(tid, block=True)
    wait_for(lambda: os.path.exists(mark), 30, what="the pending task to run to its end")


# ---------------------------------------------------------------- retries and recovery

def test_a_retry_lands_on_another_engine(tc, mec, shared_dir):
    marker = os.path.join(shared_dir, "first")

    def once(path):
        import os
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(str(os.getpid()))
            raise RuntimeError("first attempt fails")
        return os.getpid()
    pids = engine_pids(mec)
    tr_value = tc.run(client.MapTask(once, args=(marker,), retries=1), block=True)
    with open(marker) as f:
        first = int(f.read())
    assert tr_value != first and tr_value in pids.values()
    # a StringTask says which engine ran the last attempt
    marker2 = marker + "2"
    code = textwrap.dedent("""
        import os
        if not os.path.exists(%r):
            open(%r, "w").write(str(os.getpid()))
            raise RuntimeError("first attempt fails")
        pid = os.getpid()
    """) % (marker2, marker2)
    tr = tc.run(client.StringTask(code, pull="pid", retries=1), block=True)
    with open(marker2) as f:
        first = int(f.read())
    assert tr.failure is None and tr.ns.pid != first and pids[tr.engineid] == tr.ns.pid


def test_retries_are_counted_then_the_failure_is_the_result(tc, shared_dir):
    log = os.path.join(shared_dir, "attempts")

    def fail(path):
        with open(path, "a") as f:
            f.write("x")
        raise ValueError("always")
    with pytest.raises(ValueError, match="always"):
        tc.run(client.MapTask(fail, args=(log,), retries=3), block=True)
    with open(log) as f:
        assert f.read() == "xxxx"


def test_recovery_tasks(tc, shared_dir):
    rec = client.StringTask("r = 'recovered'", pull="r")
    tr = tc.run(client.StringTask("r = 1/0", pull="r", recovery_task=rec), block=True)
    assert tr.failure is None and tr.ns.r == "recovered"
    assert tc.run(client.MapTask(lambda: 1 / 0, recovery_task=client.MapTask(lambda: "plan b")),
                  block=True) == "plan b"
    # retries of each stage, then the next stage; the last failure is the result
    log = os.path.join(shared_dir, "stages")

    def fail(path, tag):
        with open(path, "a") as f:
            f.write(tag)
        raise ValueError(tag)
    r2 = client.MapTask(fail, args=(log, "c"), retries=0)
    r1 = client.MapTask(fail, args=(log, "b"), retries=1, recovery_task=r2)
    with pytest.raises(ValueError, match="c"):
        tc.run(client.MapTask(fail, args=(log, "a"), retries=2, recovery_task=r1), block=True)
    with open(log) as f:
        assert f.read() == "aaabbc"
    # a mapper's recovery task stands in for a failed item
    assert tc.mapper(recovery_task=client.MapTask(lambda: -1)).map(lambda x: 1 / x, [0, 1, 2]) == [-1, 1.0, 0.5]


def test_recovery_cycle_is_refused_and_the_client_goes_on(tc):
    a = client.StringTask("x = 1")
    b = client.StringTask("x = 2", recovery_task=a)
    a.recovery_task = b
    with pytest.raises(ValueError, match="cycle"):
        tc.run(a)
    assert tc.run(client.MapTask(abs, args=(-2,)), block=True) == 2


# ---------------------------------------------------------------- depend and properties

def test_engine_properties_on_the_multiengine_client(mec, clean_properties):
    assert mec.get_properties() == [{}, {}, {}, {}]
    mec.set_properties({"gpu": True, "mem": 16}, targets=2)
    assert mec.get_properties(targets=2) == [{"gpu": True, "mem": 16}]
    assert mec.get_properties(["mem"], targets=[2]) == [{"mem": 16}]
    assert mec.has_properties(["gpu", "nope"]) == [[False, False]] * 2 + [[True, False]] + [[False, False]]
    mec.del_properties(["mem"], targets=2)
    assert mec.get_properties(targets=2) == [{"gpu": True}]
    # user code on the engine sees the same dict as `properties`
    mec.execute("properties['seen'] = properties.get('gpu', False)", targets=2)
    assert mec.get_properties("seen", targets=2) == [{"seen": True}]
    pending = mec.get_properties(block=False)
    assert pending.get_result(timeout=T)[2]["gpu"] is True
    mec.clear_properties(targets=2)
    assert mec.get_properties(targets=2) == [{}]
    info = mec.engine_info()
    assert [d["id"] for d in info] == [0, 1, 2, 3] and all("pid" in d and "host" in d for d in info)
    assert mec.engine_info(targets=1)["id"] == 1


def test_depend_runs_tasks_only_where_it_is_true(tc, mec, clean_properties):
    pids = engine_pids(mec)
    mec.set_properties({"gpu": True}, targets=2)
    tids = [tc.run(getpid_task(depend=lambda p: p.get("gpu"))) for _ in range(8)]
    assert {tc.get_task_result(t, block=True) for t in tids} == {pids[2]}
    tr = tc.run(client.StringTask("import os; pid = os.getpid()", pull="pid",
                                  depend=lambda p: p.get("gpu")), block=True)
    assert tr.engineid == 2 and tr.ns.pid == pids[2]


def test_a_task_nobody_accepts_waits_until_properties_change(tc, mec, clean_properties):
    pids = engine_pids(mec)
    tid = tc.run(getpid_task(depend=lambda p: p.get("special") == "yes"))
    time.sleep(0.5)
    assert tc.get_task_result(tid) is None
    assert tid in tc.queue_status(True)["scheduled"]
    assert tc.spin() is None
    time.sleep(0.3)
    assert tc.get_task_result(tid) is None
    # other tasks are not held up by it
    assert tc.run(client.MapTask(abs, args=(-5,)), block=True) == 5
    mec.set_properties({"special": "yes"}, targets=1)
    assert tc.get_task_result(tid, block=True, timeout=30) == pids[1]


def test_a_depend_that_raises_counts_as_false(tc, mec, clean_properties):
    pids = engine_pids(mec)
    tid = tc.run(getpid_task(depend=lambda p: p["missing"] > 0))
    time.sleep(0.5)
    assert tc.get_task_result(tid) is None
    assert tid in tc.queue_status(True)["scheduled"]
    mec.set_properties({"missing": 1}, targets=3)
    assert tc.get_task_result(tid, block=True, timeout=30) == pids[3]


def test_properties_set_by_user_code_wake_waiting_tasks(tc, mec, clean_properties):
    pids = engine_pids(mec)
    tid = tc.run(getpid_task(depend=lambda p: p.get("ready")))
    time.sleep(0.3)
    assert tc.get_task_result(tid) is None
    mec.execute("properties['ready'] = True", targets=0)
    assert tc.get_task_result(tid, block=True, timeout=30) == pids[0]


# ---------------------------------------------------------------- two clients, mec alongside

def test_a_second_client_fetches_results_after_the_first_closed(cluster4):
    first = client.TaskClient(cluster4.tc_furl, timeout=T)
    try:
        s = first.run(client.StringTask("c = a * b", push=dict(a=6, b=7), pull="c"))
        m = first.run(client.MapTask(lambda x, y: x ** y, args=(2, 10)))
        bad = first.run(client.MapTask(lambda: 1 / 0))
        slow = first.run(client.MapTask(lambda: __import__("time").sleep(1.0) or "late"))
        first.barrier([s, m, bad], timeout=T)
    finally:
        first.close()
    with client.TaskClient(cluster4.tc_furl, timeout=T) as second:
        tr = second.get_task_result(s, block=True)
        assert tr.ns.c == 42 and tr.taskid == s
        assert second.get_task_result(m, block=True) == 1024
        with pytest.raises(ZeroDivisionError):
            second.get_task_result(bad, block=True)
        assert second.get_task_result(slow, block=True) == "late"
        assert second.barrier([s, m, slow], timeout=T) is None
        # the second client's own ids never collide with the first's
        mine = second.run(client.MapTask(abs, args=(-3,)))
        assert mine not in (s, m, bad, slow)
        assert second.get_task_result(mine, block=True) == 3


def test_multiengine_client_at_the_same_time(tc, mec):
    errors = []
    stop = threading.Event()

    def mec_loop():
        try:
            i = 0
            while not stop.is_set():
                mec.push({"i": i})
                assert mec.pull("i") == [i] * 4
                assert len(mec.execute("j = i * 2")) == 4
                i += 1
        except Exception as e:
            errors.append(e)

    th = threading.Thread(target=mec_loop)
    th.start()
    try:
        for _ in range(5):
            assert tc.map(lambda x: x * x, range(200)) == [x * x for x in range(200)]
            tids = [tc.run(client.MapTask(abs, args=(-i,))) for i in range(100)]
            assert [tc.get_task_result(t, block=True) for t in tids] == list(range(100))
    finally:
        stop.set()
        th.join(T)
    assert not th.is_alive() and not errors, errors


def test_threads_share_one_task_client(tc):
    out, errors = {}, []

    def worker(k):
        try:
            tids = [tc.run(client.MapTask(lambda a, b: a * b, args=(k, i))) for i in range(300)]
            out[k] = [tc.get_task_result(t, block=True) for t in tids]
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(T)
    assert not errors and all(out[k] == [k * i for i in range(300)] for k in range(4))


# ---------------------------------------------------------------- bad input

@pytest.fixture
def private_module(tmp_path):
    """A module importable here only (its directory is on this sys.path)."""
    name = "ipmpi_private_%d" % os.getpid()
    (tmp_path / (name + ".py")).write_text(textwrap.dedent("""
        class Thing:
            value = 5

        def make():
            return Thing()

        def double(x):
            return 2 * x
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        mod = __import__(name)
        yield mod
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_a_function_the_engine_cannot_unpickle_gives_a_clear_error(tc, private_module):
    name = private_module.__name__
    with pytest.raises(Exception) as ei:
        tc.run(client.MapTask(private_module.double, args=(2,)), block=True)
    text = "%s %s %s" % (type(ei.value).__name__, ei.value, getattr(ei.value, "remote_traceback", ""))
    assert name in text, text
    with pytest.raises(Exception) as ei:
        tc.run(client.MapTask(lambda t: t.value, args=(private_module.make(),)), block=True)
    assert name in "%s %s" % (ei.value, getattr(ei.value, "remote_traceback", ""))
    tr = tc.run(client.StringTask("x = 1", push={"t": private_module.make()}, pull="x"), block=True)
    assert tr.failure is not None and name in "%s %s" % (tr.failure, getattr(tr.failure, "remote_traceback", ""))
    # the engines go on
    assert tc.map(lambda x: x + 1, range(8)) == list(range(1, 9))


def test_an_instance_of_a_class_made_on_the_engine_comes_back(tc):
    def make():
        class Local:
            pass
        return Local()
    r = tc.run(client.MapTask(make), block=True)
    assert type(r).__name__ == "Local"


# ---------------------------------------------------------------- engines dying

@pytest.fixture(scope="module")
def dying_cluster():
    yield from running_cluster(4)


def test_tasks_survive_engines_dying_under_a_stream(dying_cluster, shared_dir):
    mec = dying_cluster.client(timeout=T)
    tc = client.TaskClient(dying_cluster.tc_furl, timeout=T)
    try:
        def work(i):
            import time
            time.sleep(0.02)
            return i * i

        # 1. An engine dies in user code (os._exit) under a task, ahead of a
        # stream: that task and those queued on that engine run elsewhere.
        marker = os.path.join(shared_dir, "exited")

        def exit_once(path):
            import os
            if not os.path.exists(path):
                open(path, "w").close()
                os._exit(3)
            return "survived"
        exiter = tc.run(client.MapTask(exit_once, args=(marker,), retries=1))
        tids = [tc.run(client.MapTask(work, args=(i,), retries=1)) for i in range(300)]
        assert tc.get_task_result(exiter, block=True, timeout=T) == "survived"
        assert [tc.get_task_result(t, block=True, timeout=T) for t in tids] == [i * i for i in range(300)]
        wait_for(lambda: len(mec.get_ids()) == 3, 30, what="the exited engine to be gone")

        # 2. The MultiEngineClient kills an engine while the stream runs.
        tids = [tc.run(client.MapTask(work, args=(i,), retries=1)) for i in range(300)]
        time.sleep(0.3)
        assert tc.queue_status()["scheduled"] + tc.queue_status()["pending"] > 0
        victim = max(mec.get_ids())
        mec.kill(targets=victim, timeout=T)
        tids += [tc.run(client.MapTask(work, args=(i,), retries=1)) for i in range(300, 400)]
        assert [tc.get_task_result(t, block=True, timeout=T) for t in tids] == [i * i for i in range(400)]
        wait_for(lambda: len(mec.get_ids()) == 2, 30, what="the killed engine to be gone")
        assert tc.map(lambda x: -x, range(50)) == [-x for x in range(50)]

        # 3. With no retry left, the death is the result.
        dead = tc.run(client.MapTask(lambda: __import__("os")._exit(4)))
        with pytest.raises(client.DeadEngineError):
            tc.get_task_result(dead, block=True, timeout=T)
        wait_for(lambda: len(tc.get_ids()) == 1, 30, what="a third engine to be gone")
        last = mec.get_ids()[0]
        assert tc.run(client.StringTask("x = 2", pull="x"), block=True).engineid == last

        # 4. A task no live engine accepts waits, and can be aborted.
        waiting = tc.run(client.MapTask(abs, args=(1,), depend=lambda p: p.get("never")))
        time.sleep(0.3)
        assert tc.get_task_result(waiting) is None
        assert tc.abort(waiting) is None
        with pytest.raises(client.AbortedError):
            tc.get_task_result(waiting, block=True, timeout=T)
    finally:
        tc.close()
        mec.close()


# ---------------------------------------------------------------- memory budget

BUDGET = 4 << 20   # --task-memory of the small cluster: 4 MiB


@pytest.fixture(scope="module")
def small_cluster():
    yield from running_cluster(2, engine_args=("--task-memory", str(BUDGET)))


def test_a_submission_beyond_the_task_memory_is_refused_and_nothing_else_is_lost(small_cluster):
    with client.TaskClient(small_cluster.tc_furl, timeout=T) as tc:
        big = b"x" * (BUDGET + 1024)
        tid = tc.run(client.MapTask(len, args=(big,)))
        with pytest.raises(client.EngineError) as ei:
            tc.get_task_result(tid, block=True)
        assert ei.value.code == client._c.E2BIG
        assert "task memory" in str(ei.value)
        # The controller and the next task are unharmed.
        assert tc.run(client.MapTask(len, args=(b"abc",)), block=True) == 3
        tc.clear()


def test_results_beyond_the_budget_evict_the_oldest_and_say_so(small_cluster):
    with client.TaskClient(small_cluster.tc_furl, timeout=T) as tc:
        tc.clear()
        # Ten results of 1 MiB each do not fit in 4 MiB: the oldest go.
        tids = [tc.run(client.MapTask(lambda n: b"r" * n, args=(1 << 20,))) for _ in range(10)]
        # The submitter received each result as it finished: all are here.
        assert [len(tc.get_task_result(t, block=True)) for t in tids] == [1 << 20] * 10
        status = tc.queue_status(True)
        kept = status["succeeded"]
        # At most 3 MiB-results fit in 4 MiB (with the payloads); the ones
        # that finished last are kept (with look-ahead, not always the
        # highest ids).
        assert 0 < len(kept) <= 3 and set(kept) < set(tids), status
        with client.TaskClient(small_cluster.tc_furl, timeout=T) as other:
            for t in tids:
                if t in kept:
                    assert len(other.get_task_result(t, block=True)) == 1 << 20
                else:
                    with pytest.raises(client.EvictedError) as ei:
                        other.get_task_result(t, block=True)
                    assert str(t) in str(ei.value)
        tc.clear()


def test_a_client_that_submits_100000_tasks_and_disconnects(cluster4):
    first = client.TaskClient(cluster4.tc_furl, timeout=T)
    f = lambda x: x
    tids = [first.run(client.MapTask(f, args=(i,))) for i in range(100000)]
    first.close()   # nothing collected, most tasks still queued
    with client.TaskClient(cluster4.tc_furl, timeout=T) as tc:
        # Another client is served meanwhile, and the queued tasks go on.
        assert tc.run(client.MapTask(lambda: "served"), block=True) == "served"
        wait_for(lambda: (lambda s: s["scheduled"] + s["pending"] == 0)(tc.queue_status()), T,
                 what="the disconnected client's tasks to finish")
        assert tc.barrier(tids[-10:]) is None
        assert [tc.get_task_result(t, block=True) for t in tids[-10:]] == list(range(99990, 100000))
        assert tc.get_task_result(tids[0], block=True) == 0
        tc.clear()
        assert tc.queue_status()["succeeded"] == 0


# ---------------------------------------------------------------- malformed task frames

def test_malformed_task_frames_get_clear_errors_and_the_session_goes_on(cluster4, tc):
    """Raw TASK_* frames a broken or hostile tc client might send: each gets
    its own error reply, the connection stays in step, and the controller
    keeps serving the real client."""
    from ipmpi import _consts as K
    from conftest import frame, parse_furl, read_frame, tls_connect

    s = tls_connect(cluster4.tc_furl)
    rid = [100]

    def ask(kind, parts):
        rid[0] += 1
        s.sendall(frame(kind, rid[0], target=K.TARGET_ALL, parts=parts))
        rkind, flags, req_id, target, status, total, rparts = read_frame(s)
        assert flags & K.F_REPLY and req_id == rid[0] and rkind == kind
        return status, (rparts[0].decode("utf-8", "replace") if rparts else "")

    try:
        status, _ = ask(K.K_HELLO, [parse_furl(cluster4.tc_furl)[3].encode()])
        assert status == 0
        # Reservations.
        assert ask(K.K_TASK_RESERVE, [b"\x01\x00"])[0] == K.EPROTO
        assert ask(K.K_TASK_RESERVE, [struct.pack("<I", 0)])[0] == K.EINVAL
        assert ask(K.K_TASK_RESERVE, [struct.pack("<I", 1 << 30)])[0] == K.EINVAL
        status, text = ask(K.K_TASK_RESERVE, [struct.pack("<I", 4)])
        assert status == 0
        first = json.loads(text)["first"]
        stage = b"not a pickle"

        def desc(tid, nst=1, parts=(1,), retries=(0,)):
            d = struct.pack("<QII", tid, nst, 0)
            return d + b"".join(struct.pack("<II", p, r) for p, r in zip(parts, retries))

        # Descriptors: too short, no stages, too many stages, a part count
        # that does not match the frame, a stage without parts, too many
        # retries, an id this session did not reserve.
        assert ask(K.K_TASK_SUBMIT, [b"\x00" * 8, stage])[0] == K.EPROTO
        assert ask(K.K_TASK_SUBMIT, [desc(first, 0, (), ()), stage])[0] == K.EPROTO
        assert ask(K.K_TASK_SUBMIT, [desc(first, 17, (1,) * 17, (0,) * 17)] + [stage] * 17)[0] == K.EPROTO
        assert ask(K.K_TASK_SUBMIT, [desc(first, 1, (2,), (0,)), stage])[0] == K.EPROTO
        assert ask(K.K_TASK_SUBMIT, [desc(first, 2, (1, 0), (0, 0)), stage])[0] == K.EINVAL
        assert ask(K.K_TASK_SUBMIT, [desc(first, 1, (1,), (5000,)), stage])[0] == K.EINVAL
        status, text = ask(K.K_TASK_SUBMIT, [desc(first + 1000000), stage])
        assert status == K.EINVAL and "not reserved" in text
        # A well-formed task whose stage is garbage fails on the engine, as a result.
        status, text = ask(K.K_TASK_SUBMIT, [desc(first), stage])
        assert status == K.EREMOTE
        # The same id twice.
        status, text = ask(K.K_TASK_SUBMIT, [desc(first), stage])
        assert status == K.EINVAL and "already in use" in text
        # The other kinds: wrong sizes, unknown ids.
        assert ask(K.K_TASK_RESULT, [b"\x00" * 3])[0] == K.EPROTO
        assert ask(K.K_TASK_RESULT, [struct.pack("<QB", first + 3, 0)])[0] == K.ENOENT
        assert ask(K.K_TASK_RESULT, [struct.pack("<QB", 1 << 62, 1)])[0] == K.ENOENT
        assert ask(K.K_TASK_BARRIER, [b""])[0] == K.EPROTO
        assert ask(K.K_TASK_BARRIER, [b"\x01" * 12])[0] == K.EPROTO
        status, text = ask(K.K_TASK_BARRIER, [struct.pack("<2Q", first, 1 << 61)])
        assert status == K.ENOENT and str(1 << 61) in text
        assert ask(K.K_TASK_ABORT, [b"\x00"])[0] == K.EPROTO
        assert ask(K.K_TASK_ABORT, [struct.pack("<Q", first)])[0] == K.EINVAL   # finished already
        assert ask(K.K_TASK_CLEAR, [b"\x00" * 5])[0] == K.EPROTO
        status, text = ask(K.K_TASK_CLEAR, [struct.pack("<Q", 1 << 60)])
        assert status == 0 and json.loads(text) == {"cleared": 0, "unknown": [1 << 60]}
        # MultiEngine kinds on the task capability.
        assert ask(K.K_EXECUTE, [b"1"])[0] == K.EACCES
        assert ask(K.K_PROPS, [b""])[0] == K.EACCES
        # The session is still in step, and the controller serves others.
        status, text = ask(K.K_TASK_STATUS, [b"\x00"])
        assert status == 0 and set(json.loads(text)) == {"scheduled", "pending", "succeeded", "failed"}
        assert ask(K.K_TASK_CLEAR, [struct.pack("<Q", first)])[0] == 0
    finally:
        s.close()
    assert tc.run(client.MapTask(lambda: "still served"), block=True) == "still served"


def test_the_unread_bound_is_an_option():
    # --client-unread-bytes 8 MiB: a client that leaves 2 MiB results unread
    # is held after a few of them, not after 128 MiB.
    c = start_cluster(2, engine_args=("--client-unread-bytes", str(8 << 20)), join=False)
    try:
        a = client.TaskClient(c.tc_furl, timeout=T)
        b = client.TaskClient(c.tc_furl, timeout=T)
        try:
            tids = [a.run(client.MapTask(lambda: b"y" * (2 << 20))) for _ in range(20)]

            def held():
                s = b.queue_status()
                return s["scheduled"] > 0 and s["pending"] == 0
            wait_for(held, T, what="the tasks of the client that does not read to be held")
            assert b.queue_status()["succeeded"] <= 10
            assert all(len(a.get_task_result(t, block=True)) == 2 << 20 for t in tids)
        finally:
            a.close()
            b.close()
    finally:
        stop_cluster(c)
    assert "tasks of a client are held: it has not read 8 MiB of results" in controller_log(c.log_dir)


def test_a_client_that_does_not_read_its_results_is_held_and_others_go_on(cluster4):
    # 80 results of 4 MiB that client A does not read: past 128 MiB unread
    # its tasks wait in the controller, client B is served meanwhile, and
    # once A reads, the rest runs.
    a = client.TaskClient(cluster4.tc_furl, timeout=T)
    b = client.TaskClient(cluster4.tc_furl, timeout=T)
    try:
        b.clear()
        tids = [a.run(client.MapTask(lambda: b"x" * (4 << 20))) for _ in range(80)]

        def held():
            s = b.queue_status()
            return s["scheduled"] > 0 and s["pending"] == 0
        wait_for(held, T, what="the tasks of the client that does not read to be held")
        assert b.map(lambda x: x + 1, range(20)) == list(range(1, 21))
        assert b.queue_status()["scheduled"] > 0, "A's tasks ran although it read nothing"
        assert all(len(a.get_task_result(t, block=True)) == 4 << 20 for t in tids)
        assert b.queue_status()["scheduled"] == 0
    finally:
        a.clear()
        a.close()
        b.close()
