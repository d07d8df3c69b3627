"""Decode steps through the graph runner's padded segments give the plain forward's logits.

On a CPU the runner runs its segments without capturing them (`capture=False`): the padding
(batch and cache-length buckets, the spare KV slot), the segment boundaries around each MoE
dispatch and the static buffers are the same code that a GPU captures
(tests/gpu/test_decode_graphs.py captures them).
"""

from __future__ import annotations

import hf_models
import pytest
import torch
from remote_experts import remote_model

from attention_worker.batch import StepBatch
from moe_core.precision import Precision
from router.decode_graphs import MIN_LENGTH, DecodeGraphs, bucket, cache_and_graphs
from router.dispatch import RemoteExpertBackend, WireTokens

# 3 sequences (padded to 4), the first one crossing the first cache-length bucket while decoding
PROMPTS = [hf_models.random_prompt(n, seed=s) for n, s in ((MIN_LENGTH - 3, 61), (3, 62), (9, 63))]
STEPS = 8


def test_buckets_are_powers_of_two_within_the_limit():
    assert [bucket(n, 256) for n in (1, 2, 3, 4, 5, 64, 65, 256)] == [1, 2, 4, 4, 8, 64, 128, 256]
    assert bucket(5, 6) == 6  # never past the limit
    assert bucket(3, 4096, MIN_LENGTH) == MIN_LENGTH
    assert bucket(MIN_LENGTH + 1, 100, MIN_LENGTH) == 100


def _decode(model, cache, slots, tokens, cached):
    return StepBatch.build(
        [(slot, c, [t], False) for slot, c, t in zip(slots, cached, tokens, strict=True)], "cpu"
    )


def _decode_against_plain(model, graphs, cache, plain_cache) -> None:
    """Prefills PROMPTS on both caches, then decodes STEPS greedy steps from the graph runner
    and from the plain forward, comparing logits; checks the buckets used and the KV cache."""
    plain_slots = [plain_cache.allocate() for _ in PROMPTS]
    slots = [cache.allocate() for _ in PROMPTS]
    assert graphs.spare not in slots

    prefill = [(s, 0, p, False) for s, p in zip(slots, PROMPTS, strict=True)]
    batch = StepBatch.build(prefill, "cpu")
    assert not graphs.accepts(batch)  # a prefill step runs eagerly
    first = graphs.forward(batch)
    plain_prefill = [(s, 0, p, False) for s, p in zip(plain_slots, PROMPTS, strict=True)]
    torch.testing.assert_close(first, model(StepBatch.build(plain_prefill, "cpu"), plain_cache))

    live = [0, 1, 2]
    tokens = first.argmax(-1).tolist()
    cached = [len(p) for p in PROMPTS]
    for step in range(STEPS):
        if step == STEPS // 2:
            live = [0, 2]  # a sequence finished: the batch drops to another bucket
        batch = _decode(
            model,
            cache,
            [slots[i] for i in live],
            [tokens[i] for i in live],
            [cached[i] for i in live],
        )
        assert graphs.accepts(batch)
        got = graphs.forward(batch)
        want = model(
            _decode(
                model,
                plain_cache,
                [plain_slots[i] for i in live],
                [tokens[i] for i in live],
                [cached[i] for i in live],
            ),
            plain_cache,
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for i, token in zip(live, want.argmax(-1).tolist(), strict=True):
            tokens[i] = token
            cached[i] += 1
    assert set(graphs.buckets) == {(4, MIN_LENGTH), (4, 2 * MIN_LENGTH), (2, 2 * MIN_LENGTH)}
    # every real slot holds the keys the plain forward wrote; padding wrote only the spare slot
    pairs = zip(sum(cache.layers, ()), sum(plain_cache.layers, ()), strict=True)
    for ours, theirs in pairs:  # [slots, max_len, ...] each
        for i in range(len(PROMPTS)):
            torch.testing.assert_close(
                ours[slots[i]][: cached[i]], theirs[plain_slots[i]][: cached[i]]
            )
            assert not ours[slots[i]][cached[i] :].any()


# deepseek_v3: MLA, a dense first layer, shared experts; qwen2_moe: a gated shared expert, a
# dense layer between MoE layers; mixtral: GQA, a sliding window, no shared experts
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_padded_segments_give_the_plain_decode_logits(tmp_path, name):
    model = hf_models.our_model(hf_models.build_model(name, tmp_path / name))
    plain_cache = hf_models.new_cache(model, max_seqs=3, max_len=128)
    cache = hf_models.new_cache(model, max_seqs=5, max_len=128)
    graphs = DecodeGraphs(model, cache, max_batch=4, capture=False)
    assert cache.num_free == 4  # the spare slot for padding rows is taken
    assert graphs.staged is None  # the local backend takes the tokens on the device
    _decode_against_plain(model, graphs, cache, plain_cache)


@pytest.mark.parametrize(("precision", "forwarders"), [("fp8", 0), ("bf16", 0), ("fp8", 2)])
def test_segments_stage_the_remote_dispatch_and_give_the_plain_logits(
    tmp_path, precision, forwarders
):
    """With experts at worker processes the segments write each MoE layer's tokens in the wire
    format (fp8: with their scales) and its top-k to host memory, and dispatch sends those (on
    the event loop, or from the forwarders' shared arena): the logits are those of the plain
    forward through the same workers."""
    model_dir = hf_models.build_model("deepseek_v3", tmp_path / "m")
    with remote_model(model_dir, tmp_path, 2, precision, forwarders=forwarders) as model:
        assert model.experts.staged_precision == Precision(precision)
        plain_cache = hf_models.new_cache(model, max_seqs=3, max_len=128)
        cache = hf_models.new_cache(model, max_seqs=5, max_len=128)
        graphs = DecodeGraphs(model, cache, max_batch=4, capture=False)
        assert graphs.staged is not None
        _decode_against_plain(model, graphs, cache, plain_cache)


def test_staged_tokens_that_do_not_fit_the_backend_are_refused():
    backend = RemoteExpertBackend(None, None, Precision.FP8, 1.0)
    x = torch.zeros(3, 200)
    ids, w = torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2)
    right = WireTokens.of(x, Precision.FP8)
    assert (right.data.shape[1], right.scales.shape[1]) == WireTokens.row_widths(200, Precision.FP8)
    for wrong, message in (
        (WireTokens.of(x, Precision.BF16), "must be TOKEN_FORMAT_FP8 on the host"),
        (WireTokens(right.format, right.data[:2], right.scales[:2]), r"\(3, 200\)"),
        (WireTokens(right.format, right.data, right.scales[:, :4]), "8 scale bytes a row"),
    ):
        with pytest.raises(ValueError, match=message):
            backend.dispatch(1, x, ids, w, staged=wrong)


def test_larger_batches_and_failed_captures_run_eagerly(tmp_path, monkeypatch):
    model = hf_models.our_model(hf_models.build_model("deepseek_v3", tmp_path / "m"))
    cache = hf_models.new_cache(model, max_seqs=4, max_len=32)
    graphs = DecodeGraphs(model, cache, max_batch=2, capture=False)
    slots = [cache.allocate() for _ in range(3)]
    prompt = [(s, 0, PROMPTS[1], False) for s in slots]
    model(StepBatch.build(prompt, "cpu"), cache)
    three = _decode(model, cache, slots, [5, 6, 7], [3, 3, 3])
    assert not graphs.accepts(three)  # more sequences than max_batch

    def broken(*args):
        raise RuntimeError("cannot capture this")

    monkeypatch.setattr(graphs, "_layout", broken)
    two = _decode(model, cache, slots[:2], [5, 6], [3, 3])
    logits = graphs.forward(two)  # the capture fails: this step and every later one run eagerly
    assert logits.shape == (2, model.spec.vocab_size)
    assert graphs.failed == "RuntimeError: cannot capture this"
    assert not graphs.buckets and not graphs.accepts(two)


def test_a_cpu_gets_a_plain_cache_and_no_graphs(tmp_path):
    model = hf_models.our_model(hf_models.build_model("mixtral", tmp_path / "m"))
    cache, graphs = cache_and_graphs(model, 3, 32, "cpu", model.dtype)
    assert graphs is None and cache.max_seqs == cache.num_free == 3
