"""What secures a server's gRPC hops, read once at start-up: a TLS identity and a bearer token.

    security = Security.load(tls_cert=..., tls_key=..., tls_ca=..., token_file=...)
    credentials = security.server_credentials(require_client_auth=True)  # None: plaintext
    interceptors = security.server_interceptors()  # checks the token, if any
    channel = make_channel("10.0.0.7:50061", security, server_name="expert-worker")

One identity serves both directions: a worker shows its certificate to the router, and the router
shows its own certificate to the workers as a client certificate, so the certificate must allow
server and client authentication (extended key usages serverAuth and clientAuth, or none).
`--tls-ca` verifies the peer in both directions.

A file that cannot be read or holds no valid PEM raises `SecretFileError`, whose message names the
file; nothing here logs or repeats the contents of a key or a token.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from moe_core.auth import BearerTokenCallInterceptor, BearerTokenInterceptor, check_token
from moe_core.grpc_server import GRPC_OPTIONS


class SecretFileError(Exception):
    """A certificate, key or token file that is missing, unreadable or malformed."""


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecretFileError(f"cannot read the {what} {path}: {err.strerror or err}") from None


def _check_certificates(path: Path, pem: bytes, what: str) -> None:
    """Raises SecretFileError unless pem holds one or more valid PEM certificates."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SecretFileError(f"the {what} {path} holds no PEM certificate (BEGIN CERTIFICATE)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as err:
        raise SecretFileError(f"the {what} {path} is not a valid PEM certificate: {err}") from None


def _no_password() -> bytes:
    return b""  # an encrypted key fails instead of prompting on a terminal


@dataclass(frozen=True)
class TlsIdentity:
    """PEM bytes of a certificate chain, its private key and the CA bundle that verifies peers."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    ca: bytes = field(repr=False)

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path) -> TlsIdentity:
        """Reads and checks the three PEM files; SecretFileError names the first bad one.

        Checks: each file is readable; cert and ca hold valid certificates; key is an
        unencrypted private key that matches cert.
        """
        cert, key, ca = Path(cert), Path(key), Path(ca)
        cert_pem = _read(cert, "TLS certificate")
        key_pem = _read(key, "TLS private key")
        ca_pem = _read(ca, "TLS CA bundle")
        _check_certificates(cert, cert_pem, "TLS certificate")
        if b"PRIVATE KEY-----" not in key_pem:
            raise SecretFileError(f"the TLS private key {key} holds no PEM private key")
        if b"ENCRYPTED" in key_pem:
            raise SecretFileError(
                f"the TLS private key {key} is encrypted; give an unencrypted key"
            )
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, _no_password)
        except ssl.SSLError as err:
            if err.reason == "KEY_VALUES_MISMATCH":
                raise SecretFileError(
                    f"the TLS private key {key} does not belong to the certificate {cert}"
                ) from None
            raise SecretFileError(f"the TLS private key {key} is not a valid key: {err}") from None
        _check_certificates(ca, ca_pem, "TLS CA bundle")
        return cls(cert_pem, key_pem, ca_pem)

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """Serves with this certificate; with require_client_auth, only clients showing a
        certificate signed by the CA get through the handshake."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.ca if require_client_auth else None,
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verifies servers against the CA and shows this certificate as the client's."""
        return grpc.ssl_channel_credentials(self.ca, self.private_key, self.cert_chain)


def read_token_file(path: Path) -> str:
    """The bearer token in path, trailing whitespace (a final newline) stripped.

    SecretFileError when the file cannot be read or the token is empty or not visible ASCII;
    the message names the file, never the token.
    """
    data = _read(path, "token file")
    try:
        token = data.decode("ascii").rstrip()
    except UnicodeDecodeError:
        raise SecretFileError(f"the token file {path} is not ASCII text") from None
    try:
        return check_token(token, f"the token file {path}")
    except ValueError as err:
        raise SecretFileError(str(err)) from None


@dataclass(frozen=True)
class Security:
    """A server's TLS identity (None: plaintext) and bearer token (None: no token)."""

    identity: TlsIdentity | None = None
    token: str | None = field(default=None, repr=False)

    @classmethod
    def load(
        cls,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
        token_file: Path | None = None,
    ) -> Security:
        """Reads the files given. The three TLS files go together (ValueError otherwise);
        SecretFileError names a file that cannot be used."""
        tls = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
        missing = [name for name, path in tls.items() if path is None]
        if missing and len(missing) < len(tls):
            raise ValueError(f"TLS needs a certificate, its key and a CA; missing {missing}")
        identity = None if missing else TlsIdentity.load(tls_cert, tls_key, tls_ca)
        token = None if token_file is None else read_token_file(token_file)
        return cls(identity, token)

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials | None:
        """TLS credentials of a server; None for plaintext."""
        if self.identity is None:
            return None
        return self.identity.server_credentials(require_client_auth)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.token is None else [BearerTokenInterceptor(self.token)]

    def server_settings(self, require_client_auth: bool) -> dict:
        """The credentials and interceptors arguments of `moe_core.grpc_server.start_server`."""
        return {
            "credentials": self.server_credentials(require_client_auth),
            "interceptors": self.server_interceptors(),
        }

    def describe(self, require_client_auth: bool) -> str:
        """For the start-up log line, e.g. 'mutual TLS, bearer token'."""
        tls = "plaintext" if self.identity is None else "TLS"
        if self.identity is not None and require_client_auth:
            tls = "mutual TLS"
        return f"{tls}, {'bearer token' if self.token else 'no token'}"


def make_channel(
    address: str,
    security: Security | None = None,
    server_name: str | None = None,
    options: list[tuple[str, object]] | None = None,
) -> grpc.aio.Channel:
    """An aio channel to another moe-cluster server (the router's channel to a worker).

    With an identity: TLS, verifying the server against the CA and showing the identity as the
    client certificate; `server_name` replaces the address's host in that check (workers
    reached by pod IP). With a token: every call carries it. No security: plaintext.
    """
    security = security or Security()
    options = list(GRPC_OPTIONS if options is None else options)
    interceptors = None if security.token is None else [BearerTokenCallInterceptor(security.token)]
    if security.identity is None:
        if server_name is not None:
            raise ValueError("a TLS server name needs TLS")
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = security.identity.channel_credentials()
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
