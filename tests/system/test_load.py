"""Load from strangers and from one greedy client must not hurt key holders
(issue 13: "Unauthenticated load hurts key holders", "1,000 connections
that never speak", part 7 back-pressure on requests).

- 200 connections doing TLS handshakes with a wrong key in a loop (a
  separate process, unauth_load.py): a key holder's requests keep a
  bounded round trip, and the controller's log stays small, with the
  refusals summed up in a summary line instead of a line each.
- 40 new key holders connecting one after another while 200 connections
  from the same address (a login node, an ssh tunnel) flood wrong keys:
  every one gets in.
- 1,000 connections that never speak: a key holder already connected and
  a new one are both served, and the controller holds only a bounded
  number of them open (connections before HELLO per address are capped).
- A client pushing without blocking far more than --client-queue-bytes to
  a busy engine: the controller stops reading it (its RSS stays bounded),
  another client is served meanwhile, and every push lands, in order, once
  the engine is free.

Bounds are generous (a loaded 2-core machine): they catch the stalls of
hundreds of milliseconds seen before, not a slow machine. Speed figures
belong to bench/bench_unauth.py.
"""
import os
import re
import resource
import socket
import subprocess
import threading
import time

import numpy
import pytest

from conftest import PYTHON, child_env, controller_pid, parse_furl, running_cluster, wait_for
from test_chaos import rss_bytes

LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unauth_load.py")
QUEUE_BYTES = 64 << 20     # --client-queue-bytes of the back-pressure cluster


def controller_log(cluster):
    with open(os.path.join(cluster.log_dir, "ipcontroller-%d.log" % controller_pid(cluster)),
              errors="replace") as f:
        return f.read().splitlines()


def round_trips(mec, seconds, target=0, ids=None):
    """Round trips (s) of execute('pass') for seconds, each result checked;
    with ids (a list), get_ids() (answered by the controller alone) in turn
    with each, its round trips appended to ids."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        r = mec.execute("pass", targets=target)
        out.append(time.perf_counter() - t0)
        assert r[0]["id"] == target
        if ids is not None:
            t0 = time.perf_counter()
            assert mec.get_ids() == [0, 1]
            ids.append(time.perf_counter() - t0)
    return out


def p99(samples):
    s = sorted(samples)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


@pytest.fixture(scope="module")
def cluster2():
    yield from running_cluster(2)


def test_a_key_holder_is_served_while_200_connections_try_wrong_keys(cluster2):
    mec = cluster2.client(timeout=60)
    load = None
    try:
        round_trips(mec, 0.5)
        log_before = len(controller_log(cluster2))
        load = subprocess.Popen([PYTHON, LOAD, cluster2.mec_furl, "--conns", "200", "--seconds", "11"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
        assert load.stdout.readline().strip() == "started"
        time.sleep(1.0)
        ids = []
        loaded = round_trips(mec, 8, ids=ids)
        out = load.communicate(timeout=60)[0]
        m = re.search(r"handshakes (\d+) refusals (\d+) errors (\d+)", out)
        assert m, out
        handshakes = int(m.group(1))
        # The load was real: the controller did the handshakes.
        assert handshakes >= 500, out
        print("key holder while %s: execute %d, p99 %.2f ms, max %.2f ms; get_ids p99 %.2f ms, max %.2f ms"
              % (m.group(0), len(loaded), p99(loaded) * 1e3, max(loaded) * 1e3, p99(ids) * 1e3, max(ids) * 1e3))
        # The controller's own answers measure its loop, which the
        # handshakes used to hold; an execute also waits for the engine to
        # wake (its doorbell). Its worst case caught a lost wake-up: a
        # header MPI queued behind a full shared-memory queue reached the
        # engine after the doorbell's ring, and the engine slept its 2 s
        # out (the controller now rings again when the send completes).
        # So the worst execute is bounded below those 2 s, not at 1 s: a
        # machine shared with other work once stalled everything here for
        # ~1 s (execute 1.15 s, get_ids 0.83 s in the same run, p99 0.94 ms),
        # which is no fault of the controller's; the p99s say "served".
        assert p99(ids) < 0.1, "a key holder's p99 round trip was %.0f ms under wrong-key load" % (p99(ids) * 1e3)
        assert p99(loaded) < 0.1, "an execute's p99 round trip was %.0f ms under wrong-key load" % (p99(loaded) * 1e3)
        assert max(ids) < 1.0, "a key holder waited %.2f s under wrong-key load" % max(ids)
        assert max(loaded) < 1.8, "an execute waited %.2f s under wrong-key load (a lost wake-up?)" % max(loaded)
        # Refusals are summed up per interval, not logged one line each:
        # the summary comes when the 10 s interval of the first refusals ends.
        wait_for(lambda: any("more connection" in ln and "refused in the last 10 s" in ln
                             for ln in controller_log(cluster2)[log_before:]), 20,
                 what="a summary line of the refusals in the controller's log")
        grown = controller_log(cluster2)[log_before:]
        assert len(grown) < 100, ("%d handshakes with wrong keys wrote %d log lines:\n%s"
                                  % (handshakes, len(grown), "\n".join(grown[:30])))
        assert mec.execute("print(6 * 7)", targets=1)[0]["stdout"] == "42\n"
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mec.close()


def test_new_key_holders_get_in_while_their_own_address_floods_wrong_keys(cluster2):
    """Every client behind a login node or an ssh tunnel shares one
    address with whoever else is there: 200 connections from 127.0.0.1
    doing wrong-key handshakes keep that address above its bound on
    connections before HELLO, and 40 new key holders from the same address
    must each get in (a progressing handshake is never closed for a newer
    connection; a new one refused at once comes back). Before, about one
    in six was cut mid-handshake ("Connection reset by peer")."""
    log_before = len(controller_log(cluster2))
    load = subprocess.Popen([PYTHON, LOAD, cluster2.mec_furl, "--conns", "200", "--seconds", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    failed, times = [], []
    try:
        assert load.stdout.readline().strip() == "started"
        time.sleep(1.0)
        for i in range(40):
            t0 = time.monotonic()
            try:
                m = cluster2.client(timeout=30, connect_timeout=15)
                try:
                    assert m.execute("print(%d)" % i, targets=i % 2)[0]["stdout"] == "%d\n" % i
                finally:
                    m.close()
                times.append(time.monotonic() - t0)
            except (ConnectionError, TimeoutError) as e:
                failed.append("attempt %d after %.2f s: %s: %s" % (i, time.monotonic() - t0, type(e).__name__, e))
        assert load.poll() is None, "the load ended early: " + load.communicate()[0]
    finally:
        load.kill()
        load.wait()
    times.sort()
    print("new key holders during a wrong-key flood from their address: %d ok, %d failed; "
          "connect+execute p50 %.0f ms, max %.0f ms"
          % (len(times), len(failed), times[len(times) // 2] * 1e3 if times else -1,
             times[-1] * 1e3 if times else -1))
    assert not failed, "%d of 40 new key holders failed:\n%s" % (len(failed), "\n".join(failed))
    assert max(times) < 10, "a new key holder needed %.1f s to get in" % max(times)
    # The flood kept the address at its bound: new connections were
    # refused meanwhile (logged in full or summed up when the gate's 10 s
    # interval ends).
    wait_for(lambda: any("too many connections before HELLO from this address" in ln
                         for ln in controller_log(cluster2)[log_before:]), 20,
             what="refusals of connections beyond the address's bound in the controller's log")


def test_1000_connections_that_never_speak_cost_a_key_holder_nothing(cluster2):
    want = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want + 1000), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= want + 200, "needs %d open files" % (want + 200)
    ctl = controller_pid(cluster2)
    fds_before = len(os.listdir("/proc/%d/fd" % ctl))
    _fp, host, port, _key = parse_furl(cluster2.mec_furl)
    mec = cluster2.client(timeout=60)
    socks = []
    try:
        round_trips(mec, 0.3)
        t0 = time.monotonic()
        for _ in range(want):
            socks.append(socket.create_connection((host, port), timeout=10))
        opened = time.monotonic() - t0
        # Accepted promptly (a full accept queue would cost a 1 s SYN retry each).
        assert opened < 20, "opening %d connections took %.1f s" % (want, opened)
        # The key holder already in is served at once ...
        ids = []
        round_trips(mec, 2, ids=ids)
        assert max(ids) < 1.0, "a key holder waited %.2f s with %d silent connections" % (max(ids), want)
        # ... and a new one gets in.
        t0 = time.monotonic()
        m2 = cluster2.client(timeout=30, connect_timeout=8)
        try:
            assert m2.execute("print(1 + 1)", targets=0)[0]["stdout"] == "2\n"
        finally:
            m2.close()
        print("1000 silent connections opened in %.2f s; a new key holder in after %.2f s"
              % (opened, time.monotonic() - t0))
        # The controller did not keep a descriptor for each: one address
        # has only so many connections before HELLO.
        fds = len(os.listdir("/proc/%d/fd" % ctl))
        assert fds - fds_before < 200, "the controller holds %d more descriptors with %d silent connections" % (
            fds - fds_before, want)
    finally:
        for s in socks:
            s.close()
        mec.close()


@pytest.fixture(scope="module")
def bp_cluster():
    yield from running_cluster(2, engine_args=("--client-queue-bytes", str(QUEUE_BYTES)))


def test_a_client_pushing_past_its_queue_bound_is_paused_not_buffered(bp_cluster):
    """32 pushes of 16 MiB (512 MiB) without blocking to an engine that
    sleeps, with --client-queue-bytes 64 MiB: the controller stops reading
    the pusher, so its RSS grows by about the bound, not by 512 MiB; the
    other engine still answers another client; once the engine wakes,
    every push lands in order."""
    n, size = 32, 16 << 20
    ctl = controller_pid(bp_cluster)
    # TLS (shm=False): the pushes' bytes come over the socket.
    pusher = bp_cluster.client(timeout=120, shm=False)
    other = bp_cluster.client(timeout=60)
    arrays = [numpy.full(size // 8, i, dtype=numpy.float64) for i in range(n)]
    done, errors = [], []
    try:
        base = rss_bytes(ctl)
        sleeper = other.execute("import time; time.sleep(12)", targets=0, block=False)

        def push_all():
            try:
                for i in range(n):
                    done.append(pusher.push({"b%d" % i: arrays[i], "seq": i}, targets=0, block=False))
            except Exception as e:  # reported below
                errors.append(e)

        th = threading.Thread(target=push_all, daemon=True)
        th.start()
        # While the engine sleeps: the pusher is held back, the controller
        # bounded, the other client served.
        peak, t_end = base, time.monotonic() + 6
        served = []
        while time.monotonic() < t_end:
            peak = max(peak, rss_bytes(ctl))
            t0 = time.perf_counter()
            assert other.execute("print(3 * 3)", targets=1)[0]["stdout"] == "9\n"
            served.append(time.perf_counter() - t0)
            time.sleep(0.05)
        held = len(done)
        grew = (peak - base) / float(1 << 20)
        print("while the engine slept: %d of %d pushes sent, controller RSS +%.0f MiB, other client max %.0f ms"
              % (held, n, grew, max(served) * 1e3))
        assert held < n, "all %d pushes went through while the engine was busy: no back-pressure" % n
        assert grew < 256, ("the controller's RSS grew by %.0f MiB holding the pushes of one client (%d MiB "
                            "sent, --client-queue-bytes %d MiB)" % (grew, n * size >> 20, QUEUE_BYTES >> 20))
        assert max(served) < 2.0, "another client waited %.2f s" % max(served)
        # The engine wakes: every push lands, in order.
        sleeper.get_result(block=True, timeout=60)
        th.join(120)
        assert not th.is_alive(), "the pusher is still blocked after the engine finished"
        assert not errors, errors
        assert len(done) == n
        for pr in done:
            pr.get_result(block=True, timeout=120)
        assert pusher.pull("seq", targets=0)[0] == n - 1
        code = "print([float(globals()['b%%d' %% i][-1]) for i in range(%d)])" % n
        assert pusher.execute(code, targets=0)[0]["stdout"].strip() == str([float(i) for i in range(n)])
        pusher.execute("for i in range(%d): del globals()['b%%d' %% i]" % n, targets=0)
    finally:
        pusher.close()
        other.close()
