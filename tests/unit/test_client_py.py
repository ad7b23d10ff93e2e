"""The client without a cluster: result formatting, target validation,
partitioning, error classes, furl files, and the C transport (ipmpi._ipmpi)
against a fake controller: a TLS 1.3 server in a thread that speaks
doc/protocol.md. Run by `make check` with PYTHONPATH=<builddir>/pytree.
"""
import json
import os
import pickle
import socket
import ssl
import struct
import threading
import time

import numpy
import pytest

from ipmpi import _ipmpi, _serialize, client

HDR = struct.Struct("<IBBHQiiIIQ")
KEY = "ab" * 32


# ---------------------------------------------------------------- fake controller

class Peer:
    """The server side of one client connection, blocking."""

    def __init__(self, sock):
        self.sock = sock

    def _read(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def read_frame(self):
        magic, ver, kind, flags, req, target, status, total, nparts, aux = HDR.unpack(self._read(HDR.size))
        assert magic == _ipmpi.MAGIC and ver == _ipmpi.PROTO_VERSION
        lens = struct.unpack("<%dQ" % nparts, self._read(8 * nparts)) if nparts else ()
        parts = [self._read(n) for n in lens]
        return dict(kind=kind, req=req, target=target, flags=flags, parts=parts)

    def write_frame(self, kind, req, target=-2, status=0, total=1, parts=()):
        parts = [bytes(p) for p in parts]
        head = HDR.pack(_ipmpi.MAGIC, _ipmpi.PROTO_VERSION, kind, _ipmpi.F_REPLY, req, target, status,
                        total, len(parts), 0)
        head += struct.pack("<%dQ" % len(parts), *[len(p) for p in parts])
        self.sock.sendall(head + b"".join(parts))

    def hello(self, capability="mec", engines=2):
        f = self.read_frame()
        assert f["kind"] == _ipmpi.K_HELLO and f["parts"] == [KEY.encode()]
        js = json.dumps({"capability": capability, "engines": engines, "ids": list(range(engines)),
                         "version": 1})
        self.write_frame(_ipmpi.K_HELLO, f["req"], parts=[js.encode()])


class FakeController:
    """Accepts one connection and runs handler(peer) in a thread."""

    def __init__(self, cert, handler, tls=True):
        key, crt, self.fp = cert
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(crt, key)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.handler, self.tls = handler, tls
        self.error = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def furl(self, fp=None, key=KEY):
        return "ipmpi+tls://%s@127.0.0.1:%d/%s" % (fp or self.fp, self.port, key)

    def _run(self):
        try:
            raw, _ = self.lsock.accept()
            if not self.tls:
                self.handler(raw)
                return
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                self.handler(Peer(s))
        except (EOFError, ConnectionError, ssl.SSLError):
            pass
        except Exception as e:  # surfaced by stop()
            self.error = e
        finally:
            self.done.set()

    def stop(self):
        self.done.wait(10)
        self.lsock.close()
        if self.error:
            raise self.error


@pytest.fixture
def fake(cert):
    made = []

    def start(handler, tls=True):
        fc = FakeController(cert, handler, tls)
        made.append(fc)
        return fc

    yield start
    for fc in made:
        fc.stop()


def meta(eid, number=1, code="", out="", err="", **extra):
    m = {"id": eid, "kind": "execute", "number": number, "input": code, "stdout": out, "stderr": err}
    m.update(extra)
    return pickle.dumps(m, protocol=5)


# ---------------------------------------------------------------- pure Python pieces

def test_resultlist_repr_is_ipython_0x_form():
    rl = client.ResultList([
        {"id": 0, "number": 1, "input": 'print("Hello World")', "stdout": "Hello World\n", "stderr": ""},
        {"id": 1, "number": 1, "input": 'print("Hello World")', "stdout": "Hello World\n", "stderr": ""},
    ])
    assert repr(rl) == ('<Results List>\n'
                        '[0] In [1]: print("Hello World")\n'
                        '[0] Out[1]: Hello World\n\n'
                        '[1] In [1]: print("Hello World")\n'
                        '[1] Out[1]: Hello World\n\n')


def test_resultlist_repr_is_ipython_0_10s_for_stdout_without_newline_and_stderr():
    rl = client.ResultList([{"id": 2, "number": 3, "input": "x", "stdout": "abc", "stderr": "warn\n"}])
    assert repr(rl) == "<Results List>\n[2] In [3]: x\n[2] Out[3]: abc\n[2] Err[3]:\n warn\n"
    assert repr(client.ResultList([{"id": 0, "number": 4, "input": "a=1", "stdout": "", "stderr": ""}])) == \
        "<Results List>\n[0] In [4]: a=1\n"


def test_targets_are_validated():
    assert client._parse_targets("all") == (_ipmpi.TARGET_ALL, None, False)
    assert client._parse_targets(3) == (3, None, True)
    assert client._parse_targets(numpy.int64(1)) == (1, None, True)
    assert client._parse_targets([2, 0]) == (_ipmpi.TARGET_LIST, [2, 0], False)
    assert client._parse_targets(range(2)) == (_ipmpi.TARGET_LIST, [0, 1], False)
    for bad, exc in [(-1, ValueError), ([], ValueError), ([1, 1], ValueError), ([0, -2], ValueError),
                     ("some", TypeError), (True, TypeError), ([0.5], TypeError), (1.0, TypeError)]:
        with pytest.raises(exc):
            client._parse_targets(bad)


def test_scatter_partitions_are_contiguous_and_balanced():
    parts = client._partition(list(range(10)), 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert client._partition(range(2), 4) == [[0], [1], [], []]
    assert client._partition((1, 2, 3), 2) == [(1, 2), (3,)]


def test_scatter_slices_numpy_arrays_without_copy():
    a = numpy.arange(1000.0)
    parts = client._partition(a, 3)
    assert [len(p) for p in parts] == [334, 333, 333]
    assert all(numpy.shares_memory(p, a) for p in parts)
    assert numpy.array_equal(client._concatenate(parts), a)


def test_gather_concatenates_lists_and_tuples():
    assert client._concatenate([[1, 2], (3,), []]) == [1, 2, 3]
    assert client._concatenate([1, 2]) == [1, 2]


def test_remote_error_names_engine_and_keeps_traceback():
    e = client.RemoteError(2, "ZeroDivisionError", "division by zero", "Traceback...\n  1/0\nZeroDivisionError")
    assert isinstance(e, Exception)
    assert str(e).startswith("engine 2: ZeroDivisionError: division by zero\nTraceback")
    assert (e.engine_id, e.etype, e.evalue) == (2, "ZeroDivisionError", "division by zero")


def test_engine_error_classes():
    assert issubclass(client.EngineError, RuntimeError)
    assert issubclass(client.DeadEngineError, client.EngineError)
    assert issubclass(client.AbortedError, client.EngineError)
    e = client.DeadEngineError(_ipmpi.EDEAD, "engine 1 died (rank 2): PROC ABORTED BY SIGNAL", 1)
    assert str(e) == "engine 1 died (rank 2): PROC ABORTED BY SIGNAL (IPMPI_EDEAD)" and e.code == _ipmpi.EDEAD


def test_one_failure_of_several_is_a_composite_error_with_the_successes():
    replies = [(0, 0, [meta(0, out="ok")]),
               (1, _ipmpi.EREMOTE, [meta(1, etype="NameError", evalue="name 'x' is not defined", traceback="tb")])]
    with pytest.raises(client.CompositeError) as ei:
        client._engine_results(replies, lambda m, p: m, "execute")
    assert ei.value.errors[0].engine_id == 1 and ei.value.results[0]["stdout"] == "ok"
    assert str(ei.value) == ("one or more exceptions from call to method: execute\n"
                             "[1:execute]: NameError: name 'x' is not defined")
    with pytest.raises(NameError):
        ei.value.raise_exception()
    with pytest.raises(client.RemoteError) as ei:
        client._engine_results(replies[1:], lambda m, p: m)
    assert ei.value.engine_id == 1


def test_several_failures_raise_composite_error_with_controller_errors_too():
    replies = [(2, _ipmpi.EREMOTE, [meta(2, etype="ValueError", evalue="v", traceback="tb")]),
               (1, _ipmpi.EDEAD, [b"engine 1 died (rank 2)"]),
               (3, _ipmpi.EABORTED, [b"aborted by clear_queue"]),
               (0, 0, [meta(0)])]
    with pytest.raises(client.CompositeError) as ei:
        client._engine_results(replies, lambda m, p: m["id"])
    ce = ei.value
    assert [type(e) for e in ce.errors] == [client.DeadEngineError, client.RemoteError, client.AbortedError]
    assert ce.results == [0]
    assert "[2:?]: ValueError: v" in str(ce)
    with pytest.raises(client.DeadEngineError):
        ce.raise_exception()


def test_missing_furl_file_tells_how_to_start_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("IPMPI_DIR", str(tmp_path))
    assert client.default_furl_file() == str(tmp_path / "security" / "ipcontroller-mec.furl")
    with pytest.raises(FileNotFoundError, match=r"ipcluster mpirun -n 4"):
        client.MultiEngineClient()
    monkeypatch.delenv("IPMPI_DIR")
    assert client.default_furl_file("tc") == os.path.expanduser("~/.ipmpi/security/ipcontroller-tc.furl")


def test_bad_furl_says_what_is_wrong(tmp_path):
    bad = {
        "http://x": "does not start with",
        "ipmpi+tls://zz@h:1/" + KEY: "fingerprint",
        "ipmpi+tls://" + "a" * 64 + "@h:1/abc": "key",
        "ipmpi+tls://" + "a" * 64 + "@h:0/" + KEY: "port",
        "ipmpi+tls://" + "a" * 64 + "@h:1" + KEY: "key",
    }
    for text, word in bad.items():
        p = tmp_path / "x.furl"
        p.write_text(text)
        p.chmod(0o600)
        with pytest.raises(ValueError, match=word):
            client.MultiEngineClient(str(p))


def test_constants_and_strerror():
    assert _ipmpi.K_EXECUTE == 2 and _ipmpi.TARGET_ALL == -1 and _ipmpi.TARGET_LIST == -3
    assert _ipmpi.EREMOTE == -6 and _ipmpi.EDEAD == -5
    assert _ipmpi.strerror(_ipmpi.EDEAD) == "engine died"
    assert _ipmpi.errname(_ipmpi.EDEAD) == "IPMPI_EDEAD"


# ---------------------------------------------------------------- C transport

def test_connect_hello_and_attributes(fake):
    def h(peer):
        peer.hello()
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    assert c.capability == "mec" and json.loads(c.hello)["engines"] == 2
    assert (c.host, c.port) == ("127.0.0.1", fc.port)
    c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    c.close()
    assert c.closed


def test_fingerprint_mismatch_is_refused(fake):
    fc = fake(lambda peer: peer.read_frame())
    with pytest.raises(ConnectionError, match="certificate fingerprint of 127.0.0.1:%d does not match the furl: "
                       "wrong controller, or someone in between" % fc.port):
        _ipmpi.Connection(fc.furl(fp="0" * 64), 5)


def test_hello_refusal_raises_permission_error_with_controller_message(fake):
    def h(peer):
        f = peer.read_frame()
        peer.write_frame(_ipmpi.K_HELLO, f["req"], status=_ipmpi.EACCES, parts=[b"wrong key"])

    fc = fake(h)
    with pytest.raises(PermissionError, match="wrong key"):
        _ipmpi.Connection(fc.furl(key="cd" * 32), 5)


def test_connect_times_out_when_no_tls_handshake(fake):
    gate = threading.Event()
    fc = fake(lambda raw: gate.wait(5), tls=False)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        _ipmpi.Connection(fc.furl(), 0.3)
    assert time.monotonic() - t0 < 3
    gate.set()


def test_recv_timeout_loses_nothing(fake):
    go = threading.Event()

    def h(peer):
        peer.hello()
        f = peer.read_frame()
        go.wait(5)
        peer.write_frame(f["kind"], f["req"], parts=[b"[0, 1]"])
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    rid = c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    with pytest.raises(TimeoutError):
        c.recv(rid, timeout=0.2)
    assert not c.ready(rid)
    go.set()
    assert c.recv(rid, timeout=5) == [(-2, 0, [bytearray(b"[0, 1]")])]
    c.close()


def test_replies_out_of_order_are_kept_for_their_own_recv(fake):
    def h(peer):
        peer.hello()
        a, b = peer.read_frame(), peer.read_frame()
        assert a["target"] == _ipmpi.TARGET_LIST and b["target"] == _ipmpi.TARGET_ALL
        assert struct.unpack("<2i", a["parts"][0]) == (1, 0) and a["parts"][1] == b"code"
        peer.write_frame(b["kind"], b["req"], target=1, total=2, parts=[meta(1), b"x"])
        peer.write_frame(a["kind"], a["req"], target=0, total=2, parts=[meta(0)])
        peer.write_frame(b["kind"], b["req"], target=0, total=2, parts=[meta(0)])
        peer.write_frame(a["kind"], a["req"], target=1, total=2, parts=[meta(1)])
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    ra = c.send(_ipmpi.K_EXECUTE, 0, [b"code"], targets=[1, 0])
    rb = c.send(_ipmpi.K_EXECUTE, _ipmpi.TARGET_ALL, [bytearray(b"code")])
    assert ra != rb
    got_a = c.recv(ra, timeout=5)
    assert [(t, s) for t, s, _ in got_a] == [(0, 0), (1, 0)]
    assert c.ready(rb)
    got_b = c.recv(rb, timeout=5)
    assert [(t, len(p)) for t, _, p in got_b] == [(1, 2), (0, 1)]
    assert got_b[0][2][1] == bytearray(b"x") and isinstance(got_b[0][2][1], bytearray)
    with pytest.raises(KeyError):
        c.recv(ra, timeout=0.1)
    c.close()


def test_forget_drops_stored_and_later_replies(fake):
    def h(peer):
        peer.hello()
        a = peer.read_frame()
        b = peer.read_frame()
        peer.write_frame(a["kind"], a["req"], parts=[b"late"])
        peer.write_frame(b["kind"], b["req"], parts=[b"[]"])
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    ra = c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    c.forget(ra)
    rb = c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    assert c.recv(rb, timeout=5)[0][2] == [bytearray(b"[]")]
    with pytest.raises(KeyError):
        c.recv(ra, timeout=0.1)
    c.close()


def test_closed_connection_fails_pending_recv_naming_the_controller(fake):
    def h(peer):
        peer.hello()
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    rid = c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    with pytest.raises(ConnectionError, match="127.0.0.1:%d" % fc.port):
        c.recv(rid, timeout=10)
    with pytest.raises(ConnectionError):
        c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])


def test_close_from_another_thread_wakes_a_waiting_recv(fake):
    def h(peer):
        peer.hello()
        peer.read_frame()
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    rid = c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    threading.Timer(0.2, c.close).start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        c.recv(rid)
    assert time.monotonic() - t0 < 5


def test_signal_handler_interrupts_a_blocking_recv_and_nothing_is_lost(fake):
    import signal
    go = threading.Event()

    def h(peer):
        peer.hello()
        f = peer.read_frame()
        go.wait(5)
        peer.write_frame(f["kind"], f["req"], parts=[b"[0]"])
        peer.read_frame()

    class Stop(Exception):
        pass

    def raise_stop(signum, frame):
        raise Stop()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    rid = c.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_ALL, [])
    old = signal.signal(signal.SIGALRM, raise_stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Stop):
            c.recv(rid, timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    go.set()
    assert c.recv(rid, timeout=5)[0][2] == [bytearray(b"[0]")]
    c.close()


def test_large_numpy_parts_round_trip_into_reused_big_buffers(fake):
    """Parts of 4 MiB or more arrive in writable huge-page buffers that a
    later part of a similar size reuses once the first is gone; small parts
    stay bytearrays."""
    def h(peer):
        peer.hello()
        for _ in range(2):
            f = peer.read_frame()
            peer.write_frame(f["kind"], f["req"], target=0, parts=f["parts"])
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    a = numpy.random.default_rng(0).random(3_000_000)
    parts = _serialize.dumps({"a": a})
    assert len(parts) == 2 and parts[1].nbytes == a.nbytes
    addrs = []
    for _ in range(2):
        rid = c.send(_ipmpi.K_PUSH, 0, parts)
        (target, status, back), = c.recv(rid, timeout=30)
        assert isinstance(back[0], bytearray)
        assert type(back[1]).__name__ == "BigBuffer" and len(back[1]) == a.nbytes
        assert not memoryview(back[1]).readonly
        b = _serialize.loads(back)["a"]
        assert numpy.array_equal(a, b) and b.flags.writeable
        addrs.append(b.ctypes.data)
        del b, back
    assert addrs[0] == addrs[1], "the second large part did not reuse the first one's buffer"
    c.close()


def test_many_threads_share_one_connection(fake):
    n = 64

    def h(peer):
        peer.hello()
        frames = [peer.read_frame() for _ in range(n)]
        for f in reversed(frames):
            peer.write_frame(f["kind"], f["req"], target=0, parts=f["parts"])
        peer.read_frame()

    fc = fake(h)
    c = _ipmpi.Connection(fc.furl(), 5)
    errors = []

    def worker(i):
        try:
            payload = bytes([i]) * (i * 1000)
            rid = c.send(_ipmpi.K_APPLY, 0, [payload])
            (t, s, parts), = c.recv(rid, timeout=20)
            assert parts == [bytearray(payload)]
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    c.close()


# ---------------------------------------------------------------- MultiEngineClient over the fake

def engines(peer, handle, count=1):
    """Answers count requests as two engines 0 and 1 would."""
    for _ in range(count):
        f = peer.read_frame()
        for eid in (1, 0):
            status, parts = handle(f, eid)
            peer.write_frame(f["kind"], f["req"], target=eid, status=status, total=2, parts=parts)


def test_mec_execute_pull_and_errors_over_the_wire(fake, tmp_path):
    def h(peer):
        peer.hello()
        engines(peer, lambda f, eid: (0, [meta(eid, 1, f["parts"][0].decode(), "Hello World\n")]))
        engines(peer, lambda f, eid: (0, [meta(eid)] + _serialize.dumps([eid * 10])))
        engines(peer, lambda f, eid: (_ipmpi.EREMOTE, [meta(eid, etype="ZeroDivisionError",
                                                          evalue="division by zero", traceback="tb")])
                if eid == 1 else (0, [meta(eid)]))
        peer.read_frame()

    fc = fake(h)
    p = tmp_path / "ipcontroller-mec.furl"
    p.write_text(fc.furl() + "\n")
    p.chmod(0o600)
    with client.MultiEngineClient(str(p), timeout=10) as mec:
        r = mec.execute('print("Hello World")')
        assert repr(r).startswith('<Results List>\n[0] In [1]: print("Hello World")\n[0] Out[1]: Hello World\n')
        pending = mec.pull("a", block=False)
        assert pending.get_result() == [0, 10]
        with pytest.raises(client.CompositeError, match=r"\[1:execute\]: ZeroDivisionError") as ei:
            mec.execute("1/0")
        assert ei.value.results[0]["id"] == 0


def test_mec_refuses_a_tc_capability(fake):
    fc = fake(lambda peer: (peer.hello("tc"), peer.read_frame()))
    with pytest.raises(PermissionError, match="TaskClient"):
        client.MultiEngineClient(fc.furl())


def test_task_client_offers_only_what_works(fake):
    def h(peer):
        peer.hello("tc")
        f = peer.read_frame()
        assert f["kind"] == _ipmpi.K_GET_IDS
        peer.write_frame(f["kind"], f["req"], parts=[b"[0, 1, 2]"])
        peer.read_frame()

    fc = fake(h)
    tc = client.TaskClient(fc.furl())
    assert tc.get_ids() == [0, 1, 2]
    assert not hasattr(tc, "execute")
    tc.close()


# ---------------------------------------------------------------- IPython 0.10 forms (issue 8)

def test_result_dict_has_ipython_0_10s_keys_and_order():
    r = client._result_dict({"id": 3, "kind": "execute", "number": 5, "input": "d=10; print(d)",
                             "stdout": "10\n", "stderr": ""})
    assert str(r) == ("{'input': {'translated': 'd=10; print(d)', 'raw': 'd=10; print(d)'}, "
                      "'number': 5, 'id': 3, 'stdout': '10\\n'}")
    assert r["stderr"] == "" and "stderr" not in r
    with pytest.raises(KeyError):
        r["nope"]


def test_composite_error_prints_tracebacks_and_reraises_the_original_type(capsys):
    errs = [client.RemoteError(0, "ZeroDivisionError", "division by zero", "Traceback...\nZeroDivisionError\n",
                               {"etype": "ZeroDivisionError", "evalue": "division by zero",
                                "traceback": "Traceback...\nZeroDivisionError\n"}),
            client.DeadEngineError(_ipmpi.EDEAD, "engine 2 died", 2)]
    ce = client._composite(errs, [], "execute")
    assert str(ce) == ("one or more exceptions from call to method: execute\n"
                       "[0:execute]: ZeroDivisionError: division by zero\n"
                       "[2:execute]: DeadEngineError: engine 2 died (IPMPI_EDEAD)")
    ce.print_tracebacks()
    assert capsys.readouterr().out == ("[0:execute]: \nTraceback...\nZeroDivisionError\n\n"
                                       "[2:execute]: \nengine 2 died (IPMPI_EDEAD)\n\n")
    with pytest.raises(ZeroDivisionError):
        ce.raise_exception()
    with pytest.raises(client.DeadEngineError):
        ce.raise_exception(1)
    with pytest.raises(IndexError):
        ce.raise_exception(2)


def test_partition_refuses_unsized_iterables_and_keeps_sequence_types():
    with pytest.raises(TypeError, match="generator"):
        client._partition((x for x in range(3)), 2)
    assert client._partition(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert client._partition((1, 2, 3), 2) == [(1, 2), (3,)]


def test_map_chunk_runs_a_function_or_a_name():
    assert client._map_chunk(abs, [-1, 2], False) == [1, 2]
    assert client._map_chunk(lambda a, b: a * b, [(2, 3), (4, 5)], True) == [6, 20]
    assert client._map_chunk("abs", [-3], False) == [3]


def test_px_cell_options():
    from ipmpi import magic
    def args(line):
        d = magic._cell_args(line)
        return d["targets"], d["block"]

    assert args("") == (None, None)
    assert args("--targets 0,2 --noblock") == ([0, 2], False)
    assert args("--targets [1, 3]") == ([1, 3], None)
    assert args("--targets=all --block") == ("all", True)
    assert args("--targets 2") == (2, None)
    assert magic._cell_args("--stream --merge") == {"targets": None, "block": None, "stream": True, "merge": True}
    assert magic._cell_args("--no-stream")["stream"] is False
    for bad in ("--targets", "--targets nine", "--bogus"):
        with pytest.raises(ValueError):
            magic._cell_args(bad)


# ---------------------------------------------------------------- furl file permissions

class Listener:
    """A port that listens and never accepts: tells whether anyone connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)

    def furl(self):
        return "ipmpi+tls://%s@127.0.0.1:%d/%s" % ("a" * 64, self.sock.getsockname()[1], KEY)

    def connected(self):
        try:
            self.sock.accept()[0].close()
            return True
        except BlockingIOError:
            return False


def _furl_file(dirpath, text, mode, name="ipcontroller-mec.furl"):
    p = dirpath / name
    if p.exists():
        p.unlink()
    p.write_text(text + "\n")
    p.chmod(mode)
    return p


def _hello_only(peer):
    peer.hello()
    peer.read_frame()


@pytest.mark.parametrize("mode,words", [(0o644, "readable by group and others"), (0o640, "readable by group"),
                                        (0o604, "readable by others"), (0o622, "writable by group and others"),
                                        (0o610, "executable by group")])
def test_a_furl_file_others_may_read_is_refused_with_the_fix(tmp_path, mode, words):
    lis = Listener()
    p = _furl_file(tmp_path, lis.furl(), mode)
    for cls in (client.MultiEngineClient, client.TaskClient):
        with pytest.raises(PermissionError) as ei:
            cls(str(p), connect_timeout=5)
        msg = str(ei.value)
        assert words in msg and "mode %04o" % mode in msg, msg
        assert "chmod 600 %s" % p in msg, msg
    assert not lis.connected()     # refused before any connection was made


def test_a_private_furl_file_is_used_and_a_string_is_never_checked(fake, tmp_path):
    for mode in (0o600, 0o400):
        p = _furl_file(tmp_path, fake(_hello_only).furl(), mode)
        client.MultiEngineClient(str(p), connect_timeout=5).close()
    loose = _furl_file(tmp_path, fake(_hello_only).furl(), 0o644)
    m = client.MultiEngineClient(loose.read_text(), connect_timeout=5)   # the furl itself: no file to check
    assert m.get_ids is not None and m.tunnel is None
    m.close()


def test_a_loose_security_directory_is_refused_with_the_fix(fake, tmp_path, monkeypatch):
    lis = Listener()
    sec = tmp_path / "security"
    sec.mkdir(mode=0o700)
    p = _furl_file(sec, lis.furl(), 0o600)
    for mode, words in ((0o755, "readable by group and others"), (0o770, "readable and writable by group"),
                        (0o703, "writable by others")):
        sec.chmod(mode)
        with pytest.raises(PermissionError) as ei:
            client.MultiEngineClient(str(p), connect_timeout=5)
        msg = str(ei.value)
        assert "security directory %s" % sec in msg and words in msg and "chmod 700 %s" % sec in msg, msg
    assert not lis.connected()
    # The default furl ($IPMPI_DIR/security/...) is checked the same way.
    monkeypatch.setenv("IPMPI_DIR", str(tmp_path))
    sec.chmod(0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        client.MultiEngineClient(connect_timeout=5)
    assert not lis.connected()
    sec.chmod(0o711)    # others may pass through, but neither list nor replace: accepted
    _furl_file(sec, fake(_hello_only).furl(), 0o600)
    client.MultiEngineClient(connect_timeout=5).close()


def test_a_furl_inside_a_directory_others_may_write_without_sticky_bit_is_refused(fake, tmp_path, monkeypatch):
    # Whoever may write to a directory above the furl may put a furl, or a
    # whole profile directory, of theirs in its place (issue 13 audit).
    lis = Listener()
    ww = tmp_path / "shared"
    sec = ww / "prof" / "security"
    sec.mkdir(parents=True, mode=0o700)
    p = _furl_file(sec, lis.furl(), 0o600)
    loose = _furl_file(ww, lis.furl(), 0o600)
    for mode, who in ((0o777, "others"), (0o770, "its group")):
        ww.chmod(mode)
        for f in (p, loose):
            with pytest.raises(PermissionError) as ei:
                client.MultiEngineClient(str(f), connect_timeout=5)
            msg = str(ei.value)
            assert "is inside %s, which is writable by %s without the sticky bit (mode %04o)" % (ww, who, mode) \
                in msg, msg
            assert "chmod go-w %s" % ww in msg and "chmod +t %s" % ww in msg, msg
    assert not lis.connected()
    # The default furl ($IPMPI_DIR/security/...) is checked the same way.
    monkeypatch.setenv("IPMPI_DIR", str(ww / "prof"))
    with pytest.raises(PermissionError, match="without the sticky bit"):
        client.MultiEngineClient(connect_timeout=5)
    assert not lis.connected()
    ww.chmod(0o1777)    # sticky, as /tmp: only an entry's owner may rename it
    _furl_file(sec, fake(_hello_only).furl(), 0o600)
    client.MultiEngineClient(connect_timeout=5).close()


def test_a_furl_file_of_another_user_is_refused(tmp_path):
    # The suite runs as root (chown needs it); the check is the same for any uid.
    lis = Listener()
    p = _furl_file(tmp_path, lis.furl(), 0o600)
    os.chown(p, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        client.MultiEngineClient(str(p), connect_timeout=5)
    assert not lis.connected()


def test_sshserver_and_sshkey_are_checked_before_anything_runs(tmp_path):
    lis = Listener()
    p = _furl_file(tmp_path, lis.furl(), 0o600)
    for bad in ("", "-oProxyCommand=x", "a b", "host:port", "host:0", "u@[::1]x", "u@-x"):
        with pytest.raises(ValueError, match="sshserver"):
            client.MultiEngineClient(str(p), sshserver=bad, connect_timeout=5)
    with pytest.raises(ValueError, match="sshkey is for a tunnel"):
        client.MultiEngineClient(str(p), sshkey="/nonexistent", connect_timeout=5)
    with pytest.raises(FileNotFoundError, match="no key file"):
        client.TaskClient(str(p), sshserver="u@h", sshkey=str(tmp_path / "none"), connect_timeout=5)
    assert not lis.connected()


# ---------------------------------------------------------------- streamed output display

def test_output_printer_prefixes_each_line_and_keeps_partial_lines():
    import io
    from ipmpi import output
    out, err = io.StringIO(), io.StringIO()
    p = output.OutputPrinter("0.10", out=out, err=err)
    p.feed(0, "stdout", "a\nb")
    p.feed(1, "stderr", "oops\n")
    p.feed(0, "stdout", "c\n")
    assert out.getvalue() == "[0] a\n[0] bc\n"
    assert err.getvalue() == "[1] oops\n"
    p.feed(2, "stdout", "tail")
    p.close()
    assert out.getvalue().endswith("[2] tail\n")
    q = output.OutputPrinter("ipyparallel", out=out, err=err)
    q.feed(3, "stdout", "x\n")
    assert out.getvalue().endswith("[stdout:3] x\n")


def test_output_printer_merges_identical_lines_in_each_engines_order():
    import io
    from ipmpi import output
    out = io.StringIO()
    p = output.OutputPrinter("0.10", merge=True, engines=[0, 1, 2, 3], out=out)
    for e in (0, 1, 2):
        p.feed(e, "stdout", "Hello\n")
    assert out.getvalue() == ""          # engine 3 has not printed it yet
    p.feed(3, "stdout", "Hello\nHello\n")
    assert out.getvalue() == "[0-3] Hello\n"
    p.feed(0, "stdout", "only 0\n")
    p.close()
    # engine 3's second Hello and engine 0's line: shown at the end, in order
    assert out.getvalue() == "[0-3] Hello\n[3] Hello\n[0] only 0\n"
    assert output.id_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
