"""The committed gRPC stubs match what `make proto` generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "tools/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_stubs_ship_type_stubs_and_import_from_the_package() -> None:
    stubs = ROOT / "common" / "stubs" / "fcl" / "v1"
    assert {"fcl_pb2.py", "fcl_pb2.pyi", "fcl_pb2_grpc.py", "fcl_pb2_grpc.pyi"} <= {
        p.name for p in stubs.iterdir()
    }
    from common.stubs.fcl.v1 import fcl_pb2, fcl_pb2_grpc

    assert fcl_pb2.DESCRIPTOR.package == "fcl.v1"
    assert hasattr(fcl_pb2_grpc, "FclServiceStub")
