"""A real cluster on loopback (router + expert worker processes) through the SDK.

Logits and greedy tokens equal Hugging Face transformers' float32 eager reference for every
architecture, whatever the number of workers; concurrent requests give what they give one at a
time; bad requests get precise status codes and the router keeps serving; a dead worker fails
requests with UNAVAILABLE without taking the router down.

One cluster runs at a time (`Clusters`), and the tests are ordered so that each starts once.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import hf_models
import numpy as np
import pytest
import torch

from moe_client import Client, ClusterError
from moe_cluster import ClusterStartError, LocalCluster
from moe_cluster.demo_model import demo_tokenizer
from moe_core.precision import Precision
from moe_core.spec import ModelSpec
from protos import expert_pb2, router_pb2, router_pb2_grpc
from router.tokenizer import IncrementalDetokenizer, Tokenizer
from router.workers import check_worker_info

MAX_SEQ_LEN = 128
ROUTER_ARGS = ("--max-batch-size", "16", "--max-seq-len", str(MAX_SEQ_LEN))
TOLERANCE = 1e-3  # max abs logit difference to the HF float32 eager reference
# the 2-worker DeepSeek-V3 cluster comes last, so the tests after this one reuse it
ARCHITECTURES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"]
PROMPTS = [hf_models.random_prompt(11, seed=1), hf_models.random_prompt(5, seed=2)]
NEW_TOKENS = 6


class Clusters:
    """Starts the cluster a test asks for, stopping the previous one (one runs at a time)."""

    def __init__(self, checkpoints) -> None:
        self.checkpoints = checkpoints
        self.key: tuple[str, int] | None = None
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None

    def get(self, name: str, workers: int = 2) -> tuple[LocalCluster, Client]:
        if self.key != (name, workers):
            self.close()
            model_dir = self.checkpoints.get(name)
            self.cluster = LocalCluster(
                model_dir, workers=workers, precision="fp32", router_args=ROUTER_ARGS
            ).start()
            self.client = Client(self.cluster.address, timeout=120)
            self.key = (name, workers)
        return self.cluster, self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.stop()
        self.key = self.cluster = self.client = None


@pytest.fixture(scope="module")
def clusters(checkpoints):
    pool = Clusters(checkpoints)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def references(checkpoints):
    """HF float32 eager logits and greedy tokens of PROMPTS, per architecture, computed once."""
    cache: dict[str, tuple[list[torch.Tensor], list[list[int]]]] = {}

    def get(name: str):
        if name not in cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                hf = checkpoints.hf(checkpoints.get(name))
                logits = [hf_models.hf_logits(hf, p) for p in PROMPTS]
                tokens = [hf_generate(hf, p, NEW_TOKENS) for p in PROMPTS]
            finally:
                torch.set_num_threads(threads)
            cache[name] = (logits, tokens)
        return cache[name]

    return get


@torch.no_grad()
def hf_generate(hf, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy `generate`, end-of-sequence ignored."""
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id = None
    config.do_sample = False
    config.max_new_tokens = new_tokens
    out = hf.generate(torch.tensor([prompt]), generation_config=config, pad_token_id=0)
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens
    return tokens


def assert_matches_reference(client: Client, reference) -> None:
    ref_logits, ref_tokens = reference
    for prompt, want_logits, want_tokens in zip(PROMPTS, ref_logits, ref_tokens, strict=True):
        got = client.logits(prompt)
        assert got.shape == tuple(want_logits.shape)
        diff = np.abs(got - want_logits.numpy()).max()
        assert diff < TOLERANCE, f"logits differ from HF by {diff}"
        result = client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert result.token_ids == want_tokens
        assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_and_greedy_tokens_equal_hf_with_two_workers(clusters, references, name):
    _, client = clusters.get(name, workers=2)
    assert_matches_reference(client, references(name))


def test_concurrent_requests_give_what_they_give_one_at_a_time(clusters):
    _, client = clusters.get("deepseek_v3", workers=2)
    requests = [
        dict(
            token_ids=hf_models.random_prompt(3 + i, seed=100 + i),
            max_new_tokens=4 + i % 5,
            ignore_eos=True,
            **(dict(temperature=0.8, top_k=50, seed=i) if i % 4 == 3 else {}),
        )
        for i in range(16)
    ]
    start = time.monotonic()
    alone = [client.generate(**r).token_ids for r in requests]
    one_at_a_time_s = time.monotonic() - start
    start = time.monotonic()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.generate(**r).token_ids, requests))
    together_s = time.monotonic() - start
    assert together == alone
    assert [len(t) for t in together] == [r["max_new_tokens"] for r in requests]
    # continuous batching: the 16 share steps instead of queueing behind each other
    assert together_s < one_at_a_time_s / 2, (together_s, one_at_a_time_s)


def test_bad_requests_get_precise_codes_and_the_router_keeps_serving(clusters, checkpoints):
    cluster, client = clusters.get("deepseek_v3", workers=2)
    vocab = client.info()["vocab_size"]
    with grpc.insecure_channel(cluster.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        bad_calls = {
            "no prompt": (stub.Generate, router_pb2.GenerateRequest(), "INVALID_ARGUMENT"),
            "both prompts": (
                stub.Generate,
                router_pb2.GenerateRequest(prompt="hi", token_ids=[1]),
                "INVALID_ARGUMENT",
            ),
            "id >= vocab": (
                stub.Generate,
                router_pb2.GenerateRequest(token_ids=[1, vocab]),
                "INVALID_ARGUMENT",
            ),
            "text, no tokenizer": (
                stub.Generate,
                router_pb2.GenerateRequest(prompt="hello"),
                "FAILED_PRECONDITION",
            ),
            "too many new tokens": (
                stub.Generate,
                router_pb2.GenerateRequest(token_ids=[1], max_new_tokens=10**6),
                "OUT_OF_RANGE",
            ),
            "prompt too long": (
                stub.Generate,
                router_pb2.GenerateRequest(token_ids=[1] * MAX_SEQ_LEN),
                "OUT_OF_RANGE",
            ),
            "bad top_p": (
                stub.Generate,
                router_pb2.GenerateRequest(token_ids=[1], temperature=1.0, top_p=1.5),
                "INVALID_ARGUMENT",
            ),
            "empty logits": (stub.Logits, router_pb2.LogitsRequest(), "INVALID_ARGUMENT"),
            "logits id >= vocab": (
                stub.Logits,
                router_pb2.LogitsRequest(token_ids=[vocab + 5]),
                "INVALID_ARGUMENT",
            ),
        }
        for what, (method, request, code) in bad_calls.items():
            with pytest.raises(grpc.RpcError) as err:
                reply = method(request, timeout=30)
                if method is stub.Generate:
                    list(reply)  # a stream's status comes with its end
            assert err.value.code().name == code, (what, err.value.details())
            assert err.value.details(), what
    # the same through the SDK, which passes these on to the router
    with pytest.raises(ClusterError) as err:
        client.generate(token_ids=[vocab])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ClusterError) as err:
        client.generate(prompt="hello")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "tokenizer" in err.value.details
    result = client.generate(token_ids=PROMPTS[0], max_new_tokens=3, ignore_eos=True)
    assert len(result.token_ids) == 3


def test_info_lists_the_workers_their_experts_and_the_tokens_sent(clusters, checkpoints):
    cluster, client = clusters.get("deepseek_v3", workers=2)
    info = client.info()
    spec_config = checkpoints.get("deepseek_v3") / "config.json"
    assert info["architecture"] == "deepseek_v3" and spec_config.is_file()
    assert info["precision"] == "fp32" and info["has_tokenizer"] is False
    num_experts, top_k = info["num_experts"], info["top_k"]
    assert [w["address"] for w in info["workers"]] == [w.address for w in cluster.workers]
    assert [w["experts"] for w in info["workers"]] == [
        list(range(0, num_experts // 2)),
        list(range(num_experts // 2, num_experts)),
    ]
    assert all(w["healthy"] for w in info["workers"])

    def tokens_sent() -> int:
        return sum(sum(w["expert_tokens"].values()) for w in client.info()["workers"])

    before = tokens_sent()
    client.logits(PROMPTS[0])
    moe_layers = info["num_layers"] - 1  # the tiny DeepSeek-V3 has one dense layer first
    assert tokens_sent() - before == len(PROMPTS[0]) * top_k * moe_layers


@pytest.mark.parametrize("workers", [1, 3, 4])
def test_any_number_of_workers_gives_the_same_logits_and_tokens(
    clusters, references, checkpoints, workers
):
    _, client = clusters.get("deepseek_v3", workers=workers)
    assert len(client.info()["workers"]) == workers
    assert_matches_reference(client, references("deepseek_v3"))
    # and the same numbers as every expert in process, to float32 rounding
    model = hf_models.our_model(checkpoints.get("deepseek_v3"))
    with torch.no_grad():
        local = hf_models.prefill_logits(model, PROMPTS)
    for prompt, want in zip(PROMPTS, local, strict=True):
        np.testing.assert_allclose(client.logits(prompt), want.numpy(), rtol=0, atol=1e-5)


def test_a_dead_worker_fails_requests_with_unavailable_and_the_router_survives(clusters):
    cluster, client = clusters.get("deepseek_v3", workers=4)
    victim = cluster.workers[1]
    os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait(timeout=30)
    for _ in range(2):  # each failed step fails its requests, and the next step runs again
        with pytest.raises(ClusterError) as err:
            client.generate(token_ids=PROMPTS[0], max_new_tokens=4)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no expert worker serves experts" in err.value.details
    health = {w["address"]: w["healthy"] for w in client.info()["workers"]}
    assert health.pop(victim.address) is False
    assert all(health.values())
    clusters.close()  # the cluster is broken now


def test_streamed_text_never_splits_a_character():
    tokenizer = Tokenizer(demo_tokenizer())
    text = "naïve café: 3€, 東京 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters take several byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([token]) for token in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # an incomplete character at the end comes out (as a replacement) only when flushed
    a, euro_1, euro_2, _ = tokenizer.encode("a€")
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([a]), detok.push([euro_1]), detok.push([euro_2])] == ["a", "", ""]
    assert detok.flush() == "\ufffd"


def test_the_router_refuses_workers_that_do_not_fit_the_model(checkpoints):
    spec = ModelSpec.from_dir(checkpoints.get("deepseek_v3"))
    addresses = ["127.0.0.1:1001", "127.0.0.1:1002"]

    def info(experts, **overrides) -> expert_pb2.WorkerInfo:
        fields = dict(
            model_type=spec.model_type,
            hidden_size=spec.hidden_size,
            num_experts=spec.num_experts,
            precision="fp32",
            moe_layers=spec.moe_layers,
            expert_ids=experts,
        )
        return expert_pb2.WorkerInfo(**(fields | overrides))

    half = spec.num_experts // 2
    assert check_worker_info(info(range(half)), addresses[0], spec, Precision.FP32) == []
    misfits = {
        "127.0.0.1:1002 has precision 'bf16', the router 'fp32'": info(
            range(half), precision="bf16"
        ),
        "127.0.0.1:1002 has model_type 'mixtral'": info(range(half), model_type="mixtral"),
        "127.0.0.1:1002 has hidden_size 32": info(range(half), hidden_size=32),
        f"127.0.0.1:1002 holds expert {spec.num_experts} of {spec.num_experts}": info(
            [0, spec.num_experts]
        ),
    }
    for message, worker_info in misfits.items():
        problems = check_worker_info(worker_info, addresses[1], spec, Precision.FP32)
        assert any(message in p for p in problems), problems


def test_a_process_that_dies_while_starting_is_named_with_the_end_of_its_log(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    cluster = LocalCluster(tmp_path, workers=2, precision="fp32")
    with pytest.raises(ClusterStartError) as err:
        cluster.start()
    message = str(err.value)
    assert re.search(r"worker-\d exited with status 1 while starting", message), message
    assert "model_type 'llama' is not supported" in message  # from the worker's own log
