"""Fixtures shared by the Python unit tests (pytest picks this file up)."""
import hashlib
import ssl
import subprocess

import pytest


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed P-256 certificate for fake controllers: (key file,
    certificate file, SHA-256 fingerprint of the certificate)."""
    d = tmp_path_factory.mktemp("cert")
    key, crt = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=fake"],
                   check=True, capture_output=True)
    with open(crt) as f:
        fp = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()
    return key, crt, fp
