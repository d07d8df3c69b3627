"""`moe-expert-worker serve`: command line of an expert worker process.

    moe-expert-worker serve --model DIR (--experts 0-7 | --experts 0,1,5 | --shard I/N)
        [--host 127.0.0.1] [--port 0] [--port-file PATH] [--metrics-port P]
        [--metrics-port-file PATH] [--device cpu|cuda|cuda:N] [--cpu-threads N]
        [--precision fp8|bf16|fp32]
        [--kernels auto|cuda|torch] [--max-concurrent-forwards 16] [--fronts 0] [--grace 5]
        (--tls-cert FILE --tls-key FILE --tls-ca FILE | --insecure) [--auth-token-file FILE]

With TLS the worker accepts only clients (routers) that show a certificate signed by --tls-ca;
with --auth-token-file every ExpertService call needs `authorization: Bearer <token>`.
`--kernels` picks the fp8 expert MLP: the CUDA kernels (the default on a GPU) or their torch twin.
`--max-concurrent-forwards` bounds the Forward calls computing or queued; one more is refused with
RESOURCE_EXHAUSTED. `--cpu-threads` sets torch's CPU operator threads (default: 1 on a GPU, where
the host only plans; one per core on a CPU). `--shard I/N` holds experts [I*E//N, (I+1)*E//N) of a
model with E routed experts per layer.
Exit status: 0 after a graceful stop, 1 when the model or a TLS/token file cannot be used, 2 on
bad usage (also: neither TLS options nor --insecure).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from moe_core.server_cli import (
    add_security_arguments,
    add_server_arguments,
    fail,
    load_security,
    server_settings,
    setup_logging,
)

PROG = "moe-expert-worker"


def parse_experts(text: str) -> tuple[int, ...]:
    """'0-3,7' -> (0, 1, 2, 3, 7); ValueError when malformed."""
    ids: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"expected expert ids such as 0-7 or 0,1,5, got {text!r}")
        lo, hi = int(first), int(last) if sep else int(first)
        if hi < lo:
            raise ValueError(f"empty expert range {part.strip()!r} in {text!r}")
        ids.extend(range(lo, hi + 1))
    return tuple(ids)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError when malformed."""
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not int(index) < int(count):
        raise ValueError(f"expected --shard I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def shard_experts(index: int, count: int, num_experts: int) -> tuple[int, ...]:
    """Experts [index*E//count, (index+1)*E//count) of E = num_experts; ValueError when empty."""
    ids = tuple(range(index * num_experts // count, (index + 1) * num_experts // count))
    if not ids:
        raise ValueError(f"shard {index}/{count} of {num_experts} experts holds no expert")
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a shard of routed experts.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="load a shard of experts and serve it over gRPC")
    serve.add_argument("--model", required=True, help="Hugging Face model folder")
    which = serve.add_mutually_exclusive_group(required=True)
    which.add_argument("--experts", help="global expert ids held, e.g. 0-7 or 0,1,5")
    which.add_argument("--shard", help="I/N: the I-th of N equal slices of the experts")
    add_server_arguments(serve, "how expert weights are held; the router must use the same")
    serve.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "cuda", "torch"],
        help="fp8 expert MLP: CUDA kernels, their torch twin, or auto (kernels on a GPU)",
    )
    add_security_arguments(serve)
    serve.add_argument(
        "--max-concurrent-forwards",
        type=int,
        default=16,
        help="Forward calls computing or queued; more are refused with RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--fronts",
        type=int,
        default=0,
        help="processes that take calls on the same port beside the worker, copying the calls' "
        "bytes so that the worker's own interpreter does not (default 0)",
    )
    return parser


def _fail(message: str) -> int:
    return fail(PROG, message)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from moe_core.errors import ModelError
    from moe_core.security import SecretFileError
    from moe_core.spec import ModelSpec

    try:  # before torch loads, so that a wrong path fails fast; the message names the path
        security = load_security(args, parser)
        spec = ModelSpec.from_dir(args.model)
    except (ModelError, SecretFileError) as err:
        return _fail(str(err))

    from expert_worker.config import WorkerConfig
    from expert_worker.experts import ExpertShard
    from expert_worker.server import serve
    from moe_core.host_threads import apply_cpu_threads

    try:
        if args.shard is not None:
            expert_ids = shard_experts(*parse_shard(args.shard), spec.num_experts)
        else:
            expert_ids = parse_experts(args.experts)
        config = WorkerConfig(
            model_dir=args.model,
            expert_ids=expert_ids,
            **server_settings(args),
            grace_s=args.grace,
            kernels=args.kernels,
            max_concurrent_forwards=args.max_concurrent_forwards,
            fronts=args.fronts,
        )
    except ValueError as err:
        parser.error(str(err))
    missing = [e for e in config.expert_ids if e >= spec.num_experts]
    if missing:
        parser.error(
            f"expert {missing[0]} does not exist: the model has {spec.num_experts} experts"
        )
    apply_cpu_threads(config.device, config.cpu_threads)
    try:
        shard = ExpertShard.load(
            config.model_dir,
            config.expert_ids,
            config.precision,
            device=config.device,
            kernels=config.kernels,
        )
    except (ModelError, ValueError, OSError, RuntimeError) as err:
        return _fail(f"cannot load experts from {config.model_dir}: {err}")
    try:
        asyncio.run(serve(shard, config, security))
    except OSError as err:
        return _fail(str(err))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return _serve(args, parser)
    except KeyboardInterrupt:  # interrupted while loading, before the server handles signals
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
