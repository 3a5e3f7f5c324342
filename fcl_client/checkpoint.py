"""Client checkpoints: each step writes a complete numbered snapshot, then points progress at it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path

from fcl_client.learner import Learner


class Step(IntEnum):
    """How far a task got; a restarted client continues after the last completed step."""

    NONE = 0
    TRAINED = 1
    UPLOADED = 2
    DOWNLOADED = 3
    DONE = 4


@dataclass
class Progress:
    task_index: int = 0  # the task being worked on (all earlier ones are DONE)
    task_name: str = ""
    step: int = Step.NONE
    upload_id: str = ""
    job_id: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    job_state: str = ""  # JobState name the task's job ended in (once its head was awaited)
    global_version: int = 0  # global head version that job produced (0: none)
    snapshot: int = 0  # number of the snapshot directory holding the learner
    failed_jobs: list[int] = field(default_factory=list)


class CheckpointStore:
    def __init__(self, work_dir: Path) -> None:
        self.root = work_dir / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.progress_path = work_dir / "progress.json"
        self.uploads = work_dir / "uploads"

    def load(self) -> tuple[Progress, Learner | None]:
        if not self.progress_path.exists():
            return Progress(), None
        progress = Progress(**json.loads(self.progress_path.read_text()))
        snap = self.root / f"{progress.snapshot:06d}"
        return progress, Learner.load(snap) if (snap / "meta.json").exists() else None

    def save(self, progress: Progress, learner: Learner | None) -> None:
        progress.snapshot += 1
        snap = self.root / f"{progress.snapshot:06d}"
        shutil.rmtree(snap, ignore_errors=True)
        if learner is not None:
            learner.save(snap)
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(progress), indent=1))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.progress_path)
        for old in self.root.iterdir():  # keep only the snapshot progress points at
            if old.name != snap.name:
                shutil.rmtree(old, ignore_errors=True)

    # -- the package of the task being uploaded ----------------------------------------------------
    # Encoding is not byte-stable (safetensors orders its metadata arbitrarily), so the bytes are kept
    # from training until the upload is accepted: a restarted client re-sends exactly them, under the
    # same upload id, and resumes from the bytes the server already holds.
    def save_upload(self, upload_id: str, data: bytes) -> None:
        self.uploads.mkdir(parents=True, exist_ok=True)
        tmp = self.uploads / f"{upload_id}.tmp"
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.uploads / f"{upload_id}.safetensors")

    def load_upload(self, upload_id: str) -> bytes | None:
        path = self.uploads / f"{upload_id}.safetensors"
        return path.read_bytes() if path.exists() else None

    def drop_upload(self, upload_id: str) -> None:
        (self.uploads / f"{upload_id}.safetensors").unlink(missing_ok=True)
