"""What a send did (`SendReport`) and will do (`SendPlan`), and their text for people.

The `format_*` functions here are the only place that words a send's outcome: `mailer send`
and `mailer demo` print what they return. Imports models and policy; no database, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from mailer.models import MessageStatus
from mailer.policy import StopReason


@dataclass(kw_only=True)
class SendReport:
    campaign: str
    via: str
    run_id: str
    due: int = 0
    # Claims of senders that were gone (see senders.gone), settled at the start of this run:
    # `uncertain` (handed over, no answer known), back in the queue (never handed over), or
    # with the answer their sender's journal kept.
    recovered: int = 0
    recovered_requeued: int = 0
    recovered_known: int = 0
    newly_queued: int = 0
    skipped: int = 0
    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    uncertain: int = 0
    released: int = 0
    # Letters skipped because their address was suppressed after they were queued (found by
    # the claim or while they waited to be handed over).
    suppressed: int = 0
    # 5.1.1-class refusals: the address is suppressed as `hard_bounce`.
    hard_bounces: int = 0
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
    # While the database cannot be reached: since when (seconds) and for how long the sender
    # keeps trying, for the progress line; None when it can.
    database_down: tuple[float, float] | None = None
    # Other senders of the campaign with a live lease when this run ended (their labels):
    # letters they hold are under way, so no advice may suggest re-sending them.
    live_senders: list[str] = field(default_factory=list)
    # Why a bounce spike held the campaign (StopReason.BOUNCE_SPIKE).
    spike: str | None = None

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
        return bool(left) or self.stopped in (
            StopReason.DAILY_CAP,
            StopReason.PAUSED,
            StopReason.BOUNCE_SPIKE,
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
    line = (
        f"sent {report.sent}/{total} ({percent}%), {problems} failed, {report.deferred} retry, "
        f"{rate:,.0f} msg/s"
    )
    waiting = format_database_wait(report)
    return f"{line}; {waiting}" if waiting else line


def format_database_wait(report: SendReport) -> str | None:
    """While the database cannot be reached: what the sender does about it, for the progress."""
    if report.database_down is None:
        return None
    down, limit = report.database_down
    return (
        f"database unreachable for {down:.0f} s: nothing is handed over, the answers are kept; "
        f"retrying for up to {limit:.0f} s"
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
    if report.recovered_requeued or report.recovered_known:
        lines.append(
            f"{report.recovered_requeued + report.recovered_known} message(s) left `sending` by "
            f"a sender that stopped: {report.recovered_requeued} never handed over, back in the "
            f"queue; {report.recovered_known} with the answer its journal kept"
        )
    if report.recovered:
        advice = (
            f"`mailer retry {report.campaign} --uncertain` re-sends them"
            if not report.live_senders
            else "wait until the other sender(s) of this campaign finish before any retry"
        )
        lines.append(
            f"{report.recovered} message(s) left `sending` by an earlier run are now `uncertain` "
            f"(they may have been delivered); {advice}"
        )
    if report.suppressed:
        lines.append(
            f"Skipped {report.suppressed} message(s) whose address was suppressed during the send"
        )
    if report.live_senders:
        lines.append(
            f"Still sending this campaign: {', '.join(report.live_senders)} "
            f"(`mailer senders {report.campaign}` shows them)"
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
    if report.stopped is StopReason.BOUNCE_SPIKE:
        return (
            f"paused {slug}: {report.spike or 'bounce spike'}; see `mailer log {slug} --status "
            f"failed`; to send anyway, run send again with --acknowledge-bounces"
        )
    if report.test:
        return f"{report.failed + report.build_errors} test message(s) were not accepted"
    t = report.totals
    left = ", ".join(f"{t.get(k, 0)} {k}" for k in ("failed", "uncertain", "retry") if t.get(k, 0))
    if report.live_senders:
        # Letters another sender holds are under way: a retry now could send them twice.
        return (
            f"campaign {slug} is not complete: {left}; another sender is still at work on it "
            f"(`mailer senders {slug}`): wait until it finishes before `mailer retry`"
        )
    return (
        f"campaign {slug} is not complete: {left}; retries go out on a later `mailer send`, "
        f"`mailer retry {slug} --failed/--uncertain` requeues the others"
    )


__all__ = [
    "Progress",
    "SendPlan",
    "SendReport",
    "format_database_wait",
    "format_incomplete_reason",
    "format_progress",
    "format_send_counts",
    "format_send_plan",
    "format_send_summary",
]
