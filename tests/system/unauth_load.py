#!/usr/bin/python3
"""Unauthenticated load on a controller: CONNS connections at once, each
doing a TLS 1.3 handshake, sending HELLO with a wrong key, reading the
refusal and starting over, for SECONDS (issue 13: "Unauthenticated load
hurts key holders"). One process, non-blocking sockets and a selector, so
the load is the controller's handshakes and not this script's threads.
Used by tests/system/test_load.py and bench/bench_unauth.py.

Usage: unauth_load.py FURL_FILE [--conns 200] [--seconds 10] [--mode wrong-key|silent]
  wrong-key: handshake, wrong HELLO, refusal, again (the default)
  silent:    plain TCP connections that never speak, held open until the end

Prints one line at the end: "handshakes N refusals M errors E busy B"
(busy: connections the controller refused at once, before the handshake,
with the TLS alert user_canceled, as it does beyond 64 connections before
HELLO from one address; errors: other failures).
"""
import argparse
import selectors
import socket
import ssl
import struct
import sys
import time

HDR = struct.Struct("<IBBHQiiIIQ")


def parse_furl(path):
    with open(path) as f:
        text = f.read().strip()
    rest = text[len("ipmpi+tls://"):]
    _fp, rest = rest.split("@", 1)
    hostport, _key = rest.split("/", 1)
    host, port = hostport.rsplit(":", 1)
    return host.strip("[]"), int(port)


def wrong_hello():
    """HELLO (kind 1) to the controller (target -2) with 64 wrong hex digits."""
    import ipmpi._ipmpi as C
    key = b"0" * 64
    return HDR.pack(C.MAGIC, C.PROTO_VERSION, C.K_HELLO, 0, 1, C.TARGET_CONTROLLER, 0, 0, 1, 0) + \
        struct.pack("<Q", len(key)) + key


class Conn:
    def __init__(self, load):
        self.load = load
        self.sock = None
        self.stage = None
        self.out = b""

    def start(self):
        ld = self.load
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        try:
            raw.connect((ld.host, ld.port))
        except BlockingIOError:
            pass
        except OSError:
            raw.close()
            ld.errors += 1
            ld.retry.append(self)
            return
        # Wrapped once connected: Python 3.11 cannot wrap a socket whose
        # non-blocking connect is still under way.
        self.sock = raw
        self.stage = "connect"
        ld.sel.register(self.sock, selectors.EVENT_WRITE, self)

    def finish(self, error):
        ld = self.load
        if error:
            ld.errors += 1
        try:
            ld.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.sock = None
        ld.retry.append(self)

    def step(self):
        ld = self.load
        try:
            if self.stage == "connect":
                if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    return self.finish(True)
                ld.sel.unregister(self.sock)
                self.sock = ld.ctx.wrap_socket(self.sock, server_hostname=ld.host, do_handshake_on_connect=False)
                ld.sel.register(self.sock, selectors.EVENT_WRITE, self)
                self.stage = "hs"
            if self.stage == "hs":
                self.sock.do_handshake()
                ld.handshakes += 1
                self.stage = "send"
                self.out = ld.hello
            if self.stage == "send":
                while self.out:
                    n = self.sock.send(self.out)
                    self.out = self.out[n:]
                self.stage = "recv"
                ld.sel.modify(self.sock, selectors.EVENT_READ, self)
            if self.stage == "recv":
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        ld.refusals += 1
                        return self.finish(False)
        except ssl.SSLWantReadError:
            ld.sel.modify(self.sock, selectors.EVENT_READ, self)
        except ssl.SSLWantWriteError:
            ld.sel.modify(self.sock, selectors.EVENT_WRITE, self)
        except (ssl.SSLError, OSError) as e:
            # The refusal ends with the controller closing the connection.
            if self.stage == "recv":
                ld.refusals += 1
                return self.finish(False)
            if getattr(e, "reason", None) == "TLSV1_ALERT_USER_CANCELLED":
                ld.busy += 1
                return self.finish(False)
            return self.finish(True)


class Load:
    def __init__(self, furl, conns):
        self.host, self.port = parse_furl(furl)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.sel = selectors.DefaultSelector()
        self.hello = wrong_hello()
        self.handshakes = self.refusals = self.errors = self.busy = 0
        self.retry = [Conn(self) for _ in range(conns)]

    def run(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            todo, self.retry = self.retry, []
            for c in todo:
                c.start()
            for key, _ev in self.sel.select(timeout=0.05):
                key.data.step()


def silent(furl, conns, seconds):
    host, port = parse_furl(furl)
    socks = []
    for _ in range(conns):
        socks.append(socket.create_connection((host, port), timeout=10))
    print("open %d" % len(socks), flush=True)
    time.sleep(seconds)
    for s in socks:
        s.close()
    print("handshakes 0 refusals 0 errors 0 busy 0 silent %d" % len(socks), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("furl")
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mode", choices=("wrong-key", "silent"), default="wrong-key")
    a = ap.parse_args()
    if a.mode == "silent":
        silent(a.furl, a.conns, a.seconds)
        return 0
    ld = Load(a.furl, a.conns)
    print("started", flush=True)
    ld.run(a.seconds)
    print("handshakes %d refusals %d errors %d busy %d" % (ld.handshakes, ld.refusals, ld.errors, ld.busy),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
