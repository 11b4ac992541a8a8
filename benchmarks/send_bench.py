"""Send benchmark: `mailer send` end to end into a fast local SMTP sink, against a naive baseline.

A campaign of N fictional contacts (`mayorN@example.org`, bulk-inserted) is sent with
`mailer send --smtp smtp+plain://127.0.0.1:PORT --concurrency 4 --yes` as a child process (claim,
render, build, send, record), into a minimal asyncio SMTP sink in another process that offers
PIPELINING, answers 250 to everything and keeps nothing (`--sink-kind aiosmtpd` for the library
the tests use, `raw-no-pipelining` for a server without PIPELINING). Reports messages/s, CPU
per message and the peak RSS of the sender and of its compose worker, then the naive baseline in the same run: one
`EmailMessage` and one `aiosmtplib.send` per message.

    .venv/bin/python benchmarks/send_bench.py                 # 200,000 recipients
    .venv/bin/python benchmarks/send_bench.py --count 20000   # a quick run
    .venv/bin/python benchmarks/send_bench.py --dkim ed25519  # every letter DKIM-signed
    .venv/bin/python benchmarks/send_bench.py --dkim rsa      # ... with a 2048-bit RSA key

`--dkim` writes a fresh key into the benchmark workspace and a `[dkim]` section into its
mailer.toml; compare its msg/s with a run without it (the issue's bound: signing may cost at
most 20 % of the send rate). Run both back to back on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

TEMPLATE = """Subject: An appeal to the mayor of {{ contact.name }}

Dear {{ contact.name }},

On 14 March 2022 the mayors of Ukraine's cities wrote to the mayors of the world. They ask you
to use your city's ties with Ukrainian communities: to contact your counterparts, to let them
address your people, and to press your government to act.

With respect and hope,
the campaign office
"""


# --------------------------------------------------------------------------- the sink


class RawSink(asyncio.Protocol):
    """Just enough SMTP to take mail and forget it, with no per-command machinery, so the sink
    costs next to nothing. It offers PIPELINING (RFC 2920): commands that arrive together are
    answered together, in order."""

    pipelining = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = bytearray()
        self.in_data = False
        transport.write(b"220 sink ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.buffer += chunk
        out: list[bytes] = []
        while True:
            if self.in_data:
                if self.buffer.startswith(b".\r\n"):
                    end = -2
                else:
                    end = self.buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                del self.buffer[: end + 5]
                self.in_data = False
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            eol = self.buffer.find(b"\r\n")
            if eol < 0:
                break
            line = bytes(self.buffer[:eol]).upper()
            del self.buffer[: eol + 2]
            if line.startswith(b"EHLO"):
                out.append(
                    b"250-sink\r\n"
                    + (b"250-PIPELINING\r\n" if self.pipelining else b"")
                    + b"250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000\r\n"
                )
            elif line.startswith(b"DATA"):
                self.in_data = True
                out.append(b"354 go ahead\r\n")
            elif line.startswith(b"QUIT"):
                self.transport.write(b"".join([*out, b"221 bye\r\n"]))
                self.transport.close()
                return
            else:
                out.append(b"250 OK\r\n")
        if out:
            self.transport.write(b"".join(out))


class RawSinkNoPipelining(RawSink):
    pipelining = False


def run_raw_sink(port_file: Path, *, pipelining: bool = True) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            RawSink if pipelining else RawSinkNoPipelining, "127.0.0.1", 0
        )
        port_file.write_text(str(server.sockets[0].getsockname()[1]))
        await server.serve_forever()

    asyncio.run(serve())


def run_sink(port_file: Path) -> None:
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok"

    class FreePort(Controller):  # type: ignore[misc]
        def _create_server(self) -> Any:
            creating = super()._create_server()

            async def create() -> Any:
                server = await creating
                self.port = server.sockets[0].getsockname()[1]
                return server

            return create()

    controller = FreePort(Sink(), hostname="127.0.0.1", port=0)
    controller.start()
    port_file.write_text(str(controller.port))
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


def start_sink(tmp: Path, kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / f"sink-{kind}.port"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--sink", str(port_file), "--sink-kind", kind]
    )
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("the SMTP sink did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


# --------------------------------------------------------------------------- the campaign


def add_dkim(root: Path, kind: str) -> None:
    """A fresh key of `kind` (rsa: 2048 bits; ed25519) and [dkim] in the workspace's settings."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    path = root / "dkim.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    config = root / "mailer.toml"
    lines = 'domain = "example.org"\nselector = "bench"\nkey_file = "dkim.key"\n'
    text = config.read_text(encoding="utf-8")
    if "\n[dkim]\n" in text:
        text = text.replace("\n[dkim]\n", "\n[dkim]\n" + lines, 1)
    else:
        text += "\n[dkim]\n" + lines
    config.write_text(text, encoding="utf-8")


def prepare(root: Path, count: int) -> None:
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from mailer import campaigns, db
    from mailer.audience import Audience
    from mailer.config import create_workspace
    from mailer.models import Contact

    workspace = create_workspace(root=root)
    engine = db.make_engine(workspace.database_url)
    db.upgrade(engine)
    folder = root / "templates" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en.txt.j2").write_text(TEMPLATE, encoding="utf-8")
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        for first in range(0, count, 10_000):
            conn.execute(
                insert(Contact),
                [
                    {
                        "email": f"mayor{i}@example.org",
                        "name": f"City {i}",
                        "language": "en",
                        "attributes": {},
                        "tags": [],
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in range(first, min(count, first + 10_000))
                ],
            )
    with Session(engine) as session, session.begin():
        campaigns.create_campaign(
            session,
            slug="bench",
            template="bench",
            from_address="Campaign Office <office@example.org>",
            reply_to=None,
            audience=Audience(),
            title="Benchmark",
            default_language="en",
            templates_dir=root / "templates",
        )
    engine.dispose()


def children_peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 1024 / 1024


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (the sender and its compose worker), from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree) / 1024 / 1024


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_send(
    root: Path, port: int, concurrency: int, processes: int
) -> tuple[float, float, float, float, str]:
    command = [
        sys.executable,
        "-c",
        "from mailer.cli import main; main()",
        "-w",
        str(root),
        "send",
        "bench",
        "--smtp",
        f"smtp+plain://127.0.0.1:{port}",
        "--concurrency",
        str(concurrency),
        "--yes",
    ]
    cpu_before = children_cpu_seconds()
    started = time.perf_counter()
    # Several senders may work one campaign: each claims its own batches.
    # Output to files, not pipes: nobody reads a pipe while the memory is sampled below.
    logs = [(root.parent / f"send-{i}.log").open("w+", encoding="utf-8") for i in range(processes)]
    children = [
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True) for log in logs
    ]
    # Sampled while they run: the largest sum of RSS over each sender and its compose worker.
    peak_tree = 0.0
    if Path("/proc/self/stat").exists():
        while any(child.poll() is None for child in children):
            peak_tree = max(peak_tree, max(tree_rss_mb(child.pid) for child in children))
            time.sleep(0.2)
    for child in children:
        child.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    elapsed = time.perf_counter() - started
    for child, output in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise SystemExit(f"mailer send failed ({child.returncode}):\n{output}")
    cpu = children_cpu_seconds() - cpu_before
    return elapsed, cpu, children_peak_rss_mb(), peak_tree, outputs[0]


# --------------------------------------------------------------------------- the baseline


async def naive(port: int, count: int) -> tuple[float, float]:
    import aiosmtplib

    cpu = time.process_time()
    started = time.perf_counter()
    for i in range(count):
        message = EmailMessage()
        message["From"] = "Campaign Office <office@example.org>"
        message["To"] = f"City {i} <baseline{i}@example.org>"
        message["Subject"] = f"An appeal to the mayor of City {i}"
        message.set_content(TEMPLATE.split("\n\n", 1)[1].replace("{{ contact.name }}", f"City {i}"))
        await aiosmtplib.send(message, hostname="127.0.0.1", port=port)
    return time.perf_counter() - started, time.process_time() - cpu


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--processes", type=int, default=1, help="`mailer send` processes working the campaign"
    )
    parser.add_argument(
        "--baseline", type=int, default=2000, help="messages for the naive baseline"
    )
    parser.add_argument(
        "--sink-kind",
        choices=["raw", "raw-no-pipelining", "aiosmtpd"],
        default="raw",
        help="raw: a minimal asyncio sink offering PIPELINING (the default); raw-no-pipelining: "
        "the same without it; aiosmtpd: the library the tests use (slower than the sender)",
    )
    parser.add_argument(
        "--dkim",
        choices=["none", "rsa", "ed25519"],
        default="none",
        help="DKIM-sign every letter with a fresh key of this kind (default: unsigned)",
    )
    parser.add_argument("--sink", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink is not None:
        if args.sink_kind == "aiosmtpd":
            run_sink(args.sink)
        else:
            run_raw_sink(args.sink, pipelining=args.sink_kind == "raw")
        return

    with tempfile.TemporaryDirectory(prefix="send-bench-") as tmp_name:
        tmp = Path(tmp_name)
        sink, port = start_sink(tmp, args.sink_kind)
        try:
            t0 = time.perf_counter()
            prepare(tmp / "ws", args.count)
            if args.dkim != "none":
                add_dkim(tmp / "ws", args.dkim)
            prepared = time.perf_counter() - t0
            elapsed, cpu, rss, tree_rss, output = run_send(
                tmp / "ws", port, args.concurrency, args.processes
            )
            baseline, baseline_cpu = asyncio.run(naive(port, args.baseline))
        finally:
            sink.terminate()
            sink.wait()
    in_run = re.search(r"\(([\d,]+) msg/s", output)
    rate = args.count / elapsed
    base_rate = args.baseline / baseline
    print(
        f"machine:   {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"
    )
    print(f"date:      {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"command:   python benchmarks/send_bench.py --count {args.count} "
        f"--concurrency {args.concurrency} --processes {args.processes} "
        f"--sink-kind {args.sink_kind} --dkim {args.dkim}"
    )
    print(f"prepare:   {args.count:,} contacts + campaign in {prepared:.1f} s (not timed below)")
    print(
        f"send:      {args.count:,} messages in {elapsed:.1f} s end to end (process start, queue, "
        f"claim, render, build, send, record): {rate:,.0f} msg/s"
        + (f"; pipeline rate reported by send: {in_run.group(1)} msg/s" if in_run else "")
    )
    print(
        f"sender CPU: {cpu:.1f} s user+system: {args.count / cpu:,.0f} messages per CPU-second "
        "(the sender and its compose worker together; the sink's CPU is not included)"
    )
    print(
        f"peak RSS:  {rss:.0f} MB (the largest single process: sender or compose worker); "
        f"{tree_rss:.0f} MB at most for a sender and its worker together (sampled every 0.2 s)"
    )
    print(
        f"baseline:  {args.baseline:,} messages, one EmailMessage + one aiosmtplib.send each: {base_rate:,.0f} msg/s"
    )
    print(
        f"baseline CPU: {args.baseline / baseline_cpu:,.0f} messages per CPU-second; "
        f"ratio (per CPU-second) {(args.count / cpu) / (args.baseline / baseline_cpu):.1f}x"
    )
    print(f"ratio:     {rate / base_rate:.1f}x")
    summary = [line for line in output.splitlines() if line.startswith("This run:")]
    print(summary[-1] if summary else output[-500:])


if __name__ == "__main__":
    main()
