"""Start-up: how long `mailer --version` and `mailer <cmd> --help` take beyond a bare Python.

Run: .venv/bin/python benchmarks/startup_bench.py [--runs N]

Each command runs N times as a child process (the way a person types it); the median wall time
of each is printed next to the median of `python -c pass` measured in the same loop, so the
machine's drift cancels out. Target (issue 13): within 150 ms of a bare Python start.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (
    ("--version",),
    ("--help",),
    ("send", "--help"),
    ("import", "contacts", "--help"),
    ("status", "--help"),
)


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    mailer = shutil.which("mailer", path=str(Path(sys.executable).parent))
    if mailer is None:
        raise SystemExit("no `mailer` beside this Python: pip install -e . first")
    print(f"machine: {platform.node()} {platform.machine()}, Python {platform.python_version()}")
    bare: list[float] = []
    times: dict[tuple[str, ...], list[float]] = {c: [] for c in COMMANDS}
    for _ in range(args.runs):
        # Interleaved, so a slow moment of the machine hits every command alike.
        bare.append(timed([sys.executable, "-c", "pass"]))
        for command in COMMANDS:
            times[command].append(timed([mailer, *command]))
    base = statistics.median(bare)
    print(f"{'python -c pass':<32} {base * 1000:7.1f} ms")
    for command, values in times.items():
        median = statistics.median(values)
        label = "mailer " + " ".join(command)
        print(f"{label:<32} {median * 1000:7.1f} ms  (+{(median - base) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
