"""What a send did (`SendReport`) and will do (`SendPlan`), and their text for people.

The `format_*` functions here are the only place that words a send's outcome: `mailer send`
and `mailer demo` print what they return. Imports models and policy; no database, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailer.models import MessageStatus
from mailer.policy import StopReason

if TYPE_CHECKING:
    from mailer.timing import Waiting


@dataclass(kw_only=True)
class SendReport:
    campaign: str
    via: str
    run_id: str
    due: int = 0
    recovered: int = 0
    newly_queued: int = 0
    skipped: int = 0
    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    uncertain: int = 0
    released: int = 0
    build_errors: int = 0
    fell_back: int = 0
    # Messages composed by the worker process (see compose_worker), not by the sender itself.
    composed_by_worker: int = 0
    # A test send (`--test-to`): the address it went to; nothing is recorded.
    test_to: str | None = None
    dry_run: bool = False
    # A dry run: the size of everything it built.
    built_bytes: int = 0
    # Why the run stopped before the queue was empty.
    stopped: StopReason | None = None
    resume_at: dt.datetime | None = None
    errors: list[str] = field(default_factory=list)
    # Message counts per status after the run.
    totals: dict[str, int] = field(default_factory=dict)
    rate: float = 0.0
    # Letters this run held until later (their window, a follow-up's delay), and what is held
    # after it: when the next ones fall due (see timing.py).
    held: int = 0
    waiting: Waiting | None = None

    @property
    def test(self) -> bool:
        return self.test_to is not None

    @property
    def done(self) -> int:
        return self.sent + self.deferred + self.failed + self.uncertain + self.build_errors

    @property
    def incomplete(self) -> bool:
        """Exit 3: something is left that the user must look at or wait for."""
        if self.test or self.dry_run:
            return bool(self.failed or self.uncertain or self.deferred or self.build_errors)
        left = sum(
            self.totals.get(s.value, 0)
            for s in (MessageStatus.FAILED, MessageStatus.UNCERTAIN, MessageStatus.RETRY)
        )
        return (
            bool(left)
            or self.waiting is not None
            or self.stopped in (StopReason.DAILY_CAP, StopReason.PAUSED)
        )


Progress = Callable[[SendReport], None]


@dataclass(frozen=True, kw_only=True)
class SendPlan:
    """What the confirmation shows before anything is sent."""

    campaign: str
    from_address: str
    audience: int
    pending: int
    sample_subject: str | None
    sample_to: str | None


def format_send_plan(
    plan: SendPlan,
    *,
    transport: str,
    test_to: str | None,
    limit: int | None,
    rate: str | None,
    daily_cap: int | None,
) -> list[str]:
    """What `mailer send` shows before it asks for confirmation (`rate` as the user wrote it)."""
    if test_to is not None:
        lines = [
            f"Test send of {plan.campaign}: {limit or 3} real rendering(s) to {test_to} only "
            "(nothing recorded)"
        ]
    else:
        lines = [
            f"Sending {plan.campaign}: {plan.pending} message(s) to send (audience {plan.audience})"
        ]
    lines += [
        f"  from:      {plan.from_address}",
        f"  subject:   {plan.sample_subject or '(no recipient)'}",
        f"  transport: {transport}",
    ]
    limits = [
        f"rate {rate}" if rate else "",
        f"daily cap {daily_cap}" if daily_cap else "",
        f"limit {limit}" if limit else "",
    ]
    if any(limits):
        lines.append(f"  limits:    {', '.join(x for x in limits if x)}")
    return lines


def format_progress(report: SendReport, *, total: int, rate: float) -> str:
    """One progress line (off a terminal): sent so far, problems, retries, messages a second."""
    done = report.done + report.released
    percent = done * 100 // total if total else 100
    problems = report.failed + report.uncertain + report.build_errors
    return (
        f"sent {report.sent}/{total} ({percent}%), {problems} failed, {report.deferred} retry, "
        f"{rate:,.0f} msg/s"
    )


def format_send_counts(report: SendReport) -> str:
    """One line: `74 sent, 1 skipped, 0 failed, 0 uncertain`."""
    return (
        f"{report.sent} sent, {report.skipped} skipped, {report.failed} failed, "
        f"{report.uncertain} uncertain"
    )


def format_send_summary(report: SendReport) -> list[str]:
    """The lines `mailer send` prints when a run is over."""
    if report.test:
        return [
            f"{report.sent} test message(s) sent to {report.test_to}; nothing recorded as sent",
            *(f"  {e}" for e in report.errors),
        ]
    if report.dry_run:
        return [
            f"dry run: {report.sent} message(s) built ({report.built_bytes:,} bytes), "
            f"{report.skipped} skipped, {report.build_errors} error(s); nothing sent, "
            "nothing changed",
            *(f"  {e}" for e in report.errors),
        ]
    lines = []
    if report.recovered:
        lines.append(
            f"{report.recovered} message(s) left `sending` by an earlier run are now `uncertain` "
            f"(they may have been delivered); `mailer retry {report.campaign} --uncertain` re-sends them"
        )
    if report.newly_queued or report.skipped:
        lines.append(
            f"Queued {report.newly_queued} new message(s); skipped {report.skipped} (suppressed or invalid address)"
        )
    lines.append(
        f"This run: {report.sent} sent, {report.deferred} to retry, {report.failed} failed, "
        f"{report.uncertain} uncertain, {report.build_errors} not buildable"
        + (f", {report.released} released unsent" if report.released else "")
        + f" ({report.rate:,.0f} msg/s via {report.via})"
    )
    t = report.totals
    lines.append(
        f"Campaign {report.campaign}: "
        + ", ".join(
            f"{t.get(k, 0)} {k}"
            for k in ("sent", "queued", "retry", "failed", "uncertain", "skipped", "sending")
        )
    )
    if report.stopped is StopReason.LIMIT:
        lines.append(f"Stopped at --limit; run `mailer send {report.campaign}` again for the rest.")
    if report.held:
        lines.append(
            f"Held {report.held} letter(s) until their time (sending window, follow-up delay or "
            "return date); `mailer log "
            f"{report.campaign} --events` says why and until when"
        )
    return lines


def format_incomplete_reason(report: SendReport) -> str:
    """Why a send ends with exit 3 (see SendReport.incomplete), in one line."""
    slug = report.campaign
    if report.dry_run:
        return (
            f"{report.build_errors} message(s) of {slug} cannot be built; "
            f"`mailer check {slug}` lists them"
        )
    if report.stopped is StopReason.DAILY_CAP:
        when = f"{report.resume_at:%Y-%m-%d %H:%M} UTC" if report.resume_at else "later"
        return f"daily cap reached for {slug}; sending may continue after {when}"
    if report.stopped is StopReason.PAUSED:
        return (
            f"paused {slug}: more than half of the recent messages failed; see "
            f"`mailer log {slug} --status failed`, then run send again"
        )
    if report.test:
        return f"{report.failed + report.build_errors} test message(s) were not accepted"
    if report.waiting is not None:
        from mailer.timing import format_waiting

        return (
            f"{format_waiting(report.waiting, slug=slug)}; run `mailer send {slug}` then "
            "(or with --wait to wait for it)"
        )
    t = report.totals
    left = ", ".join(f"{t.get(k, 0)} {k}" for k in ("failed", "uncertain", "retry") if t.get(k, 0))
    return (
        f"campaign {slug} is not complete: {left}; retries go out on a later `mailer send`, "
        f"`mailer retry {slug} --failed/--uncertain` requeues the others"
    )


__all__ = [
    "Progress",
    "SendPlan",
    "SendReport",
    "format_incomplete_reason",
    "format_progress",
    "format_send_counts",
    "format_send_plan",
    "format_send_summary",
]
