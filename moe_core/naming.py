"""Checkpoint naming: one table per architecture from our parameter names to HF tensor names.

Our modules (router.model) name their parameters the same way for every architecture:
`embed`, `norm`, `lm_head`, and per layer `attn_norm`, `attn.*`, `mlp_norm`, then `mlp.*` for a
dense MLP or `mlp.gate`, `mlp.shared`, `mlp.shared_gate` for an MoE layer. The tables below say
where each one lives in a Hugging Face checkpoint; a tuple lists alternatives (first present
wins). Routed experts are read separately, per expert, in either on-disk layout:
per-expert 2-D tensors, or packed 3-D tensors (`gate_up_proj [E, 2I, H]` gate rows first,
`down_proj [E, H, I]`) as transformers writes with `save_original_format=False`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_core.checkpoint import Checkpoint
from moe_core.errors import ModelNotFoundError, UnsupportedModelError
from moe_core.spec import ModelSpec

LAYER_PREFIX = "model.layers.{L}."


def _linear(ours: str, hf: str) -> dict[str, str]:
    return {f"{ours}.weight": f"{hf}.weight", f"{ours}.bias": f"{hf}.bias"}


def _mlp(ours: str, hf: str) -> dict[str, str]:
    return {
        **_linear(f"{ours}.gate_proj", f"{hf}.gate_proj"),
        **_linear(f"{ours}.up_proj", f"{hf}.up_proj"),
        **_linear(f"{ours}.down_proj", f"{hf}.down_proj"),
    }


TOP_LEVEL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
NORMS = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
GQA_ATTENTION = {
    **_linear("attn.q_proj", "self_attn.q_proj"),
    **_linear("attn.k_proj", "self_attn.k_proj"),
    **_linear("attn.v_proj", "self_attn.v_proj"),
    **_linear("attn.o_proj", "self_attn.o_proj"),
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
MLA_ATTENTION = {
    **_linear("attn.q_proj", "self_attn.q_proj"),
    **_linear("attn.q_a_proj", "self_attn.q_a_proj"),
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    **_linear("attn.q_b_proj", "self_attn.q_b_proj"),
    **_linear("attn.kv_a_proj", "self_attn.kv_a_proj_with_mqa"),
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    **_linear("attn.kv_b_proj", "self_attn.kv_b_proj"),
    **_linear("attn.o_proj", "self_attn.o_proj"),
}
DENSE_MLP = _mlp("mlp", "mlp")


@dataclass(frozen=True)
class NamingTable:
    """Where one architecture keeps its tensors; `{L}` = layer, `{E}` = expert."""

    layer: dict[str, str | tuple[str, ...]]  # ours (layer-local) -> HF, after "model.layers.{L}."
    per_expert: tuple[tuple[str, str, str], ...]  # (gate, up, down) 2-D names
    packed: tuple[tuple[str, str], ...]  # (gate_up [E, 2I, H], down [E, H, I]) 3-D names


def _experts(prefix: str, gate: str, up: str, down: str) -> tuple[str, str, str]:
    base = f"{LAYER_PREFIX}{prefix}.experts.{{E}}."
    return (f"{base}{gate}.weight", f"{base}{up}.weight", f"{base}{down}.weight")


def _packed(prefix: str) -> tuple[str, str]:
    base = f"{LAYER_PREFIX}{prefix}.experts."
    return (f"{base}gate_up_proj", f"{base}down_proj")


_STANDARD_EXPERTS = (_experts("mlp", "gate_proj", "up_proj", "down_proj"),)

DEEPSEEK = NamingTable(
    layer={
        **NORMS,
        **MLA_ATTENTION,
        **DENSE_MLP,
        "mlp.gate.weight": "mlp.gate.weight",
        "mlp.gate.bias": "mlp.gate.e_score_correction_bias",
        **_mlp("mlp.shared", "mlp.shared_experts"),
    },
    per_expert=_STANDARD_EXPERTS,
    packed=(_packed("mlp"),),
)
QWEN2_MOE = NamingTable(
    layer={
        **NORMS,
        **GQA_ATTENTION,
        **DENSE_MLP,
        "mlp.gate.weight": "mlp.gate.weight",
        **_mlp("mlp.shared", "mlp.shared_expert"),
        "mlp.shared_gate.weight": "mlp.shared_expert_gate.weight",
    },
    per_expert=_STANDARD_EXPERTS,
    packed=(_packed("mlp"),),
)
QWEN3_MOE = NamingTable(
    layer={**NORMS, **GQA_ATTENTION, **DENSE_MLP, "mlp.gate.weight": "mlp.gate.weight"},
    per_expert=_STANDARD_EXPERTS,
    packed=(_packed("mlp"),),
)
MIXTRAL = NamingTable(  # original layout under block_sparse_moe, packed one under mlp
    layer={
        **NORMS,
        **GQA_ATTENTION,
        "mlp.gate.weight": ("block_sparse_moe.gate.weight", "mlp.gate.weight"),
    },
    per_expert=(_experts("block_sparse_moe", "w1", "w3", "w2"),),
    packed=(_packed("mlp"), _packed("block_sparse_moe")),
)
TABLES = {
    "deepseek_v3": DEEPSEEK,
    "deepseek_v2": DEEPSEEK,
    "qwen3_moe": QWEN3_MOE,
    "qwen2_moe": QWEN2_MOE,
    "mixtral": MIXTRAL,
}


def hf_names(spec: ModelSpec, ours: str) -> tuple[str, ...]:
    """Candidate HF names of one of our parameters, e.g. `layers.3.attn.kv_a_proj.weight`."""
    if ours in TOP_LEVEL:
        return (TOP_LEVEL[ours],)
    head, layer, local = ours.split(".", 2)
    if head != "layers" or not layer.isdigit():
        raise KeyError(f"parameter {ours} has no checkpoint name")
    hf = TABLES[spec.model_type].layer[local]
    names = (hf,) if isinstance(hf, str) else hf
    return tuple(LAYER_PREFIX.format(L=layer) + name for name in names)


def load_dense(ckpt: Checkpoint, spec: ModelSpec, ours: str) -> torch.Tensor:
    """One non-expert parameter as float32 (FP8 dequantized)."""
    names = hf_names(spec, ours)
    for name in names:
        if ckpt.has(name):
            return ckpt.load(name)
    raise ModelNotFoundError(f"tensor {' or '.join(names)} is not in the checkpoint at {ckpt.path}")


@dataclass
class ExpertWeights:
    """One routed expert: down(silu(gate(x)) * up(x)), float32."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]


@dataclass
class Fp8ExpertWeights:
    """One routed expert as stored in an FP8 checkpoint: float8_e4m3fn + float32 block scales."""

    gate: torch.Tensor  # [I, H] float8_e4m3fn
    gate_scales: torch.Tensor  # [ceil(I/128), ceil(H/128)]
    up: torch.Tensor  # [I, H]
    up_scales: torch.Tensor  # [ceil(I/128), ceil(H/128)]
    down: torch.Tensor  # [H, I]
    down_scales: torch.Tensor  # [ceil(H/128), ceil(I/128)]


def _find_experts(ckpt: Checkpoint, spec: ModelSpec, layer: int, expert: int):
    """('per_expert', (gate, up, down) names) or ('packed', (gate_up, down) names)."""
    if not 0 <= expert < spec.num_experts:
        raise ValueError(f"expert {expert} out of range [0, {spec.num_experts})")
    table = TABLES[spec.model_type]
    for names in table.per_expert:
        full = tuple(n.format(L=layer, E=expert) for n in names)
        if ckpt.has(full[0]):
            return "per_expert", full
    for names in table.packed:
        full = tuple(n.format(L=layer) for n in names)
        if ckpt.has(full[0]):
            return "packed", full
    raise ModelNotFoundError(
        f"no weights of expert {expert} in layer {layer} at {ckpt.path} (looked for "
        f"{table.per_expert[0][0].format(L=layer, E=expert)} and "
        f"{table.packed[0][0].format(L=layer)})"
    )


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape) != expected:
        raise UnsupportedModelError(
            f"{name} has shape {tuple(tensor.shape)}, config.json implies {expected}"
        )
    return tensor


def load_expert(ckpt: Checkpoint, spec: ModelSpec, layer: int, expert: int) -> ExpertWeights:
    """Reads one expert (only its bytes: a slice of packed tensors), float32."""
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    layout, names = _find_experts(ckpt, spec, layer, expert)
    if layout == "per_expert":
        gate, up, down = (ckpt.load(name) for name in names)
    else:
        gate_up = _check_shape(names[0], ckpt.load(names[0], expert), (2 * inter, hidden))
        gate, up = gate_up[:inter], gate_up[inter:]
        down = ckpt.load(names[1], expert)
    return ExpertWeights(
        gate=_check_shape(names[0], gate, (inter, hidden)),
        up=_check_shape(names[1 if layout == "per_expert" else 0], up, (inter, hidden)),
        down=_check_shape(names[-1], down, (hidden, inter)),
    )


def load_expert_fp8(
    ckpt: Checkpoint, spec: ModelSpec, layer: int, expert: int
) -> Fp8ExpertWeights | None:
    """The expert's raw FP8 weights and scales when the checkpoint stores them, else None."""
    layout, names = _find_experts(ckpt, spec, layer, expert)
    if layout != "per_expert" or not all(ckpt.is_fp8(name) for name in names):
        return None
    (gate, gate_s), (up, up_s), (down, down_s) = (ckpt.load_fp8(name) for name in names)
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    return Fp8ExpertWeights(
        gate=_check_shape(names[0], gate, (inter, hidden)),
        gate_scales=gate_s,
        up=_check_shape(names[1], up, (inter, hidden)),
        up_scales=up_s,
        down=_check_shape(names[2], down, (hidden, inter)),
        down_scales=down_s,
    )
