"""The modern (ipyparallel 7/8) client surface, over the same core.

    import ipmpi
    rc = ipmpi.Client()                     # $IPMPI_DIR/security/ipcontroller-mec.furl
    rc.ids                                  # [0, 1, 2, 3]
    dv = rc[:]                              # a DirectView of every engine
    dv.apply_sync(lambda: 1)                # [1, 1, 1, 1]
    lview = rc.load_balanced_view()         # tasks on the controller's scheduler
    lview.map_sync(lambda x: x * x, range(8))
    ar = dv.apply_async(time.sleep, 3); ar.wait_interactive(); ar.get()

This is thin Python over what MultiEngineClient and TaskClient use: the
DirectView sends the same EXECUTE/PUSH/PULL/APPLY requests on a
MultiEngineClient's connection (mec capability), the LoadBalancedView the
same TASK_SUBMIT requests on a TaskClient's connection (tc capability, the
controller's scheduler). Nothing here talks to the wire itself.

Blocking waits longer than about a second show progress (engines or tasks
done) when stderr is a terminal or in Jupyter: tqdm when it is installed,
else one updating line. Client(progress=False) or IPMPI_PROGRESS=0 turns
it off (progress='plain' forces the plain line).

What differs from ipyparallel is listed in doc/modern.rst.
"""
import contextlib
import datetime
import functools
import os
import sys
import time
import weakref

from . import _ipmpi as _c
from . import _serialize
from . import output as _output
from . import progress as _progress
from .connect import _concatenate, _is_int, _map_chunk, _parse_targets, _partition, _sized, default_furl_file
from .errors import CompositeError, EngineError, RemoteError
from .results import _composite, _fetch_error, _split

__all__ = ["Client", "DirectView", "LoadBalancedView", "AsyncResult", "AsyncMapResult",
           "RemoteFunction", "ParallelFunction", "CompositeError", "RemoteError", "require", "interactive"]

PROGRESS_DELAY = _progress.DELAY   # s a blocking wait runs before progress is shown
_POLL = _progress.POLL             # s between progress updates


def _now():
    return time.monotonic()


def _timeout(t):
    """ipyparallel's timeouts: None or a negative number mean forever."""
    if t is None or t < 0:
        return None
    return float(t)


# ---------------------------------------------------------------- requests

class _Direct:
    """One MultiEngine request of an AsyncResult: replies for `engines`
    (in that order), each made a value by value(meta, parts)."""

    def __init__(self, client, rid, engines, value, streamed=False):
        self.client, self.rid, self.engines, self.value = client, rid, list(engines), value
        self.streamed = streamed   # sent with stream=True: the AsyncResult sets printer
        self.printer = None
        self.msg_id = client._mec._rid(rid)   # the request's id (results kept by the controller)
        self.fetched = False       # rid is a RESULT_FETCH of msg_id on a new link
        self.slots = len(self.engines)
        self.submitted = datetime.datetime.now()
        self.received = None
        self.outcomes = None       # [(engine id, ok, value or error, meta)]

    def ready(self):
        if self.outcomes is not None:
            return True
        conn = self.client._mec._conn
        return conn is not None and conn.ready(self.rid)

    def collect(self, timeout):
        conn = self.client._mec._conn
        if conn is None:
            raise ConnectionError("this client is closed")
        if self.printer is not None:
            deadline = None if timeout is None else _now() + timeout
            if not _output.follow(conn, self.rid, self.printer, deadline):
                raise TimeoutError("request %d is not complete" % self.rid)
        replies = conn.recv(self.rid, timeout)
        self.received = datetime.datetime.now()
        err = _fetch_error(replies) if self.fetched else None
        if err is not None:
            raise err
        ok, errors = _split(replies)
        by_id = {}
        for eid, meta, parts in ok:
            try:
                by_id[eid] = (eid, True, self.value(meta, parts), meta)
            except Exception as e:   # a value that does not unpickle here
                by_id[eid] = (eid, False, e, meta)
        for e in errors:
            meta = getattr(e, "meta", None) or {}
            by_id[e.engine_id] = (e.engine_id, False, e, meta)
        out = [by_id.pop(eid) for eid in self.engines if eid in by_id]
        out.extend(by_id.values())
        self.outcomes = out

    def show_output(self):
        """Shows the streamed output that is here now (no wait)."""
        conn = self.client._mec._conn
        if conn is not None:
            _output.follow(conn, self.rid, self.printer, _now())

    def relink(self):
        """The MultiEngine link was replaced (Client.reconnect): the replies
        come again, fetched by the request's id."""
        if self.outcomes is None and self.msg_id is not None:
            self.rid = self.client._mec._fetch(self.msg_id)
            self.fetched = True

    def forget(self):
        conn = self.client._mec._conn
        if self.outcomes is None and conn is not None:
            try:
                conn.forget(self.rid)
            except Exception:
                pass


class _Task:
    """One task of the controller's scheduler (a TaskClient task id)."""

    slots = 1
    engines = (None,)

    def __init__(self, client, tid):
        self.client, self.tid = client, tid
        self.msg_id = tid
        self.submitted = datetime.datetime.now()
        self.received = None
        self.outcomes = None

    def ready(self):
        if self.outcomes is not None:
            return True
        tc = self.client._taskclient()
        e = tc._sent.get(self.tid)
        return e is None or (tc._conn is not None and tc._conn.ready(e[0]))

    def collect(self, timeout):
        ok, value = self.client._taskclient()._result(self.tid, True, timeout, False)
        self.received = datetime.datetime.now()
        eid = None if ok else getattr(value, "engine_id", None)
        self.outcomes = [(eid, ok, value, {})]

    def forget(self):
        tc = self.client._tc
        e = tc._sent.pop(self.tid, None) if self.outcomes is None else None
        if e is not None and tc._conn is not None:
            try:
                tc._conn.forget(e[0])
            except Exception:
                pass


# ---------------------------------------------------------------- results

class AsyncResult:
    """The result of a call with block=False (ipyparallel's AsyncResult).

    ready(), wait(timeout=-1) -> bool, get(timeout=-1), successful(),
    wait_interactive(), progress (engines or tasks done), elapsed (s),
    stdout / stderr (per engine), engine_id, submitted / received (per
    engine datetimes), wall_time, serial_time, get_dict(), abort(),
    display_outputs(). A timeout of None or -1 means forever; get() that
    runs out raises TimeoutError and loses nothing.
    """

    def __init__(self, client, children, fname="unknown", single=False, kind="apply"):
        self._client = client
        self._children = list(children)
        self._fname = fname
        self._single = single
        self._kind = kind
        self._t0 = _now()
        self._t1 = None
        self._result = None
        self._error = None
        self._done = False
        self._shown = set()
        self.owner = True
        # Whether waits show each engine's output when its reply arrives
        # (Client(stream_output=...); `with ar.stream_output():` turns it on
        # for a block). Direct requests sent with stream=True show their
        # output as it comes, ipyparallel's way ([stdout:0] ...), whatever
        # this says.
        self.streaming = client._streaming()
        self._return_exceptions = False     # get()'s default
        self._with_errors = None            # the result with the exceptions in place
        self._printer = None
        if any(getattr(c, "streamed", False) for c in self._children):
            merge = bool(getattr(client, "merge_output", False))
            engines = sorted({e for c in self._children for e in getattr(c, "engines", ())}) if merge else None
            self._printer = _output.OutputPrinter("ipyparallel", merge=merge, engines=engines)
            for c in self._children:
                c.printer = self._printer
        client._outstanding.add(self)

    # -- state
    def __len__(self):
        return sum(c.slots for c in self._children)

    @property
    def msg_ids(self):
        """The ids of this result's requests: 'INSTANCE:SESSION:REQ' strs
        of MultiEngine requests (their results stay in the controller, see
        Client.reconnect and MultiEngineClient.get_result_by_id), task ids
        (ints) of tasks."""
        return [c.msg_id for c in self._children]

    def ready(self):
        """True when every engine (or task) answered; never blocks."""
        if self._done:
            return True
        if all(c.ready() for c in self._children):
            self._wait(None, show=False)
            return True
        return False

    done = ready

    @property
    def progress(self):
        """How many engines (or tasks) have answered."""
        return sum(c.slots for c in self._children if c.ready())

    @property
    def elapsed(self):
        """Seconds since submission (until completion once complete)."""
        return (self._t1 if self._t1 is not None else _now()) - self._t0

    @property
    def sent(self):
        return True

    def _wait(self, timeout, show=None, interval=_POLL):
        """Collects replies until all are in or timeout (s, None forever)
        passes; shows progress after PROGRESS_DELAY when show (None: the
        client's setting). True when complete."""
        if self._done:
            return True
        if show is None:
            mode = self._client._progress_mode()
        elif show:
            mode = _progress.forced_mode(self._client.progress)
        else:
            mode = None
        deadline = None if timeout is None else _now() + timeout
        start = _now()
        bar = None
        try:
            for c in self._children:
                while c.outcomes is None:
                    now = _now()
                    left = None if deadline is None else deadline - now
                    if left is not None and left <= 0 and not c.ready():
                        return False
                    if mode and bar is None and (show is True or now - start >= PROGRESS_DELAY):
                        bar = _progress.Bar(mode, len(self), "engines" if self._kind != "task" else "tasks",
                                   self._fname)
                    step = left
                    if mode or self._printer is not None:
                        step = interval if left is None else min(interval, left)
                    if self._printer is not None:
                        # Output of every engine, not only of the one waited for.
                        for other in self._children:
                            if (other is not c and other.outcomes is None
                                    and getattr(other, "printer", None) is not None):
                                other.show_output()
                    try:
                        c.collect(max(0.0, step) if step is not None else None)
                    except TimeoutError:
                        pass
                    if c.outcomes is not None and self.streaming and getattr(c, "printer", None) is None:
                        self._show_outputs(c)
                    if bar is not None:
                        bar.update(self.progress)
            if self._printer is not None:
                self._printer.close()
            self._finish()
            return True
        except KeyboardInterrupt:
            self._client._interrupted(self)
            raise
        finally:
            if bar is not None:
                bar.update(self.progress)
                bar.close()

    def _outcomes(self):
        out = []
        for c in self._children:
            out.extend(c.outcomes or ())
        return out

    def _finish(self):
        if self._done:
            return
        self._t1 = _now()
        self._done = True
        self._client._outstanding.discard(self)
        outs = self._outcomes()
        values = [v for _eid, ok, v, _m in outs if ok]
        errors = [v for _eid, ok, v, _m in outs if not ok]
        if errors:
            if len(outs) == 1:
                self._error = errors[0]
            else:
                self._error = _composite(errors, values, self._fname)
            try:
                self._with_errors = self._reduce_errors([v for _eid, _ok, v, _m in outs])
            except Exception:
                self._with_errors = [v for _eid, _ok, v, _m in outs]
            return
        try:
            self._result = self._reduce(values)
        except Exception as e:
            self._error = e

    def _reduce(self, values):
        if self._single:
            return values[0] if values else None
        return values

    def _reduce_errors(self, values):
        """The result for get(return_exceptions=True): values are the
        outcomes in order, exceptions where an engine (or task) failed."""
        return self._reduce(values)

    def wait(self, timeout=-1):
        """Waits until complete or timeout s pass (-1/None: forever);
        returns ready()."""
        return self._wait(_timeout(timeout))

    def get(self, timeout=-1, return_exceptions=None):
        """The result (a list per engine; one value for one engine or one
        task), or raises the error (CompositeError for several engines);
        TimeoutError if not complete within timeout s. return_exceptions
        True: the exceptions are returned in place of the failed engines'
        (or tasks') values instead of raised (None: as the call that made
        this result said, map(..., return_exceptions=...), else False)."""
        if not self._wait(_timeout(timeout)):
            raise TimeoutError("Result not ready: %d/%d done after %.1f s"
                               % (self.progress, len(self), self.elapsed))
        if return_exceptions is None:
            return_exceptions = self._return_exceptions
        if self._error is not None:
            if return_exceptions and self._with_errors is not None:
                return self._with_errors
            raise self._error
        return self._result

    def result(self, timeout=None):
        """concurrent.futures style: get(timeout)."""
        return self.get(-1 if timeout is None else timeout)

    def exception(self, timeout=None):
        self.wait(-1 if timeout is None else timeout)
        return self._error

    def successful(self):
        """True if complete without error (AssertionError while not ready,
        as in ipyparallel)."""
        assert self.ready(), "Can only check successful() after the result is ready"
        return self._error is None

    def wait_interactive(self, interval=0.1, timeout=-1, widget=None):
        """Waits, showing '<n>/<total> done' progress (tqdm if installed)
        whatever the terminal; TimeoutError after timeout s (-1: never)."""
        if not self._wait(_timeout(timeout), show=True, interval=interval):
            raise TimeoutError("wait_interactive: %d/%d done after %.1f s"
                               % (self.progress, len(self), self.elapsed))

    @contextlib.contextmanager
    def stream_output(self):
        """with ar.stream_output(): ... -- while the block runs, each
        engine's (or task's) output is shown, '[stdout:0] ...', as soon as
        this client has it: what arrived already at once, the rest while
        the block waits (ar.get(), ar.wait(), ar.wait_interactive()).
        Requests sent streaming (Client(stream_output=...), a terminal or
        Jupyter by default) show their lines as the engines print them;
        others when each engine's reply arrives. See ar.streaming for the
        setting outside such a block."""
        saved = self.streaming
        self.streaming = True
        try:
            self._show_arrived()
            yield self
        finally:
            try:
                self._show_arrived()
            finally:
                self.streaming = saved

    def _show_arrived(self):
        """Shows the output of replies collected or here now (no wait)."""
        for c in self._children:
            if getattr(c, "printer", None) is not None:
                if c.outcomes is None:
                    c.show_output()
                continue
            if c.outcomes is None and c.ready():
                try:
                    c.collect(0.0)
                except Exception:   # a lost link: get() says so
                    continue
            if c.outcomes is not None:
                self._show_outputs(c)
        if all(c.outcomes is not None for c in self._children):
            if self._printer is not None:
                self._printer.close()
            self._finish()

    def abort(self):
        """Aborts what has not run yet: tasks not yet on an engine never
        run; for direct requests the engines' queues are cleared (every
        queued request of those engines, as mec.clear_queue)."""
        self._client.abort(self)

    # -- metadata
    def _per(self, f):
        out = [f(eid, ok, v, m) for eid, ok, v, m in self._outcomes()]
        return out[0] if self._single and len(out) == 1 else out

    @property
    def engine_id(self):
        return self._per(lambda eid, ok, v, m: eid)

    @property
    def stdout(self):
        return self._per(lambda eid, ok, v, m: (m or {}).get("stdout") or "")

    @property
    def stderr(self):
        return self._per(lambda eid, ok, v, m: (m or {}).get("stderr") or "")

    @property
    def submitted(self):
        return self._times(lambda c: c.submitted)

    @property
    def received(self):
        return self._times(lambda c: c.received)

    completed = received

    def _times(self, f):
        out = []
        for c in self._children:
            out.extend([f(c)] * c.slots)
        return out[0] if self._single and len(out) == 1 else out

    @property
    def timings(self):
        """Per engine (or task): {'engine_id', 'submitted', 'received',
        'seconds'} (client-side times: the reply's arrival)."""
        out = []
        for c in self._children:
            for eid, _ok, _v, _m in (c.outcomes or [(None, None, None, None)] * c.slots):
                secs = None if c.received is None else (c.received - c.submitted).total_seconds()
                out.append({"engine_id": eid, "submitted": c.submitted, "received": c.received,
                            "seconds": secs})
        return out

    @property
    def wall_time(self):
        subs = [c.submitted for c in self._children]
        recs = [c.received for c in self._children if c.received is not None]
        if not recs:
            return None
        return (max(recs) - min(subs)).total_seconds()

    @property
    def serial_time(self):
        return sum(t["seconds"] or 0.0 for t in self.timings)

    def get_dict(self, timeout=-1):
        """{engine id: result} (each engine must have run one request)."""
        results = self.get(timeout)
        ids = self._per(lambda eid, ok, v, m: eid)
        if self._single:
            return {ids: results}
        return dict(zip(ids, results))

    # -- output
    def _on_output(self, engine_id, name, text):
        """Where streamed output goes ('stdout' or 'stderr' text of one
        engine). Called once per engine when its reply arrives; the
        streamed wire (a non-final reply) will call it as lines arrive."""
        f = sys.stdout if name == "stdout" else sys.stderr
        prefix = "[%s:%s] " % (name, engine_id) if engine_id is not None else ""
        for line in text.splitlines(True):
            f.write(prefix + line)
        if not text.endswith("\n"):
            f.write("\n")
        f.flush()

    def _show_outputs(self, c):
        if id(c) in self._shown:
            return
        self._shown.add(id(c))
        for eid, _ok, _v, m in c.outcomes or ():
            for name in ("stdout", "stderr"):
                text = (m or {}).get(name)
                if text:
                    self._on_output(eid, name, text)

    def display_outputs(self, groupby="type"):
        """Prints each engine's stdout and stderr with [stdout:i] prefixes."""
        self.wait()
        for c in self._children:
            self._shown.discard(id(c))
            self._show_outputs(c)

    # -- sequence access
    def __getitem__(self, key):
        r = self.get()
        if self._single:
            raise TypeError("a single result is not indexable; use get()")
        return r[key]

    def __iter__(self):
        r = self.get()
        if self._single:
            yield r
        else:
            yield from r

    def __repr__(self):
        state = "finished" if self._done else "pending"
        return "<%s(%s): %s>" % (type(self).__name__, self._fname, state)

    def __del__(self):
        children = getattr(self, "_children", ())
        if getattr(self, "_done", True) or not getattr(self, "owner", False):
            return
        for c in children:
            try:
                c.forget()
            except Exception:
                pass


class AsyncMapResult(AsyncResult):
    """A map's AsyncResult: get() is the flat list of results, in order."""

    def __init__(self, client, children, fname="unknown", kind="apply"):
        super().__init__(client, children, fname, False, kind)

    def _reduce(self, values):
        return _concatenate([v if isinstance(v, (list, tuple)) else [v] for v in values]) if values else []

    def _reduce_errors(self, values):
        # A failed part is one exception in the list, in its place (as
        # ipyparallel's map with return_exceptions).
        out = []
        for v in values:
            if isinstance(v, BaseException):
                out.append(v)
            else:
                out.extend(v if isinstance(v, (list, tuple)) else [v])
        return out

    def __len__(self):
        return super().__len__()


# ---------------------------------------------------------------- views

class View:
    """What DirectView and LoadBalancedView share: block (default
    False), apply/apply_sync/apply_async, map/map_sync/map_async, remote,
    parallel, wait, abort."""

    _flag_names = ("block",)

    def __init__(self, client, targets):
        self.client = client
        self._targets = targets
        self.block = False

    @property
    def targets(self):
        return self._targets

    @targets.setter
    def targets(self, value):
        self._set_targets(value)

    def _set_targets(self, value):
        raise NotImplementedError("%s.targets cannot be changed" % type(self).__name__)

    def set_flags(self, **kwargs):
        """Sets the view's flags by name (block; targets on a DirectView,
        retries on a LoadBalancedView); returns the view. ipyparallel's
        flags that ipmpi lacks are accepted at their do-nothing value
        (track=False, after/follow empty, timeout None) and refused
        otherwise (NotImplementedError); unknown names raise KeyError."""
        for k in kwargs:
            if k not in self._flag_names:
                if k in _ABSENT_FLAGS:
                    if _ABSENT_FLAGS[k][0](kwargs[k]):
                        continue
                    raise NotImplementedError("%s flag %s=%r: %s (doc/modern.rst)"
                                              % (type(self).__name__, k, kwargs[k], _ABSENT_FLAGS[k][1]))
                raise KeyError("Invalid name: %r (the flags of %s are %s)"
                               % (k, type(self).__name__, ", ".join(self._flag_names)))
        for k, v in kwargs.items():
            if k in self._flag_names:
                setattr(self, k, v)
        return self

    @contextlib.contextmanager
    def temp_flags(self, **kwargs):
        """with view.temp_flags(block=True): ... -- the flags set for the
        block and restored after it (see set_flags)."""
        saved = {k: getattr(self, k) for k in self._flag_names}
        self.set_flags(**kwargs)
        try:
            yield self
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def _block(self, block):
        return self.block if block is None else bool(block)

    def _ret(self, ar, block):
        return ar.get() if self._block(block) else ar

    def apply(self, f, *args, **kwargs):
        """f(*args, **kwargs) on the view's engines; blocks as view.block."""
        return self._ret(self._apply(f, args, kwargs), None)

    def apply_sync(self, f, *args, **kwargs):
        return self._apply(f, args, kwargs).get()

    def apply_async(self, f, *args, **kwargs):
        return self._apply(f, args, kwargs)

    def map_sync(self, f, *sequences, **kwargs):
        if "block" in kwargs:
            raise TypeError("map_sync doesn't take a `block` keyword argument.")
        return self.map(f, *sequences, block=True, **kwargs)

    def map_async(self, f, *sequences, **kwargs):
        if "block" in kwargs:
            raise TypeError("map_async doesn't take a `block` keyword argument.")
        return self.map(f, *sequences, block=False, **kwargs)

    def imap(self, f, *sequences, **kwargs):
        return iter(self.map_async(f, *sequences, **kwargs))

    def remote(self, block=None, **flags):
        """Decorator: @view.remote() def f(...): calling f applies it on the view."""
        block = self.block if block is None else block
        return lambda f: RemoteFunction(self, f, block)

    def parallel(self, dist="b", block=None, **flags):
        """Decorator: @view.parallel() def f(x): f(seq) runs f on parts of
        seq (one per engine, or per chunksize items for a load-balanced
        view) and joins the results; f.map(seq) maps it element-wise."""
        if dist != "b":
            raise ValueError("dist must be 'b' (contiguous blocks), not %r" % (dist,))
        block = self.block if block is None else block
        return lambda f: ParallelFunction(self, f, block, flags.get("chunksize"))

    def wait(self, jobs=None, timeout=-1):
        return self.client.wait(jobs, timeout)

    def abort(self, jobs=None, targets=None, block=None):
        return self.client.abort(jobs, targets=targets if targets is not None else self._targets)

    def shutdown(self, targets=None, restart=False, hub=False, block=None):
        return self.client.shutdown(self._targets if targets is None else targets, restart, hub, block)


class DirectView(View):
    """The engines addressed directly: rc[:], rc[i], rc[::2], rc.direct_view().

    Calls return AsyncResults (block=False, the default) or results
    (block=True, or the *_sync forms): one value per engine in the order
    of the targets; for a view of one engine (rc[3]) the value itself.
    """

    _flag_names = ("block", "targets")

    def __init__(self, client, targets="all"):
        _parse_targets(targets)
        super().__init__(client, targets)
        self._magic = None

    def _set_targets(self, value):
        """dview.targets = [0, 2] (an id, a list of ids, or 'all' / None:
        every engine alive at each call)."""
        if value is None:
            value = "all"
        if isinstance(value, range):
            value = list(value)
        _parse_targets(value)
        self._targets = int(value) if _is_int(value) else value

    def __repr__(self):
        t = self._targets
        return "<DirectView %s>" % (t if isinstance(t, str) else repr(t))

    def __len__(self):
        return len(self._engines())

    @property
    def _single(self):
        return _is_int(self._targets)

    def _engines(self, targets=None):
        t = self._targets if targets is None else targets
        if isinstance(t, str) and t == "all":
            ids = self.client.ids
            if not ids:
                raise EngineError(_c.ENOENT, "no engines are alive")
            return ids
        if _is_int(t):
            return [int(t)]
        _parse_targets(t)
        return [int(x) for x in t]

    def _one_each(self, kind, parts_of, engines, value, fname, single, cls=AsyncResult, **kw):
        """One request per engine (so progress and timings are per engine)."""
        mec = self.client._mec
        stream = self.client._streaming(kind)
        children = []
        try:
            for i, eid in enumerate(engines):
                children.append(_Direct(self.client, mec._send(kind, eid, parts_of(i), None, stream), [eid], value,
                                        stream))
        except BaseException:
            for ch in children:
                ch.forget()
            raise
        if cls is AsyncResult:
            return cls(self.client, children, fname, single, **kw)
        return cls(self.client, children, fname, **kw)

    def _together(self, kind, parts, engines, value, fname, single):
        """One request for all engines (the payload is held once by the controller)."""
        target, tlist, _s = _parse_targets(engines)
        stream = self.client._streaming(kind)
        rid = self.client._mec._send(kind, target, parts, tlist, stream)
        return AsyncResult(self.client, [_Direct(self.client, rid, engines, value, stream)], fname, single)

    # -- calls
    def _apply(self, f, args, kwargs):
        if not callable(f):
            raise TypeError("apply takes a callable, not %r" % (type(f).__name__,))
        parts = _serialize.dumps((f, tuple(args), dict(kwargs)))
        return self._one_each(_c.K_APPLY, lambda i: parts, self._engines(), _loads_value,
                              _name(f), self._single)

    def map(self, f, *sequences, block=None, track=False, return_exceptions=False):
        """A parallel map(f, *sequences): the items in contiguous blocks, one
        per engine of the view; the results in order (AsyncMapResult when not
        blocking)."""
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        if not callable(f):
            raise TypeError("map takes a callable, not %r" % (type(f).__name__,))
        seqs = [_sized(s, "map") for s in sequences]
        n = min(len(s) for s in seqs)
        if len(seqs) == 1:
            items, star = seqs[0], False
        else:
            items, star = list(zip(*seqs)), True
        engines = self._engines()
        chunks = _partition(items[:n] if len(seqs) == 1 else items, len(engines), "map")
        pairs = [(e, ch) for e, ch in zip(engines, chunks) if len(ch)]
        payloads = [_serialize.dumps((_map_chunk, (f, ch, star), {})) for _e, ch in pairs]
        ar = self._one_each(_c.K_APPLY, lambda i: payloads[i], [e for e, _ch in pairs], _loads_value,
                            _name(f), False, cls=AsyncMapResult)
        ar._return_exceptions = bool(return_exceptions)
        return self._ret(ar, block)

    def execute(self, code, silent=True, targets=None, block=None):
        """Runs code (a str) on the engines; get() is None per engine, the
        output is in stdout/stderr."""
        if not isinstance(code, str):
            raise TypeError("execute takes the code as a str, not %r" % (type(code).__name__,))
        data = code.encode("utf-8")
        single = self._single if targets is None else _is_int(targets)
        ar = self._one_each(_c.K_EXECUTE, lambda i: [data], self._engines(targets), _no_value,
                            "execute", single)
        return self._ret(ar, block)

    def run(self, filename, targets=None, block=None):
        """Executes the local file filename on the engines."""
        with open(filename, encoding="utf-8") as f:
            source = f.read()
        compile(source, filename, "exec")
        return self.execute(source, targets=targets, block=block)

    def push(self, ns, targets=None, block=None, track=False):
        """Sets the names of the dict ns on the engines."""
        if not isinstance(ns, dict):
            raise TypeError("push takes a dict of name -> value, not %r" % (type(ns).__name__,))
        single = self._single if targets is None else _is_int(targets)
        ar = self._together(_c.K_PUSH, _serialize.dumps(ns), self._engines(targets), _no_value,
                            "push", single)
        return self._ret(ar, block)

    update = push

    def pull(self, names, targets=None, block=None):
        """Values of names: a str gives one value per engine, a list or
        tuple of names a list of values per engine."""
        one = isinstance(names, str)
        keys = [names] if one else list(names)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError("names are str, not %r" % (k,))

        def value(meta, parts):
            vals = _serialize.loads(parts[1:])
            return vals[0] if one else list(vals)

        single = self._single if targets is None else _is_int(targets)
        ar = self._together(_c.K_PULL, _serialize.dumps(keys), self._engines(targets), value, "pull", single)
        return self._ret(ar, block)

    def get(self, key_s):
        return self.pull(key_s, block=True)

    def __getitem__(self, key):
        if not isinstance(key, str):
            raise TypeError("view[...] takes a name (str)")
        return self.pull(key, block=True)

    def __setitem__(self, key, value):
        self.push({key: value}, block=True)

    def scatter(self, key, seq, dist="b", flatten=False, targets=None, block=None, track=False):
        """Partitions seq into contiguous blocks, one per engine, pushed as key."""
        if dist != "b":
            raise ValueError("dist must be 'b' (contiguous blocks), not %r" % (dist,))
        engines = self._engines(targets)
        parts = _partition(seq, len(engines), "scatter")

        def payload(i):
            p = parts[i]
            if flatten and len(p) == 1:
                p = p[0]
            return _serialize.dumps({key: p})

        ar = self._one_each(_c.K_PUSH, payload, engines, _no_value, "scatter", False)
        return self._ret(ar, block)

    def gather(self, key, dist="b", targets=None, block=None):
        """Pulls key from the engines and joins the blocks in order."""
        if dist != "b":
            raise ValueError("dist must be 'b' (contiguous blocks), not %r" % (dist,))
        engines = self._engines(targets)
        target, tlist, _s = _parse_targets(engines)
        rid = self.client._mec._send(_c.K_PULL, target, _serialize.dumps([key]), tlist)
        ar = _Gather(self.client, [_Direct(self.client, rid, engines, _first_value)], "gather")
        return self._ret(ar, block)

    def clear(self, targets=None, block=None):
        """Clears the engines' namespaces."""
        ar = self._together(_c.K_RESET, [], self._engines(targets), _no_value, "clear",
                            self._single if targets is None else _is_int(targets))
        return self._ret(ar, block)

    def queue_status(self, targets=None, verbose=False):
        return self.client.queue_status(self._targets if targets is None else targets, verbose)

    def use_cloudpickle(self):
        """Functions already travel with cloudpickle: nothing to do."""
        return None

    def sync_imports(self, local=True, quiet=False):
        return _SyncImports(self, local, quiet)

    # -- magics
    def activate(self, suffix=""):
        """Registers %px, %%px, %autopx and %pxresult for this view (in
        IPython), by the machinery of ipmpi.magic: the magics run on this
        view's targets and block (unless --noblock)."""
        if suffix:
            raise ValueError("activate(suffix=...) is not supported: one view at a time drives the magics")
        from . import magic
        self._magic = _MagicTarget(self)
        magic.activate(self._magic)
        ip = magic._ipython()
        if ip is not None:
            ip.register_magic_function(magic.result, "line", "pxresult")


class _Gather(AsyncResult):
    def __init__(self, client, children, fname):
        super().__init__(client, children, fname, False)

    def _reduce(self, values):
        return _concatenate(values)

    _reduce_errors = AsyncMapResult._reduce_errors


class _SyncImports:
    """with view.sync_imports(): import numpy -- imports here and on the engines."""

    def __init__(self, view, local, quiet):
        self.view, self.local, self.quiet = view, local, quiet

    def __enter__(self):
        import builtins
        self._saved = builtins.__import__
        saved, view, quiet = self._saved, self.view, self.quiet
        frame = sys._getframe(1)

        def imp(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and sys._getframe(1) is frame:
                stmt = ("from %s import %s" % (name, ", ".join(fromlist)) if fromlist
                        else "import %s" % name)
                if not quiet:
                    print("importing %s on engine(s)" % (", ".join(fromlist) if fromlist else name))
                view.execute(stmt, block=True)
            return saved(name, globals, locals, fromlist, level)

        builtins.__import__ = imp
        return self

    def __exit__(self, *exc):
        import builtins
        builtins.__import__ = self._saved
        return False


class _MagicTarget:
    """What ipmpi.magic drives (a MultiEngineClient's execute/get_result),
    bound to a DirectView's targets: %px blocks unless --noblock."""

    def __init__(self, view):
        self._view = view

    @property
    def _conn(self):
        return self._view.client._mec._conn

    def _t(self, targets):
        return self._view._targets if targets is None else targets

    def execute(self, code, targets=None, block=None, timeout=None, **kw):
        return self._view.client._mec.execute(code, targets=self._t(targets),
                                              block=True if block is None else block, timeout=timeout, **kw)

    def get_result(self, i=None, targets=None, block=None, timeout=None):
        return self._view.client._mec.get_result(i, targets=self._t(targets),
                                                 block=True if block is None else block, timeout=timeout)


class LoadBalancedView(View):
    """Tasks on the controller's scheduler (TaskClient's wire): each call
    goes to whichever engine is free. retries: how often a failed task is
    run again."""

    def __init__(self, client, targets=None):
        if targets is not None:
            raise NotImplementedError("load_balanced_view(targets=...): the scheduler balances over "
                                      "every engine; restrict with a depend on engine properties "
                                      "(TaskClient) instead")
        super().__init__(client, None)
        self.retries = 0

    _flag_names = ("block", "retries")

    def _set_targets(self, value):
        if value is not None:
            raise NotImplementedError("LoadBalancedView.targets: the scheduler balances over every engine; "
                                      "restrict with a depend on engine properties (TaskClient) instead")

    def __repr__(self):
        return "<LoadBalancedView>"

    def _run(self, f, args, kwargs):
        from .task import MapTask
        return self.client._taskclient().run(MapTask(f, args=tuple(args), kwargs=dict(kwargs),
                                                     retries=self.retries))

    def _apply(self, f, args, kwargs):
        if not callable(f):
            raise TypeError("apply takes a callable, not %r" % (type(f).__name__,))
        tid = self._run(f, args, kwargs)
        return AsyncResult(self.client, [_Task(self.client, tid)], _name(f), True, kind="task")

    def map(self, f, *sequences, block=None, chunksize=1, ordered=True, return_exceptions=False):
        """A load-balanced map(f, *sequences): chunksize items per task,
        results in order."""
        from .task import _Chunk
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        if not callable(f):
            raise TypeError("map takes a callable, not %r" % (type(f).__name__,))
        if not _is_int(chunksize) or chunksize < 1:
            raise ValueError("chunksize must be an int >= 1, not %r" % (chunksize,))
        seqs = [list(s) for s in sequences]
        if len(seqs) == 1:
            items, star = seqs[0], False
        else:
            items, star = list(zip(*seqs)), True
        g = _Chunk(f, star)
        children = []
        try:
            for lo in range(0, len(items), chunksize):
                tid = self._run(g, (items[lo:lo + chunksize],), {})
                children.append(_Task(self.client, tid))
        except BaseException:
            for ch in children:
                ch.forget()
            raise
        ar = AsyncMapResult(self.client, children, _name(f), kind="task")
        ar._return_exceptions = bool(return_exceptions)
        return self._ret(ar, block)


class RemoteFunction:
    """@view.remote(): calling it applies the function on the view."""

    def __init__(self, view, f, block):
        self.view, self.func, self.block = view, f, block
        functools.update_wrapper(self, f)

    def __call__(self, *args, **kwargs):
        ar = self.view._apply(self.func, args, kwargs)
        return ar.get() if self.block else ar


class ParallelFunction(RemoteFunction):
    """@view.parallel(): f(*sequences) runs f on contiguous parts of the
    sequences (one per engine; chunksize items per task on a
    load-balanced view) and joins the results; f.map(*sequences) is
    view.map(f, *sequences)."""

    def __init__(self, view, f, block, chunksize=None):
        super().__init__(view, f, block)
        self.chunksize = chunksize

    def __call__(self, *sequences):
        if not sequences:
            raise TypeError("a parallel function takes at least one sequence")
        seqs = [_sized(s, "parallel") for s in sequences]
        n = max(len(s) for s in seqs)
        if any(len(s) != n for s in seqs):
            raise ValueError("all sequences must have equal length, but have %s" % [len(s) for s in seqs])
        if n == 0:
            return []
        if isinstance(self.view, LoadBalancedView):
            cs = self.chunksize or 1
            nparts = -(-n // cs)
            children = []
            for i in range(nparts):
                parts = [s[i * cs:(i + 1) * cs] for s in seqs]
                children.append(_Task(self.view.client, self.view._run(self.func, parts, {})))
            ar = _Gather(self.view.client, children, _name(self.func))
            ar._kind = "task"
        else:
            engines = self.view._engines()
            split = [_partition(s, len(engines), "parallel") for s in seqs]
            use = [i for i in range(len(engines)) if any(len(p[i]) for p in split)]
            payloads = [_serialize.dumps((self.func, tuple(p[i] for p in split), {})) for i in use]
            mec = self.view.client._mec
            stream = self.view.client._streaming()
            children = []
            for k, i in enumerate(use):
                children.append(_Direct(self.view.client,
                                        mec._send(_c.K_APPLY, engines[i], payloads[k], None, stream),
                                        [engines[i]], _loads_value, stream))
            ar = _Gather(self.view.client, children, _name(self.func))
        return ar.get() if self.block else ar

    def map(self, *sequences):
        return self.view.map(self.func, *sequences, block=self.block)


# ---------------------------------------------------------------- client

class Client:
    """An ipyparallel-style client of an ipmpi cluster.

    Client(url_file=None, profile_dir=None, timeout=30, progress=None,
    stream_output=None, shm=True, tc_url_file=None): url_file is the
    controller's mec furl file (or a furl string), by default
    $IPMPI_DIR/security/ipcontroller-mec.furl (profile_dir stands for
    IPMPI_DIR); timeout is the connection timeout (s). The load-balanced
    view connects a second link with ipcontroller-tc.furl from the same
    directory (or tc_url_file) when first used. progress: None (show it
    in a terminal or Jupyter unless IPMPI_PROGRESS=0), False, True or
    'plain'. sshserver='user@host[:port]' (and sshkey=): the links go
    through ssh tunnels, as MultiEngineClient's (doc/security.rst).
    stream_output: None (the views' execute and apply show what
    the engines print while it runs, '[stdout:0] ...', in a terminal or
    Jupyter), True (always; load-balanced tasks show theirs when they
    end) or False (never: read ar.stdout). merge_output=True (ipmpi's,
    also settable as rc.merge_output): a line that several engines print
    alike is shown once with their ids, '[stdout:0-63] Hello'.
    """

    def __init__(self, url_file=None, profile=None, profile_dir=None, timeout=30, progress=None,
                 stream_output=None, shm=True, tc_url_file=None, connect_timeout=None, sshserver=None,
                 sshkey=None, merge_output=False, **kwargs):
        from .multiengine import MultiEngineClient
        for k in kwargs:
            if k in ("cluster_id", "context", "debug", "password", "paramiko",
                     "username", "packer", "unpacker", "session"):
                raise NotImplementedError("Client(%s=...) is not supported by ipmpi (doc/modern.rst)" % k)
            raise TypeError("Client() got an unexpected keyword argument %r" % (k,))
        if url_file is None and profile_dir is not None:
            url_file = os.path.join(os.fspath(profile_dir), "security", "ipcontroller-mec.furl")
        if url_file is None and profile not in (None, "default"):
            raise NotImplementedError("Client(profile=...): ipmpi has one profile directory, $IPMPI_DIR; "
                                      "pass profile_dir= or url_file=")
        if tc_url_file is None:
            if url_file is None:
                tc_url_file = default_furl_file("tc")
            else:
                u = os.fspath(url_file)
                if not u.startswith("ipmpi+tls://") and u.endswith("-mec.furl"):
                    tc_url_file = u[:-len("-mec.furl")] + "-tc.furl"
        self._tc_url_file = tc_url_file
        self._connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._shm = shm
        self._ssh = (sshserver, sshkey)
        self._mec = MultiEngineClient(url_file, None, self._connect_timeout, shm, sshserver, sshkey)
        self._tc = None
        self.progress = progress
        self._stream_output = stream_output
        self.merge_output = merge_output
        self._outstanding = weakref.WeakSet()
        self.block = False

    @property
    def progress(self):
        """None (automatic), False, True or 'plain': see ipmpi.progress.
        The client's MultiEngineClient and TaskClient follow it (%px, the
        waits of rc.ids and the like)."""
        return self._progress

    @progress.setter
    def progress(self, value):
        self._progress = _progress.check_setting(value)
        self._mec.progress = value
        if self._tc is not None:
            self._tc.progress = value

    def _progress_mode(self):
        return _progress.mode(self.progress)

    def _streaming(self, kind=_c.K_APPLY):
        """Whether views stream the output of a request of kind (only code
        that runs prints: EXECUTE and APPLY): stream_output, or when None
        (the default) whenever a person reads it (stdout is a terminal, or
        Jupyter)."""
        if kind not in (_c.K_EXECUTE, _c.K_APPLY):
            return False
        s = self._stream_output
        return _output.interactive() if s is None else bool(s)

    def _taskclient(self):
        if self._tc is None:
            from .task import TaskClient
            if self._tc_url_file is None:
                raise ValueError("no task furl known: pass Client(tc_url_file=...) (the controller's "
                                 "ipcontroller-tc.furl)")
            self._tc = TaskClient(self._tc_url_file, None, self._connect_timeout, self._shm, *self._ssh)
            self._tc.progress = self.progress
        return self._tc

    # -- engines
    @property
    def ids(self):
        """The ids of the engines alive now, ascending."""
        return self._mec.get_ids()

    def __len__(self):
        return len(self.ids)

    def wait_for_engines(self, n=None, timeout=-1, block=True, interactive=None, widget=None):
        """Waits until at least n engines are alive (n None: returns at
        once; an ipmpi cluster's engines are MPI ranks, all there when
        ipcluster said it was ready); TimeoutError after timeout s (-1:
        forever)."""
        if not block:
            raise NotImplementedError("wait_for_engines(block=False): ipmpi has no background futures; "
                                      "call it when you want to wait")
        if n is None:
            return None
        if not _is_int(n) or n < 0:
            raise ValueError("n must be a number of engines, not %r" % (n,))
        t = _timeout(timeout)
        deadline = None if t is None else _now() + t
        while len(self.ids) < n:
            if deadline is not None and _now() >= deadline:
                raise TimeoutError("%d engines wanted, %d alive after %s s" % (n, len(self.ids), timeout))
            time.sleep(0.1)
        return None

    def __iter__(self):
        for eid in self.ids:
            yield DirectView(self, eid)

    def __getitem__(self, key):
        """rc[i]: a view of engine i; rc[:], rc[::2], rc[[0, 2]]: of those
        engines (a slice is taken of the engines alive now)."""
        if _is_int(key):
            ids = self.ids
            if key not in ids:
                if -len(ids) <= key < 0:
                    key = ids[key]
                else:
                    raise IndexError("no engine %d: the engines alive are %s" % (key, ids))
            return DirectView(self, int(key))
        if isinstance(key, slice):
            ids = self.ids[key]
            if not ids:
                raise IndexError("no engines in %r (the engines alive are %s)" % (key, self.ids))
            return DirectView(self, ids)
        if isinstance(key, (list, tuple, range)):
            return DirectView(self, [int(k) for k in key])
        raise TypeError("rc[...] takes an engine id, a slice or a list of ids, not %r" % (key,))

    def direct_view(self, targets="all"):
        """A DirectView; targets 'all' are the engines alive at each call."""
        return DirectView(self, targets)

    def load_balanced_view(self, targets=None):
        """A LoadBalancedView over the controller's task scheduler."""
        return LoadBalancedView(self, targets)

    def queue_status(self, targets="all", verbose=False):
        """{engine id: {'queue': n, 'running': kind or None}} ('unassigned':
        tasks waiting in the scheduler)."""
        out = {}
        for eid, d in self._mec.queue_status(targets=targets):
            q = d.get("queue") or []
            out[eid] = {"queue": q if verbose else len(q), "running": d.get("running")}
        if self._tc is not None:
            s = self._tc.queue_status()
            out["unassigned"] = s.get("scheduled", 0)
        return out

    # -- waiting and stopping
    def wait(self, jobs=None, timeout=-1):
        """Waits for jobs (AsyncResults; None: everything this client has
        outstanding); True if all complete within timeout s (-1: forever)."""
        if jobs is None:
            jobs = list(self._outstanding)
        elif isinstance(jobs, AsyncResult):
            jobs = [jobs]
        jobs = list(jobs)
        for j in jobs:
            if not isinstance(j, AsyncResult):
                raise TypeError("wait takes AsyncResults, not %r" % (type(j).__name__,))
        timeout = _timeout(timeout)
        deadline = None if timeout is None else _now() + timeout
        if not jobs:
            return True
        if len(jobs) == 1:
            return jobs[0].wait(timeout if timeout is not None else -1)
        children = [c for j in jobs for c in j._children]
        holder = AsyncResult(self, children, "wait", False, kind=jobs[0]._kind)
        holder.owner = False      # the jobs own their requests
        self._outstanding.discard(holder)
        ok = holder._wait(timeout)
        for j in jobs:
            left = 0.0 if deadline is None else max(0.0, deadline - _now())
            ok = j._wait(left if deadline is not None else None, show=False) and ok
        return ok

    def abort(self, jobs=None, targets=None, block=None):
        """Aborts jobs (AsyncResults or task ids): their tasks not yet run
        never run; for direct requests, the queues of their engines are
        cleared. jobs None: every outstanding task of this client and the
        queues of targets (default every engine)."""
        if jobs is None:
            jobs = list(self._outstanding)
            self._mec.clear_queue(targets="all" if targets is None else targets)
        elif isinstance(jobs, AsyncResult) or _is_int(jobs):
            jobs = [jobs]
        engines = set()
        for j in jobs:
            children = [_Task(self, j)] if _is_int(j) else j._children
            for c in children:
                if c.outcomes is not None or c.ready():
                    continue
                if isinstance(c, _Task):
                    try:
                        self._taskclient().abort(c.tid)
                    except IndexError:
                        pass
                else:
                    engines.update(e for e in c.engines if e is not None)
        if engines:
            self._mec.clear_queue(targets=sorted(engines))

    def interrupt(self, targets="all"):
        """Raises KeyboardInterrupt in the code running on targets (the
        controller's INTERRUPT: MultiEngineClient.interrupt)."""
        return self._mec.interrupt(targets)

    def _interrupted(self, ar):
        """Ctrl-C during a blocking wait of ar: its requests still running
        are interrupted and those still queued are aborted (on the
        engines, only ar's own requests: another client's code goes on);
        the replies still come and are dropped when ar is dropped."""
        todo = [c for c in ar._children if c.outcomes is None and not getattr(c, "fetched", True)]
        engines = sorted({e for c in todo for e in c.engines if e is not None})
        if engines:
            self._mec._interrupt_quietly(engines, [c.rid for c in todo])

    def shutdown(self, targets="all", restart=False, hub=False, block=None):
        """Stops engines: hub=True (or targets 'all' with hub=True) stops the
        whole cluster, controller included; else the targets are killed."""
        if restart:
            raise NotImplementedError("shutdown(restart=True): ipmpi engines are MPI ranks and are not "
                                      "restarted; start a new cluster")
        if hub:
            return self._mec.shutdown()
        self._mec.kill(targets=targets)
        return None

    def get_result(self, indices_or_msg_ids=None, block=None, owner=True):
        """The AsyncResult (block False, the default as self.block) or the
        result of earlier requests by id: msg_ids of this or any other
        client of this controller (ar.msg_ids; MultiEngine ids are
        'INSTANCE:SESSION:REQ' strs, task ids ints), also of a client that
        died. A direct request's result is one value per engine that ran
        it (None for execute). Unknown ids raise InvalidDeferredID, evicted
        ones EvictedError, when the result is asked for. ipyparallel's
        history indices do not exist here: give ids."""
        if indices_or_msg_ids is None:
            raise TypeError("get_result needs msg_ids (ar.msg_ids): ipmpi keeps no history of indices")
        single = isinstance(indices_or_msg_ids, (str, int))
        ids = [indices_or_msg_ids] if single else list(indices_or_msg_ids)
        children = []
        try:
            for mid in ids:
                if _is_int(mid):
                    children.append(_Task(self, int(mid)))
                    continue
                c = _Direct(self, self._mec._fetch(mid), [None], _kept_value)
                c.msg_id, c.fetched = mid, True
                children.append(c)
        except BaseException:
            for c in children:
                c.forget()
            raise
        ar = AsyncResult(self, children, "get_result", single=single and not _is_int(indices_or_msg_ids),
                         kind="task" if all(isinstance(c, _Task) for c in children) else "apply")
        if single and _is_int(indices_or_msg_ids):
            ar._single = True
        ar.owner = owner
        return ar.get() if (self.block if block is None else block) else ar

    def reconnect(self, timeout=None):
        """New links to the controller in place of the present ones (after
        the network dropped, say); results still to come arrive all the
        same: the controller kept them, and they are fetched by id."""
        self._mec.reconnect(timeout)
        for ar in list(self._outstanding):
            for c in ar._children:
                if isinstance(c, _Direct):
                    c.relink()
        if self._tc is not None:
            self._tc.reconnect(timeout)

    def send_signal(self, sig, targets=None, block=None):
        """ipyparallel's way to interrupt: SIGINT (or 'SIGINT', 'INT', 2)
        is rc.interrupt(targets) -- KeyboardInterrupt in the code running
        on those engines -- and returns its report. ipmpi delivers no other
        signal (NotImplementedError: stop engines with rc.shutdown)."""
        import signal as _signal
        if isinstance(sig, str):
            name = sig.upper()
            name = name if name.startswith("SIG") else "SIG" + name
            num = getattr(_signal, name, None)
            if not isinstance(num, int):
                raise ValueError("send_signal: no signal named %r" % (sig,))
        elif _is_int(sig):
            num = int(sig)
        else:
            raise TypeError("send_signal takes a signal number or name, not %r" % (type(sig).__name__,))
        if num != _signal.SIGINT:
            try:
                label = _signal.Signals(num).name
            except ValueError:
                label = str(num)
            raise NotImplementedError("send_signal(%s): ipmpi engines are MPI ranks and get only SIGINT, "
                                      "as an interrupt (KeyboardInterrupt in the running code); stop "
                                      "engines with rc.shutdown(targets)" % label)
        return self.interrupt("all" if targets is None else targets)

    def close(self, linger=None):
        """Closes the connections; the cluster keeps running."""
        self._mec.close()
        if self._tc is not None:
            self._tc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return "<ipmpi.Client %r>" % (self._mec,)


# ---------------------------------------------------------------- require

# ipyparallel's view flags ipmpi lacks: (accepted when the value asks for
# nothing, why they are refused otherwise).
_ABSENT_FLAGS = {
    "track": (lambda v: not v, "no zero-copy send trackers: buffers are copied or sent before the call "
                               "returns"),
    "after": (lambda v: not v, "the scheduler has no dependencies on other tasks: wait for them "
                               "(ar.wait()) before submitting"),
    "follow": (lambda v: not v, "the scheduler has no location dependencies on other tasks"),
    "timeout": (lambda v: v is None, "the scheduler has no dependency timeout"),
    "label": (lambda v: v is None, "tasks have no labels"),
}


def require(*objects, **mapping):
    """@require('re', numpy, helper): before the decorated function runs
    (on an engine, or here when called here), the modules named (strs or
    modules) are imported into the engine's namespace and the functions
    (by their names, or mapping's) are set there; then the function runs
    with that namespace as its globals, as every function applied from
    __main__ does. Unlike ipyparallel's, it is not a scheduling
    dependency: a load-balanced task whose import fails fails with the
    ImportError (retries apply)."""
    modules, names = [], dict(mapping)
    for o in objects:
        if isinstance(o, str):
            modules.append(o)
        elif isinstance(o, type(functools)):
            modules.append(o.__name__)
        elif callable(o) and getattr(o, "__name__", None):
            names[o.__name__] = o
        else:
            raise TypeError("require takes module names, modules and named functions, not %r" % (o,))
    for k in names:
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError("require: %r is not a name" % (k,))

    def decorate(f):
        if not callable(f):
            raise TypeError("require decorates a function, not %r" % (type(f).__name__,))
        return _required(f, tuple(modules), names)

    return decorate


def _required(f, modules, names):
    # A nested function, so that cloudpickle sends it by value: the
    # engines need nothing of ipmpi.modern to run it.
    def required(*args, **kwargs):
        import importlib
        import sys
        import types
        ns = sys.modules["__main__"].__dict__
        for m in modules:
            importlib.import_module(m)
            top = m.partition(".")[0]
            ns[top] = sys.modules[top]
        ns.update(names)
        g = f
        if isinstance(f, types.FunctionType) and f.__module__ == "__main__" and f.__globals__ is not ns:
            for k, v in f.__globals__.items():
                if k not in ns and not k.startswith("__"):
                    ns[k] = v
            g = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
            g.__kwdefaults__ = f.__kwdefaults__
        return g(*args, **kwargs)

    functools.update_wrapper(required, f)
    required.__module__ = getattr(f, "__module__", None)
    return required


def interactive(f):
    """ipyparallel's @interactive: f runs with the engine's namespace as
    its globals. Every function defined in __main__ already does on
    ipmpi's engines; this marks others so as well."""
    if hasattr(f, "__module__"):
        f.__module__ = "__main__"
    return f


# ---------------------------------------------------------------- helpers

def _name(f):
    return getattr(f, "__name__", None) or type(f).__name__


def _loads_value(meta, parts):
    return _serialize.loads(parts[1:])


def _kept_value(meta, parts):
    """The value of a request fetched by id: what apply returned, the list
    pull sent, None for execute and the like."""
    if isinstance(meta, dict) and meta.get("kind") == "execute" or len(parts) < 2:
        return None
    return _serialize.loads(parts[1:])


def _first_value(meta, parts):
    return _serialize.loads(parts[1:])[0]


def _no_value(meta, parts):
    return None


for _cls in (Client, DirectView, LoadBalancedView, AsyncResult, AsyncMapResult):
    _cls.__module__ = "ipmpi"
del _cls
