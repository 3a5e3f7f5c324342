"""Deployment artefacts in deploy/: structure, and every command they run accepted by the real CLI parsers."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from common.datasets.cli import build_parser as data_parser
from common.fm import FoundationModel
from common.settings import LayeredSettings, given_flags, load_settings
from common.tls import TLSFiles
from common.zoo import parse_spec
from fcl_client.cli import build_parser as client_parser
from fcl_client.connection import Connection
from fcl_client.settings import AgentSettings, RunSettings
from fcl_server.app import RunningServer
from fcl_server.cli import build_parser as server_parser
from fcl_server.settings import ServeSettings, WorkerSettings
from tests.servers import inprocess_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_SCALE = K8S / "scale"
SYSTEMD = DEPLOY / "systemd"
CLIENT_IDS = ["client-0", "client-1", "client-2"]
AGENT_IDS = ["agent-0"]  # the Kubernetes edge agent (deploy/k8s/base/agent.yaml)


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fcl_deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load_healthcheck()
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "fcl-server": server_parser,
    "fcl-client": client_parser,
    "fcl-data": data_parser,
    "healthcheck.py": healthcheck.build_parser,
}


def _options(parser: argparse.ArgumentParser, args: list[str]) -> set[str]:
    """Option strings of the parser, or of the subcommand named first in `args`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and args and args[0] in action.choices:
            parser = action.choices[args[0]]
    return {s for action in parser._actions for s in action.option_strings}


SETTINGS: dict[tuple[str, str], type[LayeredSettings]] = {
    ("fcl-server", "serve"): ServeSettings,
    ("fcl-server", "worker"): WorkerSettings,
    ("fcl-client", "run"): RunSettings,
    ("fcl-client", "agent"): AgentSettings,
}


@contextlib.contextmanager
def fcl_environment(env: Mapping[str, str] | None = None) -> Iterator[None]:
    """Only the FCL_* variables of `env` (those the deploy file gives the process) are set inside."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("FCL_")}
    os.environ.update({k: v for k, v in (env or {}).items() if k.startswith("FCL_")})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("FCL_")]:
            del os.environ[key]
        os.environ.update(saved)


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> Any:
    """Parse `argv` (program first) with the real parser; flags must be spelled out, not abbreviated.

    `env` is the process' environment: its FCL_* variables reach the parsers (e.g. FCL_DATABASE for
    `enroll` and `db`) and the settings classes, as they would in the container.
    `fcl-server serve`/`worker` and `fcl-client run` options are then validated by their settings
    classes (types, ranges, required options), which are returned instead of the argparse namespace."""
    with fcl_environment(env):
        return _parse(argv)


def _parse(argv: list[str]) -> Any:
    prog, *args = argv
    name = Path(prog).name
    assert name in PARSERS, f"not an fcl command: {argv}"
    parser = PARSERS[name]()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{name} rejects {shlex.join(args)}: {err.getvalue().strip()}")
    known = _options(parser, args)
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert flags <= known, f"{name}: {sorted(flags - known)} are not flags of the real parser"
    settings = SETTINGS.get((name, args[0] if args else ""))
    if settings is None:
        return ns
    assert ns.config is None, "deploy files pass options as flags"
    return load_settings(settings, given_flags(ns, settings))


SHELL_PREFIXES = ("do", "then", "else", "exec", "if", "until", "while", "!", "python", "python3")


def shell_commands(script: str) -> list[list[str]]:
    """The fcl commands a small POSIX shell script runs (one per line or separated by ; && || |)."""
    found = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while words and words[0] in SHELL_PREFIXES:
                    words.pop(0)
                if words and Path(words[0]).name in PARSERS:
                    found.append(words)
                words = []
            else:
                words.append(token)
    # drop redirections: `> FILE`
    return [[w for i, w in enumerate(c) if w not in "<>" and (i == 0 or c[i - 1] not in "<>")] for c in found]


def expand(text: str, values: dict[str, str], pattern: str) -> str:
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in values, f"{m.group(1)} is not defined"
        return values[m.group(1)]

    return re.sub(pattern, sub, text)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str, str]]:
    """(stage, instruction, arguments) for every instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stage, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        out.append((stage, instr.upper(), rest.strip()))
    return out


def stage_value(instr: str, stage: str) -> str:
    """The last `instr` in effect for `stage` (stages built FROM another inherit it)."""
    lines = dockerfile()
    parents = {s: rest.split(" AS ")[0].strip() for s, i, rest in lines if i == "FROM"}
    chain, s = [stage], stage
    while parents.get(s) in parents:
        s = parents[s]
        chain.append(s)
    for s in chain:
        values = [rest for st, i, rest in lines if st == s and i == instr]
        if values:
            return values[-1]
    raise AssertionError(f"no {instr} for stage {stage}")


def exec_form(value: str) -> list[str]:
    words = json.loads(value)
    assert isinstance(words, list), value
    return [str(w) for w in words]


def test_dockerfile_installs_cpu_torch_before_the_project_and_runs_unprivileged() -> None:
    lines = dockerfile()
    assert lines[0][1:] == ("FROM", "python:3.11-slim AS base")
    runs = [rest for _, instr, rest in lines if instr == "RUN"]
    torch = [i for i, r in enumerate(runs) if "pip install" in r and "torch==2.13.0" in r]
    project = [i for i, r in enumerate(runs) if re.search(r"pip install (--\S+ )*\.(\s|$)", r)]
    assert torch and project and torch[0] < project[0], "torch==2.13.0 must be installed before the project"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch[0]]
    for stage in ("server", "client"):
        user = stage_value("USER", stage).split(":")[0]
        assert user not in ("root", "0"), f"stage {stage} runs as root"
    assert exec_form(stage_value("ENTRYPOINT", "server")) == ["fcl-server"]
    assert exec_form(stage_value("ENTRYPOINT", "client")) == ["fcl-client"]
    serve = parse(["fcl-server", *exec_form(stage_value("CMD", "server"))])
    assert serve.tls_cert == Path("/certs/server.pem") and serve.tls_client_ca == Path("/certs/ca.pem")
    check = stage_value("HEALTHCHECK", "server")
    assert "--start-period" in check
    probe = exec_form(check.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "/opt/fcl/healthcheck.py"]
    parse(["healthcheck.py", *probe[2:]])


def test_dockerfile_copies_only_what_exists_and_dockerignore_keeps_the_context_small() -> None:
    for _, instr, rest in dockerfile():
        if instr == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".cache", "demo-output", "benchmarks/results", ".git"} <= ignored


# ---------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def service_argv(compose: dict[str, Any], name: str) -> list[list[str]]:
    """The commands a compose service runs: entrypoint (or its image stage's) + command, shells read.
    Nothing for a service of another image (postgres)."""
    svc = compose["services"][name]
    if "build" not in svc:
        return []
    entrypoint = svc.get("entrypoint") or exec_form(stage_value("ENTRYPOINT", svc["build"]["target"]))
    command = svc.get("command") or []
    if entrypoint[0] == "sh":
        assert len(command) == 1, f"{name}: a shell entrypoint takes one script"
        return shell_commands(command[0].replace("$$", "$"))
    return [[*entrypoint, *command]]


def test_compose_runs_a_server_and_three_clients_with_different_models(compose: dict[str, Any]) -> None:
    services = compose["services"]
    clients = sorted(n for n in services if service_argv(compose, n)[0][:2] == ["fcl-client", "run"])
    assert clients == CLIENT_IDS
    server = parse(service_argv(compose, "fcl-server")[0])
    models = {}
    for name in clients:
        argv = service_argv(compose, name)[0]
        args = parse(argv)
        assert args.client_id == name
        assert args.server == f"fcl-server:{server.listen.rsplit(':', 1)[1]}"
        assert args.token is None and args.token_file == Path(f"/secrets/{name}.token")
        assert "--token" not in argv
        models[name] = repr(parse_spec(args.model))
        assert args.stream == Path(f"/data/split/clients/{name}")
        mounts = {m.split(":")[1]: m.split(":")[0] for m in services[name]["volumes"]}
        assert mounts["/var/lib/fcl-client"] == f"{name}-work" and str(args.work_dir) == "/var/lib/fcl-client"
        assert {"/data", "/secrets", "/certs"} <= set(mounts)
        assert (args.tls_ca, args.tls_cert, args.tls_key) == (
            Path("/certs/ca.pem"),
            Path(f"/certs/{name}.pem"),
            Path(f"/certs/{name}.key"),
        )
        assert services[name]["depends_on"]["fcl-server"]["condition"] == "service_healthy"
        for step in ("data", "enroll"):
            assert services[name]["depends_on"][step]["condition"] == "service_completed_successfully"
    assert len(set(models.values())) == 3, f"the clients' small models should differ: {models}"


def test_compose_server_keeps_state_in_a_named_volume_and_is_health_checked(compose: dict[str, Any]) -> None:
    svc = compose["services"]["fcl-server"]
    args = parse(service_argv(compose, "fcl-server")[0])
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    assert mounts[str(args.state_dir)] == "server-state"
    used = {m.split(":")[0] for s in compose["services"].values() for m in s.get("volumes", [])}
    assert used <= set(compose["volumes"])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
        Path("/certs/server.pem"),
        Path("/certs/server.key"),
        Path("/certs/ca.pem"),
    )
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/fcl/healthcheck.py"]
    probe = parse(["healthcheck.py", *test[3:]])
    assert probe.target.rsplit(":", 1)[1] == args.listen.rsplit(":", 1)[1]
    assert probe.tls_dir == Path("/certs")
    metrics = args.metrics_listen.rsplit(":", 1)[1]
    assert f"127.0.0.1:{metrics}:{metrics}" in svc["ports"]
    assert svc["depends_on"]["enroll"]["condition"] == "service_completed_successfully"


def test_compose_init_steps_make_certificates_data_and_tokens(compose: dict[str, Any]) -> None:
    services = compose["services"]
    certs = service_argv(compose, "certs")[0]
    assert certs[0] == "/opt/fcl/make-certs.sh"
    assert certs[2] == "fcl-server", "the server certificate must name the host the clients dial"
    assert set(certs[3:]) == {*CLIENT_IDS, "healthcheck"}
    data = parse(service_argv(compose, "data")[0])
    assert (data.command, data.clients, data.out) == ("builtin", 3, Path("/data/split"))
    enrolls = service_argv(compose, "enroll")
    assert all(parse(argv).command == "enroll" for argv in enrolls)
    script = services["enroll"]["command"][0]
    assert "--state-dir /var/lib/fcl" in script and "/secrets/$$id.token" in script
    assert all(cid in script for cid in CLIENT_IDS)
    assert "server-state:/var/lib/fcl" in services["enroll"]["volumes"]


# the value `${FCL_PG_PASSWORD:?...}` takes in the tests (deploy/.env in real use)
COMPOSE_ENV = {"FCL_PG_PASSWORD": "pw-of-the-test"}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:?error}` and `${VAR:-default}`; `$$` stays for service_argv."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$$"
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in values:
            return values[name]
        assert op in (":-", "-"), f"${{{name}}} is not set: {rest}"
        return rest

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", sub, text)


@pytest.fixture(scope="module")
def compose_scale() -> dict[str, Any]:
    text = (DEPLOY / "compose.scale.yaml").read_text()
    data = yaml.safe_load(interpolate(text, COMPOSE_ENV))
    assert isinstance(data, dict)
    return data


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    env = compose["services"][name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def run_service(compose: dict[str, Any], name: str) -> list[Any]:
    """Every fcl command of the service, parsed with the service's environment."""
    env = service_env(compose, name)
    return [parse(argv, env) for argv in service_argv(compose, name) if Path(argv[0]).name in PARSERS]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """mount path -> volume name"""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def roles(compose: dict[str, Any], program: str) -> list[str]:
    """The services running `program` (e.g. "fcl-server serve"), by name."""
    return sorted(
        n for n in compose["services"] if [a[:2] for a in service_argv(compose, n)] == [program.split()]
    )


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_every_fcl_command_line_and_health_check_is_accepted(name: str) -> None:
    text = (DEPLOY / name).read_text()
    compose = yaml.safe_load(interpolate(text, COMPOSE_ENV))
    count = 0
    for service, svc in compose["services"].items():
        if "build" in svc:
            count += len(run_service(compose, service))
        test = svc.get("healthcheck", {}).get("test")
        if test and "/opt/fcl/healthcheck.py" in test:
            parse(["healthcheck.py", *test[test.index("/opt/fcl/healthcheck.py") + 1 :]])
    assert count == {"compose.yaml": 6, "compose.scale.yaml": 10}[name]
    used = {m.split(":")[0] for s in compose["services"].values() for m in s.get("volumes", [])}
    assert used == set(compose["volumes"])
    other = ({"compose.yaml", "compose.scale.yaml"} - {name}).pop()
    assert compose["name"] and other in text, "each variant's header names the other"


def test_compose_scale_postgres_is_health_checked_and_its_password_comes_from_the_environment(
    compose_scale: dict[str, Any],
) -> None:
    text = (DEPLOY / "compose.scale.yaml").read_text()
    assert set(re.findall(r"\$\{([^}]*)\}", text)) == {
        "FCL_PG_PASSWORD:?set FCL_PG_PASSWORD, e.g. in deploy/.env"
    }
    with pytest.raises(AssertionError, match=r"FCL_PG_PASSWORD\} is not set"):
        interpolate(text, {})
    pg = compose_scale["services"]["postgres"]
    image, tag = pg["image"].rsplit(":", 1)
    assert image == "postgres" and tag in ("15", "16")
    env = pg["environment"]
    assert env["POSTGRES_PASSWORD"] == COMPOSE_ENV["FCL_PG_PASSWORD"]
    assert mounts(pg)["/var/lib/postgresql/data"] == "pg-data"
    assert "ports" not in pg, "PostgreSQL is reached only inside the compose network"
    test = pg["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert flag(test, "--username") == env["POSTGRES_USER"] and flag(test, "--dbname") == env["POSTGRES_DB"]
    users = [n for n in compose_scale["services"] if "FCL_DATABASE" in service_env(compose_scale, n)]
    assert users == [
        "db-upgrade",
        "enroll",
        *roles(compose_scale, "fcl-server serve"),
        *roles(compose_scale, "fcl-server worker"),
    ]
    for name in users:
        url = make_url(service_env(compose_scale, name)["FCL_DATABASE"])
        assert url.drivername == "postgresql+psycopg" and url.host == "postgres" and url.port == 5432
        assert (url.username, url.password, url.database) == (
            env["POSTGRES_USER"],
            env["POSTGRES_PASSWORD"],
            env["POSTGRES_DB"],
        )


def test_compose_scale_upgrades_the_database_once_then_enrolls_into_it(compose_scale: dict[str, Any]) -> None:
    services = compose_scale["services"]
    url = service_env(compose_scale, "db-upgrade")["FCL_DATABASE"]
    (upgrade,) = run_service(compose_scale, "db-upgrade")
    assert (upgrade.command, upgrade.db_command, upgrade.database) == ("db", "upgrade", url)
    assert services["db-upgrade"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["db-upgrade"]["restart"] == "on-failure"
    assert services["db-upgrade"]["healthcheck"] == {"disable": True}
    enrolls = run_service(compose_scale, "enroll")
    assert [(e.command, e.database, e.state_dir) for e in enrolls] == [("enroll", url, None)]
    script = services["enroll"]["command"][0]
    assert "/secrets/$$id.token" in script and all(cid in script for cid in CLIENT_IDS)
    assert mounts(services["enroll"]) == {"/secrets": "secrets"}
    after = ["enroll", *roles(compose_scale, "fcl-server serve"), *roles(compose_scale, "fcl-server worker")]
    for name in after:
        assert services[name]["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"


def test_compose_scale_two_front_ends_share_the_blob_volume_and_are_health_checked(
    compose_scale: dict[str, Any],
) -> None:
    services = compose_scale["services"]
    fronts = roles(compose_scale, "fcl-server serve")
    assert len(fronts) == 2
    caches, host_ports = set(), set()
    for name in fronts:
        svc = services[name]
        (args,) = run_service(compose_scale, name)
        assert args.worker is False and "--no-worker" in svc["command"]
        assert args.database == service_env(compose_scale, name)["FCL_DATABASE"]
        assert "--database" not in svc["command"], "the URL holds the password: FCL_DATABASE only"
        assert mounts(svc)[str(args.blob_dir)] == "blobs"
        caches.add(mounts(svc)[str(args.state_dir)])
        assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
            Path("/certs/server.pem"),
            Path("/certs/server.key"),
            Path("/certs/ca.pem"),
        )
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/fcl/healthcheck.py"]
        probe = parse(["healthcheck.py", *test[3:]])
        assert probe.target.rsplit(":", 1)[1] == args.listen.rsplit(":", 1)[1]
        assert probe.tls_dir == Path("/certs")
        host_ports |= {p.rsplit(":", 1)[0] for p in svc["ports"]}
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert len(caches) == 2 and "blobs" not in caches, "each front-end has its own cache volume"
    assert len(host_ports) == 4, "gRPC and metrics of each front-end on their own host ports"
    # the blob dir is a mount point the image creates for its user: a fresh named volume is writable
    (mkdir,) = [r for _, i, r in dockerfile() if i == "RUN" and "mkdir -p" in r]
    assert f" {args.blob_dir} " in mkdir.split("chown")[0] and f" {args.blob_dir} " in mkdir.split("chown")[1]


def test_compose_scale_two_workers_with_their_own_ids_share_the_blob_volume(
    compose_scale: dict[str, Any],
) -> None:
    services = compose_scale["services"]
    front = run_service(compose_scale, roles(compose_scale, "fcl-server serve")[0])[0]
    workers = roles(compose_scale, "fcl-server worker")
    assert len(workers) == 2
    ids, caches = set(), set()
    for name in workers:
        svc = services[name]
        (args,) = run_service(compose_scale, name)
        assert isinstance(args, WorkerSettings)
        ids.add(args.worker_id)
        assert args.database == service_env(compose_scale, name)["FCL_DATABASE"]
        assert args.blob_dir == front.blob_dir and mounts(svc)[str(args.blob_dir)] == "blobs"
        caches.add(mounts(svc)[str(args.state_dir)])
        assert "ports" not in svc and svc["healthcheck"] == {"disable": True}, "a worker has no gRPC"
        assert int(svc["stop_grace_period"].rstrip("s")) >= 130  # the worker's 120 s to re-queue a job
    assert len(ids) == 2 and None not in ids
    fronts = {mounts(services[n])[str(front.state_dir)] for n in roles(compose_scale, "fcl-server serve")}
    assert len(caches) == 2 and not caches & (fronts | {"blobs"})


def test_compose_scale_clients_dial_the_front_ends_over_mutual_tls(compose_scale: dict[str, Any]) -> None:
    services = compose_scale["services"]
    fronts = roles(compose_scale, "fcl-server serve")
    assert roles(compose_scale, "fcl-client run") == CLIENT_IDS
    certs = service_argv(compose_scale, "certs")[0]
    assert certs[0] == "/opt/fcl/make-certs.sh"
    assert set(certs[2].split(",")) == set(fronts), "the server certificate names every front-end"
    assert set(certs[3:]) == {*CLIENT_IDS, "healthcheck"}
    dialed, models = set(), set()
    for name in CLIENT_IDS:
        (args,) = run_service(compose_scale, name)
        assert args.client_id == name and args.token_file == Path(f"/secrets/{name}.token")
        host, port = args.server.rsplit(":", 1)
        assert host in fronts and port == "50051"
        dialed.add(host)
        assert services[name]["depends_on"][host]["condition"] == "service_healthy"
        assert (args.tls_ca, args.tls_cert, args.tls_key) == (
            Path("/certs/ca.pem"),
            Path(f"/certs/{name}.pem"),
            Path(f"/certs/{name}.key"),
        )
        assert mounts(services[name])["/var/lib/fcl-client"] == f"{name}-work"
        models.add(repr(parse_spec(args.model)))
    assert dialed == set(fronts), "every front-end serves a client"
    assert len(models) == 3


# ---------------------------------------------------------------------------------------- Kubernetes

API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
}
SETUPS = {"single-node": K8S, "scale": K8S_SCALE}
SETUP_KINDS = {
    "single-node": {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "StatefulSet",
        "Job",
        "NetworkPolicy",
        "Deployment",
        "PersistentVolumeClaim",
    },
    "scale": set(API_VERSIONS),
}
# what `valueFrom: fieldRef` gives a container, e.g. a Deployment pod's name
FIELD_VALUES = {"metadata.name": "fcl-worker-7d9f8c6b5-x2x4q", "metadata.namespace": "fcl"}
# images whose entrypoint is an fcl command (the Dockerfile's targets)
ENTRYPOINTS = {"fcl-server": ["fcl-server"], "fcl-client": ["fcl-client"]}

Objects = dict[tuple[str, str], dict[str, Any]]


def kustomization(directory: Path) -> dict[str, Any]:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def kustomize_dirs(directory: Path) -> list[Path]:
    """`directory` and every kustomization directory its resources name (bases), depth first."""
    dirs = [directory]
    for resource in kustomization(directory)["resources"]:
        if (directory / resource).is_dir():
            dirs += kustomize_dirs((directory / resource).resolve())
    return dirs


def rendered(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIR` builds, before its transforms (images): every document of
    every file under resources:, a directory resource (a base) read the same way."""
    docs = []
    for resource in kustomization(directory)["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}: resource {resource} does not exist"
        if path.is_dir():
            docs += rendered(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def hand_made(directory: Path) -> list[dict[str, Any]]:
    """The files of the setup's directories that no kustomization lists: Secrets made by hand."""
    docs = []
    for d in kustomize_dirs(directory):
        listed = set(kustomization(d)["resources"])
        for path in sorted(d.glob("*.yaml")):
            if path.name != "kustomization.yaml" and path.name not in listed:
                found = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
                assert found and all(doc["kind"] == "Secret" for doc in found), f"{path}: not applied"
                docs += found
    return docs


def by_name(docs: list[dict[str, Any]]) -> Objects:
    objects: Objects = {}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in objects, f"{key} is defined twice"
        objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def setups() -> dict[str, Objects]:
    return {name: by_name([*rendered(d), *hand_made(d)]) for name, d in SETUPS.items()}


@pytest.fixture(scope="module")
def k8s(setups: dict[str, Objects]) -> Objects:
    return setups["single-node"]


@pytest.fixture(scope="module")
def k8s_scale(setups: dict[str, Objects]) -> Objects:
    return setups["scale"]


def container_env(container: dict[str, Any], objects: Objects) -> dict[str, str]:
    """The container's environment: literal values, ConfigMap and Secret keys, the pod's fields."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = objects[("ConfigMap", ref["name"])]["data"][ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = objects[("Secret", ref["name"])]["stringData"][ref["key"]]
        else:
            env[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
    return env


def container_argv(container: dict[str, Any], objects: Objects) -> list[str]:
    """command/args with $(VAR) expanded from the container's env (container_env)."""
    env = container_env(container, objects)
    words = [*container.get("command", []), *container.get("args", [])]
    return [expand(w, env, r"\$\(([A-Z_][A-Z0-9_]*)\)") for w in words]


def container_commands(container: dict[str, Any], objects: Objects) -> list[list[str]]:
    """The fcl commands a container runs: its image's entrypoint + args, or those of its `sh -c`."""
    argv = container_argv(container, objects)
    if argv[:2] == ["sh", "-c"]:
        return shell_commands(argv[2])
    image = container["image"].rsplit(":", 1)[0]
    if "command" not in container and image in ENTRYPOINTS:
        argv = [*ENTRYPOINTS[image], *argv]
    return [argv] if argv and Path(argv[0]).name in PARSERS else []


def run_fcl(container: dict[str, Any], objects: Objects) -> Any:
    """The container's one fcl command, parsed with the container's environment."""
    (argv,) = container_commands(container, objects)
    return parse(argv, container_env(container, objects))


def pod_templates(objects: Objects) -> dict[tuple[str, str], dict[str, Any]]:
    return {key: obj["spec"]["template"] for key, obj in objects.items() if key[0] in WORKLOADS}


WORKLOADS = ("Deployment", "StatefulSet", "Job")


def selects(selector: dict[str, str], template: dict[str, Any]) -> bool:
    return selector.items() <= template["metadata"]["labels"].items()


@pytest.mark.parametrize("setup", SETUPS)
def test_k8s_kinds_api_versions_and_namespace(setup: str, setups: dict[str, Objects]) -> None:
    objects = setups[setup]
    assert {kind for kind, _ in objects} == SETUP_KINDS[setup]
    for (kind, name), obj in objects.items():
        assert obj["apiVersion"] == API_VERSIONS[kind], f"{kind}/{name}"
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == "fcl", f"{kind}/{name}"
    for d in kustomize_dirs(SETUPS[setup]):
        data = kustomization(d)
        assert (data["apiVersion"], data["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    images = {i["name"] for i in kustomization(SETUPS[setup]).get("images", [])}
    used = {
        c["image"].rsplit(":", 1)[0]
        for t in pod_templates(objects).values()
        for c in [*t["spec"].get("initContainers", []), *t["spec"]["containers"]]
    }
    assert used == images, "every image can be pointed at a registry in kustomization.yaml"


@pytest.mark.parametrize("setup", SETUPS)
def test_k8s_every_fcl_command_line_is_accepted(setup: str, setups: dict[str, Objects]) -> None:
    objects = setups[setup]
    count = 0
    for key, template in pod_templates(objects).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, key
        assert pod["automountServiceAccountToken"] is False, key
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, key
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], key
            env = container_env(container, objects)
            for argv in container_commands(container, objects):
                parse(argv, env)
                count += 1
    assert count == {"single-node": 12, "scale": 16}[setup]


def test_k8s_server_statefulset_keeps_state_on_a_claim_and_probes_grpc_health(k8s: Objects) -> None:
    sts = k8s[("StatefulSet", "fcl-server")]["spec"]
    pod = sts["template"]["spec"]
    (container,) = pod["containers"]
    args = run_fcl(container, k8s)
    assert args.worker is True and args.database is None, "single node: the all-in-one server on SQLite"
    port = int(args.listen.rsplit(":", 1)[1])
    (claim,) = sts["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == str(args.state_dir)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    assert pod["terminationGracePeriodSeconds"] >= 130  # drain + the worker's 120 s to re-queue a job
    labels = sts["template"]["metadata"]["labels"]
    assert sts["selector"]["matchLabels"].items() <= labels.items()
    assert k8s[("Service", sts["serviceName"])]["spec"]["clusterIP"] == "None"
    service = k8s[("Service", "fcl-server")]["spec"]
    assert service["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"]["port"] == port and container_ports[ports["grpc"]["targetPort"]] == port
    metrics = int(args.metrics_listen.rsplit(":", 1)[1])
    assert container_ports[ports["metrics"]["targetPort"]] == metrics
    assert sts["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)


@pytest.mark.parametrize("setup", SETUPS)
def test_k8s_client_jobs_use_the_token_secret_and_reach_the_service(
    setup: str, setups: dict[str, Objects]
) -> None:
    objects = setups[setup]
    secret = objects[("Secret", "fcl-client-tokens")]
    jobs = [obj for (kind, name), obj in objects.items() if kind == "Job" and name.startswith("fcl-client-")]
    service = objects[("Service", "fcl-server")]["spec"]
    servers = [t for t in pod_templates(objects).values() if selects(service["selector"], t)]
    assert servers, "the Service fcl-server selects no pod"
    models, ids = set(), set()
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("OnFailure", "Never")
        (container,) = pod["containers"]
        args = run_fcl(container, objects)
        ids.add(args.client_id)
        models.add(repr(parse_spec(args.model)))
        host, port = args.server.rsplit(":", 1)
        assert host.split(".")[0] == "fcl-server"
        assert int(port) == {p["name"]: p["port"] for p in service["ports"]}["grpc"] == 50051
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        token = volumes[mounts[str(args.token_file.parent)]]["secret"]
        assert token["secretName"] == secret["metadata"]["name"]
        assert token["items"] == [{"key": args.client_id, "path": args.token_file.name}]
        assert token["defaultMode"] & 0o040, "the token must be readable by the pod's fsGroup"
        data = [c for c in pod["initContainers"] if c["command"] == ["fcl-data"]]
        (split,) = [parse(["fcl-data", *c["args"]]) for c in data]
        assert args.stream == split.out / "clients" / args.client_id
        (wait,) = [c for c in pod["initContainers"] if c["command"][0] == "sh"]
        (probe,) = container_commands(wait, objects)
        assert parse(probe).target == args.server
    assert ids == set(CLIENT_IDS) and set(secret["stringData"]) == ids | set(AGENT_IDS)
    assert len(models) == len(jobs) == 3


@pytest.mark.parametrize("setup", SETUPS)
def test_k8s_agent_is_one_long_running_replica_with_its_work_dir_on_a_claim(
    setup: str, setups: dict[str, Objects]
) -> None:
    objects = setups[setup]
    deployment = objects[("Deployment", "fcl-agent")]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate", (
        "one agent per work dir"
    )
    assert selects(deployment["selector"]["matchLabels"], deployment["template"])
    template = deployment["template"]
    pod = template["spec"]
    assert "restartPolicy" not in pod or pod["restartPolicy"] == "Always", "a Deployment, never finished"
    (container,) = pod["containers"]
    args = run_fcl(container, objects)
    assert container["args"][0] == "agent" and isinstance(args, AgentSettings)
    assert args.client_id in AGENT_IDS
    parse_spec(args.model)
    host, port = args.server.rsplit(":", 1)
    service = objects[("Service", "fcl-server")]["spec"]
    assert (
        host.split(".")[0] == "fcl-server"
        and int(port) == {p["name"]: p["port"] for p in service["ports"]}["grpc"]
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    token = volumes[mounts[str(args.token_file.parent)]["name"]]["secret"]
    assert token["secretName"] == "fcl-client-tokens"
    assert token["items"] == [{"key": args.client_id, "path": args.token_file.name}]
    assert args.client_id in objects[("Secret", "fcl-client-tokens")]["stringData"]
    # the work dir (ledger, checkpoints) outlives the pod; the stream is only read
    work = volumes[mounts[str(args.work_dir)]["name"]]["persistentVolumeClaim"]["claimName"]
    assert objects[("PersistentVolumeClaim", work)]["spec"]["accessModes"] == ["ReadWriteOnce"]
    stream = mounts[str(args.stream)]
    assert stream["readOnly"] is True
    assert objects[("PersistentVolumeClaim", volumes[stream["name"]]["persistentVolumeClaim"]["claimName"])]
    # /healthz and /metrics on the --metrics-listen port
    metrics_port = int(args.metrics_listen.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == metrics_port
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert pod["terminationGracePeriodSeconds"] >= 30
    (wait,) = [c for c in pod["initContainers"] if c["command"][0] == "sh"]
    (probe_argv,) = container_commands(wait, objects)
    assert parse(probe_argv).target == args.server


def database_url(objects: Objects) -> str:
    return str(objects[("Secret", "fcl-database")]["stringData"]["url"])


def database_env(container: dict[str, Any]) -> dict[str, Any]:
    (var,) = [v for v in container["env"] if v["name"] == "FCL_DATABASE"]
    return dict(var["valueFrom"]["secretKeyRef"])


def blob_claim(pod: dict[str, Any], container: dict[str, Any], blob_dir: Path) -> str:
    """The claim mounted at `blob_dir`."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    return str(volumes[mounts[str(blob_dir)]]["persistentVolumeClaim"]["claimName"])


def wait_for_database(pod: dict[str, Any], objects: Objects) -> None:
    """An init container waits until `fcl-server db current` (exit 0 at the schema's head)."""
    (init,) = pod["initContainers"]
    (argv,) = container_commands(init, objects)
    ns = parse(argv, container_env(init, objects))
    assert (ns.command, ns.db_command, ns.database) == ("db", "current", database_url(objects))
    assert container_argv(init, objects)[2].startswith("until ")


def test_k8s_scale_frontends_are_stateless_servers_ready_on_grpc_health(k8s_scale: Objects) -> None:
    deployment = k8s_scale[("Deployment", "fcl-frontend")]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert selects(spec["selector"]["matchLabels"], spec["template"])
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    args = run_fcl(container, k8s_scale)
    assert args.worker is False, "a front-end runs `serve --no-worker`"
    assert "--no-worker" in container["args"] and "--database" not in container["args"]
    assert database_env(container) == {"name": "fcl-database", "key": "url"}
    assert args.database == database_url(k8s_scale)
    assert k8s_scale[("PersistentVolumeClaim", blob_claim(pod, container, args.blob_dir))]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[str(args.state_dir)]], "the state dir only holds caches"
    port = int(args.listen.rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    wait_for_database(pod, k8s_scale)
    service = k8s_scale[("Service", "fcl-server")]["spec"]
    assert "clusterIP" not in service and selects(service["selector"], spec["template"])
    ports = {p["name"]: p for p in service["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"]["port"] == port and container_ports[ports["grpc"]["targetPort"]] == port
    metrics = int(args.metrics_listen.rsplit(":", 1)[1])
    assert container_ports[ports["metrics"]["targetPort"]] == metrics
    assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    config = k8s_scale[("ConfigMap", "fcl-config")]["data"]
    assert config["FCL_SERVER"] == f"fcl-server.fcl.svc:{port}"
    pdb = k8s_scale[("PodDisruptionBudget", "fcl-frontend")]["spec"]
    assert selects(pdb["selector"]["matchLabels"], spec["template"])
    assert 1 <= pdb["minAvailable"] < spec["replicas"]
    policy = k8s_scale[("NetworkPolicy", "fcl-server")]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], spec["template"])


def test_k8s_scale_workers_share_the_blob_claim_and_the_database(k8s_scale: Objects) -> None:
    frontend = k8s_scale[("Deployment", "fcl-frontend")]["spec"]["template"]["spec"]
    front_args = run_fcl(frontend["containers"][0], k8s_scale)
    spec = k8s_scale[("Deployment", "fcl-worker")]["spec"]
    assert spec["replicas"] >= 2
    assert selects(spec["selector"]["matchLabels"], spec["template"])
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    args = run_fcl(container, k8s_scale)
    assert container["args"][0] == "worker" and isinstance(args, WorkerSettings)
    assert database_env(container) == {"name": "fcl-database", "key": "url"}
    assert args.database == database_url(k8s_scale)
    assert args.blob_dir == front_args.blob_dir
    claim = blob_claim(pod, container, args.blob_dir)
    assert claim == blob_claim(frontend, frontend["containers"][0], front_args.blob_dir)
    # --worker-id is the pod's own name: distinct for every replica
    (pod_name,) = [v for v in container["env"] if v.get("valueFrom", {}).get("fieldRef")]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert flag(container["args"], "--worker-id") == f"$({pod_name['name']})"
    assert "ports" not in container and "readinessProbe" not in container
    services = [o["spec"] for (kind, _), o in k8s_scale.items() if kind == "Service"]
    assert not any(selects(s["selector"], spec["template"]) for s in services), "a worker has no Service"
    assert pod["terminationGracePeriodSeconds"] >= 130  # the worker's 120 s to re-queue a job
    wait_for_database(pod, k8s_scale)


def test_k8s_scale_blob_dir_is_one_read_write_many_claim(k8s_scale: Objects) -> None:
    claims = {
        name: o
        for (kind, name), o in k8s_scale.items()
        if kind == "PersistentVolumeClaim" and not name.startswith("fcl-agent-")  # the agent's own
    }
    (name,) = claims
    assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"]
    users = {}
    for (_, owner), template in pod_templates(k8s_scale).items():
        pod = template["spec"]
        for volume in pod.get("volumes", []):
            if volume.get("persistentVolumeClaim", {}).get("claimName") == name:
                (container,) = pod["containers"]
                args = run_fcl(container, k8s_scale)
                assert blob_claim(pod, container, args.blob_dir) == name
                users[owner] = args.blob_dir
    assert set(users) == {"fcl-frontend", "fcl-worker"} and len(set(users.values())) == 1


def test_k8s_scale_postgres_statefulset_secret_and_upgrade_job(k8s_scale: Objects) -> None:
    sts = k8s_scale[("StatefulSet", "fcl-postgres")]["spec"]
    assert sts["replicas"] == 1 and selects(sts["selector"]["matchLabels"], sts["template"])
    headless = k8s_scale[("Service", sts["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None" and selects(headless["selector"], sts["template"])
    pod = sts["template"]["spec"]
    (container,) = pod["containers"]
    image, tag = container["image"].rsplit(":", 1)
    assert image == "postgres" and tag in ("15", "16")
    env = {v["name"]: v for v in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fcl-database",
        "key": "password",
    }
    (claim,) = sts["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(env["PGDATA"]["value"]).parent == Path(mounts[claim["metadata"]["name"]])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "pg_isready"
        assert flag(command, "--username") == env["POSTGRES_USER"]["value"]
        assert flag(command, "--dbname") == env["POSTGRES_DB"]["value"]
    # the URL every fcl process reads names this database, its user and the same password
    secret = k8s_scale[("Secret", "fcl-database")]["stringData"]
    url = make_url(secret["url"])
    assert url.drivername == "postgresql+psycopg" and url.password == secret["password"]
    assert (url.username, url.database) == (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"])
    assert url.host == f"{sts['serviceName']}.fcl.svc"
    assert url.port == {p["name"]: p["port"] for p in headless["ports"]}["postgres"] == 5432
    assert "database-secret.yaml" not in kustomization(K8S_SCALE)["resources"], "made by hand"
    assert "https://cloudnative-pg.io" in (K8S_SCALE / "postgres.yaml").read_text()
    # only the processes that use the database reach it
    policy = k8s_scale[("NetworkPolicy", "fcl-postgres")]["spec"]
    assert selects(policy["podSelector"]["matchLabels"], sts["template"])
    (rule,) = policy["ingress"]
    (allowed,) = rule["from"][0]["podSelector"]["matchExpressions"]
    users = {
        owner: t["metadata"]["labels"][allowed["key"]]
        for (_, owner), t in pod_templates(k8s_scale).items()
        if any("FCL_DATABASE" in container_env(c, k8s_scale) for c in t["spec"]["containers"])
    }
    assert set(users) == {"fcl-frontend", "fcl-worker", "fcl-db-upgrade"}
    assert set(allowed["values"]) == set(users.values())
    job = k8s_scale[("Job", "fcl-db-upgrade")]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "OnFailure" and job["backoffLimit"] >= 6
    (upgrade,) = job["template"]["spec"]["containers"]
    ns = run_fcl(upgrade, k8s_scale)
    assert (ns.command, ns.db_command, ns.database) == ("db", "upgrade", secret["url"])
    assert database_env(upgrade) == {"name": "fcl-database", "key": "url"}


@pytest.mark.parametrize("setup", SETUPS)
def test_k8s_kustomize_build_when_kubectl_is_installed(setup: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    directory = SETUPS[setup]
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert set(by_name(docs)) == set(by_name(rendered(directory)))
    images = {i["name"]: i["newTag"] for i in kustomization(directory)["images"]}
    for template in pod_templates(by_name(docs)).values():
        for c in [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]:
            name, tag = c["image"].rsplit(":", 1)
            assert tag == images[name], c["image"]


# ---------------------------------------------------------------------------------------- systemd

SPECIFIERS = {"%S": "/var/lib", "%C": "/var/cache", "%d": "/run/credentials/unit", "%i": "edge-17"}


def unit(name: str) -> tuple[configparser.ConfigParser, dict[str, list[str]]]:
    """The unit as INI (last value wins) and every value of each [Service] key (repeatable keys)."""
    text = re.sub(r"\\\n\s*", " ", (SYSTEMD / name).read_text())
    ini = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read_string(text)
    values: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return ini, values


def exec_start(ini: configparser.ConfigParser, env: dict[str, str]) -> list[str]:
    line = ini["Service"]["ExecStart"]
    for spec, value in SPECIFIERS.items():
        line = line.replace(spec, value)
    return shlex.split(expand(line, env, r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}"))


@pytest.mark.parametrize("name", ["fcl-server.service", "fcl-client@.service", "fcl-agent@.service"])
def test_systemd_units_are_hardened_and_stop_gracefully(name: str) -> None:
    ini, values = unit(name)
    service = ini["Service"]
    for key, expected in {
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == expected, f"{name}: {key}"
    assert int(service["TimeoutStopSec"]) >= 30
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["StateDirectory"]
    assert ini["Install"]["WantedBy"] == "multi-user.target"
    credentials = {v.split(":", 1)[0] for v in values["LoadCredential"]}
    used = set(re.findall(r"%d/([\w.-]+)", service["ExecStart"]))
    assert used == credentials, f"{name}: credentials used {used} vs loaded {credentials}"


def test_systemd_server_unit_command_is_accepted() -> None:
    ini, _ = unit("fcl-server.service")
    argv = exec_start(ini, {})
    assert argv[1] == "serve"
    args = parse(argv)
    assert args.state_dir == Path("/var/lib") / ini["Service"]["StateDirectory"]
    assert args.tls_cert and args.tls_key and args.tls_client_ca
    assert int(ini["Service"]["TimeoutStopSec"]) >= 130  # drain + the worker's 120 s to re-queue a job


def env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of a systemd EnvironmentFile example."""
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_systemd_client_unit_command_is_accepted_with_the_example_environment() -> None:
    ini, values = unit("fcl-client@.service")
    env = env_file(SYSTEMD / "client.env.example")
    argv = exec_start(ini, env)
    assert argv[1] == "run"
    args = parse(argv)
    assert args.client_id == "edge-17"
    parse_spec(args.model)
    assert args.token is None and args.token_file == Path("/run/credentials/unit/token")
    assert "token:/etc/fcl/clients/%i.token" in values["LoadCredential"]
    state_dir = ini["Service"]["StateDirectory"].replace("%i", "edge-17")
    assert args.work_dir == Path("/var/lib") / state_dir
    assert ini["Service"]["EnvironmentFile"] == "/etc/fcl/client-%i.env"


def test_systemd_agent_unit_command_is_accepted_with_the_example_environment() -> None:
    ini, values = unit("fcl-agent@.service")
    env = env_file(SYSTEMD / "agent.env.example")
    argv = exec_start(ini, env)
    assert argv[1] == "agent"
    args = parse(argv, env)  # FCL_POLL_S and FCL_SETTLE_S of the env file reach the settings
    assert isinstance(args, AgentSettings) and args.client_id == "edge-17"
    parse_spec(args.model)
    assert (args.poll_s, args.settle_s) == (float(env["FCL_POLL_S"]), float(env["FCL_SETTLE_S"]))
    assert args.metrics_listen == env["FCL_METRICS_LISTEN"]
    assert args.token is None and args.token_file == Path("/run/credentials/unit/token")
    assert "token:/etc/fcl/clients/%i.token" in values["LoadCredential"]
    state_dir = ini["Service"]["StateDirectory"].replace("%i", "edge-17")
    assert args.work_dir == Path("/var/lib") / state_dir
    client_ini, _ = unit("fcl-client@.service")
    assert state_dir != client_ini["Service"]["StateDirectory"].replace("%i", "edge-17"), "own work dir"
    assert ini["Service"]["EnvironmentFile"] == "/etc/fcl/agent-%i.env"


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    bindir = Path(shutil.which("fcl-server") or ROOT / ".venv/bin/fcl-server").parent
    if analyze is None or not (bindir / "fcl-client").exists():
        pytest.skip("systemd-analyze or the installed fcl commands are missing")
    for name in ("fcl-server.service", "fcl-client@.service", "fcl-agent@.service"):
        text = (SYSTEMD / name).read_text().replace("/opt/fcl/bin", str(bindir))
        (tmp_path / name).write_text(text)
    for template in ("fcl-client", "fcl-agent"):
        (tmp_path / f"{template}@edge-17.service").write_text((tmp_path / f"{template}@.service").read_text())
    out = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            "fcl-server.service",
            "fcl-client@edge-17.service",
            "fcl-agent@edge-17.service",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in out.stderr.splitlines() if "fcl-" in line]
    assert out.returncode == 0 and not complaints, out.stderr


# ---------------------------------------------------------------------------------------- certificates


def openssl(*args: str, cwd: Path) -> str:
    return subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def x509(cert: Path, *args: str) -> str:
    return openssl("x509", "-in", cert.name, "-noout", *args, cwd=cert.parent)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "pki"
    names = "fcl.example.internal,10.9.8.7"
    subprocess.run([DEPLOY / "make-certs.sh", out, names, "client-0", "healthcheck"], check=True, timeout=60)
    return out


def test_make_certs_chain_to_the_ca_with_server_sans(certs: Path) -> None:
    leaves = ("server.pem", "client-0.pem", "healthcheck.pem")
    assert openssl("verify", "-CAfile", "ca.pem", *leaves, cwd=certs).count(": OK") == 3
    sans = x509(certs / "server.pem", "-ext", "subjectAltName")
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:fcl.example.internal", "IP Address:10.9.8.7"):
        assert san in sans
    assert "TLS Web Server Authentication" in x509(certs / "server.pem", "-text")
    client = x509(certs / "client-0.pem", "-subject", "-ext", "extendedKeyUsage")
    assert "CN=client-0" in client.replace(" ", "") and "TLS Web Client Authentication" in client
    for key in ("ca.key", "server.key", "client-0.key"):
        assert (certs / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"


def test_make_certs_rerun_keeps_what_chains_and_rejects_bad_ids(certs: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    out = subprocess.run(
        [str(DEPLOY / "make-certs.sh"), str(certs), "fcl.example.internal,10.9.8.7", "client-0", "client-1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "kept" in out and "client-1.pem" in out
    assert all((certs / name).read_bytes() == data for name, data in before.items())
    bad = subprocess.run(
        [str(DEPLOY / "make-certs.sh"), str(tmp_path / "x"), "srv", "../evil"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "bad client id" in bad.stderr


@pytest.fixture(scope="module")
def mtls_server(
    certs: Path, fm: FoundationModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    server = inprocess_server(
        tmp_path_factory.mktemp("mtls"),
        fm,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
    )
    server.state.add_token("tok-0", "client-0", False)
    yield server
    server.stop(grace=1)


def test_certificates_serve_mutual_tls_register_and_health(mtls_server: RunningServer, certs: Path) -> None:
    port = mtls_server.port
    mutual = TLSFiles(cert=certs / "client-0.pem", key=certs / "client-0.key", ca=certs / "ca.pem")
    with Connection(f"localhost:{port}", "tok-0", tls=mutual) as conn:
        assert conn.register("client-0", "").client_id == "client-0"
    assert healthcheck.main(["--tls-dir", str(certs), f"127.0.0.1:{port}"]) == 0
    # without a client certificate the mutual-TLS server refuses the handshake
    assert healthcheck.main(["--tls-ca", str(certs / "ca.pem"), "--timeout", "2", f"127.0.0.1:{port}"]) == 1


def test_healthcheck_fails_when_nothing_listens(tmp_path: Path) -> None:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert healthcheck.main(["--timeout", "1", "--tls-dir", str(tmp_path), f"127.0.0.1:{port}"]) == 1
