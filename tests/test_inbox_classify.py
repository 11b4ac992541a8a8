"""What a mail that comes back is: delivery reports of many servers, answers, auto-replies."""

from __future__ import annotations

import datetime as dt

import inbox_samples as S
import pytest

from mailer.inbox_classify import MailKind, classify, excerpt, mail_digest, return_date

OURS = "<0123456789abcdef0123456789abcdef@example.org>"
RCPT = "mayor@city.example.com"


@pytest.mark.parametrize(
    ("name", "data", "status", "code", "names_ours"),
    [
        ("postfix", S.dsn(recipient=RCPT, message_id=OURS), "5.1.1", 550, True),
        (
            "postfix with message/rfc822",
            S.dsn(recipient=RCPT, message_id=OURS, returned="message/rfc822"),
            "5.1.1",
            550,
            True,
        ),
        ("gmail", S.gmail_dsn(recipient=RCPT, message_id=OURS), "5.1.1", 550, True),
        ("exchange", S.exchange_dsn(recipient=RCPT, message_id=OURS), "5.4.1", 550, True),
        ("exim", S.exim_bounce(recipient=RCPT, message_id=OURS), "5.1.1", 550, True),
        ("qmail", S.qmail_bounce(recipient=RCPT, message_id=OURS), "5.1.1", None, True),
        ("yahoo", S.yahoo_bounce(recipient=RCPT), "5.0.0", 554, False),
        ("groupwise", S.groupwise_bounce(recipient=RCPT), "5.0.0", None, False),
    ],
)
def test_hard_bounces_of_many_servers(
    name: str, data: bytes, status: str, code: int | None, names_ours: bool
) -> None:
    mail = classify(data)
    assert mail.kind is MailKind.BOUNCE, (name, mail.why)
    (failure,) = mail.failures
    assert failure.recipient == RCPT
    assert failure.permanent
    assert failure.status == status
    assert failure.smtp_code == code
    assert failure.diagnostic and "This is a copy" not in failure.diagnostic
    assert (OURS in mail.refers_to) is names_ours


def test_delayed_report_is_a_delay_not_a_bounce() -> None:
    mail = classify(S.delayed_dsn(recipient=RCPT, message_id=OURS))
    assert mail.kind is MailKind.DELAY
    (failure,) = mail.failures
    assert (failure.status, failure.permanent, failure.smtp_code) == ("4.4.7", False, 451)
    assert mail.refers_to[0] == OURS


def test_delivered_notice_and_read_receipt_are_reports() -> None:
    delivered = S.dsn(recipient=RCPT, message_id=OURS, action="delivered", status="2.0.0")
    assert classify(delivered).kind is MailKind.REPORT
    assert classify(S.read_receipt(to_id=OURS, sender=RCPT)).kind is MailKind.REPORT


@pytest.mark.parametrize(("language", "subject", "body", "back"), S.OUT_OF_OFFICE)
def test_out_of_office_in_every_language_with_its_return_date(
    language: str, subject: str, body: str, back: str
) -> None:
    mail = classify(S.auto_reply(to_id=OURS, sender=RCPT, subject=subject, body=body))
    assert mail.kind is MailKind.AUTO_REPLY, mail.why
    assert f"({language})" in mail.why
    assert mail.away_until == dt.date.fromisoformat(back)
    assert mail.refers_to == (OURS,)


@pytest.mark.parametrize(
    "header",
    [
        "Auto-Submitted: auto-replied",
        "Auto-Submitted: auto-generated",
        "X-Autoreply: yes",
        "X-Autorespond: Thank you for your mail",
        "Precedence: auto_reply",
        "Precedence: bulk",
        "Precedence: junk",
    ],
)
def test_rfc3834_and_common_autoresponder_headers(header: str) -> None:
    mail = classify(
        S.auto_reply(
            to_id=OURS, sender=RCPT, subject="Re: An appeal", body="Thanks.", headers=header + "\n"
        )
    )
    assert mail.kind is MailKind.AUTO_REPLY
    assert header.split(":")[0] in mail.why
    assert mail.away_until is None


def test_auto_submitted_no_and_auto_response_suppress_alone_are_a_reply() -> None:
    for header in ("X-Auto-Response-Suppress: All", "Auto-Submitted: no", "Precedence: list"):
        mail = classify(S.reply(to_id=OURS, sender=RCPT, extra=header + "\n"))
        assert mail.kind is MailKind.REPLY, header


def test_return_date_is_the_latest_date_after_the_answer_and_needs_day_and_month() -> None:
    sent = dt.datetime(2022, 3, 21, 9, tzinfo=dt.UTC)
    text = "I am away from 22 March until 14 April 2022.\nIn urgent cases call 0049 30 1234."
    assert return_date(text, sent=sent) == dt.date(2022, 4, 14)
    # A date before the answer, or a lone weekday or month, is no return date.
    assert return_date("Back in April. Last seen on 1 March 2022.", sent=sent) is None
    assert return_date("No dates here at all.", sent=sent) is None


def test_reply_excerpt_leaves_out_the_quote_and_signature() -> None:
    mail = classify(S.reply(to_id=OURS, sender=RCPT))
    assert mail.kind is MailKind.REPLY
    assert mail.excerpt == (
        "Dear colleagues,\nwe stand with you and will call our partners tomorrow."
    )
    assert mail.subject == "Re: An appeal"
    assert mail.date == dt.datetime(2022, 3, 21, 9, 15, tzinfo=dt.UTC)
    text = "Yes.\n\nBest,\nAnna\n-- \nMayor's office\n"
    assert excerpt(text) == "Yes.\nBest,\nAnna"
    outlook = "We agree.\n\n-----Original Message-----\nFrom: office\n"
    assert excerpt(outlook) == "We agree."


def test_html_only_reply_is_read_as_text() -> None:
    mail = classify(S.html_reply(to_id=OURS, sender=RCPT, own_id="<h@city.example.com>"))
    assert mail.kind is MailKind.REPLY
    assert mail.excerpt == "Thank you & we agree.\nOur council meets on Friday."


def test_complaint_names_our_letter_and_the_recipient() -> None:
    mail = classify(S.arf(recipient=RCPT, message_id=OURS))
    assert mail.kind is MailKind.COMPLAINT
    assert mail.refers_to[0] == OURS
    assert (mail.complainant, mail.feedback_type) == (RCPT, "abuse")
    redacted = classify(S.arf(recipient=None, message_id=OURS))
    assert redacted.complainant == "redacted@example.net"


def test_unsubscribe_request() -> None:
    mail = classify(S.unsubscribe(sender="Mayor@City.example.com"))
    assert mail.kind is MailKind.UNSUBSCRIBE
    assert mail.sender == RCPT


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01\x02garbage\xff\xfe", b"just one line without headers\n"],
)
def test_bytes_that_are_no_mail_are_unreadable(data: bytes) -> None:
    assert classify(data).kind is MailKind.UNREADABLE


def test_truncated_report_does_not_raise() -> None:
    whole = S.dsn(recipient=RCPT, message_id=OURS)
    for cut in (200, len(whole) // 2, len(whole) - 40):
        mail = classify(whole[:cut])
        assert mail.kind in set(MailKind)


def test_undeclared_8bit_subject_is_read_as_utf8() -> None:
    mail = classify(
        S.auto_reply(to_id=OURS, sender=RCPT, subject="Abwesenheitsnotiz: Grüße", body="x")
    )
    assert mail.subject == "Abwesenheitsnotiz: Grüße"


def test_digest_ignores_line_endings_and_trace_headers() -> None:
    data = S.reply(to_id=OURS, sender=RCPT)
    relayed = b"Received: from mx.example.net by imap.example.org\r\n" + data
    assert mail_digest(data) == mail_digest(data.replace(b"\r\n", b"\n")) == mail_digest(relayed)
    assert mail_digest(data) != mail_digest(S.reply(to_id=OURS, sender=RCPT, body="Other.\n"))
