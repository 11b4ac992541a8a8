"""The handover journal: what a dead sender did with each claim, trusted only where it can be."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailer import journal
from mailer.transport import Outcome, OutcomeKind

SENT = Outcome(kind=OutcomeKind.ACCEPTED, code=250, reply="2.0.0 queued as Ü1", via="mx:25")
HANDED = dt.datetime(2022, 3, 14, 9, 30, 12, 345678, tzinfo=dt.UTC)


def test_a_dead_senders_journal_says_what_each_claim_became(tmp_path: Path) -> None:
    boot = journal.boot_id()
    assert boot, "Linux gives a boot id"
    j = journal.Journal.create(tmp_path, sender_id="s1", boot=boot)
    j.claiming([1, 2, 3, 4])
    j.handing(1)
    j.outcome(1, SENT, journal.Letter(message_id="<1@x>", subject="Grüße", handed_at=HANDED))
    j.handing(2)
    # 4 was handed over, answered, then claimed again (a retry): only the new claim counts.
    j.handing(4)
    j.outcome(4, SENT, journal.Letter())
    j.claiming([4])
    # Alive: its lock is held, nobody may take its journal.
    assert journal.take_abandoned(str(j.path), sender_id="s1", boot=boot) is None
    assert not journal.is_abandoned(str(j.path), sender_id="s1", boot=boot)
    j.close(remove=False)
    taken = journal.take_abandoned(str(j.path), sender_id="s1", boot=boot)
    assert taken is not None
    try:
        trail = taken.trail
        assert trail.handed == {1, 2}
        assert set(trail.outcomes) == {1}
        assert trail.outcomes[1].outcome == SENT
        # The handover's moment comes back too: the letter's `sent_at`.
        assert trail.outcomes[1].letter == journal.Letter(
            message_id="<1@x>", subject="Grüße", handed_at=HANDED
        )
        # Another process cannot take it while this one settles its claims.
        assert not journal.is_abandoned(str(j.path), sender_id="s1", boot=boot)
        taken.remove()
    finally:
        taken.release()
    assert not j.path.exists()


def test_the_journal_is_not_trusted_from_another_boot_or_for_another_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = journal.boot_id()
    j = journal.Journal.create(tmp_path, sender_id="s1", boot=boot)
    j.handing(7)
    j.close(remove=False)
    assert journal.take_abandoned(str(j.path), sender_id="s2", boot=boot) is None
    assert journal.take_abandoned(str(tmp_path / "none.journal"), sender_id="s1", boot=boot) is None
    assert journal.take_abandoned(None, sender_id="s1", boot=boot) is None
    # After a reboot (or from another machine) what was never synced may be gone.
    monkeypatch.setenv(journal.BOOT_ID_ENV, "another-boot")
    assert journal.take_abandoned(str(j.path), sender_id="s1", boot=boot) is None


def test_a_line_cut_short_by_the_kill_proves_nothing_and_the_rest_still_counts(
    tmp_path: Path,
) -> None:
    boot = journal.boot_id()
    # A real process appends and dies by SIGKILL halfway through writing a line (simulated by
    # writing half a line itself), the way a kill can land anywhere.
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mailer import journal\n"
        f"j = journal.Journal.create(Path({str(tmp_path)!r}), sender_id='s9', boot={boot!r})\n"
        "j.claiming([5, 6])\n"
        "j.handing(5)\n"
        "j._append(b'p 6')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == -9
    path = tmp_path / "s9.journal"
    assert path.stat().st_size >= 1 << 20  # space reserved ahead
    taken = journal.take_abandoned(str(path), sender_id="s9", boot=boot)
    assert taken is not None
    try:
        assert taken.trail.handed == {5}
    finally:
        taken.release()


def test_sweep_removes_only_settled_journals_of_gone_senders(tmp_path: Path) -> None:
    boot = journal.boot_id()
    gone = journal.Journal.create(tmp_path, sender_id="gone", boot=boot)
    gone.close(remove=False)
    holding = journal.Journal.create(tmp_path, sender_id="holding", boot=boot)
    holding.close(remove=False)
    live = journal.Journal.create(tmp_path, sender_id="live", boot=boot)
    try:
        removed = journal.sweep(tmp_path, settled=lambda sender: sender != "holding")
        assert removed == 1
        assert sorted(p.name for p in tmp_path.glob("*.journal")) == [
            "holding.journal",
            "live.journal",
        ]
    finally:
        live.close(remove=True)
    assert os.path.exists(tmp_path / "holding.journal")
