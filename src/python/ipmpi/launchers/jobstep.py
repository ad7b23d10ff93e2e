"""The ipmpi job step: what a batch job script (or `ipcluster ... --script`)
runs around `mpirun --enable-recovery -n N+1 ipmpi ...`.

    python3 .../ipmpi/launchers/jobstep.py --ipmpi-dir D --engines N
            [--script S] [--ready-timeout T] -- mpirun ... ipmpi ...

It records where the job runs (host, this pid, the scheduler's ids as the
job sees them: SLURM_JOB_ID, PBS_JOBID and PBS_NODEFILE where present) in
D/run/job-info.json, starts the command in a session of its own and
forwards SIGTERM/SIGINT/SIGHUP to it (scancel and qdel signal the batch
shell), so no rank outlives the job step.

Without --script it waits for the command and exits with its status. With
--script it waits until the controller answers with N engines, runs
`PYTHON S` with IPMPI_DIR=D (so MultiEngineClient() finds the furl), its
output going to this step's output (the job's log), writes the status to
D/run/script-status.json, shuts the cluster down and exits with the
script's status.

Run as a file (not -m) so that it works wherever the ipmpi package lies:
its own package's parent directory is put first on sys.path.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ipmpi.launchers import ompiserver  # noqa: E402
from ipmpi.launchers.base import kill_session, signal_session  # noqa: E402

INFO = "job-info.json"
SCRIPT_STATUS = "script-status.json"


def _say(msg):
    print("ipmpi-jobstep: %s" % msg, flush=True)


def _write_json(path, obj):
    tmp = path + ".tmp.%d" % os.getpid()
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def job_info():
    """Where this job step runs and the scheduler's ids as the job sees them."""
    env = os.environ
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for key in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "PBS_JOBID", "PBS_NODEFILE",
                "PBS_QUEUE", "PBS_O_WORKDIR"):
        if env.get(key):
            info[key.lower()] = env[key]
    nodefile = env.get("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile) as f:
                names = [line.strip() for line in f if line.strip()]
            info["nodes"] = sorted(set(names))
            info["slots"] = len(names)
        except OSError as e:
            info["nodes_error"] = "cannot read PBS_NODEFILE %s: %s" % (nodefile, e.strerror)
    # Real PBS names the job in PBS_JOBID; under Slurm's qsub wrapper the job
    # sees only SLURM_* variables: fall back to Slurm's id.
    info["scheduler_id"] = env.get("PBS_JOBID") or env.get("SLURM_JOB_ID") or ""
    return info


def _wait_ready(ipmpi_dir, n, timeout, proc):
    from ipmpi import client
    sec = os.path.join(ipmpi_dir, "security")
    mec_furl = os.path.join(sec, "ipcontroller-mec.furl")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the MPI job exited with status %d before its engines were ready"
                               % proc.returncode)
        if os.path.exists(mec_furl) and os.path.exists(os.path.join(sec, "ipcontroller-tc.furl")):
            try:
                mec = client.MultiEngineClient(furl_file=mec_furl, timeout=10, connect_timeout=10)
                try:
                    ids = mec.get_ids()
                finally:
                    mec.close()
                if len(ids) >= n:
                    return
            except Exception:
                pass
        if time.monotonic() >= deadline:
            raise RuntimeError("the engines were not ready after %g s" % timeout)
        time.sleep(0.1)


def _shutdown(ipmpi_dir, proc, timeout=30):
    from ipmpi import client
    try:
        mec = client.MultiEngineClient(furl_file=os.path.join(ipmpi_dir, "security",
                                                              "ipcontroller-mec.furl"),
                                       timeout=10, connect_timeout=10)
        try:
            mec.shutdown()
        finally:
            mec.close()
    except Exception as e:
        _say("shutdown request failed (%s: %s); signalling the job" % (type(e).__name__, e))
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    kill_session(proc.pid, proc)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: jobstep.py --ipmpi-dir D --engines N [--script S] -- COMMAND...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="ipmpi-jobstep")
    ap.add_argument("--ipmpi-dir", required=True)
    ap.add_argument("--engines", type=int, required=True)
    ap.add_argument("--script", default=None)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--ompi-server-uri", default=None,
                    help="start an ompi-server writing its URI here and name it to mpirun "
                         "(engines may join this job later)")
    ap.add_argument("--use-ompi-server", default=None,
                    help="name this running server's URI file to mpirun: a job of engines that "
                         "join a running controller (records nothing in job-info.json)")
    a = ap.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    run_dir = os.path.join(a.ipmpi_dir, "run")
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ)
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env["IPMPI_DIR"] = a.ipmpi_dir
    server = None
    if a.use_ompi_server:
        cmd = ompiserver.with_server(cmd, a.use_ompi_server)
    elif a.ompi_server_uri:
        try:
            server = ompiserver.start(os.path.dirname(a.ompi_server_uri), env)
        except RuntimeError as e:
            _say("%s; engines cannot join this job later" % e)
        else:
            cmd = ompiserver.with_server(cmd, a.ompi_server_uri)
    info = job_info()
    info["command"] = cmd
    if not a.use_ompi_server:
        _write_json(os.path.join(run_dir, INFO), info)
    _say("job %s on %s: %s" % (info["scheduler_id"] or "(no scheduler)", info["host"], " ".join(cmd)))

    try:
        return _run(a, cmd, env, run_dir)
    finally:
        # Whichever way the step ends (also by a forwarded signal: its
        # SystemExit comes through here), its ompi-server ends with it.
        if server is not None:
            kill_session(server.pid, server)


def _run(a, cmd, env, run_dir):
    """Runs cmd, and the script once the engines answer; the exit status."""
    sys.stdout.flush()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def forward(signum, frame):
        signal_session(proc.pid, signal.SIGTERM)
        kill_session(proc.pid, proc, term_wait=2.0)
        sys.exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)

    if not a.script:
        rc = proc.wait()
        kill_session(proc.pid, proc)
        _say("MPI job ended with status %d" % rc)
        return rc

    try:
        _wait_ready(a.ipmpi_dir, a.engines, a.ready_timeout, proc)
    except RuntimeError as e:
        _say("%s; not running %s" % (e, a.script))
        _write_json(os.path.join(run_dir, SCRIPT_STATUS), {"script": a.script, "status": None,
                                                            "error": str(e)})
        kill_session(proc.pid, proc)
        return 1
    python = os.environ.get("IPMPI_PYTHON") or sys.executable
    _say("%d engines ready; running %s" % (a.engines, a.script))
    t0 = time.monotonic()
    r = subprocess.run([python, a.script], stdin=subprocess.DEVNULL, env=env)
    rc = r.returncode if r.returncode >= 0 else 128 - r.returncode
    _say("script %s exited with status %d after %.1f s" % (a.script, rc, time.monotonic() - t0))
    _write_json(os.path.join(run_dir, SCRIPT_STATUS), {"script": a.script, "status": rc})
    _shutdown(a.ipmpi_dir, proc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
