"""Predictions on the edge node: the checkpointed learner, swapped for a newer snapshot when one appears.

No HTTP here (fcl_client/http_api.py is the thin layer over it). The FM is loaded once: a work dir's FM
does not change between rounds, and a snapshot trained on another FM is refused. Everything that
encodes runs on one thread (`EdgePredictor.executor`): the FM's forward pass already uses every core
through torch's intra-op threads, and Hugging Face fast tokenizers must not be shared between threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.algorithms.abstention import Threshold
from common.fm import FoundationModel
from common.labels import normalize_text
from fcl_client.checkpoint import Progress, Step
from fcl_client.learner import Learner

log = logging.getLogger(__name__)
HeadName = Literal["small", "personal"]
HEADS: tuple[HeadName, ...] = ("small", "personal")
CHECKPOINTS_DIR = "checkpoints"  # as CheckpointStore names it (whose constructor creates it)
MAX_IN_FLIGHT = 8  # predict requests admitted at once, encoding or waiting for the encoder thread
RELOAD_INTERVAL_S = 1.0  # how often the work dir's progress.json is read for a newer snapshot


class NoHeadYet(LookupError):
    """The head asked for does not exist in the loaded checkpoint yet."""


class CheckpointRefused(RuntimeError):
    """A snapshot that cannot replace the loaded model (another FM, no learner, unreadable)."""


@dataclass(frozen=True)
class LoadedModel:
    """One checkpoint snapshot, loaded: what answers a prediction from start to end."""

    learner: Learner
    snapshot: int  # the numbered snapshot directory it came from (checkpoints/NNNNNN)
    tasks_learned: int  # tasks the small model has been trained on
    task_name: str  # the task in progress when it was written ("" between tasks)
    loaded_at: float  # time.time() when it was loaded

    def has(self, head: HeadName) -> bool:
        return (self.learner.model if head == "small" else self.learner.personal) is not None

    def version(self, head: HeadName) -> int:
        """small: tasks learned; personal: the version of the personalised head received from the server."""
        return self.tasks_learned if head == "small" else self.learner.personal_version

    def labels(self, head: HeadName) -> list[str]:
        if head == "small":
            return list(self.learner.labels) if self.learner.model is not None else []
        return list(self.learner.personal.labels) if self.learner.personal is not None else []


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class TextPrediction:
    labels: list[LabelScore]  # most probable first
    out_of_scope: bool  # the head abstained: its confidence is below its calibrated threshold
    confidence: float | None  # the threshold's score for this text (None: the head has no threshold)


@dataclass(frozen=True)
class Prediction:
    head: HeadName
    head_version: int
    snapshot: int
    num_labels: int
    results: list[TextPrediction]  # one per text, in request order
    threshold: Threshold | None  # what the head abstains below (None: never, or abstain off)


def tasks_learned(progress: Progress) -> int:
    """Tasks the checkpointed small model was trained on: every earlier one, and this one once trained."""
    return progress.task_index + (1 if progress.step >= Step.TRAINED else 0)


def predict(
    fm: FoundationModel,
    model: LoadedModel,
    texts: Sequence[str],
    top_k: int,
    head: HeadName,
    abstain: bool = True,
) -> Prediction:
    """Top `top_k` labels of each text (NFC-normalised and stripped, as training texts were read), and
    whether the head abstains on it (`abstain` and a calibrated threshold; docs/abstention.md)."""
    if not model.has(head):
        raise NoHeadYet(
            "no personalised head yet: it arrives when this client's first upload has been distilled; "
            "run a round first (`fcl-client run`), or ask the small head"
            if head == "personal"
            else "no small model yet: run at least one task first (`fcl-client run`)"
        )
    features = fm.encode([normalize_text(t) for t in texts])
    scoped = model.learner.predict_scoped(features, top=top_k, head=head, abstain=abstain)
    results = [
        TextPrediction(
            [LabelScore(label, prob) for label, prob in p.ranked],
            p.out_of_scope,
            p.confidence if p.threshold is not None else None,
        )
        for p in scoped
    ]
    threshold = model.learner.threshold(head) if abstain else None
    return Prediction(head, model.version(head), model.snapshot, len(model.labels(head)), results, threshold)


def read_progress(work_dir: Path) -> Progress | None:
    path = work_dir / "progress.json"
    if not path.exists():
        return None
    return Progress(**json.loads(path.read_text()))


def load_snapshot(work_dir: Path, fm_digest: str) -> LoadedModel:
    """The snapshot progress.json points at, loaded whole; CheckpointRefused if it cannot be used.

    A writer replaces progress.json first and deletes the older snapshot after, so a snapshot still
    named by progress.json once it has been read was complete while it was read: a load that raced
    with a newer save is noticed and refused (the next check loads the newer one).
    """
    progress = read_progress(work_dir)
    if progress is None:
        raise CheckpointRefused(f"{work_dir} has no progress.json; run `fcl-client run` first")
    snap = work_dir / CHECKPOINTS_DIR / f"{progress.snapshot:06d}"
    if not (snap / "meta.json").exists():
        raise CheckpointRefused(f"snapshot {progress.snapshot} holds no learner yet")
    try:
        learner = Learner.load(snap)
    except Exception as exc:  # deleted under us, or not a learner: refused below, whatever it was
        learner_error: Exception | None = exc
    else:
        learner_error = None
    again = read_progress(work_dir)
    if again is None or again.snapshot != progress.snapshot:
        raise CheckpointRefused(f"snapshot {progress.snapshot} was replaced while it was read")
    if learner_error is not None:
        raise CheckpointRefused(f"snapshot {progress.snapshot} cannot be read: {learner_error}")
    if learner.fm_digest != fm_digest:
        raise CheckpointRefused(
            f"snapshot {progress.snapshot} was trained on another FM ({learner.fm_digest[:12]}) than the "
            f"one loaded ({fm_digest[:12]}); restart `fcl-client serve` to serve it"
        )
    if learner.model is None:
        raise CheckpointRefused(f"snapshot {progress.snapshot} has no small model yet")
    # predictions need only the heads: the statistics bank (up to hundreds of MB with many labels) goes
    learner.bank = learner.task_bank = None
    return LoadedModel(learner, progress.snapshot, tasks_learned(progress), progress.task_name, time.time())


class EdgePredictor:
    """The FM (loaded once), the current snapshot (swapped atomically) and the one encoder thread."""

    def __init__(
        self, work_dir: Path, fm: FoundationModel, reload_interval: float = RELOAD_INTERVAL_S
    ) -> None:
        self.work_dir = work_dir
        self.fm = fm
        self.fm_digest = fm.digest
        self.reload_interval = reload_interval
        self._current = load_snapshot(work_dir, self.fm_digest)  # CheckpointRefused: nothing to serve
        self._refused: int | None = None  # the snapshot last refused (logged once, not at every check)
        self.executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-encoder")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def current(self) -> LoadedModel:
        return self._current

    def predict(
        self, texts: Sequence[str], top_k: int, head: HeadName, abstain: bool = True
    ) -> Prediction:
        """On the encoder thread: the model is taken once, so a swap mid-call does not affect it."""
        return predict(self.fm, self._current, texts, top_k, head, abstain)

    def submit(
        self, texts: Sequence[str], top_k: int, head: HeadName, abstain: bool = True
    ) -> futures.Future[Prediction]:
        return self.executor.submit(self.predict, texts, top_k, head, abstain)

    # -- hot reload ------------------------------------------------------------------------------
    def check_for_newer(self) -> bool:
        """Load and swap in the snapshot progress.json names, if it is another; True when swapped."""
        try:
            progress = read_progress(self.work_dir)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cannot read %s: %s", self.work_dir / "progress.json", exc)
            return False
        if progress is None or progress.snapshot in (self._current.snapshot, self._refused):
            return False
        try:
            loaded = load_snapshot(self.work_dir, self.fm_digest)
        except CheckpointRefused as exc:
            latest = read_progress(self.work_dir)
            if latest is not None and latest.snapshot == progress.snapshot:  # not a race: say it once
                self._refused = progress.snapshot
                log.warning("not serving snapshot %d: %s", progress.snapshot, exc)
            return False
        previous, self._current = self._current, loaded  # one reference assignment: atomic
        log.info(
            "serving snapshot %d (was %d): small v%d, personal v%d",
            loaded.snapshot,
            previous.snapshot,
            loaded.version("small"),
            loaded.version("personal"),
        )
        return True

    def start_watching(self) -> None:
        if self._watcher is None:
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, name="edge-reload", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.check_for_newer()
            except Exception:  # keep serving the loaded model whatever a bad snapshot does
                log.exception("checking %s for a newer checkpoint failed", self.work_dir)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None
        self.executor.shutdown(wait=True)
