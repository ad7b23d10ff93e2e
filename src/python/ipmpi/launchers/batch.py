"""Modes slurm and pbs: the job is a batch job script, filled from a
template and submitted with sbatch or qsub.

The script runs the job step (jobstep.py) around `mpirun --enable-recovery
-n N+1 ipmpi ...` inside the allocation: mpirun, not srun, because Slurm's
PMIx plugin ends a whole step when one task dies, and an engine's death
must not end the job. Cluster waits for the furl on the shared file system
and for N engines, as in the other modes.

PBS has two faces here. Real Torque/PBS Pro give the job PBS_JOBID and
PBS_NODEFILE and honour `#PBS -o/-e`; Slurm's qsub wrapper (Debian's
slurm-wlm-torque) gives only SLURM_* variables and ignores `#PBS -o/-e`.
So -o/-e are passed on qsub's command line, the job id is read from qsub's
stdout, and the job step records whichever ids the job sees (job-info.json).
"""
import os
import re
import time

from .base import ClusterError, Launcher, quote, render_template, run_tool, tail
from .mpirun import jobstep_command, mpirun_command

TEMPLATE_DIR = os.environ.get("IPMPI_TEMPLATE_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "templates")


class BatchLauncher(Launcher):
    """What sbatch and qsub jobs share: template, submission, polling, cancel."""

    default_template = None   # file name in TEMPLATE_DIR
    submit_tool = None
    ext = None

    def __init__(self, spec):
        super().__init__(spec)
        self.jobid = None
        self.script_path = None
        self.log = None

    # ---- the job script -------------------------------------------------

    def template_path(self):
        if self.spec.template:
            return os.path.abspath(os.path.expanduser(self.spec.template))
        return os.path.join(TEMPLATE_DIR, self.default_template)

    def values(self):
        s = self.spec
        # Inside an allocation mpirun takes its slots from the scheduler; it
        # binds nothing when oversubscribed and ipmpi's --bind places the
        # engines (src/engine/bind.c).
        mpi = mpirun_command(s, "mpirun", hosts_cpus=s.ranks)
        mpirun_args = mpi[2:mpi.index("-n")] + s.mpirun_args
        return {
            "engines": str(s.n),
            "ranks": str(s.ranks),
            "job_name": s.job_name,
            "walltime": s.walltime or "01:00:00",
            "queue": s.queue or "",
            "profile_dir": s.ipmpi_dir,
            "ipmpi": quote(s.rank_command()),
            "mpirun_args": quote(mpirun_args),
            "jobstep": quote(jobstep_command(s)),
            "python": s.python or "",
            "log": self.log,
        }

    def write_script(self):
        path = self.template_path()
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ClusterError("cannot read the job template %s: %s" % (path, e.strerror)) from None
        os.makedirs(self.spec.run_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.spec.log_dir, mode=0o700, exist_ok=True)
        stamp = "%d-%d" % (int(time.time()), os.getpid())
        self.log = os.path.join(self.spec.log_dir, "ipcluster-%s-%s.log" % (self.mode, stamp))
        body = render_template(text, self.values(), path)
        self.script_path = os.path.join(self.spec.run_dir, "ipcluster-%s-%s.%s" % (self.mode, stamp, self.ext))
        with open(self.script_path, "w") as f:
            f.write(body)
        os.chmod(self.script_path, 0o700)

    def submit_command(self):
        raise NotImplementedError

    def parse_job_id(self, out):
        raise NotImplementedError

    def start(self):
        self.write_script()
        argv = self.submit_command()
        rc, out, err = run_tool(argv, timeout=60)
        if rc != 0:
            raise ClusterError("%s refused the job (status %d): %s\n(job script %s, from %s)"
                               % (self.submit_tool, rc, (err.strip() or out.strip() or "no message"),
                                  self.script_path, self.template_path()))
        self.jobid = self.parse_job_id(out)
        if not self.jobid:
            raise ClusterError("cannot read the job id from %s's output: %r %r"
                               % (self.submit_tool, out, err))
        self.command = argv

    def job_id(self):
        return self.jobid

    def alive(self):
        st = self.scheduler_state()
        return st is not None and st[0] not in self.ended_states

    def logs(self):
        return [p for p in (self.log, self.log and self.log + ".err") if p]

    def state(self):
        st = self.scheduler_state()
        if st is None:
            return "gone (the scheduler no longer lists job %s)" % self.jobid
        word, reason = st
        return "%s%s" % (word.lower(), ": " + reason if reason and reason not in ("None", "(null)") else "")

    def describe(self):
        return "%s job %s" % (self.mode, self.jobid)

    def stop(self, timeout=30.0):
        """Cancels the job if the scheduler still lists it; waits until it has ended."""
        if not self.jobid:
            return
        deadline = time.monotonic() + timeout
        if self.alive():
            rc, out, err = run_tool(self.cancel_command(), timeout=30)
            if rc != 0 and self.alive():
                raise ClusterError("%s %s failed: %s" % (self.cancel_command()[0], self.jobid,
                                                        (err or out).strip()))
        while self.alive():
            if time.monotonic() >= deadline:
                raise ClusterError("job %s is still %s %g s after it was cancelled"
                                   % (self.jobid, self.state(), timeout))
            time.sleep(0.2)

    def record(self):
        return {"mode": self.mode, "jobid": self.jobid, "script": self.script_path, "log": self.log,
                "command": getattr(self, "command", None)}

    @classmethod
    def from_record(cls, spec, rec):
        lc = cls(spec)
        lc.jobid = rec.get("jobid")
        lc.script_path = rec.get("script")
        lc.log = rec.get("log")
        lc.command = rec.get("command")
        return lc

    def log_tail(self):
        out = []
        for p in self.logs():
            if os.path.exists(p):
                out.append("--- %s job output %s (tail) ---\n%s" % (self.mode, p, tail(p)))
        return "\n".join(out) or "--- no job output yet (%s) ---" % self.log


class SlurmLauncher(BatchLauncher):
    mode = "slurm"
    default_template = "ipmpi.sbatch"
    submit_tool = "sbatch"
    ext = "sbatch"
    ended_states = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                    "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT")

    def submit_command(self):
        argv = ["sbatch", "--parsable", "--output", self.log, "--job-name", self.spec.job_name]
        if self.spec.queue:
            argv += ["--partition", self.spec.queue]
        return argv + self.spec.scheduler_args + [self.script_path]

    def parse_job_id(self, out):
        m = re.match(r"\s*(\d+)", out)   # "12" or "12;cluster"
        return m.group(1) if m else None

    def cancel_command(self):
        return ["scancel", str(self.jobid)]

    def scheduler_state(self):
        """(STATE, reason) from squeue, or None once Slurm no longer lists the job."""
        rc, out, err = run_tool(["squeue", "--noheader", "--jobs", str(self.jobid),
                                 "--states=all", "--format=%T|%r"], timeout=30)
        if rc != 0:
            if "Invalid job id" in err:
                return None
            raise ClusterError("squeue failed: %s" % err.strip())
        line = out.strip().splitlines()
        if not line:
            return None
        word, _, reason = line[0].partition("|")
        return word.strip(), reason.strip()


class PbsLauncher(BatchLauncher):
    mode = "pbs"
    default_template = "ipmpi.pbs"
    submit_tool = "qsub"
    ext = "pbs"
    # Torque/PBS letters, and the words Slurm's qstat wrapper may print.
    ended_states = ("C", "E", "F", "X", "COMPLETED", "CANCELLED", "FAILED")
    _words = {"Q": "queued", "R": "running", "H": "held", "E": "exiting", "C": "completed",
              "W": "waiting", "S": "suspended", "T": "moving", "B": "array running", "F": "finished"}

    def submit_command(self):
        # -o/-e on the command line: Slurm's qsub ignores #PBS -o/-e.
        argv = ["qsub", "-o", self.log, "-e", self.log + ".err", "-N", self.spec.job_name]
        if self.spec.queue:
            argv += ["-q", self.spec.queue]
        return argv + self.spec.scheduler_args + [self.script_path]

    def parse_job_id(self, out):
        m = re.search(r"^\s*(\d+(?:\.[\w.-]+)?)\s*$", out, re.M)   # "12" or "12.server"
        return m.group(1) if m else None

    def cancel_command(self):
        return ["qdel", str(self.jobid)]

    def scheduler_state(self):
        """(state letter, comment) from `qstat -f`, or None once the job is gone."""
        rc, out, err = run_tool(["qstat", "-f", str(self.jobid)], timeout=30)
        if rc != 0 or not out.strip():
            text = (err + out).lower()
            if "unknown job" in text or "invalid job" in text or "does not exist" in text or not text.strip():
                return None
            raise ClusterError("qstat -f %s failed: %s" % (self.jobid, (err or out).strip()))
        m = re.search(r"job_state\s*=\s*(\S+)", out)
        if not m:
            return None
        c = re.search(r"^\s*comment\s*=\s*(.+)$", out, re.M)
        return m.group(1), (c.group(1).strip() if c else "")

    def state(self):
        st = self.scheduler_state()
        if st is None:
            return "gone (qstat no longer lists job %s)" % self.jobid
        word = self._words.get(st[0], st[0])
        return "%s%s" % (word, ": " + st[1] if st[1] else "")
