"""Task streams on disk: one subdirectory per task holding `train.jsonl` and `test.jsonl`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.datasets.checks import footer, load_labelled
from common.datasets.problems import ProblemLog
from common.datasets.records import DataFormatError, Example, write_jsonl

TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"


@dataclass(frozen=True)
class Task:
    """One task of a continual-learning stream: its train and test examples."""

    name: str
    train: list[Example]
    test: list[Example]

    @property
    def labels(self) -> list[str]:
        """Sorted unique labels of the train examples."""
        return sorted({ex.label for ex in self.train})


def load_task_stream(directory: Path) -> list[Task]:
    """Read every task subdirectory of `directory`, in name order.

    Every label and text of every task is checked first (common/labels.py): DataErrors lists every
    problem of the whole stream, so a client refuses bad data before it trains or sends anything.
    """
    directory = Path(directory)
    log = ProblemLog()
    tasks = [_load_task(task_dir, log) for task_dir in _task_dirs(directory)]
    log.raise_if_any(f"task stream {directory} cannot be used", footer(log))
    return tasks


def write_task(directory: Path, task: Task) -> Path:
    """Write `task` as `directory/<task.name>/{train,test}.jsonl`; returns the task directory."""
    task_dir = Path(directory) / task.name
    write_jsonl(task_dir / TRAIN_FILE, task.train)
    write_jsonl(task_dir / TEST_FILE, task.test)
    return task_dir


def _task_dirs(directory: Path) -> list[Path]:
    if not directory.exists():
        raise DataFormatError(
            f"task stream directory {directory} does not exist; "
            "create one with `fcl-data split` (or `fcl-data builtin`) and pass its client directory"
        )
    if not directory.is_dir():
        raise DataFormatError(f"task stream {directory} is a file, not a directory; pass the directory")
    task_dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not task_dirs:
        raise DataFormatError(
            f"task stream directory {directory} has no task subdirectories; expected one "
            f"subdirectory per task (e.g. task-00/) holding {TRAIN_FILE} and {TEST_FILE}"
        )
    return task_dirs


def _load_task(task_dir: Path, log: ProblemLog) -> Task:
    train_path = task_dir / TRAIN_FILE
    if not train_path.is_file():
        raise DataFormatError(
            f"task {task_dir.name!r} in {task_dir.parent} has no {TRAIN_FILE}; "
            f"add {train_path} or remove the directory from the stream"
        )
    train = load_labelled(train_path, log, fmt="jsonl").examples
    if not train and not log:
        raise DataFormatError(f"{train_path} has no examples; every task needs at least one train example")
    test_path = task_dir / TEST_FILE
    test = load_labelled(test_path, log, fmt="jsonl").examples if test_path.is_file() else []
    return Task(name=task_dir.name, train=train, test=test)
