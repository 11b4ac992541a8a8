"""Reading the office's mailbox: a Maildir, an mbox file, or an IMAP server (read-only).

Each source yields the raw bytes of the mails it has not handed over before, with a key that
names the mail in its folder (a Maildir file name, `UIDVALIDITY:UID`, the hash of an mbox entry)
and, for IMAP, the position to remember. It never deletes, moves or flags mail (IMAP folders are
EXAMINEd and read with BODY.PEEK). This module knows nothing of the database or of what a mail
means (`inbox_classify`).
"""

from __future__ import annotations

import contextlib
import hashlib
import mailbox
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from mailer import secrets_source
from mailer.errors import InvalidValueError, MailboxError
from mailer.secrets_source import is_loopback

PASSWORD_ENV = "MAILER_IMAP_PASSWORD"
IMAP_SCHEMES = {"imaps": 993, "imap+starttls": 143, "imap+plain": 143}
DEFAULT_TIMEOUT = 60.0
# UIDs fetched per IMAP command: big enough to stream, small enough to keep memory flat.
FETCH_CHUNK = 100


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where reading a folder stopped (IMAP only: Maildir and mbox are keyed by their entries)."""

    uidvalidity: int | None = None
    last_uid: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One mail: its bytes, or why they could not be read (it is tried again next time)."""

    key: str
    data: bytes | None
    error: str | None = None
    position: Position = field(default_factory=Position)


class MailSource(Protocol):
    @property
    def name(self) -> str:
        """Names the mailbox in the record (`maildir:/path`, `imap://user@host`), no secret."""

    def folders(self) -> tuple[str, ...]: ...

    def read(
        self, folder: str, *, position: Position, seen: Callable[[str], bool]
    ) -> Iterator[Item]:
        """The folder's mails not `seen` yet (by key), oldest first where the source knows."""

    def close(self) -> None: ...


# --------------------------------------------------------------------------- Maildir


class MaildirSource:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()
        if not self.path.exists():
            raise MailboxError(f"{path}: no such mailbox (the path does not exist)")
        if not self.path.is_dir() or not all(
            (self.path / sub).is_dir() for sub in ("cur", "new", "tmp")
        ):
            raise MailboxError(
                f"{path}: not a Maildir (a Maildir is a folder with cur/, new/ and tmp/); "
                "for a single mailbox file use --mbox"
            )
        self.box = mailbox.Maildir(str(self.path), factory=None, create=False)

    @property
    def name(self) -> str:
        return f"maildir:{self.path}"

    def folders(self) -> tuple[str, ...]:
        return ("",)

    def read(
        self, folder: str, *, position: Position, seen: Callable[[str], bool]
    ) -> Iterator[Item]:
        try:
            keys = sorted(k for k in self.box.iterkeys() if not seen(k))
        except OSError as exc:
            raise MailboxError(f"{self.path}: cannot list the Maildir: {exc.strerror}") from None
        for key in keys:
            try:
                yield Item(key=key, data=self.box.get_bytes(key))
            except (OSError, KeyError) as exc:
                # Moved or deleted by a mail client since the listing, or unreadable now.
                yield Item(key=key, data=None, error=f"cannot read {key}: {exc}")

    def close(self) -> None:
        self.box.close()


# --------------------------------------------------------------------------- mbox


class MboxSource:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()
        if not self.path.exists():
            raise MailboxError(f"{path}: no such mailbox (the file does not exist)")
        if self.path.is_dir():
            raise MailboxError(f"{path}: a folder, not an mbox file; for a Maildir use --maildir")
        try:
            with self.path.open("rb") as fh:
                start = fh.read(4096).lstrip(b"\r\n")
        except OSError as exc:
            raise MailboxError(f"{path}: cannot read: {exc.strerror}") from None
        if start and not start.startswith(b"From "):
            raise MailboxError(
                f"{path}: not an mbox file (an mbox starts with a 'From ' line); "
                "for a Maildir use --maildir"
            )
        self.box = mailbox.mbox(str(self.path), factory=None, create=False)

    @property
    def name(self) -> str:
        return f"mbox:{self.path}"

    def folders(self) -> tuple[str, ...]:
        return ("",)

    def read(
        self, folder: str, *, position: Position, seen: Callable[[str], bool]
    ) -> Iterator[Item]:
        # An mbox entry has no name of its own, and offsets move when a client rewrites the
        # file: the entry's bytes name it.
        try:
            keys = list(self.box.iterkeys())
        except OSError as exc:
            raise MailboxError(f"{self.path}: cannot read: {exc.strerror}") from None
        for key in keys:
            try:
                data = self.box.get_bytes(key)
            except (OSError, KeyError) as exc:
                yield Item(key=f"#{key}", data=None, error=f"cannot read entry {key}: {exc}")
                continue
            name = hashlib.sha256(data).hexdigest()
            if not seen(name):
                yield Item(key=name, data=data)

    def close(self) -> None:
        self.box.close()


# --------------------------------------------------------------------------- IMAP


@dataclass(frozen=True, kw_only=True)
class ImapSettings:
    scheme: str
    host: str
    port: int
    username: str
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def via(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def display(self) -> str:
        return f"{self.scheme}://{self.username}@{self.host}:{self.port}"

    def with_password(self, password: str) -> ImapSettings:
        return replace(self, password=password)


def parse_imap_url(
    url: str, *, ca_file: Path | None = None, timeout: float = DEFAULT_TIMEOUT
) -> ImapSettings:
    """`imaps://user@host[:993]`, `imap+starttls://user@host[:143]`, `imap+plain://user@host`."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidValueError(f"--imap: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in IMAP_SCHEMES:
        raise InvalidValueError(
            f"--imap: unknown scheme {scheme or '(none)'!r}; use imaps:// (TLS), "
            "imap+starttls:// (STARTTLS) or imap+plain:// (no TLS: a server on this machine only)"
        )
    if parts.password is not None:
        raise InvalidValueError(
            f"--imap: the URL must not contain a password; give it in ${PASSWORD_ENV} "
            "or [imap] password_command in mailer.toml"
        )
    if not parts.hostname:
        raise InvalidValueError(f"--imap {url}: no host name")
    if not parts.username:
        raise InvalidValueError(f"--imap {url}: no user name (imaps://USER@{parts.hostname})")
    if scheme == "imap+plain" and not is_loopback(parts.hostname):
        # The login would cross the network in plain text.
        raise InvalidValueError(
            f"--imap {url}: imap+plain:// sends the password unencrypted, so it is only for a "
            "server on this machine; use imaps:// or imap+starttls://"
        )
    if ca_file is not None and not ca_file.is_file():
        raise InvalidValueError(f"--ca-file {ca_file}: no such file")
    return ImapSettings(
        scheme=scheme,
        host=parts.hostname,
        port=port or IMAP_SCHEMES[scheme],
        username=unquote(parts.username),
        ca_file=ca_file,
        timeout=timeout,
    )


def resolve_imap_password(
    *,
    settings: ImapSettings,
    password_command: str | None,
    prompt: Callable[[str], str] | None = None,
) -> str:
    """`MAILER_IMAP_PASSWORD`, then `[imap] password_command`, then `prompt` (on a terminal)."""
    return secrets_source.resolve_password(
        kind="IMAP",
        login=f"{settings.username}@{settings.via}",
        env_var=PASSWORD_ENV,
        section="imap",
        password_command=password_command,
        prompt=prompt,
        error=MailboxError,
    )


class ImapSource:
    """One logged-in, read-only IMAP session."""

    def __init__(self, settings: ImapSettings, *, folders: Sequence[str] = ("INBOX",)) -> None:
        from imapclient import IMAPClient
        from imapclient.exceptions import IMAPClientError, LoginError

        self.settings = settings
        self._folders = tuple(dict.fromkeys(folders or ("INBOX",)))
        where = f"IMAP server {settings.via}"
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        try:
            self.client = IMAPClient(
                settings.host,
                port=settings.port,
                ssl=settings.scheme == "imaps",
                ssl_context=context,
                timeout=settings.timeout,
            )
        except ssl.SSLError as exc:
            raise MailboxError(_tls_text(where, exc)) from None
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"cannot reach {where}: {_exc_text(exc)}") from None
        try:
            if settings.scheme == "imap+starttls":
                if not self.client.has_capability("STARTTLS"):
                    raise MailboxError(
                        f"{where} does not offer STARTTLS, which imap+starttls:// requires; "
                        "use imaps://"
                    )
                self.client.starttls(context)
            self.client.login(settings.username, settings.password or "")
        except MailboxError:
            self._drop()
            raise
        except LoginError as exc:
            self._drop()
            raise MailboxError(
                f"{where} refused the login of {settings.username!r}: {_exc_text(exc)}"
            ) from None
        except ssl.SSLError as exc:
            self._drop()
            raise MailboxError(_tls_text(where, exc)) from None
        except (OSError, IMAPClientError) as exc:
            self._drop()
            raise MailboxError(f"{where}: {_exc_text(exc)}") from None
        # Every folder is checked before any is read: a typo must not leave half a sync behind.
        missing = [f for f in self._folders if not self._exists(f)]
        if missing:
            known = ", ".join(name for _flags, _sep, name in self.client.list_folders())
            self.close()
            raise MailboxError(
                f"{where}: no folder {missing[0]!r} for {settings.username}; folders: {known}"
            )

    def _exists(self, folder: str) -> bool:
        return bool(self.client.folder_exists(folder))

    def _drop(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.client.shutdown()

    @property
    def name(self) -> str:
        return f"imap://{self.settings.username}@{self.settings.host}"

    def folders(self) -> tuple[str, ...]:
        return self._folders

    def read(
        self, folder: str, *, position: Position, seen: Callable[[str], bool]
    ) -> Iterator[Item]:
        from imapclient.exceptions import IMAPClientError

        where = f"IMAP server {self.settings.via}, folder {folder!r}"
        try:
            selected = self.client.select_folder(folder, readonly=True)
            validity = int(selected[b"UIDVALIDITY"])
            # A new UIDVALIDITY means every UID changed: read the folder again from the start
            # (the Message-ID and digest keep mails seen before from counting twice).
            last = (position.last_uid or 0) if position.uidvalidity == validity else 0
            uids = sorted(u for u in self.client.search(["UID", f"{last + 1}:*"]) if u > last)
            for start in range(0, len(uids), FETCH_CHUNK):
                chunk = uids[start : start + FETCH_CHUNK]
                fetched = self.client.fetch(chunk, ["BODY.PEEK[]"])
                for uid in chunk:
                    key = f"{validity}:{uid}"
                    after = Position(uidvalidity=validity, last_uid=uid)
                    data = fetched.get(uid, {}).get(b"BODY[]")
                    if seen(key):
                        continue
                    if not isinstance(data, bytes):
                        yield Item(key=key, data=None, error="vanished", position=after)
                        continue
                    yield Item(key=key, data=data, position=after)
        except (OSError, IMAPClientError) as exc:
            raise MailboxError(f"{where}: {_exc_text(exc)}") from None

    def close(self) -> None:
        try:
            self.client.logout()
        except Exception:  # the session is over either way; its error helps nobody
            self._drop()


def _tls_text(where: str, exc: ssl.SSLError) -> str:
    hint = (
        " (for a private CA give --ca-file)"
        if isinstance(exc, ssl.SSLCertVerificationError)
        else ""
    )
    reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
    return (
        f"TLS with {where} failed: certificate refused: {reason}{hint}"
        if hint
        else (f"TLS with {where} failed: {reason}")
    )


def _exc_text(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(text, str) and text.startswith("b'") and text.endswith("'"):
        text = text[2:-1]
    return " ".join(text.split()) or type(exc).__name__
