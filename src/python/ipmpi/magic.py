"""The parallel magics of IPython 0.10, as an IPython extension.

    In [1]: from ipmpi import client
    In [2]: mec = client.MultiEngineClient()
    In [3]: mec.activate()            # or: %load_ext ipmpi.magic, then activate
    In [4]: %px import numpy          # runs on mec.targets, blocking as mec.block
    Executing command on Controller
    Out[4]:
    <Results List>
    [0] In [1]: import numpy
    ...
    In [5]: %result                   # the last result on each engine (%result 3: number 3)
    In [6]: %autopx                   # every input runs on the engines until %autopx again
    In [7]: %%px --targets 0,2 --noblock
       ...: x = 1                     # a cell on engines 0 and 2, without waiting

%px and %%px return what mec.execute returns (a ResultList, or a
PendingResult when not blocking), so IPython shows it as Out[n]. A failure
on the engines prints each engine's remote traceback instead of a local
one. Outside IPython there are no magics; activate() still records the
client (and says so).
"""
import ast
import re
import sys

NO_ACTIVE_CONTROLLER = """
Error:  No Controller is activated
Use activate() on a MultiEngineClient object to activate it for magics.
"""

_active = None        # the MultiEngineClient the magics use
_autopx = {}          # shell -> its own run_cell while %autopx is on


def active():
    """The active MultiEngineClient (None if none)."""
    return _active


def activate(mec):
    """Makes mec the client of the magics; in IPython also loads them."""
    global _active
    _active = mec
    ip = _ipython()
    if ip is None:
        print("The IPython Controller magics only work within IPython.")
        return
    load_ipython_extension(ip)


def _ipython():
    if "IPython" not in sys.modules:
        return None
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _client():
    if _active is None:
        print(NO_ACTIVE_CONTROLLER)
        return None
    if getattr(_active, "_conn", None) is None or _active._conn.closed:
        print("\nError:  the active MultiEngineClient is closed\n"
              "Use activate() on an open MultiEngineClient object.\n")
        return None
    return _active


def show_error(e, out=None):
    """Prints a failure of engine code: each engine's remote traceback."""
    from . import client
    out = out or sys.stdout
    if isinstance(e, client.CompositeError):
        print(str(e), file=out)
        for _et, ev, _tb in e.elist:
            print(file=out)
            print(e._get_engine_str(ev), file=out)
            print(e._get_traceback(ev), file=out)
    elif isinstance(e, client.RemoteError):
        print("[%s:execute]: %s: %s" % (e.engine_id, e.etype, e.evalue), file=out)
        print((e.traceback or "").rstrip("\n"), file=out)
    else:
        print("%s: %s" % (type(e).__name__, e), file=out)


def _run(mec, code, stream=None, merge=None, **kw):
    """mec.execute(code); a failure on the engines is printed, not raised.
    The output streams while the code runs when stream is True, or when
    None and mec.px_stream says so (its default None: when a person reads
    it, in a terminal or Jupyter); merge (None: mec.px_merge) shows lines
    printed alike by several engines once."""
    from . import client, output
    if stream is None:
        stream = getattr(mec, "px_stream", None)
        if stream is None:
            stream = output.interactive()
    if merge is None:
        merge = bool(getattr(mec, "px_merge", False))
    try:
        return mec.execute(code, stream=stream, merge=merge, **kw)
    except (client.CompositeError, client.RemoteError, client.EngineError) as e:
        show_error(e)
        return None


def px(line):
    """%px code: executes code on the engines of the active client
    (mec.targets; blocking as mec.block) and returns its result."""
    mec = _client()
    if mec is None:
        return None
    print("Executing command on Controller")
    return _run(mec, line)


def result(line=""):
    """%result [i]: the result of execution i (default: the last) on each
    engine of the active client."""
    mec = _client()
    if mec is None:
        return None
    try:
        index = int(line)
    except ValueError:
        index = None
    try:
        return mec.get_result(index)
    except Exception as e:
        show_error(e)
        return None


def _parse_targets(text):
    text = text.strip()
    if text == "all":
        return "all"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError("--targets: 'all', an engine id or a list of ids (0,2 or [0,2]), not %r"
                         % (text,)) from None
    if isinstance(value, tuple):
        value = list(value)
    return value


def _cell_args(line):
    """{targets, block, stream, merge} from %%px's options: --targets T
    (all, 2, 0,2 or [0, 2]), --noblock, --block, --stream, --no-stream,
    --merge."""
    targets = block = stream = merge = None
    args = re.findall(r"\[[^\]]*\]?|\S+", line)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--noblock":
            block = False
        elif a == "--block":
            block = True
        elif a == "--stream":
            stream = True
        elif a == "--no-stream":
            stream = False
        elif a == "--merge":
            merge = True
        elif a == "--targets" or a.startswith("--targets="):
            if "=" in a:
                text = a.split("=", 1)[1]
            else:
                i += 1
                if i >= len(args):
                    raise ValueError("--targets needs a value: all, an engine id or a list of ids")
                text = args[i]
            targets = _parse_targets(text)
        else:
            raise ValueError("%%px: unknown option %r (options: --targets T, --noblock, --block, --stream, "
                             "--no-stream, --merge)" % (a,))
        i += 1
    return {"targets": targets, "block": block, "stream": stream, "merge": merge}


def px_cell(line, cell):
    """%%px [--targets T] [--noblock] [--stream | --no-stream] [--merge]:
    executes the cell on the engines."""
    mec = _client()
    if mec is None:
        return None
    try:
        opts = _cell_args(line)
    except ValueError as e:
        print("UsageError: %s" % e, file=sys.stderr)
        return None
    print("Executing command on Controller")
    return _run(mec, cell.rstrip("\n"), **opts)


def autopx(line=""):
    """%autopx: toggles the mode in which every input runs on the engines
    of the active client (until %autopx again)."""
    ip = _ipython()
    if ip is None:
        print("%autopx needs IPython")
        return
    if ip in _autopx:
        _disable(ip)
    else:
        _enable(ip)


def _enable(ip):
    if _client() is None:
        return
    own = ip.run_cell

    def pxrun_cell(raw_cell, store_history=False, silent=False, shell_futures=True, *args, **kw):
        text = raw_cell.strip()
        if not text or text.lstrip("%").split()[0] == "autopx":
            return own(raw_cell, store_history, silent, shell_futures, *args, **kw)
        return _px_cell(ip, raw_cell, store_history, silent, shell_futures, *args, **kw)

    _autopx[ip] = own
    ip.run_cell = pxrun_cell
    print("Auto Parallel Enabled\nType %autopx to disable")


def _disable(ip):
    own = _autopx.pop(ip, None)
    if own is None:
        return
    try:
        del ip.run_cell          # the instance attribute: back to the class's
    except AttributeError:
        pass
    if ip.run_cell != own:
        ip.run_cell = own
    print("Auto Parallel Disabled")


def _px_cell(ip, raw_cell, store_history, silent, shell_futures, *args, **kw):
    """One input in %autopx mode: runs on the engines, its result printed."""
    from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult
    cell_id = kw.get("cell_id", args[0] if args else None)
    try:
        info = ExecutionInfo(raw_cell, store_history, silent, shell_futures, cell_id)
    except TypeError:  # an IPython before cell_id
        info = ExecutionInfo(raw_cell, store_history, silent, shell_futures)
    res = ExecutionResult(info)
    if store_history:
        ip.history_manager.store_inputs(ip.execution_count, raw_cell, raw_cell)
    try:
        mec = _client()
        if mec is not None:
            r = _run(mec, raw_cell)
            if r is not None:
                print(repr(r))
            res.result = r
    finally:
        if store_history:
            ip.execution_count += 1
    return res


def load_ipython_extension(ip):
    """%load_ext ipmpi.magic: registers %px (and %%px), %result, %autopx."""
    ip.register_magic_function(px, "line", "px")
    ip.register_magic_function(px_cell, "cell", "px")
    ip.register_magic_function(result, "line", "result")
    ip.register_magic_function(autopx, "line", "autopx")


def unload_ipython_extension(ip):
    if ip in _autopx:
        _disable(ip)
