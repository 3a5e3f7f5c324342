"""Options of `fcl-client run` and `agent`: flags, FCL_* environment variables or a TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.config import SMCFConfig
from common.fm import DEFAULT_FM
from common.fm_encoding import FMDtype, PoolingMode
from common.fm_options import fm_dtype_field, fm_max_length_field, fm_pooling_field, fm_prompt_field
from common.logs import LOG_LEVELS, LogFormat, log_level
from common.settings import LayeredSettings, host_port
from fcl_client.agent import AgentOptions
from fcl_client.runner import ClientConfig

_SMCF = SMCFConfig()


class TokenError(ValueError):
    """No usable bearer token was given."""


def resolve_token(flag: str | None, file: Path | None, env: str | None) -> str:
    """The bearer token from exactly one of --token, --token-file or $FCL_TOKEN."""
    given = [v for v in (flag, file, env) if v]
    if len(given) != 1:
        raise TokenError(
            "give the bearer token exactly one way (--token-file, $FCL_TOKEN, token_file in the --config "
            f"file, or --token); got {len(given)}"
        )
    token = (file.read_text() if file else str(given[0])).strip()
    if not token:
        raise TokenError(f"the bearer token is empty{f' (file {file})' if file else ''}")
    return token


class RunSettings(LayeredSettings):
    """Every option of `fcl-client run`; the order here is the order of --help and the example file."""

    server: str = Field(description="HOST:PORT of fcl-server", examples=["fcl.example.internal:50051"])
    client_id: str = Field(description="this client's id, as enrolled on the server", examples=["edge-17"])
    token: str | None = Field(
        None,
        description="bearer token from `fcl-server enroll` (env FCL_TOKEN); prefer token_file: a command "
        "line is visible to every user of the node",
        examples=["fcl_..."],
    )
    token_file: Path | None = Field(
        None, description="file holding the bearer token", examples=["/etc/fcl/edge-17.token"]
    )
    stream: Path = Field(description="task stream directory (one subdir per task)", examples=["/data/tasks"])
    model: str = Field("mlp:256", description="small-model spec: linear | mlp:W[,W...][:act][:ln] | JSON")
    work_dir: Path = Field(description="checkpoints, caches and metrics", examples=["/var/lib/fcl-client"])
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="cpu or cuda (default: cuda when available)", examples=["cpu"]
    )
    fm: str = Field(
        DEFAULT_FM,
        description="local FM (name or directory) to use when it is the server's; otherwise the server's "
        "FM is downloaded",
    )
    fm_pooling: PoolingMode | None = fm_pooling_field()
    fm_max_length: int | None = fm_max_length_field()
    fm_prompt: str | None = fm_prompt_field()
    fm_dtype: FMDtype = fm_dtype_field()
    epochs: int = Field(_SMCF.epochs, ge=1, description="SMCF epochs per task")
    share_stats: bool = Field(True, description="upload per-label feature statistics with the model")
    stats_noise: float = Field(
        _SMCF.stats_noise, ge=0, description="Gaussian noise std added to shared statistics"
    )
    stats_rank: int = Field(
        _SMCF.stats_rank, ge=0, le=64, description="principal directions per label in shared statistics"
    )
    tls_ca: Path | None = Field(
        None, description="CA that signed the server certificate: enables TLS", examples=["/etc/fcl/ca.pem"]
    )
    tls_cert: Path | None = Field(
        None, description="client certificate chain for mutual TLS (PEM)", examples=["/etc/fcl/edge-17.pem"]
    )
    tls_key: Path | None = Field(
        None, description="client private key for mutual TLS (PEM)", examples=["/etc/fcl/edge-17.key"]
    )
    seed: int = Field(0, description="seed of training and of upload noise")
    timeout: float = Field(60.0, gt=0, description="per-call deadline in seconds")
    log_level: str = Field("WARNING", description=", ".join(LOG_LEVELS))
    log_format: LogFormat = Field("text", description="text (for people) or json (one object per line)")
    progress: bool = Field(True, description="progress bars on stderr (only when it is a terminal)")

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        return log_level(value)

    @model_validator(mode="after")
    def _one_token_source(self) -> RunSettings:
        if self.token and self.token_file:
            raise ValueError(
                "both token (--token or FCL_TOKEN) and token_file are set: give the bearer token one way"
            )
        return self

    def client_config(self) -> ClientConfig:
        """The runner's configuration; reads the token file."""
        smcf = SMCFConfig(
            epochs=self.epochs,
            share_stats=self.share_stats,
            stats_noise=self.stats_noise,
            stats_rank=self.stats_rank,
        )
        fields = self.model_dump(
            include={
                "server",
                "client_id",
                "stream",
                "model",
                "work_dir",
                "device",
                "fm",
                "fm_pooling",
                "fm_max_length",
                "fm_prompt",
                "fm_dtype",
                "seed",
                "timeout",
            },
            exclude_none=True,
        )
        tls = self.model_dump(include={"tls_ca", "tls_cert", "tls_key"}, exclude_none=True)
        token = resolve_token(self.token, self.token_file, None)
        return ClientConfig(token=token, smcf=smcf, **fields, **tls)


class AgentSettings(RunSettings):
    """Every option of `fcl-client agent`: those of `run`, then the agent's own."""

    poll_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds between looks at the stream directory and at the server's personalised head",
    )
    settle_s: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="a task folder without a READY file is taken once its files have not changed for this "
        "many seconds",
    )
    metrics_listen: str | None = Field(
        None,
        description="HOST:PORT serving Prometheus /metrics and /healthz over plain HTTP (default: off)",
        examples=["127.0.0.1:9101"],
    )

    @field_validator("metrics_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else host_port(value)

    def agent_options(self) -> AgentOptions:
        return AgentOptions(poll_s=self.poll_s, settle_s=self.settle_s)
