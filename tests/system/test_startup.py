"""Start-up: every rank says where its start-up went, and engines start light.

Each rank logs one "start-up:" line of wall-clock and CPU stamps once it is
ready; tools/startup_phases.py turns one start's logs into a table
(doc/performance.rst, "Where start-up time goes"). Engines import nothing
heavy before their first request (issue 11, part 4). No figure is asserted
here: the times are the benchmark's (bench/bench_startup.py).
"""
import os
import subprocess
import sys

import pytest

from conftest import connected_client, running_cluster

SRCDIR = os.environ.get("IPMPI_SRCDIR") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(SRCDIR, "tools", "startup_phases.py")
sys.path.insert(0, os.path.join(SRCDIR, "tools"))
import startup_phases  # noqa: E402

ENGINE_ORDER = ["main", "mpi", "pmix", "node", "bound", "python", "engine"]
ENGINE_CPU_ORDER = ["cpu_mpi", "cpu_node", "cpu_bound", "cpu_python", "cpu"]
CONTROLLER_ORDER = ["main", "mpi", "pmix", "node", "setup", "first_ready", "last_ready", "furl"]


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(3)


@pytest.fixture(scope="module")
def logs(cluster):
    return startup_phases.read_logs(cluster.log_dir)


def test_every_engine_logs_its_start_up_steps_in_order(logs):
    engines, _ = logs
    assert sorted(engines) == [0, 1, 2]
    for eid, st in engines.items():
        walls = [st[k] for k in ENGINE_ORDER]
        assert walls == sorted(walls), "engine %d: %r" % (eid, st)
        cpus = [st[k] for k in ENGINE_CPU_ORDER]
        assert cpus == sorted(cpus) and cpus[0] > 0, "engine %d: %r" % (eid, st)


def test_controller_logs_setup_readies_and_furl_in_order(logs, cluster):
    _, ctl = logs
    assert ctl is not None
    walls = [ctl[k] for k in CONTROLLER_ORDER]
    assert walls == sorted(walls), ctl
    # The client side: launched before anything ran, saw the furl after the
    # controller wrote it, and got the ids after that.
    t = cluster.startup_times
    assert t["launch"] <= ctl["main"]
    assert ctl["furl"] <= t["furl"] <= t["answered"]


def test_phase_table_names_every_step(cluster):
    t = cluster.startup_times
    text = "\n".join(startup_phases.table(cluster.log_dir, t["launch"], t["furl"], t["answered"]))
    assert text.startswith("3 engines; times in s, from the launch")
    for _, _, label in startup_phases.ENGINE_STEPS:
        assert label in text
    for _, label in startup_phases.CTL_STEPS:
        assert label in text
    assert "ipcluster: a client got the N ids" in text


def test_phase_tool_says_when_a_directory_holds_no_start(tmp_path):
    p = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "no engine start-up lines in %s" % tmp_path in p.stderr


@pytest.fixture
def fresh_mec():
    """A client of a 2-engine cluster that has served no request yet."""
    for c in running_cluster(2):
        yield from connected_client(c)


def test_engines_import_nothing_heavy_before_their_first_request(fresh_mec):
    # The first request: what was imported before it (and by the execute
    # path itself, which needs no pickling).
    fresh_mec.execute("import sys; heavy = sorted(m for m in ('cloudpickle', 'json', 'pickle') "
                      "if m in sys.modules)")
    assert fresh_mec.pull("heavy") == [[], []]
