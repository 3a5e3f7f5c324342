"""Transfer: UploadKnowledge / GetFoundationModel against a plain grpcio bytes echo, same chunks, same run."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from benchmarks.perf.harness import enroll, package_of_size, serve_synthetic_archive, start_server
from benchmarks.perf.util import MB, RssSampler, median, timed
from common.fm import FoundationModel
from common.package import PackageLimits, decode_package
from fcl_client import connection as client_connection
from fcl_client.connection import Connection
from fcl_server import servicer as server_servicer

RAW_SERVICE = "perf.RawEcho"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


# -- the reference: plain grpcio, raw bytes (no protobuf), data discarded ------------------------------
def _raw_upload(requests: Iterator[bytes], _context: Any) -> bytes:
    total = 0
    for chunk in requests:
        total += len(chunk)
    return total.to_bytes(8, "little")


def _raw_upload_verified(requests: Iterator[bytes], _context: Any) -> bytes:
    digest = hashlib.sha256()
    for chunk in requests:
        digest.update(chunk)
    return digest.digest()


def _raw_upload_durable(directory: str | None, requests: Iterator[bytes], _context: Any) -> bytes:
    """The least a durable, verified upload does: sha256 while receiving, write to a file, fsync."""
    digest = hashlib.sha256()
    with tempfile.TemporaryFile(dir=directory) as fh:
        for chunk in requests:
            digest.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.digest()


def _raw_download(request: bytes, _context: Any) -> Iterator[bytes]:
    size, chunk = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:16], "little")
    block = bytes(chunk)
    for start in range(0, size, chunk):
        yield block if start + chunk <= size else block[: size - start]


def start_raw_server(max_workers: int = 8, durable_dir: str | None = None) -> tuple[grpc.Server, int]:
    """The reference echo server; its durable upload writes into `durable_dir` (the server's disk)."""
    handler = grpc.method_handlers_generic_handler(
        RAW_SERVICE,
        {
            "Up": grpc.stream_unary_rpc_method_handler(_raw_upload),
            "UpVerified": grpc.stream_unary_rpc_method_handler(_raw_upload_verified),
            "UpDurable": grpc.stream_unary_rpc_method_handler(
                functools.partial(_raw_upload_durable, durable_dir)
            ),
            "Down": grpc.unary_stream_rpc_method_handler(_raw_download),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def raw_upload(channel: grpc.Channel, data: bytes, chunk: int) -> int:
    return int.from_bytes(raw_upload_call(channel, "Up", data, chunk), "little")


def raw_download(channel: grpc.Channel, size: int, chunk: int) -> int:
    call = channel.unary_stream(f"/{RAW_SERVICE}/Down")
    return sum(len(block) for block in call(size.to_bytes(8, "little") + chunk.to_bytes(8, "little")))


def verified_upload(channel: grpc.Channel, data: bytes, chunk: int) -> None:
    """The least a verified upload does: sha256 before sending, sha256 while receiving, compare."""
    expected = hashlib.sha256(data).digest()
    if raw_upload_call(channel, "UpVerified", data, chunk) != expected:
        raise RuntimeError("verified raw upload: digest mismatch")


def durable_upload(channel: grpc.Channel, data: bytes, chunk: int) -> None:
    """Verified upload whose receiver also writes the bytes to disk and fsyncs them (as ours must)."""
    if raw_upload_call(channel, "UpDurable", data, chunk) != hashlib.sha256(data).digest():
        raise RuntimeError("durable raw upload: digest mismatch")


def verified_download(channel: grpc.Channel, size: int, chunk: int) -> None:
    """The least a verified download does: sha256 over the chunks as they arrive."""
    call = channel.unary_stream(f"/{RAW_SERVICE}/Down")
    digest = hashlib.sha256()
    for block in call(size.to_bytes(8, "little") + chunk.to_bytes(8, "little")):
        digest.update(block)
    digest.hexdigest()


def raw_upload_call(channel: grpc.Channel, method: str, data: bytes, chunk: int) -> bytes:
    call = channel.stream_unary(f"/{RAW_SERVICE}/{method}")
    return bytes(call(data[i : i + chunk] for i in range(0, len(data), chunk)))


# -- ours -------------------------------------------------------------------------------------------------
class _PhaseMarks:
    """Wraps the server's upload steps to time-stamp them: receiving ends where validation begins."""

    def __init__(self, server: Any, sampler: RssSampler) -> None:
        self.service, self.sampler = server.service, sampler
        self._finish, self._validate = self.service.finish_upload, self.service._validate_package

    def __enter__(self) -> _PhaseMarks:
        def finish(*args: Any) -> Any:
            self.sampler.mark("received")
            return self._finish(*args)

        def validate(*args: Any) -> Any:
            self.sampler.mark("validate")
            try:
                return self._validate(*args)
            finally:
                self.sampler.mark("validated")

        self.service.finish_upload, self.service._validate_package = finish, validate
        return self

    def __exit__(self, *_: object) -> None:
        self.service.finish_upload, self.service._validate_package = self._finish, self._validate


def our_upload(conn: Connection, data: bytes, digest: str) -> float:
    """Seconds of one Connection.upload of a new upload id (nothing sampled meanwhile)."""
    return timed(lambda: conn.upload(data, uuid.uuid4().hex, "task-0", 0, digest, fresh=True))[0]


def our_upload_memory(server: Any, conn: Connection, data: bytes, digest: str) -> dict[str, float]:
    """One more upload with the server's memory sampled, split into receiving and validating."""
    with RssSampler() as sampler, _PhaseMarks(server, sampler):
        conn.upload(data, uuid.uuid4().hex, "task-0", 0, digest, fresh=True)
    received = sampler.marks.get("received", float("inf"))
    validate = sampler.marks.get("validate", received)
    validated = sampler.marks.get("validated", validate)
    return {
        "rss_growth_receiving_mb": sampler.peak_growth(end=received) / MB,
        "rss_growth_validating_mb": sampler.peak_growth(validate, validated) / MB,
        "validate_s": validated - validate,
    }


def our_download(conn: Connection, dest: Path, sampled: bool = False) -> dict[str, float]:
    dest.unlink(missing_ok=True)
    if not sampled:
        seconds = timed(lambda: conn.download_fm(dest))[0]
        dest.unlink(missing_ok=True)
        return {"seconds": seconds}
    with RssSampler() as sampler:
        conn.download_fm(dest)
    dest.unlink(missing_ok=True)
    return {"rss_growth_mb": sampler.peak_growth() / MB}


def _mbps(size: int, seconds: float) -> float:
    return size / MB / seconds if seconds > 0 else float("nan")


def measure_size(
    server: Any, raw: grpc.Channel, conn: Connection, fm_digest: str, size_mb: int, repeat: int, work: Path
) -> dict[str, Any]:
    """One payload size: upload and download, ours and raw interleaved `repeat` times; medians."""
    data = package_of_size(fm_digest, size_mb * MB)
    size = len(data)
    up_chunk, down_chunk = conn.chunk_size, server_servicer.CHUNK_SIZE
    serve_synthetic_archive(server, size)
    runs: dict[str, list[float]] = {
        k: [] for k in ("raw_up", "ver_up", "dur_up", "up", "raw_down", "ver_down", "down")
    }
    for _ in range(repeat):  # interleaved, so a noisy moment hits every variant alike
        runs["raw_up"].append(timed(lambda: raw_upload(raw, data, up_chunk))[0])
        runs["ver_up"].append(timed(lambda: verified_upload(raw, data, up_chunk))[0])
        runs["dur_up"].append(timed(lambda: durable_upload(raw, data, up_chunk))[0])
        runs["up"].append(our_upload(conn, data, fm_digest))
        runs["raw_down"].append(timed(lambda: raw_download(raw, size, down_chunk))[0])
        runs["ver_down"].append(timed(lambda: verified_download(raw, size, down_chunk))[0])
        runs["down"].append(our_download(conn, work / "archive.tar")["seconds"])
    memory = our_upload_memory(server, conn, data, fm_digest)
    down_memory = our_download(conn, work / "archive.tar", sampled=True)
    sha_s = timed(lambda: hashlib.sha256(data).hexdigest())[0]
    decode_s = timed(lambda: decode_package(data, PackageLimits(max_bytes=size)))[0]
    med = {k: median(v) for k, v in runs.items()}
    validation_s = memory["validate_s"]
    return {
        "size_bytes": size,
        "upload_chunk_bytes": up_chunk,
        "download_chunk_bytes": down_chunk,
        "upload_mb_s": _mbps(size, med["up"]),
        "raw_upload_mb_s": _mbps(size, med["raw_up"]),
        "verified_raw_upload_mb_s": _mbps(size, med["ver_up"]),
        "upload_ratio": med["raw_up"] / med["up"],
        "upload_ratio_vs_verified_raw": med["ver_up"] / med["up"],
        "durable_raw_upload_mb_s": _mbps(size, med["dur_up"]),
        "upload_ratio_vs_durable_raw": med["dur_up"] / med["up"],
        "upload_ratio_without_validation": med["raw_up"] / max(1e-9, med["up"] - validation_s),
        "download_mb_s": _mbps(size, med["down"]),
        "raw_download_mb_s": _mbps(size, med["raw_down"]),
        "verified_raw_download_mb_s": _mbps(size, med["ver_down"]),
        "download_ratio": med["raw_down"] / med["down"],
        "download_ratio_vs_verified_raw": med["ver_down"] / med["down"],
        "runs_s": runs,
        "server_rss_growth_receiving_mb": memory["rss_growth_receiving_mb"],
        "server_rss_growth_validating_mb": memory["rss_growth_validating_mb"],
        "validation_s": validation_s,
        "client_download_rss_growth_mb": down_memory["rss_growth_mb"],
        "sha256_s": sha_s,
        "decode_package_s": decode_s,
    }


def run(fm: FoundationModel, sizes_mb: list[int], repeat: int) -> dict[str, Any]:
    """Every size through one server and one raw echo server, both in this process on loopback."""
    max_bytes = max(sizes_mb) * MB + 16 * MB
    with tempfile.TemporaryDirectory(prefix="fcl-perf-transfer-") as tmp:
        work = Path(tmp)
        server = start_server(work, fm, max_upload_bytes=max_bytes)
        raw_server, raw_port = start_raw_server(durable_dir=tmp)  # the disk the server's state is on
        raw = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=GRPC_OPTIONS)
        conn = Connection(f"127.0.0.1:{server.port}", enroll(server, "perf-client"), timeout=600)
        try:
            conn.register("perf-client", fm.digest)
            raw_upload(raw, bytes(1024), 1024)  # warm both channels up
            results = [measure_size(server, raw, conn, fm.digest, s, repeat, work) for s in sizes_mb]
        finally:
            conn.close()
            raw.close()
            raw_server.stop(None)
            server.stop(grace=1)
    ratios = [min(r["upload_ratio"], r["download_ratio"]) for r in results]
    verified = [min(r["upload_ratio_vs_verified_raw"], r["download_ratio_vs_verified_raw"]) for r in results]
    durable = [r["upload_ratio_vs_durable_raw"] for r in results]  # a reference for uploads only
    return {
        "what": (
            "in-process server and client on loopback; reference = plain grpcio stream of raw bytes "
            "(no protobuf, data discarded) with the same chunk size; verified reference = the same plus "
            "sha256 before sending and while receiving (the least a verified transfer does); durable "
            "reference = verified plus writing the bytes to a file on the server's disk and fsync (the "
            "least a durable upload does); ours = Connection.upload of a new upload id (sha256, "
            "UploadKnowledge incl. server-side disk write, sha256, fsync, package validation tensor by "
            "tensor, SQLite commit of the upload and its job) and Connection.download_fm "
            "(GetFoundationModel to disk, sha256 verified); payloads are valid `mlp` knowledge "
            "packages; medians of the timed runs (no memory sampling in them), then one more run of "
            "each with the server's anonymous RSS sampled every 2 ms"
        ),
        "client_chunk_bytes": client_connection.CHUNK_SIZE,
        "server_chunk_bytes": server_servicer.CHUNK_SIZE,
        "sizes": results,
        "ratio_min": min(ratios),
        "ratio_vs_verified_raw_min": min(verified),
        "ratio_vs_durable_raw_min": min(durable),
        "ratio_min_without_validation": min(
            min(r["upload_ratio_without_validation"], r["download_ratio"]) for r in results
        ),
    }
