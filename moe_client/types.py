"""What the SDK returns: generation results, streamed chunks, and the error of a failed call."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation.

    token_ids: the generated tokens (an end-of-sequence token that stopped it included).
    text: their text, or None when the cluster's model has no tokenizer.
    finish_reason: "length" (max_new_tokens reached) or "stop" (end-of-sequence generated).
    prompt_tokens: tokens in the prompt.
    dropped_experts: experts left out of some tokens' routing because no worker served them (a
    router started with --on-expert-loss degrade); empty when the output is exact.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_tokens: int
    dropped_experts: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerateChunk:
    """Tokens generated since the previous chunk of a stream.

    text: their text (possibly "" while a multi-byte character is incomplete), or None when the
    model has no tokenizer. finish_reason: None until the last chunk, then "length" or "stop".
    dropped_experts: as in GenerateResult, for the steps of this chunk.
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    dropped_experts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Scores:
    """Teacher-forced logits: float32 [num_tokens, vocab_size], row i after token_ids[0..i];
    dropped_experts as in GenerateResult."""

    logits: np.ndarray
    dropped_experts: tuple[int, ...] = ()


class ClusterError(Exception):
    """A call the cluster refused or could not complete.

    code: the grpc.StatusCode the router answered (INVALID_ARGUMENT for a bad request,
    OUT_OF_RANGE beyond a limit of the router, RESOURCE_EXHAUSTED when it is at capacity (retry
    later), FAILED_PRECONDITION for a text prompt without tokenizer, UNAVAILABLE when
    unreachable or stopping, DEADLINE_EXCEEDED past the timeout...). details: the router's
    message. The original
    grpc.RpcError is the exception's __cause__.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
