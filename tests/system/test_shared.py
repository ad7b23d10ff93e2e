"""Node-shared arrays (mec.push(..., shared=True), ipmpi.shared) on a real
4-engine cluster on one node: one copy per node whatever the number of
engines (measured as the proportional set size of the segment's mappings
in every engine, from /proc/PID/smaps), read-only views with the right
values, nothing left in /dev/shm, memory gone once every engine dropped
its array, refusals of what cannot be shared. The same across two hosts
is in test_launch_ssh.py.
"""
import os

import numpy as np
import pytest

from ipmpi import client
from ipmpi.shared import segment_pss_kb

T = 120
MiB = 1 << 20


def leftover_segments():
    return [n for n in os.listdir("/dev/shm") if n.startswith("ipmpi-shared-%d-" % os.getpid())]


@pytest.fixture(scope="module")
def pids(mec):
    return {d["id"]: d["pid"] for d in mec.engine_info(timeout=T)}


def test_one_copy_per_node_read_only_with_the_values(mec, pids):
    a = np.arange(8 * MiB, dtype=np.float64)          # 64 MiB
    b = np.arange(12, dtype=np.int32).reshape(3, 4)
    report = mec.push(dict(a=a, b=b), shared=True, timeout=T)
    assert list(report.values()) == [{"engines": [0, 1, 2, 3], "bytes": 64 * MiB + 48}], report
    sums = mec.execute("print(a.sum(), b[2, 3], a.flags.writeable, b.dtype)", timeout=T)
    assert [r["stdout"] for r in sums] == ["%r 11 False int32\n" % float(a.sum())] * 4
    # Every engine read every page: each maps all 64 MiB, and the node holds
    # them once (PSS splits shared pages between the processes mapping them).
    pss = sum(segment_pss_kb(p) for p in pids.values())
    assert abs(pss - 64 * 1024) < 1024, "the node holds %d kB of the segment, not 64 MiB" % pss
    with pytest.raises(client.CompositeError) as ei:
        mec.execute("a[0] = 1.0", timeout=T)
    assert "read-only" in str(ei.value)
    assert leftover_segments() == []
    # Dropped by some engines: still there for the others.
    mec.execute("del a, b", targets=[0, 1], timeout=T)
    assert [segment_pss_kb(pids[i]) for i in (0, 1)] == [0, 0]
    assert mec.pull("b", targets=3, timeout=T)[0].tolist() == b.tolist()
    # Dropped by all: gone (nothing maps it, its name was removed).
    mec.reset(targets=[2, 3], timeout=T)
    assert sum(segment_pss_kb(p) for p in pids.values()) == 0
    assert "a" not in mec.keys(targets=2, timeout=T)[0]


def test_a_subset_of_engines_and_a_second_push_replacing_the_first(mec, pids):
    x = np.ones(MiB, dtype=np.uint8)
    report = mec.push(dict(x=x), targets=[1, 2], shared=True, timeout=T)
    assert [v["engines"] for v in report.values()] == [[1, 2]]
    assert [("x" in k) for k in mec.keys(timeout=T)] == [False, True, True, False]
    report = mec.push(dict(x=x * 2), targets=[1, 2], shared=True, timeout=T)
    assert mec.execute("print(int(x.sum()))", targets=[1, 2], timeout=T)[0]["stdout"] == "%d\n" % (2 * MiB)
    # The first segment went with the names rebound.
    assert all(segment_pss_kb(pids[i]) <= 1024 + 4 for i in (1, 2))
    mec.reset(targets=[1, 2], timeout=T)
    assert sum(segment_pss_kb(p) for p in pids.values()) == 0
    assert leftover_segments() == []


def test_what_cannot_be_shared_is_refused_before_anything_is_sent(mec):
    with pytest.raises(TypeError, match="numpy arrays"):
        mec.push(dict(a=[1, 2, 3]), shared=True)
    with pytest.raises(TypeError, match="object array"):
        mec.push(dict(a=np.array([object()])), shared=True)
    with pytest.raises(TypeError, match="dict"):
        mec.push([("a", np.zeros(3))], shared=True)
    assert leftover_segments() == []
    # A non-contiguous array is shared as its contiguous copy.
    m = np.arange(16.0).reshape(4, 4)[:, 1]
    mec.push(dict(m=m), shared=True, timeout=T)
    assert mec.pull("m", targets=0, timeout=T)[0].tolist() == m.tolist()
    mec.reset(timeout=T)
