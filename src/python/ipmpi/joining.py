"""Engines that join a running cluster (`ipcluster engines`, IPython 0.10's
"start the controller, then ipengine as many times as you like").

A cluster started with joins on (the default, except in the ssh mode)
runs an ompi-server and a controller that accepts later MPI jobs
(--accept-joins DIR/run/join.port). add_engines starts one such job of N
engines with a launcher of ipmpi.launchers.join, waits until the
controller answers with N more ids, and records the job in the cluster's
run file; remove_engines makes those engines leave (KILL through the
controller, then the launcher ends what is left of the job) without
touching the rest; stop_all ends every joined job when the cluster stops.
"""
import os
import time

from ipmpi.launchers.base import ClusterError
from ipmpi.launchers.join import JOIN_PORT, JoinSpec, join_launcher_class

__all__ = ["add_engines", "remove_engines", "stop_all", "joined_jobs"]


def port_file(cluster):
    return os.path.join(cluster.run_dir, JOIN_PORT)


def joined_jobs(cluster):
    """The joined jobs the run file records: [{"job", "mode", "n", "ids", "launcher"}]."""
    return list(cluster.joined)


def _launcher(cluster, rec):
    spec = JoinSpec(rec["n"], cluster.ipmpi_dir, port_file(cluster), cluster.spec.ompi_uri,
                    log_dir=cluster.log_dir, run_dir=cluster.run_dir)
    spec.exe = rec["launcher"].get("exe")
    return join_launcher_class(rec["mode"]).from_record(spec, rec["launcher"])


def _ids(cluster, timeout=10.0):
    mec = cluster.client(timeout=timeout, connect_timeout=timeout)
    try:
        return mec.get_ids()
    finally:
        mec.close()


def add_engines(cluster, n=None, mode=None, timeout=120.0, mpi=None, engine_args=(), mpirun_args=(),
                queue=None, template=None, walltime=None, job_name=None, scheduler_args=(),
                clusterfile=None):
    """Starts a job of n engines that join cluster; returns its record once
    the controller answers with n more engines. mode ssh takes the hosts
    (and, without n, the count) from an IPython 0.10 clusterfile. Raises
    ClusterError (the job is ended then), also when the cluster does not
    accept joins or its controller does not answer."""
    if mode == "ssh" and not clusterfile:
        raise ClusterError("--mode ssh needs --clusterfile FILE (engines = {'host': n, ...})")
    n_given = n is not None
    n = int(n) if n_given else (0 if mode == "ssh" else 4)
    if n_given and n < 1:
        raise ClusterError("-n must be at least 1")
    if not cluster.join:
        raise ClusterError("the cluster in %s was started without joins (%s): start it again without "
                           "--no-join (the ssh mode offers none)" % (cluster.ipmpi_dir, cluster.mode))
    if not cluster.running():
        raise ClusterError("no cluster is running in %s (%s has ended)"
                           % (cluster.ipmpi_dir, cluster.launcher.describe()))
    mode = mode or ("mpirun" if cluster.mode in ("local", "mpiexec", "ssh") else cluster.mode)
    cls = join_launcher_class(mode)
    try:
        before = set(_ids(cluster))
    except Exception as e:
        raise ClusterError("the controller in %s does not answer (%s: %s): no engines can join a "
                           "controller that is gone" % (cluster.ipmpi_dir, type(e).__name__, e)) from None
    if not os.path.exists(port_file(cluster)) or not os.path.exists(cluster.spec.ompi_uri):
        raise ClusterError("the controller in %s does not accept engines (no %s or %s; see its log)"
                           % (cluster.ipmpi_dir, port_file(cluster), cluster.spec.ompi_uri))
    from ipmpi.cluster import find_ipmpi, _script_bindir, _split_args
    spec = JoinSpec(n, cluster.ipmpi_dir, port_file(cluster), cluster.spec.ompi_uri,
                    log_dir=cluster.log_dir, run_dir=cluster.run_dir, mpirun_args=_split_args(mpirun_args),
                    queue=queue, template=template, walltime=walltime, job_name=job_name or "ipmpi-engines",
                    scheduler_args=_split_args(scheduler_args), python=cluster.spec.python,
                    clusterfile=clusterfile)
    spec.n_given = n_given
    spec.exe = find_ipmpi(cluster.ipmpi_bin, _script_bindir)
    spec.ipmpi_args = ["--ipmpi-dir", cluster.ipmpi_dir] + (["--mpi", mpi] if mpi else []) + \
        _split_args(engine_args)
    lc = cls(spec)
    lc.start()
    n = spec.n   # the ssh mode takes it from the clusterfile
    rec = {"job": str(lc.job_id()), "mode": mode, "n": n, "ids": [], "launcher": lc.record(),
           "started": time.time()}
    try:
        rec["ids"] = _wait_joined(cluster, lc, before, n, timeout)
    except BaseException:
        lc.stop(timeout=30)
        raise
    cluster.joined.append(rec)
    cluster._write_run_file()
    return rec


def _wait_joined(cluster, lc, before, n, timeout):
    deadline = time.monotonic() + timeout
    batch = lc.mode in ("slurm", "pbs")
    next_poll = 0.0
    while True:
        now = time.monotonic()
        if now >= next_poll:
            if not lc.alive():
                raise ClusterError("the joining %s ended before its engines joined (%s)\n%s"
                                   % (lc.describe(), lc.state(), _log_tails(lc)))
            next_poll = now + (1.0 if batch else 0.0)
        try:
            new = sorted(set(_ids(cluster)) - before)
        except Exception as e:
            raise ClusterError("the controller stopped answering while engines joined: %s: %s"
                               % (type(e).__name__, e)) from None
        if len(new) >= n:
            return new[:n]
        if now >= deadline:
            raise ClusterError("only %d of %d engines joined after %g s: %s %s\n%s"
                               % (len(new), n, timeout, lc.describe(), lc.state(), _log_tails(lc)))
        time.sleep(0.1)


def _log_tails(lc):
    from ipmpi.launchers.base import tail
    out = [("--- %s (tail) ---\n%s" % (p, tail(p))) for p in lc.logs() if os.path.exists(p)]
    return "\n".join(out) or "--- no output from the job yet ---"


def remove_engines(cluster, job, timeout=20.0):
    """The engines of joined job `job` leave: KILL through the controller,
    then the job's launcher ends what is left. Returns their ids."""
    rec = next((r for r in cluster.joined if str(r["job"]) == str(job)), None)
    if rec is None:
        known = ", ".join(str(r["job"]) for r in cluster.joined) or "none"
        raise ClusterError("no joined job %s in %s (joined jobs: %s)" % (job, cluster.ipmpi_dir, known))
    lc = _launcher(cluster, rec)
    try:
        mec = cluster.client(timeout=min(10.0, timeout), connect_timeout=min(10.0, timeout))
        try:
            live = [i for i in rec["ids"] if i in set(mec.get_ids())]
            if live:
                mec.kill(targets=live, block=True)
        finally:
            mec.close()
    except Exception:
        pass   # the controller is gone or the engines already left: force below
    deadline = time.monotonic() + timeout
    while lc.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    lc.stop(timeout=30)
    cluster.joined = [r for r in cluster.joined if r is not rec]
    cluster._write_run_file()
    return rec["ids"]


def stop_all(cluster, timeout=10.0):
    """Ends every joined job (after the controller stopped, their engines
    end by themselves; this waits for that, then forces what is left)."""
    deadline = time.monotonic() + timeout
    for rec in list(cluster.joined):
        lc = _launcher(cluster, rec)
        while lc.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        lc.stop(timeout=30)
    cluster.joined = []
