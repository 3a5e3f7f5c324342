"""The Node.js client (clients/node) against a real in-process server: health, Register, GetStatus as JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from common.fm import FoundationModel
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_client.connection import Connection
from fcl_server.app import RunningServer
from tests.servers import inprocess_server, package_bytes

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "clients" / "node"
HEALTH_PROTO = NODE_DIR / "proto" / "grpc" / "health" / "v1" / "health.proto"
STAMP = NODE_DIR / "node_modules" / ".fcl-installed.json"  # lock digest and install time of the last npm ci
NODE = shutil.which("node")
NETWORK_ERRORS = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node is not installed (clients/node needs Node.js >= 18.3)"
)


def lock_digest() -> str:
    return hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """clients/node/node_modules as package-lock.json pins it: `npm ci` only when missing or stale.

    npm's own cache (~/.npm) makes a re-install offline; the install time is printed and kept in STAMP.
    """
    if STAMP.exists() and json.loads(STAMP.read_text())["lock_sha256"] == lock_digest():
        return NODE_DIR / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install clients/node's dependencies")
    started = time.monotonic()
    # --ignore-scripts: the only install script (protobufjs's) is for its code generator, unused here
    cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"]
    done = subprocess.run(cmd, cwd=NODE_DIR, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if NETWORK_ERRORS.search(done.stderr):
            pytest.skip(f"npm ci could not reach the registry: {done.stderr.strip()[-300:]}")
        pytest.fail(f"npm ci failed:\n{done.stderr[-3000:]}")
    seconds = round(time.monotonic() - started, 1)
    STAMP.write_text(json.dumps({"lock_sha256": lock_digest(), "npm_ci_seconds": seconds}))
    print(f"\nnpm ci in clients/node took {seconds} s", file=sys.stderr)
    return NODE_DIR / "node_modules"


@dataclass
class Server:
    running: RunningServer
    target: str
    tokens: Path  # directory holding client-0.token and ops.token


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fm: FoundationModel) -> Iterator[Server]:
    """A server whose client-0 uploaded one package: one job done, one head version, four labels."""
    tmp = tmp_path_factory.mktemp("node")
    running = inprocess_server(tmp, fm)
    running.state.add_token("tok-client-0", "client-0", False)
    running.state.add_token("tok-ops", "ops", True)
    (tmp / "client-0.token").write_text("tok-client-0\n")
    (tmp / "ops.token").write_text("tok-ops\n")
    target = f"127.0.0.1:{running.port}"
    with Connection(target, "tok-client-0") as conn:
        receipt = conn.upload(package_bytes(fm, ["a", "b", "c", "d"]), "up-1", "task-0", 0, fm.digest)
        assert conn.watch_job(receipt.job_id, timeout=120).state == pb.JOB_STATE_DONE
    yield Server(running, target, tmp)
    running.stop(grace=1)


def node_client(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "client.js", *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


@needs_node
def test_node_client_checks_health_registers_and_reads_the_status(
    node_modules: Path, server: Server, fm: FoundationModel
) -> None:
    tokens = server.tokens
    code, out, err = node_client(
        "--server",
        server.target,
        "--client-id",
        "client-0",
        "--token-file",
        str(tokens / "client-0.token"),
        "--admin-token-file",
        str(tokens / "ops.token"),
    )
    assert code == 0, err
    assert out["health"] == {"status": "SERVING"}
    reg = out["register"]
    assert reg["client_id"] == "client-0" and reg["foundation_model"]["digest"] == fm.digest
    assert reg["fm_matches"] is False and reg["personal_head_version"] == "1"  # int64: a string, as in JSON
    with Connection(server.target, "tok-ops") as admin:
        expected = admin.status()
    status = out["status"]
    assert (status["global_version"], status["num_labels"], status["queue_depth"]) == ("1", 4, 0)
    assert (int(status["global_version"]), status["num_labels"]) == (
        expected.global_version,
        expected.num_labels,
    )
    (client,) = status["clients"]
    assert (client["client_id"], client["uploads"], client["personal_version"]) == ("client-0", 1, "1")
    (job,) = status["jobs"]
    assert (job["job_id"], job["upload_id"], job["state"]) == ("1", "up-1", "JOB_STATE_DONE")
    assert status["foundation_model"]["feature_dim"] == fm.feature_dim


@needs_node
def test_node_client_asks_only_what_it_is_told_and_reports_refusals(
    node_modules: Path, server: Server
) -> None:
    code, out, _ = node_client("--server", server.target, "--service", "fcl.v1.FclService", "health")
    assert (code, out) == (0, {"health": {"status": "SERVING"}})
    # the token travels in the environment here; a wrong one is refused and named in the output
    env = {"FCL_TOKEN": "fcl_not-a-token"}
    code, out, _ = node_client("--server", server.target, "--client-id", "client-0", env=env)
    assert code == 1 and out["health"] == {"status": "SERVING"} and "register" not in out
    assert out["error"]["call"] == "Register" and out["error"]["code"] == "UNAUTHENTICATED"
    # a client token is not an admin token
    code, out, _ = node_client(
        "--server", server.target, "--admin-token-file", str(server.tokens / "client-0.token"), "status"
    )
    assert code == 1 and out["error"]["call"] == "GetStatus" and out["error"]["code"] == "PERMISSION_DENIED"
    code, out, err = node_client("--server", server.target, "status")
    assert code == 2 and out == {} and "needs an admin token" in err


@needs_node
def test_node_client_over_mutual_tls(node_modules: Path, tmp_path: Path, fm: FoundationModel) -> None:
    certs = tmp_path / "certs"
    subprocess.run(
        [str(ROOT / "deploy" / "make-certs.sh"), str(certs), "localhost", "client-0"],
        check=True,
        capture_output=True,
    )
    running = inprocess_server(
        tmp_path,
        fm,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
    )
    running.state.add_token("tok-client-0", "client-0", False)
    tls = ["--tls-ca", str(certs / "ca.pem")]
    try:
        target = f"localhost:{running.port}"
        mutual = [*tls, "--tls-cert", str(certs / "client-0.pem"), "--tls-key", str(certs / "client-0.key")]
        env = {"FCL_TOKEN": "tok-client-0"}
        code, out, err = node_client("--server", target, "--client-id", "client-0", *mutual, env=env)
        assert code == 0 and out["register"]["client_id"] == "client-0", err
        code, out, _ = node_client("--server", target, *tls, "health")  # no client certificate: refused
        assert code == 1 and out["error"]["code"] == "UNAVAILABLE"
    finally:
        running.stop(grace=1)


def test_the_vendored_health_proto_is_the_one_the_server_serves(tmp_path: Path) -> None:
    """clients/node/proto holds grpc.health.v1 unchanged: same messages, fields, enums and methods."""
    from grpc_tools import protoc

    out = tmp_path / "health.desc"
    args = ["protoc", f"-I{NODE_DIR / 'proto'}", f"--descriptor_set_out={out}", "grpc/health/v1/health.proto"]
    assert protoc.main(args) == 0
    vendored = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    served = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(served)
    vendored.ClearField("name")  # grpc/health/v1/health.proto vs grpc_health/v1/health.proto
    served.ClearField("name")
    for message in (*vendored.message_type, *(n for m in vendored.message_type for n in m.nested_type)):
        for field in message.field:
            field.ClearField("json_name")  # protoc fills it in; the embedded descriptor leaves it out
    assert vendored == served
    assert HEALTH_PROTO.read_text().startswith("// Copyright 2015 The gRPC Authors")


def test_the_node_dependencies_are_pinned_and_locked() -> None:
    package = json.loads((NODE_DIR / "package.json").read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    deps = package["dependencies"]
    assert set(deps) == {"@grpc/grpc-js", "@grpc/proto-loader"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in deps.values()), deps  # exact versions, no ranges
    for name, version in deps.items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert all("integrity" in p for key, p in lock["packages"].items() if key), (
        "every locked package has a hash"
    )
    assert "node_modules/" in (ROOT / ".gitignore").read_text().splitlines()
