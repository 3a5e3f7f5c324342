"""Flower comparison: one Flower round (server + one client, gRPC, loopback) vs one upload + download here."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.perf.harness import ServerProcess, package_of_size
from benchmarks.perf.util import MB, median, timed
from fcl_client.connection import Connection

SCRIPT = Path(__file__).with_name("flower_round.py")
ROOT = Path(__file__).resolve().parents[2]


def find_flower_python(given: str | None) -> tuple[str | None, str]:
    """An interpreter that can import flwr: --flower-python, $FCL_FLOWER_PYTHON, or this one; else why not."""
    candidates = [c for c in (given, os.environ.get("FCL_FLOWER_PYTHON"), sys.executable) if c]
    for python in candidates:
        if shutil.which(python) or Path(python).exists():
            probe = subprocess.run([python, "-c", "import flwr"], capture_output=True, text=True)
            if probe.returncode == 0:
                return python, ""
    return None, (
        "flwr is not importable by any of " + ", ".join(candidates) + ". Flower 1.42 needs protobuf<7 while "
        "this project's stubs need protobuf 7, so install it into its own virtualenv "
        "(python -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr==1.42.0) and pass --flower-python"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "GRPC_VERBOSITY": "ERROR", "OMP_NUM_THREADS": "1"}


def _wait_listening(port: int, server: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Flower server exited (code {server.returncode}) before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the Flower server did not listen on port {port} within {timeout:.0f} s")


def flower_rounds(python: str, size_bytes: int, rounds: int, timeout: float = 600) -> dict[str, Any]:
    """Start a Flower server and one client process; the server's per-round times (round 1 dropped)."""
    port = _free_port()
    args = ["--port", str(port), "--size-bytes", str(size_bytes), "--rounds", str(rounds + 1)]
    server = subprocess.Popen(
        [python, str(SCRIPT), "server", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    client: subprocess.Popen[bytes] | None = None
    try:
        # a big payload takes the server seconds to build before it listens; a client started
        # earlier gives up on the refused connection and the server would wait for it forever
        _wait_listening(port, server, timeout=120)
        client = subprocess.Popen(
            [python, str(SCRIPT), "client", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        out, _ = server.communicate(timeout=timeout)
        client.wait(timeout=60)
    finally:
        for proc in (server, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if server.returncode != 0 or not lines:
        raise RuntimeError(f"the Flower server failed (exit {server.returncode})")
    doc = json.loads(lines[-1])
    doc["round_s"] = [r["seconds"] for r in doc["rounds"][1:]]  # round 1 warms the connection up
    return doc


def our_rounds(size_bytes: int, rounds: int, threads: int) -> dict[str, Any]:
    """One upload (a new valid package of `size_bytes`) plus one download of it, `rounds` + 1 times.

    Each round uploads other bytes, as a client's next task does (the same bytes again would only be
    deduplicated by the blob store); the downloaded file is removed between rounds, untimed, as Flower
    keeps no file either.
    """
    with tempfile.TemporaryDirectory(prefix="fcl-perf-flower-") as tmp:
        root = Path(tmp)
        server = ServerProcess(
            root,
            "--archive-bytes",
            str(size_bytes),
            "--threads",
            str(threads),
            "--max-upload-bytes",
            str(size_bytes + 16 * MB),
        )
        try:
            info = server.info
            digest, dest, times = info["fm_digest"], root / "download.tar", []
            # made before the first round: torch's threads, busy making one, would slow the round after it
            packages = [package_of_size(digest, size_bytes, seed=seed) for seed in range(rounds + 1)]
            with Connection(f"127.0.0.1:{info['port']}", info["tokens"][0], timeout=600) as conn:
                conn.register("client-0", digest)
                for data in packages:
                    dest.unlink(missing_ok=True)
                    times.append(timed(functools.partial(one_round, conn, data, digest, dest))[0])
        finally:
            server.close()
    return {"round_s": times[1:], "bytes_up": len(packages[0])}


def one_round(conn: Connection, data: bytes, fm_digest: str, dest: Path) -> None:
    conn.upload(data, uuid.uuid4().hex, "task-0", 0, fm_digest, fresh=True)
    conn.download_fm(dest)


def rounds_for(size_mb: int, rounds: int) -> int:
    """More rounds for small payloads: their few milliseconds vary more from round to round."""
    return max(rounds, rounds * 16 // max(1, size_mb))


def blocks_of(rounds: int, block: int = 12) -> list[int]:
    """Rounds split into turns of about `block` (one turn when there are few)."""
    turns = max(1, rounds // block)
    return [rounds // turns + (1 if i < rounds % turns else 0) for i in range(turns)]


def run(sizes_mb: list[int], rounds: int, threads: int, flower_python: str | None) -> dict[str, Any]:
    python, why = find_flower_python(flower_python)
    result: dict[str, Any] = {
        "what": (
            "separate server and client processes on loopback, both sides (our server logs at INFO, as "
            "fcl-server does by default); Flower: legacy gRPC transport "
            "(flwr.server.start_server / flwr.client.start_client), one round = server sends float32 "
            "arrays of the size, the client's fit() returns them; ours: Connection.upload of a valid "
            "package of the size (new bytes each round) + Connection.download_fm of a blob of the same "
            "size (sha256-verified, to disk; removed between rounds, untimed); ratio = Flower round "
            "seconds / ours (>= 1: ours no slower); medians, first round of each turn dropped; "
            "rounds × 16 MB / size of them below 16 MB, so a round of milliseconds is timed often enough, "
            "in turns of about 12 rounds, Flower's and ours alternating"
        ),
        "flower_python": python,
        "sizes": [],
    }
    if python is None:
        result["skipped"] = why
        result["ratio_min"] = None
        return result
    for size_mb in sizes_mb:
        size = size_mb * MB
        n = rounds_for(size_mb, rounds)
        flower_s: list[float] = []
        ours_s: list[float] = []
        try:
            for block in blocks_of(n):  # Flower and ours take turns, so a slow spell hits both
                flower = flower_rounds(python, size, block)
                flower_s += flower["round_s"]
                ours_s += our_rounds(size, block, threads)["round_s"]
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # say so, measure the other sizes
            result["sizes"].append({"size_bytes": size, "error": f"Flower: {exc}"[:300]})
            continue
        result["flwr_version"] = flower.get("flwr")
        result["sizes"].append(
            {
                "size_bytes": size,
                "flower_round_s": median(flower_s),
                "ours_round_s": median(ours_s),
                "ratio": median(flower_s) / median(ours_s),
                "flower_runs_s": flower_s,
                "ours_runs_s": ours_s,
            }
        )
    ratios = [s["ratio"] for s in result["sizes"] if "ratio" in s]
    result["ratio_min"] = min(ratios) if ratios else None
    return result
