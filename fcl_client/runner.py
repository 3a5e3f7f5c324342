"""The edge client's main loop: per task train (SMCF) → upload → wait for OBOD → download P_c → evaluate."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from common.algorithms.obod import Head
from common.algorithms.smcf import TaskData
from common.config import AbstentionConfig, SMCFConfig
from common.datasets.streams import Task, load_task_stream
from common.fm import (
    DEFAULT_FM,
    FoundationModel,
    FoundationModelError,
    cached_features,
    default_device,
    extract_fm_archive,
)
from common.fm_encoding import EncodingError, EncodingOverrides, FMDtype, FMEncoding, PoolingMode
from common.package import decode_package, encode_package
from common.stubs.fcl.v1 import fcl_pb2 as pb
from common.tls import TLSFiles
from common.zoo import parse_spec
from fcl_client.checkpoint import CheckpointStore, Progress, Step
from fcl_client.connection import Connection
from fcl_client.learner import Learner
from fcl_client.progress import Bars

log = logging.getLogger(__name__)
FM_PATH_FILE = "fm_path"
FM_ENCODING_FILE = "fm_encoding.json"  # the encoding the work dir's features were computed with
_OPTION_FLAGS = {"pooling": "--fm-pooling", "max_length": "--fm-max-length", "prompt": "--fm-prompt"}


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: str
    client_id: str
    token: str
    stream: Path | None = None  # the CLI's task-stream directory; the SDK hands tasks over one by one
    model: str = "mlp:256"
    work_dir: Path
    device: str = Field(default_factory=default_device)
    fm: str = DEFAULT_FM
    # explicit FM encoding options: must match the server's (else refused), None = as the FM's files say
    fm_pooling: PoolingMode | None = None
    fm_max_length: int | None = Field(None, ge=2)
    fm_prompt: str | None = None
    fm_dtype: FMDtype = "float32"  # precision of feature extraction on this node (not part of the digest)
    smcf: SMCFConfig = Field(default_factory=SMCFConfig)
    abstention: AbstentionConfig = Field(default_factory=AbstentionConfig)  # out-of-scope thresholds
    seed: int = 0
    timeout: float = 60.0
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def tls(self) -> TLSFiles:
        return TLSFiles(self.tls_cert, self.tls_key, self.tls_ca)

    def fm_overrides(self) -> EncodingOverrides:
        return EncodingOverrides.of(self.fm_pooling, self.fm_max_length, self.fm_prompt)


@dataclass
class RunSummary:
    tasks_done: int
    failed_jobs: list[int] = field(default_factory=list)
    metrics: list[dict[str, object]] = field(default_factory=list)


class ClientRunner:
    """One client's work: `run` learns a task-stream directory (the CLI); the SDK calls `prepare` and
    `run_task` itself. Both go through `run_task`, so a task is learned the same way either way."""

    def __init__(
        self,
        cfg: ClientConfig,
        conn: Connection,
        say: Callable[[str], None] = print,
        bars: Bars | None = None,
        local_fm: FoundationModel | None = None,
    ) -> None:
        self.cfg = cfg
        self.conn = conn
        self.say = say
        self.bars = bars or Bars(enabled=False)
        self.spec = parse_spec(cfg.model)
        self.store = CheckpointStore(cfg.work_dir)
        self.metrics_path = cfg.work_dir / "metrics.json"
        self.local_fm = local_fm  # an FM already loaded by the caller: used when it is the server's
        self.registration: pb.RegisterResponse | None = None
        self.progress = Progress()
        self._ready: tuple[FoundationModel, Learner] | None = None

    def run(self) -> RunSummary:
        """Learn every task of the stream directory, continuing from the checkpoint."""
        if self.cfg.stream is None:
            raise ValueError("no task stream directory configured (stream)")
        stream = load_task_stream(self.cfg.stream)
        self.prepare()
        for index in range(self.progress.task_index, len(stream)):
            self.run_task(stream, index, total=len(stream))
        return RunSummary(len(stream), self.progress.failed_jobs, self.load_records())

    def prepare(self) -> tuple[FoundationModel, Learner]:
        """Register, settle the FM (the server's, downloaded if need be) and load the checkpoint; once."""
        if self._ready is None:
            fm = self.resolve_fm()
            progress, learner = self.store.load()
            learner = learner or Learner(self.spec, fm.feature_dim, fm.digest)
            learner.abstention = self.cfg.abstention  # a run's setting, not the checkpoint's
            if learner.fm_digest != fm.digest:
                raise FoundationModelError(
                    f"the checkpoint in {self.cfg.work_dir} was trained on another FM "
                    f"({learner.fm_digest[:12]}) than "
                    f"the server's ({fm.digest[:12]}); use a new --work-dir"
                )
            self.progress, self._ready = progress, (fm, learner)
        return self._ready

    def run_task(self, stream: Sequence[Task], index: int, total: int | None = None) -> dict[str, object]:
        """Take task `index` from where the checkpoint left it to done; returns its metrics record.

        Every earlier task of `stream` must be done (only their test data is read: accuracy on all
        tasks seen so far); a task with another name than the one in progress there starts over.
        `total` (tasks to come in all, when known) is only for the progress line.
        """
        fm, learner = self.prepare()
        if index != self.progress.task_index:
            raise ValueError(f"task {index} is not the next one: {self.progress.task_index} tasks are done")
        task, progress = stream[index], self.progress
        if progress.task_name != task.name:
            progress = Progress(
                task_index=index,
                task_name=task.name,
                snapshot=progress.snapshot,
                failed_jobs=progress.failed_jobs,
            )
        self.say(
            f"[{self.cfg.client_id}] task {index + 1}{f'/{total}' if total else ''} {task.name}: "
            f"{len(task.train)} examples of {len(task.labels)} labels"
        )
        self.progress = progress
        try:
            self._run_task(fm, list(stream), index, progress, learner)
        except BaseException:
            # the learner in memory may be half-way through a step: the next call reloads the checkpoint,
            # exactly as a restarted client would
            self._ready = None
            raise
        self.progress = Progress(
            task_index=index + 1, snapshot=progress.snapshot, failed_jobs=progress.failed_jobs
        )
        self.store.save(self.progress, learner)
        return next((r for r in self.load_records() if r["task_index"] == index), {"task_index": index})

    def _run_task(
        self, fm: FoundationModel, stream: list[Task], index: int, progress: Progress, learner: Learner
    ) -> None:
        task = stream[index]
        fresh = False  # an upload id made in this call: the server cannot hold any of its bytes yet
        if progress.step == Step.UPLOADED:  # resumed: the server may have been restored since
            self._check_upload_is_known(progress, learner)
        if progress.step < Step.TRAINED:
            feats = self._features(fm, [ex.text for ex in task.train])
            with self.bars.bar(f"training {task.name}", unit="epoch") as on_epoch:
                learner.train(
                    feats,
                    [ex.label for ex in task.train],
                    self.cfg.smcf,
                    seed=self.cfg.seed * 1000 + index,
                    on_epoch=on_epoch,
                )
            progress.step, progress.upload_id, fresh = Step.TRAINED, uuid.uuid4().hex, True
            package = learner.package(self.cfg.smcf, seed=self.cfg.seed * 1000 + index)
            self.store.save_upload(progress.upload_id, encode_package(package))
            self.store.save(progress, learner)
            self.say(f"[{self.cfg.client_id}]   trained small model ({len(learner.labels)} labels seen)")
            if learner.small_threshold is not None:
                t = learner.small_threshold
                self.say(
                    f"[{self.cfg.client_id}]   abstention threshold {t.score} {t.value:.3f} "
                    f"(keeps {t.coverage:.0%} of {t.samples} held-out examples; calibration copy "
                    f"{learner.calibration_s:.1f}s)"
                )
        if progress.step < Step.UPLOADED:
            data = self.store.load_upload(progress.upload_id) or encode_package(
                learner.package(self.cfg.smcf, seed=self.cfg.seed * 1000 + index)
            )  # (encoding again only for a checkpoint written before packages were kept)
            with self.bars.bar(f"uploading {task.name}", data=True) as sent:
                receipt = self.conn.upload(
                    data, progress.upload_id, task.name, index, fm.digest, progress=sent, fresh=fresh
                )
            progress.step, progress.job_id, progress.bytes_up = Step.UPLOADED, receipt.job_id, len(data)
            self.store.save(progress, learner)
            self.store.drop_upload(progress.upload_id)
            self.say(f"[{self.cfg.client_id}]   uploaded {len(data)} bytes, job {receipt.job_id}")
        if progress.step < Step.DOWNLOADED:
            # P_c is calibrated on the task's held-out training slice: re-derived (cached features, the
            # same seed) so a client restarted while waiting calibrates on the same rows; never test data
            held = None
            if learner.abstention.enabled:
                train_feats = self._features(fm, [ex.text for ex in task.train])
                held = learner.holdout(
                    train_feats, [ex.label for ex in task.train], self.cfg.seed * 1000 + index
                )
            progress.bytes_down = self._await_head(progress, learner, held)
            progress.step = Step.DOWNLOADED
            self.store.save(progress, learner)
        if progress.step < Step.DONE:
            metrics = self._evaluate(fm, stream, index, learner)
            metrics.update(bytes_up=float(progress.bytes_up), bytes_down=float(progress.bytes_down))
            self._store_record(metrics | self._job_fields(progress, learner))
            self.conn.report_metrics(
                task.name, index, {k: float(v) for k, v in metrics.items() if isinstance(v, float)}
            )
            progress.step = Step.DONE
            self.store.save(progress, learner)

    def _check_upload_is_known(self, progress: Progress, learner: Learner) -> None:
        """A server restored from a backup taken before this upload does not know it, and its job id
        may name another job: then upload the task's package again, under a new id."""
        status = self.conn.upload_status(progress.upload_id)
        if status.complete and status.receipt.job_id == progress.job_id:
            return
        self.say(
            f"[{self.cfg.client_id}]   the server does not know upload {progress.upload_id} (job "
            f"{progress.job_id}); it was restored from an earlier backup: uploading the package again"
        )
        progress.step, progress.upload_id, progress.job_id = Step.TRAINED, uuid.uuid4().hex, 0
        self.store.save(progress, learner)

    @staticmethod
    def _job_fields(progress: Progress, learner: Learner) -> dict[str, object]:
        """How the task's job ended and the head versions it left (kept in metrics.json, not reported)."""
        return {
            "job_id": progress.job_id,
            "job_state": progress.job_state,
            "global_version": progress.global_version,
            "personal_version": learner.personal_version,
        }

    def _await_head(self, progress: Progress, learner: Learner, held: TaskData | None = None) -> int:
        """Wait for the task's job; install the personalised head it produced. Returns bytes downloaded."""
        event = self.conn.watch_job(progress.job_id, on_event=self._show_event)
        progress.job_state, progress.global_version = pb.JobState.Name(event.state), event.global_version
        if event.state != pb.JOB_STATE_DONE:
            self.say(
                f"[{self.cfg.client_id}]   job {progress.job_id} ended {pb.JobState.Name(event.state)}: "
                f"{event.message}"
            )
            if event.state == pb.JOB_STATE_FAILED:
                progress.failed_jobs.append(progress.job_id)
            return 0
        header, data = self.conn.get_knowledge(pb.HEAD_SCOPE_PERSONAL, event.personal_version)
        pkg = decode_package(data)
        seed = self.cfg.seed * 1000 + progress.task_index
        learner.absorb_personal(
            Head(pkg.build(), pkg.labels, pkg.abstention), header.version, self.cfg.smcf, seed, held
        )
        self.say(f"[{self.cfg.client_id}]   personalised head v{header.version} ({header.num_labels} labels)")
        return len(data)

    def _show_event(self, event: pb.JobEvent) -> None:
        extra = f" ({event.queue_position} ahead)" if event.state == pb.JOB_STATE_QUEUED else ""
        self.say(f"[{self.cfg.client_id}]   job {event.job_id}: {pb.JobState.Name(event.state)}{extra}")

    def _evaluate(
        self, fm: FoundationModel, stream: list[Task], index: int, learner: Learner
    ) -> dict[str, object]:
        """Row `index` of R for the small model and FM-personal on this client's own test data."""
        small_row: list[float | None] = [None] * len(stream)
        personal_row: list[float | None] = [None] * len(stream)
        seen_feats, seen_labels = [], []
        for j in range(index + 1):
            if not stream[j].test:
                continue
            feats = self._features(fm, [ex.text for ex in stream[j].test])
            labels = [ex.label for ex in stream[j].test]
            small_row[j] = learner.small_accuracy(feats, labels)
            personal_row[j] = learner.personal_accuracy(feats, labels)
            seen_feats.append(feats)
            seen_labels.extend(labels)
        record: dict[str, object] = {
            "task": stream[index].name,
            "task_index": index,
            "small_row": small_row,
            "personal_row": personal_row,
        }
        if seen_feats:
            pooled = torch.cat(seen_feats)
            record["small_acc"] = learner.small_accuracy(pooled, seen_labels)
            personal = learner.personal_accuracy(pooled, seen_labels)
            if personal is not None:
                record["personal_acc"] = personal
        self.say(
            f"[{self.cfg.client_id}]   accuracy on seen tasks: "
            f"small {record.get('small_acc', float('nan')):.3f}"
            f", FM-personal {record.get('personal_acc', float('nan')):.3f}"
        )
        return record

    def _store_record(self, record: dict[str, object]) -> None:
        records = [r for r in self.load_records() if r["task_index"] != record["task_index"]] + [record]
        self.metrics_path.write_text(json.dumps(records, indent=1))

    def load_records(self) -> list[dict[str, object]]:
        """metrics.json: one record per task done (accuracy rows, bytes, job and head versions)."""
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else []

    def _features(self, fm: FoundationModel, texts: list[str]) -> torch.Tensor:
        with self.bars.bar("FM features", unit="text") as encoded:
            return cached_features(fm, texts, self.cfg.work_dir / "cache", progress=encoded)

    def resolve_fm(self) -> FoundationModel:
        """The server's FM: the local one when it matches, else the server's (downloaded, resumable, checked).

        Explicit encoding options (--fm-pooling, --fm-max-length, --fm-prompt) must be what the server
        encodes with: a client told otherwise is refused, naming each difference, before anything is
        downloaded. Without them the client encodes as the server does.
        """
        overrides = self.local_fm.overrides if self.local_fm else self.cfg.fm_overrides()
        try:
            local: FoundationModel | None = self.local_fm or FoundationModel(
                self.cfg.fm, device=self.cfg.device, overrides=overrides, dtype=self.cfg.fm_dtype
            )
        except FoundationModelError as exc:
            log.info("no usable local FM (%s); will download the server's", exc)
            local = None
        reg = self.conn.register(self.cfg.client_id, local.digest if local else "", self.spec.to_json())
        self.registration = reg
        if local is not None and reg.fm_matches:
            return self._remember_fm(local)
        server_fm = reg.foundation_model
        served = self._served_encoding(server_fm, overrides)
        if local is not None and served is not None and local.files_digest == server_fm.files_digest:
            # the same model files, encoded otherwise by default: take the server's settings, no download
            fm = local.reconfigured(EncodingOverrides.from_encoding(served))
            if fm.digest == server_fm.digest:
                self.say(
                    f"[{self.cfg.client_id}] using the local FM with the server's encoding "
                    f"({'; '.join(local.encoding.differences(served))})"
                )
                return self._remember_fm(fm)
        target = self.cfg.work_dir / "fm" / server_fm.digest
        if not target.is_dir():  # unpacked whole or not at all (below), whatever the model's layout
            self.say(
                f"[{self.cfg.client_id}] downloading the server's FM {server_fm.name} "
                f"({server_fm.archive_size / 1e6:.1f} MB)"
            )
            archive = self.cfg.work_dir / "fm.tar"
            with self.bars.bar("downloading FM", data=True) as received:
                self.conn.download_fm(archive, progress=received)
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # a client killed while unpacking
            extract_fm_archive(archive, partial)
            partial.rename(target)
            archive.unlink()
        # the archive's fcl_encoding.json holds the server's encoding; the options given agree with it
        fm = FoundationModel(
            str(target), device=self.cfg.device, overrides=overrides, dtype=self.cfg.fm_dtype
        )
        if fm.digest != server_fm.digest:
            raise FoundationModelError("the downloaded FM does not match the server's digest")
        return self._remember_fm(fm)

    def _served_encoding(
        self, server_fm: pb.FoundationModelInfo, overrides: EncodingOverrides
    ) -> FMEncoding | None:
        """The server's encoding (None from a server too old to say); refuses options that contradict it."""
        if not server_fm.encoding_json:
            return None
        try:
            served = FMEncoding.from_json(server_fm.encoding_json)
        except EncodingError as exc:
            raise FoundationModelError(f"the server describes its FM encoding badly: {exc}") from exc
        served_values = served.as_dict()
        conflicts = [
            f"{_OPTION_FLAGS.get(key, key)} {value!r} (the server: {served_values[key]!r})"
            for key, value in overrides.given().items()
            if value != served_values[key]
        ]
        if conflicts:
            raise FoundationModelError(
                "this client's FM encoding differs from the server's, so their features would not be "
                f"comparable: {'; '.join(conflicts)}. Drop these options to encode as the server does, "
                "or set them to the server's values (`fcl-server fm info` prints them)"
            )
        return served

    def _remember_fm(self, fm: FoundationModel) -> FoundationModel:
        """Record which FM and encoding this work dir uses, so `fcl-client predict` loads the same offline."""
        self.cfg.work_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.work_dir / FM_PATH_FILE).write_text(str(fm.path))
        (self.cfg.work_dir / FM_ENCODING_FILE).write_text(fm.encoding.canonical_json())
        return fm


def load_trained(work_dir: Path, device: str = "cpu") -> tuple[FoundationModel, Learner]:
    """The FM and learner checkpointed in `work_dir`, loaded offline (what predictions use)."""
    _, learner = CheckpointStore(work_dir).load()
    if learner is None or not (work_dir / FM_PATH_FILE).exists():
        raise RuntimeError(f"{work_dir} holds no trained client; run `fcl-client run` first")
    return load_fm(work_dir, device), learner


def load_fm(work_dir: Path, device: str = "cpu") -> FoundationModel:
    """The FM `work_dir`'s client trained with, encoding as it did, loaded offline."""
    fm_file = work_dir / FM_PATH_FILE
    if not fm_file.exists():
        raise RuntimeError(f"{work_dir} holds no trained client; run `fcl-client run` first")
    encoding_file = work_dir / FM_ENCODING_FILE
    overrides = EncodingOverrides()
    if encoding_file.exists():  # (older work dirs have none: their FM encoded as its files said)
        overrides = EncodingOverrides.from_encoding(FMEncoding.from_json(encoding_file.read_text()))
    return FoundationModel(fm_file.read_text().strip(), device=device, overrides=overrides)
