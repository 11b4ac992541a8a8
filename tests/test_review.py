"""`mailer status`, `mailer log` and contact history, on send logs written through the models."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from test_review_data import FORMULA_NAME, RECIPIENTS, T0, UNKNOWN_USER, build_sample

from mailer import db, review
from mailer.errors import InvalidValueError, NotFoundError
from mailer.models import Event, Message

STATE_KEYS = ("queued", "sending", "sent", "retry", "failed", "skipped", "uncertain")
EXPECTED = {
    "queued": 1,
    "sending": 1,
    "sent": 3,
    "retry": 1,
    "failed": 3,
    "skipped": 1,
    "uncertain": 1,
}


@pytest.fixture
def sample(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    build_sample(session_factory)
    return session_factory


# --------------------------------------------------------------------------- status


def test_status_counts_every_state_progress_rate_and_reasons(sample: sessionmaker[Session]) -> None:
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", now=T0 + dt.timedelta(minutes=70))
    assert s.counts == EXPECTED
    assert s.total == 11
    assert s.finished == 8  # sent, failed, skipped, uncertain
    assert s.progress == pytest.approx(72.7)
    assert s.started_at == T0
    assert s.ended_at is None  # queued, sending and retry messages are still open
    # One `sent` event (berta at +65 min) in the ten minutes before +70 min: no span, no rate.
    assert s.rate.letters == 1 and s.rate.current and s.rate_per_minute is None
    top = s.top_failures[0]
    # Replies differing only by a trailing newline count as one reason.
    assert (top.smtp_code, top.reply, top.count) == (550, UNKNOWN_USER, 2)
    assert {(f.smtp_code, f.count) for f in s.top_failures} == {
        (550, 2),
        (554, 1),
        (421, 1),
        (None, 1),
    }


def test_status_next_steps_name_the_commands(sample: sessionmaker[Session]) -> None:
    due = T0 + dt.timedelta(minutes=20)
    with sample() as session, session.begin():
        session.execute(
            update(Message).where(Message.status == "retry").values(next_attempt_at=due)
        )
    with sample() as session:
        spring, empty = review.campaign_status(session)
        assert spring.next_retry_at == due
        assert any("due from 2026-03-14 09:20 UTC" in step for step in spring.next_steps())
        assert empty.next_steps() == [
            "check it with `mailer check empty`, then send with `mailer send empty --smtp URL`"
        ]
        session.execute(update(Message).values(status="sent"))
        (done,) = review.campaign_status(session, "spring")
    assert done.next_steps() == [
        "nothing left to do: every recipient was sent to or skipped on purpose"
    ]
    assert done.to_json()["next_steps"] == done.next_steps()


def test_status_ended_is_last_event_once_nothing_is_open(sample: sessionmaker[Session]) -> None:
    with sample() as session, session.begin():
        session.execute(
            update(Message)
            .where(Message.status.in_(("queued", "sending", "retry")))
            .values(status="failed")
        )
    with sample() as session:
        (s,) = review.campaign_status(session, "spring", now=T0 + dt.timedelta(days=1))
    assert s.ended_at == T0 + dt.timedelta(minutes=65)
    assert s.progress == 100.0
    assert s.rate_per_minute == 0


def test_status_json_has_the_design_keys(sample: sessionmaker[Session], run: Cli) -> None:
    result = run.ok("status", "--format", "json")
    data = json.loads(result.stdout)
    assert [d["campaign"] for d in data] == ["spring", "empty"]
    spring, empty = data
    for obj in data:
        assert {"campaign", "status", "total", *STATE_KEYS} <= obj.keys()
    assert {k: spring[k] for k in STATE_KEYS} == EXPECTED
    assert spring["total"] == 11 and spring["status"] == "sending"
    assert empty["total"] == 0 and all(empty[k] == 0 for k in STATE_KEYS)


def test_status_one_campaign_as_text(sample: sessionmaker[Session], run: Cli) -> None:
    out = run.ok("status", "spring").stdout
    assert "spring — Spring appeal  [sending]" in out
    for state, n in EXPECTED.items():
        assert f"  {state:<9}  {n:>9,}" in out
    assert "progress  72.7% (8 of 11 finished)" in out
    assert "started   2026-03-14 09:00 UTC" in out
    assert f"2 × 550 {UNKNOWN_USER}" in out
    assert "empty" not in out
    next_lines = [line for line in out.splitlines() if line.startswith("  next: ")]
    assert next_lines == [
        "  next: 1 waiting: `mailer send spring --smtp URL` sends them",
        "  next: 1 refused for now by the server: the next `mailer send spring` tries them again",
        "  next: 1 claimed by a sender: if no `mailer send` is running, the next "
        "`mailer send spring` settles them",
        "  next: 3 failed: see why with `mailer log spring --status failed`; once the cause "
        "is fixed, `mailer retry spring --failed` queues them again",
        "  next: 1 uncertain (they may have arrived): check your server's records "
        "(`mailer log spring --status uncertain`); only for letters that did not arrive, "
        "`mailer retry spring --uncertain`",
    ]


def test_status_of_campaign_with_no_messages_says_not_sent_yet(
    sample: sessionmaker[Session], run: Cli
) -> None:
    out = run.ok("status", "empty").stdout
    assert "not sent yet" in out
    (obj,) = json.loads(run.ok("status", "empty", "--format", "json").stdout)
    assert obj["total"] == 0 and obj["progress"] == 0.0 and obj["note"] == "not sent yet"
    assert all(obj[k] == 0 for k in STATE_KEYS)


def test_status_with_no_campaigns(run: Cli) -> None:
    assert "No campaigns yet" in run.ok("status").stdout
    assert json.loads(run.ok("status", "--format", "json").stdout) == []


def test_unknown_campaign_is_one_error_line(sample: sessionmaker[Session], run: Cli) -> None:
    for args in (("status", "nope"), ("log", "nope"), ("report", "nope", "--output", "r.html")):
        result = run(*args)
        assert result.exit_code == 1, args
        assert result.stderr.strip().splitlines() == [
            "Error: no campaign 'nope'; campaigns: empty, spring"
        ]


def test_format_not_offered_is_a_usage_error(sample: sessionmaker[Session], run: Cli) -> None:
    for args in (("status", "--format", "xml"), ("log", "spring", "--format", "xlsx")):
        result = run(*args)
        assert result.exit_code == 2, args
        assert "Invalid value for '--format'" in result.stderr


# --------------------------------------------------------------------------- log


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_log_csv_has_the_design_columns_and_one_row_per_recipient(
    sample: sessionmaker[Session], run: Cli
) -> None:
    rows = _csv(run.ok("log", "spring", "--format", "csv").stdout)
    assert [r["email"] for r in rows] == [r.email for r in RECIPIENTS]
    required = ("email", "name", "city", "country", "status", "attempts", "sent_at")
    assert {*required, "smtp_code", "smtp_reply", "message_id"} <= rows[0].keys()
    anna = rows[0]
    assert anna["city"] == "Kraków" and anna["country"] == "PL" and anna["status"] == "sent"
    assert anna["sent_at"] == "2026-03-14T09:01:00Z"
    assert anna["smtp_code"] == "250" and anna["message_id"] == "<spring.0@campaign.example.org>"
    assert anna["last_event_at"] == "2026-03-14T09:01:00Z"


def test_log_csv_neutralises_formulas(sample: sessionmaker[Session], run: Cli) -> None:
    rows = _csv(run.ok("log", "spring", "--format", "csv").stdout)
    hans = next(r for r in rows if r["email"] == "hans@example.org")
    assert hans["name"] == "'" + FORMULA_NAME
    assert hans["smtp_reply"] == "'-1"
    # Ordinary values are untouched.
    assert next(r for r in rows if r["email"] == "anna@example.org")["name"] == "Anna Nowak"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cell_prefixes_every_formula_start(start: str) -> None:
    assert review.csv_cell(start + "1+1") == "'" + start + "1+1"
    assert review.csv_cell("a" + start) == "a" + start
    assert review.csv_cell(None) == "" and review.csv_cell(7) == "7"


def test_log_json_is_a_parseable_array_with_one_object_per_line(
    sample: sessionmaker[Session], run: Cli
) -> None:
    out = run.ok("log", "spring", "--format", "json").stdout
    data = json.loads(out)
    assert len(data) == 11
    assert data[0]["email"] == "anna@example.org" and data[0]["attempts"] == 1
    assert data[0]["smtp_code"] == 250 and data[0]["sent_at"] == "2026-03-14T09:01:00Z"
    lines = out.splitlines()
    assert lines[0] == "[" and lines[-1] == "]"
    assert all(json.loads(line.rstrip(",")) for line in lines[1:-1])
    # Formula neutralising is for CSV only: JSON keeps the data exact.
    assert next(d for d in data if d["email"] == "hans@example.org")["name"] == FORMULA_NAME
    empty = run.ok(
        "log", "spring", "--status", "queued", "--contact", "anna@example.org", "--format", "json"
    )
    assert json.loads(empty.stdout) == []


def test_log_filters(sample: sessionmaker[Session], run: Cli) -> None:
    def emails(*args: str) -> list[str]:
        return [r["email"] for r in _csv(run.ok("log", "spring", "--format", "csv", *args).stdout)]

    assert emails("--status", "failed") == [
        "carla@example.org",
        "dora@example.org",
        "mallory@example.org",
    ]
    assert emails("--status", "uncertain", "--status", "retry") == [
        "emil@example.org",
        "fritz@example.org",
    ]
    assert emails("--status", "FAILED,uncertain") == emails(
        "--status", "failed", "--status", "uncertain"
    )
    assert emails("--contact", " Anna@Example.org ") == ["anna@example.org"]
    assert emails("--city", "wien") == [r.email for r in RECIPIENTS if r.city == "Wien"]
    assert emails("--city", "krakow") == [r.email for r in RECIPIENTS if r.city == "Kraków"]
    assert emails("--country", "fr") == [r.email for r in RECIPIENTS if r.city == "Lyon"]
    assert emails("--country", "FR", "--status", "failed") == ["mallory@example.org"]
    # Recipients with any event at or after 09:05.
    assert emails("--since", "2026-03-14T09:05") == [
        "berta@example.org",
        "dora@example.org",
        "mallory@example.org",
        "emil@example.org",
        "fritz@example.org",
        "hans@example.org",
    ]
    assert emails("--since", "2026-03-14 10:00:00+00:00") == ["berta@example.org"]
    assert emails("--since", "2026-03-15") == []
    # T0 lies in the past: relative ages reach back from now.
    assert len(emails("--since", "3650d")) == 11
    assert emails("--since", "2h") == []


def test_log_bad_status_and_since_are_one_error_line(
    sample: sessionmaker[Session], run: Cli
) -> None:
    result = run("log", "spring", "--status", "bounced")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: --status 'bounced': unknown status; use one of "
        "queued, sending, sent, retry, failed, skipped, uncertain"
    )
    for bad in ("yesterday", "2026-13-01", "5 parsecs", ""):
        result = run("log", "spring", "--since", bad)
        assert result.exit_code == 1, bad
        assert result.stderr.startswith(f"Error: --since {bad!r}: not a date or time"), (
            result.stderr
        )
        assert len(result.stderr.strip().splitlines()) == 1


def test_log_events_one_line_per_event_oldest_first(
    sample: sessionmaker[Session], run: Cli
) -> None:
    rows = _csv(run.ok("log", "spring", "--events", "--format", "csv").stdout)
    assert len(rows) == sum(len(r.events) for r in RECIPIENTS)
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
    assert rows[-1]["email"] == "berta@example.org" and rows[-1]["kind"] == "sent"
    carla = [r for r in rows if r["email"] == "carla@example.org"]
    assert [r["kind"] for r in carla] == ["queued", "failed"]
    assert carla[1]["smtp_code"] == "550" and carla[1]["detail"] == UNKNOWN_USER
    assert carla[1]["via"] == "127.0.0.1:2525" and carla[1]["status"] == "failed"
    late = _csv(
        run.ok("log", "spring", "--events", "--since", "2026-03-14T09:08", "--format", "csv").stdout
    )
    assert [(r["email"], r["kind"]) for r in late] == [
        ("fritz@example.org", "deferred"),
        ("hans@example.org", "claimed"),
        ("berta@example.org", "sent"),
    ]
    failed = _csv(
        run.ok("log", "spring", "--events", "--status", "failed", "--format", "csv").stdout
    )
    assert {r["email"] for r in failed} == {
        "carla@example.org",
        "dora@example.org",
        "mallory@example.org",
    }


def test_log_table_is_aligned_text(sample: sessionmaker[Session], run: Cli) -> None:
    out = run.ok("log", "spring").stdout.splitlines()
    assert out[0].split() == [
        "email",
        "name",
        "city",
        "country",
        "status",
        "attempts",
        "sent_at",
        "replied_at",
        "bounced_at",
        "smtp_code",
        "smtp_reply",
    ]
    assert set(out[1].replace(" ", "")) == {"-"}
    assert len(out) == 2 + 11
    status_col = out[0].index("status")
    assert out[2][status_col:].startswith("sent")
    assert (
        "(no matching rows)"
        in run.ok("log", "spring", "--status", "queued", "--country", "AT").stdout
    )
    events = run.ok("log", "spring", "--events").stdout.splitlines()
    assert events[0].split()[:2] == ["at", "kind"]


def test_paging_returns_every_row_once_in_order(sample: sessionmaker[Session]) -> None:
    with sample() as session:
        whole = list(review.log_rows(session, slug="spring"))
        paged = list(review.log_rows(session, slug="spring", page_size=2))
        assert paged == whole and len(whole) == 11
        # Many events share one timestamp: the (at, id) keyset must neither skip nor repeat.
        events = list(review.event_rows(session, slug="spring"))
        for size in (1, 2, 3, 7):
            assert list(review.event_rows(session, slug="spring", page_size=size)) == events
        assert len({e["id"] for e in events}) == len(events) == session.query(Event).count()


def test_parse_since_forms() -> None:
    now = dt.datetime(2026, 3, 14, 12, 0, tzinfo=dt.UTC)
    assert review.parse_since("2h", now=now) == dt.datetime(2026, 3, 14, 10, 0, tzinfo=dt.UTC)
    assert review.parse_since("3d", now=now) == dt.datetime(2026, 3, 11, 12, 0, tzinfo=dt.UTC)
    assert review.parse_since("30m", now=now) == dt.datetime(2026, 3, 14, 11, 30, tzinfo=dt.UTC)
    assert review.parse_since("1w ago", now=now) == dt.datetime(2026, 3, 7, 12, 0, tzinfo=dt.UTC)
    assert review.parse_since("2026-03-14") == dt.datetime(2026, 3, 14, tzinfo=dt.UTC)
    assert review.parse_since("2026-03-14T09:30+02:00") == dt.datetime(
        2026, 3, 14, 7, 30, tzinfo=dt.UTC
    )
    with pytest.raises(InvalidValueError, match="not a date or time"):
        review.parse_since("tomorrow")


# --------------------------------------------------------------------------- contact history


def test_contact_history_has_data_messages_and_events_oldest_first(
    sample: sessionmaker[Session],
) -> None:
    with sample() as session:
        h = review.contact_history(session, "BERTA@example.org")
    assert h.imported and h.email == "berta@example.org"
    assert (h.name, h.title, h.city, h.country, h.language) == (
        "Berta Huber",
        "Mayor",
        "Wien",
        "AT",
        "de",
    )
    assert h.attributes == {"population": "30000"} and h.tags == ["mayors"]
    assert h.suppression is None
    (m,) = h.messages
    assert (m.campaign, m.status, m.attempts, m.smtp_code) == ("spring", "sent", 2, 250)
    assert [(e.kind, e.smtp_code) for e in h.events] == [
        ("queued", None),
        ("deferred", 421),
        ("sent", 250),
    ]
    assert [e.at for e in h.events] == sorted(e.at for e in h.events)
    text = review.format_contact_history(h)
    assert "Berta Huber" in text and "spring: sent, 2 attempt(s), sent 2026-03-14 10:05 UTC" in text
    assert (
        "2026-03-14 09:03 UTC  spring  deferred  421  4.7.0 Try again later  via 127.0.0.1:2525"
        in text
    )


def test_contact_history_shows_suppression(sample: sessionmaker[Session]) -> None:
    with sample() as session:
        ida = review.contact_history(session, "ida@example.org")
        ghost = review.contact_history(session, "ghost@example.org")
    assert ida.suppression is not None and ida.suppression.reason == "unsubscribed"
    assert ida.suppression.source == "reply" and ida.suppression.at == T0
    assert "SUPPRESSED    unsubscribed since 2026-03-14 09:00 UTC (source: reply)" in (
        review.format_contact_history(ida)
    )
    # Suppressed though never imported: known, and said so.
    assert not ghost.imported and ghost.suppression is not None
    assert ghost.suppression.reason == "manual" and ghost.messages == []
    text = review.format_contact_history(ghost)
    assert text.startswith("ghost@example.org is not an imported contact, but it is suppressed:")
    assert json.loads(json.dumps(ghost.to_json()))["suppression"]["reason"] == "manual"


def test_contact_history_unknown_address(sample: sessionmaker[Session]) -> None:
    with (
        sample() as session,
        pytest.raises(NotFoundError, match=r"no contact 'nobody@example\.org'"),
    ):
        review.contact_history(session, "Nobody@example.org")


# --------------------------------------------------------------------------- PostgreSQL


def test_review_on_postgresql(pg_url: str) -> None:
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        factory = db.session_factory(engine)
        build_sample(factory)
        with factory() as session:
            (s,) = review.campaign_status(session, "spring", now=T0 + dt.timedelta(minutes=70))
            assert s.counts == EXPECTED and s.rate.letters == 1
            assert s.top_failures[0].count == 2
            rows = list(review.log_rows(session, slug="spring", page_size=3))
            assert [r["email"] for r in rows] == [r.email for r in RECIPIENTS]
            assert rows[0]["last_event_at"] == T0 + dt.timedelta(minutes=1)
            events = list(review.event_rows(session, slug="spring", page_size=2))
            assert events == list(review.event_rows(session, slug="spring"))
            flt = review.LogFilter(city="WIEN", since=T0 + dt.timedelta(minutes=5))
            assert [r["email"] for r in review.log_rows(session, slug="spring", flt=flt)] == [
                "berta@example.org",
                "dora@example.org",
                "fritz@example.org",
            ]
            assert review.contact_history(session, "carla@example.org").events[-1].smtp_code == 550
    finally:
        engine.dispose()


def test_contacts_show_command(sample: sessionmaker[Session], run: Cli) -> None:
    out = run.ok("contacts", "show", "carla@example.org").stdout
    assert out.startswith("carla@example.org\n  name          Carla Weiss\n")
    assert "  city          Wien, AT\n" in out and "  population    40000\n" in out
    assert "  suppressed    no\n" in out
    assert f"spring: failed, 1 attempt(s), queued 2026-03-14 09:00 UTC — 550 {UNKNOWN_USER}" in out
    assert out.index("  queued") < out.index("failed  550")
    data = json.loads(run.ok("contacts", "show", "carla@example.org", "--format", "json").stdout)
    assert data["email"] == "carla@example.org" and data["country"] == "AT"
    assert [e["kind"] for e in data["events"]] == ["queued", "failed"]
    assert data["messages"][0]["smtp_code"] == 550
    assert data["events"][1]["at"] == "2026-03-14T09:04:00Z"
    ghost = run.ok("contacts", "show", "ghost@example.org").stdout
    assert "not an imported contact, but it is suppressed" in ghost and "manual" in ghost
    result = run("contacts", "show", "nobody@example.org")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: no contact 'nobody@example.org': it was never imported nor suppressed"
    )


def test_status_terminal_tables_render_data_literally(sample: sessionmaker[Session]) -> None:
    from rich.console import Console

    with sample() as session, session.begin():
        session.execute(
            update(Message)
            .where(Message.status == "retry")
            .values(smtp_reply="4.7.0 [bold]greylisted[/bold] [ABC]")
        )
    with sample() as session:
        summaries = review.campaign_status(session)
    console = Console(file=io.StringIO(), width=250, record=True, color_system=None)
    for renderable in review.status_renderables(summaries):
        console.print(renderable)
    text = console.export_text()
    assert "spring" in text and "72.7%" in text and "not sent yet" in text
    # Server replies are data: rich markup in them is shown, not interpreted.
    assert "4.7.0 [bold]greylisted[/bold] [ABC]" in text


def test_log_into_a_closed_pipe_ends_quietly(
    session_factory: sessionmaker[Session], workspace: Path
) -> None:
    from sqlalchemy import insert

    from mailer.models import Campaign, Contact

    with session_factory() as session, session.begin():
        session.add(Campaign(id=1, slug="big", template="appeal", from_address="a@example.org"))
        session.flush()
        session.execute(
            insert(Contact),
            [{"id": i, "email": f"m{i}@example.org", "name": "x" * 40} for i in range(1, 3001)],
        )
        session.execute(
            insert(Message),
            [
                {"campaign_id": 1, "contact_id": i, "status": "queued", "queued_at": T0}
                for i in range(1, 3001)
            ],
        )
    mailer = Path(sys.executable).with_name("mailer")
    child = subprocess.Popen(
        [str(mailer), "-w", str(workspace), "log", "big", "--format", "csv"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline().startswith(b"email,name,")
    child.stdout.close()  # like `| head -1`: far more than a pipe buffer is still unwritten
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "Error" not in stderr, stderr


def test_write_table_streams_with_widths_from_the_first_rows() -> None:
    rows = [{"email": f"m{i}@example.org", "reply": "ok"} for i in range(3)]
    rows.append({"email": "late@example.org", "reply": "x" * 100})
    out = io.StringIO()
    n = review.write_table(iter(rows), columns=("email", "reply"), out=out, sample=3)
    lines = out.getvalue().splitlines()
    assert n == 4 and len(lines) == 6
    assert lines[0].split() == ["email", "reply"]
    # Widths come from the rows seen first; a longer late value is cut, never misaligned.
    assert lines[-1] == "late@example.…  xxxx…"
    assert review.write_table(iter([]), columns=("email",), out=io.StringIO()) == 0


def test_status_and_log_agree(sample: sessionmaker[Session], run: Cli) -> None:
    (status,) = json.loads(run.ok("status", "spring", "--format", "json").stdout)
    rows = _csv(run.ok("log", "spring", "--format", "csv").stdout)
    assert len(rows) == status["total"]
    for state in STATE_KEYS:
        assert sum(r["status"] == state for r in rows) == status[state], state
    events = _csv(run.ok("log", "spring", "--events", "--format", "csv").stdout)
    sent_events = {r["email"] for r in events if r["kind"] == "sent"}
    assert sent_events == {r["email"] for r in rows if r["status"] == "sent"}


def test_status_does_not_advise_a_retry_for_failed_letters_now_suppressed(
    sample: sessionmaker[Session],
) -> None:
    # Issue 14 item 7: a letter refused with "no such user" suppresses its address; `retry
    # --failed` leaves it alone, so `status` must not advise a retry that cannot help.
    from sqlalchemy import select

    from mailer.models import Contact, Suppression

    with sample() as session, session.begin():
        failed = (
            session.execute(
                select(Contact.email)
                .join(Message, Message.contact_id == Contact.id)
                .where(Message.status == "failed")
                .order_by(Contact.email)
            )
            .scalars()
            .all()
        )
        assert len(failed) == 3
        session.add(Suppression(email=failed[0], reason="hard_bounce", source="test"))
    with sample() as session:
        (spring,) = review.campaign_status(session, "spring")
    assert spring.failed_suppressed == 1
    steps = spring.next_steps()
    assert any(step.startswith("2 failed: see why") for step in steps), steps
    assert any(
        step.startswith("1 failed and suppressed since") and "no retry can help" in step
        for step in steps
    ), steps
