"""Requests checked and built client-side, and responses turned into plain Python and numpy.

Shared by `Client` and `AsyncClient`; nothing here opens a connection.
"""

from __future__ import annotations

import math
import numbers

import grpc
import numpy as np

from moe_client.types import ClusterError, GenerateChunk, GenerateResult, Scores
from protos import router_pb2

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_UINT32 = 2**32
_FINISH_REASONS = {
    router_pb2.FINISH_REASON_UNSPECIFIED: None,
    router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_STOP: "stop",
}


def _token_ids(token_ids, what: str = "token_ids") -> list[int]:
    if isinstance(token_ids, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of integers, got a {type(token_ids).__name__}")
    ids = list(token_ids)
    if not ids:
        raise ValueError(f"{what} is empty")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ValueError(f"{what}[{i}] must be an integer, got {token!r}")
        if not 0 <= token < _UINT32:
            raise ValueError(f"{what}[{i}] = {token} is not a token id (0 <= id < 2**32)")
    return [int(token) for token in ids]


def generate_request(
    prompt: str | None,
    token_ids,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    ignore_eos: bool,
) -> router_pb2.GenerateRequest:
    """Checks generation arguments (ValueError naming the bad one) -> GenerateRequest."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of prompt (text) and token_ids")
    request = router_pb2.GenerateRequest(ignore_eos=bool(ignore_eos))
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt is empty")
        request.prompt = prompt
    else:
        request.token_ids.extend(_token_ids(token_ids))
    if not isinstance(max_new_tokens, numbers.Integral) or not 1 <= max_new_tokens < _UINT32:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, numbers.Integral) or not 0 <= top_k < _UINT32:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {top_p!r}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    request.max_new_tokens = int(max_new_tokens)
    request.temperature = float(temperature)
    request.top_k = int(top_k)
    request.top_p = float(top_p)
    if seed is not None:
        request.seed = int(seed)
    return request


def logits_request(token_ids) -> router_pb2.LogitsRequest:
    """Checks the sequence to score -> LogitsRequest."""
    return router_pb2.LogitsRequest(token_ids=_token_ids(token_ids))


def scores(response: router_pb2.LogitsResponse) -> Scores:
    """LogitsResponse -> Scores (a writable float32 array [num_tokens, vocab_size])."""
    rows, cols = response.num_tokens, response.vocab_size
    if len(response.logits) != rows * cols * 4:
        raise ClusterError(
            grpc.StatusCode.DATA_LOSS,
            f"logits of {rows} x {cols} float32 need {rows * cols * 4} bytes, "
            f"the router sent {len(response.logits)}",
        )
    logits = np.frombuffer(bytearray(response.logits), dtype="<f4").reshape(rows, cols)
    return Scores(logits, tuple(response.dropped_experts))


def exact_logits(result: Scores) -> np.ndarray:
    """Scores -> the logits, refusing degraded ones (use `score` to accept those)."""
    if result.dropped_experts:
        raise ClusterError(
            grpc.StatusCode.UNAVAILABLE,
            f"the logits left out experts {list(result.dropped_experts)} (no worker served them); "
            "score() returns degraded logits with that flag",
        )
    return result.logits


def info_dict(info: router_pb2.ClusterInfo) -> dict:
    """ClusterInfo -> dict of plain Python values (the proto's field names, workers as dicts)."""
    return {
        "architecture": info.architecture,
        "model": info.model,
        "vocab_size": info.vocab_size,
        "precision": info.precision,
        "device": info.device,
        "num_layers": info.num_layers,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "hidden_size": info.hidden_size,
        "has_tokenizer": info.has_tokenizer,
        "eos_token_ids": list(info.eos_token_ids),
        "workers": [
            {
                "address": worker.address,
                "experts": list(worker.experts),
                "healthy": worker.healthy,
                "expert_tokens": dict(sorted(worker.expert_tokens.items())),
            }
            for worker in info.workers
        ],
        "load": {
            "kv_slots": info.load.kv_slots,
            "free_kv_slots": info.load.free_kv_slots,
            "running": info.load.running,
            "waiting": info.load.waiting,
        },
        "limits": {
            "max_seq_len": info.limits.max_seq_len,
            "max_prompt_len": info.limits.max_prompt_len,
            "max_new_tokens": info.limits.max_new_tokens,
            "max_concurrent_requests": info.limits.max_concurrent_requests,
            "max_waiting": info.limits.max_waiting,
            "max_request_bytes": info.limits.max_request_bytes,
        },
    }


def chunk(message: router_pb2.GenerateChunk, has_tokenizer: bool) -> GenerateChunk:
    """GenerateChunk message -> GenerateChunk; text is None without a tokenizer."""
    return GenerateChunk(
        token_ids=list(message.token_ids),
        text=message.text if has_tokenizer else None,
        finish_reason=_FINISH_REASONS.get(message.finish_reason),
        prompt_tokens=message.prompt_tokens,
        dropped_experts=tuple(message.dropped_experts),
    )


def join_chunks(chunks: list[GenerateChunk]) -> GenerateResult:
    """The chunks of one stream -> its GenerateResult; the last chunk must carry finish_reason."""
    if not chunks or chunks[-1].finish_reason is None:
        raise ClusterError(grpc.StatusCode.DATA_LOSS, "the generation stream ended unfinished")
    texts = [c.text for c in chunks]
    return GenerateResult(
        token_ids=[token for c in chunks for token in c.token_ids],
        text=None if texts[0] is None else "".join(texts),
        finish_reason=chunks[-1].finish_reason,
        prompt_tokens=chunks[-1].prompt_tokens,
        dropped_experts=tuple(sorted({e for c in chunks for e in c.dropped_experts})),
    )


def cluster_error(err: grpc.RpcError) -> ClusterError:
    """A failed call -> ClusterError with its status code and details (err as __cause__)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    error = ClusterError(code or grpc.StatusCode.UNKNOWN, details or "")
    error.__cause__ = err
    return error
