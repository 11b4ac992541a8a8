"""Workspaces: where a campaign office keeps its settings, database and templates."""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailer.errors import WorkspaceError

CONFIG_NAME = "mailer.toml"
DEFAULT_DB_NAME = "mailer.db"

DEFAULT_CONFIG = """\
# mailer workspace settings. Every key is optional; the values shown are the defaults.

[database]
# Any SQLAlchemy URL. Default: the SQLite file mailer.db beside this file.
# A shared team database: url = "postgresql+psycopg://user@host/dbname"
# url = "sqlite:///mailer.db"

[campaign]
# Language used when a contact has none, and no variant exists for theirs.
default_language = "en"
# Mailbox that receives "unsubscribe" requests (the List-Unsubscribe mailto).
# unsubscribe_mailto = "unsubscribe@example.org"
# An https page that unsubscribes with one click ({token} is replaced per letter); serve it
# with `mailer unsubscribe serve` behind your https web server (see the README).
# unsubscribe_url = "https://example.org/unsubscribe?t={token}"
# Bounces come back to office+TOKEN@... (true: the From address; or name a mailbox), so each is
# matched to its letter even when its content is mangled. The mailbox must accept + addresses.
# verp = true

[smtp]
# The server is given to `mailer send --smtp URL`; a password never goes in this file.
# password_command = "pass show mailer/smtp"

[dkim]
# Sign every letter (RSA or Ed25519 key, PEM); `mailer check` prints the DNS record to publish.
# domain = "example.org"
# selector = "mail2026"
# key_file = "dkim/mail2026.key"
"""


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
        if rest and rest != ":memory:":
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


def create_workspace(*, root: Path, db_url: str | None = None) -> Workspace:
    """Write `mailer.toml` and the starter templates; the caller migrates the database."""
    root = root.expanduser().resolve()
    config = root / CONFIG_NAME
    if config.exists():
        raise WorkspaceError(f"{root} is a workspace already ({CONFIG_NAME} exists)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        config.write_text(DEFAULT_CONFIG, encoding="utf-8")
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
