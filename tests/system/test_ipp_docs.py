"""ipyparallel's own documentation examples, run unchanged on a real
4-engine ipmpi cluster.

The cells are copied verbatim from ipyparallel's tutorial pages
(docs/source/tutorial/direct.md, task.md and asyncresult.md of
github.com/ipython/ipyparallel), the IPython prompts taken off; only two
things differ: `import ipyparallel as ipp` is `import ipmpi as ipp`, and
the cluster is not started by `ipp.Cluster()` but connected to,
`rc = ipp.Client(url_file=...)`. Each cell runs as IPython runs it (the
value of a last expression is its Out[]), and the test compares it with
the page's Out[] where that is deterministic. Where a page's example
needs what ipmpi does not have, doc/modern.rst lists it and the test
checks that the refusal is the one the page says (test_differences_page
in tests/doc checks the page itself).
"""
import ast
import os
import re
import signal
import time

import pytest

from conftest import running_cluster

T = 120


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(4)


@pytest.fixture(scope="module")
def ns(cluster):
    """The namespace of one IPython session: the import line and the
    connection, then the pages' cells in order."""
    ns = {"__name__": "__main__"}
    cell(ns, "import ipmpi as ipp")
    cell(ns, "rc = ipp.Client(url_file=%r, progress=False, stream_output=False)" % cluster.mec_furl)
    try:
        yield ns
    finally:
        ns["rc"].close()


def cell(ns, source):
    """Runs an IPython cell: its statements, then the value of its last
    line when that is an expression (its Out[])."""
    tree = ast.parse(source)
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    exec(compile(tree, "<cell>", "exec"), ns)
    if last is not None:
        return eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns)
    return None


# ---------------------------------------------------------------- direct.md

def test_direct_creating_a_view_and_map(ns):
    assert cell(ns, "rc.wait_for_engines(4); rc.ids") == [0, 1, 2, 3]
    cell(ns, "dview = rc[:] # use all engines")
    cell(ns, "serial_result = list(map(lambda x:x**10, range(32)))")
    cell(ns, "parallel_result = dview.map_sync(lambda x: x**10, range(32))")
    assert cell(ns, "serial_result == parallel_result") is True
    assert repr(cell(ns, "view = rc[1:3]\nview")) == "<DirectView [1, 2]>"


def test_direct_blocking_execution(ns):
    cell(ns, "dview = rc[:] # A DirectView of all engines")
    cell(ns, "dview.block=True")
    cell(ns, "dview['a'] = 5")
    cell(ns, "dview['b'] = 10")
    assert cell(ns, "dview.apply(lambda x: a+b+x, 27)") == [42, 42, 42, 42]
    cell(ns, "dview.block = False")
    assert cell(ns, "dview.apply_sync(lambda x: a+b+x, 27)") == [42, 42, 42, 42]
    cell(ns, "rc[::2].execute('c = a + b')")
    cell(ns, "rc[1::2].execute('c = a - b')")
    assert cell(ns, "dview['c'] # shorthand for dview.pull('c', block=True)") == [15, -5, 15, -5]


def test_direct_async_execution(ns):
    cell(ns, """\
def wait(t):
    import time
    tic = time.time()
    time.sleep(t)
    return time.time()-tic""")
    cell(ns, "ar = dview.apply_async(wait, 2)")
    waited = cell(ns, "ar.get()")
    assert len(waited) == 4 and all(1.9 < w < 30 for w in waited), waited
    cell(ns, "ar = dview.apply_async(wait, 10)")
    assert cell(ns, "ar.ready()") is False
    with pytest.raises(TimeoutError):
        cell(ns, "ar.get(1)")
    # (not in the page: the 10 s wait is interrupted so the next cells need not wait for it)
    rc = ns["rc"]
    rc.interrupt()
    cell(ns, "dview.block = False")
    # The page waits for 10 calls of 3 s; 3 of 0.5 s show the same.
    cell(ns, "ar_list = [dview.apply_async(wait, 0.5) for i in range(3)]")
    assert cell(ns, "dview.wait(ar_list)") is True
    assert len(cell(ns, "ar_list[0].get()")) == 4


def test_direct_block_and_targets_attributes(ns):
    cell(ns, "dview.targets = [0, 2]")
    cell(ns, "dview.block = False")
    cell(ns, "ar = dview.apply(lambda : 10)")
    assert cell(ns, "ar.get()") == [10, 10]
    cell(ns, "dview.targets = rc.ids # all engines (4)")
    cell(ns, "dview.block = True")
    assert cell(ns, "dview.apply(lambda : 42)") == [42, 42, 42, 42]


def test_direct_push_pull_dict_scatter_gather(ns):
    assert cell(ns, "dview.push(dict(a=1.03234, b=3453))") == [None, None, None, None]
    assert cell(ns, "dview.pull('a')") == [1.03234] * 4
    assert cell(ns, "dview.pull('b', targets=0)") == 3453
    assert cell(ns, "dview.pull(('a', 'b'))") == [[1.03234, 3453]] * 4
    assert cell(ns, "dview.push(dict(c='speed'))") == [None, None, None, None]
    cell(ns, "ar = dview.pull('a', block=False)")
    assert cell(ns, "ar.get()") == [1.03234] * 4
    cell(ns, "dview['a'] = ['foo', 'bar']")
    assert cell(ns, "dview['a']") == [['foo', 'bar']] * 4
    assert cell(ns, "dview.scatter('a',range(16))") == [None, None, None, None]
    assert cell(ns, "dview['a']") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # The page's gather returns an AsyncMapResult here (Out[60]), as a
    # non-blocking view's does (ipyparallel's too): its session was not
    # blocking at this point.
    cell(ns, "dview.block = False")
    cell(ns, "dview.gather('a') # This will show you the status of gather.")
    assert cell(ns, "dview.gather('a').get() # This will give you the result.") == list(range(16))
    # The page's Out[62] says [2]; element 3 of range(16) is 3.
    assert cell(ns, "dview.gather('a')[3] # You can also direct call the result.") == 3


def test_direct_send_signal(ns):
    cell(ns, "import time, signal")   # the page's session imported both earlier
    cell(ns, "ar = rc[:].apply_async(time.sleep, 5)")
    time.sleep(0.5)   # (not in the page: the interrupt must find the sleep running, as a person's typing does)
    cell(ns, "rc.send_signal(signal.SIGINT)")
    t0 = time.monotonic()
    with pytest.raises(ns["ipp"].CompositeError) as ei:
        cell(ns, "ar.get()")
    assert time.monotonic() - t0 < 4, "the sleep was not interrupted"
    assert all("KeyboardInterrupt" in str(ev) or type(ev).__name__ == "KeyboardInterrupt"
               for _et, ev, _tb in ei.value.elist), ei.value
    with pytest.raises(NotImplementedError, match="only SIGINT"):
        ns["rc"].send_signal(signal.SIGTERM)


def test_direct_remote_and_parallel(ns):
    cell(ns, """\
@dview.remote(block=True)
def getpid():
    import os
    return os.getpid()
""")
    pids = cell(ns, "getpid()")
    assert len(set(pids)) == 4 and os.getpid() not in pids
    cell(ns, "import numpy as np")
    cell(ns, "A = np.random.random((64,48))")
    cell(ns, "@dview.parallel(block=True)\ndef pmul(A,B):\n    return A*B")
    cell(ns, "C_local = A*A")
    cell(ns, "C_remote = pmul(A,A)")
    assert cell(ns, "(C_local == C_remote).all()")
    cell(ns, "@dview.parallel(block=True)\ndef echo(x):\n    return str(x)")
    assert len(cell(ns, "echo(range(5))")) == 4
    assert cell(ns, "echo.map(range(5))") == ['0', '1', '2', '3', '4']


def test_direct_sync_imports_and_require(ns, capsys):
    cell(ns, "with dview.sync_imports():\n    import numpy")
    assert "importing numpy on engine(s)" in capsys.readouterr().out
    cell(ns, """\
@ipp.require('re')
def findall(pat, x):
    # re is guaranteed to be available
    return re.findall(pat, x)
""")
    cell(ns, """\
@ipp.require(time)
def wait(t):
    time.sleep(t)
    return t
""")
    assert "re" not in ns   # the client never imported re: only the engines do
    assert dview_apply(ns, "findall", "a", "banana") == [["a", "a", "a"]] * 4
    assert dview_apply(ns, "wait", 0.1) == [0.1] * 4


def dview_apply(ns, name, *args):
    return ns["dview"].apply_sync(ns[name], *args)


def test_direct_parallel_exceptions(ns, capsys):
    cell(ns, "dview.block = True")
    with pytest.raises(ZeroDivisionError):
        cell(ns, """\
try:
    dview.execute('1/0', block=True)
except ipp.CompositeError as e:
    e.raise_exception()
""")
    cell(ns, "ipp.CompositeError.tb_limit = 1")
    try:
        with pytest.raises(ns["ipp"].CompositeError) as ei:
            cell(ns, "dview.execute('1/0')")
        assert "3 more exceptions" in str(ei.value), str(ei.value)
    finally:
        ns["ipp"].CompositeError.tb_limit = None
    cell(ns, "dview.block=False")
    cell(ns, "ar = dview.execute('1/0')")
    with pytest.raises(ns["ipp"].CompositeError):
        cell(ns, "ar.get()")
    cell(ns, "ar = dview.apply_async(lambda: 1/0)")
    out = cell(ns, "ar.get(return_exceptions=True)")
    assert len(out) == 4 and all("ZeroDivisionError" in repr(e) for e in out), out
    assert [e.engine_id for e in out] == [0, 1, 2, 3]


# ---------------------------------------------------------------- asyncresult.md

def test_asyncresult_page(ns):
    cell(ns, "import os")
    cell(ns, "ar = rc[:].apply_async(os.getpid)")
    cell(ns, "pids = ar.get_dict()")
    cell(ns, "rc[:]['pid_map'] = pids")
    assert sorted(ns["pids"]) == [0, 1, 2, 3]
    assert ns["rc"][:].pull('pid_map', block=True) == [ns["pids"]] * 4
    cell(ns, "from functools import reduce")
    cell(ns, "view = rc[:]")
    cell(ns, "X = np.linspace(0,100)")
    cell(ns, "from math import sqrt")
    cell(ns, "add = lambda a,b: a+b")
    cell(ns, "sq = lambda x: x*x")
    local = cell(ns, "sqrt(reduce(add, map(sq, X)) / len(X))")
    remote = cell(ns, "sqrt(reduce(add, view.map(sq, X)) / len(X))")
    assert abs(local - remote) < 1e-9 and abs(local - 58.028845747399714) < 1e-9
    # ar.elapsed, ar.progress, len(ar), wait_interactive, serial_time/wall_time (the page's prose)
    cell(ns, "ar = dview.apply_async(time.sleep, 1)")
    assert cell(ns, "ar.elapsed, ar.progress, 1.0*ar.progress/len(ar)")[1] == 0
    cell(ns, "ar.wait_interactive()")
    assert cell(ns, "ar.serial_time / ar.wall_time") > 2


def test_asyncresult_stream_output(ns, capsys):
    # ipyparallel's AsyncResult.stream_output() is a context manager.
    # Outside it this client (stream_output=False) shows nothing:
    cell(ns, "ar = rc[:].execute('print(6 * 7)', block=False)")
    cell(ns, "ar.get()")
    assert "[stdout:" not in capsys.readouterr().out
    assert cell(ns, "ar.streaming") is False
    cell(ns, "ar = rc[:].execute('print(7 * 6)', block=False)")
    cell(ns, "with ar.stream_output():\n    ar.get()")
    out = capsys.readouterr().out
    assert all("[stdout:%d] 42" % i in out for i in range(4)), out
    assert ns["ar"].streaming is False   # restored after the block
    # Output that arrived before the block is shown when it starts.
    cell(ns, "ar = rc[:].execute('print(5 * 5)', block=False)\nar.wait(60)")
    assert "[stdout:" not in capsys.readouterr().out
    cell(ns, "with ar.stream_output():\n    pass")
    out = capsys.readouterr().out
    assert all("[stdout:%d] 25" % i in out for i in range(4)), out


# ---------------------------------------------------------------- task.md

def test_task_page(ns):
    cell(ns, "lview = rc.load_balanced_view() # default load-balanced view")
    cell(ns, "lview.block = True")
    cell(ns, "serial_result = map(lambda x:x**10, range(32))")
    cell(ns, "parallel_result = lview.map(lambda x:x**10, range(32))")
    # The page compares a py2 list with ==; in Python 3 map is lazy.
    assert list(ns["serial_result"]) == ns["parallel_result"]
    cell(ns, "@lview.parallel()\ndef f(x):\n    return 10.0 * x ** 4\n")
    assert cell(ns, "f.map(range(32))    # this is done in parallel") == [10.0 * x ** 4 for x in range(32)]


def test_task_require_chain(ns):
    # From ipyparallel's docs on dependencies (task.md, "Dependencies").
    cell(ns, """\
def foo(a):
    return a*a
@ipp.require(foo)
def bar(b):
    return foo(b)
@ipp.require(bar)
def baz(c, d):
    return bar(c) - bar(d)
""")
    assert cell(ns, "lview.apply_sync(baz, 4, 5)") == -9


def test_task_temp_flags(ns):
    cell(ns, "lview.block = False")
    cell(ns, "ar = lview.apply(lambda: 1)")
    cell(ns, "ar2 = lview.apply(lambda: 2)")
    # after= is refused (doc/modern.rst): the scheduler has no task dependencies.
    with pytest.raises(NotImplementedError, match="no dependencies on other tasks"):
        cell(ns, "with lview.temp_flags(after=[ar, ar2]):\n   ar3 = lview.apply(lambda: 3)")
    with pytest.raises(NotImplementedError, match="location dependencies"):
        cell(ns, "with lview.temp_flags(follow=[ar], timeout=2.5):\n   ar4 = lview.apply(lambda: 3)")
    assert ns["lview"].block is False
    cell(ns, "with lview.temp_flags(block=True):\n   three = lview.apply(lambda: 3)")
    assert ns["three"] == 3 and ns["lview"].block is False


# ---------------------------------------------------------------- doc/modern.rst

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "doc", "modern.rst")


def refusals():
    """(code, exception name) of every "``code`` raises ``Error``" of the
    page's "Differences from ipyparallel" section."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("Differences from ipyparallel\n----"):]
    found = re.findall(r"``([^`]+)``\s+raises\s+``(\w+)``", section)
    for code, _name in found:
        assert "\n" not in code, "a refusal's code is split over lines in doc/modern.rst: %r" % code
    return found


def test_every_refusal_on_the_differences_page_raises_what_it_says(ns):
    import builtins
    import concurrent.futures
    import ipmpi
    found = refusals()
    # The page lists a few dozen; a page whose wording the pattern no
    # longer finds must not pass unchecked.
    assert len(found) >= 30, found
    rc = ns["rc"]
    dview, lview = rc[:], rc.load_balanced_view()
    ar = dview.apply_async(lambda: 1)
    ar.get(T)
    env = {"ipmpi": ipmpi, "rc": rc, "dview": dview, "lview": lview, "ar": ar, "signal": signal}
    wrong = []
    for code, name in found:
        expected = getattr(builtins, name)
        try:
            eval(code, dict(env))
        except expected:
            continue
        except BaseException as e:
            wrong.append("%s raised %s: %s, not %s" % (code, type(e).__name__, e, name))
        else:
            wrong.append("%s raised nothing, not %s" % (code, name))
    assert not wrong, "\n".join(wrong)
    # What the page says in prose: not a Future, but Future's waiting methods.
    assert not isinstance(ar, concurrent.futures.Future)
    assert ar.result(T) == [1, 1, 1, 1] and ar.exception() is None and ar.done()
    assert lview.targets is None and rc.ids == [0, 1, 2, 3]
