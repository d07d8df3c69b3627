"""The MoE language model as plain modules: everything except the routed experts.

Shapes: T = new tokens of the step, H = hidden, I = intermediate, k = experts per token,
R = rows whose logits are returned, V = vocabulary.

`MoEModel.forward(batch, cache)` embeds the step's tokens, runs each decoder layer (attention over
the KV cache, then a dense MLP or an MoE layer) and returns the logits of `batch.logits_rows`.
An MoE layer gates in float32, hands its tokens to the expert backend (`dispatch`), computes its
shared experts meanwhile, and adds the backend's `combine` result.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from attention_worker.attention import GQAAttention, MLAAttention, RMSNorm
from attention_worker.batch import StepBatch
from attention_worker.kv_cache import KVCache
from attention_worker.rope import RotaryEmbedding
from moe_core.checkpoint import Checkpoint
from moe_core.errors import UnsupportedModelError
from moe_core.naming import load_dense
from moe_core.spec import ModelSpec
from router.expert_backend import ExpertBackend
from router.gating import Gate


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, H]


class MoELayer(nn.Module):
    """Gate + routed experts (behind the backend) + optional shared experts."""

    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertBackend) -> None:
        super().__init__()
        self.layer = layer
        self.experts = experts  # not a module: the routed weights live elsewhere
        self.gate = Gate(spec)
        self.shared = None
        self.shared_gate = None
        if spec.shared_intermediate_size:
            self.shared = DenseMLP(spec.hidden_size, spec.shared_intermediate_size, spec.mlp_bias)
        if spec.shared_expert_gate:
            self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self.gate(x)  # [T, k] int64, [T, k] float32
        handle = self.experts.dispatch(self.layer, x, topk_ids, topk_weights)
        shared = None
        if self.shared is not None:
            shared = self.shared(x)  # [T, H]
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared  # [T, H]
        routed = self.experts.combine(handle).to(x.dtype)  # [T, H]
        return routed if shared is None else routed + shared


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertBackend) -> None:
        super().__init__()
        eps = spec.rms_norm_eps
        self.attn_norm = RMSNorm(spec.hidden_size, eps)
        attention = MLAAttention if spec.attention.kind == "mla" else GQAAttention
        self.attn = attention(spec, layer)
        self.mlp_norm = RMSNorm(spec.hidden_size, eps)
        if layer in spec.moe_layers:
            self.mlp = MoELayer(spec, layer, experts)
        else:
            self.mlp = DenseMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)

    def forward(self, x, layout, cache, rope, cos, sin) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layout, cache, rope, cos, sin)  # [T, H]
        return x + self.mlp(self.mlp_norm(x))  # [T, H]


class MoEModel(nn.Module):
    def __init__(self, spec: ModelSpec, experts: ExpertBackend) -> None:
        super().__init__()
        self.spec = spec
        self.experts = experts
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rope = RotaryEmbedding(spec.rope)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, experts) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @torch.no_grad()
    def forward(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """-> logits [R, V] float32 of batch.logits_rows; writes the step's keys to the cache."""
        lengths = [c + n for c, n in zip(batch.num_cached, batch.num_new, strict=True)]
        cache.check(batch.slots, lengths)
        layout = batch.layout()
        x = self.embed(batch.token_ids)  # [T, H]
        cos, sin = self.rope(batch.positions, x.dtype)  # [T, d/2] each
        for layer in self.layers:
            x = layer(x, layout, cache, self.rope, cos, sin)  # [T, H]
        x = self.norm(x[batch.logits_rows])  # [R, H]
        return self.lm_head(x).float()  # [R, V]


def load_model(
    model_dir: str | os.PathLike,
    experts: ExpertBackend,
    device="cpu",
    dtype: torch.dtype = torch.float32,
) -> MoEModel:
    """Builds the model of model_dir with its dense weights in `dtype` on `device`; the routed
    experts are not read (they belong to `experts`). Gate weights stay float32."""
    spec = ModelSpec.from_dir(model_dir)
    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = MoEModel(spec, experts)
    state = {}
    for name, param in model.named_parameters():  # tied lm_head appears once, as embed
        tensor = load_dense(ckpt, spec, name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise UnsupportedModelError(
                f"{name}: checkpoint shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(param.shape)}"
            )
        keep_fp32 = name.endswith((".gate.weight", ".gate.bias"))
        state[name] = tensor.to(device, torch.float32 if keep_fp32 else dtype)
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()
