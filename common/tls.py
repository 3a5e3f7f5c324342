"""TLS settings shared by server and client: file paths in, gRPC credentials out."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """TLS options are incomplete or point at unreadable files."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path | None = None  # own certificate chain (PEM)
    key: Path | None = None  # own private key (PEM)
    ca: Path | None = None  # CA that signs the peer (server: client CA for mutual TLS; client: server CA)

    @property
    def enabled(self) -> bool:
        return any((self.cert, self.key, self.ca))

    def _read(self, path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise TLSConfigError("a TLS server needs both --tls-cert and --tls-key")
        key, cert = self._read(self.key, "TLS key"), self._read(self.cert, "TLS certificate")
        ca = self._read(self.ca, "client CA")
        assert key is not None and cert is not None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("mutual TLS needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca, "server CA"),
            private_key=self._read(self.key, "TLS key"),
            certificate_chain=self._read(self.cert, "TLS certificate"),
        )


def ssl_context(tls: TLSFiles) -> ssl.SSLContext | None:
    """An HTTPS server context from the certificate and key (client certificates required with a CA);
    None without a certificate. Unreadable or mismatched files raise TLSConfigError naming the file."""
    if tls.cert is None or tls.key is None:
        if tls.enabled:
            raise TLSConfigError("HTTPS needs both --tls-cert and --tls-key")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"cannot use TLS certificate {tls.cert} with key {tls.key}: {exc}; give a PEM certificate "
            "chain and the private key that belongs to it"
        ) from exc
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot read client CA {tls.ca}: {exc}; give a PEM CA certificate") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds only the loopback interface (127.0.0.0/8, ::1, localhost)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
