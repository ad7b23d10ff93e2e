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
import struct
import time

import pytest

from conftest import (HDR, MAGIC, bell_counts, controller_log, controller_pid, frame, hello, parse_furl, read_frame, running_cluster,
                      start_cluster, stop_cluster, tls_connect)
from ipmpi import _consts as C
from ipmpi import _serialize, client

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


def forwarded_whole(cluster):
    """(gathered frames, of them forwarded to the client whole): the
    controller's line at its end, so the cluster must have stopped."""
    m = re.findall(r"trees: (\d+) gathered reply frames, (\d+) of them forwarded to the client whole",
                   controller_log(cluster.log_dir))
    assert len(m) == 1, m
    return int(m[0][0]), int(m[0][1])


def inner_replies(part, runs=None):
    """The (target, status, flags, parts) of each reply in a gathered part,
    runs (F_SAME: engines target .. target + aux - 1 answered as the whole
    frame before) expanded; runs (a list) collects each run's (target, aux)."""
    out, at = [], 0
    while at < len(part):
        magic, version, kind, flags, _req, target, status, _total, nparts, aux = HDR.unpack_from(part, at)
        assert magic == MAGIC and flags & C.F_REPLY and not flags & (C.F_MORE | C.F_GATHER | C.F_SHM)
        at += 40
        if flags & C.F_SAME:
            assert nparts == 0 and aux >= 1 and out, (nparts, aux)
            _t, st, f, p = out[-1]
            out += [(target + i, st, f, p) for i in range(aux)]
            if runs is not None:
                runs.append((target, aux))
            continue
        assert aux == 0
        lens = struct.unpack_from("<%dQ" % nparts, part, at)
        at += 8 * nparts
        parts = []
        for n in lens:
            parts.append(part[at:at + n])
            at += n
        out.append((target, status, flags, parts))
    assert at == len(part)
    return out


def raw_replies(s, rid, flags_seen, runs=None, sizes=None):
    """Every engine's reply to request rid on raw connection s, gathered
    frames taken apart: {target: (status, parts)}; flags_seen collects the
    frames' flags, runs the runs of the gathered ones (inner_replies),
    sizes the bytes of each gathered part."""
    got, total = {}, None
    while total is None or len(got) < total:
        kind, flags, req_id, target, status, tot, parts = read_frame(s)
        assert req_id == rid and flags & C.F_REPLY, (kind, flags, req_id, target, status, parts)
        flags_seen.append(flags)
        assert total in (None, tot)
        total = tot
        if flags & C.F_GATHER and sizes is not None:
            sizes.append(len(parts[0]))
        subs = inner_replies(parts[0], runs) if flags & C.F_GATHER else [(target, status, flags, parts)]
        for t, st, _f, p in subs:
            assert t not in got, "engine %d answered twice" % t
            got[t] = (st, p)
    return got


def test_gathered_replies_reach_the_client_whole(cluster):
    """A client that sets F_GATHER_OK gets a tree's gathered replies as a
    few frames, each holding whole engine replies; one that does not gets
    a frame per engine. Either way every engine's reply, once."""
    key = parse_furl(cluster.mec_furl)[3]
    s = tls_connect(cluster.mec_furl, timeout=T)
    s.settimeout(T)
    try:
        assert hello(s, key)[4] == 0
        for rid, ok in ((10, C.F_GATHER_OK), (11, 0), (12, C.F_GATHER_OK)):
            s.sendall(frame(C.K_EXECUTE, rid, C.TARGET_ALL, [b"import os; r = int(os.environ['OMPI_COMM_WORLD_RANK'])"
                                                             b"\nprint(r * 3)"], flags=ok))
            seen = []
            got = raw_replies(s, rid, seen)
            assert sorted(got) == list(range(N))
            assert all(st == 0 for st, _ in got.values())
            if ok:
                # The 4 subtrees' replies: 4 frames (a few more if a reply went directly).
                assert any(f & C.F_GATHER for f in seen) and len(seen) < N, seen
            else:
                assert not any(f & C.F_GATHER for f in seen) and len(seen) == N, seen
        s.sendall(frame(C.K_PULL, 13, C.TARGET_ALL, _serialize.dumps(["r"]), flags=C.F_GATHER_OK))
        got = raw_replies(s, 13, [])
        assert {t: _serialize.loads(p[1:]) for t, (st, p) in got.items()} == {t: [t + 1] for t in range(N)}
    finally:
        s.close()


def test_agreeing_replies_travel_folded_and_every_engine_still_gets_its_own(cluster):
    """Relays fold replies that agree into runs (F_SAME): for execute
    ('pass') on 8 engines, 4 gathered frames of one whole reply and one run
    each. Replies that differ stay whole, in engine order, also when only
    some engines agree, and an error raised on every engine folds too."""
    key = parse_furl(cluster.mec_furl)[3]
    s = tls_connect(cluster.mec_furl, timeout=T)
    s.settimeout(T)
    try:
        assert hello(s, key)[4] == 0
        rank = b"import os; r = int(os.environ['OMPI_COMM_WORLD_RANK'])\n"
        cases = ((20, b"pass", lambda t: ""), (21, rank + b"print(r % 2)", lambda t: "%d\n" % ((t + 1) % 2)),
                 (22, rank + b"print(r)", lambda t: "%d\n" % (t + 1)))
        for rid, code, out in cases:
            s.sendall(frame(C.K_EXECUTE, rid, C.TARGET_ALL, [code], flags=C.F_GATHER_OK))
            runs, sizes = [], []
            got = raw_replies(s, rid, [], runs, sizes)
            assert sorted(got) == list(range(N))
            for t, (st, p) in got.items():
                meta = _serialize.loads(p[:1])
                assert st == 0 and "id" not in meta and meta["stdout"] == out(t), (t, meta)
            if rid == 20:
                # Each engine and its child agree: 4 runs of 1 (engines 1, 3, 5, 7).
                assert sorted(runs) == [(1, 1), (3, 1), (5, 1), (7, 1)], runs
                # So each gathered part is one whole reply and a 40-byte run.
                whole = 40 + 8 * len(got[0][1]) + sum(len(p) for p in got[0][1])
                assert sizes == [whole + 40] * 4, (sizes, whole)
            else:
                # Engines 0 and 1 (ranks 1 and 2) print different things: nothing folds.
                assert runs == [], runs
        s.sendall(frame(C.K_EXECUTE, 23, C.TARGET_ALL, [b"1/0"], flags=C.F_GATHER_OK))
        runs = []
        got = raw_replies(s, 23, [], runs)
        assert sorted(got) == list(range(N)) and all(st == C.EREMOTE for st, _ in got.values())
        assert len(runs) == 4, runs
    finally:
        s.close()
    # The client puts each engine's id back into its result and its error.
    m = cluster.client(timeout=T)
    try:
        assert [r["id"] for r in m.execute("pass")] == list(range(N))
        with pytest.raises(client.CompositeError) as ei:
            m.execute("1/0")
        assert sorted(e.engine_id for e in ei.value.errors) == list(range(N))
    finally:
        m.close()


def test_the_client_gets_the_replies_whole():
    """The Python client's requests carry F_GATHER_OK: every gathered frame
    goes to it whole (the controller's count at its end), and what users
    see is unchanged."""
    c = start_cluster(N, engine_args=("--tree-min", "2"), join=False)
    try:
        m = c.client(timeout=T)
        for i in range(20):
            m.execute("v = %d" % i)
            assert m.pull("v") == [i] * N
        m.close()
    finally:
        stop_cluster(c)
    gathered, whole = forwarded_whole(c)
    assert gathered >= 40 * 4 and whole == gathered, (gathered, whole)


def test_a_long_tree_request_does_not_wake_the_controller_every_few_ms():
    """While a tree runs, the controller sleeps on its bell until the roots'
    gathered replies are announced; its ring-again of the roots and its
    longest sleep follow how long subtrees take (learnt from the first
    trees), not fixed 2 ms / 10 ms timers: a 60 ms request costs it a
    couple of wake-ups, not ten."""
    c = start_cluster(N, engine_args=("--tree-min", "2", "--busy-spin-us", "0", "--wait-spin-us", "0"), join=False)
    try:
        m = c.client(timeout=T)
        m.execute("import time")
        for _ in range(3):     # the controller learns how long these trees take
            m.execute("time.sleep(0.06)")
        m.close()
    finally:
        stop_cluster(c)
    warm, _rings, _far = bell_counts(c.log_dir)
    c = start_cluster(N, engine_args=("--tree-min", "2", "--busy-spin-us", "0", "--wait-spin-us", "0"), join=False)
    try:
        m = c.client(timeout=T)
        m.execute("import time")
        for _ in range(3 + 12):
            m.execute("time.sleep(0.06)")
        m.close()
    finally:
        stop_cluster(c)
    sleeps, rings, _far = bell_counts(c.log_dir)
    # The 12 requests after the same start: fixed timers woke the loop at
    # 2, 6, 10, 14, 20, 30 ... ms, 6 or more times per request.
    assert sleeps - warm <= 12 * 3, (warm, sleeps, rings)
    assert rings >= 12, (warm, sleeps, rings)  # and it was the roots' rings that woke it


def cpu_sections(cluster):
    """The controller's --cpu-sections lines so far, each a dict (ms, and
    counts for turns and gathered-frames)."""
    out = []
    for line in re.findall(r"CPU by section so far \(ms\): (.*)", controller_log(cluster.log_dir)):
        f = line.split()
        out.append({k: float(v) for k, v in zip(f[::2], f[1::2])})
    return out


def test_cpu_sections_account_the_controllers_time_on_sigusr1_and_at_exit():
    """--cpu-sections: SIGUSR1 logs where the controller's CPU went so far
    (bench_tree.py takes its curve apart with it); the sections grow with
    the requests between two signals, tree sends and gathered replies
    among them, and they fit in the loop's total. Without the option a
    cluster logs none."""
    c = start_cluster(N, engine_args=("--tree-min", "2", "--cpu-sections"), join=False)
    try:
        m = c.client(timeout=T)
        pid = controller_pid(c)
        for _ in range(5):
            m.execute("pass")
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + T
        while len(cpu_sections(c)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(100):
            m.execute("x = %d" % i)
        assert m.pull("x") == [99] * N
        os.kill(pid, signal.SIGUSR1)
        while len(cpu_sections(c)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        m.close()
    finally:
        stop_cluster(c)
    lines = cpu_sections(c)
    assert len(lines) == 3, lines     # two signals, then the exit
    a, b = lines[0], lines[1]
    d = {k: b[k] - a[k] for k in a}
    assert d["gathered-frames"] >= 100 * 4, d
    for k in ("clients", "tree-sends", "mpi", "gathered", "turns", "loop"):
        assert d[k] > 0, (k, d)
    assert d["tree-sends"] <= d["clients"] and d["gathered"] <= d["mpi"], d
    assert d["clients"] + d["mpi"] + d["scans"] + d["waiting"] <= d["loop"] * 1.01, d
    # The controller ran on after the signals: it shut down cleanly.
    assert "shutting down" in controller_log(c.log_dir)
    plain = start_cluster(2, engine_args=("--tree-min", "2"), join=False)
    try:
        m = plain.client(timeout=T)
        m.execute("pass")
        m.close()
    finally:
        stop_cluster(plain)
    assert cpu_sections(plain) == []


def test_a_gathered_result_is_fetched_by_id_whole_or_per_engine(cluster, mec):
    """Kept results of tree requests: a second client fetches them by id
    (gathered, F_GATHER_OK), and so does a raw fetch without the flag (a
    frame per engine)."""
    pr = mec.execute("import os; print('from', os.environ['OMPI_COMM_WORLD_RANK'])", block=False)
    first = pr.get_result(timeout=T)
    want = ["from %d\n" % r for r in range(1, N + 1)]
    assert [r["stdout"] for r in first] == want
    other = cluster.client(timeout=T)
    try:
        again = other.get_result_by_id(pr.req_ids[0], timeout=T)
        assert [r["stdout"] for r in again] == want
    finally:
        other.close()
    instance, session, req = pr.req_ids[0].split(":")
    s = tls_connect(cluster.mec_furl, timeout=T)
    s.settimeout(T)
    try:
        assert hello(s, parse_furl(cluster.mec_furl)[3])[4] == 0
        fid = struct.pack("<QQ", int(instance, 16), int(session) << 32 | int(req))
        s.sendall(frame(C.K_RESULT_FETCH, 5, C.TARGET_CONTROLLER, [fid]))
        seen = []
        got = raw_replies(s, 5, seen)
        assert sorted(got) == list(range(N)) and not any(f & C.F_GATHER for f in seen)
        assert [_serialize.loads(got[t][1][:1])["stdout"] for t in range(N)] == want
    finally:
        s.close()


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
    # Engine 0 relays to engine 1. It never forwards the request: stopped
    # before it came (alive: the controller, which sees an end on its host
    # at once, still sends it the tree), killed once it was sent. The
    # controller sends engine 1 the request again when it sees engine 0
    # die; engine 1 runs it once.
    p = pids(mec)
    mec.execute("count = 0")
    os.kill(p[0], signal.SIGSTOP)
    t0 = time.monotonic()
    pr = mec.execute("count += 1; import os; w = os.getpid()", block=False)
    time.sleep(0.3)
    os.kill(p[0], signal.SIGKILL)
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


def gangs_sent(cluster):
    """(requests sent to all engines as a gang, gathered frames settled as
    runs): the controller's line at its end, so it must have stopped."""
    m = re.findall(r"(\d+) requests to all engines sent as a gang, (\d+) frames settled as runs of engines",
                   controller_log(cluster.log_dir))
    assert len(m) == 1, m
    return int(m[0][0]), int(m[0][1])


def test_requests_to_all_go_as_one_gang_and_work_queued_meanwhile_runs_after():
    # A request to every engine while nothing else runs goes as one gang
    # (one item in the controller's scheduler, its replies settled a run
    # of engines at a time). A request queued on one engine, a task, and
    # a request to all sent while a gang runs must each still run once,
    # in each engine's order, and the gangs after them must go again.
    c = start_cluster(N, engine_args=("--tree-min", "2", "--log-level", "3"))
    try:
        mec = c.client(timeout=T)
        tc = client.TaskClient(c.tc_furl, timeout=T)
        for i in range(20):
            mec.execute("x = %d" % i)
        assert mec.pull("x") == [19] * N
        slow = mec.execute("import time; time.sleep(1.5); order = ['gang']", block=False)
        time.sleep(0.3)
        one = mec.execute("order.append('one')", targets=[5], block=False)
        tid = tc.run(client.StringTask("t = 3", pull="t"))
        after = mec.execute("order.append('all')", block=False)
        assert len(slow.get_result(timeout=T)) == N
        one.get_result(timeout=T)
        assert tc.get_task_result(tid, block=True).ns.t == 3
        assert len(after.get_result(timeout=T)) == N
        orders = mec.pull("order")
        assert orders[5] == ["gang", "one", "all"], orders
        assert all(o == ["gang", "all"] for i, o in enumerate(orders) if i != 5), orders
        assert [r["stdout"] for r in mec.execute("print('on')")] == ["on\n"] * N
        tc.close()
        mec.close()
    finally:
        stop_cluster(c)
    gangs, runs = gangs_sent(c)
    whole = forwarded_whole(c)
    # 20 + the slow one + pull + print (+ the ids the client asked for):
    # every request to all while nothing else ran; not `after`.
    assert gangs >= 23, (gangs, runs, whole)
    # Every gathered frame of a gang was settled as runs: one per subtree
    # (4 on this node) and gang.
    assert runs >= 4 * gangs - 4, (gangs, runs, whole)
    assert whole[1] >= runs
