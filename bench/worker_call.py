"""Where one expert worker call's time goes: `wire_forward.forward_bytes` in this process.

    python bench/worker_call.py [--tokens 256,1024,4096] [--hidden 7168] [--device cuda]
                                [--iters 10] [--profile]

The transport benchmark's worker (8 of 32 tiny experts, I = 128, fp8) loaded in this process, and
a serialized ExpertForwardRequest as the router sends it: T tokens, each routed top-8 among 32
experts, the slots of the other workers' experts empty (-1). Per T: the median wall time of
`forward_bytes` (decode the request, the experts, the result rows back to the host, encode the
reply) and of its parts, each timed alone with the device synchronized around it:

  copy in      the request's token bytes into pinned host memory (`token_format._from_bytes`;
               the call packs them with its routing plan into one pinned buffer and one
               transfer, `expert_worker.staging`)
  checks       token bytes to the device and their finite check, on its own with a sync
               (`token_format.require_finite`; the call itself leaves the check on the device and
               reads its verdict with the result rows)
  experts      `ExpertShard.forward` (routing plan on the CPU, the fused kernels)
  copy out     the result rows to bf16, into pinned host memory (one transfer)
  encode       `wire.encode_forward_response` (one join of the reply's bytes)

--profile also prints torch.profiler's table of the slowest operators for the largest T.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from transport import EXPERTS_PER_WORKER, TOP_K, write_model  # noqa: E402

from expert_worker import service, wire_forward  # noqa: E402
from expert_worker.experts import ExpertShard  # noqa: E402
from moe_core import token_format as tf  # noqa: E402
from moe_core import wire  # noqa: E402
from moe_core.fp8 import quantize_tokens  # noqa: E402
from moe_core.host_threads import apply_cpu_threads  # noqa: E402
from moe_core.precision import Precision  # noqa: E402

WORKERS = 4  # the request is one of a 4-worker layer's: top-8 among 32 experts


def request_bytes(tokens: int, hidden: int) -> bytes:
    """The serialized request worker 0 of 4 gets: its experts' slots, the others' -1."""
    gen = torch.Generator().manual_seed(tokens)
    x8, scales = quantize_tokens(torch.randn(tokens, hidden, generator=gen) * 0.5)
    choices = WORKERS * EXPERTS_PER_WORKER
    ids = torch.rand(tokens, choices, generator=gen).topk(TOP_K, dim=1).indices  # [T, k]
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), dim=1)
    ids = torch.where(ids < EXPERTS_PER_WORKER, ids, -1)
    keep = (ids >= 0).any(dim=1)  # the router sends only tokens that use one of these experts
    x8, scales, ids, weights = x8[keep], scales[keep], ids[keep], weights[keep]
    return wire.encode_forward_request(
        layer=0,
        token_format=tf.FP8,
        num_tokens=x8.shape[0],
        hidden=hidden,
        data=x8.view(torch.uint8).numpy(),
        scales=scales.numpy(),
        slots=TOP_K,
        expert_ids=ids.to(torch.int32).numpy(),
        expert_weights=weights.float().numpy(),
        result_format=tf.BF16,
    )


def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds of fn() with the device synchronized around each call."""
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def measure(shard: ExpertShard, raw: bytes, iters: int) -> dict:
    device = shard.device
    request = wire_forward.decode(raw)
    batch = request.tokens
    pin = device.type == "cuda"
    shape = (batch.num_tokens, batch.hidden)
    host = tf._from_bytes(batch.data, torch.float8_e4m3fn, shape, "tokens", pin)
    done = service.compute(shard, request)
    rows = done.rows.to(torch.bfloat16).contiguous()
    out_host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=pin)
    reply = memoryview(out_host.reshape(-1).view(torch.uint8).numpy())
    x, scales = tf.decode_tokens(batch, device, True)
    ids = tf.unpack_expert_ids(request.expert_ids, batch.num_tokens, request.slots)
    weights = tf.unpack_expert_weights(request.expert_weights, batch.num_tokens, request.slots)
    weights = torch.where(ids != -1, weights, 0.0)
    for _ in range(2):
        wire_forward.forward_bytes(shard, raw)
    parts = {
        "call": lambda: wire_forward.forward_bytes(shard, raw),
        "copy in": lambda: tf._from_bytes(batch.data, torch.float8_e4m3fn, shape, "tokens", pin),
        "checks": lambda: tf.require_finite(host.to(device, non_blocking=True), "tokens"),
        "experts": lambda: shard.forward(0, x, scales, ids, weights),
        "copy out": lambda: out_host.copy_(done.rows.to(torch.bfloat16), non_blocking=True),
        "encode": lambda: wire.encode_forward_response(tf.BF16, *rows.shape, reply, 0.0),
    }
    row = {"tokens": batch.num_tokens, "request MB": len(raw) / 1e6, "reply MB": reply.nbytes / 1e6}
    for name, fn in parts.items():
        row[f"{name} ms"] = timed(fn, iters, device) * 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--tokens", type=ints, default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--model-root", type=Path, default=Path(tempfile.gettempdir()) / "moe-bench"
    )
    args = parser.parse_args()
    apply_cpu_threads(args.device)  # as a worker process on this device does

    model = write_model(args.model_root, args.hidden, WORKERS * EXPERTS_PER_WORKER)
    experts = range(EXPERTS_PER_WORKER)
    shard = ExpertShard.load(model, experts, Precision.FP8, args.device, progress=False)
    rows, raw = [], b""
    for tokens in args.tokens:
        raw = request_bytes(tokens, args.hidden)
        rows.append(measure(shard, raw, args.iters))
    keys = list(rows[0])
    print(f"\none worker call, fp8, hidden {args.hidden}, {args.device}, medians of {args.iters}")
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        cells = (f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        print("| " + " | ".join(cells) + " |")
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if shard.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.iters):
                wire_forward.forward_bytes(shard, raw)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print("\ncommand: python bench/worker_call.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
