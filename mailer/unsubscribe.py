"""Unsubscribing: a letter's token, or an address, becomes a suppression with its event.

Used by `mailer unsubscribe TOKEN|EMAIL` and by the HTTP endpoint (unsubscribe_server.py). A
token (tokens.py) names a campaign and a contact; both are looked up, then the token's MAC is
checked against the workspace keys for that slug and address, so a forged, tampered or foreign
token names nobody. The suppression and its `unsubscribed` event are written by
`outbox.record_unsubscribe` (idempotent: a second click writes nothing).

The endpoint's pages, in the ten languages the starter letters are written in, are made here by
`format_page`, beside the data they show. Imports addresses, models, outbox and tokens; no web
framework.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import outbox, tokens
from mailer.addresses import address_problem, display, normalise
from mailer.errors import InvalidValueError, MailerError
from mailer.models import Campaign, Contact, Message


class TokenProblem(enum.Enum):
    """Why a token names nobody; each is a 4xx answer of the endpoint."""

    MALFORMED = 400
    FORGED = 403
    UNKNOWN = 404


class BadToken(MailerError):
    """A token that is no token, fails its MAC, or names a campaign or contact not here."""

    def __init__(self, problem: TokenProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True, kw_only=True)
class Target:
    """Who a request unsubscribes, and the letter it came from (when known)."""

    email: str
    contact_id: int | None = None
    campaign_slug: str | None = None
    message_id: int | None = None
    # The language the letter was written in (else the contact's), for the pages.
    language: str | None = None


def resolve_token(session: Session, keys: tokens.KeyRing, token: str) -> Target:
    """The letter a token names; `BadToken` when it names nobody."""
    ids = tokens.decode(token)
    if ids is None:
        shown = token if len(token) <= 60 else token[:57] + "..."
        raise BadToken(
            TokenProblem.MALFORMED,
            f"{shown!r} is no unsubscribe token (the part after ?t= of a letter's link) "
            "and no address",
        )
    campaign = session.execute(
        select(Campaign.slug).where(Campaign.id == ids.campaign_id)
    ).scalar_one_or_none()
    contact = session.execute(
        select(Contact.email, Contact.language).where(Contact.id == ids.contact_id)
    ).one_or_none()
    if campaign is None or contact is None:
        if keys.candidates(ids.version):
            raise BadToken(TokenProblem.UNKNOWN, "the token names a campaign or contact not here")
        raise BadToken(TokenProblem.FORGED, "the token was not made with this workspace's keys")
    email, contact_language = contact
    if not tokens.verify(
        keys, token, purpose=tokens.Purpose.UNSUBSCRIBE, slug=campaign, email=email
    ):
        raise BadToken(TokenProblem.FORGED, "the token was not made with this workspace's keys")
    letter = session.execute(
        select(Message.id, Message.language).where(
            Message.campaign_id == ids.campaign_id, Message.contact_id == ids.contact_id
        )
    ).one_or_none()
    return Target(
        email=email,
        contact_id=ids.contact_id,
        campaign_slug=campaign,
        message_id=letter[0] if letter else None,
        language=(letter[1] if letter else None) or contact_language,
    )


def target_for_email(session: Session, email: str) -> Target:
    """An address given by hand: any address, a contact's or not (a suppression keeps it from
    ever being written to, whichever import brings it later)."""
    problem = address_problem(email.strip())
    if problem:
        raise InvalidValueError(f"{email.strip()!r} is not an email address: {problem}")
    address = normalise(email)
    row = session.execute(
        select(Contact.id, Contact.language).where(Contact.email == address)
    ).one_or_none()
    return Target(
        email=address,
        contact_id=row[0] if row else None,
        language=row[1] if row else None,
    )


def unsubscribe(
    session: Session, target: Target, *, at: dt.datetime, source: str, via: str
) -> bool:
    """Suppress the target's address, with an `unsubscribed` event on its letter (or its
    contact). True if the address was not suppressed before."""
    return outbox.record_unsubscribe(
        session, email=target.email, message=target.message_id, at=at, source=source, via=via
    )


def format_unsubscribed(target: Target, *, new: bool) -> str:
    """What `mailer unsubscribe` prints."""
    who = display(target.email)
    where = f" (letter of campaign {target.campaign_slug})" if target.campaign_slug else ""
    if new:
        return f"Unsubscribed {who}{where}: no letter will be sent to it again."
    return f"{who} was already suppressed{where}; nothing changed."


# --------------------------------------------------------------------------- pages

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "pl", "uk", "es", "it", "nl", "cs", "lt")


@dataclass(frozen=True)
class _Words:
    title: str
    ask: str
    button: str
    done: str
    invalid: str
    unavailable: str


_WORDS: dict[str, _Words] = {
    "en": _Words(
        title="Unsubscribe",
        ask="Do you want to stop receiving our letters at {email}?",
        button="Unsubscribe",
        done="You are unsubscribed: {email} will receive no further letters from us.",
        invalid="This unsubscribe link is not valid. Please open the whole link from the letter, "
        "or reply to the letter with the word “unsubscribe”.",
        unavailable="We cannot record your request right now. Please try again in a few minutes.",
    ),
    "de": _Words(
        title="Abmelden",
        ask="Möchten Sie unter {email} keine Briefe mehr von uns erhalten?",
        button="Abmelden",
        done="Sie sind abgemeldet: {email} erhält keine weiteren Briefe von uns.",
        invalid="Dieser Abmeldelink ist ungültig. Bitte öffnen Sie den vollständigen Link aus dem "
        "Brief oder antworten Sie auf den Brief mit dem Wort „unsubscribe“.",
        unavailable="Ihre Anfrage kann gerade nicht gespeichert werden. Bitte versuchen Sie es in "
        "einigen Minuten erneut.",
    ),
    "fr": _Words(
        title="Se désinscrire",
        ask="Souhaitez-vous ne plus recevoir nos lettres à l’adresse {email} ?",
        button="Me désinscrire",
        done="Votre désinscription est enregistrée : {email} ne recevra plus de lettres de notre "
        "part.",
        invalid="Ce lien de désinscription n’est pas valide. Ouvrez le lien complet figurant dans "
        "la lettre, ou répondez à la lettre avec le mot « unsubscribe ».",
        unavailable="Nous ne pouvons pas enregistrer votre demande pour le moment. Veuillez "
        "réessayer dans quelques minutes.",
    ),
    "pl": _Words(
        title="Wypisz się",
        ask="Czy chcą Państwo przestać otrzymywać nasze listy na adres {email}?",
        button="Wypisz mnie",
        done="Wypisano: na adres {email} nie będziemy już wysyłać listów.",
        invalid="Ten link rezygnacji jest nieprawidłowy. Prosimy otworzyć pełny link z listu albo "
        "odpowiedzieć na list słowem „unsubscribe”.",
        unavailable="Nie możemy teraz zapisać Państwa prośby. Prosimy spróbować ponownie za kilka "
        "minut.",
    ),
    "uk": _Words(
        title="Відписатися",
        ask="Бажаєте більше не отримувати наших листів на адресу {email}?",
        button="Відписатися",
        done="Вас відписано: на адресу {email} ми більше не надсилатимемо листів.",
        invalid="Це посилання для відписки недійсне. Відкрийте повне посилання з листа або "
        "дайте відповідь на лист словом «unsubscribe».",
        unavailable="Зараз ми не можемо зберегти ваш запит. Спробуйте, будь ласка, за кілька "
        "хвилин.",
    ),
    "es": _Words(
        title="Darse de baja",
        ask="¿Desea dejar de recibir nuestras cartas en {email}?",
        button="Darme de baja",
        done="Se ha dado de baja: {email} no recibirá más cartas nuestras.",
        invalid="Este enlace para darse de baja no es válido. Abra el enlace completo de la carta "
        "o responda a la carta con la palabra «unsubscribe».",
        unavailable="Ahora no podemos registrar su solicitud. Inténtelo de nuevo dentro de unos "
        "minutos.",
    ),
    "it": _Words(
        title="Annulla l’iscrizione",
        ask="Desidera non ricevere più le nostre lettere all’indirizzo {email}?",
        button="Annulla l’iscrizione",
        done="Iscrizione annullata: {email} non riceverà più nostre lettere.",
        invalid="Questo link per annullare l’iscrizione non è valido. Apra il link completo "
        "contenuto nella lettera oppure risponda alla lettera con la parola «unsubscribe».",
        unavailable="Al momento non possiamo registrare la sua richiesta. Riprovi tra qualche "
        "minuto.",
    ),
    "nl": _Words(
        title="Afmelden",
        ask="Wilt u op {email} geen brieven meer van ons ontvangen?",
        button="Afmelden",
        done="U bent afgemeld: {email} ontvangt geen brieven meer van ons.",
        invalid="Deze afmeldlink is niet geldig. Open de volledige link uit de brief, of "
        "beantwoord de brief met het woord ‘unsubscribe’.",
        unavailable="We kunnen uw verzoek nu niet vastleggen. Probeer het over enkele minuten "
        "opnieuw.",
    ),
    "cs": _Words(
        title="Odhlásit se",
        ask="Přejete si, abychom vám na adresu {email} již neposílali dopisy?",
        button="Odhlásit se",
        done="Jste odhlášeni: na adresu {email} vám již nebudeme posílat dopisy.",
        invalid="Tento odkaz pro odhlášení není platný. Otevřete prosím celý odkaz z dopisu nebo "
        "na dopis odpovězte slovem „unsubscribe“.",
        unavailable="Vaši žádost teď nemůžeme zaznamenat. Zkuste to prosím znovu za několik minut.",
    ),
    "lt": _Words(
        title="Atsisakyti prenumeratos",
        ask="Ar norite nebegauti mūsų laiškų adresu {email}?",
        button="Atsisakyti",
        done="Prenumeratos atsisakyta: adresu {email} daugiau laiškų nesiųsime.",
        invalid="Ši atsisakymo nuoroda negalioja. Atidarykite visą nuorodą iš laiško arba "
        "atsakykite į laišką žodžiu „unsubscribe“.",
        unavailable="Šiuo metu negalime užregistruoti jūsų prašymo. Pabandykite dar kartą po "
        "kelių minučių.",
    ),
}


class Page(enum.Enum):
    ASK = "ask"
    DONE = "done"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"


def page_language(preferred: str | None, accept_language: str | None) -> str:
    """The letter's language (or the contact's) when we write in it, else the browser's best
    (Accept-Language, by its q-values), else English."""
    if preferred:
        primary = preferred.strip().lower().replace("_", "-").split("-")[0]
        if primary in _WORDS:
            return primary
    ranked: list[tuple[float, int, str]] = []
    for n, part in enumerate((accept_language or "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if primary in _WORDS and quality > 0:
            ranked.append((-quality, n, primary))
    return min(ranked)[2] if ranked else "en"


def format_page(page: Page, *, language: str, email: str | None = None) -> str:
    """The endpoint's HTML page: self-contained, no scripts, no outside resources; the form
    posts back to the same URL (RFC 8058's body, as a mail program's one-click sends it)."""
    words = _WORDS.get(language, _WORDS["en"])
    shown = html.escape(display(email)) if email else ""
    if page is Page.ASK:
        body = (
            f"<p>{words.ask.format(email=f'<strong>{shown}</strong>')}</p>\n"
            '<form method="post">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            f'<button type="submit">{html.escape(words.button)}</button></form>'
        )
    elif page is Page.DONE:
        body = f"<p>{words.done.format(email=f'<strong>{shown}</strong>')}</p>"
    elif page is Page.INVALID:
        body = f"<p>{html.escape(words.invalid)}</p>"
    else:
        body = f"<p>{html.escape(words.unavailable)}</p>"
    return (
        f'<!DOCTYPE html>\n<html lang="{language}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex">\n'
        f"<title>{html.escape(words.title)}</title>\n"
        "<style>body{font-family:Georgia,serif;max-width:36em;margin:3em auto;padding:0 1em;"
        "line-height:1.5;color:#1f2328}button{font-size:1em;padding:.5em 1.5em;"
        "background:#0057b7;color:#fff;border:0;border-radius:4px;cursor:pointer}</style>\n"
        f"</head>\n<body>\n<h1>{html.escape(words.title)}</h1>\n{body}\n</body>\n</html>\n"
    )
