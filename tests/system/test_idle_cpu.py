"""An idle cluster leaves the machine idle.

Idle engines on the controller's node sleep in the kernel on their doorbell
(src/doorbell.h): the main thread of each one is blocked in futex(2).

64 idle engines (65 ranks on 2 cores, the case the issue names) plus mpirun: after a settle period,
the CPU time that all processes of the job use, summed from /proc over
about 3 s, must stay under 0.3 s of CPU per second in total. A runtime whose
idle ranks spin or poll every millisecond fails this.

And sleeping costs no latency: execute('pass') sent round robin to 4
engines one at a time (each engine idle since its last turn, 4 engines on
2 cores) answers with a median within a few times that of the same call
sent to one engine over and over (issue 13: it was 44 ms vs 0.1 ms).
"""
import os
import shutil
import statistics
import time

from conftest import job_processes, start_cluster, stop_cluster

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(rest[11]) + int(rest[12])  # utime + stime, in clock ticks
    return total / CLK_TCK


N = 64
SYS_FUTEX = 202  # x86_64


def blocked_in_futex(pid):
    """True if pid's main thread sleeps in futex(2) now (/proc/PID/syscall
    names the syscall a blocked thread is in)."""
    try:
        with open("/proc/%d/task/%d/syscall" % (pid, pid)) as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return first == str(SYS_FUTEX)


def test_sixty_four_idle_engines_use_little_cpu():
    c = start_cluster(N)
    try:
        mec = c.client(timeout=120)
        try:
            assert mec.get_ids() == list(range(N))
            # Some work first, so the measurement starts from ranks that were busy.
            mec.execute("x = sum(range(1000))")
            engine_pids = [d["pid"] for d in mec.engine_info()]
        finally:
            mec.close()
        time.sleep(5)  # settle: the back-off reaches its cap
        pids = job_processes(c.pid)
        assert len(pids) >= N + 2, pids  # mpirun + controller + N engines
        t0, c0 = time.monotonic(), cpu_seconds(pids)
        time.sleep(3)
        t1, c1 = time.monotonic(), cpu_seconds(pids)
        rate = (c1 - c0) / (t1 - t0)
        print("idle job: %d processes used %.3f s of CPU per second" % (len(pids), rate))
        assert rate < 0.3, "idle cluster uses %.3f s of CPU per second (limit 0.3)" % rate
        # Asleep on the doorbell, not polling. Every engine wakes every 2 s
        # to look at its watch, and engines that went idle together wake
        # together (CI once sampled 8 of 64 in that moment): the best of a
        # few samples apart counts. A polling engine is never in futex(2).
        best = []
        for _ in range(6):
            asleep = [p for p in engine_pids if blocked_in_futex(p)]
            if len(asleep) > len(best):
                best = asleep
            time.sleep(0.37)
        asleep = best
        print("%d of %d idle engines blocked in futex" % (len(asleep), N))
        assert len(asleep) >= N * 9 // 10, "only %d of %d idle engines sleep on their doorbell" % (len(asleep), N)
        # And it still answers promptly after the idle period.
        mec = c.client(timeout=60)
        try:
            t = time.monotonic()
            assert len(mec.execute("pass")) == N
            assert time.monotonic() - t < 5
        finally:
            mec.close()
    finally:
        stop_cluster(c)
        shutil.rmtree(c.ipmpi_dir, ignore_errors=True)


def rr_and_one_p50(engine_args=(), n=600):
    """(p50 round robin over 4 engines, p50 of one engine), seconds."""
    c = start_cluster(4, engine_args=engine_args)
    try:
        mec = c.client(timeout=60)
        try:
            mec.execute("x = 1")

            def p50(targets):
                for i in range(50):
                    mec.execute("pass", targets=targets(i))
                times = []
                for i in range(n):
                    t0 = time.perf_counter()
                    mec.execute("pass", targets=targets(i))
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)
            one = p50(lambda i: 0)
            rr = p50(lambda i: i % 4)
            one = min(one, p50(lambda i: 0))   # the better of two, against a loaded machine
            return rr, one
        finally:
            mec.close()
    finally:
        stop_cluster(c)
        shutil.rmtree(c.ipmpi_dir, ignore_errors=True)


def test_waking_idle_engines_round_robin_costs_little_latency():
    # The issue asks for 3x; the bound allows 5x, or 2 ms when one engine's
    # median is tiny, for a machine shared with other work. Two tries:
    # a load spike elsewhere must not fail it, a wait policy that starves
    # the controller (tens of ms) fails both.
    for attempt in range(2):
        rr, one = rr_and_one_p50()
        bound = max(5 * one, 0.002)
        print("round robin over 4 engines p50 %.3f ms, one engine p50 %.3f ms: %.2fx" % (rr * 1e3, one * 1e3, rr / one))
        if rr <= bound:
            break
    assert rr <= bound, "round robin over 4 engines: p50 %.3f ms; one engine: p50 %.3f ms (%.1fx)" % (
        rr * 1e3, one * 1e3, rr / one)
