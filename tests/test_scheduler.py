"""Continuous batching: admission at every step, slots, per-step limits, finishing and aborts."""

import pytest

from router.scheduler import FinishReason, Scheduler, Sequence

EOS = 99


class Slots:
    """A KV slot pool that remembers which slots are taken."""

    def __init__(self, n: int) -> None:
        self.free_slots = list(range(n))
        self.taken: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def allocate(self) -> int:
        slot = self.free_slots.pop(0)
        self.taken.add(slot)
        return slot

    def free(self, slot: int) -> None:
        self.taken.remove(slot)
        self.free_slots.append(slot)


def make(slots=4, batch=8, step_tokens=64, seq_len=32):
    pool = Slots(slots)
    return pool, Scheduler(pool, batch, step_tokens, seq_len, eos_token_ids=(EOS,))


def run_step(scheduler, token=7):
    """Schedules a step and answers every generating sequence with `token`."""
    step = scheduler.schedule()
    tokens = [None if s.all_logits else token for s in step.seqs]
    return step, scheduler.apply(step, tokens)


def test_a_request_that_arrives_while_others_run_joins_at_the_next_step():
    pool, scheduler = make()
    first = Sequence([1, 2, 3], max_new_tokens=5)
    scheduler.add(first)
    step, _ = run_step(scheduler, token=10)
    assert step.entries == [(first.slot, 0, [1, 2, 3], False)]  # prefill of the whole prompt

    second = Sequence([4, 5], max_new_tokens=5)
    scheduler.add(second)
    step, _ = run_step(scheduler, token=11)
    # the running one decodes its last token while the new one is prefilled, in the same step
    assert step.seqs == [first, second]
    assert step.entries == [(first.slot, 3, [10], False), (second.slot, 0, [4, 5], False)]
    assert first.slot != second.slot
    step, _ = run_step(scheduler)
    assert step.entries == [(first.slot, 4, [11], False), (second.slot, 2, [11], False)]


def test_a_finished_sequence_frees_its_slot_and_reports_why():
    pool, scheduler = make()
    short = Sequence([1], max_new_tokens=2)
    stops = Sequence([2], max_new_tokens=10)
    ignores = Sequence([3], max_new_tokens=2, ignore_eos=True)
    for seq in (short, stops, ignores):
        scheduler.add(seq)
    run_step(scheduler, token=5)
    assert pool.num_free == 1
    step = scheduler.schedule()
    assert step.seqs == [short, stops, ignores]
    finished = scheduler.apply(step, [6, EOS, EOS])
    assert set(finished) == {short, stops, ignores}
    assert short.finish_reason is FinishReason.LENGTH and short.output_ids == [5, 6]
    assert stops.finish_reason is FinishReason.STOP and stops.output_ids == [5, EOS]
    assert ignores.finish_reason is FinishReason.LENGTH  # EOS ignored, but 2 tokens reached
    assert pool.num_free == 4 and not pool.taken
    assert not scheduler.has_work()


def test_waiting_requests_wait_for_a_free_slot_then_run():
    pool, scheduler = make(slots=2)
    seqs = [Sequence([i + 1], max_new_tokens=2 + i) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    step, _ = run_step(scheduler)
    assert step.seqs == seqs[:2] and list(scheduler.waiting) == [seqs[2]]
    _, finished = run_step(scheduler)
    assert finished == [seqs[0]]
    step, _ = run_step(scheduler)  # the freed slot goes to the waiting request
    assert step.seqs == [seqs[1], seqs[2]]
    assert seqs[2].slot == 0


def test_max_batch_size_limits_the_sequences_of_a_step():
    pool, scheduler = make(slots=8, batch=2)
    seqs = [Sequence([1], max_new_tokens=4) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    step, _ = run_step(scheduler)
    assert len(step.seqs) == 2 and pool.num_free == 6


def test_the_step_token_budget_defers_a_prompt_to_the_next_step():
    pool, scheduler = make(step_tokens=10, seq_len=10)
    a, b = Sequence([1] * 6, max_new_tokens=3), Sequence([2] * 6, max_new_tokens=3)
    scheduler.add(a)
    scheduler.add(b)
    step, _ = run_step(scheduler)
    assert step.seqs == [a] and step.num_tokens == 6
    step, _ = run_step(scheduler)
    assert step.seqs == [a, b] and step.num_tokens == 1 + 6


def test_a_sequence_stops_at_max_seq_len():
    _, scheduler = make(seq_len=5)
    seq = Sequence([1, 2, 3], max_new_tokens=100)
    scheduler.add(seq)
    run_step(scheduler)
    _, finished = run_step(scheduler)
    assert finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert seq.num_tokens == 5
    with pytest.raises(ValueError, match="max_seq_len"):
        scheduler.add(Sequence([1] * 6))


def test_a_scoring_request_asks_all_logits_and_finishes_after_its_prefill():
    pool, scheduler = make()
    scoring = Sequence([4, 5, 6], all_logits=True)
    scheduler.add(scoring)
    step, finished = run_step(scheduler)
    assert step.entries == [(0, 0, [4, 5, 6], True)]
    assert finished == [scoring] and scoring.finish_reason is FinishReason.SCORED
    assert scoring.output_ids == [] and pool.num_free == 4


def test_aborts_free_slots_now_or_when_the_step_in_flight_ends():
    pool, scheduler = make()
    waiting, running, in_flight = (Sequence([1], max_new_tokens=9) for _ in range(3))
    scheduler.add(running)
    run_step(scheduler)
    scheduler.add(waiting)
    scheduler.abort(waiting)
    assert waiting.finish_reason is FinishReason.ABORTED and not scheduler.waiting

    scheduler.abort(running)
    assert running.finish_reason is FinishReason.ABORTED and pool.num_free == 4

    scheduler.add(in_flight)
    step = scheduler.schedule()
    scheduler.abort(in_flight)
    assert pool.num_free == 3  # its slot is still in use by the step being computed
    assert scheduler.apply(step, [7]) == [in_flight]
    assert in_flight.finish_reason is FinishReason.ABORTED and pool.num_free == 4


def test_a_failed_step_fails_its_sequences_and_later_requests_still_run():
    pool, scheduler = make()
    doomed = [Sequence([1], max_new_tokens=5) for _ in range(2)]
    for seq in doomed:
        scheduler.add(seq)
    scheduler.fail(scheduler.schedule())
    assert all(s.finish_reason is FinishReason.FAILED for s in doomed)
    assert pool.num_free == 4 and not scheduler.has_work()
    fresh = Sequence([2], max_new_tokens=1)
    scheduler.add(fresh)
    _, finished = run_step(scheduler)
    assert finished == [fresh] and fresh.output_ids == [7]


def test_a_step_must_end_before_the_next_is_planned():
    _, scheduler = make()
    scheduler.add(Sequence([1], max_new_tokens=3))
    scheduler.schedule()
    with pytest.raises(RuntimeError):
        scheduler.schedule()
