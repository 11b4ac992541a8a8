"""A real Dovecot IMAP server for tests: its own config, runtime folder and mail in a temp folder,
listening on 127.0.0.1 only (plain/STARTTLS and implicit TLS on free ports), stopped afterwards.

Dovecot comes from Debian's `dovecot-imapd` package (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DovecotServer:
    def __init__(self, *, user: str = "office", password: str = "s3cret", ca: Any = None) -> None:
        # Its own folder under /tmp, not pytest's (whose parents are private to root): Dovecot's
        # unprivileged auth and mail processes must reach the files.
        self.root = Path(tempfile.mkdtemp(prefix="mailer-dovecot-"))
        self.root.chmod(0o755)
        self.user = user
        self.password = password
        self.port = _free_port()
        self.tls_port = _free_port()
        self.ca = ca
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(DOVECOT).exists()

    def _config(self) -> Path:
        root = self.root
        run = root / "run"
        run.mkdir(parents=True, exist_ok=True)
        mail = root / "mail"
        mail.mkdir(exist_ok=True)
        # Mail processes must not run as root: the mail belongs to an unprivileged user.
        owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        os.chown(mail, owner.pw_uid, owner.pw_gid)
        (root / "passwd").write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n")
        ssl = "ssl = no\n"
        if self.ca is not None:
            cert = self.ca.issue_cert("127.0.0.1", "localhost")
            cert.private_key_and_cert_chain_pem.write_to_path(str(root / "server.pem"))
            ssl = (
                f"ssl = yes\nssl_cert = <{root / 'server.pem'}\nssl_key = <{root / 'server.pem'}\n"
            )
        listeners = (
            f"  inet_listener imap {{\n    address = 127.0.0.1\n    port = {self.port}\n  }}\n"
        )
        if self.ca is not None:
            listeners += (
                f"  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {self.tls_port}\n"
                "    ssl = yes\n  }\n"
            )
        config = root / "dovecot.conf"
        config.write_text(
            f"""base_dir = {run}
state_dir = {root / "state"}
instance_name = mailer-test-{self.port}
protocols = imap
listen = 127.0.0.1
log_path = {root / "dovecot.log"}
info_log_path = {root / "dovecot.log"}
{ssl}disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {owner.pw_uid}
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:{mail}/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root / "passwd"}
}}
userdb {{
  driver = static
  args = uid={owner.pw_uid} gid={owner.pw_gid} home={mail}/%u
}}
service imap-login {{
{listeners}}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Bounces {{
    auto = create
  }}
}}
"""
        )
        (root / "state").mkdir(exist_ok=True)
        return config

    def __enter__(self) -> DovecotServer:
        config = self._config()
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"dovecot exited: {err} {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"dovecot did not start: {self.log()}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def url(self, scheme: str = "imap+plain") -> str:
        port = self.tls_port if scheme == "imaps" else self.port
        return f"{scheme}://{self.user}@127.0.0.1:{port}"

    def append(self, mails: list[bytes], *, folder: str = "INBOX") -> None:
        """Deliver mails into a folder the way a client does: IMAP APPEND."""
        from imapclient import IMAPClient

        with IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10) as client:
            client.login(self.user, self.password)
            for data in mails:
                client.append(folder, data)

    def flags(self, *, folder: str = "INBOX") -> dict[int, tuple[bytes, ...]]:
        from imapclient import IMAPClient

        with IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10) as client:
            client.login(self.user, self.password)
            client.select_folder(folder, readonly=True)
            fetched = client.fetch(client.search("ALL"), ["FLAGS"])
            return {uid: tuple(data[b"FLAGS"]) for uid, data in fetched.items()}
