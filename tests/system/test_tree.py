"""Broadcast trees (issue 11 part 2): with --tree-min, a request for that
many idle engines of the controller's node travels as a tree (each engine
forwards it to up to 4 others before it runs it) and the replies come back
gathered, one frame per subtree. What users see must not change: every
engine's reply, in engine order, also for large replies (sent directly),
busy engines (served directly, after their running request), streamed
output and interrupts; and an engine that dies while it relays must cost
the others nothing (the controller sends them the request again, and an
engine whose parent died sends its replies directly).

8 engines, --tree-min 2: the controller's children are engines 0, 2, 4
and 6, each with one child (1, 3, 5, 7); every test also checks that the
controller sent trees (its log counts them).
"""
import os
import re
import signal
import time

import pytest

from conftest import controller_log, running_cluster
from ipmpi import client

T = 60
N = 8


@pytest.fixture
def cluster():
    yield from running_cluster(N, engine_args=("--tree-min", "2", "--log-level", "3"))


@pytest.fixture
def mec(cluster):
    m = cluster.client(timeout=T)
    yield m
    m.close()


def trees_sent(cluster):
    """How many requests the controller sent as trees (its debug log)."""
    return len(re.findall(r"as a tree of \d+ engines", controller_log(cluster.log_dir)))


def test_replies_are_every_engines_in_order(cluster, mec):
    before = trees_sent(cluster)
    for i in range(50):
        mec.execute("import os; x = %d * 10 + int(os.environ.get('OMPI_COMM_WORLD_RANK', 0))" % i)
        assert mec.pull("x") == [i * 10 + r for r in range(1, N + 1)]
    assert [r["stdout"] for r in mec.execute("print('hi')")] == ["hi\n"] * N
    assert trees_sent(cluster) - before >= 100
    # A push travels down the tree: every engine gets the whole payload.
    big = bytes(range(256)) * 4096  # 1 MiB
    mec.push(dict(b=big))
    mec.execute("ok = b == bytes(range(256)) * 4096")
    assert mec.pull("ok") == [True] * N


def test_large_replies_go_directly_and_arrive_whole(mec):
    # 200 KB per engine: more than a gathered reply holds.
    mec.execute("import numpy; a = numpy.arange(25000.0) + id(numpy) % 7 * 0")
    got = mec.pull("a")
    assert len(got) == N and all(len(a) == 25000 and a[-1] == 24999.0 for a in got)
    mixed = mec.execute("import os; big = 'x' * (100000 if int(os.environ['OMPI_COMM_WORLD_RANK']) % 2 else 10)")
    assert len(mixed) == N
    assert [len(s) for s in mec.pull("big")] == [10 if r % 2 == 0 else 100000 for r in range(1, N + 1)]


def test_a_busy_engine_gets_it_after_its_running_request(mec):
    slow = mec.execute("import time; time.sleep(2)", targets=[3], block=False)
    time.sleep(0.3)
    t0 = time.monotonic()
    pr = mec.execute("y = 1", block=False)
    # The others answer while engine 3 still sleeps.
    fast = mec.execute("z = 2", targets=[0, 1, 2, 4, 5, 6, 7])
    assert time.monotonic() - t0 < 1.5 and len(fast) == 7
    assert len(pr.get_result(timeout=T)) == N
    slow.get_result(timeout=T)
    assert mec.pull("y") == [1] * N


def test_streamed_output_and_interrupt_reach_every_engine(mec):
    out = mec.execute("print('line'); import sys; sys.stdout.flush()", stream=True)
    assert [r["stdout"] for r in out] == ["line\n"] * N
    pr = mec.execute("import time; time.sleep(60)", block=False)
    time.sleep(0.5)
    r = mec.interrupt()
    assert r["interrupted"] == list(range(N)), r
    with pytest.raises(client.CompositeError) as ei:
        pr.get_result(timeout=T)
    assert sorted(e.engine_id for e in ei.value.errors) == list(range(N))
    assert [r["stdout"] for r in mec.execute("print('after')")] == ["after\n"] * N


def pids(mec):
    return {i["id"]: i["pid"] for i in mec.engine_info()}


def test_a_relay_killed_before_the_request_costs_the_others_nothing(cluster, mec):
    # Engine 0 relays to engine 1. Killed just before the request (not yet
    # seen dead): the controller sends engine 1 the request again when it
    # sees engine 0 die; engine 1 runs it once.
    p = pids(mec)
    mec.execute("count = 0")
    os.kill(p[0], signal.SIGKILL)
    t0 = time.monotonic()
    pr = mec.execute("count += 1; import os; w = os.getpid()", block=False)
    with pytest.raises(client.CompositeError) as ei:
        pr.get_result(timeout=T)
    assert time.monotonic() - t0 < 10
    assert [e.engine_id for e in ei.value.errors] == [0] and isinstance(ei.value.errors[0], client.DeadEngineError)
    assert mec.get_ids() == list(range(1, N))
    assert mec.pull("count", targets=list(range(1, N))) == [1] * (N - 1)
    assert mec.pull("w", targets=list(range(1, N))) == [p[i] for i in range(1, N)]


def test_a_relay_killed_while_its_subtree_runs_costs_the_others_nothing(cluster, mec):
    # Engine 2 relays to engine 3 and dies while both run: engine 3 finds
    # its parent gone and sends its reply to the controller itself.
    p = pids(mec)
    pr = mec.execute("import time; time.sleep(1.5); v = 5", block=False)
    time.sleep(0.5)
    os.kill(p[2], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(client.CompositeError) as ei:
        pr.get_result(timeout=T)
    assert time.monotonic() - t0 < 10
    assert [e.engine_id for e in ei.value.errors] == [2]
    assert mec.pull("v", targets=[0, 1, 3, 4, 5, 6, 7]) == [5] * 7
    # And the next requests go round the dead engine.
    assert [r["stdout"] for r in mec.execute("print('on')")] == ["on\n"] * (N - 1)
