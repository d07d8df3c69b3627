"""Self-attention over the KV cache: GQA (Qwen, Mixtral) and MLA (DeepSeek-V2/V3).

Shapes: T = new tokens of the step, B = sequences, N = most new tokens of one sequence,
L = longest cached length after the step, H = hidden, h = query heads, g = kv heads,
d = head dim, r = kv_lora_rank, p = rotated dims (qk_rope_head_dim), n = qk_nope_head_dim,
v = v_head_dim.

Each module writes the step's keys (or MLA latents) to the cache, reads every slot of the step
back padded to L, and attends with one batched matmul under a causal (optionally windowed) mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention_worker.batch import BatchLayout
from attention_worker.kv_cache import KVCache
from attention_worker.rope import RotaryEmbedding, mla_softmax_scale
from moe_core.spec import ModelSpec


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, times the weight (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [B, h, N, L] (already scaled), mask [B, N, L] -> probabilities, float32 softmax."""
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


class GQAAttention(nn.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        att = spec.attention
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = att.num_heads, att.num_kv_heads, att.head_dim
        self.window = spec.sliding_windows[layer]
        self.scale = att.head_dim**-0.5
        hidden, q_dim = spec.hidden_size, att.num_heads * att.head_dim
        kv_dim = att.num_kv_heads * att.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=att.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=att.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=att.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=att.o_bias)
        if att.qk_norm:
            self.q_norm = RMSNorm(att.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(att.head_dim, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        layout: BatchLayout,
        cache: KVCache,
        rope: RotaryEmbedding,
        cos: torch.Tensor,  # [T, d/2]
        sin: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)  # [T, h, d]
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)  # [T, g, d]
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)  # [T, g, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        cache.write(self.layer, layout.token_slot, layout.cache_index, k, v)
        keys, values = cache.read(self.layer, layout.slots, layout.max_len)  # [B, L, g, d]
        group = self.heads // self.kv_heads
        keys = keys.transpose(1, 2).repeat_interleave(group, dim=1)  # [B, h, L, d]
        values = values.transpose(1, 2).repeat_interleave(group, dim=1)  # [B, h, L, d]
        queries = layout.pad(q).transpose(1, 2)  # [B, h, N, d]
        scores = torch.matmul(queries, keys.transpose(2, 3)) * self.scale  # [B, h, N, L]
        probs = _softmax(scores, layout.mask(self.window))  # [B, h, N, L]
        out = torch.matmul(probs, values).transpose(1, 2)  # [B, N, h, d]
        return self.o_proj(layout.unpad(out).reshape(t, -1))  # [T, H]


class MLAAttention(nn.Module):
    """DeepSeek multi-head latent attention, computed in the latent space ("absorbed").

    Keys and values of head i are k_nope = W_uk[i] c_kv, v = W_uv[i] c_kv (kv_b_proj = [W_uk;
    W_uv] per head) plus the shared roped key k_pe. So q.k = (W_uk[i]^T q_nope).c_kv + q_pe.k_pe
    and the output is W_uv[i] (sum_l p_l c_kv_l): the cache holds only c_kv and k_pe.
    """

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        att = spec.attention
        self.layer = layer
        self.heads, self.rank = att.num_heads, att.kv_lora_rank
        self.nope, self.rope_dim = att.qk_nope_head_dim, att.qk_rope_head_dim
        self.v_dim = att.v_head_dim
        self.window = spec.sliding_windows[layer]
        self.scale = mla_softmax_scale(spec.rope, att.head_dim)
        hidden, q_dim = spec.hidden_size, att.num_heads * att.head_dim
        if att.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, att.q_lora_rank, bias=att.qkv_bias)
            self.q_a_norm = RMSNorm(att.q_lora_rank, att.latent_norm_eps)
            self.q_b_proj = nn.Linear(att.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj = nn.Linear(hidden, self.rank + self.rope_dim, bias=att.qkv_bias)
        self.kv_a_norm = RMSNorm(self.rank, att.latent_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, hidden, bias=att.o_bias)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        layout: BatchLayout,
        cache: KVCache,
        rope: RotaryEmbedding,
        cos: torch.Tensor,  # [T, p/2]
        sin: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self._queries(x).view(t, self.heads, self.nope + self.rope_dim)  # [T, h, n+p]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)  # [T, h, n], [T, h, p]
        c_kv, k_pe = self.kv_a_proj(x).split([self.rank, self.rope_dim], dim=-1)  # [T, r], [T, p]
        c_kv = self.kv_a_norm(c_kv)  # [T, r]
        q_pe = rope.rotate(q_pe, cos, sin)  # [T, h, p]
        k_pe = rope.rotate(k_pe[:, None, :], cos, sin)[:, 0]  # [T, p]
        cache.write(self.layer, layout.token_slot, layout.cache_index, c_kv, k_pe)
        c_all, pe_all = cache.read(self.layer, layout.slots, layout.max_len)  # [B, L, r], [B, L, p]

        w_kv = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)  # [h, n, r], [h, v, r]
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # [T, h, r]
        q_lat, q_pe = layout.pad(q_lat), layout.pad(q_pe)  # [B, N, h, r], [B, N, h, p]
        scores = torch.einsum("bnhr,blr->bhnl", q_lat, c_all) + torch.einsum(
            "bnhp,blp->bhnl", q_pe, pe_all
        )  # [B, h, N, L]
        probs = _softmax(scores * self.scale, layout.mask(self.window))  # [B, h, N, L]
        o_lat = torch.einsum("bhnl,blr->bnhr", probs, c_all)  # [B, N, h, r]
        out = torch.einsum("bnhr,hvr->bnhv", o_lat, w_uv)  # [B, N, h, v]
        return self.o_proj(layout.unpad(out).reshape(t, -1))  # [T, H]
