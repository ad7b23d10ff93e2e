"""Shared pieces of the ipmpi benchmarks (bench/bench_*.py).

Each benchmark measures ipmpi, its peer ipyparallel 7.1 and, where one
exists, the physical floor, all in the same run on the same machine, and
prints each figure with the ratios. This module holds what they share:
starting and always stopping an ipmpi cluster and an ipyparallel cluster,
percentiles, and a failure record that makes the script exit non-zero when
any measurement could not be made. Single-threaded; run with
/usr/bin/python3 (Debian's, which has numpy, mpi4py and ipyparallel).
"""
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

# Figures that could not be measured; main() exits non-zero when any did.
failures = []


def percentile(samples, q):
    """q-th percentile (0..100) of samples, nearest rank."""
    s = sorted(samples)
    if not s:
        raise ValueError("no samples")
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1)))))
    return s[k]


def median(samples):
    return percentile(samples, 50)


def measure(name, fn, *args, **kw):
    """Runs one measurement; on any error records it and returns None.

    Each peer is measured in its own call, so one that fails does not hide
    the figures of the others.
    """
    try:
        return fn(*args, **kw)
    except Exception:
        failures.append(name)
        print("FAILED: %s" % name, file=sys.stderr)
        traceback.print_exc()
        return None


def fmt_ratio(num, den):
    if num is None or den is None or den == 0:
        return "n/a"
    return "%.1fx" % (num / den)


def finish():
    """Exit status of the benchmark: 1 if any measurement failed."""
    if failures:
        print("measurements that failed: %s" % ", ".join(failures))
        return 1
    return 0


@contextlib.contextmanager
def tmpdir(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def self_signed_cert(workdir):
    """(key, cert) PEM paths of a throw-away P-256 certificate in workdir,
    made once with the openssl CLI, for the bare-TLS floors."""
    key, cert = os.path.join(workdir, "key.pem"), os.path.join(workdir, "cert.pem")
    if not os.path.exists(cert):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-subj", "/CN=x", "-days", "1", "-keyout", key, "-out", cert],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return key, cert


@contextlib.contextmanager
def ipmpi_cluster(n, start_timeout=120, engine_args=(), ipmpi_bin=None):
    """Yields (cluster, seconds start() took) for a started ipmpi cluster
    of n engines in a private IPMPI_DIR, its ranks given engine_args
    (ipmpi_bin: that executable instead of the build tree's); stops it
    whatever happens."""
    from ipmpi.cluster import Cluster
    with tmpdir("ipmpi-bench-") as d:
        c = Cluster(n=n, ipmpi_dir=d, engine_args=engine_args, ipmpi_bin=ipmpi_bin)
        try:
            t0 = time.perf_counter()
            c.start(timeout=start_timeout)
            yield c, time.perf_counter() - t0
        finally:
            c.stop()


def ipyparallel_cluster_args(n, profile_dir):
    """ipyparallel at its best settings for a fair comparison
    (ENVIRONMENT.md): no delay between controller and engines, and a short
    heartbeat, since engines count as ready only after their first beat."""
    return dict(n=n, delay=0, profile_dir=profile_dir,
                controller_args=["--HeartMonitor.period=500"])


@contextlib.contextmanager
def ipyparallel_client(n, timeout=120, extra_controller_args=()):
    """Yields (client, seconds until n engines were ready) for a local
    ipyparallel 7.1 cluster at the best settings above plus
    extra_controller_args; stops the cluster whatever happens."""
    import ipyparallel
    with tmpdir("ipp-bench-") as d:
        args = ipyparallel_cluster_args(n, d)
        args["controller_args"] = list(args["controller_args"]) + list(extra_controller_args)
        cluster = ipyparallel.Cluster(**args)
        rc = None
        try:
            t0 = time.perf_counter()
            rc = cluster.start_and_connect_sync()
            rc.wait_for_engines(n, timeout=timeout)
            ready = time.perf_counter() - t0
            yield rc, ready
        finally:
            if rc is not None:
                with contextlib.suppress(Exception):
                    rc.close()
            try:
                cluster.stop_cluster_sync()
            finally:
                # A start that timed out leaves engine nannies behind that
                # ipyparallel's stop does not reach; they are ours to end.
                kill_descendants()


def _descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def warm_guest_memory(nbytes):
    """Touches nbytes of memory in a child process that then exits.

    On these VMs memory the guest has not used lately costs far more than
    the bytes on first touch (src/pyext/bigbuf.h): the host backs it
    again. Whoever runs right after another tool freed that much memory
    gets it warm. Called before each tool's first large push, so that
    first push costs every tool the same kind of memory."""
    code = "import numpy as np; a = np.ones(%d // 8); a[::512] += 1" % int(nbytes)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def kill_descendants(grace=3.0):
    """SIGTERM, then SIGKILL, every process descended from this one."""
    import signal
    pids = _descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(os.path.exists("/proc/%d" % p) for p in pids):
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            time.sleep(0.05)


def ompi_env():
    """The environment for mpirun: ipcluster's own (Open MPI as root allowed)."""
    from ipmpi.launchers.mpirun import child_env
    return child_env()


def run_checked(cmd, timeout, **kw):
    """subprocess.run with a time bound; raises on failure with the output."""
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, env=kw.pop("env", ompi_env()), **kw)
    if p.returncode != 0:
        raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode,
                                                  p.stdout.decode(errors="replace")[-2000:]))
    return p.stdout.decode(errors="replace")


def unwrap_single(r):
    """A result for one target: the MultiEngineClient may return the value
    itself or a one-element list (per-engine results); both are accepted."""
    if isinstance(r, list) and len(r) == 1:
        return r[0]
    return r
