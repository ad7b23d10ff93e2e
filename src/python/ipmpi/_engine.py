"""The Python half of an ipmpi engine (ranks 1..N of the job).

The engine's C side (src/engine/) receives each request frame from the
controller over MPI into one bytearray per part and calls
``Engine.handle(kind, parts)``; whatever that returns is sent back part by
part without being joined (doc/protocol.md sections 2 and 4).

An Engine holds one persistent namespace: a module object named
``__main__``, installed as ``sys.modules['__main__']`` so that pickles that
refer to ``__main__`` (functions and classes defined interactively on the
client) resolve on the engine. Exceptions raised by user code are results,
never crashes: ``handle`` never raises, and an engine survives SyntaxError,
SystemExit, KeyboardInterrupt and MemoryError alike.

Threads: ``handle`` is called by the engine's main thread only, with the
GIL held; user code may start threads of its own, which run while the C
side waits for the next request with the GIL released.
"""
import ast
import builtins
import collections
import io
import linecache
import pickle
import sys
import traceback
import types

from ipmpi import _serialize

# Request kinds and status codes: the values of include/ipmpi/protocol.h and
# include/ipmpi/errors.h, which are part of the wire protocol.
K_EXECUTE = 2
K_PUSH = 3
K_PULL = 4
K_APPLY = 5
K_RESET = 6
K_KEYS = 7
K_KILL = 8
K_GET_RESULT = 11

OK = 0
EREMOTE = -6

KIND_NAMES = {
    K_EXECUTE: "execute",
    K_PUSH: "push",
    K_PULL: "pull",
    K_APPLY: "apply",
    K_RESET: "reset",
    K_KEYS: "keys",
    K_KILL: "kill",
    K_GET_RESULT: "get_result",
}

# How many executions GET_RESULT can still reach (and how many submitted
# sources stay in linecache for tracebacks).
HISTORY_LEN = 1000

# Compiled inputs kept for re-execution (a client that runs the same code
# again skips parsing and compiling: ~7 of the ~11 us an EXECUTE costs), and
# the longest source worth keeping.
CODE_CACHE_LEN = 256
CODE_CACHE_MAX_SRC = 64 * 1024

# Largest number of parts a frame may have (codec default; the C side sets
# Engine.max_parts from its limits). A value with more out-of-band buffers
# than fit is pickled in band instead, so the reply still goes out.
MAX_PARTS = 4096

_THIS_FILE = __file__

# Names a RESET keeps: the module's own attributes and the communicator.
_KEEP_ON_RESET = ("__name__", "__builtins__", "__doc__", "__package__", "__loader__",
                  "__spec__", "comm")


def _user_traceback(tb):
    """Skips the leading frames that belong to this file (the engine's own
    dispatch), so a remote traceback shows the user's frames only."""
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return tb


def _renamed(code, filename):
    """code (and the code objects nested in it: functions, classes,
    comprehensions) as if compiled under filename, so tracebacks of a cached
    input name the execution that ran it."""
    consts = code.co_consts
    if any(type(c) is types.CodeType for c in consts):
        consts = tuple(_renamed(c, filename) if type(c) is types.CodeType else c for c in consts)
        return code.replace(co_filename=filename, co_consts=consts)
    return code.replace(co_filename=filename)


def _safe_str(obj):
    try:
        return str(obj)
    except BaseException:  # a user __str__ may raise anything
        return "<unprintable %s object>" % type(obj).__name__


def _format_error(exc):
    """(etype, evalue, traceback) strings for an exception from user code."""
    etype = type(exc).__name__
    evalue = _safe_str(exc)
    try:
        tb = _user_traceback(exc.__traceback__)
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # formatting itself failed (MemoryError, odd objects)
        text = "%s: %s\n" % (etype, evalue)
    return etype, evalue, text


class Engine:
    """One engine's state: namespace, execution counter, result history."""

    def __init__(self, eid, nengines, props, comm_fint=None):
        self.id = eid
        self.nengines = nengines
        self.props = props
        self.max_parts = MAX_PARTS
        self.module = types.ModuleType("__main__")
        self.ns = self.module.__dict__
        self.ns["__builtins__"] = builtins
        sys.modules["__main__"] = self.module
        self.comm = None
        if comm_fint is not None:
            # Imported only in --mpi=mpi4py mode: importing mpi4py is not free.
            from mpi4py import MPI

            self.comm = MPI.Intracomm.f2py(comm_fint)
            self.ns["comm"] = self.comm
        self.execution_count = 0
        self.history = collections.OrderedDict()  # number -> (status, meta)
        self._input_names = collections.deque()
        self._code_cache = collections.OrderedDict()  # source -> (body, last) code objects

    # ---- the entry point called by the C side ----

    def handle(self, kind, parts):
        """Runs one request. Returns (status, reply_parts, exit_after).

        Never raises: every exception, from user code or from decoding the
        request, becomes a remote error with status EREMOTE.
        """
        try:
            return self._handle(kind, parts)
        except BaseException as exc:
            return self.failure(kind, exc)

    def failure(self, kind, exc):
        """The reply for a request that failed before it could run (also used
        by the C side when it cannot even allocate the request's buffers)."""
        try:
            meta = self._meta(kind, None, "", "", "")
            meta["etype"], meta["evalue"], meta["traceback"] = _format_error(exc)
            return EREMOTE, [pickle.dumps(meta, protocol=5)], False
        except BaseException:
            meta = {"id": self.id, "kind": KIND_NAMES.get(kind, str(kind)), "number": None,
                    "input": "", "stdout": "", "stderr": "", "etype": "MemoryError",
                    "evalue": "", "traceback": "MemoryError\n"}
            return EREMOTE, [pickle.dumps(meta, protocol=5)], False

    # ---- dispatch ----

    def _meta(self, kind, number, code, out, err):
        return {"id": self.id, "kind": KIND_NAMES.get(kind, str(kind)), "number": number,
                "input": code, "stdout": out, "stderr": err}

    def _handle(self, kind, parts):
        if kind == K_KILL:
            meta = self._meta(kind, None, "", "", "")
            return OK, [pickle.dumps(meta, protocol=5)], True
        if kind == K_GET_RESULT:
            return self._get_result(kind, parts)

        number = None
        code = ""
        if kind == K_EXECUTE:
            self.execution_count += 1
            number = self.execution_count

        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdout, sys.stderr
        status, extra, exc = OK, [], None
        sys.stdout, sys.stderr = out, err
        try:
            if kind == K_EXECUTE:
                code = str(parts[0], "utf-8") if parts else ""
                self._execute(code, number)
            elif kind == K_PUSH:
                self._push(parts)
            elif kind == K_PULL:
                extra = self._pull(parts)
            elif kind == K_APPLY:
                extra = self._apply(parts)
            elif kind == K_RESET:
                self._reset()
            elif kind == K_KEYS:
                names = sorted(k for k in self.ns if not k.startswith("__"))
                extra = [pickle.dumps(names, protocol=5)]
            else:
                raise ValueError("unknown request kind %d" % kind)
        except BaseException as e:  # user code: SystemExit, KeyboardInterrupt too
            status, extra, exc = EREMOTE, [], e
        finally:
            sys.stdout, sys.stderr = saved

        meta = self._meta(kind, number, code, out.getvalue(), err.getvalue())
        if exc is not None:
            meta["etype"], meta["evalue"], meta["traceback"] = _format_error(exc)
            exc = None  # drop the frames (and the user objects they hold) now
        if kind == K_EXECUTE:
            self._remember(number, status, meta)
        return status, [pickle.dumps(meta, protocol=5)] + extra, False

    # ---- request kinds ----

    def _input_name(self, number):
        """The file name input number is compiled and cached under."""
        return "<ipmpi-input-%d>" % number

    def _execute(self, code, number):
        # The source goes into linecache so tracebacks show the user's lines;
        # only the last HISTORY_LEN inputs are kept there.
        name = self._input_name(number)
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        self._input_names.append(name)
        while len(self._input_names) > HISTORY_LEN:
            linecache.cache.pop(self._input_names.popleft(), None)

        cached = self._code_cache.get(code)
        if cached is not None:
            self._code_cache.move_to_end(code)
            body, last = cached
            body = body and _renamed(body, name)
            last = last and _renamed(last, name)
        else:
            body, last = self._compile(code, name)
        if body is not None:
            exec(body, self.ns)
        if last is not None:
            exec(last, self.ns)

    def _compile(self, code, name):
        """(body, last): the code objects of the input without and of its
        final expression (None when absent); cached unless compiling wrote
        anything (a SyntaxWarning must show each time, as it did)."""
        err = sys.stderr
        mark = err.tell() if isinstance(err, io.StringIO) else None
        tree = ast.parse(code, filename=name, mode="exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            # As at the interactive prompt, the value of a final expression
            # goes through sys.displayhook (into the captured stdout).
            last = compile(ast.Interactive(body=[tree.body.pop()]), name, "single", dont_inherit=True)
        body = compile(tree, name, "exec", dont_inherit=True) if tree.body else None
        if mark is not None and sys.stderr is err and err.tell() == mark and len(code) <= CODE_CACHE_MAX_SRC:
            self._code_cache[code] = (body, last)
            while len(self._code_cache) > CODE_CACHE_LEN:
                self._code_cache.popitem(last=False)
        return body, last

    def _remember(self, number, status, meta):
        self.history[number] = (status, meta)
        while len(self.history) > HISTORY_LEN:
            self.history.popitem(last=False)

    def _rebind(self, f):
        """A function defined in the client's __main__ gets the engine
        namespace as its globals, so it sees (and sets) engine variables.
        Globals that cloudpickle captured and the engine lacks are added,
        so helpers the function calls still resolve."""
        if not isinstance(f, types.FunctionType) or f.__module__ != "__main__":
            return f
        if f.__globals__ is self.ns:
            return f
        for k, v in f.__globals__.items():
            if not k.startswith("__"):
                self.ns.setdefault(k, v)
        g = types.FunctionType(f.__code__, self.ns, f.__name__, f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        g.__qualname__ = f.__qualname__
        g.__doc__ = f.__doc__
        g.__annotations__ = f.__annotations__
        g.__dict__.update(f.__dict__)
        g.__module__ = "__main__"
        return g

    def _push(self, parts):
        values = _serialize.loads(parts)
        if not isinstance(values, dict):
            raise TypeError("push expects a dict of name -> value, got %s" % type(values).__name__)
        for k, v in values.items():
            if not isinstance(k, str):
                raise TypeError("push: names must be str, got %r" % (k,))
        for k, v in values.items():
            self.ns[k] = self._rebind(v)

    def _dump(self, obj):
        """Parts for a reply value; pickling errors propagate (remote error)."""
        parts = _serialize.dumps(obj)
        if len(parts) + 1 > self.max_parts:
            # Too many out-of-band buffers for one frame: keep them in band.
            import cloudpickle

            parts = [cloudpickle.dumps(obj, protocol=5)]
        return parts

    def _pull(self, parts):
        names = _serialize.loads(parts)
        if isinstance(names, str):
            names = [names]
        values = []
        for name in names:
            if name not in self.ns:
                raise NameError("name %r is not defined" % (name,))
            values.append(self.ns[name])
        return self._dump(values)

    def _apply(self, parts):
        f, args, kwargs = _serialize.loads(parts)
        f = self._rebind(f)
        result = f(*args, **(kwargs or {}))
        return self._dump(result)

    def _reset(self):
        for k in list(self.ns):
            if k not in _KEEP_ON_RESET:
                del self.ns[k]
        if self.comm is not None:
            self.ns["comm"] = self.comm

    def _get_result(self, kind, parts):
        number = _serialize.loads(parts) if parts else None
        if number is None:
            if not self.history:
                raise IndexError("no execution has run on engine %d yet" % self.id)
            number = next(reversed(self.history))
        if not isinstance(number, int) or number not in self.history:
            raise IndexError("engine %d has no result for execution %r (kept: the last %d)"
                             % (self.id, number, HISTORY_LEN))
        status, meta = self.history[number]
        return status, [pickle.dumps(meta, protocol=5)], False
