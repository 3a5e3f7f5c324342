"""TLS and mutual TLS between a real server and clients; plaintext only on loopback unless --insecure."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.fm import FoundationModel
from common.tls import TLSConfigError, TLSFiles, is_loopback
from fcl_client.connection import Connection
from fcl_server.app import RunningServer, ServerConfig
from tests.servers import inprocess_server


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA with a server certificate (localhost, 127.0.0.1) and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fcl-test-ca",
        cwd=d,
    )
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:client-0")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


def _server(tmp_path: Path, fm: FoundationModel, pki: Path, mutual: bool) -> RunningServer:
    server = inprocess_server(
        tmp_path,
        fm,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem" if mutual else None,
    )
    server.state.add_token("tok-0", "client-0", False)
    return server


@pytest.fixture
def tls_server(tmp_path: Path, fm: FoundationModel, pki: Path) -> Iterator[RunningServer]:
    server = _server(tmp_path, fm, pki, mutual=False)
    yield server
    server.stop(grace=1)


@pytest.fixture
def mtls_server(tmp_path: Path, fm: FoundationModel, pki: Path) -> Iterator[RunningServer]:
    server = _server(tmp_path, fm, pki, mutual=True)
    yield server
    server.stop(grace=1)


def test_client_talks_to_a_tls_server(tls_server: RunningServer, pki: Path, fm: FoundationModel) -> None:
    with Connection(f"127.0.0.1:{tls_server.port}", "tok-0", tls=TLSFiles(ca=pki / "ca.pem")) as conn:
        assert conn.register("client-0", fm.digest).fm_matches


def test_plaintext_client_cannot_reach_a_tls_server(tls_server: RunningServer) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    with Connection(target, "tok-0", timeout=3, retries=0) as conn, pytest.raises(grpc.RpcError) as exc:
        conn.register("client-0", "")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mutual_tls_requires_a_client_certificate(mtls_server: RunningServer, pki: Path) -> None:
    target = f"127.0.0.1:{mtls_server.port}"
    server_only = TLSFiles(ca=pki / "ca.pem")
    with (
        Connection(target, "tok-0", timeout=3, retries=0, tls=server_only) as conn,
        pytest.raises(grpc.RpcError),
    ):
        conn.register("client-0", "")
    mutual = TLSFiles(cert=pki / "client.pem", key=pki / "client.key", ca=pki / "ca.pem")
    with Connection(target, "tok-0", tls=mutual) as conn:
        assert conn.register("client-0", "").client_id == "client-0"


def test_plaintext_on_a_public_address_needs_insecure(tmp_path: Path) -> None:
    cfg = ServerConfig(state_dir=tmp_path, listen="0.0.0.0:50051", device="cpu")
    with pytest.raises(TLSConfigError, match="--insecure"):
        cfg.check_transport()
    ServerConfig(state_dir=tmp_path, listen="0.0.0.0:50051", device="cpu", insecure=True).check_transport()
    ServerConfig(state_dir=tmp_path, listen="127.0.0.1:50051", device="cpu").check_transport()


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.9.9.9:1", True),
        ("localhost:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.1.2.3:1", False),
        ("fcl.example.org:1", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_incomplete_tls_options_are_explained(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="--tls-key"):
        TLSFiles(cert=tmp_path / "x.pem").server_credentials()
    with pytest.raises(TLSConfigError, match="cannot read"):
        TLSFiles(cert=tmp_path / "missing.pem", key=tmp_path / "missing.key").server_credentials()
