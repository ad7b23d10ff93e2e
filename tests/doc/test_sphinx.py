"""The user guide builds with Sphinx without a single warning (-W), as
`make html` builds it. Registered only when configure found Sphinx
(configure --enable-docs makes a missing Sphinx an error)."""
import os
import shutil
import subprocess
import sys
import tempfile

from conftest import DOC_DIR


def sphinx_build():
    exe = os.environ.get("SPHINXBUILD") or shutil.which("sphinx-build")
    if exe:
        return [exe]
    return [os.environ.get("PYTHON") or sys.executable, "-m", "sphinx"]


def test_guide_builds_without_warnings():
    out = tempfile.mkdtemp(prefix="ipmpi-html-")
    try:
        r = subprocess.run(sphinx_build() + ["-W", "--keep-going", "-q", "-b", "html",
                                             "-d", os.path.join(out, ".doctrees"), DOC_DIR, out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert r.returncode == 0, ("the user guide does not build cleanly (apt-get install python3-sphinx "
                                   "if Sphinx is missing):\n" + r.stdout)
        for page in ("index", "overview", "process", "multiengine", "task", "mpi", "security",
                     "performance", "troubleshooting"):
            assert os.path.exists(os.path.join(out, page + ".html")), page
    finally:
        shutil.rmtree(out, ignore_errors=True)
