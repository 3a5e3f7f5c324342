"""Per-client upload limits (uploads per minute, MiB per hour): token buckets, RESOURCE_EXHAUSTED via gRPC."""

from __future__ import annotations

import math
import re
from pathlib import Path

import grpc
import pytest

from common.fm import FoundationModel
from fcl_client.connection import Connection
from fcl_server.ratelimit import MIB, ByteQuota, RateLimiter
from tests.servers import inprocess_server, package_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=2, clock=clock)
    assert limiter.try_acquire("a") == 0 and limiter.try_acquire("a") == 0
    assert limiter.try_acquire("a") == pytest.approx(30.0)  # one token every 30 s
    assert limiter.try_acquire("b") == 0  # buckets are per client
    clock.now = 30.0
    assert limiter.try_acquire("a") == 0 and limiter.try_acquire("a") > 0
    assert RateLimiter(per_minute=0).try_acquire("a") == 0  # 0 disables


def test_upload_over_the_rate_is_refused_and_retries_stay_free(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm, uploads_per_minute=2)
    try:
        server.state.add_token("tok", "client-0", False)
        data = package_bytes(fm, ["x_label", "y_label"])
        with Connection(f"127.0.0.1:{server.port}", "tok", retries=0) as conn:
            first = conn.upload(data, "u-1", "task-00", 0, fm.digest)
            conn.upload(data, "u-2", "task-01", 1, fm.digest)
            with pytest.raises(grpc.RpcError) as exc:
                conn.upload(data, "u-3", "task-02", 2, fm.digest)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "uploads per minute" in exc.value.details()  # type: ignore[attr-defined]
            again = conn.upload(
                data, "u-1", "task-00", 0, fm.digest
            )  # an idempotent retry is not rate-limited
            assert again.duplicate and again.job_id == first.job_id
        assert len(server.state.jobs()) == 2
    finally:
        server.stop(grace=1)


def test_byte_quota_charges_bytes_and_refills_over_the_hour() -> None:
    clock = FakeClock()
    quota = ByteQuota(mb_per_hour=2, clock=clock)  # 2 MiB per hour: one MiB every 1800 s
    assert quota.try_acquire("a", 1.5 * MIB) == 0
    assert quota.try_acquire("a", 1 * MIB) == pytest.approx(900.0)  # 0.5 MiB short
    assert quota.try_acquire("b", 2 * MIB) == 0  # buckets are per client
    clock.now = 900.0
    assert quota.try_acquire("a", 1 * MIB) == 0 and quota.try_acquire("a", 1) > 0
    assert math.isinf(quota.try_acquire("a", 2 * MIB + 1))  # more than a full bucket: waiting never helps
    assert ByteQuota(mb_per_hour=0).try_acquire("a", 10**12) == 0  # 0 disables


def test_refund_gives_tokens_back_up_to_capacity() -> None:
    clock = FakeClock()
    quota = ByteQuota(mb_per_hour=1, clock=clock)
    assert quota.try_acquire("a", MIB) == 0 and quota.try_acquire("a", MIB) > 0
    quota.refund("a", MIB)
    assert quota.try_acquire("a", MIB) == 0
    quota.refund("a", 5 * MIB)  # never above a full bucket
    assert quota.try_acquire("a", MIB) == 0 and quota.try_acquire("a", 1) > 0


def test_upload_over_the_byte_quota_is_refused_and_retries_stay_free(
    tmp_path: Path, fm: FoundationModel
) -> None:
    # 1 MiB per hour; each package (130 labels: weights and class statistics) is about 0.6 MB
    server = inprocess_server(tmp_path, fm, upload_mb_per_hour=1)
    server.worker.stop()  # accepted uploads stay queued: distilling them is not what is tested
    try:
        server.state.add_token("tok-0", "client-0", False)
        server.state.add_token("tok-1", "client-1", False)
        data = package_bytes(fm, [f"label_{i}" for i in range(130)])
        assert MIB / 2 < len(data) < MIB
        target = f"127.0.0.1:{server.port}"
        with Connection(target, "tok-0", retries=0) as conn:
            first = conn.upload(data, "u-1", "task-00", 0, fm.digest)
            with pytest.raises(grpc.RpcError) as exc:
                conn.upload(data, "u-2", "task-01", 1, fm.digest)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            details = exc.value.details()  # type: ignore[attr-defined]
            assert "quota of 1 MiB uploaded per hour" in details
            wait = int(re.search(r"retry in (\d+)s", details).group(1))  # type: ignore[union-attr]
            short = len(data) - (MIB - len(data))  # bytes missing from the bucket
            assert wait == pytest.approx(short / MIB * 3600, abs=5)
            again = conn.upload(data, "u-1", "task-00", 0, fm.digest)  # an idempotent retry is free
            assert again.duplicate and again.job_id == first.job_id
        with Connection(target, "tok-1", retries=0) as other:
            assert not other.upload(data, "u-1", "task-00", 0, fm.digest).duplicate  # its own quota
        assert sorted(j.client_id for j in server.state.jobs()) == ["client-0", "client-1"]
    finally:
        server.stop(grace=1)


def test_upload_larger_than_the_whole_quota_says_so(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm, upload_mb_per_hour=1)
    server.worker.stop()  # accepted uploads stay queued: distilling them is not what is tested
    try:
        server.state.add_token("tok", "client-0", False)
        data = package_bytes(fm, [f"label_{i}" for i in range(260)])
        assert len(data) > MIB
        with Connection(f"127.0.0.1:{server.port}", "tok", retries=0) as conn:
            with pytest.raises(grpc.RpcError) as exc:
                conn.upload(data, "u-1", "task-00", 0, fm.digest)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "larger than the whole quota of 1 MiB per hour" in exc.value.details()  # type: ignore[attr-defined]
            conn.upload(
                package_bytes(fm, ["x_label"]), "u-2", "task-00", 0, fm.digest
            )  # small ones still pass
        assert len(server.state.jobs()) == 1
    finally:
        server.stop(grace=1)


def test_upload_refused_by_the_rate_does_not_spend_its_bytes(tmp_path: Path, fm: FoundationModel) -> None:
    server = inprocess_server(tmp_path, fm, uploads_per_minute=1, upload_mb_per_hour=1)
    server.worker.stop()  # accepted uploads stay queued: distilling them is not what is tested
    try:
        server.state.add_token("tok", "client-0", False)
        data = package_bytes(fm, [f"label_{i}" for i in range(60)])  # about 0.28 MB
        with Connection(f"127.0.0.1:{server.port}", "tok", retries=0) as conn:
            conn.upload(data, "u-1", "task-00", 0, fm.digest)
            for attempt in range(3):
                with pytest.raises(grpc.RpcError) as exc:
                    conn.upload(data, f"u-{attempt + 2}", "task-01", 1, fm.digest)
                assert "uploads per minute" in exc.value.details()  # type: ignore[attr-defined]
        # had the three refused uploads been charged, the MiB would be spent: two more fit, not three
        assert server.service.upload_quota.try_acquire("client-0", 2 * len(data)) == 0
    finally:
        server.stop(grace=1)
