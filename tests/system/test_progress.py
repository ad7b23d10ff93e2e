"""Progress of blocking waits (ipmpi.progress) in every interface, on a
real 4-engine cluster: a client in a real pty waits 3 s, and a progress
line (tqdm's bar, or the plain line) must appear *while* it waits -- at
least a second before the wait ends -- and none when progress is off or
stderr is not a terminal.

Interfaces: MultiEngineClient (execute, PendingResult.get_result),
TaskClient (get_task_result(block=True), barrier, map), %px in IPython when
it does not stream. ipmpi.Client's views are in test_modern.py.
"""
import re
import subprocess

import pytest

from conftest import PYTHON, first_seen, ipython_on_a_pty, progress_env, pty_run

T = 90
# A count of engines or tasks, as the plain line and tqdm show it.
COUNT = r"\b[0-4]/4\b"

MEC_CODE = """
import sys, time
from ipmpi import client
mec = client.MultiEngineClient(sys.argv[1], timeout=60%s)
print('WAIT' + 'ONE', flush=True)
mec.execute('import time; time.sleep(3)')
print('WAIT' + 'TWO', flush=True)
pr = mec.execute('import time; time.sleep(3)', block=False)
pr.get_result()
print('WAIT' + 'THREE', flush=True)
mec.barrier([mec.execute('time.sleep(0.75)', block=False) for i in range(4)])
print('FIN' + 'ISHED', flush=True)
"""

TC_CODE = """
import sys, time
from ipmpi import client
tc = client.TaskClient(sys.argv[1], timeout=60%s)
print('WAIT' + 'ONE', flush=True)
tids = [tc.run(client.MapTask(time.sleep, args=(3,))) for i in range(4)]
tc.barrier(tids)
print('WAIT' + 'TWO', flush=True)
assert tc.map(time.sleep, [3] * 4) == [None] * 4
print('WAIT' + 'THREE', flush=True)
tc.get_task_result(tc.run(client.MapTask(time.sleep, args=(3,))), block=True)
print('FIN' + 'ISHED', flush=True)
"""


def _env(mode):
    return progress_env("off" if mode == "env-off" else mode)


def _run(code, furl, mode):
    kw = ", progress=False" if mode == "arg-off" else ""
    rc, seen = pty_run([PYTHON, "-c", code % kw, furl], _env(mode), T)
    text = "".join(s for _t, s in seen)
    assert rc == 0, text
    return seen, text


def _shown_during(seen, text, after, before, what):
    """A progress line of what appeared after the line `after` and at least
    a second before the line `before` (the wait lasts 3 s, progress shows
    after 1 s)."""
    t_after, t_before = first_seen(seen, after), first_seen(seen, before)
    assert t_after is not None and t_before is not None, text
    # The text between the two lines holds a progress line of what.
    segment = text.split(after, 1)[1].split(before, 1)[0]
    assert re.search(re.escape(what) + r".*" + COUNT, segment), (what, segment, text)
    # ...and it was there while the client still waited.
    acc, t_line = "", None
    for t, s in seen:
        acc += s
        if t_line is None and after in acc and re.search(re.escape(what) + r".*" + COUNT, acc.split(after, 1)[1]):
            t_line = t
    assert t_line is not None and t_before - t_line >= 1.0, \
        "the progress line of %s came %.2f s before the wait ended:\n%s" % (what, t_before - t_line, text)


@pytest.mark.parametrize("mode", ["auto", "plain"])
def test_multiengineclient_shows_progress_while_it_waits(cluster4, mode):
    seen, text = _run(MEC_CODE, cluster4.mec_furl, mode)
    _shown_during(seen, text, "WAITONE", "WAITTWO", "execute")
    _shown_during(seen, text, "WAITTWO", "WAITTHREE", "execute")
    # A barrier shows one line of results done, not one per result.
    _shown_during(seen, text, "WAITTHREE", "FINISHED", "barrier")
    assert "execute" not in text.split("WAITTHREE", 1)[1], text
    if mode == "plain":
        assert "execute:    0/4 engines done after" in text, text
        assert "execute:    4/4 engines done after" in text, text
        assert "barrier:    4/4 results done after" in text, text


@pytest.mark.parametrize("mode", ["auto", "plain"])
def test_taskclient_shows_progress_while_it_waits(cluster4, mode):
    seen, text = _run(TC_CODE, cluster4.tc_furl, mode)
    _shown_during(seen, text, "WAITONE", "WAITTWO", "barrier")
    _shown_during(seen, text, "WAITTWO", "WAITTHREE", "map")
    t0, t1 = first_seen(seen, "WAITTHREE"), first_seen(seen, "FINISHED")
    segment = text.split("WAITTHREE", 1)[1]
    assert re.search(r"get_task_result.*\b[01]/1\b", segment), text
    assert t1 - t0 >= 2.5, text
    if mode == "plain":
        assert "barrier:    4/4 tasks done after" in text, text
        assert "map:    4/4 tasks done after" in text, text
        assert "get_task_result:    1/1 tasks done after" in text, text


# IPMPI_PROGRESS=0 with the MultiEngineClient, progress=False with the
# TaskClient (both go through the same code of their common base).
@pytest.mark.parametrize("mode,which", [("env-off", "mec"), ("arg-off", "tc")])
def test_no_progress_when_off(cluster4, mode, which):
    code, furl = (MEC_CODE, cluster4.mec_furl) if which == "mec" else (TC_CODE, cluster4.tc_furl)
    _seen, text = _run(code, furl, mode)
    assert "FINISHED" in text and not re.search(COUNT + r"|\b[01]/1\b", text), text


def test_no_progress_without_a_tty(cluster4):
    for code, furl in ((MEC_CODE, cluster4.mec_furl), (TC_CODE, cluster4.tc_furl)):
        r = subprocess.run([PYTHON, "-c", code % "", furl], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=T, env=_env("auto"))
        assert r.returncode == 0 and "FINISHED" in r.stdout, r.stdout
        assert not re.search(COUNT + r"|\b[01]/1\b", r.stdout), r.stdout


PX_SESSION = """\
from ipmpi import client
mec = client.MultiEngineClient(timeout=60)
mec.px_stream = False
mec.activate()
print('WAIT' + 'ONE')
%px import time; time.sleep(3)
print('FIN' + 'ISHED')
exit
"""


def test_px_without_streaming_shows_progress_in_ipython(cluster4):
    _rc, seen = ipython_on_a_pty(cluster4, PX_SESSION, T, env=_env("plain"))
    text = "".join(s for _t, s in seen)
    assert "<Results List>" in text, text
    _shown_during(seen, text, "WAITONE", "<Results List>", "execute")
