"""Issue 12 item 3: DKIM signing ([dkim] domain, selector, key_file), RSA and Ed25519.

Letters really go through the test SMTP server; what it received is verified by dkimpy (the
reference implementation) with a DNS stub answering the selector's record, worked out here
from the public key, not by the code under test. One byte changed, and it fails.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import pytest
from conftest import Cli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.util import parse_tag_value
from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer.models import Message

SLUG = "appeal"
SELECTOR = "mail2026"
DOMAIN = "example.org"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    *,
    traditional: bool = False,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional
        else serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def record_of(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """The TXT record a domain owner publishes, as RFC 6376 / RFC 8463 define it."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def dns_stub(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):  # type: ignore[no-untyped-def]
    record = record_of(key)
    asked: list[bytes] = []

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        asked.append(name)
        return record if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else None

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


def dkim_section(workspace: Path, lines: str) -> None:
    """Fill in the [dkim] table of mailer.toml (a new workspace has it, commented out)."""
    config = workspace / "mailer.toml"
    text = config.read_text()
    assert "\n[dkim]\n" in text
    config.write_text(text.replace("\n[dkim]\n", "\n[dkim]\n" + lines, 1))


def configure(
    workspace: Path, key_bytes: bytes | None, *, name: str = "dkim.key", extra: str = ""
) -> Path:
    path = workspace / name
    if key_bytes is not None:
        path.write_bytes(key_bytes)
        path.chmod(0o600)
    dkim_section(workspace, f'domain = "{DOMAIN}"\nselector = "{SELECTOR}"\nkey_file = "{name}"\n')
    if extra:
        config = workspace / "mailer.toml"
        config.write_text(config.read_text().replace("[campaign]\n", f"[campaign]\n{extra}\n"))
    return path


def received_letters(run: Cli, engine: Engine, workspace: Path, count: int = 3) -> list[bytes]:
    seed_campaign(engine, workspace, count=count)
    with SmtpTestServer() as smtp:
        run.ok("send", SLUG, "--smtp", smtp.url(), "--yes")
        return [r.data for r in smtp.accepted()]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + (b"X" if data[at : at + 1] != b"X" else b"Y") + data[at + 1 :]


@pytest.mark.parametrize("kind", ["rsa-pkcs8", "rsa-pkcs1", "ed25519-pem", "ed25519-dkimpy"])
def test_signed_letters_verify_and_one_changed_byte_breaks_them(
    run: Cli,
    engine: Engine,
    workspace: Path,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    kind: str,
) -> None:
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        rsa_key if kind.startswith("rsa") else ed_key
    )
    if kind == "ed25519-dkimpy":
        # What `dknewkey --ktype ed25519` writes: the seed, base64.
        raw = ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        key_bytes = base64.b64encode(raw) + b"\n"
    else:
        key_bytes = pem(key, traditional=kind == "rsa-pkcs1")
    configure(workspace, key_bytes, extra='unsubscribe_url = "https://www.example.org/u?t={token}"')
    letters = received_letters(run, engine, workspace)
    assert len(letters) == 3
    lookup = dns_stub(key)
    for data in letters:
        assert data.startswith(b"DKIM-Signature: ")
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        assert dkim.verify(data, dnsfunc=lookup), data[:800]
        head = data[: data.index(b"\r\n\r\n")]
        signature = re.search(rb"^DKIM-Signature:(.*?)\r\n(?! )", head, re.S | re.M)
        assert signature is not None
        tags = parse_tag_value(re.sub(rb"\r\n\s+", b" ", signature.group(1)).strip())
        assert tags[b"a"] == (b"rsa-sha256" if kind.startswith("rsa") else b"ed25519-sha256")
        assert (tags[b"d"], tags[b"s"], tags[b"c"]) == (
            DOMAIN.encode(),
            SELECTOR.encode(),
            b"relaxed/simple",
        )
        signed = [h.strip() for h in tags[b"h"].replace(b" ", b"").split(b":")]
        for name in (
            b"from",
            b"to",
            b"subject",
            b"date",
            b"message-id",
            b"list-id",
            b"list-unsubscribe",
            b"list-unsubscribe-post",
        ):
            assert name in signed, name
        # One byte changed, in the body or in a signed header: the signature fails.
        body_at = data.index(b"\r\n\r\n", data.index(b"MIME-Version")) + 10
        assert not dkim.verify(flip(data, body_at), dnsfunc=lookup)
        subject_at = data.index(b"\r\nSubject: ") + len(b"\r\nSubject: ") + 3
        assert not dkim.verify(flip(data, subject_at), dnsfunc=lookup)
        # A header added on the way that no one may add: fails too (signed once more).
        added = data.replace(
            b"\r\nMIME-Version:",
            b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nMIME-Version:",
            1,
        )
        assert not dkim.verify(added, dnsfunc=lookup)
        second_from = data.replace(
            b"\r\nMIME-Version:", b"\r\nFrom: evil@example.com\r\nMIME-Version:", 1
        )
        assert not dkim.verify(second_from, dnsfunc=lookup)
    assert lookup.asked and set(lookup.asked) == {f"{SELECTOR}._domainkey.{DOMAIN}.".encode()}  # type: ignore[attr-defined]


def test_a_letter_without_one_click_url_verifies_too(
    run: Cli, engine: Engine, workspace: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    configure(workspace, pem(ed_key))
    (data,) = received_letters(run, engine, workspace, count=1)
    assert b"\r\nList-Unsubscribe-Post:" not in data
    assert dkim.verify(data, dnsfunc=dns_stub(ed_key))


def test_preview_raw_shows_the_signed_bytes(
    run: Cli, engine: Engine, workspace: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    configure(workspace, pem(ed_key))
    seed_campaign(engine, workspace, count=1)
    data = run.ok("preview", SLUG, "--raw").stdout_bytes
    assert data.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")
    assert dkim.verify(data, dnsfunc=dns_stub(ed_key))


# --------------------------------------------------------------------------- check


def test_check_prints_the_record_the_selector_needs(
    run: Cli,
    engine: Engine,
    workspace: Path,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    configure(workspace, pem(rsa_key))
    seed_campaign(engine, workspace, count=2)
    out = run.ok("check", SLUG).output
    assert f"DKIM: letters are signed for {DOMAIN} with selector {SELECTOR} (rsa-sha256)" in out
    line = next(line for line in out.splitlines() if "._domainkey." in line)
    assert line.strip().startswith(f"{SELECTOR}._domainkey.{DOMAIN}. IN TXT (")
    # The 2048-bit key does not fit one TXT string: split, and the strings joined are the record.
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) >= 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings).encode() == record_of(rsa_key)
    assert "a letter signed with this key verifies" in out
    assert "OK: nothing blocks sending" in out
    # Ed25519: one string.
    (workspace / "dkim.key").write_bytes(pem(ed_key))
    out = run.ok("check", SLUG).output
    line = next(line for line in out.splitlines() if "._domainkey." in line)
    assert line.strip() == f'{SELECTOR}._domainkey.{DOMAIN}. IN TXT "{record_of(ed_key).decode()}"'


def unusable_keys(workspace: Path) -> dict[str, tuple[bytes | None, str]]:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    public = rsa_small.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encrypted = rsa_small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    return {
        "missing": (None, "no such file"),
        "public key": (public, "is a public key; key_file must be the private key"),
        "EC key": (pem(ec_key), "DKIM signs with RSA (rsa-sha256) or Ed25519"),
        "encrypted": (encrypted, "is protected by a passphrase"),
        "not a key": (b"hello, I am not a key\n", "not a private key"),
        "damaged PEM": (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "not a private key mailer can read",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing", "public key", "EC key", "encrypted", "not a key", "damaged PEM", "a folder"]
)
def test_a_key_that_cannot_be_used_blocks_check_and_send(
    run: Cli, engine: Engine, workspace: Path, case: str
) -> None:
    if case == "a folder":
        # Unreadable as a file (permissions do not stop root, who runs CI).
        (workspace / "dkim.key").mkdir()
        key_bytes, why = None, "cannot be read"
    else:
        key_bytes, why = unusable_keys(workspace)[case]
    configure(workspace, key_bytes)
    seed_campaign(engine, workspace, count=2)
    result = run("check", SLUG)
    assert result.exit_code == 1
    assert "Blocking problems:" in result.output
    problem = next(line for line in result.output.splitlines() if "[dkim] key_file" in line)
    assert why in problem and str(workspace / "dkim.key") in problem
    # The letters themselves were still checked.
    assert "rendered 2" in result.output
    sent = run("send", SLUG, "--outbox", str(workspace / "out"), "--yes")
    assert sent.exit_code == 1
    lines = sent.output.strip().splitlines()
    assert lines[-1].startswith("Error: mailer.toml [dkim] key_file") and why in lines[-1]
    assert "Traceback" not in sent.output
    with Session(engine) as s:
        assert (
            s.scalar(select(func.count()).select_from(Message).where(Message.status == "sent")) == 0
        )


def test_incomplete_dkim_settings_are_one_clear_error(
    run: Cli, engine: Engine, workspace: Path
) -> None:
    dkim_section(workspace, 'domain = "example.org"\n')
    seed_campaign(engine, workspace, count=1)
    result = run("check", SLUG)
    assert result.exit_code == 1
    assert "mailer.toml [dkim]: selector, key_file missing" in result.output


def test_a_key_readable_by_others_and_a_foreign_domain_are_warnings(
    run: Cli, engine: Engine, workspace: Path, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    path = configure(workspace, pem(ed_key))
    path.chmod(0o644)
    config = workspace / "mailer.toml"
    config.write_text(
        config.read_text().replace(f'domain = "{DOMAIN}"', 'domain = "mailer-host.example.net"')
    )
    seed_campaign(engine, workspace, count=1)
    out = run.ok("check", SLUG).output
    assert "Warnings:" in out
    assert "readable by other users" in out
    assert "does not match the From domain example.org" in out
