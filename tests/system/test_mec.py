"""Every MultiEngineClient method against one real 4-engine cluster.

The tests share the cluster (fixture `mec` in conftest.py); each sets up the
names it reads, so their order does not matter. Engine-killing tests live in
test_dead_engines.py.
"""
import os
import time

import numpy as np
import pytest

from ipmpi import client

ALL = [0, 1, 2, 3]


def main_function(src, name):
    """A function defined as a user at the prompt defines it (module __main__)."""
    ns = {"__name__": "__main__"}
    exec(src, ns)
    return ns[name]


def test_get_ids(mec):
    assert mec.get_ids() == ALL


def test_execute_returns_a_results_list_with_stdout_per_engine(mec):
    r = mec.execute('print("hi", 6 * 7)')
    assert isinstance(r, client.ResultList)
    assert [x["id"] for x in r] == ALL
    for x in r:
        assert x["stdout"] == "hi 42\n"
        assert x["input"] == {"translated": 'print("hi", 6 * 7)', "raw": 'print("hi", 6 * 7)'}
        assert isinstance(x["number"], int) and x["number"] >= 1
    text = repr(r)
    assert text.startswith("<Results List>\n")
    n = r[0]["number"]
    assert '[0] In [%d]: print("hi", 6 * 7)\n[0] Out[%d]: hi 42\n' % (n, n) in text


def test_execute_counts_per_engine_and_shows_stderr(mec):
    a = mec.execute("import sys; sys.stderr.write('oops\\n')", targets=1)
    b = mec.execute("pass", targets=1)
    assert b[0]["number"] == a[0]["number"] + 1
    assert a[0]["stderr"] == "oops\n"
    assert "[1] Err[%d]:\n oops\n" % a[0]["number"] in repr(a)


def test_push_and_pull_with_every_target_form(mec):
    mec.push(dict(a=5, b="x"))
    assert mec.pull("a") == [5, 5, 5, 5]
    assert mec.pull(["a", "b"]) == [[5, "x"]] * 4
    assert mec.pull(("a", "b"), targets=2) == [[5, "x"]]
    mec.push(dict(a=7), targets=1)
    assert mec.pull("a", targets=1) == [7]
    assert mec.pull("a", targets=[0, 1]) == [5, 7]
    assert mec.pull("a", targets=[3, 1]) == [5, 7]
    assert mec.pull("a", targets="all") == [5, 7, 5, 5]


def test_getitem_and_setitem(mec):
    mec["c"] = [1, 2, 3]
    assert mec["c"] == [[1, 2, 3]] * 4


def test_push_function_and_pull_function(mec):
    f = main_function("def f(y):\n    return y + offset\n", "f")
    mec.push(dict(offset=100))
    mec.push_function(dict(f=f))
    mec.execute("z = f(1)")
    assert mec.pull("z") == [101] * 4
    g = mec.pull_function("f", targets=0)
    assert callable(g[0])
    assert mec.pull_function(["f"], targets=[0, 1])[1][0].__name__ == "f"


def test_scatter_and_gather_lists_and_arrays(mec):
    mec.scatter("x", list(range(10)))
    parts = mec.pull("x")
    assert [len(p) for p in parts] in ([3, 3, 2, 2], [2, 2, 3, 3], [3, 2, 3, 2], [2, 3, 2, 3])
    assert sum(parts, []) == list(range(10))
    assert list(mec.gather("x")) == list(range(10))
    arr = np.arange(16.0)
    mec.scatter("y", arr)
    assert mec.pull("y", targets=3)[0].tolist() == [12.0, 13.0, 14.0, 15.0]
    g = mec.gather("y")
    assert isinstance(g, np.ndarray) and np.array_equal(g, arr)


def test_map_applies_in_order(mec):
    assert list(mec.map(lambda v: v * v, range(11))) == [v * v for v in range(11)]
    assert list(mec.map(str, [1, 2])) == ["1", "2"]


def test_run_executes_a_local_file(mec, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("ran = sum(range(5))\nprint('ran it')\n")
    mec.run(str(script))
    assert mec.pull("ran") == [10] * 4


def test_keys_and_reset(mec):
    mec.push(dict(k1=1, k2=2), targets=3)
    keys = mec.keys(targets=3)
    if keys and isinstance(keys[0], list):  # a per-engine list even for one engine
        keys = keys[0]
    assert "k1" in keys and "k2" in keys
    assert not any(k.startswith("__") for k in keys)
    mec.reset(targets=3)
    keys = mec.keys(targets=3)
    if keys and isinstance(keys[0], list):
        keys = keys[0]
    assert keys == []
    with pytest.raises(client.RemoteError) as ei:
        mec.pull("k1", targets=3)
    assert ei.value.etype == "NameError"


def test_get_result_by_number_and_last(mec):
    r = mec.execute("q = 3", targets=2)
    n = r[0]["number"]
    mec.execute("q = 4", targets=2)
    last = mec.get_result(targets=2)
    assert last[0]["input"]["raw"] == "q = 4" and last[0]["number"] == n + 1
    old = mec.get_result(n, targets=2)
    assert old[0]["input"]["raw"] == "q = 3" and old[0]["number"] == n


def test_nonblocking_execute_and_get_result_with_timeout(mec):
    pr = mec.execute("import time; time.sleep(1.5); done = 1", targets=[0, 2], block=False)
    assert not pr.ready()
    assert pr.get_result(block=False) is None
    with pytest.raises((TimeoutError, client.ResultNotCompleted)):
        pr.get_result(timeout=0.1)
    res = pr.get_result(timeout=30)
    assert [x["id"] for x in res] == [0, 2]
    assert pr.ready()
    assert mec.pull("done", targets=[0, 2]) == [1, 1]


def test_nonblocking_pull_has_the_same_post_processing(mec):
    mec.push(dict(w=9))
    pr = mec.pull("w", targets=1, block=False)
    assert pr.get_result(timeout=30) == [9]


def test_queue_status_and_clear_queue(mec):
    running = mec.execute("import time; time.sleep(2)", targets=1, block=False)
    queued = [mec.execute("qq = %d" % i, targets=1, block=False) for i in range(3)]
    time.sleep(0.3)
    st = dict(mec.queue_status(targets=1))
    assert st[1]["running"] == "execute"
    assert st[1]["queue"] == ["execute"] * 3
    full = mec.queue_status()
    assert [i for i, _ in full] == ALL
    mec.clear_queue(targets=1)
    for q in queued:
        with pytest.raises(client.AbortedError):
            q.get_result(timeout=30)
    running.get_result(timeout=30)
    st = dict(mec.queue_status(targets=1))
    assert st[1]["running"] is None and st[1]["queue"] == []


def test_large_numpy_round_trip_keeps_every_value(mec):
    rng = np.random.default_rng(12345)
    big = rng.standard_normal(8 * 1024 * 1024)  # 64 MiB of float64
    assert big.nbytes == 64 * 1024 * 1024
    t0 = time.monotonic()
    mec.push(dict(big=big))
    mec.execute("s = float(big.sum()); n = big.nbytes; w = big.flags.writeable")
    assert mec.pull("n") == [big.nbytes] * 4
    assert mec.pull("s") == [float(big.sum())] * 4
    back = mec.pull("big", targets=2)[0]
    assert isinstance(back, np.ndarray) and back.dtype == big.dtype and back.shape == big.shape
    assert np.array_equal(back, big)
    assert time.monotonic() - t0 < 120
    mec.execute("del big")


@pytest.mark.parametrize("code,etype", [
    ("undefined_name_xyz", "NameError"),
    ("1 / 0", "ZeroDivisionError"),
    ("def broken(:\n    pass", "SyntaxError"),
    ("import sys; sys.exit(3)", "SystemExit"),
    ("raise SystemExit('bye')", "SystemExit"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
])
def test_remote_error_names_engine_and_engine_lives_on(mec, code, etype):
    with pytest.raises(client.RemoteError) as ei:
        mec.execute(code, targets=1)
    e = ei.value
    assert e.engine_id == 1
    assert e.etype == etype
    assert "engine 1" in str(e) and etype in str(e)
    assert isinstance(e.traceback, str) and etype in e.traceback
    r = mec.execute("print('alive')", targets=1)
    assert r[0]["stdout"] == "alive\n"
    assert mec.get_ids() == ALL


def test_remote_traceback_shows_the_users_line(mec):
    with pytest.raises(client.RemoteError) as ei:
        mec.execute("a1 = 1\nb1 = a1 / 0\n", targets=0)
    assert "b1 = a1 / 0" in ei.value.traceback


def test_composite_error_lists_each_failing_engine(mec):
    mec.scatter("eid", list(range(4)))
    with pytest.raises(client.CompositeError) as ei:
        mec.execute("assert eid[0] % 2 == 0, 'odd engine'")
    errs = ei.value.errors
    assert sorted(e.engine_id for e in errs) == [1, 3]
    assert all(e.etype == "AssertionError" for e in errs)
    assert "[1:execute]" in str(ei.value) and "[3:execute]" in str(ei.value)
    assert sorted(x["id"] for x in ei.value.results) == [0, 2]
    with pytest.raises(AssertionError):
        ei.value.raise_exception()
    assert mec.execute("pass") is not None


def test_bad_targets_are_refused(mec):
    with pytest.raises((client.EngineError, ValueError)) as ei:
        mec.execute("pass", targets=7)
    assert "7" in str(ei.value)
    assert mec.get_ids() == ALL


def test_pull_of_unpicklable_value_is_a_remote_error(mec):
    mec.execute("import threading; lk = threading.Lock()", targets=0)
    with pytest.raises(client.RemoteError):
        mec.pull("lk", targets=0)
    assert mec.execute("print(1)", targets=0)[0]["stdout"] == "1\n"


def test_two_clients_are_served_side_by_side(cluster4):
    m1 = cluster4.client(timeout=60)
    m2 = cluster4.client(timeout=60)
    try:
        p1 = m1.execute("import time; time.sleep(0.5); v1 = 1", targets=0, block=False)
        p2 = m2.execute("v2 = 2", targets=3, block=False)
        assert p2.get_result(timeout=30)[0]["id"] == 3
        assert p1.get_result(timeout=30)[0]["id"] == 0
    finally:
        m1.close()
        m2.close()
    assert os.path.exists(cluster4.mec_furl)
