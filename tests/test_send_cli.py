"""`mailer send` on the command line: credentials, TLS, progress lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from conftest import Cli
from smtp_server import SmtpTestServer, seed_campaign, server_context, write_ca
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer.models import Message

SLUG = "appeal"


def statuses(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        rows = s.execute(select(Message.status, func.count()).group_by(Message.status)).all()
    return {status: n for status, n in rows}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[SmtpTestServer]:
    with SmtpTestServer(tls="implicit", server_context=server_context(ca)) as srv:
        yield srv


def test_self_signed_server_refused_then_accepted_with_ca_file(
    run: Cli,
    workspace: Path,
    engine: Engine,
    tls_server: SmtpTestServer,
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    seed_campaign(engine, workspace, count=3)
    refused = run("send", SLUG, "--smtp", tls_server.url("smtps"), "--timeout", "5", "--yes")
    assert refused.exit_code == 1
    assert "certificate refused" in refused.output and "--ca-file" in refused.output
    assert statuses(engine) == {"queued": 3}
    ca_file = write_ca(ca, tmp_path)
    result = run(
        "send", SLUG, "--smtp", tls_server.url("smtps"), "--ca-file", str(ca_file), "--yes"
    )
    assert result.exit_code == 0, result.output
    assert len(tls_server.received) == 3
    assert statuses(engine) == {"sent": 3}


def test_smtp_url_refuses_a_server_without_starttls(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=2)
    with SmtpTestServer() as srv:
        result = run("send", SLUG, "--smtp", srv.url("smtp"), "--yes")
        assert result.exit_code == 1
        assert "does not offer STARTTLS" in result.output
        assert srv.received == []
    assert statuses(engine) == {"queued": 2}


def test_no_password_off_a_terminal_is_a_clear_error(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=1)
    result = run("send", SLUG, "--smtp", "smtp+plain://office@127.0.0.1:9", "--yes")
    assert result.exit_code == 1
    assert "no password for office@127.0.0.1:9" in result.output
    assert "MAILER_SMTP_PASSWORD" in result.output


def test_a_login_in_clear_to_another_machine_is_refused_before_anything_is_asked(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=1)
    result = run(
        "send",
        SLUG,
        "--smtp",
        "smtp+plain://office@relay.test:25",
        "--yes",
        env={"MAILER_SMTP_PASSWORD": "secret-pw"},
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "password in clear" in result.output
    assert "secret-pw" not in result.output
    assert statuses(engine) == {}


def test_password_command_from_mailer_toml(run: Cli, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=2)
    config = workspace / "mailer.toml"
    command = f"{sys.executable} -c 'print(\"right-pw\")'"
    config.write_text(
        config.read_text().replace("[smtp]", f"[smtp]\npassword_command = {json.dumps(command)}")
    )
    with SmtpTestServer(auth=("office", "right-pw")) as srv:
        result = run("send", SLUG, "--smtp", srv.url(user="office"), "--yes")
        assert result.exit_code == 0, result.output
        assert len(srv.received) == 2
    assert "right-pw" not in result.output


def test_plain_progress_lines_and_summary_off_a_terminal(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=30)
    with SmtpTestServer() as srv:
        result = run("send", SLUG, "--smtp", srv.url(), "--yes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Sending appeal: 30 message(s) to send (audience 30)"
    assert "  from:      Campaign Office <office@example.org>" in lines
    assert "  subject:   An appeal to Mayor 0" in lines
    assert f"  transport: smtp+plain://127.0.0.1:{srv.port}" in lines
    assert any(line.startswith("sent 30 of 30, ") for line in lines), lines
    progress = [line for line in lines if line.startswith("sent ")]
    assert not any("%)" in line or "0 failed" in line for line in progress), progress
    assert any(line.startswith("Campaign appeal: 30 sent, 0 queued") for line in lines)
