"""All protobuf ↔ domain conversion of the server, in one place."""

from __future__ import annotations

import time

from common.algorithms.abstention import Threshold
from common.stubs.fcl.v1 import fcl_pb2 as pb
from fcl_server.classify import Classification, ClassifyQuery
from fcl_server.errors import InvalidArgument
from fcl_server.fm_host import FMInfo
from fcl_server.service import (
    SERVER_VERSION,
    ClientView,
    Receipt,
    Registration,
    StatusView,
    UploadHeader,
    UploadProgress,
)
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Job, JobState

_JOB_STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.PERSONALIZING: pb.JOB_STATE_RUNNING,  # G is published; the personalised head is being made
    JobState.DONE: pb.JOB_STATE_DONE,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.SUPERSEDED: pb.JOB_STATE_SUPERSEDED,
}
_SCOPES = {GLOBAL: pb.HEAD_SCOPE_GLOBAL, PERSONAL: pb.HEAD_SCOPE_PERSONAL}


def fm_info(info: FMInfo) -> pb.FoundationModelInfo:
    return pb.FoundationModelInfo(
        name=info.name,
        digest=info.digest,
        feature_dim=info.feature_dim,
        archive_size=info.archive_size,
        archive_sha256=info.archive_blob,
        encoding_json=info.encoding.canonical_json() if info.encoding else "",
        files_digest=info.files_digest,
    )


def registration(reg: Registration) -> pb.RegisterResponse:
    return pb.RegisterResponse(
        client_id=reg.client_id,
        foundation_model=fm_info(reg.fm),
        fm_matches=reg.fm_matches,
        server_version=SERVER_VERSION,
        personal_head_version=reg.personal_version,
    )


def upload_header(msg: pb.UploadHeader) -> UploadHeader:
    return UploadHeader(
        upload_id=msg.upload_id,
        task_key=msg.task_key,
        task_index=msg.task_index,
        fm_digest=msg.fm_digest,
        size=msg.size,
        sha256=msg.sha256.lower(),
        offset=msg.offset,
    )


def receipt(rec: Receipt) -> pb.UploadReceipt:
    return pb.UploadReceipt(
        upload_id=rec.upload_id, job_id=rec.job_id, duplicate=rec.duplicate, size=rec.size, sha256=rec.sha256
    )


def upload_status(progress: UploadProgress) -> pb.UploadStatus:
    return pb.UploadStatus(
        upload_id=progress.upload_id,
        committed_size=progress.committed,
        size=progress.size,
        sha256=progress.sha256,
        complete=progress.receipt is not None,
        receipt=receipt(progress.receipt) if progress.receipt else None,
    )


def job_state(state: JobState) -> pb.JobState.ValueType:
    return _JOB_STATES[state]


def job_event(job: Job, queue_position: int = 0) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=job.job_id,
        state=job_state(job.state),
        message=job.message,
        global_version=job.global_version,
        personal_version=job.personal_version,
        timestamp=time.time(),
        queue_position=queue_position,
    )


def head_scope(scope: pb.HeadScope.ValueType) -> str:
    return GLOBAL if scope == pb.HEAD_SCOPE_GLOBAL else PERSONAL


def classify_query(msg: pb.ClassifyRequest) -> ClassifyQuery:
    """The request as the domain takes it; its bounds are the domain's to check (fcl_server/classify.py)."""
    if msg.scope not in (pb.HEAD_SCOPE_UNSPECIFIED, pb.HEAD_SCOPE_PERSONAL, pb.HEAD_SCOPE_GLOBAL):
        raise InvalidArgument(
            f"scope {msg.scope} is not a HeadScope: use HEAD_SCOPE_GLOBAL (2) or HEAD_SCOPE_PERSONAL (1)"
        )
    return ClassifyQuery(list(msg.texts), msg.top_k, head_scope(msg.scope), msg.client_id)


def classify_response(result: Classification) -> pb.ClassifyResponse:
    head = result.version
    return pb.ClassifyResponse(
        scope=_SCOPES[head.scope],
        client_id=head.client_id,
        head_version=head.version,
        num_labels=head.num_labels,
        results=[
            pb.TextLabels(
                labels=[pb.LabelScore(label=s.label, probability=s.probability) for s in row.labels],
                out_of_scope=row.out_of_scope,
                confidence=row.confidence,
            )
            for row in result.results
        ],
        abstention=_abstention(result.abstention),
    )


def _abstention(threshold: Threshold | None) -> pb.Abstention | None:
    if threshold is None:
        return None
    return pb.Abstention(
        score=threshold.score,
        threshold=threshold.value,
        coverage=threshold.coverage,
        calibrated_on=threshold.source,
    )


def knowledge_header(head: HeadVersion, size: int) -> pb.KnowledgeHeader:
    return pb.KnowledgeHeader(
        scope=_SCOPES[head.scope],
        client_id=head.client_id,
        version=head.version,
        size=size,
        sha256=head.blob,
        num_labels=head.num_labels,
        job_id=head.job_id,
    )


def job_status(job: Job) -> pb.JobStatus:
    duration = job.finished - job.started if job.finished and job.started else 0.0
    return pb.JobStatus(
        job_id=job.job_id,
        client_id=job.client_id,
        upload_id=job.upload_id,
        task_key=job.task_key,
        task_index=job.task_index,
        state=job_state(job.state),
        global_version=job.global_version,
        personal_version=job.personal_version,
        created=job.created,
        finished=job.finished,
        message=job.message,
        duration_s=duration,
    )


def client_status(view: ClientView) -> pb.ClientStatus:
    return pb.ClientStatus(
        client_id=view.client_id,
        last_seen=view.last_seen,
        personal_version=view.personal_version,
        uploads=view.uploads,
        last_metrics=view.last_metrics,
    )


def server_status(view: StatusView) -> pb.ServerStatus:
    return pb.ServerStatus(
        foundation_model=fm_info(view.fm),
        global_version=view.global_version,
        num_labels=view.num_labels,
        queue_depth=view.queue_depth,
        clients=[client_status(c) for c in view.clients],
        jobs=[job_status(j) for j in view.jobs],
        uptime_s=view.uptime_s,
        server_version=SERVER_VERSION,
        workers=[
            pb.WorkerStatus(
                worker_id=w.worker_id,
                host=w.host,
                pid=w.pid,
                started=w.started,
                heartbeat=w.heartbeat,
                job_id=w.job_id,
            )
            for w in view.workers
        ],
    )
