"""What every launcher shares: the error type, the launch description, the
process helpers and the template filler.

A launcher starts one ipmpi job (controller on rank 0, engines on ranks
1..N) in one way and answers for it afterwards, also from another process
that only has the record the launcher wrote into the run file:

    start()       submit or spawn the job; returns once it is handed over
                  (not once the engines are ready: Cluster waits for that)
    job_id()      the id a user would type: mpirun's pid, Slurm/PBS job id
    alive()       True while any part of the job exists (queued counts)
    state()       one line: "running", "pending: Resources", "gone"
    stop(timeout) end the job by force (signals, scancel, qdel) and wait
                  until nothing of it is left; the polite shutdown through
                  the controller is Cluster's business
    logs()        paths of the files that show what the job did
    record()      what a later process needs to find the job again
    from_record() the inverse (a classmethod)

Launchers never import ipmpi.cluster; Cluster imports them.
"""
import os
import re
import shlex
import signal
import subprocess
import time

__all__ = ["ClusterError", "LaunchSpec", "Launcher", "job_processes", "signal_session",
           "proc_stat", "tail", "render_template", "PLACEHOLDERS"]


class ClusterError(RuntimeError):
    """The cluster could not be started, found or stopped; the message says why."""


class LaunchSpec:
    """Everything a launcher needs to know about the job it starts.

    exe and ipmpi_args are the command each rank runs (the ipmpi executable
    and its options, --ipmpi-dir first); mpirun_args go to mpirun before
    it. Batch launchers also use queue, template, walltime, job_name and
    scheduler_args; the ssh launcher uses clusterfile. script is a client
    script the job runs once its engines answer (the job then ends with the
    script's exit status).
    """

    def __init__(self, n, ipmpi_dir, exe=None, ipmpi_args=(), mpirun_args=(), log_dir=None,
                 run_dir=None, script=None, queue=None, template=None, walltime=None,
                 job_name=None, scheduler_args=(), clusterfile=None, python=None,
                 ready_timeout=None):
        self.n = int(n)
        self.ipmpi_dir = ipmpi_dir
        self.exe = exe
        self.ipmpi_args = list(ipmpi_args)
        self.mpirun_args = list(mpirun_args)
        self.log_dir = log_dir or os.path.join(ipmpi_dir, "log")
        self.run_dir = run_dir or os.path.join(ipmpi_dir, "run")
        self.script = script
        self.queue = queue
        self.template = template
        self.walltime = walltime
        self.job_name = job_name or "ipmpi"
        self.scheduler_args = list(scheduler_args)
        self.clusterfile = clusterfile
        self.python = python
        self.ready_timeout = ready_timeout
        self.n_given = True     # False when -n was left at its default (ssh takes the clusterfile's)
        # Engines may join later (`ipcluster engines`): the job runs an
        # ompi-server (launchers/ompiserver.py) and its mpirun names it.
        self.join = False
        # For a job of engines that join a running controller (join.py):
        # the ompi-server URI file of that controller's job.
        self.use_ompi_server = None

    @property
    def ompi_uri(self):
        from .ompiserver import uri_path
        return uri_path(self.run_dir)

    @property
    def ranks(self):
        return self.n + 1

    def rank_command(self):
        """What each rank runs: [exe, --ipmpi-dir D, ...]."""
        return [self.exe] + self.ipmpi_args


class Launcher:
    """The interface (see the module text). Subclasses set mode and implement all."""

    mode = None

    def __init__(self, spec):
        self.spec = spec

    def start(self):
        raise NotImplementedError

    def job_id(self):
        raise NotImplementedError

    def alive(self):
        raise NotImplementedError

    def state(self):
        return "running" if self.alive() else "gone"

    def stop(self, timeout=10.0):
        raise NotImplementedError

    def logs(self):
        return []

    def local_pid(self):
        """The pid of a process on this host that leads the job, or None."""
        return None

    def record(self):
        return {"mode": self.mode}

    @classmethod
    def from_record(cls, spec, rec):
        raise NotImplementedError

    def describe(self):
        """One line for status: the kind of job and its id."""
        return "%s job %s" % (self.mode, self.job_id())


# ---- processes on this host -----------------------------------------------

def proc_stat(pid):
    """(state, ppid, pgrp, session, utime, stime) of pid from /proc, or None.

    The command name in /proc/PID/stat may hold spaces and parentheses, so
    the fields are split after its last ')'.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    try:
        return (rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[11]), int(rest[12]))
    except (IndexError, ValueError):
        return None


def job_processes(sid):
    """PIDs of the live (non-zombie) processes in session sid.

    Launchers start their job as a session leader, so its session holds
    mpirun and every rank it forked, whatever process groups Open MPI gives
    them.
    """
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st is not None and st[3] == sid and st[0] not in ("Z", "X"):
            pids.append(int(name))
    return pids


def signal_session(sid, sig):
    """Sends sig to every live process of session sid; returns how many it reached."""
    n = 0
    for pid in job_processes(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


def session_leader_alive(pid):
    """True while pid lives and still leads its own session (a reused pid does not)."""
    st = proc_stat(pid) if pid else None
    return st is not None and st[0] not in ("Z", "X") and st[3] == pid


def kill_session(pid, proc=None, term_wait=3.0):
    """SIGTERM, then SIGKILL, to every process of session pid; waits until it is empty."""
    if not pid:
        return
    if signal_session(pid, signal.SIGTERM):
        _wait(lambda: not job_processes(pid), term_wait)
    signal_session(pid, signal.SIGKILL)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if not _wait(lambda: not job_processes(pid), 5.0):
        signal_session(pid, signal.SIGKILL)


def _wait(pred, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def tail(path, lines=30):
    """The last lines of a text file, or a note that it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return "(cannot read %s: %s)" % (path, e.strerror)
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def run_tool(argv, timeout=30, env=None):
    """Runs a scheduler command; returns (status, stdout, stderr). A missing
    command is a ClusterError naming the package that provides it."""
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise ClusterError("%s is not installed (or not on PATH)" % argv[0]) from None
    except subprocess.TimeoutExpired:
        raise ClusterError("%s did not answer within %g s" % (" ".join(argv), timeout)) from None
    return r.returncode, r.stdout, r.stderr


# ---- job-script templates ---------------------------------------------------

# The placeholders a template may use, {{name}}; documented in the default
# templates (pbs/ipmpi.pbs, slurm/ipmpi.sbatch) and the README.
PLACEHOLDERS = {
    "engines": "number of engines N",
    "ranks": "MPI ranks, N + 1 (controller and engines)",
    "job_name": "the job's name (--job-name, default ipmpi)",
    "walltime": "wall-time limit, HH:MM:SS (--walltime, default 01:00:00)",
    "queue": "the queue (-q) or partition (-p); empty if none was given",
    "profile_dir": "the profile directory (IPMPI_DIR): furls, logs, run files",
    "ipmpi": "the command every rank runs: the ipmpi executable and its options",
    "mpirun_args": "extra mpirun arguments (--mpirun-args)",
    "jobstep": "the ipmpi job step: starts the command after `--`, waits for the engines, "
               "runs --script, ends the job with the script's status",
    "python": "the Python that runs ipmpi",
    "log": "the job's output file in the profile's log directory",
}

_PH = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render_template(text, values, source):
    """Fills {{name}} placeholders; an unknown one is a ClusterError naming
    it, its line and the known ones."""
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _PH.finditer(line):
            if m.group(1) not in PLACEHOLDERS:
                raise ClusterError("%s line %d: unknown placeholder {{%s}}; known placeholders: %s"
                                   % (source, lineno, m.group(1),
                                      ", ".join("{{%s}}" % k for k in sorted(PLACEHOLDERS))))

    def sub(m):
        v = values.get(m.group(1), "")
        return v if isinstance(v, str) else shlex.join(v) if isinstance(v, (list, tuple)) else str(v)

    return _PH.sub(sub, text)


def quote(argv):
    return shlex.join([str(a) for a in argv])
