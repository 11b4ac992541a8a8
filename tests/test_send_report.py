"""The words of a send's outcome: `format_*` beside SendReport (cli and demo only print them)."""

from __future__ import annotations

import datetime as dt

from mailer.policy import StopReason
from mailer.send_report import (
    SendPlan,
    SendReport,
    format_campaign_counts,
    format_held,
    format_incomplete_reason,
    format_paused,
    format_progress,
    format_progress_detail,
    format_send_counts,
    format_send_plan,
    format_send_summary,
    log_filter,
    progress_done,
)


def report(**kwargs: object) -> SendReport:
    return SendReport(campaign="appeal", via="mx.example.org:587", run_id="r", **kwargs)


TOTALS = {"sent": 7, "queued": 3, "retry": 1, "failed": 2, "uncertain": 0, "skipped": 1}


def test_summary_of_a_run_stopped_at_the_limit() -> None:
    r = report(
        recovered=2,
        newly_queued=10,
        skipped=1,
        sent=7,
        deferred=1,
        failed=2,
        released=3,
        rate=123.4,
        totals=TOTALS,
        stopped=StopReason.LIMIT,
    )
    assert format_send_summary(r) == [
        "2 message(s) left `sending` by an earlier run are now `uncertain` (they may have been "
        "delivered); `mailer retry appeal --uncertain` re-sends them",
        "Queued 10 new message(s); skipped 1 (suppressed, invalid address, or written to "
        "lately by another campaign)",
        "This run: 7 sent, 1 to retry, 2 failed, 0 uncertain, 0 not buildable, 3 put back in "
        "the queue (123 msg/s via mx.example.org:587)",
        "Campaign appeal: 7 sent, 3 queued, 1 retry, 2 failed, 0 uncertain, 1 skipped, 0 sending",
        "Stopped at --limit; run `mailer send appeal` again for the rest.",
    ]


def test_a_quiet_run_says_only_what_it_did() -> None:
    r = report(sent=4, rate=2000, totals={"sent": 4})
    assert format_send_summary(r) == [
        "This run: 4 sent, 0 to retry, 0 failed, 0 uncertain, 0 not buildable "
        "(2,000 msg/s via mx.example.org:587)",
        "Campaign appeal: 4 sent, 0 queued, 0 retry, 0 failed, 0 uncertain, 0 skipped, 0 sending",
    ]
    assert not r.incomplete


def test_test_and_dry_run_summaries() -> None:
    test = report(test_to="me@example.org", sent=2, failed=1, errors=["550 no"])
    assert format_send_summary(test) == [
        "2 test message(s) sent to me@example.org; nothing recorded as sent",
        "  550 no",
    ]
    assert test.incomplete
    assert format_incomplete_reason(test) == "1 test message(s) were not accepted"
    dry = report(dry_run=True, sent=5, built_bytes=12_345, skipped=1, build_errors=1, errors=["x"])
    assert format_send_summary(dry) == [
        "dry run: 5 message(s) built (12,345 bytes), 1 skipped, 1 error(s); nothing sent, "
        "nothing changed",
        "  x",
    ]
    assert dry.incomplete
    assert format_incomplete_reason(dry) == (
        "1 message(s) of appeal cannot be built; `mailer check appeal` lists them"
    )


def test_incomplete_reasons_per_stop() -> None:
    capped = report(
        stopped=StopReason.DAILY_CAP, resume_at=dt.datetime(2022, 3, 15, 9, 30, tzinfo=dt.UTC)
    )
    assert capped.incomplete
    assert format_incomplete_reason(capped) == (
        "daily cap reached for appeal; sending may continue after 2022-03-15 09:30 UTC"
    )
    assert "continue after later" in format_incomplete_reason(report(stopped=StopReason.DAILY_CAP))
    paused = report(
        stopped=StopReason.PAUSED,
        failed=2,
        uncertain=1,
        deferred=9,
        totals={"failed": 2, "uncertain": 1, "retry": 9, "queued": 50},
    )
    assert paused.incomplete
    assert format_incomplete_reason(paused) == (
        "paused appeal: too many of the recent letters were not accepted (this run: 2 failed, "
        "1 uncertain, 9 to retry); see `mailer log appeal --status failed --status uncertain "
        "--status retry`, then run `mailer send appeal` again"
    )
    left = report(totals=TOTALS)
    assert left.incomplete
    assert format_incomplete_reason(left) == (
        "campaign appeal is not complete: 2 failed, 1 retry; retries go out on a later "
        "`mailer send`, `mailer retry appeal --failed/--uncertain` requeues the others"
    )
    # Stopped at --limit with nothing left to look at is not incomplete: the rest just waits.
    assert not report(stopped=StopReason.LIMIT, totals={"sent": 3, "queued": 5}).incomplete


def test_the_demo_line() -> None:
    assert (
        format_send_counts(report(sent=74, skipped=1))
        == "74 sent, 1 skipped, 0 failed, 0 uncertain"
    )


def test_the_plan_before_confirmation() -> None:
    plan = SendPlan(
        campaign="appeal",
        from_address="Office <office@example.org>",
        audience=12,
        pending=10,
        sample_subject="An appeal",
        sample_to="mayor@example.org",
    )
    assert format_send_plan(
        plan,
        transport="smtp://mx.example.org:587",
        test_to=None,
        limit=5,
        rate="300/min",
        daily_cap=None,
    ) == [
        "Sending appeal: 10 message(s) to send (audience 12)",
        "  from:      Office <office@example.org>",
        "  subject:   An appeal",
        "  transport: smtp://mx.example.org:587",
        "  limits:    rate 300/min, limit 5",
    ]
    quiet = SendPlan(
        campaign="appeal",
        from_address="o@example.org",
        audience=0,
        pending=0,
        sample_subject=None,
        sample_to=None,
    )
    assert format_send_plan(
        quiet,
        transport="Maildir out",
        test_to="me@example.org",
        limit=None,
        rate=None,
        daily_cap=100,
    ) == [
        "Test send of appeal: 3 real rendering(s) to me@example.org only (nothing recorded)",
        "  from:      o@example.org",
        "  subject:   (no recipient)",
        "  transport: Maildir out",
        "  limits:    daily cap 100",
    ]


def test_a_progress_line() -> None:
    r = report(sent=40, failed=3, uncertain=1, deferred=2, released=4)
    assert format_progress(r, total=100, rate=1234.5) == (
        "sent 40 of 100, 3 failed, 1 uncertain, 2 to retry, 1,234 msg/s"
    )
    # Letters put back in the queue are not done: the count never jumps when a run stops.
    assert progress_done(r) == 46
    assert format_progress(report(), total=0, rate=0.0) == "sent 0 of 0, 0 msg/s"
    assert format_progress_detail(r, rate=2.0) == "3 failed · 1 uncertain · 2 to retry · 2 msg/s"


def test_the_pause_after_many_problems_says_failed_only_when_letters_failed() -> None:
    # Issue 11, item 14: 4xx answers and timeouts are not failures, and the log filter it
    # points to must show them.
    r = report(
        stopped=StopReason.PAUSED,
        uncertain=3,
        deferred=12,
        totals={"retry": 12, "uncertain": 3, "queued": 20},
    )
    reason = format_incomplete_reason(r)
    assert "failed" not in reason
    assert "(this run: 3 uncertain, 12 to retry)" in reason
    assert "`mailer log appeal --status uncertain --status retry`" in reason
    assert log_filter("appeal", {"failed": 1}) == "mailer log appeal --status failed"


def test_every_campaign_line_comes_from_the_outbox_counts() -> None:
    # Issue 11, item 14: after a refusal streak was put back, the run's counters say 13
    # failed, but the outbox holds 20 queued: the campaign line says what the outbox holds.
    r = report(failed=0, totals={"queued": 20}, stopped=StopReason.SYSTEMIC)
    lines = format_send_summary(r)
    assert format_campaign_counts("appeal", {"queued": 20}) in lines
    assert lines[-1] == (
        "Campaign appeal: 0 sent, 20 queued, 0 retry, 0 failed, 0 uncertain, 0 skipped, 0 sending"
    )
    assert not any("100%" in line for line in lines)


def test_the_paused_line_and_the_held_line() -> None:
    r = report(sent=9, totals={"sent": 9, "queued": 60, "retry": 6})
    assert format_paused(r) == "Paused: 9 sent this run, 66 waiting — `mailer send appeal` goes on"
    r.again = "mailer send appeal --smtp smtp://o@mx.example.org:587 --yes"
    assert format_paused(r).endswith(
        "— `mailer send appeal --smtp smtp://o@mx.example.org:587 --yes` goes on"
    )
    early = report()
    assert format_paused(early) == (
        "Paused before anything was sent: 0 sent this run — `mailer send appeal` goes on"
    )
    held = report(
        sent=3,
        stopped=StopReason.HELD,
        halted_by="paused by ann@laptop-a pid 7 at 2026-05-04 10:00 UTC: wrong city",
        totals={"sent": 3, "queued": 7},
    )
    assert held.incomplete
    assert format_held(held) == (
        "Stopped: paused by ann@laptop-a pid 7 at 2026-05-04 10:00 UTC: wrong city. 3 sent this "
        "run, 7 waiting — `mailer campaign resume appeal`, then `mailer send appeal` goes on"
    )
    assert format_send_summary(held)[-1] == format_held(held)
