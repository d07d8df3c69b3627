"""The router's client API as plain functions: check a request, call the engine, build the reply.

No sockets here: `server.RouterService` only forwards each call and turns a `ServiceError` into
the gRPC status it names.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from moe_core.grpc_server import MAX_MESSAGE_BYTES
from moe_core.spec import ModelSpec
from protos import router_pb2
from router.config import RouterConfig
from router.dispatch import ExpertWorkerError
from router.engine import Engine, EngineError, GenerationRequest
from router.sampling import SamplingParams
from router.scheduler import FinishReason
from router.tokenizer import IncrementalDetokenizer, Tokenizer
from router.workers import WorkerRegistry

_PROBE_TIMEOUT_S = 2.0  # GetInfo asks every worker whether it answers within this
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
    workers: WorkerRegistry
    tokenizer: Tokenizer | None


def _check_ids(ids: list[int], spec: ModelSpec, what: str) -> None:
    if not ids:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is empty")
    for i, token in enumerate(ids):
        if token >= spec.vocab_size:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}[{i}] = {token} is not below the vocabulary size {spec.vocab_size}",
            )


def generation_request(router: Router, request: router_pb2.GenerateRequest) -> GenerationRequest:
    """Checks a GenerateRequest against the model and the limits -> the engine's request."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if request.prompt and request.token_ids:
        raise ServiceError(invalid, "give exactly one of prompt and token_ids, not both")
    if request.prompt:
        if router.tokenizer is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {router.config.model_dir.name} has no tokenizer.json: send token_ids",
            )
        prompt_ids = router.tokenizer.encode(request.prompt)
    else:
        prompt_ids = list(request.token_ids)
    _check_ids(prompt_ids, router.spec, "the prompt" if request.prompt else "token_ids")
    config = router.config
    if len(prompt_ids) >= config.max_seq_len:
        raise ServiceError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"the prompt has {len(prompt_ids)} tokens; max_seq_len {config.max_seq_len} leaves "
            f"room for at most {config.max_seq_len - 1}",
        )
    max_new_tokens = request.max_new_tokens or config.default_max_new_tokens
    if max_new_tokens > config.max_new_tokens:
        raise ServiceError(
            invalid,
            f"max_new_tokens {max_new_tokens} exceeds this router's limit {config.max_new_tokens}",
        )
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise ServiceError(invalid, f"temperature must be >= 0, got {request.temperature}")
    top_p = request.top_p or 1.0
    if not 0.0 < top_p <= 1.0:
        raise ServiceError(invalid, f"top_p must be in (0, 1] (0 = no limit), got {top_p}")
    sampling = SamplingParams(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=top_p,
        seed=request.seed if request.HasField("seed") else None,
    )
    return GenerationRequest(prompt_ids, max_new_tokens, sampling, request.ignore_eos)


def _engine_failure(err: EngineError) -> ServiceError:
    if isinstance(err.__cause__, ExpertWorkerError) or err.__cause__ is None:
        return ServiceError(grpc.StatusCode.UNAVAILABLE, str(err))  # a worker, or stopping
    return ServiceError(grpc.StatusCode.INTERNAL, str(err))


async def generate(
    router: Router, request: router_pb2.GenerateRequest
) -> AsyncIterator[router_pb2.GenerateChunk]:
    """Streams a generation: one GenerateChunk per step, the last with its finish_reason."""
    gen = generation_request(router, request)
    detokenizer = IncrementalDetokenizer(router.tokenizer) if router.tokenizer else None
    try:
        async for chunk in router.engine.generate(gen):
            message = router_pb2.GenerateChunk(
                token_ids=chunk.token_ids, prompt_tokens=len(gen.prompt_ids)
            )
            if detokenizer is not None:
                message.text = detokenizer.push(chunk.token_ids)
            if chunk.finish_reason is not None:
                message.finish_reason = _FINISH_REASONS[chunk.finish_reason]
                if detokenizer is not None:
                    message.text += detokenizer.flush()
            yield message
    except EngineError as err:
        raise _engine_failure(err) from err


async def logits(router: Router, request: router_pb2.LogitsRequest) -> router_pb2.LogitsResponse:
    """Teacher-forced logits of every position of the sequence."""
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
            f"logits of {len(token_ids)} tokens would take {reply_bytes} bytes, more than the "
            f"{MAX_MESSAGE_BYTES} a message may carry: score a shorter sequence",
        )
    try:
        scores = await router.engine.score(token_ids)  # [N, vocab] float32
    except EngineError as err:
        raise _engine_failure(err) from err
    return router_pb2.LogitsResponse(
        num_tokens=scores.shape[0],
        vocab_size=scores.shape[1],
        logits=scores.contiguous().numpy().tobytes(),  # little-endian hosts only (as the wire)
    )


async def cluster_info(router: Router) -> router_pb2.ClusterInfo:
    """The model, and each worker with its experts, reachability and tokens sent so far."""
    spec, config, workers = router.spec, router.config, router.workers
    healthy = await workers.probe(_PROBE_TIMEOUT_S)
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
                healthy=ok,
                expert_tokens=workers.expert_tokens(i),
            )
            for i, (worker, ok) in enumerate(zip(workers.workers, healthy, strict=True))
        ],
    )
