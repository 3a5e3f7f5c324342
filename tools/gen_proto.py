"""Generate the Python gRPC stubs (with .pyi) from protos/ into common/stubs/ (`make proto`)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
STUBS_PACKAGE = "common.stubs"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc into out_dir and make the generated imports package-relative to common.stubs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grpc_include = Path(protoc.__file__).parent / "_proto"
    # the mypy-protobuf plugins live next to this interpreter (the venv's bin/)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        # protoc writes absolute imports ("from fcl.v1 import ..."); rewrite them into our package.
        fixed = re.sub(r"^from fcl\.v1 import", f"from {STUBS_PACKAGE}.fcl.v1 import", text, flags=re.M)
        fixed = re.sub(r"^import fcl\.v1\.", f"import {STUBS_PACKAGE}.fcl.v1.", fixed, flags=re.M)
        path.write_text(fixed)
    for pkg in [out_dir / "fcl", out_dir / "fcl" / "v1"]:
        (pkg / "__init__.py").write_text("")


def generated_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and (p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py")
        and "fcl" in p.relative_to(root).parts
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if committed stubs are stale")
    args = parser.parse_args(argv)
    target = ROOT / "common" / "stubs"
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp))
        if args.check:
            current = generated_files(target)
            if current != fresh:
                stale = sorted(set(current) ^ set(fresh) | {k for k in fresh if current.get(k) != fresh[k]})
                print(f"stale stubs in common/stubs: {stale}; run `make proto`", file=sys.stderr)
                return 1
            return 0
        shutil.rmtree(target / "fcl", ignore_errors=True)
        for rel, text in fresh.items():
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    print(f"generated {len(fresh)} files into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
