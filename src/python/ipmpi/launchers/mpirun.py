"""Modes local, mpiexec and mpirun: one MPI job on this host.

`mpirun --enable-recovery -n N+1 ipmpi ...` (or mpiexec, the same program
under Open MPI; IPython 0.10 treats the two names alike) is started as a
session leader, so every process of the job can be found and signalled,
even the ranks Open MPI puts in process groups of their own. `local` is
IPython 0.10's name for "controller and engines on this host": here that is
the same MPI job. With a --script the session leader is the job step
(jobstep.py) around mpirun.
"""
import os
import subprocess
import sys

from . import ompiserver
from .base import ClusterError, Launcher, kill_session, session_leader_alive

JOBSTEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobstep.py")


def mpirun_command(spec, program="mpirun", hosts_cpus=None):
    """[program, --enable-recovery, (--oversubscribe), -n, N+1, *mpirun_args, exe, *args]."""
    cmd = [program, "--enable-recovery"]
    cpus = hosts_cpus if hosts_cpus is not None else (os.cpu_count() or 1)
    if spec.ranks > cpus and "--oversubscribe" not in spec.mpirun_args:
        cmd.append("--oversubscribe")
    return cmd + ["-n", str(spec.ranks)] + spec.mpirun_args + spec.rank_command()


def jobstep_command(spec, python=None):
    """The job step around an MPI command (see jobstep.py), as a list."""
    cmd = [python or spec.python or sys.executable, JOBSTEP, "--ipmpi-dir", spec.ipmpi_dir,
           "--engines", str(spec.n)]
    if spec.use_ompi_server:
        cmd += ["--use-ompi-server", spec.use_ompi_server]
    elif spec.join:
        cmd += ["--ompi-server-uri", spec.ompi_uri]
    if spec.script:
        cmd += ["--script", os.path.abspath(spec.script)]
    if spec.ready_timeout:
        cmd += ["--ready-timeout", "%g" % spec.ready_timeout]
    return cmd + ["--"]


def child_env():
    env = dict(os.environ)
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


class MpirunLauncher(Launcher):
    mode = "mpirun"
    program = "mpirun"

    what = "mpirun"   # the log's name: log/ipcluster-<what>-PID.log

    def __init__(self, spec):
        super().__init__(spec)
        self.pid = None
        self.log = None
        self.command = None
        self._proc = None
        self.server_pid = None   # the job's ompi-server, when this launcher started it

    def build_command(self):
        cmd = mpirun_command(self.spec, self.program)
        if self.spec.script:
            return jobstep_command(self.spec) + cmd
        if self.spec.use_ompi_server:
            return ompiserver.with_server(cmd, self.spec.use_ompi_server)
        if self.spec.join:
            return ompiserver.with_server(cmd, self.spec.ompi_uri)
        return cmd

    def popen(self, cmd, env=None, what="mpirun"):
        """Starts cmd as a session leader, output to log/ipcluster-<what>-PID.log."""
        os.makedirs(self.spec.log_dir, mode=0o700, exist_ok=True)
        # The pid is known only once it runs: the log is opened under a
        # provisional name and renamed (the open descriptor stays valid).
        provisional = os.path.join(self.spec.log_dir, "ipcluster-%s-starting-%d.log" % (what, os.getpid()))
        with open(provisional, "ab") as log:
            try:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=env or child_env(),
                                              start_new_session=True)
            except OSError as e:
                os.unlink(provisional)
                raise ClusterError("cannot run %s (%s): install openmpi-bin" % (cmd[0], e)) from None
        self.pid = self._proc.pid
        self.log = os.path.join(self.spec.log_dir, "ipcluster-%s-%d.log" % (what, self.pid))
        os.replace(provisional, self.log)
        self.command = cmd

    def start(self):
        if self.spec.join and not self.spec.script and not self.spec.use_ompi_server:
            # With a script the job step starts the server (jobstep.py).
            os.makedirs(self.spec.run_dir, mode=0o700, exist_ok=True)
            try:
                self.server_pid = ompiserver.start(self.spec.run_dir, child_env()).pid
            except RuntimeError as e:
                raise ClusterError(str(e)) from None
        try:
            self.popen(self.build_command(), what=self.what)
        except BaseException:
            kill_session(self.server_pid)
            raise

    def job_id(self):
        return str(self.pid)

    def local_pid(self):
        return self.pid

    def alive(self):
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return session_leader_alive(self.pid)

    def exit_status(self):
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout):
        """Waits up to timeout for the session leader to exit; True if it did."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=max(0.0, timeout))
                return True
            except subprocess.TimeoutExpired:
                return False
        import time
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def state(self):
        if self.alive():
            return "running (%s pid %d)" % (self.program, self.pid)
        rc = self.exit_status()
        return "exited" + (" with status %d" % rc if rc is not None else "")

    def stop(self, timeout=10.0):
        kill_session(self.pid, self._proc)
        kill_session(self.server_pid)

    def logs(self):
        return [self.log] if self.log else []

    def record(self):
        return {"mode": self.mode, "pid": self.pid, "log": self.log, "command": self.command,
                "server_pid": self.server_pid}

    @classmethod
    def from_record(cls, spec, rec):
        lc = cls(spec)
        lc.pid = rec.get("pid")
        lc.log = rec.get("log")
        lc.command = rec.get("command")
        lc.server_pid = rec.get("server_pid")
        return lc

    def describe(self):
        return "%s pid %s" % (self.program, self.pid)


class MpiexecLauncher(MpirunLauncher):
    mode = "mpiexec"
    program = "mpiexec"


class LocalLauncher(MpirunLauncher):
    """IPython 0.10's `ipcluster local`: everything on this host (one MPI job)."""
    mode = "local"
