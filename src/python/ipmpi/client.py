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
import json
import numbers
import os
import time

from . import _serialize
from . import _ipmpi as _c

__all__ = [
    "MultiEngineClient", "TaskClient", "PendingResult", "ResultList",
    "RemoteError", "CompositeError", "EngineError", "DeadEngineError",
    "AbortedError", "ResultNotCompleted", "default_furl_file",
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


_ERROR_CLASSES = {_c.EDEAD: DeadEngineError, _c.EABORTED: AbortedError}


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

    def get_properties(self, targets="all", block=True, timeout=None):
        """Each engine's properties (host, pid, rank, cpuset, binding...)."""
        single = _parse_targets(targets)[2]

        def post(js):
            return js[0] if single and js else js

        return self._controller(_c.K_PROPERTIES, post, block, timeout, targets)

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
    """The task capability (ipcontroller-tc.furl). The task scheduler is a
    later step; this client offers what the controller answers today:
    get_ids() and queue_status()."""

    _capability = "tc"


def _none(meta, parts):
    return None


def _no_value(replies):
    _engine_results(replies, _none)
    return None


def _identity(x):
    return x
