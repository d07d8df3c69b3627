"""The step profiler (`moe-router serve --profile-steps`): per-phase times of real steps.

In process, on a tiny DeepSeek-V3 model (a dense first layer, shared experts): a prefill and a
decode step each report every phase, the phases that ran took time, nested phases are exclusive,
and without a profiler nothing is timed. On a real cluster, the router exports the phases (and
the workers' compute) as Prometheus counters by step kind.
"""

from __future__ import annotations

import time
import urllib.request

import hf_models
import pytest
from prometheus_client.parser import text_string_to_metric_families

from attention_worker.batch import StepBatch
from moe_client import Client
from moe_cluster import LocalCluster
from router.metrics import RouterMetrics
from router.profiler import INFO, PHASES, StepProfiler

RAN = ("embed", "attention", "dense_mlp", "gating", "dispatch", "shared_experts", "experts")
RAN += ("combine", "lm_head")


def test_prefill_and_decode_steps_report_every_phase(checkpoints):
    model = hf_models.our_model(checkpoints.get("deepseek_v3"))
    steps = []
    model.set_profiler(StepProfiler("cpu", lambda *step: steps.append(step)))
    cache = hf_models.new_cache(model, max_seqs=2, max_len=32)
    a, b = cache.allocate(), cache.allocate()
    model(StepBatch.build([(a, 0, [1, 2, 3], False), (b, 0, [4, 5], False)], "cpu"), cache)
    with model.phase("sampling"):
        time.sleep(0.002)
    model.finish_step()
    model(StepBatch.build([(a, 3, [7], False), (b, 2, [8], False)], "cpu"), cache)
    model.finish_step()
    assert [kind for kind, _, _ in steps] == ["prefill", "decode"]
    for kind, phases, total in steps:
        assert set(phases) == set(PHASES + INFO), kind
        assert all(phases[name] > 0 for name in RAN), (kind, phases)
        assert phases["worker_compute"] == 0  # in-process experts: no worker
        assert sum(phases[name] for name in PHASES) <= total
    assert steps[0][1]["sampling"] >= 0.002 and steps[1][1]["sampling"] == 0

    model.set_profiler(None)  # off: a step records nothing
    model(StepBatch.build([(a, 4, [9], False)], "cpu"), cache)
    model.finish_step()
    assert len(steps) == 2


def test_nested_phases_are_exclusive():
    steps = []
    profiler = StepProfiler("cpu", lambda *step: steps.append(step))
    profiler.start_step(decode=True)
    with profiler.phase("combine"):
        time.sleep(0.02)
        with profiler.phase("experts"):
            time.sleep(0.2)
    profiler.add_info("worker_compute", 0.01)
    profiler.finish_step()
    ((kind, phases, total),) = steps
    assert kind == "decode" and total >= 0.22
    # combine counts its own 0.02 s, not the nested 0.2 s (sleeps may overshoot on a busy machine)
    assert 0.02 <= phases["combine"] < 0.12
    assert 0.2 <= phases["experts"] < 0.3
    assert phases["worker_compute"] == 0.01
    with pytest.raises(ValueError, match="unknown phase"), profiler.phase("transport"):
        pass
    profiler.finish_step()  # no step open: nothing reported
    assert len(steps) == 1


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_profiled_router_exports_phases_by_step_kind(checkpoints):
    """A second router (`LocalCluster.add_router`) with --profile-steps on the same worker."""
    new_tokens = 5
    with LocalCluster(
        checkpoints.get("deepseek_v3"),
        workers=1,
        precision="fp32",
        router_args=("--max-batch-size", "4", "--max-seq-len", "64"),
    ) as cluster:
        profiled = cluster.add_router("router-profiled", ("--profile-steps",))
        prompt = hf_models.random_prompt(6, seed=1)
        for router in (cluster.router, profiled):
            with Client(router.address, timeout=120) as client:
                client.generate(token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)
        plain = _samples(cluster.router.metrics_url)
        samples = _samples(profiled.metrics_url)
    assert profiled.popen.poll() is not None  # stopped with the cluster
    profile_names = ("moe_router_profiled", "moe_router_step_phase")
    assert not [key for key in plain if key[0].startswith(profile_names)]  # only with the flag

    def get(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert get("moe_router_profiled_steps_total", step="prefill") == 1
    assert get("moe_router_profiled_steps_total", step="decode") == new_tokens - 1
    for kind in ("prefill", "decode"):
        total = get("moe_router_profiled_step_seconds_total", step=kind)
        phases = {p: get("moe_router_step_phase_seconds_total", phase=p, step=kind) for p in PHASES}
        assert all(phases[p] > 0 for p in RAN), (kind, phases)
        assert 0 < sum(phases.values()) <= total
        # the worker's own compute is part of the wait for it
        compute = get("moe_router_step_phase_seconds_total", phase="worker_compute", step=kind)
        assert compute > 0


def test_profile_metrics_start_empty():
    metrics = RouterMetrics([1], 4)
    assert (
        metrics.registry.get_sample_value("moe_router_profiled_steps_total", {"step": "decode"})
        is None
    )
    metrics.record_profile("decode", dict.fromkeys(PHASES + INFO, 0.5), 3.0)
    value = metrics.registry.get_sample_value
    assert value("moe_router_profiled_steps_total", {"step": "decode"}) == 1
    assert (
        value("moe_router_step_phase_seconds_total", {"phase": "experts", "step": "decode"}) == 0.5
    )
    assert value("moe_router_profiled_step_seconds_total", {"step": "decode"}) == 3.0
