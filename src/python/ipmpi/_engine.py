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

Engine properties (doc/protocol.md section 6) are a per-engine dict that
survives RESET, seen by user code as ``properties``; a reply to a request
during which they changed carries IPMPI_F_PROPS in its flags.
"""
import builtins
import collections
import collections.abc
import io
import sys
import threading
import time
import types

# The C module under signal: the same functions, without signal.py's enums
# (enum is ~2 ms of each engine's start-up; see _OnFirstUse).
import _signal as signal
from ipmpi import _serialize


class _OnFirstUse:
    """Stands in for a module until its first attribute is read, then
    imports it and takes its place in this module's globals. An engine
    imports nothing heavy before its first request: ast, linecache,
    traceback, pickle (with re) and cloudpickle were ~17 ms of each
    engine's ~30 ms of Python start-up, 1 s of CPU for 64 engines on 2
    cores."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        mod = __import__(self._name)
        globals()[self._name] = mod
        return getattr(mod, attr)


ast = _OnFirstUse("ast")
pickle = _OnFirstUse("pickle")
linecache = _OnFirstUse("linecache")
traceback = _OnFirstUse("traceback")
cloudpickle = _OnFirstUse("cloudpickle")

try:
    # The engine's C side (src/engine/pymod.c), built into the ipmpi
    # executable: absent when this module is imported elsewhere (tests).
    import _ipmpi_engine
except ImportError:
    _ipmpi_engine = None
# Request kinds, status codes and flags: generated from the C headers
# (include/ipmpi/protocol.h, errors.h), whose values are the wire protocol.
from ipmpi._consts import (EREJECT, EREMOTE, F_PROPS, K_APPLY, K_EXECUTE, K_GET_RESULT,  # noqa: F401
                           K_KEYS, K_KILL, K_PROPS, K_PULL, K_PUSH, K_RESET, K_TASK_SUBMIT,
                           KIND_NAMES, OK)

# The "kind" a reply's meta names: the table's names, but a task is a "task".
_META_KINDS = dict(KIND_NAMES)
_META_KINDS[K_TASK_SUBMIT] = "task"

# How many executions GET_RESULT can still reach (and how many submitted
# sources stay in linecache for tracebacks).
HISTORY_LEN = 1000
# ... and at most this many bytes of their output and source (the newest
# entry is kept whatever its size): five prints of 100 MB must not keep an
# engine 500 MB larger for the next thousand executes. The sources kept in
# linecache have a budget of this size of their own (_input_size).
HISTORY_BYTES = 64 << 20
# What linecache holds per line besides its characters (a str object).
_LINE_OVERHEAD = 56

# Compiled inputs kept for re-execution (a client that runs the same code
# again skips parsing and compiling: ~7 of the ~11 us an EXECUTE costs), and
# the longest source worth keeping.
CODE_CACHE_LEN = 256
CODE_CACHE_MAX_SRC = 64 * 1024

# Characters of stdout (and of stderr) a request keeps for its result; the
# rest is counted and cut with a note, so a flood of output (a gigabyte
# printed in a loop) costs the engine at most this much.
OUTPUT_MAX = 32 << 20

# Streamed output (execute(..., stream=True)): whole lines go to the client
# as they are written, at most one send per STREAM_GAP seconds and stream
# (lines written in between go together, STREAM_GAP later even if the code
# writes nothing more), at least one send per STREAM_CHUNK characters, and
# at most STREAM_MAX characters per stream and request (then a note says
# the rest is in the result only).
STREAM_GAP = 0.02
STREAM_CHUNK = 64 << 10
STREAM_MAX = 16 << 20
# ... in frames of at most this many characters.
STREAM_PIECE = 1 << 20

# The signal the stream's timer thread sends to the main thread so that
# held lines go out while the request's code sleeps or computes: Python
# runs the handler on the main thread between two bytecodes (and inside
# time.sleep), the only thread that may call MPI.
STREAM_SIGNAL = signal.SIGRTMIN + 6 if hasattr(signal, "SIGRTMIN") else None

# Unpickled task functions kept by digest (a stream of MapTasks of one
# function unpickles it once).
FN_CACHE_LEN = 64

# A failed request's meta carries the pickled exception ("exc") when its
# pickle is at most this long.
EXC_PICKLE_MAX = 64 * 1024

# Largest number of parts a frame may have (codec default; the C side sets
# Engine.max_parts from its limits). A value with more out-of-band buffers
# than fit is pickled in band instead, so the reply still goes out.
MAX_PARTS = 4096

_THIS_FILE = __file__

# Names a RESET keeps: the module's own attributes, the communicator and
# the engine's properties.
_KEEP_ON_RESET = ("__name__", "__builtins__", "__doc__", "__package__", "__loader__",
                  "__spec__", "comm", "MPI", "properties")

# Values a reply pickles with the plain pickler: the same bytes as
# cloudpickle's, without building a CloudPickler (a few microseconds a task).
_PLAIN_TYPES = frozenset((int, float, complex, bool, str, bytes, type(None)))

# File name of a string task's source in tracebacks.
_TASK_INPUT = "<ipmpi-task>"


def _wait_request(req):
    """Completes an MPI request while Python runs between the tests, so a
    KeyboardInterrupt (the client's INTERRUPT) is raised here instead of
    never: a blocking collective that another engine never joins would
    otherwise hold the engine for good. Polls at once for a while, then
    sleeps a little longer each turn (at most 2 ms)."""
    for _ in range(2000):
        if req.Test():
            return
    pause = 50e-6
    while not req.Test():
        time.sleep(pause)
        if pause < 2e-3:
            pause *= 2


def _interruptible_comm(comm, MPI):
    """The engines' comm, whose blocking barrier and buffer collectives
    wait by polling their non-blocking twins (_wait_request). The
    pickle-based lower-case collectives (bcast, reduce, allreduce,
    gather, allgather, scatter, alltoall, scan, exscan) have no
    non-blocking twin in mpi4py 3: they first wait in a polled Ibarrier,
    and call the blocking collective only once every rank of the comm
    reached it, so none of them waits there for an engine that never
    comes (the transfer itself is not polled). What an interrupt cannot
    undo: the interrupted collective stays posted, so that communicator
    must not run collectives again (the engines that joined it wait for
    the one that left); point-to-point calls block in MPI as before and
    are reached only when they return."""

    class Comm(type(comm)):
        def Barrier(self):
            _wait_request(self.Ibarrier())

        def barrier(self):
            _wait_request(self.Ibarrier())

        def Bcast(self, buf, root=0):
            _wait_request(self.Ibcast(buf, root))

        def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
            _wait_request(self.Iallreduce(sendbuf, recvbuf, op))

        def Reduce(self, sendbuf, recvbuf, op=MPI.SUM, root=0):
            _wait_request(self.Ireduce(sendbuf, recvbuf, op, root))

        def Allgather(self, sendbuf, recvbuf):
            _wait_request(self.Iallgather(sendbuf, recvbuf))

        def Gather(self, sendbuf, recvbuf, root=0):
            _wait_request(self.Igather(sendbuf, recvbuf, root))

        def Scatter(self, sendbuf, recvbuf, root=0):
            _wait_request(self.Iscatter(sendbuf, recvbuf, root))

        def Alltoall(self, sendbuf, recvbuf):
            _wait_request(self.Ialltoall(sendbuf, recvbuf))

    def joined_first(name):
        blocking = getattr(type(comm), name)

        def collective(self, *args, **kwargs):
            _wait_request(self.Ibarrier())
            return blocking(self, *args, **kwargs)

        collective.__name__ = collective.__qualname__ = name
        collective.__doc__ = blocking.__doc__
        return collective

    for name in ("bcast", "reduce", "allreduce", "gather", "allgather", "scatter", "alltoall", "scan", "exscan"):
        if hasattr(type(comm), name):
            setattr(Comm, name, joined_first(name))

    Comm.__name__ = Comm.__qualname__ = type(comm).__name__
    return Comm(comm)


def _input_size(lines):
    """Bytes a source kept in linecache is counted as: its characters and
    the overhead of each line's str."""
    return sum(map(len, lines)) + _LINE_OVERHEAD * len(lines)


def _meta_size(meta):
    """Bytes of text a history entry holds (output and source)."""
    return sum(len(meta.get(k) or "") for k in ("stdout", "stderr", "input") if isinstance(meta.get(k), str))


class _Capture(io.StringIO):
    """stdout or stderr of one request: what the request's code writes, at
    most OUTPUT_MAX characters (text() notes what was cut), also handed to
    the request's _Streamer when it streams. The request's code is the
    thread that runs it and every thread started while it runs (a
    ThreadPoolExecutor's workers, a thread it starts and joins), for as
    long as the request runs. A thread that was already alive when the
    request began (left running by an earlier request), or that writes
    after the request ended, writes to the engine's own stream (its log)
    instead, so its output never lands in an unrelated request's result."""

    def __init__(self, other, name="stdout", streamer=None, before=frozenset()):
        super().__init__()
        self._owner = threading.get_ident()
        self._before = before   # the threads alive when the request began
        self._open = True       # False once the request has ended (end())
        self._lock = threading.RLock()   # (a streamer that fails may write again)
        self._other = other
        self._name = name
        self._streamer = streamer
        self._kept = 0
        self._cut = 0

    def end(self):
        """The request is over: from now on every thread writes to the log."""
        self._open = False

    def write(self, s):
        me = threading.get_ident()
        if me != self._owner and (not self._open or me in self._before):
            try:
                return self._other.write(s)
            except Exception:  # a closed or odd stream must not break that thread
                return len(s)
        if not isinstance(s, str):
            return super().write(s)  # the TypeError StringIO raises
        n = len(s)
        with self._lock:        # the request's own threads may write at once
            room = OUTPUT_MAX - self._kept
            if n <= room:
                super().write(s)
                self._kept += n
            else:
                if room > 0:
                    super().write(s[:room])
                    self._kept += room
                self._cut += n - room
            if self._streamer is not None:
                self._streamer.add(self._name, s)
        return n

    def text(self):
        """What the result reports: the kept text, and a note if cut."""
        v = self.getvalue()
        if self._cut:
            v += ("\n[ipmpi: %d more characters of %s were cut: a request keeps at most %d MiB of it]\n"
                  % (self._cut, self._name, OUTPUT_MAX >> 20))
        return v


class _Streamer:
    """The output of one request on its way to the client while it runs
    (IPMPI_F_STREAM): add() takes what the request's code writes; whole
    lines go out through send(name, bytes) at most every STREAM_GAP
    seconds (the _Flusher sends what waits longer), and finish() sends
    the rest, partial lines too, before the request's reply."""

    def __init__(self, send, flusher=None):
        self._send = send
        self._flusher = flusher
        self._held = {"stdout": [], "stderr": []}
        self._size = {"stdout": 0, "stderr": 0}
        self._sent = {"stdout": 0, "stderr": 0}
        self._last = 0.0
        self.busy = False  # inside add(): the flusher's signal must wait
        self.stopped = False

    def add(self, name, s):
        if self.stopped or not s:
            return
        self.busy = True
        try:
            self._held[name].append(s)
            self._size[name] += len(s)
            if "\n" not in s and self._size[name] < STREAM_CHUNK:
                return
            now = time.monotonic()
            if now - self._last >= STREAM_GAP or self._size[name] >= STREAM_CHUNK:
                self.flush(now)
            elif self._flusher is not None:
                self._flusher.arm(self, self._last + STREAM_GAP)
        finally:
            self.busy = False

    def flush(self, now=None, final=False):
        """Sends the held whole lines (everything when final)."""
        busy, self.busy = self.busy, True
        try:
            self._flush(final)
        finally:
            self.busy = busy
        self._last = time.monotonic() if now is None else now

    def _flush(self, final):
        for name in ("stdout", "stderr"):
            if self.stopped or not self._size[name]:
                continue
            text = "".join(self._held[name])
            cut = len(text) if final or self._size[name] >= STREAM_CHUNK else text.rfind("\n") + 1
            if cut == 0:
                continue
            rest = text[cut:]
            self._held[name] = [rest] if rest else []
            self._size[name] = len(rest)
            self._out(name, text[:cut])

    def _out(self, name, text):
        room = STREAM_MAX - self._sent[name]
        if len(text) > room:
            text = text[:max(room, 0)] + (
                "\n[ipmpi: streaming of %s stopped after %d MiB; the result holds the rest]\n"
                % (name, STREAM_MAX >> 20))
            self.stopped = True
        self._sent[name] += len(text)
        for i in range(0, len(text), STREAM_PIECE):
            try:
                ok = self._send(name, text[i:i + STREAM_PIECE].encode("utf-8", "replace"))
            except Exception:
                ok = False
            if not ok:
                self.stopped = True
                return

    def finish(self):
        if self._flusher is not None:
            self._flusher.disarm(self)
        self.flush(final=True)


class _Flusher:
    """Sends a streamer's held lines STREAM_GAP after the last send even
    when the request's code writes nothing more: a thread waits for that
    moment and signals the main thread (STREAM_SIGNAL), whose handler
    flushes between two bytecodes, also while the code sleeps. Code that
    stays in C without checking signals (one long numpy call) is flushed
    when it returns."""

    def __init__(self):
        self._cv = threading.Condition()
        self._due = None
        self._streamer = None
        self._main = threading.get_ident()
        self._thread = None
        signal.signal(STREAM_SIGNAL, self._on_signal)
        # Interrupted system calls resume (time.sleep goes on sleeping
        # after the handler ran).
        signal.siginterrupt(STREAM_SIGNAL, False)

    def arm(self, streamer, when):
        with self._cv:
            if self._streamer is streamer and self._due is not None and self._due <= when:
                return
            self._streamer = streamer
            self._due = when
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ipmpi-stream", daemon=True)
                self._thread.start()
            self._cv.notify()

    def disarm(self, streamer):
        with self._cv:
            if self._streamer is streamer:
                self._streamer = self._due = None

    def _run(self):
        while True:
            with self._cv:
                while self._due is None:
                    self._cv.wait()
                left = self._due - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                self._due = None
            try:
                signal.pthread_kill(self._main, STREAM_SIGNAL)
            except Exception:
                return

    def _on_signal(self, signum, frame):
        with self._cv:
            s = self._streamer
        if s is None or s.stopped:
            return
        if s.busy:  # the signal came in the middle of add(): a little later
            self.arm(s, time.monotonic() + STREAM_GAP / 4)
            return
        self.disarm(s)
        s.flush()


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


def _pickle_exc(exc):
    """The exception pickled for the client to raise again (cloudpickle,
    protocol 5), or None when it cannot be pickled, does not load back (an
    __init__ that does not take its args, say) or is over EXC_PICKLE_MAX
    bytes. Never raises."""
    try:
        data = cloudpickle.dumps(exc, protocol=5)
        if len(data) > EXC_PICKLE_MAX:
            return None
        pickle.loads(data)
        return data
    except BaseException:
        return None


def _describe_error(meta, exc):
    """Adds etype, evalue, traceback and (when it pickles) exc to meta."""
    meta["etype"], meta["evalue"], meta["traceback"] = _format_error(exc)
    data = _pickle_exc(exc)
    if data is not None:
        meta["exc"] = data


def _task_payload_error(what, exc):
    """The error for a task whose payload cannot be unpickled here."""
    return RuntimeError("the engine cannot unpickle the task's %s: %s: %s"
                        % (what, type(exc).__name__, _safe_str(exc)))


def _names(arg, what):
    """arg as a list of keys: a str is one key."""
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, (list, tuple)):
        return list(arg)
    raise TypeError("properties %s expects a list of keys, got %s" % (what, type(arg).__name__))


class Properties(collections.abc.MutableMapping):
    """An engine's properties: a dict that copies values in and out (the
    semantics of IPython 0.10's StrictDict). Keys are str; a value is
    pickled when set (so it must pickle, and later changes to the object set
    do not reach the properties) and unpickled on every read (changing what
    was read does not either). ``version`` grows with every change; the
    engine compares it around each request to flag changed properties."""

    __slots__ = ("_data", "version")

    def __init__(self):
        self._data = {}  # key -> pickle of the value
        self.version = 0

    @staticmethod
    def _pickled(key, value):
        if not isinstance(key, str):
            raise TypeError("property names must be str, got %r" % (key,))
        try:
            return cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            raise TypeError("property %r: the value cannot be pickled (%s: %s)"
                            % (key, type(exc).__name__, _safe_str(exc))) from None

    def __getitem__(self, key):
        return pickle.loads(self._data[key])

    def __setitem__(self, key, value):
        self._data[key] = self._pickled(key, value)
        self.version += 1

    def __delitem__(self, key):
        del self._data[key]
        self.version += 1

    def __iter__(self):
        return iter(list(self._data))

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        try:
            return key in self._data
        except TypeError:  # unhashable: never a property name
            return False

    def clear(self):
        if self._data:
            self._data.clear()
            self.version += 1

    def update(self, other=(), **kw):
        """All values are checked before any is set: a value that does not
        pickle leaves the properties as they were."""
        items = dict(other, **kw)
        new = {k: self._pickled(k, v) for k, v in items.items()}
        if new:
            self._data.update(new)
            self.version += 1

    def copy(self):
        """A plain dict of copies of every value."""
        return {k: pickle.loads(v) for k, v in self._data.items()}

    def __repr__(self):
        try:
            return "Properties(%r)" % (self.copy(),)
        except Exception:
            return "Properties(<%d keys>)" % len(self._data)


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

            self.comm = _interruptible_comm(MPI.Intracomm.f2py(comm_fint), MPI)
            self.ns["comm"] = self.comm
            self.ns["MPI"] = self._mpi = MPI
        self.properties = Properties()
        self.ns["properties"] = self.properties
        self._props_seen = self.properties.version
        self.execution_count = 0
        self.history = collections.OrderedDict()  # number -> (status, meta, bytes)
        self._history_bytes = 0
        self._input_names = collections.deque()  # (linecache name, _input_size), oldest first
        self._input_bytes = 0
        self._code_cache = collections.OrderedDict()  # source -> (body, last) code objects
        self._fn_cache = collections.OrderedDict()  # digest -> [function, rebound or None]
        self._flusher = None  # made by the first request that streams

    # ---- the entry point called by the C side ----

    def install_signals(self):
        """Called by the engine's C side once (not by tests): SIGINT raises
        KeyboardInterrupt (the launcher may have started us with it
        ignored). The C side puts a handler in front that lets through
        only the controller's INTERRUPT of the current request."""
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def handle(self, kind, parts):
        """Runs one request. Returns (status, reply_parts, exit_after, flags):
        flags are header flags for the reply (F_PROPS when the properties
        changed since the last reply: by this request, or by user threads
        in between).

        Never raises: every exception, from user code or from decoding the
        request, becomes a remote error with status EREMOTE.
        """
        try:
            result = self._handle(kind, parts)
        except BaseException as exc:
            result = self.failure(kind, exc)
        version = self.properties.version
        if version != self._props_seen:
            self._props_seen = version
            return result + (F_PROPS,)
        return result + (0,)

    def failure(self, kind, exc):
        """The reply for a request that failed before it could run (also used
        by the C side when it cannot even allocate the request's buffers)."""
        try:
            meta = self._meta(kind, None, "", "", "")
            if kind == K_TASK_SUBMIT:
                meta["started"] = meta["completed"] = time.time()
            _describe_error(meta, exc)
            return EREMOTE, [pickle.dumps(meta, protocol=5)], False
        except BaseException as again:
            # No room to describe exc (MemoryError), or a second exception
            # while doing so: name the first one, if that still works.
            try:
                etype = type(exc).__name__
            except BaseException:
                etype = type(again).__name__
            meta = {"kind": _META_KINDS.get(kind, str(kind)), "number": None,
                    "input": "", "stdout": "", "stderr": "", "etype": etype,
                    "evalue": "", "traceback": etype + "\n"}
            if kind == K_TASK_SUBMIT:
                meta["id"] = self.id
            return EREMOTE, [pickle.dumps(meta, protocol=5)], False

    # ---- dispatch ----

    def _captures(self, saved):
        """(stdout, stderr, streamer) for a request: _Captures in front of
        the saved streams, and a _Streamer when the request streams its
        output (None otherwise)."""
        streamer = None
        if _ipmpi_engine is not None and STREAM_SIGNAL is not None and _ipmpi_engine.streaming():
            if self._flusher is None:
                self._flusher = _Flusher()
            streamer = _Streamer(_ipmpi_engine.send_output, self._flusher)
        before = frozenset(sys._current_frames())   # every thread alive now, _thread ones too
        return (_Capture(saved[0], "stdout", streamer, before), _Capture(saved[1], "stderr", streamer, before),
                streamer)

    def _meta(self, kind, number, code, out, err):
        # The engine's id is in every reply frame's header; MultiEngine
        # replies leave it out of the meta (the client's results._split
        # puts it back), so that engines which agree send the same bytes
        # and a broadcast tree folds their replies into one run
        # (IPMPI_F_SAME). A task's meta names its engine itself.
        meta = {"kind": _META_KINDS.get(kind, str(kind)), "number": number,
                "input": code, "stdout": out, "stderr": err}
        if kind == K_TASK_SUBMIT:
            meta["id"] = self.id
        return meta

    def _handle(self, kind, parts):
        if kind == K_TASK_SUBMIT:
            return self._task(parts)
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

        saved = sys.stdout, sys.stderr
        out, err, streamer = self._captures(saved)
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
                names = sorted(k for k, v in self.ns.items()
                               if not k.startswith("__") and not (k == "properties" and v is self.properties))
                extra = [pickle.dumps(names, protocol=5)]
            elif kind == K_PROPS:
                extra = self._props(parts)
            else:
                raise ValueError("unknown request kind %d" % kind)
        except BaseException as e:  # user code: SystemExit, KeyboardInterrupt too
            status, extra, exc = EREMOTE, [], e
        finally:
            sys.stdout, sys.stderr = saved
            out.end()
            err.end()
            if streamer is not None:
                streamer.finish()

        meta = self._meta(kind, number, code, out.text(), err.text())
        if exc is not None:
            _describe_error(meta, exc)
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
        # only the last HISTORY_LEN inputs are kept there, and only
        # HISTORY_BYTES of them (the newest whatever its size), as for the
        # history: five sources of 40 MB must not stay in the engine.
        name = self._input_name(number)
        lines = code.splitlines(True)
        linecache.cache[name] = (len(code), None, lines, name)
        size = _input_size(lines)
        self._input_names.append((name, size))
        self._input_bytes += size
        while len(self._input_names) > HISTORY_LEN or (len(self._input_names) > 1
                                                      and self._input_bytes > HISTORY_BYTES):
            old, old_size = self._input_names.popleft()
            linecache.cache.pop(old, None)
            self._input_bytes -= old_size
        self._run_source(code, name)

    def _run_source(self, code, name):
        """Runs code in the namespace as the interactive prompt would (a
        final expression is displayed), compiled under file name name."""
        cached = self._code_cache.get(code)
        if cached is not None:
            self._code_cache.move_to_end(code)
            body, last = cached
            if body is not None and body.co_filename != name:
                body = _renamed(body, name)
            if last is not None and last.co_filename != name:
                last = _renamed(last, name)
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
        size = _meta_size(meta)
        self.history[number] = (status, meta, size)
        self._history_bytes += size
        while len(self.history) > HISTORY_LEN or (len(self.history) > 1 and self._history_bytes > HISTORY_BYTES):
            _n, (_s, _m, old) = self.history.popitem(last=False)
            self._history_bytes -= old

    def _rebind(self, f):
        """A function defined in the client's __main__ gets the engine
        namespace as its globals, so it sees (and sets) engine variables.
        Globals that cloudpickle captured and the engine lacks are added,
        so helpers the function calls still resolve."""
        if not isinstance(f, types.FunctionType) or f.__module__ != "__main__":
            return f
        if f.__globals__ is self.ns:
            return f
        self._add_globals(f)
        g = types.FunctionType(f.__code__, self.ns, f.__name__, f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        g.__qualname__ = f.__qualname__
        g.__doc__ = f.__doc__
        g.__annotations__ = f.__annotations__
        g.__dict__.update(f.__dict__)
        g.__module__ = "__main__"
        return g

    def _add_globals(self, f):
        """The globals cloudpickle captured with f that the namespace lacks."""
        ns = self.ns
        for k, v in f.__globals__.items():
            if k not in ns and not k.startswith("__"):
                ns[k] = v

    def _push(self, parts):
        self._push_values(_serialize.loads(parts))

    def _push_values(self, values):
        if not isinstance(values, dict):
            raise TypeError("push expects a dict of name -> value, got %s" % type(values).__name__)
        for k, v in values.items():
            if not isinstance(k, str):
                raise TypeError("push: names must be str, got %r" % (k,))
        for k, v in values.items():
            self.ns[k] = self._rebind(v)

    def _dump(self, obj):
        """Parts for a reply value; pickling errors propagate (remote error)."""
        if type(obj) in _PLAIN_TYPES:
            return [pickle.dumps(obj, protocol=5)]
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
            self.ns["MPI"] = self._mpi
        self.ns["properties"] = self.properties

    def _get_result(self, kind, parts):
        number = _serialize.loads(parts) if parts else None
        if number is None:
            if not self.history:
                raise IndexError("no execution has run on engine %d yet" % self.id)
            number = next(reversed(self.history))
        if not isinstance(number, int) or number not in self.history:
            raise IndexError("engine %d has no result for execution %r (kept: the last %d, within %d MiB)"
                             % (self.id, number, HISTORY_LEN, HISTORY_BYTES >> 20))
        status, meta, _size = self.history[number]
        return status, [pickle.dumps(meta, protocol=5)], False

    # ---- engine properties (PROPS) ----

    def _props(self, parts):
        op, arg = _serialize.loads(parts)
        p = self.properties
        value = None
        if op == "set":
            if not isinstance(arg, dict):
                raise TypeError("properties set expects a dict, got %s" % type(arg).__name__)
            p.update(arg)
        elif op == "get":
            if arg is None:
                value = p.copy()
            else:
                value = {k: p[k] for k in _names(arg, "get")}
        elif op == "has":
            value = [k in p for k in _names(arg, "has")]
        elif op == "del":
            keys = list(dict.fromkeys(_names(arg, "del")))
            missing = [k for k in keys if k not in p]
            if missing:
                raise KeyError("no such properties: %s" % ", ".join(map(repr, missing)))
            for k in keys:
                del p[k]
        elif op == "clear":
            p.clear()
        else:
            raise ValueError("unknown properties operation %r (set, get, has, del, clear)" % (op,))
        return [cloudpickle.dumps(value, protocol=5)]

    # ---- tasks (TASK_SUBMIT) ----

    def _function(self, fn):
        """The [function, rebound] cache entry for a task's ("fn", digest,
        pickle) or None for a function sent as such."""
        if type(fn) is not tuple or len(fn) != 3 or fn[0] != "fn":
            return None
        digest = fn[1]
        cache = self._fn_cache
        entry = cache.get(digest)
        if entry is not None:
            cache.move_to_end(digest)
            return entry
        try:
            f = pickle.loads(fn[2])
        except BaseException as exc:
            raise _task_payload_error("function", exc) from exc
        entry = cache[digest] = [f, None]
        while len(cache) > FN_CACHE_LEN:
            cache.popitem(last=False)
        return entry

    def _task_callable(self, fn):
        """fn (or the function its ("fn", ...) names), rebound to the
        namespace like APPLY's."""
        entry = self._function(fn)
        if entry is None:
            return self._rebind(fn)
        f, g = entry
        if g is None:
            g = entry[1] = self._rebind(f)
        elif g is not f:
            self._add_globals(f)  # a reset may have removed them
        return g

    def _task(self, parts):
        """Runs one task stage: [stage, bufs...] of ("string", expression,
        push, pull, opts) or ("map", fn, args, kwargs, opts)."""
        saved = sys.stdout, sys.stderr
        out, err, streamer = self._captures(saved)
        status, extra, exc, code = OK, [], None, ""
        started = completed = what = None
        clear_after = False
        sys.stdout, sys.stderr = out, err
        try:
            try:
                try:
                    task = _serialize.loads(parts)
                except BaseException as e:
                    raise _task_payload_error("payload", e) from e
                if (type(task) is not tuple or len(task) != 5 or task[0] not in ("string", "map")
                        or not isinstance(task[4], dict)):
                    raise TypeError("a task stage must be (\"string\", expression, push, pull, opts) "
                                    "or (\"map\", fn, args, kwargs, opts)")
                what, a, b, c, opts = task
                depend = opts.get("depend")
                if depend is not None:
                    entry = self._function(depend)
                    if entry is not None:
                        depend = entry[0]
                    try:
                        ok = bool(depend(self.properties.copy()))
                    except BaseException:
                        ok = False
                    if not ok:
                        return EREJECT, [], False
                clear_after = opts.get("clear_after")
                if opts.get("clear_before"):
                    self._reset()
                if what == "string":
                    code = a
                    if not isinstance(code, str):
                        raise TypeError("a string task's expression must be str, got %s"
                                        % type(code).__name__)
                    if b:
                        self._push_values(b)
                    names = [c] if isinstance(c, str) else (c or ())
                    linecache.cache[_TASK_INPUT] = (len(code), None, code.splitlines(True), _TASK_INPUT)
                    started = time.time()
                    self._run_source(code, _TASK_INPUT)
                    completed = time.time()
                    value = {}
                    for name in names:
                        if name not in self.ns:
                            raise NameError("name %r is not defined" % (name,))
                        value[name] = self.ns[name]
                else:
                    f = self._task_callable(a)
                    started = time.time()
                    value = f(*b, **(c or {}))
                    completed = time.time()
                extra = self._dump(value)
                value = None
            except BaseException as e:  # user code: SystemExit, KeyboardInterrupt too
                status, extra, exc = EREMOTE, [], e
                now = time.time()
                if started is None:
                    started = now
                if completed is None:
                    completed = now
            finally:
                if clear_after:
                    self._reset()
        finally:
            sys.stdout, sys.stderr = saved
            out.end()
            err.end()
            if streamer is not None:
                streamer.finish()

        meta = self._meta(K_TASK_SUBMIT, None, code, out.text(), err.text())
        meta["started"] = started
        meta["completed"] = completed
        meta["task"] = what  # "string" or "map" (None: the payload did not unpickle)
        if exc is not None:
            _describe_error(meta, exc)
            exc = None
        return status, [pickle.dumps(meta, protocol=5)] + extra, False
