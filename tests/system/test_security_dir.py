"""The controller keeps its keys only where nobody else can read or replace
them (issue 13: planted symlinks in a shared profile directory captured the
mec key). A profile directory writable by others, a security/ that is a
link or belongs to another user: the cluster does not start and says why.
Files planted under the names of the key and furl files are replaced, never
written through.
"""
import os
import shutil
import stat

import pytest

from conftest import new_dir, start_cluster, stop_cluster


def refused(d, what):
    with pytest.raises(Exception) as ei:
        c = start_cluster(1, ipmpi_dir=d)
        stop_cluster(c)
    text = str(ei.value)
    logs = os.path.join(d, "log")
    for name in (os.listdir(logs) if os.path.isdir(logs) else []):
        with open(os.path.join(logs, name), errors="replace") as f:
            text += f.read()
    assert what in text, text[-2000:]
    sec = os.path.join(d, "security")
    assert not os.path.exists(os.path.join(sec, "ipcontroller-mec.furl"))


def test_a_profile_directory_writable_by_others_is_refused():
    d = new_dir()
    try:
        os.chmod(d, 0o777)
        refused(d, "writable by others")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_security_directory_that_is_a_link_is_refused():
    d, elsewhere = new_dir(), new_dir()
    try:
        os.symlink(elsewhere, os.path.join(d, "security"))
        refused(d, "symbolic link")
        assert os.listdir(elsewhere) == [], "keys were written through the link"
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_security_directory_of_another_user_is_refused():
    d = new_dir()
    try:
        sec = os.path.join(d, "security")
        os.mkdir(sec, 0o700)
        os.chown(sec, 65534, 65534)   # nobody
        refused(d, "not to this user")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_planted_links_under_the_key_and_furl_names_are_replaced_not_followed():
    d, trap = new_dir(), new_dir()
    try:
        sec = os.path.join(d, "security")
        os.mkdir(sec, 0o755)    # a looser mode is made 0700
        for name in ("ipcontroller-mec.furl", "ipcontroller-tc.furl", "ipcontroller-mec.key",
                     "ipcontroller-tc.key", "controller-key.pem", "controller-cert.pem"):
            os.symlink(os.path.join(trap, name), os.path.join(sec, name))
        c = start_cluster(1, ipmpi_dir=d)
        try:
            mec = c.client(timeout=60)
            assert mec.get_ids() == [0]
            mec.close()
        finally:
            stop_cluster(c)
        assert os.listdir(trap) == [], "a secret was written through a planted link: %s" % os.listdir(trap)
        assert stat.S_IMODE(os.stat(sec).st_mode) == 0o700
        for name in os.listdir(sec):
            assert not os.path.islink(os.path.join(sec, name)), name
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(trap, ignore_errors=True)
