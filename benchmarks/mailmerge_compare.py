"""`mailer send` against mailmerge 2.3.0, start-up included, in one run against the same sink.

Both send the same letter to the same N fictional recipients (`mayorN@example.org`, from one CSV
file) through the same local SMTP sink (send_bench's: PIPELINING, answers 250, keeps nothing) on
127.0.0.1. Each is timed from its process start to its exit:

- mailmerge 2.3.0 (https://github.com/awdeorio/mailmerge), installed in a throwaway virtualenv
  under benchmarks/_work/ (made on the first run with `pip install mailmerge==2.3.0`), run as
  `mailmerge --no-limit --no-dry-run --output-format raw` with `security = Never` (plain SMTP)
  and no rate limit; its output (every message) goes to a file.
- `mailer send SLUG --smtp smtp+plain://127.0.0.1:PORT --concurrency 4 --yes`, on a workspace
  where `mailer import contacts` and `mailer campaign create` ran first. Those two are timed too
  and reported, with the whole path (import + create + send) as a second ratio.

    .venv/bin/python benchmarks/mailmerge_compare.py              # 10,000 recipients
    .venv/bin/python benchmarks/mailmerge_compare.py --count 2000
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
MAILMERGE_VENV = WORK / "mailmerge-2.3.0"
sys.path.insert(0, str(HERE))

import send_bench  # noqa: E402  (the sink and the letter)

SUBJECT = "An appeal to the mayor of {{ name }}"
BODY = send_bench.TEMPLATE.split("\n\n", 1)[1].replace("contact.name", "name")
SENDER = "Campaign Office <office@example.org>"


def mailmerge_bin() -> Path:
    exe = MAILMERGE_VENV / "bin" / "mailmerge"
    if not exe.exists():
        WORK.mkdir(exist_ok=True)
        venv.create(MAILMERGE_VENV, with_pip=True)
        subprocess.run(
            [str(MAILMERGE_VENV / "bin" / "pip"), "install", "-q", "mailmerge==2.3.0"], check=True
        )
    return exe


def write_inputs(folder: Path, count: int, port: int) -> dict[str, Path]:
    contacts = folder / "contacts.csv"
    with contacts.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name", "language"])
        for i in range(count):
            writer.writerow([f"mayor{i}@example.org", f"City {i}", "en"])
    template = folder / "mailmerge_template.txt"
    template.write_text(
        f"TO: {{{{ email }}}}\nSUBJECT: {SUBJECT}\nFROM: {SENDER}\n\n{BODY}", encoding="utf-8"
    )
    config = folder / "mailmerge_server.conf"
    config.write_text(
        f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nsecurity = Never\n", encoding="utf-8"
    )
    return {"contacts": contacts, "template": template, "config": config}


def timed(command: list[str], *, log: Path, cwd: Path | None = None) -> float:
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({result.returncode}): see {log}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    mailmerge = mailmerge_bin()
    mailer = [sys.executable, "-c", "from mailer.cli import main; main()"]
    with tempfile.TemporaryDirectory(prefix="mailmerge-compare-") as tmp_name:
        tmp = Path(tmp_name)
        sink, port = send_bench.start_sink(tmp, "raw")
        try:
            files = write_inputs(tmp, args.count, port)
            ws = tmp / "ws"
            subprocess.run([*mailer, "init", str(ws)], check=True, capture_output=True)
            template_dir = ws / "templates" / "bench"
            template_dir.mkdir(parents=True)
            (template_dir / "en.txt.j2").write_text(send_bench.TEMPLATE, encoding="utf-8")
            imported = timed(
                [*mailer, "-w", str(ws), "import", "contacts", str(files["contacts"])],
                log=tmp / "import.log",
            )
            created = timed(
                [*mailer, "-w", str(ws), "campaign", "create", "bench", "--template", "bench",
                 "--from", SENDER],
                log=tmp / "create.log",
            )  # fmt: skip
            sent = timed(
                [*mailer, "-w", str(ws), "send", "bench", "--smtp",
                 f"smtp+plain://127.0.0.1:{port}", "--concurrency", str(args.concurrency),
                 "--yes"],
                log=tmp / "send.log",
            )  # fmt: skip
            merged = timed(
                [str(mailmerge), "--no-limit", "--no-dry-run", "--output-format", "raw",
                 "--template", str(files["template"]), "--database", str(files["contacts"]),
                 "--config", str(files["config"])],
                log=tmp / "mailmerge.log",
                cwd=tmp,
            )  # fmt: skip
            send_summary = [
                line
                for line in (tmp / "send.log").read_text(encoding="utf-8").splitlines()
                if line.strip()
            ][-1:]
            merge_tail = (tmp / "mailmerge.log").read_text(encoding="utf-8").splitlines()[-1:]
        finally:
            sink.terminate()
            sink.wait()
    load = os.getloadavg()
    print(
        f"machine:   {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(f"date:      {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"letters:   {args.count:,} to mayorN@example.org, one sink on 127.0.0.1:{port}")
    print(f"mailmerge: {merged:6.1f} s  ({args.count / merged:,.0f} msg/s)   {merge_tail}")
    print(
        f"mailer:    {sent:6.1f} s  ({args.count / sent:,.0f} msg/s) `send`, start-up included"
        f"   {send_summary}"
    )
    print(f"           {imported:6.1f} s  `import contacts`;  {created:.1f} s  `campaign create`")
    print(f"ratio:     {merged / sent:.1f}x  (mailmerge time / mailer send time)")
    whole = imported + created + sent
    print(f"ratio, import + create + send: {merged / whole:.1f}x  ({whole:.1f} s)")


if __name__ == "__main__":
    main()
