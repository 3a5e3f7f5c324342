"""Bearer tokens on command lines: enroll never prints a flag-like token; the client takes one source."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from fcl_client.cli import TOKEN_ENV, TokenError, build_parser, resolve_token
from fcl_server.cli import TOKEN_PREFIX, new_token
from fcl_server.cli import main as server_cli


def test_new_tokens_never_start_with_a_dash_and_are_unique() -> None:
    tokens = [new_token() for _ in range(2000)]
    assert all(t.startswith(TOKEN_PREFIX) for t in tokens)
    assert not any(t.startswith("-") for t in tokens)
    assert len(set(tokens)) == len(tokens)


def test_enroll_prints_a_token_the_client_parser_accepts(tmp_path: Path) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert server_cli(["enroll", "--state-dir", str(tmp_path), "edge-1"]) == 0
    token = out.getvalue().strip()
    args = build_parser().parse_args(
        [
            "run",
            "--server",
            "h:1",
            "--client-id",
            "edge-1",
            "--token",
            token,
            "--stream",
            "s",
            "--work-dir",
            "w",
        ]
    )
    assert resolve_token(args.token, args.token_file, None) == token


def test_token_from_file_is_stripped(tmp_path: Path) -> None:
    # a token beginning with '-' (older enrolments) still works through a file or the environment
    path = tmp_path / "edge.token"
    path.write_text("-abc_DEF\n")
    assert resolve_token(None, path, None) == "-abc_DEF"
    assert resolve_token(None, None, "-abc_DEF") == "-abc_DEF"


@pytest.mark.parametrize(
    ("flag", "use_file", "env", "message"),
    [
        (None, False, None, "exactly one way"),
        ("t1", False, "t2", "got 2"),
        ("t1", True, None, "got 2"),
    ],
)
def test_token_sources_must_be_exactly_one(
    tmp_path: Path, flag: str | None, use_file: bool, env: str | None, message: str
) -> None:
    path = tmp_path / "t"
    path.write_text("tok")
    with pytest.raises(TokenError, match=message):
        resolve_token(flag, path if use_file else None, env)


def test_empty_token_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "empty.token"
    path.write_text("\n")
    with pytest.raises(TokenError, match=r"empty\.token"):
        resolve_token(None, path, None)


def test_client_run_reports_missing_token_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fcl_client.cli import main as client_cli

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    argv = [
        "run",
        "--server",
        "127.0.0.1:1",
        "--client-id",
        "c",
        "--stream",
        str(tmp_path),
        "--work-dir",
        str(tmp_path),
    ]
    assert client_cli(argv) == 1
    assert "FCL_TOKEN" in capsys.readouterr().err
