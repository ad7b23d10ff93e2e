"""Open MPI's ompi-server, which lets a later MPI job connect to a running
one (MPI_Comm_connect/accept across two mpiruns): engines that join a
running controller (`ipcluster engines`) need both jobs' mpiruns to name
the same server (`--ompi-server file:URI`).

The server of a cluster runs in a session of its own next to the job and
writes its address to DIR/run/ompi-server.uri; it ends with the job.
"""
import os
import subprocess
import time

URI_FILE = "ompi-server.uri"


def uri_path(run_dir):
    return os.path.join(run_dir, URI_FILE)


def start(run_dir, env=None, timeout=10.0):
    """Starts ompi-server; returns its Popen once it has written its URI.
    Raises RuntimeError (with the server's words) if it cannot."""
    uri = uri_path(run_dir)
    try:
        os.unlink(uri)
    except FileNotFoundError:
        pass
    log = os.path.join(run_dir, "ompi-server.log")
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(["ompi-server", "--no-daemonize", "--report-uri", uri],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        except OSError as e:
            raise RuntimeError("cannot run ompi-server (%s): install openmpi-bin" % e) from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(uri) as f:
                if f.read().strip():
                    return proc
        except FileNotFoundError:
            pass
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            with open(log, "rb") as f:
                said = f.read().decode("utf-8", "replace").strip()[-2000:]
            raise RuntimeError("ompi-server did not start: %s" % (said or "no output"))
        time.sleep(0.01)


def with_server(cmd, uri):
    """cmd (an mpirun or mpiexec command line) naming the server at uri."""
    for i, word in enumerate(cmd):
        if os.path.basename(str(word)) in ("mpirun", "mpiexec", "orterun"):
            return list(cmd[:i + 1]) + ["--ompi-server", "file:" + uri] + list(cmd[i + 1:])
    return list(cmd)
