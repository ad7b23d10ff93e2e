"""The man pages say what the programs do: every option of `ipcluster MODE
--help` and `ipmpi --help` is in ipcluster(1) / ipmpi(1) with the same
argument name and default, and nothing more; `ipmpi --help` lists exactly
the options main.c parses; `configure --help` lists every option of
configure.ac. No cluster is started."""
import os
import re
import subprocess

import pytest

from conftest import BUILD_DIR, MAN_DIR, SRCDIR, child_env


def run(argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                       env=child_env())
    assert r.returncode == 0, "%s exited %d:\n%s" % (argv, r.returncode, r.stdout)
    return r.stdout


def troff_text(s):
    """Plain text of troff source lines (fonts, quotes and escapes dropped)."""
    s = re.sub(r"^\.(BI|BR|IR|RB|RI|B|I)\s+", "", s, flags=re.M)
    s = s.replace("\\-", "-").replace("\\(dq", '"').replace("\\(aq", "'").replace("\\e", "\\")
    s = re.sub(r"\\f[BIRP]", "", s)
    s = s.replace('"', " ")
    return re.sub(r"\s+", " ", s).strip()


def man_options(section):
    """{option: (argument name or None, text of the entry)} of the .TP entries of a man page section."""
    entries = {}
    parts = re.split(r"^\.TP\s*$", section, flags=re.M)[1:]
    for part in parts:
        part = re.split(r"^\.(SS|SH)\b", part, flags=re.M)[0]
        lines = part.strip("\n").split("\n")
        head, body = troff_text(lines[0]), troff_text("\n".join(lines[1:]))
        for opt, arg in re.findall(r"(--?[a-z][a-z0-9-]*)(?:\s+([A-Z][A-Z+:]*)(?![\w:]))?", head):
            entries[opt] = (arg or None, body)
    return entries


def man_sections(path, level="SS"):
    with open(path) as f:
        src = f.read()
    out = {}
    for m in re.finditer(r'^\.%s\s+"?([^"\n]*)"?\s*$' % level, src, flags=re.M):
        end = re.compile(r"^\.(SS|SH)\b", re.M).search(src, m.end())
        out[m.group(1).strip()] = src[m.end():end.start() if end else len(src)]
    return out


def help_options(text):
    """{option: (argument name or None, help text)} from an --help text."""
    opts, cur = {}, None
    for line in text.splitlines():
        # An argument is a NAME (HH:MM:SS too) or argparse's {choice,...}.
        arg = r"(?: (?:[A-Z][A-Z:]*|\{[\w,]+\}))?"
        m = re.match(r"^  (-[-\w]+%s(?:, -[-\w]+%s)*)(?:\s{2,}(.*))?$" % (arg, arg), line)
        if m:
            cur = []
            for spec in m.group(1).split(", "):
                opt, _, a = spec.partition(" ")
                opts[opt] = (None if not a or a.startswith("{") else a, cur)
            cur.append(m.group(2) or "")
        elif cur is not None and line.startswith("    ") and line.strip():
            cur.append(line.strip())
        else:
            cur = None
    return {k: (a, re.sub(r"\s+", " ", " ".join(t)).replace("- ", "-")) for k, (a, t) in opts.items()}


def defaults(text):
    return re.findall(r"default (\d[\w.]*(?: [GMK]iB)?)", text)


def check_same(help_opts, man_opts, where):
    help_opts = {k: v for k, v in help_opts.items() if k not in ("-h", "--help")}
    man_opts = {k: v for k, v in man_opts.items() if k not in ("-h", "--help")}
    assert sorted(help_opts) == sorted(man_opts), "%s: --help has %s, the man page %s" % (
        where, sorted(help_opts), sorted(man_opts))
    for opt, (arg, text) in help_opts.items():
        marg, mtext = man_opts[opt]
        assert arg == marg, "%s %s: --help names its argument %s, the man page %s" % (where, opt, arg, marg)
        for d in defaults(text):
            assert "default %s" % d in mtext, "%s %s: --help says default %s, the man page: %r" % (
                where, opt, d, mtext)


IPCLUSTER = os.path.join(BUILD_DIR, "ipcluster")


def ipcluster_modes():
    out = run([IPCLUSTER, "--help"])
    m = re.search(r"\{([\w,]+)\}", out)
    assert m, out
    return m.group(1).split(",")


def test_every_ipcluster_mode_has_its_man_section():
    sections = man_sections(os.path.join(MAN_DIR, "ipcluster.1"))
    for mode in ipcluster_modes():
        assert any(s.split()[:2] == ["ipcluster", mode] for s in sections), (
            "ipcluster(1) has no section 'ipcluster %s [options]'" % mode)


# Every mode that `ipcluster --help` offers, read when the tests are
# collected: a mode that lands is checked against ipcluster(1) at once.
MODES = ipcluster_modes()


@pytest.mark.parametrize("mode", MODES)
def test_ipcluster_mode_help_matches_man_page(mode):
    sections = man_sections(os.path.join(MAN_DIR, "ipcluster.1"))
    section = [v for k, v in sections.items() if k.split()[:2] == ["ipcluster", mode]]
    assert section, "ipcluster(1) has no section 'ipcluster %s [options]'" % mode
    check_same(help_options(run([IPCLUSTER, mode, "--help"])), man_options(section[0]), "ipcluster " + mode)


def ipmpi_help(name="ipmpi"):
    return run([os.path.join(BUILD_DIR, name), "--help"])


def test_ipmpi_help_matches_man_page():
    sections = man_sections(os.path.join(MAN_DIR, "ipmpi.1"), level="SH")
    check_same(help_options(ipmpi_help()), man_options(sections["OPTIONS"]), "ipmpi")


def test_ipmpi_help_lists_exactly_the_parsed_options():
    with open(os.path.join(SRCDIR, "src", "main.c")) as f:
        src = f.read()
    table = re.search(r"struct option longopts\[\] = \{(.*?)\{0, 0, 0, 0\}", src, re.S).group(1)
    parsed = {"--" + n for n in re.findall(r'\{"([\w-]+)",', table)}
    listed = set(help_options(ipmpi_help()))
    assert parsed == listed - {"-h"}, "main.c parses %s; ipmpi --help lists %s" % (sorted(parsed), sorted(listed))


@pytest.mark.parametrize("name", ["ipcontroller", "ipengine"])
def test_role_names_have_the_same_help_and_man_page(name):
    assert help_options(ipmpi_help(name)) == help_options(ipmpi_help())
    with open(os.path.join(MAN_DIR, name + ".1")) as f:
        assert f.read().strip() == ".so man1/ipmpi.1"
    with open(os.path.join(MAN_DIR, "ipmpi.1")) as f:
        assert name in f.read().split(".SH DESCRIPTION")[0]


def test_configure_help_lists_every_option():
    with open(os.path.join(SRCDIR, "configure.ac")) as f:
        ac = f.read()
    out = run(["/bin/sh", os.path.join(SRCDIR, "configure"), "--help"])
    names = ["--enable-" + n for n in re.findall(r"AC_ARG_ENABLE\(\[([\w-]+)\]", ac)]
    names += ["--with-" + n for n in re.findall(r"AC_ARG_WITH\(\[([\w-]+)\]", ac)]
    names += re.findall(r"AC_ARG_VAR\(\[(\w+)\]", ac)
    assert len(names) >= 4
    for n in names:
        assert re.search(r"^\s+%s\b" % re.escape(n), out, re.M), "configure --help does not list " + n
