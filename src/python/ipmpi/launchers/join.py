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
"""
from .base import ClusterError, LaunchSpec
from .batch import PbsLauncher, SlurmLauncher
from .mpirun import MpirunLauncher

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


class JoinSlurmLauncher(SlurmLauncher):
    pass


class JoinPbsLauncher(PbsLauncher):
    pass


JOIN_MODES = {"mpirun": JoinMpirunLauncher, "local": JoinMpirunLauncher, "mpiexec": JoinMpirunLauncher,
              "slurm": JoinSlurmLauncher, "pbs": JoinPbsLauncher}

JOIN_REFUSED = {
    "ssh": "engines on other hosts join through a batch mode (--mode slurm or pbs) or an mpirun of "
           "your own (`mpirun --ompi-server file:DIR/run/ompi-server.uri -n N ipmpi --join "
           "DIR/run/join.port`); a joining ssh mode is not offered because it is not tested here",
}


def join_launcher_class(mode):
    try:
        return JOIN_MODES[mode]
    except KeyError:
        if mode in JOIN_REFUSED:
            raise ClusterError("engines cannot join in mode %s: %s" % (mode, JOIN_REFUSED[mode])) from None
        raise ClusterError("unknown mode %r for joining engines (modes: %s)"
                           % (mode, ", ".join(sorted(JOIN_MODES)))) from None
