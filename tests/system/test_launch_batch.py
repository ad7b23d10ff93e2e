"""ipcluster slurm and ipcluster pbs against a real (one-node) Slurm.

Needs Slurm running: `slurm/local-slurm.sh start` (as root; test.sh and CI
do it). Without it every test here FAILS, naming that command; none skips.
SLURM_CONF is taken from the environment, else local-slurm.sh's path.
The pbs mode goes through Debian's slurm-wlm-torque qsub/qstat/qdel, which
give the job no PBS_* variables and ignore #PBS -o/-e.

Every test cancels what it submitted; the module checks at the end that
Slurm lists no job of its own still pending or running.
"""
import json
import os
import shutil
import signal
import subprocess

import pytest

from conftest import (LOOPBACK, ipcluster, processes_with, run_record, wait_for)
from ipmpi import client

SLURM_CONF = os.environ.get("SLURM_CONF") or "/var/tmp/ipmpi-slurm/slurm.conf"
os.environ["SLURM_CONF"] = SLURM_CONF
SUBMITTED = []


def squeue(*args):
    return subprocess.run(["squeue", "--noheader"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=30)


@pytest.fixture(scope="module", autouse=True)
def slurm():
    try:
        r = subprocess.run(["sinfo", "--noheader", "-o", "%T"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=15)
        ok, why = r.returncode == 0, r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    if not ok:
        raise RuntimeError("Slurm is not running (SLURM_CONF=%s: %s): start it with "
                           "`slurm/local-slurm.sh start` (as root) before these tests" % (SLURM_CONF, why))
    for tool in ("sbatch", "qsub", "qstat", "qdel"):
        if shutil.which(tool) is None:
            raise RuntimeError("%s is missing: apt-get install slurm-client slurm-wlm-torque" % tool)
    yield
    # Nothing of ours left queued or running.
    left = [j for j in SUBMITTED if squeue("--jobs", j, "--states=PENDING,RUNNING,CONFIGURING,"
                                           "COMPLETING,SUSPENDED", "-o", "%i").stdout.strip()]
    for j in left:
        subprocess.run(["scancel", j], timeout=30)
    assert not left, "jobs left in Slurm: %s" % left




def record(d):
    rec = run_record(d)
    SUBMITTED.append(str(rec["job_id"]))
    return rec


def mec_of(d):
    return client.MultiEngineClient(furl_file=os.path.join(d, "security", "ipcontroller-mec.furl"),
                                    timeout=60)


def job_state(jobid):
    r = squeue("--jobs", str(jobid), "--states=all", "-o", "%T")
    return r.stdout.strip() or "GONE"


def assert_job_over(jobid, d):
    wait_for(lambda: job_state(jobid) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), 30,
             what="job %s to end" % jobid)
    wait_for(lambda: processes_with("--ipmpi-dir " + d) == [], 15, what="no process of the job")


@pytest.mark.parametrize("mode", ["slurm", "pbs"])
def test_batch_mode_start_status_stop(ipdir, mode):
    r = ipcluster(mode, "-n", "2", "--client-ip", LOOPBACK, "--timeout", "120", ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = record(ipdir)
    jobid = rec["job_id"]
    assert "2 engines ready" in r.stdout and "%s job %s" % (mode, jobid) in r.stdout
    assert job_state(jobid) == "RUNNING"
    s = ipcluster("status", ipmpi_dir=ipdir)
    assert s.returncode == 0, s.stderr
    assert "%s job %s: running" % (mode, jobid) in s.stdout and "2 of 2 engines alive" in s.stdout
    assert "local_rank" in s.stdout and "cpuset" in s.stdout
    with open(os.path.join(ipdir, "run", "job-info.json")) as f:
        info = json.load(f)
    # Under Slurm's qsub the job sees only SLURM_* ids: the job step falls back to them.
    assert info["scheduler_id"] == str(jobid) and "pbs_jobid" not in info
    mec = mec_of(ipdir)
    try:
        assert mec.get_ids() == [0, 1]
        mec.execute("import os; j = os.environ.get('SLURM_JOB_ID')")
        assert mec.pull("j") == [str(jobid)] * 2
    finally:
        mec.close()
    st = ipcluster("stop", ipmpi_dir=ipdir)
    assert st.returncode == 0, st.stdout + st.stderr
    assert_job_over(jobid, ipdir)
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))


@pytest.mark.parametrize("mode", ["slurm", "pbs"])
def test_engine_killed_inside_the_job_is_detected_and_the_job_goes_on(ipdir, mode):
    r = ipcluster(mode, "-n", "3", "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    jobid = record(ipdir)["job_id"]
    mec = mec_of(ipdir)
    try:
        pid = mec.engine_info(1)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: mec.get_ids() == [0, 2], 30, what="the controller to see engine 1 die")
        mec.execute("y = 5", targets=[0, 2])
        assert mec.pull("y", targets=[0, 2]) == [5, 5]
        assert job_state(jobid) == "RUNNING"
    finally:
        mec.close()
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0
    assert_job_over(jobid, ipdir)


@pytest.mark.parametrize("first,mode", [("slurm", "slurm"), ("mpirun", "pbs")])
def test_engines_join_from_a_later_batch_job_and_leave(ipdir, first, mode):
    # A second allocation's engines join the running controller (its job's
    # ompi-server: started by the job step inside the first batch job, or
    # by ipcluster next to mpirun), then leave; the first job goes on.
    r = ipcluster(first, "-n", "1", "--client-ip", LOOPBACK, "--timeout", "120", ipmpi_dir=ipdir)
    assert r.returncode == 0, r.stdout + r.stderr
    first_job = record(ipdir)["job_id"] if first == "slurm" else None
    j = ipcluster("engines", "-n", "2", "--mode", mode, "--timeout", "120", ipmpi_dir=ipdir)
    assert j.returncode == 0, j.stdout + j.stderr
    joined = run_record(ipdir)["joined"]
    assert [x["ids"] for x in joined] == [[1, 2]] and joined[0]["mode"] == mode, joined
    jobid = joined[0]["job"]
    SUBMITTED.append(str(jobid))
    assert "ids 1..2 (%s job %s)" % (mode, jobid) in j.stdout, j.stdout
    assert job_state(jobid) == "RUNNING"
    mec = mec_of(ipdir)
    try:
        assert mec.get_ids() == [0, 1, 2]
        mec.execute("import os; j = os.environ.get('SLURM_JOB_ID')")
        # Engines 1 and 2 run in the later allocation.
        assert mec.pull("j")[1:] == [str(jobid)] * 2
        s = ipcluster("status", ipmpi_dir=ipdir)
        assert "joined: %s job %s, ids 1..2" % (mode, jobid) in s.stdout, s.stdout
        st = ipcluster("stop", "--engines", str(jobid), ipmpi_dir=ipdir)
        assert st.returncode == 0, st.stdout + st.stderr
        wait_for(lambda: job_state(jobid) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), 30,
                 what="joined job %s to end" % jobid)
        assert mec.get_ids() == [0]
        assert [x["stdout"] for x in mec.execute("print('still')")] == ["still\n"]
        if first_job:
            assert job_state(first_job) == "RUNNING"
    finally:
        mec.close()
    assert ipcluster("stop", ipmpi_dir=ipdir).returncode == 0
    if first_job:
        assert_job_over(first_job, ipdir)
    wait_for(lambda: processes_with(ipdir) == [], 20, what="nothing of %s left (ranks, ompi-server)" % ipdir)


@pytest.mark.parametrize("mode,flag", [("slurm", "-p"), ("pbs", "-q")])
def test_queue_that_does_not_exist_is_refused_with_the_schedulers_words(ipdir, mode, flag):
    r = ipcluster(mode, "-n", "1", flag, "nosuchqueue", ipmpi_dir=ipdir)
    assert r.returncode == 1
    assert ("sbatch" if mode == "slurm" else "qsub") + " refused the job" in r.stderr, r.stderr
    assert "invalid partition" in r.stderr.lower(), r.stderr
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))


def test_template_sbatch_refuses_is_reported_with_its_message(ipdir, tmp_path):
    t = tmp_path / "bad.sbatch"
    t.write_text("#!/bin/sh\n#SBATCH --ntasks={{ranks}}\n#SBATCH --no-such-option\n"
                 "exec {{jobstep}} mpirun -n {{ranks}} {{ipmpi}}\n")
    r = ipcluster("slurm", "-n", "1", "-s", str(t), ipmpi_dir=ipdir)
    assert r.returncode == 1
    assert "sbatch refused the job" in r.stderr and "no-such-option" in r.stderr, r.stderr
    assert str(t) in r.stderr


def test_job_pending_past_the_timeout_is_reported_and_cancelled(ipdir):
    r = ipcluster("slurm", "-n", "1", "--timeout", "4", "--sbatch-args=--begin=now+3600",
                  ipmpi_dir=ipdir, timeout=120)
    assert r.returncode == 1
    assert "not ready after 4 s" in r.stderr and "pending: BeginTime" in r.stderr, r.stderr
    jobid = r.stderr.split("slurm job ")[1].split()[0]
    SUBMITTED.append(jobid)
    assert job_state(jobid) in ("CANCELLED", "GONE")


@pytest.mark.parametrize("mode", ["slurm", "pbs"])
def test_script_job_ends_with_the_scripts_status(ipdir, tmp_path, mode):
    script = tmp_path / "analysis.py"
    script.write_text("from ipmpi import client\nmec = client.MultiEngineClient()\n"
                      "mec.execute('import socket; h = socket.gethostname()')\n"
                      "print('SCRIPT-SAW', len(mec.pull('h')), 'engines', flush=True)\n"
                      "raise SystemExit(5)\n")
    r = ipcluster(mode, "-n", "2", "--script", str(script), "--client-ip", LOOPBACK, ipmpi_dir=ipdir)
    assert r.returncode == 5, r.stdout + r.stderr
    logs = os.path.join(ipdir, "log")
    out = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs)
                  if f.startswith("ipcluster-%s-" % mode))
    assert "SCRIPT-SAW 2 engines" in out and "exited with status 5" in out, out
    assert processes_with("--ipmpi-dir " + ipdir) == []
    assert not os.path.exists(os.path.join(ipdir, "run", "ipcluster.json"))
