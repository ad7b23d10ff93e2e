"""The modern client surface (ipmpi.Client, DirectView, LoadBalancedView,
AsyncResult; ipmpi.modern) on a real 4-engine cluster.

Most tests run code from ipyparallel's own documentation (its tutorial
pages "Direct interface", "Task interface" and "AsyncResult"), unchanged
but for the import line. The progress test runs a client in a real pty.
Every wait is bounded.
"""
import os
import re
import subprocess
import time

import pytest

import ipmpi
from conftest import (PYTHON, child_env, first_seen, ipython_on_a_pty, progress_env, pty_run, px_streams_in_jupyter,
                      run_ctrl_c)

T = 60


@pytest.fixture(scope="module")
def rc(cluster4):
    c = ipmpi.Client(url_file=cluster4.mec_furl)
    try:
        yield c
    finally:
        c.close()


def test_import_is_lazy():
    code = "import sys, ipmpi; assert 'ipmpi.modern' not in sys.modules; ipmpi.Client; " \
           "assert 'ipmpi.modern' in sys.modules; print('ok')"
    r = subprocess.run([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=T, env=child_env())
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout


def test_client_from_profile_dir(cluster4):
    env = dict(os.environ)
    old = os.environ.get("IPMPI_DIR")
    os.environ["IPMPI_DIR"] = cluster4.ipmpi_dir
    try:
        with ipmpi.Client() as c:
            assert c.ids == [0, 1, 2, 3]
    finally:
        if old is None:
            os.environ.pop("IPMPI_DIR", None)
        else:
            os.environ["IPMPI_DIR"] = old
    with ipmpi.Client(profile_dir=cluster4.ipmpi_dir) as c:
        assert len(c) == 4
    assert env.get("IPMPI_DIR") == os.environ.get("IPMPI_DIR")


def test_views_and_ids(rc):
    assert rc.ids == [0, 1, 2, 3]
    assert rc[:].targets == [0, 1, 2, 3]
    assert rc[::2].targets == [0, 2]
    assert rc[1].targets == 1
    assert rc[-1].targets == 3
    with pytest.raises(IndexError):
        rc[9]
    assert len(rc[:]) == 4


def test_direct_interface_doc(rc):
    # ipyparallel docs, "Direct interface": apply, blocking and not
    dview = rc[:]
    dview.block = True

    def f(x):
        return 1.0 * x

    assert dview.apply(f, 2) == [2.0] * 4
    dview.block = False
    ar = dview.apply(f, 3)
    assert isinstance(ar, ipmpi.AsyncResult)
    assert ar.get(timeout=T) == [3.0] * 4
    assert rc[0].apply_sync(lambda x: x + 1, 1) == 2           # one engine: the value itself

    def getpid():
        import os
        return os.getpid()

    pids = dview.apply_sync(getpid)
    assert len(set(pids)) == 4


def test_map_doc(rc):
    dview = rc[:]
    serial_result = list(map(lambda x: x ** 10, range(32)))
    parallel_result = dview.map_sync(lambda x: x ** 10, range(32))
    assert serial_result == parallel_result
    ar = dview.map_async(lambda x, y: x + y, range(10), range(10))
    assert ar.get(timeout=T) == [2 * i for i in range(10)]
    assert ar.progress == 4 and ar.successful()


def test_remote_and_parallel_decorators(rc):
    view = rc[:]

    @view.remote(block=True)
    def getpid():
        import os
        return os.getpid()

    assert len(set(getpid())) == 4

    import numpy
    A = numpy.random.random((64, 48))

    @view.parallel(block=True)
    def pmul(A, B):
        return A * B

    C_local = A * A
    C_remote = pmul(A, A)
    assert (C_local == C_remote).all()

    @view.parallel(block=True)
    def f(x):
        return 10.0 * x ** 4

    assert f.map(range(32)) == [10.0 * x ** 4 for x in range(32)]


def test_push_pull_dict_access(rc):
    dview = rc[:]
    dview.block = True
    dview.push(dict(a=1.03234, b=3453))
    assert dview.pull("a") == [1.03234] * 4
    assert rc[0].pull("b", block=True) == 3453
    assert rc[0].pull("b").get(T) == 3453
    assert dview.pull(("a", "b")) == [[1.03234, 3453]] * 4
    dview["c"] = [1, 2, 3]
    assert dview["c"] == [[1, 2, 3]] * 4
    ar = dview.push(dict(d=5), block=False)
    assert ar.get(timeout=T) == [None] * 4


def test_scatter_gather_doc(rc):
    dview = rc[:]
    dview.scatter("a", list(range(16)), block=True)
    assert dview["a"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert dview.gather("a", block=True) == list(range(16))
    dview.scatter("x", list(range(64)), block=True)
    dview.execute("y = [i**10 for i in x]", block=True)
    assert dview.gather("y", block=True) == [i ** 10 for i in range(64)]


def test_execute_and_stdout(rc):
    dview = rc[:]
    ar = dview.execute("import os\nprint('hello', 6 * 7)")
    ar.get(timeout=T)
    assert ar.stdout == ["hello 42\n"] * 4
    assert ar.engine_id == [0, 1, 2, 3]
    assert rc[2].execute("print('two')", block=True) is None
    ar = rc[2].execute("print('two')")
    ar.wait(T)
    assert ar.stdout == "two\n" and ar.engine_id == 2


def test_errors(rc):
    dview = rc[:]
    with pytest.raises(ipmpi.modern.CompositeError) as ei:
        dview.execute("1/0", block=True)
    assert len(ei.value.elist) == 4
    with pytest.raises(ipmpi.modern.RemoteError) as ei:
        rc[1].apply_sync(lambda: 1 / 0)
    assert ei.value.etype == "ZeroDivisionError"
    ar = dview.apply_async(lambda: 1 / 0)
    assert ar.wait(T) is True
    assert not ar.successful()
    lview = rc.load_balanced_view()
    with pytest.raises(ZeroDivisionError):
        lview.apply_sync(lambda: 1 / 0)


def test_load_balanced_doc(rc):
    lview = rc.load_balanced_view()
    lview.block = True
    parallel_result = lview.map(lambda x: x ** 10, range(32))
    assert parallel_result == [x ** 10 for x in range(32)]
    ar = lview.map_async(lambda x: 2 * x, range(20), chunksize=3)
    assert ar.get(timeout=T) == [2 * x for x in range(20)]
    assert len(ar) == 7 and ar.progress == 7

    @lview.parallel(block=False)
    def f(x):
        return 10.0 * x ** 4

    assert f.map(range(32)).get(timeout=T) == [10.0 * x ** 4 for x in range(32)]
    assert lview.apply_sync(lambda a, b=1: a + b, 1, b=5) == 6


def test_asyncresult_doc(rc):
    import time as _time
    dview = rc[:]
    ar = dview.apply_async(_time.sleep, 1.0)
    assert not ar.ready()
    with pytest.raises(TimeoutError):
        ar.get(timeout=0.05)
    assert ar.wait(0.05) is False
    assert ar.elapsed < 1.0
    ar.wait_interactive(timeout=T)
    assert ar.ready() and ar.successful()
    assert ar.get(0) == [None] * 4
    assert 0.9 < ar.elapsed < 30
    assert len(ar.timings) == 4 and all(0.9 < t["seconds"] < 30 for t in ar.timings)
    assert 0.9 < ar.wall_time < 30 and ar.serial_time >= 3.6
    assert ar.get_dict() == {0: None, 1: None, 2: None, 3: None}


def test_client_wait_and_abort(rc):
    dview = rc[:]
    a = dview.apply_async(time.sleep, 0.5)
    b = rc.load_balanced_view().apply_async(lambda: 5)
    assert rc.wait([a, b], timeout=T) is True
    assert b.get(0) == 5
    slow = rc[0].apply_async(time.sleep, 2)
    queued = rc[0].apply_async(lambda: "ran")
    assert rc.wait(timeout=0.2) is False
    rc.abort(queued)
    with pytest.raises(Exception) as ei:
        queued.get(timeout=T)
    assert "Abort" in type(ei.value).__name__ or "abort" in str(ei.value).lower()
    slow.get(timeout=T)
    assert rc.wait(timeout=T) is True


def test_sync_imports(rc):
    dview = rc[:]
    with dview.sync_imports(quiet=True):
        import json  # noqa: F401
    dview.execute("j = json.dumps([1])", block=True)
    assert dview["j"] == ["[1]"] * 4


def test_interrupt_stops_an_async_result_and_the_engines_answer_after(rc):
    dv = rc[:]
    ar = dv.apply_async(time.sleep, 60)
    t0 = time.monotonic()
    r = rc.interrupt()
    assert sorted(r["interrupted"]) == rc.ids, r
    with pytest.raises(Exception) as ei:
        ar.get(timeout=T)
    assert "KeyboardInterrupt" in str(ei.value) or "KeyboardInterrupt" in repr(ei.value), repr(ei.value)
    assert time.monotonic() - t0 < 5
    assert dv.apply_sync(lambda: 7) == [7] * len(rc.ids)


PROGRESS_CODE = """
import time, ipmpi
rc = ipmpi.Client(url_file=%r)
print('WAIT' + 'ING', flush=True)
assert rc[:].apply_sync(time.sleep, 3) == [None] * 4
print('FIN' + 'ISHED', flush=True)
"""


@pytest.mark.parametrize("mode", ["auto", "plain", "off"])
def test_progress_in_a_pty(cluster4, mode):
    env = progress_env(mode)
    rc_, seen = pty_run([PYTHON, "-c", PROGRESS_CODE % cluster4.mec_furl], env, T)
    out = "".join(s for _t, s in seen)
    assert rc_ == 0, out
    assert "WAITING" in out and "FINISHED" in out, out
    if mode == "off":
        assert "4/4" not in out and "/4" not in out, out
        return
    assert "4/4" in out, out
    if mode == "plain":
        assert "sleep:    0/4 engines done after" in out, out
    # The line (or tqdm's bar) is there while the client waits: at least
    # a second before the 3 s wait ends, not only with its result.
    t_wait, t_line, t_end = (first_seen(seen, "WAITING"), first_seen(seen, r"WAITING[^$]*\b[0-3]/4\b"),
                             first_seen(seen, "FINISHED"))
    assert t_line is not None and t_end - t_line >= 1.0 and t_line - t_wait >= 0.5, \
        (t_line and t_line - t_wait, t_line and t_end - t_line, out)


def test_no_progress_without_a_tty(cluster4):
    r = subprocess.run([PYTHON, "-c", PROGRESS_CODE % cluster4.mec_furl], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=T, env=child_env())
    assert r.returncode == 0, r.stdout
    assert "/4" not in r.stdout, r.stdout


def _ipython(args, script=None):
    r = subprocess.run([PYTHON, "-m", "IPython", "--no-banner", "--colors=NoColor",
                        "--HistoryManager.enabled=False"] + args, input=script, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=T * 2, env=child_env())
    return r.returncode, re.sub(r"\x1b\][^\x07]*\x07|\x1b\[[0-9;]*[a-zA-Z]", "", r.stdout)


def test_px_magics_in_ipython(cluster4):
    # At the prompt a cell magic's cell ends with two empty lines.
    script = """\
import ipmpi
rc = ipmpi.Client(url_file=%r)
rc[:].activate()
%%px import os; a = 6 * 7
%%px print(a)
%%pxresult
%%%%px --targets 0,2
b = a + 1
print(b)


print('done')
""" % cluster4.mec_furl
    code, out = _ipython(["--simple-prompt"], script)
    assert code == 0, out
    assert len(re.findall(r"(?m)^\[[0-3]\] Out\[\d+\]: 42$", out)) == 8, out
    assert re.search(r"(?m)^\[3\] In \[\d+\]: print\(a\)$", out), out
    assert len(re.findall(r"(?m)^\[[02]\] Out\[\d+\]: 43$", out)) == 2, out
    assert not re.search(r"(?m)^\[[13]\] Out\[\d+\]: 43$", out), out
    assert "done" in out, out


def test_autopx_in_ipython(cluster4):
    script = """\
import ipmpi
rc = ipmpi.Client(url_file=%r)
rc[::2].activate()
%%autopx
c = 5 * 5
print(c + 1)
%%autopx
print('local')
""" % cluster4.mec_furl
    code, out = _ipython(["--simple-prompt"], script)
    assert code == 0, out
    assert "Auto Parallel Enabled" in out and "Auto Parallel Disabled" in out, out
    assert len(re.findall(r"(?m)^\[[02]\] Out\[\d+\]: 26$", out)) == 2, out
    assert not re.search(r"(?m)^\[[13]\] ", out), out
    assert "local" in out, out


CTRL_C = """
import signal, sys, time, ipmpi
when = []

def on_sigint(signum, frame):   # the default handler, noting when
    when.append(time.monotonic())
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)
rc = ipmpi.Client(url_file=sys.argv[1], progress=False)
assert rc.ids == [0, 1, 2, 3]
print("READY", flush=True)
try:
    rc[:].apply_sync(time.sleep, 60)
    print("RETURNED", flush=True)
except KeyboardInterrupt:
    print("CTRL-C %.2f" % (time.monotonic() - when[0]), flush=True)
t0 = time.monotonic()
r = rc[:].apply_sync(lambda: 'after')
print("AFTER", r, "%.2f" % (time.monotonic() - t0), flush=True)
"""


def test_ctrl_c_during_apply_sync_returns_and_the_engines_answer_after(cluster4):
    # SIGINT to the client 1 s into a 60 s sleep on 4 engines, as a user's
    # Ctrl-C: apply_sync returns within 2 s, and the engines were
    # interrupted (the next call is answered at once, not after 60 s).
    out = run_ctrl_c([PYTHON, "-c", CTRL_C, cluster4.mec_furl], [1.0], T)
    assert "CTRL-C" in out and "RETURNED" not in out, out
    assert float(out.split("CTRL-C ")[1].split()[0]) < 2.0, out
    after = out.split("AFTER ")[1]
    assert after.startswith("['after', 'after', 'after', 'after']"), out
    assert float(after.split()[-1]) < 5.0, out


PX_CTRL_C = """\
import ipmpi, time
rc = ipmpi.Client()
rc[:].activate()
print('PX' + 'START')
%px import time; print('sleeping'); time.sleep(60)
t0 = time.monotonic()
%px print('after')
print('AFTER-PX %.2f' % (time.monotonic() - t0))
exit
"""


def test_ctrl_c_during_px_in_ipython_on_a_terminal(cluster4):
    events = []
    _rc, seen = ipython_on_a_pty(cluster4, PX_CTRL_C, T, sigint_after=(r"\[3\] sleeping", 1.0), events=events)
    text = "".join(s for _t, s in seen)
    assert events, "the %px never started:\n" + text
    t_int = events[0][1]
    t_kbd = first_seen(seen, "KeyboardInterrupt")
    assert t_kbd is not None and t_kbd - t_int < 2.0, text
    for i in range(4):
        assert "[%d] after" % i in text, text
    m = re.search(r"AFTER-PX (\d+\.\d+)", text)
    assert m and float(m.group(1)) < 5.0, text


def test_activate_then_px_in_a_jupyter_kernel(cluster4):
    px_streams_in_jupyter(cluster4, "import ipmpi\nrc = ipmpi.Client()\nrc[::2].activate()", (0, 2), T,
                          then=("%pxresult",))


def test_shutdown_engine_then_cluster(cluster4, rc):
    # last in this module: it stops the cluster
    rc.shutdown(targets=3)
    for _ in range(100):
        if rc.ids == [0, 1, 2]:
            break
        time.sleep(0.1)
    assert rc.ids == [0, 1, 2]
    assert rc[:].apply_sync(lambda: 1) == [1, 1, 1]
    rc.shutdown(hub=True)
