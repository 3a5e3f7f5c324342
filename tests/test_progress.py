"""Client progress bars: drawn only on a terminal, fed by plain (done, total) callbacks from the work."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from common.algorithms.smcf import TaskData, train_task
from common.algorithms.stats import StatsBank
from common.config import SMCFConfig
from common.fm import FoundationModel
from common.zoo import SmallModel, parse_spec
from fcl_client.connection import Connection
from fcl_client.progress import Bars
from fcl_client.runner import ClientConfig, ClientRunner


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_and_only_when_wanted() -> None:
    assert not Bars.for_terminal(True, io.StringIO()).enabled  # a pipe or a log file
    assert not Bars.for_terminal(False, Terminal()).enabled  # --no-progress
    assert Bars.for_terminal(True, Terminal()).enabled


def test_a_disabled_bar_writes_nothing() -> None:
    out = io.StringIO()
    with Bars(False, out).bar("training") as step:
        step(1, 2)
        step(2, 2)
    assert out.getvalue() == ""


def test_an_enabled_bar_draws_its_progress_and_bytes() -> None:
    out = Terminal()
    with Bars(True, out, refresh_s=0).bar("training t1", unit="epoch") as step:
        for done in range(1, 4):
            step(done, 3)
    assert "training t1" in out.getvalue() and "3/3" in out.getvalue() and "epoch" in out.getvalue()
    out = Terminal()
    with Bars(True, out, refresh_s=0).bar("uploading", data=True) as sent:
        sent(3 * 1024 * 1024, 3 * 1024 * 1024)
    assert "3.00M/3.00M" in out.getvalue()


def test_a_bar_that_is_never_fed_is_never_drawn() -> None:
    out = Terminal()
    with Bars(True, out).bar("FM features"):
        pass  # e.g. the features were cached
    assert out.getvalue() == ""


def test_smcf_reports_every_epoch() -> None:
    torch.manual_seed(0)
    labels = ["a", "b"]
    model = SmallModel(parse_spec("linear"), 8, 2)
    seen: list[tuple[int, int]] = []
    cfg = SMCFConfig(epochs=3, min_steps=1, batch_size=4)
    data = TaskData(torch.randn(8, 8), ["a", "b"] * 4)
    train_task(model, labels, data, StatsBank(8), cfg, on_epoch=lambda *a: seen.append(a))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_fm_encoding_reports_texts_done(fm: FoundationModel) -> None:
    seen: list[tuple[int, int]] = []
    fm.encode(["a", "bb", "ccc", "dddd", "eeeee"], batch_size=2, progress=lambda *a: seen.append(a))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_runner_draws_feature_extraction_on_its_bars(tmp_path: Path, fm: FoundationModel) -> None:
    cfg = ClientConfig(
        server="127.0.0.1:1", client_id="c", token="t", stream=tmp_path, work_dir=tmp_path, device="cpu"
    )
    out = Terminal()
    with Connection(cfg.server, cfg.token) as conn:
        runner = ClientRunner(cfg, conn, say=lambda _: None, bars=Bars(True, out))
        features = runner._features(fm, ["one text", "another text"])
    assert features.shape == (2, fm.feature_dim) and "FM features" in out.getvalue()
