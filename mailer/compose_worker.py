"""Composing a send's messages: in this process, or in a worker process on another core.

Composing itself (compose.py) is the same here and in the sender; this module is the process,
its pipe framing and the choice of where a batch is composed.

A large send spends about a third of its CPU time loading recipients and rendering + building
their messages; the rest (claims, SMTP, the send log) must stay in the sending process. One
interpreter holds one core, so a large campaign gets a worker process that composes batches
ahead while the sender sends (see benchmarks/RESULTS.md, Send).

Composing touches no message's state: a batch is composed before it is claimed, so composing
ahead does not widen the window of claims a crash would leave `uncertain`, and a batch that is
never claimed is simply dropped.

The worker is `python -m mailer.compose_worker`, fed pickled frames on stdin and answering on
stdout. It never sends mail and never sees an SMTP password. When it cannot start or dies, the
sender composes in its own process: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from mailer import compose
from mailer.compose import Composed
from mailer.config import Workspace
from mailer.errors import MailerError
from mailer.models import Campaign
from mailer.smtp import PASSWORD_ENV

# Per contact id: the message, or why it cannot be built (recorded as that message's failure).
Batch = dict[int, Composed | str]


class BatchComposer:
    """Loads and composes batches of one campaign's recipients; one instance per process."""

    def __init__(self, *, engine: Engine, workspace: Workspace, campaign: Campaign) -> None:
        self.engine = engine
        template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
        self.composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=workspace
        )
        self.loader: compose.RecipientLoader | None = None
        # A follow-up's recipients carry the thread they answer (see compose.RecipientLoader).
        self.campaign_id = campaign.id
        self.default_zone = workspace.setting("campaign", "default_zone")

    def compose(self, contact_ids: Sequence[int]) -> Batch:
        with Session(self.engine) as session:
            # One loader for the run: the signatories and each city's ties are read once, not
            # once per batch; each batch lends it a fresh session.
            if self.loader is None:
                self.loader = compose.RecipientLoader(
                    session, campaign_id=self.campaign_id, default_zone=self.default_zone
                )
            self.loader.session = session
            recipients = self.loader.load(contact_ids)
        batch: Batch = {}
        for contact_id in contact_ids:
            recipient = recipients.get(contact_id)
            if recipient is None:
                batch[contact_id] = f"contact {contact_id} no longer exists"
                continue
            try:
                batch[contact_id] = self.composer.compose(recipient)
            except MailerError as exc:
                batch[contact_id] = f"cannot build the message: {exc}"
            except Exception as exc:  # one contact's odd data must not stop the whole run
                batch[contact_id] = f"cannot build the message: {type(exc).__name__}: {exc}"
        return batch


# --------------------------------------------------------------------------- framing

_LENGTH = struct.Struct("!I")


def _write_frame(stream: IO[bytes], value: object) -> None:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(body)) + body)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


# --------------------------------------------------------------------------- the worker side


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The worker's loop: a setup frame, then `(seq, contact_ids)` until the sender closes stdin."""
    setup = _read_frame(requests)
    if setup is None:
        return
    from mailer import db

    try:
        engine = db.make_engine(setup["database_url"])
        with Session(engine) as session:
            campaign = session.get(Campaign, setup["campaign_id"])
            if campaign is None:
                raise MailerError(f"campaign {setup['campaign_id']} not found")
            session.expunge(campaign)
        composer = BatchComposer(engine=engine, workspace=setup["workspace"], campaign=campaign)
    except Exception as exc:
        _write_frame(answers, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    _write_frame(answers, ("ready", os.getpid()))
    while (request := _read_frame(requests)) is not None:
        seq, contact_ids = request
        try:
            answer: tuple[Any, ...] = (seq, composer.compose(contact_ids))
        except Exception as exc:  # the sender composes this batch itself and sees the error
            answer = (seq, f"{type(exc).__name__}: {exc}")
        _write_frame(answers, answer)
    engine.dispose()


def main() -> None:
    # Ctrl-C reaches the whole process group: the sender decides what stops, and closes our
    # stdin when it is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Frames own stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with contextlib.suppress(BrokenPipeError):
        serve(sys.stdin.buffer, answers)


# --------------------------------------------------------------------------- the sender side


class WorkerGone(Exception):
    """The worker died or answered with an error: compose this batch here instead."""


class ComposeWorker:
    """The sender's handle on one worker process: `compose` may be awaited by several batches
    at once; answers come back in request order."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ready = False
        self.gone = False
        self._waiting: collections.deque[tuple[int, asyncio.Future[Any]]] = collections.deque()
        self._seq = 0
        self._reader = asyncio.create_task(self._read_answers())

    @classmethod
    async def start(
        cls, *, database_url: str, workspace: Workspace, campaign_id: int
    ) -> ComposeWorker | None:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailer.compose_worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                # It sends nothing: the SMTP password has no business in its environment.
                env={k: v for k, v in os.environ.items() if k != PASSWORD_ENV},
            )
        except OSError:
            return None
        worker = cls(process)
        worker._send(
            {"database_url": database_url, "workspace": workspace, "campaign_id": campaign_id}
        )
        return worker

    def _send(self, value: object) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        stdin.write(_LENGTH.pack(len(body)) + body)

    async def _read_frame(self) -> Any:
        stdout = self.process.stdout
        assert stdout is not None
        head = await stdout.readexactly(_LENGTH.size)
        return pickle.loads(await stdout.readexactly(_LENGTH.unpack(head)[0]))

    async def _read_answers(self) -> None:
        try:
            hello = await self._read_frame()
            if hello[0] != "ready":
                raise WorkerGone(str(hello[1]))
            self.ready = True
            while True:
                seq, batch = await self._read_frame()
                expected, future = self._waiting.popleft()
                if seq != expected:
                    raise WorkerGone(f"answer {seq} out of order (expected {expected})")
                if not future.done():
                    if isinstance(batch, str):
                        future.set_exception(WorkerGone(batch))
                    else:
                        future.set_result(batch)
        except asyncio.CancelledError:
            self._fail(WorkerGone("closed"))
            raise
        except Exception as exc:  # whatever went wrong, this batch is composed here instead
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.gone = True
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(WorkerGone(str(exc) or type(exc).__name__))

    def compose(self, contact_ids: Sequence[int]) -> asyncio.Future[Batch]:
        future: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        if self.gone:
            future.set_exception(WorkerGone("the worker has stopped"))
            return future
        self._seq += 1
        self._waiting.append((self._seq, future))
        try:
            self._send((self._seq, list(contact_ids)))
        except (OSError, RuntimeError) as exc:
            self._fail(exc)
        return future

    async def close(self) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Composing:
    """Where a run's batches are composed: the worker once it is ready, otherwise (before it
    is up, for a small run, or after it died) one thread of this process."""

    def __init__(self, local: BatchComposer, worker: ComposeWorker | None) -> None:
        self.local = local
        self.worker = worker
        # One thread: the local composer's loader and session are not shared between batches.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mailer-compose")
        # Messages the worker composed (the rest were composed here).
        self.by_worker = 0

    def submit(self, contact_ids: Sequence[int]) -> asyncio.Future[Batch]:
        worker = self.worker
        if worker is not None and worker.ready and not worker.gone:
            future = worker.compose(contact_ids)
            future.add_done_callback(self._count)
            return future
        return self.here(contact_ids)

    def _count(self, future: asyncio.Future[Batch]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.by_worker += len(future.result())

    def here(self, contact_ids: Sequence[int]) -> asyncio.Future[Batch]:
        """Composed in this process (one thread)."""
        loop = asyncio.get_running_loop()
        return asyncio.ensure_future(
            loop.run_in_executor(self._thread, self.local.compose, list(contact_ids))
        )

    async def result(self, future: asyncio.Future[Batch], contact_ids: Sequence[int]) -> Batch:
        try:
            return await future
        except WorkerGone:
            return await self.here(contact_ids)

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.close()
        self._thread.shutdown(wait=True, cancel_futures=True)


if __name__ == "__main__":
    # Run as `-m`, this file is `__main__`: the module proper must define what is pickled.
    from mailer.compose_worker import main as module_main

    module_main()
