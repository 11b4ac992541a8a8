"""`mailer report`: the self-contained HTML file, its numbers, escaping, and bad output paths."""

from __future__ import annotations

import datetime as dt
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy.orm import Session, sessionmaker
from test_review_data import FORMULA_NAME, SCRIPT_NAME, T0, UNKNOWN_USER, build_sample

from mailer import report, review
from mailer.errors import OutputFileError
from mailer.models import Event


@pytest.fixture
def sample(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    build_sample(session_factory)
    return session_factory


class _Page(HTMLParser):
    """Collects what a reader sees, by element id, plus every attribute that could load a URL."""

    def __init__(self) -> None:
        super().__init__()
        self.text_by_id: dict[str, str] = {}
        self._open: list[str | None] = []
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        for name in ("src", "href", "xlink:href", "action", "data"):
            if found.get(name):
                self.urls.append(str(found[name]))
        if tag not in ("br", "meta", "line", "rect", "img", "input"):
            self._open.append(found.get("id"))
            if found.get("id"):
                self.text_by_id[str(found["id"])] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("br", "meta", "line", "rect", "img", "input") and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for ident in self._open:
            if ident:
                self.text_by_id[ident] += data


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    return page


def test_report_shows_totals_chart_breakdowns_failures_and_follow_ups(
    sample: sessionmaker[Session], run: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "spring.html"
    result = run.ok("report", "spring", "--output", str(out))
    assert result.stdout.strip() == (f"Wrote {out}: 11 recipients, 3 sent, 3 failed, 1 uncertain.")
    text = out.read_text(encoding="utf-8")
    page = _parse(text)
    counts = {k: page.text_by_id[f"count-{k}"] for k in (*review.STATES, "total")}
    assert counts == {
        "queued": "1",
        "sending": "1",
        "sent": "3",
        "retry": "1",
        "failed": "3",
        "skipped": "1",
        "uncertain": "1",
        "total": "11",
    }
    # The totals agree with `mailer status`.
    with sample() as session:
        (summary,) = review.campaign_status(session, "spring")
    assert {k: int(counts[k]) for k in review.STATES} == summary.counts
    assert "72.7% finished (8 of 11)" in page.text_by_id["progress"]

    # Three sends spread over 64 minutes: 5-minute bars, the first at 09:00.
    assert "<svg" in text and 'id="chart"' in text
    assert "one bar per 5 minutes" in page.text_by_id["sends"]
    assert "2026-03-14 09:00 – 09:05 UTC: 2 sent" in text
    assert "2026-03-14 10:05 – 10:10 UTC: 1 sent" in text
    assert "14 Mar 09:00" in page.text_by_id["chart"]
    assert "time (UTC)" in page.text_by_id["chart"] and "letters sent" in page.text_by_id["chart"]

    by_country = page.text_by_id["by-country"]
    assert "AT" in by_country and "PL" in by_country and "FR" in by_country
    by_language = page.text_by_id["by-language"]
    assert all(lang in by_language for lang in ("de", "fr", "pl"))
    failures = page.text_by_id["failures"]
    assert UNKNOWN_USER in failures and "4.7.0 Try again later" in failures
    assert "no answer from the server" not in failures  # emil's timeout has a reply text
    problems = page.text_by_id["not-sent"]
    for email in (
        "carla@example.org",
        "dora@example.org",
        "mallory@example.org",
        "emil@example.org",
    ):
        assert email in problems
    for email in ("anna@example.org", "bruno@example.org", "berta@example.org"):
        assert email not in problems
        assert email in page.text_by_id["contacted"]
    assert "timeout after DATA" in problems
    # Skipped on purpose is listed with why, and in the reasons too.
    assert "ida@example.org" in problems and "suppressed: unsubscribed" in problems
    assert "suppressed: unsubscribed" in failures and "No failures" not in text
    assert "What the states mean" in text
    steps = page.text_by_id["next"]
    assert "3 failed: see why with `mailer log spring --status failed`" in steps
    assert "`mailer retry spring --uncertain`" in steps
    assert "<code>spring</code> from appeals@campaign.example.org" in text


def test_report_breakdown_rows_count_per_state(sample: sessionmaker[Session]) -> None:
    with sample() as session:
        data = report.build_report(session, slug="spring", now=T0 + dt.timedelta(hours=2))
    at = next(b for b in data.by_country if b.label == "Austria (AT)")
    assert at.total == 4
    assert (at.counts["sent"], at.counts["failed"], at.counts["retry"]) == (1, 2, 1)
    # Most recipients first, named for people.
    assert [b.label for b in data.by_country] == ["Austria (AT)", "France (FR)", "Poland (PL)"]
    assert [b.label for b in data.by_language] == ["French (fr)", "German (de)", "Polish (pl)"]
    assert sum(b.total for b in data.by_language) == 11
    assert data.sent_events == 3 and data.bucket == dt.timedelta(minutes=5)
    (problems, retry, skipped, waiting) = data.not_sent
    assert problems.statuses == ("failed", "uncertain") and problems.people.total == 4
    assert [p.email for p in problems.people.rows] == [
        "carla@example.org",
        "dora@example.org",
        "mallory@example.org",
        "emil@example.org",
    ]
    assert [p.email for p in skipped.people.rows] == ["ida@example.org"]
    assert waiting.people.total == 2 and retry.people.total == 1
    (german,) = [b for b in data.by_language if b.label == "German (de)"]
    assert (german.contacted, german.replied, german.reply_rate) == (1, 0, 0.0)


def test_report_escapes_every_value(sample: sessionmaker[Session], tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    with sample() as session:
        report.write_report(session, slug="spring", output=out)
    text = out.read_text(encoding="utf-8")
    assert SCRIPT_NAME not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>rejected</b>" not in text and "&lt;b&gt;rejected&lt;/b&gt; &amp; blocked" in text
    page = _parse(text)
    assert page.tags.count("script") == 0
    assert SCRIPT_NAME in page.text_by_id["not-sent"]  # shown to the reader as plain text
    assert FORMULA_NAME in page.text_by_id["not-sent"]  # hans is `sending`: waiting, as text


def test_report_is_self_contained(sample: sessionmaker[Session], tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    with sample() as session:
        report.write_report(session, slug="spring", output=out)
    text = out.read_text(encoding="utf-8")
    page = _parse(text)
    # Links only within the page (its table of contents): nothing is fetched.
    assert page.urls and all(url.startswith("#") for url in page.urls)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    # No URL in the style sheet or in any attribute but the SVG namespace. (Text may name one,
    # like hans's hostile name or a letter's link: text is shown, never loaded.)
    (style,) = re.findall(r"<style>(.*?)</style>", text, flags=re.S)
    assert not re.search(r"url\(|@import|https?:", style)
    attributes = re.findall(r'[\w:-]+="([^"]*)"', text)
    assert [a for a in attributes if "://" in a] == ["http://www.w3.org/2000/svg"]
    assert "default-src 'none'" in text


def test_report_of_campaign_with_no_messages(sample: sessionmaker[Session], tmp_path: Path) -> None:
    out = tmp_path / "empty.html"
    with sample() as session:
        data = report.write_report(session, slug="empty", output=out)
    assert data.summary.total == 0 and data.sends == []
    page = _parse(out.read_text(encoding="utf-8"))
    assert "Not sent yet" in page.text_by_id["not-sent-yet"]
    assert "No letter has been sent yet" in page.text_by_id["sends"]


@pytest.mark.parametrize(
    ("minutes", "bucket"),
    [
        (0, 1),
        (30, 1),
        (58, 1),
        (59, 5),
        (200, 5),
        (400, 10),
        (3000, 60),
        (20000, 360),
        (500000, 10080),
    ],
)
def test_chart_bucket_fits_the_span(
    session_factory: sessionmaker[Session], minutes: int, bucket: int
) -> None:
    build_sample(session_factory)
    with session_factory() as session, session.begin():
        session.query(Event).filter(Event.kind == "sent").delete()
        for at in (T0, T0 + dt.timedelta(minutes=minutes)):
            session.add(Event(campaign_id=1, kind="sent", at=at))
    with session_factory() as session:
        data = report.build_report(session, slug="spring")
    assert data.bucket == dt.timedelta(minutes=bucket)
    assert len(data.sends) <= report.MAX_BARS
    assert data.sent_events == 2


def test_report_output_errors_name_the_path(
    sample: sessionmaker[Session], run: Cli, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-folder" / "r.html"
    result = run("report", "spring", "--output", str(missing))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: cannot write report to {missing}: folder {missing.parent} does not exist"
    )
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    result = run("report", "spring", "--output", str(a_file / "r.html"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot write report to {a_file / 'r.html'}: ")
    folder = tmp_path / "afolder"
    folder.mkdir()
    result = run("report", "spring", "--output", str(folder))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: cannot write report to {folder}: it is a folder; name a file"
    )
    with sample() as session, pytest.raises(OutputFileError, match="it is a folder"):
        report.write_report(session, slug="spring", output=folder)
    assert not missing.parent.exists()


def test_report_into_read_only_folder(
    sample: sessionmaker[Session], run: Cli, tmp_path: Path
) -> None:
    # Root ignores a folder's mode bits, but not sysfs, which refuses new files to everyone.
    as_root = os.geteuid() == 0
    locked = Path("/sys") if as_root else tmp_path / "locked"
    if not as_root:
        locked.mkdir()
        locked.chmod(0o500)
    before = sorted(locked.iterdir())
    try:
        result = run("report", "spring", "--output", str(locked / "r.html"))
    finally:
        if not as_root:
            locked.chmod(0o700)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot write report to {locked / 'r.html'}: ")
    assert "ermission denied" in result.stderr
    assert sorted(locked.iterdir()) == before


def test_report_replaces_an_existing_file_whole(
    sample: sessionmaker[Session], tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "r.html"
    out.write_text("old")
    with sample() as session:
        report.write_report(session, slug="spring", output=out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]  # no temporary file left behind


def test_report_on_postgresql(pg_url: str, workspace: Path, tmp_path: Path) -> None:
    from test_report_people import build_outcomes

    from mailer import db
    from mailer.config import find_workspace

    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        factory = db.session_factory(engine)
        build_outcomes(factory, workspace)
        with factory() as session:
            data = report.write_report(
                session,
                slug="spring",
                output=tmp_path / "pg.html",
                workspace=find_workspace(start=workspace),
            )
        assert data.summary.total == 13 and data.sent_events == 5
        assert data.bucket == dt.timedelta(minutes=5)
        assert [b.label for b in data.by_country] == ["Austria (AT)", "France (FR)", "Poland (PL)"]
        assert data.not_sent[0].people.total == 5 and data.failures[0].count == 2
        assert [p.email for p in data.follow_up.rows] == ["bruno@example.org", "kurt@example.org"]
        assert data.contacted.rows[0].partners == ("Kyiv", "Lviv")
        assert [s.language for s in data.samples] == ["de", "fr", "pl"]
        assert all(s.error is None for s in data.samples)
        assert data.bounces[0].status == "5.1.1" and data.replies[0].name == "Anna Nowak"
        assert [b.reply for b in data.skipped] == ["suppressed: unsubscribed"]
        page = _parse((tmp_path / "pg.html").read_text(encoding="utf-8"))
        assert page.text_by_id["count-failed"] == "4"
    finally:
        engine.dispose()
