"""The parallel magics (%px, %result, %autopx, %%px) and mec.activate()
in a real IPython shell (Debian's python3-ipython: `python3 -m IPython`)
on a real 4-engine cluster, and activate() in plain Python.

The chapter's session is typed into `ipython --simple-prompt` on its
stdin, line by line as a user types it; the printed output is checked.
Cell magics (%%px) run from an .ipy file, as a notebook cell would.
Every run is bounded by a timeout.
"""
import re
import subprocess

import pytest

from conftest import IPYTHON_ARGV, PYTHON, child_env

T = 120

HEADER = """\
from ipmpi import client
mec = client.MultiEngineClient(timeout=60)
"""


def ipython(cluster, script, *args, stdin=True):
    env = child_env()
    env["IPMPI_DIR"] = cluster.ipmpi_dir
    argv = IPYTHON_ARGV + list(args)
    if stdin:
        argv.append("--simple-prompt")
    r = subprocess.run(argv, input=script if stdin else None, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=T, env=env)
    out = re.sub(r"\x1b\][^\x07]*\x07|\x1b\[[0-9;]*[a-zA-Z]", "", r.stdout)
    # The simple prompt is printed without a newline; put what follows on its own line.
    out = re.sub(r"(?m)^In \[\d+\]: (?:   \.\.\.: )*", "\n", out)
    return r.returncode, out


@pytest.fixture(scope="module")
def fresh(cluster4):
    return cluster4


def results_list(rows):
    out = ["<Results List>"]
    for eid, num, inp, stdout in rows:
        out.append("[%d] In [%d]: %s" % (eid, num, inp))
        if stdout is not None:
            out.append("[%d] Out[%d]: %s" % (eid, num, stdout))
            out.append("")
    return "\n".join(out) + "\n"


def test_the_chapters_magic_session(fresh):
    script = HEADER + """\
mec.activate()
mec.block=True
import numpy
%px import numpy
%px a = numpy.random.rand(2,2)
%px print(numpy.linalg.eigvals(a))
%result
mec.block=False
%autopx
max_evals = []
for i in range(100):
    a = numpy.random.rand(10,10)
    a = a+a.transpose()
    evals = numpy.linalg.eigvals(a)
    max_evals.append(evals[0].real)

%autopx
mec.block=True
px print("Average max eigenvalue is: ", sum(max_evals)/len(max_evals))
mec.push(dict(c='speed'))
%px print(c)
"""
    rc, out = ipython(fresh, script)
    assert rc == 0, out
    # Fresh engines: %px import numpy is their execution 1.
    assert ("Executing command on Controller\nOut[6]: \n" + results_list(
        [(i, 1, "import numpy", None) for i in range(4)])) in out, out
    assert ("Executing command on Controller\nOut[7]: \n" + results_list(
        [(i, 2, "a = numpy.random.rand(2,2)", None) for i in range(4)])) in out, out
    assert "Executing command on Controller\nOut[8]: \n<Results List>\n" in out, out
    px = out.split("Out[8]: \n")[1].split("Out[9]: \n")[0].strip("\n")
    res = out.split("Out[9]: \n")[1].split("Auto Parallel Enabled")[0].strip("\n")
    assert px == res                    # %result shows the last command again
    rows = re.findall(r"\[(\d)\] In \[3\]: print\(numpy.linalg.eigvals\(a\)\)\n\[\1\] Out\[3\]: \[.+\]\n\n", px + "\n\n")
    assert [r[0] for r in rows] == ["0", "1", "2", "3"], px
    assert "Auto Parallel Enabled\nType %autopx to disable\n" in out
    assert len(re.findall(r"(?:^|\.\.\.: )<ipmpi\.client\.PendingResult object at 0x[0-9a-f]+>$", out, re.M)) == 2, out
    assert "Auto Parallel Disabled\n" in out
    avg = re.findall(r"\[(\d)\] In \[6\]: print\(\"Average max eigenvalue is: \", sum\(max_evals\)/len\(max_evals\)\)\n"
                     r"\[\1\] Out\[6\]: Average max eigenvalue is:  (\d+\.\d+)\n", out)
    assert [a[0] for a in avg] == ["0", "1", "2", "3"], out
    assert all(9.0 < float(a[1]) < 11.5 for a in avg)
    assert "Out[17]: [None, None, None, None]" in out
    assert results_list([(i, 7, "print(c)", "speed") for i in range(4)]) in out, out
    # The magics ran on the engines, not here: max_evals is not a local name.
    assert "NameError" not in out


def test_magics_errors_and_targets(fresh):
    script = HEADER + """\
%load_ext ipmpi.magic
%px a = 1
mec.activate()
mec.targets = [0, 2]
%px print(100 + 1)
mec.targets = 'all'
%px 1/0
%px print('alive')
%result 1
mec.targets = 'some'
%px print('still alive')
"""
    rc, out = ipython(fresh, script)
    assert rc == 0, out
    assert "Error:  No Controller is activated\nUse activate() on a MultiEngineClient object" in out
    m = re.search(r"<Results List>\n\[0\] In \[\d+\]: print\(100 \+ 1\)\n\[0\] Out\[\d+\]: 101\n\n"
                  r"\[2\] In \[\d+\]: print\(100 \+ 1\)\n\[2\] Out\[\d+\]: 101\n\n\n", out)
    assert m, out
    assert ("one or more exceptions from call to method: execute\n"
            "[0:execute]: ZeroDivisionError: division by zero\n") in out, out
    for i in range(4):
        assert re.search(r"\[%d:execute\]: \nTraceback \(most recent call last\):\n"
                         r"  File \"<ipmpi-input-\d+>\", line 1, in <module>\n" % i, out), out
    assert re.search(r"\[3\] Out\[\d+\]: alive\n", out), out
    assert "Out[11]: \n" + results_list([(i, 1, "import numpy", None) for i in range(4)]) in out, out
    assert "TypeError: targets must be 'all', an engine id or a list of engine ids, not 'some'" in out
    assert len(re.findall(r"^\[\d\] Out\[\d+\]: still alive$", out, re.M)) == 4, out


def test_cell_magic_with_targets_and_noblock(fresh):
    # At the prompt a cell magic's cell ends with two empty lines.
    script = HEADER + """\
mec.activate()
%%px --targets 0,2
cellv = 7
print('cell', cellv)


%%px --targets [1, 3] --noblock
cellv = 8


r = _
print('pending:', type(r).__name__, [x['id'] for x in r.get_result(timeout=60)])
print('pulled:', mec.pull('cellv'))
%%px --targets nine
x = 1


%%px --bogus
x = 1


print('done')
"""
    rc, out = ipython(fresh, script)
    assert rc == 0, out
    assert re.search(r"Executing command on Controller\nOut\[4\]: \n<Results List>\n"
                     r"\[0\] In \[\d+\]: cellv = 7\nprint\('cell', cellv\)\n\[0\] Out\[\d+\]: cell 7\n\n"
                     r"\[2\] In \[\d+\]: cellv = 7\nprint\('cell', cellv\)\n\[2\] Out\[\d+\]: cell 7\n\n", out), out
    assert re.search(r"^Out\[5\]: <ipmpi\.client\.PendingResult object at 0x[0-9a-f]+>$", out, re.M), out
    assert "pending: PendingResult [1, 3]" in out, out
    assert "pulled: [7, 8, 7, 8]" in out, out
    assert "--targets: 'all', an engine id or a list of ids (0,2 or [0,2]), not 'nine'" in out, out
    assert "unknown option '--bogus'" in out, out
    assert "done" in out


def test_activate_in_plain_python(fresh):
    env = child_env()
    env["IPMPI_DIR"] = fresh.ipmpi_dir
    code = HEADER + """\
mec.activate()
from ipmpi import magic
assert magic.active() is mec
print(repr(magic.px("print(6 * 7)")))
"""
    r = subprocess.run([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=T, env=env)
    assert r.returncode == 0, r.stdout
    assert "The IPython Controller magics only work within IPython." in r.stdout
    assert "Executing command on Controller\n<Results List>\n[0] In [" in r.stdout
    assert r.stdout.count("Out[") == 4 and r.stdout.count(": 42\n") == 4
