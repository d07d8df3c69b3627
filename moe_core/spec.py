"""`ModelSpec`: what the numerics need to know about a model, parsed from its `config.json`.

One parser per architecture reads the fields that architecture defines (with the defaults of the
matching transformers config class where a field is absent), and the frozen dataclasses below
check the result in `__post_init__`. Both `rope_parameters` (transformers 5) and the older
`rope_theta` + `rope_scaling` spelling are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_core.errors import ModelNotFoundError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral")
ROPE_TYPES = ("default", "linear", "yarn")
GATING_METHODS = (
    "softmax_topk",  # Qwen2/Qwen3, Mixtral, DeepSeek-V2 greedy
    "softmax_group_limited",  # DeepSeek-V2 group_limited_greedy: group score = max in group
    "sigmoid_group_topk",  # DeepSeek-V3: sigmoid, selection-only bias, group score = top-2 sum
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UnsupportedModelError(message)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of the rotated part of each query/key head."""

    kind: str  # one of ROPE_TYPES
    theta: float
    dim: int  # rotated channels per head
    interleaved: bool  # pairs (x0, x1), (x2, x3)... (DeepSeek) instead of halves (x_i, x_i+dim/2)
    factor: float = 1.0
    original_max_position_embeddings: int = 0  # yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # yarn: multiplies cos/sin; None = derived from factor
    truncate: bool = True

    def __post_init__(self) -> None:
        _check(self.kind in ROPE_TYPES, f"rope type {self.kind!r} is not one of {ROPE_TYPES}")
        _check(self.theta > 0, f"rope_theta must be positive, got {self.theta}")
        _check(self.dim > 0 and self.dim % 2 == 0, f"rotary dim must be even, got {self.dim}")
        _check(self.factor > 0, f"rope factor must be positive, got {self.factor}")
        if self.kind == "yarn":
            _check(
                self.original_max_position_embeddings > 0,
                "yarn rope needs original_max_position_embeddings",
            )


@dataclass(frozen=True)
class AttentionSpec:
    """GQA (Qwen, Mixtral) or MLA (DeepSeek) attention."""

    kind: str  # "gqa" | "mla"
    num_heads: int
    num_kv_heads: int  # MLA: equal to num_heads
    head_dim: int  # GQA: per-head q/k/v dim; MLA: qk_nope_head_dim + qk_rope_head_dim
    qkv_bias: bool  # GQA: q/k/v_proj bias; MLA: q_a_proj and kv_a_proj_with_mqa bias
    o_bias: bool
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k before rope
    q_lora_rank: int | None = None  # MLA
    kv_lora_rank: int = 0  # MLA
    qk_nope_head_dim: int = 0  # MLA
    qk_rope_head_dim: int = 0  # MLA
    v_head_dim: int = 0  # MLA
    latent_norm_eps: float = 1e-6  # MLA: q_a_layernorm / kv_a_layernorm eps (fixed in DeepSeek)

    def __post_init__(self) -> None:
        _check(self.kind in ("gqa", "mla"), f"attention kind {self.kind!r} is not gqa or mla")
        _check(self.num_heads > 0 and self.num_kv_heads > 0, "attention heads must be positive")
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"num_attention_heads {self.num_heads} is not a multiple of "
            f"num_key_value_heads {self.num_kv_heads}",
        )
        if self.kind == "mla":
            _check(self.kv_lora_rank > 0, "MLA needs kv_lora_rank > 0")
            _check(self.qk_rope_head_dim > 0 and self.v_head_dim > 0, "MLA head dims must be > 0")
            _check(
                self.head_dim == self.qk_nope_head_dim + self.qk_rope_head_dim,
                "MLA head_dim must be qk_nope_head_dim + qk_rope_head_dim",
            )
            _check(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be > 0")
        else:
            _check(self.head_dim > 0, f"head_dim must be positive, got {self.head_dim}")


@dataclass(frozen=True)
class GatingSpec:
    """How an MoE layer picks its top-k experts and weighs them."""

    method: str  # one of GATING_METHODS
    norm_topk_prob: bool  # renormalise the k weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    score_bias: bool = False  # DeepSeek-V3 e_score_correction_bias, used to choose only

    def __post_init__(self) -> None:
        _check(self.method in GATING_METHODS, f"gating {self.method!r} not in {GATING_METHODS}")
        _check(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
        _check(
            1 <= self.topk_group <= self.n_group,
            f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}",
        )


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_experts: int  # routed experts per MoE layer
    top_k: int
    moe_intermediate_size: int  # I of one routed expert
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is MoE
    eos_token_ids: tuple[int, ...]
    config: dict = field(compare=False, hash=False, repr=False)  # raw config.json
    attention: AttentionSpec
    rope: RopeSpec
    gating: GatingSpec
    intermediate_size: int  # dense MLP of the non-MoE layers
    shared_intermediate_size: int = 0  # 0 = no shared experts
    shared_expert_gate: bool = False  # Qwen2: shared output * sigmoid(shared_expert_gate(x))
    mlp_bias: bool = False  # DeepSeek-V2: dense and shared MLP biases
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full causal attention
    fp8_block: tuple[int, int] | None = None  # block of an FP8 checkpoint's weight scales

    def __post_init__(self) -> None:
        _check(self.model_type in SUPPORTED_MODEL_TYPES, f"model_type {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_experts", "top_k"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _check(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
        _check(
            self.top_k <= self.num_experts,
            f"num_experts_per_tok {self.top_k} exceeds the {self.num_experts} routed experts",
        )
        _check(
            list(self.moe_layers) == sorted(set(self.moe_layers))
            and all(0 <= i < self.num_layers for i in self.moe_layers),
            f"moe_layers {self.moe_layers} must be sorted unique layer indices",
        )
        _check(
            len(self.moe_layers) == self.num_layers or self.intermediate_size > 0,
            "intermediate_size must be positive when some layers are dense",
        )
        _check(
            len(self.sliding_windows) == self.num_layers,
            "sliding_windows needs one entry per layer",
        )
        gating = self.gating
        _check(
            self.num_experts % gating.n_group == 0,
            f"{self.num_experts} experts do not split into n_group={gating.n_group} groups",
        )
        per_group = self.num_experts // gating.n_group
        _check(
            self.top_k <= gating.topk_group * per_group,
            f"top_k {self.top_k} exceeds the experts of topk_group={gating.topk_group} groups",
        )
        _check(
            gating.method != "sigmoid_group_topk" or gating.n_group == 1 or per_group >= 2,
            "sigmoid group routing needs at least 2 experts per group",
        )
        _check(self.fp8_block in (None, (128, 128)), f"FP8 block {self.fp8_block} is not 128x128")

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelSpec:
        """Reads `path/config.json` (and eos ids from `generation_config.json` if present)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ModelNotFoundError(f"model folder {folder} does not exist")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ModelNotFoundError(f"{config_path} does not exist")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise UnsupportedModelError(f"{config_path} is not readable JSON: {err}") from err
        extra_eos: list[int] = []
        generation = folder / "generation_config.json"
        if generation.is_file():
            try:
                extra_eos = _int_list(json.loads(generation.read_text()).get("eos_token_id"))
            except (OSError, ValueError, AttributeError):
                extra_eos = []
        return cls.from_config(config, extra_eos, source=str(config_path))

    @classmethod
    def from_config(
        cls, config: dict, extra_eos: list[int] | tuple[int, ...] = (), source: str = "config"
    ) -> ModelSpec:
        if not isinstance(config, dict):
            raise UnsupportedModelError(f"{source}: expected a JSON object")
        model_type = config.get("model_type")
        if model_type not in _PARSERS:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        eos = tuple(dict.fromkeys(_int_list(config.get("eos_token_id")) + list(extra_eos)))
        try:
            fields = _PARSERS[model_type](_Fields(config))
            return cls(model_type=model_type, eos_token_ids=eos, config=config, **fields)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{source}: {err}") from None
        except (TypeError, ValueError, KeyError) as err:
            raise UnsupportedModelError(f"{source}: invalid field: {err}") from None


def _int_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


_REQUIRED = object()


class _Fields:
    """Reads of config.json fields: absent or null -> the default; no default -> a named error."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.model_type: str = config["model_type"]

    def get(self, key: str, default=_REQUIRED):
        value = self.config.get(key)
        if value is None:
            if default is _REQUIRED:
                raise UnsupportedModelError(f"missing field {key!r}")
            return default
        return value

    def common(self, eps: float) -> dict:
        """Fields every architecture reads the same way."""
        act = self.get("hidden_act", "silu")
        _check(act == "silu", f"hidden_act {act!r} is not supported (only silu)")
        quant = self.config.get("quantization_config")
        fp8_block = None
        if quant is not None:
            method = quant.get("quant_method")
            _check(method == "fp8", f"quantization_config.quant_method {method!r} (only fp8)")
            fp8_block = tuple(quant.get("weight_block_size") or (128, 128))
        return dict(
            vocab_size=int(self.get("vocab_size")),
            hidden_size=int(self.get("hidden_size")),
            num_layers=int(self.get("num_hidden_layers")),
            rms_norm_eps=float(self.get("rms_norm_eps", eps)),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", False)),
            max_position_embeddings=int(self.get("max_position_embeddings", 0)),
            fp8_block=fp8_block,
        )

    def rope(self, dim: int, interleaved: bool, default_theta: float = 10000.0) -> RopeSpec:
        params = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        _check(isinstance(params, dict), "rope_parameters must be an object")
        _check(
            not any(isinstance(v, dict) for v in params.values()),
            "per-layer-type rope_parameters are not supported",
        )
        partial = params.get("partial_rotary_factor", self.config.get("partial_rotary_factor"))
        _check(partial in (None, 1, 1.0), f"partial_rotary_factor {partial} is not supported")
        kind = params.get("rope_type", params.get("type", "default"))
        theta = float(params.get("rope_theta") or self.get("rope_theta", default_theta))
        if kind not in ("linear", "yarn"):
            return RopeSpec(kind=kind, theta=theta, dim=dim, interleaved=interleaved)
        if kind == "linear":
            factor = float(params.get("factor") or 0.0)
            return RopeSpec(kind, theta, dim, interleaved, factor=factor)
        max_pos = int(self.get("max_position_embeddings", 0))
        original = int(
            self.config.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or max_pos
        )
        factor = params.get("factor")
        return RopeSpec(
            kind=kind,
            theta=theta,
            dim=dim,
            interleaved=interleaved,
            factor=float(factor if factor is not None else max_pos / original),
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


def _parse_deepseek(f: _Fields) -> dict:
    """DeepSeek-V3 (sigmoid, group-limited, bias) and DeepSeek-V2 (softmax) with MLA."""
    v3 = f.model_type == "deepseek_v3"
    num_layers = int(f.get("num_hidden_layers"))
    heads = int(f.get("num_attention_heads"))
    kv_heads = int(f.get("num_key_value_heads", heads))
    _check(kv_heads == heads, f"MLA needs num_key_value_heads == num_attention_heads ({heads})")
    nope, rope_dim = int(f.get("qk_nope_head_dim", 128)), int(f.get("qk_rope_head_dim", 64))
    bias = bool(f.get("attention_bias", False))
    q_lora = f.config.get("q_lora_rank", 1536)  # present and null = no q_lora
    attention = AttentionSpec(
        kind="mla",
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope + rope_dim,
        qkv_bias=bias,
        o_bias=bias,
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(f.get("kv_lora_rank", 512)),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(f.get("v_head_dim", 128)),
    )
    _check(int(f.get("moe_layer_freq", 1)) == 1, "moe_layer_freq other than 1 is not supported")
    first_dense = int(f.get("first_k_dense_replace", 3 if v3 else 0))
    moe_inter = int(f.get("moe_intermediate_size", 2048 if v3 else 1407))
    if v3:
        gating = GatingSpec(
            method="sigmoid_group_topk",
            norm_topk_prob=bool(f.get("norm_topk_prob", True)),
            routed_scaling_factor=float(f.get("routed_scaling_factor", 2.5)),
            n_group=int(f.get("n_group", 8)),
            topk_group=int(f.get("topk_group", 4)),
            score_bias=True,
        )
    else:
        method = f.get("topk_method", "greedy")
        methods = {"greedy": "softmax_topk", "group_limited_greedy": "softmax_group_limited"}
        _check(method in methods, f"topk_method {method!r} is not one of {list(methods)}")
        limited = method == "group_limited_greedy"
        gating = GatingSpec(
            method=methods[method],
            norm_topk_prob=bool(f.get("norm_topk_prob", False)),
            routed_scaling_factor=float(f.get("routed_scaling_factor", 1.0)),
            n_group=int(f.get("n_group", 1)) if limited else 1,
            topk_group=int(f.get("topk_group", 1)) if limited else 1,
        )
    return dict(
        **f.common(eps=1e-6),
        num_experts=int(f.get("n_routed_experts", 256 if v3 else 64)),
        top_k=int(f.get("num_experts_per_tok", 8) if v3 else f.get("num_experts_per_tok")),
        moe_intermediate_size=moe_inter,
        moe_layers=tuple(range(first_dense, num_layers)),
        attention=attention,
        rope=f.rope(rope_dim, interleaved=bool(f.get("rope_interleave", True)) if v3 else True),
        gating=gating,
        intermediate_size=int(f.get("intermediate_size", 18432 if v3 else 11008)),
        shared_intermediate_size=int(f.get("n_shared_experts", 1 if v3 else 2)) * moe_inter,
        mlp_bias=bool(f.get("mlp_bias", False)) and not v3,
        sliding_windows=(None,) * num_layers,
    )


def _parse_qwen(f: _Fields) -> dict:
    """Qwen3-MoE (q/k norm, no qkv bias) and Qwen2-MoE (qkv bias, gated shared expert)."""
    q3 = f.model_type == "qwen3_moe"
    num_layers = int(f.get("num_hidden_layers"))
    heads = int(f.get("num_attention_heads"))
    head_dim = int(f.get("head_dim", int(f.get("hidden_size")) // heads))
    bias = bool(f.get("attention_bias", False)) if q3 else bool(f.get("qkv_bias", True))
    attention = AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=int(f.get("num_key_value_heads", 4 if q3 else 16)),
        head_dim=head_dim,
        qkv_bias=bias,
        o_bias=bias and q3,
        qk_norm=q3,
    )
    num_experts = int(f.get("num_experts", f.get("num_local_experts", 128 if q3 else 60)))
    dense = set(f.get("mlp_only_layers", []))
    step = int(f.get("decoder_sparse_step", 1))
    moe_layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    window = int(f.get("sliding_window", 4096)) if f.get("use_sliding_window", False) else None
    if q3:
        windows = (window,) * num_layers
    else:
        max_window_layers = int(f.get("max_window_layers", 28))
        types = f.get("layer_types", None) or [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    return dict(
        **f.common(eps=1e-6),
        num_experts=num_experts,
        top_k=int(f.get("num_experts_per_tok", 8 if q3 else 4)),
        moe_intermediate_size=int(f.get("moe_intermediate_size", 768 if q3 else 1408)),
        moe_layers=moe_layers,
        attention=attention,
        rope=f.rope(head_dim, interleaved=False),
        gating=GatingSpec("softmax_topk", norm_topk_prob=bool(f.get("norm_topk_prob", False))),
        intermediate_size=int(f.get("intermediate_size", 6144 if q3 else 5632)),
        shared_intermediate_size=0 if q3 else int(f.get("shared_expert_intermediate_size", 5632)),
        shared_expert_gate=not q3,
        sliding_windows=windows,
    )


def _parse_mixtral(f: _Fields) -> dict:
    """Mixtral: every layer MoE, softmax top-k always renormalised, no shared expert."""
    num_layers = int(f.get("num_hidden_layers"))
    heads = int(f.get("num_attention_heads"))
    head_dim = int(f.get("head_dim", int(f.get("hidden_size")) // heads))
    inter = int(f.get("intermediate_size", 14336))
    window = f.get("sliding_window", None)
    return dict(
        **f.common(eps=1e-5),
        num_experts=int(f.get("num_local_experts", 8)),
        top_k=int(f.get("num_experts_per_tok", 2)),
        moe_intermediate_size=inter,
        moe_layers=tuple(range(num_layers)),
        attention=AttentionSpec(
            kind="gqa",
            num_heads=heads,
            num_kv_heads=int(f.get("num_key_value_heads", 8)),
            head_dim=head_dim,
            qkv_bias=False,
            o_bias=False,
        ),
        rope=f.rope(head_dim, interleaved=False, default_theta=1e6),
        gating=GatingSpec("softmax_topk", norm_topk_prob=True),
        intermediate_size=inter,
        sliding_windows=(None if window is None else int(window),) * num_layers,
    )


_PARSERS = {
    "deepseek_v3": _parse_deepseek,
    "deepseek_v2": _parse_deepseek,
    "qwen3_moe": _parse_qwen,
    "qwen2_moe": _parse_qwen,
    "mixtral": _parse_mixtral,
}
