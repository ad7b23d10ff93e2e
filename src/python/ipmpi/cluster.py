"""Start, watch and stop an ipmpi cluster (the `ipcluster` command).

A cluster is one MPI job: the controller on rank 0 and N engines on ranks
1..N. How the job is started is a launcher's business (ipmpi.launchers: one
per mode: local, mpirun, mpiexec, slurm, pbs, ssh); `Cluster` picks the
launcher, waits until the controller has written its furl files and answers
with N engines (or reports, at the timeout, the job's log tail and the
scheduler's state), and records the job in $IPMPI_DIR/run/ipcluster.json so
that a later `ipcluster stop` or `ipcluster status`, in another process,
finds it whatever kind of job it is.

Stopping asks the controller to shut the job down (MultiEngineClient.shutdown)
and, if that does not end it in time, has the launcher end it by force:
signals to every process of the job's session (mpirun, ssh), scancel or qdel
(batch jobs). Nothing of a job is left running or queued after stop(), nor
after a start() that failed.

Used by the `ipcluster` script (main), by the system tests and by the
benchmarks. Not thread-safe: one Cluster object belongs to one thread.
"""

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time

from ipmpi import joining
from ipmpi.launchers import MODES, REFUSED, launcher_class
from ipmpi.launchers.base import (ClusterError, LaunchSpec, job_processes, proc_stat as _proc_stat,
                                  signal_session as _signal_session, tail as _tail)
from ipmpi.launchers.jobstep import INFO as JOB_INFO, SCRIPT_STATUS

MEC_FURL = "ipcontroller-mec.furl"
TC_FURL = "ipcontroller-tc.furl"
RUN_FILE = "ipcluster.json"

__all__ = ["Cluster", "ClusterError", "main", "default_ipmpi_dir", "job_processes"]


def default_ipmpi_dir():
    """$IPMPI_DIR, else ~/.ipmpi (the same rule the controller and client use)."""
    d = os.environ.get("IPMPI_DIR")
    return d if d else os.path.join(os.path.expanduser("~"), ".ipmpi")


def _split_args(args):
    """Accepts a shell-quoted string or a sequence of arguments."""
    if args is None:
        return []
    if isinstance(args, str):
        return shlex.split(args)
    return [str(a) for a in args]


def furl_host(furl_text):
    """The host part of a furl (without IPv6 brackets), or None if malformed."""
    m = re.match(r"^\s*ipmpi\+tls://[0-9a-fA-F]+@(\[[^\]]+\]|[^:/\s]+):(\d+)/", furl_text)
    if not m:
        return None
    return m.group(1).strip("[]")


def is_loopback_host(host):
    """True if host is a loopback address or a name that resolves only to loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos}
    return bool(addrs) and all(a.is_loopback for a in addrs)


def find_ipmpi(ipmpi_bin=None, bindir=None):
    """The ipmpi executable: ipmpi_bin, else $IPMPI_BIN, else bindir/ipmpi, else PATH."""
    if ipmpi_bin:
        candidates = [ipmpi_bin]
    else:
        candidates = []
        if os.environ.get("IPMPI_BIN"):
            candidates.append(os.environ["IPMPI_BIN"])
        if bindir:
            candidates.append(os.path.join(bindir, "ipmpi"))
        found = shutil.which("ipmpi")
        if found:
            candidates.append(found)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    if ipmpi_bin:
        raise ClusterError("ipmpi executable %s does not exist or is not executable" % ipmpi_bin)
    raise ClusterError("cannot find the ipmpi executable: install ipmpi (make install), "
                       "put it on PATH, or set IPMPI_BIN")


# Set by the ipcluster script to the directory its ipmpi lives in (the
# configured bindir, or the build tree when run from there).
_script_bindir = None



class Cluster:
    """One ipmpi job: a controller and n engines, started by a launcher.

    with Cluster(n=4) as c:                       # mpirun on this host
        mec = c.client()
    Cluster(n=16, mode="slurm", queue="debug")    # an sbatch job
    Cluster(mode="ssh", clusterfile="hosts.py")   # engines on other hosts

    mode is one of ipmpi.launchers.MODES. mpi="mpi4py" gives every engine
    `comm` (the engines-only communicator) and `MPI`; bind is the engines'
    placement (auto, core, numa, none). script: a client script the job
    runs once its engines answer; the job ends with it (wait_script()).
    """

    def __init__(self, n=4, ipmpi_dir=None, mpirun_args=(), client_ip=None, client_port=None,
                 engine_args=(), ipmpi_bin=None, mode="mpirun", mpi=None, bind=None, script=None,
                 queue=None, template=None, walltime=None, job_name=None, scheduler_args=(),
                 clusterfile=None, logdir=None, join=None):
        self.mode = mode
        self.launcher_cls = launcher_class(mode)
        if int(n) < 1:
            raise ValueError("a cluster needs at least one engine (n >= 1)")
        self.n = int(n)
        self.ipmpi_dir = os.path.abspath(os.path.expanduser(ipmpi_dir or default_ipmpi_dir()))
        self.mpirun_args = _split_args(mpirun_args)
        self.engine_args = _split_args(engine_args)
        self.client_ip = client_ip
        self.client_port = client_port
        self.ipmpi_bin = ipmpi_bin
        self.mpi = mpi
        self.bind = bind
        self.script = os.path.abspath(script) if script else None
        self.logdir = os.path.abspath(os.path.expanduser(logdir)) if logdir else None
        self.security_dir = os.path.join(self.ipmpi_dir, "security")
        self.log_dir = os.path.join(self.ipmpi_dir, "log")
        self.run_dir = os.path.join(self.ipmpi_dir, "run")
        self.mec_furl = os.path.join(self.security_dir, MEC_FURL)
        self.tc_furl = os.path.join(self.security_dir, TC_FURL)
        self.run_file = os.path.join(self.run_dir, RUN_FILE)
        self.spec = LaunchSpec(self.n, self.ipmpi_dir, mpirun_args=self.mpirun_args,
                               log_dir=self.log_dir, run_dir=self.run_dir, script=self.script,
                               queue=queue, template=template, walltime=walltime, job_name=job_name,
                               scheduler_args=_split_args(scheduler_args), clusterfile=clusterfile,
                               python=sys.executable)
        # Engines may join later (ipmpi.joining): off in the ssh mode, whose
        # hosts would each need to reach this host's ompi-server.
        self.join = (mode != "ssh") if join is None else bool(join)
        self.spec.join = self.join
        self.joined = []   # jobs of engines that joined (records, ipmpi.joining)
        self.launcher = None
        self._started_at = None
        # Wall-clock times (time.time()) of this process's start-up steps:
        # "launch" (the launcher is started), "furl" (the furl files seen),
        # "answered" (a client got the N engine ids). The ranks' own steps
        # are in their logs (tools/startup_phases.py puts both together).
        self.startup_times = {}

    # ---- compatibility with the one-mode Cluster ------------------------------

    @property
    def pid(self):
        """The pid of the job's leader on this host (mpirun, or the job step
        with --script), or None for batch jobs."""
        return self.launcher.local_pid() if self.launcher else None

    @property
    def mpirun_log(self):
        logs = self.launcher.logs() if self.launcher else []
        return logs[0] if logs else None

    # ---- the job record in DIR/run/ipcluster.json -------------------------

    @classmethod
    def attach(cls, ipmpi_dir=None):
        """A Cluster for the job recorded in ipmpi_dir's run file.

        Raises ClusterError if there is no run file. The job may have ended
        since; check running().
        """
        d = os.path.abspath(os.path.expanduser(ipmpi_dir or default_ipmpi_dir()))
        run_file = os.path.join(d, "run", RUN_FILE)
        try:
            with open(run_file) as f:
                rec = json.load(f)
        except FileNotFoundError:
            raise ClusterError("no cluster is running in %s (no %s)" % (d, run_file)) from None
        except (OSError, ValueError) as e:
            raise ClusterError("cannot read %s: %s" % (run_file, e)) from None
        lrec = rec.get("launcher") or {"mode": "mpirun", "pid": rec.get("pid"),
                                       "log": rec.get("mpirun_log")}
        c = cls(n=max(1, int(rec.get("n", 1))), ipmpi_dir=d, mode=lrec.get("mode", "mpirun"))
        c.mec_furl = rec.get("mec_furl", c.mec_furl)
        c.tc_furl = rec.get("tc_furl", c.tc_furl)
        c._started_at = rec.get("started")
        c.script = rec.get("script")
        c.join = c.spec.join = bool(rec.get("join", False))
        c.joined = list(rec.get("joined", []))
        c.launcher = c.launcher_cls.from_record(c.spec, lrec)
        return c

    def _write_run_file(self):
        pid = self.pid
        rec = {"mode": self.mode, "pid": pid, "pgid": pid, "sid": pid, "n": self.n,
               "job_id": self.launcher.job_id(), "mec_furl": self.mec_furl, "tc_furl": self.tc_furl,
               "ipmpi_dir": self.ipmpi_dir, "mpirun_log": self.mpirun_log, "started": self._started_at,
               "script": self.script, "command": getattr(self.launcher, "command", None),
               "launcher": self.launcher.record(), "join": self.join, "joined": self.joined}
        tmp = self.run_file + ".tmp.%d" % os.getpid()
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.run_file)

    def _remove_run_file(self):
        try:
            with open(self.run_file) as f:
                rec = json.load(f)
            # Only our own record: never remove another job's.
            if str(rec.get("job_id", rec.get("pid"))) != str(self.launcher.job_id()):
                return
        except (OSError, ValueError):
            return
        try:
            os.unlink(self.run_file)
        except FileNotFoundError:
            pass

    def running(self):
        """True while this job exists (running, or queued for a batch job)."""
        return self.launcher is not None and self.launcher.alive()

    def job_info(self):
        """What the job step recorded inside a batch job (host, scheduler ids), or {}."""
        try:
            with open(os.path.join(self.run_dir, JOB_INFO)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    # ---- start ------------------------------------------------------------

    def rank_args(self):
        """ipmpi's options for every rank."""
        args = ["--ipmpi-dir", self.ipmpi_dir]
        if self.client_ip:
            args += ["--client-ip", str(self.client_ip)]
        if self.client_port:
            args += ["--client-port", str(int(self.client_port))]
        if self.mpi:
            args += ["--mpi", self.mpi]
        if self.bind:
            args += ["--bind", self.bind]
        if self.join:
            args += ["--accept-joins", joining.port_file(self)]
        return args + self.engine_args

    def _prepare_spec(self):
        self.spec.n = self.n
        self.spec.exe = find_ipmpi(self.ipmpi_bin, _script_bindir)
        self.spec.ipmpi_args = self.rank_args()

    def command(self):
        """The command line this cluster runs (the mpirun one; a batch mode's
        job script runs it inside the allocation)."""
        self._prepare_spec()
        lc = self.launcher_cls(self.spec)
        if hasattr(lc, "build_command") and self.mode != "ssh":
            return lc.build_command()
        from ipmpi.launchers.mpirun import mpirun_command
        return mpirun_command(self.spec)

    def _check_not_running(self):
        try:
            other = Cluster.attach(self.ipmpi_dir)
        except ClusterError:
            return
        if other.running():
            raise ClusterError("a cluster is already running in %s (%s); stop it first "
                               "with: ipcluster stop --ipmpi-dir %s"
                               % (self.ipmpi_dir, other.launcher.describe(), shlex.quote(self.ipmpi_dir)))
        # A stale record of a job that ended without ipcluster stop: clean
        # up whatever of it is left, then start afresh.
        try:
            other.launcher.stop(timeout=10)
        except ClusterError:
            pass
        try:
            os.unlink(self.run_file)
        except FileNotFoundError:
            pass

    def _use_logdir(self):
        """--logdir: DIR/log becomes a link to it, so every rank logs there too."""
        if not self.logdir:
            return
        os.makedirs(self.logdir, mode=0o700, exist_ok=True)
        if os.path.islink(self.log_dir):
            if os.path.realpath(self.log_dir) == os.path.realpath(self.logdir):
                return
            os.unlink(self.log_dir)
        elif os.path.isdir(self.log_dir):
            if os.listdir(self.log_dir):
                raise ClusterError("--logdir %s: %s already holds logs; move them away or remove it "
                                   "(ipmpi's ranks log into DIR/log, which --logdir makes a link)"
                                   % (self.logdir, self.log_dir))
            os.rmdir(self.log_dir)
        os.symlink(self.logdir, self.log_dir)

    def start(self, timeout=120):
        """Starts the job; returns when all n engines answer. Raises ClusterError.

        On any failure the job is ended (killed, or cancelled in its
        queue) and the error carries the tails of the controller's and the
        launcher's logs and, for batch jobs, the scheduler's state.
        """
        if self.running():
            raise ClusterError("this cluster is already started (%s)" % self.launcher.describe())
        self._check_not_running()
        os.makedirs(self.ipmpi_dir, mode=0o700, exist_ok=True)
        self._use_logdir()
        for d in (self.run_dir, self.log_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # A new security/ is 0700; an existing one open to others is not
        # fixed here but refused by the controller, saying `chmod 700`:
        # others may have read or replaced the keys in it.
        os.makedirs(self.security_dir, mode=0o700, exist_ok=True)
        # A furl or job record left by a job that died must not be taken for
        # the new one's.
        for p in (self.mec_furl, self.tc_furl, os.path.join(self.run_dir, JOB_INFO),
                  os.path.join(self.run_dir, SCRIPT_STATUS), joining.port_file(self), self.spec.ompi_uri):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._prepare_spec()
        self.spec.ready_timeout = timeout
        self._started_at = time.time()
        self.startup_times = {"launch": self._started_at}
        self.launcher = self.launcher_cls(self.spec)
        self.launcher.start()
        self.n = self.spec.n          # the ssh mode takes it from the clusterfile
        try:
            self._write_run_file()
            try:
                self._wait_ready(timeout)
            except ClusterError:
                # With a script the job step may see the engines, run a
                # short script and end the job before this process looked:
                # the script's status says the job did get ready.
                if not (self.script and self._script_status() is not None):
                    raise
        except BaseException:
            try:
                self.launcher.stop(timeout=30)
            finally:
                self._remove_run_file()
            raise
        return self

    def _controller_log(self):
        """The newest controller log written since this job started, or None."""
        best, best_t = None, 0.0
        try:
            names = os.listdir(self.log_dir)
        except OSError:
            return None
        for name in names:
            if name.startswith("ipcontroller-") and name.endswith(".log"):
                p = os.path.join(self.log_dir, name)
                try:
                    t = os.path.getmtime(p)
                except OSError:
                    continue
                if t >= (self._started_at or 0) - 1 and t > best_t:
                    best, best_t = p, t
        return best

    def diagnostics(self):
        """Text with the tails of the controller log and the launcher's logs."""
        out = []
        clog = self._controller_log()
        if clog:
            out.append("--- controller log %s (tail) ---\n%s" % (clog, _tail(clog)))
        else:
            out.append("--- no controller log in %s ---" % self.log_dir)
        if self.launcher is not None:
            label = "mpirun" if self.mode in ("mpirun", "mpiexec", "local", "ssh") else self.mode + " job output"
            seen = False
            for p in self.launcher.logs():
                if os.path.exists(p) and (os.path.getsize(p) or not seen):
                    out.append("--- %s log %s (tail) ---\n%s" % (label, p, _tail(p)))
                    seen = True
            if not seen:
                out.append("--- no output from the job yet (%s) ---" % ", ".join(self.launcher.logs()))
        return "\n".join(out)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        delay = 0.01
        # Asking a scheduler costs a process and a round trip: not every turn.
        batch = self.mode in ("slurm", "pbs")
        next_poll = 0.0
        while not (os.path.exists(self.mec_furl) and os.path.exists(self.tc_furl)):
            now = time.monotonic()
            if now >= next_poll:
                if not self.launcher.alive():
                    rc = getattr(self.launcher, "exit_status", lambda: None)()
                    if rc is not None:
                        raise ClusterError("%s exited with status %d before the engines were ready\n%s"
                                           % (self.launcher.program, rc, self.diagnostics()))
                    raise ClusterError("the %s ended before the engines were ready (%s)\n%s"
                                       % (self.launcher.describe(), self.launcher.state(),
                                          self.diagnostics()))
                next_poll = now + (1.0 if batch else 0.0)
            if now >= deadline:
                state = self.launcher.state()
                raise ClusterError("the cluster was not ready after %g s: %s %s (no furl files in %s)\n%s"
                                   % (timeout, self.launcher.describe(), state, self.security_dir,
                                      self.diagnostics()))
            time.sleep(delay)
            # At most 20 ms late: up to 0.2 s was a tenth of a 64-engine start.
            delay = min(delay * 1.5, 0.02)
        self.startup_times["furl"] = time.time()
        remaining = max(1.0, deadline - time.monotonic())
        try:
            mec = self.client(timeout=remaining, connect_timeout=remaining)
            try:
                ids = mec.get_ids()
                self.startup_times["answered"] = time.time()
            finally:
                mec.close()
        except Exception as e:
            raise ClusterError("the controller wrote its furl but did not answer: %s: %s\n%s"
                               % (type(e).__name__, e, self.diagnostics())) from None
        if len(ids) != self.n:
            raise ClusterError("only %d of %d engines started (ids %s)\n%s"
                               % (len(ids), self.n, ids, self.diagnostics()))

    def add_engines(self, n=None, **kw):
        """Starts a job of n more engines that join this running cluster
        (ipmpi.joining.add_engines: mode=, timeout=, mpi=, ...); returns its
        record ({"job", "ids", ...}) once they answer."""
        return joining.add_engines(self, n, **kw)

    def remove_engines(self, job, timeout=20.0):
        """The engines of joined job `job` leave; returns their ids."""
        return joining.remove_engines(self, job, timeout=timeout)

    def client(self, **kw):
        """A MultiEngineClient connected to this cluster (caller closes it)."""
        from ipmpi import client
        return client.MultiEngineClient(furl_file=self.mec_furl, **kw)

    def wait_script(self, timeout=None):
        """With script=: waits until the job ends; returns the script's exit
        status (None if it never ran, with the reason in the logs)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = 1.0 if self.mode in ("slurm", "pbs") else 0.05
        while self.running():
            if deadline is not None and time.monotonic() >= deadline:
                raise ClusterError("the job's script was still running after %g s" % timeout)
            time.sleep(poll)
        status = self._script_status()
        self.stop(timeout=10)
        return status

    def _script_status(self):
        """The exit status the job step recorded for the script, or None."""
        try:
            with open(os.path.join(self.run_dir, SCRIPT_STATUS)) as f:
                return json.load(f).get("status")
        except (OSError, ValueError):
            return None

    # ---- stop -------------------------------------------------------------

    def _wait_exit(self, timeout):
        """Waits up to timeout for the job to end; True if it did."""
        if hasattr(self.launcher, "wait"):
            return self.launcher.wait(timeout)
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def _kill(self):
        """Ends the job by force (signals, scancel, qdel); nothing of it is left."""
        if self.launcher is not None:
            self.launcher.stop(timeout=30)

    def stop(self, timeout=20):
        """Stops the job: shutdown request, then the launcher's force after timeout seconds.

        Returns True if the job stopped cleanly on its own, False if it had
        to be killed or cancelled. No process of the job survives either
        way, and no batch job stays queued.
        """
        if self.launcher is None:
            return True
        clean = True
        deadline = time.monotonic() + timeout
        if self.running():
            if os.path.exists(self.mec_furl):
                try:
                    mec = self.client(timeout=min(5.0, timeout), connect_timeout=min(5.0, timeout))
                    try:
                        mec.shutdown()
                    finally:
                        try:
                            mec.close()
                        except Exception:
                            pass
                except Exception:
                    # The controller may be gone or wedged (or the job still
                    # queued): the launcher's force ends it all the same.
                    clean = False
            else:
                clean = False
            if not self._wait_exit(max(0.0, deadline - time.monotonic())):
                clean = False
        if self.running():
            clean = False
        # Whatever is left (engines that outlive mpirun, a job that never
        # answered, a batch job still queued): the launcher ends it, and
        # the jobs of engines that joined later.
        self.launcher.stop(timeout=30)
        if self.joined:
            joining.stop_all(self)
        for p in (self.mec_furl, self.tc_furl, joining.port_file(self), self.spec.ompi_uri):
            # A furl (or join port) of a stopped job only misleads clients.
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._remove_run_file()
        return clean

    def __enter__(self):
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        return "<Cluster %s n=%d dir=%s %s %s>" % (
            self.mode, self.n, self.ipmpi_dir, self.launcher.describe() if self.launcher else "-",
            "running" if self.running() else "stopped")


# ---- the ipcluster command ---------------------------------------------------

_USAGE = """\
ipcluster mpirun -n N [options]   start a controller and N engines on this host
       ipcluster local|mpiexec -n N [options]   the same (IPython 0.10's names)
       ipcluster slurm -n N [-p PARTITION] [-s SCRIPT] [--sbatch-args ARGS]   as an sbatch job
       ipcluster pbs -n N [-q QUEUE] [-s SCRIPT]   as a qsub job
       ipcluster ssh --clusterfile FILE  engines on the hosts the file names
       ipcluster -n N [options]          the same as ipcluster mpirun
       ipcluster engines -n N [--mode M] more engines joining the running cluster
       ipcluster stop [--ipmpi-dir D]    stop the cluster running in D
       ipcluster stop --engines JOB      only the engines of a joined job leave
       ipcluster status [--ipmpi-dir D]  the job, its scheduler state and its engines
       ipcluster MODE --help             the options of one mode

Every mode returns once every engine is ready (with --script: once the
script has run and the job has ended); the job keeps running in the
background until `ipcluster stop`. See ipcluster(1) and the user guide.
"""


_MODE_HELP = {
    "local": ("start a cluster on this host (IPython 0.10's local mode: one MPI job here)",
              "Start a controller and N engines on this host as one MPI job "
              "(mpirun --enable-recovery -n N+1 ipmpi) and return once every engine is ready."),
    "mpirun": ("start a cluster with mpirun",
               "Start a controller and N engines on this host as one MPI job "
               "(mpirun --enable-recovery -n N+1 ipmpi) and return once every "
               "engine is ready; the job runs on until `ipcluster stop`."),
    "mpiexec": ("start a cluster with mpiexec",
                "As mpirun, with the command named mpiexec (IPython 0.10 treats them alike)."),
    "slurm": ("submit the cluster as a Slurm batch job (sbatch)",
              "Fill a job template (default slurm/ipmpi.sbatch), submit it with sbatch and return "
              "once the job runs and every engine answers. Inside the allocation the job runs "
              "mpirun --enable-recovery, so an engine's death does not end it."),
    "pbs": ("submit the cluster as a PBS batch job (qsub)",
            "Fill a job template (default pbs/ipmpi.pbs), submit it with qsub and return once the "
            "job runs and every engine answers. Works under Torque/PBS Pro and Slurm's qsub wrapper."),
    "ssh": ("start engines on other hosts over ssh (IPython 0.10 clusterfile)",
            "One MPI job: the controller on this host, the engines on the hosts of the clusterfile "
            "(engines = {'host': n, ...}), started by mpirun's ssh launcher from a generated hostfile."),
}


def _parser():
    p = argparse.ArgumentParser(prog="ipcluster", usage=_USAGE,
                                description="Start and stop ipmpi clusters (one MPI job: "
                                            "controller on rank 0, engines on ranks 1..N).")
    sub = p.add_subparsers(dest="cmd", metavar="{local,mpirun,mpiexec,slurm,pbs,ssh,engines,stop,status}",
                           prog="ipcluster")
    sub.required = True

    def common(sp):
        sp.add_argument("--ipmpi-dir", metavar="D", default=None,
                        help="profile directory (default $IPMPI_DIR or ~/.ipmpi)")

    def start_options(m, mode):
        m.add_argument("-n", "--n", type=int, default=None, metavar="N",
                       help="number of engines (default 4; ssh: the clusterfile's sum)")
        m.add_argument("--mpi", choices=("mpi4py", "none"), default=None,
                       help="mpi4py: every engine gets `comm` (engines only) and `MPI`")
        m.add_argument("--bind", choices=("auto", "core", "numa", "none"), default=None,
                       help="engine placement with hwloc (default auto: keep a launcher's binding, "
                            "else one core each, spread over packages/NUMA nodes first)")
        m.add_argument("--mpirun-args", default="", metavar="ARGS",
                       help='extra arguments for mpirun, one quoted string (e.g. "--bind-to none")')
        m.add_argument("--client-ip", default=None, metavar="ADDR",
                       help="address the controller listens on and writes into the furls")
        m.add_argument("--client-port", type=int, default=None, metavar="PORT",
                       help="fixed client port; the furls then stay the same across restarts")
        m.add_argument("-r", dest="reuse", action="store_true",
                       help="reuse furls across restarts (IPython 0.10): needs --client-port")
        m.add_argument("--engine-args", default="", metavar="ARGS",
                       help='extra arguments for every ipmpi rank, e.g. --engine-args="--wait-max-us 0"')
        m.add_argument("--timeout", type=float, default=None, metavar="S",
                       help="seconds to wait for the engines (default 120; batch modes 300, "
                            "including the time queued)")
        m.add_argument("--script", default=None, metavar="FILE",
                       help="run this client script on the controller's node once the engines are "
                            "ready; its output goes to the job's log and the job ends with its "
                            "exit status (ipcluster waits and exits with it)")
        m.add_argument("--logdir", default=None, metavar="DIR",
                       help="directory for every log of the cluster (DIR/log becomes a link to it)")
        m.add_argument("-x", dest="no_client_security", action="store_true",
                       help="refused: IPython 0.10 turned client security off; ipmpi's furls always "
                            "carry a key and TLS")
        m.add_argument("-y", dest="no_engine_security", action="store_true",
                       help="refused: engines reach the controller over MPI, with no furl to secure")
        m.add_argument("--ipmpi-bin", default=None, metavar="PATH",
                       help="the ipmpi executable (default $IPMPI_BIN, then the installed one)")
        if mode != "ssh":
            m.add_argument("--no-join", dest="join", action="store_false",
                           help="no engines can join later (no ompi-server, no --accept-joins)")
        if mode in ("slurm", "pbs"):
            letter, word = ("-p", "--partition") if mode == "slurm" else ("-q", "--queue")
            names = [letter, word] + (["-q"] if mode == "slurm" else [])
            m.add_argument(*names, dest="queue", default=None, metavar=word.strip("-").upper(),
                           help="the %s to submit to (default: the scheduler's)" % word.strip("-"))
            m.add_argument("-s", dest="template", default=None, metavar="SCRIPT",
                           help="your job script template ({{placeholders}} as in the default one, "
                                "%s)" % ("slurm/ipmpi.sbatch" if mode == "slurm" else "pbs/ipmpi.pbs"))
            m.add_argument("--walltime", default=None, metavar="HH:MM:SS",
                           help="the job's time limit (default 01:00:00)")
            m.add_argument("--job-name", default=None, metavar="NAME", help="the job's name (default ipmpi)")
            tool = "sbatch" if mode == "slurm" else "qsub"
            m.add_argument("--%s-args" % tool, dest="scheduler_args", default="", metavar="ARGS",
                           help="extra arguments for %s, one quoted string" % tool)
        if mode == "ssh":
            m.add_argument("--clusterfile", required=True, metavar="FILE",
                           help="Python file with engines = {'host': count, ...}")
            m.add_argument("--sshx", default=None, metavar="FILE",
                           help="refused: mpirun's ssh launcher starts the engines; set "
                                "ssh = '...' in the clusterfile instead")
        common(m)

    for mode in ("local", "mpirun", "mpiexec", "slurm", "pbs", "ssh"):
        h, d = _MODE_HELP[mode]
        start_options(sub.add_parser(mode, help=h, description=d), mode)
    for mode, why in sorted(REFUSED.items()):
        r = sub.add_parser(mode, help="not supported (says why)", description=why, add_help=False)
        r.add_argument("rest", nargs=argparse.REMAINDER)
    e = sub.add_parser("engines", help="start more engines that join the running cluster",
                       description="Start a second MPI job of N engines that join the running "
                                   "controller (MPI_Comm_connect through the cluster's ompi-server); "
                                   "their ids continue after the existing ones. Returns once they "
                                   "answer; `ipcluster stop --engines JOB` makes them leave.")
    e.add_argument("-n", "--n", type=int, default=None, metavar="N",
                   help="number of engines (default 4; ssh: the clusterfile's sum)")
    e.add_argument("--mode", choices=("mpirun", "local", "mpiexec", "slurm", "pbs", "ssh"), default=None,
                   help="how to start them (default: the cluster's own mode)")
    e.add_argument("--clusterfile", default=None, metavar="FILE",
                   help="--mode ssh: Python file with engines = {'host': count, ...}")
    e.add_argument("--mpi", choices=("mpi4py", "none"), default=None,
                   help="mpi4py: `comm` is the communicator of this job's engines")
    e.add_argument("--mpirun-args", default="", metavar="ARGS", help="extra arguments for mpirun")
    e.add_argument("--engine-args", default="", metavar="ARGS", help="extra arguments for every rank")
    e.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for them (default 120; batch modes 300)")
    e.add_argument("-p", "--partition", "-q", "--queue", dest="queue", default=None, metavar="QUEUE",
                   help="slurm partition or pbs queue")
    e.add_argument("-s", dest="template", default=None, metavar="SCRIPT", help="your job script template")
    e.add_argument("--walltime", default=None, metavar="HH:MM:SS")
    e.add_argument("--job-name", default=None, metavar="NAME")
    e.add_argument("--scheduler-args", "--sbatch-args", "--qsub-args", dest="scheduler_args", default="",
                   metavar="ARGS", help="extra arguments for sbatch or qsub")
    common(e)

    s = sub.add_parser("stop", help="stop the cluster",
                       description="Ask the controller to shut the cluster down; after the timeout, "
                                   "end the job by force: signal every process of it (SIGTERM, then "
                                   "SIGKILL), or scancel/qdel a batch job.")
    s.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait for a clean shutdown before ending the job by force (default 20)")
    s.add_argument("--engines", default=None, metavar="JOB",
                   help="stop only the engines of this joined job (ipcluster engines printed its "
                        "id), or of every joined job: --engines all")
    common(s)
    st = sub.add_parser("status", help="show the job and its engines",
                        description="Print the job, its scheduler id and state, and a table of the "
                                    "live engines; exit 0 if the cluster runs, 1 if not.")
    common(st)
    return p


def _connect_hint(c):
    lines = []
    default = os.path.abspath(os.path.expanduser(default_ipmpi_dir())) == c.ipmpi_dir
    lines.append("connect from Python with:")
    if default:
        lines.append("    from ipmpi import client; mec = client.MultiEngineClient()")
    else:
        lines.append("    from ipmpi import client; mec = client.MultiEngineClient()"
                     "    # with IPMPI_DIR=%s" % c.ipmpi_dir)
        lines.append("or  mec = client.MultiEngineClient(furl_file=%r)" % c.mec_furl)
    lines.append("furl: %s" % c.mec_furl)
    lines.append("      (copy it to ~/.ipmpi/security/ on a client machine, mode 0600)")
    try:
        with open(c.mec_furl) as f:
            host = furl_host(f.read())
    except OSError:
        host = None
    if host and is_loopback_host(host):
        lines.append("warning: the furl's address %s is loopback: clients on other hosts cannot "
                     "reach it; restart with --client-ip ADDR (an address of this host they can reach)"
                     % host)
    lines.append("logs: %s" % c.log_dir)
    stop = "ipcluster stop" if default else "ipcluster stop --ipmpi-dir %s" % shlex.quote(c.ipmpi_dir)
    lines.append("stop with: %s" % stop)
    return "\n".join(lines)


def _cmd_start(a):
    if a.no_client_security or a.no_engine_security:
        raise ClusterError("-x/-y (turning furl security off) are refused: every ipmpi furl carries a "
                           "key and the client link is always TLS 1.3; engines reach the controller "
                           "over MPI and have no furl to secure")
    if getattr(a, "sshx", None):
        raise ClusterError("--sshx is refused: mpirun's ssh launcher starts the engines, not a "
                           "shell script; set ssh = '...' (the command mpirun uses) in the clusterfile")
    if a.reuse and not a.client_port:
        raise ClusterError("-r (reuse the furls) needs --client-port PORT: the furls stay the same "
                           "across restarts only with a fixed client port")
    if a.n is not None and a.n < 1:
        raise ClusterError("-n must be at least 1")
    batch = a.cmd in ("slurm", "pbs")
    timeout = a.timeout if a.timeout is not None else (300.0 if batch else 120.0)
    if a.script and not os.path.isfile(a.script):
        raise ClusterError("--script %s: no such file" % a.script)
    kw = {}
    if batch:
        kw = dict(queue=a.queue, template=a.template, walltime=a.walltime, job_name=a.job_name,
                  scheduler_args=a.scheduler_args)
    c = Cluster(n=a.n or 4, ipmpi_dir=a.ipmpi_dir, mpirun_args=a.mpirun_args, client_ip=a.client_ip,
                client_port=a.client_port, engine_args=a.engine_args, ipmpi_bin=a.ipmpi_bin,
                mode=a.cmd, mpi=a.mpi, bind=a.bind, script=a.script,
                clusterfile=getattr(a, "clusterfile", None), logdir=a.logdir,
                join=getattr(a, "join", False), **kw)
    c.spec.n_given = a.n is not None
    t0 = time.monotonic()
    c.start(timeout=timeout)
    info = c.job_info()
    where = c.launcher.describe()
    if info.get("host"):
        where += " on %s" % info["host"]
    print("ipcluster: %d engines ready after %.1f s (%s, IPMPI_DIR %s)"
          % (c.n, time.monotonic() - t0, where, c.ipmpi_dir))
    if c.script:
        print("ipcluster: running %s in the job; its output goes to %s"
              % (c.script, ", ".join(c.launcher.logs()[:1])), flush=True)
        status = c.wait_script()
        if status is None:
            print("ipcluster: the script did not run to its end\n%s" % c.diagnostics(), file=sys.stderr)
            return 1
        print("ipcluster: %s exited with status %d; the job has ended" % (c.script, status))
        return status
    print(_connect_hint(c))
    # Returning leaves the job running: mpirun is in a session of its own
    # (or the scheduler runs it) and its output goes to its log file.
    return 0


def _cmd_engines(a):
    c = Cluster.attach(a.ipmpi_dir)
    mode = a.mode or ("mpirun" if c.mode in ("local", "mpiexec") else c.mode)
    timeout = a.timeout if a.timeout is not None else (300.0 if mode in ("slurm", "pbs") else 120.0)
    t0 = time.monotonic()
    rec = c.add_engines(a.n, mode=a.mode, timeout=timeout, mpi=a.mpi, engine_args=a.engine_args,
                        mpirun_args=a.mpirun_args, queue=a.queue, template=a.template,
                        walltime=a.walltime, job_name=a.job_name, scheduler_args=a.scheduler_args,
                        clusterfile=a.clusterfile)
    ids = rec["ids"]
    stop = "ipcluster stop --engines %s" % rec["job"]
    if os.path.abspath(os.path.expanduser(default_ipmpi_dir())) != c.ipmpi_dir:
        stop += " --ipmpi-dir %s" % shlex.quote(c.ipmpi_dir)
    print("ipcluster: %d engines joined after %.1f s: ids %s (%s job %s)\nthey leave with: %s"
          % (len(ids), time.monotonic() - t0, _id_range(ids), rec["mode"], rec["job"], stop))
    return 0


def _id_range(ids):
    return "%d..%d" % (ids[0], ids[-1]) if ids and ids == list(range(ids[0], ids[-1] + 1)) else str(ids)


def _cmd_stop(a):
    c = Cluster.attach(a.ipmpi_dir)
    if a.engines is not None:
        jobs = [r["job"] for r in c.joined] if a.engines == "all" else [a.engines]
        if not jobs:
            print("ipcluster: no engines joined the cluster in %s" % c.ipmpi_dir)
        for job in jobs:
            ids = c.remove_engines(job, timeout=a.timeout)
            print("ipcluster: the engines of joined job %s (ids %s) left the cluster in %s"
                  % (job, _id_range(ids), c.ipmpi_dir))
        return 0
    what = c.launcher.describe()
    if not c.running():
        c.stop(timeout=0)
        print("ipcluster: the cluster in %s was not running (%s had ended); removed its run file "
              "and anything left of it" % (c.ipmpi_dir, what), file=sys.stderr)
        return 1
    clean = c.stop(timeout=a.timeout)
    print("ipcluster: stopped the cluster in %s (%s)%s"
          % (c.ipmpi_dir, what, "" if clean else
             "; it did not shut down cleanly and was %s" % ("cancelled" if c.mode in ("slurm", "pbs")
                                                              else "killed")))
    return 0


def _engine_table(infos):
    cols = ("id", "host", "pid", "mpi_rank", "local_rank", "local_size", "cores", "numa", "cpuset")
    rows = [[str(d.get(k, d.get("rank") if k == "mpi_rank" else "")) if not isinstance(d.get(k), list)
             else ",".join(map(str, d.get(k))) for k in cols] for d in infos]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(cols)]
    out = ["  ".join(h.ljust(w) for h, w in zip(cols, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join("  " + line.rstrip() for line in out)


def _cmd_status(a):
    c = Cluster.attach(a.ipmpi_dir)
    what = c.launcher.describe()
    state = c.launcher.state()
    if not c.running():
        print("ipcluster: no cluster is running in %s (%s has ended: %s; "
              "`ipcluster stop` removes the stale record)" % (c.ipmpi_dir, what, state), file=sys.stderr)
        return 1
    info = c.job_info()
    if c.mode in ("slurm", "pbs"):
        sched = "ipcluster: %s: %s%s" % (what, state, (" (scheduler id %s, on %s)" % (
            info.get("scheduler_id") or "-", info.get("host"))) if info.get("host") else "")
    else:
        sched = None
    if not os.path.exists(c.mec_furl):
        print(sched or "ipcluster: %s: %s" % (what, state))
        print("ipcluster: the job has not started its controller yet (no %s)" % c.mec_furl)
        return 0
    try:
        mec = c.client(timeout=10, connect_timeout=10)
        try:
            ids = mec.get_ids()
            infos = mec.engine_info() if ids else []
        finally:
            mec.close()
    except Exception as e:
        print("ipcluster: %s runs in %s but the controller does not answer: %s: %s"
              % (what, c.ipmpi_dir, type(e).__name__, e), file=sys.stderr)
        return 1
    print("ipcluster: running in %s: %s, %d of %d engines alive, ids %s"
          % (c.ipmpi_dir, what, len(ids), c.n + sum(r["n"] for r in c.joined), ids))
    if sched:
        print(sched)
    for rec in c.joined:
        print("ipcluster: joined: %s job %s, ids %s" % (rec["mode"], rec["job"], _id_range(rec["ids"])))
    if infos:
        print(_engine_table(infos))
    print("furl: %s" % c.mec_furl)
    print("logs: %s" % c.log_dir)
    return 0


def main(argv=None, bindir=None):
    """Entry point of the ipcluster script; returns the exit status."""
    global _script_bindir
    if bindir:
        _script_bindir = bindir
    argv = list(sys.argv[1:] if argv is None else argv)
    # `ipcluster -n 4` is short for `ipcluster mpirun -n 4`.
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "mpirun")
    if argv and argv[0] in REFUSED:
        print("ipcluster: error: mode %s is not supported: %s" % (argv[0], REFUSED[argv[0]]),
              file=sys.stderr)
        return 2
    a = _parser().parse_args(argv)
    try:
        if a.cmd in MODES:
            return _cmd_start(a)
        if a.cmd == "engines":
            return _cmd_engines(a)
        if a.cmd == "stop":
            return _cmd_stop(a)
        return _cmd_status(a)
    except ClusterError as e:
        print("ipcluster: error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ipcluster: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
