"""Engines that join a running cluster (issue 10 part 6): `ipcluster
engines -n N` starts a second MPI job whose engines connect to the running
controller (MPI_Comm_connect through the cluster's ompi-server), get the
next ids, run requests like the others, are detected when they die, and
leave again (`ipcluster stop --engines JOB`) without harming the first
job. The Slurm join is in test_launch_batch.py.

Every cluster gets its own IPMPI_DIR and is stopped; nothing of it (mpirun,
ranks, ompi-server) is left running.
"""
import os
import re
import signal
import time

import pytest

from conftest import LOOPBACK, ipcluster, processes_with, run_record, wait_for
from ipmpi import client


def mec_of(d):
    return client.MultiEngineClient(furl_file=os.path.join(d, "security", "ipcontroller-mec.furl"),
                                    timeout=60)


def start(d, n=2, *extra):
    r = ipcluster("mpirun", "-n", str(n), "--client-ip", LOOPBACK, *extra, ipmpi_dir=d)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def join(d, n, *extra):
    r = ipcluster("engines", "-n", str(n), *extra, ipmpi_dir=d)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"(\d+) engines joined .*ids (\S+) \((\w+) job (\d+)\)", r.stdout)
    assert m, r.stdout
    return m.group(4), r.stdout


def one_and_two_joined(d, *join_args):
    """A cluster of one engine with two more joined; a client of it."""
    start(d, 1)
    join(d, 2, *join_args)
    return mec_of(d)


def pids(mec, targets):
    return {i["id"]: i["pid"] for i in mec.engine_info(targets)}


def assert_all_stopped(d, running=True):
    r = ipcluster("stop", ipmpi_dir=d)
    assert r.returncode == (0 if running else 1), r.stdout + r.stderr
    wait_for(lambda: processes_with(d) == [], 15, what="no process naming %s (ranks, ompi-server)" % d)
    assert not os.path.exists(os.path.join(d, "run", "ipcluster.json"))
    assert not os.path.exists(os.path.join(d, "run", "join.port"))


def test_engines_join_run_requests_and_leave_without_harming_the_first_job(ipdir):
    start(ipdir, 2)
    job, out = join(ipdir, 3)
    assert "ids 2..4" in out and "ipcluster stop --engines %s" % job in out
    rec = run_record(ipdir)
    assert [j["ids"] for j in rec["joined"]] == [[2, 3, 4]]
    mec = mec_of(ipdir)
    try:
        assert mec.get_ids() == [0, 1, 2, 3, 4]
        got = pids(mec, [0, 1, 2, 3, 4])
        assert len(set(got.values())) == 5
        # Joined engines run every kind of request, also a large push.
        mec.push(dict(a=list(range(10))), targets=[2, 3, 4])
        assert mec.pull("a", targets=[3]) == [list(range(10))]
        mec.push(dict(b=bytes(range(256)) * 8192), targets=[4])   # 2 MiB
        mec.execute("n = len(b); s = sum(b[:256])", targets=[4])
        assert mec.pull(("n", "s"), targets=[4]) == [[2 * 1024 * 1024, sum(range(256))]]
        assert [r["stdout"] for r in mec.execute("print(id(None) > 0)")] == ["True\n"] * 5
        # A node-shared array reaches joined engines too (one copy per host).
        import numpy
        mec.push(dict(sh=numpy.arange(1000.0)), shared=True)
        mec.execute("t = float(sh.sum())")
        assert mec.pull("t") == [float(sum(range(1000)))] * 5
        st = ipcluster("status", ipmpi_dir=ipdir)
        assert st.returncode == 0 and "joined: mpirun job %s, ids 2..4" % job in st.stdout, st.stdout
        assert "5 of 5 engines alive" in st.stdout, st.stdout

        # They leave; the first job's engines answer as before.
        r = ipcluster("stop", "--engines", job, ipmpi_dir=ipdir)
        assert r.returncode == 0 and "ids 2..4" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: mec.get_ids() == [0, 1], 10, what="ids back to [0, 1]")
        assert pids(mec, [0, 1]) == {0: got[0], 1: got[1]}
        assert [r["stdout"] for r in mec.execute("print('first')")] == ["first\n"] * 2
        for i in (2, 3, 4):
            wait_for(lambda: not os.path.exists("/proc/%d" % got[i]), 10, what="engine %d to exit" % i)
        assert run_record(ipdir)["joined"] == []

        # Ids continue after the ones that left.
        job2, out2 = join(ipdir, 1)
        assert "ids 5..5" in out2, out2
        assert mec.get_ids() == [0, 1, 5]
    finally:
        mec.close()
    assert_all_stopped(ipdir)


def test_joined_engines_get_their_own_jobs_comm(ipdir):
    mec = one_and_two_joined(ipdir, "--mpi", "mpi4py")
    try:
        mec.execute("from mpi4py import MPI; total = comm.allreduce(comm.rank + 1, op=MPI.SUM); "
                    "size = comm.size", targets=[1, 2])
        assert mec.pull("total", targets=[1, 2]) == [3, 3]
        assert mec.pull("size", targets=[1, 2]) == [2, 2]
    finally:
        mec.close()
    assert_all_stopped(ipdir)


def test_a_joined_engine_killed_is_detected_and_the_others_go_on(ipdir):
    mec = one_and_two_joined(ipdir)
    try:
        victim = pids(mec, [2])[2]
        pr = mec.execute("import time; time.sleep(30)", targets=[2], block=False)
        time.sleep(0.5)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(client.DeadEngineError) as ei:
            pr.get_result(timeout=20)
        assert time.monotonic() - t0 < 5
        assert "engine 2 died" in str(ei.value), ei.value
        assert mec.get_ids() == [0, 1]
        assert [r["stdout"] for r in mec.execute("print('on')")] == ["on\n"] * 2
    finally:
        mec.close()
    assert_all_stopped(ipdir)


def test_joined_engines_end_when_the_controller_is_killed(ipdir):
    mec = one_and_two_joined(ipdir)
    try:
        every = pids(mec, [0, 1, 2])
    finally:
        mec.close()
    # The controller: the one ipmpi process of the profile that is no engine.
    exe = os.fsencode(os.environ["IPMPI_BIN"])
    controllers = [p for p in processes_with("--ipmpi-dir " + ipdir)
                   if p not in every.values() and open("/proc/%d/cmdline" % p, "rb").read().startswith(exe)]
    assert len(controllers) == 1, controllers
    os.kill(controllers[0], signal.SIGKILL)
    for i, pid in every.items():
        if i == 0:
            continue
        wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
                 open("/proc/%d/stat" % pid).read().split()[2] == "Z", 15,
                 what="joined engine %d to exit after the controller died" % i)
    # mpirun ended the first job when its controller died: stop cleans up.
    assert_all_stopped(ipdir, running=False)


def test_engines_are_refused_with_the_reason(ipdir, tmp_path):
    # No cluster at all.
    r = ipcluster("engines", "-n", "1", ipmpi_dir=ipdir)
    assert r.returncode != 0 and "no cluster is running" in r.stderr, r.stderr
    # A cluster without joins.
    start(ipdir, 1, "--no-join")
    r = ipcluster("engines", "-n", "1", ipmpi_dir=ipdir)
    assert r.returncode != 0 and "started without joins" in r.stderr, r.stderr
    r = ipcluster("stop", "--engines", "12345", ipmpi_dir=ipdir)
    assert r.returncode != 0 and "no joined job 12345" in r.stderr, r.stderr
    assert_all_stopped(ipdir)
    # No room: the controller refuses the job, which ends with its words.
    # (The join across hosts, --mode ssh, is in test_launch_ssh.py.)
    start(ipdir, 1, "--engine-args", "--max-engines 2")
    r = ipcluster("engines", "-n", "2", ipmpi_dir=ipdir)
    assert r.returncode != 0 and "no room for 2 more engines" in r.stderr, r.stderr
    r = ipcluster("engines", "-n", "1", "--mode", "ssh", ipmpi_dir=ipdir)
    assert r.returncode != 0 and "--mode ssh needs --clusterfile" in r.stderr, r.stderr
    job, out = join(ipdir, 1)
    assert "ids 1..1" in out, out
    assert_all_stopped(ipdir)


def test_engines_pointed_at_a_dead_controller_say_so(ipdir):
    start(ipdir, 1)
    rec = run_record(ipdir)
    os.killpg(rec["pid"], signal.SIGKILL)
    wait_for(lambda: processes_with("--ipmpi-dir " + ipdir) == [], 15, what="the job to die")
    r = ipcluster("engines", "-n", "1", ipmpi_dir=ipdir, timeout=60)
    assert r.returncode != 0, r.stdout
    assert "no cluster is running" in r.stderr or "does not answer" in r.stderr, r.stderr
    assert processes_with("--join") == [] or all(ipdir not in open("/proc/%d/cmdline" % p).read()
                                                 for p in processes_with("--join"))
    ipcluster("stop", ipmpi_dir=ipdir)
    wait_for(lambda: processes_with(ipdir) == [], 15, what="nothing left (ompi-server)")
