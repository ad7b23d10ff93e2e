"""ipcluster's modes on this host (local, mpiexec, mpirun), --mpi=mpi4py,
placement and engine_info, --script, --logdir and the refusals.

Every cluster gets its own IPMPI_DIR and is stopped; nothing is left
running (checked by the session and by the profile directory's name).
The batch modes are in test_launch_batch.py, ssh in test_launch_ssh.py.
"""
import os

import pytest

from conftest import (LOOPBACK, child_env, ipcluster, job_processes, processes_with, run_record)
from ipmpi import client




record = run_record


def mec_of(d):
    return client.MultiEngineClient(furl_file=os.path.join(d, "security", "ipcontroller-mec.furl"),
                                    timeout=60)


def assert_stopped(d, pid=None):
    r = ipcluster("stop", ipmpi_dir=d)
    assert r.returncode == 0, r.stdout + r.stderr
    if pid:
        assert job_processes(pid) == []
    assert processes_with("--ipmpi-dir " + d) == []
    assert not os.path.exists(os.path.join(d, "run", "ipcluster.json"))


@pytest.mark.parametrize("mode", ["local", "mpiexec", "mpirun"])
def test_mode_on_this_host_is_reached_and_stopped(ipdir, mode):
    r = ipcluster(mode, "-n", "2", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 engines ready" in r.stdout
    rec = record(ipdir)
    assert rec["mode"] == mode
    if mode == "mpiexec":
        assert rec["command"][0] == "mpiexec"
    mec = mec_of(ipdir)
    try:
        assert mec.get_ids() == [0, 1]
        assert mec.execute("x = 6 * 7", block=True) is not None
        assert mec.pull("x") == [42, 42]
    finally:
        mec.close()
    assert_stopped(ipdir, rec["pid"])


def test_mpi4py_option_gives_engines_comm_and_an_allreduce(ipdir):
    r = ipcluster("mpirun", "-n", "2", "--mpi=mpi4py", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    mec = mec_of(ipdir)
    try:
        # `MPI` in the namespace needs _engine.py (not this change): import it here.
        mec.execute("from mpi4py import MPI; total = comm.allreduce(comm.rank + 1, op=MPI.SUM); "
                    "size = comm.size")
        assert mec.pull("total") == [3, 3]
        assert mec.pull("size") == [2, 2]
    finally:
        mec.close()
    assert_stopped(ipdir)


def test_engine_info_placement_and_thread_variables(ipdir):
    # One engine per core left after the controller's: with 2 cores, 1 engine.
    ncores = len(os.sched_getaffinity(0))
    n = max(1, ncores - 1)
    r = ipcluster("mpirun", "-n", str(n), "--bind", "core", "--mpirun-args", "--bind-to none",
                  "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    mec = mec_of(ipdir)
    try:
        info = mec.engine_info()
        assert [d["id"] for d in info] == list(range(n))
        for d in info:
            for key in ("id", "host", "pid", "mpi_rank", "local_rank", "local_size", "cores", "numa",
                        "cpuset", "bound"):
                assert key in d, (key, d)
            assert d["mpi_rank"] == d["id"] + 1 and d["local_size"] == n + 1
            assert d["cores"] == 1 and d["bound"] and isinstance(d["numa"], list) and d["numa"]
        cpusets = [d["cpuset"] for d in info]
        # Distinct cores, none of them slot 0's (the controller's).
        assert len(set(cpusets)) == n, cpusets
        mec.execute("import os; omp = os.environ.get('OMP_NUM_THREADS'); "
                    "blas = os.environ.get('OPENBLAS_NUM_THREADS'); "
                    "aff = sorted(os.sched_getaffinity(0))")
        assert mec.pull("omp") == ["1"] * n and mec.pull("blas") == ["1"] * n
        assert [len(a) for a in mec.pull("aff")] == [1] * n
    finally:
        mec.close()
    s = ipcluster("status", ipmpi_dir=ipdir)
    assert s.returncode == 0 and "local_rank" in s.stdout and "cpuset" in s.stdout, s.stdout
    assert_stopped(ipdir)


def test_user_thread_variables_are_kept_and_oversubscription_warned(ipdir):
    env = child_env()
    env["OMP_NUM_THREADS"] = "7"
    import subprocess
    from conftest import IPCLUSTER
    n = len(os.sched_getaffinity(0)) + 1
    r = subprocess.run([IPCLUSTER, "mpirun", "-n", str(n), "--client-ip", LOOPBACK, "--ipmpi-dir", ipdir],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    mec = mec_of(ipdir)
    try:
        mec.execute("import os; omp = os.environ.get('OMP_NUM_THREADS')")
        assert mec.pull("omp") == ["7"] * n
        assert all(d["oversubscribed"] for d in mec.engine_info())
    finally:
        mec.close()
    logs = os.path.join(ipdir, "log")
    text = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs) if f.startswith("ipengine-"))
    assert "oversubscribed node" in text
    assert_stopped(ipdir)


def test_script_runs_once_ready_and_its_status_ends_the_job(ipdir, tmp_path):
    script = tmp_path / "analysis.py"
    script.write_text("from ipmpi import client\n"
                      "mec = client.MultiEngineClient()\n"
                      "print('SCRIPT-IDS', mec.get_ids(), flush=True)\n"
                      "raise SystemExit(3)\n")
    r = ipcluster("mpirun", "-n", "2", "--script", str(script), "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "exited with status 3" in r.stdout
    logs = os.path.join(ipdir, "log")
    text = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs) if f.startswith("ipcluster-"))
    assert "SCRIPT-IDS [0, 1]" in text
    assert processes_with("--ipmpi-dir " + ipdir) == []
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))


def test_logdir_holds_every_log(ipdir, tmp_path):
    logdir = tmp_path / "logs"
    r = ipcluster("mpirun", "-n", "1", "--logdir", str(logdir), "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    names = os.listdir(logdir)
    assert any(n.startswith("ipcontroller-") for n in names) and any(n.startswith("ipengine-") for n in names)
    assert any(n.startswith("ipcluster-mpirun-") for n in names), names
    assert_stopped(ipdir)


@pytest.mark.parametrize("argv,words", [
    (["sge", "-n", "2"], "mode sge is not supported"),
    (["lsf", "-n", "2", "-s", "x.sh"], "mode lsf is not supported"),
    (["mpirun", "-n", "1", "-x"], "-x/-y"),
    (["mpirun", "-n", "1", "-y"], "-x/-y"),
    (["mpirun", "-n", "1", "-r"], "needs --client-port"),
    (["ssh", "--clusterfile", "/nonexistent/cluster.py"], "cannot read the clusterfile"),
    (["ssh", "--clusterfile", "/dev/null"], "must define engines"),
    (["mpirun", "-n", "1", "--script", "/nonexistent.py"], "no such file"),
])
def test_refusals_say_why_and_start_nothing(ipdir, argv, words):
    r = ipcluster(*argv, ipmpi_dir=ipdir)
    assert r.returncode != 0
    assert words in r.stderr, r.stderr
    assert processes_with("--ipmpi-dir " + ipdir) == []


@pytest.mark.parametrize("mode", ["slurm", "pbs"])
def test_unknown_placeholder_is_refused_before_submitting(ipdir, tmp_path, mode):
    t = tmp_path / "job.tmpl"
    t.write_text("#!/bin/sh\n#SBATCH --ntasks={{ranks}}\nexec {{jobstep}} {{no_such_thing}}\n")
    r = ipcluster(mode, "-n", "1", "-s", str(t), ipmpi_dir=ipdir)
    assert r.returncode == 1
    assert "line 3: unknown placeholder {{no_such_thing}}" in r.stderr and "{{engines}}" in r.stderr
