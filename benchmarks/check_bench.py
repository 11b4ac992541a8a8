"""`mailer check` on a large audience: seconds for N recipients with the starter `appeal` template.

Run: .venv/bin/python benchmarks/check_bench.py [--contacts 100000] [--db URL]

Builds a throwaway workspace (SQLite by default) with N fictional contacts in 2,000 cities abroad,
partner ties to 40 Ukrainian cities with their mayors, then times `check_campaign` (the function
`mailer check` prints), which renders every letter. Seeding is not timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from mailer import campaigns, db
from mailer import check as checking
from mailer.audience import Audience
from mailer.config import create_workspace
from mailer.models import City, Contact, Partnership, Signatory

LANGUAGES = ("de", "en", "fr", "pl", "uk", "de-AT", "it", None)


def seed(url: str, contacts: int) -> None:
    engine = db.make_engine(url)
    db.upgrade(engine)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(City),
            [
                {"id": i, "name": f"Misto {i}", "name_key": f"misto {i}", "country": "UA"}
                for i in range(1, 41)
            ],
        )
        conn.execute(
            insert(City),
            [
                {"id": 100 + i, "name": f"Stadt {i}", "name_key": f"stadt {i}", "country": "DE"}
                for i in range(2000)
            ],
        )
        conn.execute(
            insert(Signatory),
            [
                {"name": f"Mayor {i}", "title": f"Mayor of Misto {i}", "city_id": i}
                for i in range(1, 41)
            ],
        )
        conn.execute(
            insert(Partnership),
            [
                {
                    "ukrainian_city_id": 1 + (i * 7 + k) % 40,
                    "partner_city_id": 100 + i,
                    "kind": "twin",
                    "since": 1960 + (i + k) % 60,
                }
                for i in range(0, 2000, 2)
                for k in range(1 + i % 3)
            ],
        )
        rows = [
            {
                "email": f"mayor{i:06d}@city{i % 2000}.example.org",
                "name": f"Zoë Müller {i}" if i % 5 else None,
                "title": "Mayor" if i % 2 else None,
                "language": LANGUAGES[i % len(LANGUAGES)],
                "city_id": 100 + i % 2000 if i % 11 else None,
                "attributes": {"population": str(1000 + i)},
                "tags": ["mayor"],
                "created_at": now,
                "updated_at": now,
            }
            for i in range(contacts)
        ]
        for start in range(0, len(rows), 10000):
            conn.execute(insert(Contact), rows[start : start + 10000])
    engine.dispose()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = create_workspace(root=Path(tmp) / "ws", db_url=args.db)
        url = workspace.database_url
        started = time.perf_counter()
        seed(url, args.contacts)
        seeded = time.perf_counter() - started
        engine = db.make_engine(url)
        factory = db.session_factory(engine)
        with db.transaction(factory) as session:
            campaigns.create_campaign(
                session,
                slug="bench",
                template="appeal",
                from_address="Campaign Office <office@example.org>",
                reply_to="signatory",
                audience=Audience(),
                title=None,
                default_language="en",
                templates_dir=workspace.templates_dir,
            )
        with db.transaction(factory) as session:
            campaign = campaigns.get_campaign(session, "bench")
            wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
            report = checking.check_campaign(
                session,
                campaign,
                templates_dir=workspace.templates_dir,
                settings=workspace,
                workers=args.workers,
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            children = _children_cpu() - children
        engine.dispose()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
        f"database {engine.dialect.name}"
    )
    print(f"seeded {args.contacts:,} contacts in {seeded:.1f} s")
    print(
        f"check: {report.recipients:,} recipients, {report.rendered:,} rendered, "
        f"{len(report.blocking)} blocking, {len(report.personal)} less personal, "
        f"{len(report.warnings)} warnings"
    )
    print(
        f"check took {wall:.1f} s wall ({report.recipients / wall:,.0f} recipients/s); "
        f"CPU {cpu:.1f} s in the main process + {children:.1f} s in worker processes"
    )


if __name__ == "__main__":
    main()
