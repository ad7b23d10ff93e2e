"""Nothing hangs when the other side goes (issue 13 part 3).

The controller is killed (SIGKILL), or the whole job ends (mpirun
SIGKILL), while clients wait in every way there is: a blocking execute, a
pending result, a TaskClient wait, and a large push in the middle of its
transfer over TLS. Each call raises a ConnectionError within a few seconds
(not at its timeout: these clients have none), a blocking call says the
controller is gone rather than that it keeps the result, and a call made
afterwards fails at once too.
"""
import os
import shutil
import signal
import threading
import time

import numpy
import pytest

from conftest import start_cluster, stop_cluster
from ipmpi import client
from test_chaos import controller_pid

BOUND = 5.0      # "within a few seconds" of the kill (measured: ~0.02 s)
PUSH_MIB = 512   # big enough to be mid-transfer over TLS when the kill comes


@pytest.mark.parametrize("what", ["controller", "job"])
def test_every_waiting_call_raises_a_connection_error_soon_after_the_controller_goes(what):
    c = start_cluster(2)
    clients = []
    try:
        a = client.MultiEngineClient(c.mec_furl)               # no timeout anywhere
        b = client.MultiEngineClient(c.mec_furl)
        t = client.TaskClient(c.tc_furl)
        p = client.MultiEngineClient(c.mec_furl, shm=False)    # the bytes go over the socket
        clients += [a, b, t, p]
        big = numpy.ones(PUSH_MIB << 17)
        out = {}

        def wait(name, call):
            try:
                call()
                out[name] = ("returned", time.monotonic())
            except BaseException as e:   # whatever it is, the test reports it
                out[name] = (e, time.monotonic())

        def start(name, call):
            th = threading.Thread(target=wait, args=(name, call), daemon=True)
            th.start()
            threads[name] = th

        def running(watcher, engine):
            deadline = time.monotonic() + 60
            while watcher.queue_status(targets=engine)[0][1]["running"] != "execute":
                assert time.monotonic() < deadline, "engine %d never started its execute" % engine
                time.sleep(0.05)

        threads = {}
        with client.MultiEngineClient(c.mec_furl, timeout=60) as watcher:
            start("blocking execute", lambda: a.execute("import time; time.sleep(120)", targets=0))
            running(watcher, 0)
            pending = b.execute("import time; time.sleep(120)", targets=1, block=False)
            running(watcher, 1)
        start("pending get_result", pending.get_result)
        tid = t.run(client.StringTask("import time; time.sleep(120)"))   # waits for a free engine
        start("task wait", lambda: t.get_task_result(tid, block=True))
        start("push mid-transfer", lambda: p.push(dict(big=big), targets=1))
        time.sleep(0.2)
        assert all(th.is_alive() for th in threads.values()), out   # all still waiting, the push included
        os.kill(controller_pid(c) if what == "controller" else c.pid, signal.SIGKILL)
        killed = time.monotonic()
        for th in threads.values():
            th.join(max(0.1, killed + 30 - time.monotonic()))
        stuck = [n for n, th in threads.items() if th.is_alive()]
        assert not stuck, "still blocked 30 s after the %s was killed: %s" % (what, stuck)
        for name, (result, when) in out.items():
            assert isinstance(result, ConnectionError), "%s: %r" % (name, result)
            assert when - killed < BOUND, "%s raised %.1f s after the kill" % (name, when - killed)
        msg = str(out["blocking execute"][0])
        assert "controller is gone" in msg and "keeps the result" not in msg, msg
        # A call made afterwards fails at once as well.
        t0 = time.monotonic()
        with pytest.raises(ConnectionError):
            a.execute("1", targets=0)
        assert time.monotonic() - t0 < BOUND
    finally:
        for x in clients:
            try:
                x.close()
            except Exception:
                pass
        stop_cluster(c)
        shutil.rmtree(c.ipmpi_dir, ignore_errors=True)
