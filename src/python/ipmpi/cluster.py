"""Start, watch and stop an ipmpi cluster on this host (the `ipcluster` command).

A cluster is one MPI job: `mpirun --enable-recovery -n N+1 ipmpi ...` puts the
controller on rank 0 and N engines on ranks 1..N. `Cluster` starts that job in
a session of its own (so every process of it can be found and stopped, even
the ranks, which Open MPI puts in process groups of their own), waits until
the controller has written its furl files and answers with N engines, and
records the job in $IPMPI_DIR/run/ipcluster.json so that a later
`ipcluster stop` or `ipcluster status`, in another process, finds it.

Stopping asks the controller to shut the job down (MultiEngineClient.shutdown)
and, if that does not end it in time, signals every process of the job's
session: SIGTERM, then SIGKILL. Nothing of a job is left running after
stop(), nor after a start() that failed.

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
import subprocess
import sys
import time

MEC_FURL = "ipcontroller-mec.furl"
TC_FURL = "ipcontroller-tc.furl"
RUN_FILE = "ipcluster.json"

__all__ = ["Cluster", "ClusterError", "main", "default_ipmpi_dir", "job_processes"]


class ClusterError(RuntimeError):
    """The cluster could not be started, found or stopped; the message says why."""


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


def _proc_stat(pid):
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


def _alive(pid):
    """True while pid is a process that has not exited.

    A zombie counts as exited: on machines whose init does not reap
    orphans, an mpirun whose ipcluster parent returned stays a zombie.
    """
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def job_processes(sid):
    """PIDs of the live (non-zombie) processes in session sid.

    mpirun is started as a session leader, so its session holds mpirun and
    every rank it forked, whatever process groups Open MPI gives them.
    """
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st is not None and st[3] == sid and st[0] not in ("Z", "X"):
            pids.append(int(name))
    return pids


def _signal_session(sid, sig):
    """Sends sig to every live process of session sid; returns how many it reached."""
    n = 0
    for pid in job_processes(sid):
        try:
            os.kill(pid, sig)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
    return n


def _tail(path, lines=30):
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
    """One ipmpi job on this host: a controller and n engines under mpirun.

    with Cluster(n=4) as c:
        mec = c.client()
        ...
    """

    def __init__(self, n=4, ipmpi_dir=None, mpirun_args=(), client_ip=None, client_port=None,
                 engine_args=(), ipmpi_bin=None):
        if int(n) < 1:
            raise ValueError("a cluster needs at least one engine (n >= 1)")
        self.n = int(n)
        self.ipmpi_dir = os.path.abspath(os.path.expanduser(ipmpi_dir or default_ipmpi_dir()))
        self.mpirun_args = _split_args(mpirun_args)
        self.engine_args = _split_args(engine_args)
        self.client_ip = client_ip
        self.client_port = client_port
        self.ipmpi_bin = ipmpi_bin
        self.security_dir = os.path.join(self.ipmpi_dir, "security")
        self.log_dir = os.path.join(self.ipmpi_dir, "log")
        self.run_dir = os.path.join(self.ipmpi_dir, "run")
        self.mec_furl = os.path.join(self.security_dir, MEC_FURL)
        self.tc_furl = os.path.join(self.security_dir, TC_FURL)
        self.run_file = os.path.join(self.run_dir, RUN_FILE)
        self.pid = None          # mpirun's pid, also the job's session and process group id
        self.mpirun_log = None
        self._proc = None        # the Popen when this object started the job
        self._started_at = None

    # ---- the job record in DIR/run/ipcluster.json -------------------------

    @classmethod
    def attach(cls, ipmpi_dir=None):
        """A Cluster for the job recorded in ipmpi_dir's run file.

        Raises ClusterError if there is no run file. The job may have ended
        since; check running().
        """
        c = cls(n=1, ipmpi_dir=ipmpi_dir)
        try:
            with open(c.run_file) as f:
                rec = json.load(f)
        except FileNotFoundError:
            raise ClusterError("no cluster is running in %s (no %s)" % (c.ipmpi_dir, c.run_file)) from None
        except (OSError, ValueError) as e:
            raise ClusterError("cannot read %s: %s" % (c.run_file, e)) from None
        c.n = int(rec.get("n", 1))
        c.pid = int(rec["pid"])
        c.mpirun_log = rec.get("mpirun_log")
        c.mec_furl = rec.get("mec_furl", c.mec_furl)
        c.tc_furl = rec.get("tc_furl", c.tc_furl)
        c._started_at = rec.get("started")
        return c

    def _write_run_file(self, cmd):
        rec = {"pid": self.pid, "pgid": self.pid, "sid": self.pid, "n": self.n,
               "mec_furl": self.mec_furl, "tc_furl": self.tc_furl, "ipmpi_dir": self.ipmpi_dir,
               "mpirun_log": self.mpirun_log, "started": self._started_at, "command": cmd}
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
            if int(rec.get("pid", -1)) != self.pid:
                return
        except (OSError, ValueError):
            return
        try:
            os.unlink(self.run_file)
        except FileNotFoundError:
            pass

    def running(self):
        """True while this job's mpirun is alive."""
        if self.pid is None:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        st = _proc_stat(self.pid)
        # mpirun was started as a session leader: a live pid that is not the
        # leader of its own session is another process that reused the pid.
        return st is not None and st[0] not in ("Z", "X") and st[3] == self.pid

    # ---- start ------------------------------------------------------------

    def command(self):
        """The mpirun command line this cluster runs."""
        exe = find_ipmpi(self.ipmpi_bin, _script_bindir)
        cmd = ["mpirun", "--enable-recovery"]
        if self.n + 1 > (os.cpu_count() or 1) and "--oversubscribe" not in self.mpirun_args:
            cmd.append("--oversubscribe")
        cmd += ["-n", str(self.n + 1)] + self.mpirun_args
        cmd += [exe, "--ipmpi-dir", self.ipmpi_dir]
        if self.client_ip:
            cmd += ["--client-ip", str(self.client_ip)]
        if self.client_port:
            cmd += ["--client-port", str(int(self.client_port))]
        return cmd + self.engine_args

    def _check_not_running(self):
        try:
            other = Cluster.attach(self.ipmpi_dir)
        except ClusterError:
            return
        if other.running():
            raise ClusterError("a cluster is already running in %s (mpirun pid %d); stop it first "
                               "with: ipcluster stop --ipmpi-dir %s"
                               % (self.ipmpi_dir, other.pid, shlex.quote(self.ipmpi_dir)))
        # A stale record of a job that ended without ipcluster stop: clean
        # up whatever of it is left, then start afresh.
        _signal_session(other.pid, signal.SIGKILL)
        try:
            os.unlink(self.run_file)
        except FileNotFoundError:
            pass

    def start(self, timeout=120):
        """Starts the job; returns when all n engines answer. Raises ClusterError.

        On any failure the job is killed (every process of its session) and
        the error carries the tail of the controller's and mpirun's logs.
        """
        if self.running():
            raise ClusterError("this cluster is already started (mpirun pid %d)" % self.pid)
        self._check_not_running()
        for d in (self.ipmpi_dir, self.run_dir, self.log_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.makedirs(self.security_dir, mode=0o700, exist_ok=True)
        os.chmod(self.security_dir, 0o700)
        # A furl left by a job that died must not be taken for the new one's.
        for p in (self.mec_furl, self.tc_furl):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

        cmd = self.command()
        env = dict(os.environ)
        if os.geteuid() == 0:
            env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        # mpirun's pid is known only once it runs: the log is opened under a
        # provisional name and renamed (the open descriptor stays valid).
        provisional = os.path.join(self.log_dir, "ipcluster-mpirun-starting-%d.log" % os.getpid())
        self._started_at = time.time()
        with open(provisional, "ab") as log:
            try:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True)
            except OSError as e:
                os.unlink(provisional)
                raise ClusterError("cannot run mpirun (%s): install openmpi-bin" % e) from None
        self.pid = self._proc.pid
        self.mpirun_log = os.path.join(self.log_dir, "ipcluster-mpirun-%d.log" % self.pid)
        os.replace(provisional, self.mpirun_log)
        try:
            self._write_run_file(cmd)
            self._wait_ready(timeout)
        except BaseException:
            self._kill()
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
        """Text with the tails of the controller log and the mpirun log."""
        out = []
        clog = self._controller_log()
        if clog:
            out.append("--- controller log %s (tail) ---\n%s" % (clog, _tail(clog)))
        else:
            out.append("--- no controller log in %s ---" % self.log_dir)
        if self.mpirun_log:
            out.append("--- mpirun log %s (tail) ---\n%s" % (self.mpirun_log, _tail(self.mpirun_log)))
        return "\n".join(out)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not (os.path.exists(self.mec_furl) and os.path.exists(self.tc_furl)):
            rc = self._proc.poll()
            if rc is not None:
                raise ClusterError("mpirun exited with status %d before the engines were ready\n%s"
                                   % (rc, self.diagnostics()))
            if time.monotonic() >= deadline:
                raise ClusterError("the cluster was not ready after %g s (no furl files in %s)\n%s"
                                   % (timeout, self.security_dir, self.diagnostics()))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        remaining = max(1.0, deadline - time.monotonic())
        try:
            mec = self.client(timeout=remaining, connect_timeout=remaining)
            try:
                ids = mec.get_ids()
            finally:
                mec.close()
        except Exception as e:
            raise ClusterError("the controller wrote its furl but did not answer: %s: %s\n%s"
                               % (type(e).__name__, e, self.diagnostics())) from None
        if len(ids) != self.n:
            raise ClusterError("only %d of %d engines started (ids %s)\n%s"
                               % (len(ids), self.n, ids, self.diagnostics()))

    def client(self, **kw):
        """A MultiEngineClient connected to this cluster (caller closes it)."""
        from ipmpi import client
        return client.MultiEngineClient(furl_file=self.mec_furl, **kw)

    # ---- stop -------------------------------------------------------------

    def _wait_exit(self, timeout):
        """Waits up to timeout for mpirun to exit; True if it did."""
        deadline = time.monotonic() + timeout
        if self._proc is not None:
            try:
                self._proc.wait(timeout=max(0.0, timeout))
                return True
            except subprocess.TimeoutExpired:
                return False
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _kill(self):
        """SIGTERM, then SIGKILL, to every process of the job's session; reaps mpirun."""
        if self.pid is None:
            return
        if _signal_session(self.pid, signal.SIGTERM):
            self._wait_exit(3.0)
        _signal_session(self.pid, signal.SIGKILL)
        self._wait_exit(5.0)
        self._wait_session_empty(5.0)

    def _wait_session_empty(self, timeout):
        deadline = time.monotonic() + timeout
        while job_processes(self.pid):
            if time.monotonic() >= deadline:
                _signal_session(self.pid, signal.SIGKILL)
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout=20):
        """Stops the job: shutdown request, then signals after timeout seconds.

        Returns True if the job stopped cleanly on its own, False if it had
        to be killed. No process of the job survives either way.
        """
        if self.pid is None:
            return True
        clean = True
        deadline = time.monotonic() + timeout
        if self.running():
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
                # The controller may be gone or wedged: the signals below
                # end the job all the same.
                clean = False
            if not self._wait_exit(max(0.0, deadline - time.monotonic())):
                clean = False
        # Engines that outlive mpirun, or a job that never answered: signal
        # the whole session, so nothing of it is left.
        if job_processes(self.pid):
            if self.running():
                clean = False
            self._kill()
        elif self._proc is not None:
            self._proc.wait()
        for p in (self.mec_furl, self.tc_furl):
            # A furl of a stopped job only misleads clients.
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
        return "<Cluster n=%d dir=%s pid=%s %s>" % (self.n, self.ipmpi_dir, self.pid,
                                                     "running" if self.running() else "stopped")


# ---- the ipcluster command ---------------------------------------------------

_USAGE = """\
ipcluster mpirun -n N [options]   start a controller and N engines on this host
ipcluster -n N [options]          the same
ipcluster stop [--ipmpi-dir D]    stop the cluster running in D
ipcluster status [--ipmpi-dir D]  tell whether a cluster runs in D

`ipcluster mpirun` returns once every engine is ready; the job keeps running
in the background until `ipcluster stop`.
"""


def _parser():
    p = argparse.ArgumentParser(prog="ipcluster", usage=_USAGE,
                                description="Start and stop ipmpi clusters (one MPI job: "
                                            "controller on rank 0, engines on ranks 1..N).")
    sub = p.add_subparsers(dest="cmd", metavar="{mpirun,stop,status}")
    sub.required = True

    def common(sp):
        sp.add_argument("--ipmpi-dir", metavar="D", default=None,
                        help="profile directory (default $IPMPI_DIR or ~/.ipmpi)")

    m = sub.add_parser("mpirun", help="start a cluster with mpirun")
    m.add_argument("-n", "--n", type=int, default=4, metavar="N", help="number of engines (default 4)")
    m.add_argument("--mpirun-args", default="", metavar="ARGS",
                   help='extra arguments for mpirun, one quoted string (e.g. "--bind-to none")')
    m.add_argument("--client-ip", default=None, metavar="ADDR",
                   help="address the controller listens on and writes into the furls")
    m.add_argument("--client-port", type=int, default=None, metavar="PORT",
                   help="fixed client port; the furls then stay the same across restarts")
    m.add_argument("--engine-args", default="", metavar="ARGS",
                   help='extra arguments for every ipmpi rank, e.g. --engine-args="--mpi mpi4py"')
    m.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the engines (default 120)")
    m.add_argument("--ipmpi-bin", default=None, metavar="PATH",
                   help="the ipmpi executable (default $IPMPI_BIN, then the installed one)")
    common(m)

    s = sub.add_parser("stop", help="stop the cluster")
    s.add_argument("--timeout", type=float, default=20.0, metavar="S",
                   help="seconds to wait for a clean shutdown before killing the job (default 20)")
    common(s)
    st = sub.add_parser("status", help="show whether a cluster runs")
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


def _cmd_mpirun(a):
    c = Cluster(n=a.n, ipmpi_dir=a.ipmpi_dir, mpirun_args=a.mpirun_args, client_ip=a.client_ip,
                client_port=a.client_port, engine_args=a.engine_args, ipmpi_bin=a.ipmpi_bin)
    t0 = time.monotonic()
    c.start(timeout=a.timeout)
    print("ipcluster: %d engines ready after %.1f s (mpirun pid %d, IPMPI_DIR %s)"
          % (c.n, time.monotonic() - t0, c.pid, c.ipmpi_dir))
    print(_connect_hint(c))
    # Returning leaves the job running: mpirun is in a session of its own
    # and its output goes to its log file, not to this terminal.
    return 0


def _cmd_stop(a):
    c = Cluster.attach(a.ipmpi_dir)
    if not c.running():
        left = job_processes(c.pid)
        if left:
            c._kill()
        c.stop(timeout=0)
        print("ipcluster: the cluster in %s was not running (mpirun pid %d had exited)%s; "
              "removed its run file" % (c.ipmpi_dir, c.pid,
                                        ", killed %d leftover processes" % len(left) if left else ""),
              file=sys.stderr)
        return 1
    clean = c.stop(timeout=a.timeout)
    print("ipcluster: stopped the cluster in %s (mpirun pid %d)%s"
          % (c.ipmpi_dir, c.pid, "" if clean else "; it did not shut down cleanly and was killed"))
    return 0


def _cmd_status(a):
    c = Cluster.attach(a.ipmpi_dir)
    if not c.running():
        print("ipcluster: no cluster is running in %s (mpirun pid %d has exited; "
              "`ipcluster stop` removes the stale record)" % (c.ipmpi_dir, c.pid), file=sys.stderr)
        return 1
    try:
        mec = c.client(timeout=10, connect_timeout=10)
        try:
            ids = mec.get_ids()
        finally:
            mec.close()
    except Exception as e:
        print("ipcluster: mpirun pid %d runs in %s but the controller does not answer: %s: %s"
              % (c.pid, c.ipmpi_dir, type(e).__name__, e), file=sys.stderr)
        return 1
    print("ipcluster: running in %s: mpirun pid %d, %d of %d engines alive, ids %s"
          % (c.ipmpi_dir, c.pid, len(ids), c.n, ids))
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
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "mpirun":
            if a.n < 1:
                raise ClusterError("-n must be at least 1")
            return _cmd_mpirun(a)
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
