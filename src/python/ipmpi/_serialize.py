"""Serialization shared by the client and the engines.

Values travel as pickle protocol 5 made by cloudpickle (so functions,
lambdas and closures work). Contiguous buffers of OOB_MIN bytes or more
(numpy arrays, bytes, bytearrays) go out of band: they become their own
frame parts and are never copied into the pickle stream. Smaller or
non-contiguous buffers stay in band.

pickle and cloudpickle are imported on first use, not with this module:
an engine imports nothing heavy before its first request (together ~10 ms
of CPU, re included).
"""
OOB_MIN = 64 * 1024


def dumps(obj):
    """Return the parts for obj: [pickle_bytes, buffer, buffer, ...].

    Each buffer is a memoryview onto the caller's memory (no copy); keep obj
    alive until the parts are sent.
    """
    import cloudpickle
    bufs = []

    def keep_out_of_band(pb):
        try:
            m = pb.raw()
        except BufferError:  # not contiguous: pickle it in band
            return True
        if m.nbytes < OOB_MIN:
            return True
        bufs.append(m)
        return False

    head = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_out_of_band)
    return [head] + bufs


def loads(parts):
    """Inverse of dumps: parts[0] is the pickle, parts[1:] its buffers.

    Buffers are used in place: a received bytearray becomes the memory of
    the numpy array that was pushed (writable, no copy).
    """
    import pickle
    return pickle.loads(parts[0], buffers=parts[1:])
