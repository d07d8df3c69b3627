"""Per-request sampling of the next token from logits.

Each request carries its own parameters and its own `torch.Generator`, so a seeded request draws
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = no limit
    top_p: float = 1.0  # keep the smallest set reaching this probability; 1 = no limit
    seed: int | None = None  # None = a fresh random seed

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's CPU generator (None for greedy requests, which draw nothing)."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed % 2**63)  # manual_seed takes a signed 64-bit value
    return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[V] float32 -> [V] float32 with the tokens outside top-k / top-p set to -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_one(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """[V] float32 logits -> the next token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float().cpu()
    # shifted so that the largest is 0: a tiny temperature gives -inf, never inf - inf = NaN
    scaled = filter_logits((logits - logits.max()) / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """[B, V] float32 logits, one params and generator per row -> B token ids."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"expected [B, V] logits with B = {len(params)} params and {len(generators)} "
            f"generators, got {tuple(logits.shape)}"
        )
    tokens = [0] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        argmax = torch.argmax(logits[greedy_rows], dim=-1).tolist()
        for row, token in zip(greedy_rows, argmax, strict=True):
            tokens[row] = token
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = sample_one(logits[row], p, generator)
    return tokens
