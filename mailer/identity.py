"""Who is acting: the OS user, host and process behind a claim, an event or a change.

A team shares one database (DESIGN §3): the send log and the audit export must say which
person on which machine did what. Knows nothing of the database; `outbox` writes what
`Actor.label` gives into `events.actor`.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Actor:
    user: str
    host: str
    pid: int

    @classmethod
    def current(cls) -> Actor:
        return cls(user=_os_user(), host=socket.gethostname() or "localhost", pid=os.getpid())

    @property
    def label(self) -> str:
        """`user@host pid N`: what the log shows, and what a person recognises."""
        return f"{self.user}@{self.host} pid {self.pid}"


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # A container user with no passwd entry: the uid still tells two users apart.
        return f"uid{os.getuid()}"
