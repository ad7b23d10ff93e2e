# tools/deps.sh: the one list of Debian packages ipmpi needs, and the steps
# that demo.sh and test.sh share. Sourced (not run) by both scripts, from
# the top of the checkout; each function exits the script with a message
# that says what to install or do when it cannot go on.

# Build, run and test ipmpi (Debian 12). python3-sphinx builds the user
# guide (make html, and make check builds it with warnings as errors);
# python3-ipython runs the guide's examples of the %px magics (and
# python3-ipykernel with python3-jupyter-client a real Jupyter kernel); Slurm with
# munge and slurm-wlm-torque's qsub are the batch systems `ipcluster slurm`
# and `ipcluster pbs` submit to (test.sh starts a one-node Slurm:
# slurm/local-slurm.sh); openssh runs `ipcluster ssh` across hosts; clang
# and libFuzzer build the fuzzer make check runs (tests/fuzz/run-fuzz).
IPMPI_PACKAGES="libopenmpi-dev openmpi-bin libpmix-dev libhwloc-dev hwloc libcmocka-dev libssl-dev
python3-dev python3-numpy python3-cloudpickle python3-mpi4py python3-pytest
python3-sphinx python3-ipython python3-ipykernel python3-jupyter-client
slurmctld slurmd slurm-client munge slurm-wlm-torque openssh-server openssh-client
clang libfuzzer-14-dev
autoconf automake libtool pkg-config make gcc procps iproute2 openssl
sslscan python3-venv python3-pip python3-setuptools python3-wheel"

# ipmpi_missing_packages: prints the packages of the list that dpkg does not
# report as installed (all of them if dpkg-query is missing).
ipmpi_missing_packages() {
    for p in $IPMPI_PACKAGES; do
        dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

# ipmpi_install_packages SCRIPT NEED_ROOT: installs the list with apt-get.
# On a machine without apt-get/dpkg, or run by a user who is not root while
# packages are missing (or while NEED_ROOT=yes), says what to do and exits 1.
# IPMPI_SKIP_PACKAGES=1 skips this step (configure then names what is missing).
ipmpi_install_packages() {
    me=$1 need_root=$2
    if [ "${IPMPI_SKIP_PACKAGES:-0}" = 1 ]; then
        echo "$me: IPMPI_SKIP_PACKAGES=1: not installing packages" >&2
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
        {
            echo "$me: this machine has no apt-get/dpkg: it is not Debian, so the packages cannot be installed for you."
            echo "Install the equivalents of these Debian 12 packages with your system's package manager:"
            echo "$IPMPI_PACKAGES" | sed 's/^/    /'
            echo "then run: IPMPI_SKIP_PACKAGES=1 $0   (configure names anything still missing)"
        } >&2
        exit 1
    fi
    if [ "$(id -u)" != 0 ]; then
        missing=$(ipmpi_missing_packages | tr '\n' ' ')
        if [ "$need_root" = yes ]; then
            echo "$me: must run as root (it installs Debian packages and installs ipmpi under /usr/local): sudo $0" >&2
            exit 1
        fi
        if [ -n "$missing" ]; then
            echo "$me: not root, and these packages are missing; as root run:" >&2
            echo "    apt-get update && apt-get install --no-install-recommends $missing" >&2
            echo "or run this script as root (sudo $0), which installs them." >&2
            exit 1
        fi
        echo "$me: not root; all packages are installed already" >&2
        return 0
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $IPMPI_PACKAGES
}

# ipmpi_bootstrap: regenerates the build system in the source tree. Builds
# happen in directories of their own (build/ for test.sh, build-demo/ for
# demo.sh); a source tree configured in place (by an older demo.sh) would
# make every out-of-tree configure fail, so it is cleaned first.
ipmpi_bootstrap() {
    if [ -f config.status ]; then
        echo "cleaning the build that was configured in the source tree (make distclean)"
        make distclean >/dev/null 2>&1 || rm -f config.status
    fi
    autoreconf -fi
    rm -f configure~   # autoconf's backup of the previous configure
}
