"""Node-shared arrays: ``mec.push(dict(a=big_array), shared=True)``.

A push normally gives every engine its own copy: 64 engines on a node hold
a 64 MB array 64 times. With ``shared=True`` each node holds it once: the
array goes to one engine per node (the lowest id there), which writes it
into a shared-memory segment of that node (a file of /dev/shm); every
target engine of the node then maps the segment and finds the name bound
to a read-only numpy array over it. Once all have mapped it the segment's
name is removed, so the memory is the kernel's to free when the last
engine drops its array (``del a``, a new value, ``reset()``, the engine's
end): nothing to clean up, nothing left behind if an engine dies.

Nodes are the engines' ``host`` as the launcher knows it (engine_info()),
which is what MPI calls a node. Why not MPI_Win_allocate_shared: it is
collective over every process of the node at once, and an engine that is
busy with a long request cannot join; a segment mapped by name is the
same kind of memory (Open MPI's own shared-memory segments live in
/dev/shm too) without the collective.

The functions whose names start with ``_`` run on the engines (they travel
by reference: the engines import this module).
"""
import mmap
import os
import secrets
import sys

SHM_DIR = "/dev/shm"
_ALIGN = 64


def _layout(values):
    """[(name, offset, shape, dtype str, nbytes)] and the segment's size."""
    out = []
    off = 0
    for name, a in values.items():
        off = (off + _ALIGN - 1) // _ALIGN * _ALIGN
        out.append((name, off, tuple(a.shape), a.dtype.str, int(a.nbytes)))
        off += int(a.nbytes)
    return out, max(off, 1)


def _path(seg):
    if "/" in seg or not seg.startswith("ipmpi-shared-"):
        raise ValueError("not an ipmpi shared segment: %r" % (seg,))
    return os.path.join(SHM_DIR, seg)


def _create(seg, values):
    """On the node's first engine: the segment with values' arrays, bound
    read-only here too. Returns (layout, size)."""
    import numpy as np
    layout, size = _layout(values)
    fd = os.open(_path(seg), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        try:
            # Reserve the pages now: a tmpfs short of room answers ENOSPC
            # here, where writing into a sparse file would die of SIGBUS.
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            st = os.statvfs(SHM_DIR)
            raise MemoryError("%s: %s has %.0f MiB free of %.0f MiB; the shared arrays need %.0f MiB (%s)"
                              % (_host(), SHM_DIR, st.f_bavail * st.f_frsize / 2**20,
                                 st.f_blocks * st.f_frsize / 2**20, size / 2**20, e.strerror)) from None
        with mmap.mmap(fd, size) as mm:
            for (_name, off, _shape, _dt, n), a in zip(layout, values.values()):
                if n:
                    mm[off:off + n] = memoryview(np.ascontiguousarray(a)).cast("B")
    except BaseException:
        os.close(fd)
        _unlink(seg)
        raise
    os.close(fd)
    _bind(seg, layout, size)
    return layout, size


def _bind(seg, layout, size):
    """Maps the segment read-only and binds each name to its array in the
    engine's namespace."""
    import numpy as np
    fd = os.open(_path(seg), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    ns = sys.modules["__main__"].__dict__
    for name, off, shape, dt, _n in layout:
        ns[name] = np.ndarray(shape, dtype=np.dtype(dt), buffer=mm, offset=off)
    return None


def _host():
    import socket
    return "node %s" % socket.gethostname()


def _drop(names):
    """Unbinds the names that hold arrays over a shared segment (after a
    failed shared push)."""
    ns = sys.modules["__main__"].__dict__
    for name in names:
        v = ns.get(name)
        if v is not None and isinstance(getattr(v, "base", None), mmap.mmap):
            del ns[name]
    return None


def _unlink(seg):
    """Removes the segment's name (its memory lives while mapped)."""
    try:
        os.unlink(_path(seg))
    except FileNotFoundError:
        pass
    return None


def segment_pss_kb(pid):
    """kB of proportional set size of process pid's mappings of ipmpi
    shared segments (/proc/PID/smaps): summed over the engines of a node,
    the memory the node holds for them (pages counted once the engines
    touched them)."""
    total, inside = 0, False
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and ":" not in first:          # a mapping's header line
                inside = os.path.join(SHM_DIR, "ipmpi-shared-") in line
            elif inside and line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def _check(namespace):
    import numpy as np
    if not isinstance(namespace, dict):
        raise TypeError("push takes a dict of name -> value, not %r" % (type(namespace).__name__,))
    values = {}
    for name, v in namespace.items():
        if not isinstance(name, str):
            raise TypeError("push: names must be str, got %r" % (name,))
        if not isinstance(v, np.ndarray) or v.dtype.hasobject:
            raise TypeError("push(shared=True) shares numpy arrays of plain data; %r is %s"
                            % (name, "an object array" if isinstance(v, np.ndarray) else type(v).__name__))
        values[name] = v
    return values


def push(mec, namespace, targets, timeout):
    """mec.push(namespace, targets, shared=True): see the module. Returns
    {host: {'engines': [ids], 'bytes': size of its segment}}."""
    from .multiengine import _apply_each
    values = _check(namespace)
    ids = mec._target_ids(targets, timeout)
    info = mec.engine_info(targets=ids, timeout=timeout)
    nodes = {}
    for d in info:
        nodes.setdefault(d.get("host", "?"), []).append(d["id"])
    tag = "ipmpi-shared-%d-%s" % (os.getpid(), secrets.token_hex(6))
    segs = {host: "%s-%d" % (tag, min(eids)) for host, eids in nodes.items()}
    leaders = {host: min(eids) for host, eids in nodes.items()}
    made = []
    report = {}
    ok = False
    try:
        created = {host: _apply_each(mec, _create, (segs[host], values), [leaders[host]], timeout, "push")
                   for host in nodes}
        made = list(nodes)
        results = {host: pr.get_result(timeout=timeout)[0] for host, pr in created.items()}
        bound = [_apply_each(mec, _bind, (segs[host],) + tuple(results[host]),
                             [e for e in nodes[host] if e != leaders[host]], timeout, "push")
                 for host in nodes if len(nodes[host]) > 1]
        for pr in bound:
            pr.get_result(timeout=timeout)
        for host in nodes:
            report[host] = {"engines": sorted(nodes[host]), "bytes": results[host][1]}
        ok = True
    finally:
        if not ok and made:
            try:
                _apply_each(mec, _drop, (list(values),), ids, timeout, "push").get_result(timeout=timeout)
            except Exception:
                pass
        unlinks = [_apply_each(mec, _unlink, (segs[host],), [leaders[host]], timeout, "push")
                   for host in made]
        for pr in unlinks:
            try:
                pr.get_result(timeout=timeout)
            except Exception:
                pass
    return report
