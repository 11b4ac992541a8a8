"""Mails that come back, modelled on what real servers and mail programs send.

Every address is fictional, on reserved domains. The delivery reports follow the layouts of
the servers named (Postfix, Exchange, Gmail, Exim, qmail, Yahoo, GroupWise): the parts, the
fixed sentences their detectors look for, where the returned copy sits.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterable
from pathlib import Path

DATE = "Mon, 21 Mar 2022 10:15:00 +0100"
OFFICE = "office@example.org"


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def original_headers(*, message_id: str, to: str, subject: str = "An appeal") -> str:
    return (
        f"Date: Sun, 20 Mar 2022 09:00:00 +0000\n"
        f"Message-ID: {message_id}\n"
        f"From: {OFFICE}\n"
        f"To: {to}\n"
        f"Subject: {subject}\n"
        f"List-Id: <appeal.example.org>\n"
        f"List-Unsubscribe: <mailto:{OFFICE}?subject=unsubscribe>\n"
    )


# --------------------------------------------------------------------------- answers


def reply(
    *,
    to_id: str | None,
    sender: str,
    body: str = "Dear colleagues,\nwe stand with you and will call our partners tomorrow.\n",
    subject: str = "Re: An appeal",
    own_id: str = "<reply-1@city.example.com>",
    date: str = DATE,
    extra: str = "",
) -> bytes:
    refs = f"In-Reply-To: {to_id}\nReferences: {to_id}\n" if to_id else ""
    return _crlf(
        f"Date: {date}\nMessage-ID: {own_id}\nFrom: Mayor <{sender}>\nTo: {OFFICE}\n"
        f"Subject: {subject}\n{refs}{extra}MIME-Version: 1.0\n"
        f'Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 8bit\n\n'
        f"{body}\nOn Sun, 20 Mar 2022 office wrote:\n> the mayors of Ukraine ask you\n> to stand with them\n"
    )


def html_reply(*, to_id: str, sender: str, own_id: str) -> bytes:
    return _crlf(
        f"Date: {DATE}\nMessage-ID: {own_id}\nFrom: {sender}\nTo: {OFFICE}\n"
        f"Subject: Re: An appeal\nIn-Reply-To: {to_id}\nMIME-Version: 1.0\n"
        f'Content-Type: text/html; charset="utf-8"\n\n'
        "<html><head><style>p {color: red}</style></head><body>"
        "<p>Thank you &amp; we agree.</p><p>Our council meets on Friday.</p>"
        "<blockquote>quoted</blockquote></body></html>\n"
    )


def auto_reply(
    *,
    to_id: str | None,
    sender: str,
    subject: str,
    body: str,
    headers: str = "",
    own_id: str = "<auto-1@city.example.com>",
    date: str = DATE,
) -> bytes:
    refs = f"In-Reply-To: {to_id}\nReferences: {to_id}\n" if to_id else ""
    return _crlf(
        f"Date: {date}\nMessage-ID: {own_id}\nFrom: {sender}\nTo: {OFFICE}\n"
        f"Subject: {subject}\n{refs}{headers}MIME-Version: 1.0\n"
        f'Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: 8bit\n\n{body}\n'
    )


# Out-of-office answers in the languages we write in: (language, subject, body, return date).
OUT_OF_OFFICE = (
    (
        "en",
        "Out of Office: An appeal",
        "I am out of the office and back on 14 April 2022.",
        "2022-04-14",
    ),
    (
        "de",
        "Abwesenheitsnotiz: An appeal",
        "Ich bin ab dem 14. April 2022 wieder im Büro.",
        "2022-04-14",
    ),
    (
        "fr",
        "Réponse automatique : An appeal",
        "Je suis absent, de retour le 14 avril 2022.",
        "2022-04-14",
    ),
    (
        "pl",
        "Odpowiedź automatyczna: An appeal",
        "Jestem poza biurem. Wracam 14 kwietnia 2022.",
        "2022-04-14",
    ),
    (
        "uk",
        "Автоматична відповідь: An appeal",
        "Я у відпустці. Повернуся 14 квітня 2022 року.",
        "2022-04-14",
    ),
    (
        "es",
        "Respuesta automática: An appeal",
        "Estoy fuera de la oficina hasta el 14 de abril de 2022.",
        "2022-04-14",
    ),
    (
        "it",
        "Risposta automatica: An appeal",
        "Sono fuori ufficio fino al 14 aprile 2022.",
        "2022-04-14",
    ),
    (
        "nl",
        "Automatisch antwoord: An appeal",
        "Ik ben afwezig en terug op 14 april 2022.",
        "2022-04-14",
    ),
    (
        "cs",
        "Automatická odpověď: An appeal",
        "Jsem mimo kancelář, vrátím se 14. dubna 2022.",
        "2022-04-14",
    ),
    ("lt", "Automatinis atsakymas: An appeal", "Esu atostogose. Grįšiu 2022-04-14.", "2022-04-14"),
)


def unsubscribe(*, sender: str, own_id: str = "<unsub-1@city.example.com>") -> bytes:
    return _crlf(
        f"Date: {DATE}\nMessage-ID: {own_id}\nFrom: {sender}\nTo: {OFFICE}\n"
        "Subject: unsubscribe\n\nThis message was sent by the unsubscribe link.\n"
    )


def junk(*, own_id: str = "<spam-1@shop.example.net>") -> bytes:
    return _crlf(
        f"Date: {DATE}\nMessage-ID: {own_id}\nFrom: Deals <deals@shop.example.net>\n"
        f"To: {OFFICE}\nSubject: Cheap watches\n\nBuy now.\n"
    )


def read_receipt(*, to_id: str, sender: str) -> bytes:
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <mdn-1@city.example.com>\nFrom: {sender}\nTo: {OFFICE}\n"
        "Subject: Read: An appeal\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="b1"\n\n'
        "--b1\nContent-Type: text/plain\n\nYour message was displayed.\n\n"
        f"--b1\nContent-Type: message/disposition-notification\n\n"
        f"Final-Recipient: rfc822; {sender}\nOriginal-Message-ID: {to_id}\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\n\n--b1--\n"
    )


# --------------------------------------------------------------------------- delivery reports


def dsn(
    *,
    recipient: str,
    message_id: str | None,
    status: str = "5.1.1",
    action: str = "failed",
    diagnostic: str = "smtp; 550 5.1.1 <{r}>: Recipient address rejected: User unknown in virtual mailbox table",
    reporter: str = "mx.example.net",
    own_id: str = "<dsn-1@mx.example.net>",
    returned: str = "text/rfc822-headers",
    sender: str = "MAILER-DAEMON@mx.example.net (Mail Delivery System)",
    subject: str = "Undelivered Mail Returned to Sender",
) -> bytes:
    """Postfix's RFC 3464 report: a human part, message/delivery-status, the returned headers."""
    original = (
        original_headers(message_id=message_id, to=recipient)
        if message_id
        else (f"From: {OFFICE}\nTo: {recipient}\nSubject: An appeal\n")
    )
    copy = (
        f"Content-Type: text/rfc822-headers\n\n{original}"
        if returned == "text/rfc822-headers"
        else f"Content-Type: message/rfc822\n\n{original}\nDear Mayor,\n"
    )
    return _crlf(
        f"Date: {DATE}\nMessage-ID: {own_id}\nFrom: {sender}\nTo: {OFFICE}\n"
        f"Subject: {subject}\nAuto-Submitted: auto-replied\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="rep"\n\n'
        "--rep\nContent-Description: Notification\nContent-Type: text/plain; charset=us-ascii\n\n"
        f"This is the mail system at host {reporter}.\n\nI'm sorry to have to inform you that "
        "your message could not\nbe delivered to one or more recipients.\n\n"
        f"<{recipient}>: host {reporter}[192.0.2.25] said: 550 5.1.1 User unknown\n\n"
        "--rep\nContent-Description: Delivery report\nContent-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; {reporter}\nArrival-Date: {DATE}\n\n"
        f"Final-Recipient: rfc822; {recipient}\nOriginal-Recipient: rfc822;{recipient}\n"
        f"Action: {action}\nStatus: {status}\nRemote-MTA: dns; {reporter}\n"
        f"Diagnostic-Code: {diagnostic.format(r=recipient)}\n\n"
        f"--rep\nContent-Description: Undelivered Message Headers\n{copy}\n--rep--\n"
    )


def gmail_dsn(*, recipient: str, message_id: str) -> bytes:
    """Gmail: From Mail Delivery Subsystem, multipart/report with an HTML and a text part."""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <gm-1@mx.google.example>\n"
        "From: Mail Delivery Subsystem <mailer-daemon@googlemail.example>\n"
        f"To: {OFFICE}\nSubject: Delivery Status Notification (Failure)\n"
        "Auto-Submitted: auto-replied\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; boundary="g0"; report-type=delivery-status\n\n'
        '--g0\nContent-Type: multipart/related; boundary="g1"\n\n--g1\n'
        'Content-Type: multipart/alternative; boundary="g2"\n\n--g2\n'
        "Content-Type: text/plain; charset=UTF-8\n\n** Address not found **\n\n"
        f"Your message wasn't delivered to {recipient} because the address couldn't be found.\n\n"
        "--g2\nContent-Type: text/html; charset=UTF-8\n\n<p>Address not found</p>\n--g2--\n--g1--\n"
        "--g0\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; googlemail.example\nReceived-From-MTA: dns; office.example.org\n\n"
        f"Final-Recipient: rfc822; {recipient}\nAction: failed\nStatus: 5.1.1\n"
        "Remote-MTA: dns; mx.city.example.com. (192.0.2.7, the server for the domain.)\n"
        "Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach does not exist.\n"
        "Last-Attempt-Date: Mon, 21 Mar 2022 02:15:00 -0700 (PDT)\n\n"
        f"--g0\nContent-Type: message/rfc822\n\n{original_headers(message_id=message_id, to=recipient)}\n"
        "Dear Mayor,\n--g0--\n"
    )


def exchange_dsn(*, recipient: str, message_id: str) -> bytes:
    """Exchange/Office 365 NDR: 5.4.1 relay access denied, message/rfc822 copy."""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <ndr-1@city.example.com>\n"
        "From: Microsoft Outlook <postmaster@city.example.com>\n"
        f"To: {OFFICE}\nSubject: Undeliverable: An appeal\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="x0"\n'
        "X-MS-Exchange-Message-Is-Ndr:\n\n"
        '--x0\nContent-Type: multipart/alternative; boundary="x1"\n\n'
        "--x1\nContent-Type: text/plain; charset=us-ascii\n\n"
        "Delivery has failed to these recipients or groups:\n\n"
        f"{recipient}\nThe email address you entered couldn't be found.\n\n"
        "--x1\nContent-Type: text/html; charset=us-ascii\n\n<b>Delivery has failed</b>\n--x1--\n"
        "--x0\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns;EX01.city.example.com\nReceived-From-MTA: dns;office.example.org\n"
        f"Arrival-Date: {DATE}\n\n"
        f"Original-Recipient: rfc822;{recipient}\nFinal-Recipient: rfc822;{recipient}\n"
        "Action: failed\nStatus: 5.4.1\n"
        "Diagnostic-Code: smtp;550 5.4.1 Recipient address rejected: Access denied. AS(201806281)\n\n"
        f"--x0\nContent-Type: message/rfc822\n\n{original_headers(message_id=message_id, to=recipient)}\n"
        "Dear Mayor,\n--x0--\n"
    )


def delayed_dsn(*, recipient: str, message_id: str) -> bytes:
    return dsn(
        recipient=recipient,
        message_id=message_id,
        status="4.4.7",
        action="delayed",
        diagnostic="smtp; 451 4.4.7 Temporary lookup failure",
        own_id="<delay-1@mx.example.net>",
        subject="Delayed Mail (still being retried)",
    )


def exim_bounce(*, recipient: str, message_id: str) -> bytes:
    """Exim: X-Failed-Recipients, plain text, the original quoted after a marker line."""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <E1exim-0001@mx.example.net>\n"
        "From: Mail Delivery System <Mailer-Daemon@mx.example.net>\n"
        f"To: {OFFICE}\nSubject: Mail delivery failed: returning message to sender\n"
        f"X-Failed-Recipients: {recipient}\nAuto-Submitted: auto-replied\n\n"
        "This message was created automatically by mail delivery software.\n\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n\n"
        f"  {recipient}\n    host mx.city.example.com [192.0.2.9]\n"
        f"    SMTP error from remote mail server after RCPT TO:<{recipient}>:\n"
        "    550 5.1.1 No such user here\n\n"
        "------ This is a copy of the message, including all the headers. ------\n\n"
        f"{original_headers(message_id=message_id, to=recipient)}\nDear Mayor,\n"
    )


def qmail_bounce(*, recipient: str, message_id: str) -> bytes:
    """qmail's QSBMF: the intro paragraph, <address>: paragraphs, the copy after a break line."""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <qmail-1@mx.example.net>\n"
        "From: MAILER-DAEMON@mx.example.net\n"
        f"To: {OFFICE}\nSubject: failure notice\n\n"
        "Hi. This is the qmail-send program at mx.example.net.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        f"<{recipient}>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        "--- Below this line is a copy of the message.\n\n"
        f"{original_headers(message_id=message_id, to=recipient)}\nDear Mayor,\n"
    )


def yahoo_bounce(*, recipient: str) -> bytes:
    """Yahoo: from mailer-daemon@yahoo..., no copy of our Message-ID (matched by address)."""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <yahoo-1@yahoo.example>\n"
        "From: MAILER-DAEMON@yahoo.example\n"
        f"To: {OFFICE}\nSubject: Failure Notice\n\n"
        "Sorry, we were unable to deliver your message to the following address.\n\n"
        f"<{recipient}>:\nRemote host said: 554 delivery error: dd This user doesn't have a "
        "yahoo.example account [RCPT_TO]\n\n"
        "--- Below this line is a copy of the message.\n\n"
        f"From: {OFFICE}\nTo: {recipient}\nSubject: An appeal\n"
    )


def groupwise_bounce(*, recipient: str) -> bytes:
    """Novell GroupWise: multipart/mixed, X-Mailer: Novell GroupWise, address on its own line."""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <gw-1@gw.example.net>\n"
        "From: postmaster@gw.example.net\n"
        f"To: {OFFICE}\nSubject: Message status - undeliverable\n"
        "X-Mailer: Novell GroupWise Internet Agent 14.2.0\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="gw"\n\n'
        "--gw\nContent-Type: text/plain\n\nThe message that you sent was undeliverable to the "
        f"following:\n{recipient} (user not found)\n\nPossibly truncated original message follows:\n\n"
        "--gw\nContent-Type: message/rfc822\n\n"
        f"From: {OFFICE}\nTo: {recipient}\nSubject: An appeal\n\nDear Mayor,\n--gw--\n"
    )


def arf(*, recipient: str | None, message_id: str | None) -> bytes:
    """An RFC 5965 abuse report from a mailbox provider's feedback loop."""
    copy = (
        original_headers(message_id=message_id, to=recipient or "redacted@example.net")
        if message_id
        else f"From: {OFFICE}\nTo: {recipient}\nSubject: An appeal\n"
    )
    rcpt = f"Original-Rcpt-To: {recipient}\n" if recipient else ""
    return _crlf(
        f"Date: {DATE}\nMessage-ID: <arf-1@fbl.example.net>\n"
        "From: Feedback Loop <fbl@fbl.example.net>\n"
        f"To: {OFFICE}\nSubject: FW: An appeal\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="fb"\n\n'
        "--fb\nContent-Type: text/plain\n\nThis is an email abuse report.\n\n"
        "--fb\nContent-Type: message/feedback-report\n\n"
        "Feedback-Type: abuse\nUser-Agent: FBL/1.0\nVersion: 1\n"
        f"Original-Mail-From: <{OFFICE}>\n{rcpt}Arrival-Date: {DATE}\n\n"
        f"--fb\nContent-Type: message/rfc822\n\n{copy}\nDear Mayor,\n--fb--\n"
    )


def bounce_for_unknown(*, own_id: str = "<dsn-unknown@mx.example.net>") -> bytes:
    return dsn(recipient="nobody@never-written.example.com", message_id=None, own_id=own_id)


# --------------------------------------------------------------------------- mailboxes


def write_maildir(path: Path, mails: Iterable[bytes]) -> Path:
    box = mailbox.Maildir(str(path), create=True)
    for data in mails:
        box.add(data)
    box.close()
    return path


def write_mbox(path: Path, mails: Iterable[bytes]) -> Path:
    box = mailbox.mbox(str(path), create=True)
    for data in mails:
        box.add(data)
    box.flush()
    box.close()
    return path
