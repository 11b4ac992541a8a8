"""`mailer send` as a real process: interrupted with SIGINT/SIGTERM, and killed with SIGKILL."""

from __future__ import annotations

import collections
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer.models import Contact, Message

SLUG = "appeal"


@pytest.fixture(params=[False, True], ids=["step-by-step", "pipelined"])
def server(request: pytest.FixtureRequest) -> Iterator[SmtpTestServer]:
    # The promises hold whether or not the server offers PIPELINING (the client uses it if so).
    with SmtpTestServer(pipelining=request.param) as srv:
        yield srv


def start_send(workspace: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mailer.cli import main; main()",
            "-w",
            str(workspace),
            "send",
            SLUG,
            "--smtp",
            url,
            "--yes",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def wait_for_arrivals(server: SmtpTestServer, proc: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 60
    while len(server.received) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def rows(engine: Engine) -> dict[str, str]:
    with Session(engine) as s:
        return {
            email: status
            for email, status in s.execute(
                select(Contact.email, Message.status).join(Message.contact)
            ).all()
        }


def assert_consistent(
    engine: Engine, server: SmtpTestServer, *, killed: bool = False
) -> dict[str, str]:
    """At most once at the server; every row final or uncertain, and agreeing with the server.

    Right after a SIGKILL, `sending` rows are expected: the next run makes them `uncertain`.
    """
    received = collections.Counter(server.recipients())
    twice = [address for address, n in received.items() if n > 1]
    assert twice == []
    states = rows(engine)
    for email, status in states.items():
        assert killed or status != "sending", email
        if status == "sent":
            assert received[email] == 1, email
        elif status in ("queued", "failed", "skipped", "retry"):
            assert received[email] == 0, (email, status)
    return states


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_pauses_cleanly(workspace: Path, engine: Engine, signum: signal.Signals) -> None:
    seed_campaign(engine, workspace, count=200)
    with SmtpTestServer(delay=0.02) as server:
        proc = start_send(workspace, server.url(), "--concurrency", "2")
        wait_for_arrivals(server, proc, 10)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=60)
        # A pause is not an error (issue 14, item 3): exit 130, no `Error:`, and the last line
        # says what this run sent and what waits, from the database's own counts.
        assert proc.returncode == 130, output
        assert "Error:" not in output
        states = assert_consistent(engine, server)
        counts = collections.Counter(states.values())
        assert counts["sent"] >= 10 and counts["queued"] > 0
        last = output.strip().splitlines()[-1]
        match = re.fullmatch(r"Paused: (\d+) sent this run, (\d+) waiting — `(.+)` goes on", last)
        assert match is not None, output
        assert int(match.group(1)) == counts["sent"]
        assert int(match.group(2)) == counts["queued"] + counts["retry"]
        assert f"Campaign appeal: {counts['sent']} sent, {counts['queued']} queued" in output
        # Progress never runs ahead of what was sent, nor counts a letter put back as done.
        shown = [int(m) for m in re.findall(r"^sent (\d+) of \d+", output, re.MULTILINE)]
        assert shown == sorted(shown) and all(n <= counts["sent"] for n in shown)
        assert "%)" not in output
        # The printed command goes on, as printed.
        argv = shlex.split(match.group(3))
        assert argv[:3] == ["mailer", "send", SLUG]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from mailer.cli import main; main()",
                "-w",
                str(workspace),
                *argv[1:],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        states = assert_consistent(engine, server)
        assert set(states.values()) == {"sent"}
        assert len(server.received) == 200


def test_the_remembered_server_goes_on_after_ctrl_c(workspace: Path, engine: Engine) -> None:
    """`[smtp] url` and `rate` in mailer.toml: `mailer send appeal --yes` alone sends, and the
    command a Ctrl-C prints is exactly that (issue 14, item 2)."""
    seed_campaign(engine, workspace, count=120)
    with SmtpTestServer(delay=0.02) as server:
        config = workspace / "mailer.toml"
        config.write_text(
            config.read_text().replace(
                "[smtp]\n", f'[smtp]\nurl = "{server.url()}"\nrate = "6000/min"\n'
            )
        )
        command = [sys.executable, "-c", "from mailer.cli import main; main()"]
        proc = subprocess.Popen(
            [*command, "-w", str(workspace), "send", SLUG, "--yes"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        wait_for_arrivals(server, proc, 5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, output
        assert f"transport: {server.url()} (from mailer.toml)" in output
        assert "limits:    rate 6000/min (mailer.toml)" in output
        assert output.strip().splitlines()[-1].endswith("— `mailer send appeal --yes` goes on")
        proc = subprocess.Popen(
            [*command, "-w", str(workspace), "send", SLUG, "--yes"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert set(assert_consistent(engine, server).values()) == {"sent"}
        assert len(server.received) == 120


def test_sigkill_at_random_points_then_resume(
    workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    total = 2000
    seed_campaign(engine, workspace, count=total)
    rng = random.Random(20220314)
    recovered_seen = 0
    for _kill in range(4):
        proc = start_send(workspace, server.url(), "--concurrency", "4")
        target = len(server.received) + rng.randint(20, 350)
        wait_for_arrivals(server, proc, target)
        proc.kill()
        output, _ = proc.communicate(timeout=30)
        if "left `sending`" in output:
            recovered_seen += 1
        assert_consistent(engine, server, killed=True)
    for _resume in range(5):
        proc = start_send(workspace, server.url(), "--concurrency", "4")
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode in (0, 3), output
        if "left `sending`" in output:
            recovered_seen += 1
        states = assert_consistent(engine, server)
        if not {"queued", "retry", "sending"} & set(states.values()):
            break
    states = assert_consistent(engine, server)
    assert len(states) == total
    assert set(states.values()) <= {"sent", "uncertain"}
    counts = collections.Counter(states.values())
    # Each kill leaves in doubt only the letters on the wire: 4 connections, 2 on each when
    # the server pipelines (journal.py); the claimed rest went back to the queue.
    print("crash test outcome:", dict(counts))
    assert counts["uncertain"] <= 4 * 4 * 2, counts
    assert recovered_seen >= 1


def test_two_senders_on_one_sqlite_campaign_deliver_each_message_once(
    workspace: Path, engine: Engine
) -> None:
    emails = seed_campaign(engine, workspace, count=300)
    with SmtpTestServer(delay=0.005) as server:
        procs = [start_send(workspace, server.url(), "--concurrency", "2") for _ in range(2)]
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], outputs
        states = assert_consistent(engine, server)
    assert sorted(server.recipients()) == sorted(emails)
    assert set(states.values()) == {"sent"}
