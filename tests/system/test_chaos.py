"""Chaos: many adversarial clients at once against one real cluster.

The standard (DESIGN.md section 2, doc/protocol.md section 1): bad input gets
a clear error and loses nothing, and the controller never crashes because of
what a client or an engine sent. Here several threads act as hostile clients
over real TLS for a bounded time, each drawing from a seeded random mix:
valid requests of every kind with random targets (ids, ALL, lists with
duplicates, out-of-range, negative, empty, odd-sized and huge lists),
truncated frames, frames whose length table lies, zero-part frames, HELLO
twice, requests before HELLO, the task capability sending MultiEngine kinds,
reply-flagged frames, READY and EXIT from a client, disconnects at every
stage (mid-header, mid-parts, with requests queued, while a big push
streams), clients that never read their replies, slowloris clients that
dribble one byte at a time, clear_queue racing with dispatch, and user code
that raises, calls sys.exit() or sleeps. One engine is killed on purpose
(a segfault in user code).

Meanwhile two well-behaved clients keep checking values: a raw one that
counts replies (every request gets exactly one reply per target, never a
duplicate, never a stray one) and the real MultiEngineClient. At the end the
controller process is alive, get_ids lists every engine but the one killed
on purpose, the logs hold no crash or sanitizer report, and `ipcluster stop`
stops the whole job.

Contract violations the adversaries see in replies they read (a wrong
status for a bad target list, a reply that never comes) are collected and
reported together at the end, with the seed, so a failure can be replayed:
IPMPI_CHAOS_SEED and IPMPI_CHAOS_SECONDS override the defaults.
"""
import collections
import json
import operator
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from conftest import (HDR, MAGIC, PYTHON, VERSION, child_env, closed_by_peer, controller_pid, frame, job_processes,
                      parse_furl, proc_status_kb, read_frame, running_cluster, tls_connect, wait_for)
from ipmpi import _ipmpi as C
from ipmpi import _serialize, client

SEED = int(os.environ.get("IPMPI_CHAOS_SEED", "20261125"))
SECONDS = float(os.environ.get("IPMPI_CHAOS_SECONDS", "20"))
NENGINES = 4
VICTIM = 3                 # killed on purpose; the good clients never name it
GOOD = [0, 1, 2]
ADVERSARIES = 6
IO_TIMEOUT = 20.0          # longest wait for any one reply
# Errors that only mean "the controller closed this connection", which
# many adversaries provoke on purpose.
GONE = (OSError, ConnectionError, ssl.SSLError, socket.timeout, AssertionError, struct.error)

ENGINE_KINDS = [C.K_EXECUTE, C.K_PUSH, C.K_PULL, C.K_APPLY, C.K_RESET, C.K_KEYS, C.K_GET_RESULT]
CTL_KINDS = [C.K_QUEUE_STATUS, C.K_CLEAR_QUEUE, C.K_GET_IDS, C.K_PROPERTIES]


# ---------------------------------------------------------------- raw sessions

class Raw:
    """One raw TLS connection speaking the wire protocol (conftest's frames)."""

    def __init__(self, furl, timeout=IO_TIMEOUT):
        self.s = tls_connect(furl, timeout=timeout)
        self.s.settimeout(timeout)
        self.next_id = 1
        self.early = []   # frames read while waiting for another request

    def rid(self):
        r = self.next_id
        self.next_id += 1
        return r

    def send(self, kind, target=C.TARGET_ALL, parts=(), tlist=None, flags=0, req_id=None):
        if tlist is not None:
            parts = [tlist] + list(parts)
            target = C.TARGET_LIST
        rid = self.rid() if req_id is None else req_id
        self.s.sendall(frame(kind, rid, target, parts, flags=flags))
        return rid

    def hello(self, key):
        rid = self.send(C.K_HELLO, C.TARGET_CONTROLLER, [key.encode()])
        return self.one(rid)

    def read(self):
        return read_frame(self.s)

    def collect(self, rids, timeout=IO_TIMEOUT, problems=None, what=""):
        """Reads until every request of rids has all its replies ({rid: [(target, status, parts)]}).
        Records a problem for a duplicate target, an unknown req_id, a
        missing reply flag or a total that changes between replies."""
        want = {r: None for r in rids}
        got = {r: [] for r in rids}
        deadline = time.monotonic() + timeout

        def done():
            return all(want[r] is not None and len(got[r]) >= want[r] for r in rids)

        pending = list(self.early)
        self.early = []
        while not done():
            if pending:
                fr = pending.pop(0)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = {r: (len(got[r]), want[r]) for r in rids if not (want[r] and len(got[r]) >= want[r])}
                    raise TimeoutError("%s: replies missing after %g s (got, total): %s" % (what, timeout, missing))
                self.s.settimeout(left)
                fr = self.read()
            kind, flags, req_id, target, status, total, parts = fr
            if req_id not in got:
                self.early.append(fr)
                continue
            if problems is not None:
                if not flags & C.F_REPLY:
                    problems.append("%s: reply to req %d without the reply flag" % (what, req_id))
                if want[req_id] is not None and want[req_id] != total:
                    problems.append("%s: req %d: total changed %s -> %s" % (what, req_id, want[req_id], total))
                if target >= 0 and any(t == target for t, _s, _p in got[req_id]):
                    problems.append("%s: req %d: two replies from engine %d" % (what, req_id, target))
            want[req_id] = max(total, 1)
            got[req_id].append((target, status, parts))
        return got

    def one(self, rid, timeout=IO_TIMEOUT):
        """(target, status, parts) of the first reply to rid."""
        return self.collect([rid], timeout)[rid][0]

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def closed_soon(raw, timeout=10.0):
    """True if the controller closes raw within timeout (frames before the close are skipped)."""
    return closed_by_peer(raw.s, timeout)


def tlist(ids):
    return struct.pack("<%di" % len(ids), *ids)


# ---------------------------------------------------------------- the world

class World:
    """What every actor shares: furls, keys, the deadline, the findings."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.mec_furl = cluster.mec_furl
        self.tc_furl = cluster.tc_furl
        self.mec_key = parse_furl(cluster.mec_furl)[3]
        self.tc_key = parse_furl(cluster.tc_furl)[3]
        self.t0 = time.monotonic()
        self.deadline = self.t0 + SECONDS
        self.victim_dead = threading.Event()
        self.lock = threading.Lock()
        self.problems = []     # contract violations: the test fails on any
        self.counts = {}       # what each actor did, for the report

    def problem(self, msg):
        with self.lock:
            if len(self.problems) < 200:
                self.problems.append(msg)

    def count(self, name, n=1):
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def running(self):
        return time.monotonic() < self.deadline

    def mec(self):
        r = Raw(self.mec_furl)
        status = r.hello(self.mec_key)[1]
        if status != 0:
            r.close()
            raise AssertionError("HELLO with the mec key refused: %d" % status)
        return r


# ---------------------------------------------------------------- adversaries

USER_CODE = [
    "adv_x = %d",
    "print(%d)",
    "raise ValueError('chaos %d')",
    "import sys; sys.exit(%d)",
    "import time; time.sleep(0.0%d)",
    "%d / 0",
    "def (:  # %d",
    "raise KeyboardInterrupt(%d)",
    "print('x' * 200000)  # %d",
    "import sys; sys.stderr.write('e' * %d)",
]


def engine_payload(rng, kind):
    """A valid payload for an engine kind, user code of every temper included."""
    if kind == C.K_EXECUTE:
        return [(rng.choice(USER_CODE) % rng.randrange(10)).encode()]
    if kind == C.K_PUSH:
        v = rng.choice([rng.randrange(1000), "s" * rng.randrange(100), bytes(rng.randrange(70000, 300000))])
        return _serialize.dumps({"adv_%d" % rng.randrange(4): v})
    if kind == C.K_PULL:
        return _serialize.dumps(rng.choice([["adv_x"], ["adv_0", "adv_1"], ["nope"], "adv_2", 17]))
    if kind == C.K_APPLY:
        return _serialize.dumps(rng.choice([(operator.add, (2, 3), {}), (int, ("zz",), {}),
                                            (divmod, (7, 0), {}), (bytes, (rng.randrange(100000),), {})]))
    if kind == C.K_GET_RESULT:
        return _serialize.dumps(rng.choice([None, 1, 10 ** 9, "x"]))
    return []


def random_target(rng, kind):
    """(target, tlist bytes or None, expected controller refusal or None)."""
    if kind == C.K_RESET:
        # Resets spare engine 0: the good clients keep their names there.
        ids = rng.sample([1, 2, 3], rng.randrange(1, 4))
        return (ids[0], None, None) if len(ids) == 1 and rng.random() < 0.5 else (C.TARGET_LIST, tlist(ids), None)
    engine_kind = kind in ENGINE_KINDS
    r = rng.randrange(12)
    if r == 0:
        return rng.randrange(NENGINES), None, None
    if r == 1:
        return C.TARGET_ALL, None, None
    if r == 2:
        return C.TARGET_LIST, tlist(rng.sample(range(NENGINES), rng.randrange(1, NENGINES + 1))), None
    if kind == C.K_GET_IDS:
        # GET_IDS takes no target: whatever comes is ignored.
        return rng.choice([C.TARGET_CONTROLLER, 7, -9]), None, None
    if r == 3:
        i = rng.randrange(NENGINES)
        return C.TARGET_LIST, tlist([i, rng.randrange(NENGINES), i]), C.EPROTO
    if r == 4:
        return C.TARGET_LIST, tlist([0, rng.choice([4, 5, 1000, 2 ** 31 - 1])]), C.ENOENT
    if r == 5:
        return C.TARGET_LIST, tlist([rng.choice([-1, -3, -2 ** 31]), 1]), C.ENOENT
    if r == 6:
        return C.TARGET_LIST, b"", C.EPROTO
    if r == 7:
        return C.TARGET_LIST, bytes(rng.choice([1, 3, 5, 7, 9])), C.EPROTO
    if r == 8:
        return C.TARGET_LIST, tlist([0] * rng.choice([5, 1000, 100000])), C.ENOENT
    if r == 9:
        return rng.choice([NENGINES, 1000, 2 ** 31 - 1]), None, C.ENOENT
    if r == 10:
        return rng.choice([-4, -100, -2 ** 31]), None, C.ENOENT
    # The controller target: engine kinds have no engine to go to.
    return C.TARGET_CONTROLLER, None, (C.ENOENT if engine_kind else None)


def send_random(w, rng, raw):
    """Sends one random request; returns (rid, kind, expected refusal)."""
    kind = rng.choice(ENGINE_KINDS + CTL_KINDS)
    target, tl, expect = random_target(rng, kind)
    parts = engine_payload(rng, kind) if kind in ENGINE_KINDS else []
    if tl is not None:
        parts = [tl] + list(parts)
    rid = raw.rid()
    raw.s.sendall(frame(kind, rid, target, parts))
    return rid, kind, expect


def check_replies(w, what, sent, got):
    for rid, kind, expect in sent:
        reps = got[rid]
        statuses = sorted(set(s for _t, s, _p in reps))
        if expect is not None:
            if [s for _t, s, _p in reps] != [expect]:
                w.problem("%s: kind %d: expected one %s reply, got %s" % (what, kind, C.errname(expect), statuses))
            continue
        bad = [s for s in statuses if s not in (0, C.EREMOTE, C.EABORTED, C.EDEAD)]
        if bad:
            msgs = [bytes(p[0])[:120] for _t, s, p in reps if s in bad and p]
            w.problem("%s: kind %d: unexpected statuses %s %s" % (what, kind, bad, msgs))


def act_valid_mix(w, rng):
    """Pipelined random requests; read them all, or go away at some point."""
    raw = w.mec()
    try:
        sent = [send_random(w, rng, raw) for _ in range(rng.randrange(1, 12))]
        how = rng.random()
        if how < 0.25:
            w.count("left with requests queued")
            return
        if how < 0.4:
            raw.read()
            w.count("left after one reply")
            return
        got = raw.collect([s[0] for s in sent], problems=w.problems, what="valid mix")
        check_replies(w, "valid mix", sent, got)
        w.count("valid requests answered", len(sent))
    finally:
        raw.close()


def act_refusals(w, rng):
    """Requests the controller must refuse with a reply and no close."""
    raw = w.mec()
    try:
        cases = [
            (C.K_READY, C.TARGET_CONTROLLER, 0, C.EKIND),
            (C.K_EXIT, rng.randrange(NENGINES), 0, C.EKIND),
            (C.K_EXECUTE, C.TARGET_ALL, C.F_REPLY, C.EKIND),
            (C.K_GET_IDS, C.TARGET_CONTROLLER, C.F_REPLY, C.EKIND),
            (C.K_TASK_SUBMIT, C.TARGET_CONTROLLER, 0, C.EACCES),
        ]
        rng.shuffle(cases)
        for kind, target, flags, expect in cases:
            rid = raw.send(kind, target, [b"x = 1"] if kind == C.K_EXECUTE else [], flags=flags)
            t, status, parts = raw.one(rid)
            if status != expect:
                w.problem("refusals: kind %d flags %d: expected %s, got %s" % (kind, flags, C.errname(expect),
                                                                             C.errname(status)))
        rid = raw.send(C.K_GET_IDS, C.TARGET_CONTROLLER)
        t, status, parts = raw.one(rid)
        if status != 0:
            w.problem("refusals: the connection did not stay usable: get_ids status %d" % status)
        w.count("refusals")
    finally:
        raw.close()


def act_tc(w, rng):
    """The task capability asking for MultiEngine work: EACCES each, connection stays open."""
    raw = Raw(w.tc_furl)
    try:
        if raw.hello(w.tc_key)[1] != 0:
            w.problem("tc: HELLO refused")
            return
        kinds = rng.sample(ENGINE_KINDS + [C.K_CLEAR_QUEUE, C.K_KILL, C.K_SHUTDOWN], 4)
        for kind in kinds:
            rid = raw.send(kind, C.TARGET_ALL, engine_payload(rng, kind))
            t, status, parts = raw.one(rid)
            if status != C.EACCES:
                w.problem("tc: kind %d: expected EACCES, got %s" % (kind, C.errname(status)))
        rid = raw.send(C.K_QUEUE_STATUS, C.TARGET_ALL)
        if raw.one(rid)[1] != 0:
            w.problem("tc: queue_status refused after the refusals")
        w.count("tc refusals")
    finally:
        raw.close()


def act_hello_games(w, rng):
    g = rng.randrange(6)
    if g == 0:
        # A request before HELLO: EACCES, then the connection is closed.
        raw = Raw(w.mec_furl)
        try:
            raw.send(rng.choice([C.K_GET_IDS, C.K_EXECUTE, C.K_SHUTDOWN]), C.TARGET_ALL, [b"x"])
            kind, flags, req_id, target, status, total, parts = raw.read()
            if status != C.EACCES:
                w.problem("before HELLO: expected EACCES, got %s" % C.errname(status))
            if not closed_soon(raw):
                w.problem("before HELLO: connection not closed")
        finally:
            raw.close()
    elif g in (1, 2, 3):
        # A second HELLO on an authenticated session -- the same key, the tc
        # key, or a wrong one -- is refused with EINVAL; the session keeps
        # the capability it opened with and stays open (doc/protocol.md s1).
        raw = w.mec()
        try:
            second = {1: w.mec_key, 2: w.tc_key, 3: "0" * 64}[g]
            st = raw.hello(second)[1]
            if st != C.EINVAL:
                w.problem("second HELLO (%s) got %s, not EINVAL" % (("mec", "tc", "wrong")[g - 1], C.errname(st)))
            rid = raw.send(C.K_EXECUTE, C.TARGET_ALL, [b"y = 1"])
            st = raw.one(rid)[1]
            if st not in (0, C.EABORTED):
                w.problem("execute after a refused second HELLO got %s" % C.errname(st))
        finally:
            raw.close()
    elif g == 4:
        # HELLO without parts, or with two, as the first frame.
        raw = Raw(w.mec_furl)
        try:
            parts = rng.choice([[], [w.mec_key.encode(), b"more"]])
            raw.send(C.K_HELLO, C.TARGET_CONTROLLER, parts)
            if raw.read()[4] != C.EACCES or not closed_soon(raw):
                w.problem("malformed first HELLO not refused and closed")
        finally:
            raw.close()
    else:
        # An authenticated session sends HELLO without a part.
        raw = w.mec()
        try:
            rid = raw.send(C.K_HELLO, C.TARGET_CONTROLLER, [])
            raw.one(rid)
        except GONE:
            pass
        finally:
            raw.close()
    w.count("hello games")


def act_malformed(w, rng):
    """Frames the stream cannot carry on after, and frames that lie."""
    raw = w.mec()
    try:
        g = rng.randrange(8)
        body = b"print('lies')"
        if g == 0:  # truncated header, then gone
            raw.s.sendall(frame(C.K_EXECUTE, 1, C.TARGET_ALL, [body])[: rng.randrange(1, 40)])
        elif g == 1:  # truncated length table, then gone
            f = frame(C.K_PUSH, 1, C.TARGET_ALL, [b"a", b"b", b"c"])
            raw.s.sendall(f[: rng.randrange(41, 40 + 24)])
        elif g == 2:  # the length table promises more than follows, then gone
            raw.s.sendall(frame(C.K_EXECUTE, 1, C.TARGET_ALL, [body], lens=[len(body) + rng.randrange(1, 1 << 20)]))
        elif g == 3:  # the length table says less: the rest is read as the next header
            raw.s.sendall(frame(C.K_EXECUTE, 1, 0, [body], lens=[len(body) - 5]) + b"\x00" * 40)
            closed_soon(raw, 10)
        elif g == 4:  # zero-part frames for kinds that need parts: each engine answers
            kinds = rng.sample([C.K_EXECUTE, C.K_PUSH, C.K_PULL, C.K_APPLY, C.K_GET_RESULT], 3)
            sent = [(raw.send(k, rng.choice([C.TARGET_ALL, 0, 1])), k, None) for k in kinds]
            got = raw.collect([s[0] for s in sent], problems=w.problems, what="zero-part")
            check_replies(w, "zero-part", sent, got)
        elif g == 5:  # bad magic, version, kind after a good request
            rid = raw.send(C.K_GET_IDS, C.TARGET_CONTROLLER)
            head = bytearray(HDR.pack(MAGIC, VERSION, C.K_GET_IDS, 0, 2, -2, 0, 0, 0, 0))
            pos, val = rng.choice([(0, 0x11), (4, 9), (5, 0), (5, 99), (5, 200)])
            head[pos] = val
            raw.s.sendall(bytes(head))
            raw.one(rid)
            if not closed_soon(raw, 10):
                w.problem("malformed: a bad header (byte %d = %d) did not close the connection" % (pos, val))
        elif g == 6:  # too many parts / a part over the limit
            if rng.random() < 0.5:
                nparts = rng.choice([4097, 65537, 2 ** 32 - 1])
                raw.s.sendall(HDR.pack(MAGIC, VERSION, C.K_EXECUTE, 0, 3, -1, 0, 0, nparts, 0))
            else:
                raw.s.sendall(frame(C.K_PUSH, 3, C.TARGET_ALL, [], lens=[rng.choice([1 << 33, 1 << 40, 2 ** 64 - 1])]))
            if not closed_soon(raw, 10):
                w.problem("malformed: an oversized frame did not close the connection")
        else:  # random bytes after a good HELLO
            raw.s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
            closed_soon(raw, 10)
        w.count("malformed frames")
    except GONE:
        pass
    finally:
        raw.close()


def act_disconnects(w, rng):
    """Going away at the worst moments."""
    raw = w.mec()
    try:
        g = rng.randrange(4)
        if g == 0:  # mid-parts of a big push to all engines
            payload = _serialize.dumps({"adv_big": bytes(4 << 20)})
            f = frame(C.K_PUSH, 1, C.TARGET_ALL, payload)
            raw.s.sendall(f[: rng.randrange(100, len(f))])
        elif g == 1:  # a complete big push, then gone before the replies
            raw.send(C.K_PUSH, C.TARGET_ALL, _serialize.dumps({"adv_big": bytes(4 << 20)}))
        elif g == 2:  # requests queued, then mid-header of the next one
            for _ in range(rng.randrange(1, 6)):
                send_random(w, rng, raw)
            raw.s.sendall(frame(C.K_EXECUTE, 99, 0, [b"x"])[: rng.randrange(1, 40)])
        else:  # a sleeping request, then gone: it still runs
            raw.send(C.K_EXECUTE, rng.randrange(NENGINES), [b"import time; time.sleep(0.2)"])
        w.count("disconnects")
    finally:
        raw.close()


def act_no_reader(w, rng):
    """Never reads: the controller must buffer, not block the others."""
    raw = w.mec()
    try:
        raw.send(C.K_PUSH, C.TARGET_ALL, _serialize.dumps({"adv_big": bytes(1 << 20)}))
        for _ in range(rng.randrange(5, 25)):
            raw.send(C.K_PULL, rng.choice([C.TARGET_ALL, 1, 2]), _serialize.dumps(["adv_big"]))
        time.sleep(rng.uniform(0.5, 2.0))
        w.count("clients that never read")
    finally:
        raw.close()


def act_slowloris(w, rng):
    """HELLO and a request one byte at a time, then a correct answer."""
    raw = Raw(w.mec_furl)
    try:
        data = frame(C.K_HELLO, 1, C.TARGET_CONTROLLER, [w.mec_key.encode()])
        data += frame(C.K_GET_IDS, 2, C.TARGET_CONTROLLER)
        for i in range(len(data)):
            raw.s.sendall(data[i:i + 1])
            time.sleep(0.01)
        got = raw.collect([1, 2], problems=w.problems, what="slowloris")
        if got[1][0][1] != 0 or got[2][0][1] != 0:
            w.problem("slowloris: HELLO/GET_IDS sent one byte at a time refused")
        w.count("slowloris")
    finally:
        raw.close()


def act_clear_race(w, rng):
    """Sleeps queued on an engine and a clear_queue right behind them."""
    raw = w.mec()
    try:
        e = rng.randrange(NENGINES)
        sent = [(raw.send(C.K_EXECUTE, e, [b"import time; time.sleep(0.02)"]), C.K_EXECUTE, None)
                for _ in range(rng.randrange(2, 8))]
        clr = raw.send(C.K_CLEAR_QUEUE, rng.choice([e, C.TARGET_ALL]))
        got = raw.collect([s[0] for s in sent] + [clr], problems=w.problems, what="clear race")
        check_replies(w, "clear race", sent, got)
        t, status, parts = got[clr][0]
        # Other adversaries clear queues too, so only the form of the answer is checked.
        if status != 0 or "cleared" not in json.loads(bytes(parts[0])):
            w.problem("clear race: clear_queue answered %s %r" % (C.errname(status), bytes(parts[0])[:100]))
        w.count("clear_queue races")
    finally:
        raw.close()


def act_connect_flood(w, rng):
    """Connections that never say HELLO, or never finish TLS."""
    _fp, host, port, _key = parse_furl(w.mec_furl)
    socks = []
    try:
        for _ in range(rng.randrange(5, 30)):
            if rng.random() < 0.5:
                socks.append(socket.create_connection((host, port), timeout=10))
            else:
                socks.append(tls_connect(w.mec_furl))
        time.sleep(rng.uniform(0, 0.5))
        w.count("connect floods")
    finally:
        for s in socks:
            s.close()


ACTIONS = [
    (act_valid_mix, 8), (act_refusals, 2), (act_tc, 2), (act_hello_games, 3), (act_malformed, 4),
    (act_disconnects, 3), (act_no_reader, 1), (act_slowloris, 1), (act_clear_race, 3), (act_connect_flood, 1),
]


def adversary(w, seed):
    rng = random.Random(seed)
    acts = [a for a, _ in ACTIONS]
    weights = [n for _, n in ACTIONS]
    while w.running():
        act = rng.choices(acts, weights)[0]
        try:
            act(w, rng)
        except TimeoutError as e:
            w.problem("%s: %s" % (act.__name__, e))
        except GONE as e:
            # Closed by the controller where the action did not expect it.
            w.count("%s: connection lost (%s)" % (act.__name__, type(e).__name__))
        except Exception as e:  # a bug of this test: fail loudly, not silently
            w.problem("%s raised %r" % (act.__name__, e))


def killer(w):
    """Kills the victim engine with a segfault in user code, a third of the way in."""
    time.sleep(SECONDS / 3)
    raw = w.mec()
    try:
        # An adversary's clear_queue may abort the request before it runs: try again.
        for _ in range(10):
            rid = raw.send(C.K_EXECUTE, VICTIM, [b"import ctypes; ctypes.string_at(0)"])
            t, status, parts = raw.one(rid, timeout=30)
            if status != C.EABORTED:
                break
        if status != C.EDEAD:
            w.problem("victim: segfault answered %s, not EDEAD" % C.errname(status))
    except Exception as e:
        w.problem("victim: %r" % (e,))
    finally:
        w.victim_dead.set()
        raw.close()


# ---------------------------------------------------------------- good clients

def good_accountant(w, seed, stats):
    """A raw client that keeps a ledger: each request gets exactly one reply
    per target engine, with the right value, and nothing else arrives."""
    rng = random.Random(seed)
    raw = w.mec()
    n = 0
    try:
        while w.running():
            batch = {}
            for _ in range(rng.randrange(1, 8)):
                n += 1
                ids = rng.choice([[0], [1], [2], GOOD, [2, 0], [1, 2]])
                tl = None if len(ids) == 1 else tlist(ids)
                target = ids[0] if tl is None else C.TARGET_LIST
                op = rng.randrange(4)
                reqs = []
                if op == 0:
                    reqs.append((C.K_EXECUTE, ids, target, tl, [("print(%d * 3)" % n).encode()],
                                 ("stdout", "%d\n" % (n * 3))))
                elif op == 1:
                    reqs.append((C.K_APPLY, ids, target, tl, _serialize.dumps((pow, (n, 3), {})), ("value", n ** 3)))
                elif op == 2:
                    # A push and the pull of the same name, in order on engine 0's queue.
                    reqs.append((C.K_PUSH, [0], 0, None, _serialize.dumps({"good_%d" % n: n}), ("push", n)))
                    reqs.append((C.K_PULL, [0], 0, None, _serialize.dumps(["good_%d" % n]), ("pull", n)))
                else:
                    reqs.append((C.K_QUEUE_STATUS, ids, target, tl, [], ("queue", ids)))
                for kind, rids_ids, tgt, tlb, parts, expect in reqs:
                    if tlb is not None:
                        parts = [tlb] + list(parts)
                    rid = raw.rid()
                    raw.s.sendall(frame(kind, rid, tgt, parts))
                    batch[rid] = (kind, rids_ids, expect)
            got = raw.collect(list(batch), problems=w.problems, what="good client")
            for rid, (kind, ids, expect) in batch.items():
                check_good(w, stats, rid, kind, ids, expect, got[rid])
        # Nothing may arrive beyond the ledger: wait a little for strays.
        raw.s.settimeout(1.0)
        try:
            fr = raw.read()
            w.problem("good client: a stray reply after all requests were answered: %r" % (fr[:6],))
        except (socket.timeout, TimeoutError):
            pass
    except Exception as e:
        w.problem("good client: %r" % (e,))
    finally:
        raw.close()


def check_good(w, stats, rid, kind, ids, expect, reps):
    what, val = expect
    stats["requests"] += 1
    if kind == C.K_QUEUE_STATUS:
        if len(reps) != 1 or reps[0][1] != 0:
            w.problem("good client: queue_status %s: %s" % (ids, [(t, s) for t, s, _p in reps]))
            return
        got = json.loads(bytes(reps[0][2][0]))
        if sorted(d["id"] for d in got) != sorted(ids):
            w.problem("good client: queue_status for %s listed %s" % (ids, got))
        stats["ok"] += 1
        return
    targets = sorted(t for t, _s, _p in reps)
    if targets != sorted(ids):
        w.problem("good client: req %d kind %d for %s got replies from %s" % (rid, kind, ids, targets))
        return
    for t, status, parts in reps:
        if status == C.EABORTED:
            stats["aborted"] += 1
            if what == "push":
                stats["aborted_push"].add(val)
            continue
        if what == "pull" and val in stats["aborted_push"] and status == C.EREMOTE:
            continue  # its push was cleared away by an adversary's clear_queue
        if status != 0:
            meta = _serialize.loads(parts[:1]) if status == C.EREMOTE and parts else {}
            why = (meta.get("etype"), meta.get("evalue")) if meta else bytes(parts[0])[:200] if parts else b""
            w.problem("good client: req %d kind %d engine %d: status %s %s" % (rid, kind, t, C.errname(status), why))
            continue
        meta = _serialize.loads(parts[:1])
        if meta.get("id", t) != t:  # engines leave the id to the header
            w.problem("good client: reply says engine %s, header %d" % (meta.get("id"), t))
        if what == "stdout" and meta.get("stdout") != val:
            w.problem("good client: engine %d printed %r, not %r" % (t, meta.get("stdout"), val))
        elif what == "value" and _serialize.loads(parts[1:]) != val:
            w.problem("good client: engine %d returned %r, not %r" % (t, _serialize.loads(parts[1:]), val))
        elif what == "pull" and _serialize.loads(parts[1:]) != [val]:
            w.problem("good client: pulled %r, not [%r]" % (_serialize.loads(parts[1:]), val))
        stats["ok"] += 1


def good_mec(w, stats):
    """The real client: map, scatter/gather and numpy push/pull with values checked."""
    import numpy
    mec = client.MultiEngineClient(furl_file=w.mec_furl, timeout=60)
    k = 0
    try:
        while w.running():
            k += 1
            try:
                op = k % 3
                if op == 0:
                    seq = list(range(-k, k + 5))
                    assert mec.map(abs, seq, targets=GOOD) == [abs(x) for x in seq]
                elif op == 1:
                    mec.scatter("good_s", list(range(k, k + 9)), targets=[0])
                    assert mec.gather("good_s", targets=[0]) == list(range(k, k + 9))
                else:
                    a = numpy.arange(k, k + 40000, dtype=numpy.int64)   # 320 KB: out of band
                    mec.push({"good_a": a}, targets=0)
                    assert numpy.array_equal(mec.pull("good_a", targets=0)[0], a)
                stats["mec ok"] += 1
            except client.AbortedError:
                stats["mec aborted"] += 1
            except client.CompositeError as e:
                if not all(isinstance(x, client.AbortedError) for x in e.errors):
                    raise
                stats["mec aborted"] += 1
            except client.RemoteError as e:
                # A pull right after a push that clear_queue removed.
                if e.etype != "NameError":
                    raise
                stats["mec aborted"] += 1
    except Exception as e:
        w.problem("MultiEngineClient: %r" % (e,))
    finally:
        mec.close()


# ---------------------------------------------------------------- the test

def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def crash_lines(cluster, ctl_pid):
    """Lines of the logs that show a crash or a sanitizer report of the
    controller (the victim engine's own segfault report is expected)."""
    bad = []
    pat = re.compile(r"AddressSanitizer|LeakSanitizer|runtime error:|Segmentation fault|double free|"
                     r"corrupted|stack smashing|Assertion .* failed|Aborted|signal \d+")
    for name in sorted(os.listdir(cluster.log_dir)):
        if name.startswith("ipengine-%d-" % VICTIM):
            continue
        with open(os.path.join(cluster.log_dir, name), errors="replace") as f:
            for line in f:
                # Every sanitizer report opens with a "==PID==ERROR" line,
                # checked below; its SUMMARY line names no process.
                if not pat.search(line) or line.startswith("SUMMARY:"):
                    continue
                # The victim's report in mpirun's log names its own pid, not the controller's.
                m = re.match(r"==(\d+)==", line)
                if m and int(m.group(1)) != ctl_pid:
                    continue
                if "rank %d" % (VICTIM + 1) in line or "engine %d" % VICTIM in line:
                    continue
                bad.append("%s: %s" % (name, line.rstrip()))
    return bad


def ipcluster_stop(ipmpi_dir):
    """`ipcluster stop` as the user runs it, from the client's package: with
    IPMPI_TEST_BIN the build beside ipmpi is a sanitizer build, whose
    Python extension cannot load into a plain interpreter."""
    code = "import sys; from ipmpi import cluster; sys.exit(cluster.main(sys.argv[1:]))"
    return subprocess.run([PYTHON, "-c", code, "stop", "--timeout", "30", "--ipmpi-dir", ipmpi_dir],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=90, env=child_env())


@pytest.fixture
def chaos_cluster():
    yield from running_cluster(NENGINES)


def test_adversarial_clients_do_not_hurt_the_controller_or_a_good_client(chaos_cluster):
    c = chaos_cluster
    ctl = controller_pid(c)
    w = World(c)
    stats = {"requests": 0, "ok": 0, "aborted": 0, "aborted_push": set(), "mec ok": 0, "mec aborted": 0}
    threads = [threading.Thread(target=adversary, args=(w, SEED * 100 + i), name="adv%d" % i, daemon=True)
               for i in range(ADVERSARIES)]
    threads.append(threading.Thread(target=killer, args=(w,), name="killer", daemon=True))
    threads.append(threading.Thread(target=good_accountant, args=(w, SEED, stats), name="good", daemon=True))
    threads.append(threading.Thread(target=good_mec, args=(w, stats), name="good-mec", daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, w.deadline - time.monotonic()) + 90)
    hung = [t.name for t in threads if t.is_alive()]
    report = "seed %d, %g s; counts %s; good %s" % (
        SEED, SECONDS, sorted(w.counts.items()), {k: v for k, v in stats.items() if k != "aborted_push"})
    print(report)

    assert not hung, "actors still waiting after the run (a reply never came): %s\n%s" % (hung, report)
    assert alive(ctl), "the controller (pid %d) died\n%s" % (ctl, "\n".join(crash_lines(c, ctl)[:40]))
    assert w.victim_dead.is_set()
    # The engines not killed on purpose are all there and all work.
    m = client.MultiEngineClient(furl_file=c.mec_furl, timeout=60)
    try:
        wait_for(lambda: m.get_ids() == GOOD, 10, what="get_ids == %s" % GOOD)
        res = m.execute("print('after the storm')")
        assert [r["id"] for r in res] == GOOD
        assert all(r["stdout"] == "after the storm\n" for r in res)
    finally:
        m.close()
    assert not w.problems, "contract violations (%d):\n%s\n%s" % (len(w.problems), "\n".join(w.problems[:60]),
                                                                 report)
    # The good clients did real work and got right answers for it.
    assert stats["ok"] >= 50 and stats["mec ok"] >= 5, report
    crashes = crash_lines(c, ctl)
    assert not crashes, "crash or sanitizer reports in the logs:\n" + "\n".join(crashes[:40])

    r = ipcluster_stop(c.ipmpi_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: not job_processes(c.pid), 30, what="every process of the job to end")
    assert not alive(ctl)
    crashes = crash_lines(c, ctl)
    assert not crashes, "crash or sanitizer reports at shutdown:\n" + "\n".join(crashes[:40])


# ---------------------------------------------------------------- single findings
# Each of these was found by the chaos run above and is kept as its own
# short reproduction, so a failure names the bug at once.

def rss_bytes(pid):
    return proc_status_kb(pid, "VmRSS") * 1024


def test_a_client_that_never_reads_cannot_grow_the_controller_without_bound(cluster4):
    """A client that asks for replies and never reads them: the controller
    must bound what it holds for that client (stop reading it, hold its
    requests, or drop it), not buffer every reply until it runs out of
    memory. Here 48 pulls of 16 MiB from two engines ask for 1.5 GiB."""
    ctl = controller_pid(cluster4)
    key = parse_furl(cluster4.mec_furl)[3]
    raw = Raw(cluster4.mec_furl)
    try:
        assert raw.hello(key)[1] == 0
        rid = raw.send(C.K_PUSH, C.TARGET_LIST, _serialize.dumps({"big": bytes(16 << 20)}), tlist=tlist([0, 1]))
        assert [s for _t, s, _p in raw.collect([rid])[rid]] == [0, 0]
        time.sleep(0.5)
        base = peak = rss_bytes(ctl)
        pull = _serialize.dumps(["big"])
        for i in range(48):
            try:
                raw.send(C.K_PULL, parts=pull, tlist=tlist([0, 1]))
            except OSError:
                break  # dropped by the controller: an allowed answer
            peak = max(peak, rss_bytes(ctl))
            time.sleep(0.05)
        end = time.monotonic() + 8
        while time.monotonic() < end:
            peak = max(peak, rss_bytes(ctl))
            time.sleep(0.1)
        # The others are still served meanwhile.
        m = cluster4.client(timeout=60)
        try:
            assert m.get_ids() == [0, 1, 2, 3]
            assert m.execute("print(6 * 7)", targets=2)[0]["stdout"] == "42\n"
        finally:
            m.close()
    finally:
        raw.close()
    assert alive(ctl)
    grew = (peak - base) / float(1 << 20)
    assert grew < 512, ("the controller's RSS grew by %.0f MiB holding replies for a client that never "
                        "reads them (1536 MiB asked for)" % grew)


def test_a_reply_flagged_hello_is_not_a_request(cluster4):
    """doc/protocol.md: a frame with IPMPI_F_REPLY from a client gets
    IPMPI_EKIND and the connection stays open. HELLO is no exception."""
    key = parse_furl(cluster4.mec_furl)[3]
    raw = Raw(cluster4.mec_furl)
    try:
        assert raw.hello(key)[1] == 0
        rid = raw.send(C.K_HELLO, C.TARGET_CONTROLLER, [key.encode()], flags=C.F_REPLY)
        status = raw.one(rid)[1]
        assert status == C.EKIND, "a reply-flagged HELLO got %s, not IPMPI_EKIND" % C.errname(status)
        rid = raw.send(C.K_GET_IDS, C.TARGET_CONTROLLER)
        assert raw.one(rid)[1] == 0
    finally:
        raw.close()
    # Before HELLO it is not a HELLO either: refused, and the connection closed.
    raw = Raw(cluster4.mec_furl)
    try:
        rid = raw.send(C.K_HELLO, C.TARGET_CONTROLLER, [key.encode()], flags=C.F_REPLY)
        status = raw.one(rid)[1]
        assert status in (C.EACCES, C.EKIND), "a reply-flagged first HELLO got %s" % C.errname(status)
    finally:
        raw.close()


def test_a_frame_header_alone_commits_no_memory(cluster4):
    """A length table is a promise, not data: announcing many parts of
    1 MiB (512 MiB in all, within the limits) and sending none of their
    bytes must not make the controller hold that memory. Today every part
    of 1 MiB or more gets its own 2 MiB-aligned MADV_HUGEPAGE mapping whose
    capacity header is written at once, which faults in a whole 2 MiB huge
    page: 32 KiB of header from a client costs 8 GiB of RAM with 4096
    parts, and three such clients exhaust this machine."""
    ctl = controller_pid(cluster4)
    key = parse_furl(cluster4.mec_furl)[3]
    nparts = 512
    # Earlier tests left requests whose clients went away: their results
    # come in and are kept for a later fetch (--result-memory). Let them
    # finish and drop them, so only this test's frame is measured.
    with cluster4.client(timeout=60) as m:
        wait_for(lambda: all(not q["running"] and not q["queue"] for _i, q in m.queue_status()), 60,
                 what="engines idle")
        m.purge_results("all")
    raw = Raw(cluster4.mec_furl)
    try:
        assert raw.hello(key)[1] == 0
        time.sleep(0.3)
        base = peak = rss_bytes(ctl)
        raw.s.sendall(HDR.pack(MAGIC, VERSION, C.K_PUSH, 0, 5, C.TARGET_ALL, 0, 0, nparts, 0) +
                      struct.pack("<%dQ" % nparts, *([1 << 20] * nparts)))
        end = time.monotonic() + 3
        while time.monotonic() < end:
            peak = max(peak, rss_bytes(ctl))
            time.sleep(0.05)
    finally:
        raw.close()
    assert alive(ctl)
    grew = (peak - base) / float(1 << 20)
    assert grew < 64, ("a frame header announcing %d parts of 1 MiB (no bytes of them sent) grew the "
                       "controller's RSS by %.0f MiB" % (nparts, grew))


def test_unauthenticated_connections_cannot_lock_out_a_key_holder(cluster4):
    """Connections that never even start TLS take session slots until the
    10 s HELLO deadline; once the table is full (MAX_SESSIONS, 4096) the
    controller closes every new connection at once, the key holder's too,
    with no message ("Connection reset by peer" in the TLS handshake). One
    host that reconnects every 10 s keeps every user out. A client with the
    key must still get in (e.g. the oldest unauthenticated session gives
    way, or connections before HELLO have a smaller budget of their own)."""
    import resource
    want = 4150
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want + 1000), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= want + 200, "needs %d open files" % (want + 200)
    _fp, host, port, _key = parse_furl(cluster4.mec_furl)
    socks = collections.deque()   # (opened at, socket), oldest first
    try:
        # Fill the table so that every connection is younger than 9 s (the
        # controller drops them at 10 s): renew the oldest while filling.
        end = time.monotonic() + 60
        while time.monotonic() < end:
            now = time.monotonic()
            while socks and now - socks[0][0] > 9:
                socks.popleft()[1].close()
            if len(socks) >= want:
                break
            socks.append((now, socket.create_connection((host, port), timeout=10)))
        assert len(socks) >= want, ("the controller accepted too slowly to fill its session table "
                                    "(held %d of %d connections)" % (len(socks), want))
        time.sleep(0.3)
        t0 = time.monotonic()
        try:
            m = client.MultiEngineClient(furl_file=cluster4.mec_furl, timeout=30, connect_timeout=8)
        except (ConnectionError, OSError) as e:
            raise AssertionError("with %d unauthenticated connections open, a client with the key was "
                                 "refused: %s" % (want, e))
        print("the key holder got in after %.2f s" % (time.monotonic() - t0))
        try:
            assert m.get_ids() == [0, 1, 2, 3]
        finally:
            m.close()
    finally:
        for _t, s in socks:
            s.close()
    assert alive(controller_pid(cluster4))
