"""The workspace's secret: the keys of unsubscribe and VERP tokens (mailer/tokens.py).

Generated at `mailer init`; an older workspace gets it at `mailer db upgrade` (the first command
it must run), or else from the first command that makes or checks a token. Never printed. Where it lives:

- a SQLite workspace (one office, one machine): the file `mailer.secret` beside mailer.toml,
  created owner-only (0600) and tightened back to that whenever it is found readable by others;
- a PostgreSQL workspace (a team on a shared database): the `secrets` table, so every sender
  on every machine signs alike and the endpoint verifies what any of them sent.

`[campaign] unsubscribe_secret` in mailer.toml (at least 16 characters) wins over the generated
secret for new letters; `[campaign] unsubscribe_old_secrets = [...]` keeps earlier configured
ones verifying. Rotation (`mailer unsubscribe rotate-secret`) adds a generated key and signs with
it from then on; older keys stay, so letters already out keep working.

Imports `config`, `db`, `models` and `tokens`; nothing that composes or sends.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import secrets as random
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from mailer import db
from mailer.config import Workspace
from mailer.errors import DatabaseError, InvalidValueError, WorkspaceError
from mailer.models import Secret
from mailer.tokens import GENERATED_MAX, Key, KeyRing, configured_key

SECRET_FILE = "mailer.secret"
NAME = "tokens"
SECRET_BYTES = 32
MIN_CONFIGURED = 16


def _encode(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).decode("ascii")


def _decode(value: str, where: str) -> bytes:
    try:
        secret = base64.urlsafe_b64decode(value.encode("ascii"))
    except (ValueError, UnicodeError):
        raise WorkspaceError(f"{where}: a secret is not base64; restore the file") from None
    if len(secret) < 16:
        raise WorkspaceError(f"{where}: a secret is too short; restore the file")
    return secret


def uses_database(workspace: Workspace) -> bool:
    """Whether the workspace's secret lives in its database (a shared PostgreSQL one)."""
    try:
        return make_url(workspace.database_url).get_backend_name() == "postgresql"
    except (ValueError, SQLAlchemyError):
        return False


# --------------------------------------------------------------------------- the file


def _path(workspace: Workspace) -> Path:
    return workspace.root / SECRET_FILE


def _read_file(path: Path) -> list[Key]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read the workspace secret: {exc.strerror}") from exc
    if info.st_mode & 0o077:
        # Readable by others (a copy, a restore, a umask): owner-only again before use.
        try:
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        except OSError as exc:
            raise WorkspaceError(
                f"{path}: the workspace secret is readable by other users and cannot be made "
                f"owner-only ({exc.strerror}); run `chmod 600 {path}`"
            ) from exc
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["keys"]
        keys = [
            Key(version=int(r["version"]), secret=_decode(str(r["secret"]), str(path)))
            for r in rows
        ]
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read the workspace secret: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError):
        raise WorkspaceError(
            f"{path}: the workspace secret is damaged; restore it from a backup (or delete it: "
            "a new one is made, and unsubscribe links in letters already sent stop working)"
        ) from None
    return keys


def _write_file(path: Path, keys: list[Key], *, replace: bool) -> bool:
    """Write the keys owner-only. With `replace` False, only if no file exists yet (True if
    this call made it): two processes starting at once end up with one secret."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    body = json.dumps(
        {
            "about": "mailer workspace secret: keys unsubscribe links and VERP addresses. "
            "Keep it private; never share or commit it.",
            "keys": [
                {"version": k.version, "secret": _encode(k.secret), "created": now} for k in keys
            ],
        },
        indent=2,
    )
    temp = path.with_name(f".{path.name}.{os.getpid()}.{random.token_hex(4)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(temp, path)
            return True
        try:
            os.link(temp, path)  # atomic "create if absent", with the whole content
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot write the workspace secret: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def _file_keys(workspace: Workspace, *, create: bool) -> list[Key]:
    path = _path(workspace)
    keys = _read_file(path)
    if not keys and create:
        _write_file(path, [Key(version=1, secret=random.token_bytes(SECRET_BYTES))], replace=False)
        keys = _read_file(path)
    return keys


# --------------------------------------------------------------------------- the database


def _database_keys(engine: Engine, *, create: bool) -> list[Key]:
    try:
        with engine.begin() as conn:
            rows = conn.execute(
                select(Secret.version, Secret.value).where(Secret.name == NAME)
            ).all()
            if not rows and create:
                conn.execute(_insert_first(engine), _row(1))
                rows = conn.execute(
                    select(Secret.version, Secret.value).where(Secret.name == NAME)
                ).all()
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot read the workspace secret from {db.redact_url(str(engine.url))}: "
            f"{type(exc).__name__}"
        ) from exc
    return [Key(version=int(v), secret=_decode(str(value), "table secrets")) for v, value in rows]


def _insert_first(engine: Engine) -> Any:
    if engine.dialect.name == "postgresql":
        # Two senders starting at once: one secret wins, both read it.
        return postgresql.insert(Secret).on_conflict_do_nothing(index_elements=["name", "version"])
    return insert(Secret)


def _row(version: int) -> dict[str, object]:
    return {
        "name": NAME,
        "version": version,
        "value": _encode(random.token_bytes(SECRET_BYTES)),
        "created_at": dt.datetime.now(dt.UTC),
    }


def _with_engine(workspace: Workspace, engine: Engine | None) -> tuple[Engine, bool]:
    if engine is not None:
        return engine, False
    return db.make_engine(workspace.database_url), True


def _generated(workspace: Workspace, engine: Engine | None, *, create: bool) -> list[Key]:
    if not uses_database(workspace):
        return _file_keys(workspace, create=create)
    eng, own = _with_engine(workspace, engine)
    try:
        keys = _database_keys(eng, create=create)
    finally:
        if own:
            eng.dispose()
    # A workspace that moved from SQLite to PostgreSQL: its old file still verifies old letters.
    return keys + _file_keys(workspace, create=False)


# --------------------------------------------------------------------------- public


def _configured(workspace: Workspace) -> tuple[Key | None, list[Key]]:
    current = workspace.setting("campaign", "unsubscribe_secret")
    old = workspace.setting("campaign", "unsubscribe_old_secrets", [])
    if current is not None and (not isinstance(current, str) or len(current) < MIN_CONFIGURED):
        raise InvalidValueError(
            f"mailer.toml [campaign] unsubscribe_secret: must be a string of at least "
            f"{MIN_CONFIGURED} characters (or leave it out: the workspace has a generated one)"
        )
    if not isinstance(old, list) or not all(isinstance(s, str) and s for s in old):
        raise InvalidValueError(
            "mailer.toml [campaign] unsubscribe_old_secrets: must be a list of strings"
        )
    return (configured_key(current) if current else None), [configured_key(s) for s in old]


def keyring(workspace: Workspace, *, engine: Engine | None = None) -> KeyRing:
    """The keys that sign and verify tokens, making the workspace's secret if it has none.

    `engine`: the workspace's database, when the caller has it open (a PostgreSQL workspace
    keeps its secret there; otherwise one is opened for the call)."""
    current, old = _configured(workspace)
    generated = _generated(workspace, engine, create=True)
    newest = max(generated, key=lambda k: k.version)
    return KeyRing(signing=current or newest, known=(*generated, *old))


def ensure(workspace: Workspace, *, engine: Engine | None = None) -> None:
    """Make the workspace's secret if it has none yet (`mailer init`)."""
    _generated(workspace, engine, create=True)


def rotate(workspace: Workspace, *, engine: Engine | None = None) -> int:
    """A new generated key signs from now on; the older ones keep verifying. Its version."""
    keys = _generated(workspace, engine, create=True)
    version = max(k.version for k in keys) + 1
    if version > GENERATED_MAX:
        raise InvalidValueError(
            f"the workspace secret has been rotated {GENERATED_MAX - 1} times; no versions are left"
        )
    if not uses_database(workspace):
        path = _path(workspace)
        fresh = Key(version=version, secret=random.token_bytes(SECRET_BYTES))
        _write_file(path, [*_read_file(path), fresh], replace=True)
        return version
    eng, own = _with_engine(workspace, engine)
    try:
        with eng.begin() as conn:
            conn.execute(insert(Secret), _row(version))
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"cannot store a new workspace secret in {db.redact_url(str(eng.url))}: "
            f"{type(exc).__name__}"
        ) from exc
    finally:
        if own:
            eng.dispose()
    return version
