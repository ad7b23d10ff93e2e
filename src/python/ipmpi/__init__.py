"""ipmpi: interactive parallel Python for supercomputers.

A controller and engines run as one MPI job; clients attach over TLS:

    from ipmpi import client
    mec = client.MultiEngineClient()

or, as ipyparallel 7/8 spells it (ipmpi.modern, doc/modern.rst):

    import ipmpi
    rc = ipmpi.Client(); rc[:].apply_sync(f); rc.load_balanced_view().map_sync(f, seq)

Importing the package itself is cheap and needs neither MPI nor the C
extension: engines import ipmpi._engine, clients ipmpi.client.
"""
__version__ = "0.1.0"

# The modern (ipyparallel-style) names, imported on first use so that
# `import ipmpi` stays cheap for the engines.
_MODERN = ("Client", "DirectView", "LoadBalancedView", "AsyncResult", "AsyncMapResult", "require",
           "interactive")
# Errors, as ipyparallel exports them at the top level.
_ERRORS = ("CompositeError", "RemoteError", "EngineError", "DeadEngineError", "AbortedError")


def __getattr__(name):
    if name in _MODERN:
        from . import modern
        return getattr(modern, name)
    if name in _ERRORS:
        from . import errors
        return getattr(errors, name)
    raise AttributeError("module 'ipmpi' has no attribute %r" % (name,))


def __dir__():
    return sorted(list(globals()) + list(_MODERN) + list(_ERRORS))
