#!/bin/sh
# test.sh: build ipmpi from this checkout and run every test (make check).
#
# For a fresh Debian 12, as root: installs the Debian packages ipmpi needs
# (tools/deps.sh, the same list as demo.sh; a user who is not root is told
# what to install if anything is missing), runs autoreconf, configures in
# build/ (demo.sh builds in build-demo/: either may run first), builds with
# make -j2 and runs make check (C unit tests, Python unit tests, system
# tests on real mpirun clusters, the user guide's examples). On failure the
# logs of the failing tests are printed; the test summary always comes
# last. Exits non-zero if any test failed.
set -e
cd "$(dirname "$0")"

. tools/deps.sh
ipmpi_install_packages test.sh no
ipmpi_bootstrap
mkdir -p build
cd build
../configure --enable-docs
make -j2

# The C unit tests once more under AddressSanitizer and UBSan (the C pieces
# with no I/O: codec, furl, TLS helpers, queues...). A failure here stops
# the run with that test's log.
cd ..
mkdir -p build-asan
cd build-asan
../configure -q --enable-sanitizers
make -j2 >/dev/null
if ! ASAN_OPTIONS=detect_leaks=1 make check TESTS='$(check_PROGRAMS)' > check-asan.out 2>&1; then
    cat check-asan.out
    for log in test_*.log; do echo "==== $log"; cat "$log"; done
    echo "sanitizer unit tests failed" >&2
    exit 1
fi
sed -n '/^# TOTAL:/,/^# ERROR:/p' check-asan.out | sed 's/^/asan /'
cd ../build

# The controller and engines built with ASan/UBSan against the bad-input,
# adversarial (chaos), dead-engine, MultiEngine, shared-memory, task,
# frame, interrupt, security-directory, streamed-output, reconnect,
# node-shared-array and broadcast-tree system tests (the client stays the normal
# build: an ASan extension module would need libasan preloaded into every
# process the tests start). A sanitizer report aborts the controller, and
# the tests then fail.
# The session-table flood test is left to the main run below: it needs the
# controller to accept 4150 connections within 60 s, and the sanitizer build
# accepts too slowly (it held 2000), so here it is deselected by name.
if ! PYTEST_ADDOPTS="-k 'not lock_out'" ASAN_OPTIONS=detect_leaks=0 IPMPI_TEST_BIN="$(cd ../build-asan && pwd)/ipmpi" \
     make check TESTS="tests/system/test_refusals.py tests/system/test_dead_engines.py tests/system/test_mec.py tests/system/test_shm.py tests/system/test_chaos.py tests/system/test_tasks.py tests/system/test_frames.py tests/system/test_interrupt.py tests/system/test_security_dir.py tests/system/test_stream.py tests/system/test_reconnect.py tests/system/test_shared.py tests/system/test_tree.py tests/system/test_bell.py" \
     > check-asan-system.out 2>&1; then
    cat check-asan-system.out
    for log in tests/system/*.log; do echo "==== $log"; cat "$log"; done
    echo "system tests against the sanitizer build failed" >&2
    exit 1
fi
sed -n '/^# TOTAL:/,/^# ERROR:/p' check-asan-system.out | sed 's/^/asan system /'

# A one-node Slurm (munge, slurmctld, slurmd; qsub through
# slurm-wlm-torque) for the batch-mode tests, stopped whatever happens.
../slurm/local-slurm.sh start
trap '../slurm/local-slurm.sh stop >/dev/null 2>&1 || true' EXIT
SLURM_CONF=/var/tmp/ipmpi-slurm/slurm.conf
export SLURM_CONF

# make check's own exit status decides; its output is kept for the summary.
set +e
make check > check.out 2>&1
status=$?
set -e
grep -E '^(PASS|FAIL|ERROR|XPASS|XFAIL|SKIP):' check.out || true

if [ "$status" -ne 0 ]; then
    # The failing tests' logs, so CI shows why they failed.
    for trs in $(find . -name '*.trs' | sort); do
        if grep -Eq '^:test-result: (FAIL|ERROR|XPASS)' "$trs"; then
            log="${trs%.trs}.log"
            echo
            echo "======================== $log ========================"
            cat "$log"
        fi
    done
    if ! grep -q '^# TOTAL:' check.out; then
        # make check stopped before running the tests (e.g. a build error).
        echo
        echo "======================== make check output ========================"
        cat check.out
    fi
fi

echo
echo "============================================================================"
echo "Test summary (make check in $(pwd))"
echo "============================================================================"
if grep -q '^# TOTAL:' check.out; then
    sed -n '/^# TOTAL:/,/^# ERROR:/p' check.out
    count() { sed -n "s/^# $1: *\([0-9]*\).*/\1/p" check.out | tail -n 1; }
    passed=$(( $(count PASS) + $(count XFAIL) ))
    failed=$(( $(count FAIL) + $(count ERROR) + $(count XPASS) ))
    echo "============================================================================"
    echo "tests: $passed passed, $failed failed, $(count SKIP) skipped"
else
    echo "make check ran no test (exit status $status)"
fi
exit "$status"
