"""The delivery engine: the run of a send, where compose, a transport and the outbox meet.

A run goes: register as a sender (senders.py: identity, lease) with its handover journal
(journal.py) -> settle the claims of senders that are gone -> freeze the templates -> resolve the
audience again and queue whoever is missing (skipping the suppressed) -> a pipeline of bounded
queues:

    peeker (reads which messages are due; claims nothing; with sending windows or a follow-up,
    asks timing.Gate.admit which of them are due now, the others held or skipped, so a held
    letter is never composed nor claimed) -> composing (renders bytes, in a worker process
    for a large run: see compose_worker) -> claimer (commits `queued -> sending` per composed
    batch, just in time: one batch ahead of the senders) -> feeder -> N sender workers (the
    transport; a letter whose window closed while it waited goes back, see timing.Gate.closed)
    -> recorder (commits results in small batches)

and beside it two watchers: one renews the lease (the heartbeat), re-checks waiting letters
against suppressions added since their claim, and judges the bounce spike; the other reads the
campaign's state every `policy.state_poll` seconds, so a pause or cancel by anyone on the team
(or a bounce-spike hold) stops this run like Ctrl-C does.

What a crash leaves: a claim is committed (fsync) before any letter of it leaves; just before a
letter's payload goes out the sender writes `p <id>` to its journal, and the server's answer
when it comes. So after a `kill -9` the next run on this machine knows, per claim, whether it
was never handed over (back to `queued`), answered (its result), or on the wire (`uncertain`:
at most the connections times the letters in flight on each). Another machine, or this one
after a reboot, cannot trust the journal and settles every claim of the dead sender as
`uncertain`. Only a sender whose lease has expired, or whose process is provably gone on this
machine, is settled by another: never one that is merely quiet (see senders.py).

Promises while it runs:
- A letter is handed over only while the sender can record results and holds a fresh lease.
  When the database goes away (a restart, SQLite locked past its busy timeout) the senders stop
  handing over at once, keep the answers they have, and retry with backoff for up to
  `policy.db_outage` seconds (shown on the progress line); then they write and go on. Past that
  the run stops, and the journal keeps what it knew for the next run.
- A suppression added during the run stops every letter not yet handed over: the claim skips
  the suppressed, and the watcher re-checks the letters waiting in the pipeline.
- `--daily-cap` and `--rate` hold across processes: the cap is counted and taken in the claim's
  transaction, and the rate is a pace kept in the campaign's row that every sender's claim
  advances (outbox.claim). With `--spread`, the spread (timing.SpreadLimiter, never faster than
  `--rate`) is this sender's pace instead: it spreads the cap over the window with jitter, kept
  in this process, and the shared pace is not advanced by it (the cap still holds for all).
- Quiet days hold at the claim too: a letter whose contact another campaign wrote to within the
  campaign's `quiet_days` (since it was queued) is skipped there (outbox.claim).
- A letter's handover (the journal's mark, just before its payload) is its delivery time: the
  run's clock at that moment becomes its `sent_at`.
- 5.1.1-class refusals suppress the address (hard bounce) and count toward the bounce spike,
  which pauses and holds the campaign.

This module holds the run (its stages, signals and shutdown) and no SQL: every read and write
of messages and events is an `outbox` verb, of senders a `senders` verb, and what follows an
attempt is `policy.next_state`. It must not write to the database by any other way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer import campaigns, compose, journal, outbox, senders, timing
from mailer.addresses import address_problem
from mailer.clock import Clock, Sleeper, sleeper_for, utcnow
from mailer.compose_worker import Batch, BatchComposer, ComposeWorker, Composing
from mailer.config import Workspace
from mailer.errors import (
    ClaimsLost,
    DatabaseError,
    InvalidValueError,
    MailerError,
    TransportError,
)
from mailer.identity import Actor
from mailer.models import Campaign, MessageStatus
from mailer.outbox import Claim
from mailer.policy import RateLimiter, SendPolicy, StopReason, next_state
from mailer.send_report import Progress, SendPaused, SendPlan, SendReport
from mailer.transport import DryRun, Outcome, OutcomeKind, Transport

_T = TypeVar("_T")


def _campaign_id(engine: Engine, slug: str) -> int:
    with Session(engine) as session:
        return campaigns.get_campaign(session, slug).id


class DatabaseUnavailable(DatabaseError):
    """The database stayed unreachable (or locked) for the whole outage window."""


class _JournalBroken(Exception):
    """The handover mark could not be written: the letter must not leave (not an OSError, so
    that the transport does not take it for a broken connection)."""


def _unreachable(exc: BaseException) -> bool:
    """A database that cannot be reached, restarts, or stays locked: worth waiting for. Other
    errors (a constraint, a bug) are not."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        name = type(exc.orig).__name__ if exc.orig is not None else ""
        return name in ("OperationalError", "InterfaceError") or type(exc).__name__ in (
            "OperationalError",
            "InterfaceError",
        )
    return False


# --------------------------------------------------------------------------- the pipeline


@dataclass(slots=True)
class _Job:
    claim: Claim
    data: bytes = b""
    mail_from: str = ""
    rcpt_to: tuple[str, ...] = ()
    smtputf8: bool = False
    message_id: str | None = None
    language: str | None = None
    subject: str | None = None
    body_hash: str | None = None
    fell_back: bool = False
    error: str | None = None
    handed: bool = False
    # The run's clock when its payload was handed over (the journal's mark): its `sent_at`.
    handed_at: dt.datetime | None = None
    # Its window closed before it could go: held until this time (see timing.Gate.closed).
    held_until: dt.datetime | None = None
    # Its address was suppressed after its claim (the reason): it is never handed over.
    suppressed: str | None = None
    # Under a pace: the loop time before which it may not leave.
    not_before: float = 0.0


@dataclass(slots=True)
class _Result:
    job: _Job
    outcome: Outcome | None  # None: released unsent (or a build error when job.error is set)


_TICK = _Result(job=_Job(claim=Claim(id=-1, contact_id=-1, attempts=0)), outcome=None)

# Peeked (message id, contact id) pairs and their batch being composed.
_Peeked = tuple[list[tuple[int, int]], "asyncio.Future[Batch]"]


class _Run:
    def __init__(
        self,
        *,
        engine: Engine,
        workspace: Workspace,
        campaign: Campaign,
        transport: Transport,
        concurrency: int,
        budget: int | None,
        budget_reason: StopReason | None,
        progress: Progress | None,
        clock: Clock,
        policy: SendPolicy,
        report: SendReport,
        bucket: RateLimiter | None,
        me: senders.SenderIdentity,
        journal: journal.Journal,
        lease_until: dt.datetime,
        daily_cap: int | None,
        pace: float | None,
        gate: timing.Gate | None = None,
        sleep: Sleeper | None = None,
    ) -> None:
        self.engine = engine
        self.workspace = workspace
        self.campaign = campaign
        self.transport = transport
        self.concurrency = concurrency
        # On a PIPELINING server two messages share a connection: the next envelope goes out
        # while the message before waits for its verdict (see smtp._Connection.transact).
        self.sender_tasks = concurrency * int(getattr(transport, "sends_per_connection", 1))
        self.budget = budget
        self.budget_reason = budget_reason
        self.progress = progress
        self.clock = clock
        self.policy = policy
        self.report = report
        self.bucket = bucket
        self.me = me
        self.journal = journal
        self.actor = me.label
        self.lease_until = lease_until
        self.daily_cap = daily_cap
        self.pace = pace
        # Sending windows and follow-up delays (timing.py); None: every queued letter is due.
        self.gate = gate
        self.sleep = sleep or sleeper_for(clock)
        self.stop = asyncio.Event()
        # Under a rate a batch is about `claim_horizon` seconds of sending, so claims stay young.
        self.batch_size = policy.batch_size
        rate = pace if pace is not None else (bucket.rate if bucket is not None else None)
        if rate is not None and rate > 0:
            self.batch_size = max(1, min(policy.batch_size, int(rate * policy.claim_horizon)))
        self.hurry = asyncio.Event()
        self.stop_reason: StopReason | None = None
        self.error: MailerError | None = None
        self.window: collections.deque[bool] = collections.deque(maxlen=policy.error_window)
        self.streak: list[int] = []
        self.streak_key: tuple[int | None, str] | None = None
        self.inflight: set[int] = set()
        # Claimed and not yet settled, so a cancelled run can still account for each of them.
        self.outstanding: dict[int, _Job] = {}
        # One batch between claim and the senders' queue: claims are made just in time.
        self.ahead = asyncio.Semaphore(1)
        # One thread: claims and records never wait for each other's write lock.
        self.db_thread = ThreadPoolExecutor(1, thread_name_prefix="mailer-db")
        self.composing = Composing(
            BatchComposer(engine=engine, workspace=workspace, campaign=campaign), worker=None
        )
        self.due = outbox.Due(engine, campaign_id=campaign.id)
        # Results settled (counted in the report) and not yet written (see recorder), and how
        # many results exist that are not yet committed (for `--wait`: see _wait_for_held).
        self.unrecorded: list[outbox.Result] = []
        self.unwritten = 0
        # Quiet days (campaign setting): re-checked at every claim (outbox.claim).
        quiet = (campaign.settings or {}).get("quiet_days")
        self.quiet_days = int(quiet) if quiet else None
        # Peeked (being composed or waiting for the claimer): not to be peeked again.
        self.peeked: set[int] = set()
        # Set once no further batch will be claimed (a budget ran out): the peeker stops.
        self.claiming_over = False
        # Letters may be handed over: the database answers and the lease is fresh.
        self.handing = asyncio.Event()
        self.handing.set()
        # Loop time the database stopped answering (None: it answers), and the database
        # steps under way with the loop time each was asked for.
        self.db_down_since: float | None = None
        self.db_pending: dict[object, float] = {}
        # The database stayed away past the outage window: nothing more can be written.
        self.db_gone = False
        # One re-reservation of stale slots at a time (see _repace).
        self.repacing = asyncio.Lock()
        # Hard bounces written to the database, and how many the last spike check saw.
        self.bounces_written = 0
        self.bounces_checked = 0
        # Set when a letter is held back because the lease looks short: the watcher renews it
        # at once (the run's clock may have jumped: a wait for a window, a laptop that slept).
        self.beat_now = asyncio.Event()

    def halt(self, reason: StopReason, error: MailerError | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.error = error
        self.stop.set()
        # Wakes the senders waiting for the gate: they give their letters back.
        self.handing.set()

    # ----- the database: one thread, and patience when it goes away
    #
    # Claims and results are written on one database thread (db_thread), so the event loop
    # keeps the SMTP sessions moving while SQLite works and syncs. Each of their statements is
    # one driver step (see outbox): every step gives up the GIL and must wait to get it back
    # from the busy loop, and per-row steps made a claim take 20 ms (see benchmarks/RESULTS.md,
    # Send).

    async def _on_db(self, call: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        token = object()
        self.db_pending[token] = loop.time()
        try:
            return await loop.run_in_executor(self.db_thread, call)
        finally:
            del self.db_pending[token]
            if self.db_down_since is None and not self._db_stalled():
                self._open_gate()

    def _db_stalled(self) -> bool:
        """A database step has waited longer than `policy.db_stall` (a lock held elsewhere, a
        connection that hangs): until it is through, nothing is handed over."""
        if not self.db_pending:
            return False
        oldest = min(self.db_pending.values())
        return asyncio.get_running_loop().time() - oldest > self.policy.db_stall

    async def _db(self, call: Callable[[], _T]) -> _T:
        return await self._patiently(lambda: self._on_db(call))

    async def _patiently(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """`make()` awaited until it succeeds; while the database cannot be reached, no letter
        is handed over and the attempt is repeated with backoff, for up to `policy.db_outage`
        seconds from the first failure (then DatabaseUnavailable)."""
        loop = asyncio.get_running_loop()
        pause = 0.1
        while True:
            try:
                result = await make()
            except Exception as exc:
                if self.db_gone or not _unreachable(exc):
                    raise
                now = loop.time()
                if self.db_down_since is None:
                    self.db_down_since = now
                    self.handing.clear()
                waited = now - self.db_down_since
                limit = self.policy.db_outage
                self.report.database_down = (waited, limit)
                if self.progress is not None:
                    self.progress(self.report)
                if waited >= limit:
                    self.db_gone = True
                    raise DatabaseUnavailable(
                        f"the database {_where(self.engine)} could not be reached for "
                        f"{limit:.0f} s ({_reason(exc)})"
                    ) from exc
                await asyncio.sleep(min(pause, limit - waited))
                pause = min(pause * 2, 5.0)
                continue
            if self.db_down_since is not None:
                self.db_down_since = None
                self.report.database_down = None
                self._open_gate()
            return result

    def _lease_fresh(self) -> bool:
        return self.clock() + self.policy.lease_margin < self.lease_until

    def _open_gate(self) -> None:
        if self.stop.is_set() or (
            self.db_down_since is None and not self._db_stalled() and self._lease_fresh()
        ):
            self.handing.set()
        else:
            self.handing.clear()

    # ----- peeker and claimer

    async def peeker(self, out: asyncio.Queue[_Peeked | None]) -> None:
        try:
            while not self.stop.is_set() and not self.claiming_over:
                skip = frozenset(self.peeked)
                # A read, on the loop: a hop to the database thread per batch costs more.
                rows = await self._patiently(
                    functools.partial(self._peek, self.batch_size, skip=skip)
                )
                if not rows:
                    if await self._wait_for_held():
                        continue
                    break
                if self.gate is not None:
                    # The timing hook: only letters due now (window open in the recipient's
                    # zone, follow-up delay passed, first letter not answered) go on to be
                    # composed and claimed; the gate holds (gives a due time, which the
                    # claim's own due check respects) or skips the others in the outbox. Here,
                    # before composing, so no work is spent on a letter that waits; a read (it
                    # writes only when it holds or skips) off the database thread, so claims
                    # and results never wait for it.
                    admitted = await self._patiently(
                        functools.partial(self._admit, self.gate, rows)
                    )
                    self.report.due -= len(rows) - len(admitted)
                    if len(admitted) < len(rows):
                        self.due.expect_retries()  # held letters now carry a date
                    rows = admitted
                    if not rows:
                        continue
                self.peeked.update(mid for mid, _ in rows)
                await out.put((rows, self.composing.submit([cid for _, cid in rows])))
        except Exception as exc:
            self.halt(StopReason.ERROR, _as_mailer_error(exc))
        finally:
            await out.put(None)

    async def _peek(self, n: int, *, skip: frozenset[int]) -> list[tuple[int, int]]:
        return self.due.peek(n, skip=skip, now=self.clock())

    async def _admit(
        self, gate: timing.Gate, rows: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        return await asyncio.to_thread(gate.admit, rows, now=self.clock())

    async def _wait_for_held(self) -> bool:
        """`--wait`: nothing is due now but letters are held for later (a window, a follow-up's
        delay): once what is under way is settled, say what is waited for and sleep until it on
        the run's clock. False: nothing to wait for (or not asked to), the run ends."""
        gate = self.gate
        if gate is None or not gate.rules.wait:
            return False
        while (self.peeked or self.outstanding or self.unwritten) and not self.stop.is_set():
            await asyncio.sleep(0.01)
        if self.stop.is_set():
            return False
        waiting = await self._db(functools.partial(gate.next_due, now=self.clock()))
        if waiting is None:
            return False
        gate.notify(waiting)
        sleeping = asyncio.ensure_future(self.sleep(waiting.at))
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sleeping, stopping):
            task.cancel()
        self.due.expect_retries()
        return not self.stop.is_set()

    def _drop(self, item: _Peeked) -> None:
        rows, future = item
        future.cancel()
        self.peeked.difference_update(mid for mid, _ in rows)

    async def _composed(self, future: asyncio.Future[Batch], contact_ids: list[int]) -> Batch:
        first = True

        def attempt() -> Awaitable[Batch]:
            nonlocal first
            if first:
                first = False
                return self.composing.result(future, contact_ids)
            return self.composing.here(contact_ids)

        return await self._patiently(attempt)

    async def _claim(self, rows: list[tuple[int, int]], batch: Batch) -> list[_Job]:
        """Claims the batch, and records the results that came in since the last commit in the
        same transaction: one commit (one fsync on SQLite) for both."""
        ids = [mid for mid, _ in rows]
        # Sending windows and follow-ups were judged before composing (peeker, Gate.admit): a
        # held letter carries its due time, which the claim's own due check respects, so it
        # is neither claimed nor counted against the cap or the pace. Checks that need the
        # database at the claim's moment (suppressions, quiet days, the cap) are outbox.claim's.
        try:
            self.journal.claiming(ids)
        except OSError as exc:
            raise MailerError(
                f"cannot write the handover journal {self.journal.path}: {exc.strerror}; "
                "nothing more is sent"
            ) from None
        results, self.unrecorded = self.unrecorded, []
        try:
            claimed = await self._db(functools.partial(self._claim_and_record, ids, results))
        except BaseException:
            # Not written: the recorder tries them again.
            self.unrecorded[:0] = results
            raise
        self.unwritten -= len(results)
        self.report.suppressed += claimed.skipped
        self.report.skipped += claimed.quiet
        if claimed.capped:
            self._end_of_budget(StopReason.DAILY_CAP)
        jobs = []
        loop_now, wall_now = asyncio.get_running_loop().time(), self.clock()
        for index, claim in enumerate(claimed.claims):
            job = _Job(claim=claim)
            if claimed.pace_start is not None and self.pace:
                job.not_before = self._slot(claimed.pace_start, index, loop_now, wall_now)
            composed = batch.get(claim.contact_id, f"contact {claim.contact_id} no longer exists")
            if isinstance(composed, str):
                job.error = composed
            else:
                job.data = composed.data
                job.mail_from = composed.mail_from
                job.rcpt_to = (composed.rcpt_to,)
                job.smtputf8 = composed.smtputf8
                job.message_id = composed.message_id
                job.language = composed.language
                job.subject = composed.subject
                job.body_hash = composed.body_hash
                job.fell_back = composed.fell_back
            jobs.append(job)
        return jobs

    def _slot(
        self, start: dt.datetime, index: int, loop_now: float, wall_now: dt.datetime
    ) -> float:
        """The loop time the `index`-th letter of a reservation starting at `start` may leave:
        its slot on the campaign's pace, and never sooner than `index` gaps after now (a
        reservation that began in the past -- the claim waited for a lock -- must not leave in
        a burst)."""
        assert self.pace
        gap = 1.0 / self.pace
        at = (start - wall_now).total_seconds() + index * gap
        return loop_now + max(at, index * gap)

    async def _repace(self) -> None:
        """Letters whose slots passed while this process could not send them (it was starved
        of CPU, or waited for the database) take new slots at the end of the campaign's pace:
        sent at once, they would come in a burst on top of the other senders' letters."""
        assert self.pace
        async with self.repacing:
            loop = asyncio.get_running_loop()
            slack = 1.0 / self.pace + 0.25
            late = sorted(
                (
                    job
                    for job in self.outstanding.values()
                    if not job.handed and job.not_before and loop.time() - job.not_before > slack
                ),
                key=lambda job: job.not_before,
            )
            if not late:
                return
            now = self.clock()
            start = await self._db(
                functools.partial(
                    outbox.reserve_pace,
                    self.engine,
                    campaign_id=self.campaign.id,
                    count=len(late),
                    rate=self.pace,
                    now=now,
                )
            )
            loop_now, wall_now = loop.time(), self.clock()
            for index, job in enumerate(late):
                job.not_before = self._slot(start, index, loop_now, wall_now)

    def _claim_and_record(self, ids: list[int], results: list[outbox.Result]) -> outbox.Claimed:
        claimed = outbox.claim(
            self.engine,
            campaign_id=self.campaign.id,
            ids=ids,
            sender_id=self.me.id,
            now=self.clock(),
            results=results,
            actor=self.actor,
            daily_cap=self.daily_cap,
            pace=self.pace,
            quiet_days=self.quiet_days,
        )
        self._written(results)
        return claimed

    def _record(self, results: list[outbox.Result]) -> None:
        outbox.record(
            self.engine,
            campaign_id=self.campaign.id,
            results=results,
            now=self.clock(),
            sender_id=self.me.id,
            actor=self.actor,
        )
        self._written(results)

    def _written(self, results: Sequence[outbox.Result]) -> None:
        self.bounces_written += sum(
            1 for r in results if isinstance(r, outbox.Attempted) and r.state.hard_bounce
        )

    async def claimer(
        self, inbox: asyncio.Queue[_Peeked | None], out: asyncio.Queue[list[_Job] | None]
    ) -> None:
        try:
            while (item := await inbox.get()) is not None:
                if self.stop.is_set() or self.claiming_over:
                    self._drop(item)
                    continue
                rows, future = item
                if self.budget is not None:
                    n = min(len(rows), self.budget - self.report.claimed)
                    if n <= 0:
                        self._drop(item)
                        self._end_of_budget(self.budget_reason)
                        continue
                    rows = rows[:n]
                try:
                    batch = await self._composed(future, [cid for _, cid in rows])
                except Exception as exc:
                    self._drop(item)
                    self.halt(StopReason.ERROR, _as_mailer_error(exc))
                    continue
                await self.ahead.acquire()
                if self.stop.is_set():
                    self.ahead.release()
                    self._drop(item)
                    continue
                try:
                    jobs = await self._claim(rows, batch)
                finally:
                    self._drop(item)
                if not jobs:
                    # Another sender claimed them since they were peeked (or they were skipped).
                    self.ahead.release()
                    continue
                self.report.claimed += len(jobs)
                self.outstanding.update((job.claim.id, job) for job in jobs)
                if self.budget is not None and self.report.claimed >= self.budget:
                    self._end_of_budget(self.budget_reason)
                await out.put(jobs)
        except Exception as exc:  # a database failure must still release what was claimed
            self.halt(StopReason.ERROR, _as_mailer_error(exc))
            # Let the peeker finish: it waits on this queue.
            while (item := await inbox.get()) is not None:
                self._drop(item)
        finally:
            await out.put(None)

    def _end_of_budget(self, reason: StopReason | None) -> None:
        # A budget ends claiming only; what is in flight still goes out.
        self.claiming_over = True
        try:
            left = self.due.any(now=self.clock())
        except SQLAlchemyError:
            left = True  # cannot tell now: say why claiming stopped
        if self.stop_reason is None and left:
            self.stop_reason = reason or StopReason.LIMIT

    # ----- feeder: claimed batches to the senders, one message at a time

    async def feeder(
        self,
        inbox: asyncio.Queue[list[_Job] | None],
        out: asyncio.Queue[_Job | None],
        results: asyncio.Queue[_Result | None],
    ) -> None:
        try:
            while (jobs := await inbox.get()) is not None:
                try:
                    for job in jobs:
                        if self.stop.is_set() or job.error is not None:
                            self._emit(results, _Result(job=job, outcome=None))
                        else:
                            await out.put(job)
                finally:
                    self.ahead.release()
        finally:
            for _ in range(self.sender_tasks):
                await out.put(None)

    # ----- senders

    def _may_go(self, job: _Job) -> bool:
        """Whether this letter may be handed over now (asked once more, at the last moment,
        by the transport when a connection is free)."""
        if self.gate is not None and job.held_until is None:
            # Its window may have closed while it waited for the connection.
            job.held_until = self.gate.closed(job.claim.id, now=self.clock())
        return (
            not self.stop.is_set()
            and job.suppressed is None
            and job.held_until is None
            and self.handing.is_set()
            and self._lease_fresh()
            and not self._db_stalled()
        )

    async def _gate(self, job: _Job) -> bool:
        """Waits until the letter may be handed over; False if it never will be (the run
        stops, or its address was suppressed meanwhile)."""
        while True:
            if self.stop.is_set() or job.suppressed is not None:
                return False
            if self.handing.is_set() and self._lease_fresh() and not self._db_stalled():
                return True
            if self.handing.is_set():
                # The lease ran short (the heartbeat could not renew it, or the run's clock
                # jumped) or the database is stuck on a step: wait for it.
                self.handing.clear()
            if not self._lease_fresh():
                self.beat_now.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.handing.wait(), timeout=self.policy.suppression_poll)

    async def _until(self, when: float) -> None:
        delay = when - asyncio.get_running_loop().time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay)

    def _hand(self, job: _Job) -> None:
        # The message itself is leaving: from here on a send cut short is uncertain, and the
        # journal says so before the first byte of it is written.
        try:
            self.journal.handing(job.claim.id)
        except OSError as exc:
            self.halt(
                StopReason.ERROR,
                MailerError(
                    f"cannot write the handover journal {self.journal.path}: {exc.strerror}; "
                    "nothing more is sent"
                ),
            )
            raise _JournalBroken(str(exc)) from None
        job.handed = True
        # The same moment on the run's clock is its delivery time (`sent_at`).
        job.handed_at = self.clock()

    async def sender(
        self, inbox: asyncio.Queue[_Job | None], results: asyncio.Queue[_Result | None]
    ) -> None:
        while (job := await inbox.get()) is not None:
            outcome = await self._send_one(job)
            if outcome is None:
                # Never handed over: back to the queue (or skipped, if suppressed meanwhile).
                job.handed = False
                self._emit(results, _Result(job=job, outcome=None))
                continue
            # The database gets the answer anyway; only a crash would miss it.
            with contextlib.suppress(OSError):
                self.journal.outcome(job.claim.id, outcome, _letter(job))
            self._watch(job, outcome)
            self._emit(results, _Result(job=job, outcome=outcome))

    def _stale(self, job: _Job) -> bool:
        """Its slot on the pace passed well before it could leave (see _repace)."""
        if not job.not_before or not self.pace:
            return False
        late = asyncio.get_running_loop().time() - job.not_before
        return late > 1.0 / self.pace + 0.25

    async def _send_one(self, job: _Job) -> Outcome | None:
        if self.bucket is not None and not self.stop.is_set():
            await self.bucket.acquire()
        while True:
            if job.not_before:
                await self._until(job.not_before)
                if self._stale(job) and not self.stop.is_set():
                    await self._repace()
                    continue
            if not await self._gate(job):
                return None
            if self._stale(job):
                # The gate was shut (the database went away) long enough for its slot to pass.
                await self._repace()
                continue
            if self.gate is not None:
                job.held_until = self.gate.closed(job.claim.id, now=self.clock())
                if job.held_until is not None:
                    # Its window closed while it waited: back to the queue until the next.
                    return None
            self.inflight.add(job.claim.id)
            try:
                outcome = await self.transport.send(
                    mail_from=job.mail_from,
                    rcpt_to=job.rcpt_to,
                    data=job.data,
                    smtputf8=job.smtputf8,
                    ref=job.message_id,
                    go=functools.partial(self._may_go, job),
                    on_payload=functools.partial(self._hand, job),
                )
            except _JournalBroken:
                # Stopped before the payload was written: nothing of it left.
                return None
            except TransportError as exc:
                # Systemic (the server went away, refused the login on reconnect): this message
                # never reached a server, so it goes back to the queue like the rest.
                self.halt(StopReason.SYSTEMIC, exc)
                return None
            except Exception as exc:
                # A fault of our own mid-send: the bytes may be out, so never re-send on our own.
                job.handed = True
                self.halt(StopReason.ERROR, _as_mailer_error(exc))
                return Outcome(
                    kind=OutcomeKind.UNCERTAIN,
                    code=None,
                    reply=f"internal error while sending: {type(exc).__name__}: {exc}",
                    via=self.transport.via,
                )
            finally:
                self.inflight.discard(job.claim.id)
            if outcome is not None or job.held_until is not None:
                return outcome
            # Not handed over: it waited for a connection while the gate closed (the database
            # went away, the lease ran short, its address was suppressed) or the run stopped.

    def _watch(self, job: _Job, outcome: Outcome) -> None:
        failed = outcome.kind is not OutcomeKind.ACCEPTED
        self.window.append(failed)
        if outcome.kind is OutcomeKind.PERMANENT:
            key = (outcome.code, outcome.reply)
            if key != self.streak_key:
                self.streak_key, self.streak = key, []
            self.streak.append(job.claim.id)
            if len(self.streak) >= self.policy.systemic_streak:
                self.halt(
                    StopReason.SYSTEMIC,
                    TransportError(
                        f"{outcome.via} refused {len(self.streak)} recipients in a row with the "
                        f"same answer ({outcome.code} {outcome.reply}): that is the server, not "
                        f"the list; stopped, the rest of campaign {self.campaign.slug} stays queued"
                    ),
                )
        else:
            self.streak_key, self.streak = None, []
        if (
            len(self.window) == self.policy.error_window
            and sum(self.window) > self.policy.error_ratio * self.policy.error_window
        ):
            self.halt(StopReason.PAUSED)

    # ----- recorder

    def _settle(self, result: _Result, now: dt.datetime) -> outbox.Result:
        """What a result makes of its message (policy.next_state), counted in the report."""
        report = self.report
        job, outcome = result.job, result.outcome
        if outcome is None and job.error is None:
            if job.suppressed is not None:
                report.suppressed += 1
                return outbox.Skipped(claim=job.claim, reason=job.suppressed)
            # Never handed to the transport: back to the queue, the attempt not counted (held
            # until its next window when its window closed while it waited).
            report.released += 1
            return outbox.Released(
                claim=job.claim,
                reason="its sending window closed"
                if job.held_until is not None
                else str(self.stop_reason or "stopped"),
                message_id=job.message_id,
                language=job.language,
                subject=job.subject,
                body_hash=job.body_hash,
                due_at=job.held_until,
            )
        if outcome is None:
            report.build_errors += 1
            return outbox.Unbuildable(claim=job.claim, error=str(job.error))
        if job.fell_back:
            report.fell_back += 1
        state = next_state(outcome, attempts=job.claim.attempts, policy=self.policy, now=now)
        if state.status is MessageStatus.SENT:
            report.sent += 1
        elif state.status is MessageStatus.RETRY:
            report.deferred += 1
            self.due.expect_retries()
        elif state.status is MessageStatus.UNCERTAIN:
            report.uncertain += 1
        else:
            report.failed += 1
            report.hard_bounces += int(state.hard_bounce)
        return outbox.Attempted(
            claim=job.claim,
            state=state,
            code=outcome.code,
            reply=outcome.reply,
            via=outcome.via,
            message_id=job.message_id,
            language=job.language,
            subject=job.subject,
            body_hash=job.body_hash,
            handed_at=job.handed_at,
        )

    async def recorder(self, inbox: asyncio.Queue[_Result | None]) -> None:
        # Results reach the database with the next claim, in its transaction (one commit for
        # both), or here once `record_every` have gathered or `record_interval` has passed.
        loop = asyncio.get_running_loop()
        last = loop.time()
        finished = False
        writing = True
        while not finished:
            item = await inbox.get()
            if item is None:
                finished = True
            elif item is not _TICK:
                self.unrecorded.append(self._settle(item, self.clock()))
            due = loop.time() - last >= self.policy.record_interval
            if (
                writing
                and self.unrecorded
                and (finished or due or len(self.unrecorded) >= self.policy.record_every)
            ):
                batch, self.unrecorded = self.unrecorded, []
                try:
                    await self._db(functools.partial(self._record, batch))
                except Exception as exc:
                    # Kept in memory and in the journal: the next run on this machine records
                    # them (see journal.py). Nothing more is handed over.
                    self.unrecorded[:0] = batch
                    writing = False
                    self.halt(StopReason.ERROR, _as_mailer_error(exc))
                else:
                    self.unwritten -= len(batch)
            if finished or due:
                last = loop.time()
                if self.progress is not None:
                    self.progress(self.report)

    def _emit(self, results: asyncio.Queue[_Result | None], result: _Result) -> None:
        # Off the outstanding list the moment its result exists, so a cancelled run never
        # records a message twice.
        self.outstanding.pop(result.job.claim.id, None)
        if self.gate is not None:
            self.gate.forget(result.job.claim.id)
        self.unwritten += 1
        results.put_nowait(result)

    async def ticker(self, inbox: asyncio.Queue[_Result | None]) -> None:
        # Wakes the recorder so a slow trickle of results is still committed within the interval.
        while True:
            await asyncio.sleep(self.policy.record_interval)
            await inbox.put(_TICK)

    # ----- the watcher: heartbeat, suppressions, bounce spike

    async def watcher(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.policy.heartbeat
        next_spike = loop.time()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.beat_now.wait(), timeout=self.policy.suppression_poll
                    )
                if self.db_gone:
                    return
                self._open_gate()
                if self.beat_now.is_set() or loop.time() >= next_beat:
                    self.beat_now.clear()
                    next_beat = loop.time() + self.policy.heartbeat
                    await self._heartbeat()
                await self._check_suppressions()
                if self.bounces_written > self.bounces_checked and loop.time() >= next_spike:
                    next_spike = loop.time() + self.policy.spike_check
                    await self._check_spike()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.halt(StopReason.ERROR, _as_mailer_error(exc))

    async def _heartbeat(self) -> None:
        now = self.clock()
        alive = await self._db(
            functools.partial(
                senders.renew,
                self.engine,
                sender_id=self.me.id,
                now=now,
                lease=self.policy.lease,
                holding=len(self.outstanding),
                sent=self.report.sent,
            )
        )
        if not alive:
            raise ClaimsLost(
                "another sender declared this one gone (its lease had expired) and settled the "
                "letters it held; nothing more is sent"
            )
        self.lease_until = now + self.policy.lease
        self._open_gate()

    async def _check_suppressions(self) -> None:
        waiting = {
            job.claim.contact_id: job
            for job in list(self.outstanding.values())
            if not job.handed and job.suppressed is None and job.error is None
        }
        if not waiting:
            return
        found = await self._db(
            functools.partial(outbox.suppressed_contacts, self.engine, sorted(waiting))
        )
        for contact_id, reason in found.items():
            job = waiting[contact_id]
            if not job.handed:
                job.suppressed = f"{reason}; found before it was handed over"

    async def _check_spike(self) -> None:
        seen = self.bounces_written
        spike = await self._db(
            functools.partial(
                outbox.pause_on_bounce_spike,
                self.engine,
                campaign_id=self.campaign.id,
                now=self.clock(),
            )
        )
        self.bounces_checked = seen
        if spike is not None:
            self.report.spike = spike
            self.halt(StopReason.BOUNCE_SPIKE)

    # ----- the team's word: pause, resume and cancel reach every sender

    async def watch_campaign(self) -> None:
        """Every `policy.state_poll` seconds, the campaign's state in the database: paused or
        cancelled by anyone (or held by a bounce spike) stops this run like Ctrl-C does --
        what is on the wire finishes, the rest goes back to the queue."""
        while not self.stop.is_set():
            try:
                state = await asyncio.to_thread(
                    outbox.campaign_state, self.engine, campaign_id=self.campaign.id
                )
            except SQLAlchemyError:
                # A read that failed says nothing about the campaign; the next poll asks again
                # (an outage itself is the other watcher's and the writers' business).
                state = None
            if state is not None and state.halt_reason is not None:
                self.report.halted_by = state.halt_reason
                if state.held:
                    # Held by a bounce spike (this run's or another's): the report says how to
                    # acknowledge it.
                    self.report.spike = self.report.spike or state.pause_reason
                self.halt(StopReason.HELD)
                return
            await asyncio.sleep(self.policy.state_poll)

    # ----- the whole

    async def run(self) -> None:
        # Composed batches waiting for their claim: deep enough to keep the composer busy while
        # the senders work, and costing nothing after a crash (nothing in it is claimed).
        peeked: asyncio.Queue[_Peeked | None] = asyncio.Queue(maxsize=2)
        claimed: asyncio.Queue[list[_Job] | None] = asyncio.Queue(maxsize=1)
        built: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=max(8, 2 * self.sender_tasks))
        results: asyncio.Queue[_Result | None] = asyncio.Queue()
        recorder = asyncio.create_task(self.recorder(results))
        ticker = asyncio.create_task(self.ticker(results))
        watcher = asyncio.create_task(self.watcher())
        team = asyncio.create_task(self.watch_campaign())
        senders_ = [
            asyncio.create_task(self.sender(built, results)) for _ in range(self.sender_tasks)
        ]
        tasks = [
            asyncio.create_task(self.peeker(peeked)),
            asyncio.create_task(self.claimer(peeked, claimed)),
            asyncio.create_task(self.feeder(claimed, built, results)),
            *senders_,
        ]
        try:
            await self._until_stopped_then_grace(tasks, results)
        finally:
            ticker.cancel()
            watcher.cancel()
            team.cancel()
            await asyncio.gather(ticker, watcher, team, return_exceptions=True)
            await results.put(None)
            await recorder

    async def _until_stopped_then_grace(
        self, tasks: list[asyncio.Task[None]], results: asyncio.Queue[_Result | None]
    ) -> None:
        pipeline: asyncio.Future[Any] = asyncio.gather(*tasks)
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({pipeline, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not pipeline.done():
            # In-flight sends may finish (a second Ctrl-C cuts the wait short).
            hurry: asyncio.Future[Any] = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait(
                {pipeline, hurry}, timeout=self.policy.grace, return_when=asyncio.FIRST_COMPLETED
            )
            hurry.cancel()
        if not pipeline.done():
            for task in tasks:
                task.cancel()
        try:
            await pipeline
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.halt(StopReason.ERROR, _as_mailer_error(exc))
        # Whatever happened above, no task of this run may outlive it.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Normally empty. After a cancelled or failed pipeline: sends that may have reached the
        # server are uncertain; claims that never left this process go back to the queue.
        for job in list(self.outstanding.values()):
            outcome = None
            if job.handed:
                outcome = Outcome(
                    kind=OutcomeKind.UNCERTAIN,
                    code=None,
                    reply="still being sent when the run was stopped",
                    via=self.transport.via,
                )
            self._emit(results, _Result(job=job, outcome=outcome))

    @property
    def all_written(self) -> bool:
        return not self.db_gone and not self.unrecorded and not self.outstanding


def _letter(job: _Job) -> journal.Letter:
    return journal.Letter(
        message_id=job.message_id,
        language=job.language,
        subject=job.subject,
        body_hash=job.body_hash,
        handed_at=job.handed_at,
    )


def _where(engine: Engine) -> str:
    from mailer.db import redact_url

    return redact_url(str(engine.url))


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return " ".join(str(orig).split())[:200] or type(orig).__name__


def _as_mailer_error(exc: BaseException) -> MailerError:
    if isinstance(exc, MailerError):
        return exc
    if isinstance(exc, SQLAlchemyError):
        return DatabaseError(f"database error while sending: {_reason(exc)}")
    return MailerError(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- gone senders


def _settle_gone_senders(
    *,
    engine: Engine,
    campaign_id: int,
    me: senders.SenderIdentity,
    now: dt.datetime,
    policy: SendPolicy,
    report: SendReport,
) -> None:
    """The claims of senders that are gone (senders.gone): a claim its sender's journal shows
    never handed over goes back to the queue, one it shows answered gets that answer, and any
    other -- handed over without an answer, or a sender whose journal cannot be read here --
    becomes `uncertain`. A live sender's claims are never touched."""
    for holder in senders.holders(engine, campaign_id=campaign_id):
        if holder.id == me.id:
            continue
        gone = senders.gone(holder, now=now)
        if gone is None:
            continue
        claims = outbox.claims_held_by(engine, campaign_id=campaign_id, holder=holder.id)
        taken = (
            journal.take_abandoned(holder.journal, sender_id=holder.id, boot=holder.boot)
            if holder.id is not None
            else None
        )
        try:
            results: list[outbox.Result] = []
            counts = collections.Counter[str]()
            for claim in claims:
                result = _recovered(claim, holder, gone, taken, now=now, policy=policy)
                counts[type(result).__name__] += 1
                if isinstance(result, outbox.Attempted) and result.state.status in (
                    MessageStatus.UNCERTAIN,
                ):
                    counts["uncertain"] += 1
                results.append(result)
            settled = outbox.settle_for_gone(
                engine,
                campaign_id=campaign_id,
                holder=holder.id,
                results=results,
                now=now,
                actor=me.label,
                why=gone.why,
                lease_expired=gone.by_lease,
            )
            if settled is None:
                continue  # it renewed its lease meanwhile: it lives
            if taken is not None:
                taken.remove()
            report.recovered += counts["uncertain"]
            report.recovered_requeued += counts["Released"]
            report.recovered_known += counts["Attempted"] - counts["uncertain"]
        finally:
            if taken is not None:
                taken.release()


def _recovered(
    claim: Claim,
    holder: senders.Holder,
    gone: senders.Gone,
    taken: journal.Abandoned | None,
    *,
    now: dt.datetime,
    policy: SendPolicy,
) -> outbox.Result:
    who = holder.name
    if taken is not None:
        known = taken.trail.outcomes.get(claim.id)
        if known is not None:
            state = next_state(known.outcome, attempts=claim.attempts, policy=policy, now=now)
            return outbox.Attempted(
                claim=claim,
                state=state,
                code=known.outcome.code,
                reply=known.outcome.reply,
                via=known.outcome.via,
                message_id=known.letter.message_id,
                language=known.letter.language,
                subject=known.letter.subject,
                body_hash=known.letter.body_hash,
                handed_at=known.letter.handed_at,
            )
        if claim.id not in taken.trail.handed:
            return outbox.Released(claim=claim, reason=f"{who} stopped before handing it over")
        detail = (
            f"handed over by {who}, which stopped before the server answered ({gone.why}): "
            "it may or may not have been delivered; `mailer retry --uncertain` re-sends"
        )
    else:
        detail = (
            f"found in `sending` left by {who} ({gone.why}): it may or may not have been "
            "delivered; `mailer retry --uncertain` re-sends"
        )
    state = next_state(
        Outcome(kind=OutcomeKind.UNCERTAIN, code=None, reply=detail, via=""),
        attempts=claim.attempts,
        policy=policy,
        now=now,
    )
    return outbox.Attempted(
        claim=claim,
        state=state,
        code=None,
        reply="the sender stopped while this message was being sent",
        via=None,
        message_id=None,
        language=None,
        subject=None,
        body_hash=None,
    )


# --------------------------------------------------------------------------- public API


def plan_send(*, workspace: Workspace, engine: Engine, slug: str) -> SendPlan:
    """Recipients, sender and a sample subject, for the confirmation before a send."""
    with Session(engine) as session:
        campaign = campaigns.get_campaign(session, slug)
        audience = audience_mod.Audience.from_json(campaign.audience)
        size = audience_mod.count(session, audience)
        first = next(audience_mod.contact_id_pages(session, audience, size=1), [])
        subject = to = None
        if first:
            recipients = compose.load_recipients(session, first, campaign_id=campaign.id)
            template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
            composer = compose.composer_for(
                campaign=campaign, template_set=template_set, settings=workspace
            )
            if recipients:
                try:
                    composed = composer.compose(next(iter(recipients.values())))
                    subject, to = composed.subject, composed.rcpt_to
                except MailerError as exc:
                    subject = f"(cannot render: {exc})"
    totals = outbox.status_counts(engine, campaign_id=campaign.id)
    pending = totals[MessageStatus.QUEUED.value] + totals[MessageStatus.RETRY.value]
    return SendPlan(
        campaign=slug,
        from_address=campaign.from_address,
        audience=size,
        pending=pending + max(0, size - sum(totals.values())),
        sample_subject=subject,
        sample_to=to,
    )


def send_campaign(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    transport: Transport,
    concurrency: int = 4,
    rate: float | None = None,
    daily_cap: int | None = None,
    limit: int | None = None,
    test_to: str | None = None,
    progress: Progress | None = None,
    clock: Clock = utcnow,
    policy: SendPolicy | None = None,
    handle_signals: bool = False,
    bucket: RateLimiter | None = None,
    timing_options: timing.RunTiming | None = None,
    sleep: Sleeper | None = None,
) -> SendReport:
    """Deliver a campaign (see the module docstring). Raises TransportError on a systemic failure
    and SendPaused (an Interrupted) on SIGINT/SIGTERM, after recording everything; otherwise
    returns the report. Whether the campaign may be sent at all (cancelled, paused by someone,
    held by a bounce spike) is outbox.ensure_sendable's, asked by `send` before this.

    `rate` (letters per second) is the campaign's pace, shared with every other sender of it;
    `bucket` is a rate limit of this process only (a test send uses it). `timing_options`:
    sending windows, `--wait`, `--spread` (see timing.py; the campaign's stored windows apply
    without them). `sleep` waits on `clock` (a test's moves the clock)."""
    policy = policy or SendPolicy()
    if concurrency < 1:
        raise InvalidValueError("--concurrency must be at least 1")
    if limit is not None and limit < 1:
        raise InvalidValueError("--limit must be at least 1")
    if daily_cap is not None and daily_cap < 1:
        raise InvalidValueError("--daily-cap must be at least 1")
    if rate is not None and rate <= 0:
        raise InvalidValueError("--rate must be more than zero")
    if test_to is not None:
        if bucket is None and rate is not None:
            from mailer.transport import TokenBucket

            bucket = TokenBucket(rate=rate)
        return send_test(
            workspace=workspace,
            engine=engine,
            slug=slug,
            transport=transport,
            to=test_to,
            count=limit or 3,
            bucket=bucket,
        )
    try:
        return asyncio.run(
            _send_campaign(
                workspace=workspace,
                engine=engine,
                slug=slug,
                transport=transport,
                concurrency=concurrency,
                daily_cap=daily_cap,
                limit=limit,
                progress=progress,
                clock=clock,
                policy=policy,
                handle_signals=handle_signals,
                bucket=bucket,
                pace=rate,
                timing_options=timing_options,
                sleep=sleep or sleeper_for(clock),
            )
        )
    except SQLAlchemyError as exc:
        raise _as_mailer_error(exc) from exc


def _identity(transport: Transport, workspace: Workspace) -> senders.SenderIdentity:
    sender_id = senders.new_sender_id()
    settings = getattr(transport, "settings", None)
    return senders.SenderIdentity(
        id=sender_id,
        actor=Actor.current(),
        smtp_user=getattr(settings, "username", None),
        via=transport.via,
        boot=journal.boot_id(),
        journal=str(journal.journal_dir(workspace.root) / f"{sender_id}.journal"),
    )


async def _send_campaign(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    transport: Transport,
    concurrency: int,
    daily_cap: int | None,
    limit: int | None,
    progress: Progress | None,
    clock: Clock,
    policy: SendPolicy,
    handle_signals: bool,
    bucket: RateLimiter | None,
    pace: float | None,
    timing_options: timing.RunTiming | None,
    sleep: Sleeper,
) -> SendReport:
    me = _identity(transport, workspace)
    report = SendReport(campaign=slug, via=transport.via, run_id=me.id)
    started = asyncio.get_running_loop().time()
    campaign_id = await asyncio.to_thread(_campaign_id, engine, slug)
    signals = _Signals(asyncio.get_running_loop(), install=handle_signals)
    run: _Run | None = None
    worker: ComposeWorker | None = None
    try:
        jr = journal.Journal.create(
            journal.journal_dir(workspace.root), sender_id=me.id, boot=me.boot
        )
    except OSError as exc:
        signals.remove()
        raise MailerError(
            f"cannot write the handover journal in {journal.journal_dir(workspace.root)}: "
            f"{exc.strerror}; nothing was sent"
        ) from None
    now = clock()
    # Registered before anything else: from here on, others see this sender and its lease.
    lease_until = now + policy.lease
    registered = False
    try:
        await asyncio.to_thread(
            functools.partial(
                senders.register,
                engine,
                identity=me,
                campaign_id=campaign_id,
                now=now,
                lease=policy.lease,
                rate=pace,
            )
        )
        registered = True
        await asyncio.to_thread(
            functools.partial(
                _settle_gone_senders,
                engine=engine,
                campaign_id=campaign_id,
                me=me,
                now=now,
                policy=policy,
                report=report,
            )
        )
        # Journals left here by senders whose claims are all settled (by another machine, or
        # after a reboot) hold nothing of use any more.
        await asyncio.to_thread(
            functools.partial(
                journal.sweep,
                journal.journal_dir(workspace.root),
                settled=functools.partial(senders.settled, engine, now=now),
            )
        )
        campaign = await asyncio.to_thread(
            functools.partial(
                outbox.start_sending,
                engine,
                slug=slug,
                templates_dir=workspace.templates_dir,
                now=now,
            )
        )
        signals.check(report)
        report.newly_queued, report.skipped = await asyncio.to_thread(
            functools.partial(outbox.queue_audience, engine, campaign=campaign, now=now)
        )
        signals.check(report)
        # Windows, follow-up delays: letters held by an earlier run are judged again first.
        gate = await asyncio.to_thread(
            functools.partial(
                timing.open_gate,
                engine,
                campaign=campaign,
                run=timing_options,
                now=now,
                default_zone=workspace.setting("campaign", "default_zone"),
                daily_cap=daily_cap,
            )
        )
        if gate is not None and gate.rules.spread and daily_cap is not None:
            # `--spread`: the cap spread over the window, with jitter, never faster than
            # `--rate` (SpreadLimiter keeps to the slower of the two). It is this sender's
            # pace: the campaign's shared pace, which keeps no jitter and would see every slot
            # go stale behind a slower spread, is not used by this run.
            bucket = gate.limiter(daily_cap=daily_cap, rate=pace, clock=clock, sleep=sleep)
            pace = None
        totals = await asyncio.to_thread(
            functools.partial(outbox.status_counts, engine, campaign_id=campaign.id)
        )
        report.due = totals[MessageStatus.QUEUED.value] + totals[MessageStatus.RETRY.value]
        if gate is not None:
            report.due -= await asyncio.to_thread(
                functools.partial(timing.held_counts, engine, campaign_id=campaign.id, now=now)
            )
        if report.due >= policy.compose_worker_from:
            # Started first: it comes up (about a second) while the server is contacted, and
            # until it is ready this process composes.
            worker = await ComposeWorker.start(
                database_url=engine.url.render_as_string(hide_password=False),
                workspace=workspace,
                campaign_id=campaign.id,
            )
        held_back = gate is not None and gate.rules.wait
        if report.due or held_back:
            # Before anything is claimed: a wrong password or an unreachable server stops the
            # run with the whole list still `queued`. With nothing due, no server is needed.
            await transport.open()
        budget: int | None = None
        budget_reason: StopReason | None = None
        if limit is not None:
            budget, budget_reason = limit, StopReason.LIMIT
        if daily_cap is not None:
            # For the progress line only: the cap itself is taken in each claim (outbox.claim).
            sent_today, _ = await asyncio.to_thread(
                functools.partial(outbox.sent_in_window, engine, now=now)
            )
            report.due = min(report.due, max(0, daily_cap - sent_today))
        if budget is not None:
            report.due = min(report.due, budget)
        run = _Run(
            engine=engine,
            workspace=workspace,
            campaign=campaign,
            transport=transport,
            concurrency=concurrency,
            budget=budget,
            budget_reason=budget_reason,
            progress=progress,
            clock=clock,
            policy=policy,
            report=report,
            bucket=bucket,
            me=me,
            journal=jr,
            lease_until=lease_until,
            daily_cap=daily_cap,
            pace=pace,
            gate=gate,
            sleep=sleep,
        )
        if progress is not None:
            progress(report)
        run.composing.worker = worker
        signals.run = run
        if signals.count:
            run.halt(StopReason.INTERRUPTED)
        # The database thread gets the GIL back within half a millisecond of asking (the
        # default, 5 ms, is ten messages' worth of sending); restored after the run.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.0005))
        try:
            await run.run()
            if gate is not None:
                report.held = gate.held
                report.skipped += gate.skipped
            if not run.db_gone:
                await run._patiently(lambda: _finish(run, daily_cap=daily_cap))
        finally:
            sys.setswitchinterval(switch)
            run.db_thread.shutdown(wait=True)
    finally:
        signals.remove()
        await transport.close()
        if run is not None:
            await run.composing.close()
            report.composed_by_worker = run.composing.by_worker
        elif worker is not None:
            await worker.close()
        done = run is not None and run.all_written
        if registered and (run is None or done):
            # Everything this sender held is in the database: it is over, and its journal too.
            why = str(run.stop_reason or "finished") if run is not None else "did not start"
            try:
                await asyncio.to_thread(
                    functools.partial(
                        senders.stop,
                        engine,
                        sender_id=me.id,
                        now=clock(),
                        reason=why,
                        sent=report.sent,
                    )
                )
            except SQLAlchemyError:
                done = False
        jr.close(remove=(registered and (run is None or done)) or not registered)
    assert run is not None
    elapsed = asyncio.get_running_loop().time() - started
    report.rate = report.done / elapsed if elapsed > 0 else 0.0
    report.stopped = run.stop_reason
    if run.db_gone:
        kept = len(run.unrecorded) + len(run.outstanding)
        raise DatabaseUnavailable(
            f"{run.error or 'the database could not be reached'}; campaign {slug}: "
            f"{report.sent} sent this run; nothing more was handed over, and the "
            f"{kept} answer(s) and claim(s) not yet recorded are kept in {jr.path}: run "
            f"`mailer send {slug}` again on this machine once the database is back to record them"
        )
    if run.error is not None:
        if run.stop_reason is StopReason.SYSTEMIC:
            kind = type(run.error) if isinstance(run.error, TransportError) else TransportError
            raise kind(
                f"{run.error} (campaign {slug}: {report.sent} sent this run, "
                f"{report.totals.get('queued', 0)} queued)"
            )
        raise run.error
    if run.stop_reason is StopReason.INTERRUPTED:
        raise SendPaused(report)
    return report


async def _finish(run: _Run, *, daily_cap: int | None) -> None:
    """After the pipeline: what the run's end writes and reads (retried while the database is
    away, like every other step)."""
    report, engine, campaign_id, clock = run.report, run.engine, run.campaign.id, run.clock
    if run.stop_reason is StopReason.SYSTEMIC and run.streak:
        report.failed -= await run._on_db(
            functools.partial(
                outbox.requeue_streak, engine, campaign_id=campaign_id, ids=run.streak, now=clock()
            )
        )
        run.streak = []
    if run.stop_reason is StopReason.DAILY_CAP and daily_cap is not None:
        report.resume_at = await run._on_db(
            functools.partial(outbox.cap_resume_at, engine, now=clock(), cap=daily_cap)
        )
    if run.bounces_written > run.bounces_checked:
        # The last hard bounces of the run count toward the spike as well.
        await run._check_spike()
    if run.gate is not None:
        report.next_due = await run._on_db(functools.partial(run.gate.next_due, now=clock()))
    if run.all_written:
        report.released += await run._on_db(
            functools.partial(
                outbox.release_unhanded,
                engine,
                campaign_id=campaign_id,
                sender_id=run.me.id,
                now=clock(),
                actor=run.actor,
            )
        )
    report.totals = await run._on_db(
        functools.partial(
            outbox.finish_sending,
            engine,
            campaign_id=campaign_id,
            paused=run.stop_reason in (StopReason.PAUSED, StopReason.INTERRUPTED),
            now=clock(),
        )
    )
    report.live_senders = await run._on_db(
        functools.partial(
            senders.live_others, engine, campaign_id=campaign_id, me=run.me.id, now=clock()
        )
    )


class _Signals:
    """SIGINT/SIGTERM: the first stops claiming and lets in-flight sends finish; the second stops
    waiting for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, install: bool) -> None:
        self.loop = loop
        self.count = 0
        self.run: _Run | None = None
        self.installed: list[int] = []
        if install:
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(signum, self.on_signal)
                    self.installed.append(signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass

    def on_signal(self) -> None:
        self.count += 1
        if self.run is not None:
            self.run.halt(StopReason.INTERRUPTED)
            if self.count > 1:
                self.run.hurry.set()

    def check(self, report: SendReport) -> None:
        if self.count:
            # Nothing was claimed yet: the report says so (0 sent this run).
            report.stopped = StopReason.INTERRUPTED
            raise SendPaused(report)

    def remove(self) -> None:
        for signum in self.installed:
            self.loop.remove_signal_handler(signum)
        self.installed = []


def send_test(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    transport: Transport,
    to: str,
    count: int = 3,
    bucket: RateLimiter | None = None,
) -> SendReport:
    """Real renderings of the first recipients, marked as tests, to one address; nothing recorded."""
    problem = address_problem(to.strip())
    if problem is not None:
        raise InvalidValueError(f"--test-to {to!r} is not a valid address: {problem}")
    to = to.strip()
    report = SendReport(
        campaign=slug, via=transport.via, run_id=senders.new_sender_id(), test_to=to
    )
    # What goes out: envelope sender, envelope recipient, the bytes, and whether SMTPUTF8.
    jobs: list[tuple[str, str, bytes, bool]] = []
    with Session(engine) as session:
        campaign = campaigns.get_campaign(session, slug)
        audience = audience_mod.Audience.from_json(campaign.audience)
        template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
        composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=workspace
        )
        picked: list[int] = []
        for chunk in audience_mod.contact_id_pages(session, audience, size=200):
            emails = outbox.contact_emails(session, chunk)
            blocked = audience_mod.suppressed_among(session, emails.values())
            picked.extend(i for i in chunk if emails.get(i) not in blocked)
            if len(picked) >= count:
                break
        recipients = compose.load_recipients(session, picked[:count], campaign_id=campaign.id)
        for cid in picked[:count]:
            recipient = recipients.get(cid)
            if recipient is None:
                continue
            try:
                composed = composer.compose(recipient, to_override=to, test=True)
            except MailerError as exc:
                report.build_errors += 1
                report.errors.append(f"contact {cid}: {exc}")
                continue
            jobs.append(
                (composed.mail_from, composed.rcpt_to, composed.data, bool(composed.smtputf8))
            )
    report.due = len(jobs)

    async def go() -> None:
        await transport.open()
        try:
            for mail_from, rcpt_to, data, smtputf8 in jobs:
                if bucket is not None:
                    await bucket.acquire()
                outcome = await transport.send(
                    mail_from=mail_from, rcpt_to=(rcpt_to,), data=data, smtputf8=smtputf8, ref=None
                )
                assert outcome is not None  # sent without a `go` check
                if outcome.kind is OutcomeKind.ACCEPTED:
                    report.sent += 1
                else:
                    report.failed += 1
                    report.errors.append(f"{outcome.code or ''} {outcome.reply}".strip())
        finally:
            await transport.close()

    asyncio.run(go())
    return report


def dry_run(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    limit: int | None = None,
    progress: Progress | None = None,
) -> SendReport:
    """Render and build every message that a send would send; send nothing, change nothing."""
    transport = DryRun()
    report = SendReport(
        campaign=slug, via=transport.via, run_id=senders.new_sender_id(), dry_run=True
    )
    with Session(engine) as session:
        campaign = campaigns.get_campaign(session, slug)
        ids = audience_mod.contact_ids(session, audience_mod.Audience.from_json(campaign.audience))
        final = outbox.settled_contacts(session, campaign_id=campaign.id)
        template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
        composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=workspace
        )
        todo = [i for i in ids if i not in final]
        if limit is not None:
            todo = todo[:limit]
        report.due = len(todo)
        for start in range(0, len(todo), 200):
            chunk = todo[start : start + 200]
            emails = outbox.contact_emails(session, chunk)
            blocked = audience_mod.suppressed_among(session, emails.values())
            recipients = compose.load_recipients(
                session,
                [i for i in chunk if emails.get(i) not in blocked],
                campaign_id=campaign.id,
            )
            for cid in chunk:
                email = emails.get(cid, "")
                if email in blocked or address_problem(email) is not None:
                    report.skipped += 1
                    continue
                recipient = recipients.get(cid)
                if recipient is None:
                    continue
                try:
                    composed = composer.compose(recipient)
                except MailerError as exc:
                    report.build_errors += 1
                    if len(report.errors) < 20:
                        report.errors.append(f"{email}: {exc}")
                    continue
                transport.count += 1
                transport.bytes += len(composed.data)
                report.sent += 1
                if composed.fell_back:
                    report.fell_back += 1
            if progress is not None:
                progress(report)
    report.built_bytes = transport.bytes
    return report


__all__ = ["dry_run", "plan_send", "send_campaign", "send_test"]
