"""The controller refuses what it must and keeps serving everyone else.

Wrong keys, the task capability used for MultiEngine work, TLS 1.2, garbage,
oversized frames, silent clients and clients that vanish mid-request: each
is refused or dropped, and afterwards a good client is served and requests
that were queued before the bad client came still answer.
"""
import os
import socket
import ssl
import struct
import time

import pytest

from conftest import (E2BIG, EACCES, EPROTO, K_EXECUTE, K_GET_IDS, TARGET_ALL, TARGET_CONTROLLER,
                      closed_by_peer, frame, hello, parse_furl, read_frame, tls_connect)
from ipmpi import client


class Survivors:
    """Requests queued before a bad client acts; check() proves they were served."""

    def __init__(self, cluster, mec):
        self.cluster = cluster
        self.mec = mec
        self.tag = int(time.monotonic() * 1000) % 100000
        self.pending = mec.execute("import time; time.sleep(0.5); survivor = %d" % self.tag,
                                   targets=[0, 3], block=False)

    def check(self):
        res = self.pending.get_result(timeout=60)
        assert [x["id"] for x in res] == [0, 3]
        assert self.mec.pull("survivor", targets=[0, 3]) == [self.tag, self.tag]
        good = self.cluster.client(timeout=60)
        try:
            assert good.get_ids() == [0, 1, 2, 3]
            assert good.execute("print('served')", targets=2)[0]["stdout"] == "served\n"
        finally:
            good.close()


@pytest.fixture
def survivors(cluster4, mec):
    s = Survivors(cluster4, mec)
    yield s
    s.check()


def furl_text(path):
    with open(path) as f:
        return f.read().strip()


def test_wrong_key_is_refused_by_the_client_api(cluster4, survivors, tmp_path):
    text = furl_text(cluster4.mec_furl)
    key = text.rsplit("/", 1)[1]
    bad = text[: -len(key)] + ("0" if key[0] != "0" else "1") + key[1:]
    p = tmp_path / "bad.furl"
    p.write_text(bad + "\n")
    p.chmod(0o600)  # refused for its key, not for its mode
    with pytest.raises(PermissionError) as ei:
        client.MultiEngineClient(furl_file=str(p), timeout=30)
    assert "key" in str(ei.value), ei.value


def test_wrong_key_gets_eacces_and_the_connection_is_closed(cluster4, survivors):
    s = tls_connect(cluster4.mec_furl)
    try:
        kind, flags, req_id, target, status, total, parts = hello(s, "ab" * 32, req_id=77)
        assert flags & 1 and req_id == 77 and status == EACCES
        assert parts and parts[0]  # a message says why
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def test_request_before_hello_is_refused(cluster4, survivors):
    s = tls_connect(cluster4.mec_furl)
    try:
        s.sendall(frame(K_GET_IDS, 5))
        kind, flags, req_id, target, status, total, parts = read_frame(s)
        assert status == EACCES and req_id == 5
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def test_tc_furl_is_refused_by_multiengineclient(cluster4, survivors):
    with pytest.raises(PermissionError) as ei:
        client.MultiEngineClient(furl_file=cluster4.tc_furl, timeout=30)
    assert "tc" in str(ei.value) or "task" in str(ei.value).lower()


def test_tc_capability_gets_eacces_for_execute_and_stays_connected(cluster4, survivors):
    from ipmpi import _ipmpi
    conn = _ipmpi.Connection(furl_text(cluster4.tc_furl), 30.0)
    try:
        assert conn.capability == "tc"
        rid = conn.send(_ipmpi.K_EXECUTE, _ipmpi.TARGET_ALL, [b"x = 1"])
        replies = conn.recv(rid, 30.0)
        assert len(replies) == 1
        target, status, parts = replies[0]
        assert status == _ipmpi.EACCES
        # Refused, not dropped: the tc capability may still ask for ids.
        rid = conn.send(_ipmpi.K_GET_IDS, _ipmpi.TARGET_CONTROLLER, [])
        (target, status, parts), = conn.recv(rid, 30.0)
        assert status == 0 and bytes(parts[0]).replace(b" ", b"") == b"[0,1,2,3]"
    finally:
        conn.close()


def test_tls12_client_is_refused(cluster4, survivors):
    _fp, host, port, _key = parse_furl(cluster4.mec_furl)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection((host, port), timeout=10)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            s = ctx.wrap_socket(raw, server_hostname=host)
            # Should the handshake seem to pass, no byte may come back.
            s.sendall(b"x")
            if not s.recv(1):
                raise ConnectionError("closed")
    finally:
        raw.close()


def test_garbage_bytes_get_the_connection_closed(cluster4, survivors):
    s = tls_connect(cluster4.mec_furl)
    try:
        s.sendall(os.urandom(4096))
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def test_garbage_after_hello_gets_eproto_and_a_close(cluster4, survivors):
    _fp, _h, _p, key = parse_furl(cluster4.mec_furl)
    s = tls_connect(cluster4.mec_furl)
    try:
        assert hello(s, key)[4] == 0
        s.sendall(b"\xde\xad\xbe\xef" * 10)  # a 40-byte header with a bad magic
        s.settimeout(10)
        try:
            kind, flags, req_id, target, status, total, parts = read_frame(s)
            assert status == EPROTO
        except (ConnectionError, ssl.SSLError, OSError):
            pass  # closed without a reply: allowed when the stream cannot be trusted
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def test_oversized_frame_header_gets_e2big_and_a_close(cluster4, survivors):
    _fp, _h, _p, key = parse_furl(cluster4.mec_furl)
    s = tls_connect(cluster4.mec_furl)
    try:
        assert hello(s, key)[4] == 0
        # One part of 1 TiB announced: must be refused before any allocation.
        s.sendall(frame(K_EXECUTE, 9, target=TARGET_ALL, parts=(), lens=[1 << 40]))
        s.settimeout(10)
        try:
            kind, flags, req_id, target, status, total, parts = read_frame(s)
            assert status in (E2BIG, EPROTO)
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def test_too_many_parts_is_refused(cluster4, survivors):
    _fp, _h, _p, key = parse_furl(cluster4.mec_furl)
    s = tls_connect(cluster4.mec_furl)
    try:
        assert hello(s, key)[4] == 0
        head = struct.pack("<IBBHQiiIIQ", 0x504D5049, 1, K_EXECUTE, 0, 10, TARGET_ALL, 0, 0, 0xFFFFFFFF, 0)
        s.sendall(head)
        assert closed_by_peer(s, 10)
    finally:
        s.close()


def test_silent_clients_are_closed_and_do_not_block_others(cluster4, survivors):
    _fp, host, port, _key = parse_furl(cluster4.mec_furl)
    tcp_only = socket.create_connection((host, port), timeout=10)   # never starts TLS
    tls_only = tls_connect(cluster4.mec_furl)                       # never sends HELLO
    try:
        t0 = time.monotonic()
        good = cluster4.client(timeout=30)
        try:
            assert good.get_ids() == [0, 1, 2, 3]
        finally:
            good.close()
        assert time.monotonic() - t0 < 5
        # Protocol: no complete HELLO within 10 s -> closed.
        assert closed_by_peer(tls_only, 20)
        assert closed_by_peer(tcp_only, 20)
    finally:
        tcp_only.close()
        tls_only.close()


def test_client_vanishing_mid_frame_and_mid_request(cluster4, survivors):
    _fp, _h, _p, key = parse_furl(cluster4.mec_furl)
    # Mid-frame: announce 1 MB, send half, close.
    s = tls_connect(cluster4.mec_furl)
    assert hello(s, key)[4] == 0
    s.sendall(frame(K_EXECUTE, 3, target=TARGET_ALL, parts=(), lens=[1 << 20]) + b"#" * (1 << 19))
    s.close()
    # Mid-request: a long request queued, then the client goes away before the reply.
    s = tls_connect(cluster4.mec_furl)
    assert hello(s, key)[4] == 0
    s.sendall(frame(K_EXECUTE, 4, target=1, parts=[b"import time; time.sleep(1); orphan = 1"]))
    s.close()
    time.sleep(0.2)
    # Its request still ran on engine 1 (queued requests are not lost), and
    # its reply went nowhere without harm.
    m = cluster4.client(timeout=60)
    try:
        m.execute("pass", targets=1)  # queued behind the orphan: it ran first
        assert m.pull("orphan", targets=1) == [1]
    finally:
        m.close()


def test_controller_reply_frames_carry_the_request_id(cluster4, survivors):
    _fp, _h, _p, key = parse_furl(cluster4.mec_furl)
    s = tls_connect(cluster4.mec_furl)
    try:
        kind, flags, req_id, target, status, total, parts = hello(s, key, req_id=1234)
        assert (kind, req_id, status) == (1, 1234, 0)
        import json
        info = json.loads(parts[0])
        assert info["capability"] == "mec" and info["engines"] == 4 and info["version"] == 1
        s.sendall(frame(K_GET_IDS, 99))
        kind, flags, req_id, target, status, total, parts = read_frame(s)
        assert (kind, req_id, target, status, total) == (K_GET_IDS, 99, TARGET_CONTROLLER, 0, 1)
        assert json.loads(parts[0]) == [0, 1, 2, 3]
    finally:
        s.close()

