"""Command-line pieces every moe-cluster server process shares: listening, device, precision,
draining and logging options, and the error exit."""

from __future__ import annotations

import argparse
import logging
import sys

from moe_core.precision import Precision


def add_server_arguments(serve: argparse.ArgumentParser, precision_help: str) -> None:
    """--host, --port, --port-file, --device, --precision, --grace and --log-level."""
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    serve.add_argument("--port-file", help="write the bound port here once serving")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument(
        "--precision",
        default=Precision.FP32.value,
        choices=[p.value for p in Precision],
        help=precision_help,
    )
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to drain on stop")
    serve.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def fail(prog: str, message: str) -> int:
    """Prints `prog: error: message` to stderr; returns the exit status 1."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1
