"""Issue 12 item 2: one-click unsubscribe (RFC 8058) and `mailer unsubscribe TOKEN|EMAIL`.

Letters are really sent (the test SMTP server), their List-Unsubscribe URLs really requested
over HTTP from the endpoint on 127.0.0.1 (uvicorn in a thread, and `mailer unsubscribe serve` as
a process), and the suppression is proved by the next send skipping the letter. The language
matrix and the bad tokens go through the ASGI app directly.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import Cli
from smtp_server import SmtpTestServer
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from mailer import compose, tokens, unsubscribe_server, workspace_secret
from mailer.config import find_workspace
from mailer.message import parse
from mailer.models import Campaign, Contact, Event, Message, Suppression
from mailer.render import ContactView, Recipient, load_template_set
from mailer.tokens import Key, KeyRing, Purpose
from mailer.unsubscribe import LANGUAGES

URL = "https://www.example.org/unsubscribe?t={token}"
CONTACTS = {
    "maire@lille.example.org": "fr",
    "ob@nuernberg.example.org": "de",
    "mer@lviv.example.org": "uk",
    "mayor@york.example.org": "en",
}


def setup_campaign(run: Cli, workspace: Path, *, slug: str = "appeal") -> None:
    config = workspace / "mailer.toml"
    if "\nunsubscribe_url" not in config.read_text():
        config.write_text(
            config.read_text().replace("[campaign]\n", f'[campaign]\nunsubscribe_url = "{URL}"\n')
        )
        path = workspace.parent / "contacts.csv"
        lines = [f"{email},Mayor,{lang}" for email, lang in CONTACTS.items()]
        path.write_text("email,name,language\n" + "\n".join(lines) + "\n", encoding="utf-8")
        run.ok("import", "contacts", str(path))
    run.ok("campaign", "create", slug, "--template", "appeal", "--from", "office@example.org")


def send(run: Cli, server: SmtpTestServer, slug: str = "appeal") -> dict[str, str]:
    """Send the campaign; each recipient's unsubscribe URL, from the letter it received."""
    before = len(server.received)
    result = run("send", slug, "--smtp", server.url(), "--yes")
    assert result.exit_code == 0, result.output
    urls = {}
    for received in server.received[before:]:
        message = parse(received.data)
        header = " ".join(str(message["List-Unsubscribe"]).split())
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        mailto, https = re.findall(r"<([^>]+)>", header)
        assert mailto.startswith("mailto:office@example.org")
        urls[received.rcpt_tos[0]] = https
    return urls


def local(url: str, base: str) -> str:
    """The letter's https URL as the reverse proxy hands it to the endpoint."""
    return base + url.removeprefix("https://www.example.org")


@contextmanager
def serving(workspace: Path, engine: Engine) -> Iterator[str]:
    ws = find_workspace(start=workspace)
    app = unsubscribe_server.create_app(workspace=ws, engine=engine)
    sock = unsubscribe_server.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = unsubscribe_server.server_for(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the endpoint did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def suppressed(engine: Engine) -> dict[str, str]:
    with Session(engine) as s:
        return {e: r for e, r in s.execute(select(Suppression.email, Suppression.reason))}


def unsubscribe_events(engine: Engine) -> list[tuple[str | None, int | None, str | None]]:
    with Session(engine) as s:
        rows = s.execute(
            select(Contact.email, Event.message_id, Event.via)
            .join(Contact, Contact.id == Event.contact_id)
            .where(Event.kind == "unsubscribed")
            .order_by(Event.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


# --------------------------------------------------------------------------- over real HTTP


def test_one_click_post_unsubscribes_and_the_next_send_skips_the_letter(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    setup_campaign(run, workspace)
    with SmtpTestServer() as smtp:
        urls = send(run, smtp)
        assert set(urls) == set(CONTACTS)
        with serving(workspace, engine) as base:
            # What a mail program sends (RFC 8058 prefers multipart/form-data).
            answer = httpx.post(
                local(urls["maire@lille.example.org"], base),
                files={"List-Unsubscribe": (None, "One-Click")},
            )
            assert answer.status_code == 200
            assert answer.headers["cache-control"] == "no-store"
            assert answer.headers["referrer-policy"] == "no-referrer"
            assert '<html lang="fr">' in answer.text
            assert "Votre désinscription est enregistrée" in answer.text
            assert "maire@lille.example.org" in answer.text
            # Pressed again, or retried by the mail program: nothing more is written.
            again = httpx.post(
                local(urls["maire@lille.example.org"], base),
                data={"List-Unsubscribe": "One-Click"},
            )
            assert again.status_code == 200 and "Votre désinscription" in again.text
        assert suppressed(engine) == {"maire@lille.example.org": "unsubscribed"}
        with Session(engine) as s:
            letter = s.scalar(
                select(Message.id).join(Contact).where(Contact.email == "maire@lille.example.org")
            )
        assert unsubscribe_events(engine) == [("maire@lille.example.org", letter, "web")]
        # The next campaign to the same people: the unsubscribed address is skipped.
        setup_campaign(run, workspace, slug="appeal-again")
        second = send(run, smtp, slug="appeal-again")
    assert set(second) == set(CONTACTS) - {"maire@lille.example.org"}
    with Session(engine) as s:
        skipped = s.scalar(
            select(Message.status)
            .join(Contact)
            .join(Campaign)
            .where(Contact.email == "maire@lille.example.org", Campaign.slug == "appeal-again")
        )
    assert skipped == "skipped"


def test_a_get_asks_first_and_its_button_posts(run: Cli, workspace: Path, engine: Engine) -> None:
    setup_campaign(run, workspace)
    with SmtpTestServer() as smtp:
        urls = send(run, smtp)
    with serving(workspace, engine) as base, httpx.Client(base_url=base) as client:
        url = local(urls["ob@nuernberg.example.org"], base)
        page = client.get(url)
        assert page.status_code == 200
        assert '<html lang="de">' in page.text
        assert "Möchten Sie unter <strong>ob@nuernberg.example.org</strong>" in page.text
        form = re.search(r'<form method="post">(.*?)</form>', page.text, re.S)
        assert form is not None and ">Abmelden</button>" in form.group(1)
        # A GET alone (a link scanner, a preview) unsubscribes nobody.
        assert suppressed(engine) == {}
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]+)"', form.group(1)))
        done = client.post(url, data=fields)  # the form posts back to the same URL
        assert done.status_code == 200 and "Sie sind abgemeldet" in done.text
        assert suppressed(engine) == {"ob@nuernberg.example.org": "unsubscribed"}
        # Asked again after unsubscribing: says so instead of asking.
        assert "Sie sind abgemeldet" in client.get(url).text


def test_serve_runs_as_a_command_and_stops_cleanly(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    setup_campaign(run, workspace)
    with SmtpTestServer() as smtp:
        urls = send(run, smtp)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mailer.cli import main; main()",
            "-w",
            str(workspace),
            "unsubscribe",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILER_")},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
        assert match, line + (process.stderr.read() if process.poll() is not None else "")
        answer = httpx.post(
            local(urls["mer@lviv.example.org"], match.group(1)),
            data={"List-Unsubscribe": "One-Click"},
            timeout=10,
        )
        assert answer.status_code == 200 and "Вас відписано" in answer.text
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert suppressed(engine) == {"mer@lviv.example.org": "unsubscribed"}


# --------------------------------------------------------------------------- through the ASGI app


@pytest.fixture
def client(run: Cli, workspace: Path, engine: Engine) -> Iterator[TestClient]:
    setup_campaign(run, workspace)
    app = unsubscribe_server.create_app(workspace=find_workspace(start=workspace), engine=engine)
    with TestClient(app, base_url="https://example.org") as test_client:
        yield test_client


def token_for(
    workspace: Path,
    engine: Engine,
    email: str,
    *,
    keys: KeyRing | None = None,
    campaign_id: int | None = None,
) -> str:
    with Session(engine) as s:
        contact = s.scalar(select(Contact.id).where(Contact.email == email))
        campaign = s.scalar(select(Campaign).where(Campaign.slug == "appeal"))
        assert contact is not None and campaign is not None
        return tokens.make(
            keys or workspace_secret.keyring(find_workspace(start=workspace)),
            purpose=Purpose.UNSUBSCRIBE,
            campaign_id=campaign.id if campaign_id is None else campaign_id,
            contact_id=contact,
            slug=campaign.slug,
            email=email,
        )


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_confirmation_page_speaks_each_letter_language(
    client: TestClient, workspace: Path, engine: Engine, language: str
) -> None:
    with Session(engine) as s, s.begin():
        s.execute(
            Contact.__table__.update()  # type: ignore[attr-defined]
            .where(Contact.email == "mayor@york.example.org")
            .values(language=f"{language}-XX")
        )
    token = token_for(workspace, engine, "mayor@york.example.org")
    page = client.get(f"/unsubscribe?t={token}")
    assert page.status_code == 200
    assert f'<html lang="{language}">' in page.text
    assert '<form method="post">' in page.text
    # The page's words are that language's own, not the English ones.
    if language != "en":
        assert "Do you want to stop receiving" not in page.text


def test_a_token_in_the_path_works_too(client: TestClient, workspace: Path, engine: Engine) -> None:
    token = token_for(workspace, engine, "mayor@york.example.org")
    assert client.post(f"/some/prefix/u/{token}").status_code == 200
    assert suppressed(engine) == {"mayor@york.example.org": "unsubscribed"}


def test_the_browser_language_is_used_when_the_letter_has_none(
    client: TestClient, workspace: Path, engine: Engine
) -> None:
    page = client.get(
        "/unsubscribe?t=garbage", headers={"Accept-Language": "xx, it;q=0.8, de;q=0.5"}
    )
    assert page.status_code == 400 and '<html lang="it">' in page.text


def test_forged_tampered_and_foreign_tokens_are_refused(
    client: TestClient, workspace: Path, engine: Engine
) -> None:
    good = token_for(workspace, engine, "mayor@york.example.org")
    tampered = good[:-3] + ("aaa" if good[-3:] != "aaa" else "bbb")
    forged = token_for(
        workspace,
        engine,
        "mayor@york.example.org",
        keys=KeyRing(signing=Key(version=1, secret=b"appeal"), known=()),
    )
    # Another contact's token, with the ids of this one swapped in.
    other = tokens.decode(token_for(workspace, engine, "ob@nuernberg.example.org"))
    assert other is not None
    unknown_campaign = token_for(workspace, engine, "mayor@york.example.org", campaign_id=999)
    # Well formed, but naming an id no integer column holds (it must never reach the SQL).
    huge = base64.b32encode(bytes([1]) + bytes([0xFF] * 4 + [0x7F]) + b"\x01" + b"m" * 12)
    huge_id = huge.decode().rstrip("=").lower()
    cases = {
        f"/unsubscribe?t={tampered}": 403,
        f"/unsubscribe?t={forged}": 403,
        f"/unsubscribe?t={unknown_campaign}": 404,
        "/unsubscribe?t=not-a-token": 400,
        f"/unsubscribe?t={huge_id}": 400,
        "/unsubscribe?t=": 400,
        "/": 400,
        f"/unsubscribe?t={'7' * 500}": 400,
    }
    for path, status in cases.items():
        for method in ("GET", "POST"):
            answer = client.request(method, path)
            assert answer.status_code == status, (method, path, answer.status_code)
            assert "This unsubscribe link is not valid" in answer.text
            assert "Traceback" not in answer.text
    assert suppressed(engine) == {}
    assert unsubscribe_events(engine) == []


def test_a_database_that_cannot_be_reached_is_a_503_page(
    workspace: Path, run: Cli, engine: Engine
) -> None:
    setup_campaign(run, workspace)
    token = token_for(workspace, engine, "mayor@york.example.org")
    from mailer import db

    broken = db.make_engine(f"sqlite:///{workspace / 'no-such-folder' / 'x.db'}")
    app = unsubscribe_server.create_app(workspace=find_workspace(start=workspace), engine=broken)
    with TestClient(app) as test_client:
        answer = test_client.post(f"/unsubscribe?t={token}")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "60"
    assert "try again" in answer.text
    broken.dispose()


# --------------------------------------------------------------------------- by hand


def test_unsubscribe_by_token_or_address_on_the_command_line(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    setup_campaign(run, workspace)
    with SmtpTestServer() as smtp:
        urls = send(run, smtp)
    token = urls["mayor@york.example.org"].split("?t=")[1]
    result = run.ok("unsubscribe", token)
    assert result.output.startswith(
        "Unsubscribed mayor@york.example.org (letter of campaign appeal)"
    )
    assert run.ok("unsubscribe", token).output.startswith(
        "mayor@york.example.org was already suppressed"
    )
    result = run.ok("unsubscribe", "Someone@Elsewhere.example.com")
    assert result.output.startswith("Unsubscribed someone@elsewhere.example.com")
    assert suppressed(engine) == {
        "mayor@york.example.org": "unsubscribed",
        "someone@elsewhere.example.com": "unsubscribed",
    }
    assert [e[0] for e in unsubscribe_events(engine)] == ["mayor@york.example.org"]
    assert [e[2] for e in unsubscribe_events(engine)] == ["cli"]
    bad = run("unsubscribe", token[:-2] + "zz")
    assert bad.exit_code == 1
    assert bad.output.strip().startswith("Error: ") and len(bad.output.strip().splitlines()) == 1
    bad_address = run("unsubscribe", "not@an@address")
    assert bad_address.exit_code == 1 and bad_address.output.startswith("Error: ")
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Suppression)) == 2


# --------------------------------------------------------------------------- the templates


def test_every_starter_template_shows_an_unsubscribe_line(workspace: Path) -> None:
    """Every variant, text and HTML, ends with a visible way out: the link when one is set,
    else the mailto."""
    template_set = load_template_set(workspace / "templates", "appeal")
    languages = sorted(
        {p.name.split(".")[0] for p in (workspace / "templates" / "appeal").glob("*.j2")}
    )
    assert len(languages) >= 10 and set(LANGUAGES) <= set(languages)
    campaign = Campaign(
        id=7,
        slug="appeal",
        template="appeal",
        from_address="office@example.org",
        reply_to=None,
        default_language="en",
    )
    html_seen = 0
    for url in (None, URL):
        settings = find_workspace(start=workspace)
        if url:
            settings.settings.setdefault("campaign", {})["unsubscribe_url"] = url
        composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=settings
        )
        for language in languages:
            recipient = Recipient(
                contact_id=1,
                contact=ContactView(
                    email="mayor@york.example.org",
                    name="Ann Example",
                    title=None,
                    salutation=None,
                    language=language,
                    organisation=None,
                    attributes=types.MappingProxyType({}),
                ),
                city=None,
                partnerships=(),
                signatories=(),
            )
            rendered = composer.render(recipient)
            assert rendered.language == language
            expected = composer.unsubscribe_url(recipient) if url else composer.unsubscribe_mailto
            assert expected is not None
            footer = rendered.text.rstrip().splitlines()[-1]
            assert expected in footer, (language, footer)
            if rendered.html is not None:
                html_seen += 1
                last = rendered.html[rendered.html.rindex("<p") :]
                assert f'href="{expected}"' in last, (language, last)
    assert html_seen >= 2


# --------------------------------------------------------------------------- a shared database


def test_on_a_shared_postgresql_database_any_machine_verifies_any_senders_link(
    tmp_path: Path, pg_url: str
) -> None:
    """Alice composes on her machine; the endpoint runs from another workspace folder (another
    machine) on the same database: the secret is the database's, so her link verifies there."""
    from click.testing import CliRunner

    from mailer import db
    from mailer.cli import cli
    from mailer.config import Workspace

    alice = tmp_path / "alice"
    result = CliRunner().invoke(cli, ["--db", pg_url, "init", str(alice)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = alice / "mailer.toml"
    # `init --db` wrote the database URL into mailer.toml already.
    assert "url = " in config.read_text().split("[campaign]")[0]
    config.write_text(
        config.read_text().replace("[campaign]\n", f'[campaign]\nunsubscribe_url = "{URL}"\n')
    )
    run = Cli(alice)
    (tmp_path / "c.csv").write_text("email,language\nmaire@lille.example.org,fr\n")
    run.ok("import", "contacts", str(tmp_path / "c.csv"))
    run.ok("campaign", "create", "appeal", "--template", "appeal", "--from", "office@example.org")
    raw = run.ok("preview", "appeal", "--raw").stdout_bytes
    link = re.findall(r"<([^>]+)>", " ".join(str(parse(raw)["List-Unsubscribe"]).split()))[1]
    assert not (alice / workspace_secret.SECRET_FILE).exists()

    (tmp_path / "bob").mkdir()
    bob = Workspace(
        root=tmp_path / "bob",
        settings={"campaign": {"unsubscribe_url": URL}},
        database_url_override=pg_url,
    )
    engine = db.make_engine(pg_url)
    try:
        app = unsubscribe_server.create_app(workspace=bob, engine=engine)
        with TestClient(app) as client:
            answer = client.post(link.removeprefix("https://www.example.org"))
        assert answer.status_code == 200 and "Votre désinscription" in answer.text
        assert suppressed(engine) == {"maire@lille.example.org": "unsubscribed"}
    finally:
        engine.dispose()
