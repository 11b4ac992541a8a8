"""`mailer check` and `mailer preview`: every problem found and grouped, exact bytes shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy.orm import Session, sessionmaker
from test_campaigns import FROM, add_world, contact, create

from mailer import campaigns, compose, db
from mailer import check as checking
from mailer.audience import Audience
from mailer.config import find_workspace
from mailer.message import parse
from mailer.models import Contact, Suppression


@pytest.fixture
def world(session_factory: sessionmaker[Session]) -> dict[str, int]:
    return add_world(session_factory)


def template(run: Cli, name: str, files: dict[str, str]) -> None:
    folder = run.workspace / "templates" / name
    folder.mkdir(exist_ok=True)
    for file, source in files.items():
        (folder / file).write_text(source, encoding="utf-8")


def campaign(run: Cli, tmpl: str = "appeal", *extra: str) -> None:
    run.ok("campaign", "create", "c", "--template", tmpl, "--from", FROM, *extra)


def test_check_on_the_starter_appeal_is_clean(run: Cli, world: dict[str, int]) -> None:
    campaign(run, "appeal", "--reply-to", "signatory")
    result = run("check", "c")
    assert result.exit_code == 0, result.output
    assert "Campaign c: 5 recipients (all contacts); template appeal" in result.output
    assert "Blocking problems" not in result.output
    # The Swedish-speaking contact gets English, and check says so.
    assert (
        "contacts asking for 'sv' get the 'en' variant (the template has no sv): 1" in result.output
    )
    assert "e.g. info@example.com" in result.output
    # Nothing is known about info@: the one letter greeting nobody in particular.
    assert (
        "letters with the generic greeting 'Dear colleagues,' (no name, office or form of "
        "address known; en variant): 1"
    ) in result.output
    assert "OK: nothing blocks sending (2 warnings)." in result.output


def test_a_field_no_contact_has_blocks_sending(run: Cli, world: dict[str, int]) -> None:
    template(run, "t", {"en.txt.j2": "Subject: Hi\n\nSince {{ contact.attributes.mayor_since }}\n"})
    campaign(run, "t")
    result = run("check", "c")
    assert result.exit_code == 1
    assert (
        "contacts lack contact.attributes.mayor_since, which the template uses "
        "(templates/t/en.txt.j2:3): 5" in result.output
    )
    examples = re.search(r"e\.g\. (.*) and 0 more|e\.g\. (.*)\n", result.output)
    assert examples is not None
    assert "Error: campaign c: 1 kinds of problem block sending" in result.output


def test_a_field_some_contacts_lack_is_reported_with_examples(
    run: Cli, world: dict[str, int]
) -> None:
    template(
        run,
        "t",
        {"en.txt.j2": "Subject: {{ city.name }}\n\n{{ contact.attributes.population }} people\n"},
    )
    campaign(run, "t")
    result = run("check", "c")
    assert result.exit_code == 1
    out = result.output
    assert "contacts lack city.name, which the template uses (templates/t/en.txt.j2:1): 1" in out
    assert "e.g. info@example.com" in out
    assert "contacts lack contact.attributes.population, which the template uses" in out
    assert "e.g. lord.mayor@leeds.example.org" in out


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Subject: {{ '' }}\n\nbody\n", "empty subject (en variant)"),
        ("Subject: x\n\n{{ '{{' }} contact.name }}\n", "unrendered template markup in the text"),
        ("Subject: {{ '{%' }}\n\nb\n", "unrendered template markup in the subject"),
        (
            "Subject: x\n\n{{ ''.__class__.__mro__ }}\n",
            "templates/t/en.txt.j2:3: unsafe template code",
        ),
        ("Subject: x\n\n{{ 1 / 0 }}\n", "templates/t/en.txt.j2:3: ZeroDivisionError"),
    ],
)
def test_blocking_problems(run: Cli, world: dict[str, int], source: str, expected: str) -> None:
    template(run, "t", {"en.txt.j2": source})
    campaign(run, "t")
    result = run("check", "c")
    assert result.exit_code == 1, result.output
    assert "Blocking problems:" in result.output
    assert expected in result.output


def test_template_errors_after_create_are_reported(run: Cli, world: dict[str, int]) -> None:
    template(run, "t", {"en.txt.j2": "Subject: x\n\nfine\n"})
    campaign(run, "t")
    template(run, "t", {"en.txt.j2": "Subject: x\n\nline 3\n{% for x in %}\n"})
    # The campaign keeps the copy frozen at create: a broken edit of the folder is reported
    # as a difference, and only taken (refused, with file and line) by `campaign update`.
    result = run("check", "c")
    assert result.exit_code == 0, result.output
    assert "differs from the copy frozen in campaign c (en.txt.j2 changed)" in result.output
    preview = run("preview", "c")
    assert preview.exit_code == 0
    assert "Note: the local template folder" in preview.output
    result = run("campaign", "update", "c", "--template", "t")
    assert result.exit_code == 1
    assert "templates/t/en.txt.j2:4: " in result.output
    template(run, "t", {"en.txt.j2": "Body without headers\n"})
    result = run("campaign", "update", "c", "--template", "t")
    assert result.exit_code == 1
    assert "templates/t/en.txt.j2:1: expected a header line" in result.output
    template(run, "t", {"en.txt.j2": "Subject: y\n\nbetter\n"})
    assert "en.txt.j2 changed" in run.ok("campaign", "update", "c", "--template", "t").output
    result = run.ok("check", "c")
    assert "differs from the copy" not in result.output


def test_missing_subject_names_the_file(run: Cli, world: dict[str, int]) -> None:
    template(run, "t", {"en.txt.j2": "\nDear mayor\n"})
    result = run("campaign", "create", "c", "--template", "t", "--from", FROM)
    assert result.exit_code == 1
    assert "Error: templates/t/en.txt.j2: no `Subject:` line" in result.output


def test_missing_language_variant_is_a_reported_fallback(run: Cli, world: dict[str, int]) -> None:
    template(
        run,
        "t",
        {"en.txt.j2": "Subject: Hi\n\nHello\n", "de.txt.j2": "Subject: Hallo\n\nGuten Tag\n"},
    )
    campaign(run, "t", "--language", "de")
    result = run("check", "c")
    assert result.exit_code == 0, result.output
    assert (
        "contacts asking for 'pl' get the 'de' variant (the template has no pl): 1" in result.output
    )
    assert (
        "contacts asking for 'fr' get the 'de' variant (the template has no fr): 1" in result.output
    )
    assert "contacts asking for 'de-DE'" not in result.output
    assert re.search(r"rendered 5: de 4, en 1", result.output)


def test_warnings_do_not_block(
    run: Cli, world: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    with db.transaction(session_factory) as s:
        s.add(Suppression(email="maire@lille.example.org", reason="unsubscribed", source="test"))
        contact(s, "not-an-address@", language="en")
        contact(s, "bcc@example.org", name="Mayor\r\nBcc: spy@example.com", language="en")
    template(run, "t", {"en.txt.j2": "Subject: " + "long " * 30 + "\n\nHello\n"})
    campaign(run, "t")
    result = run("check", "c")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "skipped when sending: 1" in out and "e.g. maire@lille.example.org" in out
    assert "invalid addresses, skipped when sending" in out and "not-an-address@" in out
    assert "names with line breaks" in out and "e.g. bcc@example.org" in out
    assert "subjects longer than 120 characters (en variant); mail clients cut them: 7\n" in out


def test_duplicate_addresses_block(
    run: Cli, world: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    # Only possible when rows bypass the importers; the unique key is on the normalised form.
    with db.transaction(session_factory) as s:
        contact(s, "Maire@Lille.example.org", language="fr")
    campaign(run)
    result = run("check", "c")
    assert result.exit_code == 1
    assert "addresses appear more than once (a contact would get two letters): 1" in result.output


def test_check_reports_an_empty_audience(run: Cli, world: dict[str, int]) -> None:
    campaign(run, "appeal", "--where", "country=JP")
    result = run("check", "c")
    assert result.exit_code == 0
    assert "no contact matches the audience (country=JP)" in result.output


def test_check_report_in_the_library(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    create(session_factory, workspace, audience=Audience(tags=("mayor",)))
    calls: list[tuple[int, int]] = []
    with db.transaction(session_factory) as session:
        report = checking.check_campaign(
            session,
            campaigns.get_campaign(session, "appeal"),
            templates_dir=workspace / "templates",
            settings=find_workspace(start=workspace),
            batch_size=2,  # pages through the audience
            progress=lambda done, total: calls.append((done, total)),
        )
    assert calls == [(2, 3), (1, 3)]
    assert report.ok and report.recipients == 3 and report.rendered == 3
    assert dict(report.languages) == {"pl": 1, "de": 1, "fr": 1}
    assert report.findings == []


# --------------------------------------------------------------------------- preview


def test_preview_shows_the_first_recipient_readably(run: Cli, world: dict[str, int]) -> None:
    campaign(run, "appeal", "--reply-to", "signatory")
    out = run.ok("preview", "c").output
    assert out.startswith("[language pl; ")
    assert "To: Zoë Łukasiewicz-Müller <prezydent@krakow.example.org>" in out
    assert "Reply-To: Andriy Sadovyi <mayor@lviv.example.org>" in out
    assert "From: Campaign Office <office@example.org>" in out
    assert "Subject: " in out and "=?utf-8?" not in out
    assert "Kraków" in out and "Andriy Sadovyi" in out


@pytest.mark.parametrize(
    ("email", "language", "names"),
    [
        ("prezydent@krakow.example.org", "pl", ["Kraków"]),
        ("ob@nuernberg.example.org", "de", ["Nürnberg", "Sehr geehrte Frau Oberbürgermeisterin"]),
        ("maire@lille.example.org", "fr", ["Lille"]),
        ("lord.mayor@leeds.example.org", "en", ["Leeds"]),
    ],
)
def test_preview_each_language(
    run: Cli, world: dict[str, int], email: str, language: str, names: list[str]
) -> None:
    campaign(run)
    out = run.ok("preview", "c", "--contact", email.upper()).output
    assert out.startswith(f"[language {language}; ")
    for name in names:
        assert name in out
    assert "{{" not in out and "{%" not in out and "None" not in out


def test_preview_raw_writes_the_exact_bytes(
    run: Cli, world: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    campaign(run)
    result = run.ok("preview", "c", "--contact", "ob@nuernberg.example.org", "--raw")
    data = result.stdout_bytes
    assert b"\r\n" in data and data.endswith(b"\r\n")
    message = parse(data)
    assert message["To"].addresses[0].addr_spec == "ob@nuernberg.example.org"
    with db.transaction(session_factory) as session:
        camp = campaigns.get_campaign(session, "c")
        workspace = find_workspace(start=run.workspace)
        template_set = compose.template_set_for(camp, templates_dir=workspace.templates_dir)
        composer = compose.composer_for(
            campaign=camp, template_set=template_set, settings=workspace
        )
        contact_id = next(
            r.id for r in session.query(Contact).filter_by(email="ob@nuernberg.example.org")
        )
        recipient = compose.load_recipients(session, [contact_id])[contact_id]
        expected = composer.compose(recipient, date=message["Date"].datetime)
    assert data == expected.data


def test_preview_never_shows_an_injected_header(
    run: Cli, world: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    with db.transaction(session_factory) as s:
        contact(s, "bcc@example.org", name="Mayor\r\nBcc: spy@example.com", language="en")
    campaign(run)
    data = run.ok("preview", "c", "--contact", "bcc@example.org", "--raw").stdout_bytes
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in head
    assert "Bcc" not in parse(data)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--contact", "nobody@example.org"], "no contact nobody@example.org"),
        (
            ["--contact", "lord.mayor@leeds.example.org"],
            "lord.mayor@leeds.example.org is not in the audience of campaign 'c' (tag=mayor)",
        ),
    ],
)
def test_preview_refuses_unknown_or_outside_contacts(
    run: Cli, world: dict[str, int], args: list[str], message: str
) -> None:
    campaign(run, "appeal", "--tag", "mayor")
    result = run("preview", "c", *args)
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output


def test_preview_and_check_of_unknown_campaign(run: Cli) -> None:
    for command in ("preview", "check"):
        result = run(command, "nope")
        assert result.exit_code == 1
        assert "Error: no campaign 'nope'; there are no campaigns yet" in result.output


def test_check_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        factory = db.session_factory(engine)
        add_world(factory)
        from mailer.config import create_workspace

        workspace = create_workspace(root=tmp_path / "ws", db_url=pg_url)
        create(factory, workspace.root, reply_to="signatory")
        with db.transaction(factory) as session:
            report = checking.check_campaign(
                session,
                campaigns.get_campaign(session, "appeal"),
                templates_dir=workspace.templates_dir,
                settings=workspace,
            )
            assert report.ok and report.rendered == 5
            composed = compose.preview(
                session,
                campaigns.get_campaign(session, "appeal"),
                contact_email="prezydent@krakow.example.org",
                templates_dir=workspace.templates_dir,
                settings=workspace,
            )
        assert parse(composed.data)["Reply-To"] == "Andriy Sadovyi <mayor@lviv.example.org>"
    finally:
        engine.dispose()


def test_check_with_worker_processes_matches_one_process(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    with db.transaction(session_factory) as s:
        s.add(Suppression(email="maire@lille.example.org", reason="manual", source="test"))
        for i in range(30):
            contact(
                s, f"extra{i}@example.org", name=f"Extra {i}", language=("de", "it", "en")[i % 3]
            )
        contact(s, "Extra0@Example.org", language="en")  # a duplicate in another slice
    folder = workspace / "templates" / "t"
    folder.mkdir()
    (folder / "en.txt.j2").write_text(
        "Subject: {{ contact.name or 'x' }}\n\n{{ contact.attributes.population }}\n"
    )
    (folder / "de.txt.j2").write_text("Subject: Hallo\n\nGuten Tag\n")
    create(session_factory, workspace, template="t")
    settings = find_workspace(start=workspace)
    reports = []
    import mailer.campaigns as module

    for workers in (1, 2):
        module._CHECK_SLICE = 7  # several slices per worker
        try:
            with db.transaction(session_factory) as session:
                reports.append(
                    checking.check_campaign(
                        session,
                        campaigns.get_campaign(session, "appeal"),
                        templates_dir=workspace / "templates",
                        settings=settings,
                        batch_size=3,
                        workers=workers,
                    )
                )
        finally:
            module._CHECK_SLICE = 5_000
    one, two = reports
    assert one.recipients == two.recipients == 36
    assert one.rendered == two.rendered
    assert one.languages == two.languages
    assert one.findings == two.findings
    assert {f.kind for f in one.findings} >= {
        "missing_field",
        "fallback",
        "suppressed",
        "duplicate",
    }


def test_a_signatory_reply_to_that_is_no_address_blocks(
    run: Cli, world: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    from mailer.models import Signatory

    with db.transaction(session_factory) as s:
        mayor = s.query(Signatory).filter_by(name="Andriy Sadovyi").one()
        mayor.email = "mayor at lviv"
    campaign(run, "appeal", "--reply-to", "signatory")
    result = run("check", "c")
    assert result.exit_code == 1
    assert "Reply-To 'mayor at lviv' is not a valid address" in result.output
    assert "e.g. prezydent@krakow.example.org" in result.output


def test_the_appeal_from_the_seeds_checks_clean_and_previews_in_each_language(run: Cli) -> None:
    import csv

    from conftest import SEEDS

    run.ok("import", "signatories", str(SEEDS / "signatories.csv"))
    run.ok("import", "partnerships", str(SEEDS / "partnerships.csv"))
    run.ok("import", "contacts", str(SEEDS / "contacts.csv"))
    run.ok(
        "campaign", "create", "appeal-2022", "--template", "appeal", "--from", FROM,
        "--reply-to", "signatory",
    )  # fmt: skip
    result = run("check", "appeal-2022")
    assert result.exit_code == 0, result.output
    assert "Blocking problems" not in result.output
    firsts: dict[str, str] = {}
    with (SEEDS / "contacts.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            firsts.setdefault(row["language"], row["email"])
    for language in ("en", "de", "fr", "pl"):
        out = run.ok("preview", "appeal-2022", "--contact", firsts[language]).output
        assert out.startswith(f"[language {language}; "), out[:80]
        assert "{{" not in out and "{%" not in out and "None" not in out


def test_preview_notes_a_suppressed_address(
    run: Cli, world: dict[str, int], session_factory: sessionmaker[Session]
) -> None:
    with db.transaction(session_factory) as s:
        s.add(Suppression(email="maire@lille.example.org", reason="unsubscribed", source="test"))
    campaign(run)
    out = run.ok("preview", "c", "--contact", "maire@lille.example.org").output
    assert "[note: maire@lille.example.org is suppressed (unsubscribed): send will skip it]" in out
    assert "[note:" not in run.ok("preview", "c").output
