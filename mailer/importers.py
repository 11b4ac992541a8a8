"""Rows → the store: contacts upserted by address, partner-city ties, signatories, suppressions.

`tables` turns a file into rows and `fields` says what each column and value means; this module
validates rows and writes them. A contacts import streams in chunks with bounded memory: this
thread reads and validates while one database thread writes (on SQLite a chunk's new contacts go
in as one JSON text, so SQLite works with the GIL released). The whole import is one transaction,
so `--strict`, `--dry-run`, a file that turns out unreadable half-way, and Ctrl-C all leave
nothing written. Text for people comes from the `format_*` functions beside `ImportSummary`.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import gc
import json
import operator
import sys
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table as SqlTable
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from mailer import addresses, db
from mailer.audience import suppressed_among
from mailer.errors import (
    DatabaseError,
    ImportFileError,
    InvalidValueError,
    StrictImportError,
    quoted,
)
from mailer.fields import (
    CONTACT_FIELDS,
    CONTACT_SYNONYMS,
    CONTROL,
    PARTNERSHIP_FIELDS,
    PARTNERSHIP_SYNONYMS,
    SIGNATORY_FIELDS,
    SIGNATORY_SYNONYMS,
    SUPPRESSION_SYNONYMS,
    Columns,
    KnownCity,
    RowRejected,
    UkrainianCities,
    UnknownColumn,
    check_length,
    clean_cells,
    lost_letter,
    parse_country,
    parse_language,
    parse_name_uk,
    parse_role,
    resolve_columns,
    split_tags,
)
from mailer.models import (
    PARTNERSHIP_KINDS,
    City,
    Contact,
    ContactTag,
    ImportRecord,
    Partnership,
    Signatory,
    Suppression,
    SuppressionReason,
    city_key,
    utcnow,
)
from mailer.tables import Table
from mailer.zones import canonical_zone

CHUNK_ROWS = 2_000
# How `import_contacts` runs its two threads (see there).
_SWITCH_INTERVAL = 0.0002
_GC_THRESHOLD = 20_000
_QUEUED_CHUNKS = 1
# How many rejected rows an import prints; the rest are in the import record (and --rejects).
MAX_REJECT_LINES = 20
_UNKNOWN_LINES = 10
_LOST_LETTER = (
    "has '?' where a letter should be: the file was saved in an encoding without that letter "
    "(save it as CSV UTF-8 and import it again)"
)


class StrictImportFailed(StrictImportError):
    """`--strict` refused the file; carries the summary so the caller can list the rejects."""

    def __init__(self, message: str, *, summary: ImportSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Reject:
    row: int
    column: str
    reason: str

    def to_json(self) -> dict[str, int | str]:
        return {"row": self.row, "column": self.column, "reason": self.reason}


@dataclass(frozen=True)
class Change:
    """A stored contact's name or city that a row changed."""

    row: int
    email: str
    field: str
    old: str | None
    new: str | None


@dataclass(kw_only=True)
class ImportSummary:
    file: str
    kind: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejects: list[Reject] = field(default_factory=list)
    # Rows imported as they are, with something the user should look at (a lost letter).
    warnings: list[Reject] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    # Columns that are no field, and the fields no column gave (what a --map could read).
    unknown: list[UnknownColumn] = field(default_factory=list)
    missing: tuple[str, ...] = ()
    suppressed: int = 0
    dry_run: bool = False
    encoding: str | None = None
    delimiter: str | None = None

    @property
    def rejected(self) -> int:
        return len(self.rejects)


def format_reject(reject: Reject, *, file: str) -> str:
    """FILE:ROW: column: reason (the header is row 1, as in a spreadsheet), one bounded line."""
    return f"{file}:{reject.row}: {_clip(reject.column, 60)}: {_clip(reject.reason, 300)}"


def format_warning(warning: Reject, *, file: str) -> str:
    return f"{file}:{warning.row}: {_clip(warning.column, 60)}: warning: {warning.reason}"


def format_change(change: Change, *, file: str) -> str:
    return (
        f"{file}:{change.row}: {change.email}: {change.field} changed from "
        f"{quoted(change.old or '')} to {quoted(change.new or '')}"
    )


def format_unknown(column: UnknownColumn, *, file: str, missing: Sequence[str]) -> str:
    """What became of a column that is no field, and the --map that would read it as one."""
    label = column.label.replace("'", "")
    done = (
        f"kept as the attribute {column.attribute}" if column.attribute is not None else "not read"
    )
    if column.suggestion is not None:
        hint = f"--map '{label}={column.suggestion}' reads it as the {column.suggestion}"
    elif missing:
        hint = f"--map '{label}=FIELD' reads it as one of {', '.join(missing)}"
    else:
        hint = "every field has its column already"
    return f"{file}: column {quoted(column.label)} is not a field: {done}; {hint}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _capped(lines: list[str], more: int, what: str) -> list[str]:
    return [*lines, f"... and {more} more {what}"] if more > 0 else lines


def format_counts(summary: ImportSummary) -> str:
    """The one line that closes an import: what it did to the store."""
    if summary.kind == "suppressions":
        return (
            f"{summary.file}: {summary.added} suppressed, {summary.unchanged} already "
            f"suppressed, {summary.rejected} rejected"
        )
    text = (
        f"{summary.file}: {summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged, {summary.rejected} rejected"
    )
    if summary.suppressed:
        text += f"; {summary.suppressed} of them suppressed (they stay suppressed)"
    if summary.dry_run:
        text += " (dry run: nothing written)"
    return text


def format_import(
    summary: ImportSummary,
    *,
    rejects_path: Path | None = None,
    max_rejects: int = MAX_REJECT_LINES,
) -> str:
    """What an import tells its user: the first rejected rows, warnings and changed contacts,
    the columns it did not understand, then `format_counts`."""
    file = summary.file
    lines = [format_reject(reject, file=file) for reject in summary.rejects[:max_rejects]]
    more = summary.rejected - max_rejects
    if more > 0:
        if summary.kind == "suppressions":
            lines.append(f"... and {more} more rejected rows")
        else:
            where = f"{rejects_path} and the import record" if rejects_path else "the import record"
            lines.append(f"... and {more} more rejected rows (all listed in {where})")
    lines += _capped(
        [format_warning(w, file=file) for w in summary.warnings[:max_rejects]],
        len(summary.warnings) - max_rejects,
        "warnings",
    )
    lines += _capped(
        [format_change(c, file=file) for c in summary.changes[:max_rejects]],
        len(summary.changes) - max_rejects,
        "changed names and cities",
    )
    lines += _capped(
        [
            format_unknown(column, file=file, missing=summary.missing)
            for column in summary.unknown[:_UNKNOWN_LINES]
        ],
        len(summary.unknown) - _UNKNOWN_LINES,
        "columns that are no field",
    )
    lines.append(format_counts(summary))
    return "\n".join(lines)


# --------------------------------------------------------------------------- addresses


class EmailChecker:
    """The import's address check: `addresses.validated` (email-validator with a fast path)."""

    def __call__(self, address: str) -> str:
        """The normalised address; `ValueError` with the reason otherwise."""
        return addresses.validated(address)


# --------------------------------------------------------------------------- shared machinery


class _FirstRows:
    """The file row that first named each contact in this import, kept by contact id.

    Duplicates inside a file are found through the database's own unique email index: every
    row is looked up there anyway, and a contact this import has already met is a duplicate.
    Ids are dense, so 4 bytes a contact (4 MB at a million) replace a set of addresses (a
    Python dict of a million costs ~115 MB); ids past `_DENSE` (a PostgreSQL sequence that
    many rolled-back imports moved far ahead) go to a dict, so memory stays bounded.
    """

    _DENSE = 1 << 24

    def __init__(self) -> None:
        self._rows = array("I")
        self._far: dict[int, int] = {}

    def get(self, contact_id: int) -> int:
        rows = self._rows
        if contact_id < len(rows):
            return rows[contact_id]
        return self._far.get(contact_id, 0) if contact_id >= self._DENSE else 0

    def mark(self, contact_id: int, number: int) -> None:
        rows = self._rows
        if contact_id >= len(rows):
            if contact_id >= self._DENSE:
                self._far[contact_id] = number
                return
            grow = min(max(contact_id + 1, 2 * len(rows), 1024), self._DENSE) - len(rows)
            rows.frombytes(bytes(grow * rows.itemsize))
        rows[contact_id] = number

    def mark_all(self, contact_ids: Sequence[int], numbers: Sequence[int]) -> None:
        if (
            isinstance(contact_ids, range)
            and contact_ids.step == 1
            and contact_ids
            and contact_ids[-1] < self._DENSE
        ):
            # New SQLite contacts: one slice instead of a call per row.
            self.mark(contact_ids[-1], 0)
            self._rows[contact_ids[0] : contact_ids[-1] + 1] = array("I", numbers)
            return
        for contact_id, number in zip(contact_ids, numbers, strict=True):
            self.mark(contact_id, number)


class _RejectSink:
    """Collects rejects (sorted per chunk) and writes them to `--rejects FILE` as they come."""

    def __init__(self, *, stack: ExitStack, path: Path | None, header: Sequence[str]) -> None:
        self.rejects: list[Reject] = []
        self._pending: list[tuple[Reject, Sequence[str]]] = []
        self._writer: Any = None
        self._width = len(header)
        if path is not None:
            try:
                # utf-8-sig: Excel opens it with the right characters.
                fh = stack.enter_context(path.open("w", encoding="utf-8-sig", newline=""))
            except OSError as exc:
                raise ImportFileError(f"{path}: cannot write: {exc.strerror}") from exc
            self._writer = csv.writer(fh)
            self._writer.writerow([*header, "reject_reason"])

    def add(self, row: int, column: str, reason: str, cells: Sequence[str]) -> None:
        self._pending.append((Reject(row, column, reason), cells))

    def flush(self, upto: int | None = None) -> None:
        """Record (and write) the rejects collected so far, in row order; with `upto`, only
        those of rows up to that one."""
        self._pending.sort(key=lambda item: item[0].row)
        keep = []
        for reject, cells in self._pending:
            if upto is not None and reject.row > upto:
                keep.append((reject, cells))
                continue
            self.rejects.append(reject)
            if self._writer is not None:
                # A row the CSV reader could not split has no cells: keep the columns aligned.
                shown = cells or [""] * self._width
                self._writer.writerow([*shown, f"{reject.column}: {reject.reason}"])
        self._pending = keep


_INSERT_CITY = insert(City).returning(City.id)
_LOOKUP_COLUMNS = (
    "id",
    "email",
    "name",
    "title",
    "salutation",
    "organisation",
    "language",
    "timezone",
    "city_id",
    "attributes",
    "tags",
)
# Where each column is in a row that `_ContactImport._existing` returns.
_OLD = {name: index for index, name in enumerate(_LOOKUP_COLUMNS)}
_OLD_ID, _OLD_EMAIL, _OLD_CITY = _OLD["id"], _OLD["email"], _OLD["city_id"]
_OLD_ATTRIBUTES, _OLD_TAGS, _OLD_NAME = _OLD["attributes"], _OLD["tags"], _OLD["name"]


class _Cities:
    """Find-or-create cities by (folded name, country), cached for the whole import."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._ids: dict[tuple[str, str | None], int] = {}
        # Same spelling as a row seen before: skip folding the name again.
        self._spelled: dict[tuple[str, str | None], int] = {}
        self._regions: dict[int, str | None] = {}
        self._names: dict[int, str] = {}
        for city_id, key, country, region, name in session.execute(
            select(City.id, City.name_key, City.country, City.region, City.name)
        ):
            self._ids.setdefault((key, country), city_id)
            self._regions[city_id] = region
            self._names[city_id] = name

    def name_of(self, city_id: int | None) -> str | None:
        return None if city_id is None else self._names.get(city_id)

    def ukrainian(self) -> list[tuple[str, str | None]]:
        """(name, region) of the Ukrainian cities stored."""
        return [
            (self._names[city_id], self._regions.get(city_id))
            for (_, country), city_id in self._ids.items()
            if country == "UA"
        ]

    def cached(self, city: tuple[str, str | None, str | None]) -> int | None:
        """What `get(*city)` returns where that needs no database, else None. Also called from
        the validating thread: the dicts only gain entries and regions, so an id found here is
        the one `get` gives later on the database thread."""
        name, country, region = city
        city_id = self._spelled.get((name, country))
        if city_id is not None and (not region or self._regions.get(city_id)):
            return city_id
        return None

    def get(self, name: str, country: str | None, region: str | None) -> int:
        city_id = self._spelled.get((name, country))
        if city_id is not None and (not region or self._regions.get(city_id)):
            return city_id
        city_id = self._get(name, country, region)
        self._spelled[name, country] = city_id
        return city_id

    def _get(self, name: str, country: str | None, region: str | None) -> int:
        key = (city_key(name), country)
        city_id = self._ids.get(key)
        if city_id is None:
            city_id = self._session.execute(
                _INSERT_CITY,
                {"name": name, "name_key": key[0], "country": country, "region": region or None},
            ).scalar_one()
            self._ids[key] = city_id
            self._regions[city_id] = region or None
            self._names[city_id] = name
        elif region and not self._regions.get(city_id):
            self._session.execute(update(City).where(City.id == city_id).values(region=region))
            self._regions[city_id] = region
        return city_id


class _Places:
    """The cities of a partnerships or signatories import: stored ones, and the known Ukrainian
    cities (the seed list and those stored) that a Ukrainian city must be one of."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.cities = _Cities(session)
        self.ukrainian = UkrainianCities(_seed_cities())
        for name, region in self.cities.ukrainian():
            self.ukrainian.add(KnownCity(name, region))
        # Cities whose Ukrainian name this import has already seen to.
        self._named: set[int] = set()

    def ukrainian_city(self, name: str, *, region: str | None, new_city: bool, column: str) -> int:
        """The id of the Ukrainian city `name` spells (made as the list writes it), or of a new
        one with `new_city`; `RowRejected` with a suggestion otherwise."""
        try:
            known = self.ukrainian.match(name)
        except ValueError as exc:
            if not new_city:
                raise RowRejected(column, str(exc)) from None
            known = KnownCity(name, region)
            self.ukrainian.add(known)
        city_id = self.cities.get(known.name, "UA", region or known.region)
        if known.name_uk and city_id not in self._named:
            # The known list's Ukrainian name, for a city stored without one.
            self._named.add(city_id)
            self.session.execute(
                update(City)
                .where(City.id == city_id, City.name_uk.is_(None))
                .values(name_uk=known.name_uk)
            )
        return city_id

    def name_in_ukrainian(self, city_id: int, name_uk: str) -> bool:
        """Store a city's Ukrainian name; whether that changed it."""
        result = self.session.execute(
            update(City)
            .where(City.id == city_id)
            .where((City.name_uk.is_(None)) | (City.name_uk != name_uk))
            .values(name_uk=name_uk)
        )
        return bool(getattr(result, "rowcount", 0))


@functools.cache
def _seed_cities() -> tuple[KnownCity, ...]:
    """The known Ukrainian cities: `seeds/ukrainian_cities.csv` (name, region, name_uk)."""
    from mailer.config import data_path
    from mailer.tables import read_table

    return tuple(
        KnownCity(
            row["name"],
            row.get("region") or None,
            tuple(v for v in (row.get("name_uk"),) if v),
            name_uk=row.get("name_uk") or None,
        )
        for _, row in read_table(data_path("seeds") / "ukrainian_cities.csv")
        if row.get("country", "UA") == "UA"
    )


def _executemany(session: Session, statement: Any, rows: list[dict[str, Any]]) -> None:
    """Many rows of already-converted values straight to the driver's executemany.

    SQLAlchemy's own executemany costs ~20 µs a row in parameter processing, most of an
    import's budget; the statement is still compiled by SQLAlchemy for the right dialect.
    """
    connection = session.connection()
    compiled = statement.compile(dialect=connection.dialect, column_keys=list(rows[0]))
    if compiled.positional:
        order = compiled.positiontup or []
        getter = operator.itemgetter(*order)
        if len(order) == 1:
            connection.exec_driver_sql(compiled.string, [(getter(row),) for row in rows])
        else:
            connection.exec_driver_sql(compiled.string, [getter(row) for row in rows])
    else:
        connection.exec_driver_sql(compiled.string, rows)


def _large_sqlite_cache(session: Session) -> Callable[[], None]:
    """A big import touches the email index all over: 32 MB of page cache (instead of SQLite's
    2 MB) keeps it from re-reading spilled pages. Returns how to give the pooled connection its
    default back."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return lambda: None
    raw: Any = connection.connection.driver_connection
    before = int(raw.execute("PRAGMA cache_size").fetchone()[0])
    raw.execute("PRAGMA cache_size=-32768")
    return lambda: raw.execute(f"PRAGMA cache_size={before}").close()


def _write_session(factory: sessionmaker[Session]) -> tuple[Session, Callable[[], None]]:
    """A session whose transaction holds the database's write lock from its start, and how to
    close it.

    On SQLite the transaction begins with BEGIN IMMEDIATE, waiting within the busy timeout for
    another writer (a send) to finish: a deferred transaction that reads first and writes later
    fails at once, busy timeout or not, when another process wrote in between.
    """
    with factory() as probe:
        bind = probe.get_bind()
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        session = factory()
        return session, session.close
    connection = bind.connect()
    connection.info["immediate"] = True
    session = factory(bind=connection)

    def close() -> None:
        try:
            session.close()
        finally:
            connection.info.pop("immediate", None)
            connection.close()

    try:
        session.connection()
    except BaseException:
        close()
        raise
    return session, close


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database that is busy, full or read-only is one `DatabaseError` saying what to do.

    The import is one transaction, so whatever failed, nothing of it was written.
    """
    try:
        yield
    except OperationalError as exc:
        detail = str(exc.orig).strip()
        folded = detail.casefold()
        if "locked" in folded or "busy" in folded:
            seconds = db.SQLITE_BUSY_TIMEOUT_MS / 1000
            message = (
                "the database is busy: another mailer process (a send, another import) kept "
                f"writing to it for more than {seconds:g} s; nothing was imported: run the "
                "import again when it has finished"
            )
        elif "full" in folded or "no space" in folded or "could not extend" in folded:
            message = (
                "the disk is full (or the database reached its size limit): nothing was "
                "imported; free some space and run the import again"
            )
        elif "readonly" in folded or "read-only" in folded or "read only" in folded:
            message = (
                "the database cannot be written (read-only): nothing was imported; check the "
                "file's permissions"
            )
        else:
            message = f"database error, nothing was imported: {_clip(detail, 300)}"
        raise DatabaseError(message) from None


def _finish(
    session: Session,
    *,
    summary: ImportSummary,
    table: Table,
    path: Path,
    strict: bool,
    dry_run: bool,
) -> None:
    if strict and summary.rejects:
        session.rollback()
        raise StrictImportFailed(
            f"{summary.file}: {summary.rejected} row(s) rejected and --strict given: "
            "nothing was written",
            summary=summary,
        )
    if dry_run:
        session.rollback()
        return
    session.add(
        ImportRecord(
            file_name=str(path),
            sha256=table.sha256,
            kind=summary.kind,
            added=summary.added,
            updated=summary.updated,
            unchanged=summary.unchanged,
            rejected=summary.rejected,
            rejects=[r.to_json() for r in summary.rejects],
            dry_run=False,
        )
    )
    _log_import(session, summary=summary, path=path, sha256=table.sha256)
    session.commit()


def _log_import(session: Session, *, summary: ImportSummary, path: Path, sha256: str) -> None:
    """The import's audit event (who imported which file, what it did), in its transaction."""
    from mailer import outbox
    from mailer.clock import utcnow
    from mailer.identity import Actor
    from mailer.models import EventKind

    outbox.log_change(
        session,
        kind=EventKind.IMPORTED,
        detail=f"import {summary.kind} {path.name} (sha256 {sha256[:12]}): {summary.added} "
        f"added, {summary.updated} updated, {summary.unchanged} unchanged, "
        f"{summary.rejected} rejected",
        actor=Actor.current(),
        at=utcnow(),
    )


# --------------------------------------------------------------------------- contacts

_CONTACTS = cast(SqlTable, Contact.__table__)
_CONTACT_TAGS = cast(SqlTable, ContactTag.__table__)
# The same tables without column types: rows are written with values converted once by the real
# types' processors (JSON per row, the timestamp once per import) instead of per row and column,
# which triples the insert rate.
_CONTACTS_RAW = sa_table(_CONTACTS.name, *(sa_column(col.name) for col in _CONTACTS.c))
_CONTACT_TAGS_RAW = sa_table(_CONTACT_TAGS.name, sa_column("contact_id"), sa_column("tag"))
# In the table's column order, so new rows go to the driver as they are.
_CONTACT_SCALARS = ("name", "title", "salutation", "language", "organisation", "timezone")
_LANGUAGE_SLOT = _CONTACT_SCALARS.index("language")
_TIMEZONE_SLOT = _CONTACT_SCALARS.index("timezone")
_NAME_SLOT = _CONTACT_SCALARS.index("name")
# The order of the tuples new contacts are written as (SQLite puts the id in front).
_NEW_CONTACT_COLUMNS = (
    "email",
    *_CONTACT_SCALARS,
    "city_id",
    "attributes",
    "tags",
    "created_at",
    "updated_at",
)
# For SQLite, whose JSON columns are plain text: the C encoder called directly, compact, with
# non-ASCII kept, is about 4x cheaper than the JSON type's `json.dumps` per value, and reads back
# the same (json.loads, SQLite's json_extract). What it is given is built afresh, without
# cycles: no need to track every list and dict it meets.
_SQLITE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
# A JSON string literal, non-ASCII kept (the C function behind ensure_ascii=False).
_json_string = json.encoder.encode_basestring


def _sqlite_json_strings(mapping: dict[str, str]) -> str:
    """`_SQLITE_JSON.encode` of a dict of strings (a row's attributes) at a third of the cost."""
    string = _json_string
    return "{" + ",".join([f"{string(k)}:{string(v)}" for k, v in mapping.items()]) + "}"


# SQLite: a chunk's new contacts go in as one JSON array of rows, a statement per table, so that
# SQLite does the whole chunk in C with the GIL released (the driver's executemany takes it back
# for every row) while the other thread validates the next chunk. A row is these values in this
# order; ids are the first new id (?2) plus the row's index. Attributes and tags are nested in the
# row as they are: json_extract gives a nested object or array back as the very text it was
# given (each value's text as is, compact), which is what `_SQLITE_JSON` writes for the column.
# MATERIALIZED: each row's JSON is rendered and parsed once, not once a column.
_SQLITE_ROW = ("email", *_CONTACT_SCALARS, "attributes", "tags", "city_id")
_SQLITE_CITY = _SQLITE_ROW.index("city_id")
_SQLITE_INSERT_CONTACTS = (
    "WITH r AS MATERIALIZED (SELECT key, value FROM json_each(?1)) "
    f"INSERT INTO {_CONTACTS.name} (id, {', '.join(_SQLITE_ROW)}, created_at, updated_at) "
    "SELECT ?2 + key, "
    + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(_SQLITE_ROW)))
    + ", ?3, ?3 FROM r"
)
# The tag rows of the contacts just inserted (ids ?1 to ?2), from their tags column: cheaper
# than the chunk's JSON again.
_SQLITE_INSERT_TAGS = (
    f"INSERT INTO {_CONTACT_TAGS.name} (contact_id, tag) SELECT c.id, t.value "
    f"FROM {_CONTACTS.name} AS c, json_each(c.tags) AS t WHERE c.id BETWEEN ?1 AND ?2"
)
_SQLITE_LOOKUP = (
    f"SELECT {', '.join(_LOOKUP_COLUMNS)} FROM {_CONTACTS.name} "
    "WHERE email IN (SELECT value FROM json_each(?))"
)


def _sqlite_json_rows(connection: Connection) -> bool:
    """Whether this SQLite takes JSON rows: it has the JSON functions (built in from 3.38, an
    option before) and AS MATERIALIZED (3.35)."""
    raw: Any = connection.connection.driver_connection
    try:
        raw.execute(
            "WITH r AS MATERIALIZED (SELECT key, value FROM json_each('[[1]]')) "
            "SELECT json_extract(value, '$[0]') FROM r"
        ).fetchall()
    except connection.dialect.loaded_dbapi.OperationalError:
        return False
    return True


_SCALAR_LIMITS = {
    "name": 300,
    "title": 300,
    "salutation": 300,
    "organisation": 300,
    "language": 35,
    "timezone": 64,
}


@dataclass(slots=True)
class _ContactRow:
    number: int
    cells: list[str]
    email: str
    # One per _CONTACT_SCALARS field: None where the file gives no value.
    scalars: list[str | None]
    attributes: dict[str, str]
    tags: frozenset[str]
    city: tuple[str, str | None, str | None] | None


class _DriverStatement:
    """A statement compiled once by SQLAlchemy for the dialect, run with the driver's
    executemany on rows given as tuples in `keys` order.

    SQLAlchemy's own executemany costs ~20 µs a row in parameter processing, most of an
    import's budget; tuples cost less to build than dicts, and a positional driver (sqlite3)
    takes them as they are.
    """

    def __init__(self, connection: Connection, statement: Any, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=connection.dialect, column_keys=list(keys))
        self.sql = compiled.string
        self.keys = tuple(keys)
        self.named = not compiled.positional
        order = [self.keys.index(name) for name in compiled.positiontup or []]
        self.order = None if self.named or order == list(range(len(keys))) else order

    def run(self, connection: Connection, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        params: Any = rows
        if self.named:
            params = [dict(zip(self.keys, row, strict=True)) for row in rows]
        elif self.order is not None:
            order = self.order
            params = [tuple(row[i] for i in order) for row in rows]
        connection.exec_driver_sql(self.sql, params)


class _SortedTags(dict[frozenset[str], list[str]]):
    """Each tag set as a sorted list, made once: a file has few distinct ones."""

    def __missing__(self, tags: frozenset[str]) -> list[str]:
        value = self[tags] = sorted(tags)
        return value


class _ContactValidator:
    """Checks one row of a contacts file (no database needed)."""

    def __init__(self, *, table: Table, columns: Columns, tags: Sequence[str]) -> None:
        self.table = table
        self.columns = columns
        self.extra_tags = frozenset(t.strip() for t in tags if t.strip())
        self.check_email = EmailChecker()
        f = columns.fields
        self.i_email = f["email"]
        self.scalars = [
            (slot, f[name], _SCALAR_LIMITS[name])
            for slot, name in enumerate(_CONTACT_SCALARS)
            if name in f
        ]
        self.i_city = f.get("city")
        self.i_country = f.get("country")
        self.i_region = f.get("region")
        self.i_tags = f.get("tags")
        # Rows imported with something to look at; appended on the validating thread only.
        self.warnings: list[Reject] = []

    def validate(self, number: int, raw: list[str]) -> _ContactRow:
        columns = self.columns
        width = len(columns.header)
        if self.table.kind == "csv":
            if len(raw) != width:
                raise RowRejected("(row)", f"{len(raw)} cells, the header has {width}")
        else:
            if any(c.strip() for c in raw[width:]):
                raise RowRejected("(row)", "a value in a column that has no header")
            raw = raw[:width] + [""] * (width - len(raw))
        cells = clean_cells(raw, columns=columns)
        label = columns.label
        address = cells[self.i_email]
        if not address:
            raise RowRejected(label(self.i_email), "no address")
        try:
            email = self.check_email(address)
        except ValueError as exc:
            raise RowRejected(label(self.i_email), str(exc)) from None
        scalars: list[str | None] = [None] * len(_CONTACT_SCALARS)
        for slot, index, limit in self.scalars:
            value = cells[index]
            if not value:
                continue
            if len(value) > limit:
                raise RowRejected(label(index), f"{len(value)} characters, more than {limit}")
            if slot == _LANGUAGE_SLOT:
                try:
                    value = parse_language(value)
                except ValueError as exc:
                    raise RowRejected(label(index), str(exc)) from None
            elif slot == _TIMEZONE_SLOT:
                try:
                    value = canonical_zone(value)
                except ValueError as exc:
                    raise RowRejected(label(index), str(exc)) from None
            scalars[slot] = value
        country: str | None = None
        if self.i_country is not None and cells[self.i_country]:
            try:
                country = parse_country(cells[self.i_country])
            except ValueError as exc:
                raise RowRejected(label(self.i_country), str(exc)) from None
        region = cells[self.i_region] if self.i_region is not None else ""
        if len(region) > 200 and self.i_region is not None:
            check_length(label(self.i_region), region, 200)
        attributes: dict[str, str] = {}
        for i, key in columns.extra:
            value = cells[i]
            if value:
                attributes[key] = value
        city = None
        city_name = cells[self.i_city] if self.i_city is not None else ""
        if city_name:
            if len(city_name) > 200 and self.i_city is not None:
                check_length(label(self.i_city), city_name, 200)
            city = (city_name, country, region or None)
        else:
            # Without a city there is no row to hang country/region on: keep them for templates.
            if country:
                attributes["country"] = country
            if region:
                attributes["region"] = region
        tags = self.extra_tags
        if self.i_tags is not None and cells[self.i_tags]:
            split = split_tags(cells[self.i_tags])
            if split.too_long:
                raise RowRejected(
                    label(self.i_tags), f"a tag over 100 characters: {quoted(split.too_long)}"
                )
            tags = tags | split if tags else split
        # Imported as it is, but worth a look: a "?" where a lossy save dropped a letter.
        lost = lost_letter(cells)
        if lost is not None and lost != self.i_email:
            self.warnings.append(
                Reject(number, label(lost), f"{quoted(cells[lost])} {_LOST_LETTER}")
            )
        return _ContactRow(number, raw, email, scalars, attributes, tags, city)


class _ContactImport(_ContactValidator):
    """Writes validated rows: one instance, used on the database thread only."""

    def __init__(
        self,
        *,
        session: Session,
        table: Table,
        columns: Columns,
        tags: Sequence[str],
        summary: ImportSummary,
    ) -> None:
        super().__init__(table=table, columns=columns, tags=tags)
        self.session = session
        self.summary = summary
        self.cities = _Cities(session)
        self.first_rows = _FirstRows()
        self.update_columns = sorted(
            {_CONTACT_SCALARS[slot] for slot, _, _ in self.scalars}
            | ({"city_id"} if self.i_city is not None else set())
            | {"attributes", "tags"}
        )
        # Only a count for the summary: skip the look-ups when nobody is suppressed at all.
        self.any_suppressed = session.scalar(select(Suppression.id).limit(1)) is not None
        connection = session.connection()
        dialect = connection.dialect
        sqlite = dialect.name == "sqlite"
        # New contacts as JSON rows, a statement a chunk (see `_SQLITE_ROW`); elsewhere (and on
        # a SQLite without the JSON functions built in) the driver's executemany.
        self.json_rows = sqlite and _sqlite_json_rows(connection)
        # With JSON rows, this import gives new contacts their ids itself (see `_insert_rows`).
        self.next_id: int | None = None
        # Set by the database thread, read by `prepare`: whether to build new rows ahead.
        self.expect_new = True
        self.insert_contacts = _DriverStatement(
            connection, insert(_CONTACTS_RAW), _NEW_CONTACT_COLUMNS
        )
        self.insert_tags = _DriverStatement(
            connection, insert(_CONTACT_TAGS_RAW), ("contact_id", "tag")
        )
        json_processor = _CONTACTS.c.attributes.type.dialect_impl(dialect).bind_processor(dialect)
        self.to_json: Callable[[Any], Any] = json_processor or (lambda value: value)
        self.attributes_json: Callable[[dict[str, str]], Any] = self.to_json
        if sqlite:
            self.to_json = _SQLITE_JSON.encode
            self.attributes_json = _sqlite_json_strings
        json_reader = _CONTACTS.c.attributes.type.dialect_impl(dialect).result_processor(
            dialect, None
        )
        self.from_json: Callable[[Any], Any] = json_reader or (lambda value: value)
        self._lookup_statements: dict[int, Any] = {}
        self._tags_json: dict[frozenset[str], Any] = {}
        # Each tag set sorted, for `sqlite_values` (also on the validating thread).
        self._tag_lists = _SortedTags()
        time_processor = _CONTACTS.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        now = utcnow()
        self.now_param = time_processor(now) if time_processor else now

    def prepare(
        self,
        rows: list[_ContactRow],
        rejects: list[tuple[int, str, str, list[str]]],
        upto: int | None,
    ) -> _Chunk:
        """All of a chunk's work that needs no database, done on the validating thread: the
        database thread holds the GIL as little as possible, so the two run side by side."""
        firsts: list[_ContactRow] = []
        repeats: list[tuple[_ContactRow, int]] = []
        first_of: dict[str, int] = {}
        for row in rows:
            first = first_of.setdefault(row.email, row.number)
            if first == row.number:
                firsts.append(row)
            else:
                repeats.append((row, first))
        if not self.json_rows:
            return _Chunk(rejects, upto, firsts, repeats, list(first_of))
        chunk = _Chunk(rejects, upto, firsts, repeats, _SQLITE_JSON.encode(list(first_of)))
        # A re-import finds (nearly) every row stored: new rows are built only where the last
        # chunk had mostly new rows, and on the database thread otherwise.
        if self.expect_new:
            values = chunk.values = self.sqlite_values(firsts)
            pairs = zip(values, firsts, strict=True)
            if not any(v[_SQLITE_CITY] is None and row.city is not None for v, row in pairs):
                chunk.data = _SQLITE_JSON.encode(values)
        return chunk

    def sqlite_values(self, rows: list[_ContactRow]) -> list[list[Any]]:
        """New rows as `_SQLITE_ROW`; the city id is None where only the database can tell it."""
        tags = self._tag_lists
        city = self.cities.cached
        return [
            [
                row.email,
                *row.scalars,
                row.attributes,
                tags[row.tags],
                None if row.city is None else city(row.city),
            ]
            for row in rows
        ]

    def flush(self, chunk: _Chunk) -> list[tuple[int, str, str, list[str]]]:
        """Write one chunk; returns the rows rejected as duplicates (row, column, reason, cells)."""
        rejects: list[tuple[int, str, str, list[str]]] = []
        if not chunk.firsts:
            return rejects
        existing = self._existing(chunk.emails)
        first_rows = self.first_rows
        fresh = chunk.firsts
        known: list[tuple[_ContactRow, Sequence[Any]]] = []
        if existing:
            fresh = []
            for row in chunk.firsts:
                old = existing.get(row.email)
                if old is None:
                    fresh.append(row)
                    continue
                first = first_rows.get(old[_OLD_ID])
                if first:
                    rejects.append(self._duplicate(row, first))
                else:
                    first_rows.mark(old[_OLD_ID], row.number)
                    known.append((row, old))
        for row, first in chunk.repeats:
            old = existing.get(row.email)
            # A stored contact's first row may be in an earlier chunk.
            rejects.append(self._duplicate(row, first_rows.get(old[_OLD_ID]) if old else first))
        self.expect_new = len(fresh) * 2 >= len(chunk.firsts)
        tag_rows: list[tuple[int, str]] = []
        if fresh:
            ids: Sequence[int]
            if self.json_rows:
                ids = self._insert_rows(chunk, fresh, all_fresh=not existing)
            else:
                ids = self._insert(fresh, tag_rows)
            first_rows.mark_all(ids, [row.number for row in fresh])
        if known:
            self._update(known, tag_rows)
        self.insert_tags.run(self.session.connection(), tag_rows)
        self.summary.added += len(fresh)
        if self.any_suppressed:
            emails = [row.email for row in fresh] + [row.email for row, _ in known]
            self.summary.suppressed += len(suppressed_among(self.session, emails))
        return rejects

    def _duplicate(self, row: _ContactRow, first: int) -> tuple[int, str, str, list[str]]:
        return (
            row.number,
            self.columns.label(self.i_email),
            f"duplicate of row {first} ({row.email})",
            row.cells,
        )

    def _insert(self, rows: list[_ContactRow], tag_rows: list[tuple[int, str]]) -> Sequence[int]:
        """Insert new contacts with the driver's executemany and add their tags to `tag_rows`;
        returns their ids in order."""
        cities = self.cities
        city_ids = [None if row.city is None else cities.get(*row.city) for row in rows]
        to_json = self.attributes_json
        tags_json = self.tags_json
        now = self.now_param
        self.insert_contacts.run(
            self.session.connection(),
            [
                (
                    row.email,
                    *row.scalars,
                    city_id,
                    to_json(row.attributes),
                    tags_json(row.tags),
                    now,
                    now,
                )
                for row, city_id in zip(rows, city_ids, strict=True)
            ],
        )
        found = self._existing([row.email for row in rows])
        ids = [found[row.email][_OLD_ID] for row in rows]
        tag_rows.extend(
            (contact_id, tag) for contact_id, row in zip(ids, rows, strict=True) for tag in row.tags
        )
        return ids

    def _insert_rows(self, chunk: _Chunk, rows: list[_ContactRow], *, all_fresh: bool) -> range:
        """Insert new contacts and their tags as JSON rows, a statement a table; returns their
        ids in order. `rows` are the new ones among `chunk.firsts` (all of them: `all_fresh`)."""
        connection = self.session.connection()
        # The import is one write transaction, and SQLite has one writer: no other connection
        # can add a contact until it commits (a write that began before ours makes our first
        # write fail rather than interleave), so the ids after the largest are ours to give.
        # Knowing them, tag rows need no look-up by address.
        if self.next_id is None:
            self.next_id = int(
                connection.exec_driver_sql(
                    "SELECT coalesce(max(id), 0) + 1 FROM contacts"
                ).scalar_one()
            )
        first_id = self.next_id
        self.next_id += len(rows)
        data = chunk.data if all_fresh else None
        if data is None:
            if chunk.values is None:
                values = self.sqlite_values(rows)
            elif all_fresh:
                values = chunk.values
            else:
                built = dict(zip([row.number for row in chunk.firsts], chunk.values, strict=True))
                values = [built[row.number] for row in rows]
            # The cities the validating thread could not tell, in row order as ever.
            cities = self.cities
            for row, row_values in zip(rows, values, strict=True):
                if row.city is not None and row_values[_SQLITE_CITY] is None:
                    row_values[_SQLITE_CITY] = cities.get(*row.city)
            data = _SQLITE_JSON.encode(values)
        now = self.now_param
        connection.exec_driver_sql(_SQLITE_INSERT_CONTACTS, (data, first_id, now))
        connection.exec_driver_sql(_SQLITE_INSERT_TAGS, (first_id, self.next_id - 1))
        return range(first_id, self.next_id)

    def _update(
        self, known: list[tuple[_ContactRow, Sequence[Any]]], tag_rows: list[tuple[int, str]]
    ) -> None:
        """Merge rows into stored contacts; most of a re-import is unchanged, so that is
        settled before anything is built: stored JSON is decoded only where the stored text
        differs from what this row would write."""
        cities = self.cities
        to_json = self.to_json
        from_json = self.from_json
        tags_json = self.tags_json
        attributes_json = self.attributes_json
        update_columns = self.update_columns
        checks = [(slot, _OLD[_CONTACT_SCALARS[slot]]) for slot, _, _ in self.scalars]
        updates: list[dict[str, Any]] = []
        changes = self.summary.changes
        for row, old in known:
            scalars = row.scalars
            changed = False
            for slot, at in checks:
                value = scalars[slot]
                if value is not None and value != old[at]:
                    changed = True
                    break
            city_id = old[_OLD_CITY]
            if row.city is not None:
                city_id = cities.get(*row.city)
                changed = changed or city_id != old[_OLD_CITY]
            old_tags: list[Any] | None = None
            if old[_OLD_TAGS] != tags_json(row.tags):
                old_tags = from_json(old[_OLD_TAGS])
                changed = changed or sorted({*(old_tags or []), *row.tags}) != old_tags
            old_attributes: dict[str, Any] | None = None
            stored = old[_OLD_ATTRIBUTES]
            # Stored as the very text of this row's attributes: the same values, nothing to merge.
            if (row.attributes and stored != attributes_json(row.attributes)) or stored is None:
                old_attributes = from_json(stored)
                changed = changed or {**(old_attributes or {}), **row.attributes} != (
                    old_attributes
                )
            if not changed:
                self.summary.unchanged += 1
                continue
            if old_tags is None:
                old_tags = from_json(old[_OLD_TAGS])
            if old_attributes is None:
                old_attributes = from_json(old[_OLD_ATTRIBUTES])
            merged: dict[str, Any] = {name: old[_OLD[name]] for name in update_columns}
            for slot, _ in checks:
                if scalars[slot] is not None:
                    merged[_CONTACT_SCALARS[slot]] = scalars[slot]
            if row.city is not None:
                merged["city_id"] = city_id
            # Someone else's name or city is worth a second look: say what changed.
            name = scalars[_NAME_SLOT]
            if name is not None and name != old[_OLD_NAME] and old[_OLD_NAME] is not None:
                changes.append(Change(row.number, row.email, "name", old[_OLD_NAME], name))
            if city_id != old[_OLD_CITY] and old[_OLD_CITY] is not None:
                before, after = cities.name_of(old[_OLD_CITY]), cities.name_of(city_id)
                changes.append(Change(row.number, row.email, "city", before, after))
            old_tag_set = set(old_tags or [])
            merged["attributes"] = to_json({**(old_attributes or {}), **row.attributes})
            merged["tags"] = to_json(sorted(old_tag_set | row.tags))
            merged["b_id"] = old[_OLD_ID]
            merged["updated_at"] = self.now_param
            updates.append(merged)
            tag_rows.extend((old[_OLD_ID], tag) for tag in row.tags - old_tag_set)
        if updates:
            raw = _CONTACTS_RAW.c
            statement = (
                update(_CONTACTS_RAW)
                .where(raw.id == bindparam("b_id"))
                .values({name: bindparam(name) for name in [*update_columns, "updated_at"]})
            )
            _executemany(self.session, statement, updates)
        self.summary.updated += len(updates)

    def tags_json(self, tags: frozenset[str]) -> Any:
        # Few distinct tag sets in a file: serialise each once.
        cached = self._tags_json.get(tags)
        if cached is None:
            cached = self._tags_json[tags] = self.to_json(sorted(tags))
        return cached

    def _existing(self, emails: list[str] | str) -> dict[str, Sequence[Any]]:
        """Stored contacts among `emails` (on SQLite, a JSON array of them) as driver rows
        (`_LOOKUP_COLUMNS`, JSON undecoded).

        SQLAlchemy's result rows cost ~20 µs each here; the statement is still compiled by
        SQLAlchemy for the dialect.
        """
        connection = self.session.connection()
        if isinstance(emails, str):
            # The driver's own rows: SQLAlchemy's cost 1-2 µs more a row, a re-import's every row.
            raw: Any = connection.connection.driver_connection
            return {values[_OLD_EMAIL]: values for values in raw.execute(_SQLITE_LOOKUP, (emails,))}
        compiled = self._lookup_statements.get(len(emails))
        if compiled is None:
            c = _CONTACTS.c
            statement = select(*(c[name] for name in _LOOKUP_COLUMNS)).where(
                c.email.in_([bindparam(f"e{i}") for i in range(len(emails))])
            )
            compiled = statement.compile(dialect=connection.dialect)
            self._lookup_statements[len(emails)] = compiled
        if compiled.positional:
            params: Any = tuple(emails)
        else:
            params = {f"e{i}": email for i, email in enumerate(emails)}
        result = connection.exec_driver_sql(compiled.string, params)
        return {values[_OLD_EMAIL]: values for values in result}


@dataclass(slots=True)
class _Chunk:
    """A chunk of validated rows, ready for `_ContactImport.flush`."""

    # The rejects among its rows (row, column, reason, cells).
    rejects: list[tuple[int, str, str, list[str]]]
    # The number of its last row (None for the file's last chunk).
    upto: int | None
    # The first row of each address in the chunk, and the later ones with their first's number.
    firsts: list[_ContactRow]
    repeats: list[tuple[_ContactRow, int]]
    # The addresses to look up (on SQLite, as one JSON array).
    emails: list[str] | str
    # SQLite: `firsts` as new rows (`_SQLITE_ROW`), unless left to the database thread, and as
    # the JSON array to insert where every city id was known.
    values: list[list[Any]] | None = None
    data: str | None = None


def _validated_chunks(importer: _ContactImport, chunk_rows: int) -> Iterator[_Chunk]:
    table = importer.table
    validate = importer.validate
    prepare = importer.prepare
    rows: list[_ContactRow] = []
    rejects: list[tuple[int, str, str, list[str]]] = []
    has_data = False
    for raw in table:
        if raw.problem is None and not "".join(raw.cells).strip():
            continue
        has_data = True
        try:
            if raw.problem is not None:
                raise RowRejected(*raw.problem)
            rows.append(validate(raw.number, raw.cells))
        except RowRejected as exc:
            rejects.append((raw.number, exc.column, exc.reason, raw.cells))
        if len(rows) >= chunk_rows:
            yield prepare(rows, rejects, raw.number)
            rows, rejects = [], []
    if not has_data:
        raise ImportFileError(f"{table.display}: no data rows")
    yield prepare(rows, rejects, None)


def import_contacts(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    encoding: str | None = None,
    delimiter: str | None = None,
    mapping: Mapping[str, str] | None = None,
    tags: Sequence[str] = (),
    strict: bool = False,
    dry_run: bool = False,
    rejects_path: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportSummary:
    """Upsert contacts from a CSV/XLSX file by normalised email.

    Only fields present in the file (and non-empty in a row) overwrite stored values; attributes
    and tags merge. Suppressions are never touched. Raises `StrictImportFailed` with `strict`
    when any row is rejected, `ImportFileError` when the file cannot be read.
    """
    for tag in tags:
        if not tag.strip() or len(tag.strip()) > 100 or CONTROL.search(tag):
            raise InvalidValueError(
                f"--tag {quoted(tag)}: a tag is 1 to 100 characters of plain text"
            )
    with _database_errors(), ExitStack() as stack:
        table = stack.enter_context(Table(path, encoding=encoding, delimiter=delimiter))
        columns = resolve_columns(
            header=table.header,
            display=table.display,
            fields=CONTACT_FIELDS,
            synonyms=CONTACT_SYNONYMS,
            mapping=mapping or {},
            required=("email",),
        )
        summary = ImportSummary(
            file=table.display,
            kind="contacts",
            dry_run=dry_run,
            encoding=table.encoding,
            delimiter=table.delimiter,
        )
        summary.unknown = columns.unknown(synonyms=CONTACT_SYNONYMS, kept=True)
        summary.missing = columns.missing
        sink = _RejectSink(stack=stack, path=rejects_path, header=table.header)
        # Writing (one database thread that owns the session from start to end) overlaps with
        # reading and validating (this thread) where the driver releases the GIL: on SQLite, for
        # the whole of each chunk's inserts.
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="mailer-import"))
        # A thread back from SQLite waits for the GIL up to the switch interval (5 ms by
        # default) while the other one runs Python: a few times a statement, that left the
        # database thread idle for much of each chunk.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, _SWITCH_INTERVAL))
        stack.callback(sys.setswitchinterval, switch_interval)
        # Every row makes several containers that live until its chunk is written: with the
        # default threshold (700) the collector ran every ~100 rows, a quarter of the
        # validating thread's time.
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], _GC_THRESHOLD), *thresholds[1:])
        stack.callback(gc.set_threshold, *thresholds)

        def on_db(call: Callable[[], Any]) -> Any:
            return pool.submit(call).result()

        opened: tuple[Session, Callable[[], None]] = on_db(lambda: _write_session(session_factory))
        session, close = opened
        stack.callback(lambda: pool.submit(close).result())
        restore_cache = on_db(lambda: _large_sqlite_cache(session))
        stack.callback(lambda: pool.submit(restore_cache).result())
        importer: _ContactImport = on_db(
            lambda: _ContactImport(
                session=session, table=table, columns=columns, tags=tags, summary=summary
            )
        )
        chunks = _validated_chunks(importer, chunk_rows)
        # Chunks handed to the database thread and not yet settled, oldest first, with the
        # number of their last row.
        writing: deque[tuple[Future[list[tuple[int, str, str, list[str]]]], int | None]] = deque()

        def collect(*, keep: int) -> None:
            while len(writing) > keep:
                future, upto = writing.popleft()
                for reject in future.result():
                    sink.add(*reject)
                # Rows up to the chunk's end are all settled now: their rejects go out in order.
                sink.flush(upto=upto)

        for chunk in chunks:
            for reject in chunk.rejects:
                sink.add(*reject)
            # One chunk queued behind the one being written: either thread can have a slow
            # chunk (a cache spill, a garbage collection) without the other waiting for it.
            collect(keep=_QUEUED_CHUNKS)
            writing.append((pool.submit(importer.flush, chunk), chunk.upto))
        collect(keep=0)
        sink.flush()
        summary.rejects = sink.rejects
        summary.warnings = importer.warnings
        on_db(
            lambda: _finish(
                session, summary=summary, table=table, path=path, strict=strict, dry_run=dry_run
            )
        )
        return summary


# --------------------------------------------------------------------------- partnerships


def _parse_kind(value: str) -> str:
    folded = " ".join(value.casefold().replace("-", " ").replace("_", " ").split())
    kind = {
        "": "partner",
        "twinning": "twin",
        "twin town": "twin",
        "twin city": "twin",
        "twinned": "twin",
        "sister city": "sister",
        "sister cities": "sister",
        "partner city": "partner",
        "partnership": "partner",
        "friendship city": "friendship",
        "friends": "friendship",
    }.get(folded, folded)
    if kind not in PARTNERSHIP_KINDS:
        raise ValueError(f"unknown kind {quoted(value)}; use one of {', '.join(PARTNERSHIP_KINDS)}")
    return kind


def _parse_year(value: str) -> int | None:
    if not value:
        return None
    this_year = dt.date.today().year
    try:
        year = int(value)
    except ValueError:
        raise ValueError(f"{quoted(value)} is not a year") from None
    if not 1900 <= year <= this_year:
        raise ValueError(f"{year} is not a year between 1900 and {this_year}")
    return year


def _small_import(
    session_factory: sessionmaker[Session],
    *,
    kind: str,
    path: Path,
    fields: Sequence[str],
    synonyms: Mapping[str, str],
    required: Sequence[str],
    encoding: str | None,
    delimiter: str | None,
    mapping: Mapping[str, str] | None,
    strict: bool,
    dry_run: bool,
    rejects_path: Path | None,
    multiline: Sequence[str] = (),
    handle: Callable[[Session, _Places, dict[str, str], Callable[[str], str], int], str],
) -> ImportSummary:
    """Row-at-a-time import for the small tables; `handle` returns added/updated/unchanged."""
    with _database_errors(), ExitStack() as stack:
        table = stack.enter_context(Table(path, encoding=encoding, delimiter=delimiter))
        columns = resolve_columns(
            header=table.header,
            display=table.display,
            fields=fields,
            synonyms=synonyms,
            mapping=mapping or {},
            required=required,
            multiline=multiline,
            attributes=False,
        )
        summary = ImportSummary(
            file=table.display,
            kind=kind,
            dry_run=dry_run,
            encoding=table.encoding,
            delimiter=table.delimiter,
            unknown=columns.unknown(synonyms=synonyms, kept=False),
            missing=columns.missing,
        )
        sink = _RejectSink(stack=stack, path=rejects_path, header=table.header)
        session, close = _write_session(session_factory)
        stack.callback(close)
        places = _Places(session)
        width = len(table.header)
        has_data = False

        def label(name: str) -> str:
            return columns.label(columns.fields[name]) if name in columns.fields else name

        for raw in table:
            if not any(c.strip() for c in raw.cells) and raw.problem is None:
                continue
            has_data = True
            try:
                if raw.problem is not None:
                    raise RowRejected(*raw.problem)
                cells = raw.cells
                if table.kind == "csv" and len(cells) != width:
                    raise RowRejected("(row)", f"{len(cells)} cells, the header has {width}")
                cells = cells[:width] + [""] * (width - len(cells))
                cleaned = clean_cells(cells, columns=columns)
                values = {name: cleaned[i] for name, i in columns.fields.items()}
                outcome = handle(session, places, values, label, raw.number)
            except RowRejected as exc:
                sink.add(raw.number, exc.column, exc.reason, raw.cells)
                continue
            lost = lost_letter(cleaned)
            if lost is not None:
                summary.warnings.append(
                    Reject(
                        raw.number, columns.label(lost), f"{quoted(cleaned[lost])} {_LOST_LETTER}"
                    )
                )
            if outcome == "added":
                summary.added += 1
            elif outcome == "updated":
                summary.updated += 1
            else:
                summary.unchanged += 1
        if not has_data:
            raise ImportFileError(f"{table.display}: no data rows")
        sink.flush()
        summary.rejects = sink.rejects
        _finish(session, summary=summary, table=table, path=path, strict=strict, dry_run=dry_run)
        return summary


def _required(values: Mapping[str, str], name: str, label: Callable[[str], str]) -> str:
    value = values.get(name, "")
    if not value:
        raise RowRejected(label(name), "empty")
    return check_length(label(name), value, 200)


def import_partnerships(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    encoding: str | None = None,
    delimiter: str | None = None,
    mapping: Mapping[str, str] | None = None,
    strict: bool = False,
    dry_run: bool = False,
    rejects_path: Path | None = None,
    new_city: bool = False,
) -> ImportSummary:
    """Partner-city ties, upserted on (Ukrainian city, partner city).

    The Ukrainian city must be a known one (`seeds/ukrainian_cities.csv` or stored), in any
    usual spelling; with `new_city` an unknown one is added. Cities abroad are made as needed.
    """
    seen: dict[tuple[int, int], int] = {}

    def handle(
        session: Session,
        places: _Places,
        values: dict[str, str],
        label: Callable[[str], str],
        number: int,
    ) -> str:
        ua_name = _required(values, "ukrainian_city", label)
        partner_name = _required(values, "partner_city", label)
        country_text = _required(values, "partner_country", label)
        try:
            country = parse_country(country_text)
        except ValueError as exc:
            raise RowRejected(label("partner_country"), str(exc)) from None
        try:
            kind = _parse_kind(values.get("kind", ""))
        except ValueError as exc:
            raise RowRejected(label("kind"), str(exc)) from None
        try:
            since = _parse_year(values.get("since", ""))
        except ValueError as exc:
            raise RowRejected(label("since"), str(exc)) from None
        note = values.get("note") or None
        try:
            name_uk = parse_name_uk(values.get("partner_city_uk", ""))
        except ValueError as exc:
            raise RowRejected(label("partner_city_uk"), str(exc)) from None
        ua_id = places.ukrainian_city(
            ua_name,
            region=values.get("ukrainian_region") or None,
            new_city=new_city,
            column=label("ukrainian_city"),
        )
        partner_id = places.cities.get(partner_name, country, values.get("partner_region") or None)
        if (ua_id, partner_id) in seen:
            raise RowRejected(label("partner_city"), f"duplicate of row {seen[ua_id, partner_id]}")
        seen[ua_id, partner_id] = number
        renamed = name_uk is not None and places.name_in_ukrainian(partner_id, name_uk)
        existing = session.scalar(
            select(Partnership).where(
                Partnership.ukrainian_city_id == ua_id, Partnership.partner_city_id == partner_id
            )
        )
        if existing is None:
            session.add(
                Partnership(
                    ukrainian_city_id=ua_id,
                    partner_city_id=partner_id,
                    kind=kind,
                    since=since,
                    note=note,
                )
            )
            session.flush()
            return "added"
        new = {
            "kind": kind if values.get("kind") else existing.kind,
            "since": since if since is not None else existing.since,
            "note": note if note is not None else existing.note,
        }
        if all(getattr(existing, k) == v for k, v in new.items()):
            return "updated" if renamed else "unchanged"
        for key, value in new.items():
            setattr(existing, key, value)
        session.flush()
        return "updated"

    return _small_import(
        session_factory,
        kind="partnerships",
        path=path,
        fields=PARTNERSHIP_FIELDS,
        synonyms=PARTNERSHIP_SYNONYMS,
        required=("ukrainian_city", "partner_city", "partner_country"),
        multiline=("note",),
        encoding=encoding,
        delimiter=delimiter,
        mapping=mapping,
        strict=strict,
        dry_run=dry_run,
        rejects_path=rejects_path,
        handle=handle,
    )


# --------------------------------------------------------------------------- signatories


def import_signatories(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    encoding: str | None = None,
    delimiter: str | None = None,
    mapping: Mapping[str, str] | None = None,
    strict: bool = False,
    dry_run: bool = False,
    rejects_path: Path | None = None,
    new_city: bool = False,
) -> ImportSummary:
    """The letter's signatories, upserted on (name, Ukrainian city); the address is optional.

    The city must be a known Ukrainian city, in any usual spelling (or new, with `new_city`).
    """
    seen: dict[tuple[str, int], int] = {}
    check_email = EmailChecker()

    def handle(
        session: Session,
        places: _Places,
        values: dict[str, str],
        label: Callable[[str], str],
        number: int,
    ) -> str:
        name = check_length(label("name"), _required(values, "name", label), 300)
        city_name = _required(values, "city", label)
        title = check_length(label("title"), values.get("title", ""), 300) or None
        email = None
        if values.get("email"):
            try:
                email = check_email(values["email"])
            except ValueError as exc:
                raise RowRejected(label("email"), str(exc)) from None
        try:
            role = parse_role(values.get("role", ""))
        except ValueError as exc:
            raise RowRejected(label("role"), str(exc)) from None
        city_id = places.ukrainian_city(
            city_name, region=values.get("region") or None, new_city=new_city, column=label("city")
        )
        key = (name.casefold(), city_id)
        if key in seen:
            raise RowRejected(label("name"), f"duplicate of row {seen[key]}")
        seen[key] = number
        existing = next(
            (
                s
                for s in session.scalars(select(Signatory).where(Signatory.city_id == city_id))
                if s.name.casefold() == name.casefold()
            ),
            None,
        )
        if existing is None:
            session.add(Signatory(name=name, title=title, city_id=city_id, email=email, role=role))
            session.flush()
            return "added"
        new = {
            "name": name,
            "title": title if title is not None else existing.title,
            "email": email if email is not None else existing.email,
            "role": role if role is not None else existing.role,
        }
        if all(getattr(existing, k) == v for k, v in new.items()):
            return "unchanged"
        for k, v in new.items():
            setattr(existing, k, v)
        session.flush()
        return "updated"

    return _small_import(
        session_factory,
        kind="signatories",
        path=path,
        fields=SIGNATORY_FIELDS,
        synonyms=SIGNATORY_SYNONYMS,
        required=("name", "city"),
        encoding=encoding,
        delimiter=delimiter,
        mapping=mapping,
        strict=strict,
        dry_run=dry_run,
        rejects_path=rejects_path,
        handle=handle,
    )


# --------------------------------------------------------------------------- suppressions


def import_suppressions(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    reason: SuppressionReason = SuppressionReason.MANUAL,
    encoding: str | None = None,
    delimiter: str | None = None,
) -> ImportSummary:
    """Suppress every address of a file (`email` column, optional `reason`).

    `added` counts newly suppressed addresses, `unchanged` those suppressed already.
    """
    from mailer.audience import parse_reason, suppress

    check_email = EmailChecker()
    with _database_errors(), ExitStack() as stack:
        table = stack.enter_context(Table(path, encoding=encoding, delimiter=delimiter))
        columns = resolve_columns(
            header=table.header,
            display=table.display,
            fields=("email", "reason"),
            synonyms=SUPPRESSION_SYNONYMS,
            mapping={},
            required=("email",),
            attributes=False,
        )
        summary = ImportSummary(
            file=table.display,
            kind="suppressions",
            encoding=table.encoding,
            unknown=columns.unknown(synonyms=SUPPRESSION_SYNONYMS, kept=False),
            missing=columns.missing,
        )
        sink = _RejectSink(stack=stack, path=None, header=table.header)
        by_reason: dict[SuppressionReason, set[str]] = {}
        width = len(table.header)
        has_data = False
        i_email = columns.fields["email"]
        i_reason = columns.fields.get("reason")
        for raw in table:
            if not any(c.strip() for c in raw.cells) and raw.problem is None:
                continue
            has_data = True
            try:
                if raw.problem is not None:
                    raise RowRejected(*raw.problem)
                if table.kind == "csv" and len(raw.cells) != width:
                    raise RowRejected("(row)", f"{len(raw.cells)} cells, the header has {width}")
                cells = clean_cells(
                    raw.cells[:width] + [""] * (width - len(raw.cells)), columns=columns
                )
                try:
                    email = check_email(cells[i_email])
                except ValueError as exc:
                    raise RowRejected(columns.label(i_email), str(exc)) from None
                row_reason = reason
                if i_reason is not None and cells[i_reason]:
                    try:
                        row_reason = parse_reason(cells[i_reason])
                    except InvalidValueError as exc:
                        raise RowRejected(columns.label(i_reason), str(exc)) from None
            except RowRejected as exc:
                sink.add(raw.number, exc.column, exc.reason, raw.cells)
                continue
            by_reason.setdefault(row_reason, set()).add(email)
        if not has_data:
            raise ImportFileError(f"{table.display}: no data rows")
        sink.flush()
        summary.rejects = sink.rejects
        total = 0
        session, close = _write_session(session_factory)
        stack.callback(close)
        for row_reason, emails in by_reason.items():
            total += len(emails)
            summary.added += suppress(
                session, emails=sorted(emails), reason=row_reason, source=f"import:{path.name}"
            )
        summary.unchanged = total - summary.added
        _log_import(session, summary=summary, path=path, sha256=table.sha256)
        session.commit()
        return summary
