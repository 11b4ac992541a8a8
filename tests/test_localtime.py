"""Times for people: the user's local time with its zone, one way everywhere; ISO 8601 in exports.

The zone comes from TZ (tests set it) or the computer's configuration, and is passed explicitly
where a caller knows better.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import zoneinfo

import pytest
from conftest import Cli
from sqlalchemy.orm import Session, sessionmaker
from test_review_data import build_sample

from mailer import localtime, review

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
WINTER = dt.datetime(2026, 3, 14, 9, 1, 30, tzinfo=dt.UTC)
SUMMER = dt.datetime(2026, 7, 14, 9, 1, tzinfo=dt.UTC)


@pytest.fixture
def sample(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    build_sample(session_factory)
    return session_factory


def test_format_local_names_the_zone_and_follows_summer_time() -> None:
    assert localtime.format_local(WINTER, zone=BERLIN) == "2026-03-14 10:01 CET"
    assert localtime.format_local(SUMMER, zone=BERLIN) == "2026-07-14 11:01 CEST"
    assert localtime.format_local(WINTER, zone=dt.UTC) == "2026-03-14 09:01 UTC"
    assert localtime.format_local(None, zone=BERLIN) == "-"
    # Zones whose abbreviation is only an offset read as one.
    sao_paulo = zoneinfo.ZoneInfo("America/Sao_Paulo")
    assert localtime.format_local(WINTER, zone=sao_paulo) == "2026-03-14 06:01 UTC-03"
    kolkata = zoneinfo.ZoneInfo("Asia/Kolkata")
    assert localtime.format_local(WINTER, zone=kolkata) == "2026-03-14 14:31 IST"


def test_format_iso_is_utc_with_z() -> None:
    assert localtime.format_iso(WINTER.astimezone(BERLIN)) == "2026-03-14T09:01:30Z"
    assert localtime.format_iso(None) is None


@pytest.mark.parametrize(
    ("tz", "name"),
    [
        ("Europe/Berlin", "Europe/Berlin"),
        (":Europe/Warsaw", "Europe/Warsaw"),
        ("/usr/share/zoneinfo/Europe/Paris", "Europe/Paris"),
        ("UTC", "UTC"),
    ],
)
def test_local_zone_reads_tz_each_time(monkeypatch: pytest.MonkeyPatch, tz: str, name: str) -> None:
    monkeypatch.setenv("TZ", tz)
    zone = localtime.local_zone()
    assert localtime.zone_name(zone) == name


def test_local_zone_with_a_posix_rule_or_nonsense_still_gives_a_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    zone = localtime.local_zone()
    assert WINTER.astimezone(zone).utcoffset() == dt.timedelta(hours=1)
    monkeypatch.setenv("TZ", "Not/AZone")
    assert localtime.local_zone().utcoffset(WINTER) is not None


def test_status_log_and_contacts_show_use_local_time(
    sample: sessionmaker[Session], run: Cli
) -> None:
    berlin = {"TZ": "Europe/Berlin"}
    status = run("status", "spring", env=berlin).stdout
    assert "started   2026-03-14 10:00 CET" in status
    table = run("log", "spring", env=berlin).stdout
    anna = next(line for line in table.splitlines() if line.startswith("anna@"))
    assert "2026-03-14 10:01 CET" in anna
    events = run("log", "spring", "--events", env=berlin).stdout
    assert "2026-03-14 10:00 CET" in events
    show = run("contacts", "show", "berta@example.org", env=berlin).stdout
    assert "sent 2026-03-14 11:05 CET" in show
    assert "2026-03-14 10:03 CET  spring  deferred  421" in show
    # Exports stay ISO 8601 in UTC, whatever the zone.
    rows = list(
        csv.DictReader(io.StringIO(run("log", "spring", "--format", "csv", env=berlin).stdout))
    )
    assert rows[0]["sent_at"] == "2026-03-14T09:01:00Z"
    data = json.loads(run("status", "spring", "--format", "json", env=berlin).stdout)
    assert data[0]["started_at"] == "2026-03-14T09:00:00Z"
    shown = json.loads(
        run("contacts", "show", "berta@example.org", "--format", "json", env=berlin).stdout
    )
    assert shown["messages"][0]["sent_at"] == "2026-03-14T10:05:00Z"


def test_since_without_a_zone_is_local_time(sample: sessionmaker[Session], run: Cli) -> None:
    def emails(since: str) -> list[str]:
        out = run("log", "spring", "--format", "csv", "--since", since, env={"TZ": "Europe/Berlin"})
        return [r["email"] for r in csv.DictReader(io.StringIO(out.stdout))]

    # 11:00 in Berlin is 10:00 UTC: only berta's letter (sent 10:05 UTC) has activity after it.
    assert emails("2026-03-14T11:00") == ["berta@example.org"]
    assert emails("2026-03-14T10:00:00+00:00") == ["berta@example.org"]
    assert review.parse_since("2026-03-14T11:00", zone=BERLIN) == dt.datetime(
        2026, 3, 14, 10, 0, tzinfo=dt.UTC
    )
