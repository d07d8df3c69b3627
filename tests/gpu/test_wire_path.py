"""The transport's GPU paths: pinned staging, the CPU-side routing plan, raw-bytes Forward.

A worker plans a batch on the CPU (its ids arrive there) and must compute what it computes from
ids on the GPU (to float32 rounding: the kernel adds the experts' rows atomically); a 2-worker
fp8 cluster on the GPU (router and workers on cuda, CUDA kernels) must give the logits of the same
model run in process, within 1e-3 relative (measured on an H100: 0; rows misplaced by the wire
path would differ by about 1).
"""

from __future__ import annotations

import hf_models
import pytest
import torch
from native_lib import require_native

from attention_worker.batch import StepBatch
from attention_worker.kv_cache import KVCache
from expert_worker.experts import ExpertShard
from moe_client import Client
from moe_cluster import LocalCluster
from moe_cluster.demo_model import write_demo_model
from moe_core.fp8 import quantize_tokens
from moe_core.spec import ModelSpec
from router.expert_backend import LocalExpertBackend
from router.model import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [hf_models.random_prompt(20, seed=s, vocab=256) for s in (40, 41, 42)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo"))  # hidden 256, 16 experts


def test_cpu_plan_computes_what_the_gpu_plan_computes(model):
    held = [0, 3, 4, 7, 12]
    shard = ExpertShard.load(model, held, "fp8", device="cuda", progress=False)
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 33, 700):
        x8, scales = (t.cuda() for t in quantize_tokens(torch.randn(tokens, 256, generator=gen)))
        ids = torch.tensor(held)[torch.randint(0, len(held), (tokens, 3), generator=gen)]
        ids[0, 1] = -1
        weights = torch.rand(tokens, 3, generator=gen)
        layer = shard.spec.moe_layers[-1]
        on_cpu = shard.forward(layer, x8, scales, ids, weights)
        on_gpu = shard.forward(layer, x8, scales, ids.cuda(), weights.cuda())
        assert on_cpu.device.type == "cuda"
        # the same plan; only the order of the kernel's atomic adds across experts may differ
        error = ((on_cpu - on_gpu).norm() / on_gpu.norm()).item()
        assert error <= 1e-6, (tokens, error)


def _in_process_logits(model_dir) -> torch.Tensor:
    spec = ModelSpec.from_dir(model_dir)
    shard = ExpertShard.load(
        model_dir, range(spec.num_experts), "fp8", device="cuda", progress=False
    )
    ours = load_model(model_dir, LocalExpertBackend(shard), "cuda", torch.bfloat16)
    cache = KVCache(spec, len(PROMPTS), 64, "cuda", torch.bfloat16)
    seqs = [(cache.allocate(), 0, prompt, True) for prompt in PROMPTS]
    return ours(StepBatch.build(seqs, "cuda"), cache).float().cpu()


SENDERS = {  # the router's arguments for each way of sending its calls
    "loop": (),
    "forwarders": ("--forwarders", "2", "--forwarder-min-mib", "0"),
    "native": ("--transport", "native"),
    "native x2": ("--transport", "native", "--worker-connections", "2"),
}


@pytest.mark.parametrize(
    ("sender", "fronts"),
    [("loop", 0), ("forwarders", 0), ("forwarders", 2), ("native", 0), ("native x2", 2)],
)
def test_fp8_cluster_on_the_gpu_gives_the_in_process_logits(model, sender, fronts):
    """forwarders: the rows travel through the pinned arena shared with forwarder processes
    (device <-> arena by DMA, the arena's blocks reused across layers and steps); native: through
    the native client's pinned arena, sent and received by gRPC C++; fronts 2: on the workers'
    side too, through the fronts' arenas that the workers pin."""
    if sender.startswith("native"):
        require_native()
    args = ("--max-batch-size", "4", "--max-seq-len", "64", *SENDERS[sender])
    with (
        LocalCluster(
            model,
            workers=2,
            precision="fp8",
            device="cuda",
            router_args=args,
            worker_args=("--fronts", str(fronts)),
        ) as c,
        Client(c.address, timeout=300) as client,
    ):
        got = torch.cat([torch.from_numpy(client.logits(p)) for p in PROMPTS])
        tokens = [client.generate(token_ids=p, max_new_tokens=16).token_ids for p in PROMPTS]
        again = torch.cat([torch.from_numpy(client.logits(p)) for p in PROMPTS])
    want = _in_process_logits(model)
    error = ((got - want).norm() / want.norm()).item()
    print(f"\nfp8 cluster on cuda vs in process: relative logit difference {error:.1e}")
    assert error <= 1e-3
    assert torch.equal(again, got)  # after 48 decode steps through reused memory
    assert all(len(t) == 16 for t in tokens)
