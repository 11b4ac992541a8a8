"""Campaigns: create/list/show, recipients from the database, composing, freezing templates."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailer import campaigns, compose, db
from mailer.audience import Audience
from mailer.config import find_workspace
from mailer.errors import ConflictError, InvalidValueError, NotFoundError, TemplateError
from mailer.message import parse
from mailer.models import (
    Campaign,
    City,
    Contact,
    ContactTag,
    Partnership,
    Signatory,
    city_key,
)

FROM = "Campaign Office <office@example.org>"


def city(session: Session, name: str, country: str, region: str | None = None) -> City:
    row = City(name=name, name_key=city_key(name), country=country, region=region)
    session.add(row)
    session.flush()
    return row


def contact(session: Session, email: str, **fields: Any) -> Contact:
    tags = fields.pop("tags", [])
    row = Contact(email=email, tags=tags, attributes=fields.pop("attributes", {}), **fields)
    session.add(row)
    session.flush()
    session.add_all(ContactTag(contact_id=row.id, tag=t) for t in tags)
    return row


def add_world(factory: sessionmaker[Session]) -> dict[str, int]:
    """A few Ukrainian cities and signatories, partner cities abroad, and fictional contacts."""
    with db.transaction(factory) as s:
        lviv = city(s, "Lviv", "UA", "Lviv Oblast")
        kharkiv = city(s, "Kharkiv", "UA", "Kharkiv Oblast")
        odesa = city(s, "Odesa", "UA")
        krakow = city(s, "Kraków", "PL")
        nuernberg = city(s, "Nürnberg", "DE", "Bayern")
        lille = city(s, "Lille", "FR")
        leeds = city(s, "Leeds", "GB")
        s.add_all(
            [
                Signatory(
                    name="Deputy Person", title="Secretary of the City Council", city_id=lviv.id
                ),
                Signatory(
                    name="Andriy Sadovyi",
                    title="Mayor of Lviv",
                    city_id=lviv.id,
                    email="mayor@lviv.example.org",
                ),
                Signatory(name="Igor Terekhov", title="Mayor of Kharkiv", city_id=kharkiv.id),
                Signatory(name="Hennadiy Trukhanov", title="Mayor of Odesa", city_id=odesa.id),
                Partnership(
                    ukrainian_city_id=lviv.id, partner_city_id=krakow.id, kind="twin", since=1995
                ),
                Partnership(
                    ukrainian_city_id=kharkiv.id,
                    partner_city_id=nuernberg.id,
                    kind="twin",
                    since=1990,
                ),
                Partnership(
                    ukrainian_city_id=lviv.id, partner_city_id=nuernberg.id, kind="partner"
                ),
                Partnership(
                    ukrainian_city_id=odesa.id,
                    partner_city_id=nuernberg.id,
                    kind="friendship",
                    since=2005,
                ),
                Partnership(
                    ukrainian_city_id=kharkiv.id, partner_city_id=lille.id, kind="twin", since=1978
                ),
            ]
        )
        ids = {
            "krakow": contact(
                s,
                "prezydent@krakow.example.org",
                name="Zoë Łukasiewicz-Müller",
                title="Prezydent Miasta",
                salutation="Pani",
                language="pl",
                city_id=krakow.id,
                attributes={"population": "800000"},
                tags=["mayor"],
            ).id,
            "nuernberg": contact(
                s,
                "ob@nuernberg.example.org",
                name="Katrin Hartmann",
                title="Oberbürgermeisterin",
                salutation="Sehr geehrte Frau Oberbürgermeisterin Hartmann,",
                language="de-DE",
                city_id=nuernberg.id,
                attributes={"population": "523000"},
                tags=["mayor"],
            ).id,
            "lille": contact(
                s,
                "maire@lille.example.org",
                name="Jean Dupont",
                title="Maire",
                language="fr",
                city_id=lille.id,
                attributes={"population": "236000"},
                tags=["mayor"],
            ).id,
            "leeds": contact(
                s,
                "lord.mayor@leeds.example.org",
                name="Sam Smith",
                title="Lord Mayor",
                language="en",
                city_id=leeds.id,
                attributes={},
                tags=["city-hall"],
            ).id,
            # A language the starter appeal has no variant for, so it falls back to English.
            "nocity": contact(s, "info@example.com", language="sv").id,
        }
    return ids


@pytest.fixture
def world(session_factory: sessionmaker[Session]) -> dict[str, int]:
    return add_world(session_factory)


def create(
    factory: sessionmaker[Session], workspace: Path, slug: str = "appeal", **kwargs: Any
) -> Campaign:
    args: dict[str, Any] = {
        "template": "appeal",
        "from_address": FROM,
        "reply_to": None,
        "audience": Audience(),
        "title": None,
        "default_language": "en",
        "templates_dir": workspace / "templates",
        # What the CLI passes: the workspace's mailer.toml (unsubscribe settings).
        "settings": find_workspace(start=workspace),
    }
    args.update(kwargs)
    with db.transaction(factory) as session:
        return campaigns.create_campaign(session, slug=slug, **args)


# --------------------------------------------------------------------------- create / list / show


def test_create_list_show_from_the_cli(run: Cli, world: dict[str, int]) -> None:
    result = run.ok(
        "campaign", "create", "appeal-2022", "--template", "appeal", "--from", FROM,
        "--reply-to", "signatory", "--tag", "mayor", "--title", "Appeal 2022",
    )  # fmt: skip
    assert "Created campaign appeal-2022 (draft)" in result.output
    assert "3 recipients (tag=mayor)" in result.output
    listed = run.ok("campaign", "list").output
    assert re.search(r"appeal-2022\s+draft\s+template appeal", listed)
    shown = run.ok("campaign", "show", "appeal-2022").output
    assert "Status:    draft" in shown
    assert "Template:  appeal (frozen copy)" in shown
    assert "Reply-To:  signatory" in shown
    assert "Audience:  tag=mayor: 3 contacts" in shown
    assert re.search(r"de-DE\s+1 -> de", shown)
    assert re.search(r"\bpl\s+1\n", shown)
    assert "From:      Campaign Office <office@example.org>" in shown


def test_create_uses_the_workspace_default_language(run: Cli, world: dict[str, int]) -> None:
    config = run.workspace / "mailer.toml"
    config.write_text(
        config.read_text().replace('default_language = "en"', 'default_language = "de"')
    )
    run.ok("campaign", "create", "a", "--template", "appeal", "--from", FROM)
    run.ok("campaign", "create", "b", "--template", "appeal", "--from", FROM, "--language", "fr")
    assert "Language:  de (default)" in run.ok("campaign", "show", "a").output
    assert "Language:  fr (default)" in run.ok("campaign", "show", "b").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--template", "nope"], "no template 'nope' in .* \\(available: appeal\\)"),
        (["--template", "appeal", "--from", "office@"], "--from 'office@' is not a valid address"),
        (
            ["--template", "appeal", "--reply-to", "x y@example.org"],
            "--reply-to .* is not a valid address",
        ),
        (
            ["--template", "appeal", "--where", "population_size=1"],
            "unknown field 'population_size'",
        ),
        (["--template", "appeal", "--where", "nonsense"], "expected FIELD=VALUE"),
        (["--template", "appeal", "--language", "english!"], "not a language tag"),
    ],
)
def test_create_refuses_bad_input(
    run: Cli, world: dict[str, int], args: list[str], message: str
) -> None:
    full = ["campaign", "create", "x", "--from", FROM, *args]
    result = run(*full)
    assert result.exit_code == 1, result.output
    assert re.search(f"Error: .*{message}", result.output), result.output
    assert "Traceback" not in result.output
    assert "x " not in run.ok("campaign", "list").output


def test_create_refuses_an_existing_slug_and_a_bad_slug(run: Cli, world: dict[str, int]) -> None:
    run.ok("campaign", "create", "appeal", "--template", "appeal", "--from", FROM)
    result = run("campaign", "create", "appeal", "--template", "appeal", "--from", FROM)
    assert result.exit_code == 1
    assert "Error: campaign 'appeal' exists already" in result.output
    result = run("campaign", "create", "bad slug!", "--template", "appeal", "--from", FROM)
    assert result.exit_code == 1 and "campaign slug 'bad slug!'" in result.output


def test_create_reports_a_template_syntax_error_with_file_and_line(
    run: Cli, world: dict[str, int]
) -> None:
    folder = run.workspace / "templates" / "broken"
    folder.mkdir()
    (folder / "en.txt.j2").write_text("Subject: Hi\n\nDear {{ contact.name }\n", encoding="utf-8")
    result = run("campaign", "create", "b", "--template", "broken", "--from", FROM)
    assert result.exit_code == 1
    assert "Error: templates/broken/en.txt.j2:3: " in result.output


def test_create_and_get_in_the_library(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    campaign = create(
        session_factory,
        workspace,
        reply_to="SIGNATORY",
        audience=Audience(where=(("country", "DE"),)),
    )
    assert campaign.reply_to == "signatory" and campaign.status == "draft"
    with db.transaction(session_factory) as session:
        with pytest.raises(ConflictError):
            campaigns.create_campaign(
                session,
                slug="appeal",
                template="appeal",
                from_address=FROM,
                reply_to=None,
                audience=Audience(),
                title=None,
                default_language="en",
                templates_dir=workspace / "templates",
            )
        with pytest.raises(NotFoundError, match=r"^no campaign 'other'; campaigns: appeal$"):
            campaigns.get_campaign(session, "other")
        assert [c.slug for c in campaigns.list_campaigns(session)] == ["appeal"]
        summary = campaigns.summarise(
            session,
            campaigns.get_campaign(session, "appeal"),
            templates_dir=workspace / "templates",
        )
        assert summary.size == 1
        assert summary.languages == [("de-DE", 1, "de")]
    with db.transaction(session_factory) as session, pytest.raises(InvalidValueError):
        campaigns.create_campaign(
            session,
            slug="x",
            template="appeal",
            from_address=FROM,
            reply_to=None,
            audience=Audience(where=(("no_such_column", "1"),)),
            title=None,
            default_language="en",
            templates_dir=workspace / "templates",
        )


# --------------------------------------------------------------------------- recipients


def test_load_recipients_joins_city_partners_and_signatories(
    session_factory: sessionmaker[Session], world: dict[str, int]
) -> None:
    with db.transaction(session_factory) as session:
        loaded = compose.load_recipients(session, list(world.values()), today=dt.date(2026, 11, 26))
    assert set(loaded) == set(world.values())
    nue = loaded[world["nuernberg"]]
    assert nue.contact.email == "ob@nuernberg.example.org"
    assert nue.contact.language == "de-DE"
    assert dict(nue.contact.attributes) == {"population": "523000"}
    assert nue.contact.tags == ("mayor",)
    assert nue.city is not None and (nue.city.name, nue.city.country, nue.city.region) == (
        "Nürnberg",
        "DE",
        "Bayern",
    )
    # Oldest tie first, ties without a year last.
    assert [(p.ukrainian_city.name, p.since, p.years) for p in nue.partnerships] == [
        ("Kharkiv", 1990, 36),
        ("Odesa", 2005, 21),
        ("Lviv", None, None),
    ]
    assert nue.partnerships[0].signatory is not None
    assert nue.partnerships[0].signatory.name == "Igor Terekhov"
    # Lviv has two signatories: the mayor is preferred.
    krakow = loaded[world["krakow"]]
    lviv_signatory = krakow.partnerships[0].signatory
    assert lviv_signatory is not None
    assert (lviv_signatory.name, lviv_signatory.city, lviv_signatory.email) == (
        "Andriy Sadovyi",
        "Lviv",
        "mayor@lviv.example.org",
    )
    assert [s.name for s in krakow.signatories] == [
        "Deputy Person",
        "Andriy Sadovyi",
        "Igor Terekhov",
        "Hennadiy Trukhanov",
    ]
    nocity = loaded[world["nocity"]]
    assert nocity.city is None and nocity.partnerships == () and nocity.contact.name is None
    assert loaded[world["leeds"]].partnerships == ()


def test_load_recipients_uses_a_few_queries_per_batch(
    session_factory: sessionmaker[Session], world: dict[str, int]
) -> None:
    from sqlalchemy import event

    statements: list[str] = []
    with db.transaction(session_factory) as session:
        engine = session.get_bind()
        listener = lambda *args: statements.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            compose.load_recipients(session, list(world.values()))
        finally:
            event.remove(engine, "before_cursor_execute", listener)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 3


# --------------------------------------------------------------------------- templates


def test_the_letter_is_frozen_at_create_and_changed_only_by_update(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    folder = workspace / "templates" / "note"
    folder.mkdir()
    (folder / "en.txt.j2").write_text("Subject: First\n\nOne\n", encoding="utf-8")
    create(session_factory, workspace, template="note")
    templates = workspace / "templates"
    (folder / "en.txt.j2").write_text("Subject: Second\n\nTwo\n", encoding="utf-8")
    with db.transaction(session_factory) as session:
        campaign = campaigns.get_campaign(session, "appeal")
        # Frozen when created: a later edit of the folder changes nothing by itself...
        assert compose.template_set_for(campaign, templates_dir=templates).sources == {
            "en.txt.j2": "Subject: First\n\nOne\n"
        }
        # ... but is reported, with the command that takes it.
        drift = campaigns.template_drift(campaign, templates_dir=templates)
        assert drift is not None
        assert "en.txt.j2 changed" in drift
        assert "`mailer campaign update appeal --template note`" in drift
        update = campaigns.update_campaign(
            session, slug="appeal", templates_dir=templates, template="note"
        )
        assert update.changes == ("template note frozen again (en.txt.j2 changed)",)
        assert campaigns.template_drift(campaign, templates_dir=templates) is None
    (folder / "en.txt.j2").write_text("Subject: Third\n\n{{ broken\n", encoding="utf-8")
    with db.transaction(session_factory) as session:
        campaign = campaigns.get_campaign(session, "appeal")
        assert campaign.template_sources == {"en.txt.j2": "Subject: Second\n\nTwo\n"}
        frozen = compose.template_set_for(campaign, templates_dir=templates)
        assert frozen.sources == {"en.txt.j2": "Subject: Second\n\nTwo\n"}
        # A broken local edit is a difference, never a failure of the campaign.
        assert "en.txt.j2 changed" in str(
            campaigns.template_drift(campaign, templates_dir=templates)
        )
        # Freezing again (a resumed campaign) keeps the copy.
        campaigns.freeze_templates(session, campaign, templates_dir=templates)
        assert campaign.template_sources == {"en.txt.j2": "Subject: Second\n\nTwo\n"}
        # A campaign made before migration 0005_team had no copy until its first send.
        campaign.template_sources = {}
        with pytest.raises(TemplateError, match=r"templates/note/en\.txt\.j2:3"):
            compose.template_set_for(campaign, templates_dir=templates)
        assert campaigns.template_drift(campaign, templates_dir=templates) is None


# --------------------------------------------------------------------------- composing


def composer(
    factory: sessionmaker[Session], workspace: Path, *, settings: str = "", **kwargs: Any
) -> tuple[compose.Composer, dict[int, Any]]:
    if settings:
        config = workspace / "mailer.toml"
        config.write_text(
            config.read_text().replace("[campaign]\n", "[campaign]\n" + settings + "\n")
        )
    create(factory, workspace, **kwargs)
    with db.transaction(factory) as session:
        campaign = campaigns.get_campaign(session, "appeal")
        template_set = compose.template_set_for(campaign, templates_dir=workspace / "templates")
        ids = list(session.scalars(select(Contact.id)))
        return (
            compose.composer_for(
                campaign=campaign,
                template_set=template_set,
                settings=find_workspace(start=workspace),
            ),
            compose.load_recipients(session, ids),
        )


def by_email(recipients: dict[int, Any], email: str) -> Any:
    return next(r for r in recipients.values() if r.contact.email == email)


def test_compose_builds_the_whole_message(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    comp, recipients = composer(session_factory, workspace, reply_to="signatory")
    nue = recipients[world["nuernberg"]]
    composed = comp.compose(nue)
    message = parse(composed.data)
    assert message["To"].addresses[0].addr_spec == "ob@nuernberg.example.org"
    assert message["To"].addresses[0].display_name == "Katrin Hartmann"
    assert str(message["From"]) == FROM
    assert message["List-Id"] == "<appeal.example.org>"
    assert message["List-Unsubscribe"] == "<mailto:office@example.org?subject=unsubscribe>"
    assert "List-Unsubscribe-Post" not in message
    assert "Reply-To" not in message  # the Kharkiv signatory has no address
    assert composed.message_id == message["Message-ID"]
    assert composed.message_id.endswith("@example.org>")
    assert (composed.language, composed.requested_language, composed.fell_back) == (
        "de",
        "de-DE",
        False,
    )
    assert composed.subject == str(message["Subject"])
    assert (composed.mail_from, composed.rcpt_to, composed.smtputf8) == (
        "office@example.org",
        "ob@nuernberg.example.org",
        False,
    )
    # Deterministic Message-ID: the same campaign and contact give the same id.
    assert comp.compose(nue).message_id == composed.message_id
    krakow = comp.compose(recipients[world["krakow"]])
    # The signing mayor by name: the reader sees who will read the answer.
    assert parse(krakow.data)["Reply-To"] == "Andriy Sadovyi <mayor@lviv.example.org>"
    assert krakow.message_id != composed.message_id
    fallback = comp.compose(recipients[world["nocity"]])
    assert (fallback.language, fallback.fell_back) == ("en", True)


def test_compose_with_a_fixed_reply_to_and_a_test_address(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    comp, recipients = composer(session_factory, workspace, reply_to="replies@example.org")
    lille = recipients[world["lille"]]
    real = comp.compose(lille)
    test = comp.compose(lille, to_override="tester@example.com", test=True)
    message = parse(test.data)
    assert test.rcpt_to == "tester@example.com"
    assert message["To"].addresses[0].addr_spec == "tester@example.com"
    assert message["X-Mailer-Test"] == "yes"
    assert test.subject.startswith("[TEST] ") and str(message["Subject"]) == test.subject
    assert test.message_id != real.message_id
    assert parse(real.data)["Reply-To"] == "replies@example.org"


def test_unsubscribe_settings(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    comp, recipients = composer(
        session_factory,
        workspace,
        settings='unsubscribe_mailto = "stop@example.org"\n'
        'unsubscribe_url = "https://example.org/unsubscribe?t={token}"\n'
        'unsubscribe_secret = "s3cret"',
    )
    lille = recipients[world["lille"]]
    message = parse(comp.compose(lille).data)
    token = comp.token("maire@lille.example.org")
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    assert token != comp.token("ob@nuernberg.example.org")
    assert message["List-Unsubscribe"] == (
        f"<mailto:stop@example.org?subject=unsubscribe>, <https://example.org/unsubscribe?t={token}>"
    )
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"https://example.org/unsubscribe?t={token}" in message.get_content()


@pytest.mark.parametrize(
    "setting",
    [
        'unsubscribe_url = "http://example.org/u?t={token}"',
        'unsubscribe_url = "https://example.org/u"',
        'unsubscribe_mailto = "not an address"',
    ],
)
def test_bad_unsubscribe_settings_are_refused(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int], setting: str
) -> None:
    with pytest.raises(InvalidValueError, match=r"mailer.toml \[campaign\] unsubscribe_"):
        composer(session_factory, workspace, settings=setting)


def test_contact_data_cannot_add_a_header(
    session_factory: sessionmaker[Session], workspace: Path, world: dict[str, int]
) -> None:
    with db.transaction(session_factory) as session:
        row = session.get(Contact, world["lille"])
        assert row is not None
        row.name = "Jean\r\nBcc: spy@example.com"
        lille_city = session.scalar(select(City).where(City.name == "Lille"))
        assert lille_city is not None
        lille_city.name = "Lille\r\nBcc: spy@example.com"
    comp, recipients = composer(session_factory, workspace)
    composed = comp.compose(recipients[world["lille"]])
    message = parse(composed.data)
    assert "Bcc" not in message
    headers = composed.data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in headers
    assert message["To"].addresses[0].display_name == "Jean Bcc: spy@example.com"
