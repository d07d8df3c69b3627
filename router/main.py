"""`moe-router serve`: command line of the router process.

    moe-router serve --model DIR --workers HOST:PORT,... [--host 127.0.0.1] [--port 0]
        [--port-file PATH] [--device cpu|cuda] [--precision fp8|bf16|fp32]
        [--max-batch-size 64] [--max-seq-len 4096]

Exit status: 0 after a graceful stop, 1 when the model or the workers cannot be served, 2 on bad
usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from moe_core.server_cli import add_server_arguments, fail, setup_logging

PROG = "moe-router"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a MoE model's router.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the dense part and serve the client API")
    serve.add_argument("--model", required=True, help="Hugging Face model folder")
    serve.add_argument("--workers", required=True, help="expert workers: HOST:PORT,HOST:PORT,...")
    add_server_arguments(serve, "expert weights and dispatch format; the workers must match")
    serve.add_argument("--max-batch-size", type=int, default=64, help="sequences per step")
    serve.add_argument("--max-seq-len", type=int, default=4096, help="tokens per sequence")
    serve.add_argument(
        "--max-new-tokens", type=int, default=None, help="most tokens a request may ask for"
    )
    serve.add_argument(
        "--rpc-timeout", type=float, default=60.0, help="seconds an expert worker may take"
    )
    return parser


def _fail(message: str) -> int:
    return fail(PROG, message)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # torch and the model code load only here, so that --help stays fast
    from moe_core.errors import ModelError
    from router.config import RouterConfig
    from router.server import serve
    from router.workers import WorkerSetupError

    try:
        config = RouterConfig(
            model_dir=args.model,
            workers=args.workers,
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            device=args.device,
            precision=args.precision,
            max_batch_size=args.max_batch_size,
            max_seq_len=args.max_seq_len,
            rpc_timeout_s=args.rpc_timeout,
            **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}),
        )
    except ValueError as err:
        parser.error(str(err))
    try:
        asyncio.run(serve(config, grace_s=args.grace))
    except ModelError as err:
        return _fail(f"cannot serve the model in {config.model_dir}: {err}")
    except WorkerSetupError as err:
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
