"""Options of `fcl-server serve`: flags, FCL_* environment variables or a TOML file (common.settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.config import OBODConfig
from common.fm import DEFAULT_FM
from common.fm_encoding import FMDtype, PoolingMode
from common.fm_options import fm_dtype_field, fm_max_length_field, fm_pooling_field, fm_prompt_field
from common.logs import LOG_LEVELS, LogFormat, log_level
from common.settings import ENV_PREFIX, LayeredSettings, host_port
from fcl_server.app import ServerConfig

_SERVER = ServerConfig.model_fields


class ProcessSettings(LayeredSettings):
    """The options `fcl-server serve` and `fcl-server worker` share: where state is, the FM, the worker."""

    state_dir: Path = Field(description="database, blobs and caches live here", examples=["/var/lib/fcl"])
    database: str | None = Field(
        None,
        description="database URL, e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/DB (default: SQLite "
        "state.sqlite3 in state_dir); a PostgreSQL database is migrated by `fcl-server db upgrade`. "
        "Prefer FCL_DATABASE to a file for a URL with a password",
        examples=["postgresql+psycopg://fcl:PASSWORD@127.0.0.1:5432/fcl"],
    )
    blob_dir: Path | None = Field(
        None, description=_SERVER["blob_dir"].description, examples=["/mnt/fcl-shared"]
    )
    fm: str = Field(DEFAULT_FM, description="FM name (packaged default) or a local model directory")
    fm_pooling: PoolingMode | None = fm_pooling_field()
    fm_max_length: int | None = fm_max_length_field()
    fm_prompt: str | None = fm_prompt_field()
    fm_dtype: FMDtype = fm_dtype_field()
    public_corpus: Path | None = Field(
        None,
        description="unlabeled text file, one sentence per line (default: the built-in public split)",
        examples=["/srv/fcl/public.txt"],
    )
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="cpu or cuda (default: cuda when available)", examples=["cpu"]
    )
    head_spec: str = Field(
        OBODConfig.model_fields["head_spec"].default,
        description="zoo spec of the FM heads, e.g. mlp:768:gelu",
    )
    worker_nice: int = Field(
        _SERVER["worker_nice"].default,
        ge=0,
        le=19,
        description="niceness added to the distillation worker thread, so bursts of uploads get the CPU "
        "first (0: same priority as RPCs; Linux)",
    )
    lease_s: float = Field(_SERVER["lease_s"].default, gt=1, description=_SERVER["lease_s"].description)
    log_level: str = Field("INFO", description=", ".join(LOG_LEVELS))
    log_format: LogFormat = Field("text", description="text (for people) or json (one object per line)")

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        return log_level(value)

    def server_config(self) -> ServerConfig:
        # unset options (None) fall back to ServerConfig's defaults, e.g. device = cuda when available
        fields = self.model_dump(exclude=self._not_server_config(), exclude_none=True)
        return ServerConfig(obod=OBODConfig(head_spec=self.head_spec), **fields)

    @classmethod
    def _not_server_config(cls) -> set[str]:
        return {"head_spec", "log_level", "log_format"}


class WorkerSettings(ProcessSettings):
    """Every option of `fcl-server worker`: a distillation worker process, no gRPC."""

    worker_id: str | None = Field(
        None,
        description="this worker's name in the database (default: worker@HOST:PID)",
        examples=["worker-0"],
    )

    @classmethod
    def _not_server_config(cls) -> set[str]:
        return super()._not_server_config() | {"worker_id"}


class ServeSettings(ProcessSettings):
    """Every option of `fcl-server serve`; the order here is the order of --help and the example file."""

    listen: str = Field("127.0.0.1:50051", description="HOST:PORT to bind (port 0 = any free)")
    worker: bool = Field(
        True, description="run a distillation worker in this process (--no-worker: a gRPC front-end only)"
    )
    port_file: Path | None = Field(
        None, description="write the bound port here once serving", examples=["/run/fcl/port"]
    )
    tls_cert: Path | None = Field(
        None, description="server certificate chain (PEM)", examples=["/etc/fcl/server.pem"]
    )
    tls_key: Path | None = Field(
        None, description="server private key (PEM)", examples=["/etc/fcl/server.key"]
    )
    tls_client_ca: Path | None = Field(
        None,
        description="CA of client certificates: enables mutual TLS",
        examples=["/etc/fcl/clients-ca.pem"],
    )
    insecure: bool = Field(False, description="allow plaintext on a non-loopback address")
    uploads_per_minute: int = Field(60, ge=0, description="per-client upload rate (0: no limit)")
    upload_mb_per_hour: int = Field(1024, ge=0, description="MiB a client may upload per hour (0: no limit)")
    metrics_listen: str | None = Field(
        None,
        description="HOST:PORT serving Prometheus /metrics over plain HTTP (default: off)",
        examples=["127.0.0.1:9100"],
    )
    dashboard_listen: str | None = Field(
        None,
        description="HOST:PORT of the read-only admin web dashboard (admin token; HTTPS with --tls-cert; "
        "default: off)",
        examples=["127.0.0.1:8080"],
    )
    max_workers: int = Field(
        _SERVER["max_workers"].default, ge=2, description=_SERVER["max_workers"].description
    )
    max_watchers: int | None = Field(
        None,
        ge=1,
        description="WatchJob streams open at once; past it a watch answers once and the client polls "
        "(default: half of max_workers)",
        examples=[16],
    )
    stream_idle_s: float = Field(
        _SERVER["stream_idle_s"].default, gt=0, description=_SERVER["stream_idle_s"].description
    )
    max_streams_per_client: int = Field(
        _SERVER["max_streams_per_client"].default,
        ge=1,
        description=f"{_SERVER['max_streams_per_client'].description}; more are refused (RESOURCE_EXHAUSTED)",
    )
    max_anonymous_streams: int = Field(
        _SERVER["max_anonymous_streams"].default,
        ge=1,
        description=f"{_SERVER['max_anonymous_streams'].description}; more are refused (RESOURCE_EXHAUSTED)",
    )
    worker_yield_s: float = Field(
        _SERVER["worker_yield_s"].default,
        ge=0,
        description="a distillation job pauses while uploads are in flight, for at most this many seconds "
        "in all (0: never pauses)",
    )
    client_quota_mb: int = Field(
        _SERVER["client_quota_mb"].default,
        ge=0,
        description="MiB one client may make the server store: its packages, unfinished uploads and metric "
        "rows; past it uploads and reports get RESOURCE_EXHAUSTED (0: no limit)",
    )
    max_metric_rows: int = Field(
        _SERVER["max_metric_rows"].default,
        ge=0,
        description="metric rows (task × metric name) stored per client; past it reports get "
        "RESOURCE_EXHAUSTED (0: no limit)",
    )
    max_classify_calls: int = Field(
        _SERVER["max_classify_calls"].default,
        ge=1,
        description="Classify calls admitted at once: one encodes with the FM, the others wait for it "
        "without holding a thread; more get RESOURCE_EXHAUSTED",
    )

    @field_validator("listen", "metrics_listen", "dashboard_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else host_port(value)

    @classmethod
    def _not_server_config(cls) -> set[str]:
        return super()._not_server_config() | {"port_file"}


class FMInfoSettings(LayeredSettings):
    """The options of `fcl-server fm info`: those that decide the served FM. Other keys of a server config
    file, and other FCL_* variables, are ignored, so it reads the same file and environment as serve."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", case_sensitive=False)

    fm: str = Field(DEFAULT_FM, description="FM name (packaged default) or a local model directory")
    fm_pooling: PoolingMode | None = fm_pooling_field()
    fm_max_length: int | None = fm_max_length_field()
    fm_prompt: str | None = fm_prompt_field()
    fm_dtype: FMDtype = fm_dtype_field()
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="cpu or cuda (default: cuda when available)", examples=["cpu"]
    )
