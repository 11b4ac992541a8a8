"""The HTML report in a real headless browser (Debian's chromium, installed by .ci/run)."""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from test_report_people import build_outcomes
from test_review_data import SCRIPT_NAME

from mailer import report
from mailer.config import find_workspace

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT = 120

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: install Debian's chromium to test the HTML report "
    "in a browser (.ci/run does)",
)


def _chromium(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to the console: chromium logs each as `...:CONSOLE(line)] "text"`.

    Uncaught exceptions appear there too ("Uncaught ReferenceError: ..."). The report has no
    scripts, so any console line at all is a fault.
    """
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture
def report_file(session_factory: sessionmaker[Session], workspace: Path, tmp_path: Path) -> Path:
    build_outcomes(session_factory, workspace)
    out = tmp_path / "report.html"
    with session_factory() as session:
        report.write_report(
            session, slug="spring", output=out, workspace=find_workspace(start=workspace)
        )
    return out


def test_report_loads_in_chromium_without_console_errors_and_shows_totals(
    report_file: Path, tmp_path: Path
) -> None:
    result = _chromium(tmp_path, report_file, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    dom = result.stdout
    for state, n in (("total", 13), ("sent", 4), ("failed", 4), ("uncertain", 1), ("skipped", 1)):
        assert f'id="count-{state}">{n}</div>' in dom, state
    # The hostile name reached the DOM as text, not as an element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert SCRIPT_NAME not in dom
    assert "<svg" in dom and "Why letters did not arrive" in dom
    # People, what came back, and the letters themselves reached the page.
    assert "To follow up" in dom and "kurt@example.org" in dom
    assert "We stand with Kyiv." in dom and 'id="sample-pl"' in dom


def test_console_check_catches_a_script_error(tmp_path: Path) -> None:
    """The check above can fail: a page with a script error is caught."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><p id=x>hello</p>"
        "<script>notDefinedAnywhere();</script></body></html>",
        encoding="utf-8",
    )
    result = _chromium(tmp_path, broken, "--dump-dom")
    assert result.returncode == 0
    messages = console_messages(result.stderr)
    assert messages and "notDefinedAnywhere" in messages[0]


def _png_pixels(data: bytes, *, max_rows: int) -> tuple[int, int, Callable[[int], bytes]]:
    """Decode the top `max_rows` of an 8-bit RGB/RGBA, non-interlaced PNG (what chromium
    writes) without a library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(min(height, max_rows)):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            corner = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, lambda y: rows[y]


def test_report_screenshot_is_a_real_page(report_file: Path, tmp_path: Path) -> None:
    shot = tmp_path / "r.png"
    result = _chromium(tmp_path, report_file, f"--screenshot={shot}", "--window-size=1200,1600")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    assert shot.is_file()
    top = 700  # pure-Python decoding is slow; the totals and share bar are in the top part
    width, height, row = _png_pixels(shot.read_bytes(), max_rows=top)
    assert (width, height) == (1200, 1600)
    # Not blank: many distinct colours (text, the state colours of cards and share bar...).
    colours: set[bytes] = set()
    bpp = len(row(0)) // width
    for y in range(0, top, 4):
        line = row(y)
        colours.update(line[x : x + 3] for x in range(0, len(line), bpp * 4))
    assert len(colours) > 20
    green = bytes.fromhex("2e7d32")
    assert green in colours  # the state cards and the share bar are drawn
