"""Property-based tests (hypothesis): proto↔domain conversion and the knowledge-package validator."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.package import (
    KnowledgePackage,
    PackageError,
    decode_package,
    encode_package,
    validate_package_file,
)
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.zoo import SmallModel, parse_spec
from fcl_server import convert
from fcl_server.state import Job, JobState

ids = st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=40)
sha = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)
int32 = st.integers(min_value=0, max_value=2**31 - 1)
int63 = st.integers(min_value=0, max_value=2**63 - 1)
seconds = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(upload_id=ids, task_key=ids, task_index=int32, fm_digest=sha, size=int63, digest=sha)
def test_upload_header_survives_the_wire(
    upload_id: str, task_key: str, task_index: int, fm_digest: str, size: int, digest: str
) -> None:
    msg = pb.UploadHeader(
        upload_id=upload_id,
        task_key=task_key,
        task_index=task_index,
        fm_digest=fm_digest,
        size=size,
        sha256=digest,
    )
    header = convert.upload_header(pb.UploadHeader.FromString(msg.SerializeToString()))
    assert (header.upload_id, header.task_key, header.task_index, header.size) == (
        upload_id,
        task_key,
        task_index,
        size,
    )
    assert header.sha256 == digest.lower() and header.fm_digest == fm_digest


@given(
    job_id=int63,
    client=ids,
    upload=ids,
    task=ids,
    index=int32,
    state=st.sampled_from(list(JobState)),
    created=seconds,
    started=seconds,
    finished=seconds,
    gv=int63,
    pv=int63,
    message=st.text(max_size=200),
)
def test_job_status_keeps_every_field(
    job_id: int,
    client: str,
    upload: str,
    task: str,
    index: int,
    state: JobState,
    created: float,
    started: float,
    finished: float,
    gv: int,
    pv: int,
    message: str,
) -> None:
    job = Job(
        job_id, client, upload, task, index, "0" * 64, state, message, created, started, finished, gv, pv
    )
    msg = pb.JobStatus.FromString(convert.job_status(job).SerializeToString())
    assert (msg.job_id, msg.client_id, msg.upload_id, msg.task_key, msg.task_index) == (
        job_id,
        client,
        upload,
        task,
        index,
    )
    wire = "RUNNING" if state is JobState.PERSONALIZING else state.name  # still running, on the wire
    assert pb.JobState.Name(msg.state) == f"JOB_STATE_{wire}"
    assert (msg.global_version, msg.personal_version, msg.message) == (gv, pv, message)
    assert msg.created == created and msg.finished == finished


def _package(num_labels: int, spec: str) -> bytes:
    torch.manual_seed(num_labels)
    labels = [f"label_{i}" for i in range(num_labels)]
    model = SmallModel(parse_spec(spec), 8, num_labels)
    return encode_package(KnowledgePackage.from_model(model, labels, "d" * 64, "small", [1] * num_labels))


@settings(max_examples=30, deadline=None)
@given(
    num_labels=st.integers(1, 12), spec=st.sampled_from(["linear", "mlp:4", "mlp:6,3:gelu", "mlp:5:tanh:ln"])
)
def test_valid_packages_round_trip(num_labels: int, spec: str) -> None:
    pkg = decode_package(_package(num_labels, spec))
    assert pkg.labels == [f"label_{i}" for i in range(num_labels)] and pkg.build().num_labels == num_labels


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_corrupted_packages_fail_only_with_package_error(data: st.DataObject) -> None:
    """Any byte flips, truncation or junk either still decode (harmless bytes) or raise PackageError."""
    blob = bytearray(_package(3, "mlp:4"))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    candidate = bytes(blob[:cut]) + data.draw(st.binary(max_size=16))
    try:
        pkg = decode_package(candidate)
    except PackageError as exc:
        with pytest.raises(PackageError) as from_file:
            _validate_on_disk(candidate)
        # the server's file check says the same (safetensors words its own detail per reader)
        assert str(from_file.value).split(" file: ")[0] == str(exc).split(" file: ")[0]
        return
    assert all(torch.isfinite(t).all() for t in pkg.weights.values())
    checked = _validate_on_disk(candidate)
    assert (checked.labels, checked.spec, checked.weights) == (pkg.labels, pkg.spec, {})


def _validate_on_disk(data: bytes) -> KnowledgePackage:
    """validate_package_file (what the server runs on a received upload) on `data` written to a file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "package.safetensors"
        path.write_bytes(data)
        return validate_package_file(path)
