"""`StepBatch`: the new tokens of one engine step, and the index tensors attention derives from it.

Shapes: T = new tokens of the step (all sequences, flattened in sequence order), B = sequences,
N = most new tokens of one sequence, L = longest sequence after the step (cached + new).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepBatch:
    """One engine step: new tokens of several sequences, flattened in sequence order."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    slots: list[int]  # [B] KV-cache slot of each sequence
    num_cached: list[int]  # [B] tokens already in the cache before this step
    num_new: list[int]  # [B] new tokens of each sequence this step
    logits_rows: torch.Tensor  # [R] int64 rows of T whose logits are returned
    _layout: BatchLayout | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        num_seqs = len(self.slots)
        if num_seqs == 0:
            raise ValueError("a step needs at least one sequence")
        if len(self.num_cached) != num_seqs or len(self.num_new) != num_seqs:
            raise ValueError(
                f"slots, num_cached and num_new differ in length: "
                f"{num_seqs}, {len(self.num_cached)}, {len(self.num_new)}"
            )
        if len(set(self.slots)) != num_seqs:
            raise ValueError(f"a slot appears twice in one step: {self.slots}")
        if min(self.num_new) < 1 or min(self.num_cached) < 0:
            raise ValueError("every sequence needs >= 1 new token and >= 0 cached tokens")
        total = sum(self.num_new)
        if self.token_ids.shape != (total,) or self.positions.shape != (total,):
            raise ValueError(
                f"token_ids {tuple(self.token_ids.shape)} and positions "
                f"{tuple(self.positions.shape)} must both be [{total}] (sum of num_new)"
            )
        rows = self.logits_rows
        if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= total)):
            raise ValueError(f"logits_rows must be a [R] tensor of rows in [0, {total})")

    @classmethod
    def build(cls, seqs: list[tuple[int, int, list[int], bool]], device) -> StepBatch:
        """seqs: (slot, num_cached, new_token_ids, all_logits) each; positions continue the cache.

        Logits rows: every new row of a sequence with all_logits, else its last row.
        """
        token_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for _slot, cached, new_ids, all_logits in seqs:
            start = len(token_ids)
            token_ids += new_ids
            positions += range(cached, cached + len(new_ids))
            rows += range(start, len(token_ids)) if all_logits else [len(token_ids) - 1]
        return cls(
            token_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slots=[s[0] for s in seqs],
            num_cached=[s[1] for s in seqs],
            num_new=[len(s[2]) for s in seqs],
            logits_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def layout(self) -> BatchLayout:
        """Index tensors for attention, computed once per step."""
        if self._layout is None:
            self._layout = BatchLayout.of(self)
        return self._layout


@dataclass
class BatchLayout:
    """Where each flat token goes in the padded [B, N] query grid and in the KV cache."""

    token_seq: torch.Tensor  # [T] int64, sequence of each token
    token_row: torch.Tensor  # [T] int64, index among its sequence's new tokens
    token_slot: torch.Tensor  # [T] int64, cache slot of each token
    cache_index: torch.Tensor  # [T] int64, where each token goes in its slot (cached + row)
    slots: torch.Tensor  # [B] int64
    query_index: torch.Tensor  # [B, N] int64, cache index of each query row (padding: last)
    max_new: int  # N
    max_len: int  # L
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, batch: StepBatch) -> BatchLayout:
        device = batch.token_ids.device
        new = torch.tensor(batch.num_new, dtype=torch.int64, device=device)  # [B]
        cached = torch.tensor(batch.num_cached, dtype=torch.int64, device=device)  # [B]
        slots = torch.tensor(batch.slots, dtype=torch.int64, device=device)  # [B]
        token_seq = torch.repeat_interleave(torch.arange(len(batch.slots), device=device), new)
        starts = torch.cumsum(new, 0) - new  # [B] first flat row of each sequence
        token_row = torch.arange(batch.num_tokens, device=device) - starts[token_seq]  # [T]
        max_new = max(batch.num_new)
        rows = torch.arange(max_new, device=device)  # [N]
        query_index = cached[:, None] + torch.minimum(rows[None, :], new[:, None] - 1)  # [B, N]
        return cls(
            token_seq=token_seq,
            token_row=token_row,
            token_slot=slots[token_seq],
            cache_index=cached[token_seq] + token_row,
            slots=slots,
            query_index=query_index,
            max_new=max_new,
            max_len=max(c + n for c, n in zip(batch.num_cached, batch.num_new, strict=True)),
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] flat rows -> [B, N, ...] query grid, zeros in padding rows."""
        out = x.new_zeros(self.slots.shape[0], self.max_new, *x.shape[1:])
        out[self.token_seq, self.token_row] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, ...] query grid -> [T, ...] flat rows."""
        return x[self.token_seq, self.token_row]

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, N, L] bool: query row n of sequence b may see cache entry l (causal, windowed)."""
        if window not in self._masks:
            keys = torch.arange(self.max_len, device=self.slots.device)  # [L]
            query = self.query_index[:, :, None]  # [B, N, 1]
            allowed = keys <= query
            if window is not None:
                allowed &= keys > query - window
            self._masks[window] = allowed
        return self._masks[window]
