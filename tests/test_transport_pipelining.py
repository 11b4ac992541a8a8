"""SMTP PIPELINING (RFC 2920): one write for MAIL, RCPT and DATA, every reply read and classified.

The scripted server holds all replies of a group until DATA has arrived, so a client that did
not pipeline would wait for a reply that never comes (and time out).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trustme
from smtp_server import DROP, STALL, ScriptedSmtpServer, SmtpTestServer, server_context, write_ca

from mailer.smtp import SmtpPool, parse_smtp_url
from mailer.transport import Outcome, OutcomeKind

MESSAGE = (
    b"From: office@example.org\r\nTo: mayor@example.org\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.starts with a dot\r\nlast line\r\n"
)


def send_each(
    url: str, envelopes: list[list[str]], *, size: int = 1, timeout: float = 5.0
) -> list[Outcome]:
    async def go() -> list[Outcome]:
        pool = SmtpPool(parse_smtp_url(url, timeout=timeout), size=size)
        try:
            return [
                await pool.send(mail_from="office@example.org", rcpt_to=rcpts, data=MESSAGE)
                for rcpts in envelopes
            ]
        finally:
            await pool.close()

    return asyncio.run(go())


def send_together(url: str, envelopes: list[list[str]], *, size: int = 1) -> list[Outcome]:
    """All at once, as the engine's senders do: more messages than connections."""

    async def go() -> list[Outcome]:
        pool = SmtpPool(parse_smtp_url(url, timeout=5.0), size=size)
        try:
            outcomes = await asyncio.gather(
                *(
                    pool.send(mail_from="office@example.org", rcpt_to=rcpts, data=MESSAGE)
                    for rcpts in envelopes
                )
            )
        finally:
            await pool.close()
        assert all(outcome is not None for outcome in outcomes)
        return [outcome for outcome in outcomes if outcome is not None]

    return asyncio.run(go())


def test_the_envelope_goes_out_in_one_group_and_the_bytes_arrive_intact() -> None:
    with ScriptedSmtpServer() as server:
        outcomes = send_each(server.url(), [[f"mayor{i}@example.org"] for i in range(3)])
        assert [(o.kind, o.code) for o in outcomes] == [(OutcomeKind.ACCEPTED, 250)] * 3
        assert server.recipients() == [f"mayor{i}@example.org" for i in range(3)]
        assert all(r.data == MESSAGE for r in server.received)
        # The server answered nothing of a group before its DATA line: a step-by-step client
        # would have waited for the MAIL reply until its timeout.
        assert server.connections == 1
        assert server.commands[1:4] == [
            "MAIL FROM:<office@example.org>",
            "RCPT TO:<mayor0@example.org>",
            "DATA",
        ]


def test_replies_dribbled_one_byte_at_a_time_are_reassembled() -> None:
    with ScriptedSmtpServer(dribble=True) as server:
        server.on_rcpt = lambda a: "550-5.1.1 no such\r\n550 5.1.1 mailbox" if "gone" in a else None
        outcomes = send_each(server.url(), [["gone@example.org"], ["fine@example.org"]])
        assert (outcomes[0].kind, outcomes[0].code) == (OutcomeKind.PERMANENT, 550)
        assert outcomes[0].reply == "5.1.1 no such\n5.1.1 mailbox"
        assert outcomes[1].kind is OutcomeKind.ACCEPTED
        assert server.recipients() == ["fine@example.org"]


@pytest.mark.parametrize(
    ("reply", "kind"),
    [("451 4.7.1 greylisted", OutcomeKind.TRANSIENT), ("550 5.1.1 unknown", OutcomeKind.PERMANENT)],
)
def test_a_refused_recipient_is_classified_by_its_own_reply_not_by_data(
    reply: str, kind: OutcomeKind
) -> None:
    with ScriptedSmtpServer() as server:
        server.on_rcpt = lambda a: reply if a == "refused@example.org" else None
        outcomes = send_each(server.url(), [["refused@example.org"], ["next@example.org"]])
        # DATA was answered 554 (no valid recipients); the outcome is the RCPT's reply.
        assert (outcomes[0].kind, outcomes[0].code) == (kind, int(reply[:3]))
        assert outcomes[0].reply == reply[4:]
        assert outcomes[1].kind is OutcomeKind.ACCEPTED
        assert server.recipients() == ["next@example.org"]
        # The refused transaction was reset on the same connection, not abandoned.
        assert "RSET" in server.commands and server.connections == 1


def test_one_refused_recipient_of_several_fails_the_message_and_nothing_is_sent() -> None:
    with ScriptedSmtpServer(data_after_refusal="354 go on") as server:
        server.on_rcpt = lambda a: "550 5.1.1 unknown" if a == "b@example.org" else None
        outcomes = send_each(server.url(), [["a@example.org", "b@example.org"], ["c@example.org"]])
        assert (outcomes[0].kind, outcomes[0].code) == (OutcomeKind.PERMANENT, 550)
        # The server said 354 to an envelope it had refused in part: the client hung up rather
        # than send a payload (or an empty one) that would have reached a@ alone.
        assert server.recipients() == ["c@example.org"]
        assert outcomes[1].kind is OutcomeKind.ACCEPTED
        assert server.connections == 2


def test_a_server_that_accepts_data_after_refusing_everyone_gets_no_payload() -> None:
    with ScriptedSmtpServer(data_after_refusal="354 go on") as server:
        server.on_rcpt = lambda a: "451 4.3.0 later"
        (outcome,) = send_each(server.url(), [["x@example.org"]])
        assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, 451)
        assert server.received == []


def test_a_drop_after_the_payload_is_uncertain_and_the_next_message_reconnects() -> None:
    with ScriptedSmtpServer() as server:
        server.on_data = lambda rcpts: DROP if rcpts == ("first@example.org",) else None
        outcomes = send_each(server.url(), [["first@example.org"], ["second@example.org"]])
        assert outcomes[0].kind is OutcomeKind.UNCERTAIN and outcomes[0].code is None
        assert "no reply after the message was sent" in outcomes[0].reply
        assert outcomes[1].kind is OutcomeKind.ACCEPTED
        assert server.recipients() == ["first@example.org", "second@example.org"]


def test_a_group_left_unanswered_is_transient_never_uncertain() -> None:
    with ScriptedSmtpServer() as server:
        server.on_rcpt = lambda a: STALL
        (outcome,) = send_each(server.url(), [["mayor@example.org"]], timeout=0.5)
        # No payload went out, so the message may safely go again later.
        assert outcome.kind is OutcomeKind.TRANSIENT and outcome.code is None
        assert outcome.reply.startswith("connection lost before MAIL")
        assert server.received == []


def test_control_characters_in_an_address_never_reach_the_wire() -> None:
    with ScriptedSmtpServer() as server:
        (outcome,) = send_each(server.url(), [["mayor@example.org>\r\nRSET"]])
        assert outcome.kind is OutcomeKind.PERMANENT and outcome.code is None
        assert "control character" in outcome.reply
        assert not any(c.startswith("RCPT") for c in server.commands)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_pipelining_after_starttls_and_login(ca: trustme.CA, tmp_path: Path) -> None:
    with SmtpTestServer(
        tls="starttls", server_context=server_context(ca), auth=("office", "pw"), pipelining=True
    ) as srv:
        settings = parse_smtp_url(srv.url("smtp", user="office"), ca_file=write_ca(ca, tmp_path))
        pool = SmtpPool(settings.with_password("pw"), size=1)

        async def go() -> list[Outcome]:
            try:
                return [
                    await pool.send(mail_from="office@example.org", rcpt_to=[r], data=MESSAGE)
                    for r in ("one@example.org", "two@example.org")
                ]
            finally:
                await pool.close()

        assert [o.kind for o in asyncio.run(go())] == [OutcomeKind.ACCEPTED] * 2
        assert srv.recipients() == ["one@example.org", "two@example.org"]
        # PIPELINING was offered on the encrypted session the messages went over.
        assert any("250-PIPELINING" in lines for lines in srv.ehlo_replies)


# --------------------------------------------------------------------------- overlapping messages
#
# On a PIPELINING session the next message's envelope goes out while the message before waits
# for its verdict: one round trip per message instead of two. The scripted server holds each
# verdict until the client's next command (or half a second), and counts the verdicts that left
# together with the next message's replies.


def test_the_next_envelope_goes_out_while_a_message_awaits_its_verdict() -> None:
    with ScriptedSmtpServer(hold_verdict=True) as server:
        rcpts = [f"mayor{i}@example.org" for i in range(6)]
        outcomes = send_together(server.url(), [[r] for r in rcpts])
        assert [(o.kind, o.code) for o in outcomes] == [(OutcomeKind.ACCEPTED, 250)] * 6
        assert server.connections == 1
        assert server.recipients() == rcpts
        assert all(r.data == MESSAGE for r in server.received)
        # Every verdict but the last went out with the next message's replies.
        assert server.verdicts_overlapped == 5


def test_one_at_a_time_a_verdict_is_never_overlapped() -> None:
    # The control for the test above: sent one after another, each verdict waits out the hold.
    with ScriptedSmtpServer(hold_verdict=True) as server:
        outcomes = send_each(server.url(), [["one@example.org"], ["two@example.org"]])
        assert [o.kind for o in outcomes] == [OutcomeKind.ACCEPTED] * 2
        assert server.verdicts_overlapped == 0


def test_a_refused_message_does_not_touch_the_one_behind_it() -> None:
    with ScriptedSmtpServer(hold_verdict=True) as server:
        server.on_data = lambda rcpts: "550 5.7.1 content refused" if "bad" in rcpts[0] else None
        outcomes = send_together(
            server.url(), [["bad@example.org"], ["good@example.org"], ["also@example.org"]]
        )
        assert (outcomes[0].kind, outcomes[0].code) == (OutcomeKind.PERMANENT, 550)
        assert [o.kind for o in outcomes[1:]] == [OutcomeKind.ACCEPTED] * 2
        assert server.connections == 1
        assert server.verdicts_overlapped == 2


def test_a_drop_awaiting_a_verdict_leaves_only_that_message_uncertain() -> None:
    with ScriptedSmtpServer(hold_verdict=True) as server:
        server.on_data = lambda rcpts: DROP if rcpts == ("first@example.org",) else None
        outcomes = send_together(
            server.url(), [["first@example.org"], ["second@example.org"], ["third@example.org"]]
        )
        assert outcomes[0].kind is OutcomeKind.UNCERTAIN
        assert "no reply after the message was sent" in outcomes[0].reply
        # The second message's envelope was out, its payload was not: it went again, on a new
        # session, once.
        assert [o.kind for o in outcomes[1:]] == [OutcomeKind.ACCEPTED] * 2
        assert server.connections == 2
        assert server.recipients() == [
            "first@example.org",
            "second@example.org",
            "third@example.org",
        ]


@pytest.mark.parametrize("overlapped", [False, True], ids=["one-by-one", "overlapped"])
def test_an_unasked_421_between_messages_costs_no_message(overlapped: bool) -> None:
    with ScriptedSmtpServer(stray="421 4.4.2 idle too long") as server:
        send = send_together if overlapped else send_each
        outcomes = send(server.url(), [["one@example.org"], ["two@example.org"]])
        # One by one, the session that spoke out of turn is dropped before the second message;
        # overlapped, the 421 reaches the second message as if it answered its MAIL, and as
        # nothing of it had been delivered it goes once more. Either way on a new session.
        assert [(o.kind, o.code) for o in outcomes] == [(OutcomeKind.ACCEPTED, 250)] * 2
        assert server.connections == 2
        assert server.recipients() == ["one@example.org", "two@example.org"]


def test_data_answered_with_250_is_never_taken_for_delivery() -> None:
    with ScriptedSmtpServer(data_reply="250 2.0.0 sure") as server:
        (outcome,) = send_each(server.url(), [["mayor@example.org"]], timeout=1.0)
        # No 354, so no payload went out: worth another try later, never "sent".
        assert (outcome.kind, outcome.code) == (OutcomeKind.TRANSIENT, 451)
        assert outcome.reply == "unexpected reply to DATA: 250 2.0.0 sure"
        assert server.received == []


@pytest.mark.parametrize(("pipelining", "expected"), [(True, 2), (False, 1)])
def test_two_messages_share_a_connection_only_where_the_server_pipelines(
    pipelining: bool, expected: int
) -> None:
    async def go(url: str) -> int:
        pool = SmtpPool(parse_smtp_url(url), size=3)
        try:
            await pool.open()
            return pool.sends_per_connection
        finally:
            await pool.close()

    with SmtpTestServer(pipelining=pipelining) as server:
        assert asyncio.run(go(server.url())) == expected


def test_a_verdict_dripped_line_by_line_is_still_timed_out() -> None:
    # A server that sends `250-` continuation lines forever after the final dot: every byte
    # used to restart the timer, so `--timeout` never fired. The reply has a deadline from the
    # moment it is awaited, so the client gives up after about one timeout (here 0.5 s, five
    # lines of the drip) and long before the server runs out of its 200 lines.
    with ScriptedSmtpServer(drip=(0.1, 200)) as server:
        outcomes = send_each(server.url(), [["mayor@example.org"]], timeout=0.5)
        assert outcomes[0].kind is OutcomeKind.UNCERTAIN
        assert "timed out" in outcomes[0].reply
        assert 0 < server.dripped < 200


def test_a_whole_transaction_has_a_deadline_even_when_each_reply_is_in_time() -> None:
    # Each reply takes 0.4 s against a 0.5 s timeout: one stalling server could stretch a
    # transaction to any length, reply by reply. The whole transaction has a deadline of
    # TRANSACTION_TIMEOUTS timeouts from its start, so a server this slow costs bounded time.
    with ScriptedSmtpServer(hold_until_data=False, slow_replies=0.4) as server:
        server.on_rcpt = None
        envelope = [f"mayor{i}@example.org" for i in range(6)]
        outcomes = send_each(server.url(), [envelope], timeout=0.5)
        assert outcomes[0].kind is OutcomeKind.TRANSIENT
        assert "timed out" in outcomes[0].reply
        assert server.received == []
