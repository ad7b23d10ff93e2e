#!/bin/sh
# demo.sh: install ipmpi on this machine and say Hello World from 4 engines.
#
# For a fresh Debian 12, as root: installs the Debian packages
# (tools/deps.sh, the same list as test.sh), builds ipmpi in build-demo/
# and installs it under /usr/local, starts a cluster of a controller and 4
# engines with `ipcluster mpirun -n 4`, runs the Hello World session of the
# Python client, and stops the cluster again. It may run before or after
# test.sh (which builds in build/), and any number of times.
set -e
cd "$(dirname "$0")"
. tools/deps.sh

ipmpi_install_packages demo.sh yes
ipmpi_bootstrap
mkdir -p build-demo
cd build-demo
../configure
make -j2
make install
cd ..

# Ours, not Debian's /usr/bin/ipcluster (python3-ipyparallel), if that is installed.
PATH=/usr/local/bin:$PATH
export PATH
hash -r 2>/dev/null || true

trap 'ipcluster stop >/dev/null 2>&1 || true' EXIT INT TERM
ipcluster mpirun -n 4

echo
echo "---- the Hello World session ----"
/usr/bin/python3 - <<'PYEOF'
import code
import sys

session = [
    "from ipmpi import client",
    "mec = client.MultiEngineClient()",
    "mec.get_ids()",
    "mec.execute('print(\"Hello World\")')",
]
console = code.InteractiveConsole()
for line in session:
    print(">>> " + line, flush=True)
    if console.push(line):
        raise SystemExit("incomplete input: " + line)
    if hasattr(sys, "last_value"):  # the console printed a traceback
        raise SystemExit(1)
PYEOF
echo "---------------------------------"
echo
ipcluster stop
echo
echo "The user guide: doc/index.rst (HTML: make -C build-demo html); man ipcluster, man ipmpi."
