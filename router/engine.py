"""The router's engine: one background step loop over the model, the KV cache and the scheduler.

Each step: the scheduler picks the sequences (continuous batching) -> `StepBatch` -> the model's
forward (decode steps from CUDA graphs when the engine has them, router.decode_graphs) and the
sampling run on a dedicated thread (the event loop keeps serving, and the expert
calls the model makes are driven by it) -> the scheduler records the tokens -> every request's
queue gets its new token. A step that fails fails only its requests; the loop goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from attention_worker.batch import StepBatch
from attention_worker.kv_cache import KVCache
from router.decode_graphs import DecodeGraphs
from router.expert_backend import ExpertsUnavailableError
from router.metrics import RouterMetrics
from router.model import MoEModel
from router.overlap import OverlapPolicy, split_evenly
from router.sampling import SamplingParams, make_generator, sample
from router.scheduler import FinishReason, ScheduledStep, Scheduler, Sequence

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request could not be completed: its step failed (the cause is chained) or it stopped."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationChunk:
    token_ids: list[int]  # generated since the previous chunk
    finish_reason: FinishReason | None = None  # set on the last chunk only
    dropped_experts: tuple[int, ...] = ()  # experts left out of these tokens' routing


@dataclass(frozen=True)
class Scores:
    logits: torch.Tensor  # [N, vocab] float32 on the CPU, row i after token_ids[:i+1]
    dropped_experts: tuple[int, ...] = ()  # experts left out of their routing


@dataclass
class _Stream:
    """Where the step loop puts one request's results: GenerationChunk, logits or an error."""

    sampling: SamplingParams
    generator: torch.Generator | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Engine:
    def __init__(
        self,
        model: MoEModel,
        cache: KVCache,
        scheduler: Scheduler,
        metrics: RouterMetrics | None = None,  # None: no metrics
        overlap: OverlapPolicy | None = None,  # None: steps are never split
        graphs: DecodeGraphs | None = None,  # None: decode steps run eagerly
    ) -> None:
        self.model = model
        self.graphs = graphs
        self.cache = cache
        self.scheduler = scheduler
        self.metrics = metrics
        self.overlap = overlap or OverlapPolicy(len(model.spec.moe_layers), fixed=1)
        self.device = next(model.parameters()).device
        self._streams: dict[Sequence, _Stream] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        # one thread runs every forward: the model and the KV cache are used by one step at a time
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="router-step")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="router-step-loop")

    async def stop(self) -> None:
        """Finishes the step in flight, then ends every open request with EngineError."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineError("the router is stopping"))
        self._executor.shutdown(wait=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Streams the tokens of one generation as the steps produce them."""
        seq = Sequence(
            prompt_ids=list(request.prompt_ids),
            max_new_tokens=request.max_new_tokens,
            ignore_eos=request.ignore_eos,
        )
        stream = _Stream(request.sampling, make_generator(request.sampling))
        async with self._submitted(seq, stream):
            while True:
                chunk = await self._next(stream)
                # tokens that queued up while the caller was busy go out as one chunk
                while chunk.finish_reason is None and not stream.queue.empty():
                    more = await self._next(stream)
                    chunk = GenerationChunk(
                        chunk.token_ids + more.token_ids,
                        more.finish_reason,
                        tuple(sorted({*chunk.dropped_experts, *more.dropped_experts})),
                    )
                yield chunk
                if chunk.finish_reason is not None:
                    return

    async def score(self, token_ids: list[int]) -> Scores:
        """Teacher-forced logits of every position."""
        seq = Sequence(prompt_ids=list(token_ids), all_logits=True)
        stream = _Stream(SamplingParams(), None)
        async with self._submitted(seq, stream):
            return await self._next(stream)

    @contextlib.asynccontextmanager
    async def _submitted(self, seq: Sequence, stream: _Stream) -> AsyncIterator[None]:
        """Registers a request with the step loop; withdraws it when the caller leaves."""
        if self._stopping:
            raise EngineError("the router is stopping")
        self._streams[seq] = stream
        self.scheduler.add(seq)
        self._report_queue()
        self._wake.set()
        try:
            yield
        finally:
            self._streams.pop(seq, None)
            self.scheduler.abort(seq)  # no-op when it finished
            self._report_queue()

    @staticmethod
    async def _next(stream: _Stream):
        item = await stream.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _loop(self) -> None:
        try:
            while not self._stopping:
                if self.scheduler.has_work():
                    step = self.scheduler.schedule()
                    self._report_queue()
                    await self._step(step)
                    self._report_queue()
                else:
                    self._wake.clear()
                    await self._wake.wait()
        except Exception:
            log.exception("the step loop stopped on an unexpected error")
            self._stopping = True
            for seq in list(self._streams):
                self._put(seq, EngineError("the router's step loop stopped"))
            raise

    async def _step(self, step: ScheduledStep) -> None:
        # sampling state is read here, on the loop, where requests come and go
        streams = [self._streams.get(seq) for seq in step.seqs]
        sampling = [(s.sampling, s.generator) if s else (SamplingParams(), None) for s in streams]
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            tokens, scores, dropped = await loop.run_in_executor(
                self._executor, self._compute, step, sampling
            )
        except ExpertsUnavailableError as err:
            # only the sequences whose tokens chose the lost experts fail; the rest go again
            lost = _sequences_of_rows(step, err.rows.tolist())
            if self.metrics is not None:
                self.metrics.record_step_failure()
            log.warning("%d of %d sequences failed: %s", len(lost), len(step.seqs), err)
            for seq in lost:
                failure = EngineError(str(err))
                failure.__cause__ = err
                self._put(seq, failure)
            rest = self.scheduler.drop(step, lost)
            if rest.seqs:
                await self._step(rest)
            return
        except Exception as err:
            log.error("a step of %d sequences failed: %s", len(step.seqs), err)
            if self.metrics is not None:
                self.metrics.record_step_failure()
            self.scheduler.fail(step)
            for seq in step.seqs:
                failure = EngineError(f"the step computing this request failed: {err}")
                failure.__cause__ = err
                self._put(seq, failure)
            return
        if self.metrics is not None:
            self.metrics.record_step(len(step.seqs), step.num_tokens, time.perf_counter() - start)
        finished = set(self.scheduler.apply(step, tokens))
        for seq, token, score, lost in zip(step.seqs, tokens, scores, dropped, strict=True):
            if seq.all_logits:
                self._put(seq, Scores(score, lost))
            else:
                reason = seq.finish_reason if seq in finished else None
                self._put(seq, GenerationChunk([token], reason, lost))

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(len(self.scheduler.waiting), len(self.scheduler.running))

    def _put(self, seq: Sequence, item) -> None:
        stream = self._streams.get(seq)
        if stream is not None:  # None: the caller went away
            stream.queue.put_nowait(item)

    def _compute(
        self, step: ScheduledStep, sampling: list[tuple[SamplingParams, torch.Generator | None]]
    ) -> tuple[list[int | None], list[torch.Tensor | None], list[tuple[int, ...]]]:
        """Runs on the step thread: forward, then sampling -> per sequence (token or None,
        logits or None, experts dropped from its tokens' routing)."""
        logits, dropped_rows = self._forward(step)  # [R, vocab] float32
        dropped = _dropped_per_sequence(step, dropped_rows)
        rows, params, generators = [], [], []  # the rows to sample from, and how
        scores: list[torch.Tensor | None] = []
        row = 0
        for (_, _, new_ids, all_logits), (params_i, generator) in zip(
            step.entries, sampling, strict=True
        ):
            if all_logits:
                scores.append(logits[row : row + len(new_ids)].float().cpu())
                row += len(new_ids)
            else:
                scores.append(None)
                rows.append(row)
                params.append(params_i)
                generators.append(generator)
                row += 1
        if row != logits.shape[0]:
            raise RuntimeError(f"the model returned {logits.shape[0]} logits rows, not {row}")
        with self.model.phase("sampling"):
            sampled = iter(sample(logits[rows].float(), params, generators))
        tokens = [None if entry[3] else next(sampled) for entry in step.entries]
        self.model.finish_step()  # the step profile, with --profile-steps
        return tokens, scores, dropped

    def _forward(self, step: ScheduledStep) -> tuple[torch.Tensor, dict[int, set[int]]]:
        """The step's forward, split into micro-batches as the overlap policy says -> (logits
        [R, vocab] float32, experts dropped per token row of the step)."""
        experts = self.model.experts
        experts.take_dropped()  # a failed step may have left some
        experts.take_wait_seconds()
        parts = self.overlap.choose(len(step.seqs), step.num_tokens)
        if self.model.profiler is not None:
            parts = 1  # a profile times one forward's phases in order
        started = time.perf_counter()
        with torch.inference_mode():
            if parts == 1:
                batch = StepBatch.build(step.entries, self.device)
                if self.graphs is not None:  # eagerly where graphs do not apply
                    logits = self.graphs.forward(batch)
                else:
                    logits = self.model.forward(batch, self.cache)
                dropped = experts.take_dropped()
            else:
                lengths = split_evenly([len(entry[2]) for entry in step.entries], parts)
                batches, start = [], 0
                for length in lengths:
                    batches.append(
                        StepBatch.build(step.entries[start : start + length], self.device)
                    )
                    start += length
                parts_logits, parts_dropped = self.model.forward_overlapped(batches, self.cache)
                logits = torch.cat(parts_logits)
                dropped, offset = {}, 0
                for batch, rows in zip(batches, parts_dropped, strict=True):
                    dropped.update({offset + row: lost for row, lost in rows.items()})
                    offset += batch.num_tokens
        self.overlap.record(
            step.num_tokens, parts, time.perf_counter() - started, experts.take_wait_seconds()
        )
        if self.metrics is not None:
            self.metrics.record_micro_batches(parts)
        return logits, dropped


def _row_owners(step: ScheduledStep) -> list[int]:
    """Token row of the step -> index of its sequence in step.seqs."""
    return [i for i, entry in enumerate(step.entries) for _ in entry[2]]


def _sequences_of_rows(step: ScheduledStep, rows: list[int]) -> set[Sequence]:
    owners = _row_owners(step)
    return {step.seqs[owners[row]] for row in rows}


def _dropped_per_sequence(step: ScheduledStep, dropped: dict[int, set[int]]) -> list[tuple]:
    """{token row: experts} -> per sequence of the step, the sorted experts its tokens lost."""
    per_seq: list[set[int]] = [set() for _ in step.seqs]
    if dropped:
        owners = _row_owners(step)
        for row, experts in dropped.items():
            per_seq[owners[row]].update(experts)
    return [tuple(sorted(experts)) for experts in per_seq]
