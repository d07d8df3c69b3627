"""`moe-router serve`: command line of the router process.

    moe-router serve --model DIR --workers HOST:PORT,... [--host 127.0.0.1] [--port 0]
        [--port-file PATH] [--metrics-port P] [--metrics-port-file PATH] [--device cpu|cuda]
        [--cpu-threads N] [--precision fp8|bf16|fp32] [--max-batch-size 64] [--max-seq-len 4096]
        [--max-new-tokens 4096] [--max-prompt-len MAX_SEQ_LEN-1]
        [--max-concurrent-requests MAX_BATCH_SIZE] [--max-waiting 256] [--rpc-timeout 10]
        [--startup-timeout 600] [--on-expert-loss fail|degrade] [--dispatch-attempts 3] [--grace 5]
        [--transport loop|native] [--worker-connections 1] [--forwarders 0] [--forwarder-min-mib 8]
        (--tls-cert FILE --tls-key FILE --tls-ca FILE [--worker-tls-server-name NAME] | --insecure)
        [--auth-token-file FILE] [--profile-steps]
    moe-router serve --model DIR --discovery kubernetes --namespace NS --selector LABELS
        [--kubeconfig PATH] [--worker-port 50061] ...

With `--discovery kubernetes` the workers are the Ready pods in NS that match the label selector
LABELS (watched through the API server: in-cluster service account, or --kubeconfig); a pod's
gRPC port is its container port named "grpc", else --worker-port.

Over `--max-concurrent-requests` running plus `--max-waiting` waiting requests, a new request is
refused at once with RESOURCE_EXHAUSTED.

With TLS the router serves its clients over TLS (they authenticate with the token, not with a
certificate) and calls the workers over mutual TLS, showing the same certificate as its client
certificate. With --auth-token-file every RouterService call needs `authorization: Bearer <token>`
and the router sends the same token to the workers.

Exit status: 0 after a graceful stop, 1 when the model, the workers or a TLS/token file cannot be
used, 2 on bad usage (also: neither TLS options nor --insecure).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

from moe_core.server_cli import (
    add_security_arguments,
    add_server_arguments,
    fail,
    load_security,
    server_settings,
    setup_logging,
)

if TYPE_CHECKING:
    from router.config import RouterConfig

PROG = "moe-router"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a MoE model's router.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the dense part and serve the client API")
    serve.add_argument("--model", required=True, help="Hugging Face model folder")
    serve.add_argument(
        "--discovery",
        default="static",
        choices=["static", "kubernetes"],
        help="static: the --workers list; kubernetes: the Ready pods matching --selector",
    )
    serve.add_argument(
        "--workers", help="expert workers: HOST:PORT,HOST:PORT,... (--discovery static)"
    )
    serve.add_argument("--namespace", help="namespace of the worker pods (--discovery kubernetes)")
    serve.add_argument(
        "--selector", help="label selector of the worker pods, e.g. app=moe,component=worker"
    )
    serve.add_argument(
        "--kubeconfig", help="kubeconfig file; default: the pod's in-cluster service account"
    )
    serve.add_argument(
        "--worker-port",
        type=int,
        help="gRPC port of worker pods that name no container port 'grpc' (default 50061)",
    )
    add_server_arguments(serve, "expert weights and dispatch format; the workers must match")
    serve.add_argument("--max-batch-size", type=int, default=64, help="sequences per step")
    serve.add_argument("--max-seq-len", type=int, default=4096, help="tokens per sequence")
    serve.add_argument(
        "--max-new-tokens", type=int, default=None, help="most tokens a request may ask for"
    )
    serve.add_argument(
        "--max-prompt-len", type=int, default=None, help="prompt tokens (default max-seq-len - 1)"
    )
    serve.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=None,
        help="requests in the engine at once (default max-batch-size)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests waiting for a place; more are refused with RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--rpc-timeout",
        type=float,
        default=10.0,
        help="seconds an expert worker may take for one layer's tokens; a worker that takes "
        "longer is taken out of routing and its tokens go to a replica",
    )
    serve.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds start-up waits until every expert is served (workers load their weights)",
    )
    serve.add_argument(
        "--on-expert-loss",
        choices=["fail", "degrade"],
        default="fail",
        help="when no live worker holds an expert that tokens chose: fail those requests with "
        "UNAVAILABLE, or drop the expert from their top-k, renormalize and flag the responses",
    )
    serve.add_argument(
        "--micro-batches",
        default="1",
        help="split each step into this many micro-batches so that one computes attention while "
        "the others' tokens are at the experts; auto picks 1-4 from the measured times "
        "(default 1: on the GPU the split measured slower, see docs/performance.md)",
    )
    serve.add_argument(
        "--cuda-graphs",
        choices=["on", "off"],
        default="on",
        help="on a GPU, run decode steps from CUDA graphs of the dense layers, captured per "
        "batch and cache-length bucket on first use (default on)",
    )
    serve.add_argument(
        "--transport",
        choices=["loop", "native"],
        default="loop",
        help="what sends the calls to the expert workers: loop, the router's event loop "
        "(default), or native, gRPC C++ threads that send from and receive into pinned host "
        "memory without the interpreter (needs the native client built: python -m "
        "router.native.build)",
    )
    serve.add_argument(
        "--worker-connections",
        type=int,
        default=1,
        help="with --transport native: connections to each worker, which its calls take in "
        "turn (a worker with --fronts takes them on several processes)",
    )
    serve.add_argument(
        "--forwarders",
        type=int,
        default=0,
        help="processes that send the calls to the expert workers, sharing pinned host memory "
        "with the router so that its interpreter never touches the token bytes (default 0: the "
        "router's own event loop sends them)",
    )
    serve.add_argument(
        "--forwarder-min-mib",
        type=float,
        default=8.0,
        help="with --forwarders: a layer whose token rows are smaller than this goes on the "
        "router's event loop (decode steps: the extra hop costs more than it saves)",
    )
    serve.add_argument(
        "--dispatch-attempts",
        type=int,
        default=3,
        help="sends of a layer's tokens (first send and retries on other replicas) before the "
        "requests of the step fail",
    )
    serve.add_argument(
        "--profile-steps",
        action="store_true",
        help="time each step's phases (attention, gating, dispatch, experts, combine, sampling, "
        "...) with device synchronizations, exported as moe_router_step_phase_seconds_total; "
        "profiled steps run a little slower",
    )
    add_security_arguments(serve)
    serve.add_argument(
        "--worker-tls-server-name",
        metavar="NAME",
        help="name the workers' certificates are checked against, instead of the host of each "
        "--workers address (e.g. when workers are reached by pod IP)",
    )
    return parser


def _fail(message: str) -> int:
    return fail(PROG, message)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The RouterConfig of parsed `serve` arguments; ValueError when they cannot work."""
    # torch loads only here, so that --help stays fast
    from router.config import RouterConfig

    return RouterConfig(
        model_dir=args.model,
        workers=args.workers or (),
        **server_settings(args),
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        rpc_timeout_s=args.rpc_timeout,
        startup_timeout_s=args.startup_timeout,
        on_expert_loss=args.on_expert_loss,
        dispatch_attempts=args.dispatch_attempts,
        transport=args.transport,
        worker_connections=args.worker_connections,
        forwarders=args.forwarders,
        forwarder_min_bytes=int(args.forwarder_min_mib * (1 << 20)),
        micro_batches=_micro_batches(args.micro_batches),
        cuda_graphs=args.cuda_graphs == "on",
        profile_steps=args.profile_steps,
        worker_tls_server_name=args.worker_tls_server_name,
        max_prompt_len=args.max_prompt_len,
        max_concurrent_requests=args.max_concurrent_requests,
        max_waiting=args.max_waiting,
        discovery=args.discovery,
        namespace=args.namespace,
        selector=args.selector,
        kubeconfig=args.kubeconfig,
        worker_port=args.worker_port,
        **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}),
    )


def _micro_batches(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit():
        raise ValueError(f"--micro-batches takes auto or a number, got {text!r}")
    return int(text)


# oneDNN (torch's CPU matmuls) keeps a compiled primitive per shape, 1,024 by default. The
# router's attention meets a new shape nearly every step (batch x sequence length), so on a CPU
# that cache held most of what the router allocated and kept while serving, for almost no hits
# (its RSS grew 2-4 MiB per minute); with 16 the growth was a fraction of that at the same
# throughput (docs/performance.md). No effect on a GPU.
ONEDNN_PRIMITIVE_CACHE = "16"


def bound_onednn_cache(environ=os.environ) -> None:
    """Bounds oneDNN's primitive cache unless the user set ONEDNN_PRIMITIVE_CACHE_CAPACITY.
    oneDNN reads it at its first primitive, so this runs before the model does anything."""
    environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    bound_onednn_cache()
    from moe_core.errors import ModelError
    from moe_core.host_threads import apply_cpu_threads
    from moe_core.security import SecretFileError
    from router.config import Discovery
    from router.server import serve
    from router.workers import WorkerSetupError

    setup_errors: tuple[type[Exception], ...] = (WorkerSetupError,)
    if config.discovery is Discovery.KUBERNETES:  # the kubernetes package loads only then
        from router.discovery import DiscoveryError

        setup_errors += (DiscoveryError,)

    try:
        security = load_security(args, parser)
    except SecretFileError as err:
        return _fail(str(err))
    if config.worker_tls_server_name is not None and security.identity is None:
        parser.error("--worker-tls-server-name needs TLS (--tls-cert, --tls-key, --tls-ca)")
    apply_cpu_threads(config.device, config.cpu_threads)
    try:
        asyncio.run(serve(config, security, grace_s=args.grace))
    except ModelError as err:
        return _fail(f"cannot serve the model in {config.model_dir}: {err}")
    except setup_errors as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(str(err))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return _serve(args, parser)


if __name__ == "__main__":
    sys.exit(main())
