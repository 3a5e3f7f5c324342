"""`FclClient`: the edge client as a library, on the runner, learner and checkpoints of `fcl-client run`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from common.config import SMCFConfig
from common.datasets.checks import check_sequences, footer
from common.datasets.problems import ProblemLog
from common.datasets.records import Example
from common.datasets.streams import Task
from common.fm import DEFAULT_FM, FoundationModel, default_device
from common.fm_encoding import FMDtype, PoolingMode
from fcl_client.connection import Connection
from fcl_client.learner import Learner
from fcl_client.progress import Bars
from fcl_client.runner import ClientConfig, ClientRunner, load_trained

log = logging.getLogger(__name__)
# The test data of every task given to the SDK, kept so that later tasks are evaluated on all tasks seen
# (as `fcl-client run` does from its stream directory); it stays in the work dir, like the CLI's stream.
TASKS_FILE = "sdk-tasks.json"


@dataclass(frozen=True)
class Registration:
    """What the server said to Register, and what this work dir already holds."""

    client_id: str
    server_version: str
    fm_name: str
    fm_digest: str
    fm_matches: bool  # the local FM was the server's (else the server's was downloaded into the work dir)
    personal_head_version: int  # 0 while the client has no personalised head yet
    tasks_done: int  # tasks learned in this work dir (from its checkpoint)


@dataclass(frozen=True)
class TaskResult:
    """One learned task: accuracies on the tasks seen so far (None without test data), job and bytes."""

    name: str
    index: int
    small_acc: float | None  # small model, pooled test data of every task seen so far
    personal_acc: float | None  # personalised FM head, same data (None before a head arrived)
    small_row: list[float | None]  # per earlier task j: accuracy on task j's test data (R[index][j])
    personal_row: list[float | None]
    job_id: int
    job_state: str  # JOB_STATE_DONE, _FAILED or _SUPERSEDED
    global_version: int  # global head version this task's job produced (0: none)
    personal_version: int  # personalised head version the client holds after the task
    bytes_up: int
    bytes_down: int
    already_done: bool = False  # learned earlier (same name): nothing was trained or sent this time
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw metrics.json record

    @classmethod
    def from_record(cls, record: dict[str, Any], already_done: bool = False) -> TaskResult:
        return cls(
            name=str(record.get("task", "")),
            index=int(record["task_index"]),
            small_acc=record.get("small_acc"),
            personal_acc=record.get("personal_acc"),
            small_row=list(record.get("small_row", [])),
            personal_row=list(record.get("personal_row", [])),
            job_id=int(record.get("job_id", 0)),
            job_state=str(record.get("job_state", "")),
            global_version=int(record.get("global_version", 0)),
            personal_version=int(record.get("personal_version", 0)),
            bytes_up=int(record.get("bytes_up", 0)),
            bytes_down=int(record.get("bytes_down", 0)),
            already_done=already_done,
            record=record,
        )


class Prediction(NamedTuple):
    """One ranked label and its probability."""

    label: str
    p: float


@dataclass(frozen=True)
class ScopedPrediction:
    """One text's ranking, and whether the head abstains on it (docs/abstention.md)."""

    labels: list[Prediction]  # most probable first, abstaining or not
    out_of_scope: bool  # the head's confidence is below its calibrated threshold
    confidence: float | None  # that confidence (top probability); None when the head has no threshold


class FclClient:
    """A federated continual-learning edge client, for use from Python.

    Tasks are handed over one at a time with `run_task`; each is trained with SMCF, uploaded, distilled
    by the server and answered with this client's personalised FM head, exactly as `fcl-client run`
    does (the same `ClientRunner`). Everything is checkpointed in `work_dir` after every step: a new
    `FclClient` on the same work dir continues where an interrupted one stopped, and `fcl-client
    predict --work-dir` reads it too. Not thread-safe; use one instance per work dir.

    >>> with FclClient("127.0.0.1:50051", "client-0", token, "/tmp/work") as client:
    ...     client.register()
    ...     result = client.run_task("banking", texts, labels, test_texts, test_labels)
    ...     client.predict(["what is my balance"], top=3)
    """

    def __init__(
        self,
        server: str,
        client_id: str,
        token: str,
        work_dir: str | os.PathLike[str],
        model: str = "mlp:256",
        *,
        device: str | None = None,
        fm: str | FoundationModel = DEFAULT_FM,
        fm_pooling: PoolingMode | None = None,
        fm_max_length: int | None = None,
        fm_prompt: str | None = None,
        fm_dtype: FMDtype = "float32",
        smcf: SMCFConfig | None = None,
        epochs: int | None = None,
        share_stats: bool | None = None,
        stats_noise: float | None = None,
        stats_rank: int | None = None,
        seed: int = 0,
        timeout: float = 60.0,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        on_message: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> None:
        """Configure the client; nothing is sent before `register` or `run_task`.

        server: HOST:PORT of fcl-server. token: the bearer token from `fcl-server enroll CLIENT_ID`.
        model: small-model spec (`linear`, `mlp:W[,W...][:act][:ln]` or JSON). fm: name or directory
        of the local FM, or an already loaded `FoundationModel`; used when it is the server's, else
        the server's FM is downloaded into work_dir. fm_pooling, fm_max_length, fm_prompt: the FM
        encoding, like `--fm-pooling/--fm-max-length/--fm-prompt` (None: as the server encodes; a value
        that differs from the server's is refused before anything is downloaded or sent); for an
        already loaded `FoundationModel`, they are its own overrides instead. fm_dtype: precision of
        feature extraction on this node ("float32", "bf16", "fp16"). smcf: training options; epochs,
        share_stats, stats_noise and stats_rank override it like the CLI flags of the same names.
        tls_ca enables TLS (the CA of the server certificate); tls_cert/tls_key add a client
        certificate (mutual TLS). on_message receives the progress lines `fcl-client run` prints
        (default: logged at INFO). progress: progress bars on stderr when it is a terminal.
        """
        overrides = {
            "epochs": epochs,
            "share_stats": share_stats,
            "stats_noise": stats_noise,
            "stats_rank": stats_rank,
        }
        encoding = {"fm_pooling": fm_pooling, "fm_max_length": fm_max_length, "fm_prompt": fm_prompt}
        if isinstance(fm, FoundationModel) and any(v is not None for v in encoding.values()):
            raise ValueError(
                "fm_pooling/fm_max_length/fm_prompt apply to an FM the client loads: give them on the "
                "FoundationModel itself (its `overrides`), or pass its name or directory as fm"
            )
        base = (smcf or SMCFConfig()).model_dump()
        tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        self.config = ClientConfig(
            server=server,
            client_id=client_id,
            token=token,
            model=model,
            work_dir=Path(work_dir),
            device=device or default_device(),
            fm=str(fm.path) if isinstance(fm, FoundationModel) else fm,
            fm_dtype=fm.dtype if isinstance(fm, FoundationModel) else fm_dtype,
            **{k: v for k, v in encoding.items() if v is not None},
            smcf=SMCFConfig.model_validate(base | {k: v for k, v in overrides.items() if v is not None}),
            seed=seed,
            timeout=timeout,
            **{k: Path(v) for k, v in tls.items() if v is not None},
        )
        self._conn = Connection(server, token, timeout=timeout, tls=self.config.tls())
        self._runner = ClientRunner(
            self.config,
            self._conn,
            say=on_message or log.info,
            bars=Bars.for_terminal(progress),
            local_fm=fm if isinstance(fm, FoundationModel) else None,
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection to the server (a trained work dir still answers `predict`)."""
        self._conn.close()

    def __enter__(self) -> FclClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the server ------------------------------------------------------------------------------
    def register(self) -> Registration:
        """Announce this client to the server and settle the FM; returns what the server said.

        The first call also makes sure the client uses the server's FM (downloading it into the work
        dir when the local one differs, resumable and verified) and loads the checkpoint; `run_task`
        calls it when needed. Later calls register again, e.g. to see the current head version.
        """
        if self._runner.registration is None:
            self._runner.prepare()  # registers while settling the FM
            reg = self._runner.registration
            assert reg is not None
        else:
            fm, _ = self._runner.prepare()
            reg = self._conn.register(self.config.client_id, fm.digest, self._runner.spec.to_json())
        return Registration(
            client_id=reg.client_id,
            server_version=reg.server_version,
            fm_name=reg.foundation_model.name,
            fm_digest=reg.foundation_model.digest,
            fm_matches=reg.fm_matches,
            personal_head_version=int(reg.personal_head_version),
            tasks_done=self._runner.progress.task_index,
        )

    def run_task(
        self,
        name: str,
        texts: Sequence[str],
        labels: Sequence[str],
        test_texts: Sequence[str] = (),
        test_labels: Sequence[str] = (),
    ) -> TaskResult:
        """Learn one task: train the small model, upload, wait for distillation, receive the head.

        `texts`/`labels` are the task's training examples (they never leave the client; what is
        uploaded is described in the README). With test data, the result has the accuracies of the
        small model and of the personalised FM head on the test data of every task seen so far. Task
        names are unique per client: a name already learned returns its recorded result
        (`already_done`) without training or sending anything, so a restarted program can simply
        repeat its calls; an interrupted task continues from its last completed step.

        Every text and label is checked first, as `fcl-data` checks them: both are NFC-normalised
        and stripped, and an empty text, a label that breaks the label rule (common/labels.py) or a
        text with a lone surrogate raises DataErrors (a ValueError) that lists every one of them,
        before anything is trained or sent.
        """
        log = ProblemLog()  # every text and label is checked before anything is trained or sent
        train = _examples(texts, labels, ("texts", "labels"), log)
        test = _examples(test_texts, test_labels, ("test_texts", "test_labels"), log)
        log.raise_if_any(f"task {name!r} cannot be learnt, nothing was sent", footer(log))
        if not train:
            raise ValueError(f"task {name!r} has no training examples")
        self._runner.prepare()
        done = self._runner.progress.task_index
        records = {_index(r): r for r in self._runner.load_records()}
        names = [str(records.get(i, {}).get("task", "")) for i in range(done)]
        if name in names:
            return TaskResult.from_record(records[names.index(name)], already_done=True)
        kept = self._load_tests()
        kept = [*kept[:done], *[[] for _ in range(done - len(kept))], [_dump(ex) for ex in test]]
        self._save_tests(kept)  # before any step, so an interrupted task is evaluated the same way
        stream = [Task(n, [], [_load(d) for d in kept[i]]) for i, n in enumerate(names)]
        record = self._runner.run_task([*stream, Task(name, train, test)], done)
        return TaskResult.from_record(dict(record))

    # -- what was learned ------------------------------------------------------------------------
    def predict(
        self, texts: Sequence[str], top: int = 5, head: Literal["small", "personal"] = "small"
    ) -> list[list[Prediction]]:
        """The `top` most probable labels of each text, best first, from the small model or the
        personalised FM head. Works offline on a trained work dir (no server call)."""
        fm, learner = self._trained()
        ranked = learner.predict(fm.encode(list(texts)), top=top, head=head)
        return [[Prediction(label, p) for label, p in row] for row in ranked]

    def predict_scoped(
        self,
        texts: Sequence[str],
        top: int = 5,
        head: Literal["small", "personal"] = "small",
        abstain: bool = True,
    ) -> list[ScopedPrediction]:
        """As `predict`, with each text marked out_of_scope where the head's confidence is below its
        calibrated threshold (a head without one, or `abstain` False, never abstains)."""
        fm, learner = self._trained()
        scoped = learner.predict_scoped(fm.encode(list(texts)), top=top, head=head, abstain=abstain)
        return [
            ScopedPrediction(
                [Prediction(label, p) for label, p in r.ranked],
                r.out_of_scope,
                r.confidence if r.threshold is not None else None,
            )
            for r in scoped
        ]

    def results(self) -> list[TaskResult]:
        """Every task learned in this work dir, in order (from its metrics.json)."""
        records = sorted(self._runner.load_records(), key=_index)
        return [TaskResult.from_record(r, already_done=True) for r in records]

    def _trained(self) -> tuple[FoundationModel, Learner]:
        """The learner in memory once this instance is registered (it equals the checkpoint); else the
        checkpoint, loaded offline."""
        if self._runner.registration is not None:
            return self._runner.prepare()
        return load_trained(self.config.work_dir, self.config.device)

    # -- the test data of earlier tasks ------------------------------------------------------------
    def _load_tests(self) -> list[list[dict[str, str]]]:
        path = self.config.work_dir / TASKS_FILE
        return list(json.loads(path.read_text())["tests"]) if path.exists() else []

    def _save_tests(self, tests: list[list[dict[str, str]]]) -> None:
        path = self.config.work_dir / TASKS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"tests": tests}))
        os.replace(tmp, path)


def _examples(
    texts: Sequence[str], labels: Sequence[str], names: tuple[str, str], log: ProblemLog
) -> list[Example]:
    """Examples NFC-normalised and stripped as fcl-data's readers keep them; problems go to `log`."""
    what = "/".join(names)
    if isinstance(texts, str) or isinstance(labels, str):
        raise TypeError(f"{what}: give sequences of strings, not one string")
    if len(texts) != len(labels):
        raise ValueError(f"{what}: {len(texts)} texts but {len(labels)} labels")
    return check_sequences(texts, labels, names, log)


def _index(record: dict[str, object]) -> int:
    index = record["task_index"]
    assert isinstance(index, int), record
    return index


def _dump(example: Example) -> dict[str, str]:
    return {"text": example.text, "label": example.label}


def _load(row: dict[str, str]) -> Example:
    return Example(row["text"], row["label"])
