"""Property-based fuzzing of every RPC of both servers of a real cluster (router + 1 fp8 worker).

Hypothesis builds valid-ish and broken requests: Generate and Logits with random ids, lengths,
text and sampling parameters (NaN, Inf, negative, subnormal); ExpertForwardRequest with random
layers, formats, shapes, byte lengths, NaN/Inf in FP8 data, scales and weights, expert ids and
slots; and raw bytes that may not parse at all. Each call must end within its deadline with OK
when the request is valid by the documented rules, and otherwise with a status code of one of the
rules it breaks (INVALID_ARGUMENT, OUT_OF_RANGE); nothing else, no crash, no hang. After the
fuzzing the cluster gives the logits it gave before. Examples are derandomized for CI.

The model is the tiny DeepSeek-V3 (vocabulary 320, hidden 64, 16 experts, MoE layers 1 and 2)
with the demo's byte-level tokenizer, so text prompts are fuzzed too.
"""

from __future__ import annotations

import math
import shutil
import struct

import grpc
import hf_models
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given, settings
from hypothesis import strategies as st

from moe_cluster import LocalCluster
from moe_cluster.demo_model import demo_tokenizer
from moe_core import token_format as tf
from protos import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from router.tokenizer import Tokenizer

VOCAB, HIDDEN, NUM_EXPERTS, MOE_LAYERS = 320, 64, 16, (1, 2)
MAX_SEQ_LEN, MAX_PROMPT_LEN, MAX_NEW_TOKENS = 96, 48, 6
ROUTER_ARGS = (
    *("--max-batch-size", "8", "--max-seq-len", str(MAX_SEQ_LEN)),
    *("--max-prompt-len", str(MAX_PROMPT_LEN), "--max-new-tokens", str(MAX_NEW_TOKENS)),
)
TIMEOUT_S = 30  # a call still running after this is a hang: DEADLINE_EXCEEDED fails the test
OK, INVALID, OUT_OF_RANGE = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
)
_FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True)


def fuzz(examples: int) -> settings:
    return settings(_FUZZ, max_examples=examples)


PROMPTS = [hf_models.random_prompt(9, seed=3), hf_models.random_prompt(40, seed=4)]
TOKENIZER = Tokenizer(demo_tokenizer())
UINT32 = 2**32 - 1


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    model = tmp_path_factory.mktemp("fuzz") / "deepseek_v3-with-tokenizer"
    shutil.copytree(checkpoints.get("deepseek_v3"), model)
    demo_tokenizer().save(str(model / "tokenizer.json"))  # ids 0-257, below the vocabulary
    with LocalCluster(model, workers=1, precision="fp8", router_args=ROUTER_ARGS) as c:
        yield c


@pytest.fixture(scope="module")
def channels(cluster):
    with (
        grpc.insecure_channel(cluster.address) as router,
        grpc.insecure_channel(cluster.workers[0].address) as worker,
    ):
        yield router, worker


@pytest.fixture(scope="module")
def router(channels):
    return router_pb2_grpc.RouterServiceStub(channels[0])


@pytest.fixture(scope="module")
def worker(channels):
    return expert_pb2_grpc.ExpertServiceStub(channels[1])


def reference_forward() -> expert_pb2.ExpertForwardRequest:
    rng = np.random.default_rng(0)
    ids = np.array([[3, 9], [15, -1], [0, 0]], dtype="<i4")
    weights = rng.random(ids.shape, dtype=np.float32)
    x = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    import torch  # the encoder quantizes as the router does

    tokens = tf.encode_tokens(torch.from_numpy(x), "fp8")
    return expert_pb2.ExpertForwardRequest(
        layer=MOE_LAYERS[0],
        tokens=tokens,
        slots=2,
        expert_ids=ids.tobytes(),
        expert_weights=weights.astype("<f4").tobytes(),
        result_format=tf.BF16,
    )


def observe(router, worker) -> tuple[list[bytes], bytes]:
    logits = [
        router.Logits(router_pb2.LogitsRequest(token_ids=p), timeout=TIMEOUT_S) for p in PROMPTS
    ]
    forward = worker.Forward(reference_forward(), timeout=TIMEOUT_S)
    return [r.logits for r in logits], forward.result.data


@pytest.fixture(scope="module")
def reference(router, worker):
    """What the cluster answers before any fuzzing."""
    return observe(router, worker)


def status(call) -> tuple[grpc.StatusCode, object]:
    """Runs call() -> (OK, its result) or (the status code, its details)."""
    try:
        return OK, call()
    except grpc.RpcError as err:
        return err.code(), err.details()


def check(code: grpc.StatusCode, answer, broken: set[grpc.StatusCode]) -> None:
    """OK for a valid request; otherwise the code of one of the rules it breaks."""
    event(code.name)  # --hypothesis-show-statistics shows how the examples ended
    if broken:
        assert code in broken, (
            f"expected one of {sorted(c.name for c in broken)}, got {code}: {answer}"
        )
        assert answer, "an error without a message"
    else:
        assert code == OK, f"a valid request failed with {code}: {answer}"


# ---------------------------------------------------------------------------------------------
# router: Generate and Logits

valid_id = st.integers(0, VOCAB - 1)
bad_id = st.sampled_from([VOCAB, VOCAB + 1, UINT32])
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)  # subnormals included
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
negative32 = st.floats(max_value=0.0, exclude_max=True, width=32, allow_nan=False)


def faults(draw, kinds: list[str]) -> set[str]:
    """Which rules an example breaks on purpose: none half of the time, else one or two."""
    count = draw(st.sampled_from([0, 0, 1, 2]))
    return set(draw(st.lists(st.sampled_from(kinds), min_size=count, max_size=count)))


@st.composite
def token_lists(draw, max_size: int) -> list[int]:
    """Mostly valid ids, sometimes with one id outside the vocabulary."""
    ids = draw(st.lists(valid_id, max_size=max_size))
    bad = draw(st.none() | bad_id)
    if bad is not None:
        ids.insert(draw(st.integers(0, len(ids))), bad)
    return ids


GENERATE_FAULTS = ["both", "neither", "max_new", "temperature", "top_p", "bad_id", "long"]


@st.composite
def generate_requests(draw) -> router_pb2.GenerateRequest:
    """A GenerateRequest with valid-looking fields, some of them broken on purpose."""
    broken = faults(draw, GENERATE_FAULTS)
    request = router_pb2.GenerateRequest(
        max_new_tokens=draw(st.integers(0, MAX_NEW_TOKENS)),
        temperature=draw(st.just(0.0) | st.floats(0, 2, width=32) | finite32.map(abs)),
        top_k=draw(st.integers(0, 400) | st.just(UINT32)),
        top_p=draw(st.floats(0, 1, width=32)),  # 0 = no limit
        ignore_eos=draw(st.booleans()),
    )
    if "max_new" in broken:
        request.max_new_tokens = draw(st.integers(MAX_NEW_TOKENS + 1, UINT32))
    if "temperature" in broken:
        request.temperature = draw(non_finite | negative32)
    if "top_p" in broken:
        request.top_p = draw(
            non_finite | negative32 | st.floats(min_value=1, exclude_min=True, width=32)
        )
    seed = draw(st.none() | st.integers(0, 2**64 - 1))
    if seed is not None:
        request.seed = seed
    text = draw(st.booleans())
    length = MAX_PROMPT_LEN + 3 if "long" in broken else MAX_PROMPT_LEN
    if "neither" not in broken:
        if text or "both" in broken:
            request.prompt = draw(
                st.text(min_size=1, max_size=length // 4 + ("long" in broken) * 60)
            )
        if not text or "both" in broken:
            size = (MAX_PROMPT_LEN + 1, length) if "long" in broken else (1, length)
            request.token_ids.extend(draw(st.lists(valid_id, min_size=size[0], max_size=size[1])))
    if "bad_id" in broken and request.token_ids:
        request.token_ids.insert(draw(st.integers(0, len(request.token_ids))), draw(bad_id))
    return request


def generate_breaks(request: router_pb2.GenerateRequest) -> set[grpc.StatusCode]:
    """The status codes of the rules a GenerateRequest breaks (empty: it is valid)."""
    broken = set()
    if request.prompt and request.token_ids:
        broken.add(INVALID)
    if (request.max_new_tokens or MAX_NEW_TOKENS) > MAX_NEW_TOKENS:
        broken.add(OUT_OF_RANGE)
    if not math.isfinite(request.temperature) or request.temperature < 0:
        broken.add(INVALID)
    if not 0 < (request.top_p or 1.0) <= 1:
        broken.add(INVALID)
    ids = TOKENIZER.encode(request.prompt) if request.prompt else list(request.token_ids)
    if not ids or max(ids) >= VOCAB:
        broken.add(INVALID)
    if len(ids) > MAX_PROMPT_LEN:
        broken.add(OUT_OF_RANGE)
    return broken


@fuzz(100)
@given(request=generate_requests())
def test_generate(router, reference, request):
    code, answer = status(lambda: list(router.Generate(request, timeout=TIMEOUT_S)))
    broken = generate_breaks(request)
    check(code, answer, broken)
    if code == OK:
        tokens = [t for chunk in answer for t in chunk.token_ids]
        assert 1 <= len(tokens) <= (request.max_new_tokens or MAX_NEW_TOKENS)
        assert all(t < VOCAB for t in tokens)
        assert answer[-1].finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED


@fuzz(40)
@given(token_ids=token_lists(MAX_SEQ_LEN + 3))
def test_logits(router, reference, token_ids):
    request = router_pb2.LogitsRequest(token_ids=token_ids)
    code, answer = status(lambda: router.Logits(request, timeout=TIMEOUT_S))
    broken = set()
    if not token_ids or max(token_ids) >= VOCAB:
        broken.add(INVALID)
    if len(token_ids) > MAX_SEQ_LEN:
        broken.add(OUT_OF_RANGE)
    check(code, answer, broken)
    if code == OK:
        assert (answer.num_tokens, answer.vocab_size) == (len(token_ids), VOCAB)
        assert np.isfinite(np.frombuffer(answer.logits, dtype="<f4")).all()


# ---------------------------------------------------------------------------------------------
# worker: Forward

FP8_NAN = 0x7F  # float8_e4m3fn NaN: S.1111.111


FORWARD_FAULTS = [
    *("layer", "format", "num_tokens", "hidden", "slots", "result_format", "no_tokens"),
    *("data_length", "data_nan", "scales_length", "scale_value", "ids_length", "id_value"),
    *("weights_length", "weight_value"),
]


@st.composite
def forward_requests(draw) -> tuple[expert_pb2.ExpertForwardRequest, set[grpc.StatusCode]]:
    """A request for the fp8 worker holding all 16 experts, some fields broken on purpose, and
    the codes of the rules it breaks (worked out from the values sent)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    fault = faults(draw, FORWARD_FAULTS)
    broken = set()

    def breaks(condition) -> None:
        if condition:
            broken.add(INVALID)

    def pick(kind: str, good, bad):
        return draw(bad if kind in fault else good)

    layer = pick("layer", st.sampled_from(MOE_LAYERS), st.sampled_from([0, 3, UINT32]))
    fmt = pick("format", st.just(tf.FP8), st.sampled_from([0, tf.FP32, tf.BF16, 7]))
    num_tokens = pick("num_tokens", st.integers(1, 6), st.sampled_from([0, UINT32]))
    hidden = pick("hidden", st.just(HIDDEN), st.sampled_from([0, 63, 128, UINT32]))
    slots = pick("slots", st.integers(1, 4), st.sampled_from([0, NUM_EXPERTS + 1, UINT32]))
    result_format = pick(
        "result_format", st.sampled_from([tf.FP32, tf.BF16]), st.sampled_from([0, tf.FP8, 9])
    )
    breaks(layer not in MOE_LAYERS)
    breaks(fmt != tf.FP8 or hidden != HIDDEN or num_tokens == 0)
    breaks(result_format not in (tf.FP32, tf.BF16))
    breaks(not 1 <= slots <= NUM_EXPERTS)

    def length(kind: str, right: int) -> int:
        """The right byte length, or a few bytes off; a little for a huge declared shape."""
        if right > 1 << 20:
            return draw(st.integers(0, 64))
        return max(0, right + (draw(st.integers(-5, 5)) if kind in fault else 0))

    n_data = length("data_length", num_tokens * hidden)  # one byte per FP8 element
    data = rng.integers(0, 256, n_data, dtype=np.uint8)
    data[(data & 0x7F) == FP8_NAN] ^= 1  # finite values...
    if n_data and "data_nan" in fault:  # ...but one NaN
        data[draw(st.integers(0, n_data - 1))] |= FP8_NAN
        broken.add(INVALID)
    breaks(n_data != num_tokens * hidden)

    n_scales = num_tokens * ((hidden + 127) // 128)
    scales = rng.uniform(1e-4, 1e-1, length("scales_length", 4 * n_scales) // 4).astype("<f4")
    if len(scales):  # any finite scale is accepted, negative, zero or huge
        value = pick("scale_value", finite32, non_finite)
        scales[draw(st.integers(0, len(scales) - 1))] = value
        breaks(not math.isfinite(value))
    breaks(len(scales) != n_scales)

    n_routing = num_tokens * slots
    ids = rng.integers(-1, NUM_EXPERTS, length("ids_length", 4 * n_routing) // 4).astype("<i4")
    if len(ids) and "id_value" in fault:
        bad = draw(st.sampled_from([NUM_EXPERTS, -2, 2**31 - 1, -(2**31)]))
        ids[draw(st.integers(0, len(ids) - 1))] = bad
        broken.add(INVALID)
    breaks(len(ids) != n_routing)
    weights = rng.random(length("weights_length", 4 * n_routing) // 4, dtype=np.float32)
    if len(weights) and "weight_value" in fault:
        at = draw(st.integers(0, len(weights) - 1))
        weights[at] = draw(non_finite)
        breaks(at >= len(ids) or ids[at] != -1)  # in an empty slot it is ignored
    elif draw(st.booleans()):  # NaN in an empty slot: ignored
        empty = np.flatnonzero(ids[: len(weights)] == -1)
        if len(empty):
            weights[empty[draw(st.integers(0, len(empty) - 1))]] = math.nan
    breaks(len(weights) != n_routing)

    request = expert_pb2.ExpertForwardRequest(
        layer=layer,
        slots=slots,
        expert_ids=ids.tobytes(),
        expert_weights=weights.tobytes(),
        result_format=result_format,
    )
    if "no_tokens" in fault:
        broken.add(INVALID)
    else:
        request.tokens.CopyFrom(
            expert_pb2.TokenBatch(
                format=fmt,
                num_tokens=num_tokens,
                hidden=hidden,
                data=data.tobytes(),
                scales=scales.tobytes(),
            )
        )
    return request, broken


@fuzz(150)
@given(case=forward_requests())
def test_forward(worker, reference, case):
    request, broken = case
    code, answer = status(lambda: worker.Forward(request, timeout=TIMEOUT_S))
    check(code, answer, broken)
    if code == OK:
        result = answer.result
        assert (result.format, result.num_tokens, result.hidden) == (
            request.result_format,
            request.tokens.num_tokens,
            HIDDEN,
        )
        itemsize = 4 if result.format == tf.FP32 else 2
        assert len(result.data) == result.num_tokens * HIDDEN * itemsize


# ---------------------------------------------------------------------------------------------
# raw bytes on every method of both servers

METHODS = {  # method -> (server, response is a stream)
    "/moe_cluster.v1.RouterService/Generate": (0, True),
    "/moe_cluster.v1.RouterService/Logits": (0, False),
    "/moe_cluster.v1.RouterService/GetInfo": (0, False),
    "/moe_cluster.v1.ExpertService/Forward": (1, False),
    "/moe_cluster.v1.ExpertService/GetInfo": (1, False),
}


def raw_call(channels, method: str, payload: bytes):
    server, streaming = METHODS[method]
    channel = channels[server]
    if streaming:
        return list(channel.unary_stream(method)(payload, timeout=TIMEOUT_S))
    return channel.unary_unary(method)(payload, timeout=TIMEOUT_S)


@fuzz(100)
@given(
    method=st.sampled_from(sorted(METHODS)),
    payload=st.binary(max_size=300)
    | st.builds(lambda m: m.SerializeToString(), generate_requests()).map(
        lambda b: b[: len(b) // 2]
    ),  # a valid message cut short
)
def test_raw_bytes(channels, reference, method, payload):
    """Bytes that may not parse: INVALID_ARGUMENT when they don't; what they say when they do."""
    code, answer = status(lambda: raw_call(channels, method, payload))
    event(code.name)
    assert code in (OK, INVALID, OUT_OF_RANGE), f"{method}: {code}: {answer}"


def test_malformed_protobuf_is_invalid_argument_on_every_method(channels, reference):
    corrupt = b"\xff\xff\xff"  # field 0 with an unterminated varint: never parses
    for method in METHODS:
        code, answer = status(lambda method=method: raw_call(channels, method, corrupt))
        assert code == INVALID, (method, code, answer)
        name = method.rsplit("/", 1)[1]
        assert answer.startswith(f"{name}: the request is not a valid protobuf message"), answer
    # an unknown method is grpc's UNIMPLEMENTED, on both servers
    for channel in channels:
        unknown = channel.unary_unary("/moe_cluster.v1.Nope/Nope")
        code, _ = status(lambda unknown=unknown: unknown(b"", timeout=10))
        assert code == grpc.StatusCode.UNIMPLEMENTED


def test_oversized_router_message_is_resource_exhausted(channels, reference):
    payload = struct.pack("<B", 0x0A) + bytes(5 * 1024 * 1024)  # over the router's 4 MiB
    code, answer = status(
        lambda: raw_call(channels, "/moe_cluster.v1.RouterService/Logits", payload)
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, answer


def test_after_fuzzing_the_cluster_serves_the_same_answers(channels, router, worker, reference):
    assert observe(router, worker) == reference
    for channel in channels:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    load = router.GetInfo(router_pb2.ClusterInfoRequest(), timeout=10).load
    assert (load.running, load.waiting, load.free_kv_slots) == (0, 0, load.kv_slots)
