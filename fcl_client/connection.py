"""Connection to fcl-server: auth metadata, deadlines, retries with backoff, chunked verified transfers."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from common import __version__
from common.fm import file_sha256
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from common.tls import TLSFiles

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK_SIZE = 1024 * 1024
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


class TransferError(RuntimeError):
    """Bytes received do not match the announced size or sha256."""


class Connection:
    def __init__(
        self,
        target: str,
        token: str,
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.5,
        tls: TLSFiles | None = None,
    ) -> None:
        self.target = target
        if tls is not None and tls.enabled:
            self.channel = grpc.secure_channel(target, tls.channel_credentials())
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = fcl_pb2_grpc.FclServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Run `call`; on a transient status wait (exponential backoff with full jitter) and try again."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (grpc.RpcError, StreamEnded) as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNAVAILABLE
                if code not in RETRYABLE or attempt == self.retries:
                    raise
                delay = random.uniform(0, self.backoff * 2**attempt)
                log.warning("%s: %s; retrying in %.1fs", what, code.name, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- unary calls --------------------------------------------------------------------------
    def register(self, client_id: str, fm_digest: str, model_spec_json: str = "") -> pb.RegisterResponse:
        request = pb.RegisterRequest(
            client_id=client_id,
            fm_digest=fm_digest,
            client_version=__version__,
            model_spec_json=model_spec_json,
        )
        return self._retry(
            "Register", lambda: self.stub.Register(request, timeout=self.timeout, metadata=self.metadata)
        )

    def report_metrics(self, task_key: str, task_index: int, metrics: dict[str, float]) -> int:
        request = pb.ReportMetricsRequest(task_key=task_key, task_index=task_index, metrics=metrics)
        response = self._retry(
            "ReportMetrics",
            lambda: self.stub.ReportMetrics(request, timeout=self.timeout, metadata=self.metadata),
        )
        return int(response.stored)

    def status(self, max_jobs: int = 100) -> pb.ServerStatus:
        request = pb.GetStatusRequest(max_jobs=max_jobs)
        return self._retry(
            "GetStatus", lambda: self.stub.GetStatus(request, timeout=self.timeout, metadata=self.metadata)
        )

    # -- transfers ----------------------------------------------------------------------------
    def download_fm(self, dest: Path) -> pb.FoundationModelInfo:
        """Download the FM archive to `dest`, resuming a partial `dest.part`; verified by size and sha256."""
        part = dest.with_name(dest.name + ".part")
        info: pb.FoundationModelInfo | None = None

        def attempt() -> pb.FoundationModelInfo:
            offset = part.stat().st_size if part.exists() else 0
            request = pb.GetFoundationModelRequest(
                offset=offset, archive_sha256=info.archive_sha256 if info else ""
            )
            got: pb.FoundationModelInfo | None = None
            with part.open("ab") as fh:
                for chunk in self.stub.GetFoundationModel(
                    request, timeout=self.timeout * 10, metadata=self.metadata
                ):
                    if chunk.HasField("info"):
                        got = chunk.info
                        continue
                    fh.write(chunk.data)
            if got is None:
                raise TransferError("the server sent no FM archive header")
            return got

        info = self._retry("GetFoundationModel", attempt)
        if part.stat().st_size != info.archive_size or file_sha256(part) != info.archive_sha256:
            part.unlink()
            raise TransferError("downloaded FM archive does not match its size/sha256; run again")
        part.replace(dest)
        return info

    def upload(
        self, data: bytes, upload_id: str, task_key: str, task_index: int, fm_digest: str
    ) -> pb.UploadReceipt:
        """Upload a package; safe to repeat (idempotent by upload_id), so transient failures are retried."""
        header = pb.UploadHeader(
            upload_id=upload_id,
            task_key=task_key,
            task_index=task_index,
            fm_digest=fm_digest,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

        def messages() -> Iterator[pb.UploadKnowledgeRequest]:
            yield pb.UploadKnowledgeRequest(header=header)
            for start in range(0, len(data), CHUNK_SIZE):
                yield pb.UploadKnowledgeRequest(chunk=data[start : start + CHUNK_SIZE])

        return self._retry(
            "UploadKnowledge",
            lambda: self.stub.UploadKnowledge(messages(), timeout=self.timeout * 5, metadata=self.metadata),
        )

    def watch_job(
        self, job_id: int, on_event: Callable[[pb.JobEvent], None] | None = None, timeout: float = 3600.0
    ) -> pb.JobEvent:
        """Follow a job to its final state (reconnecting if the stream breaks); returns the last event."""
        final = {pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED, pb.JOB_STATE_SUPERSEDED}
        deadline = time.monotonic() + timeout

        def attempt() -> pb.JobEvent:
            remaining = max(1.0, deadline - time.monotonic())
            for event in self.stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id), timeout=remaining, metadata=self.metadata
            ):
                if on_event:
                    on_event(event)
                if event.state in final:
                    return event
            raise StreamEnded(f"job {job_id} stream ended before a final state")

        return self._retry("WatchJob", attempt)

    def get_knowledge(
        self, scope: pb.HeadScope.ValueType = pb.HEAD_SCOPE_PERSONAL, version: int = 0, client_id: str = ""
    ) -> tuple[pb.KnowledgeHeader, bytes]:
        request = pb.GetKnowledgeRequest(scope=scope, version=version, client_id=client_id)

        def attempt() -> tuple[pb.KnowledgeHeader, bytes]:
            header: pb.KnowledgeHeader | None = None
            parts: list[bytes] = []
            for msg in self.stub.GetKnowledge(request, timeout=self.timeout * 5, metadata=self.metadata):
                if msg.WhichOneof("payload") == "header":
                    header = msg.header
                else:
                    parts.append(msg.chunk)
            data = b"".join(parts)
            if (
                header is None
                or len(data) != header.size
                or hashlib.sha256(data).hexdigest() != header.sha256
            ):
                raise TransferError("knowledge head does not match its announced size/sha256")
            return header, data

        return self._retry("GetKnowledge", attempt)


class StreamEnded(Exception):
    """A WatchJob stream closed before a final state: retried like UNAVAILABLE."""
