"""Unit tests of ipmpi._engine.Engine, driven directly (no MPI): requests are
built as the controller would send them (parts made by ipmpi._serialize,
received as bytearrays) and each reply is decoded and checked."""
import pickle
import sys

import numpy as np
import pytest

from ipmpi import _engine, _serialize
from ipmpi._engine import (EREJECT, EREMOTE, F_PROPS, K_APPLY, K_EXECUTE, K_GET_RESULT, K_KEYS,
                           K_KILL, K_PROPS, K_PULL, K_PUSH, K_RESET, K_TASK_SUBMIT, OK, Engine)


@pytest.fixture
def eng():
    saved_main = sys.modules["__main__"]
    e = Engine(3, 4, {"id": 3})
    yield e
    sys.modules["__main__"] = saved_main


def as_received(parts):
    """Parts as the C side hands them over: one bytearray per part."""
    return [bytearray(p) for p in parts]


def call(eng, kind, parts=()):
    status, meta, rest, exit_after, _ = call_flags(eng, kind, parts)
    return status, meta, rest, exit_after


def call_flags(eng, kind, parts=()):
    """call, plus the reply's header flags."""
    status, reply, exit_after, flags = eng.handle(kind, as_received(parts))
    meta = pickle.loads(reply[0])
    return status, meta, reply[1:], exit_after, flags


def execute(eng, code):
    return call(eng, K_EXECUTE, [code.encode()])


def push(eng, values):
    return call(eng, K_PUSH, _serialize.dumps(values))


def pull(eng, names):
    status, meta, rest, _ = call(eng, K_PULL, _serialize.dumps(names))
    return status, meta, (_serialize.loads(as_received(rest)) if status == OK else None)


def main_function(src, name):
    """A function defined in __main__, as one typed at the client's prompt."""
    g = {"__name__": "__main__"}
    exec(src, g)
    return g[name]


def test_execute_captures_stdout_and_stderr_and_numbers_from_one(eng):
    status, meta, rest, exit_after = execute(eng, "import sys\nprint('hi')\nprint('oops', file=sys.stderr)")
    assert status == OK and rest == [] and exit_after is False
    assert meta["stdout"] == "hi\n"
    assert meta["stderr"] == "oops\n"
    assert meta["number"] == 1
    # The engine id travels in the frame's header only (so that agreeing
    # engines send the same bytes, folded in trees); the client puts it back.
    assert "id" not in meta and meta["kind"] == "execute"
    assert meta["input"].startswith("import sys")


def test_execute_restores_the_real_stdout_after_the_request(eng):
    before = sys.stdout, sys.stderr
    execute(eng, "print(1)")
    execute(eng, "raise ValueError('x')")
    assert (sys.stdout, sys.stderr) == before


def test_final_expression_is_displayed_like_the_interactive_prompt(eng):
    _, meta, _, _ = execute(eng, "a = 6\na * 7")
    assert meta["stdout"] == "42\n"
    _, meta, _, _ = execute(eng, "None")
    assert meta["stdout"] == ""
    _, meta, _, _ = execute(eng, "x = 1")
    assert meta["stdout"] == ""


def test_namespace_persists_between_requests(eng):
    execute(eng, "x = 10")
    _, meta, _, _ = execute(eng, "print(x + 1)")
    assert meta["stdout"] == "11\n"


def test_counter_counts_failed_executions_too(eng):
    assert execute(eng, "1/0")[1]["number"] == 1
    assert execute(eng, "x = (")[1]["number"] == 2
    assert execute(eng, "y = 2")[1]["number"] == 3


def test_user_exception_is_a_remote_error_with_the_users_traceback(eng):
    status, meta, _, _ = execute(eng, "def f():\n    return undefined_name\n\nf()")
    assert status == EREMOTE
    assert meta["etype"] == "NameError"
    assert "undefined_name" in meta["evalue"]
    tb = meta["traceback"]
    assert "<ipmpi-input-1>" in tb and "return undefined_name" in tb
    assert "_engine.py" not in tb
    assert tb.startswith("Traceback (most recent call last):")


def test_repeated_input_names_its_own_execution_in_the_traceback(eng):
    """Compiled inputs are cached by source; a repeat must still be labelled
    with its own execution number, nested functions included."""
    code = "def f():\n    return undefined_name\n\nf()"
    execute(eng, "pass")
    first = execute(eng, code)[1]["traceback"]
    again = execute(eng, code)[1]["traceback"]
    assert "<ipmpi-input-2>" in first and "<ipmpi-input-3>" not in first
    assert again.count("<ipmpi-input-3>") == 2, again  # the module and f's frame
    assert "<ipmpi-input-2>" not in again
    assert "return undefined_name" in again


def test_syntax_warning_lands_in_stderr_on_every_execution():
    """Code whose compilation warns is never cached, so the warning is in the
    request's stderr every time. Run in a fresh interpreter: pytest's own
    warnings capture would swallow it here."""
    import subprocess
    script = (
        "import pickle\n"
        "from ipmpi._engine import Engine, K_EXECUTE\n"
        "e = Engine(0, 1, {'id': 0})\n"
        "for _ in range(2):\n"
        "    st, rep, _, _ = e.handle(K_EXECUTE, [bytearray(b'x = 5\\ny = x is 5')])\n"
        "    m = pickle.loads(rep[0])\n"
        "    print(st, 'SyntaxWarning' in m['stderr'])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["0 True", "0 True"], (r.stdout, r.stderr)


def test_syntax_error_reports_the_line(eng):
    status, meta, _, _ = execute(eng, "x = = 2")
    assert status == EREMOTE and meta["etype"] == "SyntaxError"
    assert "x = = 2" in meta["traceback"]


def test_sys_exit_does_not_end_the_engine(eng):
    status, meta, _, exit_after = execute(eng, "import sys; print('bye'); sys.exit(3)")
    assert status == EREMOTE and meta["etype"] == "SystemExit" and meta["evalue"] == "3"
    assert meta["stdout"] == "bye\n" and exit_after is False
    assert execute(eng, "print('alive')")[1]["stdout"] == "alive\n"


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "MemoryError", "RecursionError"])
def test_base_exceptions_are_results(eng, exc):
    status, meta, _, _ = execute(eng, "raise %s('boom')" % exc)
    assert status == EREMOTE and meta["etype"] == exc and meta["evalue"] == "boom"


def test_exception_with_failing_str_still_replies(eng):
    code = "class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise E()"
    status, meta, _, _ = execute(eng, code)
    assert status == EREMOTE and meta["etype"] == "E"
    assert "unprintable" in meta["evalue"]


def test_invalid_utf8_code_is_a_remote_error(eng):
    status, meta, _, _ = call(eng, K_EXECUTE, [b"\xff\xfe"])
    assert status == EREMOTE and meta["etype"] == "UnicodeDecodeError"


def test_push_then_pull_round_trips_values(eng):
    assert push(eng, dict(a=5, b=[1, "two"]))[0] == OK
    status, meta, values = pull(eng, ["b", "a"])
    assert status == OK and meta["kind"] == "pull"
    assert values == [[1, "two"], 5]


def test_pushed_values_are_visible_to_execute(eng):
    push(eng, dict(a=5))
    assert execute(eng, "print(a * 2)")[1]["stdout"] == "10\n"


def test_pull_of_missing_name_is_remote_name_error(eng):
    status, meta, values = pull(eng, ["nope"])
    assert status == EREMOTE and values is None
    assert meta["etype"] == "NameError"
    assert meta["evalue"] == "name 'nope' is not defined"


def test_pull_of_unpicklable_value_still_replies_with_an_error(eng):
    execute(eng, "import threading\nlk = threading.Lock()")
    status, meta, values = pull(eng, ["lk"])
    assert status == EREMOTE and meta["etype"] == "TypeError"
    assert execute(eng, "print('ok')")[1]["stdout"] == "ok\n"


def test_large_array_push_is_used_in_place_and_pulled_out_of_band(eng):
    arr = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: out of band
    parts = as_received(_serialize.dumps(dict(arr=arr)))
    assert len(parts) == 2
    status, reply, _, _ = eng.handle(K_PUSH, parts)
    assert status == OK
    got = eng.ns["arr"]
    # The received bytearray is the array's memory: no copy was made.
    assert np.shares_memory(got, np.frombuffer(parts[1], dtype=np.uint8))
    assert got.sum() == arr.sum()
    status, reply, _, _ = eng.handle(K_PULL, as_received(_serialize.dumps(["arr"])))
    assert status == OK and len(reply) == 3  # meta, pickle, the array's buffer
    assert reply[2].nbytes == arr.nbytes
    (back,) = _serialize.loads(as_received(reply[1:]))
    assert np.array_equal(back, arr)


def test_reply_with_too_many_buffers_falls_back_to_in_band(eng):
    eng.max_parts = 3
    execute(eng, "import numpy as np\nbig = [np.ones(1 << 14) for _ in range(5)]")
    status, reply, _, _ = eng.handle(K_PULL, as_received(_serialize.dumps(["big"])))
    assert status == OK and len(reply) == 2
    (big,) = _serialize.loads(as_received(reply[1:]))
    assert len(big) == 5 and all(a.sum() == 1 << 14 for a in big)


def test_pushed_main_function_sees_engine_variables(eng):
    f = main_function("def f(n):\n    return n * x", "f")
    push(eng, dict(f=f, x=3))
    _, meta, _, _ = execute(eng, "y = f(5)\nprint(y)")
    assert meta["stdout"] == "15\n"
    assert eng.ns["f"].__globals__ is eng.ns


def test_pushed_function_keeps_defaults_and_kwdefaults(eng):
    g = main_function("def g(a, b=2, *, c=3):\n    return a + b + c + x", "g")
    push(eng, dict(g=g, x=100))
    assert execute(eng, "g(1)")[1]["stdout"] == "106\n"
    assert execute(eng, "g(1, c=10)")[1]["stdout"] == "113\n"


def test_apply_returns_the_result(eng):
    status, meta, rest, _ = call(eng, K_APPLY, _serialize.dumps((divmod, (17, 5), {})))
    assert status == OK and meta["kind"] == "apply"
    assert _serialize.loads(as_received(rest)) == (3, 2)


def test_apply_of_main_function_uses_engine_namespace_and_captures_output(eng):
    push(eng, dict(scale=10))
    f = main_function("def h(v):\n    print('in h')\n    return v * scale", "h")
    status, meta, rest, _ = call(eng, K_APPLY, _serialize.dumps((f, (4,), {})))
    assert status == OK and meta["stdout"] == "in h\n"
    assert _serialize.loads(as_received(rest)) == 40


def test_apply_exception_is_remote_error(eng):
    f = main_function("def bad():\n    raise KeyError('k')", "bad")
    status, meta, rest, _ = call(eng, K_APPLY, _serialize.dumps((f, (), {})))
    assert status == EREMOTE and rest == []
    assert meta["etype"] == "KeyError" and ", in bad" in meta["traceback"]
    assert "_engine.py" not in meta["traceback"]


def test_keys_lists_sorted_user_names(eng):
    execute(eng, "b = 1\na = 2\n__hidden = 3")
    status, meta, rest, _ = call(eng, K_KEYS)
    assert status == OK and pickle.loads(rest[0]) == ["a", "b"]


def test_reset_clears_the_namespace_but_keeps_builtins(eng):
    execute(eng, "a = 1")
    assert call(eng, K_RESET)[0] == OK
    assert pickle.loads(call(eng, K_KEYS)[2][0]) == []
    assert execute(eng, "print(len('abc'))")[1]["stdout"] == "3\n"
    assert eng.ns["__name__"] == "__main__"


def test_get_result_returns_meta_of_earlier_execution(eng):
    execute(eng, "print('first')")
    execute(eng, "print('second')")
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(1))
    assert status == OK and meta["number"] == 1 and meta["stdout"] == "first\n"
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(None))
    assert meta["number"] == 2 and meta["stdout"] == "second\n"


def test_get_result_of_failed_execution_is_that_error(eng):
    execute(eng, "1/0")
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(1))
    assert status == EREMOTE and meta["etype"] == "ZeroDivisionError"


def test_get_result_of_unknown_number_is_remote_index_error(eng):
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(7))
    assert status == EREMOTE and meta["etype"] == "IndexError"
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(None))
    assert status == EREMOTE and meta["etype"] == "IndexError"


def test_history_keeps_only_the_last_thousand(eng, monkeypatch):
    monkeypatch.setattr(_engine, "HISTORY_LEN", 5)
    for i in range(8):
        execute(eng, "%d" % i)
    assert sorted(eng.history) == [4, 5, 6, 7, 8]
    assert call(eng, K_GET_RESULT, _serialize.dumps(1))[1]["etype"] == "IndexError"


def test_kill_replies_and_asks_to_exit(eng):
    status, meta, rest, exit_after = call(eng, K_KILL)
    assert status == OK and exit_after is True and meta["kind"] == "kill"


def test_unknown_kind_is_an_error_not_an_exception(eng):
    status, meta, _, exit_after = call(eng, 99)
    assert status == EREMOTE and meta["etype"] == "ValueError" and not exit_after


def test_pickles_referring_to_main_resolve_in_the_namespace(eng):
    execute(eng, "class Point:\n    def __init__(self, x):\n        self.x = x\np = Point(4)")
    status, meta, values = pull(eng, ["p"])
    assert status == OK and values[0].x == 4
    assert sys.modules["__main__"] is eng.module


def test_failure_builds_a_remote_error_reply(eng):
    status, reply, exit_after = eng.failure(K_PUSH, MemoryError("no room"))
    meta = pickle.loads(reply[0])
    assert status == EREMOTE and not exit_after
    assert meta["etype"] == "MemoryError" and meta["evalue"] == "no room" and meta["kind"] == "push"


# ---- constants generated from the C headers ----

def test_constants_come_from_the_c_tables():
    """ipmpi._consts is what gen_consts.py makes of the headers now (a stale
    copy fails here), and the engine uses those values, not its own."""
    import os
    import subprocess
    from ipmpi import _consts
    src = os.environ.get("IPMPI_SRCDIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         os.pardir, os.pardir)
    gen = subprocess.run([sys.executable, os.path.join(src, "src/python/gen_consts.py"),
                          os.path.join(src, "include/ipmpi/protocol.h"),
                          os.path.join(src, "include/ipmpi/errors.h")],
                         capture_output=True, text=True, check=True)
    with open(_consts.__file__) as f:
        assert f.read() == gen.stdout
    assert (_consts.K_EXECUTE, _consts.K_TASK_SUBMIT, _consts.K_PROPS) == (2, 14, 25)
    assert (_consts.EREMOTE, _consts.EEVICTED, _consts.EREJECT) == (-6, -20, -21)
    assert _consts.F_PROPS == 0x0020 and _consts.KIND_NAMES[14] == "task_submit"
    assert _engine.K_PUSH is _consts.K_PUSH and _engine.KIND_NAMES is _consts.KIND_NAMES
    import re
    with open(_engine.__file__) as f:
        assert not re.search(r"^(K_\w+|E[A-Z0-9]+|OK)\s*=", f.read(), re.M)


# ---- engine properties ----

def props(eng, op, arg=None):
    status, meta, rest, _, flags = call_flags(eng, K_PROPS, _serialize.dumps((op, arg)))
    value = _serialize.loads(as_received(rest)) if status == OK else None
    return status, meta, value, flags


def test_properties_start_empty_and_set_get_has_del_clear(eng):
    assert props(eng, "get") == (OK, props(eng, "get")[1], {}, 0)
    status, meta, value, flags = props(eng, "set", {"a": 1, "b": [2, 3]})
    assert status == OK and value is None and flags == F_PROPS and meta["kind"] == "props"
    assert props(eng, "get")[2:] == ({"a": 1, "b": [2, 3]}, 0)
    assert props(eng, "get", ["b"])[2] == {"b": [2, 3]}
    assert props(eng, "has", ["a", "zz", "b"])[2] == [True, False, True]
    assert props(eng, "del", ["a"])[2:] == (None, F_PROPS)
    assert props(eng, "get")[2] == {"b": [2, 3]}
    assert props(eng, "clear")[2:] == (None, F_PROPS)
    assert props(eng, "get")[2] == {}
    assert props(eng, "clear")[3] == 0  # nothing changed


def test_properties_errors_are_remote_errors_and_change_nothing(eng):
    props(eng, "set", {"a": 1})
    status, meta, _, flags = props(eng, "get", ["nope"])
    assert status == EREMOTE and meta["etype"] == "KeyError" and flags == 0
    status, meta, _, _ = props(eng, "del", ["a", "nope"])
    assert status == EREMOTE and meta["etype"] == "KeyError"
    status, meta, _, _ = props(eng, "set", {1: "x"})
    assert status == EREMOTE and meta["etype"] == "TypeError"
    status, meta, _, _ = props(eng, "frobnicate")
    assert status == EREMOTE and meta["etype"] == "ValueError"
    assert props(eng, "get")[2] == {"a": 1}


def test_property_values_must_pickle_and_a_bad_set_is_all_or_nothing(eng):
    execute(eng, "import threading\n"
                 "try:\n    properties.update(good=1, lock=threading.Lock())\n"
                 "except TypeError as e:\n    print('refused', 'lock' in str(e))")
    assert execute(eng, "print(dict(properties))")[1]["stdout"] == "{}\n"
    st, meta, _, _ = execute(eng, "import threading\nproperties['l'] = threading.Lock()")
    assert st == EREMOTE and meta["etype"] == "TypeError"


def test_properties_copy_values_in_and_out(eng):
    _, meta, _, _ = execute(eng, "L = [1, 2]\nproperties['L'] = L\nL.append(3)\n"
                                 "properties['L'].append(4)\nprint(properties['L'])")
    assert meta["stdout"] == "[1, 2]\n"


def test_user_code_changing_properties_flags_the_reply(eng):
    assert call_flags(eng, K_EXECUTE, [b"x = 1"])[4] == 0
    assert call_flags(eng, K_EXECUTE, [b"properties['gpu'] = True"])[4] == F_PROPS
    assert call_flags(eng, K_EXECUTE, [b"print(properties['gpu'], 'gpu' in properties)"])[4] == 0
    assert call_flags(eng, K_EXECUTE, [b"del properties['gpu']"])[4] == F_PROPS
    # A failed request that changed them first still says so.
    st, meta, _, _, flags = call_flags(eng, K_EXECUTE, [b"properties['a'] = 1\n1/0"])
    assert st == EREMOTE and flags == F_PROPS
    assert props(eng, "get")[2] == {"a": 1}


def test_properties_survive_reset_and_stay_out_of_keys(eng):
    props(eng, "set", {"a": 1})
    execute(eng, "properties = 'shadowed'\nz = 1")
    assert pickle.loads(call(eng, K_KEYS)[2][0]) == ["properties", "z"]  # a user's own value shows
    assert call(eng, K_RESET)[0] == OK
    assert pickle.loads(call(eng, K_KEYS)[2][0]) == []
    assert execute(eng, "print(properties['a'])")[1]["stdout"] == "1\n"


# ---- tasks ----

OPTS = {"clear_before": False, "clear_after": False, "depend": None}


def task(eng, stage):
    status, meta, rest, exit_after, flags = call_flags(eng, K_TASK_SUBMIT, _serialize.dumps(stage))
    assert exit_after is False
    value = _serialize.loads(as_received(rest)) if status == OK else None
    return status, meta, value, flags


def map_task(fn, *args, **opts):
    return ("map", fn, args, {}, dict(OPTS, **opts))


def fn_ref(f, digest=None):
    import cloudpickle
    data = cloudpickle.dumps(f, protocol=5)
    return ("fn", digest or "sha-%d" % hash(data), data)


def test_map_task_returns_the_value_with_task_meta(eng):
    import time
    before = time.time()
    status, meta, value, flags = task(eng, map_task(divmod, 17, 5))
    assert status == OK and value == (3, 2) and flags == 0
    assert meta["kind"] == "task" and meta["id"] == 3 and meta["number"] is None
    assert before <= meta["started"] <= meta["completed"] <= time.time()
    assert "etype" not in meta and "exc" not in meta


def test_map_task_kwargs_and_main_function_in_the_engine_namespace(eng):
    push(eng, dict(scale=10))
    f = main_function("def h(v, add=0):\n    print('in h')\n    return v * scale + add", "h")
    status, meta, value, _ = task(eng, ("map", fn_ref(f), (4,), {"add": 2}, OPTS))
    assert status == OK and value == 42 and meta["stdout"] == "in h\n"


def test_function_by_digest_is_unpickled_once(eng, monkeypatch):
    loads = []
    real = pickle.loads

    def counting_loads(data, *a, **kw):
        loads.append(len(data))
        return real(data, *a, **kw)

    import types
    monkeypatch.setattr(_engine, "pickle", types.SimpleNamespace(loads=counting_loads, dumps=pickle.dumps))
    f = main_function("def sq(v):\n    return v * v", "sq")
    ref = fn_ref(f, b"digest-1")
    assert [task(eng, map_task(ref, i))[2] for i in range(5)] == [0, 1, 4, 9, 16]
    assert len(loads) == 1
    # Another digest is another function.
    g = main_function("def neg(v):\n    return -v", "neg")
    assert task(eng, map_task(fn_ref(g, b"digest-2"), 3))[2] == -3
    assert len(loads) == 2


def test_function_cache_is_bounded(eng, monkeypatch):
    monkeypatch.setattr(_engine, "FN_CACHE_LEN", 3)
    for i in range(5):
        f = main_function("def k():\n    return %d" % i, "k")
        assert task(eng, map_task(fn_ref(f, i)))[2] == i
    assert list(eng._fn_cache) == [2, 3, 4]


def test_cached_function_finds_its_helpers_after_a_reset(eng):
    f = main_function("def helper(v):\n    return v + 1\ndef outer(v):\n    return helper(v) * 2", "outer")
    ref = fn_ref(f, b"outer")
    assert task(eng, map_task(ref, 1, clear_before=True))[2] == 4
    assert task(eng, map_task(ref, 2, clear_before=True, clear_after=True))[2] == 6
    assert "helper" not in eng.ns
    assert task(eng, map_task(ref, 3))[2] == 8


def test_string_task_pushes_runs_and_pulls_a_dict(eng):
    stage = ("string", "print('hello')\ny = x * 2\nz = y + 1", {"x": 20}, ("y", "z"), OPTS)
    status, meta, value, _ = task(eng, stage)
    assert status == OK and value == {"y": 40, "z": 41}
    assert meta["stdout"] == "hello\n" and meta["kind"] == "task" and meta["input"].startswith("print")
    assert eng.execution_count == 0  # tasks are not numbered executions


def test_string_task_pull_of_missing_name_fails(eng):
    status, meta, value, _ = task(eng, ("string", "a = 1", {}, ("b",), OPTS))
    assert status == EREMOTE and meta["etype"] == "NameError" and value is None


def test_failing_task_is_remote_error_with_traceback_and_exc(eng):
    stage = ("string", "def f():\n    return 1 / 0\nf()", {}, (), OPTS)
    status, meta, value, _ = task(eng, stage)
    assert status == EREMOTE and meta["etype"] == "ZeroDivisionError"
    assert "<ipmpi-task>" in meta["traceback"] and "return 1 / 0" in meta["traceback"]
    assert "_engine.py" not in meta["traceback"]
    assert isinstance(pickle.loads(meta["exc"]), ZeroDivisionError)
    assert meta["started"] <= meta["completed"]


def test_depend_true_false_and_raising(eng):
    props(eng, "set", {"gpu": True})
    status, _, value, _ = task(eng, map_task(abs, -4, depend=lambda p: p.get("gpu")))
    assert status == OK and value == 4
    execute(eng, "keep = 1")
    for depend in (lambda p: p.get("cpu"), lambda p: p["missing"], lambda p: 1 / 0):
        status, reply, exit_after, flags = eng.handle(
            K_TASK_SUBMIT, as_received(_serialize.dumps(map_task(abs, -4, depend=depend, clear_before=True))))
        assert (status, reply, exit_after, flags) == (EREJECT, [], False, 0)
        assert eng.ns["keep"] == 1  # nothing ran, not even clear_before


def test_depend_gets_a_copy_of_the_properties_and_may_be_sent_by_digest(eng):
    props(eng, "set", {"n": [1]})

    def depend(p):
        p["n"].append(2)
        p["new"] = 1
        return len(p["n"]) == 2

    status, _, value, flags = task(eng, map_task(len, "abc", depend=fn_ref(depend, b"dep")))
    assert status == OK and value == 3 and flags == 0
    assert props(eng, "get")[2] == {"n": [1]}


def test_clear_before_and_clear_after(eng):
    execute(eng, "old = 1")
    f = main_function("def look():\n    global mark\n    mark = 1\n    return 'old' in globals()", "look")
    assert task(eng, map_task(f, clear_before=True))[2] is False
    assert "mark" in eng.ns and "old" not in eng.ns
    assert task(eng, map_task(f, clear_after=True))[2] is False
    assert "mark" not in eng.ns
    # clear_after also after a failure, and properties survive both
    props(eng, "set", {"p": 1})
    stage = ("string", "junk = 1\nraise ValueError('v')", {}, (), dict(OPTS, clear_after=True))
    status, meta, _, _ = task(eng, stage)
    assert status == EREMOTE and meta["etype"] == "ValueError"
    assert "junk" not in eng.ns and eng.ns["properties"] is eng.properties
    assert props(eng, "get")[2] == {"p": 1}


def test_task_changing_properties_flags_the_reply(eng):
    f = main_function("def mark(v):\n    properties['seen'] = v\n    return v", "mark")
    status, _, value, flags = task(eng, map_task(f, 7))
    assert status == OK and value == 7 and flags == F_PROPS
    assert task(eng, map_task(abs, -1))[3] == 0
    assert props(eng, "get")[2] == {"seen": 7}


def test_unpicklable_task_payload_is_a_clear_remote_error(eng):
    missing = b"cno_such_module_xyz\nthing\n."  # a pickle naming a module the engine lacks
    cases = [([missing], "cannot unpickle the task's payload: ModuleNotFoundError"),
             ([b"not a pickle"], "cannot unpickle the task's payload: UnpicklingError"),
             (_serialize.dumps(("map", ("fn", b"d", missing), (), {}, OPTS)),
              "cannot unpickle the task's function: ModuleNotFoundError"),
             (_serialize.dumps(("bogus", 1, 2, 3, OPTS)), "a task stage must be")]
    for parts, message in cases:
        status, meta, rest, exit_after, _ = call_flags(eng, K_TASK_SUBMIT, parts)
        assert status == EREMOTE and rest == [] and not exit_after
        assert meta["kind"] == "task" and meta["started"] is not None
        assert message in meta["evalue"], meta
    assert "d" not in eng._fn_cache and b"d" not in eng._fn_cache


def test_task_value_that_cannot_be_pickled_still_replies(eng):
    status, meta, _, _ = task(eng, ("string", "import threading\nlk = threading.Lock()", {}, ("lk",),
                                    dict(OPTS, clear_after=True)))
    assert status == EREMOTE and meta["etype"] == "TypeError" and "lk" not in eng.ns


# ---- remote exceptions travel pickled ----

def test_failed_requests_carry_the_pickled_exception(eng):
    meta = execute(eng, "raise KeyError('k')")[1]
    exc = pickle.loads(meta["exc"])
    assert type(exc) is KeyError and exc.args == ("k",)
    f = main_function("def bad():\n    raise OSError(2, 'gone')", "bad")
    meta = call(eng, K_APPLY, _serialize.dumps((f, (), {})))[1]
    assert isinstance(pickle.loads(meta["exc"]), FileNotFoundError)
    meta = pickle.loads(eng.failure(K_PUSH, MemoryError("no room"))[1][0])
    assert type(pickle.loads(meta["exc"])) is MemoryError
    # An exception class defined on the engine travels by value.
    meta = execute(eng, "class MyError(Exception):\n    pass\nraise MyError('mine')")[1]
    exc = pickle.loads(meta["exc"])
    assert type(exc).__name__ == "MyError" and exc.args == ("mine",)


@pytest.mark.parametrize("code", [
    # its __init__ does not take its args: it would not load on the client
    "class E(Exception):\n    def __init__(self, a, b):\n        super().__init__(a)\nraise E(1, 2)",
    # holds something that does not pickle
    "import threading\nraise ValueError(threading.Lock())",
    # too big
    "raise ValueError('x' * 100000)",
    # its pickling raises something odd
    "class E(Exception):\n    def __reduce__(self):\n        raise SystemExit\nraise E()",
])
def test_exceptions_that_do_not_travel_leave_exc_out(eng, code):
    status, meta, _, _ = execute(eng, code)
    assert status == EREMOTE and "exc" not in meta and meta["etype"]
    assert execute(eng, "print('ok')")[1]["stdout"] == "ok\n"


def test_history_is_bounded_by_bytes_too(eng, monkeypatch):
    monkeypatch.setattr(_engine, "HISTORY_BYTES", 1000)
    for i in range(5):
        status, meta, _, _ = execute(eng, "print('x' * 600)")
        assert status == OK
    # Each entry holds ~620 bytes: only the newest fits the budget.
    assert list(eng.history) == [5]
    assert eng._history_bytes <= 1000
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(5))
    assert status == OK and meta["stdout"] == "x" * 600 + "\n"
    status, meta, _, _ = call(eng, K_GET_RESULT, _serialize.dumps(1))
    assert status == EREMOTE and meta["etype"] == "IndexError"
    # The newest is kept whatever its size.
    execute(eng, "print('y' * 5000)")
    assert list(eng.history) == [6]


def test_sources_in_linecache_are_bounded_by_bytes_too(eng, monkeypatch):
    # Sources stay in linecache for tracebacks, within the history's byte
    # budget: big sources do not pile up (the newest is kept whatever its size).
    import linecache
    monkeypatch.setattr(_engine, "HISTORY_BYTES", 10000)
    names = []
    for i in range(5):
        status, meta, _, _ = execute(eng, "n = len(%r)" % ("a" * 6000))
        assert status == OK
        names.append(eng._input_name(meta["number"]))
    assert [n in linecache.cache for n in names] == [False] * 4 + [True]
    assert eng._input_bytes <= 10000 and [n for n, _ in eng._input_names] == names[-1:]
    # Small ones share the budget and tracebacks still show their lines.
    for i in range(3):
        execute(eng, "k = %d" % i)
    status, meta, _, _ = execute(eng, "x = 1\n1 / 0")
    assert status == EREMOTE and "1 / 0" in meta["traceback"]
    assert names[-1] in linecache.cache and len(eng._input_names) == 5
    execute(eng, "print('y' * 20000)")   # output does not count here
    assert names[-1] in linecache.cache and len(eng._input_names) == 6
    execute(eng, "m = %r" % ("b" * 5000))   # a source that does: the oldest go
    assert names[-1] not in linecache.cache and len(eng._input_names) == 6
    assert eng._input_bytes <= 10000


def test_a_background_thread_does_not_write_into_later_requests(eng, capsys):
    status, meta, _, _ = execute(eng, "\n".join([
        "import threading, time",
        "go = threading.Event()",
        "def chatter():",
        "    go.wait(10)",
        "    print('from the background')",
        "t = threading.Thread(target=chatter)",
        "t.start()",
        "print('started')",
    ]))
    assert status == OK and meta["stdout"] == "started\n"
    status, meta, _, _ = execute(eng, "go.set(); t.join(10); print('joined')")
    assert status == OK
    assert meta["stdout"] == "joined\n", meta["stdout"]
    # Not lost: it went to the engine's own stdout (its log).
    assert "from the background" in capsys.readouterr().out


def test_threads_a_request_starts_write_into_that_request(eng, capsys):
    # A thread started and joined by the request, and a ThreadPoolExecutor's
    # workers: their output is the request's.
    status, meta, _, _ = execute(eng, "\n".join([
        "import threading",
        "t = threading.Thread(target=print, args=('from a thread this request joins',))",
        "t.start(); t.join()",
        "print('main')",
    ]))
    assert status == OK and meta["stdout"] == "from a thread this request joins\nmain\n", meta["stdout"]
    status, meta, _, _ = execute(eng, "\n".join([
        "from concurrent.futures import ThreadPoolExecutor",
        "with ThreadPoolExecutor(2) as ex: r = list(ex.map(print, ['w1', 'w2']))",
    ]))
    assert status == OK and sorted(meta["stdout"].split()) == ["w1", "w2"], meta["stdout"]
    # stderr too, and a _thread thread without a Thread object.
    status, meta, _, _ = execute(eng, "\n".join([
        "import _thread, sys, threading",
        "done = threading.Event()",
        "def work():",
        "    sys.stderr.write('raw thread\\n'); done.set()",
        "_thread.start_new_thread(work, ())",
        "done.wait(10)",
    ]))
    assert status == OK and meta["stderr"] == "raw thread\n", meta["stderr"]
    # A thread this request started that writes after the request ended:
    # the log, not the next request.
    status, meta, _, _ = execute(eng, "\n".join([
        "import threading",
        "go2, out2 = threading.Event(), threading.Event()",
        "def late():",
        "    go2.wait(10); print('after its request'); out2.set()",
        "t2 = threading.Thread(target=late); t2.start()",
        "print('started')",
    ]))
    assert status == OK and meta["stdout"] == "started\n"
    capsys.readouterr()
    status, meta, _, _ = execute(eng, "go2.set(); out2.wait(10); t2.join(10); print('next')")
    assert status == OK and meta["stdout"] == "next\n", meta["stdout"]
    assert "after its request" in capsys.readouterr().out


def test_a_pool_made_by_an_earlier_request_writes_to_the_log(eng, capsys):
    execute(eng, "from concurrent.futures import ThreadPoolExecutor\nex = ThreadPoolExecutor(1)\n"
                 "ex.submit(int).result()")
    capsys.readouterr()
    status, meta, _, _ = execute(eng, "ex.submit(print, 'old worker').result(); print('mine')")
    assert status == OK and meta["stdout"] == "mine\n", meta["stdout"]
    assert "old worker" in capsys.readouterr().out
    execute(eng, "ex.shutdown()")


# ---------------------------------------------------------------- output bounds and streaming

def test_a_request_keeps_at_most_output_max_of_its_output(eng, monkeypatch):
    monkeypatch.setattr(_engine, "OUTPUT_MAX", 100)
    _status, meta, _rest, _exit = execute(eng, "for i in range(50): print('x' * 9)")
    assert meta["stdout"].startswith("x" * 9 + "\n")
    kept, note = meta["stdout"][:100], meta["stdout"][100:]
    assert kept == ("x" * 9 + "\n") * 10
    assert "400 more characters of stdout were cut" in note


class Sent:
    def __init__(self, ok=True):
        self.frames = []
        self.ok = ok

    def __call__(self, name, data):
        self.frames.append((name, bytes(data).decode()))
        return self.ok


def test_streamer_sends_whole_lines_at_most_every_gap_and_the_rest_at_the_end(monkeypatch):
    sent = Sent()
    s = _engine._Streamer(sent)       # no flusher: held lines wait for the next write or finish
    s.add("stdout", "a")
    assert sent.frames == []          # not a whole line yet
    s.add("stdout", "\n")
    assert sent.frames == [("stdout", "a\n")]
    s.add("stdout", "b\nc")           # within the gap: held
    s.add("stderr", "e\n")
    assert sent.frames == [("stdout", "a\n")]
    monkeypatch.setattr(_engine, "STREAM_GAP", 0.0)
    s.add("stdout", "d\n")
    assert sent.frames[1:] == [("stdout", "b\ncd\n"), ("stderr", "e\n")]
    s.add("stdout", "tail")
    s.finish()
    assert sent.frames[-1] == ("stdout", "tail")


def test_streamer_stops_after_stream_max_with_a_note_and_after_a_failed_send(monkeypatch):
    monkeypatch.setattr(_engine, "STREAM_GAP", 0.0)
    monkeypatch.setattr(_engine, "STREAM_MAX", 10)
    sent = Sent()
    s = _engine._Streamer(sent)
    s.add("stdout", "0123456789abc\n")
    assert sent.frames[0][1].startswith("0123456789\n[ipmpi: streaming of stdout stopped")
    s.add("stdout", "more\n")
    s.finish()
    assert len(sent.frames) == 1
    failing = Sent(ok=False)
    s = _engine._Streamer(failing)
    s.add("stdout", "one\n")
    s.add("stdout", "two\n")
    assert failing.frames == [("stdout", "one\n")]


def test_requests_do_not_stream_outside_an_engine(eng):
    # The unit tests run without the engine's C module: no streamer is made.
    assert _engine._ipmpi_engine is None
    out, err, streamer = eng._captures((sys.stdout, sys.stderr))
    assert streamer is None
