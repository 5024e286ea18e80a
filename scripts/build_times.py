"""Where a build's time went: the objects of a Ninja build sorted by compile time, from its ``.ninja_log``.

CI prints it after the README's install, so that a kernel file whose compile time grows shows in the log
(the routed-KD CPU file once took 111 s per dtype shard because one function inlined its row path twice).
Only the newest entry of each output counts (a rebuilt object appears once per build in the log).

Usage: python scripts/build_times.py BUILD_DIR_OR_NINJA_LOG [...] [--top N]
Prints the compile times summed over objects (about the CPU time the build needs), when the last object
finished (seconds from the start of its Ninja run: the build's wall time for a fresh build) and the N slowest
objects.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def read_log(path: Path) -> dict[str, tuple[int, int]]:
    """output -> (start_ms, end_ms) of its newest entry in a ``.ninja_log`` (format v5 and later)."""
    entries: dict[str, tuple[int, int]] = {}
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("# ninja log v"):
        raise SystemExit(f"build_times: {path} is not a ninja log")
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 4:
            continue
        start, end, output = int(fields[0]), int(fields[1]), fields[3]
        entries[output] = (start, end)  # later lines are newer
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="Ninja build directories or their .ninja_log files")
    parser.add_argument("--top", type=int, default=8, help="how many objects to list (default 8)")
    args = parser.parse_args()
    for path in args.paths:
        report(path / ".ninja_log" if path.is_dir() else path, args.top)


def report(log: Path, top: int) -> None:
    """Prints one log's summary line and its ``top`` slowest objects."""
    if not log.is_file():
        raise SystemExit(f"build_times: no ninja log at {log}")
    entries = read_log(log)
    objects = {out: (end - start) / 1000 for out, (start, end) in entries.items() if out.endswith(".o")}
    if not objects:
        raise SystemExit(f"build_times: no objects in {log}")
    last = max(end for _, end in entries.values()) / 1000  # ninja logs times from the start of its run
    total = sum(objects.values())
    print(f"build_times: {log}: {len(objects)} objects, {total:.0f} s of compiles summed, last done at {last:.0f} s")
    for out, seconds in sorted(objects.items(), key=lambda item: -item[1])[:top]:
        print(f"{seconds:8.1f} s  {out}")


if __name__ == "__main__":
    main()
