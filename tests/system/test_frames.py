"""Frames a key holder may legitimately send must never put the
controller-to-engine link out of step (issue 13: an EXECUTE of 1 code part
and 99 empty parts made that engine's next requests fail with EABORTED and
then answer each other's requests). Each frame is followed by requests from
another client, whose results must be their own.
"""
import pytest

from conftest import running_cluster
from ipmpi import _ipmpi

T = 120


@pytest.fixture(scope="module")
def cluster2():
    yield from running_cluster(2)


def assert_in_step(cluster, rounds=20):
    """Requests of a second client to both engines get their own answers."""
    other = cluster.client(timeout=T)
    try:
        for i in range(rounds):
            for e in (0, 1):
                r = other.execute("v = %d * 7\nprint(v)" % i, targets=e)
                assert r[0]["id"] == e
                assert r[0]["stdout"] == "%d\n" % (i * 7), r
    finally:
        other.close()


@pytest.mark.parametrize("empties", [1, 99, 1000, 4095])
def test_a_frame_of_many_empty_parts_keeps_the_engine_in_step(cluster2, empties):
    mec = cluster2.client(timeout=T)
    try:
        conn = mec._conn
        rid = conn.send(_ipmpi.K_EXECUTE, 0, [b"x = 'many parts'"] + [b""] * empties)
        ((target, status, _parts),) = conn.recv(rid, T)
        assert (target, status) == (0, 0)
        assert mec.pull("x", targets=0) in ("many parts", ["many parts"])
    finally:
        mec.close()
    assert_in_step(cluster2)


def test_empty_parts_between_full_ones_and_a_push_of_empty_buffers(cluster2):
    mec = cluster2.client(timeout=T)
    try:
        conn = mec._conn
        parts = [b"y = 5"]
        for k in range(200):
            parts += [b"", b"%d" % k]
        rid = conn.send(_ipmpi.K_EXECUTE, 1, parts)
        ((target, status, _parts),) = conn.recv(rid, T)
        assert (target, status) == (1, 0)
        # Empty out-of-band buffers through the real client (pickle 5).
        mec.push({"b": [bytearray(0) for _ in range(50)]}, targets=1)
        assert mec.execute("print(len(b), sum(map(len, b)))", targets=1)[0]["stdout"] == "50 0\n"
    finally:
        mec.close()
    assert_in_step(cluster2)


def test_a_fork_in_user_code_never_answers_as_the_engine(cluster2):
    # The child of os.fork() without os._exit comes back into the engine's
    # loop: it must end there, or two processes answer as engine 0.
    mec = cluster2.client(timeout=T)
    try:
        r = mec.execute("import os\nchild = os.fork()\nprint('parent' if child else 'child')", targets=0)
        assert r[0]["stdout"] == "parent\n", r
        child = mec.execute("print(child)", targets=0)[0]["stdout"].strip()
        assert int(child) > 0
    finally:
        mec.close()
    assert_in_step(cluster2)
