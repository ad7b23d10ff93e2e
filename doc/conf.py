# Sphinx configuration of the ipmpi user guide (Debian's python3-sphinx).
# Build it with `make html` in a configured build tree (warnings are errors).
# Every example in these pages is run against a real cluster by
# tests/doc/test_guide.py (`make check`): see doc/index.rst.
project = "ipmpi"
author = "the ipmpi developers"
copyright = "the ipmpi developers"
version = release = "0.1.0"

extensions = []
source_suffix = {".rst": "restructuredtext"}
master_doc = root_doc = "index"
exclude_patterns = ["html", ".doctrees", "_build"]
# Examples are written as the user types them: ">>>" sessions (pycon) and
# shell commands (console); everything else is plain text.
highlight_language = "none"
pygments_style = "sphinx"
html_theme = "alabaster"
html_title = "ipmpi user guide"
html_static_path = []
html_show_sourcelink = False
