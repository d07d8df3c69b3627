"""Decode steps replayed from CUDA graphs give the eager decode's logits, on the GPU.

The same bf16 model with FP8 experts (on one shard in process, or at two worker processes)
decodes the same tokens twice, once eagerly and once from captured graphs (padded batch and
cache-length buckets, the batch changing bucket midway), each on its own KV cache; the logits
agree within 1e-2 relative per step (bf16: a padded batch may take other GEMM kernels). With
the workers, the graphs copy each dispatch's tokens and top-k to pinned memory. A router process
on the GPU runs its decode steps from graphs by default, and says so in its metrics.
"""

from __future__ import annotations

import contextlib

import hf_models
import pytest
import torch
from remote_experts import remote_model
from test_metrics import Samples

from attention_worker.batch import StepBatch
from attention_worker.kv_cache import KVCache
from expert_worker.experts import ExpertShard
from moe_client import Client
from moe_cluster import LocalCluster
from moe_cluster.demo_model import write_demo_model
from moe_core.spec import ModelSpec
from router.decode_graphs import MIN_LENGTH, DecodeGraphs
from router.expert_backend import LocalExpertBackend
from router.model import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LENGTHS = (MIN_LENGTH - 4, 5, 17)
PROMPTS = [hf_models.random_prompt(n, seed=70 + n, vocab=256) for n in LENGTHS]
STEPS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo"))  # hidden 256, 16 experts


def _step(slots, tokens, cached):
    entries = [(s, c, [t], False) for s, t, c in zip(slots, tokens, cached, strict=True)]
    return StepBatch.build(entries, "cuda")


def _pick(live, *lists):
    return [[values[i] for i in live] for values in lists]


@contextlib.contextmanager
def _model(model_dir, backend: str, folder):
    """The bf16 model on the GPU with its FP8 experts in process, or at two worker processes on
    the GPU (then the graphs stage each dispatch's tokens in pinned memory)."""
    if backend == "remote":
        with remote_model(model_dir, folder, 2, "fp8", "cuda", torch.bfloat16) as model:
            yield model
        return
    experts = range(ModelSpec.from_dir(model_dir).num_experts)
    shard = ExpertShard.load(model_dir, experts, "fp8", device="cuda", progress=False)
    yield load_model(model_dir, LocalExpertBackend(shard), "cuda", torch.bfloat16)


@pytest.mark.parametrize("backend", ["local", "remote"])
@torch.inference_mode()
def test_graph_replays_give_the_eager_logits(model_dir, backend, tmp_path):
    with _model(model_dir, backend, tmp_path) as model:
        graphs = _decode_both(model)
        assert (graphs.staged is not None) == (backend == "remote")


def _decode_both(model) -> DecodeGraphs:
    spec = model.spec
    eager_cache = KVCache(spec, 3, 128, "cuda", torch.bfloat16)
    cache = KVCache(spec, 5, 128, "cuda", torch.bfloat16)
    graphs = DecodeGraphs(model, cache, max_batch=4)
    eager_slots = [eager_cache.allocate() for _ in PROMPTS]
    slots = [cache.allocate() for _ in PROMPTS]
    for c, s in ((eager_cache, eager_slots), (cache, slots)):
        prefill = [(x, 0, p, False) for x, p in zip(s, PROMPTS, strict=True)]
        first = model(StepBatch.build(prefill, "cuda"), c)
    tokens, cached, live = first.argmax(-1).tolist(), list(LENGTHS), [0, 1, 2]
    for step in range(STEPS):
        if step == STEPS // 2:
            live = [0, 2]
        want = model(_step(*_pick(live, eager_slots, tokens, cached)), eager_cache)
        batch = _step(*_pick(live, slots, tokens, cached))
        assert graphs.accepts(batch)
        got = graphs.forward(batch)
        error = ((got - want).norm() / want.norm()).item()
        assert error <= 1e-2, f"step {step}: relative difference {error:.2e}"
        for i, token in zip(live, want.argmax(-1).tolist(), strict=True):
            tokens[i], cached[i] = token, cached[i] + 1
    assert graphs.failed is None
    assert set(graphs.buckets) == {(4, MIN_LENGTH), (4, 2 * MIN_LENGTH), (2, 2 * MIN_LENGTH)}
    for bucket in graphs.buckets.values():
        assert all(segment.graph is not None for segment in bucket.in_order())
    return graphs


def test_a_router_on_the_gpu_decodes_from_graphs(model_dir):
    args = ("--max-batch-size", "4", "--max-seq-len", "64")
    with (
        LocalCluster(model_dir, workers=1, precision="fp8", device="cuda", router_args=args) as c,
        Client(c.address, timeout=300) as client,
    ):
        tokens = [client.generate(token_ids=p[:20], max_new_tokens=12).token_ids for p in PROMPTS]
        metrics = Samples(c.router.metrics_url)
    assert all(len(t) == 12 for t in tokens)
    assert metrics.get("moe_router_graph_steps_total") >= 3 * 11
    assert metrics.get("moe_router_graph_captures_total") >= 1
