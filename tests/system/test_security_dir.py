"""The controller keeps its keys only where nobody else can read or replace
them (issue 13: planted symlinks in a shared profile directory captured the
mec key). A profile directory writable by others, of another user, or
inside a directory others may write to without the sticky bit; a security/
that is a link, belongs to another user or is open to others: the cluster
does not start and says why (and how to fix it), and nothing is changed.
Files planted under the names of the key and furl files are replaced, never
written through, and a profile directory inside a sticky world-writable
directory (/tmp's mode) is used.
"""
import os
import shutil
import stat

import pytest

from conftest import new_dir, start_cluster, stop_cluster


@pytest.fixture
def scratch():
    """Makes fresh directories (conftest.new_dir) on call; removes them all
    after the test."""
    made = []

    def make():
        made.append(new_dir())
        return made[-1]
    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


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


def test_a_profile_directory_writable_by_others_is_refused(scratch):
    d = scratch()
    os.chmod(d, 0o777)
    refused(d, "writable by others")


def test_a_profile_directory_of_another_user_is_refused(scratch):
    d = scratch()
    os.chown(d, 65534, 65534)   # nobody; mode 0700, not writable by others
    refused(d, "belongs to uid 65534, not to this user")


def test_a_profile_directory_inside_a_world_writable_directory_without_sticky_bit_is_refused(scratch):
    # Whoever may write to the parent may rename prof/ away and put theirs
    # in its place (issue 13 audit: such a cluster started).
    parent = scratch()
    os.chmod(parent, 0o777)
    d = os.path.join(parent, "prof")
    os.mkdir(d, 0o700)
    refused(d, "inside %s, which is writable by others without the sticky bit (mode 0777)"
            % os.path.realpath(parent))
    refused(d, "chmod +t %s" % os.path.realpath(parent))


def test_a_security_directory_open_to_others_is_refused_not_changed(scratch):
    d = scratch()
    sec = os.path.join(d, "security")
    os.mkdir(sec)
    os.chmod(sec, 0o755)
    refused(d, "security directory %s is open to others (mode 755)" % sec)
    refused(d, "chmod 700 %s" % sec)
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o755, "the controller changed the mode itself"
    assert not os.path.exists(os.path.join(sec, "ipcontroller-mec.key"))


def test_a_security_directory_that_is_a_link_is_refused(scratch):
    d, elsewhere = scratch(), scratch()
    os.symlink(elsewhere, os.path.join(d, "security"))
    refused(d, "symbolic link")
    assert os.listdir(elsewhere) == [], "keys were written through the link"


def test_a_security_directory_of_another_user_is_refused(scratch):
    d = scratch()
    sec = os.path.join(d, "security")
    os.mkdir(sec, 0o700)
    os.chown(sec, 65534, 65534)   # nobody
    refused(d, "not to this user")


def test_planted_links_under_the_key_and_furl_names_are_replaced_not_followed(scratch):
    # The profile directory is inside a sticky world-writable directory,
    # as in /tmp: only an entry's owner may rename it there, so it is used.
    sticky, trap = scratch(), scratch()
    os.chmod(sticky, 0o1777)
    d = os.path.join(sticky, "prof")
    os.mkdir(d, 0o700)
    sec = os.path.join(d, "security")
    os.mkdir(sec, 0o700)
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
