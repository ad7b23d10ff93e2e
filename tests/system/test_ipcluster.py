"""ipcluster as a user runs it: start, status, stop, logs, refusals, persistent
furls, file modes, the Hello World session, MPI in user code and the MPMD form.

Each test starts its own cluster in its own IPMPI_DIR with the build tree's
ipcluster and leaves nothing running.
"""
import os
import shutil
import signal
import socket
import stat
import subprocess

import pytest

from conftest import (BUILD_DIR, IPCLUSTER, IPMPI_BIN, LOOPBACK, PYTHON, child_env, ipcluster,
                      job_processes, processes_with, run_record, start_cluster, stop_cluster,
                      wait_for)
from ipmpi import cluster as ipcluster_mod






def test_ipcluster_is_the_build_trees_script():
    assert os.path.isfile(IPCLUSTER) and os.access(IPCLUSTER, os.X_OK)
    with open(IPCLUSTER) as f:
        head = f.read(4096)
    assert "ipmpi.cluster" in head or "from ipmpi import cluster" in head
    # Debian's python3-ipyparallel ships /usr/bin/ipcluster: ours comes first
    # on the PATH the tests run with.
    assert shutil.which("ipcluster", path=child_env()["PATH"]) == IPCLUSTER


def test_start_status_stop_leaves_no_process_and_logs_every_rank(ipdir):
    r = ipcluster("mpirun", "-n", "3", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 engines ready" in r.stdout
    assert "from ipmpi import client; mec = client.MultiEngineClient()" in r.stdout
    mec_furl = os.path.join(ipdir, "security", "ipcontroller-mec.furl")
    assert mec_furl in r.stdout
    # 127.0.0.1 is loopback: the user is told other hosts cannot connect.
    assert "loopback" in r.stdout and "--client-ip" in r.stdout

    rec = run_record(ipdir)
    pid = rec["pid"]
    assert rec["n"] == 3 and rec["mec_furl"] == mec_furl
    # ipcluster returned; the job keeps running in the background.
    procs = job_processes(pid)
    assert pid in procs and len(procs) >= 5, procs  # mpirun + controller + 3 engines

    s = ipcluster("status", ipmpi_dir=ipdir)
    assert s.returncode == 0, s.stderr
    assert "3 of 3 engines alive" in s.stdout and "[0, 1, 2]" in s.stdout

    from ipmpi import client
    mec = client.MultiEngineClient(furl_file=mec_furl, timeout=60)
    try:
        assert mec.get_ids() == [0, 1, 2]
    finally:
        mec.close()

    logs = os.listdir(os.path.join(ipdir, "log"))
    assert len([n for n in logs if n.startswith("ipcontroller-")]) == 1, logs
    for e in range(3):
        assert len([n for n in logs if n.startswith("ipengine-%d-" % e)]) == 1, logs
    assert "ipcluster-mpirun-%d.log" % pid in logs

    t = ipcluster("stop", ipmpi_dir=ipdir)
    assert t.returncode == 0, t.stdout + t.stderr
    assert "stopped" in t.stdout
    assert job_processes(pid) == []
    # pgrep -f: no ipmpi rank or mpirun naming this job's directory is left
    # (an exited mpirun may linger as a zombie where init does not reap
    # orphans; it runs nothing and has no command line).
    assert processes_with(ipdir) == []
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))
    assert not os.path.exists(mec_furl)

    s = ipcluster("status", ipmpi_dir=ipdir)
    assert s.returncode != 0 and "no cluster" in s.stderr
    s = ipcluster("stop", ipmpi_dir=ipdir)
    assert s.returncode != 0 and "no cluster" in s.stderr


def test_short_form_and_refusal_of_a_second_cluster_in_the_same_dir(ipdir):
    r = ipcluster("-n", "1", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    pid = run_record(ipdir)["pid"]
    r2 = ipcluster("mpirun", "-n", "1", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r2.returncode != 0
    assert "already running" in r2.stderr and str(pid) in r2.stderr
    # The refused start did not disturb the running one.
    assert run_record(ipdir)["pid"] == pid
    assert ipcluster("status", ipmpi_dir=ipdir).returncode == 0
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0
    assert job_processes(pid) == []


def test_failed_start_reports_the_logs_and_leaves_nothing_running(ipdir):
    # Every rank refuses the option and exits before MPI starts.
    r = ipcluster("mpirun", "-n", "2", "--engine-args=--log-level 9", ipmpi_dir=ipdir, timeout=120)
    assert r.returncode != 0
    assert "mpirun exited" in r.stderr, r.stderr
    assert "--log-level must be 0..3" in r.stderr, r.stderr  # from the mpirun log's tail
    assert processes_with(ipdir) == []
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))


def test_start_timeout_kills_the_job(ipdir):
    # --ready-timeout is long, ipcluster's --timeout short: ipcluster gives up first.
    c = ipcluster_mod.Cluster(n=2, ipmpi_dir=ipdir, client_ip=LOOPBACK, ipmpi_bin=IPMPI_BIN)
    with pytest.raises(ipcluster_mod.ClusterError) as ei:
        c.start(timeout=0.05)
    assert "not ready" in str(ei.value) and "mpirun log" in str(ei.value)
    assert job_processes(c.pid) == []
    assert processes_with(ipdir) == []


def test_security_dir_is_0700_and_furls_are_0600(ipdir):
    c = start_cluster(1, ipmpi_dir=ipdir)
    try:
        assert stat.S_IMODE(os.stat(os.path.join(ipdir, "security")).st_mode) == 0o700
        for p in (c.mec_furl, c.tc_furl):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
            with open(p) as f:
                text = f.read()
            assert text.startswith("ipmpi+tls://") and text.endswith("\n")
            assert "@%s:" % LOOPBACK in text
        with open(c.mec_furl) as f, open(c.tc_furl) as g:
            assert f.read() != g.read()  # two capabilities, two keys
    finally:
        stop_cluster(c)


def free_port():
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_same_client_port_gives_identical_furls_after_restart(ipdir):
    port = free_port()
    args = ("mpirun", "-n", "1", "--client-ip", LOOPBACK, "--client-port", str(port))
    assert ipcluster(*args, ipmpi_dir=ipdir).returncode == 0
    sec = os.path.join(ipdir, "security")
    first = {}
    for name in ("ipcontroller-mec.furl", "ipcontroller-tc.furl"):
        with open(os.path.join(sec, name)) as f:
            first[name] = f.read()
        assert ":%d/" % port in first[name]
    saved = os.path.join(ipdir, "copied-mec.furl")  # a copy a user took to another machine
    with open(saved, "w") as f:
        f.write(first["ipcontroller-mec.furl"])
    os.chmod(saved, 0o600)  # the client refuses a furl others may read
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0

    r = ipcluster(*args, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    for name, text in first.items():
        with open(os.path.join(sec, name)) as f:
            assert f.read() == text, name
    from ipmpi import client
    mec = client.MultiEngineClient(furl_file=saved, timeout=60)
    try:
        assert mec.get_ids() == [0]
    finally:
        mec.close()
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0


HELLO_SESSION = """\
from ipmpi import client
mec = client.MultiEngineClient()
mec.get_ids()
mec.execute('print("Hello World")')
"""


def expected_hello(n):
    out = "[%s]\n" % ", ".join(str(i) for i in range(n))
    out += "<Results List>\n"
    for i in range(n):
        out += '[%d] In [1]: print("Hello World")\n' % i
        out += "[%d] Out[1]: Hello World\n\n" % i
    return out + "\n"


def test_hello_world_session_prints_exactly_the_ipython_results_list(ipdir):
    assert ipcluster("mpirun", "-n", "4", "--client-ip", LOOPBACK, ipmpi_dir=ipdir).returncode == 0
    env = child_env()
    env["IPMPI_DIR"] = ipdir
    r = subprocess.run([PYTHON, "-i"], input=HELLO_SESSION, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_hello(4), "got:\n%r\nstderr:\n%s" % (r.stdout, r.stderr)
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0


def test_engine_args_mpi4py_gives_an_engines_only_communicator(ipdir):
    c = start_cluster(3, ipmpi_dir=ipdir, engine_args=["--mpi", "mpi4py"])
    try:
        mec = c.client(timeout=120)
        try:
            mec.execute("r = comm.Get_rank(); s = comm.Get_size(); "
                        "tot = comm.allreduce(r + 1)")
            assert mec.pull("r") == [0, 1, 2]
            assert mec.pull("s") == [3, 3, 3]
            assert mec.pull("tot") == [6, 6, 6]
        finally:
            mec.close()
    finally:
        stop_cluster(c)


def kill_mpmd_job(p):
    """Ends an MPMD job started by hand (Popen p in its own session): SIGKILL
    to every process of the session, then p itself."""
    for q in job_processes(p.pid):
        os.kill(q, signal.SIGKILL)
    if p.poll() is None:
        p.kill()
        p.wait(timeout=10)


def test_mpmd_form_controller_and_engines_as_two_programs(ipdir):
    ctl = os.path.join(BUILD_DIR, "ipcontroller")
    eng = os.path.join(BUILD_DIR, "ipengine")
    assert os.path.islink(ctl) and os.path.islink(eng)
    common = ["--ipmpi-dir", ipdir, "--client-ip", LOOPBACK]
    cmd = (["mpirun", "--enable-recovery", "--oversubscribe", "-n", "1", ctl] + common
           + [":", "-n", "4", eng] + common)
    with open(os.path.join(ipdir, "mpirun.log"), "wb") as log:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=child_env(), start_new_session=True)
    try:
        furl = os.path.join(ipdir, "security", "ipcontroller-mec.furl")
        wait_for(lambda: os.path.exists(furl) or p.poll() is not None, 120, what="the furl")
        assert p.poll() is None, open(os.path.join(ipdir, "mpirun.log")).read()
        from ipmpi import client
        mec = client.MultiEngineClient(furl_file=furl, timeout=60)
        try:
            assert mec.get_ids() == [0, 1, 2, 3]
            mec.execute("import os; pid = os.getpid()")
            pids = mec.pull("pid")
            assert len(set(pids)) == 4
            for pid in pids:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    assert os.path.basename(f.read().split(b"\0")[0]) == b"ipengine"
            mec.shutdown()
        finally:
            mec.close()
        assert p.wait(timeout=30) == 0
        assert job_processes(p.pid) == []
    finally:
        kill_mpmd_job(p)


def test_mpmd_form_with_the_controller_not_on_rank_0_is_refused(ipdir):
    ctl = os.path.join(BUILD_DIR, "ipcontroller")
    eng = os.path.join(BUILD_DIR, "ipengine")
    cmd = ["mpirun", "--oversubscribe", "-n", "1", eng, "--ipmpi-dir", ipdir, ":", "-n", "1", ctl,
           "--ipmpi-dir", ipdir]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=child_env(), start_new_session=True, text=True)
    try:
        out, _ = p.communicate(timeout=60)
        assert p.returncode != 0
        assert "controller must be rank 0" in out, out
    finally:
        kill_mpmd_job(p)


def test_a_job_that_died_does_not_block_the_next_start(ipdir):
    assert ipcluster("mpirun", "-n", "1", "--client-ip", LOOPBACK, ipmpi_dir=ipdir).returncode == 0
    pid = run_record(ipdir)["pid"]
    for p in job_processes(pid):  # the whole job dies at once, without ipcluster stop
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: job_processes(pid) == [], 10, what="the job to die")
    s = ipcluster("status", ipmpi_dir=ipdir)
    assert s.returncode != 0 and "no cluster is running" in s.stderr
    r = ipcluster("mpirun", "-n", "1", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert run_record(ipdir)["pid"] != pid
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0
    # A stale record alone: stop cleans it up and says the job was not running.
    assert ipcluster("mpirun", "-n", "1", "--client-ip", LOOPBACK, ipmpi_dir=ipdir).returncode == 0
    pid = run_record(ipdir)["pid"]
    for p in job_processes(pid):
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: job_processes(pid) == [], 10, what="the job to die")
    t = ipcluster("stop", ipmpi_dir=ipdir)
    assert t.returncode != 0 and "was not running" in t.stderr
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))
