"""No command without help: every group and command explains itself, every command shows an example."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from mailer.cli import cli


def _walk(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(cli))
LEAVES = [(p, c) for p, c in COMMANDS if not isinstance(c, click.Group)]


def _id(path: tuple[str, ...]) -> str:
    return " ".join(("mailer", *path))


def test_the_tree_is_walked() -> None:
    names = {_id(p) for p, _ in COMMANDS}
    # The DESIGN §5 contract: these must exist.
    for expected in ("mailer demo", "mailer status", "mailer log", "mailer report", "mailer init"):
        assert expected in names
    assert len(LEAVES) >= 5


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[_id(p) for p, _ in COMMANDS])
def test_every_command_and_group_has_help(path: tuple[str, ...], command: click.Command) -> None:
    assert command.help and command.help.strip(), f"{_id(path)} has no help text"
    assert command.get_short_help_str().strip(), f"{_id(path)} has no summary line"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{_id(path)} {param.opts[0]} has no help"
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=[_id(p) for p, _ in LEAVES])
def test_every_command_help_has_an_example(path: tuple[str, ...], command: click.Command) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    text = result.output
    assert "Example" in text, f"{_id(path)} --help has no Example block"
    block = text[text.index("Example") :].splitlines()[1:]
    examples = [
        line.strip() for line in block if line.strip().startswith("mailer ") or "mailer " in line
    ]
    assert any(_id(path) in line for line in examples), (
        f"{_id(path)} --help: the Example block does not show `{_id(path)} ...`"
    )
