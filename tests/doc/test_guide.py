"""Every example of the user guide (doc/*.rst) runs against a real cluster.

The guide's examples are written as the user types them, and this test
runs each chapter as a user would, in document order, in a fresh home
directory (HOME is a new temporary directory, IPMPI_DIR unset, the working
directory is that home), with the build tree's ipcluster first on PATH:

- ``.. code-block:: console``: each line starting with ``$ `` is a command
  for /bin/sh (lines starting with ``> `` continue it); the lines after it
  are its expected output. Each command runs in a shell of its own, but
  what ``export A=B`` sets is kept for the commands after it, as in one
  terminal. The command must exit 0; shown output must
  match (``...`` matches anything, whitespace runs are equal). A command
  with no output shown is only checked for its exit status.
- ``.. code-block:: pycon``: a Python session (``>>>`` and ``...``
  prompts) run by doctest, its expected output compared the same way.
  All sessions of a chapter share one namespace. A line starting with
  ``%`` is an IPython magic, run through IPython's own input transformer
  in an IPython shell made for the test.
- ``.. code-block:: python`` with ``:caption: NAME``: a file the reader is
  asked to write; it is written to NAME in the chapter's directory.

A code block that cannot run here (it needs a second host, root's package
manager, or minutes of benchmarks) is preceded by a comment line
``.. not-run: REASON``; any other code block, and any ``::`` literal block,
fails this test, so no example escapes it unnoticed.

The chapters start their own clusters (``ipcluster mpirun -n 4`` in a
console block) and stop them; whatever a failing chapter leaves running is
stopped here.
"""
import doctest
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

from conftest import DOC_DIR, child_env

RUN_LANGS = ("console", "pycon")
CHECK_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
CHAPTERS = sorted(glob.glob(os.path.join(DOC_DIR, "*.rst")))


class Block:
    def __init__(self, lang, options, lines, lineno, not_run):
        self.lang, self.options, self.lines, self.lineno, self.not_run = lang, options, lines, lineno, not_run


def parse_blocks(path):
    """The code blocks of one .rst file, in order; raises on a stray '::' block."""
    with open(path) as f:
        text = f.read().splitlines()
    blocks, i = [], 0
    directive = re.compile(r"^(\s*)\.\. code-block::\s*(\S+)\s*$")
    while i < len(text):
        line = text[i]
        m = directive.match(line)
        if m:
            indent = len(m.group(1))
            # The comment that may say why the block is not run: the nearest
            # non-blank line above.
            j = i - 1
            while j >= 0 and not text[j].strip():
                j -= 1
            not_run = j >= 0 and text[j].strip().startswith(".. not-run:")
            i += 1
            options = {}
            while i < len(text) and re.match(r"^\s+:(\w+):\s*(.*)$", text[i]):
                k, v = re.match(r"^\s+:(\w+):\s*(.*)$", text[i]).groups()
                options[k] = v
                i += 1
            body, start = [], i + 1
            while i < len(text) and (not text[i].strip() or len(text[i]) - len(text[i].lstrip()) > indent):
                body.append(text[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            while body and not body[0].strip():
                body.pop(0)
            width = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
            blocks.append(Block(m.group(2), options, [b[width:] for b in body], start, not_run))
            continue
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.lstrip().startswith(".."):
            raise AssertionError("%s:%d: a '::' literal block: write it as a code-block (console, pycon, "
                                 "python with :caption:, or text for what is not code)" % (path, i + 1))
        i += 1
    return blocks


def console_commands(block):
    """[(command, expected output)] of a console block."""
    cmds = []
    for line in block.lines:
        if line.startswith("$ "):
            cmds.append([line[2:], []])
        elif line.startswith("> ") and cmds and not cmds[-1][1]:
            cmds[-1][0] += "\n" + line[2:]
        elif cmds:
            cmds[-1][1].append(line)
        else:
            raise AssertionError("line %d: console block text before the first '$ ' prompt" % block.lineno)
    return [(c, "\n".join(w).rstrip("\n") + "\n" if any(x.strip() for x in w) else "") for c, w in cmds]


def pycon_examples(block, magic):
    """doctest.Examples of a pycon block."""
    examples, lines, i = [], block.lines, 0
    while i < len(lines):
        if not lines[i].startswith(">>>"):
            raise AssertionError("line %d: text outside an example: %r" % (block.lineno + i, lines[i]))
        src = [lines[i][4:]]
        lineno = block.lineno + i
        i += 1
        while i < len(lines) and (lines[i].startswith("... ") or lines[i] == "..."):
            src.append(lines[i][4:])
            i += 1
        want = []
        while i < len(lines) and not lines[i].startswith(">>>"):
            want.append(lines[i])
            i += 1
        while want and not want[-1].strip():
            want.pop()
        source = "\n".join(src) + "\n"
        if source.startswith("%"):
            source = magic(source)
        want = "\n".join(want) + "\n" if want else ""
        exc_msg = None
        m = doctest.DocTestParser._EXCEPTION_RE.match(want)
        if m:
            exc_msg = m.group("msg")
        examples.append(doctest.Example(source, want, exc_msg, lineno=lineno - 1))
    return examples


class Chapter:
    """A chapter's run: its home directory, environment and Python namespace."""

    def __init__(self, path, monkeypatch):
        self.path = path
        self.home = tempfile.mkdtemp(prefix="ipmpi-guide-")
        self.env = child_env(HOME=self.home)
        self.env.pop("IPMPI_DIR", None)
        monkeypatch.setenv("HOME", self.home)
        monkeypatch.delenv("IPMPI_DIR", raising=False)
        monkeypatch.chdir(self.home)
        self.globs = {"__name__": "__main__"}
        self.shell = None

    def magic(self, source):
        if self.shell is None:
            try:
                from IPython.core.interactiveshell import InteractiveShell
            except ImportError:
                raise AssertionError("the guide's %magic examples need IPython: apt-get install python3-ipython")
            self.shell = InteractiveShell.instance()
            self.globs["get_ipython"] = lambda: self.shell
        from IPython.core.inputtransformer2 import TransformerManager
        return TransformerManager().transform_cell(source)

    def where(self, block, offset=0):
        return "%s:%d" % (os.path.relpath(self.path, os.path.dirname(DOC_DIR)), block.lineno + offset)

    def run_console(self, block):
        checker = doctest.OutputChecker()
        for cmd, want in console_commands(block):
            # Each command runs in a shell of its own; what an `export`
            # sets is kept for the commands after it, as in one terminal.
            m = re.match(r"^export\s+((?:\w+=\S*\s*)+)$", cmd)
            if m:
                for assign in m.group(1).split():
                    k, v = assign.split("=", 1)
                    self.env[k] = v
            r = subprocess.run(["/bin/sh", "-c", cmd], cwd=self.home, env=self.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
            if r.returncode != 0:
                raise AssertionError("%s: `%s` exited %d:\n%s" % (self.where(block), cmd, r.returncode, r.stdout))
            if want and not checker.check_output(want, r.stdout, CHECK_FLAGS):
                raise AssertionError("%s: `%s` printed\n%s\nbut the guide shows\n%s"
                                     % (self.where(block), cmd, r.stdout, want))

    def run_pycon(self, block):
        examples = pycon_examples(block, self.magic)
        test = doctest.DocTest(examples, self.globs, self.where(block), self.path, block.lineno - 1, None)
        runner = doctest.DocTestRunner(verbose=False, optionflags=CHECK_FLAGS)
        report = []
        result = runner.run(test, out=report.append, clear_globs=False)
        self.globs = test.globs    # DocTest ran on a copy: the next block goes on from here
        if result.failed:
            raise AssertionError("%s: %d of %d examples failed:\n%s"
                                 % (self.where(block), result.failed, result.attempted, "".join(report)))

    def write_file(self, block):
        name = block.options["caption"]
        with open(os.path.join(self.home, name), "w") as f:
            f.write("\n".join(block.lines) + "\n")

    def logs(self):
        """The cluster logs under this home (controller, engines, ipcluster),
        their last 200 lines each: why a failing chapter's job ended."""
        out = []
        for root, _dirs, files in os.walk(self.home):
            for name in sorted(files):
                if name.endswith(".log"):
                    path = os.path.join(root, name)
                    with open(path, errors="replace") as f:
                        tail = f.read().splitlines()[-200:]
                    out.append("==== %s\n%s" % (os.path.relpath(path, self.home), "\n".join(tail)))
        return "\n".join(out) or "(no log under %s)" % self.home

    def cleanup(self):
        for c in list(self.globs.values()):
            close = getattr(c, "close", None)
            if close is not None and type(c).__name__ in ("MultiEngineClient", "TaskClient"):
                try:
                    close()
                except Exception:
                    pass
        subprocess.run(["ipcluster", "stop", "--timeout", "10"], cwd=self.home, env=self.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        # Last resort: nothing whose command line names this home survives.
        r = subprocess.run(["pgrep", "-f", "--", self.home], stdout=subprocess.PIPE, text=True, timeout=10)
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.home, ignore_errors=True)


def test_chapters_exist():
    names = {os.path.basename(p) for p in CHAPTERS}
    for must in ("index.rst", "overview.rst", "process.rst", "multiengine.rst", "task.rst", "mpi.rst",
                 "security.rst", "performance.rst", "troubleshooting.rst"):
        assert must in names


@pytest.mark.parametrize("path", CHAPTERS, ids=[os.path.basename(p) for p in CHAPTERS])
def test_every_block_is_run_or_says_why_not(path):
    for b in parse_blocks(path):
        if b.lang in RUN_LANGS or (b.lang == "python" and "caption" in b.options) or b.lang == "text":
            assert not b.not_run or b.lang != "text", "%s:%d: a text block needs no not-run" % (path, b.lineno)
            continue
        assert b.not_run, ("%s:%d: a %s block that the test cannot run: make it console, pycon or "
                           "python with :caption:, or say why with '.. not-run: REASON' above it"
                           % (path, b.lineno, b.lang))


@pytest.mark.parametrize("path", CHAPTERS, ids=[os.path.basename(p) for p in CHAPTERS])
def test_examples(path, monkeypatch):
    blocks = [b for b in parse_blocks(path) if not b.not_run]
    if not any(b.lang in RUN_LANGS for b in blocks):
        return
    ch = Chapter(path, monkeypatch)
    failures = []
    try:
        # Every block runs even after a failure, so one report names every
        # example that is wrong (later ones may fail because of an earlier one).
        for b in blocks:
            try:
                if b.lang == "console":
                    ch.run_console(b)
                elif b.lang == "pycon":
                    ch.run_pycon(b)
                elif b.lang == "python" and "caption" in b.options:
                    ch.write_file(b)
            except AssertionError as e:
                failures.append(str(e))
        if failures:
            # The logs of the job the examples ran against, read before
            # cleanup removes the home directory.
            failures.append("the cluster's logs:\n" + ch.logs())
    finally:
        ch.cleanup()
    assert not failures, "\n\n".join(failures)
