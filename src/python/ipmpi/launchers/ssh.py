"""Mode ssh: one MPI job spanning the hosts of an IPython 0.10 clusterfile.

The clusterfile is a Python file, as in IPython 0.10:

    engines = {'host1.example.com': 2, 'host2.example.com': 5}
    send_furl = True          # accepted; engines here need no furl (they
                              # reach the controller over MPI)
    # ipmpi additions, all optional:
    ssh = "ssh -o BatchMode=yes"     # how mpirun reaches the hosts
    controller_host = "login1"       # this host's name as the others know it
    network = "10.1.0.0/16"          # the network MPI and mpirun use
    mpirun_args = "--mca btl tcp,self"

The controller runs here (rank 0, the hostfile's first line with one slot),
the engines where the file says. mpirun starts the remote ranks with its
ssh launcher (plm_rsh_agent) from a hostfile ipcluster writes into the
profile's run directory. Before anything starts every remote host is tried
with the same ssh command, so an unreachable host is named with ssh's own
words. The profile directory (ipmpi's logs) and the ipmpi executable must
be at the same paths on every host, as IPython 0.10 assumed of
~/.ipython/security.
"""
import os
import shlex
import socket
import subprocess
import concurrent.futures

from .base import ClusterError, quote
from .mpirun import MpirunLauncher, jobstep_command, mpirun_command

DEFAULT_SSH = "ssh -o BatchMode=yes -o ConnectTimeout=10"
KNOWN_KEYS = {"engines", "send_furl", "ssh", "controller_host", "network", "mpirun_args"}


def read_clusterfile(path):
    """The clusterfile's settings as a dict; ClusterError on anything wrong in it."""
    ns = {}
    try:
        with open(path) as f:
            src = f.read()
    except OSError as e:
        raise ClusterError("cannot read the clusterfile %s: %s" % (path, e.strerror)) from None
    try:
        exec(compile(src, path, "exec"), ns)
    except Exception as e:
        raise ClusterError("the clusterfile %s does not run: %s: %s" % (path, type(e).__name__, e)) from None
    engines = ns.get("engines")
    if not isinstance(engines, dict) or not engines:
        raise ClusterError("the clusterfile %s must define engines = {'host': count, ...}" % path)
    for host, count in engines.items():
        if not isinstance(host, str) or not host or not isinstance(count, int) or count < 1:
            raise ClusterError("clusterfile %s: engines[%r] = %r: want a host name and a count >= 1"
                               % (path, host, count))
    out = {k: ns[k] for k in KNOWN_KEYS if k in ns}
    return out


class SshLauncher(MpirunLauncher):
    mode = "ssh"

    def __init__(self, spec):
        super().__init__(spec)
        self.hosts = {}
        self.agent = DEFAULT_SSH
        self.hostfile = None

    def configure(self):
        if not self.spec.clusterfile:
            raise ClusterError("ipcluster ssh needs --clusterfile FILE (engines = {'host': n, ...})")
        cf = read_clusterfile(self.spec.clusterfile)
        self.hosts = dict(cf["engines"])
        n = sum(self.hosts.values())
        if self.spec.n and self.spec.n != n and self.spec.n_given:
            raise ClusterError("-n %d disagrees with the clusterfile, which names %d engines"
                               % (self.spec.n, n))
        self.spec.n = n
        self.agent = cf.get("ssh") or DEFAULT_SSH
        self.controller_host = cf.get("controller_host") or socket.gethostname()
        extra = cf.get("mpirun_args") or []
        extra = shlex.split(extra) if isinstance(extra, str) else [str(a) for a in extra]
        net = cf.get("network")
        if net:
            extra = ["--mca", "oob_tcp_if_include", net, "--mca", "btl_tcp_if_include", net] + extra
        self.extra_mpirun = extra

    def check_hosts(self):
        """Runs `AGENT host true` on every remote host at once; names the ones that fail."""
        remote = [h for h in self.hosts if h != self.controller_host]

        def probe(h):
            argv = shlex.split(self.agent) + [h, "true"]
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, timeout=30)
            except FileNotFoundError:
                return h, "%s is not installed" % argv[0]
            except subprocess.TimeoutExpired:
                return h, "no answer within 30 s"
            return h, None if r.returncode == 0 else "%s (status %d)" % (r.stdout.strip() or "no message",
                                                                          r.returncode)

        if not remote:
            return
        with concurrent.futures.ThreadPoolExecutor(len(remote)) as ex:
            bad = [(h, why) for h, why in ex.map(probe, remote) if why]
        if bad:
            raise ClusterError("cannot reach %s with `%s`:\n%s" % (
                ", ".join(h for h, _ in bad), self.agent,
                "\n".join("  %s: %s" % (h, why) for h, why in bad)))

    def write_hostfile(self):
        os.makedirs(self.spec.run_dir, mode=0o700, exist_ok=True)
        self.hostfile = os.path.join(self.spec.run_dir, "ipcluster-ssh-hostfile.%d" % os.getpid())
        lines = ["%s slots=%d" % (self.controller_host, 1 + self.hosts.get(self.controller_host, 0))]
        lines += ["%s slots=%d" % (h, c) for h, c in self.hosts.items() if h != self.controller_host]
        with open(self.hostfile, "w") as f:
            f.write("# written by ipcluster ssh from %s: rank 0 (the controller) first\n"
                    % self.spec.clusterfile)
            f.write("\n".join(lines) + "\n")

    def build_command(self):
        s = self.spec
        fwd = []
        for var in ("PYTHONPATH", "LD_LIBRARY_PATH", "IPMPI_DIR"):
            if os.environ.get(var):
                fwd += ["-x", var]
        saved = s.mpirun_args
        s.mpirun_args = (["--hostfile", self.hostfile, "--mca", "plm_rsh_agent", self.agent]
                         + fwd + self.extra_mpirun + saved)
        try:
            cmd = mpirun_command(s, "mpirun", hosts_cpus=s.ranks)
        finally:
            s.mpirun_args = saved
        if s.script:
            cmd = jobstep_command(s) + cmd
        return cmd

    def start(self):
        self.configure()
        self.check_hosts()
        self.write_hostfile()
        self.popen(self.build_command(), what="ssh")

    def leftover_pattern(self):
        """pgrep -f pattern of this job's ranks on a remote host."""
        import re
        return "^%s --ipmpi-dir %s( |$)" % (re.escape(self.spec.exe or ""), re.escape(self.spec.ipmpi_dir))

    def remote_leftovers(self):
        """{host: [pids]} of processes on remote hosts still naming this profile directory."""
        left = {}
        # Anchored at the executable: the ranks' command lines start with
        # it, while ipcluster's own (and this ssh's) name the directory too.
        if not self.spec.exe:
            return left
        pattern = self.leftover_pattern()
        for h in self.hosts:
            if h == self.controller_host:
                continue
            argv = shlex.split(self.agent) + [h, "pgrep -f -- %s" % shlex.quote(pattern)]
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            pids = [int(p) for p in r.stdout.split() if p.isdigit()]
            if pids:
                left[h] = pids
        return left

    def stop(self, timeout=10.0):
        super().stop(timeout)
        # mpirun takes its remote daemons down with it; a host cut off
        # meanwhile may keep ranks: end them over ssh, by pid.
        for h, pids in self.remote_leftovers().items():
            argv = shlex.split(self.agent) + [h, "kill -9 %s" % " ".join(map(str, pids))]
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)

    def record(self):
        rec = super().record()
        rec.update({"hosts": self.hosts, "agent": self.agent, "hostfile": self.hostfile,
                    "controller_host": getattr(self, "controller_host", None), "exe": self.spec.exe})
        return rec

    @classmethod
    def from_record(cls, spec, rec):
        lc = super().from_record(spec, rec)
        lc.hosts = rec.get("hosts") or {}
        lc.agent = rec.get("agent") or DEFAULT_SSH
        lc.hostfile = rec.get("hostfile")
        lc.controller_host = rec.get("controller_host")
        if rec.get("exe"):
            spec.exe = rec["exe"]
        return lc

    def describe(self):
        return "mpirun pid %s over ssh to %s" % (self.pid, ", ".join(
            "%s (%d)" % (h, c) for h, c in self.hosts.items()))


__all__ = ["SshLauncher", "read_clusterfile", "quote"]
