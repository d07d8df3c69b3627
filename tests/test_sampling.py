"""Per-request sampling: greedy, temperature, top-k, top-p, and seeded generators."""

import pytest
import torch

from router.sampling import SamplingParams, make_generator, sample


def _draws(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    generator = make_generator(params)
    return [sample(logits[None], [params], [generator])[0] for _ in range(n)]


def test_greedy_rows_take_the_argmax_whatever_the_other_rows_do():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3)] * 2 + [SamplingParams()]
    generators = [make_generator(p) for p in params]
    tokens = sample(logits, params, generators)
    for row in (0, 2, 4):
        assert tokens[row] == int(logits[row].argmax())
    assert make_generator(SamplingParams()) is None  # greedy draws nothing


def test_temperature_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=2.0, seed=1)
    counts = torch.bincount(torch.tensor(_draws(logits, params, 8000)), minlength=4)
    expected = torch.softmax(logits / 2.0, dim=0)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.02), (counts, expected)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0, 2.8])
    draws = set(_draws(logits, SamplingParams(temperature=5.0, top_k=3, seed=0), 400))
    assert draws == {1, 3, 5}
    single = _draws(logits, SamplingParams(temperature=5.0, top_k=1, seed=0), 50)
    assert set(single) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.7, seed=0), 400)) == {1, 3}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.5, seed=0), 100)) == {1}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.9, seed=0), 600)) == {
        1,
        2,
        3,
    }


def test_a_seed_repeats_its_draws_and_different_seeds_differ():
    logits = torch.zeros(1000)  # uniform: 20 equal draws by chance are impossible in practice
    first = _draws(logits, SamplingParams(temperature=1.0, seed=42), 20)
    again = _draws(logits, SamplingParams(temperature=1.0, seed=42), 20)
    other = _draws(logits, SamplingParams(temperature=1.0, seed=43), 20)
    assert first == again
    assert first != other
    unseeded = [_draws(logits, SamplingParams(temperature=1.0), 20) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_a_seeded_request_draws_the_same_tokens_alone_or_in_a_batch():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone_gen = make_generator(mine)
    alone = [sample(logits[1:2], [mine], [alone_gen])[0] for _ in range(10)]
    params = [SamplingParams(temperature=0.7, seed=1), mine, SamplingParams()]
    generators = [make_generator(p) for p in params]
    batched = [sample(logits, params, generators)[1] for _ in range(10)]
    assert alone == batched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": -1},
        {"seed": 2**64},
    ],
)
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_rows_and_parameters_must_agree():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(2, 10), [SamplingParams()], [None])
