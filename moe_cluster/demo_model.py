"""The small built-in demo model: a random DeepSeek-V3-architecture checkpoint with a tokenizer.

Written deterministically from a seed, without transformers: `config.json` in the Hugging Face
format, `model.safetensors` (bfloat16 weights, std 0.02, per-expert tensors as on the hub) and a
byte-level `tokenizer.json`. The weights are random, so the text it generates is noise; the demo
shows the cluster working, not a language model. The output head's rows of the tokens other than
printable ASCII are zero, so that this noise streams as readable characters.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
NUM_BYTES = 256  # one token per byte, then the two special tokens
DEMO_SEED = 0
DEMO_VERSION = "2"  # bump when the weights written for DEMO_SEED change: cached copies rebuild
_VERSION_FILE = ".demo-version"


def demo_config() -> dict:
    """config.json of the demo model (hidden 256, 4 layers, 16 routed experts top-4)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": NUM_BYTES + 2,
        "bos_token_id": NUM_BYTES,
        "eos_token_id": NUM_BYTES + 1,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rope_interleave": True,
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "num_nextn_predict_layers": 0,
        "torch_dtype": "bfloat16",
    }


def demo_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights (normal, std 0.02) for `config`, named as in the Hugging Face checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    c = config
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    tensors: dict[str, torch.Tensor] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        w = torch.randn(out_features, in_features, generator=gen) * c["initializer_range"]
        tensors[f"{name}.weight"] = w.to(torch.bfloat16)

    def norm(name: str, size: int) -> None:
        tensors[f"{name}.weight"] = torch.ones(size, dtype=torch.bfloat16)

    def mlp(name: str, inner: int) -> None:
        linear(f"{name}.gate_proj", inner, hidden)
        linear(f"{name}.up_proj", inner, hidden)
        linear(f"{name}.down_proj", hidden, inner)

    linear("model.embed_tokens", c["vocab_size"], hidden)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        norm(f"{p}.input_layernorm", hidden)
        norm(f"{p}.post_attention_layernorm", hidden)
        a = f"{p}.self_attn"
        linear(f"{a}.q_a_proj", c["q_lora_rank"], hidden)
        norm(f"{a}.q_a_layernorm", c["q_lora_rank"])
        linear(f"{a}.q_b_proj", heads * qk_head, c["q_lora_rank"])
        linear(f"{a}.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden)
        norm(f"{a}.kv_a_layernorm", c["kv_lora_rank"])
        kv_head = c["qk_nope_head_dim"] + c["v_head_dim"]
        linear(f"{a}.kv_b_proj", heads * kv_head, c["kv_lora_rank"])
        linear(f"{a}.o_proj", hidden, heads * c["v_head_dim"])
        if layer < c["first_k_dense_replace"]:
            mlp(f"{p}.mlp", c["intermediate_size"])
            continue
        experts, inner = c["n_routed_experts"], c["moe_intermediate_size"]
        linear(f"{p}.mlp.gate", experts, hidden)
        # a visible selection-only bias, so that the demo exercises DeepSeek-V3's noaux_tc routing
        bias = torch.randn(experts, generator=gen) * 0.05
        tensors[f"{p}.mlp.gate.e_score_correction_bias"] = bias.float()
        for expert in range(experts):
            mlp(f"{p}.mlp.experts.{expert}", inner)
        mlp(f"{p}.mlp.shared_experts", inner * c["n_shared_experts"])
    norm("model.norm", hidden)
    linear("lm_head", c["vocab_size"], hidden)
    printable = torch.zeros(c["vocab_size"], 1, dtype=torch.bfloat16)
    printable[ord(" ") : ord("~") + 1] = 1
    tensors["lm_head.weight"] *= printable
    return tensors


def demo_tokenizer() -> tokenizers.Tokenizer:
    """Byte-level tokenizer: ids 0-255 are the bytes, then BOS and EOS; no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # one printable stand-in char per byte
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    return tokenizer


def _byte_of(char: str) -> int:
    """The byte that ByteLevel's printable stand-in char represents (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def write_demo_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes config.json, model.safetensors and tokenizer.json of the demo model to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config()
    save_file(demo_tensors(config, seed), str(out / "model.safetensors"), {"format": "pt"})
    demo_tokenizer().save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def cache_root() -> Path:
    """`$MOE_CLUSTER_CACHE`, or ~/.cache/moe-cluster."""
    env = os.environ.get("MOE_CLUSTER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moe-cluster"


def ensure_demo_model(root: str | Path | None = None) -> Path:
    """The demo model folder under the cache root, written first if missing or out of date."""
    target = (Path(root) if root is not None else cache_root()) / "demo-model"
    version = target / _VERSION_FILE
    if version.is_file() and version.read_text() == DEMO_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: a reader never sees a half-written model
    staging = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=target.parent))
    try:
        write_demo_model(staging, DEMO_SEED)
        (staging / _VERSION_FILE).write_text(DEMO_VERSION)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
