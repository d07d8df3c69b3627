"""Tiny random Hugging Face checkpoints, and helpers that run them and our model side by side.

Each model is built with transformers from a fixed seed and saved in a folder; the same seed gives
byte-identical weights, so the per-expert and packed layouts of a model hold the same numbers.
`write_deepseek_fp8_checkpoint` is our own DeepSeek-V3 FP8 converter (transformers cannot quantize
on CPU) and `write_dequantized_checkpoint` writes the float32 model that an FP8 checkpoint stands
for, which is what the HF reference runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8_MAX = 448.0
BLOCK = 128

EXPERT_WEIGHT_SCALE = 2.5
_COMMON = dict(vocab_size=320, max_position_embeddings=256, initializer_range=0.02)

# name -> (transformers class names, config kwargs)
MODELS: dict[str, tuple[str, str, dict]] = {
    # MLA with q_lora, group-limited sigmoid routing with a bias, a dense first layer
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=112,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
    ),
    # no q_lora, YaRN (cos/sin scaled by mscale(factor), softmax scale by mscale_all_dim),
    # written with the old rope_theta/rope_scaling fields
    "deepseek_v3_yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=24,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                mscale_all_dim=0.8,
                beta_fast=32,
                beta_slow=1,
            ),
        ),
    ),
    # DeepSeek-V2: softmax group_limited_greedy routing, MLP biases, complex-number rope
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            n_routed_experts=16,
            n_shared_experts=2,
            num_experts_per_tok=3,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            mlp_bias=True,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
    ),
    # q/k norm, head_dim != hidden / heads, renormalised top-k, a dense layer via mlp_only_layers
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
    # qkv bias, a gated shared expert, top-k not renormalised, tied embeddings
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
    ),
    # sliding window attention shorter than the test sequences
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=6,
        ),
    ),
    # FP8 source: sizes that are not multiples of 128, so FP8 blocks are partial at the edges
    "deepseek_v3_fp8src": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            hidden_size=160,
            intermediate_size=200,
            moe_intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=144,
            kv_lora_rank=136,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        ),
    ),
}


def build_model(name: str, dst: Path, packed: bool = False, seed: int = 0) -> Path:
    """Saves tiny model `name` in dst (per-expert tensors, or packed 3-D with packed=True)."""
    import transformers

    config_cls, model_cls, kwargs = MODELS[name]
    config = getattr(transformers, config_cls)(**_COMMON, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # a non-zero DeepSeek-V3 selection bias
                bias.copy_(torch.rand(bias.shape, generator=gen) * 0.1)
            if module_name.endswith(".experts"):  # routed experts move logits well above 1e-3
                for param in module.parameters():
                    param.mul_(EXPERT_WEIGHT_SCALE)
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias"):  # transformers initialises biases to zero
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(dst, save_original_format=not packed)
    if name == "deepseek_v3_yarn":
        _write_old_rope_fields(dst / "config.json")
    return dst


def _write_old_rope_fields(path: Path) -> None:
    """rope_parameters -> rope_theta + rope_scaling {type: ...}, as older checkpoints spell it."""
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config, indent=2))


def load_hf(model_dir: Path):
    """The float32 eager reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
    ).eval()


def our_model(model_dir: Path, precision: str = "fp32", dtype: torch.dtype = torch.float32):
    """Our model with every routed expert in one in-process shard."""
    from expert_worker.experts import ExpertShard
    from moe_core.spec import ModelSpec
    from router.expert_backend import LocalExpertBackend
    from router.model import load_model

    spec = ModelSpec.from_dir(model_dir)
    shard = ExpertShard.load(model_dir, range(spec.num_experts), precision, progress=False)
    return load_model(model_dir, LocalExpertBackend(shard), dtype=dtype)


def new_cache(model, max_seqs: int = 4, max_len: int = 64):
    from attention_worker.kv_cache import KVCache

    return KVCache(model.spec, max_seqs, max_len, "cpu", model.dtype)


def prefill_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts in one step, every row's logits: one [len, V] tensor per prompt."""
    from attention_worker.batch import StepBatch

    cache = new_cache(model, max_seqs=len(prompts))
    seqs = [(cache.allocate(), 0, prompt, True) for prompt in prompts]
    logits = model(StepBatch.build(seqs, "cpu"), cache)
    return list(logits.split([len(p) for p in prompts]))


def our_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Prefill, then one decode step per token through the KV cache: (tokens, [steps, V])."""
    from attention_worker.batch import StepBatch

    cache = new_cache(model, max_seqs=1, max_len=len(prompt) + steps)
    slot = cache.allocate()
    logits = model(StepBatch.build([(slot, 0, prompt, False)], "cpu"), cache)[-1]
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
        step = [(slot, len(prompt) + len(tokens) - 1, tokens[-1:], False)]
        logits = model(StepBatch.build(step, "cpu"), cache)[-1]
    return tokens, torch.stack(all_logits)


@torch.no_grad()
def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([prompt])).logits[0]  # [len, V]


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers' cached greedy decoding, written out: (tokens, [steps, V])."""
    out = hf(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens, all_logits = [], []
    for _ in range(steps):
        logits = out.logits[0, -1]
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
        out = hf(input_ids=torch.tensor([tokens[-1:]]), cache=out.cache, use_cache=True)
    return tokens, torch.stack(all_logits)


def random_prompt(length: int, seed: int, vocab: int = _COMMON["vocab_size"]) -> list[int]:
    return torch.randint(
        0, vocab, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def agreement(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """Over rows of [N, V] logits: (top-1 agreement, relative logit error ||ours - ref|| / ||ref||,
    median of the same error per row). Rows where a routing decision flipped dominate the
    overall error; the median shows the error of the rest."""
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    per_row = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
    return top1, ((ours - ref).norm() / ref.norm()).item(), per_row.median().item()


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = f.keys()
        return {name: f.get_tensor(name) for name in names}


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Every Linear weight of the decoder layers except the router `mlp.gate`."""
    return (
        name.startswith("model.layers.")
        and name.endswith("proj.weight")
        and tensor.dim() == 2
        and not name.endswith("mlp.gate.weight")
    )


def quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to 128, s = amax / 448 per block, divide, clamp, cast, crop: (w8, s)."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    scales = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX  # [nb, kb]
    q = (blocks / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w8 = q.view(nb * BLOCK, kb * BLOCK)[:n, :k].to(torch.float8_e4m3fn).contiguous()
    return w8, scales


def dequantize_reference(w8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[i, j] = W8[i, j] * s[i // 128, j // 128], written with index arithmetic."""
    rows = torch.arange(w8.shape[0]) // BLOCK
    cols = torch.arange(w8.shape[1]) // BLOCK
    return w8.float() * scales.float()[rows][:, cols]


def write_deepseek_fp8_checkpoint(src_dir: Path, dst_dir: Path) -> Path:
    """DeepSeek-V3 FP8 layout: quantized Linear weights + `weight_scale_inv`; embed, lm_head and
    norms in bf16; router weights in bf16 and the selection bias in float32."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, tensor in read_tensors(src_dir).items():
        if _is_quantized(name, tensor):
            out[name], out[name + "_scale_inv"] = quantize_reference(tensor)
        elif name.endswith("e_score_correction_bias"):
            out[name] = tensor.float()
        else:
            out[name] = tensor.to(torch.bfloat16)
    save_file(out, dst_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    config["dtype"] = "bfloat16"
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_generation_config(src_dir, dst_dir)
    return dst_dir


def write_dequantized_checkpoint(fp8_dir: Path, dst_dir: Path) -> Path:
    """The float32 model an FP8 checkpoint stands for (no quantization_config): HF's input."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    tensors = read_tensors(fp8_dir)
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scales = tensors.get(name + "_scale_inv")
        out[name] = tensor.float() if scales is None else dequantize_reference(tensor, scales)
    save_file(out, dst_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    config["dtype"] = "float32"
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_generation_config(fp8_dir, dst_dir)
    return dst_dir


def _copy_generation_config(src_dir: Path, dst_dir: Path) -> None:
    if (src_dir / "generation_config.json").is_file():
        shutil.copy(src_dir / "generation_config.json", dst_dir / "generation_config.json")
