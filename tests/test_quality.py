"""The code-quality rules of the project are part of the test suite, so CI enforces them."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed in this environment: pip install -e '.[test]'")
    return found


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "mailer", "tests", "benchmarks", "migrations"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- one writer of the outbox
#
# DESIGN §8: every change of a message's state goes through mailer/outbox.py, with its event in
# the same transaction. The scan below reads every other module's source (AST, not regexes over
# lines) and names each place that could write `messages` or `events`: ORM construction of
# Message/Event, Core insert/update/delete of them or of their tables (however aliased), raw
# SQL that inserts into, updates, deletes from or truncates either table (also when the table
# name comes from a variable or a table object in an f-string), bulk ORM writes, and attribute
# writes or session.delete on objects loaded as Message/Event. Migrations are exempt.

WRITER = "outbox.py"
_MODELS = {"Message": "messages", "Event": "events"}
_TABLE_NAMES = {"messages", "events"}
_WRITE_METHODS = {"insert", "update", "delete"}
# Calls that load ORM objects when given the entity itself.
_LOADERS = {"select", "get", "get_one", "query", "add_columns", "with_only_columns", "scalars"}
_BULK_METHODS = {"bulk_insert_mappings", "bulk_update_mappings", "bulk_save_objects"}
_SQL_WRITE = re.compile(
    r"\b(?:insert\s+(?:or\s+\w+\s+)?into|replace\s+into|merge\s+into|update(?:\s+only)?|"
    r"delete\s+from|truncate(?:\s+table)?|copy)\s+[\"'`\[]?(?:\w+[\"'`\]]?\.)?[\"'`\[]?"
    r"(messages|events)\b",
    re.IGNORECASE,
)
# Where an f-string or a concatenation puts a table in: rendered as the marker's name.
_TABLE_MARK = "messages"


class _OutboxWrites(ast.NodeVisitor):
    """Finds the writes to messages/events in one module's AST (see the comment above)."""

    def __init__(self, tree: ast.Module) -> None:
        self.problems: list[tuple[int, str]] = []
        self.refs: set[str] = set()  # names standing for Message/Event or their tables
        self.entities: set[str] = set()  # names of the ORM classes themselves
        self.module_aliases: set[str] = set()  # names bound to the mailer.models module
        self.strings: dict[str, str] = {}  # module-level NAME = "text"
        self._collect(tree)

    # ----- what stands for the two tables

    def _collect(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in (
                "mailer.models",
                "mailer.outbox",
            ):
                for alias in node.names:
                    if alias.name in ("Message", "Event", "MESSAGES", "EVENTS"):
                        self.refs.add(alias.asname or alias.name)
                    if alias.name in _MODELS and node.module == "mailer.models":
                        self.entities.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module == "mailer":
                for alias in node.names:
                    if alias.name in ("models", "outbox"):
                        self.module_aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in ("mailer.models", "mailer.outbox"):
                        self.module_aliases.add(alias.asname or alias.name)
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.strings[target.id] = node.value.value
        # Aliases of aliases (`T = cast(Table, Message.__table__)`, `t = T`), and the parameters
        # of this module's helpers that are handed a table (`_insert(engine, MESSAGES)`), to a
        # fixed point.
        functions = {
            node.name: node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        changed = True
        while changed:
            changed = False
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    helper = functions.get(node.func.id)
                    if helper is not None:
                        params = [a.arg for a in (*helper.args.posonlyargs, *helper.args.args)]
                        handed = [
                            p for p, a in zip(params, node.args, strict=False) if self._is_table(a)
                        ]
                        handed += [
                            k.arg for k in node.keywords if k.arg and self._is_table(k.value)
                        ]
                        for param in handed:
                            if param not in self.refs:
                                self.refs.add(param)
                                changed = True
                value = getattr(node, "value", None)
                if (
                    isinstance(node, ast.Assign | ast.AnnAssign)
                    and value is not None
                    and self._is_table(value)
                ):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        if isinstance(target, ast.Name) and target.id not in self.refs:
                            self.refs.add(target.id)
                            changed = True

    def _is_ref(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.refs
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases:
                return node.attr in ("Message", "Event", "MESSAGES", "EVENTS")
            # Message.__table__, models.Message.__table__
            return node.attr == "__table__" and self._is_ref(node.value)
        return False

    def _names_table(self, node: ast.AST) -> bool:
        """Table("messages", ...), table("events"), metadata.tables["messages"]."""
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            return (
                name in ("Table", "table")
                and isinstance(first, ast.Constant)
                and first.value in _TABLE_NAMES
            )
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            return node.slice.value in _TABLE_NAMES and getattr(node.value, "attr", "") == "tables"
        return False

    def _is_table(self, node: ast.AST) -> bool:
        """The expression is one of the two tables, or wraps one (cast(Table, ...), aliased(...),
        ....alias()); a column of it (`Message.id`) or a query over it is not."""
        if self._is_ref(node) or self._names_table(node):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in ("cast", "aliased", "alias") and any(self._is_table(a) for a in node.args):
                return True
            if isinstance(func, ast.Attribute) and func.attr == "alias":
                return self._is_table(func.value)
        return False

    def _queries_entity(self, node: ast.AST) -> bool:
        """`session.query(Message)...`: a legacy Query over the entity (it can bulk-update)."""
        return any(
            isinstance(n, ast.Call)
            and getattr(n.func, "attr", "") == "query"
            and any(self._is_ref(a) for a in n.args)
            for n in ast.walk(node)
        )

    def _names_table_name(self, node: ast.AST) -> bool:
        """`MESSAGES.name`, `Message.__tablename__`: the table's name, as put into SQL text."""
        return (
            isinstance(node, ast.Attribute)
            and node.attr in ("name", "fullname", "__tablename__")
            and self._is_table(node.value)
        )

    # ----- raw SQL

    def _text(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    parts.append(self._placeholder(value.value))
                else:
                    parts.append(self._text(value) or "")
            return "".join(parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self._text(node.left), self._text(node.right)
            if left is None and right is None:
                return None
            return (left or self._placeholder(node.left)) + (right or self._placeholder(node.right))
        if isinstance(node, ast.Name) and node.id in self.strings:
            return self.strings[node.id]
        return None

    def _placeholder(self, node: ast.AST) -> str:
        if self._is_table(node) or self._names_table_name(node):
            return _TABLE_MARK
        return self._text(node) or "{}"

    # ----- the visit

    def _flag(self, node: ast.AST, what: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), what))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if self._is_ref(func) and not (
            isinstance(func, ast.Attribute) and func.attr == "__table__"
        ):
            self._flag(node, f"constructs {ast.unparse(func)}(...)")
        if isinstance(func, ast.Attribute | ast.Name):
            name = func.attr if isinstance(func, ast.Attribute) else func.id
            receiver = func.value if isinstance(func, ast.Attribute) else None
            if name in _WRITE_METHODS:
                if node.args and self._is_table(node.args[0]):
                    self._flag(node, f"{name}() of {ast.unparse(node.args[0])}")
                elif receiver is not None and self._is_table(receiver):
                    self._flag(node, f"{ast.unparse(receiver)}.{name}()")
                elif receiver is not None and self._queries_entity(receiver):
                    self._flag(node, f"{name}() through a query of the entity")
            if name in _BULK_METHODS and node.args and self._is_table(node.args[0]):
                self._flag(node, f"{name}({ast.unparse(node.args[0])}, ...)")
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._check_sql(node)
        # Its parts are not visited again: the whole string was read as one.

    def visit_Constant(self, node: ast.Constant) -> None:
        self._check_sql(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if self._text(node) is not None:
            self._check_sql(node)
            return
        self.generic_visit(node)

    def _check_sql(self, node: ast.AST) -> None:
        text = self._text(node)
        if text is not None and (match := _SQL_WRITE.search(text)):
            self._flag(node, f"SQL {match.group(0)!r}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._check_loaded_objects(node)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _check_loaded_objects(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        """Names bound to what a query over the Message/Event entities returns (directly or
        through other names) must not have their attributes set or be deleted."""
        loaded: set[str] = set()

        def is_entity(n: ast.AST) -> bool:
            return (isinstance(n, ast.Name) and n.id in self.entities) or (
                isinstance(n, ast.Attribute)
                and n.attr in _MODELS
                and isinstance(n.value, ast.Name)
                and n.value.id in self.module_aliases
            )

        def entity_in(node: ast.AST) -> bool:
            # Objects come from selecting the entity itself (`select(Message)`,
            # `session.get(Event, id)`), not a column of it (`Message.status`) nor a join or
            # FROM over it; rows of a Core statement cannot be written through.
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id in loaded:
                    return True
                if isinstance(n, ast.Call):
                    name = getattr(n.func, "attr", getattr(n.func, "id", ""))
                    if name in _LOADERS and any(is_entity(a) for a in n.args):
                        return True
            return False

        def bound(target: ast.AST) -> list[str]:
            return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]

        changed = True
        while changed:
            changed = False
            for node in ast.walk(func):
                pairs: list[tuple[ast.AST, ast.AST]] = []
                if isinstance(node, ast.Assign):
                    pairs = [(t, node.value) for t in node.targets]
                elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and node.value is not None:
                    pairs = [(node.target, node.value)]
                elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
                    pairs = [(node.target, node.iter)]
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    pairs = [(node.optional_vars, node.context_expr)]
                for target, value in pairs:
                    if entity_in(value):
                        for name in bound(target):
                            if name not in loaded and name not in self.refs:
                                loaded.add(name)
                                changed = True
        for node in ast.walk(func):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                for t in _assigned(target):
                    root, through_attribute = t, False
                    while isinstance(root, ast.Attribute | ast.Subscript):
                        through_attribute |= isinstance(root, ast.Attribute)
                        root = root.value
                    if through_attribute and isinstance(root, ast.Name) and root.id in loaded:
                        self._flag(node, f"sets {ast.unparse(t)} on a loaded message/event")
            if isinstance(node, ast.Call):
                func_node = node.func
                name = getattr(func_node, "attr", getattr(func_node, "id", ""))
                if name in ("delete", "merge", "setattr") and any(
                    isinstance(a, ast.Name) and a.id in loaded for a in node.args
                ):
                    self._flag(node, f"{name}() of a loaded message/event")


def _assigned(target: ast.AST) -> list[ast.AST]:
    """What an assignment target writes: itself, or each element of a tuple/list target."""
    if isinstance(target, ast.Tuple | ast.List):
        return [t for element in target.elts for t in _assigned(element)]
    if isinstance(target, ast.Starred):
        return _assigned(target.value)
    return [target]


def _under_attribute(root: ast.AST, name: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.value is name for n in ast.walk(root))


def outbox_writes(source: str) -> list[tuple[int, str]]:
    """Where `source` writes messages or events: (line, what) pairs, empty when it does not."""
    tree = ast.parse(source)
    scan = _OutboxWrites(tree)
    scan.visit(tree)
    return sorted(set(scan.problems))


def _modules() -> list[Path]:
    return [
        path
        for path in sorted((ROOT / "mailer").rglob("*.py"))
        if path.name != WRITER and "migrations" not in path.parts
    ]


def test_no_module_but_the_outbox_writes_messages_or_events() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in _modules()
        for line, what in outbox_writes(path.read_text(encoding="utf-8"))
    ]
    assert found == [], "only mailer/outbox.py may write messages/events:\n" + "\n".join(found)


def test_the_outbox_itself_is_seen_writing() -> None:
    # The scan is not blind: the real writer is found writing, in each of its forms.
    found = " | ".join(what for _, what in outbox_writes((ROOT / "mailer" / WRITER).read_text()))
    for form in ("INSERT INTO events", "UPDATE messages", "MESSAGES.insert()", "update() of"):
        assert form.lower() in found.lower(), (form, found)


WRITES = {
    "orm construction": "from mailer.models import Message\nsession.add(Message(campaign_id=1))",
    "orm construction, aliased": "from mailer.models import Event as E\nE(kind='sent')",
    "models module": "from mailer import models\nsession.add(models.Event(kind='x'))",
    "core update": "from sqlalchemy import update\nfrom mailer.models import Message\n"
    "conn.execute(update(Message).values(status='sent'))",
    "dialect insert": "from sqlalchemy.dialects import postgresql\n"
    "from mailer.models import Event\npostgresql.insert(Event.__table__)",
    "table alias": "from typing import cast\nfrom mailer.models import Message\n"
    "T = cast(Table, Message.__table__)\nU = T\nconn.execute(U.update().values(status='x'))",
    "outbox's table object": "from mailer.outbox import EVENTS\nconn.execute(EVENTS.insert(), [])",
    "delete": "from sqlalchemy import delete\nfrom mailer.models import Event\ndelete(Event)",
    "table by name": "t = Table('messages', metadata)\nconn.execute(t.delete())",
    "metadata lookup": "conn.execute(Base.metadata.tables['events'].insert())",
    "raw sql": "conn.exec_driver_sql('UPDATE messages SET status = ? WHERE id = ?', (1, 2))",
    "raw sql, quoted and lower case": "text('insert into \"events\" (kind) values (1)')",
    "raw sql across lines": "q = ('DELETE '\n     'FROM  messages WHERE id = 1')",
    "raw sql, table from a constant": "TABLE = 'events'\nsql = f'INSERT INTO {TABLE} VALUES (1)'",
    "raw sql, table object in an f-string": "from mailer.outbox import MESSAGES\n"
    "sql = f'UPDATE {MESSAGES.name} SET status = 1'",
    "raw sql, concatenated": "from mailer.models import Message\n"
    "sql = 'UPDATE ' + Message.__tablename__ + ' SET status = 1'",
    "sqlite upsert": "sql = 'INSERT OR REPLACE INTO messages (id) VALUES (1)'",
    "bulk": "from mailer.models import Message\nsession.bulk_insert_mappings(Message, rows)",
    "loaded object": "from mailer.models import Message\n"
    "def f(session):\n    m = session.get(Message, 1)\n    m.status = 'sent'\n",
    "loaded in a loop": "from mailer.models import Message\n"
    "def f(s):\n    rows = s.scalars(select(Message))\n    for m in rows:\n        m.attempts += 1\n",
    "loaded with other columns": "from mailer.models import Message\n"
    "def f(s):\n    for email, m in s.execute(select(Contact.email, Message)):\n"
    "        m.attributes['note'] = email\n",
    "legacy query update": "from mailer.models import Message\n"
    "session.query(Message).filter(Message.id == 1).update({'status': 'sent'})",
    "through a helper": "from mailer.outbox import MESSAGES\n"
    "def _put(conn, table):\n    conn.execute(table.insert(), [])\n_put(c, MESSAGES)",
    "loaded and deleted": "from mailer.models import Event\n"
    "def f(s):\n    for e in s.scalars(select(Event)):\n        s.delete(e)\n",
}

READS = {
    "columns": "from mailer.models import Message\nselect(Message.status).where(Message.id == 1)",
    "entities read": "from mailer.models import Message\n"
    "def f(s):\n    for m in s.scalars(select(Message)):\n        print(m.status)\n",
    "asyncio's Event": "import asyncio\nstop = asyncio.Event()\nstop.set()",
    "email's Message": "from email.message import Message\nm = Message()",
    "other tables": "from mailer.models import Contact\nconn.execute(update(Contact).values(name='x'))",
    "sql about another table": "sql = 'UPDATE contacts SET name = 1'; t = 'INSERT INTO events_seen'",
    "words in prose": "'the events of a message are updated by the outbox'",
    "rows counted": "from mailer.models import Message\n"
    "def f(s):\n    counts = {}\n    q = select(Message.status, func.count()).select_from(Message)\n"
    "    for status, n in s.execute(q.group_by(Message.status)):\n        counts[status] = n\n",
    "set.update": "from mailer.models import Message\nseen.update(select(Message.id))",
}


@pytest.mark.parametrize("source", WRITES.values(), ids=WRITES.keys())
def test_the_scan_catches_each_way_of_writing(source: str) -> None:
    assert outbox_writes(source), source


@pytest.mark.parametrize("source", READS.values(), ids=READS.keys())
def test_the_scan_lets_reads_and_lookalikes_pass(source: str) -> None:
    assert outbox_writes(source) == []


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (`from a import b` counts as a and a.b), at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_outbox_imports_nothing_of_sending() -> None:
    forbidden = {f"mailer.{m}" for m in ("engine", "policy", "transport", "smtp", "compose")}
    forbidden |= {"mailer.compose_worker", "aiosmtplib"}
    assert _imports(ROOT / "mailer" / WRITER) & forbidden == set()


def test_the_engine_holds_no_sql() -> None:
    # The run uses outbox verbs: no SQL construct imported, no SQL written as text.
    sql_constructs = {
        f"sqlalchemy.{name}"
        for name in ("select", "insert", "update", "delete", "text", "func", "and_", "or_")
    }
    engine = ROOT / "mailer" / "engine.py"
    assert _imports(engine) & sql_constructs == set()
    statement = re.compile(r"\b(select\s+.+\s+from|insert\s+into|update\s+\w+\s+set)\b", re.I)
    strings = [
        node.value
        for node in ast.walk(ast.parse(engine.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    assert [s for s in strings if statement.search(s)] == []
