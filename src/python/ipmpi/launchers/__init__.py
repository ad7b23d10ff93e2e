"""How an ipmpi job is started: one launcher per `ipcluster` mode.

Every launcher has the interface of base.Launcher (start, job_id, alive,
state, stop, logs, record/from_record); ipmpi.cluster.Cluster picks one by
mode name, waits for the engines and keeps the run file.

    local, mpirun, mpiexec   mpirun.py   one MPI job on this host
    slurm                    batch.py    sbatch of slurm/ipmpi.sbatch
    pbs                      batch.py    qsub of pbs/ipmpi.pbs
    ssh                      ssh.py      one MPI job over a clusterfile's hosts

Engines that join a running controller later (`ipcluster engines`,
ipmpi.joining) are started by join.py's launchers, the same ones with a
second MPI job whose ranks are all engines; ompiserver.py runs the
ompi-server both jobs' mpiruns name. See REFUSED for what is not offered.
"""
from .base import ClusterError, LaunchSpec, Launcher, PLACEHOLDERS
from .batch import PbsLauncher, SlurmLauncher
from .mpirun import LocalLauncher, MpiexecLauncher, MpirunLauncher
from .ssh import SshLauncher

MODES = {
    "local": LocalLauncher,
    "mpirun": MpirunLauncher,
    "mpiexec": MpiexecLauncher,
    "slurm": SlurmLauncher,
    "pbs": PbsLauncher,
    "ssh": SshLauncher,
}

# Modes IPython 0.10 has that ipmpi does not offer, and why.
REFUSED = {
    "sge": "SGE cannot be run on the machines ipmpi is tested on, and ipmpi ships no untested "
           "launcher; submit a job script that runs `mpirun --enable-recovery -n N+1 ipmpi` "
           "yourself (see slurm/ipmpi.sbatch for one), or use the pbs or slurm mode",
    "lsf": "LSF cannot be run on the machines ipmpi is tested on, and ipmpi ships no untested "
           "launcher; submit a job script that runs `mpirun --enable-recovery -n N+1 ipmpi` "
           "yourself (see slurm/ipmpi.sbatch for one), or use the pbs or slurm mode",
}


def launcher_class(mode):
    try:
        return MODES[mode]
    except KeyError:
        if mode in REFUSED:
            raise ClusterError("mode %s is not supported: %s" % (mode, REFUSED[mode])) from None
        raise ClusterError("unknown mode %r (modes: %s)" % (mode, ", ".join(sorted(MODES)))) from None


__all__ = ["MODES", "REFUSED", "launcher_class", "ClusterError", "LaunchSpec", "Launcher",
           "PLACEHOLDERS"]
