"""The API users type: IPython 0.x's MultiEngineClient and TaskClient.

    from ipmpi import client
    mec = client.MultiEngineClient()      # $IPMPI_DIR/security/ipcontroller-mec.furl
    mec.execute('print("Hello World")')   # a ResultList, shown as IPython 0.x did
    mec.push(dict(a=5)); mec.pull('a'); mec['b'] = 2
    mec.scatter('x', range(16)); mec.gather('x'); mec.map(f, seq)

This layer is thin: the transport, framing and result tracking live in the
C module ipmpi._ipmpi (TLS 1.3, GIL released around all I/O); payloads are
made by ipmpi._serialize (pickle protocol 5, large buffers out of band, so a
numpy array goes from the caller's memory to the socket and comes back into
its final buffer without a copy). The wire is doc/protocol.md section 2.

Thread safety: a client may be used from several threads; each call is one
or a few requests on the shared, thread-safe connection.
"""
import builtins
import json
import numbers
import os
import pickle
import struct
import threading
import time

from . import _serialize
from . import _ipmpi as _c
from . import task as _task
from .task import MapTask, ResultNS, StringTask, Task, TaskResult

__all__ = [
    "MultiEngineClient", "TaskClient", "PendingResult", "ResultList",
    "RemoteError", "CompositeError", "EngineError", "DeadEngineError",
    "AbortedError", "ResultNotCompleted", "default_furl_file",
    "StringTask", "MapTask", "Task", "TaskResult", "ResultNS",
    "EvictedError", "TaskTimeoutError", "TaskAborted",
]


# ---------------------------------------------------------------- errors

class RemoteError(Exception):
    """An exception raised by user code on an engine.

    Attributes: engine_id, etype (class name), evalue (its str), traceback
    (the remote traceback text), meta (the engine's result dict) and
    results (the successful results of the same request, if any).
    """

    def __init__(self, engine_id, etype, evalue, traceback, meta=None):
        super().__init__(engine_id, etype, evalue, traceback)
        self.engine_id = engine_id
        self.etype = etype
        self.evalue = evalue
        self.traceback = traceback
        self.meta = meta or {}
        self.results = []

    def __str__(self):
        head = "engine %s: %s: %s" % (self.engine_id, self.etype, self.evalue)
        if self.traceback:
            return head + "\n" + self.traceback.rstrip("\n")
        return head


class EngineError(RuntimeError):
    """The controller could not run a request on an engine (status < 0).

    Attributes: code (an IPMPI_E* value, e.g. _ipmpi.EDEAD), engine_id
    (None when the error is about the whole request) and message (the
    controller's words).
    """

    def __init__(self, code, message, engine_id=None):
        super().__init__(code, message, engine_id)
        self.code = code
        self.message = message
        self.engine_id = engine_id
        self.results = []

    def __str__(self):
        where = ""
        if self.engine_id is not None and not self.message.startswith("engine %s " % self.engine_id):
            where = "engine %s: " % self.engine_id
        return "%s%s (%s)" % (where, self.message or _c.strerror(self.code), _c.errname(self.code))


class DeadEngineError(EngineError):
    """The engine died before or while running the request (EDEAD)."""


class AbortedError(EngineError):
    """The request was removed from the queue by clear_queue (EABORTED)."""


class CompositeError(Exception):
    """Several engines failed one request. errors: the RemoteError and
    EngineError objects, ordered by engine id; results: the successful
    results of the same request."""

    def __init__(self, errors, results=None):
        super().__init__(errors)
        self.errors = list(errors)
        self.results = results if results is not None else []

    def __str__(self):
        lines = ["%d engines failed:" % len(self.errors)]
        for e in self.errors:
            lines.append("[%s] %s" % (e.__class__.__name__, e))
        return "\n".join(lines)

    def raise_exception(self, index=0):
        """Re-raise one of the errors (the first by default)."""
        raise self.errors[index]


class ResultNotCompleted(Exception):
    """get_result(block=False) on a request whose replies are not all in."""


class EvictedError(IndexError):
    """The controller no longer has this task's result: its task memory
    budget (--task-memory) made room by dropping it. An IndexError, as an
    unknown task id is ("task ID not registered")."""

    def __init__(self, message, taskid=None):
        super().__init__(message)
        self.taskid = taskid


class TaskTimeoutError(TimeoutError):
    """A TaskClient wait ran out of time. Nothing is lost: the tasks go on,
    and their results stay in the controller; taskids names the tasks not
    yet collected (get_task_result(tid) fetches each later)."""

    def __init__(self, message, taskids=()):
        super().__init__(message)
        self.taskids = list(taskids)


# IPython 0.10's name for the failure of an aborted task.
TaskAborted = AbortedError

_ERROR_CLASSES = {_c.EDEAD: DeadEngineError, _c.EABORTED: AbortedError}


def _rebuild_exception(meta, engine_id=None):
    """The exception an engine reported in meta, rebuilt as its own type.

    meta: the engine's reply dict (etype, evalue, traceback and maybe exc,
    the pickled exception). Tries, in order: unpickling exc; the builtin
    exception class named etype, called with evalue; RemoteError. Only
    Exception subclasses are rebuilt (a remote SystemExit or
    KeyboardInterrupt becomes a RemoteError, so re-raising it here never
    stops the client). The result carries engine_id and remote_traceback
    attributes, and (except a RemoteError, whose str shows it anyway) the
    remote traceback as a note, shown under the local traceback.
    """
    if not isinstance(meta, dict):
        meta = {}
    if engine_id is None:
        engine_id = meta.get("id")
    etype = meta.get("etype") or "Exception"
    evalue = meta.get("evalue") or ""
    tb = meta.get("traceback") or ""
    exc = None
    data = meta.get("exc")
    if data:
        try:
            e = pickle.loads(data)
        except Exception:
            e = None
        if isinstance(e, Exception):
            exc = e
    if exc is None and isinstance(etype, str) and etype.isidentifier():
        cls = getattr(builtins, etype, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                exc = cls(evalue)
            except Exception:
                exc = None
    if exc is None:
        exc = RemoteError(engine_id, etype, evalue, tb, meta)
    try:
        exc.engine_id = engine_id
        exc.remote_traceback = tb
        if tb and not isinstance(exc, RemoteError):
            note = "remote traceback (engine %s):\n%s" % (engine_id, tb.rstrip("\n"))
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            else:  # before Python 3.11
                exc.__notes__ = list(getattr(exc, "__notes__", ())) + [note]
    except Exception:  # an exception type that takes no attributes
        pass
    return exc


# ---------------------------------------------------------------- results

class ResultList(list):
    """Per-engine result dicts (id, number, input, stdout, stderr), shown
    exactly as IPython 0.x showed them."""

    def __repr__(self):
        out = ["<Results List>\n"]
        for r in self:
            eid, num = r["id"], r["number"] if r.get("number") is not None else 0
            out.append("[%i] In [%i]: %s\n" % (eid, num, r.get("input", "")))
            stdout = r.get("stdout") or ""
            stderr = r.get("stderr") or ""
            if stdout:
                out.append("[%i] Out[%i]: %s\n" % (eid, num, stdout))
                if not stdout.endswith("\n"):
                    out.append("\n")
            if stderr:
                out.append("[%i] Err[%i]:\n%s" % (eid, num, stderr))
        return "".join(out)

    __str__ = __repr__


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
            eid = meta.get("id", target) if isinstance(meta, dict) else target
            ok.append((eid, meta, parts))
        elif status == _c.EREMOTE:
            meta = _serialize.loads(parts[:1]) if parts else {}
            eid = meta.get("id", target)
            errors.append(RemoteError(eid, meta.get("etype", "Exception"), meta.get("evalue", ""),
                                      meta.get("traceback", ""), meta))
        else:
            cls = _ERROR_CLASSES.get(status, EngineError)
            errors.append(cls(status, _message(parts), target if target >= 0 else None))
    ok.sort(key=lambda t: t[0])
    errors.sort(key=lambda e: (e.engine_id is None, e.engine_id if e.engine_id is not None else 0))
    return ok, errors


def _raise_errors(errors, results):
    if not errors:
        return
    if len(errors) == 1:
        err = errors[0]
        err.results = results
        raise err
    raise CompositeError(errors, results)


def _engine_results(replies, value):
    """Applies value(meta, parts) to every successful engine reply, ordered
    by engine id; raises RemoteError/EngineError/CompositeError if any
    engine failed (the successes travel in the error's .results)."""
    ok, errors = _split(replies)
    results = [value(meta, parts) for _eid, meta, parts in ok]
    _raise_errors(errors, results)
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
    """A request sent with block=False.

    get_result(block=True, timeout=None) waits for every reply and returns
    what the blocking call would have returned (or raises its error);
    timeout None means the client's default. ready() never blocks.
    """

    def __init__(self, client, req_ids, post):
        self._client = client
        self._pending = list(req_ids)
        self._replies = []
        self._post = post
        self._done = False
        self._result = None
        self._error = None

    def ready(self):
        if self._done:
            return True
        conn = self._client._conn
        return all(conn.ready(r) for r in self._pending)

    def get_result(self, block=True, timeout=None):
        if not self._done:
            if not block and not self.ready():
                raise ResultNotCompleted("the result of request %s is not complete yet" % self._pending)
            self._collect(self._client._timeout if timeout is None else timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def _collect(self, timeout):
        conn = self._client._conn
        deadline = None if timeout is None else _now() + timeout
        while self._pending:
            left = None if deadline is None else max(0.0, deadline - _now())
            self._replies.extend(conn.recv(self._pending[0], left))
            self._pending.pop(0)
        self._done = True
        try:
            self._result = self._post(self._replies)
        except Exception as e:  # kept, so every get_result raises it again
            self._error = e
        self._replies = None

    @property
    def req_ids(self):
        return list(self._pending)

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

    def __repr__(self):
        return "<PendingResult %s %s>" % (self._pending or "", "ready" if self._done else "pending")


def _now():
    return time.monotonic()


# ---------------------------------------------------------------- furls

def _ipmpi_dir():
    return os.environ.get("IPMPI_DIR") or os.path.join(os.path.expanduser("~"), ".ipmpi")


def default_furl_file(capability="mec"):
    """$IPMPI_DIR/security/ipcontroller-<capability>.furl (IPMPI_DIR defaults to ~/.ipmpi)."""
    return os.path.join(_ipmpi_dir(), "security", "ipcontroller-%s.furl" % capability)


def _read_furl(furl_file, capability):
    if furl_file is None:
        furl_file = default_furl_file(capability)
    furl_file = os.fspath(furl_file)
    if furl_file.startswith("ipmpi+tls://"):
        return furl_file.strip()
    try:
        with open(furl_file, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            "no controller capability file %s: is a cluster running? Start one with "
            "`ipcluster mpirun -n 4` (and set IPMPI_DIR if it uses another profile directory)"
            % furl_file) from None


def _connect(furl_file, capability, connect_timeout, shm=True):
    furl = _read_furl(furl_file, capability)
    conn = _c.Connection(furl, connect_timeout, bool(shm))
    if conn.capability != capability:
        got = conn.capability
        conn.close()
        names = {"mec": "MultiEngineClient (ipcontroller-mec.furl)", "tc": "TaskClient (ipcontroller-tc.furl)"}
        raise PermissionError(
            "this furl grants the %r capability, which is for %s; this client needs %s"
            % (got, names.get(got, got), names[capability]))
    return conn


# ---------------------------------------------------------------- targets

def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _parse_targets(targets):
    """Returns (target, target_list, single) for the wire: 'all' -> ALL,
    an int -> that engine, a list of ints -> TARGET_LIST."""
    if targets is None or (isinstance(targets, str) and targets == "all"):
        return _c.TARGET_ALL, None, False
    if _is_int(targets):
        t = int(targets)
        if t < 0:
            raise ValueError("engine ids are >= 0, not %d" % t)
        return t, None, True
    if isinstance(targets, str) or not hasattr(targets, "__iter__"):
        raise TypeError("targets must be 'all', an engine id or a list of engine ids, not %r" % (targets,))
    ids = list(targets)
    if not ids:
        raise ValueError("targets is an empty list")
    for t in ids:
        if not _is_int(t):
            raise TypeError("engine ids are ints, not %r" % (t,))
        if t < 0:
            raise ValueError("engine ids are >= 0, not %d" % t)
    ids = [int(t) for t in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("targets has duplicates: %r" % (ids,))
    return _c.TARGET_LIST, ids, False


def _partition(seq, p):
    """Splits seq into p contiguous parts whose sizes differ by at most one
    (the first len % p parts are one longer), as IPython 0.x's Map did.
    numpy arrays are sliced (views, no copy); other sequences as lists."""
    try:
        import numpy
        is_array = isinstance(seq, numpy.ndarray)
    except ImportError:
        is_array = False
    if not is_array and not isinstance(seq, list):
        seq = list(seq)
    n = len(seq)
    base, extra = divmod(n, p)
    parts, lo = [], 0
    for i in range(p):
        hi = lo + base + (1 if i < extra else 0)
        parts.append(seq[lo:hi])
        lo = hi
    return parts


def _concatenate(values):
    """Joins per-engine partitions in order: numpy arrays with
    numpy.concatenate, lists and tuples into one list; anything else is
    returned as a list of the values."""
    if not values:
        return []
    try:
        import numpy
        if all(isinstance(v, numpy.ndarray) for v in values):
            return numpy.concatenate(values)
    except ImportError:
        pass
    if all(isinstance(v, (list, tuple)) for v in values):
        out = []
        for v in values:
            out.extend(v)
        return out
    return list(values)


def _chunk_apply(f):
    return lambda chunk: [f(x) for x in chunk]


# ---------------------------------------------------------------- clients

class _Base:
    _capability = "mec"

    def __init__(self, furl_file=None, timeout=None, connect_timeout=30, shm=True):
        self._timeout = timeout
        self.block = True
        self._conn = _connect(furl_file, self._capability, connect_timeout, shm)

    @property
    def shm(self):
        """True when large values travel through shared memory: the client
        runs on the controller's host (same kernel, same uid) and neither
        shm=False nor IPMPI_SHM=0 turned it off. The TLS link still carries
        every request and the key check; see shm_note for why it is off."""
        return self._conn is not None and self._conn.shm

    @property
    def shm_path(self):
        """How large values move: 'process memory' (the controller and
        this client read each other's buffers with process_vm_readv: no
        copy here), 'memfd' (through shared memory files), or None (TLS)."""
        return None if self._conn is None else self._conn.shm_path

    @property
    def shm_note(self):
        """None while shared memory is in use, else the reason it is not."""
        return None if self._conn is None else self._conn.shm_note

    @property
    def timeout(self):
        """Default for every blocking wait, in seconds (None: forever)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value):
        self._timeout = value

    def _send(self, kind, target, parts, targets=None):
        if self._conn is None:
            raise ConnectionError("this client is closed")
        return self._conn.send(kind, target, parts, targets)

    def _finish(self, req_ids, post, block, timeout):
        pr = PendingResult(self, req_ids, post)
        if block is None:
            block = self.block
        if not block:
            return pr
        return pr.get_result(timeout=timeout)

    def _request(self, kind, parts, targets, post, block, timeout):
        target, tlist, _single = _parse_targets(targets)
        rid = self._send(kind, target, parts, tlist)
        return self._finish([rid], post, block, timeout)

    def _controller(self, kind, post, block=True, timeout=None, targets="all"):
        target, tlist, _single = _parse_targets(targets)
        rid = self._send(kind, target, [], tlist)
        return self._finish([rid], lambda replies: post(_controller_json(replies)), block, timeout)

    def get_ids(self, block=True, timeout=None):
        """The ids of the engines alive now, ascending."""
        return self._controller(_c.K_GET_IDS, list, block, timeout)

    def queue_status(self, targets="all", block=True, timeout=None):
        """[(engine id, {"id", "running", "queue"}), ...] for the target engines."""
        return self._controller(_c.K_QUEUE_STATUS, lambda js: [(d["id"], d) for d in js], block, timeout, targets)

    def close(self):
        """Closes the connection; the cluster keeps running."""
        if self._conn is not None:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        c = self._conn
        return "<%s %s:%s %s>" % (self.__class__.__name__, c.host, c.port, "closed" if c.closed else "open")


class MultiEngineClient(_Base):
    """Drives the engines directly (IPython 0.x's MultiEngineClient).

    MultiEngineClient(furl_file=None, timeout=None, connect_timeout=30):
    furl_file defaults to $IPMPI_DIR/security/ipcontroller-mec.furl;
    timeout is the default for every blocking wait (None: forever). Every
    method takes targets ('all', an engine id, or a list of ids), block
    (False: return a PendingResult) and timeout.
    """

    _capability = "mec"

    # -- code
    def execute(self, code, targets="all", block=None, timeout=None):
        """Runs code on the engines; returns a ResultList."""
        if not isinstance(code, str):
            raise TypeError("code must be a str")
        post = lambda rs: ResultList(_engine_results(rs, lambda meta, parts: meta))
        return self._request(_c.K_EXECUTE, [code.encode("utf-8")], targets, post, block, timeout)

    def run(self, filename, targets="all", block=None, timeout=None):
        """Executes the local Python file filename on the engines."""
        with open(filename, encoding="utf-8") as f:
            code = f.read()
        return self.execute(code, targets, block, timeout)

    # -- namespace
    def push(self, namespace, targets="all", block=None, timeout=None):
        """Sets the names of the dict namespace on the engines."""
        if not isinstance(namespace, dict):
            raise TypeError("push takes a dict of name -> value")
        parts = _serialize.dumps(namespace)
        return self._request(_c.K_PUSH, parts, targets, _no_value,
                             block, timeout)

    def pull(self, keys, targets="all", block=None, timeout=None):
        """Values of names on the engines: keys a str gives one value per
        engine, a list or tuple of names a list of values per engine. With
        an int target, that engine's value; else a list by engine id."""
        one = isinstance(keys, str)
        names = [keys] if one else list(keys)
        for k in names:
            if not isinstance(k, str):
                raise TypeError("names are str, not %r" % (k,))
        single = _parse_targets(targets)[2]

        def value(meta, parts):
            values = _serialize.loads(parts[1:])
            return values[0] if one else list(values)

        def post(rs):
            results = _engine_results(rs, value)
            return results[0] if single and results else results

        return self._request(_c.K_PULL, _serialize.dumps(names), targets, post, block, timeout)

    push_function = push
    pull_function = pull

    def __setitem__(self, key, value):
        self.push({key: value})

    def __getitem__(self, key):
        return self.pull(key)

    def keys(self, targets="all", block=None, timeout=None):
        """Sorted names in each engine's namespace."""
        single = _parse_targets(targets)[2]

        def post(rs):
            results = _engine_results(rs, lambda meta, parts: _serialize.loads(parts[1:]))
            return results[0] if single and results else results

        return self._request(_c.K_KEYS, [], targets, post, block, timeout)

    def reset(self, targets="all", block=None, timeout=None):
        """Clears the engines' namespaces."""
        return self._request(_c.K_RESET, [], targets, _no_value,
                             block, timeout)

    # -- partitions
    def _target_ids(self, targets, timeout):
        kind, tlist, single = _parse_targets(targets)
        if single:
            return [kind]
        if tlist is not None:
            return tlist
        ids = self.get_ids(timeout=timeout)
        if not ids:
            raise EngineError(_c.ENOENT, "no engines are alive")
        return ids

    def scatter(self, key, seq, targets="all", block=None, timeout=None):
        """Splits seq into contiguous partitions, one per target engine in
        id order, and pushes each as key."""
        ids = self._target_ids(targets, timeout)
        rids = []
        try:
            for eid, part in zip(ids, _partition(seq, len(ids))):
                rids.append(self._send(_c.K_PUSH, eid, _serialize.dumps({key: part})))
        except BaseException:
            for r in rids:
                self._conn.forget(r)
            raise
        return self._finish(rids, _no_value, block, timeout)

    def gather(self, key, targets="all", block=None, timeout=None):
        """Pulls key from the engines and joins the partitions in id order."""
        single = _parse_targets(targets)[2]

        def value(meta, parts):
            return _serialize.loads(parts[1:])[0]

        def post(rs):
            values = _engine_results(rs, value)
            return values[0] if single and values else _concatenate(values)

        return self._request(_c.K_PULL, _serialize.dumps([key]), targets, post, block, timeout)

    def map(self, f, seq, targets="all", block=None, timeout=None):
        """[f(x) for x in seq], computed in parallel: seq is scattered in
        contiguous chunks and the results concatenated in order."""
        ids = self._target_ids(targets, timeout)
        g = _chunk_apply(f)
        rids = []
        try:
            for eid, chunk in zip(ids, _partition(seq, len(ids))):
                rids.append(self._send(_c.K_APPLY, eid, _serialize.dumps((g, (chunk,), {}))))
        except BaseException:
            for r in rids:
                self._conn.forget(r)
            raise

        def post(rs):
            return _concatenate(_engine_results(rs, lambda meta, parts: _serialize.loads(parts[1:])))

        return self._finish(rids, post, block, timeout)

    # -- results and queues
    def get_result(self, i=None, targets="all", block=None, timeout=None):
        """The result of execution number i (None: the last) on each engine."""
        if i is not None and not _is_int(i):
            raise TypeError("i must be an execution number or None")
        post = lambda rs: ResultList(_engine_results(rs, lambda meta, parts: meta))
        return self._request(_c.K_GET_RESULT, _serialize.dumps(i), targets, post, block, timeout)

    def clear_queue(self, targets="all", block=True, timeout=None):
        """Drops the requests waiting in the engines' queues (they fail
        with AbortedError); returns {"cleared": n}."""
        return self._controller(_c.K_CLEAR_QUEUE, _identity, block, timeout, targets)

    def engine_info(self, targets="all", block=True, timeout=None):
        """Where each engine runs: the controller's record of it (id, host,
        pid, rank, local_rank, cpuset, bound, python). A list of dicts by
        engine id; with an int target, that engine's dict. (Before engine
        properties existed this was get_properties.)"""
        single = _parse_targets(targets)[2]

        def post(js):
            return js[0] if single and js else js

        return self._controller(_c.K_PROPERTIES, post, block, timeout, targets)

    # -- engine properties (IPython 0.10): a dict per engine, seen by user
    # code as `properties` and by the depend functions of tasks.
    def _props(self, op, arg, targets, block, timeout, returns):
        single = _parse_targets(targets)[2]

        def value(meta, parts):
            return _serialize.loads(parts[1:]) if len(parts) > 1 else None

        def post(rs):
            results = _engine_results(rs, value)
            if not returns:
                return None
            return results[0] if single and results else results

        return self._request(_c.K_PROPS, _serialize.dumps((op, arg)), targets, post, block, timeout)

    def set_properties(self, properties, targets="all", block=None, timeout=None):
        """Updates the engines' properties with the dict properties. Tasks
        whose depend refused these engines are reconsidered."""
        if not isinstance(properties, dict):
            raise TypeError("set_properties takes a dict, not %r" % (type(properties).__name__,))
        return self._props("set", dict(properties), targets, block, timeout, False)

    def get_properties(self, keys=None, targets="all", block=None, timeout=None):
        """The engines' properties: a list of dicts by engine id (an int
        target: that engine's dict); keys (a name or a list of names)
        restricts each dict to those names."""
        return self._props("get", _prop_keys(keys, True), targets, block, timeout, True)

    def has_properties(self, keys, targets="all", block=None, timeout=None):
        """For each engine, a list of bools: whether it has each key."""
        return self._props("has", _prop_keys(keys, False), targets, block, timeout, True)

    def del_properties(self, keys, targets="all", block=None, timeout=None):
        """Deletes keys from the engines' properties (a missing key is the
        engine's KeyError)."""
        return self._props("del", _prop_keys(keys, False), targets, block, timeout, False)

    def clear_properties(self, targets="all", block=None, timeout=None):
        """Empties the engines' properties."""
        return self._props("clear", None, targets, block, timeout, False)

    # -- lifetime
    def kill(self, controller=False, targets="all", block=True, timeout=None):
        """Stops the target engines; controller=True also shuts the whole
        cluster down."""
        result = self._request(_c.K_KILL, [], targets, _no_value,
                               True if controller else block, timeout)
        if controller:
            return self.shutdown(timeout=timeout)
        return result

    def shutdown(self, block=True, timeout=None):
        """Stops the whole cluster: controller and every engine."""
        return self._controller(_c.K_SHUTDOWN, _identity, block, timeout)


class TaskClient(_Base):
    """Load-balanced tasks (IPython 0.10's TaskClient), with the task
    capability (ipcontroller-tc.furl).

    TaskClient(furl_file=None, timeout=None, connect_timeout=30):
    furl_file defaults to $IPMPI_DIR/security/ipcontroller-tc.furl;
    timeout is the default for every wait (None: forever); a wait that
    runs out raises TaskTimeoutError (a TimeoutError) and loses nothing.

        tid = tc.run(StringTask("c = a * b", push=dict(a=6, b=7), pull="c"))
        tc.get_task_result(tid, block=True).ns.c        # 42
        tc.map(lambda x: x ** 10, range(32))           # ordered, load balanced
        tc.barrier(tids); tc.abort(tid); tc.clear(); tc.spin(); tc.queue_status()

    Results: a StringTask gives a TaskResult (its failure inside); a
    MapTask gives the function's value, or get_task_result raises the
    exception it raised (rebuilt as its own type). Results stay in the
    controller until clear() (or until its task memory budget evicts them:
    EvictedError), so another TaskClient can fetch them by id; this client
    also keeps the results it fetched until clear().

    Task ids are reserved in blocks (TASK_RESERVE: 64 ids, doubling up to
    4096 while the client keeps submitting; the next block is asked for
    when half of the current one is used), so only the first run() waits
    for a round trip. A client may be used from several threads.
    """

    _capability = "tc"

    def __init__(self, furl_file=None, timeout=None, connect_timeout=30, shm=True):
        super().__init__(furl_file, timeout, connect_timeout, shm)
        self._id_lock = threading.Lock()
        self._next = 0              # the reserved block [_next, _end)
        self._end = 0
        self._count = 0             # the size of that block
        self._block_size = _RESERVE_FIRST   # the size of the next
        self._reserve_rid = None    # TASK_RESERVE in flight
        self._sent = {}             # taskid -> (req_id, kind, submit time): submitted here, not yet received
        self._done = {}             # taskid -> (ok, value): received, kept until clear()
        self._fncache = _task.FunctionCache()

    # -- task ids
    def _prefetch(self):
        # Caller holds _id_lock.
        if self._reserve_rid is None:
            self._reserve_rid = self._send(_c.K_TASK_RESERVE, _c.TARGET_ALL,
                                           [_U32.pack(self._block_size)])

    def _refill(self):
        # Caller holds _id_lock; the block is used up.
        self._prefetch()
        rid = self._reserve_rid
        try:
            replies = self._conn.recv(rid, self._timeout)
        except TimeoutError:
            raise TaskTimeoutError("no task ids from the controller within %s s (TASK_RESERVE)"
                                   % self._timeout) from None
        self._reserve_rid = None
        js = _controller_json(replies)
        first, count = int(js["first"]), int(js["count"])
        if count < 1:
            raise EngineError(_c.EPROTO, "TASK_RESERVE gave no ids: %r" % (js,))
        self._next, self._end, self._count = first, first + count, count
        if self._block_size < _RESERVE_MAX:
            self._block_size = min(_RESERVE_MAX, self._block_size * 2)

    def _take_id(self):
        with self._id_lock:
            if self._next >= self._end:
                self._refill()
            tid = self._next
            self._next = tid + 1
            if self._reserve_rid is None and (self._end - self._next) * 2 <= self._count:
                self._prefetch()
            return tid

    # -- tasks
    def run(self, task, block=False, timeout=None):
        """Submits task (a StringTask or MapTask); returns its task id, or
        with block=True its result (get_task_result(tid, block=True))."""
        parts = _task.encode(task, 0, self._fncache)
        kind = task._kind
        if task.recovery_task is not None:
            for t in _task.chain(task):
                if t._kind != kind:
                    kind = "?" + kind   # the result's kind comes from the reply's meta
                    break
        tid = self._take_id()
        parts[0] = _U64.pack(tid) + parts[0][8:]
        rid = self._send(_c.K_TASK_SUBMIT, _c.TARGET_ALL, parts)
        self._sent[tid] = (rid, kind, time.time())
        task.taskid = tid
        if block:
            return self.get_task_result(tid, block=True, timeout=timeout)
        return tid

    def get_task_result(self, taskid, block=False, timeout=None):
        """The result of task taskid: a TaskResult (StringTask) or the
        value (MapTask; its failure is raised). block=False: None while the
        task has not finished. IndexError for an id the controller does not
        know, EvictedError for a result it dropped."""
        ok, value = self._result(taskid, block, timeout, True)
        if ok:
            return value
        raise value.with_traceback(None)

    def _result(self, taskid, block, timeout, keep):
        """(ok, value) of a task (ok False: value is the exception); (True,
        None) when not finished and not block. keep: remember it here."""
        if not _is_int(taskid):
            raise TypeError("an integer task id expected: %r" % (taskid,))
        r = self._done.get(taskid)
        if r is not None:
            if not keep:
                self._done.pop(taskid, None)
            return r
        if timeout is None:
            timeout = self._timeout
        conn = self._conn
        if conn is None:
            raise ConnectionError("this client is closed")
        entry = self._sent.get(taskid)
        if entry is not None:
            if not block and not conn.ready(entry[0]):
                return (True, None)
            entry = self._sent.pop(taskid, None)
        if entry is not None:
            try:
                replies = conn.recv(entry[0], timeout)
            except TimeoutError:
                self._sent[taskid] = entry
                raise TaskTimeoutError("task %d did not finish within %s s" % (taskid, timeout), [taskid]) from None
            except BaseException:
                self._sent[taskid] = entry
                raise
            r = self._build(taskid, entry[1], entry[2], replies[0])
        else:
            # Not submitted here (or being received by another thread): ask the controller.
            rid = self._send(_c.K_TASK_RESULT, _c.TARGET_ALL, [_RESULT_REQ.pack(taskid, 1 if block else 0)])
            try:
                replies = conn.recv(rid, timeout)
            except TimeoutError:
                conn.forget(rid)
                raise TaskTimeoutError("task %d did not finish within %s s" % (taskid, timeout), [taskid]) from None
            except BaseException:
                conn.forget(rid)
                raise
            r = self._done.get(taskid)   # another thread got it meanwhile
            if r is not None:
                return r
            target, status, parts = replies[0]
            if status == _c.EAGAIN:
                return (True, None)
            if status == _c.ENOENT:
                raise IndexError("task ID not registered: %r" % (taskid,))
            if status == _c.EEVICTED:
                raise EvictedError("the result of task %d was evicted: the controller's task memory "
                                   "budget made room (%s)" % (taskid, _message(parts)), taskid)
            if status in (_c.EACCES, _c.EKIND, _c.EPROTO, _c.ESHUTDOWN):
                raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))
            r = self._build(taskid, None, None, replies[0])
        if keep:
            self._done[taskid] = r
        return r

    def _build(self, taskid, kind, submitted, reply):
        """(ok, value) from a TASK_SUBMIT / TASK_RESULT reply."""
        target, status, parts = reply
        if status == 0 and kind == "map":   # the fast path: no meta needed
            return (True, _serialize.loads(parts[1:]) if len(parts) > 1 else None)
        eid = target if target >= 0 else None
        meta = None
        if status in (0, _c.EREMOTE) and parts:
            meta = _serialize.loads(parts[:1])
            if not isinstance(meta, dict):
                meta = None
        if kind is None or kind[0] == "?":
            kind = _task_kind(meta) or (kind[1:] if kind else "string")
        if meta is not None:
            eid = meta.get("id", eid)
        if status == 0:
            value = _serialize.loads(parts[1:]) if len(parts) > 1 else None
            if kind == "map":
                return (True, value)
            failure = None
        elif status == _c.EREMOTE:
            failure = _rebuild_exception(meta, eid)
        else:
            failure = _ERROR_CLASSES.get(status, EngineError)(status, _message(parts), eid)
        if failure is not None:
            try:
                failure.taskid = taskid
            except Exception:
                pass
            if kind == "map":
                return (False, failure)
        now = time.time()
        started = completed = None
        if meta is not None:
            started, completed = meta.get("started"), meta.get("completed")
        if started is None:
            started = submitted if submitted is not None else now
        if completed is None:
            completed = now
        sub, comp, dur = _task.timing(started, completed)
        if failure is None and not isinstance(value, dict):
            value = {} if value is None else {"result": value}
        return (True, TaskResult(None if failure else value, eid, failure, taskid, sub, comp, dur))

    def abort(self, taskid, timeout=None):
        """Aborts a task: a scheduled one never runs, a pending one (on an
        engine) runs to its end and its result is discarded. Its result
        becomes an AbortedError (a StringTask's TaskResult.failure; a
        MapTask's get_task_result raises it). IndexError if the task has
        finished, was aborted already, or is unknown."""
        if not _is_int(taskid):
            raise TypeError("an integer task id expected: %r" % (taskid,))
        status, parts = self._task_request(_c.K_TASK_ABORT, [_U64.pack(taskid)], timeout, "abort")
        if status == 0:
            return None
        if status == _c.ENOENT:
            raise IndexError("task ID not registered: %r" % (taskid,))
        if status == _c.EINVAL:
            raise IndexError("task %d: %s" % (taskid, _message(parts) or "already completed or aborted"))
        raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))

    def barrier(self, taskids, timeout=None):
        """Waits until every task of taskids (an id or a list of ids) has
        finished. IndexError naming the ids the controller does not know
        (never submitted, cleared or evicted)."""
        ids = _task_ids(taskids)
        conn = self._conn
        if conn is None:
            raise ConnectionError("this client is closed")
        wait = []
        for t in ids:
            if t in self._done:
                continue
            e = self._sent.get(t)
            if e is not None and conn.ready(e[0]):
                continue
            wait.append(t)
        if not wait:
            return None
        if timeout is None:
            timeout = self._timeout
        rid = self._send(_c.K_TASK_BARRIER, _c.TARGET_ALL, [struct.pack("<%dQ" % len(wait), *wait)])
        try:
            replies = conn.recv(rid, timeout)
        except TimeoutError:
            conn.forget(rid)
            raise TaskTimeoutError("barrier: tasks not finished within %s s" % timeout, wait) from None
        except BaseException:
            conn.forget(rid)
            raise
        _target, status, parts = replies[0]
        if status == 0:
            return None
        if status in (_c.ENOENT, _c.EEVICTED):
            raise IndexError("barrier: %s" % (_message(parts) or "task IDs not registered: %r" % (wait,)))
        raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))

    def spin(self, timeout=None):
        """Makes the scheduler try again every task a depend refused."""
        status, parts = self._task_request(_c.K_TASK_SPIN, [], timeout, "spin")
        if status != 0:
            raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))
        return None

    def queue_status(self, verbose=False, timeout=None):
        """{'scheduled', 'pending', 'succeeded', 'failed'}: counts, or with
        verbose lists of task ids (aborted tasks count as failed)."""
        status, parts = self._task_request(_c.K_TASK_STATUS, [bytes([1 if verbose else 0])], timeout,
                                           "queue_status")
        if status != 0:
            raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))
        return json.loads(_message(parts))

    def clear(self, taskids=None, timeout=None):
        """Drops finished tasks' results from the controller (and from this
        client): taskids None means every finished task, else an id or a
        list of ids. Returns how many were cleared; KeyError names the ids
        that were not (unknown or not finished), as IPython 0.10 did."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("this client is closed")
        if taskids is None:
            # Tasks finished before the request are cleared by it; forget
            # their replies here too.
            ready = [(t, e[0]) for t, e in list(self._sent.items()) if conn.ready(e[0])]
            status, parts = self._task_request(_c.K_TASK_CLEAR, [], timeout, "clear")
            if status != 0:
                raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))
            self._done.clear()
            for t, rid in ready:
                if self._sent.pop(t, None) is not None:
                    conn.forget(rid)
            return int(json.loads(_message(parts)).get("cleared", 0))
        ids = _task_ids(taskids)
        if not ids:
            return 0
        status, parts = self._task_request(_c.K_TASK_CLEAR, [struct.pack("<%dQ" % len(ids), *ids)],
                                           timeout, "clear")
        if status != 0:
            raise _ERROR_CLASSES.get(status, EngineError)(status, _message(parts))
        js = json.loads(_message(parts))
        unknown = set(int(u) for u in js.get("unknown", ()))
        for t in ids:
            if t in unknown:
                continue
            self._done.pop(t, None)
            e = self._sent.pop(t, None)
            if e is not None:
                conn.forget(e[0])
        cleared = int(js.get("cleared", len(ids) - len(unknown)))
        if unknown:
            raise KeyError("Cleared %i results, but no tasks found for ids: %s"
                           % (cleared, ", ".join(str(t) for t in ids if t in unknown)))
        return cleared

    def _task_request(self, kind, parts, timeout, what):
        """Sends one TASK_* controller request; (status, parts) of its reply."""
        if timeout is None:
            timeout = self._timeout
        rid = self._send(kind, _c.TARGET_ALL, parts)
        try:
            replies = self._conn.recv(rid, timeout)
        except TimeoutError:
            self._conn.forget(rid)
            raise TaskTimeoutError("%s: no answer from the controller within %s s" % (what, timeout)) from None
        except BaseException:
            self._conn.forget(rid)
            raise
        _target, status, parts = replies[0]
        return status, parts

    # -- map and parallel
    def map(self, func, *sequences, timeout=None):
        """[func(*items) for items in zip(*sequences)], load balanced over
        the engines, in order (as the builtin map). Long sequences go in
        chunks, about 8 tasks per engine."""
        return self.mapper(timeout=timeout).map(func, *sequences)

    def mapper(self, clear_before=False, clear_after=False, retries=0, recovery_task=None,
               depend=None, block=True, timeout=None):
        """A TaskMapper: .map(func, *sequences) with these task options;
        block=False makes map return the task ids, one per item."""
        return _task.TaskMapper(self, clear_before=clear_before, clear_after=clear_after,
                                retries=retries, recovery_task=recovery_task, depend=depend,
                                block=block, timeout=timeout)

    def parallel(self, clear_before=False, clear_after=False, retries=0, recovery_task=None,
                 depend=None, block=True, timeout=None):
        """A decorator: @tc.parallel() def f(x): ...; f(seq) maps f over
        seq with these task options (see mapper)."""
        return _task.ParallelFunction(self.mapper(clear_before, clear_after, retries, recovery_task,
                                                  depend, block, timeout))

    def _map(self, mapper, func, sequences):
        if len(sequences) == 1:
            items, star = list(sequences[0]), False
        else:
            items, star = list(zip(*sequences)), True
        n = len(items)
        opts = dict(clear_before=mapper.clear_before, clear_after=mapper.clear_after,
                    retries=mapper.retries, recovery_task=mapper.recovery_task, depend=mapper.depend)
        if not mapper.block:
            return [self.run(MapTask(func, args=a if star else (a,), **opts)) for a in items]
        if n == 0:
            return []
        timeout = self._timeout if mapper.timeout is None else mapper.timeout
        deadline = None if timeout is None else _now() + timeout
        nchunks = n
        if mapper.recovery_task is None:
            nengines = len(self.get_ids(timeout=timeout)) or 1
            nchunks = min(n, nengines * _CHUNKS_PER_ENGINE)
        tids = []
        try:
            if nchunks == n:
                for a in items:
                    tids.append(self.run(MapTask(func, args=a if star else (a,), **opts)))
            else:
                g = _task._Chunk(func, star)
                for lo, hi in _task.split(n, nchunks):
                    tids.append(self.run(MapTask(g, args=(items[lo:hi],), **opts)))
            out = []
            for i, tid in enumerate(tids):
                left = None if deadline is None else max(0.0, deadline - _now())
                try:
                    ok, value = self._result(tid, True, left, False)
                except TaskTimeoutError:
                    raise TaskTimeoutError("map: %d of %d tasks not finished within %s s"
                                           % (len(tids) - i, len(tids), timeout), tids[i:]) from None
                if not ok:
                    raise value.with_traceback(None)
                if nchunks == n:
                    out.append(value)
                else:
                    out.extend(value)
            return out
        finally:
            # What was not collected stays in the controller (the ids are in
            # a TaskTimeoutError); drop it here.
            for tid in tids:
                e = self._sent.pop(tid, None)
                if e is not None:
                    self._conn.forget(e[0])


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RESULT_REQ = struct.Struct("<QB")
_RESERVE_FIRST = 64
_RESERVE_MAX = 4096
_CHUNKS_PER_ENGINE = 8


def _task_ids(taskids):
    if _is_int(taskids):
        return [int(taskids)]
    if isinstance(taskids, (str, bytes)) or not hasattr(taskids, "__iter__"):
        raise TypeError("task ids: an int or a list of ints, not %r" % (taskids,))
    ids = list(taskids)
    for t in ids:
        if not _is_int(t):
            raise TypeError("an integer task id expected: %r" % (t,))
        if t < 0:
            raise IndexError("task ID not registered: %r" % (t,))
    return [int(t) for t in ids]


def _task_kind(meta):
    """"string" or "map" from an engine's task meta (None if it does not say)."""
    if not meta:
        return None
    k = meta.get("task")
    if k in ("string", "map"):
        return k
    return "string" if meta.get("input") else "map"


def _prop_keys(keys, none_ok):
    if keys is None and none_ok:
        return None
    if isinstance(keys, str):
        return [keys]
    if keys is None or not hasattr(keys, "__iter__"):
        raise TypeError("keys must be a name or a list of names")
    return list(keys)


def _none(meta, parts):
    return None


def _no_value(replies):
    _engine_results(replies, _none)
    return None


def _identity(x):
    return x
