"""Top-k expert selection of an MoE layer, per architecture, in float32.

Shapes: T = tokens, H = hidden, E = routed experts, G = expert groups, k = experts per token.

- Qwen2/Qwen3, Mixtral, DeepSeek-V2 `greedy`: softmax over E, top-k; weights renormalised when
  `norm_topk_prob` (always for Mixtral), times `routed_scaling_factor` (1 except DeepSeek).
- DeepSeek-V2 `group_limited_greedy`: softmax; keep the `topk_group` groups with the largest
  single score; top-k among them.
- DeepSeek-V3: sigmoid scores; a per-expert bias is added to choose experts only; group score
  = sum of the group's top-2 biased scores; keep `topk_group` groups; top-k among them;
  weights are the unbiased scores, normalised when `norm_topk_prob`, times the scaling factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.spec import GatingSpec, ModelSpec


def _keep_groups(
    choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int, fill: float
) -> torch.Tensor:
    """choice [T, E], group_scores [T, G] -> choice with experts of unkept groups set to fill."""
    t, g = group_scores.shape
    kept = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    expert_mask = group_mask[:, :, None].expand(t, g, choice.shape[1] // g).reshape(t, -1)
    return choice.masked_fill(~expert_mask, fill)  # [T, E]


def route(
    logits: torch.Tensor, gating: GatingSpec, top_k: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
    t, e = logits.shape
    if gating.method == "sigmoid_group_topk":
        scores = logits.sigmoid()  # [T, E]
        choice = scores if bias is None else scores + bias  # [T, E], used to choose only
        if gating.n_group > 1:
            grouped = choice.view(t, gating.n_group, e // gating.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            choice = _keep_groups(choice, group_scores, gating.topk_group, float("-inf"))
        ids = torch.topk(choice, k=top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, ids)  # [T, k]
        if gating.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        scores = F.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        if gating.method == "softmax_group_limited" and gating.n_group > 1:
            group_scores = scores.view(t, gating.n_group, -1).amax(dim=-1)  # [T, G]
            scores = _keep_groups(scores, group_scores, gating.topk_group, 0.0)
        weights, ids = torch.topk(scores, k=top_k, dim=-1)  # [T, k]
        if gating.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * gating.routed_scaling_factor


class Gate(nn.Module):
    """The router of one MoE layer; its weight (and bias) stay float32 whatever the model dtype."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gating, self.top_k = spec.gating, spec.top_k
        self.weight = nn.Parameter(torch.zeros(spec.num_experts, spec.hidden_size))  # [E, H]
        if spec.gating.score_bias:
            self.bias = nn.Parameter(torch.zeros(spec.num_experts))  # [E]
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] float32)."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        bias = None if self.bias is None else self.bias.float()
        return route(logits, self.gating, self.top_k, bias)
