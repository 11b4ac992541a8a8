"""Sending windows end to end: a real SMTP server, a real SQLite file, and an injected clock that
the run's waits move (never a wall-clock sleep).

Each letter's delivery time (the clock at handover, recorded as `sent_at`), converted to its
recipient's zone, must fall inside the window: across daylight-saving changes, in a spring-forward
hour that does not exist and in an autumn hour that occurs twice, with no letter sent twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import Cli
from smtp_server import SmtpTestServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer import engine as send_engine
from mailer import timing
from mailer.config import Workspace, find_workspace
from mailer.models import Campaign, Contact, Event, Message
from mailer.send_report import SendReport, format_incomplete_reason
from mailer.smtp import SmtpPool, parse_smtp_url
from mailer.windows import parse_windows

UTC = dt.UTC
SLUG = "appeal"
TEMPLATE = """Subject: An appeal to {{ contact.name }}

Dear {{ contact.name }},

the mayors of Ukraine ask you to stand with them.
"""


class FakeClock:
    """The run's clock: it moves only when the run waits (its sleeper), or when a test says."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    async def sleep(self, until: dt.datetime) -> None:
        self.now = max(self.now, until)
        await asyncio.sleep(0)


@pytest.fixture
def server() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as srv:
        yield srv


@pytest.fixture
def ws(workspace: Path) -> Workspace:
    return find_workspace(start=workspace)


def import_contacts(run: Cli, workspace: Path, rows: list[tuple[str, ...]], header: str) -> None:
    path = workspace / "contacts.csv"
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8")
    run.ok("import", "contacts", str(path))


def create(
    run: Cli, workspace: Path, *args: str, slug: str = SLUG, template: str = TEMPLATE
) -> str:
    folder = workspace / "templates" / "letter"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en.txt.j2").write_text(template, encoding="utf-8")
    return run.ok(
        "campaign", "create", slug, "--template", "letter", "--from", "office@example.org", *args
    ).output


def send(
    ws: Workspace,
    engine: Engine,
    server: SmtpTestServer,
    clock: FakeClock,
    *,
    slug: str = SLUG,
    concurrency: int = 2,
    daily_cap: int | None = None,
    rate: float | None = None,
    **options: object,
) -> SendReport:
    pool = SmtpPool(parse_smtp_url(server.url(), timeout=10), size=concurrency)
    return send_engine.send_campaign(
        workspace=ws,
        engine=engine,
        slug=slug,
        transport=pool,
        concurrency=concurrency,
        daily_cap=daily_cap,
        rate=rate,
        clock=clock,
        sleep=clock.sleep,
        timing_options=timing.RunTiming(**options),  # type: ignore[arg-type]
    )


def sent_at(engine: Engine, slug: str = SLUG) -> dict[str, dt.datetime]:
    with Session(engine) as s:
        rows = s.execute(
            select(Contact.email, Message.sent_at)
            .join(Message, Message.contact_id == Contact.id)
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(Campaign.slug == slug, Message.sent_at.is_not(None))
        ).all()
    return {email: at for email, at in rows if at is not None}


def event_details(engine: Engine, kind: str) -> list[str]:
    with Session(engine) as s:
        return [d or "" for d in s.scalars(select(Event.detail).where(Event.kind == kind))]


# --------------------------------------------------------------------------- the world's offices

CITIES = [
    # email, name, city, country, timezone column (empty: the city says it)
    ("kyiv@example.org", "Kyiv", "Kyiv", "Ukraine", ""),
    ("berlin@example.org", "Berlin", "Berlin", "DE", ""),
    ("lisbon@example.org", "Lisbon", "Lisbon", "Portugal", ""),
    ("newyork@example.org", "New York", "New York", "US", ""),
    ("losangeles@example.org", "Los Angeles", "Los Angeles", "US", ""),
    ("tokyo@example.org", "Tokyo", "Tokyo", "JP", "Asia/Tokyo"),
    ("auckland@example.org", "Auckland", "Auckland", "NZ", ""),
]
ZONE_OF = {
    "kyiv@example.org": "Europe/Kyiv",
    "berlin@example.org": "Europe/Berlin",
    "lisbon@example.org": "Europe/Lisbon",
    "newyork@example.org": "America/New_York",
    "losangeles@example.org": "America/Los_Angeles",
    "tokyo@example.org": "Asia/Tokyo",
    "auckland@example.org": "Pacific/Auckland",
}


def inside_business_hours(at: dt.datetime, zone: str) -> bool:
    local = at.astimezone(ZoneInfo(zone))
    return local.weekday() < 5 and dt.time(9) <= local.time() < dt.time(17)


def test_seven_cities_each_get_their_letter_in_their_own_business_hours_across_dst(
    run: Cli, workspace: Path, engine: Engine, ws: Workspace, server: SmtpTestServer
) -> None:
    import_contacts(run, workspace, list(CITIES), "email,name,city,country,timezone")
    create(run, workspace)
    # Friday 29 March 2024, 16:30 UTC. Europe moves its clocks on Sunday the 31st; the US did on
    # the 10th. Open now: Lisbon (16:30 WET), New York (12:30 EDT), Los Angeles (09:30 PDT).
    clock = FakeClock(dt.datetime(2024, 3, 29, 16, 30, tzinfo=UTC))
    said: list[str] = []
    report = send(
        ws, engine, server, clock, windows=("Mon-Fri 09:00-17:00",), wait=True, notify=said.append
    )
    assert report.sent == 7 and report.next_due is None and not report.incomplete
    assert sorted(server.recipients()) == sorted(ZONE_OF)  # each exactly once
    got = sent_at(engine)
    for email, zone in ZONE_OF.items():
        assert inside_business_hours(got[email], zone), (email, got[email])
    friday = dt.datetime(2024, 3, 29, 16, 30, tzinfo=UTC)
    assert got["lisbon@example.org"] == friday
    assert got["newyork@example.org"] == friday
    assert got["losangeles@example.org"] == friday
    # The rest at 09:00 on Monday on their own clocks, after the change where there was one.
    assert got["auckland@example.org"] == dt.datetime(2024, 3, 31, 20, tzinfo=UTC)  # NZDT
    assert got["tokyo@example.org"] == dt.datetime(2024, 4, 1, 0, tzinfo=UTC)
    assert got["kyiv@example.org"] == dt.datetime(2024, 4, 1, 6, tzinfo=UTC)  # EEST, not EET
    assert got["berlin@example.org"] == dt.datetime(2024, 4, 1, 7, tzinfo=UTC)  # CEST, not CET
    for email in ("auckland@example.org", "tokyo@example.org", "kyiv@example.org"):
        zone = ZoneInfo(ZONE_OF[email])
        assert got[email].astimezone(zone).strftime("%a %H:%M") == "Mon 09:00"
    # --wait said when and for whom, each time.
    assert said[0] == (
        "waiting until 2024-03-31 20:00 UTC (Mon 09:00 in Pacific/Auckland): then 1 letter(s), "
        "e.g. auckland@example.org of appeal fall due; 3 more later"
    )
    assert len(said) == 4
    held = event_details(engine, "held")
    assert len(held) == 4
    assert any(
        "outside its window Mon-Fri 09:00-17:00 in Europe/Berlin; opens Mon 09:00" in d
        for d in held
    )
    with Session(engine) as s:
        assert s.scalar(select(Campaign.status)) == "done"


def test_without_wait_the_send_ends_with_exit_3_saying_when_the_next_window_opens(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    import_contacts(run, workspace, list(CITIES[:2]), "email,name,city,country,timezone")
    create(run, workspace)
    # A window three days from now (in UTC): shut whenever this test runs.
    day = (dt.datetime.now(UTC) + dt.timedelta(days=3)).strftime("%a")
    result = run(
        "send", SLUG, "--smtp", server.url(), "--window", f"{day} 10:00-11:00",
        "--window-zone", "UTC", "--yes",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert server.received == []
    assert "Held 2 letter(s) until their time" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: the next of appeal fall due ")
    assert f"10:00 UTC ({day} 10:00 in UTC): 2 letter(s), e.g. kyiv@example.org; " in last
    assert last.endswith("run `mailer send appeal` then (or with --wait to wait for it)")
    status = run.ok("status", SLUG).output
    assert "waiting   2 held for their window or delay; the next due" in status
    # A run without the window judges the held letters again: due now, sent now.
    again = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert again.exit_code == 0, again.output
    assert sorted(server.recipients()) == ["berlin@example.org", "kyiv@example.org"]
    assert len(event_details(engine, "requeued")) == 2


def test_a_window_in_the_spring_forward_hour_opens_when_the_clock_jumps(
    run: Cli, workspace: Path, engine: Engine, ws: Workspace, server: SmtpTestServer
) -> None:
    rows = [(f"b{i}@example.org", f"B{i}", "Berlin", "DE", "") for i in range(3)]
    import_contacts(run, workspace, rows, "email,name,city,country,timezone")
    create(run, workspace)
    clock = FakeClock(dt.datetime(2024, 3, 30, 12, tzinfo=UTC))
    report = send(ws, engine, server, clock, windows=("Sun 02:00-04:00",), wait=True)
    assert report.sent == 3
    berlin = ZoneInfo("Europe/Berlin")
    for at in sent_at(engine).values():
        # 02:00-03:00 never shows on a Berlin clock that night: the window opened at 03:00 CEST.
        assert at == dt.datetime(2024, 3, 31, 1, tzinfo=UTC)
        assert at.astimezone(berlin).strftime("%a %H:%M %Z") == "Sun 03:00 CEST"


def test_in_the_autumn_hour_that_occurs_twice_no_letter_goes_twice_or_outside_its_window(
    run: Cli, workspace: Path, engine: Engine, ws: Workspace, server: SmtpTestServer
) -> None:
    rows = [(f"b{i}@example.org", f"B{i}", "Berlin", "DE", "") for i in range(5)]
    import_contacts(run, workspace, rows, "email,name,city,country,timezone")
    create(run, workspace)
    clock = FakeClock(dt.datetime(2024, 10, 26, 12, tzinfo=UTC))

    def slow_server(envelope: object) -> None:
        # Each letter takes the server 13 minutes: the 30-minute window closes under the batch.
        clock.now += dt.timedelta(minutes=13)

    server.on_data = slow_server
    report = send(ws, engine, server, clock, concurrency=1, windows=("Sun 02:00-02:30",), wait=True)
    assert report.sent == 5
    assert sorted(server.recipients()) == sorted(r[0] for r in rows)  # none twice
    berlin = ZoneInfo("Europe/Berlin")
    got = sent_at(engine)
    for at in got.values():
        local = at.astimezone(berlin)
        assert local.weekday() == 6 and dt.time(2) <= local.time() < dt.time(2, 30), local
    # Both 02:00s were used: the first (CEST) and, after the clocks went back, the second (CET).
    assert {at.astimezone(berlin).strftime("%Z") for at in got.values()} == {"CEST", "CET"}
    released = event_details(engine, "requeued")
    assert released and all(
        d.startswith("released unsent, attempt ")
        and d.endswith(" not made (its sending window closed); due 2024-10-27 01:00 UTC")
        for d in released
    )


def test_a_letter_whose_window_closes_while_it_waits_for_a_connection_is_held(
    run: Cli, workspace: Path, engine: Engine, ws: Workspace, server: SmtpTestServer
) -> None:
    """Two senders on one connection: the second letter passed its window check and waits for
    the connection while the first one's server takes 31 minutes; by then its window has
    closed, so it is held for the next one, not handed over."""
    rows = [(f"w{i}@example.org", f"W{i}", "Berlin", "DE", "") for i in range(2)]
    import_contacts(run, workspace, rows, "email,name,city,country,timezone")
    create(run, workspace)
    clock = FakeClock(dt.datetime(2024, 6, 3, 9, tzinfo=UTC))  # a Monday

    def slow_server(envelope: object) -> None:
        clock.now += dt.timedelta(minutes=31)

    server.on_data = slow_server
    report = send_engine.send_campaign(
        workspace=ws,
        engine=engine,
        slug=SLUG,
        transport=SmtpPool(parse_smtp_url(server.url(), timeout=10), size=1),
        concurrency=2,
        clock=clock,
        sleep=clock.sleep,
        timing_options=timing.RunTiming(windows=("Mon 09:00-09:30",), window_zone="UTC"),
    )
    assert report.sent == 1 and len(server.recipients()) == 1
    assert list(sent_at(engine).values()) == [dt.datetime(2024, 6, 3, 9, tzinfo=UTC)]
    assert [d.split(" not made ")[1] for d in event_details(engine, "requeued")] == [
        "(its sending window closed); due 2024-06-10 09:00 UTC"
    ]


@pytest.mark.parametrize("rate", [None, 1.0], ids=["no-rate", "with-a-faster-rate"])
def test_spread_paces_a_days_cap_evenly_over_the_window(
    run: Cli,
    workspace: Path,
    engine: Engine,
    ws: Workspace,
    server: SmtpTestServer,
    rate: float | None,
) -> None:
    """With a --rate as well, the spread (never faster than the rate) is this sender's pace:
    the letters are spread all the same, and the campaign's shared pace is left alone."""
    rows = [(f"m{i}@example.org", f"M{i}", "Berlin", "DE", "") for i in range(6)]
    import_contacts(run, workspace, rows, "email,name,city,country,timezone")
    create(run, workspace)
    start = dt.datetime(2024, 6, 3, 9, tzinfo=UTC)  # a Monday
    clock = FakeClock(start)
    # One connection: with the fake clock, a second sender waiting for its slot would move the
    # time under the first one's handover (real time moves on its own).
    report = send(
        ws,
        engine,
        server,
        clock,
        concurrency=1,
        daily_cap=16,
        rate=rate,
        windows=("Mon-Fri 09:00-17:00",),
        window_zone="UTC",
        spread=True,
        seed=42,
    )
    assert report.sent == 6
    with Session(engine) as s:
        assert s.scalars(select(Campaign.pace_next_at)).one() is None
    times = sorted(sent_at(engine).values())
    # 8 open hours / 16 letters a day: one every 30 minutes, give or take 10 %, seeded.
    rng = random.Random(42)
    expected = [start]
    for _ in range(5):
        expected.append(expected[-1] + dt.timedelta(seconds=1800 * (1 + rng.uniform(-0.1, 0.1))))
    assert times == expected
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(1620 <= g <= 1980 for g in gaps) and len(set(gaps)) > 1


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--window", "Mon-Fri 17:00-09:00"), "Error: --window 'Mon-Fri 17:00-09:00' is reversed"),
        (("--window", "Mon 10:00-10:00"), "Error: --window 'Mon 10:00-10:00' is empty"),
        (("--window", ""), "Error: --window: an empty window"),
        (
            ("--window", "Mon-Thu 09:00-12:00", "--window", "Mon 11:30-14:00"),
            "Error: --window 'Mon-Thu 09:00-12:00' and --window 'Mon 11:30-14:00' overlap on Mon",
        ),
        (
            ("--window", "Mon-Fri 09:00-17:00", "--window-zone", "Mars/Olympus"),
            "Error: --window-zone: unknown time zone 'Mars/Olympus'",
        ),
        (("--window-zone", "Europe/Berlin"), "Error: --window-zone says whose time"),
        (("--window", "Mon-Fri 09:00-17:00", "--spread"), "Error: --spread spreads a day's cap"),
        (("--spread", "--daily-cap", "10"), "Error: --spread spreads a day's cap over a window"),
    ],
)
def test_bad_windows_and_zones_on_send_are_one_error_line_and_nothing_is_queued(
    run: Cli, workspace: Path, engine: Engine, args: tuple[str, ...], message: str
) -> None:
    import_contacts(run, workspace, list(CITIES[:1]), "email,name,city,country,timezone")
    create(run, workspace)
    result = run("send", SLUG, "--smtp", "smtp+plain://127.0.0.1:9", *args, "--yes")
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(message), line
    with Session(engine) as s:
        assert s.scalar(select(Message.id)) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--window", "Sat-Sun 18:00-08:00"), "Error: --window 'Sat-Sun 18:00-08:00' is reversed"),
        (
            ("--window", "Mon 09:00-17:00", "--window", "Mon 09:00-17:00"),
            "Error: --window 'Mon 09:00-17:00' and --window 'Mon 09:00-17:00' overlap on Mon",
        ),
        (
            ("--window", "Mon 09:00-17:00", "--window-zone", "Europe/Atlantis"),
            "Error: --window-zone: unknown time zone 'Europe/Atlantis'",
        ),
        (("--default-zone", "Nowhere"), "Error: --default-zone: unknown time zone 'Nowhere'"),
    ],
)
def test_bad_stored_windows_are_refused_at_create(
    run: Cli, workspace: Path, engine: Engine, args: tuple[str, ...], message: str
) -> None:
    import_contacts(run, workspace, list(CITIES[:1]), "email,name,city,country,timezone")
    (workspace / "templates" / "letter").mkdir(parents=True)
    (workspace / "templates" / "letter" / "en.txt.j2").write_text(TEMPLATE, encoding="utf-8")
    result = run(
        "campaign", "create", SLUG, "--template", "letter", "--from", "office@example.org", *args
    )
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(message), line
    with Session(engine) as s:
        assert s.scalar(select(Campaign.id)) is None


def test_stored_windows_apply_to_every_send_and_show_in_campaign_show_and_check(
    run: Cli, workspace: Path, engine: Engine, ws: Workspace, server: SmtpTestServer
) -> None:
    rows = [
        *CITIES,
        ("town@example.org", "Town", "Nowhereville", "US", ""),
        ("nocity@example.org", "No City", "", "", ""),
    ]
    import_contacts(run, workspace, rows, "email,name,city,country,timezone")
    create(
        run,
        workspace,
        "--window",
        "Mon-Thu 09:00-12:00",
        "--window",
        "mon-thu 14:00-17:00",
        "--default-zone",
        "Europe/Kyiv",
    )
    shown = run.ok("campaign", "show", SLUG).output
    assert (
        "Windows:   Mon-Thu 09:00-12:00 and Mon-Thu 14:00-17:00 (each recipient's own time)"
        in shown
    )
    assert "Zone:      Europe/Kyiv where a recipient's is not known" in shown
    checked = run.ok("check", SLUG).output
    assert (
        "Time zones: 1 from the contact's own time zone, 5 from their city and country, "
        "1 from their country (one time zone), 2 from the campaign's default zone (Europe/Kyiv)"
    ) in checked
    assert "sending window: Mon-Thu 09:00-12:00 and Mon-Thu 14:00-17:00" in checked
    assert "    town@example.org: Nowhereville (US) is not in the gazetteer" in checked
    assert "    nocity@example.org: no time zone, city or country" in checked
    # Friday: no window today anywhere; the stored windows hold every letter.
    clock = FakeClock(dt.datetime(2024, 6, 7, 12, tzinfo=UTC))
    report = send(ws, engine, server, clock)
    assert report.sent == 0 and report.held == 9 and report.incomplete
    assert report.next_due is not None
    assert report.next_due.at == dt.datetime(2024, 6, 9, 21, tzinfo=UTC)  # Mon 09:00 NZST
    assert format_incomplete_reason(report).startswith(
        "the next of appeal fall due 2024-06-09 21:00 UTC (Mon 09:00 in Pacific/Auckland): "
        "1 letter(s), e.g. auckland@example.org; 8 more later"
    )
    # A run that says otherwise wins: one zone for all, Friday allowed.
    report = send(ws, engine, server, clock, windows=("Fri 11:00-13:00",), window_zone="UTC")
    assert report.sent == 9
    assert all(at == clock.now for at in sent_at(engine).values())
    # The HTML report says when letters go, and how the zones were found.
    html = workspace / "report.html"
    run.ok("report", SLUG, "--output", str(html))
    text = html.read_text(encoding="utf-8")
    assert '<section id="windows"><h2>Sending windows</h2>' in text
    assert "Mon-Thu 09:00-12:00, Mon-Thu 14:00-17:00" in text
    assert "in each recipient's own time zone" in text
    assert "Time zones: 1 from the contact&#39;s own time zone, 5 from their city" in text
    assert text.count("Mon-Thu 14:00-17:00") == 1


def test_the_rules_are_pure_functions_of_the_injected_instant() -> None:
    schedule = parse_windows(["Mon-Fri 09:00-17:00"])
    assert schedule is not None
    zone = ZoneInfo("America/Los_Angeles")
    sunday = dt.datetime(2024, 3, 10, 12, tzinfo=UTC)  # the US changed its clocks at 10:00 UTC
    assert schedule.next_open(sunday, zone) == dt.datetime(2024, 3, 11, 16, tzinfo=UTC)


def test_a_held_letter_is_neither_peeked_nor_claimed_early_and_is_due_at_exactly_its_time(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    from mailer import outbox

    import_contacts(run, workspace, list(CITIES[:1]), "email,name,city,country,timezone")
    create(run, workspace)
    start = dt.datetime(2024, 6, 3, 9, tzinfo=UTC)
    due_at = dt.datetime(2024, 6, 3, 10, tzinfo=UTC)  # a whole second, as a window's opening
    with Session(engine) as s:
        campaign = s.scalar(select(Campaign))
        assert campaign is not None
        s.expunge(campaign)
    outbox.queue_audience(engine, campaign=campaign, now=start)
    with Session(engine) as s:
        mid, cid = s.execute(select(Message.id, Message.contact_id)).one()
    hold = outbox.Hold(message=mid, contact_id=cid, until=due_at, reason="outside its window")
    assert outbox.hold_and_skip(engine, campaign_id=campaign.id, holds=[hold], now=start).held == 1
    peek = outbox.Due(engine, campaign_id=campaign.id)
    just_before = due_at - dt.timedelta(microseconds=1)
    assert peek.peek(10, skip=frozenset(), now=just_before) == []
    assert not peek.any(now=just_before)
    early = outbox.claim(
        engine, campaign_id=campaign.id, ids=[mid], sender_id="t", now=just_before
    )
    assert early.claims == []
    peek.expect_retries()
    assert peek.peek(10, skip=frozenset(), now=due_at) == [(mid, cid)]
    claimed = outbox.claim(engine, campaign_id=campaign.id, ids=[mid], sender_id="t", now=due_at)
    assert [c.id for c in claimed.claims] == [mid]
    assert event_details(engine, "held") == ["due 2024-06-03 10:00 UTC: outside its window"]
