"""How `Client` and `AsyncClient` reach a router: plaintext or TLS, and the bearer token.

    tls=False, tls_ca=None      plaintext (a local cluster)
    tls=True                    TLS, the server verified against the system's root CAs
    tls_ca=PATH or PEM bytes    TLS, the server verified against this CA bundle
    tls_server_name="router"    the name checked in the server's certificate instead of the host
    token="..." or token_file=PATH
                                every call carries metadata `authorization: Bearer <token>`

The token travels as call metadata rather than as call credentials: it works on plaintext
channels too (a local cluster with a token), and costs nothing extra per call.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from moe_client.messages import CHANNEL_OPTIONS


def _read(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None


def _ca_bundle(tls_ca) -> bytes:
    pem = bytes(tls_ca) if isinstance(tls_ca, (bytes, bytearray)) else _read(tls_ca, "tls_ca file")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        source = "tls_ca" if isinstance(tls_ca, (bytes, bytearray)) else f"tls_ca file {tls_ca}"
        raise ValueError(f"{source} holds no PEM certificate (BEGIN CERTIFICATE)")
    return pem


def _check_token(token: str, source: str) -> str:
    """token if it is one or more visible ASCII characters; the message never shows it."""
    if not isinstance(token, str) or not token:
        raise ValueError(f"{source} must be a non-empty string")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"{source} holds characters other than visible ASCII")
    return token


def call_metadata(token: str | None, token_file) -> tuple[tuple[str, str], ...] | None:
    """Metadata every call sends: the bearer token, if one is given (ValueError for both)."""
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token_file is not None:
        data = _read(token_file, "token_file")
        try:
            token = _check_token(data.decode("ascii").rstrip(), f"token_file {token_file}")
        except UnicodeDecodeError:
            raise ValueError(f"token_file {token_file} is not ASCII text") from None
    elif token is not None:
        token = _check_token(token, "token")
    else:
        return None
    return (("authorization", f"Bearer {token}"),)


def open_channel(
    address: str,
    tls: bool,
    tls_ca: str | os.PathLike | bytes | None,
    tls_server_name: str | None,
    aio: bool,
):
    """A grpc.Channel (aio=False) or grpc.aio.Channel to address; ValueError for bad arguments."""
    secure = tls or tls_ca is not None
    options = list(CHANNEL_OPTIONS)
    if tls_server_name is not None:
        if not secure:
            raise ValueError("tls_server_name needs TLS: give tls=True or tls_ca")
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    grpc_ = grpc.aio if aio else grpc
    if not secure:
        return grpc_.insecure_channel(address, options=options)
    root = None if tls_ca is None else _ca_bundle(tls_ca)
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc_.secure_channel(address, credentials, options=options)
