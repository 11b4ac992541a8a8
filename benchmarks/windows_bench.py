"""Sending-window benchmark: resolving time zones for many contacts, and what a window costs a send.

1. Zones: N fictional contacts (`mayorN@example.org`) in cities of 20 countries (single-zone ones
   such as Germany and Japan, several-zone ones such as the US, Portugal, Ukraine, New Zealand,
   where the gazetteer is read), a tenth with their own `timezone`, a few in towns no gazetteer
   knows. Timed: `timing.zone_report` over all of them from the database (what `mailer check`
   runs: the query, the gazetteer's first load, each distinct place resolved once), then the
   rules alone over the same places, cold (a new resolver) and warm.
2. Send: the same contacts sent twice in the same run, as `mailer send` child processes into the
   minimal SMTP sink of send_bench.py: once as a plain campaign, once with a window open for
   everyone (`--window 'Mon-Sun 00:00-24:00'` in each recipient's own zone), so every letter is
   judged by the gate (its contact, zone and window) and none waits. Reports both rates.

    .venv/bin/python benchmarks/windows_bench.py                 # 100,000 contacts
    .venv/bin/python benchmarks/windows_bench.py --count 20000   # a quick run
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import send_bench  # the sink and the template are shared

# (city, country) pairs; the last ones are towns no gazetteer knows (they fall back).
PLACES = [
    ("Berlin", "DE"),
    ("Nürnberg", "DE"),
    ("Paris", "FR"),
    ("Kraków", "PL"),
    ("Vilnius", "LT"),
    ("Praha", "CZ"),
    ("Milano", "IT"),
    ("Tokyo", "JP"),
    ("Toronto", "CA"),
    ("Vancouver", "CA"),
    ("New York", "US"),
    ("Chicago", "US"),
    ("Denver", "US"),
    ("Los Angeles", "US"),
    ("Springfield", "US"),
    ("Lisboa", "PT"),
    ("Ponta Delgada", "PT"),
    ("Kyiv", "UA"),
    ("Kharkiv", "UA"),
    ("Auckland", "NZ"),
    ("São Paulo", "BR"),
    ("Manaus", "BR"),
    ("Sydney", "AU"),
    ("Perth", "AU"),
    ("Madrid", "ES"),
    ("Las Palmas", "ES"),
    ("Nowhereville", "US"),
    ("Smallbrook", "CA"),
]
OWN_ZONES = ["Europe/Vienna", "America/Chicago", "Asia/Seoul", "Africa/Nairobi"]
# The sends, in this order (A B B A, so a machine that slows down or warms up during the run
# weighs on both kinds alike); the windowed ones with a window open for everyone.
SENDS = ("plain", "windowed", "windowed-2", "plain-2")
WINDOW = ["--window", "Mon-Sun 00:00-24:00"]


def prepare(root: Path, count: int) -> None:
    from sqlalchemy import insert, select
    from sqlalchemy.orm import Session

    from mailer import campaigns, db
    from mailer.audience import Audience
    from mailer.config import create_workspace
    from mailer.models import City, Contact, city_key

    workspace = create_workspace(root=root)
    engine = db.make_engine(workspace.database_url)
    db.upgrade(engine)
    folder = root / "templates" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en.txt.j2").write_text(send_bench.TEMPLATE, encoding="utf-8")
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(City),
            [{"name": n, "name_key": city_key(n), "country": c, "region": None} for n, c in PLACES],
        )
        city_ids = list(conn.scalars(select(City.id).order_by(City.id)))
        for first in range(0, count, 10_000):
            conn.execute(
                insert(Contact),
                [
                    {
                        "email": f"mayor{i}@example.org",
                        "name": f"City {i}",
                        "language": "en",
                        "city_id": city_ids[i % len(city_ids)],
                        "timezone": OWN_ZONES[i % len(OWN_ZONES)] if i % 10 == 0 else None,
                        "attributes": {},
                        "tags": [],
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in range(first, min(count, first + 10_000))
                ],
            )
    with Session(engine) as session, session.begin():
        for slug in SENDS:
            campaigns.create_campaign(
                session,
                slug=slug,
                template="bench",
                from_address="Campaign Office <office@example.org>",
                reply_to=None,
                audience=Audience(),
                title="Benchmark",
                default_language="en",
                templates_dir=root / "templates",
            )
    engine.dispose()


def zones_part(root: Path, count: int) -> list[str]:
    """Zone resolution timings, in a child process (a clean gazetteer cache, its own peak RSS)."""
    output = subprocess.run(
        [sys.executable, __file__, "--zones-child", str(root)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return output.splitlines()


def zones_child(root: Path) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from mailer import db, timing
    from mailer.config import find_workspace
    from mailer.models import Campaign, City, Contact
    from mailer.zones import Place, ZoneResolver

    workspace = find_workspace(start=root)
    engine = db.make_engine(workspace.database_url)
    today = dt.date.today()
    with Session(engine) as session:
        campaign = session.scalar(select(Campaign).where(Campaign.slug == "plain"))
        assert campaign is not None
        ids = list(session.scalars(select(Contact.id).order_by(Contact.id)))
        started = time.perf_counter()
        report = timing.zone_report(session, campaign, contact_ids=ids, today=today)
        from_db = time.perf_counter() - started
        rows = session.execute(
            select(Contact.timezone, City.name, City.country).join(City, City.id == Contact.city_id)
        ).all()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    places = [Place(timezone=tz, city=name, country=country) for tz, name, country in rows]
    started = time.perf_counter()
    cold = ZoneResolver(default="UTC", today=today)
    for place in places:
        cold.resolve(place)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    for place in places:
        cold.resolve(place)
    warm_s = time.perf_counter() - started
    counts = ", ".join(f"{rule.value} {n:,}" for rule, n in report.counts.items())
    print(
        f"zones:     {len(ids):,} contacts resolved from the database (query, gazetteer load, "
        f"rules) in {from_db:.2f} s: {len(ids) / from_db:,.0f} contacts/s; by rule: {counts}"
    )
    print(
        f"           the rules alone: {len(places) / cold_s:,.0f} contacts/s with a new resolver "
        f"(gazetteer loaded; each distinct place once), {len(places) / warm_s:,.0f} contacts/s warm; "
        f"peak RSS of that process {rss:.0f} MB (the gazetteer's city file read once)"
    )


def run_send(root: Path, port: int, slug: str, extra: list[str]) -> tuple[float, str]:
    command = [
        sys.executable,
        "-c",
        "from mailer.cli import main; main()",
        "-w",
        str(root),
        "send",
        slug,
        "--smtp",
        f"smtp+plain://127.0.0.1:{port}",
        "--concurrency",
        "4",
        "--yes",
        *extra,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"mailer send {slug} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--zones-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zones_child is not None:
        zones_child(args.zones_child)
        return

    with tempfile.TemporaryDirectory(prefix="windows-bench-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "ws"
        t0 = time.perf_counter()
        prepare(root, args.count)
        prepared = time.perf_counter() - t0
        zone_lines = zones_part(root, args.count)
        sink, port = send_bench.start_sink(tmp, "raw")
        runs: dict[str, tuple[float, str]] = {}
        try:
            for slug in SENDS:
                runs[slug] = run_send(root, port, slug, WINDOW if "windowed" in slug else [])
        finally:
            sink.terminate()
            sink.wait()
    print(
        f"machine:   {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"
    )
    print(f"date:      {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command:   python benchmarks/windows_bench.py --count {args.count}")
    print(
        f"prepare:   {args.count:,} contacts in {len(PLACES)} cities + {len(SENDS)} campaigns in {prepared:.1f} s"
    )
    for line in zone_lines:
        print(line)
    for slug, (elapsed, output) in runs.items():
        in_run = re.search(r"\(([\d,]+) msg/s", output)
        sent = re.search(r"This run: (\d+) sent", output)
        print(
            f"send {slug + ':':<12}{args.count:,} messages in {elapsed:.1f} s end to end: "
            f"{args.count / elapsed:,.0f} msg/s"
            + (f"; pipeline rate reported by send: {in_run.group(1)} msg/s" if in_run else "")
            + (f" ({sent.group(1)} sent)" if sent else "")
        )
    plain = sum(runs[s][0] for s in SENDS if "windowed" not in s)
    windowed = sum(runs[s][0] for s in SENDS if "windowed" in s)
    print(
        f"ratio:     windowed runs (every letter judged, none held) at {plain / windowed:.2f}x "
        "the rate of the unwindowed ones (total times of each pair)"
    )


if __name__ == "__main__":
    main()
