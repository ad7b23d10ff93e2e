"""Results of the MultiEngine interface: ResultList (IPython 0.10's printed
form), PendingResult (block=False), and the helpers that turn replies into
values or errors.
"""
import json
import numbers
import re
import struct
import time

from . import _serialize
from . import _ipmpi as _c
from . import output as _output
from . import progress as _progress
from .errors import (CompositeError, EngineError, EvictedError, InvalidDeferredID, RemoteError, _ERROR_CLASSES,
                     _rebuild_exception)


# ---------------------------------------------------------------- results

class ResultList(list):
    """The result dicts of execute/get_result, one per engine, shown exactly
    as IPython 0.10 showed them:

        <Results List>
        [0] In [4]: print(c)
        [0] Out[4]: 15

    Each dict has 'input' ({'translated': code, 'raw': code}), 'number'
    (the engine's execution count), 'id' (the engine) and, when not empty,
    'stdout' and 'stderr' (reading an absent one gives '').

    The output of a request that streamed it (execute(..., stream=True))
    was shown while it ran: the printed form then leaves it out."""

    _streamed = False

    def __repr__(self):
        out = ["<Results List>\n"]
        for r in self:
            if not isinstance(r, dict):
                out.append(repr(r) + "\n")
                continue
            eid = r.get("id")
            num = r.get("number")
            eid = -1 if eid is None else eid
            num = 0 if num is None else num
            inp = r.get("input", {})
            if isinstance(inp, dict):
                inp = inp.get("translated", "No Input")
            stdout = r.get("stdout")
            stderr = r.get("stderr")
            out.append("[%i] In [%i]: %s\n" % (eid, num, inp))
            if self._streamed:
                continue
            if stdout:
                out.append("[%i] Out[%i]: %s\n" % (eid, num, stdout))
            if stderr:
                out.append("[%i] Err[%i]:\n %s" % (eid, num, stderr))
        return "".join(out)

    __str__ = __repr__


class _Result(dict):
    """An execute result dict; an absent 'stdout' or 'stderr' reads as ''
    (IPython 0.10 left them out when empty, and so does this)."""

    def __missing__(self, key):
        if key in ("stdout", "stderr"):
            return ""
        raise KeyError(key)


def _result_dict(meta):
    """IPython 0.10's result dict from an engine's execute meta, in 0.10's
    key order: input, number, id, stdout, stderr (the last two when not
    empty)."""
    if not isinstance(meta, dict):
        return meta
    code = meta.get("input", "")
    if isinstance(code, dict):
        inp = dict(code)
    else:
        inp = {"translated": code, "raw": code}
    r = _Result(input=inp, number=meta.get("number"), id=meta.get("id"))
    if meta.get("stdout"):
        r["stdout"] = meta["stdout"]
    if meta.get("stderr"):
        r["stderr"] = meta["stderr"]
    return r


def _message(parts):
    if parts:
        return bytes(parts[0]).decode("utf-8", "replace")
    return ""


def _split(replies):
    """Sort replies by engine id into successes [(id, meta, parts)] and
    error objects; controller errors have no meta."""
    ok, errors = [], []
    for target, status, parts in replies:
        if status == 0:
            meta = _serialize.loads(parts[:1]) if parts else {}
            if isinstance(meta, dict):
                meta.setdefault("id", target)   # engines leave it to the frame
                eid = meta["id"]
            else:
                eid = target
            ok.append((eid, meta, parts))
        elif status == _c.EREMOTE:
            meta = _serialize.loads(parts[:1]) if parts else {}
            if not isinstance(meta, dict):
                meta = {}
            meta.setdefault("id", target)
            eid = meta["id"]
            errors.append(RemoteError(eid, meta.get("etype", "Exception"), meta.get("evalue", ""),
                                      meta.get("traceback", ""), meta))
        else:
            cls = _ERROR_CLASSES.get(status, EngineError)
            errors.append(cls(status, _message(parts), target if target >= 0 else None))
    ok.sort(key=lambda t: t[0])
    errors.sort(key=lambda e: (e.engine_id is None, e.engine_id if e.engine_id is not None else 0))
    return ok, errors


def _in_order(items, key, order):
    """items (sorted by engine id) in the order of the target list order."""
    if not order:
        return items
    rank = {t: i for i, t in enumerate(order)}
    return sorted(items, key=lambda x: rank.get(key(x), len(rank)))


def _composite(errors, results, method):
    """The CompositeError of a request's failures (see CompositeError)."""
    elist = []
    for e in errors:
        if isinstance(e, RemoteError):
            ev = _rebuild_exception(e.meta, e.engine_id)
        else:
            ev = e
        elist.append((type(ev), ev, None))
    return CompositeError("one or more exceptions from call to method: %s" % (method or "?"),
                          elist, errors, results, method)


def _raise_errors(errors, results, nreplies=1, method=None):
    """A request that ran on one engine raises that engine's error itself
    (RemoteError, DeadEngineError, ...); one that ran on several raises a
    CompositeError if any failed, as IPython 0.10 did."""
    if not errors:
        return
    if nreplies <= 1 and len(errors) == 1:
        err = errors[0]
        err.results = results
        raise err
    raise _composite(errors, results, method)


def _engine_results(replies, value, method=None, order=None):
    """Applies value(meta, parts) to every successful engine reply, in
    engine id order (or in the order of the target list order); raises
    RemoteError/EngineError (one engine) or CompositeError (several) if
    any engine failed (the successes travel in the error's .results)."""
    ok, errors = _split(replies)
    if order:
        ok = _in_order(ok, lambda t: t[0], order)
        errors = _in_order(errors, lambda e: e.engine_id, order)
    results = [value(meta, parts) for _eid, meta, parts in ok]
    _raise_errors(errors, results, len(replies), method)
    return results


def _controller_json(replies):
    ok, errors = _split_controller(replies)
    _raise_errors(errors, [])
    return ok


def _split_controller(replies):
    ok, errors = None, []
    for target, status, parts in replies:
        if status == 0:
            ok = json.loads(_message(parts)) if parts else None
        else:
            cls = _ERROR_CLASSES.get(status, EngineError)
            errors.append(cls(status, _message(parts), target if target >= 0 else None))
    return ok, errors


class PendingResult:
    """A request sent with block=False (IPython 0.10's PendingResult).

    get_result(default=None, block=True, timeout=None): the result the
    blocking call would have returned (or raises its error, again on every
    call); with block=False, default while it is not complete. r is
    get_result(block=True). add_callback(f, *args, **kwargs): the result
    becomes f(result, *args, **kwargs) when it is first retrieved
    (callbacks chain). timeout None means the client's default; a wait
    that runs out raises TimeoutError and loses nothing. ready() never
    blocks.
    """

    def __init__(self, client, req_ids, post, ids=None):
        self.client = client
        self._client = client
        self._pending = list(req_ids)
        # The user-visible ids ('INSTANCE:SESSION:REQ'), one per request;
        # ids[k] is the request whose replies _pending[k - done] collects.
        rid = getattr(client, "_rid", None)
        self._ids = list(ids) if ids is not None else [rid(r) if rid else None for r in self._pending]
        self.targets = None  # the targets of the request, when one request
        self.result_id = self._pending[0] if self._pending else None
        self._replies = []
        self._post = post
        self._done = False
        self._result = None
        self._error = None
        self.callbacks = []
        self._printer = None  # an output.OutputPrinter when the request streams its output
        self.what = None      # the call's name, for its progress line
        self._quiet_progress = False   # True while a barrier shows the progress
        self._wait_shown = _NO_PROGRESS

    def ready(self):
        if self._done:
            return True
        conn = self._client._conn
        if conn is None:
            return False
        return all(conn.ready(r) for r in self._pending)

    def get_result(self, default=None, block=True, timeout=None):
        if block not in (True, False):
            raise ValueError("block must be True or False, not %r" % (block,))
        if not self._done:
            if not block and not self.ready():
                return default
            conn = self._client._conn
            # The progress of this wait (ipmpi.progress), shown by _collect.
            self._wait_shown = self._progress(conn) if conn is not None else _NO_PROGRESS
            try:
                self._collect(self._client._timeout if timeout is None else timeout)
                if self._wait_shown.bar is not None:
                    self._wait_shown.close(self._progress_done(conn))
            finally:
                self._wait_shown.close()
                self._wait_shown = _NO_PROGRESS
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def r(self):
        """get_result(block=True)."""
        return self.get_result(block=True)

    def add_callback(self, f, *args, **kwargs):
        """The result becomes f(result, *args, **kwargs) when first
        retrieved; several callbacks chain. There is no errback chain: an
        exception of the request (or of a callback) is raised by get_result."""
        if not callable(f):
            raise TypeError("add_callback takes a callable, not %r" % (type(f).__name__,))
        self.callbacks.append((f, args, kwargs))

    def _collect(self, timeout):
        conn = self._client._conn
        if conn is None:
            raise ConnectionError("this client is closed")
        deadline = None if timeout is None else _now() + timeout
        progress = self._wait_shown
        try:
            while self._pending:
                if self._printer is not None:
                    _output.follow(conn, self._pending[0], self._printer, deadline)
                left = None if deadline is None else max(0.0, deadline - _now())
                self._replies.extend(_progress.recv(conn, self._pending[0], left, progress,
                                                    lambda: self._progress_done(conn)))
                self._pending.pop(0)
            if self._printer is not None:
                self._printer.close()
        except KeyboardInterrupt:
            # Ctrl-C while waiting: the code runs on in the engines unless
            # the client stops it there too (MultiEngineClient.interrupt).
            # Nothing is lost: get_result again collects what comes.
            hook = getattr(self._client, "_interrupt_pending", None)
            if hook is not None:
                hook(self)
            raise
        self._done = True
        try:
            result = self._post(self._replies)
            for f, args, kwargs in self.callbacks:
                result = f(result, *args, **kwargs)
            self._result = result
        except Exception as e:  # kept, so every get_result raises it again
            self._error = e
        self._replies = None

    # -- progress of a blocking wait (ipmpi.progress): one request to several
    # engines counts them all at once (its replies come together); a
    # result of one request per engine (map) counts them one by one.
    def _progress(self, conn):
        make = getattr(self._client, "_wait_progress", None)
        # Streamed output shows progress itself; a barrier shows its own.
        if make is None or self._printer is not None or self._quiet_progress:
            return _NO_PROGRESS
        return make(self._progress_total, "engines", self.what or "wait")

    def _progress_total(self):
        """The engines waited for (asked of the controller, once, for 'all')."""
        n = getattr(self, "_ptotal", None)
        if n is not None:
            return n
        t = self.targets
        if len(self._ids) > 1 or t is None or isinstance(t, numbers.Integral):
            n = max(1, len(self._ids))
        elif isinstance(t, str):
            try:
                n = len(self._client.get_ids(timeout=5)) or 1
            except Exception:
                n = 1
        else:
            n = len(t)
        self._ptotal = n
        return n

    def _progress_done(self, conn):
        if len(self._ids) > 1:
            return len(self._ids) - len(self._pending) + sum(1 for r in self._pending if conn.ready(r))
        if self._pending and not conn.ready(self._pending[0]):
            return 0
        return self._progress_total()

    def _flush(self):
        """Drops the replies not yet received (flush)."""
        if self._done:
            return
        conn = self._client._conn
        for r in self._pending:
            try:
                if conn is not None:
                    conn.forget(r)
            except Exception:
                pass
        self._pending = []
        self._replies = None
        self._done = True
        self._error = InvalidDeferredID("this result (request %s) was flushed before it was retrieved"
                                        % (self.result_id,))

    @property
    def req_ids(self):
        """The ids of this result's requests ('INSTANCE:SESSION:REQ'): the
        controller keeps the replies under them, so that after a lost link
        mec.reconnect() -- or another client with the same furl, with
        mec.get_result_by_id(ids) -- still gets this result."""
        return list(self._ids)

    #: ipyparallel's name (AsyncResult.msg_ids).
    msg_ids = req_ids

    def _relink(self, client):
        """client has a new link: the requests not yet collected are fetched
        again by id on it (all their replies: those already received on the
        old link went with it)."""
        if self._done or not self._pending:
            return
        first = len(self._ids) - len(self._pending)
        if None in self._ids[first:]:
            # A request the controller answers itself: nothing kept to fetch.
            self._pending, self._replies, self._done = [], None, True
            self._error = ConnectionError("the link this request went on was lost, and the controller keeps "
                                          "no result for it (only engine requests have ids): send it again")
            return
        fresh = []
        try:
            for gid in self._ids[first:]:
                fresh.append(client._fetch(gid))
        except BaseException:
            for r in fresh:
                client._conn.forget(r)
            raise
        self._pending = fresh
        if not getattr(self._post, "_fetch_checked", False):
            self._post = _fetch_checked(self._post)

    def __repr__(self):
        # IPython 0.10's form (<ipmpi.client.PendingResult object at 0x...>),
        # also where IPython's display would shorten it.
        return object.__repr__(self)

    def __lt__(self, other):
        if not isinstance(other, PendingResult):
            return NotImplemented
        return (self.result_id or 0) < (other.result_id or 0)

    def __del__(self):
        pending = getattr(self, "_pending", None)
        client = getattr(self, "_client", None)
        if not pending or client is None or client._conn is None:
            return
        for r in pending:
            try:
                client._conn.forget(r)
            except Exception:
                pass


def _now():
    return time.monotonic()


_NO_PROGRESS = _progress.Progress(None, 0, "", "")


def _none(meta, parts):
    return None


def _no_value(replies):
    _engine_results(replies, _none)
    return None


def _identity(x):
    return x


# ---------------------------------------------------------------- request ids

_ID_RE = re.compile(r"^([0-9a-f]{16}):(\d+):(\d+)$")
_FETCH_ID = struct.Struct("<QQ")


def _parse_id(gid):
    """16 bytes for RESULT_FETCH from a request id 'INSTANCE:SESSION:REQ'."""
    m = _ID_RE.match(gid) if isinstance(gid, str) else None
    if not m or int(m.group(2)) > 0xFFFFFFFF or int(m.group(3)) > 0xFFFFFFFF:
        raise ValueError("not a request id: %r (ids look like '0123456789abcdef:3:17': pr.req_ids gives them)"
                         % (gid,))
    return _FETCH_ID.pack(int(m.group(1), 16), (int(m.group(2)) << 32) | int(m.group(3)))


def _fetch_error(replies):
    """The error a RESULT_FETCH got from the controller itself, or None:
    unknown id and id of another controller: InvalidDeferredID; evicted:
    EvictedError."""
    for target, status, parts in replies:
        if target != _c.TARGET_CONTROLLER or status >= 0:
            continue
        if status == _c.EEVICTED:
            return EvictedError(_message(parts))
        if status in (_c.ENOENT, _c.EINVAL):
            return InvalidDeferredID(_message(parts))
    return None


def _fetch_checked(post):
    """post, raising the fetch's own error first."""
    def checked(replies):
        err = _fetch_error(replies)
        if err is not None:
            raise err
        return post(replies)
    checked._fetch_checked = True
    return checked


def _any_value(meta, parts):
    """A value from an engine reply without knowing the call that made it:
    execute and get_result give their result dict, others what the engine
    sent (pull: the list of values, one per name asked), or None."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind in ("execute", "get_result"):
        return _result_dict(meta)
    if len(parts) > 1:
        return _serialize.loads(parts[1:])
    return None


def _fetched(replies):
    """The result of one fetched request: one value per engine, by engine
    id (a ResultList for execute)."""
    values = _engine_results(replies, _any_value, "get_result_by_id")
    if values and all(isinstance(v, _Result) for v in values):
        return ResultList(values)
    return values
