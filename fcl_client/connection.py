"""Connection to fcl-server: auth metadata, deadlines, retries with backoff, chunked verified transfers."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from common import __version__
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.stubs.fcl.v1 import fcl_pb2_grpc
from common.tls import TLSFiles

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK_SIZE = 1024 * 1024  # upload chunk: a broken stream re-sends at most this (the server keeps the rest)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
WATCH_POLL_S, WATCH_POLL_MAX_S = 1.0, 10.0  # pauses before watching a job again that is not final yet
# gRPC's own reconnect backoff grows to 120 s by default; a restarted server should be found in seconds
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 4000)]


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
        chunk_size: int = CHUNK_SIZE,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        options = [*CHANNEL_OPTIONS, *channel_options]
        if tls is not None and tls.enabled:
            self.channel = grpc.secure_channel(target, tls.channel_credentials(), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = fcl_pb2_grpc.FclServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.chunk_size = chunk_size

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _retry(self, what: str, call: Callable[[], T], progress: Callable[[], int] | None = None) -> T:
        """Run `call`; on a transient status wait (exponential backoff, jittered) and try again.

        `progress` (bytes a transfer got through so far) resets the budget whenever it grew: a resumable
        transfer over a flaky link keeps going as long as each attempt moves it forward.
        """
        attempt, best = 0, -1
        while True:
            try:
                return call()
            except (grpc.RpcError, StreamEnded) as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNAVAILABLE
                if code not in RETRYABLE:
                    raise
                done = progress() if progress else -1
                if done > best:
                    best, attempt = done, 0
                if attempt >= self.retries:
                    raise
                # at least half the nominal delay, so the retries span a server restart (≥ 15 s by default)
                delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
                attempt += 1
                log.warning("%s: %s; retrying in %.1fs", what, code.name, delay)
                time.sleep(delay)

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

    def classify(
        self,
        texts: Sequence[str],
        top_k: int = 0,
        scope: pb.HeadScope.ValueType = pb.HEAD_SCOPE_PERSONAL,
        client_id: str = "",
    ) -> pb.ClassifyResponse:
        """The server's top-k labels of each text (at most 256 per call) from a head on its FM."""
        request = pb.ClassifyRequest(texts=list(texts), top_k=top_k, scope=scope, client_id=client_id)
        return self._retry(
            "Classify", lambda: self.stub.Classify(request, timeout=self.timeout, metadata=self.metadata)
        )

    # -- transfers ----------------------------------------------------------------------------
    def download_fm(
        self, dest: Path, progress: Callable[[int, int], None] | None = None
    ) -> pb.FoundationModelInfo:
        """Download the FM archive to `dest`, resuming a partial `dest.part`; verified by size and sha256.

        `progress` is told (bytes on disk, archive size) after each chunk.
        """
        part = dest.with_name(dest.name + ".part")
        pinned = ""  # sha256 of the archive the bytes on disk belong to, once a header named it
        digest = hashlib.sha256()  # of the bytes on disk, updated as they are written (no second pass)

        def on_disk() -> int:
            return part.stat().st_size if part.exists() else 0

        def attempt() -> pb.FoundationModelInfo:
            nonlocal pinned, digest
            offset = on_disk()
            digest = _prefix_sha256(part, offset)  # what an earlier attempt (or run) left on disk
            request = pb.GetFoundationModelRequest(offset=offset, archive_sha256=pinned)
            got: pb.FoundationModelInfo | None = None
            try:
                with part.open("ab") as fh:
                    for chunk in self.stub.GetFoundationModel(
                        request, timeout=self.timeout * 10, metadata=self.metadata
                    ):
                        if chunk.HasField("info"):
                            got = chunk.info
                            pinned = got.archive_sha256  # resumes must continue this very archive
                            continue
                        if chunk.offset != fh.tell():
                            raise TransferError(f"FM chunk at offset {chunk.offset}, expected {fh.tell()}")
                        data = chunk.data  # each read of a bytes field copies it: read it once
                        fh.write(data)
                        digest.update(data)
                        if progress is not None and got is not None:
                            progress(chunk.offset + len(data), got.archive_size)
            except grpc.RpcError as exc:
                stale = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT}
                if offset == 0 or not isinstance(exc, grpc.Call) or exc.code() not in stale:
                    raise
                # the archive changed (or the bytes on disk are not a prefix of it): start over
                part.unlink(missing_ok=True)
                pinned = ""
                raise StreamEnded(f"FM archive resume at {offset} refused ({exc.code().name})") from exc
            if got is None:
                raise TransferError("the server sent no FM archive header")
            return got

        info = self._retry("GetFoundationModel", attempt, progress=on_disk)
        if part.stat().st_size != info.archive_size or digest.hexdigest() != info.archive_sha256:
            part.unlink()
            raise TransferError("downloaded FM archive does not match its size/sha256; run again")
        part.replace(dest)
        return info

    def upload(
        self,
        data: bytes,
        upload_id: str,
        task_key: str,
        task_index: int,
        fm_digest: str,
        progress: Callable[[int, int], None] | None = None,
        fresh: bool = False,
    ) -> pb.UploadReceipt:
        """Upload a package; safe to repeat (idempotent by upload_id), so transient failures are retried.

        A broken stream resumes from the bytes the server already holds (GetUploadStatus); the receipt
        must name the package's size and sha256. `progress` is told (bytes handed to gRPC, package
        size) after each chunk. `fresh`: the caller made upload_id just now, so the server cannot hold
        any of it and the first attempt skips the GetUploadStatus round trip.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        held = 0  # most bytes the server was seen to hold: a retry that moved this forward is free
        ask_first = not fresh

        def messages(offset: int) -> Iterator[pb.UploadKnowledgeRequest]:
            header = pb.UploadHeader(
                upload_id=upload_id,
                task_key=task_key,
                task_index=task_index,
                fm_digest=fm_digest,
                size=len(data),
                sha256=sha256,
                offset=offset,
            )
            yield pb.UploadKnowledgeRequest(header=header)
            for start in range(offset, len(data), self.chunk_size):
                yield pb.UploadKnowledgeRequest(chunk=data[start : start + self.chunk_size])
                if progress is not None:
                    progress(min(start + self.chunk_size, len(data)), len(data))

        def attempt() -> pb.UploadReceipt:
            nonlocal held, ask_first
            status = self.upload_status(upload_id) if ask_first else pb.UploadStatus(upload_id=upload_id)
            ask_first = True  # a retry always asks: the broken attempt may have left bytes or a receipt
            if status.complete and status.receipt.sha256 == sha256:
                receipt = status.receipt  # accepted, but the receipt was lost with the connection
            else:
                same = (status.size, status.sha256) == (len(data), sha256) and not status.complete
                offset = status.committed_size if same else 0
                if offset:
                    log.info("UploadKnowledge %s: resuming at byte %d of %d", upload_id, offset, len(data))
                held = max(held, offset)
                receipt = self.stub.UploadKnowledge(
                    messages(offset), timeout=self.timeout * 5, metadata=self.metadata
                )
            if receipt.size != len(data) or receipt.sha256 != sha256:
                raise TransferError(f"upload {upload_id}: the receipt names other bytes than were sent")
            return receipt

        return self._retry("UploadKnowledge", attempt, progress=lambda: held)

    def upload_status(self, upload_id: str) -> pb.UploadStatus:
        """How much of an upload the server holds (an empty status from a server without resumption)."""
        request = pb.GetUploadStatusRequest(upload_id=upload_id)
        try:
            return self.stub.GetUploadStatus(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return pb.UploadStatus(upload_id=upload_id)
            raise

    def watch_job(
        self, job_id: int, on_event: Callable[[pb.JobEvent], None] | None = None, timeout: float = 3600.0
    ) -> pb.JobEvent:
        """Follow a job to its final state; returns the last event. `on_event` sees each change once.

        A busy server ends a watch before the job is final (it bounds how many streams wait and for how
        long): then the job is watched again after a pause that grows to WATCH_POLL_MAX_S. A broken
        stream is retried as any call is.
        """
        final = {pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED, pb.JOB_STATE_SUPERSEDED}
        deadline = time.monotonic() + timeout
        shown: tuple[int, int] | None = None  # (state, queue position) of the last event passed on

        def attempt() -> pb.JobEvent | None:
            nonlocal shown
            remaining = max(1.0, deadline - time.monotonic())
            last: pb.JobEvent | None = None
            # read on to the end: the server closes the stream right after the final event, so the call
            # completes OK instead of being cancelled by us (which the server would count as CANCELLED)
            for event in self.stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id), timeout=remaining, metadata=self.metadata
            ):
                last = event
                if on_event and shown != (event.state, event.queue_position):
                    on_event(event)
                shown = (event.state, event.queue_position)
            if last is None:
                raise StreamEnded(f"job {job_id} stream ended before any event")
            return last if last.state in final else None

        pause = WATCH_POLL_S
        while (event := self._retry("WatchJob", attempt)) is None:
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"job {job_id} is not final after {timeout:.0f}s")
            time.sleep(pause * random.uniform(0.75, 1.0))
            pause = min(WATCH_POLL_MAX_S, pause * 2)
        return event

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


def _prefix_sha256(path: Path, size: int, block: int = 1 << 20) -> hashlib._Hash:
    """sha256 state after the first `size` bytes of `path` (none when size is 0)."""
    digest = hashlib.sha256()
    if size:
        with path.open("rb") as fh:
            while size > 0 and (data := fh.read(min(block, size))):
                digest.update(data)
                size -= len(data)
    return digest


class StreamEnded(Exception):
    """A stream ended before it was done (WatchJob before a final state, a refused FM resume): retried."""
