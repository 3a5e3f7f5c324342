"""`fcl-server fm info`: what a server would serve, from the same flags, FCL_* variables and config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.fm import FoundationModel
from common.fm_encoding import EncodingOverrides
from tests.tiny_fm import ENGLISH, build_tiny_encoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("info") / "fm", "bert", ENGLISH)


def info(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fcl_server.cli", "fm", "info", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_json_names_everything_that_decides_the_features(tiny: Path) -> None:
    out = info(
        "--fm", str(tiny), "--fm-pooling", "max", "--fm-prompt", "query: ", "--device", "cpu", "--json"
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    fm = FoundationModel(str(tiny), overrides=EncodingOverrides.of(pooling="max", prompt="query: "))
    assert got == fm.describe()
    assert (got["pooling"], got["normalize"], got["max_length"], got["prompt"]) == (
        "max",
        True,
        64,
        "query: ",
    )
    assert (got["dim"], got["dtype"], got["layout"], got["name"]) == (32, "float32", "transformers", "fm")


def test_text_for_people_reads_the_server_config_file_and_environment(tiny: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    # a whole server config: keys fm info does not use (state_dir, listen) are ignored
    config.write_text(
        f'state_dir = "{tmp_path}"\nlisten = "0.0.0.0:50051"\nfm = "{tiny}"\nfm_max_length = 16\n'
    )
    out = info("--config", str(config), "--device", "cpu", env={"FCL_FM_POOLING": "cls"})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines())
    fm = FoundationModel(str(tiny), overrides=EncodingOverrides.of(pooling="cls", max_length=16))
    assert lines["digest"] == fm.digest and lines["pooling"] == "cls" and lines["max_length"] == "16"
    assert lines["prompt"] == '""' and lines["normalize"] == "true"


def test_bad_options_are_refused_with_the_reason(tiny: Path) -> None:
    too_long = info("--fm", str(tiny), "--fm-max-length", "1000", "--device", "cpu")
    assert (
        too_long.returncode == 2
        and "1000 is more tokens than the model has positions for (64)" in too_long.stderr
    )
    unknown = info("--fm", str(tiny), "--fm-pooling", "median")
    assert unknown.returncode == 2 and "invalid choice: 'median'" in unknown.stderr
