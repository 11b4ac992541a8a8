"""The HTML report: one self-contained file someone who never used a terminal can read.

No scripts, fonts, images or style sheets from elsewhere: the file is mailed around and opened
offline. Every value from the database goes through `html.escape` (a contact's name is data).
"""

from __future__ import annotations

import datetime as dt
import html
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from babel import Locale
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from mailer.campaigns import get_campaign
from mailer.errors import OutputFileError
from mailer.models import (
    Campaign,
    City,
    Contact,
    Event,
    EventKind,
    Message,
    MessageStatus,
    utcnow,
)
from mailer.review import (
    STATES,
    CampaignSummary,
    FailureReason,
    LogFilter,
    Row,
    campaign_status,
    failure_reasons,
    log_rows,
)

LIST_LIMIT = 1000
MAX_BARS = 60
# Candidate bar widths, smallest first: the chart uses the finest one that fits MAX_BARS.
BUCKET_MINUTES = (1, 5, 10, 15, 30, 60, 180, 360, 720, 1440, 10080)

EXPLAIN = {
    "sent": "accepted by the recipient's mail server",
    "failed": "refused for good; the reasons are listed below",
    "uncertain": "the connection broke while handing the letter over: it may or may not have "
    "arrived; never re-sent unless someone runs `mailer retry --uncertain`",
    "retry": "refused for now by the server; will be tried again later",
    "queued": "waiting to be sent",
    "sending": "being sent right now",
    "skipped": "not sent on purpose (unsubscribed, bounced before, or an unusable address)",
}
COLOURS = {
    "sent": "#2e7d32",
    "failed": "#c62828",
    "uncertain": "#ef6c00",
    "retry": "#f9a825",
    "queued": "#546e7a",
    "sending": "#1565c0",
    "skipped": "#8d6e63",
}
# The order a reader cares about: outcomes first, pending work after.
DISPLAY_ORDER = ("sent", "failed", "uncertain", "retry", "queued", "sending", "skipped")


@dataclass(frozen=True, kw_only=True)
class Breakdown:
    label: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, kw_only=True)
class ReportData:
    summary: CampaignSummary
    generated_at: dt.datetime
    from_address: str
    bucket: dt.timedelta
    sends: list[tuple[dt.datetime, int]]
    by_country: list[Breakdown]
    by_language: list[Breakdown]
    failures: list[FailureReason]
    problems: list[Row] = field(default_factory=list)
    problems_total: int = 0
    # Sending windows, follow-up and the recipients' time zones, as lines (see timing.py).
    timing: list[str] = field(default_factory=list)

    @property
    def sent_events(self) -> int:
        return sum(n for _, n in self.sends)


def build_report(session: Session, *, slug: str, now: dt.datetime | None = None) -> ReportData:
    now = now or utcnow()
    campaign = get_campaign(session, slug)
    summary = campaign_status(session, slug, now=now)[0]
    bucket, sends = _sends_over_time(session, campaign_id=campaign.id)
    country: ColumnElement[str] = func.coalesce(City.country, "")
    language: ColumnElement[str] = func.coalesce(Message.language, Contact.language, "")
    problem_filter = LogFilter(statuses=(MessageStatus.FAILED.value, MessageStatus.UNCERTAIN.value))
    problems: list[Row] = []
    for row in log_rows(session, slug=slug, flt=problem_filter):
        if len(problems) >= LIST_LIMIT:
            break
        problems.append(row)
    return ReportData(
        summary=summary,
        generated_at=now,
        from_address=campaign.from_address,
        bucket=bucket,
        sends=sends,
        by_country=_breakdown(
            session, campaign_id=campaign.id, key=country, unknown="unknown", names=_country
        ),
        by_language=_breakdown(
            session, campaign_id=campaign.id, key=language, unknown="unknown", names=_language
        ),
        failures=failure_reasons(session, campaign_id=campaign.id, limit=50),
        problems=problems,
        problems_total=summary.counts["failed"] + summary.counts["uncertain"],
        timing=_timing_lines(session, campaign, now=now),
    )


def _timing_lines(session: Session, campaign: Campaign, *, now: dt.datetime) -> list[str]:
    """The campaign's windows and follow-up, and how its recipients' time zones were found."""
    from mailer import timing

    lines = [line.split(":", 1)[1].strip() for line in timing.describe_campaign(session, campaign)]
    ids = list(session.scalars(select(Message.contact_id).where(Message.campaign_id == campaign.id)))
    if campaign.settings.get("windows") and ids:
        zones = timing.zone_report(session, campaign, contact_ids=ids, today=now.date())
        lines.extend(line.strip() for line in timing.format_zone_report(zones)[:2])
    return lines


def _country(code: str) -> str:
    name = Locale("en").territories.get(code.upper())
    return f"{name} ({code})" if name else code


def _language(tag: str) -> str:
    locale = Locale("en")
    name = locale.languages.get(tag.replace("-", "_")) or locale.languages.get(
        tag.split("-")[0].lower()
    )
    return f"{name} ({tag})" if name else tag


def _breakdown(
    session: Session,
    *,
    campaign_id: int,
    key: ColumnElement[str],
    unknown: str,
    names: Callable[[str], str],
) -> list[Breakdown]:
    rows = session.execute(
        select(key, Message.status, func.count())
        .select_from(Message)
        .join(Contact, Contact.id == Message.contact_id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(Message.campaign_id == campaign_id)
        .group_by(key, Message.status)
    )
    table: dict[str, dict[str, int]] = {}
    for label, status, n in rows:
        # Readers know "Germany (DE)" better than "DE".
        counts = table.setdefault(names(label) if label else unknown, dict.fromkeys(STATES, 0))
        counts[status] = counts.get(status, 0) + int(n)
    items = [Breakdown(label=k, counts=v) for k, v in table.items()]
    return sorted(items, key=lambda b: (-b.total, b.label))


def _sends_over_time(
    session: Session, *, campaign_id: int
) -> tuple[dt.timedelta, list[tuple[dt.datetime, int]]]:
    sent = (Event.campaign_id == campaign_id, Event.kind == EventKind.SENT.value)
    first, last = session.execute(select(func.min(Event.at), func.max(Event.at)).where(*sent)).one()
    if first is None or last is None:
        return dt.timedelta(minutes=1), []
    first, last = _aware(first), _aware(last)
    span_minutes = (last - first).total_seconds() / 60
    minutes = next(
        (m for m in BUCKET_MINUTES if span_minutes / m < MAX_BARS - 1), BUCKET_MINUTES[-1]
    )
    size = dt.timedelta(minutes=minutes)
    start = _floor(first, size)
    count = int((_floor(last, size) - start) / size) + 1
    bars = [0] * count
    # Streamed: a campaign of a million sends costs one counter per bar, not a list of times.
    result = session.execute(
        select(Event.at).where(*sent).execution_options(yield_per=5000)
    ).scalars()
    for at in result:
        index = int((_floor(_aware(at), size) - start) / size)
        if 0 <= index < count:
            bars[index] += 1
    return size, [(start + i * size, n) for i, n in enumerate(bars)]


def _floor(value: dt.datetime, size: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + ((value - epoch) // size) * size


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# --------------------------------------------------------------------------- writing


def write_report(
    session: Session, *, slug: str, output: Path, now: dt.datetime | None = None
) -> ReportData:
    """Build the report and write it to `output` (replacing it whole, never half-written)."""
    target = Path(output).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputFileError(f"cannot write report to {target}: it is a folder; name a file")
    if not parent.exists():
        raise OutputFileError(f"cannot write report to {target}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputFileError(f"cannot write report to {target}: {parent} is not a folder")
    data = build_report(session, slug=slug, now=now)
    page = render_html(data)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputFileError(f"cannot write report to {target}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputFileError(f"cannot write report to {target}: {exc.strerror}") from exc
    return data


def render_html(data: ReportData) -> str:
    s = data.summary
    e = html.escape
    title = f"Campaign report: {s.title or s.campaign}"
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may load from elsewhere, even if someone edits the file later.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
        '<p class="meta">',
        f"Campaign <code>{e(s.campaign)}</code> from {e(data.from_address)}"
        f" · status <b>{e(s.status)}</b>",
        f" · started {e(_when(s.started_at))} · ended {e(_when(s.ended_at))}",
        f" · report made {e(_when(data.generated_at))}</p>",
    ]
    parts.append(_totals(s))
    steps = "".join(f"<li>{e(step)}</li>" for step in s.next_steps())
    parts.append(f'<section id="next"><h2>What to do next</h2><ul>{steps}</ul></section>')
    if data.timing:
        items = "".join(f"<li>{e(line)}</li>" for line in data.timing)
        parts.append(f'<section id="timing"><h2>When letters go</h2><ul>{items}</ul></section>')
    parts.append(_chart_section(data))
    parts.append(_breakdown_section("Results by country", "by-country", data.by_country))
    parts.append(_breakdown_section("Results by language", "by-language", data.by_language))
    parts.append(_failures_section(data.failures))
    parts.append(_problems_section(data))
    parts.append(_legend())
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _totals(s: CampaignSummary) -> str:
    e = html.escape
    if s.not_sent_yet:
        return (
            '<section id="totals"><h2>Totals</h2>'
            '<p class="empty" id="not-sent-yet">Not sent yet: this campaign has no messages '
            "queued.</p></section>"
        )
    cards = [
        f'<div class="card total"><div class="num" id="count-total">{s.total:,}</div>'
        '<div class="lbl">recipients</div></div>'
    ]
    for state in DISPLAY_ORDER:
        cards.append(
            f'<div class="card" style="border-top-color:{COLOURS[state]}">'
            f'<div class="num" id="count-{state}">{s.counts[state]:,}</div>'
            f'<div class="lbl">{e(state)}</div></div>'
        )
    segments = "".join(
        f'<span style="width:{100 * s.counts[state] / s.total:.3f}%;'
        f'background:{COLOURS[state]}" title="{e(state)}: {s.counts[state]:,}"></span>'
        for state in DISPLAY_ORDER
        if s.counts[state]
    )
    return (
        '<section id="totals"><h2>Totals</h2>'
        f'<div class="cards">{"".join(cards)}</div>'
        f'<div class="bar" role="img" aria-label="share of recipients per state">{segments}</div>'
        f'<p id="progress">{s.progress:.1f}% finished ({s.finished:,} of {s.total:,}); '
        f"recent rate {s.rate_per_minute:g} per minute.</p></section>"
    )


def _chart_section(data: ReportData) -> str:
    head = '<section id="sends"><h2>Sends over time</h2>'
    if not data.sends:
        return head + '<p class="empty">No letter has been sent yet.</p></section>'
    return (
        head
        + f"<p>{data.sent_events:,} letters accepted by servers, one bar per "
        + f"{html.escape(_span_words(data.bucket))} (times in UTC).</p>"
        + _svg_chart(data.sends, data.bucket)
        + "</section>"
    )


def _svg_chart(sends: list[tuple[dt.datetime, int]], bucket: dt.timedelta) -> str:
    width, height = 960, 300
    left, right, top, bottom = 56, 16, 16, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((n for _, n in sends), default=0) or 1
    step = plot_w / len(sends)
    # A few bars stay bars, not blocks filling the chart.
    bar_w = min(48.0, max(1.0, step * 0.8))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="chart" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-labelledby="chart-title">',
        '<title id="chart-title">Letters sent over time</title>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        value = peak * fraction
        label = f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="ylab">{label}</text>'
        )
    for i, (at, n) in enumerate(sends):
        h = plot_h * n / peak
        x = left + i * step + (step - bar_w) / 2
        out.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'class="barrect"><title>{html.escape(_bar_label(at, bucket))}: {n:,} sent</title></rect>'
        )
    every = max(1, -(-len(sends) // 8))
    previous_day = None
    for i in range(0, len(sends), every):
        at = sends[i][0]
        x = left + i * step + step / 2
        day = at.date()
        text = _tick(at, bucket, show_date=day != previous_day)
        previous_day = day
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" class="xlab">{html.escape(text)}</text>'
        )
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" class="axis"/>'
        f'<text x="{left + plot_w / 2}" y="{height - 8}" class="axtitle">time (UTC)</text>'
        f'<text x="14" y="{top + plot_h / 2}" class="axtitle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">letters sent</text>'
        "</svg>"
    )
    return "".join(out)


def _tick(at: dt.datetime, bucket: dt.timedelta, *, show_date: bool) -> str:
    if bucket >= dt.timedelta(days=1):
        return at.strftime("%Y-%m-%d")
    return at.strftime("%d %b %H:%M") if show_date else at.strftime("%H:%M")


def _bar_label(at: dt.datetime, bucket: dt.timedelta) -> str:
    end = at + bucket
    if bucket >= dt.timedelta(days=1):
        return f"{at:%Y-%m-%d} – {end:%Y-%m-%d}"
    return f"{at:%Y-%m-%d %H:%M} – {end:%H:%M} UTC"


def _span_words(bucket: dt.timedelta) -> str:
    minutes = int(bucket.total_seconds() // 60)
    if minutes % 1440 == 0:
        days = minutes // 1440
        return "day" if days == 1 else f"{days} days"
    if minutes % 60 == 0:
        hours = minutes // 60
        return "hour" if hours == 1 else f"{hours} hours"
    return "minute" if minutes == 1 else f"{minutes} minutes"


def _breakdown_section(title: str, anchor: str, rows: list[Breakdown]) -> str:
    e = html.escape
    head = f'<section id="{anchor}"><h2>{e(title)}</h2>'
    if not rows:
        return head + '<p class="empty">No recipients yet.</p></section>'
    header = "".join(f'<th class="n">{e(state)}</th>' for state in DISPLAY_ORDER)
    body = []
    for b in rows:
        cells = "".join(
            f'<td class="n">{b.counts[state]:,}</td>'
            if b.counts[state]
            else '<td class="n z">0</td>'
            for state in DISPLAY_ORDER
        )
        body.append(
            f'<tr><th scope="row">{e(b.label)}</th>{cells}<td class="n">{b.total:,}</td></tr>'
        )
    return (
        head
        + f'<table><thead><tr><th></th>{header}<th class="n">total</th></tr></thead>'
        + f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _failures_section(failures: list[FailureReason]) -> str:
    e = html.escape
    head = (
        '<section id="failures"><h2>Why letters did not arrive</h2>'
        "<p>Failed, uncertain and postponed letters, grouped by the mail server's answer.</p>"
    )
    if not failures:
        return head + '<p class="empty">No failures.</p></section>'
    rows = "".join(
        f'<tr><td class="n">{f.count:,}</td><td class="n">{e(str(f.smtp_code or "–"))}</td>'
        f"<td>{e(f.reply or 'no answer from the server')}</td></tr>"
        for f in failures
    )
    return (
        head
        + '<table><thead><tr><th class="n">letters</th><th class="n">code</th>'
        + f"<th>server's answer</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _problems_section(data: ReportData) -> str:
    e = html.escape
    head = (
        '<section id="problems"><h2>Recipients to follow up</h2>'
        "<p>Every failed or uncertain letter, with the server's answer.</p>"
    )
    if not data.problems:
        return head + '<p class="empty">None: no letter failed or is uncertain.</p></section>'
    rows = []
    for r in data.problems:
        place = ", ".join(str(p) for p in (r["city"], r["country"]) if p)
        answer = " ".join(p for p in (str(r["smtp_code"] or ""), r["smtp_reply"] or "") if p)
        rows.append(
            f'<tr class="st-{e(r["status"])}"><td>{e(r["name"] or "")}</td><td>{e(r["email"])}</td>'
            f'<td>{e(place)}</td><td>{e(r["status"])}</td><td class="n">{r["attempts"]}</td>'
            f"<td>{e(answer or 'no answer')}</td><td>{e(_when(r['last_event_at']))}</td></tr>"
        )
    more = ""
    if data.problems_total > len(data.problems):
        more = (
            f'<p class="more">Showing {len(data.problems):,} of {data.problems_total:,}. The full list: '
            f"<code>mailer log {e(data.summary.campaign)} --status failed --status uncertain "
            "--format csv</code></p>"
        )
    return (
        head
        + "<table><thead><tr><th>name</th><th>email</th><th>place</th><th>state</th>"
        + '<th class="n">tries</th><th>server\'s answer</th><th>last attempt</th></tr></thead>'
        + f"<tbody>{''.join(rows)}</tbody></table>{more}</section>"
    )


def _legend() -> str:
    items = "".join(
        f'<li><b style="color:{COLOURS[state]}">{state}</b>: {html.escape(EXPLAIN[state])}</li>'
        for state in DISPLAY_ORDER
    )
    return f'<section id="legend"><h2>What the states mean</h2><ul>{items}</ul></section>'


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "–"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;
background:#f5f6f8;color:#1d2329;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.7em;margin:.2em 0}h2{font-size:1.25em;margin:0 0 .6em}
section{background:#fff;border-radius:8px;padding:16px 20px;margin:16px 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}
.meta{color:#555}.empty{color:#666;font-style:italic}.more{color:#555}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{flex:1 1 84px;border:1px solid #e3e6ea;border-top:5px solid #90a4ae;border-radius:6px;
padding:10px 12px;text-align:center}
.card.total{border-top-color:#263238}
.num{font-size:2.1em;font-weight:700}.lbl{color:#555;text-transform:capitalize}
.bar{display:flex;height:18px;border-radius:9px;overflow:hidden;margin:14px 0 6px;
background:#eceff1}.bar span{display:block;height:100%}
table{border-collapse:collapse;width:100%;font-size:.95em}
th,td{padding:5px 8px;border-bottom:1px solid #eceff1;text-align:left;vertical-align:top}
thead th{background:#f0f2f4}.n{text-align:right}.z{color:#b0b7bd}
tr.st-failed td:nth-child(4){color:#c62828;font-weight:600}
tr.st-uncertain td:nth-child(4){color:#ef6c00;font-weight:600}
td{word-break:break-word}
svg .grid{stroke:#e0e4e8;stroke-width:1}svg .axis{stroke:#607d8b;stroke-width:1}
svg .barrect{fill:#2e7d32}svg .ylab{font-size:12px;text-anchor:end;fill:#455a64}
svg .xlab{font-size:12px;text-anchor:middle;fill:#455a64}
svg .axtitle{font-size:13px;text-anchor:middle;fill:#263238}
code{background:#eef1f4;padding:1px 4px;border-radius:3px}
@media print{body{background:#fff}section{box-shadow:none;border:1px solid #ddd;
break-inside:avoid}}
"""
