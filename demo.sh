#!/bin/sh
# demo.sh: install ipmpi on this machine and say Hello World from 4 engines.
#
# For a fresh Debian 12, as root: installs the Debian packages, builds and
# installs ipmpi (under /usr/local), starts a cluster of a controller and 4
# engines with `ipcluster mpirun -n 4`, runs the Hello World session of the
# Python client, and stops the cluster again.
set -e
cd "$(dirname "$0")"

PACKAGES="libopenmpi-dev openmpi-bin libpmix-dev libhwloc-dev hwloc libcmocka-dev libssl-dev
python3-dev python3-numpy python3-cloudpickle python3-mpi4py python3-pytest
autoconf automake libtool pkg-config make gcc procps iproute2 openssl"

apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES

autoreconf -fi
./configure
make -j2
make install

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
