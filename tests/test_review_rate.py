"""Rates mean what they say: the recent rate is over the span actually sent, with the configured
limit beside it (issue 13 item 9)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker
from test_review_data import T0, build_sample

from mailer import review
from mailer.models import Campaign, Event

BURST_END = T0 + dt.timedelta(hours=2)


def _burst(
    factory: sessionmaker[Session], *, letters: int, seconds: float, end: dt.datetime
) -> None:
    """Replace spring's `sent` events by `letters` sends spread evenly over `seconds`."""
    with factory() as session, session.begin():
        session.execute(delete(Event).where(Event.kind == "sent"))
        step = seconds / max(1, letters - 1)
        for i in range(letters):
            at = end - dt.timedelta(seconds=seconds) + dt.timedelta(seconds=i * step)
            session.add(Event(campaign_id=1, kind="sent", at=at))


@pytest.fixture
def sample(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    build_sample(session_factory)
    return session_factory


def test_74_letters_in_one_second_are_not_7_4_a_minute(sample: sessionmaker[Session]) -> None:
    _burst(sample, letters=74, seconds=1.0, end=BURST_END)
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", now=BURST_END + dt.timedelta(minutes=2))
    rate = s.rate
    assert rate.letters == 74 and rate.current
    assert rate.seconds == pytest.approx(1.0)
    assert rate.per_second == pytest.approx(74.0)
    assert s.rate_per_minute == pytest.approx(74 * 60)
    text = review.format_rate(rate, zone=dt.UTC)
    assert text.startswith("74 letters in 1 s (74 a second), the last at 2026-03-14 11:00 UTC")
    assert "7.4" not in text


def test_a_steady_rate_over_ten_minutes(sample: sessionmaker[Session]) -> None:
    # One letter every 2 s for 30 minutes: the last 10 minutes hold 300 letters over ~598 s.
    _burst(sample, letters=900, seconds=1798, end=BURST_END)
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", now=BURST_END)
    assert s.rate.letters == 300
    assert s.rate.per_minute == pytest.approx(30.0, rel=0.01)
    assert review.format_rate(s.rate, zone=dt.UTC).startswith(
        "300 letters in 9 min 58 s (30.1 a minute)"
    )


def test_a_finished_run_names_its_last_stretch_not_a_current_rate(
    sample: sessionmaker[Session],
) -> None:
    _burst(sample, letters=74, seconds=1.0, end=BURST_END)
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", now=BURST_END + dt.timedelta(days=1))
    assert not s.rate.current and s.rate.letters == 74
    assert s.rate_per_minute == 0
    assert review.format_rate(s.rate, zone=dt.UTC).startswith(
        "nothing sent in the last 10 minutes; before that 74 letters in 1 s (74 a second), "
        "the last at 2026-03-14 11:00 UTC"
    )


def test_one_letter_has_no_rate(sample: sessionmaker[Session]) -> None:
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", now=T0 + dt.timedelta(minutes=70))
    assert s.rate.letters == 1 and s.rate.per_minute is None and s.rate_per_minute is None
    assert review.format_rate(s.rate, zone=dt.UTC).startswith(
        "1 letter in the last 10 minutes, at 2026-03-14 10:05 UTC"
    )
    with sample() as session:
        (empty,) = review.campaign_status(session, "empty")
    assert review.format_rate(empty.rate, zone=dt.UTC).startswith("nothing sent yet")


def test_the_configured_limit_is_shown_campaign_first(sample: sessionmaker[Session]) -> None:
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", default_rate="5/s", default_daily_cap=900)
    assert (s.rate.limit, s.rate.limit_source) == ("5/s", "mailer.toml")
    assert review.format_rate(s.rate, zone=dt.UTC).endswith(
        "; limit 5/s and 900 a day (mailer.toml)"
    )
    with sample() as session, session.begin():
        session.execute(
            update(Campaign)
            .where(Campaign.slug == "spring")
            .values(settings={"rate": "300/min", "daily_cap": 2000})
        )
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", default_rate="5/s")
    assert (s.rate.limit, s.rate.limit_source, s.rate.daily_cap) == ("300/min", "campaign", 2000)
    assert review.format_rate(s.rate, zone=dt.UTC).endswith(
        "; limit 300/min and 2,000 a day (campaign)"
    )
    with sample() as session:
        (empty,) = review.campaign_status(session, "empty")
    assert review.format_rate(empty.rate, zone=dt.UTC).endswith("; no rate limit set")


def test_status_shows_the_rate_and_the_limit_from_mailer_toml(
    sample: sessionmaker[Session], run: Cli, workspace: Path
) -> None:
    config = workspace / "mailer.toml"
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            "[smtp]\n", '[smtp]\nrate = "120/min"\ndaily_cap = 500\n'
        ),
        encoding="utf-8",
    )
    _burst(sample, letters=74, seconds=1.0, end=BURST_END)
    out = run.ok("status", "spring").stdout
    rate_line = next(line for line in out.splitlines() if line.startswith("  rate "))
    assert "74 letters in 1 s (74 a second)" in rate_line
    assert rate_line.endswith("; limit 120/min and 500 a day (mailer.toml)")
    (data,) = json.loads(run.ok("status", "spring", "--format", "json").stdout)
    assert data["rate_limit"] == "120/min" and data["daily_cap"] == 500
    assert data["recent_rate"]["letters"] == 74
    assert data["recent_rate"]["last_at"] == "2026-03-14T11:00:00Z"
