"""Continuous batching: which sequences run in the next step, and what their results mean.

No torch here. Waiting requests join the running batch at the next step as soon as a KV slot and
the per-step limits allow: a new request never waits for the running ones to finish. A prompt is
prefilled in one step; after that each running sequence feeds one new token per step.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class SlotPool(Protocol):
    """KV cache slots, one per running sequence (`attention_worker.kv_cache.KVCache` is one)."""

    @property
    def num_free(self) -> int: ...

    def allocate(self) -> int: ...

    def free(self, slot: int) -> None: ...


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or the sequence length limit reached
    STOP = "stop"  # an end-of-sequence token was generated
    SCORED = "scored"  # a teacher-forced logits request, done after its prefill
    ABORTED = "aborted"  # the caller went away
    FAILED = "failed"  # the step it ran in failed


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. Identity, not value, tells sequences apart."""

    prompt_ids: list[int]
    max_new_tokens: int = 1
    ignore_eos: bool = False
    all_logits: bool = False  # teacher-forced scoring: logits for every prompt position
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens whose keys and values are in the KV cache
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def pending_ids(self) -> list[int]:
        """Tokens not yet in the cache: the whole prompt at first, then the last sampled token."""
        prompt_len = len(self.prompt_ids)
        if self.num_cached >= prompt_len:
            return self.output_ids[self.num_cached - prompt_len :]
        return self.prompt_ids[self.num_cached :] + self.output_ids


@dataclass
class ScheduledStep:
    """The sequences of one step, in batch order, with what the model must compute for each."""

    seqs: list[Sequence]
    # (kv slot, tokens already cached, new token ids, all_logits): `StepBatch.build`'s input
    entries: list[tuple[int, int, list[int], bool]]

    @property
    def num_tokens(self) -> int:
        return sum(len(entry[2]) for entry in self.entries)


class Scheduler:
    def __init__(
        self,
        slots: SlotPool,
        max_batch_size: int,
        max_step_tokens: int,
        max_seq_len: int,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.max_seq_len = max_seq_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._in_flight: set[Sequence] = set()  # sequences of the step being computed
        self._aborted: set[Sequence] = set()  # in flight when aborted: freed once it ends

    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if len(seq.prompt_ids) > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(seq.prompt_ids)} tokens exceeds max_seq_len {self.max_seq_len}"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Plans the next step: every running sequence, then waiting ones while limits allow."""
        if self._in_flight:
            raise RuntimeError("the previous step has not been applied or failed yet")
        seqs = list(self.running)
        step_tokens = sum(len(seq.pending_ids()) for seq in seqs)
        while self.waiting and len(seqs) < self.max_batch_size and self.slots.num_free > 0:
            prompt_len = len(self.waiting[0].prompt_ids)
            if seqs and step_tokens + prompt_len > self.max_step_tokens:
                break
            seq = self.waiting.popleft()
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            seqs.append(seq)
            step_tokens += prompt_len
        self._in_flight = set(seqs)
        entries = [(seq.slot, seq.num_cached, seq.pending_ids(), seq.all_logits) for seq in seqs]
        return ScheduledStep(seqs=seqs, entries=entries)

    def apply(self, step: ScheduledStep, tokens: list[int | None]) -> list[Sequence]:
        """Records one sampled token per sequence (None for scoring ones); returns the finished."""
        if len(tokens) != len(step.seqs):
            raise ValueError(f"{len(step.seqs)} sequences but {len(tokens)} tokens")
        finished = []
        for seq, token in zip(step.seqs, tokens, strict=True):
            seq.num_cached = seq.num_tokens
            if seq in self._aborted:
                reason = FinishReason.ABORTED
            elif seq.all_logits:
                reason = FinishReason.SCORED
            else:
                reason = self._append(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        self._in_flight.clear()
        return finished

    def fail(self, step: ScheduledStep) -> None:
        """The step failed: its sequences finish as FAILED and give their slots back."""
        for seq in step.seqs:
            self._finish(seq, FinishReason.FAILED)
        self._in_flight.clear()

    def drop(self, step: ScheduledStep, seqs: set[Sequence]) -> ScheduledStep:
        """Some sequences of a step that could not be computed finish as FAILED; the rest form
        the step to compute again (their cache positions are written again, same values)."""
        for seq in seqs:
            self._finish(seq, FinishReason.FAILED)
            self._in_flight.discard(seq)
        kept = [(s, e) for s, e in zip(step.seqs, step.entries, strict=True) if s not in seqs]
        return ScheduledStep(seqs=[s for s, _ in kept], entries=[e for _, e in kept])

    def abort(self, seq: Sequence) -> None:
        """The caller went away: drop the sequence now, or when its step ends if in flight."""
        if seq.finished:
            return
        if seq in self._in_flight:
            self._aborted.add(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.finish_reason = FinishReason.ABORTED
        else:
            self._finish(seq, FinishReason.ABORTED)

    def _append(self, seq: Sequence, token: int | None) -> FinishReason | None:
        if token is None:
            raise ValueError("a generating sequence got no token")
        seq.output_ids.append(token)
        if token in self.eos_token_ids and not seq.ignore_eos:
            return FinishReason.STOP
        if len(seq.output_ids) >= seq.max_new_tokens or seq.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self._aborted.discard(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None
