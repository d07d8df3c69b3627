"""Reading model folders: sharded checkpoints, both expert layouts, shards, and clear errors."""

import json
import shutil

import pytest
import torch
from hf_models import new_cache, our_model, prefill_logits, random_prompt, read_tensors
from safetensors.torch import save_file

from attention_worker.batch import StepBatch
from expert_worker.experts import ExpertShard
from moe_core.checkpoint import Checkpoint
from moe_core.errors import ModelNotFoundError, UnsupportedModelError
from moe_core.fp8 import quantize_tokens
from moe_core.naming import load_expert
from moe_core.spec import ModelSpec
from router.expert_backend import LocalExpertBackend
from router.model import load_model


def _write_sharded(src, dst, num_shards: int = 3):
    """The same tensors split over shards named by model.safetensors.index.json."""
    dst.mkdir()
    tensors = read_tensors(src)
    names = sorted(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({n: tensors[n] for n in part}, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_sharded_checkpoint_reads_like_one_file(checkpoints, tmp_path):
    single = checkpoints.get("qwen3_moe")
    sharded = _write_sharded(single, tmp_path / "sharded")
    one, many = Checkpoint(single), Checkpoint(sharded)
    assert many.names() == one.names()
    for name in one.names():
        assert torch.equal(many.load(name), one.load(name)), name
    prompt = random_prompt(9, seed=40)
    torch.testing.assert_close(
        prefill_logits(our_model(sharded), [prompt])[0],
        prefill_logits(our_model(single), [prompt])[0],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("name", ["deepseek_v3", "mixtral"])
def test_packed_and_per_expert_layouts_hold_the_same_experts(checkpoints, name):
    per_expert = Checkpoint(checkpoints.get(name))
    packed = Checkpoint(checkpoints.get(name, packed=True))
    spec = ModelSpec.from_dir(checkpoints.get(name))
    assert not any(n.endswith("gate_up_proj") for n in per_expert.names())
    assert any(n.endswith("gate_up_proj") for n in packed.names())
    for layer in spec.moe_layers:
        for expert in range(spec.num_experts):
            a = load_expert(per_expert, spec, layer, expert)
            b = load_expert(packed, spec, layer, expert)
            for part in ("gate", "up", "down"):
                assert torch.equal(getattr(a, part), getattr(b, part)), (layer, expert, part)


def test_shard_holds_only_its_experts_and_refuses_others(checkpoints):
    path = checkpoints.get("qwen3_moe", packed=True)
    spec = ModelSpec.from_dir(path)
    full = ExpertShard.load(path, range(spec.num_experts), "fp32", progress=False)
    shard = ExpertShard.load(path, [3, 1], "fp32", progress=False)
    assert shard.expert_ids == (1, 3)
    assert shard.resident_bytes() * spec.num_experts == full.resident_bytes() * 2
    layer, x = spec.moe_layers[0], torch.randn(4, spec.hidden_size)
    weights = torch.ones(4, 2)
    ids = torch.tensor([[1, 3], [3, -1], [-1, -1], [1, -1]])
    torch.testing.assert_close(
        shard.forward(layer, x, None, ids, weights), full.forward(layer, x, None, ids, weights)
    )
    assert shard.expert_load() == {1: 2, 3: 2}
    with pytest.raises(ValueError, match="= 2 is not held"):
        shard.forward(layer, x, None, torch.tensor([[1, 2]] * 4), weights)
    with pytest.raises(ValueError, match="not an MoE layer"):
        shard.forward(1, x, None, ids, weights)  # layer 1 is dense (mlp_only_layers)
    with pytest.raises(ValueError, match="take torch.float32 tokens"):
        shard.forward(layer, x.bfloat16(), None, ids, weights)
    fp8_shard = ExpertShard.load(path, [1, 3], "fp8", progress=False)
    x8, _ = quantize_tokens(x)
    with pytest.raises(ValueError, match="need x_scales"):
        fp8_shard.forward(layer, x8, None, ids, weights)
    with pytest.raises(ValueError, match="a local backend needs every expert"):
        LocalExpertBackend(shard)


def test_missing_folder_config_or_weights_is_not_found(checkpoints, tmp_path):
    missing = tmp_path / "nowhere"
    for load in (ModelSpec.from_dir, Checkpoint, lambda p: ExpertShard.load(p, [0], "fp32")):
        with pytest.raises(ModelNotFoundError, match="nowhere"):
            load(missing)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        ModelSpec.from_dir(no_config)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(checkpoints.get("mixtral") / "config.json", no_weights / "config.json")
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        Checkpoint(no_weights)


def test_missing_tensor_is_not_found_by_name(checkpoints, tmp_path):
    src = checkpoints.get("mixtral")
    dst = tmp_path / "partial"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = read_tensors(src)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"layers\.1\.post_attention_layernorm"):
        load_model(dst, experts=None)
    with pytest.raises(ModelNotFoundError, match=r"experts\.3\.w2"):
        ExpertShard.load(dst, [3], "fp32", progress=False)


def _config_with(checkpoints, tmp_path, **changes):
    config = json.loads((checkpoints.get("deepseek_v3") / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (dict(model_type=None), "model_type None is not supported"),
        (dict(hidden_size=None), "missing field 'hidden_size'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(num_experts_per_tok=40), "num_experts_per_tok 40 exceeds"),
        (dict(n_group=3), "do not split into n_group=3"),
        (dict(rope_parameters={"rope_type": "longrope"}), "rope type 'longrope'"),
        (dict(quantization_config={"quant_method": "gptq"}), "quant_method 'gptq'"),
    ],
)
def test_unsupported_or_invalid_config_names_the_field(checkpoints, tmp_path, changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelSpec.from_dir(_config_with(checkpoints, tmp_path, **changes))


def test_kv_cache_slots_and_lengths(checkpoints):
    model = our_model(checkpoints.get("deepseek_v3"))
    cache = new_cache(model, max_seqs=2, max_len=8)
    assert (cache.allocate(), cache.allocate(), cache.num_free) == (0, 1, 0)
    with pytest.raises(RuntimeError, match="full"):
        cache.allocate()
    cache.free(0)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(0)
    with pytest.raises(ValueError, match="not allocated"):
        model(StepBatch.build([(0, 0, [1, 2], False)], "cpu"), cache)
    with pytest.raises(ValueError, match="max_len is 8"):
        model(StepBatch.build([(1, 0, list(range(9)), False)], "cpu"), cache)
