"""The continuous scheduler's budget and fairness rule, and the verifier worker, without
sockets (docs/scheduling.md)."""

from __future__ import annotations

import threading

import pytest

from edge_controller import protocol as P
from edge_controller.scheduler import ContinuousScheduler, SyncScheduler
from edge_controller.sessions import Session
from edge_controller.verifier.slots import SlotTable, VerifyItem, VerifyOutcome
from edge_controller.verifier.worker import Forward, VerifierWorker


def member(name: str, draft_len: int, drafted_at: float) -> Session:
    session = Session(name.encode(), None, name, "d", 0.0)
    session.request = P.Start("r", [1, 2], 8)
    session.pending = P.Draft("r", 0, 2, [5] * draft_len)
    session.drafted_at = drafted_at
    return session


def test_every_draft_in_goes_in_when_it_fits():
    scheduler = ContinuousScheduler(batch_tokens=64)
    sessions = [member(f"d{i}", 4, float(i)) for i in range(5)]
    for s in sessions:
        scheduler.on_draft(s, s.drafted_at)
    assert scheduler.due(sessions, 10.0)
    assert scheduler.close(sessions) == sessions
    assert scheduler.opened_at is None


def test_oldest_first_within_the_budget_and_the_rest_next():
    """Fairness: a draft left out is older than any that arrives later, so it goes first
    in the next forward: no device waits more than one forward behind the budget."""
    scheduler = ContinuousScheduler(batch_tokens=17)  # L = 16 fits alone
    a, b, c = member("a", 4, 3.0), member("b", 16, 1.0), member("c", 8, 2.0)
    sessions = [a, b, c]
    for s in sessions:
        scheduler.on_draft(s, s.drafted_at)
    first = scheduler.close(sessions)
    assert first == [b]  # the oldest, 17 tokens: nothing else fits
    assert scheduler.opened_at == 2.0  # c waits, the oldest left
    b.pending = None
    late = member("late", 4, 4.0)
    sessions.append(late)
    assert scheduler.close(sessions) == [c, a]  # 9 + 5 tokens; late (5 more) is over 17
    c.pending = a.pending = None
    assert scheduler.close(sessions) == [late]


def decoded_here(name: str, drafted_at: float) -> Session:
    session = member(name, 0, drafted_at)
    session.request = P.Start("r", [1, 2], 8, server_decode=True)
    return session


def test_under_sync_a_decoded_request_rides_along_and_never_opens_a_round():
    """Its empty draft is queued at once after every verdict: were it to open rounds, the
    deadline would run from the last answer and slower drafting devices would miss them.
    Nor may a slow or silent drafting device stall it beyond the deadline."""
    scheduler = SyncScheduler(deadline_s=1.0)
    decoded, drafting = decoded_here("srv", 0.0), member("dev", 4, 0.0)
    drafting.pending = None
    scheduler.on_draft(decoded, 0.0)
    assert scheduler.opened_at is None
    assert not scheduler.due([decoded, drafting], 0.5)  # waits for a drafting device...
    assert scheduler.due([decoded, drafting], 1.5)  # ...but no longer than the deadline
    drafting.pending = P.Draft("r", 0, 2, [5] * 4)
    scheduler.on_draft(drafting, 6.0)
    assert scheduler.opened_at == 6.0 and scheduler.due([decoded, drafting], 6.0)
    assert scheduler.close([decoded, drafting]) == [decoded, drafting]
    alone = SyncScheduler(deadline_s=1.0)  # nobody drafts: every round at once
    assert alone.due([decoded_here("srv", 0.0)], 0.0)


def test_a_decoded_request_is_never_idle_while_its_prompt_is_prefilled():
    session = decoded_here("srv", 0.0)
    session.pending, session.prefill_left = None, 100
    assert not session.idle(1000.0, rounds=1, seconds=1.0, round_deadline_s=0.25)
    drafting = member("dev", 4, 0.0)
    drafting.pending, drafting.prefill_left = None, 100
    assert drafting.idle(1000.0, rounds=1, seconds=1.0, round_deadline_s=0.25)


def test_members_still_prefilling_are_not_in_a_forward():
    scheduler = ContinuousScheduler(batch_tokens=64)
    newcomer = member("n", 4, 0.0)
    newcomer.prefill_left = 10
    assert not scheduler.due([newcomer], 1.0)
    assert scheduler.close([newcomer]) == []


class _Slow(SlotTable):
    """A slot table whose forward waits for a signal (stands in for the target's compute)."""

    def __init__(self):
        super().__init__(max_sessions=2, max_len=64, vocab_size=100)
        self.go = threading.Event()

    def _run(self, items, chunk):
        assert self.go.wait(10)
        if items and items[0].draft_tokens == [99]:
            raise RuntimeError("bad state")
        return [VerifyOutcome(len(i.draft_tokens), 7, 1.0) for i in items]


def test_the_worker_runs_one_forward_in_its_thread_and_wakes_the_loop():
    import select

    table = _Slow()
    slot = table.open([1, 2, 3], prefill=False)
    table._cached[slot] = 2  # prefilled
    worker = VerifierWorker(table)
    try:
        forward = Forward([VerifyItem(slot, [4, 5], table_sampling())])
        worker.submit(forward)
        assert worker.busy and not worker.done
        assert worker.collect() is None  # not done yet: the caller goes on
        assert select.select([worker.wake_fd], [], [], 0.05)[0] == []
        table.go.set()
        assert select.select([worker.wake_fd], [], [], 10)[0] == [worker.wake_fd]
        landed = worker.collect(10)
        assert landed is forward and not worker.busy
        assert forward.outcomes[0].accepted == 2 and forward.seconds >= 0
        assert table.tokens(slot) == [1, 2, 3, 4, 5, 7]
        failing = Forward([VerifyItem(slot, [99], table_sampling())])
        worker.submit(failing)
        landed = worker.collect(10)
        assert isinstance(landed.error, RuntimeError) and landed.outcomes == []
        with pytest.raises(AssertionError):
            worker.submit(Forward([]))
            worker.submit(Forward([]))
    finally:
        table.go.set()
        worker.collect(10)
        worker.close()


def test_every_forward_and_every_call_runs_in_the_verifiers_thread():
    """Synchronous rounds and calls (calibration, isolating a failed batch) wait for the
    verifier's thread, as continuous forwards do: torch runs in one thread only."""
    table = _Slow()
    table.go.set()
    ran_in = []
    run = table._run
    table._run = lambda items, chunk: ran_in.append(threading.current_thread()) or run(
        items, chunk)
    slot = table.open([1, 2, 3], prefill=False)
    table._cached[slot] = 2
    worker = VerifierWorker(table)
    try:
        forward = worker.run(Forward([VerifyItem(slot, [4], table_sampling())]))
        assert forward.outcomes[0].accepted == 1 and not worker.busy
        outcomes = worker.call(table.verify, [VerifyItem(slot, [], table_sampling())])
        assert outcomes[0].next_token == 7
        assert len(ran_in) == 2 and all(t.name == "verifier" for t in ran_in)
        assert threading.current_thread() not in ran_in
        with pytest.raises(ZeroDivisionError):  # raised in the caller, the worker goes on
            worker.call(lambda: 1 / 0)
        assert not worker.busy
        assert worker.call(lambda: threading.current_thread().name) == "verifier"
    finally:
        worker.close()


def table_sampling():
    from edge_controller.verifier.slots import SamplingParams

    return SamplingParams()
