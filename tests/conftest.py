"""Shared fixtures: the real FM (loaded once per session) and small task streams from the built-in data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import pg
from common.datasets import builtin
from common.datasets.split import split_dataset, write_split
from common.fm import FoundationModel


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention (10-50x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fm() -> FoundationModel:
    return FoundationModel(device="cpu")


@pytest.fixture(scope="session")
def small_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in data as 2 tasks x 2 clients (4 domains per task from the first 8 domains)."""
    groups = dict(list(builtin.load_groups().items())[:8])
    labels = {y for ys in groups.values() for y in ys}
    train = [ex for ex in builtin.load_train() if ex.label in labels]
    test = [ex for ex in builtin.load_test() if ex.label in labels]
    result = split_dataset(train, test, num_tasks=2, num_clients=2, alpha=1.0, seed=0, label_groups=groups)
    out = tmp_path_factory.mktemp("split")
    write_split(result, builtin.load_public()[:600], out)
    return out


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.Cluster]:
    """A PostgreSQL cluster of this test session (skipped where PostgreSQL is not installed)."""
    bin_dir = pg.bindir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
            "`make test` installs it with apt where it can"
        )
    cluster = pg.Cluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres: pg.Cluster) -> str:
    """The URL of an empty database of its own, password included (postgresql+psycopg://...)."""
    return postgres.new_database()
