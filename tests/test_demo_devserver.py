"""The embedded SMTP server `mailer demo` sends to: loopback only, a free port, a Maildir."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

from mailer.devserver import DevServer, DevServerError

LETTER = (
    "From: Campaign office <appeals@campaign.example.org>\r\n"
    "To: mayor@city.example.org\r\n"
    "Subject: =?utf-8?q?Partnerst=C3=A4dte?=\r\n"
    "Message-ID: <demo.1@campaign.example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Dear Mayor,\r\n.leading dot\r\nGrüße aus Kyjiw\r\n"
).encode()


def test_stores_one_copy_per_recipient_in_a_maildir(tmp_path: Path) -> None:
    maildir = tmp_path / "received"
    with DevServer(maildir=maildir) as server:
        assert server.url == f"smtp+plain://127.0.0.1:{server.port}"
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            refused = client.sendmail(
                "bounces@campaign.example.org",
                ["mayor@city.example.org", "office@city.example.org"],
                LETTER,
            )
            assert refused == {}
        assert server.count() == 2
        messages = sorted(server.messages(), key=lambda m: str(m["Delivered-To"]))
    assert [str(m["Delivered-To"]) for m in messages] == [
        "mayor@city.example.org",
        "office@city.example.org",
    ]
    for message in messages:
        assert message["Return-Path"] == "<bounces@campaign.example.org>"
        assert message["Subject"] == "Partnerstädte"
        assert message["Message-ID"] == "<demo.1@campaign.example.org>"
        body = message.get_content()
        assert "Grüße aus Kyjiw" in body and ".leading dot" in body
    # A real Maildir: cur/new/tmp, the letters in new/.
    assert {p.name for p in maildir.iterdir()} == {"cur", "new", "tmp"}
    assert len(list((maildir / "new").iterdir())) == 2


def test_listens_on_loopback_only_and_stops(tmp_path: Path) -> None:
    server = DevServer(maildir=tmp_path / "m").start()
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.recv(100).startswith(b"220")
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(DevServerError, match="not running"):
        _ = server.port


def test_two_servers_get_different_free_ports(tmp_path: Path) -> None:
    with DevServer(maildir=tmp_path / "a") as a, DevServer(maildir=tmp_path / "b") as b:
        assert a.port != b.port
        with smtplib.SMTP("127.0.0.1", b.port, timeout=10) as client:
            client.sendmail("x@example.org", ["y@example.org"], b"Subject: b\r\n\r\nb\r\n")
        assert (a.count(), b.count()) == (0, 1)


def test_accepts_international_addresses(tmp_path: Path) -> None:
    with DevServer(maildir=tmp_path / "m") as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("smtputf8")
            client.sendmail(
                "appeals@campaign.example.org",
                ["bürgermeister@stadt.example.org"],
                b"Subject: x\r\n\r\nx\r\n",
                mail_options=["SMTPUTF8"],
            )
        (message,) = server.messages()
    assert str(message["Delivered-To"]) == "bürgermeister@stadt.example.org"


def test_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    with pytest.raises(DevServerError, match=r"loopback only, not 0\.0\.0\.0"):
        DevServer(maildir=tmp_path / "m", host="0.0.0.0")
