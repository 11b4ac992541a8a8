"""The README cannot drift: its set-up commands are CI's, and every command it shows exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from mailer.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/mailer demo"
TEST = ".venv/bin/python -m pytest"


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def test_first_screen_has_exactly_the_two_setup_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:25])
    assert [b.strip() for b in _code_blocks(first_screen)] == [INSTALL, TEST]
    paragraph = first_screen.split("\n\n")[1]
    assert "open letter" in paragraph and "personal" in paragraph


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1].strip() == TEST
    assert "pip install -q -e '.[test]'" in "\n".join(ci)


def _invocations() -> list[list[str]]:
    calls = []
    for block in _code_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            commands: list[list[str]] = [[]]
            for word in words:
                if word in ("&&", ";", "|"):
                    commands.append([])
                else:
                    commands[-1].append(word)
            for command in commands:
                if ">" in command:
                    command = command[: command.index(">")]
                while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                    command = command[1:]  # VAR=value before the command
                if command and (command[0] == "mailer" or command[0].endswith("/mailer")):
                    calls.append(command[1:])
    return calls


def test_every_command_and_option_in_the_readme_exists() -> None:
    calls = _invocations()
    assert len(calls) > 20
    seen = set()
    for words in calls:
        command: click.Command = cli
        path = ["mailer"]
        rest = list(words)
        while rest:
            word = rest.pop(0)
            if word in ("-w", "--workspace", "--db") and command is cli:
                rest.pop(0)
                continue
            if isinstance(command, click.Group) and not word.startswith("-"):
                assert word in command.commands, f"README: `{' '.join(path)} {word}` does not exist"
                command = command.commands[word]
                path.append(word)
                continue
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                known |= {"--help", "-h"}
                assert flag in known, f"README: `{' '.join(path)}` has no option {flag}"
        seen.add(" ".join(path))
    for documented in (
        "mailer demo",
        "mailer init",
        "mailer import contacts",
        "mailer campaign create",
        "mailer check",
        "mailer preview",
        "mailer send",
        "mailer status",
        "mailer log",
        "mailer contacts show",
        "mailer report",
        "mailer retry",
        "mailer suppress add",
    ):
        assert documented in seen, f"the README never shows `{documented}`"
