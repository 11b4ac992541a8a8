"""Where a server password comes from, the same for SMTP and IMAP (DESIGN §3): an environment
variable, then a `password_command` in mailer.toml, then a prompt on a terminal — never argv,
never a file of ours, never the database. Also the one rule for "is this host this machine?",
which decides whether a login may travel without TLS.

Knows no server protocol: `smtp.py` and `inbox_sources.py` call it with their own names and
error class.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import subprocess
from collections.abc import Callable

from mailer.errors import MailerError


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine by its very name (no DNS is asked: a name that merely
    resolves to 127.0.0.1 today may not tomorrow)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def resolve_password(
    *,
    kind: str,
    login: str,
    env_var: str,
    section: str,
    password_command: str | None,
    prompt: Callable[[str], str] | None,
    error: type[MailerError],
) -> str:
    """`$env_var`, then `[section] password_command`, then `prompt` (the CLI's, on a TTY).

    `kind` and `login` name it for people: `SMTP`, `office@mail.example.org:587`."""
    from_env = os.environ.get(env_var)
    if from_env:
        return from_env
    if password_command:
        return run_password_command(password_command, section=section, error=error)
    if prompt is not None:
        return prompt(f"{kind} password for {login}")
    raise error(
        f"no password for {login}: set ${env_var}, "
        f"or [{section}] password_command in mailer.toml, or run on a terminal to be asked"
    )


def run_password_command(command: str, *, section: str, error: type[MailerError]) -> str:
    try:
        argv = shlex.split(command)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise error(f"[{section}] password_command cannot run: {exc}") from None
    if done.returncode != 0:
        # stderr is reported, stdout never: stdout is where the secret would be.
        raise error(
            f"[{section}] password_command exited with status {done.returncode}: "
            f"{done.stderr.strip()[:200]}"
        )
    password = done.stdout.splitlines()[0] if done.stdout else ""
    if not password:
        raise error(f"[{section}] password_command printed no password")
    return password
