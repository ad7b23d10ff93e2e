"""Tasks for the TaskClient: IPython 0.10's StringTask, MapTask and TaskResult.

    from ipmpi import client
    tc = client.TaskClient()
    tid = tc.run(client.StringTask("c = a * b", push=dict(a=6, b=7), pull="c"))
    tc.get_task_result(tid, block=True).ns.c          # 42
    tc.run(client.MapTask(pow, args=(2, 10)), block=True)   # 1024

A task is handed to whichever engine is free (doc/protocol.md section 6).
Options common to both kinds:

- clear_before / clear_after: reset the engine's namespace before / after
  the task (after also when it failed);
- retries: how often a failed task is run again (on another engine when
  one is alive); an engine dying under a task counts as a failure;
- recovery_task: a task run when this one failed with no retries left; its
  result (or failure) becomes the result (a chain of at most 16 tasks, no
  cycles);
- depend: a function of the engine's properties dict; the task only runs
  on an engine where it returns true (raising counts as false). A task no
  engine accepts waits until properties change (set_properties) or spin().

This module also holds the wire encoding of tasks (stage tuples and the
submit descriptor) and the load-balanced mapper behind TaskClient.map and
TaskClient.parallel.
"""
import functools
import hashlib
import json
import pickle
import struct
import threading
import time
import types

import cloudpickle

from . import _ipmpi as _c
from . import _serialize
from . import progress as _progress
from .connect import _Base, _is_int
from .errors import (EngineError, EvictedError, InvalidDeferredID, TaskTimeoutError, _ERROR_CLASSES,
                     _rebuild_exception)
from .results import _NO_PROGRESS, _controller_json, _message, _now

__all__ = ["BaseTask", "StringTask", "MapTask", "Task", "ResultNS", "TaskResult",
           "TaskMapper", "ParallelFunction", "time_format", "MAX_STAGES", "MAX_RETRIES"]

time_format = "%Y/%m/%d %H:%M:%S"

MAX_STAGES = 16      # a task and its chain of recovery tasks
MAX_RETRIES = 1000   # per stage (the descriptor's limit)


# ---------------------------------------------------------------- tasks

class BaseTask:
    """What StringTask and MapTask share: clear_before, clear_after,
    retries, recovery_task, depend (see the module's docstring). The
    attributes may be changed until the task is given to run(); run() reads
    them at that moment. taskid is set by run()."""

    _kind = None

    def __init__(self, clear_before=False, clear_after=False, retries=0,
                 recovery_task=None, depend=None):
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError("retries must be an int")
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError("retries must be 0..%d, not %d" % (MAX_RETRIES, retries))
        if recovery_task is not None and not isinstance(recovery_task, BaseTask):
            raise TypeError("a recovery_task must be a StringTask or MapTask")
        if depend is not None and not callable(depend):
            raise TypeError("depend must be a function of the properties dict")
        self.clear_before = bool(clear_before)
        self.clear_after = bool(clear_after)
        self.retries = retries
        self.recovery_task = recovery_task
        self.depend = depend
        self.taskid = None

    def check_depend(self, properties):
        """depend(properties), as the engine evaluates it (True without depend)."""
        if self.depend is None:
            return True
        return bool(self.depend(properties))

    def _opts(self):
        d = self.depend
        if d is None:
            return _OPTS[(bool(self.clear_before), bool(self.clear_after))]
        return {"clear_before": bool(self.clear_before), "clear_after": bool(self.clear_after), "depend": d}

    def _stage_parts(self, fncache):
        raise NotImplementedError

    def __repr__(self):
        return "<%s taskid=%r retries=%r>" % (self.__class__.__name__, self.taskid, self.retries)


_OPTS = {(b, a): {"clear_before": b, "clear_after": a, "depend": None}
         for b in (False, True) for a in (False, True)}


class StringTask(BaseTask):
    """Python code run in an engine's namespace.

    StringTask(expression, pull=None, push=None, clear_before=False,
    clear_after=False, retries=0, recovery_task=None, depend=None): push (a
    dict) is set in the namespace, expression executed, and the names in
    pull (a str or a list of str) fetched. get_task_result gives a
    TaskResult: tr.ns.c, tr['c'], tr.results == {'c': ...}; when the code
    raised, tr.failure is that exception (rebuilt as its own type)."""

    _kind = "string"

    def __init__(self, expression, pull=None, push=None, clear_before=False, clear_after=False,
                 retries=0, recovery_task=None, depend=None):
        if not isinstance(expression, str):
            raise TypeError("a task expression must be a string")
        self.expression = expression
        if pull is None:
            self.pull = ()
        elif isinstance(pull, str):
            self.pull = (pull,)
        elif isinstance(pull, (list, tuple)):
            for name in pull:
                if not isinstance(name, str):
                    raise TypeError("pull must be str or a sequence of strs")
            self.pull = tuple(pull)
        else:
            raise TypeError("pull must be str or a sequence of strs")
        if push is None:
            self.push = {}
        elif isinstance(push, dict):
            for name in push:
                if not isinstance(name, str):
                    raise TypeError("push must be a dict with str keys")
            self.push = push
        else:
            raise TypeError("push must be a dict")
        BaseTask.__init__(self, clear_before, clear_after, retries, recovery_task, depend)

    def _stage_parts(self, fncache):
        pull = self.pull
        if not isinstance(pull, tuple):
            pull = (pull,) if isinstance(pull, str) else tuple(pull)
        stage = ("string", self.expression, self.push, pull, self._opts())
        return _dumps(stage, self.depend is None and _plain(self.push))


class MapTask(BaseTask):
    """A function call on an engine: function(*args, **kwargs).

    MapTask(function, args=None, kwargs=None, clear_before=False,
    clear_after=False, retries=0, recovery_task=None, depend=None).
    get_task_result gives the return value itself, or raises the exception
    the call raised (rebuilt as its own type). Any picklable callable is
    accepted (IPython 0.10 wanted a plain function)."""

    _kind = "map"

    def __init__(self, function, args=None, kwargs=None, clear_before=False, clear_after=False,
                 retries=0, recovery_task=None, depend=None):
        BaseTask.__init__(self, clear_before, clear_after, retries, recovery_task, depend)
        if not callable(function):
            raise TypeError("a task function must be a FunctionType")
        self.function = function
        self.args = () if args is None else args
        if not isinstance(self.args, (list, tuple)):
            raise TypeError("a task args must be a list or tuple")
        self.kwargs = {} if kwargs is None else kwargs
        if not isinstance(self.kwargs, dict):
            raise TypeError("a task kwargs must be a dict")

    def _stage_parts(self, fncache):
        args, kwargs = self.args, self.kwargs
        stage = ("map", fncache.entry(self.function), args, kwargs, self._opts())
        return _dumps(stage, self.depend is None and _plain(args) and (not kwargs or _plain(kwargs)))


Task = StringTask


# ---------------------------------------------------------------- encoding

_ATOMIC = frozenset((int, float, complex, str, bytes, bool, type(None), range))


def _plain(x, depth=0):
    """True if x is made only of builtin values that plain pickle writes
    exactly as cloudpickle would (no functions, classes or instances of
    user classes, which cloudpickle may have to send by value)."""
    t = type(x)
    if t in _ATOMIC:
        return True
    if depth > 8:
        return False
    if t is tuple or t is list or t is set or t is frozenset:
        atomic = _ATOMIC
        for v in x:
            if type(v) not in atomic and not _plain(v, depth + 1):
                return False
        return True
    if t is dict:
        atomic = _ATOMIC
        for k, v in x.items():
            if type(k) not in atomic and not _plain(k, depth + 1):
                return False
            if type(v) not in atomic and not _plain(v, depth + 1):
                return False
        return True
    return False


_pickle_dumps = pickle.dumps


def _dumps(stage, plain):
    """The parts of one stage: plain pickle when everything in it is plain
    (several times faster than cloudpickle), else ipmpi._serialize.dumps
    (cloudpickle, large buffers out of band)."""
    if plain:
        return [_pickle_dumps(stage, 5)]
    return _serialize.dumps(stage)


class FunctionCache:
    """Pickled functions, so a stream of tasks of one function pays
    cloudpickle once: entry(fn) -> ("fn", digest, pickled_fn), digest the
    16-byte blake2b of pickled_fn (the engine unpickles once per digest).

    Keyed by the function object's identity (held, so its id cannot be
    reused while cached) and, for plain Python functions, by the identity
    of what cloudpickle would capture: code, defaults, closure cells and the
    globals the code names. Rebinding a global the function uses (a = 2)
    thus pickles it again; mutating a global object in place (a list the
    function reads) is not seen. At most `size` functions are kept."""

    def __init__(self, size=256):
        self.size = size
        self._d = {}

    def clear(self):
        self._d.clear()

    def entry(self, fn):
        key = id(fn)
        hit = self._d.get(key)
        if hit is not None and hit[0] is fn:
            if hit[1] is None:
                return hit[3]
            if _state_ids(fn) == hit[1]:
                return hit[3]
        state = _state(fn)
        data = cloudpickle.dumps(fn, protocol=5)
        e = ("fn", hashlib.blake2b(data, digest_size=16).digest(), data)
        d = self._d
        if key not in d and len(d) >= self.size:
            try:
                del d[next(iter(d))]
            except (KeyError, RuntimeError, StopIteration):  # another thread was at it
                pass
        # (function, ids of its state, the state itself (kept alive so the
        # ids stay unique), entry)
        d[key] = (fn, None if state is None else tuple(map(id, state)), state, e)
        return e


def _state(fn):
    """What cloudpickle captures of a Python function (None for others)."""
    if type(fn) is not types.FunctionType:
        return None
    code = fn.__code__
    g = fn.__globals__
    closure = fn.__closure__
    cells = ()
    if closure:
        cells = tuple(_cell(c) for c in closure)
    return (code, fn.__defaults__, fn.__kwdefaults__) + cells + tuple(map(g.get, code.co_names))


_EMPTY = object()


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:
        return _EMPTY


def _state_ids(fn):
    return tuple(map(id, _state(fn)))


def pickle_function(fn):
    """("fn", digest, pickled_fn) for fn, uncached."""
    data = cloudpickle.dumps(fn, protocol=5)
    return ("fn", hashlib.blake2b(data, digest_size=16).digest(), data)


def chain(task):
    """[task, its recovery_task, ...]: ValueError on a cycle or more than
    MAX_STAGES tasks, TypeError on something that is not a task."""
    if not isinstance(task, BaseTask):
        raise TypeError("run() takes a StringTask or MapTask, not %r" % (type(task).__name__,))
    if task.recovery_task is None:
        return (task,)
    stages = [task]
    seen = {id(task)}
    t = task.recovery_task
    while t is not None:
        if not isinstance(t, BaseTask):
            raise TypeError("a recovery_task must be a StringTask or MapTask, not %r" % (type(t).__name__,))
        if id(t) in seen:
            raise ValueError("the recovery_task chain of this task has a cycle (task %d of the chain "
                             "is task %d again)" % (len(stages) + 1, [id(s) for s in stages].index(id(t)) + 1))
        seen.add(id(t))
        stages.append(t)
        if len(stages) > MAX_STAGES:
            raise ValueError("a task and its recovery tasks are at most %d tasks" % MAX_STAGES)
        t = t.recovery_task
    return tuple(stages)


_DESC1 = struct.Struct("<QIIII")
_DESC_HEAD = struct.Struct("<QII")


def _check_retries(r):
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_RETRIES:
        raise ValueError("retries must be an int 0..%d, not %r" % (MAX_RETRIES, r))
    return r


def descriptor(taskid, stages):
    """The submit descriptor: u64 taskid, u32 nstages, u32 0, then per
    stage u32 nparts, u32 retries. stages: [(nparts, retries), ...]."""
    if not 1 <= len(stages) <= MAX_STAGES:
        raise ValueError("a task has 1..%d stages" % MAX_STAGES)
    if len(stages) == 1:
        n, r = stages[0]
        return _DESC1.pack(taskid, 1, 0, n, r)
    flat = []
    for n, r in stages:
        flat += (n, r)
    return _DESC_HEAD.pack(taskid, len(stages), 0) + struct.pack("<%dI" % len(flat), *flat)


def encode(task, taskid, fncache):
    """The parts of TASK_SUBMIT for task: [descriptor, stage 0 parts...,
    stage 1 parts...]. Raises ValueError/TypeError on a bad task (nothing
    is sent then)."""
    t = type(task)
    if t is MapTask or t is StringTask:
        if task.recovery_task is None:
            parts = task._stage_parts(fncache)
            r = task.retries
            if type(r) is not int or not 0 <= r <= MAX_RETRIES:
                _check_retries(r)
            return [_DESC1.pack(taskid, 1, 0, len(parts), r)] + parts
    stages = chain(task)
    out, info = [None], []
    for t in stages:
        p = t._stage_parts(fncache)
        info.append((len(p), _check_retries(t.retries)))
        out.extend(p)
    out[0] = descriptor(taskid, info)
    return out


# ---------------------------------------------------------------- results

class ResultNS:
    """The values a StringTask pulled, as attributes: ns.a, ns['a'].

    >>> ns = ResultNS({'a': 17, 'foo': [0, 1, 2]})
    >>> ns
    NS{'a': 17, 'foo': [0, 1, 2]}
    """

    def __init__(self, dikt):
        for k, v in dikt.items():
            setattr(self, k, v)

    def __repr__(self):
        d = {}
        for k in sorted(vars(self)):
            if not (k.startswith("__") or k.endswith("__")):
                d[k] = getattr(self, k)
        return "NS" + repr(d)

    def __getitem__(self, key):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class TaskResult:
    """The result of a StringTask (IPython 0.10's TaskResult).

    results: a dict name -> value of the pulled names ({} on failure);
    ns: the same as attributes (tr.ns.c); tr['c']; keys: the names;
    failure: None, or the exception the task raised (its own type, with
    engine_id and remote_traceback attributes); engineid, taskid;
    submitted, completed: '%Y/%m/%d %H:%M:%S' (local time of the run on the
    engine); duration: seconds. Reading ns or tr['c'] of a failed task
    raises its failure; raise_exception() does too."""

    taskid = None

    def __init__(self, results, engineid, failure=None, taskid=None,
                 submitted=None, completed=None, duration=None):
        self.engineid = engineid
        if failure is not None:
            self.failure = failure
            self.results = {}
        else:
            self.failure = None
            self.results = results if results is not None else {}
        self._ns = ResultNS(self.results)
        self.keys = list(self.results.keys())
        self.taskid = taskid
        self.submitted = submitted
        self.completed = completed
        self.duration = duration

    @property
    def ns(self):
        if self.failure is not None:
            raise self.failure
        return self._ns

    @ns.setter
    def ns(self, value):
        raise AttributeError("the ns attribute cannot be changed")

    def __getitem__(self, key):
        if self.failure is not None:
            self.raise_exception()
        return self.results[key]

    def raise_exception(self):
        """Raises the task's failure here (nothing when it succeeded)."""
        if self.failure is not None:
            raise self.failure

    def __repr__(self):
        contents = self.failure if self.failure is not None else self.results
        return "TaskResult[ID:%r]:%r" % (self.taskid, contents)


def timing(started, completed):
    """(submitted, completed, duration) for TaskResult from two time.time()s."""
    lt = time.localtime
    return (time.strftime(time_format, lt(started)), time.strftime(time_format, lt(completed)),
            float(completed - started))


# ---------------------------------------------------------------- map

class _Chunk:
    """Runs f over a list of items on an engine: one task of a map()."""

    __slots__ = ("f", "star")

    def __init__(self, f, star):
        self.f = f
        self.star = star

    def __call__(self, items):
        f = self.f
        if self.star:
            return [f(*a) for a in items]
        return [f(x) for x in items]

    def __reduce__(self):
        return (_Chunk, (self.f, self.star))


def split(n, nchunks):
    """[(lo, hi), ...]: n items in nchunks contiguous chunks whose sizes
    differ by at most one."""
    base, extra = divmod(n, nchunks)
    out, lo = [], 0
    for i in range(nchunks):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class TaskMapper:
    """A load-balanced map with fixed task options (IPython 0.10's
    SynchronousTaskMapper): TaskClient.mapper(clear_before, clear_after,
    retries, recovery_task, depend, block).map(func, *sequences).

    block=True: the list of results, in order (func(*items) of zip(*sequences),
    as the builtin map). Long sequences travel in chunks, several per engine,
    each chunk one task (retries and depend apply to a chunk); with a
    recovery_task every item is its own task, as in IPython 0.10.
    block=False: the list of task ids, one task per item; get_task_result
    of each gives that item's value."""

    def __init__(self, task_client, clear_before=False, clear_after=False, retries=0,
                 recovery_task=None, depend=None, block=True, timeout=None):
        # Checks the options once, as a task would.
        BaseTask(clear_before, clear_after, retries, recovery_task, depend)
        self.task_controller = task_client
        self.clear_before = clear_before
        self.clear_after = clear_after
        self.retries = retries
        self.recovery_task = recovery_task
        self.depend = depend
        self.block = block
        self.timeout = timeout

    def map(self, func, *sequences):
        if not callable(func):
            raise TypeError("map takes a function, not %r" % (type(func).__name__,))
        if not sequences:
            raise TypeError("map() must have at least one sequence")
        return self.task_controller._map(self, func, sequences)


class ParallelFunction:
    """@tc.parallel(): a function f that, called on sequences, is mapped
    over them by its mapper: f(range(32)) == tc.map(f, range(32))."""

    def __init__(self, mapper):
        self.mapper = mapper
        self.func = None

    def __call__(self, func):
        if not callable(func):
            raise TypeError("parallel decorates a function, not %r" % (type(func).__name__,))
        self.func = func
        mapper = self.mapper

        @functools.wraps(func)
        def call_function(*sequences):
            return mapper.map(func, *sequences)

        call_function.mapper = mapper
        return call_function


# ---------------------------------------------------------------- the client

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

    barrier, get_task_result(block=True), run(block=True) and map show how
    many tasks are done when they wait longer than a second and stderr is
    a terminal (or in Jupyter); progress=False (tc.progress = False,
    IPMPI_PROGRESS=0) turns it off (see ipmpi.progress).
    """

    _capability = "tc"

    def __init__(self, furl_file=None, timeout=None, connect_timeout=30, shm=True, sshserver=None, sshkey=None,
                 progress=None):
        super().__init__(furl_file, timeout, connect_timeout, shm, sshserver, sshkey, progress)
        self._id_lock = threading.Lock()
        self._next = 0              # the reserved block [_next, _end)
        self._end = 0
        self._count = 0             # the size of that block
        self._block_size = _RESERVE_FIRST   # the size of the next
        self._reserve_rid = None    # TASK_RESERVE in flight
        self._sent = {}             # taskid -> (req_id, kind, submit time): submitted here, not yet received
        self._done = {}             # taskid -> (ok, value): received, kept until clear()
        self._fncache = FunctionCache()
        self._foreign = set()       # ids of tasks submitted to a controller this one replaced

    def _relink(self, old_instance):
        """A new link (reconnect): tasks submitted on the old one are asked
        for by id (TASK_RESULT), and ids are reserved anew (a block belongs
        to the session that reserved it). Tasks of another controller (a
        restarted one) are not asked for: their ids mean other tasks there."""
        with self._id_lock:
            self._next = self._end = self._count = 0
            self._reserve_rid = None
            sent, self._sent = self._sent, {}
            if old_instance and self._instance != old_instance:
                self._foreign.update(sent)

    # -- task ids
    def _task_tag(self):
        """The high 32 bits of every task id of this link's controller:
        bits 32..62 of its instance, bit 0 set (doc/protocol.md section 6);
        None when the controller named no instance."""
        try:
            return ((int(self._instance, 16) >> 32) & 0x7FFFFFFF) | 1
        except (TypeError, ValueError):
            return None

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
        parts = encode(task, 0, self._fncache)
        kind = task._kind
        if task.recovery_task is not None:
            for t in chain(task):
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
        progress = self._wait_progress(1, "tasks", "get_task_result") if block else None
        try:
            ok, value = self._result(taskid, block, timeout, True, progress)
            if progress is not None:
                progress.close(1)
        finally:
            if progress is not None:
                progress.close()
        if ok:
            return value
        raise value.with_traceback(None)

    def _result(self, taskid, block, timeout, keep, progress=None):
        """(ok, value) of a task (ok False: value is the exception); (True,
        None) when not finished and not block. keep: remember it here.
        progress: a progress.Progress shown while waiting."""
        if progress is None:
            progress = _NO_PROGRESS
        if not _is_int(taskid):
            raise TypeError("an integer task id expected: %r" % (taskid,))
        r = self._done.get(taskid)
        if r is not None:
            if not keep:
                self._done.pop(taskid, None)
            return r
        if taskid in self._foreign:
            raise InvalidDeferredID("task %d belongs to another controller: this client submitted it before "
                                    "reconnect(), to a controller that has been replaced since" % taskid)
        tag = self._task_tag()
        if tag is not None and taskid >> 32 != tag:
            raise InvalidDeferredID("task %d belongs to another controller: this controller's task ids are "
                                    "%d and up (the high 32 bits name the controller)" % (taskid, tag << 32))
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
                replies = _progress.recv(conn, entry[0], timeout, progress)
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
                replies = _progress.recv(conn, rid, timeout, progress)
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
        sub, comp, dur = timing(started, completed)
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
        # Progress counts the tasks whose replies came here; those
        # submitted by another client count when the barrier returns.
        progress = self._wait_progress(len(ids), "tasks", "barrier")
        before = len(ids) - len(wait)

        def done():
            return before + sum(1 for t in wait if t in self._sent and conn.ready(self._sent[t][0]))

        try:
            replies = _progress.recv(conn, rid, timeout, progress, done)
            progress.close(len(ids))
        except TimeoutError:
            conn.forget(rid)
            raise TaskTimeoutError("barrier: tasks not finished within %s s" % timeout, wait) from None
        except BaseException:
            conn.forget(rid)
            raise
        finally:
            progress.close()
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
        return TaskMapper(self, clear_before=clear_before, clear_after=clear_after,
                                retries=retries, recovery_task=recovery_task, depend=depend,
                                block=block, timeout=timeout)

    def parallel(self, clear_before=False, clear_after=False, retries=0, recovery_task=None,
                 depend=None, block=True, timeout=None):
        """A decorator: @tc.parallel() def f(x): ...; f(seq) maps f over
        seq with these task options (see mapper)."""
        return ParallelFunction(self.mapper(clear_before, clear_after, retries, recovery_task,
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
        progress = None
        try:
            if nchunks == n:
                for a in items:
                    tids.append(self.run(MapTask(func, args=a if star else (a,), **opts)))
            else:
                g = _Chunk(func, star)
                for lo, hi in split(n, nchunks):
                    tids.append(self.run(MapTask(g, args=(items[lo:hi],), **opts)))
            out = []
            progress = self._wait_progress(len(tids), "tasks", "map")

            def done():
                return len(out_ids) + sum(1 for t in tids[len(out_ids):]
                                          if t in self._sent and self._conn.ready(self._sent[t][0]))

            out_ids = []
            for i, tid in enumerate(tids):
                left = None if deadline is None else max(0.0, deadline - _now())
                try:
                    progress.update(done())
                    ok, value = self._result(tid, True, left, False, _MapProgress(progress, done))
                    out_ids.append(tid)
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
            if progress is not None:
                progress.close(len(out_ids))
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


class _MapProgress:
    """A map's progress, updated with the count of its tasks done while
    one of them is waited for."""

    def __init__(self, progress, done):
        self._p, self._done = progress, done
        self.step = progress.step

    def update(self, _n):
        self._p.update(self._done())


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
