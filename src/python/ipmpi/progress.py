"""Progress of blocking waits, shared by every client interface.

A blocking wait (MultiEngineClient's blocking calls and
PendingResult.get_result, TaskClient's barrier, get_task_result(block=True)
and map, ipmpi.Client's views and AsyncResult, %px when it does not
stream) that lasts longer than DELAY seconds shows how many engines (or
tasks) are done, when standard error is a terminal or the client runs in
Jupyter: a tqdm bar when tqdm is installed (tqdm.auto in Jupyter), else
one line on stderr rewritten in place:

    execute:    0/4 engines done after    2 s

A client's progress setting chooses: None (automatic, as above), False
(never), True (tqdm if installed, else the line), 'plain' (the line).
IPMPI_PROGRESS=0 turns the automatic setting off, IPMPI_PROGRESS=plain
picks the line.

What is counted depends on what the wire tells the client: a request sent
to several engines at once is done for all of them at once (its replies
are delivered together), so its count moves from 0 to all; requests sent
one per engine (ipmpi.Client's apply, map, execute) and tasks count one by
one.
"""
import os
import sys
import time

from .output import in_jupyter

DELAY = 1.0      # s a blocking wait runs before progress is shown
POLL = 0.1       # s between two looks at the replies while progress may be shown

_OFF = ("0", "no", "off", "false")


def _now():
    return time.monotonic()


def check_setting(value):
    """value if it is a valid progress setting, else ValueError."""
    if value is None or value is True or value is False or value in ("plain", "auto"):
        return value
    raise ValueError("progress must be None (automatic), True, False or 'plain', not %r" % (value,))


def mode(setting):
    """None (no progress), 'tqdm' or 'plain' for a client's progress
    setting (None or 'auto': automatic) and IPMPI_PROGRESS."""
    env = os.environ.get("IPMPI_PROGRESS", "").strip().lower()
    if setting is False or (setting in (None, "auto") and env in _OFF):
        return None
    if setting in (None, "auto") and env == "plain":
        setting = "plain"
    if setting in (None, "auto"):
        try:
            interactive = sys.stderr is not None and sys.stderr.isatty()
        except Exception:
            interactive = False
        if not interactive and not in_jupyter():
            return None
    if setting == "plain":
        return "plain"
    return _tqdm_or_plain()


def forced_mode(setting):
    """The display of wait_interactive, which always shows one."""
    if setting == "plain" or os.environ.get("IPMPI_PROGRESS", "").strip().lower() == "plain":
        return "plain"
    return _tqdm_or_plain()


def _tqdm_or_plain():
    import importlib.util
    try:
        found = importlib.util.find_spec("tqdm") is not None
    except (ImportError, ValueError):
        found = False
    return "tqdm" if found else "plain"


class Bar:
    """tqdm (tqdm.auto in Jupyter) if installed, else one line on stderr
    rewritten in place: 'desc:    3/4 engines done after    2 s'. The
    line (or the bar) is redrawn when the count changes and every second."""

    def __init__(self, mode, total, unit, desc, start=None):
        self.total, self.unit, self.desc, self.n = total, unit, desc, 0
        self._t0 = _now() if start is None else start   # when the wait began
        self._drawn = -1
        self._tq = None
        if mode == "tqdm":
            try:
                if in_jupyter():
                    from tqdm.auto import tqdm
                else:
                    from tqdm import tqdm
                self._tq = tqdm(total=total, unit=unit, desc=desc, leave=True)
                try:   # its clock starts with the wait, not with the bar
                    self._tq.start_t -= _now() - self._t0
                except Exception:
                    pass
            except Exception:
                self._tq = None
        self._draw()

    def update(self, n):
        secs = int(_now() - self._t0)
        if n == self.n and secs == self._drawn:
            return
        if self._tq is not None and n != self.n:
            try:
                self._tq.update(n - self.n)
            except Exception:
                pass
        self.n = n
        self._draw()

    def _draw(self, end=""):
        secs = int(_now() - self._t0)
        self._drawn = secs
        if self._tq is not None:
            try:
                self._tq.refresh()
            except Exception:
                pass
            return
        line = "\r%s: %4d/%d %s done after %4d s" % (self.desc, self.n, self.total, self.unit, secs)
        try:
            sys.stderr.write(line + end)
            sys.stderr.flush()
        except Exception:
            pass

    def close(self):
        if self._tq is not None:
            try:
                self._tq.close()
            except Exception:
                pass
        else:
            self._draw("\n")


class Progress:
    """The progress of one blocking wait: nothing until it has lasted
    delay s (at once with delay 0), then a Bar updated by update(n).
    total may be a function, called once when the bar is first shown.

        p = Progress(mode(client.progress), 4, "engines", "execute")
        ... p.update(done) every p.step s ...
        p.close()
    """

    def __init__(self, mode, total, unit, desc, delay=DELAY):
        self.mode, self.total, self.unit, self.desc, self.delay = mode, total, unit, desc, delay
        self._start = _now()
        self.bar = None
        if mode and delay <= 0:
            self._show()

    def _show(self):
        if callable(self.total):
            self.total = self.total()
        self.bar = Bar(self.mode, self.total, self.unit, self.desc, self._start)

    @property
    def step(self):
        """Seconds between two updates (None: no progress, wait in one go)."""
        return POLL if self.mode else None

    def update(self, n):
        if not self.mode:
            return
        if self.bar is None and _now() - self._start >= self.delay:
            self._show()
        if self.bar is not None:
            self.bar.update(n)

    def close(self, n=None):
        """Ends the display (with the count n, when given)."""
        if self.bar is not None:
            if n is not None:
                self.bar.update(n)
            self.bar.close()
            self.bar = None
        self.mode = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def recv(conn, req_id, timeout, progress, done=None):
    """conn.recv(req_id, timeout) (timeout None: forever) that updates
    progress every progress.step s meanwhile, with done() (default 0) as
    the count. TimeoutError as conn.recv's when timeout passes."""
    step = progress.step
    if step is None:
        return conn.recv(req_id, timeout)
    deadline = None if timeout is None else _now() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - _now())
        wait = step if left is None else min(step, left)
        try:
            return conn.recv(req_id, wait)
        except TimeoutError:
            if left is not None and left <= wait:
                raise
        progress.update(done() if done is not None else 0)
