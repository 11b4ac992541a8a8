"""Import benchmark: a generated N-row contacts CSV imported through the library.

Every address is fictional (`@cityN.example.org`). Prints rows/s and peak RSS; run it twice to
see the re-import (all unchanged) figure as well.

    .venv/bin/python benchmarks/import_bench.py --rows 1000000
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from mailer import db
from mailer.config import create_workspace
from mailer.importers import format_counts, import_contacts

FIRST = ["Anna", "Jürgen", "José", "Олена", "Marie", "Piotr", "Giulia", "Søren", "Łucja", "Ewan"]
LAST = ["Berg", "Müller", "Peña", "Коваленко", "Dubois", "Nowak", "Rossi", "Hansen", "Wójcik"]
COUNTRIES = ["DE", "ES", "FR", "PL", "IT", "DK", "GB", "AT", "NL", "SE"]
LANGUAGES = ["de", "es", "fr", "pl", "it", "da", "en", "de-AT", "nl", "sv"]


def generate(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["email", "name", "title", "city", "country", "language", "tags", "population"]
        )
        for i in range(rows):
            c = i % 500
            writer.writerow(
                [
                    f"mayor.{i}@city{c}.example.org",
                    f"{FIRST[i % len(FIRST)]} {LAST[i % len(LAST)]}",
                    "Mayor" if i % 3 else "Head of international relations",
                    f"City {c}",
                    COUNTRIES[c % len(COUNTRIES)],
                    LANGUAGES[c % len(LANGUAGES)],
                    "bench" if i % 2 else "bench;wave-2",
                    str(10_000 + i),
                ]
            )


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="database URL (default: SQLite in the temp workspace)")
    parser.add_argument("--reimport", action="store_true", help="import the file a second time")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {sys.platform}")
    with tempfile.TemporaryDirectory(prefix="mailer-bench-") as tmp:
        folder = Path(tmp)
        source = folder / "contacts.csv"
        started = time.perf_counter()
        generate(source, args.rows)
        size_mb = source.stat().st_size / 1e6
        print(
            f"generated {args.rows} rows ({size_mb:.0f} MB) in {time.perf_counter() - started:.1f}s"
        )
        workspace = create_workspace(root=folder / "ws", db_url=args.db)
        engine = db.make_engine(workspace.database_url)
        db.upgrade(engine)
        factory = db.session_factory(engine)
        rss_before = peak_rss_mb()
        runs = 2 if args.reimport else 1
        for attempt in range(runs):
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            cpu_started = time.process_time()
            summary = import_contacts(factory, path=source)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            label = "import" if attempt == 0 else "re-import"
            print(format_counts(summary))
            # Other work on the machine shows in the wall time (and, on shared cores, in the
            # CPU time too): the load average is printed to judge a figure by.
            print(
                f"{label}: {args.rows / elapsed:,.0f} rows/s ({elapsed:.1f}s wall, "
                f"{args.rows / cpu:,.0f} rows per CPU-second = {cpu / args.rows * 1e6:.1f} µs "
                f"CPU a row); peak RSS {peak_rss_mb():.0f} MB (before import "
                f"{rss_before:.0f} MB); load average {load_before:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after"
            )
        engine.dispose()


if __name__ == "__main__":
    main()
