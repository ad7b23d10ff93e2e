"""Interrupt (issue 12 part 3): mec.interrupt(targets) and Ctrl-C in the
client raise KeyboardInterrupt in the user code running on the engines,
also in a comm.barrier() that one engine never joins; engines that run
nothing are left alone, so an interrupt while idle never breaks the next
request; the engines live on.
"""
import textwrap
import time

import pytest

from conftest import PYTHON, run_ctrl_c, running_cluster
from ipmpi import client
from ipmpi.results import _controller_json

T = 60


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(4, engine_args=("--mpi", "mpi4py"))


@pytest.fixture(scope="module")
def mec(cluster):
    m = cluster.client(timeout=T)
    yield m
    m.close()


def interrupted_everywhere(err, ids):
    errs = err.errors if isinstance(err, client.CompositeError) else [err]
    assert sorted(e.engine_id for e in errs) == sorted(ids), errs
    for e in errs:
        assert isinstance(e, KeyboardInterrupt) or getattr(e, "etype", "") == "KeyboardInterrupt", repr(e)


def test_interrupt_stops_running_code_and_the_engines_live_on(mec):
    pr = mec.execute("import time; time.sleep(60)", block=False)
    time.sleep(0.5)
    t0 = time.monotonic()
    r = mec.interrupt()
    assert r["interrupted"] == [0, 1, 2, 3], r
    with pytest.raises((client.CompositeError, KeyboardInterrupt)) as ei:
        pr.get_result(timeout=T)
    assert time.monotonic() - t0 < 5
    interrupted_everywhere(ei.value, [0, 1, 2, 3])
    assert [x["stdout"] for x in mec.execute("print('alive')")] == ["alive\n"] * 4


def test_an_interrupt_sent_right_after_the_request_still_reaches_it(mec):
    # The engines may not have picked the request up yet: the interrupt
    # names the request, so it lands there when it starts, and never in a
    # later one.
    # The signal may come before or after the engine starts the request:
    # either way exactly one KeyboardInterrupt, in the user's code (a
    # second one used to land in the engine's own error handling).
    for i in range(30):
        pr = mec.execute("import time; time.sleep(60)", block=False)
        time.sleep((0, 0.0005, 0.002, 0.01)[i % 4])
        mec.interrupt()
        t0 = time.monotonic()
        with pytest.raises((client.CompositeError, KeyboardInterrupt)) as ei:
            pr.get_result(timeout=T)
        assert time.monotonic() - t0 < 5
        interrupted_everywhere(ei.value, [0, 1, 2, 3])
        assert [x["stdout"] for x in mec.execute("print('next')")] == ["next\n"] * 4


def test_each_interrupt_of_the_same_request_raises_once_more(mec):
    # Code that catches the first KeyboardInterrupt is reached by the next.
    code = textwrap.dedent("""\
        import time
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print('first')
        time.sleep(60)
        """)
    pr = mec.execute(code, block=False)
    time.sleep(0.5)
    assert mec.interrupt()["interrupted"] == [0, 1, 2, 3]
    time.sleep(0.5)
    assert not pr.ready()
    assert mec.interrupt()["interrupted"] == [0, 1, 2, 3]
    with pytest.raises((client.CompositeError, KeyboardInterrupt)) as ei:
        pr.get_result(timeout=T)
    interrupted_everywhere(ei.value, [0, 1, 2, 3])
    assert [e.meta.get("stdout") for e in ei.value.errors] == ["first\n"] * 4


def test_an_interrupt_while_idle_changes_nothing(mec):
    r = mec.interrupt()
    assert r["idle"] == [0, 1, 2, 3] and r["interrupted"] == [], r
    time.sleep(0.2)
    assert [x["stdout"] for x in mec.execute("import time; time.sleep(0.3); print('fine')")] == ["fine\n"] * 4


def test_pickle_collectives_that_one_engine_never_joins_are_interrupted(mec):
    # comm.bcast, allreduce, gather ... (pickle-based) first wait in a
    # polled barrier: run by all they work as before; run by three of
    # four engines they are interrupted there. Each stuck one on its own
    # communicator (an interrupted collective stays posted on it).
    r = mec.execute("x = comm.allreduce(comm.Get_rank()); y = comm.bcast('b%d' % comm.Get_rank(), root=2); "
                    "g = comm.gather(comm.Get_rank(), root=0); a = comm.alltoall(list(range(4)))")
    assert len(r) == 4
    assert mec.pull("x") == [6] * 4 and mec.pull("y") == ["b2"] * 4
    assert mec.pull("g") == [[0, 1, 2, 3], None, None, None] and mec.pull("a")[3] == [3, 3, 3, 3]
    calls = ["comm2.allreduce(1)", "comm2.bcast(1, root=1)", "comm2.gather(1, root=1)", "comm2.scatter(None, root=1)"]
    mec.execute("comms = [type(comm)(comm.Dup()) for _ in range(%d)]" % len(calls))
    for i, call in enumerate(calls):
        busy = mec.execute("import time; time.sleep(1.5)", targets=0, block=False)
        stuck = mec.execute("comm2 = comms[%d]; %s; print('passed')" % (i, call), targets=[1, 2, 3], block=False)
        time.sleep(0.5)
        assert not stuck.ready(), call
        r = mec.interrupt(targets=[1, 2, 3])
        assert r["interrupted"] == [1, 2, 3], (call, r)
        with pytest.raises((client.CompositeError, KeyboardInterrupt)) as ei:
            stuck.get_result(timeout=T)
        interrupted_everywhere(ei.value, [1, 2, 3])
        busy.get_result(timeout=T)


def test_a_barrier_that_one_engine_never_joins_is_interrupted(mec):
    busy = mec.execute("import time; time.sleep(3)", targets=0, block=False)
    stuck = mec.execute("comm.barrier(); print('passed')", targets=[1, 2, 3], block=False)
    time.sleep(0.5)
    assert not stuck.ready()
    r = mec.interrupt(targets=[1, 2, 3])
    assert r["interrupted"] == [1, 2, 3], r
    with pytest.raises((client.CompositeError, KeyboardInterrupt)) as ei:
        stuck.get_result(timeout=T)
    interrupted_everywhere(ei.value, [1, 2, 3])
    busy.get_result(timeout=T)
    assert [x["stdout"] for x in mec.execute("print(comm.Get_rank())")] == ["0\n", "1\n", "2\n", "3\n"]


def test_ctrl_c_in_the_client_returns_and_interrupts_the_engines(cluster, tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(textwrap.dedent("""
        import signal, sys, time
        from ipmpi import client
        # As at a terminal (a test runner may start us with SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
        print("READY", flush=True)
        t0 = time.monotonic()
        try:
            mec.execute("import time; time.sleep(60)")
            print("RETURNED")
        except KeyboardInterrupt:
            print("CTRL-C %.2f" % (time.monotonic() - t0), flush=True)
        r = mec.execute("print('after')")
        print("AFTER", [x["stdout"] for x in r], "%.2f" % (time.monotonic() - t0), flush=True)
    """))
    out = run_ctrl_c([PYTHON, str(script), cluster.mec_furl], [1.0], T)
    assert "CTRL-C" in out, out
    assert float(out.split("CTRL-C ")[1].split()[0]) < 3.0, out
    # The engines were interrupted: the next request answers at once, not after 60 s.
    after = out.split("AFTER ")[1]
    assert "['after\\n', 'after\\n', 'after\\n', 'after\\n']" in after, out
    assert float(after.split()[-1]) < 5.0, out


CTRL_C_QUEUED = {
    "mec": """
        mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
        run = lambda: mec.execute("import time; time.sleep(30)", targets=0)
        after = lambda: mec.execute("print('after')", targets=0)[0]["stdout"]
        """,
    "client": """
        rc = ipmpi.Client(url_file=sys.argv[1], timeout=60, progress=False, stream_output=False)
        run = lambda: rc[0].apply_sync(time.sleep, 30)
        after = lambda: rc[0].apply_sync(lambda: 'after\\n')
        """,
}


@pytest.mark.parametrize("api", sorted(CTRL_C_QUEUED))
def test_ctrl_c_interrupts_only_the_clients_own_request(cluster, tmp_path, api):
    # Client B runs sleep(4) on engine 0; client A's sleep(30) waits
    # behind it; A presses Ctrl-C. B's code goes on (it used to get A's
    # KeyboardInterrupt), A's queued request is aborted (it used to run
    # its 30 s after all, and A's next request waited for it).
    other = cluster.client(timeout=T)
    try:
        first = other.execute("import time; time.sleep(4); print('B done')", targets=0, block=False)
        time.sleep(0.3)
        script = tmp_path / "ctrl_c_queued.py"
        script.write_text(textwrap.dedent("""
            import signal, sys, time
            import ipmpi
            from ipmpi import client
            signal.signal(signal.SIGINT, signal.default_int_handler)
            """) + textwrap.dedent(CTRL_C_QUEUED[api]) + textwrap.dedent("""
            print("READY", flush=True)
            t0 = time.monotonic()
            try:
                run()
                print("RETURNED")
            except KeyboardInterrupt:
                print("CTRL-C %.2f" % (time.monotonic() - t0), flush=True)
            t1 = time.monotonic()
            print("AFTER", repr(after()), "%.2f" % (time.monotonic() - t1), flush=True)
            """))
        out = run_ctrl_c([PYTHON, str(script), cluster.mec_furl], [1.0], T)
        assert "CTRL-C" in out, out
        assert float(out.split("CTRL-C ")[1].split()[0]) < 3.0, out
        after = out.split("AFTER ")[1]
        assert after.startswith("'after\\n'"), out
        # Only B's remaining ~3 s, not A's 30 s.
        assert float(after.split()[-1]) < 12.0, out
        assert [x["stdout"] for x in first.get_result(timeout=T)] == ["B done\n"], out
    finally:
        other.close()
    assert [x["stdout"] for x in mec_alive(cluster)] == ["alive\n"] * 4


def mec_alive(cluster):
    m = cluster.client(timeout=T)
    try:
        return m.execute("print('alive')")
    finally:
        m.close()


def test_an_interrupt_of_the_clients_requests_reaches_only_those(cluster):
    # The wire form Ctrl-C uses: this session's request ids; another
    # session's running code is "busy" and left alone, the named request
    # still queued is aborted.
    a, b = cluster.client(timeout=T), cluster.client(timeout=T)
    try:
        running = b.execute("import time; time.sleep(2); print('b')", targets=1, block=False)
        time.sleep(0.3)
        queued = a.execute("import time; time.sleep(30)", targets=1, block=False)
        r = a._interrupt_requests([1], queued._pending, timeout=T)
        assert r["busy"] == [1] and r["aborted"] == 1 and r["interrupted"] == [], r
        with pytest.raises((client.AbortedError, client.CompositeError)) as ei:
            queued.get_result(timeout=T)
        assert "interrupt" in str(ei.value), ei.value
        assert [x["stdout"] for x in running.get_result(timeout=T)] == ["b\n"]
        mine = a.execute("import time; time.sleep(30)", targets=[1, 2], block=False)
        time.sleep(0.5)
        r = a._interrupt_requests([1, 2, 3], mine._pending, timeout=T)
        assert r["interrupted"] == [1, 2] and r["idle"] == [3] and r["aborted"] == 0, r
        with pytest.raises((client.CompositeError, KeyboardInterrupt)) as ei:
            mine.get_result(timeout=T)
        interrupted_everywhere(ei.value, [1, 2])
        # Bad input: a request id part that is not u64s is refused.
        rid = a._send(client._c.K_INTERRUPT, 1, [b"abc"])
        with pytest.raises(client.EngineError) as ei:
            a._finish([rid], _controller_json, True, T, ids=[None])
        assert "u64 request ids" in str(ei.value), ei.value
    finally:
        a.close()
        b.close()


def test_an_interrupt_naming_a_dead_engine_says_so(cluster):
    m = cluster.client(timeout=T)
    try:
        victim = max(m.get_ids())
        m.kill(targets=victim)
        deadline = time.monotonic() + 10
        while victim in m.get_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = m.interrupt(targets=[0, victim])
        assert r["dead"] == [victim] and 0 not in r["dead"] and r["unreachable"] == [], r
    finally:
        m.close()
