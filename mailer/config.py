"""Workspaces: where a campaign office keeps its settings, database and templates; and the
warnings about files holding secrets that others on the machine could read."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailer.errors import WorkspaceError

CONFIG_NAME = "mailer.toml"
DEFAULT_DB_NAME = "mailer.db"

DEFAULT_CONFIG = """\
# mailer workspace settings. Every key is optional; the values shown are the defaults.
# This file may hold secrets (unsubscribe_secret): it is created readable by you only.

[database]
# Any SQLAlchemy URL. Default: the SQLite file mailer.db beside this file.
# A shared team database: url = "postgresql+psycopg://user@host/dbname"
# (its password goes in ~/.pgpass or PGPASSWORD, never here)
# url = "sqlite:///mailer.db"

[campaign]
# Language used when a contact has none, and no variant exists for theirs.
default_language = "en"
# `campaign create` and `check` count recipients another campaign wrote to in these many
# days; `campaign create ... --skip-contacted-within 14d` leaves them out.
quiet_days = 14
# Mailbox that receives "unsubscribe" requests (the List-Unsubscribe mailto). Frozen into
# each campaign when it is created.
# unsubscribe_mailto = "unsubscribe@example.org"
# An https page that unsubscribes with one click ({token} is replaced per contact).
# unsubscribe_url = "https://example.org/unsubscribe?t={token}"

[smtp]
# The server and pace `mailer send` uses when given none (a campaign's own, set with
# `campaign create --smtp/--rate/--daily-cap`, comes first). A password never goes here.
# url = "smtp://office@mail.example.org:587"
# rate = "300/min"
# daily_cap = 2000
# password_command = "pass show mailer/smtp"
"""

# Files of a workspace that hold (or may hold) a secret: created owner-only, and a warning when
# others may read them.
SECRET_NAMES = (CONFIG_NAME,)
SECRET_SUFFIXES = (".secret", ".key", ".pem")


@dataclass(frozen=True, kw_only=True)
class Workspace:
    root: Path
    settings: dict[str, Any] = field(default_factory=dict)
    database_url_override: str | None = None

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"

    @property
    def database_url(self) -> str:
        return resolve_database_url(
            root=self.root, settings=self.settings, override=self.database_url_override
        )

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        value = self.settings.get(section, {})
        if not isinstance(value, dict):
            return default
        return value.get(key, default)


def resolve_database_url(*, root: Path, settings: dict[str, Any], override: str | None) -> str:
    """`--db` beats `MAILER_DATABASE_URL` beats `[database] url` beats `mailer.db`."""
    url = override or os.environ.get("MAILER_DATABASE_URL")
    if not url:
        section = settings.get("database", {})
        url = section.get("url") if isinstance(section, dict) else None
    if not url:
        return f"sqlite:///{root / DEFAULT_DB_NAME}"
    return _anchor_sqlite_path(url, root)


def _anchor_sqlite_path(url: str, root: Path) -> str:
    # A relative SQLite path in mailer.toml means "beside mailer.toml", not "wherever I ran from".
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rest = url[len(prefix) :]
        # `file:...?mode=ro&uri=true` is an SQLite URI: its path is its own business.
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str(root / rest)
    return url


def load_settings(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise WorkspaceError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read: {exc.strerror}") from exc


def find_workspace(*, start: Path | None = None, db_url: str | None = None) -> Workspace:
    """The workspace named by `start` or `MAILER_WORKSPACE`, else the nearest one above the cwd."""
    named = start or (
        Path(os.environ["MAILER_WORKSPACE"]) if os.environ.get("MAILER_WORKSPACE") else None
    )
    if named is not None:
        root = named.expanduser().resolve()
        if not (root / CONFIG_NAME).is_file():
            raise WorkspaceError(
                f"{root} is not a mailer workspace (no {CONFIG_NAME}); "
                f"make one with `mailer init {named}`"
            )
    else:
        cwd = Path.cwd().resolve()
        found = next((p for p in (cwd, *cwd.parents) if (p / CONFIG_NAME).is_file()), None)
        if found is None:
            raise WorkspaceError(
                f"no mailer workspace here ({cwd} has no {CONFIG_NAME}); make one with "
                "`mailer init DIR`, or name one with --workspace DIR or MAILER_WORKSPACE"
            )
        root = found
    return Workspace(
        root=root, settings=load_settings(root / CONFIG_NAME), database_url_override=db_url
    )


def config_text(*, db_url: str | None) -> str:
    """mailer.toml for a new workspace; with `db_url`, a shared database is named in it (so every
    later command uses it, and no SQLite file appears), without its password."""
    if db_url is None:
        return DEFAULT_CONFIG
    line = f"url = {json.dumps(strip_password(db_url))}"
    return DEFAULT_CONFIG.replace('# url = "sqlite:///mailer.db"', line, 1)


def strip_password(url: str) -> str:
    """The database URL without a password (the password goes in ~/.pgpass or PGPASSWORD)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def write_private(path: Path, text: str) -> None:
    """Write a file readable and writable by its owner only (0600), whatever the umask: it may
    hold a secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fd = -1
            fh.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


def create_workspace(*, root: Path, db_url: str | None = None) -> Workspace:
    """Write `mailer.toml` (owner-only) and the starter templates; the caller migrates the
    database. With `db_url` the workspace uses that (shared) database from then on."""
    root = root.expanduser().resolve()
    config = root / CONFIG_NAME
    if config.exists():
        raise WorkspaceError(f"{root} is a workspace already ({CONFIG_NAME} exists)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_private(config, config_text(db_url=db_url))
        templates = root / "templates"
        source = data_path("templates")
        if source.is_dir():
            shutil.copytree(source, templates, dirs_exist_ok=True)
        else:
            templates.mkdir(exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"{root}: cannot create workspace: {exc.strerror}") from exc
    return Workspace(root=root, settings=load_settings(config), database_url_override=db_url)


def data_path(name: str) -> Path:
    """Shipped data (`migrations`, `templates`, `seeds`): inside a wheel, or the source tree."""
    package = Path(__file__).resolve().parent
    bundled = package / "_data" / name
    if bundled.exists():
        return bundled
    return package.parent / name


# --------------------------------------------------------------------------- secrets on disk


def _loose(path: Path) -> str | None:
    """`readable by everyone` / `readable by its group`, or None when owner-only."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & stat.S_IROTH:
        return "readable by every user of this machine"
    if mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IWOTH):
        return "readable or writable by others"
    return None


def _command_files(command: str, *, cwd: Path) -> list[Path]:
    """The existing files a password_command names (`cat ~/.secret`, `gpg -d pw.gpg`)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    found = []
    for word in words[1:]:
        if word.startswith("-") and "=" in word:
            word = word.split("=", 1)[1]
        if not word or word.startswith("-"):
            continue
        path = Path(os.path.expanduser(word))
        if not path.is_absolute():
            path = cwd / path
        if path.is_file():
            found.append(path)
    return found


def secret_warnings(workspace: Workspace) -> list[str]:
    """One line per file holding a secret that others may read: mailer.toml, secret and key
    files in the workspace, files a `password_command` reads, the DKIM key."""
    warnings = []
    candidates: list[tuple[Path, str]] = [(workspace.root / CONFIG_NAME, "settings")]
    try:
        for entry in sorted(workspace.root.iterdir()):
            if entry.is_file() and entry.name.endswith(SECRET_SUFFIXES):
                candidates.append((entry, "workspace secret"))
    except OSError:
        pass
    for section in ("smtp", "imap"):
        command = workspace.setting(section, "password_command")
        if command:
            for path in _command_files(str(command), cwd=workspace.root):
                candidates.append((path, f"[{section}] password_command reads it"))
    key_file = workspace.setting("dkim", "key_file")
    if key_file:
        path = Path(os.path.expanduser(str(key_file)))
        candidates.append((path if path.is_absolute() else workspace.root / path, "DKIM key"))
    seen: set[Path] = set()
    for path, what in candidates:
        if path in seen:
            continue
        seen.add(path)
        loose = _loose(path)
        if loose:
            warnings.append(f"{path} ({what}) is {loose}; make it yours only: chmod 600 {path}")
    return warnings
