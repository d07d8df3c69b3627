"""A real `expert_worker serve` process on 127.0.0.1, driven over gRPC as the router drives it.

The tiny Qwen3-MoE checkpoint of tests/hf_models.py: hidden 64, 3 layers of which layer 1 is dense,
16 routed experts of width 32. The worker under test holds --shard 1/2 = experts 8-15 at fp32.
"""

import asyncio
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hf_models import read_tensors

from expert_worker import service
from expert_worker.experts import ExpertShard
from expert_worker.server import start_server
from moe_core import token_format as tf
from moe_core.fp8 import quantize_tokens
from protos import expert_pb2, expert_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen3_moe"
HIDDEN, INTERMEDIATE, MOE_LAYERS, MOE_LAYER = 64, 32, [0, 2], 2
HELD = list(range(8, 16))
SERVICE = "moe_cluster.v1.ExpertService"


def start_worker(model: Path, folder: Path, *args: str) -> subprocess.Popen:
    """Starts a worker writing its port to folder/port and its log to folder/log."""
    command = [sys.executable, "-m", "expert_worker", "serve", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", "0", "--port-file", str(folder / "port")]
    command += ["--insecure", *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    with open(folder / "log", "w") as log:  # a file, not a pipe: a full pipe would block it
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_port(process: subprocess.Popen, folder: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (folder / "log").read_text()
            raise AssertionError(f"worker exited with {process.returncode}: {log}")
        if (folder / "port").is_file():
            return int((folder / "port").read_text())
        time.sleep(0.05)
    raise AssertionError(f"worker did not write {folder / 'port'} within {timeout} s")


def stop(process: subprocess.Popen, folder: Path) -> tuple[int, str]:
    """SIGTERM (SIGKILL if it lingers) -> (exit status, log)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode, (folder / "log").read_text()


def expert_reference(model: Path, layer: int, x, ids, weights) -> torch.Tensor:
    """float64 sum_s w[t, s] * down(silu(gate x) * up x) over the used slots of each token."""
    tensors = read_tensors(model)
    prefix = f"model.layers.{layer}.mlp.experts"
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e < 0:
                continue
            gate, up, down = (
                tensors[f"{prefix}.{e}.{name}.weight"].double()
                for name in ("gate_proj", "up_proj", "down_proj")
            )
            xt = x[t].double()
            hidden = torch.nn.functional.silu(gate @ xt) * (up @ xt)
            out[t] += float(weights[t, s]) * (down @ hidden)
    return out


@pytest.fixture(scope="module")
def model(checkpoints) -> Path:
    return checkpoints.get(MODEL)  # per-expert tensors, as Hugging Face publishes them


@pytest.fixture(scope="module")
def worker(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    process = start_worker(model, folder, "--shard", "1/2", "--precision", "fp32")
    channel = None
    try:
        port = wait_for_port(process, folder)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield expert_pb2_grpc.ExpertServiceStub(channel), channel
    finally:
        if channel is not None:
            channel.close()
        stop(process, folder)


def make_request(x, ids, weights, layer=MOE_LAYER, precision="fp32", result=tf.FP32):
    return expert_pb2.ExpertForwardRequest(
        layer=layer,
        tokens=tf.encode_tokens(x, precision),
        slots=ids.shape[1],
        expert_ids=tf.pack_expert_ids(ids),
        expert_weights=tf.pack_expert_weights(weights),
        result_format=result,
    )


def routing(num_tokens: int, held: list[int], seed: int = 0, repeat: bool = True):
    """x [T, H], ids [T, 2] of held experts with an empty slot (and a repeated expert), weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=gen) * 4
    ids = torch.stack([torch.randperm(len(held), generator=gen)[:2] for _ in range(num_tokens)])
    ids = torch.tensor(held)[ids]
    ids[0, 1] = -1  # an empty slot
    if repeat:
        ids[1, 1] = ids[1, 0]  # the same expert in two slots adds up
    weights = torch.rand(num_tokens, 2, generator=gen)
    return x, ids, weights


def test_info_lists_exactly_its_shard(worker):
    stub, _ = worker
    info = stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10)
    assert list(info.expert_ids) == HELD
    assert (info.model_type, info.hidden_size, info.num_experts) == (MODEL, HIDDEN, 16)
    assert list(info.moe_layers) == MOE_LAYERS
    assert (info.precision, info.device) == ("fp32", "cpu")
    # gate, up and down of each held expert in each MoE layer, float32
    assert info.resident_weight_bytes == len(MOE_LAYERS) * len(HELD) * 3 * HIDDEN * INTERMEDIATE * 4
    assert set(info.expert_tokens) <= set(HELD)


def test_forward_equals_float64_reference(worker, model):
    stub, _ = worker
    x, ids, weights = routing(7, HELD)
    response = stub.Forward(make_request(x, ids, weights), timeout=30)
    want = expert_reference(model, MOE_LAYER, x, ids, weights)
    got = tf.decode_result(response.result)
    assert got.shape == (7, HIDDEN) and response.result.format == tf.FP32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert want.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    assert response.compute_seconds > 0
    bf16 = stub.Forward(make_request(x, ids, weights, result=tf.BF16), timeout=30)
    assert bf16.result.format == tf.BF16
    assert torch.equal(tf.decode_result(bf16.result), got.to(torch.bfloat16).float())


def test_info_counts_the_tokens_routed_to_each_expert(worker):
    stub, _ = worker
    x, ids, weights = routing(9, HELD, seed=3, repeat=False)
    before = stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10).expert_tokens
    stub.Forward(make_request(x, ids, weights), timeout=30)
    after = stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10).expert_tokens
    assert {e: after.get(e, 0) - before.get(e, 0) for e in HELD} == {
        e: int((ids == e).sum()) for e in HELD
    }


def test_health_and_reflection(worker):
    _, channel = worker
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services


def _bad_requests():
    x, ids, weights = routing(3, HELD)
    good = make_request(x, ids, weights)

    def changed(**fields):
        request = expert_pb2.ExpertForwardRequest()
        request.CopyFrom(good)
        for name, value in fields.items():
            if name.startswith("tokens_"):
                setattr(request.tokens, name.removeprefix("tokens_"), value)
            elif value is None:
                request.ClearField(name)
            else:
                setattr(request, name, value)
        return request

    nan_x = x.clone()
    nan_x[1, 5] = float("nan")
    inf_x = x.clone()
    inf_x[2, 0] = float("-inf")
    inf_data = tf.encode_tokens(inf_x, "fp32").data
    nan_weights = weights.clone()
    nan_weights[2, 0] = float("nan")
    not_held = ids.clone()
    not_held[1, 0] = 2
    out_of_range = ids.clone()
    out_of_range[0, 0] = 99
    return {
        "unknown layer": (changed(layer=9), "layer 9 does not exist: the model has 3 layers"),
        "dense layer": (changed(layer=1), "layer 1 is not an MoE layer; MoE layers: 0, 2"),
        "wrong hidden": (
            make_request(torch.randn(3, 32), ids, weights),
            "tokens have hidden size 32, the model's is 64",
        ),
        "short data": (changed(tokens_data=bytes(10)), "expected 768 bytes (3 x 64 float32)"),
        "empty batch": (changed(tokens_num_tokens=0, tokens_data=b""), "empty batch"),
        "no tokens": (changed(tokens=None), "carries no tokens"),
        "not held": (
            make_request(x, not_held, weights),
            "expert_ids[1, 0] = 2 is not held by this worker (it holds 8-15",
        ),
        "out of range": (make_request(x, out_of_range, weights), "expert_ids[0, 0] = 99 is not"),
        "nan weight": (
            make_request(x, ids, nan_weights),
            "expert_weights[2, 0] = nan is not finite",
        ),
        "wrong format": (
            make_request(x, ids, weights, precision="bf16"),
            "tokens are TOKEN_FORMAT_BF16, this worker holds fp32 experts",
        ),
        "short ids": (changed(expert_ids=bytes(8)), "expert_ids (int32): expected 24 bytes"),
        "short weights": (changed(expert_weights=bytes(4)), "expert_weights (float32): expected"),
        "no slots": (changed(slots=0), "slots must be in 1..16 (the model's experts), got 0"),
        "huge slots": (changed(slots=2**32 - 1), "slots must be in 1..16"),
        "nan token": (make_request(nan_x, ids, weights), "tokens: non-finite value at row 1"),
        "inf fp32 token": (changed(tokens_data=inf_data), "tokens: non-finite value at row 2"),
        "fp8 result": (changed(result_format=tf.FP8), "result_format TOKEN_FORMAT_FP8 is not"),
    }


BAD = _bad_requests()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_invalid_argument_and_worker_keeps_serving(worker, case):
    stub, _ = worker
    request, message = BAD[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()
    x, ids, weights = routing(2, HELD, seed=1)
    assert stub.Forward(make_request(x, ids, weights), timeout=30).result.num_tokens == 2


def test_bf16_worker_by_expert_list_then_graceful_stop(model, tmp_path):
    process = start_worker(model, tmp_path, "--experts", "0,1,5", "--precision", "bf16")
    second = tmp_path / "second"
    second.mkdir()
    try:
        port = wait_for_port(process, tmp_path)
        # a second worker on the same port fails instead of sharing the port's traffic
        clash = start_worker(model, second, "--shard", "0/2", "--port", str(port))
        try:
            clash.wait(timeout=60)
        finally:
            clash_code, clash_log = stop(clash, second)
        assert clash_code == 1 and f"cannot listen on 127.0.0.1:{port}" in clash_log
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            info = stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10)
            assert (list(info.expert_ids), info.precision) == ([0, 1, 5], "bf16")
            x, ids, weights = routing(4, [0, 1, 5], seed=2)
            request = make_request(x, ids, weights, precision="bf16", result=tf.BF16)
            got = tf.decode_result(stub.Forward(request, timeout=30).result).double()
        want = expert_reference(model, MOE_LAYER, x.to(torch.bfloat16).float(), ids, weights)
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    finally:
        code, log = stop(process, tmp_path)
    assert code == 0, log
    assert f"serving on 127.0.0.1:{port}" in log and "stopped" in log


def test_missing_model_folder_exits_non_zero_with_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    process = start_worker(missing, tmp_path, "--shard", "0/2")
    try:
        process.wait(timeout=60)
    finally:
        code, log = stop(process, tmp_path)
    assert code != 0
    assert str(missing) in log and "does not exist" in log
    assert not (tmp_path / "port").exists()


def test_fp8_shard_through_the_service_functions(model):
    """No socket: service.forward on an fp8 shard sees exactly the router's quantized tokens."""
    shard = ExpertShard.load(model, HELD, "fp8", progress=False)
    x, ids, weights = routing(6, HELD, seed=4)
    request = make_request(x, ids, weights, precision="fp8", result=tf.FP32)
    got = tf.decode_result(service.forward(shard, request).result)
    assert torch.equal(got, shard.forward(MOE_LAYER, *quantize_tokens(x), ids, weights))
    want = expert_reference(model, MOE_LAYER, x, ids, weights)
    assert (got.double() - want).norm() / want.norm() < 0.1  # FP8 weights and activations
    with pytest.raises(service.RequestError) as info:
        service.forward(shard, make_request(x, ids, weights, precision="fp32"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes TOKEN_FORMAT_FP8" in info.value.message
    # NaN or Inf in the FP8 scales, and the FP8 NaN code in the data, are refused
    for field, offset, value, message in [
        ("scales", 4 * 3, struct.pack("<f", float("nan")), "tokens (FP8 scales): non-finite"),
        ("scales", 0, struct.pack("<f", float("inf")), "tokens (FP8 scales): non-finite"),
        ("data", HIDDEN + 7, b"\xff", "tokens: non-finite value at row 1, column 7"),
    ]:
        bad = make_request(x, ids, weights, precision="fp8", result=tf.FP32)
        raw = bytearray(getattr(bad.tokens, field))
        raw[offset : offset + len(value)] = value
        setattr(bad.tokens, field, bytes(raw))
        with pytest.raises(service.RequestError) as info:
            service.forward(shard, bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.message
    assert service.worker_info(shard).precision == "fp8"


def test_settle_refuses_what_the_device_check_found_and_counts_only_what_it_accepts(model):
    """On a GPU `compute` leaves the tokens' finite check on the device; `settle` reads its
    verdict after the call's one synchronization (here on the CPU, with the verdict given)."""
    shard = ExpertShard.load(model, HELD, "fp32", progress=False)
    x, ids, weights = routing(4, HELD, seed=2)
    x[1, 3] = float("nan")
    plan = shard.plan(ids, weights, 4, x.device)
    rows = shard.run(MOE_LAYER, x, None, plan)
    done = service.Computed(rows, 4, int((ids != -1).sum()), plan, (x, None), torch.tensor([True]))
    before = shard.expert_load()
    with pytest.raises(service.RequestError) as info:
        service.settle(shard, done)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "tokens: non-finite value at row 1, column 3"
    assert shard.expert_load() == before
    service.settle(shard, done, torch.tensor([False]))
    after = shard.expert_load()
    assert sum(after.values()) - sum(before.values()) == int((ids != -1).sum())


def test_unexpected_failure_is_internal_and_the_server_keeps_serving(model):
    """In-process server: a shard that fails answers INTERNAL with the reason, never UNKNOWN."""
    shard = ExpertShard.load(model, HELD, "fp32", progress=False)

    def broken_run(*args):
        raise RuntimeError("device lost")

    shard.run = broken_run
    x, ids, weights = routing(2, HELD)

    async def session():
        server, port, _ = await start_server(shard, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Forward(make_request(x, ids, weights), timeout=30)
                held = (await stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10)).expert_ids
                return info.value, list(held)
        finally:
            await server.stop(None)

    error, held = asyncio.run(session())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "RuntimeError: device lost"
    assert held == HELD


def test_cuda_kernels_without_a_gpu_or_fp8_fail_before_any_weight_is_read(model, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("weights were read before the kernels option was checked")

    monkeypatch.setattr("expert_worker.experts.Checkpoint", no_reading)
    with pytest.raises(ValueError, match="need --device cuda and --precision fp8"):
        ExpertShard.load(model, [0, 1], "fp32", kernels="cuda", progress=False)
