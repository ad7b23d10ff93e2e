"""The client link: furl files, the TLS connection (ipmpi._ipmpi) and the
base class both clients share.
"""
import atexit
import json
import numbers
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref

from . import _ipmpi as _c
from . import progress as _progress
from .results import PendingResult, _controller_json


# ---------------------------------------------------------------- furls

def _ipmpi_dir():
    return os.environ.get("IPMPI_DIR") or os.path.join(os.path.expanduser("~"), ".ipmpi")


def default_furl_file(capability="mec"):
    """$IPMPI_DIR/security/ipcontroller-<capability>.furl (IPMPI_DIR defaults to ~/.ipmpi)."""
    return os.path.join(_ipmpi_dir(), "security", "ipcontroller-%s.furl" % capability)


def _loose(st, bits):
    """The group/other bits of st's mode among bits, in words ('' if none)."""
    m = stat.S_IMODE(st.st_mode) & bits
    if not m:
        return ""
    words = []
    if m & 0o044:
        words.append("readable")
    if m & 0o022:
        words.append("writable")
    if not words:
        words.append("executable")
    who = [w for w, b in (("group", 0o070), ("others", 0o007)) if m & b]
    return "%s by %s" % (" and ".join(words), " and ".join(who))


def _check_parents(path):
    """Refuses a furl file inside a directory that group or others may
    write to without the sticky bit (a sticky one, such as /tmp, lets only
    an entry's owner rename or remove it): they could put a furl of
    theirs, or a whole security/ directory, in its place, as ssh refuses
    such path components. Every directory from the file's own up to / is
    looked at."""
    d = os.path.dirname(os.path.realpath(path))
    while True:
        st = os.stat(d)
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PermissionError(
                "furl file %s is inside %s, which is writable by %s without the sticky bit (mode %04o): they "
                "could put a furl of theirs in its place. Run `chmod go-w %s` (or `chmod +t %s`), or keep "
                "the furl in a directory of your own"
                % (path, d, "others" if st.st_mode & 0o002 else "its group", stat.S_IMODE(st.st_mode),
                   shlex.quote(d), shlex.quote(d)))
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def _check_furl_file(path):
    """Refuses a furl file that others could read or replace, as ssh refuses
    a private key with mode 0644: the file must be the user's (or root's)
    with no group/other bits (0600 or 0400); the directory it is in, when it
    is a profile's security/ directory, must be the user's (or root's) and
    neither readable nor writable by group or others (0700); and no
    directory above it may be writable by group or others without the
    sticky bit (_check_parents). Raises PermissionError saying what to run."""
    uid = os.geteuid()
    st = os.stat(path)
    if st.st_uid not in (uid, 0):
        raise PermissionError(
            "furl file %s belongs to uid %d, not to you (uid %d): its owner could point this client at a "
            "controller of theirs. Copy it to a file of your own and run `chmod 600 FILE` on the copy"
            % (path, st.st_uid, uid))
    problem = _loose(st, 0o077)
    if problem:
        raise PermissionError(
            "furl file %s is %s (mode %04o): whoever can read a furl can run code as you on the cluster, "
            "so it is refused, as ssh refuses such a private key. Run `chmod 600 %s` (and restart the "
            "cluster for new keys if others may have read it), or pass the furl text itself as a string"
            % (path, problem, stat.S_IMODE(st.st_mode), shlex.quote(path)))
    d = os.path.dirname(os.path.abspath(path))
    if os.path.basename(d) != "security":
        _check_parents(path)
        return
    dst = os.stat(d)
    if dst.st_uid not in (uid, 0):
        raise PermissionError(
            "security directory %s belongs to uid %d, not to you (uid %d): its owner can replace the "
            "furls in it. Use a profile directory of your own (IPMPI_DIR)" % (d, dst.st_uid, uid))
    problem = _loose(dst, 0o066)
    if problem:
        raise PermissionError(
            "security directory %s is %s (mode %04o): others could read or replace the furls in it, so "
            "they are refused. Run `chmod 700 %s`" % (d, problem, stat.S_IMODE(dst.st_mode), shlex.quote(d)))
    _check_parents(path)


def _read_furl(furl_file, capability):
    """The furl text: furl_file is a path (None: the default furl of the
    capability) or the furl itself as a string. A file that group or
    others may read or write, or one in such a security/ directory, is
    refused with a PermissionError that says how to fix it (chmod 600)."""
    if furl_file is None:
        furl_file = default_furl_file(capability)
    furl_file = os.fspath(furl_file)
    if furl_file.startswith("ipmpi+tls://"):
        return furl_file.strip()
    try:
        _check_furl_file(furl_file)
        with open(furl_file, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            "no controller capability file %s: is a cluster running? Start one with "
            "`ipcluster mpirun -n 4` (and set IPMPI_DIR if it uses another profile directory)"
            % furl_file) from None


# ---------------------------------------------------------------- ssh tunnels

_FURL_ADDR = re.compile(r"^(ipmpi\+tls://[^@/]*@)(\[[^\]]*\]|[^:/\[\]]*):(\d+)(/.*)$", re.S)
_tunnels = weakref.WeakSet()


def _parse_sshserver(sshserver):
    """'user@host[:port]' (user and port optional; '[v6addr]:port' too) ->
    (destination for ssh, port or None)."""
    bad = ValueError("sshserver must be 'user@host[:port]', not %r" % (sshserver,))
    if not isinstance(sshserver, str):
        raise bad
    s = sshserver.strip()
    if not s or any(c.isspace() for c in s) or s.startswith("-"):
        raise bad
    user, at, host = s.rpartition("@")
    port = None
    if host.startswith("["):
        h, _, rest = host[1:].partition("]")
        if rest and not re.fullmatch(r":\d+", rest):
            raise bad
        port = int(rest[1:]) if rest else None
        host = h
    elif host.count(":") == 1:
        host, p = host.split(":")
        if not p.isdigit():
            raise bad
        port = int(p)
    if not host or host.startswith("-") or (port is not None and not 0 < port < 65536):
        raise bad
    return user + at + host, port


def _listening(port):
    """True when something in this network namespace listens on
    127.0.0.1:port (read from /proc/net/tcp, so that no probe connection
    reaches the controller); None when /proc/net/tcp cannot be read."""
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            want = "0100007F:%04X" % port
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
                    return True
        return False
    except (OSError, StopIteration):
        return None


def _free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class SSHTunnel:
    """A local forward 127.0.0.1:local_port -> remote_host:remote_port made
    by the system's ssh through sshserver ('user@host[:port]'):

        ssh -N -L 127.0.0.1:PORT:HOST:PORT -o BatchMode=yes -o ExitOnForwardFailure=yes ...

    The command is $IPMPI_SSH when set (e.g. 'ssh -F ~/cluster.conf'), else
    'ssh'; the user's ssh configuration (jump hosts, agent, known hosts)
    applies. BatchMode: ssh never asks for a password or passphrase (use
    keys, an agent, or sshkey=FILE). ssh runs in a session of its own
    (Ctrl-C in the terminal does not end it) and ends with close(), when
    the client closes, when Python exits, and (started from the main
    thread) when this process dies (setpriv --pdeathsig)."""

    def __init__(self, sshserver, remote_host, remote_port, sshkey=None, timeout=30):
        self.sshserver = sshserver
        self.remote_host, self.remote_port = remote_host, int(remote_port)
        self.proc, self._err, self.local_port = None, None, None
        dest, port = _parse_sshserver(sshserver)
        base = shlex.split(os.environ.get("IPMPI_SSH") or "ssh")
        if not base or shutil.which(base[0]) is None:
            raise FileNotFoundError("ssh tunnel: %r not found: install openssh-client (or set IPMPI_SSH)"
                                    % (base[0] if base else ""))
        timeout = timeout or 30
        opts = ["-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                "-o", "ServerAliveInterval=3", "-o", "ServerAliveCountMax=3",
                "-o", "ConnectTimeout=%d" % max(1, int(min(timeout, 60))),
                "-o", "ControlMaster=no", "-o", "ControlPath=none"]
        if sshkey is not None:
            sshkey = os.path.expanduser(os.fspath(sshkey))
            if not os.path.exists(sshkey):
                raise FileNotFoundError("ssh tunnel: no key file %s" % sshkey)
            opts += ["-i", sshkey, "-o", "IdentitiesOnly=yes"]
        if port is not None:
            opts += ["-p", str(port)]
        rhost = "[%s]" % remote_host if ":" in remote_host else remote_host
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self.local_port = _free_port()
            self.argv = base + opts + ["-L", "127.0.0.1:%d:%s:%d" % (self.local_port, rhost, self.remote_port),
                                       dest]
            if self._start(deadline, timeout):
                break
            err = self.ssh_words()
            self.close()
            if "Address already in use" in err and attempt < 2:
                continue   # another process took the port in between: try another one
            raise ConnectionError("ssh tunnel through %s failed (ssh exited with status %s): %s"
                                  % (sshserver, self.returncode, err or "ssh said nothing"))
        _tunnels.add(self)

    def _start(self, deadline, timeout):
        self._err = tempfile.TemporaryFile()
        argv = list(self.argv)
        setpriv = threading.current_thread() is threading.main_thread() and shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--"] + argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err, start_new_session=True, close_fds=True)
        while self.proc.poll() is None:
            up = _listening(self.local_port)
            if up is None:   # no /proc/net/tcp: one probe connection
                try:
                    socket.create_connection(("127.0.0.1", self.local_port), 0.2).close()
                    up = True
                except OSError:
                    up = False
            if up:
                return True
            if time.monotonic() >= deadline:
                words = self.ssh_words()
                self.close()
                raise TimeoutError("ssh tunnel through %s: no forward after %g s%s"
                                   % (self.sshserver, timeout, (": " + words) if words else ""))
            time.sleep(0.02)
        return False

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ssh_words(self):
        """What ssh wrote on stderr so far (its own words), on one line."""
        if self._err is None:
            return ""
        try:
            self._err.seek(0)
            text = self._err.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return "; ".join(line.strip() for line in text.splitlines() if line.strip())

    def furl(self, furl):
        """furl with its host:port replaced by this tunnel's local end; the
        fingerprint and key are unchanged, so the pin and the key check
        hold end to end."""
        m = _FURL_ADDR.match(furl)
        return "%s127.0.0.1:%d%s" % (m.group(1), self.local_port, m.group(4))

    def close(self):
        """Ends ssh (SIGTERM, SIGKILL after 3 s); may be called again."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    continue
        _tunnels.discard(self)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return "<SSHTunnel 127.0.0.1:%s -> %s -> %s:%d %s>" % (
            self.local_port, self.sshserver, self.remote_host, self.remote_port,
            "running" if self.alive else "ended")


@atexit.register
def _close_tunnels():
    for t in list(_tunnels):
        t.close()


def _connect(furl_file, capability, connect_timeout, shm=True, sshserver=None, sshkey=None):
    """(Connection, SSHTunnel or None): the link to the controller of the
    furl, through an ssh tunnel via sshserver when it is given."""
    furl = _read_furl(furl_file, capability)
    tunnel = None
    if sshserver is not None:
        m = _FURL_ADDR.match(furl)
        if not m:
            _c.Connection(furl, connect_timeout, False)   # raises the ValueError that says what is wrong
            raise ValueError("bad furl: no host:port in %r" % furl[:40])
        host = m.group(2)[1:-1] if m.group(2).startswith("[") else m.group(2)
        tunnel = SSHTunnel(sshserver, host, int(m.group(3)), sshkey, connect_timeout)
        try:
            conn = _c.Connection(tunnel.furl(furl), connect_timeout, bool(shm))
        except (ConnectionError, TimeoutError) as e:
            time.sleep(0.2)   # ssh's own words on why the forward failed, if any
            words = tunnel.ssh_words()
            tunnel.close()
            raise type(e)("through the ssh tunnel via %s to %s:%s: %s%s"
                          % (sshserver, host, m.group(3), e, ("; ssh: " + words) if words else "")) from None
        except PermissionError as e:
            tunnel.close()
            raise PermissionError("through the ssh tunnel via %s to %s:%s: %s"
                                  % (sshserver, host, m.group(3), e)) from None
        except BaseException:
            tunnel.close()
            raise
    else:
        if sshkey is not None:
            raise ValueError("sshkey is for a tunnel: give sshserver='user@host[:port]' too")
        conn = _c.Connection(furl, connect_timeout, bool(shm))
    if conn.capability != capability:
        got = conn.capability
        conn.close()
        if tunnel is not None:
            tunnel.close()
        names = {"mec": "MultiEngineClient (ipcontroller-mec.furl)", "tc": "TaskClient (ipcontroller-tc.furl)"}
        raise PermissionError(
            "this furl grants the %r capability, which is for %s; this client needs %s"
            % (got, names.get(got, got), names[capability]))
    return conn, tunnel


# ---------------------------------------------------------------- targets

def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _parse_targets(targets):
    """Returns (target, target_list, single) for the wire: 'all' -> ALL,
    an int -> that engine, a list of ints -> TARGET_LIST."""
    if targets is None or (isinstance(targets, str) and targets == "all"):
        return _c.TARGET_ALL, None, False
    if _is_int(targets):
        t = int(targets)
        if t < 0:
            raise ValueError("engine ids are >= 0, not %d" % t)
        return t, None, True
    if isinstance(targets, str) or not hasattr(targets, "__iter__"):
        raise TypeError("targets must be 'all', an engine id or a list of engine ids, not %r" % (targets,))
    ids = list(targets)
    if not ids:
        raise ValueError("targets is an empty list")
    for t in ids:
        if not _is_int(t):
            raise TypeError("engine ids are ints, not %r" % (t,))
        if t < 0:
            raise ValueError("engine ids are >= 0, not %d" % t)
    ids = [int(t) for t in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("targets has duplicates: %r" % (ids,))
    return _c.TARGET_LIST, ids, False


def _sized(seq, what):
    """seq as something that can be partitioned: lists, tuples, str, bytes
    and numpy arrays as they are (sliced), any other sized sequence (a
    range, say) as a list. An iterable without a length is refused, as
    IPython 0.10 refused it."""
    try:
        import numpy
        if isinstance(seq, numpy.ndarray):
            return seq
    except ImportError:
        pass
    if isinstance(seq, (list, tuple, str, bytes)):
        return seq
    if not hasattr(seq, "__len__") or not hasattr(seq, "__getitem__"):
        raise TypeError("%s needs a sequence with a length (a list, tuple, range or array), not %s: "
                        "make it a list first" % (what, type(seq).__name__))
    return list(seq)


def _partition(seq, p, what="scatter"):
    """Splits seq into p contiguous parts whose sizes differ by at most one
    (the first len % p parts are one longer), as IPython 0.10's Map did.
    numpy arrays are sliced (views, no copy), lists, tuples and strings
    too; other sequences become lists first."""
    seq = _sized(seq, what)
    n = len(seq)
    base, extra = divmod(n, p)
    parts, lo = [], 0
    for i in range(p):
        hi = lo + base + (1 if i < extra else 0)
        parts.append(seq[lo:hi])
        lo = hi
    return parts


def _concatenate(values):
    """Joins per-engine partitions in order (IPython 0.10's
    joinPartitions): numpy arrays with numpy.concatenate, lists and tuples
    into one list; anything else is returned as the list of the values."""
    if not values:
        return []
    try:
        import numpy
        if all(isinstance(v, numpy.ndarray) for v in values):
            return numpy.concatenate(values)
    except ImportError:
        pass
    if all(isinstance(v, (list, tuple)) for v in values):
        out = []
        for v in values:
            out.extend(v)
        return out
    return list(values)


def _map_chunk(f, chunk, star):
    """Runs on an engine (APPLY): [f(*a) or f(a) for a in chunk]. A
    function defined interactively on the client runs with the engine's
    namespace as its globals, as code pushed with push_function does; a
    str names a function there (raw_map's string form). Uses no module
    globals, so it travels by value and adds no names to the namespace."""
    main = __import__("sys").modules["__main__"]
    ns = main.__dict__
    if isinstance(f, str):
        f = eval(f, ns)
    elif type(f) is type(lambda: None) and getattr(f, "__module__", None) == "__main__" \
            and f.__globals__ is not ns:
        for k, v in f.__globals__.items():
            if k not in ns and not k.startswith("__"):
                ns[k] = v
        g = type(f)(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        f = g
    if star:
        return [f(*a) for a in chunk]
    return [f(a) for a in chunk]


# Pickled by value (cloudpickle does so for __main__'s functions): the
# engines need not import ipmpi.client.
_map_chunk.__module__ = "__main__"


# ---------------------------------------------------------------- clients

class _Base:
    _capability = "mec"

    def __init__(self, furl_file=None, timeout=None, connect_timeout=30, shm=True, sshserver=None, sshkey=None,
                 progress=None):
        self._timeout = timeout
        self.progress = progress
        self.block = True
        self._conn = None
        self._tunnel = None
        self._link_args = (furl_file, connect_timeout, shm, sshserver, sshkey)
        self._conn, self._tunnel = _connect(furl_file, self._capability, connect_timeout, shm, sshserver, sshkey)
        self._hello_ids()

    def _hello_ids(self):
        """The controller instance and session number of this link (HELLO),
        from which request ids are made (doc/protocol.md section 7)."""
        try:
            hello = json.loads(self._conn.hello)
        except (TypeError, ValueError):
            hello = {}
        self._instance = hello.get("instance")
        self._session = hello.get("session")

    def _rid(self, local):
        """The user-visible id of request local of this link:
        'INSTANCE:SESSION:REQ' (None when the controller gives no ids)."""
        if not self._instance or not self._session or local > 0xFFFFFFFF:
            return None
        return "%s:%d:%d" % (self._instance, self._session, local)

    def reconnect(self, timeout=None):
        """Opens a new link to the controller (same furl, tunnel and
        options) in place of this one, e.g. after the network dropped;
        results still to come are then fetched by their ids, so pending
        results and get_result calls go on as if nothing happened (the
        controller keeps them, see doc/multiengine.rst). Raises what
        connecting raises; the old link is closed either way."""
        furl_file, connect_timeout, shm, sshserver, sshkey = self._link_args
        old_conn, old_tunnel, old_instance = self._conn, self._tunnel, self._instance
        if old_conn is not None:
            old_conn.close()
        if old_tunnel is not None:
            old_tunnel.close()
        self._conn, self._tunnel = _connect(furl_file, self._capability, timeout or connect_timeout, shm,
                                            sshserver, sshkey)
        self._hello_ids()
        self._relink(old_instance)

    def _relink(self, old_instance):
        """A new link replaced the old one: the subclass moves what was in
        flight on the old one."""

    def _probe(self, timeout=1.0):
        """After the link broke: does the controller still take connections?
        (True, where) when a new TCP connection is accepted and not closed
        at once, (False, why) when it is refused
        or closed (the controller is gone), (None, why) when that cannot be
        told within timeout (the network is down or the host gone). Nothing
        is sent: the controller just sees a connection that ends."""
        try:
            m = _FURL_ADDR.match(_read_furl(self._link_args[0], self._capability))
        except (OSError, ValueError) as e:
            return None, str(e)
        if not m:
            return None, "no host:port in the furl"
        host = m.group(2)[1:-1] if m.group(2).startswith("[") else m.group(2)
        port = int(m.group(3))
        where = "%s:%d" % (host, port)
        tunnel = self._tunnel
        if tunnel is not None:
            if not tunnel.alive():
                return None, "the ssh tunnel via %s has ended" % tunnel.sshserver
            host, port = "127.0.0.1", tunnel.local_port
            where += " (through the ssh tunnel via %s)" % tunnel.sshserver
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                # A live controller waits for our TLS hello. The kernel of a
                # controller that is dying may still accept (and then reset)
                # the connection, and ssh accepts locally whatever the far
                # end does (and closes the channel when it refuses): a
                # connection closed at once is no controller.
                s.settimeout(min(timeout, 0.5))
                try:
                    if s.recv(1) == b"":
                        return False, "a new connection to %s was closed at once" % where
                except socket.timeout:
                    pass
            return True, where
        except (ConnectionRefusedError, ConnectionResetError) as e:
            return False, "a new connection to %s: %s" % (where, e.strerror or e)
        except socket.timeout:
            return None, "a new connection to %s timed out after %g s" % (where, timeout)
        except OSError as e:
            return None, "a new connection to %s: %s" % (where, e.strerror or e)

    @property
    def tunnel(self):
        """The SSHTunnel this client's link goes through (sshserver=...), or None."""
        return self._tunnel

    @property
    def shm(self):
        """True when large values travel through shared memory: the client
        runs on the controller's host (same kernel, same uid) and neither
        shm=False nor IPMPI_SHM=0 turned it off. The TLS link still carries
        every request and the key check; see shm_note for why it is off."""
        return self._conn is not None and self._conn.shm

    @property
    def shm_path(self):
        """How large values move: 'process memory' (the controller and
        this client read each other's buffers with process_vm_readv: no
        copy here), 'memfd' (through shared memory files), or None (TLS)."""
        return None if self._conn is None else self._conn.shm_path

    @property
    def shm_note(self):
        """None while shared memory is in use, else the reason it is not."""
        return None if self._conn is None else self._conn.shm_note

    @property
    def progress(self):
        """Whether blocking waits longer than a second show how many engines
        or tasks are done (ipmpi.progress): None (automatic: when stderr is
        a terminal or in Jupyter, unless IPMPI_PROGRESS=0), False, True, or
        'plain' (one line, even when tqdm is installed)."""
        return self._progress_setting

    @progress.setter
    def progress(self, value):
        self._progress_setting = _progress.check_setting(value)

    def _wait_progress(self, total, unit, desc):
        """A progress.Progress for one blocking wait of this client."""
        return _progress.Progress(_progress.mode(self._progress_setting), total, unit, desc)

    @property
    def timeout(self):
        """Default for every blocking wait, in seconds (None: forever)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value):
        self._timeout = value

    def _send(self, kind, target, parts, targets=None, stream=False):
        if self._conn is None:
            raise ConnectionError("this client is closed")
        return self._conn.send(kind, target, parts, targets, stream)

    def _finish(self, req_ids, post, block, timeout, targets=None, ids=None):
        pr = PendingResult(self, req_ids, post, ids)
        pr.targets = targets
        if block is None:
            block = self.block
        if not block:
            return pr
        return pr.get_result(timeout=timeout)

    def _request(self, kind, parts, targets, post, block, timeout):
        target, tlist, _single = _parse_targets(targets)
        rid = self._send(kind, target, parts, tlist)
        return self._finish([rid], post, block, timeout, targets)

    def _controller(self, kind, post, block=True, timeout=None, targets="all"):
        target, tlist, _single = _parse_targets(targets)
        rid = self._send(kind, target, [], tlist)
        # The controller answers these itself and keeps no result: no id.
        return self._finish([rid], lambda replies: post(_controller_json(replies)), block, timeout, ids=[None])

    def get_ids(self, block=True, timeout=None):
        """The ids of the engines alive now, ascending."""
        return self._controller(_c.K_GET_IDS, list, block, timeout)

    def queue_status(self, targets="all", block=True, timeout=None):
        """[(engine id, {"id", "running", "queue"}), ...] for the target engines."""
        return self._controller(_c.K_QUEUE_STATUS, lambda js: [(d["id"], d) for d in js], block, timeout, targets)

    def close(self):
        """Closes the connection; the cluster keeps running."""
        if self._conn is not None:
            self._conn.close()
        if self._tunnel is not None:
            self._tunnel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        c, t = self._conn, self._tunnel
        where = "%s:%s" % (c.host, c.port) if t is None else "%s:%s via ssh %s" % (
            t.remote_host, t.remote_port, t.sshserver)
        return "<%s %s %s>" % (self.__class__.__name__, where, "closed" if c.closed else "open")
