"""The router's client API as plain functions: check a request, call the engine, build the reply.

No sockets here: `server.RouterService` only forwards each call and turns a `ServiceError` into
the gRPC status it names. Status codes, the same for every call:

- RESOURCE_EXHAUSTED: the router is at capacity (`admission`), decided before any other work;
- INVALID_ARGUMENT: the request is wrong whatever the limits: empty, both or neither prompt
  form, a token id not below the vocabulary size, a non-finite or negative temperature, top_p
  outside (0, 1];
- OUT_OF_RANGE: a well-formed request beyond a configured limit: prompt over max_prompt_len,
  max_new_tokens over the limit, Logits over max_seq_len or over the reply size limit;
- FAILED_PRECONDITION: a text prompt for a model without tokenizer;
- UNAVAILABLE: an expert worker failed during the request, or the router is stopping.

Every request holds an `admission` place while it runs; cancelling it (the client cancels or its
deadline passes, which grpc turns into a cancellation of the handler) leaves the engine at once:
the sequence is aborted and its KV slot freed (at the end of the step in flight, if any).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from moe_core.grpc_server import MAX_MESSAGE_BYTES
from moe_core.spec import ModelSpec
from protos import router_pb2
from router.admission import Admission, Overloaded, Ticket
from router.config import RouterConfig
from router.dispatch import ExpertWorkerError
from router.engine import Engine, EngineError, GenerationRequest
from router.expert_backend import ExpertsUnavailableError
from router.metrics import RequestRecord, RouterMetrics
from router.sampling import SamplingParams
from router.scheduler import FinishReason
from router.tokenizer import IncrementalDetokenizer, Tokenizer
from router.workers import WorkerPool

_PROBE_TIMEOUT_S = 2.0  # GetInfo waits this long at most for a worker's answer
_FINISH_REASONS = {
    FinishReason.LENGTH: router_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: router_pb2.FINISH_REASON_STOP,
}


class ServiceError(Exception):
    """A call that cannot be answered, with the gRPC status code that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class Router:
    """What the API functions need: the serving pieces built at start-up."""

    config: RouterConfig
    spec: ModelSpec
    engine: Engine
    workers: WorkerPool
    tokenizer: Tokenizer | None
    metrics: RouterMetrics
    admission: Admission


def _check_ids(ids: list[int], spec: ModelSpec, what: str) -> None:
    if not ids:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is empty")
    if max(ids) >= spec.vocab_size:
        i = next(i for i, token in enumerate(ids) if token >= spec.vocab_size)
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{what}[{i}] = {ids[i]} is not below the vocabulary size {spec.vocab_size}",
        )


async def generation_request(
    router: Router, request: router_pb2.GenerateRequest
) -> GenerationRequest:
    """Checks a GenerateRequest against the model and the limits -> the engine's request.

    A text prompt is tokenized on a worker thread, so that a long one does not stall the loop.
    """
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    config = router.config
    if request.prompt and request.token_ids:
        raise ServiceError(invalid, "give exactly one of prompt and token_ids, not both")
    max_new_tokens = request.max_new_tokens or config.default_max_new_tokens
    if max_new_tokens > config.max_new_tokens:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"max_new_tokens {max_new_tokens} exceeds this router's limit {config.max_new_tokens}",
        )
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise ServiceError(
            invalid, f"temperature must be finite and >= 0, got {request.temperature}"
        )
    top_p = request.top_p or 1.0
    if not 0.0 < top_p <= 1.0:
        raise ServiceError(invalid, f"top_p must be in (0, 1] (0 = no limit), got {top_p}")
    if request.prompt:
        if router.tokenizer is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {config.model_dir.name} has no tokenizer.json: send token_ids",
            )
        prompt_ids = await asyncio.to_thread(router.tokenizer.encode, request.prompt)
    else:
        prompt_ids = list(request.token_ids)
    _check_ids(prompt_ids, router.spec, "the prompt" if request.prompt else "token_ids")
    if len(prompt_ids) > config.max_prompt_len:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"the prompt has {len(prompt_ids)} tokens, more than this router's limit "
            f"{config.max_prompt_len} (--max-prompt-len)",
        )
    sampling = SamplingParams(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=top_p,
        seed=request.seed if request.HasField("seed") else None,
    )
    return GenerationRequest(prompt_ids, max_new_tokens, sampling, request.ignore_eos)


def _enter(router: Router) -> Ticket:
    """A place in the engine, or a place in line; RESOURCE_EXHAUSTED at once when both are full."""
    try:
        return router.admission.enter()
    except Overloaded as err:
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err


def _engine_failure(err: EngineError) -> ServiceError:
    if isinstance(err.__cause__, (ExpertWorkerError, ExpertsUnavailableError)) or (
        err.__cause__ is None
    ):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, str(err))  # a worker, or stopping
    return ServiceError(grpc.StatusCode.INTERNAL, str(err))


async def generate(
    router: Router, request: router_pb2.GenerateRequest
) -> AsyncIterator[router_pb2.GenerateChunk]:
    """Streams a generation: one GenerateChunk per step, the last with its finish_reason."""
    with router.metrics.request("Generate") as record:
        ticket = _enter(router)
        try:
            gen = await generation_request(router, request)
            record.prompt_tokens(len(gen.prompt_ids))
            await ticket.admitted()
            # aclosing: a client that goes away closes the engine's stream now, not when collected
            async with contextlib.aclosing(_stream(router, gen, record)) as messages:
                async for message in messages:
                    yield message
        finally:
            ticket.leave()


async def _stream(
    router: Router, gen: GenerationRequest, record: RequestRecord
) -> AsyncIterator[router_pb2.GenerateChunk]:
    detokenizer = IncrementalDetokenizer(router.tokenizer) if router.tokenizer else None
    try:
        async with contextlib.aclosing(router.engine.generate(gen)) as chunks:
            async for chunk in chunks:
                record.tokens(len(chunk.token_ids))
                message = router_pb2.GenerateChunk(
                    token_ids=chunk.token_ids,
                    prompt_tokens=len(gen.prompt_ids),
                    dropped_experts=chunk.dropped_experts,
                )
                if detokenizer is not None:
                    message.text = detokenizer.push(chunk.token_ids)
                if chunk.finish_reason is not None:
                    message.finish_reason = _FINISH_REASONS[chunk.finish_reason]
                    if detokenizer is not None:
                        message.text += detokenizer.flush()
                    record.finish("ok")  # done, whether or not the caller reads the end
                yield message
    except EngineError as err:
        raise _engine_failure(err) from err


async def logits(router: Router, request: router_pb2.LogitsRequest) -> router_pb2.LogitsResponse:
    """Teacher-forced logits of every position of the sequence."""
    with router.metrics.request("Logits") as record:
        return await _logits(router, request, record)


async def _logits(
    router: Router, request: router_pb2.LogitsRequest, record: RequestRecord
) -> router_pb2.LogitsResponse:
    ticket = _enter(router)
    try:
        token_ids = list(request.token_ids)
        _check_ids(token_ids, router.spec, "token_ids")
        if len(token_ids) > router.config.max_seq_len:
            raise ServiceError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{len(token_ids)} tokens exceed max_seq_len {router.config.max_seq_len}",
            )
        reply_bytes = len(token_ids) * router.spec.vocab_size * 4
        if reply_bytes > MAX_MESSAGE_BYTES:
            raise ServiceError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"logits of {len(token_ids)} tokens would take {reply_bytes} bytes, more than "
                f"the {MAX_MESSAGE_BYTES} a message may carry: score a shorter sequence",
            )
        record.prompt_tokens(len(token_ids))
        await ticket.admitted()
        try:
            scores = await router.engine.score(token_ids)
        except EngineError as err:
            raise _engine_failure(err) from err
    finally:
        ticket.leave()
    logits = scores.logits  # [N, vocab] float32
    return router_pb2.LogitsResponse(
        num_tokens=logits.shape[0],
        vocab_size=logits.shape[1],
        logits=logits.contiguous().numpy().tobytes(),  # little-endian hosts only (as the wire)
        dropped_experts=scores.dropped_experts,
    )


def load(router: Router) -> router_pb2.RouterLoad:
    """KV slots and requests now."""
    return router_pb2.RouterLoad(
        kv_slots=router.config.max_batch_size,
        free_kv_slots=router.engine.cache.num_free,
        running=router.admission.running,
        waiting=router.admission.waiting,
    )


def limits(config: RouterConfig) -> router_pb2.RouterLimits:
    return router_pb2.RouterLimits(
        max_seq_len=config.max_seq_len,
        max_prompt_len=config.max_prompt_len,
        max_new_tokens=config.max_new_tokens,
        max_concurrent_requests=config.max_concurrent_requests,
        max_waiting=config.max_waiting,
        max_request_bytes=config.max_request_bytes,
    )


async def cluster_info(router: Router, timeout_s: float | None = None) -> router_pb2.ClusterInfo:
    """The model, each worker with its experts, reachability and tokens sent so far, the load
    and the limits. Reachability waits at most _PROBE_TIMEOUT_S, or the caller's timeout_s if
    shorter (its deadline); the pool shares probes between callers (`WorkerPool.reachable`)."""
    spec, config, workers = router.spec, router.config, router.workers
    pool = workers.workers
    probe_s = _PROBE_TIMEOUT_S if timeout_s is None else max(0.0, min(_PROBE_TIMEOUT_S, timeout_s))
    with router.metrics.request("GetInfo"):
        answers = await workers.reachable(pool, probe_s)
    return router_pb2.ClusterInfo(
        architecture=spec.model_type,
        vocab_size=spec.vocab_size,
        precision=config.precision.value,
        num_layers=spec.num_layers,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        hidden_size=spec.hidden_size,
        has_tokenizer=router.tokenizer is not None,
        eos_token_ids=spec.eos_token_ids,
        model=config.model_dir.resolve().name,
        device=str(router.engine.device),
        workers=[
            router_pb2.WorkerStatus(
                address=worker.address,
                experts=worker.expert_ids,
                healthy=ok and worker.healthy,
                expert_tokens=workers.expert_tokens(worker),
            )
            for worker, ok in zip(pool, answers, strict=True)
        ],
        load=load(router),
        limits=limits(config),
    )
