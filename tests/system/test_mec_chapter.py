"""Every example of IPython 0.10's chapter "IPython's multiengine interface"
(parallel_multiengine.txt), in Python 3 syntax, through the client on a
real 4-engine cluster, with the outputs the chapter shows.

The tests run in the chapter's order on one fresh cluster: the first
section's execution numbers are the chapter's own ([0] In [1]: a=5 ...).
Later sections of the chapter come from other sessions (their numbers
restart), so there the <Results List> text is compared verbatim with each
engine's number taken from its previous result. The magics of the chapter
are in test_magics.py (a real IPython shell).
"""
import re
import time

import pytest

from ipmpi import client

ALL = [0, 1, 2, 3]
T = 60


def renumber(text, start):
    """text with each engine's In/Out numbers advanced from start[id]."""
    def sub(m):
        return "[%s] %s[%d]:" % (m.group(1), m.group(2), start[int(m.group(1))])
    return re.sub(r"\[(\d)\] (In |Out)\[N\]:", sub, text)


def numbers(rl):
    return {r["id"]: r["number"] for r in rl}


def test_get_ids(mec):
    assert mec.get_ids() == ALL
    assert len(mec) == 4


def test_blocking_execution_as_the_chapter_shows_it(mec):
    assert repr(mec.execute('a=5')) == (
        "<Results List>\n[0] In [1]: a=5\n[1] In [1]: a=5\n[2] In [1]: a=5\n[3] In [1]: a=5\n")
    assert repr(mec.execute('b=10')) == (
        "<Results List>\n[0] In [2]: b=10\n[1] In [2]: b=10\n[2] In [2]: b=10\n[3] In [2]: b=10\n")
    assert repr(mec.execute('c=a+b', targets=[0, 2])) == (
        "<Results List>\n[0] In [3]: c=a+b\n[2] In [3]: c=a+b\n")
    assert repr(mec.execute('c=a-b', targets=[1, 3])) == (
        "<Results List>\n[1] In [3]: c=a-b\n[3] In [3]: c=a-b\n")
    assert repr(mec.execute('print(c)')) == (
        "<Results List>\n"
        "[0] In [4]: print(c)\n[0] Out[4]: 15\n\n"
        "[1] In [4]: print(c)\n[1] Out[4]: -5\n\n"
        "[2] In [4]: print(c)\n[2] Out[4]: 15\n\n"
        "[3] In [4]: print(c)\n[3] Out[4]: -5\n\n")


def test_execute_result_dicts_print_as_the_chapter_shows(mec):
    result_dict = mec.execute('d=10; print(d)')
    lines = [str(r) for r in result_dict]
    assert lines == ["{'input': {'translated': 'd=10; print(d)', 'raw': 'd=10; print(d)'}, "
                     "'number': 5, 'id': %d, 'stdout': '10\\n'}" % i for i in ALL]


def test_parallel_map_equals_serial_map(mec):
    serial_result = list(map(lambda x: x**10, range(32)))
    parallel_result = mec.map(lambda x: x**10, range(32))
    assert serial_result == parallel_result


def test_map_takes_several_sequences_and_mapper_options(mec):
    assert mec.map(lambda x, y: x * y, [1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == [10, 40, 90, 160, 250]
    m = mec.mapper(targets=[1, 3])
    assert m.map(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
    pr = mec.mapper(block=False).map(lambda x: -x, range(6))
    assert isinstance(pr, client.PendingResult) and pr.get_result(timeout=T) == [0, -1, -2, -3, -4, -5]
    assert mec.raw_map(lambda x, y: x - y, [[5, 6], [1, 1]]) == [4, 5]
    mec.execute("def twice(x):\n    return 2 * x\n")
    assert mec.raw_map("twice", [[1, 2, 3]]) == [2, 4, 6]
    with pytest.raises(ValueError, match="equal length"):
        mec.map(lambda x, y: x, [1, 2], [1])


def test_parallel_decorator(mec):
    @mec.parallel()
    def f(x):
        return 10.0*x**4
    r = f(range(32))
    assert r[:3] == [0.0, 10.0, 160.0] and r == [10.0 * x**4 for x in range(32)]
    @mec.parallel(targets=[0, 1])
    def g(x, y):
        return x + y
    assert g([1, 2, 3], [4, 5, 6]) == [5, 7, 9]


def test_nonblocking_execution(mec):
    rl = mec.execute('import time')
    start = numbers(rl)
    assert repr(rl) == renumber("<Results List>\n[0] In [N]: import time\n[1] In [N]: import time\n"
                                "[2] In [N]: import time\n[3] In [N]: import time\n", start)
    nxt = {i: n + 1 for i, n in start.items()}
    pr = mec.execute('time.sleep(1)', block=False)
    assert isinstance(pr, client.PendingResult)
    assert repr(pr.get_result()) == renumber(
        "<Results List>\n[0] In [N]: time.sleep(1)\n[1] In [N]: time.sleep(1)\n"
        "[2] In [N]: time.sleep(1)\n[3] In [N]: time.sleep(1)\n", nxt)
    pr = mec.execute('time.sleep(1)', block=False)
    assert pr.get_result(block=False) is None
    assert pr.get_result("not yet", block=False) == "not yet"
    nxt = {i: n + 1 for i, n in nxt.items()}
    assert repr(pr.r) == renumber(
        "<Results List>\n[0] In [N]: time.sleep(1)\n[1] In [N]: time.sleep(1)\n"
        "[2] In [N]: time.sleep(1)\n[3] In [N]: time.sleep(1)\n", nxt)
    assert pr.get_result(block=False) is pr.r


def test_barrier_waits_for_every_pending_result(mec):
    mec.block = False
    try:
        t0 = time.monotonic()
        pr_list = [mec.execute('time.sleep(0.1)') for i in range(10)]
        assert all(isinstance(p, client.PendingResult) for p in pr_list)
        assert mec.barrier(pr_list) is None
        assert time.monotonic() - t0 < T
        assert all(p.ready() for p in pr_list)
        assert repr(pr_list[0].r).startswith("<Results List>\n[0] In [")
        assert [r["id"] for r in pr_list[9].r] == ALL
    finally:
        mec.block = True
    with pytest.raises(TypeError, match="PendingResult"):
        mec.barrier([1, 2])


def test_block_and_targets_attributes(mec):
    mec.targets = [0, 2]
    mec.block = False
    try:
        pr = mec.execute('a=5')
        assert isinstance(pr, client.PendingResult)
        rl = pr.r
        assert repr(rl) == renumber("<Results List>\n[0] In [N]: a=5\n[2] In [N]: a=5\n", numbers(rl))
        # Honoured by every method.
        assert mec.push(dict(only02=1)).r == [None, None]
        assert mec.pull('only02').r == [1, 1]
    finally:
        mec.targets = 'all'
        mec.block = True
    rl = mec.execute('b=10; print(b)')
    assert repr(rl) == renumber(
        "<Results List>\n"
        "[0] In [N]: b=10; print(b)\n[0] Out[N]: 10\n\n"
        "[1] In [N]: b=10; print(b)\n[1] Out[N]: 10\n\n"
        "[2] In [N]: b=10; print(b)\n[2] Out[N]: 10\n\n"
        "[3] In [N]: b=10; print(b)\n[3] Out[N]: 10\n\n", numbers(rl))
    with pytest.raises(client.CompositeError):
        mec.pull('only02')


def test_targets_attribute_is_honoured_by_every_method(mec):
    mec.targets = [3, 1]
    try:
        assert mec.push(dict(t31=7)) == [None, None]
        assert mec.pull('t31') == [7, 7]
        assert [r["id"] for r in mec.execute('t31 += 1')] == [3, 1]
        assert [r["id"] for r in mec.get_result()] == [3, 1]
        assert mec.scatter('s31', [1, 2, 3, 4]) == [None, None]
        assert mec.pull('s31') == [[1, 2], [3, 4]]        # engine 3 first
        assert mec.gather('s31') == [1, 2, 3, 4]
        assert mec.zip_pull(('t31', 's31')) == [(8, 8), ([1, 2], [3, 4])]
        assert mec.map(lambda x: x, range(4)) == [0, 1, 2, 3]
        assert len(mec.keys()) == 2
        assert mec.set_properties({"p": 1}) == [None, None]
        assert mec.get_properties() == [{"p": 1}, {"p": 1}]
        assert mec.clear_properties() == [None, None]
        assert [d for d, _ in mec.queue_status()] == [3, 1]
        mec['t31'] = 0
        assert mec['t31'] == [0, 0]
    finally:
        mec.targets = 'all'
    with pytest.raises(client.CompositeError):
        mec.pull('t31')
    assert mec.pull('t31', targets=[1, 3]) == [0, 0]


def test_bad_targets_are_refused_clearly_and_the_client_goes_on(mec):
    for bad, exc, words in [(7, ValueError, "engine 7"), (-1, ValueError, "-1"),
                            ('some', TypeError, "'some'"), ([0, 9], ValueError, "engine 9"),
                            ([], ValueError, "empty"), ([1, 1], ValueError, "duplicates")]:
        with pytest.raises(exc) as ei:
            mec.targets = bad
        assert words in str(ei.value)
        assert mec.targets == 'all'
    with pytest.raises(ValueError, match="block"):
        mec.block = 'yes'
    with pytest.raises(client.EngineError, match="7"):
        mec.execute('pass', targets=7)
    with pytest.raises(client.EngineError, match="7"):
        mec.pull('a', targets=[0, 7])
    assert mec.execute('print(1)', targets=0)[0]["stdout"] == "1\n"
    assert mec.pull('a') is not None


def test_basic_push_and_pull(mec):
    assert mec.push(dict(a=1.03234, b=3453)) == [None, None, None, None]
    assert mec.pull('a') == [1.03234, 1.03234, 1.03234, 1.03234]
    assert mec.pull('b', targets=0) == [3453]
    assert mec.pull(('a', 'b')) == [[1.03234, 3453], [1.03234, 3453], [1.03234, 3453], [1.03234, 3453]]
    assert mec.zip_pull(('a', 'b')) == [(1.03234, 1.03234, 1.03234, 1.03234), (3453, 3453, 3453, 3453)]
    assert mec.push(dict(c='speed')) == [None, None, None, None]
    rl = mec.execute('print(c)')
    assert all(r["stdout"] == "speed\n" for r in rl)
    mec.block = False
    try:
        pr = mec.pull('a')
        assert pr.r == [1.03234, 1.03234, 1.03234, 1.03234]
    finally:
        mec.block = True


def test_zip_pull_of_a_name_missing_on_one_engine(mec):
    mec.execute('only1 = 1', targets=1)
    with pytest.raises(client.CompositeError) as ei:
        mec.zip_pull(('a', 'only1'))
    e = ei.value
    assert [ev.engine_id for _, ev, _ in e.elist] == [0, 2, 3]
    assert all(isinstance(ev, NameError) for _, ev, _ in e.elist)
    assert "[0:pull]: NameError: name 'only1' is not defined" in str(e)
    assert mec.zip_pull(('a', 'only1'), targets=1) == [1.03234, 1]
    assert mec.pull('a', targets=0) == [1.03234]


def test_push_and_pull_functions(mec):
    def f(x):
        return 2.0*x**4
    assert mec.push_function(dict(f=f)) == [None, None, None, None]
    rl = mec.execute('y = f(4.0)')
    assert repr(rl) == renumber("<Results List>\n[0] In [N]: y = f(4.0)\n[1] In [N]: y = f(4.0)\n"
                                "[2] In [N]: y = f(4.0)\n[3] In [N]: y = f(4.0)\n", numbers(rl))
    rl = mec.execute('print(y)')
    assert [r["stdout"] for r in rl] == ["512.0\n"] * 4
    g = mec.pull_function('f', targets=2)[0]
    assert g(1.0) == 2.0


def test_dictionary_interface(mec):
    mec.block = True
    mec['a'] = ['foo', 'bar']
    assert mec['a'] == [['foo', 'bar'], ['foo', 'bar'], ['foo', 'bar'], ['foo', 'bar']]
    with pytest.raises(TypeError):
        mec[0]


def test_scatter_and_gather(mec):
    assert mec.scatter('a', range(16)) == [None, None, None, None]
    rl = mec.execute('print(a)')
    assert repr(rl) == renumber(
        "<Results List>\n"
        "[0] In [N]: print(a)\n[0] Out[N]: [0, 1, 2, 3]\n\n"
        "[1] In [N]: print(a)\n[1] Out[N]: [4, 5, 6, 7]\n\n"
        "[2] In [N]: print(a)\n[2] Out[N]: [8, 9, 10, 11]\n\n"
        "[3] In [N]: print(a)\n[3] Out[N]: [12, 13, 14, 15]\n\n", numbers(rl))
    assert mec.gather('a') == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_scatter_dist_and_flatten(mec):
    assert mec.scatter('fl', [10, 20, 30, 40], flatten=True) == [None] * 4
    assert mec.pull('fl') == [10, 20, 30, 40]
    assert mec.scatter('fl', [10, 20, 30, 40]) == [None] * 4
    assert mec.pull('fl') == [[10], [20], [30], [40]]
    assert mec.gather('fl', dist='b') == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="dist"):
        mec.scatter('fl', [1], dist='r')


def test_scatter_of_an_unsized_iterable_is_refused(mec):
    with pytest.raises(TypeError, match="generator"):
        mec.scatter('g', (i for i in range(4)))
    with pytest.raises(TypeError, match="length"):
        mec.map(abs, iter([1, -2]))
    assert mec.gather('a') == list(range(16))


def test_parallel_list_comprehension(mec):
    assert mec.scatter('x', range(64)) == [None, None, None, None]
    rl = mec.execute('y = [i**10 for i in x]')
    assert repr(rl) == renumber("<Results List>\n"
                                "[0] In [N]: y = [i**10 for i in x]\n[1] In [N]: y = [i**10 for i in x]\n"
                                "[2] In [N]: y = [i**10 for i in x]\n[3] In [N]: y = [i**10 for i in x]\n",
                                numbers(rl))
    y = mec.gather('y')
    assert str(y).startswith("[0, 1, 1024, 59049, 1048576, 9765625, 60466176, 282475249, 1073741824,")
    assert y == [i**10 for i in range(64)]


COMPOSITE = ("one or more exceptions from call to method: execute\n"
             "[0:execute]: ZeroDivisionError: division by zero\n"
             "[1:execute]: ZeroDivisionError: division by zero\n"
             "[2:execute]: ZeroDivisionError: division by zero\n"
             "[3:execute]: ZeroDivisionError: division by zero")


def test_parallel_exceptions(mec, capsys):
    mec.block = True
    with pytest.raises(client.CompositeError) as ei:
        mec.execute('1/0')
    e = ei.value
    assert str(e) == COMPOSITE
    assert len(e.elist) == 4 and all(et is ZeroDivisionError for et, _, _ in e.elist)
    for name in ("elist", "print_tracebacks", "raise_exception", "_get_engine_str", "_get_traceback",
                 "message"):
        assert hasattr(e, name)
    e.print_tracebacks()
    out = capsys.readouterr().out
    for i in ALL:
        assert "[%d:execute]: \nTraceback (most recent call last):\n" % i in out
    assert out.count("ZeroDivisionError: division by zero") == 4
    with pytest.raises(ZeroDivisionError) as zi:
        try:
            mec.execute('1/0')
        except client.CompositeError as e:
            e.raise_exception()
    assert zi.value.engine_id == 0 and "1/0" in zi.value.remote_traceback
    with pytest.raises(IndexError):
        ei.value.raise_exception(9)


def test_parallel_exceptions_in_nonblocking_mode(mec):
    mec.block = False
    try:
        pr = mec.execute('1/0')
        with pytest.raises(client.CompositeError) as ei:
            pr.r
        assert str(ei.value) == COMPOSITE
        with pytest.raises(client.CompositeError):   # raised again
            pr.get_result()
    finally:
        mec.block = True


def test_a_failure_on_one_engine_of_several_is_a_composite_error(mec):
    mec.scatter('which', range(4))
    with pytest.raises(client.CompositeError) as ei:
        mec.execute("if which == [2]: raise KeyError('k')")
    e = ei.value
    assert [ev.engine_id for _, ev, _ in e.elist] == [2]
    with pytest.raises(KeyError):
        e.raise_exception()
    assert sorted(r["id"] for r in e.results) == [0, 1, 3]


def test_pending_result_callbacks_and_flush(mec):
    pr = mec.pull('b', block=False)
    pr.add_callback(lambda r, k: [v * k for v in r], 2)
    pr.add_callback(sum)
    assert pr.r == 4 * 2 * 3453
    pr = mec.execute('time.sleep(0.5)', block=False)
    mec.flush()
    with pytest.raises(client.InvalidDeferredID):
        pr.r
    assert mec.execute('time.sleep(0.6)')[0]["id"] == 0   # the flushed one ran before


def test_engine_properties_return_one_entry_per_target(mec):
    assert mec.set_properties({"gpu": True}) == [None] * 4
    assert mec.get_properties() == [{"gpu": True}] * 4
    assert mec.has_properties(["gpu", "no"]) == [[True, False]] * 4
    assert mec.del_properties(["gpu"], targets=[0, 1]) == [None, None]
    assert mec.get_properties(targets=[1, 2]) == [{}, {"gpu": True}]
    assert mec.clear_properties() == [None] * 4
    assert mec.get_properties() == [{}] * 4
    assert mec.get_properties(targets=1) == [{}]


def test_serialized_push_and_pull(mec):
    mec.push(dict(ser=[1, 2, 3]))
    s = mec.pull_serialized('ser', targets=[0, 1])
    assert len(s) == 2 and isinstance(s[0], client.Serialized) and s[0].unserialize() == [1, 2, 3]
    assert mec.push_serialized(dict(ser2=s[1], ser3=client.serialize({"k": 5}))) == [None] * 4
    assert mec.pull(('ser2', 'ser3'), targets=3) == [[[1, 2, 3], {"k": 5}]]


def test_keys_reset_run_and_benchmark(mec, tmp_path):
    assert all(isinstance(k, list) and 'a' in k for k in mec.keys())
    p = tmp_path / "job.py"
    p.write_text("ran = 10\n")
    assert [r["id"] for r in mec.run(str(p))] == ALL
    assert mec.pull('ran') == [10] * 4
    bad = tmp_path / "bad.py"
    bad.write_text("def (:\n")
    with pytest.raises(SyntaxError):
        mec.run(str(bad))
    mec.set_properties({"x": 1}, targets=3)
    assert mec.reset(targets=3) == [None]
    assert mec.keys(targets=3) == [[]]
    assert mec.get_properties(targets=[3]) == [{}]      # IPython 0.10: reset clears them
    b = mec.benchmark(1000)
    assert set(b) == {"single_engine_latency", "all_engine_latency", "all_engine_push", "single_engine_push"}
    assert all(v[0] > 0 for v in b.values())
