"""Start-up stays fast: `mailer --version` and every `--help` load none of the heavy libraries.

Measured without a clock (DESIGN: no wall-clock thresholds in unit tests): the libraries that
made start-up take ~300 ms must simply not be imported. The measured figures are in
benchmarks/RESULTS.md (benchmarks/startup_bench.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("sqlalchemy", "jinja2", "aiosmtplib", "openpyxl", "rich", "alembic", "babel", "psycopg")

PROBE = """
import json, sys
from mailer.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="mailer", standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_after(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_version_loads_no_heavy_library() -> None:
    assert loaded_after("--version") & set(HEAVY) == set()


def test_a_probe_that_uses_the_database_does_load_it() -> None:
    # The probe can see a heavy import: without this, the tests above would pass on a broken
    # probe.
    assert "sqlalchemy" in loaded_after("db", "current", "--help") | loaded_after(
        "-w", "/nonexistent-workspace", "status"
    )


def _commands() -> list[list[str]]:
    import click

    from mailer.cli import cli

    found: list[list[str]] = []

    def walk(group: click.Group, prefix: list[str]) -> None:
        for name, command in group.commands.items():
            found.append([*prefix, name])
            if isinstance(command, click.Group):
                walk(command, [*prefix, name])

    walk(cli, [])
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_help_loads_no_heavy_library(command: list[str]) -> None:
    assert loaded_after(*command, "--help") & set(HEAVY) == set()
