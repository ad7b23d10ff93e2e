"""Shared pieces of the documentation tests (tests/doc/).

make check sets PYTHONPATH (the build tree's pytree/), PATH (the build tree
first), IPMPI_BIN and IPMPI_SRCDIR (Makefile.am's AM_TESTS_ENVIRONMENT).
"""
import os

import pytest

SRCDIR = os.environ.get("IPMPI_SRCDIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
IPMPI_BIN = os.environ.get("IPMPI_BIN")
if not IPMPI_BIN or not os.path.exists(IPMPI_BIN):
    raise RuntimeError("IPMPI_BIN must name the build tree's ipmpi: run these tests with `make check`")
BUILD_DIR = os.path.dirname(os.path.abspath(IPMPI_BIN))
DOC_DIR = os.path.join(SRCDIR, "doc")
MAN_DIR = os.path.join(SRCDIR, "man")


def child_env(**extra):
    """Environment for child processes: the build tree first, Open MPI as root allowed."""
    env = dict(os.environ)
    env["PATH"] = BUILD_DIR + os.pathsep + env.get("PATH", "")
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def srcdir():
    return SRCDIR
