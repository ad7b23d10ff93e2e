"""Unit tests of ipmpi._engine.Engine, driven directly (no MPI): requests are
built as the controller would send them (parts made by ipmpi._serialize,
received as bytearrays) and each reply is decoded and checked."""
import pickle
import sys

import numpy as np
import pytest

from ipmpi import _engine, _serialize
from ipmpi._engine import (EREMOTE, K_APPLY, K_EXECUTE, K_GET_RESULT, K_KEYS, K_KILL,
                           K_PULL, K_PUSH, K_RESET, OK, Engine)


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
    status, reply, exit_after = eng.handle(kind, as_received(parts))
    meta = pickle.loads(reply[0])
    return status, meta, reply[1:], exit_after


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
    assert meta["id"] == 3 and meta["kind"] == "execute"
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
        "    st, rep, _ = e.handle(K_EXECUTE, [bytearray(b'x = 5\\ny = x is 5')])\n"
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
    status, reply, _ = eng.handle(K_PUSH, parts)
    assert status == OK
    got = eng.ns["arr"]
    # The received bytearray is the array's memory: no copy was made.
    assert np.shares_memory(got, np.frombuffer(parts[1], dtype=np.uint8))
    assert got.sum() == arr.sum()
    status, reply, _ = eng.handle(K_PULL, as_received(_serialize.dumps(["arr"])))
    assert status == OK and len(reply) == 3  # meta, pickle, the array's buffer
    assert reply[2].nbytes == arr.nbytes
    (back,) = _serialize.loads(as_received(reply[1:]))
    assert np.array_equal(back, arr)


def test_reply_with_too_many_buffers_falls_back_to_in_band(eng):
    eng.max_parts = 3
    execute(eng, "import numpy as np\nbig = [np.ones(1 << 14) for _ in range(5)]")
    status, reply, _ = eng.handle(K_PULL, as_received(_serialize.dumps(["big"])))
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
