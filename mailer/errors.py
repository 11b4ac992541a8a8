"""The error tree. Library code raises these; only the CLI turns them into `Error:` lines."""

from __future__ import annotations


class MailerError(Exception):
    """Anything the user can act on. The message names the file, row, host or campaign."""

    exit_code: int = 1


class WorkspaceError(MailerError):
    """No workspace where one is needed, or a broken `mailer.toml`."""


class DatabaseError(MailerError):
    """The database cannot be opened, or is not migrated to the code's schema."""


class ImportFileError(MailerError):
    """An input file that cannot be read at all (encoding, layout, format)."""


class StrictImportError(ImportFileError):
    """`--strict` was asked for and at least one row was rejected: nothing was written."""


class NotFoundError(MailerError):
    """An unknown campaign, contact or template."""


class ConflictError(MailerError):
    """Something with that name exists already."""


class InvalidValueError(MailerError):
    """A flag or field value that does not parse (a `--where` field, a rate, a date)."""


class OutputFileError(MailerError):
    """An output file (report, export) that cannot be written; the message names the path."""


class TemplateError(MailerError):
    """A template that cannot be loaded or rendered; the message names file and line."""


class CheckFailed(MailerError):
    """`check` found problems that block sending."""


class TransportError(MailerError):
    """A systemic delivery failure: server unreachable, TLS refused, authentication refused."""


class AuthenticationRefused(TransportError):
    """The SMTP server refused the login."""


class ServerUnreachable(TransportError):
    """The SMTP server cannot be reached (refused, unresolvable, timed out, dropped on connect)."""


class TlsFailure(TransportError):
    """TLS could not be set up: certificate refused, handshake failed, STARTTLS not offered."""


class SendIncomplete(MailerError):
    """`send` ended with messages still failed, uncertain, retrying or held back by a cap."""

    exit_code = 3


class Interrupted(MailerError):
    """The run was interrupted (Ctrl-C, SIGTERM) and paused cleanly."""

    exit_code = 130


class ClaimsLost(DatabaseError):
    """Another process declared this sender gone (its lease had expired) and settled the
    letters it held: it must hand nothing more over."""


class CampaignHeld(MailerError):
    """A campaign paused by a bounce spike: sending resumes only once the user acknowledges it."""


class CampaignPaused(MailerError):
    """A campaign someone paused (`mailer campaign pause`): `campaign resume` lets it go on."""


class MailboxError(MailerError):
    """A mailbox inbox sync cannot read: no such path, not a mailbox, an IMAP server refusing."""


def quoted(value: str, *, limit: int = 60) -> str:
    """`value` quoted for an error line, cut to `limit` characters: a cell or a header can be
    megabytes long, and an error line must stay one readable line."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return repr(value)
