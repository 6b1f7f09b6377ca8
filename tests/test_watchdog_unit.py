"""The wait loop behind every exchange and guarded collective (hpcattn.exchange), with fake
requests and a fake clock: it sleeps with a growing back-off instead of spinning, starts over on
progress, reports a stall once after the timeout with one line naming the silent rank, and
aborts the job by default. HPCATTN_STALL_TIMEOUT is read and refused when not a positive number.
"""
import re

import pytest

from hpcattn import exchange
from hpcattn.errors import HpcattnError


class FakeClock:
    """Time that moves only when the wait sleeps: no test here depends on the machine's speed."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class FakeRequest:
    """Completes on the ``done_at``-th Test() (never when None), or once ``clock`` passes ``at``."""

    def __init__(self, done_at=None, clock=None, at=None):
        self.done_at, self.clock, self.at, self.tests = done_at, clock, at, 0

    def Test(self):  # noqa: N802 - mpi4py's name
        self.tests += 1
        if self.clock is not None and self.at is not None:
            return self.clock.now >= self.at
        return self.done_at is not None and self.tests >= self.done_at


def wait(requests, clock, timeout=60.0, stalls=None):
    stalls = [] if stalls is None else stalls
    exchange.wait_all(requests, lambda pending, waited: (tuple(pending), round(waited, 3)),
                      stalls.append, timeout, clock=clock, sleep=clock.sleep)
    return stalls


def test_completed_requests_return_without_sleeping():
    clock = FakeClock()
    assert wait([FakeRequest(1), FakeRequest(1)], clock) == []
    assert clock.sleeps == []


def test_the_sleep_grows_from_50_us_to_10_ms_and_never_spins():
    clock = FakeClock()
    wait([FakeRequest(clock=clock, at=5.0)], clock)
    first, cap = exchange.FIRST_SLEEP_S, exchange.MAX_SLEEP_S
    assert clock.sleeps[0] == pytest.approx(first) == pytest.approx(50e-6)
    assert cap == pytest.approx(10e-3)
    assert all(b >= a for a, b in zip(clock.sleeps, clock.sleeps[1:]))   # never shrinks
    assert max(clock.sleeps) == pytest.approx(cap)
    assert min(clock.sleeps) > 0                                           # no zero-sleep spin
    # 5 s stalled cost about 5 s / 10 ms tests, not millions: a waiting rank is idle
    assert len(clock.sleeps) < 5.0 / cap + 100


def test_progress_starts_the_back_off_over():
    clock = FakeClock()
    slow = FakeRequest(clock=clock, at=2.0)
    wait([FakeRequest(clock=clock, at=1.0), slow], clock)
    restart = next(i for i, s in enumerate(clock.sleeps) if i and s < clock.sleeps[i - 1])
    assert clock.sleeps[restart] == pytest.approx(exchange.FIRST_SLEEP_S)
    assert clock.sleeps[restart - 1] == pytest.approx(exchange.MAX_SLEEP_S)


def test_a_stall_is_reported_once_with_the_open_requests_then_the_wait_goes_on():
    clock = FakeClock()
    stalls = wait([FakeRequest(1), FakeRequest(clock=clock, at=7.5)], clock, timeout=3.0)
    assert len(stalls) == 1
    pending, waited = stalls[0]
    assert pending == (1,)                       # index of the request that did not complete
    assert 3.0 <= waited < 3.0 + 2 * exchange.MAX_SLEEP_S
    assert clock.now >= 7.5                      # an on_stall that returns lets the wait finish


def test_the_stall_clock_counts_from_the_last_progress():
    clock = FakeClock()
    # each request completes 2 s after the previous one: never 3 s without progress
    stalls = wait([FakeRequest(clock=clock, at=2.0), FakeRequest(clock=clock, at=4.0),
                   FakeRequest(clock=clock, at=6.0)], clock, timeout=3.0)
    assert stalls == []


class FakeComm:
    def __init__(self, rank, size, recv_after=None):
        self.rank, self.size, self.aborted, self.posted = rank, size, [], []
        self.recv_after = recv_after
        self.send_after = None

    def Irecv(self, buf, source, tag):  # noqa: N802 - mpi4py's names
        self.posted.append(("recv", source, tag))
        return self.recv_after

    def Isend(self, buf, dest, tag):  # noqa: N802
        self.posted.append(("send", dest, tag))
        return self.send_after

    def Abort(self, code):  # noqa: N802
        self.aborted.append(code)


def ring_message(rank, size, recv_done, send_done, **send_recv_kw):
    comm = FakeComm(rank, size)
    messages = []
    comm.recv_after, comm.send_after = FakeRequest(1 if recv_done else None), FakeRequest(1 if send_done else None)

    def on_stall(message):
        messages.append(message)
        comm.recv_after.done_at = comm.send_after.done_at = 0   # the peer wakes up

    ring = exchange.RingComm(comm, timeout=0.2, on_stall=on_stall)
    ring.send_recv(bytearray(8), bytearray(8), **send_recv_kw)
    ring.wait()
    assert ring.reqs == []
    return messages


def test_ring_names_the_left_rank_whose_block_did_not_come():
    (msg,) = ring_message(0, 4, recv_done=False, send_done=True, step=2)
    # the waited time is at least the timeout, more on a loaded machine
    assert re.match(r"no message from rank 3 for \d+(\.\d)? s \(ring step 2\); expected rank 3 to "
                    r"answer within the stall timeout of 0\.2 s \(stopped, or far slower\?\)", msg), msg
    assert msg.endswith("; set HPCATTN_STALL_TIMEOUT to wait longer")
    assert "\n" not in msg


def test_ring_names_the_right_rank_that_did_not_take_our_block():
    (msg,) = ring_message(2, 3, recv_done=True, send_done=False, tag=12)
    assert msg.startswith("rank 0 did not receive our block for ")
    assert "(ring exchange 0, tag 12)" in msg          # no step given: the exchange's number


def test_ring_without_a_stall_reports_nothing():
    assert ring_message(1, 2, recv_done=True, send_done=True, step=0) == []


def test_the_default_on_stall_prints_one_line_and_aborts(capsys, monkeypatch):
    monkeypatch.setattr(exchange.time, "sleep", lambda s: None)
    comm = FakeComm(1, 2)
    exchange.abort_job(comm, "no message from rank 0 for 3 s (ring step 0)")
    err = capsys.readouterr().err
    assert err == "hpcattn: error: rank 1: no message from rank 0 for 3 s (ring step 0)\n"
    assert comm.aborted == [1]


def test_ring_comm_aborts_by_default(capsys, monkeypatch):
    monkeypatch.setattr(exchange.time, "sleep", lambda s: None)
    comm = FakeComm(0, 2)
    comm.recv_after, comm.send_after = FakeRequest(None), FakeRequest(1)
    ring = exchange.RingComm(comm, timeout=0.01)
    ring.send_recv(bytearray(1), bytearray(1), step=0)
    real_abort = comm.Abort

    def abort(code):
        real_abort(code)
        comm.recv_after.done_at = 0   # a real Abort does not return; the fake ends the wait
    comm.Abort = abort
    ring.wait()
    assert comm.aborted == [1]
    line = capsys.readouterr().err
    assert line.startswith("hpcattn: error: rank 0: no message from rank 1 for ") and line.count("\n") == 1


@pytest.mark.parametrize("raw, value", [("", 600.0), ("3", 3.0), (" 0.5 ", 0.5), ("inf", float("inf"))])
def test_stall_timeout_from_the_environment(monkeypatch, raw, value):
    monkeypatch.setenv("HPCATTN_STALL_TIMEOUT", raw)
    assert exchange.stall_timeout() == value


def test_stall_timeout_default_when_unset(monkeypatch):
    monkeypatch.delenv("HPCATTN_STALL_TIMEOUT", raising=False)
    assert exchange.stall_timeout() == exchange.DEFAULT_STALL_TIMEOUT_S == 600.0


@pytest.mark.parametrize("raw", ["ten", "0", "-3", "nan"])
def test_bad_stall_timeout_is_refused_in_one_line(monkeypatch, raw):
    monkeypatch.setenv("HPCATTN_STALL_TIMEOUT", raw)
    with pytest.raises(HpcattnError) as info:
        exchange.stall_timeout()
    msg = str(info.value)
    assert msg.startswith(f"HPCATTN_STALL_TIMEOUT={raw!r}; expected a number of seconds > 0") and "\n" not in msg


def test_ring_comm_reads_the_timeout_when_made(monkeypatch):
    monkeypatch.setenv("HPCATTN_STALL_TIMEOUT", "7")
    assert exchange.RingComm(FakeComm(0, 2)).timeout == 7.0


@pytest.mark.parametrize("value, text", [(0.05, "0.1"), (3.0, "3"), (3.04, "3"), (4.5, "4.5"), (600.2, "600")])
def test_seconds_are_short(value, text):
    assert exchange.seconds(value) == text


def test_a_collective_on_two_ranks_names_the_other_and_on_more_says_some_rank():
    two = exchange._collective_stalled(FakeComm(0, 2), "after case 3", 3.0)([0], 3.2)
    assert two.startswith("no answer from rank 1 for 3.2 s (after case 3); expected every rank there "
                          "within 3 s (stopped, or far slower?); set HPCATTN_STALL_TIMEOUT")
    assert exchange._collective_stalled(FakeComm(2, 4), "x", 3.0)([0], 3.0).startswith("no answer from some rank")


def test_the_barrier_root_names_every_rank_that_did_not_arrive():
    msg = exchange._missing([1, 3], 4.0, "before case 2", 4.0)
    assert msg.startswith("no answer from ranks 1, 3 for 4 s (before case 2);")
