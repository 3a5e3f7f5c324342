"""The agent's durable ledger: which folder content became which task index, and a copy of each task's data.

The ledger (work_dir/agent/ledger.json) is replaced atomically; a task's data is copied to
work_dir/agent/tasks/<index>/ before the ledger names it, so a restarted agent learns exactly the
examples it admitted, whatever the stream folder holds by then.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from common.datasets.checks import footer, load_labelled
from common.datasets.problems import ProblemLog
from common.datasets.records import DataFormatError, write_jsonl
from common.datasets.streams import TEST_FILE, TRAIN_FILE, Task
from fcl_client.durable import atomic_write, fsync_dir, fsync_file

LEDGER_VERSION = 1
Outcome = Literal["task", "rejected", "nothing-new"]


@dataclass
class LedgerEntry:
    """One task of the agent's stream: a round of a folder, with the fingerprint it was admitted at."""

    task_index: int
    folder: str
    round: int
    task_name: str
    fingerprint: str
    train_examples: int
    test_examples: int
    admitted_at: float


@dataclass
class FolderRecord:
    """The last content of a folder that was looked at, and what came of it."""

    fingerprint: str
    outcome: Outcome
    detail: str = ""


@dataclass
class Ledger:
    entries: list[LedgerEntry] = field(default_factory=list)
    folders: dict[str, FolderRecord] = field(default_factory=dict)
    last_upload_at: float = 0.0  # unix seconds of the last upload the server accepted (0: none yet)

    def rounds(self, folder: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.folder == folder]

    def to_json(self) -> str:
        return json.dumps({"version": LEDGER_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        data = json.loads(text)
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"ledger version {data.get('version')!r}, expected {LEDGER_VERSION}")
        return cls(
            entries=[LedgerEntry(**e) for e in data["entries"]],
            folders={k: FolderRecord(**v) for k, v in data["folders"].items()},
            last_upload_at=float(data.get("last_upload_at", 0.0)),
        )


class LedgerError(RuntimeError):
    """The ledger cannot be read; the message says which file and what to do."""


class LedgerStore:
    def __init__(self, work_dir: Path) -> None:
        self.root = work_dir / "agent"
        self.path = self.root / "ledger.json"
        self.tasks = self.root / "tasks"

    def load(self) -> Ledger:
        if not self.path.exists():
            return Ledger()
        try:
            return Ledger.from_json(self.path.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"the agent ledger {self.path} cannot be read ({exc}); it is written atomically, so it was "
                "changed by hand or by another program: restore it, or use a new --work-dir"
            ) from exc

    def save(self, ledger: Ledger) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, ledger.to_json().encode())

    # -- the data of each task ----------------------------------------------------------------------
    def task_dir(self, index: int) -> Path:
        return self.tasks / f"{index:06d}"

    def write_task(self, index: int, task: Task) -> None:
        """Copy a task's examples into the work dir (whole or not at all) before the ledger names it."""
        final = self.task_dir(index)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # left by an agent killed before its ledger named it
        write_jsonl(partial / TRAIN_FILE, task.train)
        write_jsonl(partial / TEST_FILE, task.test)
        for name in (TRAIN_FILE, TEST_FILE):
            fsync_file(partial / name)
        partial.rename(final)
        fsync_dir(final.parent)

    def read_task(self, entry: LedgerEntry) -> Task:
        folder = self.task_dir(entry.task_index)
        if not (folder / TRAIN_FILE).is_file():
            raise LedgerError(
                f"the agent's copy of task {entry.task_index} ({entry.task_name}) is missing from {folder}; "
                "the work dir was changed by hand: restore it, or use a new --work-dir"
            )
        return read_task_folder(folder, entry.task_name)

    def drop_unlisted(self, ledger: Ledger) -> None:
        """Remove task copies the ledger does not name (an agent killed between copy and ledger write)."""
        if not self.tasks.is_dir():
            return
        listed = {self.task_dir(e.task_index).name for e in ledger.entries}
        for path in self.tasks.iterdir():
            if path.name not in listed:
                shutil.rmtree(path, ignore_errors=True)


def read_task_folder(folder: Path, name: str) -> Task:
    """A task folder's examples, every label and text checked; DataErrors lists every problem."""
    log = ProblemLog()
    train_path = folder / TRAIN_FILE
    if not train_path.is_file():
        raise DataFormatError(f"task folder {folder} has no {TRAIN_FILE}")
    train = load_labelled(train_path, log, fmt="jsonl").examples
    test_path = folder / TEST_FILE
    test = load_labelled(test_path, log, fmt="jsonl").examples if test_path.is_file() else []
    log.raise_if_any(f"task folder {folder} cannot be used", footer(log))
    if not train:
        raise DataFormatError(f"{train_path} has no examples; every task needs at least one train example")
    return Task(name=name, train=train, test=test)
