"""The client installs alone: `pip install --no-build-isolation --no-index .`
at the top of a checkout, into a venv, on a "laptop" with no MPI.

A copy of the checkout (no build tree, no .git) is installed offline with
Debian's python3-setuptools/python3-wheel/python3-pip into a fresh venv
(--system-site-packages, for numpy and cloudpickle) from inside network
namespace B, with a PATH that holds the C compiler and nothing else (no
mpirun, no mpicc, no build tree, no PYTHONPATH). The cluster runs in
namespace A (its own veth pair, addresses only inside the namespaces); the
venv's client in B is given only a copy of the furl file. It must reach
the cluster, run code, move arrays and tasks, and the pip-built package
must carry the same generated protocol constants (ipmpi._consts) as make's
and an importable engine module (ipmpi._engine). Needs root, iproute2 and
python3-venv/python3-pip/python3-setuptools/python3-wheel; without them the
test fails, it never skips.
"""
import os
import shutil
import subprocess

import pytest

from conftest import BUILD_DIR, IPCLUSTER, child_env, kill_dir_jobs, new_dir, ns_add, ns_del, ns_link, sh

ADDR_A, ADDR_B = "198.51.100.1", "198.51.100.2"
SRCDIR = os.environ.get("IPMPI_SRCDIR") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IP = shutil.which("ip") or "/usr/sbin/ip"
SYSTEM_PYTHON = "/usr/bin/python3"     # Debian's, with its setuptools, pip, numpy and cloudpickle
# Not copied: build trees (configure's build dirs, distcheck's _build),
# version control, caches and an earlier pip build.
SKIP_TOP = ("build", "_build", "autom4te.cache", ".git", ".pip-build", ".pytest_cache")




@pytest.fixture(scope="module")
def hosts():
    tag = str(os.getpid())
    a, b = "ipmpi-pa-" + tag, "ipmpi-pb-" + tag
    try:
        ns_add(a, b)
        ns_link(a, "vpa" + tag[-8:], ADDR_A, b, "vpb" + tag[-8:], ADDR_B)
        yield a, b
    finally:
        ns_del(a, b)


@pytest.fixture(scope="module")
def cluster(hosts):
    a, _b = hosts
    d = new_dir()
    try:
        r = subprocess.run(["ip", "netns", "exec", a, IPCLUSTER, "mpirun", "-n", "2", "--ipmpi-dir", d,
                            "--client-ip", ADDR_A, "--timeout", "120"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180, env=child_env())
        assert r.returncode == 0, "ipcluster in namespace A failed:\n" + r.stdout
        yield d
    finally:
        try:
            subprocess.run(["ip", "netns", "exec", a, IPCLUSTER, "stop", "--ipmpi-dir", d], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, env=child_env())
        finally:
            kill_dir_jobs(d)
            shutil.rmtree(d, ignore_errors=True)


def laptop_env(tmp, path):
    """A minimal environment: no PYTHONPATH, no build tree, no IPMPI_* settings."""
    env = {"PATH": path, "HOME": str(tmp / "home"), "LANG": "C.UTF-8", "TMPDIR": str(tmp)}
    os.makedirs(env["HOME"], exist_ok=True)
    return env


def compiler_only_bin(tmp):
    """A bin directory with the C compiler (as Python's sysconfig names it), its
    assembler and linker, and nothing else."""
    import sysconfig
    d = tmp / "bin"
    d.mkdir()
    names = {"cc", "gcc", "x86_64-linux-gnu-gcc", "as", "ld"}   # the driver runs as and ld from PATH
    cc = (sysconfig.get_config_var("CC") or "").split()
    if cc:
        names.add(cc[0])
    for n in names:
        real = shutil.which(n)
        if real:
            os.symlink(real, d / n)
    return str(d)


CLIENT = r"""
import os, sys
venv, furl, consts_make = sys.argv[1:4]
import ipmpi, ipmpi._ipmpi, ipmpi._consts, ipmpi._engine
from ipmpi import client
for m in (ipmpi, ipmpi._ipmpi, ipmpi._consts, ipmpi._engine):
    assert os.path.realpath(m.__file__).startswith(os.path.realpath(venv) + "/"), m.__file__
print("FROM", os.path.dirname(ipmpi.__file__))
print("CONSTS_SAME", open(ipmpi._consts.__file__).read() == open(consts_make).read())
print("ENGINE_CONSTS", ipmpi._engine.K_EXECUTE == ipmpi._ipmpi.K_EXECUTE == ipmpi._consts.K_EXECUTE)
print("MPI_LOADED", [m for m in sys.modules if "mpi4py" in m])
import numpy
mec = client.MultiEngineClient(furl, timeout=60, connect_timeout=10)
print("IDS", mec.get_ids())
print("EXEC", mec.execute("import socket; h = 6 * 7")[0]["stdout"] == "")
a = numpy.arange(300000, dtype=numpy.int64)
mec.push(dict(a=a))
print("ARRAY", [bool((x == a).all()) for x in mec.pull("a")])
print("PULL", mec.pull("h"))
mec.close()
tc = client.TaskClient(furl.replace("mec", "tc"), timeout=60, connect_timeout=10)
print("TASK", tc.run(client.StringTask("y = 2 ** 10", pull="y"), block=True)["y"])
tc.close()
"""


def test_pip_install_offline_into_a_venv_then_use_the_cluster(hosts, cluster, tmp_path):
    _a, b = hosts
    # A fresh checkout: the source tree without build trees.
    co = tmp_path / "checkout"
    shutil.copytree(SRCDIR, co, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in ("__pycache__",) or
                                             (os.path.abspath(d) == os.path.abspath(SRCDIR)
                                              and (n.startswith(SKIP_TOP) or n.startswith("build")))])
    os.chmod(co, 0o755)
    for f in ("pyproject.toml", "setup.py"):
        assert (co / f).exists(), "%s missing at the top of the checkout" % f
    assert not (co / "config.h").exists() and not (co / "Makefile").exists()
    path = compiler_only_bin(tmp_path) + os.pathsep + str(tmp_path / "venv" / "bin")
    for tool in ("mpirun", "mpiexec", "mpicc", "ipcluster", "ipmpi", "python3"):
        assert shutil.which(tool, path=path) is None, "%s is on the laptop's PATH" % tool
    env = laptop_env(tmp_path, path)

    def in_b(argv, timeout, cwd):
        return subprocess.run([IP, "netns", "exec", b] + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env, cwd=cwd)

    venv = tmp_path / "venv"
    r = in_b([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(venv)], 120, str(tmp_path))
    assert r.returncode == 0, "venv: " + r.stdout
    r = in_b([str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-index", "."], 300, str(co))
    assert r.returncode == 0, "pip install failed:\n" + r.stdout
    assert "Successfully installed ipmpi-" in r.stdout, r.stdout
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          stdout=subprocess.PIPE, text=True, env=env, timeout=30).stdout.strip()
    sos = [f for f in os.listdir(os.path.join(site, "ipmpi")) if f.startswith("_ipmpi") and f.endswith(".so")]
    assert len(sos) == 1, os.listdir(os.path.join(site, "ipmpi"))
    ldd = sh("ldd", os.path.join(site, "ipmpi", sos[0])).stdout
    assert "libssl" in ldd and "mpi" not in ldd and "pmix" not in ldd, ldd

    # Only the furl file goes to the laptop (a private copy, as scp + chmod 600 make it).
    furl = tmp_path / "home" / "ipcontroller-mec.furl"
    for cap in ("mec", "tc"):
        dst = tmp_path / "home" / ("ipcontroller-%s.furl" % cap)
        shutil.copy(os.path.join(cluster, "security", "ipcontroller-%s.furl" % cap), dst)
        os.chmod(dst, 0o600)
    consts_make = os.path.join(BUILD_DIR, "src", "python", "_consts.py")
    assert os.path.exists(consts_make), consts_make
    r = in_b([str(venv / "bin" / "python"), "-c", CLIENT, str(venv), str(furl), consts_make], 120,
             str(tmp_path / "home"))
    out = r.stdout
    assert r.returncode == 0, out
    assert "CONSTS_SAME True" in out and "ENGINE_CONSTS True" in out and "MPI_LOADED []" in out, out
    assert "IDS [0, 1]" in out and "EXEC True" in out, out
    assert "ARRAY [True, True]" in out and "PULL [42, 42]" in out and "TASK 1024" in out, out
