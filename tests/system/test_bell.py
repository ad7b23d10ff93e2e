"""The controller's bell (src/doorbell.h, issue 11): while only engines of
its node work, the controller sleeps in ppoll() until the engine whose
frame it needs rings it, instead of polling MPI for the whole request.

The controller counts its sleeps and the rings that ended them and logs
both when it stops; these tests read that line. The count it sleeps for is
the fewest replies a request in flight still waits for: a request to an
idle engine while another engine runs a long one must still be answered
at once (a wrong count leaves the controller asleep until its 10 ms
timer, which the median below would show).
"""
import statistics
import time

from conftest import bell_counts, start_cluster, stop_cluster

N = 4
T = 60


def test_the_controller_sleeps_until_rung_and_still_answers_at_once():
    c = start_cluster(N, join=False)
    try:
        mec = c.client(timeout=T)
        try:
            # Requests that keep every engine busy a while: the controller
            # sleeps, and the last reply of each rings it.
            for _ in range(3):
                assert mec.execute("import time; time.sleep(0.2); x = 1", timeout=T) is not None
            assert mec.pull("x", timeout=T) == [1] * N
            # Engine 0 busy for 2 s; requests to engine 1 meanwhile are
            # answered as they come, not at the controller's timer.
            pr = mec.execute("import time; time.sleep(2); y = 'slow'", targets=0, block=False)
            lat = []
            for i in range(40):
                t = time.perf_counter()
                mec.execute("y = %d" % i, targets=1, timeout=T)
                lat.append(time.perf_counter() - t)
            print("requests to engine 1 while engine 0 works: median %.2f ms, max %.2f ms"
                  % (statistics.median(lat) * 1e3, max(lat) * 1e3))
            assert statistics.median(lat) < 0.005, lat
            pr.get_result(block=True, timeout=T)
            assert mec.pull("y", targets=[0, 1], timeout=T) == ["slow", 39]
        finally:
            mec.close()
    finally:
        stop_cluster(c)
    sleeps, rings, _far = bell_counts(c.log_dir)
    print("slept %d times, rung %d times" % (sleeps, rings))
    assert sleeps > 0 and rings > 0, (sleeps, rings)


def test_busy_spin_off_keeps_the_controller_polling():
    c = start_cluster(2, join=False, engine_args=("--busy-spin-us", "off"))
    try:
        mec = c.client(timeout=T)
        try:
            mec.execute("import time; time.sleep(0.2)", timeout=T)
            assert mec.execute("z = 5; z", timeout=T) is not None
            assert mec.pull("z", timeout=T) == [5, 5]
        finally:
            mec.close()
    finally:
        stop_cluster(c)
    assert bell_counts(c.log_dir) == (0, 0, 0)
