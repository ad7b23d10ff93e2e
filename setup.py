"""The ipmpi client alone: `pip install .` at the top of a checkout.

Builds the Python package ipmpi (src/python/ipmpi) and its C extension
ipmpi._ipmpi (TLS 1.3 client transport: src/client, src/pyext and the MPI-free
pieces of src/common) with the system's C compiler and OpenSSL; no MPI, no
autotools. The protocol constants ipmpi/_consts.py are generated from the C
headers by src/python/gen_consts.py, as make does. The controller and the
engines (the ipmpi program) are built with ./configure && make.

Offline (no PyPI: clusters without internet), with Debian's
python3-setuptools, python3-wheel and python3-pip:

    python3 -m venv --system-site-packages ~/ipmpi-venv     # numpy, cloudpickle from Debian
    ~/ipmpi-venv/bin/pip install --no-build-isolation --no-index .

Needs: a C compiler, OpenSSL's headers (libssl-dev), Python's headers
(python3-dev); cloudpickle at run time, numpy for arrays.
"""
import os
import re
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

TOP = os.path.dirname(os.path.abspath(__file__))
# Build products under .pip-build (not build/, which is where ./test.sh and
# many developers run configure && make).
BUILD_BASE = ".pip-build"


def _version():
    with open(os.path.join(TOP, "src", "python", "ipmpi", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


class build_py_with_consts(build_py):
    """build_py that also writes ipmpi/_consts.py from the C headers and adds
    the launchers' job-script templates."""

    def run(self):
        super().run()
        out = os.path.join(self.build_lib, "ipmpi", "_consts.py")
        text = subprocess.run(
            [sys.executable, os.path.join(TOP, "src", "python", "gen_consts.py"),
             os.path.join(TOP, "include", "ipmpi", "protocol.h"), os.path.join(TOP, "include", "ipmpi", "errors.h")],
            check=True, stdout=subprocess.PIPE, text=True).stdout
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            f.write(text)
        os.replace(out + ".tmp", out)
        # The job-script templates of ipcluster slurm/pbs, as make install puts them.
        tdir = os.path.join(self.build_lib, "ipmpi", "launchers", "templates")
        os.makedirs(tdir, exist_ok=True)
        for src in ("slurm/ipmpi.sbatch", "pbs/ipmpi.pbs"):
            self.copy_file(os.path.join(TOP, src), os.path.join(tdir, os.path.basename(src)))


COMMON = ["errors", "codec", "furl", "tls", "log", "backoff", "hugemem", "shm", "mcache"]
ext = Extension(
    "ipmpi._ipmpi",
    sources=["src/client/module.c", "src/client/conn.c", "src/pyext/bigbuf.c"]
    + ["src/common/%s.c" % n for n in COMMON],
    include_dirs=["include", "src/common", "src/pyext", "src"],
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=["-fvisibility=hidden", "-Wall"],
    libraries=["ssl", "crypto", "pthread"],
)

os.makedirs(os.path.join(TOP, BUILD_BASE), exist_ok=True)
setup(
    name="ipmpi",
    version=_version(),
    description="IPython 0.10's parallel computing on MPI: the client (MultiEngineClient, TaskClient)",
    long_description=__doc__,
    long_description_content_type="text/plain",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    packages=["ipmpi", "ipmpi.launchers"],
    package_dir={"ipmpi": "src/python/ipmpi", "ipmpi.launchers": "src/python/ipmpi/launchers"},
    ext_modules=[ext],
    install_requires=["cloudpickle"],
    extras_require={"arrays": ["numpy"]},
    cmdclass={"build_py": build_py_with_consts},
    options={"build": {"build_base": BUILD_BASE}, "egg_info": {"egg_base": BUILD_BASE}},
    zip_safe=False,
)
