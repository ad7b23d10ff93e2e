"""Streamed output (doc/protocol.md section 2: IPMPI_F_STREAM, IPMPI_F_MORE)
on a real 4-engine cluster: lines reach the client while the code runs, in
IPython 0.10's [i] form (MultiEngineClient, %px) and ipyparallel's
[stdout:i] form (ipmpi.Client's views); merged lines; a flood bounded at
every stage; a client that stops reading; an interrupt while streaming;
%px in a real IPython on a terminal and in a real Jupyter kernel.

What "while the code runs" means here: the code prints, sleeps 2 s and
prints again; the first line must have been seen at least 1 s before the
call returned (the whole result came with the reply before streaming).
"""
import os
import re
import sys
import time

import pytest

from conftest import (PYTHON, controller_pid, first_seen, ipython_on_a_pty, proc_status_kb, px_streams_in_jupyter,
                      run_ctrl_c)

from ipmpi import _consts, _serialize, client

T = 120


class Recorder:
    """A stream that records when each write came."""

    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append((time.monotonic(), s))
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False

    def text(self):
        return "".join(s for _t, s in self.writes)

    def first(self, needle):
        """When the write containing needle came (None: never)."""
        for t, s in self.writes:
            if needle in s:
                return t
        return None


def recorded(fn):
    """(fn()'s value, stdout recorder, stderr recorder, time fn returned)."""
    out, err = Recorder(), Recorder()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        value = fn()
    finally:
        sys.stdout, sys.stderr = saved
    return value, out, err, time.monotonic()


def test_lines_reach_the_client_while_the_code_runs(mec):
    code = "import time\nprint('start')\ntime.sleep(2)\nprint('end')"
    r, out, err, t_end = recorded(lambda: mec.execute(code, stream=True, timeout=T))
    for i in range(4):
        t = out.first("[%d] start\n" % i)
        assert t is not None, out.text()
        assert t < t_end - 1.0, "engine %d's first line came only %.2f s before the end" % (i, t_end - t)
        assert "[%d] end\n" % i in out.text()
    # The result still holds the whole output; its printed form leaves out
    # what was shown while it ran.
    assert [d["stdout"] for d in r] == ["start\nend\n"] * 4
    assert "Out[" not in repr(r) and "[0] In [" in repr(r)
    assert err.text() == ""
    # Without stream=True nothing is shown and the printed form is 0.10's.
    r2, out2, _e, _t = recorded(lambda: mec.execute("print('quiet')", targets=0, timeout=T))
    assert out2.text() == ""
    assert "[0] Out[" in repr(r2)


def test_held_lines_go_out_while_the_code_sleeps(mec):
    # 'b' comes within the 20 ms after 'a' went: it is held, then sent by the
    # engine's timer while time.sleep runs, not when the request ends.
    code = "import time\nprint('a')\nprint('b')\ntime.sleep(2)"
    _r, out, _e, t_end = recorded(lambda: mec.execute(code, targets=[1], stream=True, timeout=T))
    t = out.first("[1] b\n")
    assert t is not None, out.text()
    assert t < t_end - 1.0, "the held line came only %.2f s before the end" % (t_end - t)


def test_stderr_lines_go_to_stderr_and_partial_lines_are_shown_at_the_end(mec):
    code = "import sys\nprint('to err', file=sys.stderr)\nprint('no newline', end='')"
    r, out, err, _t = recorded(lambda: mec.execute(code, targets=[0, 2], stream=True, timeout=T))
    assert sorted(err.text().splitlines()) == ["[0] to err", "[2] to err"]
    assert sorted(out.text().splitlines()) == ["[0] no newline", "[2] no newline"]
    assert r[0]["stderr"] == "to err\n" and r[0]["stdout"] == "no newline"


def test_merge_shows_a_line_printed_alike_once(mec):
    code = "import os\nprint('Hello')\nprint('pid', os.getpid())"
    _r, out, _e, _t = recorded(lambda: mec.execute(code, stream=True, merge=True, timeout=T))
    lines = out.text().splitlines()
    assert lines.count("[0-3] Hello") == 1, lines
    assert not any(re.match(r"\[\d\] Hello", ln) for ln in lines), lines
    assert sorted(ln.split()[0] for ln in lines if " pid " in ln) == ["[0]", "[1]", "[2]", "[3]"]


def test_a_flood_of_output_is_bounded_and_the_engine_lives(cluster4, mec):
    # 1 GiB printed by one engine: at most 16 MiB is streamed (then a note),
    # at most 32 MiB kept for the result (then a note), and the engine's and
    # the controller's peak memory stay far below the flood.
    ctl = controller_pid(cluster4)
    ctl_before = proc_status_kb(ctl, "VmHWM")
    code = "line = 'x' * ((1 << 20) - 1)\nfor i in range(1024):\n    print(line)"
    r, out, _e, _t = recorded(lambda: mec.execute(code, targets=3, stream=True, timeout=T))
    text = out.text()
    assert len(text) < 17 << 20, len(text)
    assert "streaming of stdout stopped after 16 MiB" in text
    stdout = r[0]["stdout"]
    assert len(stdout) < 33 << 20
    assert stdout.rstrip().endswith("a request keeps at most 32 MiB of it]")
    hwm = mec.execute("import re\nprint(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())"
                      ".group(1))", targets=3, timeout=T)[0]["stdout"]
    assert int(hwm) < 400 * 1024, "engine 3 peaked at %s kB" % hwm
    # The controller passed on at most 16 MiB of stream and a 32 MiB result.
    grew = proc_status_kb(ctl, "VmHWM") - ctl_before
    assert grew < 96 * 1024, "the controller's peak grew by %d kB" % grew
    assert mec.execute("print(1 + 1)", targets=3, timeout=T)[0]["stdout"] == "2\n"


def test_a_client_that_does_not_read_its_stream_costs_nobody_else(cluster4, mec):
    ctl = controller_pid(cluster4)
    ctl_before = proc_status_kb(ctl, "VmHWM")
    other = cluster4.client(timeout=T)
    try:
        conn = other._conn
        code = b"for i in range(200000):\n    print('line %06d' % i, 'y' * 200)"
        rid = conn.send(_consts.K_EXECUTE, 0, [code], None, True)
        # The stream's owner reads nothing for a while; others are served.
        t0 = time.monotonic()
        for _ in range(50):
            assert mec.execute("x = 1", targets=1, timeout=10)[0]["number"] >= 1
        assert time.monotonic() - t0 < 20
        time.sleep(2)
        # What it gets of the stream is bounded (the engine streams at most
        # 16 MiB, the controller and this client drop beyond 16 MiB unread).
        got = dropped = 0
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            done, outs, d = conn.output(rid, 1.0)
            got += sum(len(p[1]) for _t, _s, p in outs)
            dropped += d
            if done:
                break
        assert done and 0 < got <= (16 << 20) + 4096, (got, dropped)
        replies = conn.recv(rid, T)
        assert [(t, s) for t, s, _p in replies] == [(0, 0)]
        meta = _serialize.loads(replies[0][2][:1])
        assert meta["stdout"].startswith("line 000000 ")
        assert mec.execute("print('alive')", targets=0, timeout=T)[0]["stdout"] == "alive\n"
        # What the client did not read was dropped, not kept: the
        # controller's peak grew by about the 16 MiB it holds unread at most
        # (measured: 13 MB; the whole stream is 42 MB).
        grew = proc_status_kb(ctl, "VmHWM") - ctl_before
        assert grew < 40 * 1024, "the controller's peak grew by %d kB" % grew
    finally:
        other.close()


def test_interrupt_while_streaming(mec):
    code = "import time\nfor i in range(600):\n    print('tick', i)\n    time.sleep(0.1)"
    out = Recorder()
    saved = sys.stdout
    sys.stdout = out
    try:
        pr = mec.execute(code, targets=[0, 1], stream=True, block=False)
        time.sleep(1.0)
        info = mec.interrupt(targets=[0, 1], timeout=T)
        assert sorted(info["interrupted"]) == [0, 1], info
        with pytest.raises(client.CompositeError) as ei:
            pr.get_result(timeout=T)
    finally:
        sys.stdout = saved
    assert "KeyboardInterrupt" in str(ei.value) or all(
        getattr(e, "etype", "") == "KeyboardInterrupt" for e in ei.value.errors), ei.value
    assert "[0] tick 0\n" in out.text() and "[1] tick 0\n" in out.text()
    assert "[0] tick 599" not in out.text()
    assert [d["stdout"] for d in mec.execute("print('after')", targets=[0, 1], timeout=T)] == ["after\n"] * 2


def test_modern_views_stream_with_ipyparallel_prefixes(cluster4):
    import ipmpi
    rc = ipmpi.Client(os.path.join(cluster4.ipmpi_dir, "security", "ipcontroller-mec.furl"),
                      stream_output=True, progress=False)
    try:
        dv = rc[:]

        def work():
            import time
            print("working")
            time.sleep(2)
            return 7

        ar, out, _e, _t = recorded(lambda: dv.apply_async(work))
        value, out, _e, t_end = recorded(lambda: ar.get(timeout=T))
        assert value == [7] * 4
        for i in range(4):
            t = out.first("[stdout:%d] working\n" % i)
            assert t is not None, out.text()
            assert t < t_end - 1.0
        assert ar.stdout == ["working\n"] * 4
        _v, out, _e, _t = recorded(lambda: dv.execute("print('hi')", block=True))
        assert sorted(out.text().splitlines()) == ["[stdout:%d] hi" % i for i in range(4)]
        # merge_output: a line all engines print alike is shown once.
        rc.merge_output = True
        code = "import os; print('same'); print('rank', os.environ['OMPI_COMM_WORLD_RANK'])"
        _v, out, _e, _t = recorded(lambda: dv.execute(code, block=True))
        lines = out.text().splitlines()
        assert lines.count("[stdout:0-3] same") == 1 and not any(l.startswith("[stdout:0] same") for l in lines), lines
        assert sorted(l for l in lines if "rank" in l) == ["[stdout:%d] rank %d" % (i, i + 1) for i in range(4)], lines
        rc.merge_output = False
        quiet = ipmpi.Client(os.path.join(cluster4.ipmpi_dir, "security", "ipcontroller-mec.furl"),
                             stream_output=False, progress=False)
        try:
            _v, out, _e, _t = recorded(lambda: quiet[:].execute("print('hi')", block=True))
            assert out.text() == ""
        finally:
            quiet.close()
    finally:
        rc.close()


PX_SESSION = """\
from ipmpi import client
mec = client.MultiEngineClient(timeout=60)
mec.activate()
%px import time; print('tick'); time.sleep(3); print('tock')
exit
"""


def test_px_streams_in_ipython_on_a_terminal(cluster4):
    # IPython's stdout is a terminal (a pty), so %px streams by default.
    _rc, seen = ipython_on_a_pty(cluster4, PX_SESSION, T)
    text = "".join(s for _t, s in seen)

    def when(needle):
        return first_seen(seen, re.escape(needle))

    for i in range(4):
        assert "[%d] tick" % i in text, text
        assert "[%d] tock" % i in text, text
    t_tick, t_tock = when("[3] tick"), when("[3] tock")
    assert t_tock - t_tick > 1.5, "tick came only %.2f s before tock:\n%s" % (t_tock - t_tick, text)
    # What was streamed is not printed again with the result.
    assert "<Results List>" in text and "[0] Out[" not in text, text


def test_px_streams_in_a_jupyter_kernel(cluster4):
    setup = "from ipmpi import client\nmec = client.MultiEngineClient(timeout=60)\nmec.activate()"
    px_streams_in_jupyter(cluster4, setup, range(4), T)


CTRL_C_TWICE = """
import signal, sys, time
from ipmpi import client
signal.signal(signal.SIGINT, signal.default_int_handler)
mec = client.MultiEngineClient(furl_file=sys.argv[1], timeout=60)
print("READY", flush=True)
t0 = time.monotonic()
try:
    mec.execute("import time\\nfor i in range(600):\\n    print('tick', i)\\n    time.sleep(0.1)", stream=True)
    print("RETURNED")
except KeyboardInterrupt:
    print("CTRL-C %.2f" % (time.monotonic() - t0), flush=True)
try:
    time.sleep(2)
except KeyboardInterrupt:
    print("SECOND", flush=True)
r = mec.execute("print('after')", timeout=20)
print("AFTER", [x["stdout"] for x in r], "%.2f" % (time.monotonic() - t0), flush=True)
"""


def test_ctrl_c_twice_while_streaming(cluster4):
    # Two SIGINTs 50 ms apart, as a user who presses Ctrl-C twice: the
    # client returns, the engines were interrupted (the next request is
    # answered at once) and nothing hangs.
    out = run_ctrl_c([PYTHON, "-c", CTRL_C_TWICE, cluster4.mec_furl], [1.0, 0.05], T)
    assert "CTRL-C" in out and "[0] tick 0" in out, out
    assert float(out.split("CTRL-C ")[1].split()[0]) < 3.0, out
    assert "AFTER ['after\\n', 'after\\n', 'after\\n', 'after\\n']" in out, out
    assert float(out.split("AFTER ")[1].split()[-1]) < 10.0, out
