"""TLS as security people check it: sslscan (Debian's) against a running
controller's client port must find TLS 1.3 and nothing older, only TLS 1.3
cipher suites, no renegotiation, no heartbleed, and the cluster must serve a
key holder afterwards. The same parser run against a TLS server that also
speaks TLS 1.2 must see it (so the check can fail). Needs sslscan and
openssl; without them the test fails, it never skips.
"""
import re
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

from conftest import running_cluster

PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")


@pytest.fixture(scope="module")
def cluster1():
    yield from running_cluster(1)


def sslscan(host, port):
    """{'protocols': {name: 'enabled'|'disabled'}, 'ciphers': [(protocol, suite)], 'text': output}."""
    exe = shutil.which("sslscan")
    if exe is None:
        raise RuntimeError("sslscan is missing: apt-get install sslscan")
    r = subprocess.run([exe, "--no-colour", "%s:%d" % (host, port)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    protocols = {}
    for name in PROTOCOLS:
        m = re.search(r"^%s\s+(enabled|disabled)\s*$" % re.escape(name), r.stdout, re.M)
        assert m, "sslscan said nothing about %s:\n%s" % (name, r.stdout)
        protocols[name] = m.group(1)
    ciphers = re.findall(r"^(?:Preferred|Accepted)\s+(\S+)\s+\d+ bits\s+(\S+)", r.stdout, re.M)
    return {"protocols": protocols, "ciphers": ciphers, "text": r.stdout}


def test_the_controller_speaks_tls13_only(cluster1):
    with open(cluster1.mec_furl) as f:
        host, port = re.match(r"ipmpi\+tls://[^@]+@([^:/]+):(\d+)/", f.read()).groups()
    scan = sslscan(host, int(port))
    out = scan["text"]
    assert scan["protocols"] == {"SSLv2": "disabled", "SSLv3": "disabled", "TLSv1.0": "disabled",
                                 "TLSv1.1": "disabled", "TLSv1.2": "disabled", "TLSv1.3": "enabled"}, out
    assert scan["ciphers"], out
    assert {p for p, _ in scan["ciphers"]} == {"TLSv1.3"}, out
    assert all(s.startswith("TLS_AES_") or s.startswith("TLS_CHACHA20_") for _, s in scan["ciphers"]), out
    assert "not vulnerable to heartbleed" in out and not re.search(r"(?<!not )vulnerable to heartbleed", out), out
    assert "Session renegotiation not supported" in out, out
    # The scan's dozens of handshakes without a key left the cluster as it was.
    m = cluster1.client(timeout=30)
    try:
        assert m.get_ids() == [0]
    finally:
        m.close()


def test_the_scan_sees_an_older_protocol_when_there_is_one(tmp_path):
    # A control: a server that also accepts TLS 1.2 must show as such.
    key, crt = str(tmp_path / "k.pem"), str(tmp_path / "c.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "1", "-subj", "/CN=control"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True, timeout=30)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(crt, key)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                raw, _ = lsock.accept()
            except OSError:
                continue
            raw.settimeout(5)
            try:
                with ctx.wrap_socket(raw, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        scan = sslscan("127.0.0.1", lsock.getsockname()[1])
    finally:
        stop.set()
        t.join(10)
        lsock.close()
    assert scan["protocols"]["TLSv1.2"] == "enabled" and scan["protocols"]["TLSv1.3"] == "enabled", scan["text"]
    assert "TLSv1.2" in {p for p, _ in scan["ciphers"]}, scan["text"]
