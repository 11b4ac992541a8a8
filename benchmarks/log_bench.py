"""`mailer log --format csv|json` on logs of growing size: the peak memory must stay flat.

Builds one SQLite workspace with campaigns of 10,000, 100,000 and 1,000,000 recipients (one
`sent` event each), then runs the real `mailer log` command in a child process per campaign and
format, writing to /dev/null, and reads the child's peak RSS from the kernel (wait4).

    .venv/bin/python benchmarks/log_bench.py            # full run, about a million rows
    .venv/bin/python benchmarks/log_bench.py --quick    # 1,000 / 10,000 / 100,000
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import insert

from mailer import db
from mailer.config import create_workspace
from mailer.models import Campaign, City, Contact, Event, Message

ROOT = Path(__file__).resolve().parent
CHUNK = 50_000
T0 = dt.datetime(2026, 3, 14, 9, 0, tzinfo=dt.UTC)


def build(work: Path, sizes: list[int]) -> Path:
    if work.exists():
        shutil.rmtree(work)
    workspace = create_workspace(root=work)
    engine = db.make_engine(workspace.database_url)
    db.upgrade(engine)
    biggest = max(sizes)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            insert(City),
            [
                {"id": i + 1, "name": f"City {i}", "name_key": f"city {i}", "country": "DE"}
                for i in range(100)
            ],
        )
        for start in range(0, biggest, CHUNK):
            conn.execute(
                insert(Contact),
                [
                    {
                        "id": i + 1,
                        "email": f"mayor{i}@city{i % 100}.example.org",
                        "name": f"=Mayor {i}" if i % 1000 == 0 else f"Mayor Number {i}",
                        "language": "de",
                        "city_id": i % 100 + 1,
                        "attributes": {},
                        "tags": [],
                    }
                    for i in range(start, min(biggest, start + CHUNK))
                ],
            )
        message_id = 0
        for campaign_id, size in enumerate(sizes, start=1):
            conn.execute(
                insert(Campaign),
                [
                    {
                        "id": campaign_id,
                        "slug": f"c{size}",
                        "template": "appeal",
                        "from_address": "appeals@campaign.example.org",
                        "status": "done",
                        "template_sources": {},
                        "audience": {},
                        "settings": {},
                    }
                ],
            )
            for start in range(0, size, CHUNK):
                ids = range(start, min(size, start + CHUNK))
                messages = []
                events = []
                for i in ids:
                    message_id += 1
                    at = T0 + dt.timedelta(seconds=i)
                    messages.append(
                        {
                            "id": message_id,
                            "campaign_id": campaign_id,
                            "contact_id": i + 1,
                            "status": "sent",
                            "attempts": 1,
                            "message_id": f"<c{size}.{i}@campaign.example.org>",
                            "language": "de",
                            "subject": "Offener Brief der Bürgermeister der Ukraine",
                            "smtp_code": 250,
                            "smtp_reply": "2.0.0 Ok: queued as 4F3A2B1C",
                            "queued_at": T0,
                            "sent_at": at,
                            "updated_at": at,
                        }
                    )
                    events.append(
                        {
                            "message_id": message_id,
                            "campaign_id": campaign_id,
                            "contact_id": i + 1,
                            "at": at,
                            "kind": "sent",
                            "smtp_code": 250,
                            "detail": "2.0.0 Ok: queued as 4F3A2B1C",
                            "via": "smtp.example.org:587",
                        }
                    )
                conn.execute(insert(Message), messages)
                conn.execute(insert(Event), events)
    engine.dispose()
    print(f"built {sum(sizes):,} messages in {time.perf_counter() - started:.0f} s", flush=True)
    return work


def measure(work: Path, args: list[str]) -> tuple[float, float, int]:
    """Seconds, peak RSS in MiB, and bytes written to stdout, for one `mailer` child process."""
    mailer = Path(sys.executable).with_name("mailer")
    out_path = work / "out.tmp"
    started = time.perf_counter()
    with out_path.open("wb") as out:
        child = subprocess.Popen([str(mailer), "-w", str(work), *args], stdout=out)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mailer {' '.join(args)} failed")
    size = out_path.stat().st_size
    out_path.unlink()
    return seconds, usage.ru_maxrss / 1024, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="sizes 1,000 / 10,000 / 100,000")
    parser.add_argument("--work", type=Path, default=ROOT / "_work" / "log")
    parser.add_argument("--keep", action="store_true", help="reuse a database built before")
    options = parser.parse_args()
    sizes = [1_000, 10_000, 100_000] if options.quick else [10_000, 100_000, 1_000_000]
    if not (options.keep and (options.work / "mailer.db").exists()):
        # Built in a child process: Linux hands a child the peak RSS of its parent at fork (kept
        # across exec), so building in this process would inflate every measured child's peak.
        builder = multiprocessing.get_context("spawn").Process(
            target=build, args=(options.work, sizes)
        )
        builder.start()
        builder.join()
        if builder.exitcode != 0:
            raise SystemExit("building the benchmark database failed")
    print(
        f"{platform.node()} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} CPUs · Python {platform.python_version()} · "
        f"{dt.date.today().isoformat()}"
    )
    print(
        f"| {'rows':>9} | {'command':<32} | {'seconds':>7} | {'rows/s':>8} | {'peak RSS MiB':>12} | {'output MiB':>10} |"
    )
    print(f"|{'-' * 11}|{'-' * 34}|{'-' * 9}|{'-' * 10}|{'-' * 14}|{'-' * 12}|")
    seconds, rss, _ = measure(options.work, ["--version"])
    print(
        f"| {'-':>9} | {'--version (start-up baseline)':<32} | {seconds:>7.1f} | {'-':>8} | {rss:>12.0f} | {'-':>10} |"
    )
    for size in sizes:
        report = str(options.work / "report.html")
        for args in (
            ["log", f"c{size}", "--format", "csv"],
            ["log", f"c{size}", "--format", "json"],
            ["log", f"c{size}", "--events", "--format", "csv"],
            ["report", f"c{size}", "--output", report],
            ["status", f"c{size}", "--format", "json"],
        ):
            extra = [a for a in args[2:] if a != report]
            seconds, rss, written = measure(options.work, args)
            if args[0] == "report":
                written = Path(report).stat().st_size  # the page, not the one-line summary
            label = " ".join([args[0], *extra])
            print(
                f"| {size:>9,} | {label:<32} | {seconds:>7.1f} | {size / seconds:>8,.0f} | "
                f"{rss:>12.0f} | {written / 2**20:>10.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
