"""The client link: furl files, the TLS connection (ipmpi._ipmpi) and the
base class both clients share.
"""
import numbers
import os

from . import _ipmpi as _c
from .results import PendingResult, _controller_json


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


def _sized(seq, what):
    """seq as something that can be partitioned: lists, tuples, str, bytes
    and numpy arrays as they are (sliced), any other sized sequence (a
    range, say) as a list. An iterable without a length is refused, as
    IPython 0.10 refused it."""
    try:
        import numpy
        if isinstance(seq, numpy.ndarray):
            return seq
    except ImportError:
        pass
    if isinstance(seq, (list, tuple, str, bytes)):
        return seq
    if not hasattr(seq, "__len__") or not hasattr(seq, "__getitem__"):
        raise TypeError("%s needs a sequence with a length (a list, tuple, range or array), not %s: "
                        "make it a list first" % (what, type(seq).__name__))
    return list(seq)


def _partition(seq, p, what="scatter"):
    """Splits seq into p contiguous parts whose sizes differ by at most one
    (the first len % p parts are one longer), as IPython 0.10's Map did.
    numpy arrays are sliced (views, no copy), lists, tuples and strings
    too; other sequences become lists first."""
    seq = _sized(seq, what)
    n = len(seq)
    base, extra = divmod(n, p)
    parts, lo = [], 0
    for i in range(p):
        hi = lo + base + (1 if i < extra else 0)
        parts.append(seq[lo:hi])
        lo = hi
    return parts


def _concatenate(values):
    """Joins per-engine partitions in order (IPython 0.10's
    joinPartitions): numpy arrays with numpy.concatenate, lists and tuples
    into one list; anything else is returned as the list of the values."""
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


def _map_chunk(f, chunk, star):
    """Runs on an engine (APPLY): [f(*a) or f(a) for a in chunk]. A
    function defined interactively on the client runs with the engine's
    namespace as its globals, as code pushed with push_function does; a
    str names a function there (raw_map's string form). Uses no module
    globals, so it travels by value and adds no names to the namespace."""
    main = __import__("sys").modules["__main__"]
    ns = main.__dict__
    if isinstance(f, str):
        f = eval(f, ns)
    elif type(f) is type(lambda: None) and getattr(f, "__module__", None) == "__main__" \
            and f.__globals__ is not ns:
        for k, v in f.__globals__.items():
            if k not in ns and not k.startswith("__"):
                ns[k] = v
        g = type(f)(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        f = g
    if star:
        return [f(*a) for a in chunk]
    return [f(a) for a in chunk]


# Pickled by value (cloudpickle does so for __main__'s functions): the
# engines need not import ipmpi.client.
_map_chunk.__module__ = "__main__"


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
