"""`python -m benchmarks.perf.pyspy_top PROFILE.raw [--within FRAME] [--process TEXT]`: where time goes.

Reads py-spy's raw (collapsed-stack) output and prints the frames that appear in the most samples
(inclusive), counted from the deepest frame matching --within down, so the table reads "of the time
spent inside FRAME, this share was inside X".
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def top_frames(lines: list[str], within: str, process: str, count: int) -> tuple[int, list[tuple[str, int]]]:
    totals: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, number = line.rstrip().rpartition(" ")
        if not stack or (process and process not in stack) or (within and within not in stack):
            continue
        frames = stack.split(";")
        start = max(i for i, f in enumerate(frames) if within in f) if within else 0
        samples += int(number)
        seen = set()
        for frame in frames[start:]:
            name, _, where = frame.partition(" (")
            key = f"{name} ({where.rsplit('/', 1)[-1]}" if where else name
            if key not in seen:
                seen.add(key)
                totals[key] += int(number)
    return samples, totals.most_common(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--within", default="", help="count only stacks through this frame text")
    parser.add_argument("--process", default="", help="only stacks of processes whose line has this text")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    samples, rows = top_frames(args.profile.read_text().splitlines(), args.within, args.process, args.top)
    print(f"{samples} samples{' within ' + args.within if args.within else ''}")
    for key, n in rows:
        print(f"{n / max(1, samples):6.1%}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
