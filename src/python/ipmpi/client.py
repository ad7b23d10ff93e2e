"""The API users type: IPython 0.x's MultiEngineClient and TaskClient.

    from ipmpi import client
    mec = client.MultiEngineClient()      # $IPMPI_DIR/security/ipcontroller-mec.furl
    mec.execute('print("Hello World")')   # a ResultList, shown as IPython 0.x did
    mec.push(dict(a=5)); mec.pull('a'); mec['b'] = 2
    mec.scatter('x', range(16)); mec.gather('x'); mec.map(f, seq)

The package is split by role (DESIGN.md section 8): errors, results
(ResultList, PendingResult), connect (furls, the link, targets), multiengine
(MultiEngineClient), task (tasks, TaskResult, TaskClient) and magic; this
module is IPython 0.10's import path and gathers them.

This layer is thin: the transport, framing and result tracking live in the
C module ipmpi._ipmpi (TLS 1.3, GIL released around all I/O); payloads are
made by ipmpi._serialize (pickle protocol 5, large buffers out of band, so a
numpy array goes from the caller's memory to the socket and comes back into
its final buffer without a copy). The wire is doc/protocol.md section 2.

Thread safety: a client may be used from several threads; each call is one
or a few requests on the shared, thread-safe connection.
"""
from . import _ipmpi as _c  # noqa: F401  (tests and tools reach the constants as client._c)
from .connect import (_Base, _concatenate, _connect, _is_int, _map_chunk, _parse_targets,  # noqa: F401
                      _partition, _read_furl, default_furl_file)
from .errors import (AbortedError, CompositeError, DeadEngineError, EngineError, EvictedError,  # noqa: F401
                     InvalidDeferredID, RemoteError, ResultNotCompleted, TaskAborted, TaskTimeoutError,
                     _rebuild_exception)
from .multiengine import MultiEngineClient, MultiEngineMapper, Serialized, serialize
from .results import PendingResult, ResultList, _composite, _engine_results, _result_dict  # noqa: F401
from .task import MapTask, ResultNS, StringTask, Task, TaskClient, TaskResult

# The private names above are the helpers that tests and the magics reach
# through this module.

__all__ = [
    "MultiEngineClient", "TaskClient", "PendingResult", "ResultList",
    "RemoteError", "CompositeError", "EngineError", "DeadEngineError",
    "AbortedError", "ResultNotCompleted", "InvalidDeferredID", "default_furl_file",
    "MultiEngineMapper", "Serialized", "serialize",
    "StringTask", "MapTask", "Task", "TaskResult", "ResultNS",
    "EvictedError", "TaskTimeoutError", "TaskAborted",
]

# Users meet these classes as ipmpi.client.X (IPython 0.10's
# IPython.kernel.client.X): reprs, tracebacks and pickles say so, wherever
# the class is defined.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
