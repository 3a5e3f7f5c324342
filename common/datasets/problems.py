"""Problems found in user data, collected over every file and value, then reported in one message.

Each distinct problem (file, column, what is wrong, which includes the offending value) is one entry,
with every line or row where it occurs: a label misspelt on 4,000 rows is one line of the report that
names its first rows and counts the rest, and every distinct offending value is listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.datasets.records import DataFormatError

SHOWN_PLACES = 5  # lines/rows named per problem; the rest are counted
MAX_SHOWN = 1000  # distinct problems listed in one message; the rest are counted


@dataclass
class Problem:
    """One distinct problem and the places (1-based lines, rows or indices) where it occurs."""

    source: str  # a file, or the argument of an SDK call
    message: str  # what is wrong, quoting the offending value
    column: str = ""  # the column or field it is in
    unit: str = "line"  # what `places` count: "line", "row" or "index"
    places: list[int] = field(default_factory=list)

    def render(self) -> str:
        where = self.source
        if self.places:
            shown = ", ".join(str(p) for p in self.places[:SHOWN_PLACES])
            more = len(self.places) - SHOWN_PLACES
            rest = f" and {more} more" if more > 0 else ""
            if self.unit == "index":
                where += f" at index {shown}{rest}"
            else:
                where += f" {self.unit}{'s' if len(self.places) > 1 else ''} {shown}{rest}"
        if self.column:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"


class ProblemLog:
    """Collects problems, one entry per (source, column, unit, message), keeping the order found."""

    def __init__(self) -> None:
        self._found: dict[tuple[str, str, str, str], Problem] = {}

    def add(
        self, source: str, message: str, *, column: str = "", unit: str = "line", at: int | None = None
    ) -> None:
        key = (source, column, unit, message)
        problem = self._found.get(key)
        if problem is None:
            problem = self._found[key] = Problem(source, message, column, unit)
        if at is not None:
            problem.places.append(at)

    def __bool__(self) -> bool:
        return bool(self._found)

    def __len__(self) -> int:
        return len(self._found)

    @property
    def problems(self) -> list[Problem]:
        """In file order (files as first met), and within a file by the first line or row."""
        sources = list(dict.fromkeys(p.source for p in self._found.values()))
        return sorted(
            self._found.values(),
            key=lambda p: (sources.index(p.source), min(p.places) if p.places else 0),
        )

    def raise_if_any(self, intro: str, footer: str = "") -> None:
        """DataErrors listing every problem, if there is any."""
        if self._found:
            raise DataErrors(self.problems, intro, footer)


class DataErrors(DataFormatError):
    """The data has problems; the message lists every one (fcl-data exits 2, the SDK raises it)."""

    def __init__(self, problems: list[Problem], intro: str, footer: str = "") -> None:
        self.problems = problems
        count = sum(max(1, len(p.places)) for p in problems)
        head = f"{intro}: {count} problem{'s' if count != 1 else ''}"
        if len(problems) != count:
            head += f" ({len(problems)} distinct)"
        lines = [p.render() for p in problems[:MAX_SHOWN]]
        if len(problems) > MAX_SHOWN:
            lines.append(f"... and {len(problems) - MAX_SHOWN} more distinct problems")
        text = head + "\n" + "\n".join(f"  {line}" for line in lines)
        super().__init__(text + (f"\n{footer}" if footer else ""))
