"""`moe-router serve`'s options: worker discovery (static --workers, or kubernetes pods), and
the others that only reach the configuration.

Bad combinations end with usage status 2 and a message naming the options, before any model or
worker is touched; the options the Helm chart passes are accepted as they are rendered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import Discovery
from router.discovery import DEFAULT_WORKER_PORT
from router.main import (
    ONEDNN_PRIMITIVE_CACHE,
    bound_onednn_cache,
    build_parser,
    config_from_args,
    main,
)

ROOT = Path(__file__).resolve().parents[1]
SELECTOR = "app.kubernetes.io/component=expert-worker,app.kubernetes.io/instance=moe"


def serve_args(*args: str) -> list[str]:
    return ["serve", "--model", "/models/m", *args]


def config_of(*args: str):
    return config_from_args(build_parser().parse_args(serve_args(*args)))


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "--workers"),
        (("--discovery", "static"), "--workers"),
        (("--discovery", "kubernetes", "--selector", SELECTOR), "--namespace"),
        (("--discovery", "kubernetes", "--namespace", "moe"), "--selector"),
        (
            ("--discovery", "kubernetes", "--namespace", "moe", "--selector", SELECTOR)
            + ("--workers", "10.0.0.1:50061"),
            "--workers",
        ),
        (("--workers", "127.0.0.1:1", "--namespace", "moe"), "--namespace"),
        (("--workers", "127.0.0.1:1", "--selector", SELECTOR), "--selector"),
        (("--workers", "127.0.0.1:1", "--kubeconfig", "kc"), "--kubeconfig"),
        (("--workers", "127.0.0.1:1", "--worker-port", "50061"), "--worker-port"),
        (
            ("--discovery", "kubernetes", "--namespace", "Moe_Prod", "--selector", SELECTOR),
            "namespace must be a DNS label",
        ),
        (
            ("--discovery", "kubernetes", "--namespace", "moe", "--selector", SELECTOR)
            + ("--worker-port", "70000"),
            "worker port must be in 1-65535",
        ),
        (("--discovery", "dns", "--workers", "127.0.0.1:1"), "invalid choice: 'dns'"),
    ],
)
def test_bad_discovery_options_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(serve_args(*args))
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_static_discovery_keeps_its_worker_list():
    config = config_of("--workers", "10.0.0.1:50061,10.0.0.2:50061")
    assert config.discovery is Discovery.STATIC
    assert config.workers == ("10.0.0.1:50061", "10.0.0.2:50061")
    assert (config.namespace, config.selector, config.kubeconfig) == (None, None, None)


def test_kubernetes_discovery_options_reach_the_watcher_configuration(tmp_path):
    config = config_of(
        "--discovery", "kubernetes", "--namespace", "moe", "--selector", SELECTOR,
        "--kubeconfig", str(tmp_path / "kubeconfig"), "--worker-port", "6000",
    )  # fmt: skip
    assert (config.discovery, config.workers) == (Discovery.KUBERNETES, ())
    watcher = config.kubernetes_discovery()
    assert (watcher.namespace, watcher.selector, watcher.port) == ("moe", SELECTOR, 6000)
    assert watcher.kubeconfig == tmp_path / "kubeconfig"
    # In a pod: the in-cluster service account and the chart's worker port.
    in_cluster = config_of("--discovery", "kubernetes", "--namespace", "moe", "--selector", "a=b")
    watcher = in_cluster.kubernetes_discovery()
    assert (watcher.kubeconfig, watcher.port) == (None, DEFAULT_WORKER_PORT)


def test_the_charts_discovery_arguments_are_accepted():
    helm = pytest.importorskip("helm_python")
    yaml = pytest.importorskip("yaml")
    chart = helm.Chart.load(str(ROOT / "helm" / "moe-cluster"))
    rendered = chart.render({"model": {"path": "m"}}, name="moe", namespace="llm", is_install=True)
    deployment = next(
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict) and doc.get("kind") == "Deployment"
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    start = args.index("--discovery")
    assert args[start : start + 6 : 2] == ["--discovery", "--namespace", "--selector"]
    config = config_of(*args[start : start + 6])
    assert config.discovery is Discovery.KUBERNETES
    assert (config.namespace, config.selector) == ("llm", args[start + 5])


def test_the_router_process_refuses_kubernetes_discovery_without_a_selector():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "router"]
    command += serve_args("--discovery", "kubernetes", "--namespace", "moe")
    done = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "moe-router: error:" in done.stderr and "--selector" in done.stderr


def test_the_router_bounds_onednns_primitive_cache_unless_told_otherwise():
    environ: dict[str, str] = {}
    bound_onednn_cache(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ONEDNN_PRIMITIVE_CACHE}
    environ = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}  # the user's choice stays
    bound_onednn_cache(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def test_cuda_graphs_are_on_unless_turned_off():
    assert config_of("--workers", "127.0.0.1:1").cuda_graphs
    assert not config_of("--workers", "127.0.0.1:1", "--cuda-graphs", "off").cuda_graphs
