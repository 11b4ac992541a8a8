"""What a send did (`SendReport`) and will do (`SendPlan`), and their text for people.

The `format_*` functions here are the only place that words a send's outcome: `mailer send`
and `mailer demo` print what they return. Whatever a summary says of the campaign comes from
the outbox's own counts (`SendReport.totals`, read when the run ended), worded by one function
(`format_campaign_counts`); what it says of the run comes from the run's counters, which never
count a letter handed back to the queue as done. Imports models, policy and errors; no
database, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailer.errors import Interrupted
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
    build_errors: int = 0
    fell_back: int = 0
    # Letters skipped because their address was suppressed after they were queued (found by
    # the claim or while they waited to be handed over).
    suppressed: int = 0
    # 5.1.1-class refusals: the address is suppressed as `hard_bounce`.
    hard_bounces: int = 0
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
    # Stopped by the team's word (StopReason.HELD): who paused or cancelled it, in words.
    halted_by: str | None = None
    # The command that goes on where this run stopped (the CLI names the flags it needs).
    again: str | None = None
    # Letters this run held until later (their window, a follow-up's delay), and what is held
    # after it: when the next ones fall due (see timing.py).
    held: int = 0
    next_due: Waiting | None = None
    # While the database cannot be reached: since when (seconds) and for how long the sender
    # keeps trying, for the progress line; None when it can.
    database_down: tuple[float, float] | None = None
    # Other senders of the campaign with a live lease when this run ended (their labels):
    # letters they hold are under way, so no advice may suggest re-sending them.
    live_senders: list[str] = field(default_factory=list)
    # Why a bounce spike held the campaign (StopReason.BOUNCE_SPIKE, or HELD when the hold was
    # seen in the database: this run's, another sender's or inbox sync's).
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
        return bool(left) or self.next_due is not None or self.stopped in (
            StopReason.DAILY_CAP,
            StopReason.PAUSED,
            StopReason.HELD,
            StopReason.BOUNCE_SPIKE,
        )

    @property
    def problems(self) -> int:
        """Letters of this run that did not go out: failed (or not buildable), uncertain, or
        deferred for a retry."""
        return self.failed + self.build_errors + self.uncertain + self.deferred

    @property
    def waiting(self) -> int:
        """Letters of the campaign still to go when the run ended (the outbox's counts)."""
        return waiting(self.totals)

    @property
    def resume_command(self) -> str:
        return self.again or f"mailer send {self.campaign}"


Progress = Callable[[SendReport], None]


class SendPaused(Interrupted):
    """Ctrl-C (or SIGTERM) paused the send cleanly: exit 130, and no `Error:` -- the report
    says what was sent and what waits (see format_paused)."""

    def __init__(self, report: SendReport) -> None:
        super().__init__(format_paused(report))
        self.report = report


# The states a campaign line lists, in this order.
_CAMPAIGN_STATES = ("sent", "queued", "retry", "failed", "uncertain", "skipped", "sending")


def waiting(totals: dict[str, int]) -> int:
    """Letters still to go: queued, or waiting for a retry."""
    return totals.get(MessageStatus.QUEUED.value, 0) + totals.get(MessageStatus.RETRY.value, 0)


def format_campaign_counts(campaign: str, totals: dict[str, int]) -> str:
    """The one line that says where a campaign stands, from the outbox's counts."""
    return f"Campaign {campaign}: " + ", ".join(f"{totals.get(k, 0)} {k}" for k in _CAMPAIGN_STATES)


def _run_problems(report: SendReport) -> list[str]:
    """`2 failed`, `1 uncertain`, `3 to retry`: only what happened, each by its own name."""
    failed = report.failed + report.build_errors
    return [
        f"{n:,} {words}"
        for n, words in (
            (failed, "failed"),
            (report.uncertain, "uncertain"),
            (report.deferred, "to retry"),
        )
        if n
    ]


def log_filter(slug: str, totals: dict[str, int]) -> str:
    """The `mailer log` command that lists the campaign's letters in trouble now: only the
    states that hold some (a filter that shows nothing is no help)."""
    states = [s for s in ("failed", "uncertain", "retry") if totals.get(s, 0)]
    flags = "".join(f" --status {s}" for s in states or ("failed", "uncertain", "retry"))
    return f"mailer log {slug}{flags}"


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
    notes: tuple[str, ...] = (),
) -> list[str]:
    """What `mailer send` shows before it asks for confirmation (`rate` as the user wrote it,
    or as mailer.toml / the campaign remembers it); `notes` are warnings worth a look first."""
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
    lines += [f"  note:      {note}" for note in notes]
    return lines


def progress_done(report: SendReport) -> int:
    """Letters of this run that are done (sent, or tried and answered): a letter handed back
    to the queue is not done, so the count never jumps when a run stops."""
    return report.done


def format_progress(report: SendReport, *, total: int, rate: float) -> str:
    """One progress line (off a terminal): `sent 12 of 300`, then only the problems there
    are, each by its own name, then messages a second."""
    parts = [f"sent {report.sent:,} of {total:,}", *_run_problems(report), f"{rate:,.0f} msg/s"]
    line = ", ".join(parts)
    waiting = format_database_wait(report)
    return f"{line}; {waiting}" if waiting else line


def format_progress_detail(report: SendReport, *, rate: float) -> str:
    """What the progress bar shows beside `sent N of M` (while the database cannot be
    reached, what the sender does about it)."""
    return format_database_wait(report) or " · ".join([*_run_problems(report), f"{rate:,.0f} msg/s"])


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
    if report.newly_queued or report.skipped:
        lines.append(
            f"Queued {report.newly_queued} new message(s); skipped {report.skipped} "
            "(suppressed, invalid address, or written to lately by another campaign)"
        )
    lines.append(
        f"This run: {report.sent} sent, {report.deferred} to retry, {report.failed} failed, "
        f"{report.uncertain} uncertain, {report.build_errors} not buildable"
        + (f", {report.released} put back in the queue" if report.released else "")
        + f" ({report.rate:,.0f} msg/s via {report.via})"
    )
    if report.suppressed:
        lines.append(
            f"Skipped {report.suppressed} message(s) whose address was suppressed during the send"
        )
    if report.totals:
        lines.append(format_campaign_counts(report.campaign, report.totals))
    if report.live_senders:
        lines.append(
            f"Still sending this campaign: {', '.join(report.live_senders)} "
            f"(`mailer senders {report.campaign}` shows them)"
        )
    if report.stopped is StopReason.LIMIT:
        lines.append(f"Stopped at --limit; run `{report.resume_command}` again for the rest.")
    if report.stopped is StopReason.HELD:
        lines.append(format_held(report))
    if report.held:
        lines.append(
            f"Held {report.held} letter(s) until their time (sending window, follow-up delay or "
            "return date); `mailer log "
            f"{report.campaign} --events` says why and until when"
        )
    return lines


def format_paused(report: SendReport) -> str:
    """The last line of a send paused by Ctrl-C: what this run sent, what waits, and the
    command that goes on."""
    if not report.totals:
        return (
            f"Paused before anything was sent: {report.sent} sent this run — "
            f"`{report.resume_command}` goes on"
        )
    return (
        f"Paused: {report.sent:,} sent this run, {report.waiting:,} waiting — "
        f"`{report.resume_command}` goes on"
    )


def format_held(report: SendReport) -> str:
    """Why a run stopped at the team's word (paused or cancelled in the database)."""
    slug = report.campaign
    who = report.halted_by or f"campaign {slug} was paused"
    if report.totals.get(MessageStatus.SKIPPED.value, 0) and "cancelled" in who:
        return (
            f"Stopped: {who}. {report.sent:,} sent this run; the letters still waiting were skipped"
        )
    if "cancelled" in who or "deleted" in who:
        return f"Stopped: {who}. {report.sent:,} sent this run"
    if report.spike is not None:
        # Held by a bounce spike: `campaign resume` alone would not lift it.
        return (
            f"Stopped: {who}. {report.sent:,} sent this run, {report.waiting:,} waiting — see "
            f"`mailer log {slug} --status failed`; `{report.resume_command} "
            "--acknowledge-bounces` goes on"
        )
    return (
        f"Stopped: {who}. {report.sent:,} sent this run, {report.waiting:,} waiting — "
        f"`mailer campaign resume {slug}`, then `{report.resume_command}` goes on"
    )


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
    if report.stopped is StopReason.BOUNCE_SPIKE or (
        report.stopped is StopReason.HELD and report.spike is not None
    ):
        return (
            f"paused {slug}: {report.spike or 'bounce spike'}; see `mailer log {slug} --status "
            f"failed`; to send anyway, run `{report.resume_command} --acknowledge-bounces`"
        )
    if report.stopped is StopReason.HELD:
        return f"campaign {slug} was stopped: {report.halted_by or 'paused in the database'}"
    if report.stopped is StopReason.PAUSED:
        words = ", ".join(_run_problems(report)) or "problems"
        return (
            f"paused {slug}: too many of the recent letters were not accepted (this run: "
            f"{words}); see `{log_filter(slug, report.totals)}`, then run "
            f"`{report.resume_command}` again"
        )
    if report.test:
        return f"{report.failed + report.build_errors} test message(s) were not accepted"
    if report.next_due is not None:
        from mailer.timing import format_waiting

        return (
            f"{format_waiting(report.next_due, slug=slug)}; run `mailer send {slug}` then "
            "(or with --wait to wait for it)"
        )
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
    "SendPaused",
    "SendPlan",
    "SendReport",
    "format_campaign_counts",
    "format_database_wait",
    "format_held",
    "format_incomplete_reason",
    "format_paused",
    "format_progress",
    "format_progress_detail",
    "format_send_counts",
    "format_send_plan",
    "format_send_summary",
    "log_filter",
    "progress_done",
    "waiting",
]
