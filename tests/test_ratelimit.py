"""Per-client upload rate limits: token buckets, and RESOURCE_EXHAUSTED over gRPC without state change."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from common.fm import FoundationModel
from fcl_client.connection import Connection
from fcl_server.ratelimit import RateLimiter
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
