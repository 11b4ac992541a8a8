"""The handover journal: what one sender did with each letter it holds, in a file that outlives
the sender's process.

A claim (`sending`, committed with an fsync before any letter of it leaves) says only that a
letter *may* have left. The journal says which did: just before a letter's payload goes out the
sender appends `p <id>`, and when the server answers, `o <id> <outcome>`. Each append is a store
into a shared memory map of the file, in the kernel's page cache the moment it is made, so a
`kill -9` of the sender loses none of it; after a crash, a claim with no `p` line was never handed over (it goes
back to the queue), one with an `o` line has a known outcome, and only one with `p` and no `o`
may or may not have arrived (`uncertain`).

Power loss is different: what was not synced may be gone. The journal is therefore trusted only
on the same boot of the same machine (the kernel's boot id is in its header and in the sender's
row); after a reboot, or from another machine, nothing in it counts and every claim of the dead
sender is judged conservatively as handed over (`uncertain`). The fsync that power loss needs
is the claim's own commit, batched before the handover, never after. So no mark is ever synced
and a handover costs a store into memory.

While its sender lives, the journal file is locked (`flock`); the kernel drops the lock when the
process dies, however it dies. Another process on the same machine that can take the lock has
proof that the sender is gone, without waiting for its lease to expire (see senders.py).

Knows nothing of the database; imports only `transport` (the Outcome it writes down).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mailer.transport import Outcome, OutcomeKind

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, and no boot id either (see boot_id)
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int) -> bool:
    """An exclusive lock on the open file, without waiting; False if another process holds
    it (or the system has no flock: then nothing can be proved from the lock)."""
    if fcntl is None:  # pragma: no cover - Windows
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


# Tests only: makes this process look like another machine (another boot), so that it can
# neither read a journal written here nor prove its sender dead.
BOOT_ID_ENV = "MAILER_TEST_BOOT_ID"
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
_MAGIC = "mailer-journal 1"


def boot_id() -> str | None:
    """This boot of this machine (Linux), or None where it cannot be known (then no journal is
    ever trusted after a crash, and recovery is conservative)."""
    forced = os.environ.get(BOOT_ID_ENV)
    if forced:
        return forced
    try:
        return _BOOT_ID_FILE.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def journal_dir(workspace_root: Path) -> Path:
    return workspace_root / ".mailer" / "journal"


class Journal:
    """A sender's own journal, open for appending and locked while the sender lives.

    Appends go into a shared memory map of the file rather than through `write()`: a store into
    a MAP_SHARED page is in the page cache at once, as a `write()` would be (and outlives the
    process the same way), without a system call per letter -- which on a virtual machine cost
    more than the rest of the bookkeeping of a letter. The file grows in steps of space reserved
    up front (posix_fallocate), so a full disk is an error at the step, never a SIGBUS later.
    """

    _STEP = 1 << 20

    def __init__(self, path: Path, fd: int, start: int) -> None:
        self.path = path
        self._fd = fd
        self._pos = start
        self._size = 0
        self._map: mmap.mmap | None = None
        self._grow(start + self._STEP)

    @classmethod
    def create(cls, directory: Path, *, sender_id: str, boot: str | None) -> Journal:
        """A new journal, its header synced (with the directory entry) so that after a crash
        it is either whole or absent. Raises OSError when it cannot be written."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_safe(sender_id)}.journal"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if not _try_lock(fd) and fcntl is not None:
                raise OSError(errno.EAGAIN, f"{path} is locked by another process")
            header = f"{_MAGIC} {sender_id} {boot or '-'}\n".encode()
            os.write(fd, header)
            os.fsync(fd)
            _fsync_dir(directory)
            return cls(path, fd, len(header))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def _grow(self, end: int) -> None:
        size = max(end, self._size + self._STEP)
        _reserve(self._fd, self._size, size)
        # A new map of the larger file (mmap.resize is not available everywhere); what was
        # stored through the old one is in the same pages of the file.
        if self._map is not None:
            self._map.close()
        self._map = mmap.mmap(self._fd, size)
        self._size = size

    def _append(self, data: bytes) -> None:
        end = self._pos + len(data)
        if end > self._size:
            self._grow(end)
        assert self._map is not None
        self._map[self._pos : end] = data
        self._pos = end

    def claiming(self, ids: Iterable[int]) -> None:
        """About to claim these: what the journal said of them before no longer counts."""
        self._append(("c " + " ".join(map(str, ids)) + "\n").encode())

    def handing(self, message: int) -> None:
        """The letter's payload is about to leave: from here on it may arrive."""
        self._append(b"p %d\n" % message)

    def outcome(self, message: int, outcome: Outcome, letter: Letter) -> None:
        """The server's answer (or the transport's verdict) for a letter handed over, with
        what the send log keeps of the letter."""
        text = json.dumps(
            [
                outcome.kind.value,
                outcome.code,
                outcome.reply,
                outcome.via,
                letter.message_id,
                letter.language,
                letter.subject,
                letter.body_hash,
                letter.handed_at.isoformat() if letter.handed_at is not None else None,
            ],
            ensure_ascii=False,
        )
        self._append(f"o {message} {text}\n".encode())

    def close(self, *, remove: bool) -> None:
        """Closed (and the lock released); removed once everything in it is in the database."""
        if self._fd < 0:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)
        self._fd = -1


@dataclass(frozen=True, kw_only=True, slots=True)
class Letter:
    """What the send log keeps of a letter besides the answer (see outbox.Attempted)."""

    message_id: str | None = None
    language: str | None = None
    subject: str | None = None
    body_hash: str | None = None
    # When its payload was handed over (the `p` mark's moment, on the sender's clock): the
    # letter's `sent_at` if the answer says it was accepted.
    handed_at: dt.datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Known:
    outcome: Outcome
    letter: Letter


@dataclass(frozen=True, kw_only=True)
class Trail:
    """What a gone sender's journal says of its claims: the letters handed over and the
    outcomes known, each as of that letter's last claim."""

    handed: frozenset[int]
    outcomes: dict[int, Known] = field(default_factory=dict)


class Abandoned:
    """The journal of a sender that is provably gone, locked by the process that settles its
    claims: `trail` says what it did; `remove` once the claims are settled, `release` always."""

    def __init__(self, path: str, fd: int, trail: Trail) -> None:
        self.path = path
        self.trail = trail
        self._fd = fd

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def take_abandoned(path: str | None, *, sender_id: str, boot: str | None) -> Abandoned | None:
    """The journal of a gone sender, or None when its being gone cannot be proved here:
    another boot or machine, no such file, another sender's file, or its lock still held (the
    sender lives)."""
    here = boot_id()
    if path is None or boot is None or here is None or boot != here:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        trail = _read(fd, sender_id=sender_id, boot=boot) if _try_lock(fd) else None
    except OSError:
        trail = None
    if trail is None:
        os.close(fd)
        return None
    return Abandoned(path, fd, trail)


def is_abandoned(path: str | None, *, sender_id: str, boot: str | None) -> bool:
    """Whether the sender of this journal is provably gone (see `take_abandoned`)."""
    taken = take_abandoned(path, sender_id=sender_id, boot=boot)
    if taken is None:
        return False
    taken.release()
    return True


def sweep(directory: Path, *, settled: Callable[[str], bool]) -> int:
    """Removes the journals in `directory` whose sender is gone (their lock is free) and
    `settled` (nothing of theirs is left to recover). Returns how many."""
    removed = 0
    for path in directory.glob("*.journal"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue
            header = os.read(fd, 400).split(b"\n", 1)[0].decode("utf-8", errors="replace")
            parts = header.split(" ")
            if len(parts) == 4 and " ".join(parts[:2]) == _MAGIC and settled(parts[2]):
                path.unlink()
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _read(fd: int, *, sender_id: str, boot: str) -> Trail | None:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    # The file is reserved ahead of what is written: the text ends at the first NUL.
    written = b"".join(chunks).split(b"\0", 1)[0]
    lines = written.decode("utf-8", errors="replace").split("\n")
    if not lines or lines[0] != f"{_MAGIC} {sender_id} {boot}":
        return None
    handed: set[int] = set()
    outcomes: dict[int, Known] = {}
    # The last element is what followed the last newline: empty, or a line cut short.
    for line in lines[1:-1]:
        kind, _, rest = line.partition(" ")
        try:
            if kind == "c":
                for token in rest.split():
                    handed.discard(int(token))
                    outcomes.pop(int(token), None)
            elif kind == "p":
                handed.add(int(rest))
            elif kind == "o":
                message, _, text = rest.partition(" ")
                verdict, code, reply, via, mid, language, subject, body_hash, *rest = (
                    json.loads(text)
                )
                # The handover time came later: a line without it is still read.
                handed_at = dt.datetime.fromisoformat(rest[0]) if rest and rest[0] else None
                outcomes[int(message)] = Known(
                    outcome=Outcome(
                        kind=OutcomeKind(verdict),
                        code=None if code is None else int(code),
                        reply=str(reply),
                        via=str(via),
                    ),
                    letter=Letter(
                        message_id=mid,
                        language=language,
                        subject=subject,
                        body_hash=body_hash,
                        handed_at=handed_at,
                    ),
                )
        except (ValueError, TypeError):
            # A line this version cannot read proves nothing: the claims stay conservative.
            return None
    return Trail(handed=frozenset(handed), outcomes=outcomes)


def _reserve(fd: int, start: int, end: int) -> None:
    """Disk space for bytes `start`..`end` of the file, taken now: a store into a mapped page
    the disk has no room for would kill the process (SIGBUS) instead of raising an error."""
    try:
        os.posix_fallocate(fd, start, end - start)
        return
    except AttributeError:  # pragma: no cover - macOS has no posix_fallocate
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    zeros = bytes(1 << 16)
    # Never over what is written already.
    for offset in range(max(start, os.fstat(fd).st_size), end, len(zeros)):
        os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)


def _safe(sender_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sender_id)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "BOOT_ID_ENV",
    "Abandoned",
    "Journal",
    "Known",
    "Letter",
    "Trail",
    "boot_id",
    "is_abandoned",
    "journal_dir",
    "sweep",
    "take_abandoned",
]
