"""Render + build throughput on one core, against the naive `EmailMessage` baseline.

Run: .venv/bin/python benchmarks/render_bench.py [--messages N] [--template DIR]

Both paths render the same letters with the starter `appeal` template (German, English, French,
Polish and Ukrainian-speaking recipients, with and without partner cities); only the building
differs: `mailer.message.build_message` versus `email.message.EmailMessage` with the default
policy. The recipients are in memory, so the figures measure rendering and building only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.policy
import os
import platform
import time
import types
from collections.abc import Callable, Iterable
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

from mailer.addresses import Mailbox
from mailer.config import data_path
from mailer.message import build_message, make_message_id
from mailer.render import (
    CampaignView,
    CityView,
    ContactView,
    PartnershipView,
    Recipient,
    Rendered,
    SignatoryView,
    TemplateSet,
)

LANGUAGES = ("de", "en", "fr", "pl", "uk", "de-AT")
NAMES = ("Zoë Łukasiewicz-Müller", "Katrin Hartmann", "Мер Львова", "Jean Dupont", None)
CITIES = (("Nürnberg", "DE"), ("Lille", "FR"), ("Kraków", "PL"), ("Cincinnati", "US"))
UA = ("Kharkiv", "Lviv", "Odesa", "Chernihiv")


def recipients(count: int) -> list[Recipient]:
    signatories = tuple(
        SignatoryView(
            name=f"Signatory {i}", title=f"Mayor of {UA[i % 4]}", city=UA[i % 4], email=None
        )
        for i in range(8)
    )
    result = []
    for i in range(count):
        name, country = CITIES[i % len(CITIES)]
        ties = tuple(
            PartnershipView(
                ukrainian_city=CityView(name=UA[(i + k) % 4], country="UA", region=None),
                kind="twin",
                since=1990 + k,
                years=36 - k,
                note=None,
                signatory=signatories[(i + k) % 4] if k == 0 else None,
            )
            for k in range(i % 3)
        )
        contact = ContactView(
            email=f"contact{i}@city{i % 97}.example.org",
            name=NAMES[i % len(NAMES)],
            title="Mayor" if i % 2 else None,
            salutation=None,
            language=LANGUAGES[i % len(LANGUAGES)],
            organisation=None,
            attributes=types.MappingProxyType({"population": str(100000 + i)}),
            tags=("mayor",),
        )
        result.append(
            Recipient(
                contact_id=i,
                contact=contact,
                city=CityView(name=name, country=country, region=None),
                partnerships=ties,
                signatories=signatories,
            )
        )
    return result


def naive_build(
    rendered: Rendered, recipient: Recipient, message_id: str, now: dt.datetime
) -> bytes:
    msg = EmailMessage()
    msg["Date"] = now
    msg["Message-ID"] = message_id
    msg["From"] = Address("Campaign Office", addr_spec="office@example.org")
    msg["To"] = Address(recipient.contact.name or "", addr_spec=recipient.contact.email)
    msg["Subject"] = rendered.subject
    msg["List-Id"] = "<appeal.example.org>"
    msg["List-Unsubscribe"] = "<mailto:office@example.org?subject=unsubscribe>"
    msg.set_content(rendered.text)
    if rendered.html is not None:
        msg.add_alternative(rendered.html, subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


def best_rate(count: int, work: Callable[[], Iterable[object]], *, repeat: int) -> float:
    """Messages per CPU-second, best of `repeat` runs (CPU time: fair on a busy machine).

    Each result is dropped as soon as it is made, as the sender does after sending.
    """
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _result in work():
            pass
        best = min(best, time.process_time() - started)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--template", type=Path, default=data_path("templates") / "appeal")
    args = parser.parse_args()
    template_set = TemplateSet.from_directory(args.template, name=args.template.name)
    campaign = CampaignView(slug="appeal", title=None, default_language="en")
    people = recipients(args.messages)
    today = dt.date(2026, 11, 26)
    now = dt.datetime.now(dt.UTC)
    url = "https://example.org/u?t=0123456789abcdef"
    mailto = "mailto:office@example.org?subject=unsubscribe"
    ids = {
        r.contact_id: make_message_id(
            campaign_slug="appeal", contact_email=r.contact.email, domain="example.org"
        )
        for r in people
    }

    def render(r: Recipient) -> Rendered:
        return template_set.render(
            recipient=r,
            campaign=campaign,
            unsubscribe_url=url,
            unsubscribe_mailto=mailto,
            today=today,
        )

    def build(r: Recipient, rendered: Rendered) -> bytes:
        return build_message(
            rendered=rendered,
            sender=Mailbox("Campaign Office", "office@example.org"),
            to_address=r.contact.email,
            to_name=r.contact.name,
            reply_to=None,
            message_id=ids[r.contact_id],
            date=now,
            list_id="<appeal.example.org>",
            unsubscribe_mailto=mailto,
            unsubscribe_url=url,
        ).data

    pre = [render(r) for r in people]
    sizes = [len(build(r, x)) for r, x in zip(people, pre, strict=True)]
    naive_people = people[: max(500, args.messages // 5)]
    n = len(naive_people)
    rates = {
        "render only": best_rate(
            len(people), lambda: (render(r) for r in people), repeat=args.repeat
        ),
        "build only (mailer)": best_rate(
            len(people),
            lambda: (build(r, x) for r, x in zip(people, pre, strict=True)),
            repeat=args.repeat,
        ),
        "render + build (mailer)": best_rate(
            len(people), lambda: (build(r, render(r)) for r in people), repeat=args.repeat
        ),
        "build only (EmailMessage)": best_rate(
            n,
            lambda: (
                naive_build(x, r, ids[r.contact_id], now)
                for r, x in zip(naive_people, pre, strict=False)
            ),
            repeat=args.repeat,
        ),
        "render + build (EmailMessage)": best_rate(
            n,
            lambda: (naive_build(render(r), r, ids[r.contact_id], now) for r in naive_people),
            repeat=args.repeat,
        ),
    }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    print(
        f"template: {args.template.name}, {len(people):,} messages "
        f"({', '.join(sorted({x.language for x in pre}))}), {sum(sizes) / len(sizes):,.0f} bytes average"
    )
    for label, rate in rates.items():
        print(f"{label:<31} {rate:>8,.0f} messages per CPU-second")
    ratio = rates["render + build (mailer)"] / rates["render + build (EmailMessage)"]
    build_ratio = rates["build only (mailer)"] / rates["build only (EmailMessage)"]
    print(f"mailer vs EmailMessage: {ratio:.1f}x with rendering, {build_ratio:.1f}x building alone")


if __name__ == "__main__":
    main()
