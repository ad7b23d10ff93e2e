"""IPython 0.10's MultiEngineClient: every engine addressed directly
(doc/protocol.md section 2), with 0.10's return shapes and printed forms.
"""
import pickle
import weakref

from . import _serialize
from . import _ipmpi as _c
from . import output as _output
from . import task as _task
from .connect import _Base, _concatenate, _is_int, _map_chunk, _parse_targets, _partition, _sized
from .errors import EngineError
from .results import (PendingResult, ResultList, _controller_json, _engine_results, _fetch_checked, _fetched,
                      _identity, _none, _now, _parse_id, _result_dict)




# Names of request kinds, for progress lines ('execute:    0/4 engines done ...').
_KIND_NAMES = {getattr(_c, n): n[2:].lower() for n in dir(_c) if n.startswith("K_")}


class MultiEngineClient(_Base):
    """Drives the engines directly: IPython 0.10's MultiEngineClient.

    MultiEngineClient(furl_file=None, timeout=None, connect_timeout=30):
    furl_file defaults to $IPMPI_DIR/security/ipcontroller-mec.furl;
    timeout is the default for every blocking wait (None: forever).

    Every method that runs on engines takes targets ('all', an engine id,
    or a list of ids) and block (False: return a PendingResult); when not
    given, the attributes mec.targets (default 'all') and mec.block
    (default True) decide. Results come back one per target, in the order
    of the targets: mec.push(...) -> [None, None, None, None],
    mec.pull('b', targets=0) -> [3453]. A request that fails on one of
    several engines raises CompositeError; on a single engine, that
    engine's error (RemoteError, DeadEngineError, ...). Each method also
    takes timeout (seconds; None: the client's default).

    A blocking wait longer than a second shows how many engines are done
    when stderr is a terminal or in Jupyter; progress=False (or
    mec.progress = False, or IPMPI_PROGRESS=0) turns it off, 'plain'
    forces the one-line form (see ipmpi.progress).
    """

    _capability = "mec"

    def __init__(self, furl_file=None, timeout=None, connect_timeout=30, shm=True, sshserver=None, sshkey=None,
                 progress=None):
        self._targets = "all"
        self._block = True
        self._pending_results = weakref.WeakSet()
        # %px, %%px and %autopx stream the output while the code runs when
        # px_stream is True, never when False, and when None whenever a
        # person reads it (a terminal or Jupyter); px_merge shows a line
        # printed alike by several engines once ([0-63] Hello).
        self.px_stream = None
        self.px_merge = False
        super().__init__(furl_file, timeout, connect_timeout, shm, sshserver, sshkey, progress)

    # -- the block and targets attributes
    @property
    def block(self):
        """The default of every method's block argument (True or False)."""
        return self._block

    @block.setter
    def block(self, value):
        self._block = _check_block(value)

    @property
    def targets(self):
        """The default of every method's targets argument: 'all', an engine
        id or a list of ids. Setting it checks that the named engines are
        alive (ValueError naming the others)."""
        return self._targets

    @targets.setter
    def targets(self, value):
        _parse_targets(value)   # the form: TypeError/ValueError
        if not (isinstance(value, str) and value == "all"):
            named = [int(value)] if _is_int(value) else [int(t) for t in value]
            alive = self.get_ids()
            gone = [t for t in named if t not in alive]
            if gone:
                raise ValueError("mec.targets: no live engine %s (the engines alive are %s; an engine "
                                 "that died is no longer listed)"
                                 % (", ".join(str(t) for t in gone), alive))
            value = int(value) if _is_int(value) else named
        self._targets = value

    def _find(self, targets, block):
        """(targets, block): the arguments, or the attributes when None."""
        if targets is None:
            targets = self._targets
        if block is None:
            block = self._block
        return targets, _check_block(block)

    def _finish(self, req_ids, post, block, timeout, targets=None, ids=None, printer=None, what=None):
        pr = PendingResult(self, req_ids, post, ids)
        pr.targets = targets
        pr._printer = printer
        pr.what = what
        if not block:
            self._pending_results.add(pr)
            return pr
        try:
            return pr.get_result(timeout=timeout)
        except ConnectionError as e:
            ids = [i for i in pr.req_ids if i]
            if not ids or pr._done:
                raise
            named = "request%s %s" % ("s" if len(ids) > 1 else "", ", ".join(ids))
            fetch = "after mec.reconnect(), mec.get_result_by_id(%r) gets it" % (ids[0] if len(ids) == 1 else ids)
            alive, why = self._probe()
            if alive:
                raise type(e)("%s; the controller keeps the result of %s: %s" % (e, named, fetch)) from None
            if alive is False:
                raise type(e)("%s; the controller is gone (%s): the cluster ended or its controller died, "
                              "and the result of %s with it" % (e, why, named)) from None
            raise type(e)("%s; the controller is unreachable (%s); if it is still running it keeps the "
                          "result of %s: %s" % (e, why, named, fetch)) from None

    def _request(self, kind, parts, targets, post, block, timeout, printer=None):
        """Sends one request to targets; post(replies, order) makes its
        result. With printer (an output.OutputPrinter) the engines stream
        the request's output to it while it runs."""
        target, tlist, _single = _parse_targets(targets)
        rid = self._send(kind, target, parts, tlist, printer is not None)
        return self._finish([rid], lambda rs: post(rs, tlist), block, timeout, targets, printer=printer,
                            what=_KIND_NAMES.get(kind))

    def _each(self, kind, parts, targets, block, timeout, method, value=None):
        """A request whose result is one value(meta, parts) per target (None
        each when value is None), in the order of the targets."""
        if value is None:
            value = _none
        return self._request(kind, parts, targets,
                             lambda rs, order: _engine_results(rs, value, method, order), block, timeout)

    def _target_ids(self, targets, timeout):
        """The engine ids targets names, in its order ('all': those alive)."""
        kind, tlist, single = _parse_targets(targets)
        if single:
            return [kind]
        if tlist is not None:
            return tlist
        ids = self.get_ids(timeout=timeout)
        if not ids:
            raise EngineError(_c.ENOENT, "no engines are alive")
        return ids

    # -- interactive use
    def activate(self):
        """Makes this client the one the parallel magics (%px, %result,
        %autopx, %%px) use; in IPython it also loads them (as
        %load_ext ipmpi.magic does)."""
        from . import magic
        magic.activate(self)

    def __setitem__(self, key, value):
        """mec['a'] = v: push({'a': v}) with mec.targets and mec.block."""
        return self.push({key: value})

    def __getitem__(self, key):
        """mec['a']: pull('a') with mec.targets and mec.block."""
        if not isinstance(key, str):
            raise TypeError("__getitem__ only takes strs")
        return self.pull(key)

    def __len__(self):
        """The number of engines alive."""
        return len(self.get_ids())

    # -- pending results
    def barrier(self, pendingResults, timeout=None):
        """Waits until every PendingResult of pendingResults is complete.
        Their errors are kept (get_result or .r raises them afterwards);
        a wait longer than timeout (None: the client's default) raises
        TimeoutError."""
        if isinstance(pendingResults, PendingResult):
            pendingResults = [pendingResults]
        prs = list(pendingResults)
        for pr in prs:
            if not isinstance(pr, PendingResult):
                raise TypeError("barrier takes PendingResult objects, not %r" % (type(pr).__name__,))
        if timeout is None:
            timeout = self._timeout
        deadline = None if timeout is None else _now() + timeout
        # One progress display for the whole barrier (results done), not
        # one per result.
        progress = self._wait_progress(len(prs), "results", "barrier")
        try:
            for pr in sorted(prs):
                pr._quiet_progress = True
                try:
                    while True:
                        left = None if deadline is None else max(0.0, deadline - _now())
                        step = progress.step
                        wait = left if step is None else (step if left is None else min(step, left))
                        try:
                            pr.get_result(block=True, timeout=wait)
                            break
                        except TimeoutError:
                            if pr._done:
                                break
                            if left is not None and wait >= left:
                                raise TimeoutError("barrier: not every result complete within %s s"
                                                   % (timeout,)) from None
                            progress.update(sum(1 for p in prs if p.ready()))
                        except Exception:
                            break
                finally:
                    pr._quiet_progress = False
            progress.close(len(prs))
        finally:
            progress.close()

    def flush(self):
        """Drops the results of this client's PendingResults that were not
        retrieved (their get_result then raises InvalidDeferredID)."""
        for pr in list(self._pending_results):
            pr._flush()
        self._pending_results = weakref.WeakSet()

    clear_pending_results = flush

    # -- results by id: after a lost link, or from another client
    def _fetch(self, gid):
        """Sends RESULT_FETCH for request id gid; the local req_id whose
        replies (those of gid, as the controller keeps them) come back."""
        return self._send(_c.K_RESULT_FETCH, _c.TARGET_CONTROLLER, [_parse_id(gid)])

    def get_pending_result(self, req_ids):
        """A PendingResult for the request id req_ids (a str from
        pr.req_ids, from any client of this controller, also one that
        died), or a list of them for a list of ids. Its result is one
        value per engine, by engine id: a ResultList for execute, the
        return value for apply, the list of values for pull (one per name
        asked), None for push and the like. An id the controller does not
        know, or one of another controller, raises InvalidDeferredID when
        the result is asked for; one whose result the --result-memory
        budget evicted, EvictedError."""
        if isinstance(req_ids, PendingResult):
            req_ids = req_ids.req_ids
        if not isinstance(req_ids, str) and hasattr(req_ids, "__iter__"):
            return [self.get_pending_result(i) for i in req_ids]
        rid = self._fetch(req_ids)
        pr = PendingResult(self, [rid], _fetch_checked(_fetched), ids=[req_ids])
        self._pending_results.add(pr)
        return pr

    def get_result_by_id(self, req_ids, block=True, timeout=None):
        """The result of the request with id req_ids (see
        get_pending_result); a list of them for a list of ids. block=False
        gives the PendingResult(s). Results stay in the controller until
        purge_results() or its memory budget evicts them."""
        prs = self.get_pending_result(req_ids)
        if not _check_block(block):
            return prs
        if isinstance(prs, PendingResult):
            return prs.get_result(timeout=timeout)
        deadline = None if (timeout if timeout is not None else self._timeout) is None else \
            _now() + (timeout if timeout is not None else self._timeout)
        return [pr.get_result(timeout=None if deadline is None else max(0.0, deadline - _now())) for pr in prs]

    def get_pending_deferred(self, deferredID, block=True):
        """IPython 0.10's name: get_result_by_id(deferredID, block)."""
        return self.get_result_by_id(deferredID, block)

    def purge_results(self, jobs="all", timeout=None):
        """Drops results kept in the controller (ipyparallel's name): jobs
        'all' (every finished result, of every client) or request ids /
        PendingResults. Returns {'cleared': n, 'unknown': [ids]} (unknown:
        not kept, still running, or of another controller)."""
        if isinstance(jobs, str) and jobs == "all":
            parts = []
        else:
            if isinstance(jobs, (str, PendingResult)):
                jobs = [jobs]
            ids = []
            for j in jobs:
                ids.extend(j.req_ids if isinstance(j, PendingResult) else [j])
            if not ids:
                return {"cleared": 0, "unknown": []}
            parts = [b"".join(_parse_id(i) for i in ids)]
        rid = self._send(_c.K_RESULT_CLEAR, _c.TARGET_CONTROLLER, parts)
        return self._finish([rid], _controller_json, True, timeout, ids=[None])

    def _relink(self, old_instance):
        for pr in list(self._pending_results):
            pr._relink(self)

    # -- code
    def execute(self, lines, targets=None, block=None, timeout=None, stream=False, merge=False):
        """Runs the Python code lines on the engines; a ResultList of
        result dicts (input, number, id, stdout, stderr).

        stream=True: what the code prints is shown here while it runs,
        each line with its engine's prefix ('[3] step 1 done'; stderr
        lines on sys.stderr), and the printed ResultList leaves the output
        out (the dicts still hold it). merge=True (with stream): a line
        printed alike by several engines is shown once, '[0-63] Hello'.
        With block=False the lines are shown while get_result waits."""
        targets, block = self._find(targets, block)
        if not isinstance(lines, str):
            raise TypeError("execute takes the code as a str, not %r" % (type(lines).__name__,))
        printer = None
        if stream:
            engines = self._target_ids(targets, timeout) if merge else None
            printer = _output.OutputPrinter("0.10", merge=merge, engines=engines)

        def post(rs, order):
            rl = ResultList(_engine_results(rs, lambda meta, parts: _result_dict(meta), "execute", order))
            rl._streamed = stream
            return rl

        return self._request(_c.K_EXECUTE, [lines.encode("utf-8")], targets, post, block, timeout, printer)

    def run(self, filename, targets=None, block=None, timeout=None):
        """Executes the local Python file filename on the engines (a
        SyntaxError in it is raised here, before anything is sent)."""
        with open(filename, encoding="utf-8") as f:
            source = f.read()
        compile(source, filename, "exec")
        return self.execute(source, targets, block, timeout)

    # -- namespace
    def push(self, namespace, targets=None, block=None, timeout=None, shared=False):
        """Sets the names of the dict namespace on the engines; one None
        per target.

        shared=True (numpy arrays only): each node holds the arrays once,
        in shared memory, and every target engine gets a read-only array
        over it; returns {host: {'engines': [ids], 'bytes': n}}, the
        memory each node holds (see ipmpi.shared). Always blocks."""
        if shared:
            from . import shared as _shared
            targets, _block = self._find(targets, True)
            return _shared.push(self, namespace, targets, timeout)
        targets, block = self._find(targets, block)
        if not isinstance(namespace, dict):
            raise TypeError("push takes a dict of name -> value, not %r" % (type(namespace).__name__,))
        return self._each(_c.K_PUSH, _serialize.dumps(namespace), targets, block, timeout, "push")

    def pull(self, keys, targets=None, block=None, timeout=None):
        """Values of names on the engines, one entry per target: keys a
        str gives each engine's value, a list or tuple of names a list of
        values per engine. pull('b', targets=0) -> [3453]."""
        targets, block = self._find(targets, block)
        one = isinstance(keys, str)
        names = [keys] if one else _names_list(keys)

        def value(meta, parts):
            values = _serialize.loads(parts[1:])
            return values[0] if one else list(values)

        return self._each(_c.K_PULL, _serialize.dumps(names), targets, block, timeout, "pull", value)

    def push_function(self, namespace, targets=None, block=None, timeout=None):
        """push for functions: the dict's values are functions, which run on
        the engines with the engine's namespace as their globals."""
        targets, block = self._find(targets, block)
        if not isinstance(namespace, dict):
            raise TypeError("push_function takes a dict of name -> function, not %r"
                            % (type(namespace).__name__,))
        return self._each(_c.K_PUSH, _serialize.dumps(namespace), targets, block, timeout,
                          "push_function")

    def pull_function(self, keys, targets=None, block=None, timeout=None):
        """pull for functions."""
        return self.pull(keys, targets, block, timeout)

    def push_serialized(self, namespace, targets=None, block=None, timeout=None):
        """push of values serialized beforehand: namespace maps names to
        Serialized objects (serialize(obj), or what pull_serialized gave),
        which the engines unpickle."""
        targets, block = self._find(targets, block)
        if not isinstance(namespace, dict):
            raise TypeError("push_serialized takes a dict of name -> Serialized")
        for k, v in namespace.items():
            if not isinstance(v, Serialized):
                raise TypeError("push_serialized: %r is a %s, not a Serialized (use serialize(obj))"
                                % (k, type(v).__name__))
        return self._each(_c.K_PUSH, _serialize.dumps(dict(namespace)), targets, block, timeout,
                          "push_serialized")

    def pull_serialized(self, keys, targets=None, block=None, timeout=None):
        """pull, but each value stays serialized: a Serialized (keys a str)
        or a list of them per target; .unserialize() gives the value."""
        targets, block = self._find(targets, block)
        one = isinstance(keys, str)
        names = [keys] if one else _names_list(keys)

        def value(meta, parts):
            data = [bytes(p) for p in parts[1:]]
            items = [Serialized(data, i) for i in range(len(names))]
            return items[0] if one else items

        return self._each(_c.K_PULL, _serialize.dumps(names), targets, block, timeout,
                          "pull_serialized", value)

    def zip_pull(self, keys, targets=None, block=None, timeout=None):
        """pull with the results zipped per key (IPython 0.10):
        zip_pull(('a', 'b')) -> [(a0, a1, a2, a3), (b0, b1, b2, b3)]."""
        targets, block = self._find(targets, block)
        multi = not _is_int(targets) and len(targets) > 1
        nkeys = 1 if isinstance(keys, str) else len(_names_list(keys))

        def transform(result):
            if not multi:
                return result[0]
            if nkeys > 1:
                return list(zip(*result))
            return list(result)

        pr = self.pull(keys, targets, False, timeout)
        pr.add_callback(transform)
        if block:
            return pr.get_result(timeout=timeout)
        self._pending_results.add(pr)
        return pr

    def keys(self, targets=None, block=None, timeout=None):
        """The names in each engine's namespace, one sorted list per target."""
        targets, block = self._find(targets, block)
        return self._each(_c.K_KEYS, [], targets, block, timeout, "keys",
                          lambda meta, parts: _serialize.loads(parts[1:]))

    def reset(self, targets=None, block=None, timeout=None):
        """Clears the engines' namespaces and (as in IPython 0.10) their
        properties; one None per target."""
        targets, block = self._find(targets, block)
        target, tlist, _single = _parse_targets(targets)
        rids = [self._send(_c.K_RESET, target, [], tlist)]
        try:
            rids.append(self._send(_c.K_PROPS, target, _serialize.dumps(("clear", None)), tlist))
        except BaseException:
            self._conn.forget(rids[0])
            raise

        def post(rs):
            n = len(rs) // 2
            _engine_results(rs, _none, "reset", tlist)
            return [None] * n

        return self._finish(rids, post, block, timeout)

    # -- partitions
    def scatter(self, key, seq, dist="b", flatten=False, targets=None, block=None, timeout=None):
        """Splits seq into contiguous partitions, one per target engine (in
        the order of the targets), and pushes each as key; one None per
        target. flatten=True pushes a partition of one item as the item
        itself. dist: 'b' (blocks), the only one IPython 0.10 had."""
        targets, block = self._find(targets, block)
        _check_dist(dist)
        ids = self._target_ids(targets, timeout)
        parts = _partition(seq, len(ids), "scatter")
        rids = []
        try:
            for eid, part in zip(ids, parts):
                if flatten and len(part) == 1:
                    part = part[0]
                rids.append(self._send(_c.K_PUSH, eid, _serialize.dumps({key: part})))
        except BaseException:
            for r in rids:
                self._conn.forget(r)
            raise
        return self._finish(rids, lambda rs: _engine_results(rs, _none, "scatter", ids), block, timeout)

    def gather(self, key, dist="b", targets=None, block=None, timeout=None):
        """Pulls key from the target engines and joins the partitions in the
        order of the targets (lists and tuples into one list, arrays with
        numpy.concatenate, anything else as a list of the values)."""
        targets, block = self._find(targets, block)
        _check_dist(dist)

        def post(rs, order):
            values = _engine_results(rs, lambda meta, parts: _serialize.loads(parts[1:])[0],
                                     "gather", order)
            return _concatenate(values)

        return self._request(_c.K_PULL, _serialize.dumps([key]), targets, post, block, timeout)

    def raw_map(self, func, seq, dist="b", targets=None, block=None, timeout=None):
        """map(func, *seq) in parallel: seq is a list or tuple of sequences
        of equal length (raw_map(f, [xs, ys]) is map(f, xs, ys)); func a
        function, or a str naming one on the engines. The argument tuples
        are scattered in contiguous blocks over the targets and the results
        joined in order: a list."""
        targets, block = self._find(targets, block)
        _check_dist(dist)
        if not isinstance(seq, (list, tuple)):
            raise TypeError("raw_map takes the sequences in a list or tuple, not %r" % (type(seq).__name__,))
        if not seq:
            raise TypeError("raw_map needs at least one sequence")
        seqs = [_sized(s, "map") for s in seq]
        n = len(seqs[0])
        if any(len(s) != n for s in seqs):
            raise ValueError("all sequences must have equal length")
        if not (isinstance(func, str) or callable(func)):
            raise TypeError("func must be a function or str, not %r" % (type(func).__name__,))
        if len(seqs) == 1:
            items, star = seqs[0], False
        else:
            items, star = list(zip(*seqs)), True
        ids = self._target_ids(targets, timeout)
        rids = []
        try:
            for eid, chunk in zip(ids, _partition(items, len(ids), "map")):
                rids.append(self._send(_c.K_APPLY, eid, _serialize.dumps((_map_chunk, (func, chunk, star), {}))))
        except BaseException:
            for r in rids:
                self._conn.forget(r)
            raise

        def post(rs):
            return _concatenate(_engine_results(rs, lambda meta, parts: _serialize.loads(parts[1:]),
                                                "map", ids))

        return self._finish(rids, post, block, timeout, what="map")

    def map(self, func, *sequences, targets=None, block=None, timeout=None):
        """A parallel map(func, *sequences) on mec.targets (not load
        balanced: contiguous blocks, one per engine); a list, in order.
        Options: mapper(); targets, block and timeout may also be given
        here, by keyword only (not in IPython 0.10)."""
        if timeout is not None:
            targets, block = self._find(targets, block)
            return self.raw_map(func, list(sequences), targets=targets, block=block, timeout=timeout)
        return self.mapper(targets=targets, block=block).map(func, *sequences)

    def mapper(self, dist="b", targets=None, block=None):
        """An object whose map(func, *sequences) maps with these options
        (targets, block None: mec.targets, mec.block at the time of the call)."""
        _check_dist(dist)
        if targets is not None:
            _parse_targets(targets)
        if block is not None:
            _check_block(block)
        return MultiEngineMapper(self, dist, targets, block)

    def parallel(self, dist="b", targets=None, block=None):
        """A decorator: @mec.parallel() def f(x): ...; then f(seq) is
        mec.map(f, seq) with these options (see mapper)."""
        return _task.ParallelFunction(self.mapper(dist, targets, block))

    # -- results and queues
    def get_result(self, i=None, targets=None, block=None, timeout=None):
        """The result dict of execution number i (None: the last) on each
        engine: a ResultList."""
        targets, block = self._find(targets, block)
        if i is not None and not _is_int(i):
            raise TypeError("i must be an execution number or None")

        def post(rs, order):
            return ResultList(_engine_results(rs, lambda meta, parts: _result_dict(meta), "get_result", order))

        return self._request(_c.K_GET_RESULT, _serialize.dumps(i), targets, post, block, timeout)

    def queue_status(self, targets=None, block=None, timeout=None):
        """[(engine id, {"id", "running", "queue"}), ...] for the target engines."""
        targets, block = self._find(targets, block)
        return self._controller(_c.K_QUEUE_STATUS, lambda js: [(d["id"], d) for d in js], block, timeout,
                                targets)

    def clear_queue(self, targets=None, block=None, timeout=None):
        """Drops the requests waiting in the engines' queues (they fail
        with AbortedError); one None per target."""
        targets, block = self._find(targets, block)
        n = len(self._target_ids(targets, timeout))
        return self._controller(_c.K_CLEAR_QUEUE, lambda js: [None] * n, block, timeout, targets)

    def engine_info(self, targets=None, block=None, timeout=None):
        """Where each engine runs: the controller's record of it (id, host,
        pid, rank, local_rank, cpuset, bound, python). A list of dicts by
        engine id; with an int target, that engine's dict. (Not in IPython
        0.10.)"""
        targets, block = self._find(targets, block)
        single = _parse_targets(targets)[2]

        def post(js):
            return js[0] if single and js else js

        return self._controller(_c.K_PROPERTIES, post, block, timeout, targets)

    # -- engine properties (IPython 0.10): a dict per engine, seen by user
    # code as `properties` and by the depend functions of tasks.
    def _props(self, op, arg, targets, block, timeout, returns, method):
        targets, block = self._find(targets, block)

        def value(meta, parts):
            return _serialize.loads(parts[1:]) if len(parts) > 1 else None

        def post(rs, order):
            # IPython 0.10's shapes: one entry per target, also for an int
            # target ([dict]); set, del and clear give [None, ...].
            results = _engine_results(rs, value, method, order)
            return results if returns else [None] * len(results)

        return self._request(_c.K_PROPS, _serialize.dumps((op, arg)), targets, post, block, timeout)

    def set_properties(self, properties, targets=None, block=None, timeout=None):
        """Updates the engines' properties with the dict properties (one None
        per target, as IPython 0.10). Tasks whose depend refused these
        engines are reconsidered."""
        if not isinstance(properties, dict):
            raise TypeError("set_properties takes a dict, not %r" % (type(properties).__name__,))
        return self._props("set", dict(properties), targets, block, timeout, False, "set_properties")

    def get_properties(self, keys=None, targets=None, block=None, timeout=None):
        """The engines' properties: a list of dicts by target (also for an
        int target, as IPython 0.10); keys (a name or a list of names)
        restricts each dict to those names."""
        return self._props("get", _prop_keys(keys, True), targets, block, timeout, True, "get_properties")

    def has_properties(self, keys, targets=None, block=None, timeout=None):
        """For each engine, a list of bools: whether it has each key (an
        int target: that engine's list)."""
        return self._props("has", _prop_keys(keys, False), targets, block, timeout, True, "has_properties")

    def del_properties(self, keys, targets=None, block=None, timeout=None):
        """Deletes keys from the engines' properties (a missing key is the
        engine's KeyError); returns None."""
        return self._props("del", _prop_keys(keys, False), targets, block, timeout, False, "del_properties")

    def clear_properties(self, targets=None, block=None, timeout=None):
        """Empties the engines' properties; returns None."""
        return self._props("clear", None, targets, block, timeout, False, "clear_properties")

    # -- lifetime
    def kill(self, controller=False, targets=None, block=None, timeout=None):
        """Stops the target engines (one None per target); controller=True
        also shuts the whole cluster down."""
        targets, block = self._find(targets, block)
        result = self._each(_c.K_KILL, [], targets, True if controller else block, timeout, "kill")
        if controller:
            return self.shutdown(timeout=timeout)
        return result

    #: Ctrl-C while a blocking call waits also interrupts the code it
    #: started on the engines (as IPython users expect of %px).
    interrupt_on_ctrl_c = True

    def interrupt(self, targets=None, timeout=None):
        """Raises KeyboardInterrupt in the user code running now on the
        target engines, whichever client sent it (the engines live on;
        queued requests are left for clear_queue). Returns {'interrupted':
        [...], 'idle': [...], 'unreachable': [...], 'dead': [...]}: engines
        that ran nothing are left alone; 'unreachable' ones cannot be
        reached (see the guide). Code blocked in an MPI collective of the
        engines' comm is reached (its blocking calls poll); code blocked
        in other C code is reached when it returns. Ctrl-C during a
        blocking call interrupts only that call's own requests."""
        targets, _block = self._find(targets, True)
        return self._controller(_c.K_INTERRUPT, _identity, True, timeout, targets)

    def _interrupt_requests(self, targets, req_ids, timeout=None):
        """INTERRUPT of this client's requests req_ids only (wire req_ids):
        an engine is interrupted only while one of them runs there, and
        those still queued on targets are removed (AbortedError). The
        reply adds 'busy' (engines running something else, left alone)
        and 'aborted' (how many queued requests were removed)."""
        import struct
        target, tlist, _single = _parse_targets(targets)
        rid = self._send(_c.K_INTERRUPT, target, [struct.pack("<%dQ" % len(req_ids), *req_ids)], tlist)
        return self._finish([rid], _controller_json, True, timeout, ids=[None])

    def _interrupt_pending(self, pr):
        """Ctrl-C hook of PendingResult: interrupts the requests pr waits for."""
        if not self.interrupt_on_ctrl_c or self._conn is None:
            return
        self._interrupt_quietly(pr.targets if pr.targets is not None else self._targets, pr._pending)

    def _interrupt_quietly(self, targets, req_ids=None):
        """The interrupt a Ctrl-C sends, for the requests req_ids of this
        client (all running code of targets when None): a second Ctrl-C
        meanwhile waits until it is sent (SIGINT held back in the main
        thread, then raised as usual), so the engines are interrupted
        whatever the user presses; errors (a closed link) are dropped."""
        import signal
        import threading
        if req_ids is not None:
            req_ids = [r for r in req_ids if r]
            if not req_ids:
                return
        main = threading.current_thread() is threading.main_thread()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if main else None
        try:
            if req_ids is None:
                self.interrupt(targets, timeout=5)
            else:
                self._interrupt_requests(targets, req_ids, timeout=5)
        except Exception:
            pass
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def shutdown(self, block=True, timeout=None):
        """Stops the whole cluster: controller and every engine."""
        return self._controller(_c.K_SHUTDOWN, _identity, block, timeout)

    # -- measurements
    def benchmark(self, push_size=10000):
        """Latency and push throughput of this cluster (IPython 0.10):
        {'single_engine_latency': (ms, 'msec'), 'all_engine_latency': ...,
        'all_engine_push': (MB/s, 'MB/sec'), 'single_engine_push': ...}
        (the push figures need numpy). Runs on the engines alive, engine
        the first of them for the single-engine figures."""
        import timeit
        ids = self.get_ids()
        if not ids:
            raise EngineError(_c.ENOENT, "no engines are alive")
        first = ids[0]
        repeat, count = 3, 10

        def best(f):
            return min(timeit.repeat(f, repeat=repeat, number=count)) / count

        out = {}
        out["single_engine_latency"] = (1000 * best(lambda: self.execute("pass", targets=first, block=True)),
                                        "msec")
        out["all_engine_latency"] = (1000 * best(lambda: self.execute("pass", targets="all", block=True)),
                                     "msec")
        try:
            import numpy
        except ImportError:
            return out
        d = dict(a=numpy.zeros(push_size, dtype="float64"))
        mb = 1e-6 * push_size * 8
        out["all_engine_push"] = (mb / best(lambda: self.push(d, targets="all", block=True)), "MB/sec")
        out["single_engine_push"] = (mb / best(lambda: self.push(d, targets=first, block=True)), "MB/sec")
        self.execute("del a", targets="all", block=True)
        return out


class MultiEngineMapper:
    """What mec.mapper() returns: map(func, *sequences) with fixed options
    (IPython 0.10's MultiEngineMapper). targets and block None mean the
    client's attributes when map is called."""

    def __init__(self, multiengine, dist="b", targets=None, block=None):
        self.multiengine = multiengine
        self.dist = dist
        self.targets = targets
        self.block = block

    def map(self, func, *sequences):
        """Like the builtin map, in parallel; a list (or a PendingResult)."""
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        return self.multiengine.raw_map(func, list(sequences), dist=self.dist, targets=self.targets,
                                        block=self.block)


class Serialized:
    """A value kept serialized (push_serialized / pull_serialized):
    serialize(obj) makes one; unserialize() gives the value back;
    getDataSize() is its size in MB, as IPython 0.10's."""

    def __init__(self, parts, index=None):
        self._parts = list(parts)
        self._index = index

    def unserialize(self):
        value = _serialize.loads(self._parts)
        return value if self._index is None else value[self._index]

    def getData(self):
        return self._parts

    def getDataSize(self):
        return sum(memoryview(p).nbytes for p in self._parts) / 1e6

    def __reduce__(self):
        # Pushed inside a namespace dict: the engine gets the value itself.
        return (_unserialize_parts, (self._parts, self._index))

    def __repr__(self):
        return "<Serialized %d bytes>" % sum(memoryview(p).nbytes for p in self._parts)


def _unserialize_parts(parts, index):
    value = pickle.loads(parts[0], buffers=parts[1:])
    return value if index is None else value[index]


def serialize(obj):
    """obj as a Serialized (for push_serialized)."""
    return Serialized([bytes(p) for p in _serialize.dumps(obj)])


def _check_block(block):
    if block not in (True, False):
        raise ValueError("block must be True or False, not %r" % (block,))
    return bool(block)


def _check_dist(dist):
    if dist != "b":
        raise ValueError("dist must be 'b' (contiguous blocks, the only distribution IPython 0.10 had), "
                         "not %r" % (dist,))


def _names_list(keys):
    if isinstance(keys, (bytes, dict)) or not hasattr(keys, "__iter__"):
        raise TypeError("names: a str or a list or tuple of str, not %r" % (keys,))
    names = list(keys)
    for k in names:
        if not isinstance(k, str):
            raise TypeError("names are str, not %r" % (k,))
    return names


def _prop_keys(keys, none_ok):
    if keys is None and none_ok:
        return None
    if isinstance(keys, str):
        return [keys]
    if keys is None or not hasattr(keys, "__iter__"):
        raise TypeError("keys must be a name or a list of names")
    return list(keys)


def _apply_each(mec, f, args, targets, timeout, method):
    """A PendingResult of f(*args) on each engine of the list targets (f
    a function the engines can import); its value: one result per target,
    in their order; errors name method (the user's call)."""
    def post(rs, order):
        return _engine_results(rs, lambda meta, parts: _serialize.loads(parts[1:]), method, order)

    return mec._request(_c.K_APPLY, _serialize.dumps((f, tuple(args), {})), list(targets), post, False, timeout)
