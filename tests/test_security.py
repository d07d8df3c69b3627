"""TLS, mutual TLS and bearer tokens on every gRPC hop, with certificates made here.

A real cluster (router + expert worker processes) runs with TLS and a token: the SDK reaches it
only over TLS, trusting the CA, with the right token; the worker lets through only clients that
show a certificate from the cluster's CA, and only with the token; health stays open; no log
line shows a token. The command lines refuse plaintext unless asked, and name a bad file.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from expert_worker import main as worker_main
from moe_client import AsyncClient, Client, ClusterError
from moe_cluster import LocalCluster
from moe_core import grpc_server
from moe_core.security import Security, make_channel
from protos import expert_pb2, expert_pb2_grpc
from router import main as router_main

MODEL = "qwen3_moe"
TOKEN = "s3cret-Token_4711"
WRONG_TOKEN = "wrong-Token_0815"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


# --- certificates ------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(folder: Path, ca_name: str, sans: list[x509.GeneralName]) -> Path:
    """folder/ca.crt (a new CA), folder/tls.crt + tls.key (signed by it, for server and client
    use, with the given subject alternative names); returns folder."""
    folder.mkdir(parents=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _builder(ca_name, _name(ca_name), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        _builder(f"{ca_name} member", ca.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.crt").write_bytes(_pem(ca))
    (folder / "tls.crt").write_bytes(_pem(cert))
    (folder / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder


LOOPBACK = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")  # the trailing newline is not part of the token
    return {
        "trusted": make_pki(root / "trusted", "cluster CA", LOOPBACK),
        "untrusted": make_pki(root / "untrusted", "another CA", LOOPBACK),
        # a certificate that does not name the address it is reached at
        "named": make_pki(root / "named", "named CA", [x509.DNSName("expert-worker.test")]),
        "token": token_file,
    }


def read(folder: Path, *names: str) -> list[bytes]:
    return [(folder / name).read_bytes() for name in names]


@pytest.fixture(scope="module")
def cluster(checkpoints, pki, tmp_path_factory):
    """One router and one worker, mutual TLS between them, TLS to clients, a token everywhere.
    The router's calls to the worker go through a forwarder process, which must show the same
    certificate and token; the worker has a front process, which must check them as it does."""
    logs = tmp_path_factory.mktemp("logs")
    with LocalCluster(
        checkpoints.get(MODEL),
        workers=1,
        precision="fp32",
        router_args=(
            "--max-batch-size",
            "4",
            "--max-seq-len",
            "64",
            "--forwarders",
            "1",
            "--forwarder-min-mib",
            "0",
        ),
        worker_args=("--fronts", "1"),
        log_dir=logs,
        tls_dir=pki["trusted"],
        auth_token_file=pki["token"],
    ) as running:
        yield running


def secure_client(cluster, pki, **kwargs) -> Client:
    return Client(cluster.address, timeout=60, tls_ca=pki["trusted"] / "ca.crt", **kwargs)


def cluster_error(call) -> ClusterError:
    with pytest.raises(ClusterError) as caught:
        call()
    return caught.value


# --- the client API ----------------------------------------------------------------------------


def test_generate_and_logits_over_tls_with_the_token(cluster, pki):
    with secure_client(cluster, pki, token=TOKEN) as client:
        info = client.info()
        assert [w["healthy"] for w in info["workers"]] == [True]
        logits = client.logits([1, 2, 3])
        assert logits.shape == (3, info["vocab_size"]) and np.isfinite(logits).all()
        result = client.generate(token_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True)
        assert len(result.token_ids) == 3
        # greedy: the first generated token is the argmax of the last row of logits
        assert result.token_ids[0] == int(np.argmax(logits[-1]))

    async def async_generate():
        async with AsyncClient(
            cluster.address,
            timeout=60,
            tls_ca=read(pki["trusted"], "ca.crt")[0],
            token_file=pki["token"],
        ) as client:
            return await client.generate(token_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True)

    assert asyncio.run(async_generate()).token_ids == result.token_ids


@pytest.mark.parametrize("token", [None, WRONG_TOKEN], ids=["no-token", "wrong-token"])
def test_calls_without_the_right_token_are_unauthenticated(cluster, pki, token):
    with secure_client(cluster, pki, token=token) as client:
        calls = [
            client.info,
            lambda: client.logits([1, 2, 3]),
            lambda: client.generate(token_ids=[1, 2, 3], max_new_tokens=2),
        ]
        for call in calls:
            error = cluster_error(call)
            assert error.code == UNAUTHENTICATED, error
            assert "token" in error.details
            assert TOKEN not in error.details and WRONG_TOKEN not in error.details


def test_a_plaintext_client_cannot_reach_the_tls_router(cluster):
    with Client(cluster.address, timeout=10, token=TOKEN) as client:
        assert cluster_error(client.info).code == UNAVAILABLE


def test_a_client_that_does_not_trust_the_cluster_ca_fails(cluster, pki):
    untrusted_ca = pki["untrusted"] / "ca.crt"
    with Client(cluster.address, timeout=10, tls_ca=untrusted_ca, token=TOKEN) as client:
        assert cluster_error(client.info).code == UNAVAILABLE


def test_health_and_reflection_need_no_token(cluster, pki):
    router_tls = grpc.ssl_channel_credentials(*read(pki["trusted"], "ca.crt"))
    with grpc.secure_channel(cluster.address, router_tls) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert "moe_cluster.v1.RouterService" in names
    worker_mtls = grpc.ssl_channel_credentials(
        *read(pki["trusted"], "ca.crt", "tls.key", "tls.crt")
    )
    with grpc.secure_channel(cluster.workers[0].address, worker_mtls) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- the router -> worker hop ------------------------------------------------------------------


def worker_get_info(address: str, credentials, metadata=None) -> expert_pb2.WorkerInfo:
    # a connection of its own each time: it may land on the worker or on its front
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        return stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10, metadata=metadata)


@pytest.mark.parametrize("attempt", range(4))  # connections spread over the worker and its front
def test_the_worker_accepts_only_clients_with_a_certificate_from_the_cluster_ca(
    cluster, pki, attempt
):
    address = cluster.workers[0].address
    ca = read(pki["trusted"], "ca.crt")[0]
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    # a router-like client with the cluster's certificate and the token gets through
    trusted = grpc.ssl_channel_credentials(ca, *read(pki["trusted"], "tls.key", "tls.crt"))
    assert list(worker_get_info(address, trusted, bearer).expert_ids)
    # ... not without the token
    with pytest.raises(grpc.RpcError) as caught:
        worker_get_info(address, trusted)
    assert caught.value.code() == UNAUTHENTICATED
    # the token does not replace the certificate: a certificate from another CA, or none
    strangers = {
        "untrusted certificate": grpc.ssl_channel_credentials(
            ca, *read(pki["untrusted"], "tls.key", "tls.crt")
        ),
        "no certificate": grpc.ssl_channel_credentials(ca),
    }
    for what, credentials in strangers.items():
        with pytest.raises(grpc.RpcError) as caught:
            worker_get_info(address, credentials, bearer)
        assert caught.value.code() == UNAVAILABLE, what


def test_worker_tls_server_name_checks_a_name_other_than_the_address(pki):
    """The router reaches workers by IP; their certificates may name them otherwise."""
    named = pki["named"]
    worker = Security.load(named / "tls.crt", named / "tls.key", named / "ca.crt")

    async def health(address: str, server_name: str | None) -> grpc.StatusCode:
        async with make_channel(address, worker, server_name=server_name) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    async def run() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server, port, _ = await grpc_server.start_server(
            lambda server: None,
            "test.Service",
            "127.0.0.1",
            0,
            credentials=worker.server_credentials(require_client_auth=True),
        )
        address = f"127.0.0.1:{port}"
        try:
            return await health(address, None), await health(address, "expert-worker.test")
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == (UNAVAILABLE, grpc.StatusCode.OK)


# --- logs --------------------------------------------------------------------------------------


def test_no_log_line_shows_a_token(cluster, pki):
    # a rejected call after the tests above made sure that the logs hold rejections
    with secure_client(cluster, pki, token=WRONG_TOKEN) as client:
        assert cluster_error(client.info).code == UNAUTHENTICATED
    logs = {proc.name: proc.log_path.read_text() for proc in cluster.processes}
    assert "rejected /moe_cluster.v1.RouterService/GetInfo" in logs["router"]
    assert "mutual TLS, bearer token" in logs["worker-0"]
    for name, text in logs.items():
        assert TOKEN not in text and WRONG_TOKEN not in text, name


# --- the command lines -------------------------------------------------------------------------


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """Runs a server's main in this process until it fails -> (exit status, stderr)."""
    try:
        status = main(argv)
    except SystemExit as done:
        status = done.code
    return status, capsys.readouterr().err


def serve_argv(which: str, model: Path, *security: str) -> list[str]:
    placement = ["--workers", "127.0.0.1:1"] if which == "router" else ["--shard", "0/1"]
    return ["serve", "--model", str(model), *placement, "--port", "0", *security]


MAINS = {"router": router_main.main, "worker": worker_main.main}


@pytest.mark.parametrize("which", MAINS)
def test_plaintext_only_when_asked_for(which, checkpoints, pki, capsys):
    model, tls = checkpoints.get(MODEL), pki["trusted"]
    status, err = run_main(MAINS[which], serve_argv(which, model), capsys)
    assert status == 2 and "--insecure" in err and "--tls-cert" in err
    partial = ["--tls-cert", str(tls / "tls.crt"), "--tls-key", str(tls / "tls.key")]
    status, err = run_main(MAINS[which], serve_argv(which, model, *partial), capsys)
    assert status == 2 and "--tls-ca" in err
    both = [*partial, "--tls-ca", str(tls / "ca.crt"), "--insecure"]
    status, err = run_main(MAINS[which], serve_argv(which, model, *both), capsys)
    assert status == 2 and "--insecure" in err
    if which == "router":  # a name to check in certificates that are never asked for
        plain = ["--insecure", "--worker-tls-server-name", "expert-worker.test"]
        status, err = run_main(MAINS[which], serve_argv(which, model, *plain), capsys)
        assert status == 2 and "--worker-tls-server-name needs TLS" in err


@pytest.mark.parametrize("which", MAINS)
def test_a_bad_certificate_key_or_token_file_exits_1_naming_the_file(
    which, checkpoints, pki, tmp_path, capsys
):
    model, tls, other = checkpoints.get(MODEL), pki["trusted"], pki["untrusted"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    empty_token = tmp_path / "empty-token"
    empty_token.write_text("\n")
    good = {"--tls-cert": tls / "tls.crt", "--tls-key": tls / "tls.key", "--tls-ca": tls / "ca.crt"}
    cases = [
        ({"--tls-cert": tmp_path / "missing.crt"}, tmp_path / "missing.crt"),
        ({"--tls-ca": garbage}, garbage),
        ({"--tls-key": other / "tls.key"}, other / "tls.key"),  # not the certificate's key
        ({"--auth-token-file": empty_token}, empty_token),
    ]
    for change, named in cases:
        flags = {**good, **change}
        argv = serve_argv(which, model, *(str(x) for pair in flags.items() for x in pair))
        status, err = run_main(MAINS[which], argv, capsys)
        assert status == 1, err
        assert str(named) in err and "Traceback" not in err
