"""The delivery engine: the run of a send, where compose, a transport and the outbox meet.

A run goes: recover claims left by a dead sender -> freeze the templates -> resolve the audience
again and queue whoever is missing (skipping the suppressed) -> a pipeline of bounded queues:

    peeker (reads which messages are due; claims nothing; with sending windows or a follow-up,
    asks timing.Gate.admit which of them are due now, the others held or skipped) ->
    composing (renders bytes, in a
    worker process for a large run: see compose_worker) -> claimer (commits `queued -> sending`
    per composed batch) -> feeder -> N sender workers (the transport) -> recorder (commits
    results in small batches)

The claim of a batch is committed before any byte of it goes out, so after a crash a message is
either untouched (`queued`), known (`sent`, `retry`, `failed`), or `sending` -- which the next run
turns into `uncertain` and never re-sends on its own. Batches are composed before they are
claimed, so composing ahead never widens that window; a composed batch that is not claimed (the
run stopped, another sender took it) is dropped.

This module holds the run (its stages, signals and shutdown) and no SQL: every read and write
of messages and events is an `outbox` verb, and what follows an attempt is `policy.next_state`.
It must not write to the database by any other way.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer import campaigns, compose, outbox, timing
from mailer.addresses import address_problem
from mailer.clock import Clock, Sleeper, sleeper_for, utcnow
from mailer.compose_worker import Batch, BatchComposer, ComposeWorker, Composing
from mailer.config import Workspace
from mailer.errors import (
    DatabaseError,
    InvalidValueError,
    MailerError,
    TransportError,
)
from mailer.models import Campaign, MessageStatus
from mailer.outbox import Claim
from mailer.policy import RateLimiter, SendPolicy, StopReason, next_state
from mailer.send_report import Progress, SendPaused, SendPlan, SendReport
from mailer.transport import DryRun, Outcome, OutcomeKind, Transport

_T = TypeVar("_T")


def _campaign_id(engine: Engine, slug: str) -> int:
    with Session(engine) as session:
        return campaigns.get_campaign(session, slug).id


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
    handed_at: dt.datetime | None = None
    # Its window closed before it could go: held until this time (see timing.Gate.closed).
    held_until: dt.datetime | None = None


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
        # Sending windows and follow-up delays (timing.py); None: every queued letter is due.
        self.gate = gate
        self.sleep = sleep or sleeper_for(clock)
        self.stop = asyncio.Event()
        # Under a rate limit a batch is what goes out in a few seconds, so claims stay young.
        self.batch_size = policy.batch_size
        if bucket is not None and bucket.rate > 0:
            self.batch_size = max(1, min(policy.batch_size, int(bucket.rate * 5)))
        self.hurry = asyncio.Event()
        self.stop_reason: StopReason | None = None
        self.error: MailerError | None = None
        self.window: collections.deque[bool] = collections.deque(maxlen=policy.error_window)
        self.streak: list[int] = []
        self.streak_key: tuple[int | None, str] | None = None
        self.inflight: set[int] = set()
        # Claimed and not yet recorded, so a cancelled run can still account for each of them.
        self.outstanding: dict[int, _Job] = {}
        # At most two batches between claim and the senders' queue: after a crash every claim
        # not yet recorded becomes `uncertain`, so the window is kept just deep enough to keep
        # the senders busy.
        self.ahead = asyncio.Semaphore(1)
        # One thread: claims and records never wait for each other's write lock.
        self.db_thread = ThreadPoolExecutor(1, thread_name_prefix="mailer-db")
        self.composing = Composing(
            BatchComposer(engine=engine, workspace=workspace, campaign=campaign), worker=None
        )
        self.due = outbox.Due(engine, campaign_id=campaign.id)
        # Results not yet written (see recorder), and how many results are not yet committed.
        self.unrecorded: list[_Result] = []
        self.unwritten = 0
        # Peeked (being composed or waiting for the claimer): not to be peeked again.
        self.peeked: set[int] = set()
        # Set once no further batch will be claimed (a budget ran out): the peeker stops.
        self.claiming_over = False

    def halt(self, reason: StopReason, error: MailerError | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.error = error
        self.stop.set()

    # ----- peeker and claimer
    #
    # Claims and results are written on one database thread (db_thread), so the event loop
    # keeps the SMTP sessions moving while SQLite works and syncs. Each of their statements is
    # one driver step (see outbox): every step gives up the GIL and must wait to get it back
    # from the busy loop, and per-row steps made a claim take 20 ms (see benchmarks/RESULTS.md,
    # Send). The peek, a read, stays on the loop.

    async def peeker(self, out: asyncio.Queue[_Peeked | None]) -> None:
        try:
            while not self.stop.is_set() and not self.claiming_over:
                rows = self.due.peek(self.batch_size, skip=frozenset(self.peeked), now=self.clock())
                if not rows:
                    if await self._wait_for_held():
                        continue
                    break
                if self.gate is not None:
                    # The timing hook: only letters due now (window open in the recipient's
                    # zone, follow-up delay passed, first letter not answered) go on to be
                    # composed and claimed; the gate holds or skips the others in the outbox.
                    # A read (it writes only when it holds or skips): off the database
                    # thread, so claims and results never wait for it.
                    due = await asyncio.to_thread(self.gate.admit, rows, now=self.clock())
                    self.report.due -= len(rows) - len(due)
                    if len(due) < len(rows):
                        self.due.expect_retries()  # held letters now carry a date
                    rows = due
                    if not rows:
                        continue
                self.peeked.update(mid for mid, _ in rows)
                await out.put((rows, self.composing.submit([cid for _, cid in rows])))
        except Exception as exc:
            self.halt(StopReason.ERROR, _as_mailer_error(exc))
        finally:
            await out.put(None)

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
        waiting = await self._on_db(functools.partial(gate.next_due, now=self.clock()))
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

    async def _claim(self, rows: list[tuple[int, int]], batch: Batch) -> list[_Job]:
        """Claims the batch, and records the results that came in since the last commit in the
        same transaction: one commit (one fsync on SQLite) for both."""
        results, self.unrecorded = self.unrecorded, []
        try:
            claims = await self._on_db(
                functools.partial(self._claim_and_record, [mid for mid, _ in rows], results)
            )
        except BaseException:
            # Not written: the recorder tries them again.
            self.unrecorded[:0] = results
            raise
        self.unwritten -= len(results)
        jobs = []
        for claim in claims:
            job = _Job(claim=claim)
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

    def _claim_and_record(self, ids: list[int], results: list[_Result]) -> list[Claim]:
        now = self.clock()
        return outbox.claim(
            self.engine,
            campaign_id=self.campaign.id,
            ids=ids,
            run_id=self.report.run_id,
            now=now,
            results=self._settle(results, now),
        )

    def _record(self, results: list[_Result]) -> None:
        now = self.clock()
        outbox.record(
            self.engine, campaign_id=self.campaign.id, results=self._settle(results, now), now=now
        )

    async def _on_db(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, call)

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
                        self._end_of_budget()
                        continue
                    rows = rows[:n]
                try:
                    batch = await self.composing.result(future, [cid for _, cid in rows])
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
                    # Another sender claimed them since they were peeked.
                    self.ahead.release()
                    continue
                self.report.claimed += len(jobs)
                self.outstanding.update((job.claim.id, job) for job in jobs)
                if self.budget is not None and self.report.claimed >= self.budget:
                    self._end_of_budget()
                await out.put(jobs)
        except Exception as exc:  # a database failure must still release what was claimed
            self.halt(StopReason.ERROR, _as_mailer_error(exc))
            # Let the peeker finish: it waits on this queue.
            while (item := await inbox.get()) is not None:
                self._drop(item)
        finally:
            await out.put(None)

    def _end_of_budget(self) -> None:
        # A budget ends claiming only; what is in flight still goes out.
        self.claiming_over = True
        if self.stop_reason is None and self.due.any(now=self.clock()):
            self.stop_reason = self.budget_reason or StopReason.LIMIT

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

    async def sender(
        self, inbox: asyncio.Queue[_Job | None], results: asyncio.Queue[_Result | None]
    ) -> None:
        while (job := await inbox.get()) is not None:
            if self.stop.is_set():
                self._emit(results, _Result(job=job, outcome=None))
                continue
            if self.bucket is not None:
                await self.bucket.acquire()
                if self.stop.is_set():
                    self._emit(results, _Result(job=job, outcome=None))
                    continue
            if self.gate is not None:
                job.held_until = self.gate.closed(job.claim.id, now=self.clock())
                if job.held_until is not None:
                    # Its window closed while it waited: back to the queue until the next.
                    self._emit(results, _Result(job=job, outcome=None))
                    continue
            self.inflight.add(job.claim.id)
            try:
                outcome = await self.transport.send(
                    mail_from=job.mail_from,
                    rcpt_to=job.rcpt_to,
                    data=job.data,
                    smtputf8=job.smtputf8,
                    ref=job.message_id,
                    go=self.going,
                    on_payload=functools.partial(self._hand, job),
                )
            except TransportError as exc:
                # Systemic (the server went away, refused the login on reconnect): this message
                # never reached a server, so it goes back to the queue like the rest.
                job.handed = False
                self.halt(StopReason.SYSTEMIC, exc)
                self._emit(results, _Result(job=job, outcome=None))
                continue
            except Exception as exc:
                # A fault of our own mid-send: the bytes may be out, so never re-send on our own.
                job.handed = True
                self.halt(StopReason.ERROR, _as_mailer_error(exc))
                outcome = Outcome(
                    kind=OutcomeKind.UNCERTAIN,
                    code=None,
                    reply=f"internal error while sending: {type(exc).__name__}: {exc}",
                    via=self.transport.via,
                )
            finally:
                self.inflight.discard(job.claim.id)
            if outcome is None:
                # The run stopped while this message waited for a connection: never sent.
                job.handed = False
                self._emit(results, _Result(job=job, outcome=None))
                continue
            self._watch(job, outcome)
            self._emit(results, _Result(job=job, outcome=outcome))

    def going(self) -> bool:
        return not self.stop.is_set()

    def _hand(self, job: _Job) -> None:
        # The message itself is leaving: from here on a send cut short is uncertain. The time
        # on the run's clock is its delivery time (`sent_at`).
        job.handed = True
        job.handed_at = self.clock()

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

    def _settle(self, results: Sequence[_Result], now: dt.datetime) -> list[outbox.Result]:
        """What each result makes of its message (policy.next_state), counted in the report."""
        settled: list[outbox.Result] = []
        report = self.report
        for result in results:
            job, outcome = result.job, result.outcome
            if outcome is None and job.error is None:
                # Never handed to the transport: back to the queue, the attempt not counted.
                report.released += 1
                settled.append(
                    outbox.Released(
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
                )
                continue
            if outcome is None:
                report.build_errors += 1
                settled.append(outbox.Unbuildable(claim=job.claim, error=str(job.error)))
                continue
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
            settled.append(
                outbox.Attempted(
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
            )
        return settled

    async def recorder(self, inbox: asyncio.Queue[_Result | None]) -> None:
        # Results reach the database with the next claim, in its transaction (one commit for
        # both), or here once `record_every` have gathered: what a crash leaves `sending` (and
        # so `uncertain`) stays within a claimed batch, the messages under way and these.
        loop = asyncio.get_running_loop()
        last = loop.time()
        finished = False
        while not finished:
            item = await inbox.get()
            if item is None:
                finished = True
            elif item is not _TICK:
                self.unrecorded.append(item)
            due = loop.time() - last >= self.policy.record_interval
            if self.unrecorded and (
                finished or due or len(self.unrecorded) >= self.policy.record_every
            ):
                batch, self.unrecorded = self.unrecorded, []
                try:
                    await self._on_db(functools.partial(self._record, batch))
                except BaseException:
                    self.unrecorded[:0] = batch
                    raise
                self.unwritten -= len(batch)
            if finished or due:
                last = loop.time()
                if self.progress is not None:
                    self.progress(self.report)

    def _emit(self, results: asyncio.Queue[_Result | None], result: _Result) -> None:
        # Off the outstanding list the moment its result exists, so a cancelled run never
        # records a message twice.
        self.outstanding.pop(result.job.claim.id, None)
        self.unwritten += 1
        results.put_nowait(result)

    async def ticker(self, inbox: asyncio.Queue[_Result | None]) -> None:
        # Wakes the recorder so a slow trickle of results is still committed within the interval.
        while True:
            await asyncio.sleep(self.policy.record_interval)
            await inbox.put(_TICK)

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
                # A read that failed says nothing about the campaign; the next poll asks again.
                state = None
            if state is not None and state.halt_reason is not None:
                self.report.halted_by = state.halt_reason
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
        watcher = asyncio.create_task(self.watch_campaign())
        senders = [
            asyncio.create_task(self.sender(built, results)) for _ in range(self.sender_tasks)
        ]
        tasks = [
            asyncio.create_task(self.peeker(peeked)),
            asyncio.create_task(self.claimer(peeked, claimed)),
            asyncio.create_task(self.feeder(claimed, built, results)),
            *senders,
        ]
        try:
            await self._until_stopped_then_grace(tasks, results)
        finally:
            ticker.cancel()
            watcher.cancel()
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


def _as_mailer_error(exc: BaseException) -> MailerError:
    if isinstance(exc, MailerError):
        return exc
    if isinstance(exc, SQLAlchemyError):
        return DatabaseError(f"database error while sending: {getattr(exc, 'orig', None) or exc}")
    return MailerError(f"{type(exc).__name__}: {exc}")


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
            template_set = compose.template_set_for(
                campaign, templates_dir=workspace.templates_dir
            )
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
    and Interrupted on SIGINT/SIGTERM, after recording everything; otherwise returns the report.

    `timing_options`: sending windows, `--wait`, `--spread` (see timing.py; the campaign's stored
    windows apply without them). `sleep` waits on `clock` (a test's moves the clock)."""
    policy = policy or SendPolicy()
    if concurrency < 1:
        raise InvalidValueError("--concurrency must be at least 1")
    if limit is not None and limit < 1:
        raise InvalidValueError("--limit must be at least 1")
    if daily_cap is not None and daily_cap < 1:
        raise InvalidValueError("--daily-cap must be at least 1")
    if bucket is None and rate is not None:
        from mailer.transport import TokenBucket

        bucket = TokenBucket(rate=rate)
    if test_to is not None:
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
                rate=rate,
                timing_options=timing_options,
                sleep=sleep or sleeper_for(clock),
            )
        )
    except SQLAlchemyError as exc:
        raise _as_mailer_error(exc) from exc


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
    rate: float | None = None,
    timing_options: timing.RunTiming | None = None,
    sleep: Sleeper,
) -> SendReport:
    report = SendReport(campaign=slug, via=transport.via, run_id=outbox.new_run_id())
    started = asyncio.get_running_loop().time()
    signals = _Signals(asyncio.get_running_loop(), install=handle_signals)
    run: _Run | None = None
    worker: ComposeWorker | None = None
    try:
        campaign_id = await asyncio.to_thread(_campaign_id, engine, slug)
        now = clock()
        report.recovered = await asyncio.to_thread(
            functools.partial(
                outbox.recover_stale_claims,
                engine,
                campaign_id=campaign_id,
                now=now,
                run_id=report.run_id,
                stale=policy.stale_claim,
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
            bucket = gate.limiter(daily_cap=daily_cap, rate=rate, clock=clock, sleep=sleep)
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
            sent_today, _ = await asyncio.to_thread(
                functools.partial(outbox.sent_in_window, engine, now=now)
            )
            left_today = max(0, daily_cap - sent_today)
            if budget is None or left_today < budget:
                budget, budget_reason = left_today, StopReason.DAILY_CAP
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
        finally:
            sys.setswitchinterval(switch)
            run.db_thread.shutdown(wait=True)
    finally:
        outbox.end_run(report.run_id)
        signals.remove()
        await transport.close()
        if run is not None:
            await run.composing.close()
            report.composed_by_worker = run.composing.by_worker
        elif worker is not None:
            await worker.close()
    assert run is not None
    elapsed = asyncio.get_running_loop().time() - started
    report.rate = report.done / elapsed if elapsed > 0 else 0.0
    report.stopped = run.stop_reason
    if run.stop_reason is StopReason.SYSTEMIC and run.streak:
        report.failed -= await asyncio.to_thread(
            functools.partial(
                outbox.requeue_streak,
                engine,
                campaign_id=campaign.id,
                ids=run.streak,
                now=clock(),
            )
        )
    if run.stop_reason is StopReason.DAILY_CAP and daily_cap is not None:
        report.resume_at = await asyncio.to_thread(
            functools.partial(outbox.cap_resume_at, engine, now=clock(), cap=daily_cap)
        )
    if run.gate is not None:
        report.held = run.gate.held
        report.skipped += run.gate.skipped
        report.next_due = await asyncio.to_thread(
            functools.partial(run.gate.next_due, now=clock())
        )
    report.totals = await asyncio.to_thread(
        functools.partial(
            outbox.finish_sending,
            engine,
            campaign_id=campaign.id,
            paused=run.stop_reason in (StopReason.PAUSED, StopReason.INTERRUPTED),
            now=clock(),
        )
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
    report = SendReport(campaign=slug, via=transport.via, run_id=outbox.new_run_id(), test_to=to)
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
        recipients = compose.load_recipients(
            session, picked[:count], campaign_id=campaign.id
        )
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
    report = SendReport(campaign=slug, via=transport.via, run_id=outbox.new_run_id(), dry_run=True)
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
