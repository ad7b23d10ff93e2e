"""Jobs of engines that join a running controller (`ipcluster engines`,
IPython 0.10's "start ipengine as many times as you like").

Such a job is one more MPI job whose ranks are all engines: `mpirun
--enable-recovery --ompi-server file:URI -n N ipmpi --join PORTFILE`, with
the ompi-server and the port file of the running cluster (its controller
runs with --accept-joins PORTFILE; see src/controller/join.c). It is
started like a cluster of the same mode: on this host (mpirun), or as a
batch job (slurm, pbs) from the same templates, whose {{ranks}} is then N.
Its engines get the next ids; they leave when their job ends or when the
controller KILLs them (`ipcluster stop --engines JOB`).

A joining job stays on one node: under Open MPI 4.1 the cluster's mpirun
crashes when the job connecting to it has ranks under a daemon on another
node (open-mpi/ompi#6818, open upstream; seen here too). So the ssh mode
runs mpirun on the engines' host itself, and the batch modes ask for one
node; more nodes join with one `ipcluster engines` each.
"""
import os
import re
import shlex

from . import ompiserver
from .base import ClusterError, LaunchSpec, quote
from .batch import PbsLauncher, SlurmLauncher
from .mpirun import MpirunLauncher, mpirun_command
from .ssh import SshLauncher

JOIN_PORT = "join.port"


class JoinSpec(LaunchSpec):
    """A LaunchSpec for a job of n engines joining the controller whose port
    file is port_file (every rank is an engine)."""

    def __init__(self, n, ipmpi_dir, port_file, ompi_uri, **kw):
        super().__init__(n, ipmpi_dir, **kw)
        self.port_file = port_file
        self.use_ompi_server = ompi_uri

    @property
    def ranks(self):
        return self.n

    def rank_command(self):
        return [self.exe] + self.ipmpi_args + ["--join", self.port_file]


class JoinMpirunLauncher(MpirunLauncher):
    mode = "mpirun"
    what = "engines"


class JoinSshLauncher(SshLauncher):
    """Engines on one host of a clusterfile (engines = {'host': n}): ssh runs
    `mpirun ... ipmpi --join` on that host, so the whole joining job (its
    mpirun and all its ranks) is on one node. (Open MPI 4.1's
    connect/accept across mpiruns crashes the accepting mpirun when the
    connecting job has ranks under a daemon on another node,
    open-mpi/ompi#6818: the running cluster would go down with it.)"""
    what = "engines"

    def configure(self):
        super().configure()
        if len(self.hosts) != 1:
            raise ClusterError("ipcluster engines --mode ssh starts engines on one host per call (the "
                               "clusterfile names %d: %s); run it once per host. (A joining MPI job that "
                               "spans hosts crashes the cluster's mpirun under Open MPI 4: "
                               "open-mpi/ompi#6818)" % (len(self.hosts), ", ".join(self.hosts)))
        self.host = next(iter(self.hosts))

    def check_hosts(self):
        # The one host is remote to this process, whatever the clusterfile
        # says of the controller's.
        here, self.controller_host = self.controller_host, None
        try:
            super().check_hosts()
        finally:
            self.controller_host = here

    def build_command(self):
        s = self.spec
        env = ["OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"]
        for var in ("PYTHONPATH", "LD_LIBRARY_PATH", "IPMPI_DIR", "PATH"):
            if os.environ.get(var):
                env.append("%s=%s" % (var, os.environ[var]))
        saved = s.mpirun_args
        s.mpirun_args = self.extra_mpirun + saved
        try:
            remote = ompiserver.with_server(mpirun_command(s, "mpirun", hosts_cpus=s.ranks), s.use_ompi_server)
        finally:
            s.mpirun_args = saved
        return shlex.split(self.agent) + [self.host, "exec env " + quote(env + remote)]

    def start(self):
        self.configure()
        self.check_hosts()
        self.popen(self.build_command(), what=self.what)

    def leftover_pattern(self):
        # This job's mpirun and ranks on that host (the cluster's own may
        # run there too): they all name the join port file.
        return "--join %s( |$)" % re.escape(self.spec.port_file)

    def remote_leftovers(self):
        self.controller_host = None
        return super().remote_leftovers()


class JoinSlurmLauncher(SlurmLauncher):
    """On one node (open-mpi/ompi#6818, see JoinSshLauncher)."""

    def submit_command(self):
        argv = super().submit_command()
        return argv[:-1] + ["--nodes=1"] + argv[-1:]


class JoinPbsLauncher(PbsLauncher):
    """On one node (open-mpi/ompi#6818, see JoinSshLauncher)."""

    def submit_command(self):
        argv = super().submit_command()
        return argv[:-1] + ["-l", "nodes=1"] + argv[-1:]


JOIN_MODES = {"mpirun": JoinMpirunLauncher, "local": JoinMpirunLauncher, "mpiexec": JoinMpirunLauncher,
              "slurm": JoinSlurmLauncher, "pbs": JoinPbsLauncher, "ssh": JoinSshLauncher}

def join_launcher_class(mode):
    try:
        return JOIN_MODES[mode]
    except KeyError:
        raise ClusterError("unknown mode %r for joining engines (modes: %s)"
                           % (mode, ", ".join(sorted(JOIN_MODES)))) from None
