"""Issue 11 item 8: unsubscribe (and VERP) tokens cannot be forged.

The key is a random workspace secret: an owner-only file for a SQLite workspace, the `secrets`
table for a shared PostgreSQL one; never printed; a configured secret still wins; tokens carry
the key's version, so a rotated secret keeps verifying letters already out.
"""

from __future__ import annotations

import hashlib
import hmac
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Cli
from sqlalchemy import Engine, func, select

from mailer import db, tokens, workspace_secret
from mailer.cli import cli
from mailer.config import Workspace, create_workspace, find_workspace
from mailer.errors import InvalidValueError, WorkspaceError
from mailer.message import parse
from mailer.models import Secret
from mailer.tokens import Key, KeyRing, Purpose

SLUG = "appeal"
EMAIL = "maire@lille.example.org"


def keyring(workspace: Path, **kwargs: object) -> KeyRing:
    return workspace_secret.keyring(find_workspace(start=workspace), **kwargs)  # type: ignore[arg-type]


def make(keys: KeyRing, *, email: str = EMAIL, purpose: Purpose = Purpose.UNSUBSCRIBE) -> str:
    return tokens.make(
        keys, purpose=purpose, campaign_id=3, contact_id=1234, slug=SLUG, email=email
    )


def check(
    keys: KeyRing, token: str, *, email: str = EMAIL, purpose: Purpose = Purpose.UNSUBSCRIBE
) -> bool:
    return tokens.verify(keys, token, purpose=purpose, slug=SLUG, email=email)


def import_contacts(run: Cli, workspace: Path, text: str) -> None:
    path = workspace.parent / "contacts.csv"
    path.write_text(text, encoding="utf-8")
    run.ok("import", "contacts", str(path))


def with_setting(workspace: Path, line: str) -> None:
    config = workspace / "mailer.toml"
    config.write_text(config.read_text().replace("[campaign]\n", f"[campaign]\n{line}\n"))


# --------------------------------------------------------------------------- the token


def test_a_token_names_its_letter_and_verifies_only_for_it(workspace: Path) -> None:
    keys = keyring(workspace)
    token = make(keys)
    assert len(token) <= 40 and token == token.lower() and token.isalnum()
    ids = tokens.decode(token)
    assert ids is not None and (ids.campaign_id, ids.contact_id) == (3, 1234)
    assert ids.version == keys.signing.version == 1
    assert check(keys, token)
    # Upper-cased by a mail server on the way back: still the same token.
    assert check(keys, token.upper())
    # Another address, campaign or purpose: refused.
    assert not check(keys, token, email="ob@nuernberg.example.org")
    assert not tokens.verify(keys, token, purpose=Purpose.UNSUBSCRIBE, slug="other", email=EMAIL)
    assert not check(keys, token, purpose=Purpose.VERP)
    # One character changed anywhere: refused, or not a token at all.
    for i in range(len(token)):
        changed = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1 :]
        assert not check(keys, changed), i
    for junk in ("", "x", "not a token", "a" * 200, token + "=="):
        assert not check(keys, junk)
        assert tokens.decode(junk) is None or not check(keys, junk)


def test_the_slug_no_longer_keys_the_token(workspace: Path) -> None:
    """Before: with no unsubscribe_secret the key was the slug, which List-Id shows."""
    keys = keyring(workspace)
    forged_key = KeyRing(signing=Key(version=1, secret=SLUG.encode()), known=())
    assert not check(keys, make(forged_key))
    old_style = hmac.new(SLUG.encode(), f"{SLUG}\0{EMAIL}".encode(), hashlib.sha256).hexdigest()
    assert not check(keys, old_style[:32])


def test_a_composed_letter_carries_a_token_only_the_workspace_key_verifies(
    run: Cli, workspace: Path
) -> None:
    with_setting(workspace, 'unsubscribe_url = "https://example.org/u?t={token}"')
    import_contacts(
        run, workspace, "email,name,language\nmaire@lille.example.org,Martine Aubry,fr\n"
    )
    run.ok("campaign", "create", SLUG, "--template", "appeal", "--from", "office@example.org")
    raw = run.ok("preview", SLUG, "--raw").stdout_bytes
    header = str(parse(raw)["List-Unsubscribe"])
    token = header.split("?t=")[1].split(">")[0]
    old_style = hmac.new(SLUG.encode(), f"{SLUG}\0{EMAIL}".encode(), hashlib.sha256).hexdigest()
    assert token != old_style[:32]
    ids = tokens.decode(token)
    assert ids is not None
    assert tokens.verify(
        keyring(workspace), token, purpose=Purpose.UNSUBSCRIBE, slug=SLUG, email=EMAIL
    )


# --------------------------------------------------------------------------- the secret file


def test_init_makes_an_owner_only_secret_and_never_prints_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "office")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    path = tmp_path / "office" / workspace_secret.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = keyring(tmp_path / "office")
    encoded = workspace_secret._encode(keys.signing.secret)
    assert encoded in path.read_text()
    assert encoded not in result.output
    assert keys.signing.secret.hex() not in result.output
    assert "secret" not in repr(keys.signing) or encoded not in repr(keys.signing)


def test_an_older_workspace_gets_its_secret_on_first_use(run: Cli, workspace: Path) -> None:
    path = workspace / workspace_secret.SECRET_FILE
    path.unlink()  # a workspace made before secrets existed
    import_contacts(run, workspace, "email\nmaire@lille.example.org\n")
    run.ok("campaign", "create", SLUG, "--template", "appeal", "--from", "office@example.org")
    run.ok("preview", SLUG)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    first = keyring(workspace)
    assert keyring(workspace) == first  # made once, then kept


def test_db_upgrade_of_an_older_workspace_makes_its_secret(tmp_path: Path) -> None:
    # A workspace from before secrets: schema 0004, no secret file.
    old = create_workspace(root=tmp_path / "old")
    engine = db.make_engine(old.database_url)
    db.upgrade(engine, revision="0004_event_actor")
    engine.dispose()
    path = old.root / workspace_secret.SECRET_FILE
    assert not path.exists()
    result = Cli(old.root).ok("db", "upgrade")
    assert "upgraded from 0004_event_actor" in result.output
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert workspace_secret._encode(keyring(old.root).signing.secret) not in result.output


def test_a_secret_file_readable_by_others_is_made_owner_only_again(workspace: Path) -> None:
    path = workspace / workspace_secret.SECRET_FILE
    path.chmod(0o644)
    keyring(workspace)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_damaged_secret_file_is_one_clear_error(run: Cli, workspace: Path) -> None:
    (workspace / workspace_secret.SECRET_FILE).write_text("{not json")
    with pytest.raises(WorkspaceError, match=r"mailer\.secret: the workspace secret is damaged"):
        keyring(workspace)


def test_processes_starting_at_once_agree_on_one_secret(workspace: Path) -> None:
    (workspace / workspace_secret.SECRET_FILE).unlink()
    found: list[KeyRing] = []
    threads = [threading.Thread(target=lambda: found.append(keyring(workspace))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({k.signing.secret for k in found}) == 1


# --------------------------------------------------------------------------- configured and rotated


def test_a_configured_secret_wins_and_older_letters_still_verify(workspace: Path) -> None:
    before = make(keyring(workspace))
    with_setting(workspace, 'unsubscribe_secret = "a-long-configured-secret-value"')
    keys = keyring(workspace)
    assert keys.signing.secret == b"a-long-configured-secret-value"
    assert keys.signing.version > tokens.GENERATED_MAX
    after = make(keys)
    assert tokens.decode(after).version == keys.signing.version  # type: ignore[union-attr]
    assert check(keys, before) and check(keys, after)
    # The configured secret changes; the earlier one kept as old: both still verify.
    config = workspace / "mailer.toml"
    config.write_text(
        config.read_text().replace(
            'unsubscribe_secret = "a-long-configured-secret-value"',
            'unsubscribe_secret = "the-next-configured-secret-value"\n'
            'unsubscribe_old_secrets = ["a-long-configured-secret-value"]',
        )
    )
    rotated = keyring(workspace)
    assert check(rotated, before) and check(rotated, after) and check(rotated, make(rotated))


@pytest.mark.parametrize(
    "line", ['unsubscribe_secret = "short"', "unsubscribe_secret = 12345678901234567890"]
)
def test_a_weak_configured_secret_is_refused(workspace: Path, line: str) -> None:
    with_setting(workspace, line)
    with pytest.raises(
        InvalidValueError, match=r"\[campaign\] unsubscribe_secret: must be a string of at least 16"
    ):
        keyring(workspace)


def test_rotation_keeps_old_letters_verifying(run: Cli, workspace: Path) -> None:
    keys = keyring(workspace)
    old = make(keys)
    result = run.ok("unsubscribe", "rotate-secret")
    assert "version 2" in result.output
    assert workspace_secret._encode(keyring(workspace).signing.secret) not in result.output
    rotated = keyring(workspace)
    assert rotated.signing.version == 2 and rotated.signing.secret != keys.signing.secret
    new = make(rotated)
    assert tokens.decode(new).version == 2  # type: ignore[union-attr]
    assert check(rotated, old) and check(rotated, new)
    assert stat.S_IMODE((workspace / workspace_secret.SECRET_FILE).stat().st_mode) == 0o600


# --------------------------------------------------------------------------- a shared PostgreSQL workspace


def pg_workspace(root: Path, url: str) -> Workspace:
    result = CliRunner().invoke(cli, ["--db", url, "init", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Workspace(
        root=root, settings=find_workspace(start=root).settings, database_url_override=url
    )


def test_a_postgresql_workspace_keeps_its_secret_in_the_database(
    tmp_path: Path, pg_url: str
) -> None:
    # Two members of a team, each with a workspace folder on their own machine, one database.
    alice = pg_workspace(tmp_path / "alice", pg_url)
    bob = Workspace(root=tmp_path / "bob", settings={}, database_url_override=pg_url)
    (tmp_path / "bob").mkdir()
    assert not (alice.root / workspace_secret.SECRET_FILE).exists()
    engine: Engine = db.make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Secret)) == 1
        keys_a = workspace_secret.keyring(alice, engine=engine)
        keys_b = workspace_secret.keyring(bob)
        assert keys_a == keys_b
        token = make(keys_a)
        assert check(keys_b, token)
        assert not (bob.root / workspace_secret.SECRET_FILE).exists()
        # Bob rotates; Alice signs with the new key at once and still verifies the old token.
        assert workspace_secret.rotate(bob) == 2
        again = workspace_secret.keyring(alice, engine=engine)
        assert again.signing.version == 2 and check(again, token)
    finally:
        engine.dispose()
