"""The router's calls on the native gRPC client (`moe-router serve --transport native`).

A real cluster on loopback: with the native transport the router serves the logits of the
in-process model (fp32) and, with fp8 tokens, bit for bit what its event loop serves, over one
or several connections per worker and to workers with front processes; it counts the wire bytes
per worker, fails over to a replica when a worker is killed, and speaks mutual TLS with the
bearer token to the workers.
"""

from __future__ import annotations

import hf_models
import numpy as np
import pytest
import torch
from native_lib import require_native
from test_forwarders import (
    PROMPTS,
    ROUTER_ARGS,
    _all_logits,
    _generate_all,
    _sent_bytes,
    check_failover,
)
from test_security import TOKEN

from moe_client import Client
from moe_cluster import LocalCluster
from router.config import RouterConfig

MODEL = "deepseek_v3"
WORKERS = ("127.0.0.1:1",)


@pytest.fixture(autouse=True)
def _native():
    require_native()


def _cluster(model_dir, precision: str = "fp32", connections: int = 1, **kwargs) -> LocalCluster:
    args = (*ROUTER_ARGS, "--transport", "native", "--worker-connections", str(connections))
    return LocalCluster(model_dir, precision=precision, router_args=args, **kwargs)


def test_native_calls_serve_the_same_logits_and_count_the_wire_bytes(checkpoints):
    model_dir = checkpoints.get(MODEL)
    with torch.no_grad():
        want = hf_models.prefill_logits(hf_models.our_model(model_dir), PROMPTS)
    want = np.concatenate([w.numpy() for w in want])
    with _cluster(model_dir, workers=3) as cluster, Client(cluster.address, timeout=60) as c:
        np.testing.assert_allclose(_all_logits(c), want, rtol=0, atol=1e-4)
        sent = _sent_bytes(cluster)
        assert set(sent) == {w.address for w in cluster.workers}
        assert all(v > 0 for v in sent.values()), sent
    # fp8 tokens: the same bytes as the event loop's calls, so the same logits and tokens; also
    # over two connections per worker to workers with two front processes each
    got = {}
    setups = {
        "loop": {"router_args": ROUTER_ARGS},
        "native": {},
        "native, 2 connections, fronts": {"connections": 2, "worker_args": ("--fronts", "2")},
    }
    for name, setup in setups.items():
        make = LocalCluster if name == "loop" else _cluster
        with (
            make(model_dir, precision="fp8", workers=2, **setup) as cluster,
            Client(cluster.address, timeout=60) as client,
        ):
            got[name] = (_all_logits(client), _generate_all(client))
    for name, (logits, tokens) in got.items():
        np.testing.assert_array_equal(logits, got["loop"][0], err_msg=name)
        assert tokens == got["loop"][1], name


def test_a_worker_killed_under_native_calls_fails_over_to_its_replica(checkpoints):
    model_dir = checkpoints.get(MODEL)
    with (
        _cluster(model_dir, workers=2, replicas=2) as cluster,
        Client(cluster.address, timeout=60) as client,
    ):
        check_failover(cluster, client)


def test_native_calls_show_the_certificate_and_the_token(checkpoints, tmp_path):
    """The worker takes only calls with a certificate from the cluster's CA and the token."""
    from test_security import LOOPBACK, make_pki

    pki = make_pki(tmp_path / "pki", "cluster CA", LOOPBACK)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    model_dir = checkpoints.get("qwen3_moe")
    with (
        _cluster(model_dir, workers=1, tls_dir=pki, auth_token_file=token_file) as cluster,
        Client(cluster.address, timeout=60, tls_ca=pki / "ca.crt", token=TOKEN) as client,
    ):
        tokens = client.generate(token_ids=PROMPTS[0], max_new_tokens=4).token_ids
    assert len(tokens) == 4


def test_the_native_transport_takes_no_forwarders(tmp_path):
    with pytest.raises(ValueError, match="forwarders .* need transport 'loop'"):
        RouterConfig(model_dir=tmp_path, workers=WORKERS, transport="native", forwarders=2)
    with pytest.raises(ValueError, match="transport must be one of"):
        RouterConfig(model_dir=tmp_path, workers=WORKERS, transport="shm")
    with pytest.raises(ValueError, match="worker_connections must be in 1-64"):
        RouterConfig(model_dir=tmp_path, workers=WORKERS, worker_connections=0)
