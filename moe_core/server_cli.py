"""Command-line pieces every moe-cluster server process shares: listening, device, precision,
draining, logging and security options, and the error exit."""

from __future__ import annotations

import argparse
import logging
import sys

from moe_core.precision import Precision
from moe_core.security import Security


def add_server_arguments(serve: argparse.ArgumentParser, precision_help: str) -> None:
    """--host, --port, --port-file, --metrics-port, --metrics-port-file, --device, --cpu-threads,
    --precision, --grace and --log-level."""
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=0, help="port (0 = pick a free one)")
    serve.add_argument("--port-file", help="write the bound port here once serving")
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port of --host (0 = pick a free one; "
        "default: no metrics endpoint)",
    )
    serve.add_argument("--metrics-port-file", help="write the bound metrics port here once serving")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument(
        "--cpu-threads",
        type=int,
        help="threads of torch's CPU operators (default: 1 with a GPU device, one per core "
        "with --device cpu)",
    )
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


def server_settings(args: argparse.Namespace) -> dict:
    """The config fields that `add_server_arguments`' options set (both components' configs
    name them alike); --grace and --log-level excepted."""
    names = ["host", "port", "port_file", "metrics_port", "metrics_port_file"]
    names += ["device", "cpu_threads", "precision"]
    return {name: getattr(args, name) for name in names}


def add_security_arguments(serve: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-ca, --auth-token-file and --insecure (see `load_security`)."""
    group = serve.add_argument_group(
        "security", "TLS on every gRPC hop and a bearer token; plaintext only with --insecure"
    )
    group.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) of this server")
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle that verifies peers")
    group.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="file holding the bearer token every call must carry (health checks excepted)",
    )
    group.add_argument(
        "--insecure", action="store_true", help="serve plaintext gRPC (no TLS options given)"
    )


def load_security(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Security:
    """The Security the options ask for.

    Usage errors (exit 2 through parser.error): no TLS options and no --insecure, --insecure
    with TLS options, only some of the three TLS files. A file that cannot be used raises
    `moe_core.security.SecretFileError` (its message names the file; the caller exits 1).
    """
    tls = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    given = [flag for flag, path in tls.items() if path]
    if args.insecure and given:
        parser.error(f"--insecure contradicts {', '.join(given)}")
    if not args.insecure and not given:
        parser.error(
            "TLS is not configured: give --tls-cert, --tls-key and --tls-ca, or --insecure to "
            "serve plaintext gRPC"
        )
    if given and len(given) < len(tls):
        missing = [flag for flag in tls if flag not in given]
        parser.error(f"{', '.join(given)} also needs {' and '.join(missing)}")
    return Security.load(args.tls_cert, args.tls_key, args.tls_ca, args.auth_token_file)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def fail(prog: str, message: str) -> int:
    """Prints `prog: error: message` to stderr; returns the exit status 1."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1
