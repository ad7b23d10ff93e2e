"""Errors of the client API: remote exceptions (rebuilt as their own type
where possible), controller errors, CompositeError, task errors.
"""
import builtins
import pickle

from . import _ipmpi as _c


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
    """One or more engines failed one request (IPython 0.10's CompositeError).

    Raised when a request that ran on several engines failed on any of
    them. message: "one or more exceptions from call to method: <method>";
    elist: one (type, value, traceback) triple per failure, ordered as the
    targets, whose value is the remote exception rebuilt as its own type
    (a ZeroDivisionError stays a ZeroDivisionError; what cannot be rebuilt
    is a RemoteError; an engine that died is a DeadEngineError), with
    engine_id and remote_traceback attributes. raise_exception(i) raises
    the i-th of them, print_tracebacks() prints their remote tracebacks.
    Also: errors, the RemoteError/EngineError objects (RemoteError keeps
    etype, evalue, traceback and meta); results, the successful results of
    the same request.
    """

    #: How many failures str() lists (None: all; ipyparallel's default is 4).
    tb_limit = None

    def __init__(self, message, elist, errors=None, results=None, method=None):
        super().__init__(message, elist)
        self.message = message
        self.elist = list(elist)
        self.errors = list(errors) if errors is not None else [ev for _et, ev, _tb in self.elist]
        self.results = results if results is not None else []
        self.method = method

    def _get_engine_str(self, ev):
        eid = getattr(ev, "engine_id", None)
        if eid is None:
            return "[Engine Exception]"
        return "[%s:%s]: " % (eid, self.method or "?")

    def _get_traceback(self, ev):
        tb = getattr(ev, "remote_traceback", None) or getattr(ev, "traceback", None)
        if not isinstance(tb, str) or not tb:
            if isinstance(ev, EngineError):
                return str(ev)
            return "No traceback available"
        return tb.rstrip("\n")

    def __str__(self):
        s = str(self.message)
        limit = self.tb_limit
        shown = self.elist if limit is None else self.elist[:limit]
        for et, ev, _tb in shown:
            if isinstance(ev, RemoteError):
                name, value = ev.etype, ev.evalue
            else:
                name, value = et.__name__, _safe_str(ev)
            s += "\n" + self._get_engine_str(ev) + str(name) + ": " + str(value)
        if len(shown) < len(self.elist):
            s += "\n.... %d more exceptions ..." % (len(self.elist) - len(shown))
        return s

    def print_tracebacks(self, excid=None):
        """Prints the remote traceback of every failure (or of failure excid)."""
        if excid is None:
            for _et, ev, _tb in self.elist:
                print(self._get_engine_str(ev))
                print(self._get_traceback(ev))
                print()
            return
        try:
            _et, ev, _tb = self.elist[excid]
        except (IndexError, TypeError):
            raise IndexError("an exception with index %r does not exist" % (excid,)) from None
        print(self._get_engine_str(ev))
        print(self._get_traceback(ev))

    def print_traceback(self, excid=None):
        """print_tracebacks(excid) (ipyparallel's name)."""
        return self.print_tracebacks(excid)

    def raise_exception(self, excid=0):
        """Raises failure excid (the first by default) as its original type:
        `except ZeroDivisionError` catches a remote 1/0."""
        try:
            _et, ev, tb = self.elist[excid]
        except (IndexError, TypeError):
            raise IndexError("an exception with index %r does not exist" % (excid,)) from None
        raise ev.with_traceback(tb)


def _safe_str(obj):
    try:
        return str(obj)
    except Exception:
        return "<unprintable %s object>" % type(obj).__name__


class ResultNotCompleted(Exception):
    """A result that is not complete yet (IPython 0.10's name)."""


class InvalidDeferredID(Exception):
    """The result of a PendingResult was dropped by flush() before it was
    retrieved (IPython 0.10's name)."""


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
