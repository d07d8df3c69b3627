"""The KV cache: preallocated per-layer tensors `[max_seqs, max_len, ...]`, one slot per sequence.

GQA layers keep roped keys and values `[kv_heads, head_dim]` per token. MLA layers keep what
DeepSeek's attention needs to rebuild them: the compressed latent `c_kv [kv_lora_rank]` (after
kv_a_layernorm) and the roped shared key `k_pe [qk_rope_head_dim]`, not per-head K/V.
"""

from __future__ import annotations

import torch

from moe_core.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, max_seqs: int, max_len: int, device, dtype) -> None:
        if max_seqs < 1 or max_len < 1:
            raise ValueError(f"max_seqs and max_len must be >= 1, got {max_seqs}, {max_len}")
        self.spec = spec
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.device = torch.device(device)
        self.dtype = dtype
        att = spec.attention
        if att.kind == "mla":
            per_token = ((att.kv_lora_rank,), (att.qk_rope_head_dim,))  # c_kv, k_pe
        else:
            per_token = ((att.num_kv_heads, att.head_dim),) * 2  # k, v
        self.layers: list[tuple[torch.Tensor, ...]] = [
            tuple(
                torch.zeros(max_seqs, max_len, *shape, device=self.device, dtype=dtype)
                for shape in per_token
            )
            for _ in range(spec.num_layers)
        ]
        self._free = set(range(max_seqs))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def allocate(self) -> int:
        """A free slot (the lowest); raises RuntimeError when every slot is taken."""
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.max_seqs} slots are in use")
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.max_seqs or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.add(slot)

    def check(self, slots: list[int], lengths: list[int]) -> None:
        """Raises ValueError unless every slot is allocated and can hold its length."""
        for slot, length in zip(slots, lengths, strict=True):
            if not 0 <= slot < self.max_seqs or slot in self._free:
                raise ValueError(f"slot {slot} is not allocated")
            if length > self.max_len:
                raise ValueError(
                    f"sequence in slot {slot} needs {length} cache entries, max_len is "
                    f"{self.max_len}"
                )

    def write(
        self, layer: int, slots: torch.Tensor, index: torch.Tensor, *values: torch.Tensor
    ) -> None:
        """Stores per-token values (GQA: k, v; MLA: c_kv, k_pe), each [T, ...], at
        (slots[t], index[t])."""
        for cache, value in zip(self.layers[layer], values, strict=True):
            cache[slots, index] = value.to(self.dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
        """The first `length` entries of each slot: tensors [B, length, ...]."""
        return tuple(cache[slots, :length] for cache in self.layers[layer])
