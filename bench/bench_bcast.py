#!/usr/bin/python3
"""How a request for all engines could travel (issue 11 part 2): the
measurement before the design. Plain mpi4py under mpirun, no ipmpi: rank 0
(the controller's place) gets a payload to every other rank by

  flat      rank 0 sends to each rank in turn (what ipmpi's controller does
            today: N point-to-point sends of one buffer)
  tree      a binomial tree of point-to-point forwards: each rank receives
            from its parent, then sends on to its children
  ibcast    MPI_Ibcast over all ranks, then MPI_Wait

each followed by a one-byte MPI_Gather of acknowledgements at rank 0 (so a
broadcast counts as done when every rank has it), median of --repeat, for
each size. Also rank 0's CPU time per broadcast (an upper bound of its
share of the work: MPI's blocking waits spin). On one node with more ranks
than cores, every rank must get a turn to take its copy whatever the
shape.

--nodes 2 runs the same across two "nodes": network namespaces A and B
joined by a veth pair, sshd in B (tools/netbed.py, as the system tests'
multi-host bed; needs root, iproute2, openssh-server), mpirun in A with
its ssh launcher, rank 0 and half the others on A, the rest on B, MPI's
TCP transport between them.

Usage: bench_bcast.py [--ranks 17,65] [--sizes 64,2097152] [--repeat 20] [--nodes 1|2]
(runs itself under mpirun --oversubscribe for each rank count).
Exit status 1 if a run failed.
"""
import argparse
import contextlib
import os
import sys
import time

import benchlib

CHILD = "--child"


def child(sizes, repeat):
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    ack = np.zeros(1, dtype=np.uint8)
    acks = np.zeros(size, dtype=np.uint8) if rank == 0 else None

    def flat(buf):
        if rank == 0:
            reqs = [comm.Isend(buf, dest=r, tag=7) for r in range(1, size)]
            MPI.Request.Waitall(reqs)
        else:
            comm.Recv(buf, source=0, tag=7)

    def tree(buf):
        # Binomial tree rooted at 0: receive from the parent, then send on.
        mask = 1
        while mask < size:
            if rank & mask:
                comm.Recv(buf, source=rank - mask, tag=8)
                break
            mask <<= 1
        mask >>= 1
        reqs = []
        while mask > 0:
            if rank + mask < size:
                reqs.append(comm.Isend(buf, dest=rank + mask, tag=8))
            mask >>= 1
        MPI.Request.Waitall(reqs)

    def ibcast(buf):
        comm.Ibcast(buf, root=0).Wait()

    out = []
    for n in sizes:
        buf = np.ones(n, dtype=np.uint8) if rank == 0 else np.zeros(n, dtype=np.uint8)
        for name, fn in (("flat", flat), ("tree", tree), ("ibcast", ibcast)):
            times, cpus = [], []
            for i in range(repeat + 2):
                comm.Barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                fn(buf)
                comm.Gather(ack, acks, root=0)
                t1, c1 = time.perf_counter(), time.process_time()
                if i >= 2:
                    times.append(t1 - t0)
                    cpus.append(c1 - c0)
            if rank == 0:
                out.append((n, name, benchlib.median(times), benchlib.median(cpus)))
        if rank != 0 and n > 0 and buf[-1] != 1:
            raise SystemExit("rank %d: payload not received" % rank)
    if rank == 0:
        for n, name, t, c in out:
            print("RESULT %d %s %.6f %.6f" % (n, name, t, c), flush=True)


def main():
    if CHILD in sys.argv:
        i = sys.argv.index(CHILD)
        child([int(x) for x in sys.argv[i + 1].split(",")], int(sys.argv[i + 2]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="17,65")
    ap.add_argument("--sizes", default="64,2097152")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--nodes", type=int, choices=(1, 2), default=1)
    a = ap.parse_args()
    with (two_nodes() if a.nodes == 2 else contextlib.nullcontext()) as bed:
        return measure_all(a, bed)


@contextlib.contextmanager
def two_nodes():
    """Namespaces A and B, sshd in B; yields how to run mpirun across them."""
    import shutil
    import tempfile
    import pathlib
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import netbed
    netbed.need_sshd()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ipmpi-bcast-"))
    tag = str(os.getpid())
    a, b = "ipmpi-ba-" + tag, "ipmpi-bb-" + tag
    addr_a, addr_b, net = "198.51.100.1", "198.51.100.2", "198.51.100.0/24"
    key, hostkey = str(tmp / "key"), str(tmp / "hostkey")
    netbed.sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    netbed.sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostkey)
    shutil.copy(key + ".pub", str(tmp / "authorized_keys"))
    config, pidfile = netbed.sshd_config(tmp, addr_b, hostkey)
    try:
        netbed.ns_add(a, b)
        netbed.ns_link(a, "vba" + tag[-8:], addr_a, b, "vbb" + tag[-8:], addr_b)
        # B's own /dev/shm and host name: Open MPI must see two nodes.
        netbed.sh("ip", "netns", "exec", b, "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                  "mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm && hostname ipmpi-bcast-b && "
                  "exec /usr/sbin/sshd -f %s" % config)
        deadline = time.monotonic() + 10
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.05)
        ssh = ("ssh -F /dev/null -i %s -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
               "-o BatchMode=yes -o ConnectTimeout=3 -o LogLevel=ERROR" % key)
        yield {"ns": a, "ssh": ssh, "hosts": (addr_a, addr_b), "net": net, "tmp": tmp}
    finally:
        netbed.stop_sshd(pidfile)
        netbed.ns_del(a, b)
        shutil.rmtree(str(tmp), ignore_errors=True)


def mpirun_cmd(n, bed, args):
    if bed is None:
        return ["mpirun", "--oversubscribe", "-n", str(n)] + args
    on_a = (n + 1) // 2
    hostfile = bed["tmp"] / ("hosts.%d" % n)
    hostfile.write_text("%s slots=%d\n%s slots=%d\n" % (bed["hosts"][0], on_a, bed["hosts"][1], n - on_a))
    fwd = []
    for var in ("PYTHONPATH", "PATH", "LD_LIBRARY_PATH"):
        if os.environ.get(var):
            fwd += ["-x", var]
    return (["ip", "netns", "exec", bed["ns"], "mpirun", "--oversubscribe", "--hostfile", str(hostfile),
             "--mca", "plm_rsh_agent", bed["ssh"], "--mca", "oob_tcp_if_include", bed["net"],
             "--mca", "btl_tcp_if_include", bed["net"]] + fwd + ["-n", str(n)] + args)


def measure_all(a, bed):
    where = "on one node" if bed is None else "on two nodes (%d on A with rank 0, the rest on B)"
    for n in [int(x) for x in a.ranks.split(",")]:
        print("== %d ranks (rank 0 and %d others) %s" % (n, n - 1, where if bed is None else where % ((n + 1) // 2)),
              flush=True)

        def run():
            cmd = mpirun_cmd(n, bed, [sys.executable, os.path.abspath(__file__), CHILD, a.sizes, str(a.repeat)])
            return benchlib.run_checked(cmd, timeout=900, cwd=os.path.dirname(os.path.abspath(__file__)))

        out = benchlib.measure("broadcasts at %d ranks" % n, run)
        if out is None:
            continue
        rows = {}
        for line in out.splitlines():
            if line.startswith("RESULT "):
                _r, size, name, t, c = line.split()
                rows.setdefault(int(size), {})[name] = (float(t), float(c))
        for size in sorted(rows):
            r = rows[size]
            flat = r.get("flat", (None, None))[0]
            print("  %9d B: " % size + "  ".join(
                "%s %.3f ms (rank 0 CPU %.3f ms, %s of flat)" % (k, v[0] * 1e3, v[1] * 1e3,
                                                                   benchlib.fmt_ratio(v[0], flat))
                for k, v in r.items()), flush=True)
    return benchlib.finish()


if __name__ == "__main__":
    raise SystemExit(main())
