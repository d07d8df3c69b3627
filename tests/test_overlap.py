"""Micro-batch overlap: the split changes nothing in the results, and the policy splits only when
the measured times say it pays."""

from __future__ import annotations

import threading

import hf_models
import pytest
import torch
from test_metrics import Samples

from attention_worker.batch import StepBatch
from moe_client import Client
from moe_cluster import LocalCluster
from router.expert_backend import ExpertsUnavailableError
from router.model import MoELayer
from router.overlap import OverlapPolicy, split_evenly

PROMPTS = [hf_models.random_prompt(n, seed=s) for n, s in ((7, 21), (3, 22), (12, 23), (5, 24))]


def test_split_evenly_balances_tokens_and_keeps_every_part_non_empty():
    assert split_evenly([1] * 8, 2) == [4, 4]
    assert split_evenly([1] * 7, 3) == [3, 2, 2]
    assert split_evenly([100, 1, 1, 1], 2) == [1, 3]
    assert split_evenly([1, 1, 1, 100], 2) == [3, 1]
    assert split_evenly([10, 10, 1, 1], 2) == [2, 2]
    assert split_evenly([5], 3) == [1]
    assert split_evenly([3, 3], 4) == [1, 1]


def test_the_policy_measures_unsplit_then_splits_only_when_waiting_and_computing_both_cost():
    policy = OverlapPolicy(moe_layers=4, refresh_steps=3)
    assert policy.choose(num_seqs=64, num_tokens=64) == 1  # nothing measured yet
    policy.record(64, 1, step_s=0.100, wait_s=0.050)  # half the step waits for the workers
    assert policy.choose(64, 64) >= 2
    assert policy.choose(64, 300) == 1  # another step size: measured on its own
    assert policy.choose(1, 64) == 1  # one sequence cannot be split
    for _ in range(2):
        policy.choose(64, 64)
    assert policy.choose(64, 64) == 1  # refresh_steps later: measured unsplit again
    policy.record(64, 1, step_s=0.100, wait_s=0.0005)  # the workers answer at once now
    for _ in range(10):
        policy.record(64, 1, step_s=0.100, wait_s=0.0005)
    assert policy.choose(64, 64) == 1  # a split would only add calls
    assert OverlapPolicy(moe_layers=4, fixed=3).choose(8, 8) == 3
    assert OverlapPolicy(moe_layers=4, fixed=3).choose(2, 8) == 2


def test_a_split_that_measures_slower_than_predicted_is_dropped():
    """Router and workers on the same cores: the model expects overlap, nothing runs at once."""
    policy = OverlapPolicy(moe_layers=4, refresh_steps=100)
    policy.record(64, 1, step_s=0.100, wait_s=0.050)
    tried = []
    for _ in range(6):
        n = policy.choose(64, 64)
        tried.append(n)
        policy.record(64, n, step_s=0.100 if n == 1 else 0.150, wait_s=0.0)
    assert tried[0] > 1  # the prediction favours a split, so it is tried
    assert tried[-2:] == [1, 1]  # and each split, once measured slower, is dropped
    assert len(set(tried[:-2])) == len(tried[:-2])  # none is tried twice


def _entries(cache, prompts):
    return [(cache.allocate(), 0, prompt, True) for prompt in prompts]


def test_overlapped_micro_batches_give_the_logits_of_one_batch(checkpoints):
    model = hf_models.our_model(checkpoints.get("deepseek_v3"))
    cache = hf_models.new_cache(model, max_seqs=8)
    with torch.no_grad():
        whole = model(StepBatch.build(_entries(cache, PROMPTS), "cpu"), cache)
        entries = _entries(cache, PROMPTS)
        batches = [StepBatch.build(entries[:1], "cpu"), StepBatch.build(entries[1:], "cpu")]
        parts, dropped = model.forward_overlapped(batches, cache)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-5)
    assert dropped == [{}, {}]


class _LosesExpertZero:
    """A backend that, like a remote one without a worker for expert 0, refuses tokens that
    chose it (policy fail)."""

    staged_precision = None  # takes the top-k where it is

    def __init__(self, inner) -> None:
        self.inner = inner

    def dispatch(self, layer, x, topk_ids, topk_weights):
        rows = (topk_ids == 0).any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            raise ExpertsUnavailableError(layer, [0], rows)
        return self.inner.dispatch(layer, x, topk_ids, topk_weights)

    def combine(self, handle):
        return self.inner.combine(handle)

    def take_dropped(self):
        return {}

    def take_wait_seconds(self):
        return 0.0


def test_a_lost_expert_names_rows_of_the_whole_step(checkpoints):
    model = hf_models.our_model(checkpoints.get("deepseek_v3"))
    cache = hf_models.new_cache(model, max_seqs=8)
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.experts = _LosesExpertZero(layer.experts)
    model.experts = _LosesExpertZero(model.experts)
    entries = _entries(cache, PROMPTS)
    with torch.no_grad(), pytest.raises(ExpertsUnavailableError) as whole:
        model(StepBatch.build(entries, "cpu"), cache)
    entries = _entries(cache, PROMPTS)
    batches = [StepBatch.build(entries[:2], "cpu"), StepBatch.build(entries[2:], "cpu")]
    with torch.no_grad(), pytest.raises(ExpertsUnavailableError) as split:
        model.forward_overlapped(batches, cache)
    # the first layer where a token chose expert 0: the same rows of the step either way
    assert whole.value.layer == split.value.layer
    first = set(whole.value.rows.tolist())
    assert set(split.value.rows.tolist()) <= first  # the micro-batch that hit it first
    assert split.value.rows.max() < sum(len(p) for p in PROMPTS)


def test_a_cluster_that_splits_every_step_answers_as_one_that_never_does(checkpoints):
    model_dir = checkpoints.get("deepseek_v3")
    args = ("--max-batch-size", "8", "--max-seq-len", "64")
    results = {}
    for parts in ("1", "2"):
        with (
            LocalCluster(
                model_dir,
                workers=2,
                precision="fp32",
                router_args=(*args, "--micro-batches", parts),
            ) as cluster,
            Client(cluster.address, timeout=120) as client,
        ):
            outputs = [None] * len(PROMPTS)

            def run(i: int, outputs: list = outputs) -> None:
                outputs[i] = client.generate(token_ids=PROMPTS[i], max_new_tokens=8).token_ids

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            results[parts] = outputs
            steps = Samples(cluster.router.metrics_url).by(
                "moe_router_step_micro_batches_total", "micro_batches"
            )
            assert (steps.get("2", 0) > 0) == (parts == "2"), steps
    assert results["1"] == results["2"]
