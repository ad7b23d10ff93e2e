"""Streamed output: what the engines print while a request runs, shown on
the client as it comes (doc/protocol.md section 2, IPMPI_F_STREAM and
IPMPI_F_MORE).

A request sent with ``stream=True`` gets non-final replies carrying whole
lines of the code's stdout and stderr; ``follow(conn, req_id, printer,
deadline)`` waits for the request and hands each piece to an
``OutputPrinter``, which writes every line with its engine's prefix:

    [0] step 1 done                  IPython 0.10's form (MultiEngineClient, %px)
    [stdout:0] step 1 done           ipyparallel's form (ipmpi.Client's views)

With ``merge=True`` a line that several engines print alike is shown once
with their ids, ``[0-63] Hello``: a line waits until every engine of the
request printed it, or MERGE_WAIT seconds after the first one did, and
lines keep each engine's order.

Streaming is best effort and bounded: the engine sends at most 16 MiB per
stream and request, the controller drops output for a client that does not
read it (16 MiB unread) and the client keeps at most 16 MiB per request; a
note says when something was dropped. The request's result still carries
the whole output (up to 32 MiB per stream), as without streaming.
"""
import collections
import sys
import time

# Seconds a merged line waits for the engines that have not printed it yet.
MERGE_WAIT = 0.25
# Seconds between two looks at the clock while waiting for output.
_SLICE = 0.1


def in_jupyter():
    """True inside a Jupyter kernel (IPython's ZMQInteractiveShell)."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def interactive():
    """True when output is read by a person as it comes: stdout is a
    terminal, or this runs in a Jupyter kernel."""
    if in_jupyter():
        return True
    try:
        return sys.stdout is not None and sys.stdout.isatty()
    except Exception:
        return False


def id_ranges(ids):
    """'0-3,5' for [0, 1, 2, 3, 5]."""
    ids = sorted(ids)
    out = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else "%d-%d" % (ids[i], ids[j]))
        i = j + 1
    return ",".join(out)


class OutputPrinter:
    """Writes streamed output line by line with an engine prefix.

    style '0.10': '[i] line'; 'ipyparallel': '[stdout:i] line'. stdout
    lines go to out (default: sys.stdout at the time of writing), stderr
    lines to err (sys.stderr). merge: identical lines of several engines
    once, with their ids; engines: the ids the request went to (a merged
    line is shown as soon as all of them printed it)."""

    def __init__(self, style="0.10", merge=False, engines=None, out=None, err=None):
        self.style = style
        self.merge = merge
        self.engines = set(engines) if engines is not None else None
        self._out = out
        self._err = err
        self._partial = {}
        # (name, line) -> [first seen, set of engine ids, count per engine]
        self._waiting = collections.OrderedDict()
        self._seen = collections.Counter()  # (engine, name, line) -> times printed so far
        self.lines = 0

    def _file(self, name):
        if name == "stderr":
            return self._err if self._err is not None else sys.stderr
        return self._out if self._out is not None else sys.stdout

    def _prefix(self, name, ids):
        if self.style == "ipyparallel":
            return "[%s:%s] " % (name, ids)
        return "[%s] " % (ids,)

    def _write(self, name, ids, line):
        f = self._file(name)
        f.write(self._prefix(name, ids) + line + "\n")
        self.lines += 1

    def feed(self, engine, name, text):
        """A piece of stream name ('stdout' or 'stderr') of engine."""
        key = (engine, name)
        text = self._partial.pop(key, "") + text
        lines = text.split("\n")
        if lines[-1]:
            self._partial[key] = lines[-1]
        for line in lines[:-1]:
            self._line(engine, name, line)
        self._flush_files()

    def _line(self, engine, name, line):
        if not self.merge:
            self._write(name, engine, line)
            return
        # The k-th time an engine prints this text joins the k-th group.
        n = self._seen[(engine, name, line)]
        self._seen[(engine, name, line)] = n + 1
        key = (name, line, n)
        w = self._waiting.get(key)
        if w is None:
            w = self._waiting[key] = [time.monotonic(), set()]
        w[1].add(engine)
        self.poll()

    def poll(self, final=False):
        """Shows the merged lines that are due (all, when final)."""
        if not self.merge:
            return
        now = time.monotonic()
        wrote = False
        while self._waiting:
            key, (t0, ids) = next(iter(self._waiting.items()))
            complete = self.engines is not None and ids >= self.engines
            if not (final or complete or now - t0 >= MERGE_WAIT):
                break
            self._waiting.popitem(last=False)
            name, line, _n = key
            self._write(name, id_ranges(ids), line)
            wrote = True
        if wrote:
            self._flush_files()

    def note(self, text):
        """A message of the client's own (to stderr)."""
        f = self._file("stderr")
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()

    def close(self):
        """Shows what is left: partial last lines, merged lines."""
        for (engine, name), text in list(self._partial.items()):
            self._line(engine, name, text)
        self._partial.clear()
        self.poll(final=True)
        self._seen.clear()
        self._flush_files()

    def _flush_files(self):
        for name in ("stdout", "stderr"):
            try:
                self._file(name).flush()
            except Exception:
                pass


def follow(conn, req_id, printer, deadline=None):
    """Shows the streamed output of req_id (sent with stream=True) through
    printer until every reply is in (True) or deadline (time.monotonic())
    passes (False). Replies stay for conn.recv."""
    while True:
        left = _SLICE if deadline is None else min(_SLICE, max(0.0, deadline - time.monotonic()))
        done, outs, dropped = conn.output(req_id, left)
        for target, status, parts in outs:
            if status == 0 and len(parts) == 2:
                printer.feed(target, bytes(parts[0]).decode("ascii", "replace"),
                             bytes(parts[1]).decode("utf-8", "replace"))
        if dropped:
            printer.note("[ipmpi: %d bytes of streamed output were dropped here: they came faster than they "
                         "were shown; the result holds the whole output]" % dropped)
        printer.poll()
        if done:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
