"""Options from flags, FCL_* variables and a TOML file: precedence, validation messages, the example files."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import SettingsError, given_flags, load_settings
from fcl_client.cli import build_parser as client_parser
from fcl_client.cli import main as client_cli
from fcl_client.settings import AgentSettings, RunSettings
from fcl_server.cli import build_parser as server_parser
from fcl_server.cli import main as server_cli
from fcl_server.settings import ServeSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXAMPLES = [
    (ServeSettings, DEPLOY / "server.example.toml"),
    (RunSettings, DEPLOY / "client.example.toml"),
    (AgentSettings, DEPLOY / "agent.example.toml"),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No FCL_* variable of the developer's shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("FCL_"):
            monkeypatch.delenv(name)
    yield


def toml(tmp_path: Path, text: str, name: str = "options.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def serve_args(*argv: str) -> dict[str, object]:
    return given_flags(server_parser().parse_args(["serve", *argv]), ServeSettings)


def test_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = toml(
        tmp_path,
        'state_dir = "/from/file"\nlisten = "0.0.0.0:7000"\nuploads_per_minute = 5\nlog_level = "debug"\n',
    )
    monkeypatch.setenv("FCL_UPLOADS_PER_MINUTE", "7")
    monkeypatch.setenv("FCL_LOG_LEVEL", "error")
    settings = load_settings(ServeSettings, serve_args("--log-level", "warning"), config)
    assert settings.state_dir == Path("/from/file")  # file only
    assert settings.listen == "0.0.0.0:7000"  # file only
    assert settings.uploads_per_minute == 7  # environment over file
    assert settings.log_level == "WARNING"  # flag over environment and file
    assert settings.metrics_listen is None and settings.log_format == "text"  # defaults
    cfg = settings.server_config()
    assert cfg.uploads_per_minute == 7 and cfg.state_dir == Path("/from/file") and cfg.metrics_listen is None


def test_environment_alone_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCL_STATE_DIR", "/srv/fcl")
    monkeypatch.setenv("FCL_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("FCL_INSECURE", "true")
    monkeypatch.setenv("FCL_HEAD_SPEC", "mlp:64")
    monkeypatch.setenv("FCL_METRICS_LISTEN", "127.0.0.1:9100")
    cfg = load_settings(ServeSettings, serve_args()).server_config()
    assert cfg.state_dir == Path("/srv/fcl") and cfg.listen == "127.0.0.1:0" and cfg.insecure
    assert cfg.obod.head_spec == "mlp:64" and cfg.metrics_listen == "127.0.0.1:9100"


def test_boolean_flags_override_the_file_both_ways(tmp_path: Path) -> None:
    config = toml(
        tmp_path,
        'server = "h:1"\nclient_id = "c"\nstream = "s"\nwork_dir = "w"\n'
        "share_stats = true\nprogress = true\n",
    )
    args = client_parser().parse_args(["run", "--config", str(config), "--no-share-stats", "--no-progress"])
    settings = load_settings(RunSettings, given_flags(args, RunSettings), args.config)
    assert settings.share_stats is False and settings.progress is False
    args = client_parser().parse_args(["run", "--config", str(config)])
    settings = load_settings(RunSettings, given_flags(args, RunSettings), args.config)
    assert settings.share_stats is True and settings.progress is True


def client_file(tmp_path: Path, extra: str = "") -> Path:
    return toml(
        tmp_path, f'server = "h:1"\nclient_id = "edge-1"\nstream = "s"\nwork_dir = "w"\nepochs = 3\n{extra}'
    )


def test_client_token_from_fcl_token_and_smcf_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FCL_TOKEN", "fcl_from_env")
    monkeypatch.setenv("FCL_STATS_RANK", "4")
    cfg = load_settings(RunSettings, {"epochs": "5"}, client_file(tmp_path)).client_config()
    assert cfg.token == "fcl_from_env" and cfg.client_id == "edge-1" and cfg.server == "h:1"
    assert cfg.smcf.epochs == 5 and cfg.smcf.stats_rank == 4  # flag over file; environment
    # --token on the command line wins over FCL_TOKEN like any other option
    assert (
        load_settings(RunSettings, {"token": "fcl_flag"}, client_file(tmp_path)).client_config().token
        == "fcl_flag"
    )


def test_client_token_file_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "edge.token").write_text("fcl_in_file\n")
    config = client_file(tmp_path, f'token_file = "{tmp_path / "edge.token"}"\n')
    assert load_settings(RunSettings, {}, config).client_config().token == "fcl_in_file"


def test_two_token_sources_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edge.token").write_text("fcl_in_file\n")
    monkeypatch.setenv("FCL_TOKEN", "fcl_from_env")
    config = client_file(tmp_path, f'token_file = "{tmp_path / "edge.token"}"\n')
    with pytest.raises(SettingsError, match=r"token.*token_file.*one way"):
        load_settings(RunSettings, {}, config)


def test_unknown_key_in_the_file_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    config = toml(tmp_path, 'state_dir = "/x"\nuploads_per_minutes = 3\n')
    with pytest.raises(SettingsError) as exc:
        load_settings(ServeSettings, {}, config)
    message = str(exc.value)
    assert "unknown key 'uploads_per_minutes'" in message and str(config) in message
    assert "did you mean 'uploads_per_minute'?" in message


@pytest.mark.parametrize(
    ("flags", "env", "text", "expected"),
    [
        (
            {"uploads_per_minute": "many"},
            {},
            "",
            "bad value for --uploads-per-minute 'many': Input should be",
        ),
        (
            {},
            {"FCL_UPLOADS_PER_MINUTE": "-1"},
            "",
            "environment FCL_UPLOADS_PER_MINUTE='-1': Input should be",
        ),
        ({}, {}, 'listen = "50051"\n', "bad value for listen = '50051' in config file"),
        ({}, {"FCL_LOG_LEVEL": "chatty"}, "", "'chatty' is not a log level; use one of DEBUG, INFO"),
        ({}, {}, 'log_format = "xml"\n', "bad value for log_format = 'xml'"),
        ({}, {}, 'metrics_listen = "localhost"\n', "'localhost' is not HOST:PORT"),
    ],
)
def test_bad_values_name_the_option_and_where_it_came_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: dict[str, str],
    env: dict[str, str],
    text: str,
    expected: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = toml(tmp_path, 'state_dir = "/x"\n' + text)
    with pytest.raises(SettingsError) as exc:
        load_settings(ServeSettings, flags, config)
    assert expected in str(exc.value)


def test_missing_required_option_says_every_way_to_give_it() -> None:
    with pytest.raises(SettingsError) as exc:
        load_settings(ServeSettings, {})
    assert str(exc.value) == (
        "missing option 'state_dir': pass --state-dir, set FCL_STATE_DIR or put state_dir = ... "
        "in the --config file"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("state_dir = \n", "is not valid TOML"), ('[server]\nstate_dir = "/x"\n', "[server] is a section")],
)
def test_unreadable_config_files_are_explained(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_settings(ServeSettings, {}, toml(tmp_path, text))
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(ServeSettings, {}, tmp_path / "absent.toml")


def test_commands_report_config_errors_and_exit_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = toml(tmp_path, 'state_dir = "/x"\nlisten = "nowhere"\n')
    assert server_cli(["serve", "--config", str(config)]) == 2
    assert "fcl-server: error: bad value for listen = 'nowhere'" in capsys.readouterr().err
    config = client_file(tmp_path)
    assert client_cli(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "fcl-client: error: give the bearer token exactly one way" in err and "FCL_TOKEN" in err


@pytest.mark.parametrize(("cls", "path"), EXAMPLES, ids=["server", "client", "agent"])
def test_example_files_load_validate_and_list_every_option(cls: type, path: Path) -> None:
    settings = load_settings(cls, {}, path)
    text = path.read_text()
    keys = {line.lstrip("# ").split(" =")[0] for line in text.splitlines() if " = " in line}
    assert set(cls.model_fields) <= keys, (
        f"{path.name} lacks {set(cls.model_fields) - keys}: run tools/gen_config_examples.py"
    )
    # every commented default is the real default: uncommenting it changes nothing
    for line in text.splitlines():
        body = line.removeprefix("# ")
        key = body.split(" =")[0]
        if line.startswith("# ") and key in cls.model_fields and cls.model_fields[key].default is not None:
            value = tomllib.loads(body)[key]
            assert value == cls.model_fields[key].default, (path.name, key, value)
            assert getattr(settings, key) == cls.model_fields[key].default


def test_every_option_is_a_flag_of_its_command() -> None:
    choices = {"device": "cpu", "log_format": "json", "fm_pooling": "cls", "fm_dtype": "bf16"}
    for parser, command, cls in (
        (server_parser(), "serve", ServeSettings),
        (client_parser(), "run", RunSettings),
    ):
        argv = [command]
        for key, field in cls.model_fields.items():
            flag = "--" + key.replace("_", "-")
            argv += [flag] if field.annotation is bool else [flag, choices.get(key, "1")]
        assert set(given_flags(parser.parse_args(argv), cls)) == set(cls.model_fields)
