"""Progress bars (tqdm, on stderr) for the client's long steps; silent unless stderr is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

# what the long-running code calls: (done, total) so far; it never sees tqdm
ProgressFn = Callable[[int, int], None]


def _ignore(done: int, total: int) -> None:
    pass


class Bars:
    """Makes progress callbacks; each draws one bar while its `with` block runs, or nothing when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, refresh_s: float = 0.1) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.refresh_s = refresh_s  # least time between redraws

    @classmethod
    def for_terminal(cls, wanted: bool = True, stream: TextIO | None = None) -> Bars:
        """Bars only when wanted (--progress) and the stream is a terminal: logs and pipes stay clean."""
        stream = stream or sys.stderr
        return cls(wanted and stream.isatty(), stream)

    @contextmanager
    def bar(self, desc: str, unit: str = "it", data: bool = False) -> Iterator[ProgressFn]:
        """A (done, total) callback drawing a bar; `data` counts bytes (shown as kB, MB, ...).

        The bar appears at the first call, so a step that turns out to have nothing to do (cached
        features, an upload that is a retry) draws nothing.
        """
        if not self.enabled:
            yield _ignore
            return
        made: list[tqdm[Any]] = []  # the bar, once drawn

        def update(done: int, total: int) -> None:
            if not made:
                made.append(
                    tqdm(
                        desc=desc,
                        total=total,
                        unit="B" if data else unit,
                        unit_scale=data,
                        unit_divisor=1024 if data else 1000,
                        file=self.stream,
                        leave=False,
                        dynamic_ncols=True,
                        mininterval=self.refresh_s,
                    )
                )
            shown = made[0]
            if shown.total != total:
                shown.total = total
            shown.update(done - shown.n)
            if done >= total:
                shown.refresh()  # show the finished state even if it came sooner than the redraw interval

        try:
            yield update
        finally:
            for shown in made:
                shown.close()
