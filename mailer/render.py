"""Templates to personal letters. Knows nothing of the database: it renders plain views.

A template is a folder of variants, one per language: `LANG.txt.j2` (header lines, a blank line,
then the body) and optionally `LANG.html.j2` (an HTML alternative, body only). Only the header
`Subject:` is allowed: every other header is the message builder's job, so a template can never
add one (nor can contact data reach the header section, because the subject line is compiled on
its own and every line break in its output becomes a space).

The sandbox also bounds size: a letter is at most MAX_LETTER_CHARS, counted while it renders
(see "size limits"). The `greeting` in the context comes from greetings.py.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import secrets
import string
import types
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from babel import Locale, UnknownLocaleError
from babel.dates import format_date as babel_format_date
from babel.lists import format_list as babel_format_list
from babel.numbers import format_decimal
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer.errors import NotFoundError, TemplateError
from mailer.greetings import Greeting, greeting_for

FALLBACK_LANGUAGE = "en"
TEXT_SUFFIX = ".txt.j2"
HTML_SUFFIX = ".html.j2"
ALLOWED_HEADERS = ("Subject",)
_LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*$")
_HEADER_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]?(.*)$")


# --------------------------------------------------------------------------- views


@dataclass(frozen=True, kw_only=True, slots=True)
class CityView:
    name: str
    country: str | None
    region: str | None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, kw_only=True, slots=True)
class SignatoryView:
    name: str
    title: str | None
    city: str | None
    email: str | None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, kw_only=True, slots=True)
class PartnershipView:
    ukrainian_city: CityView
    kind: str
    since: int | None
    years: int | None
    note: str | None
    signatory: SignatoryView | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ContactView:
    email: str
    name: str | None
    title: str | None
    salutation: str | None
    language: str | None
    organisation: str | None
    attributes: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class CampaignView:
    slug: str
    title: str | None
    default_language: str


@dataclass(frozen=True, kw_only=True, slots=True)
class LetterView:
    """An earlier letter to this recipient that a follow-up answers: when it went (in the
    recipient's own time zone), its subject and Message-ID."""

    sent_at: dt.datetime
    date: dt.date
    subject: str
    message_id: str

    def __str__(self) -> str:
        return self.subject


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipient:
    contact_id: int
    contact: ContactView
    city: CityView | None
    partnerships: tuple[PartnershipView, ...] = ()
    signatories: tuple[SignatoryView, ...] = ()
    # A follow-up's thread: the first letter to this recipient and the one just before this
    # (the same for a first follow-up), and every earlier Message-ID, oldest first.
    first_letter: LetterView | None = None
    previous_letter: LetterView | None = None
    references: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Rendered:
    language: str
    requested_language: str
    fell_back: bool
    subject: str
    # Extra header lines besides Subject; templates may set none today (see ALLOWED_HEADERS).
    headers: dict[str, str]
    text: str
    html: str | None
    # The letter greets with its language's generic greeting (nothing known to be personal).
    generic_greeting: bool = False


# --------------------------------------------------------------------------- errors


class RenderProblem(TemplateError):
    """A template that fails for one recipient; `file` and `line` say where."""

    def __init__(self, message: str, *, file: str, line: int | None) -> None:
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line
        self.detail = message


class MissingFieldError(RenderProblem):
    """The template uses a field this recipient lacks; `field` is its dotted name."""

    def __init__(self, *, field: str, file: str, line: int | None) -> None:
        super().__init__(f"{field} is missing for this contact", file=file, line=line)
        self.field = field


class TemplateSecurityError(RenderProblem):
    """The template tried to leave the sandbox; nothing unsafe was executed."""


# --------------------------------------------------------------------------- jinja plumbing


class _Missing(UndefinedError):
    def __init__(self, message: str | None, *, obj: Any, name: str | None) -> None:
        super().__init__(message)
        self.obj = obj
        self.name = name


class _NonePrinted(Exception):
    pass


class _StrictUndefined(jinja2.StrictUndefined):
    """StrictUndefined whose error remembers which object lacked which name, to name the field.

    Jinja drops its own frames from tracebacks, so the object and name travel in the exception.
    """

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = jinja2.utils.missing,
        name: str | None = None,
        exc: type[jinja2.exceptions.TemplateRuntimeError] = UndefinedError,
    ) -> None:
        if exc is UndefinedError:
            exc = _missing_factory(obj, name)  # type: ignore[assignment]
        super().__init__(hint, obj, name, exc)


def _missing_factory(obj: Any, name: str | None) -> Callable[[str | None], _Missing]:
    def make(message: str | None) -> _Missing:
        return _Missing(message, obj=obj, name=name)

    return make


def _finalize(value: Any) -> Any:
    # A `None` printed into a letter reads "None": that is a missing field, never text.
    if value is None:
        raise _NonePrinted("None printed")
    return value


@dataclass(frozen=True, slots=True)
class _Variant:
    language: str
    text_file: str
    # Header section and body in one template: one pass per letter, and line numbers are the
    # file's. The output is cut at `separator`, which stands where the blank line was.
    text: jinja2.Template
    html_file: str | None
    html: jinja2.Template | None
    # Whether the HTML variant has header lines to cut off at the separator, like the text one.
    html_split: bool = False
    # Whether the variant prints `greeting` (only then does a generic one count).
    uses_greeting: bool = False


class _Loader(jinja2.BaseLoader):
    """Includes and imports resolve inside the template set only, never on disk."""

    def __init__(self, sources: Mapping[str, str], prefix: str) -> None:
        self.sources = sources
        self.prefix = prefix

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        if template not in self.sources:
            raise jinja2.TemplateNotFound(template)
        return self.sources[template], self.prefix + template, lambda: True


# A bare "en" means international (British) English: "Lviv, Kharkiv and Odesa", "26 November
# 2026". An `en-US.txt.j2` variant gets American conventions.
_BABEL_DEFAULTS = {"en": "en_GB"}


def _locale(language: str) -> Locale:
    tag = language.replace("-", "_")
    try:
        return Locale.parse(_BABEL_DEFAULTS.get(tag.lower(), tag))
    except (UnknownLocaleError, ValueError):
        return Locale.parse(FALLBACK_LANGUAGE)


# The views' own fields are data, never code: reading them skips the sandbox's per-access checks
# (which otherwise double the cost of a letter). Everything else goes through the full sandbox.
_VIEW_FIELDS: dict[type, frozenset[str]] = {
    cls: frozenset(cls.__dataclass_fields__)
    for cls in (
        CityView,
        SignatoryView,
        PartnershipView,
        ContactView,
        CampaignView,
        Recipient,
        Greeting,
    )
}


# --------------------------------------------------------------------------- size limits

# The largest letter a template may render: each of its text (with the subject) and HTML
# versions. A million characters is some 300 pages, 200 times the starter appeal; no letter
# needs more, and a template that builds more is a mistake (`{{ 'x' * 300000000 }}` took 3 GB).
MAX_LETTER_CHARS = 1_000_000
# What one render may build in all, kept or thrown away (strings and lists made by `*`, `+`,
# `~`, joins, padding, format widths and buffers): bounds the memory of a template's loops.
_BUILD_BUDGET = 10 * MAX_LETTER_CHARS
# Numbers a template computes (`2 ** 300000000` is 37 MB and minutes of CPU).
_MAX_INT_BITS = 100_000


class LetterTooLarge(RenderProblem):
    """The letter, or a value a template builds for it, would pass MAX_LETTER_CHARS."""


class _TooLarge(Exception):
    """Raised while rendering; TemplateSet turns it into LetterTooLarge with file and line."""


# What the current render may still build. One counter for the process, reset by every render:
# two threads rendering at once (never the case today) would only share their budgets.
_budget_left = _BUILD_BUDGET


def _reset_budget() -> None:
    global _budget_left
    _budget_left = _BUILD_BUDGET


def _charge(size: int, what: str = "characters") -> None:
    """Count `size` characters (or items) about to be built; stop past a limit."""
    global _budget_left
    if size > MAX_LETTER_CHARS:
        raise _TooLarge(f"a value of {size:,} {what}")
    _budget_left -= size
    if _budget_left < 0:
        raise _TooLarge(f"{_BUILD_BUDGET:,} characters built in all")


_SEQUENCES = (str, list, tuple)


def _check_repeat(left: Any, right: Any) -> None:
    if isinstance(left, _SEQUENCES) and isinstance(right, int):
        _charge(len(left) * max(right, 0), "characters or items")
    elif isinstance(right, _SEQUENCES) and isinstance(left, int):
        _charge(len(right) * max(left, 0), "characters or items")
    elif isinstance(left, int) and isinstance(right, int):
        _check_bits(left.bit_length() + right.bit_length())


def _check_bits(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise _TooLarge(f"a number of {bits:,} bits")


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_widths(numbers: Iterable[str], star: bool, values: Iterable[Any]) -> None:
    """Padding is the one way a format grows beyond its arguments: widths within the limit."""
    for digits in numbers:
        if len(digits) > 6 and int(digits) > MAX_LETTER_CHARS:
            raise _TooLarge(f"a format width of {int(digits):,} characters")
    if star:
        for value in values:
            if isinstance(value, int) and abs(value) > MAX_LETTER_CHARS:
                raise _TooLarge(f"a format width of {value:,} characters")


def _check_printf(text: str, values: Any) -> None:
    numbers: list[str] = []
    star = False
    for match in _PRINTF_SPEC.finditer(text):
        for group in match.groups():
            if group == "*":
                star = True
            elif group:
                numbers.append(group)
    items = values if isinstance(values, tuple) else (values,)
    if isinstance(values, Mapping):
        items = tuple(values.values())
    _check_widths(numbers, star, items)


def _check_str_format(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    numbers: list[str] = []
    star = False
    try:
        for _, _, spec, _ in string.Formatter().parse(text):
            if spec:
                numbers.extend(_DIGITS.findall(spec))
                star = star or "{" in spec
    except ValueError:
        return  # malformed: str.format itself says so
    _check_widths(numbers, star, (*args, *kwargs.values()))


def _check_str_call(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Checks a call of a str method that can grow its string; returns the arguments to use."""
    text: str = method.__self__
    name = method.__name__
    if name in ("ljust", "rjust", "center", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if isinstance(width, int):
            _charge(max(width, len(text)))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _charge(len(text) + text.count("\t") * max(size, 0))
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str):
        old, new = args[0], args[1]
        if isinstance(new, str) and len(new) > len(old):
            found = text.count(old) if old else len(text) + 1
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                found = min(found, args[2])
            _charge(len(text) + found * (len(new) - len(old)))
    elif name == "join" and args:
        items = list(args[0])
        _charge(
            sum(len(i) if isinstance(i, str) else 0 for i in items)
            + len(text) * max(len(items) - 1, 0)
        )
        return (items, *args[1:])
    return args


_GROWING_STR_METHODS = frozenset(
    {"ljust", "rjust", "center", "zfill", "expandtabs", "replace", "join"}
)


def _str_join(seq: Iterable[Any]) -> str:
    """`a ~ b` with the pieces counted before they are joined."""
    pieces = [str(piece) for piece in seq]
    _charge(sum(map(len, pieces)))
    return "".join(pieces)


def _markup_join(seq: Iterable[Any]) -> str:
    pieces = list(seq)
    _charge(sum(len(str(piece)) for piece in pieces))
    return jinja2.runtime.markup_join(pieces)


def _concat(pieces: Iterable[str]) -> str:
    """A buffer's pieces (a `{% set %}` block, a macro's output), counted before joined."""
    if not isinstance(pieces, list):
        pieces = list(pieces)
    _charge(sum(map(len, pieces)))
    return "".join(pieces)


class _LimitedTemplate(jinja2.Template):
    """Templates whose `~` (compiled to str_join/markup_join) is counted like the rest."""

    @classmethod
    def _from_namespace(
        cls,
        environment: jinja2.Environment,
        namespace: MutableMapping[str, Any],
        globals: MutableMapping[str, Any],
    ) -> jinja2.Template:
        namespace["str_join"] = _str_join
        namespace["markup_join"] = _markup_join
        return super()._from_namespace(environment, namespace, globals)


def _limit_filters(env: jinja2.Environment) -> None:
    """The built-in filters that can grow a text, with their growth counted first."""
    filters = env.filters
    center, indent, replace, do_format = (
        filters["center"],
        filters["indent"],
        filters["replace"],
        filters["format"],
    )

    def limited_center(value: Any, width: int = 80) -> str:
        if isinstance(width, int):
            _charge(max(width, len(str(value))))
        result: str = center(value, width)
        return result

    def limited_indent(
        s: Any, width: int | str = 4, first: bool = False, blank: bool = False
    ) -> str:
        text = str(s)
        step = width if isinstance(width, int) else len(str(width))
        _charge(len(text) + (text.count("\n") + 2) * max(step, 0))
        result: str = indent(s, width, first, blank)
        return result

    @jinja2.pass_eval_context
    def limited_replace(
        eval_ctx: jinja2.nodes.EvalContext, s: Any, old: Any, new: Any, count: int | None = None
    ) -> str:
        _check_str_call(str(s).replace, (str(old), str(new), -1 if count is None else count), {})
        result: str = replace(eval_ctx, s, old, new, count)
        return result

    @jinja2.pass_eval_context
    def limited_join(
        eval_ctx: jinja2.nodes.EvalContext,
        value: Iterable[Any],
        d: str = "",
        attribute: str | int | None = None,
    ) -> str:
        items = list(value)
        if attribute is not None:
            items = list(map(jinja2.filters.make_attrgetter(env, attribute), items))
        _charge(sum(len(str(i)) for i in items) + len(str(d)) * max(len(items) - 1, 0))
        result: str = jinja2.filters.sync_do_join(eval_ctx, items, d)
        return result

    def limited_format(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_printf(str(value), kwargs or args)
        result: str = do_format(value, *args, **kwargs)
        _charge(len(result))
        return result

    filters["center"] = limited_center
    filters["indent"] = limited_indent
    filters["replace"] = limited_replace
    filters["join"] = limited_join
    filters["format"] = limited_format


_FORMAT_METHODS = frozenset({"format", "format_map"})
_DIRECT_CALLS = frozenset({jinja2.runtime.Macro, types.BuiltinMethodType})


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    template_class = _LimitedTemplate
    # Operators that can build a large value are checked before they do (see size limits).
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    # Jinja's verdict depends only on the object's type and the attribute name (isinstance
    # checks against ABCs, name rules), so it is computed once per pair instead of per access.
    _verdicts: dict[tuple[type, str], bool] = {}  # noqa: RUF012

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = super().is_safe_attribute(obj, attr, value)
        return verdict

    def getattr(self, obj: Any, attribute: str) -> Any:
        fields = _VIEW_FIELDS.get(type(obj))
        if fields is not None and attribute in fields:
            return getattr(obj, attribute)
        kind = type(obj)
        if kind is types.MappingProxyType and attribute in obj:
            return obj[attribute]
        # Already judged safe for this type (`dict.get`, `str.startswith`...): skip the checks.
        # str.format and format_map are left to Jinja, which wraps them in a sandboxed formatter.
        if self._verdicts.get((kind, attribute)) and attribute not in _FORMAT_METHODS:
            try:
                return getattr(obj, attribute)
            except AttributeError:
                pass
        return super().getattr(obj, attribute)

    def call(
        __self,  # Jinja's own signature: these names cannot clash with keyword arguments
        __context: jinja2.runtime.Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # Macros are template code, and a builtin method was vetted when it was looked up
        # (ImmutableSandbox refuses mutating ones): neither needs the generic call protocol.
        kind = type(__obj)
        if kind in _DIRECT_CALLS or __obj is jinja2.utils.Namespace:
            kwargs.pop("_block_vars", None)
            kwargs.pop("_loop_vars", None)
            if (
                kind is types.BuiltinMethodType
                and __obj.__name__ in _GROWING_STR_METHODS
                and isinstance(__obj.__self__, str)
            ):
                args = _check_str_call(__obj, args, kwargs)
            return __obj(*args, **kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "+":
            # Lists grown in a loop (`ns.items + [item]`) are the common case: kept cheap.
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                _charge(len(left) + len(right), "characters or items")
        elif operator == "*":
            _check_repeat(left, right)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _check_bits(right * left.bit_length())
        elif isinstance(left, str):  # "%": printf-style formatting
            _check_printf(left, right)
            result = left % right
            _charge(len(result))
            return result
        return self.binop_table[operator](left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        text: str = value.__self__
        mapping = value.__name__ == "format_map"

        def limited(*args: Any, **kwargs: Any) -> str:
            given = args[0] if mapping and args and isinstance(args[0], Mapping) else kwargs
            _check_str_format(text, () if mapping else args, given)
            result = wrapper(*args, **kwargs)
            _charge(len(result))
            return result

        return limited

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(argument) is str:
            fields = _VIEW_FIELDS.get(type(obj))
            if fields is not None and argument in fields:
                return getattr(obj, argument)
        return super().getitem(obj, argument)


def _make_env(*, autoescape: bool, loader: jinja2.BaseLoader) -> ImmutableSandboxedEnvironment:
    env = _SandboxEnvironment(
        loader=loader,
        undefined=_StrictUndefined,
        autoescape=autoescape,
        finalize=_finalize,
        # Jinja's own whitespace defaults, so templates behave as its documentation says.
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=-1,
    )
    # Buffers (`{% set %}` blocks, macros, `{% filter %}`) are joined by `concat`: counted.
    env.concat = _concat  # type: ignore[method-assign]
    _limit_filters(env)
    return env


def _install_filters(env: jinja2.Environment, locale: Locale) -> None:
    # Babel is slow per call and letters repeat the same dates and city lists: cache per variant.
    @functools.lru_cache(maxsize=4096)
    def _list(values: tuple[str, ...], style: str) -> str:
        return babel_format_list(list(values), style=style, locale=locale)  # type: ignore[arg-type]

    @functools.lru_cache(maxsize=256)
    def _date(value: dt.date, format: str) -> str:
        return babel_format_date(value, format=format, locale=locale)

    def format_list(values: Iterable[Any], style: str = "standard") -> str:
        return _list(tuple(str(v) for v in values), style)

    def format_date(value: dt.date, format: str = "long") -> str:
        return _date(value, format)

    def format_number(value: float | int) -> str:
        return format_decimal(value, locale=locale)

    env.filters["format_list"] = format_list
    env.filters["format_date"] = format_date
    env.filters["format_number"] = format_number


# --------------------------------------------------------------------------- template sets


class TemplateSet:
    """The variants of one template, compiled once and rendered many times."""

    def __init__(self, *, name: str, sources: Mapping[str, str]) -> None:
        self.name = name
        self._sources = dict(sources)
        self.prefix = f"templates/{name}/"
        # Unguessable, so no contact data can fake the end of the header section.
        self._separator = f"\x00mailer-body-{secrets.token_hex(16)}\x00"
        self._variants: dict[str, _Variant] = {}
        self._by_key: dict[str, str] = {}
        self._compile()

    # ---- construction

    @classmethod
    def from_sources(cls, *, name: str, sources: dict[str, str]) -> TemplateSet:
        return cls(name=name, sources=sources)

    @classmethod
    def from_directory(cls, path: Path, *, name: str) -> TemplateSet:
        if not path.is_dir():
            raise NotFoundError(f"no template {name!r} (no folder {path})")
        sources: dict[str, str] = {}
        for file in sorted(path.rglob("*")):
            if not file.is_file() or file.name.startswith("."):
                continue
            relative = file.relative_to(path).as_posix()
            try:
                sources[relative] = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise TemplateError(
                    f"templates/{name}/{relative}: not UTF-8 text (byte {exc.start})"
                ) from exc
            except OSError as exc:
                raise TemplateError(f"templates/{name}/{relative}: cannot read: {exc}") from exc
        return cls(name=name, sources=sources)

    @property
    def sources(self) -> dict[str, str]:
        return dict(self._sources)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(sorted(self._variants))

    def has_html(self, language: str) -> bool:
        variant = self._variants.get(language)
        return variant is not None and variant.html is not None

    def _compile(self) -> None:
        texts = {f[: -len(TEXT_SUFFIX)]: f for f in self._sources if f.endswith(TEXT_SUFFIX)}
        htmls = {f[: -len(HTML_SUFFIX)]: f for f in self._sources if f.endswith(HTML_SUFFIX)}
        if not texts:
            raise TemplateError(
                f"{self.prefix}: no variants; a template needs at least one LANG{TEXT_SUFFIX} "
                f"file such as en{TEXT_SUFFIX}"
            )
        for language, file in htmls.items():
            if language not in texts:
                raise TemplateError(
                    f"{self.prefix}{file}: an HTML variant needs its text variant "
                    f"{language}{TEXT_SUFFIX} beside it"
                )
        loader = _Loader(self._sources, self.prefix)
        for language, file in sorted(texts.items()):
            if not _LANGUAGE_RE.match(language):
                raise TemplateError(
                    f"{self.prefix}{file}: {language!r} is not a language tag (use en, de, pt-BR...)"
                )
            locale = _locale(language)
            text_env = _make_env(autoescape=False, loader=loader)
            _install_filters(text_env, locale)
            header, combined = self._split(file)
            # Compiled alone first, so an error in the header section names its own line.
            self._compile_one(text_env, header, file)
            text = self._compile_one(text_env, combined, file)
            html_file = htmls.get(language)
            html = None
            html_split = False
            if html_file is not None:
                html_env = _make_env(autoescape=True, loader=loader)
                _install_filters(html_env, locale)
                source = self._sources[html_file]
                if _has_header_section(source):
                    # An HTML variant may repeat its text variant's header lines; the message
                    # has one Subject, the text variant's, so these are rendered and dropped.
                    header, source = self._split(html_file)
                    self._compile_one(html_env, header, html_file)
                    html_split = True
                html = self._compile_one(html_env, source, html_file)
            self._variants[language] = _Variant(
                language=language,
                text_file=file,
                text=text,
                html_file=html_file,
                html=html,
                html_split=html_split,
                uses_greeting=_uses_name(text, "greeting")
                or (html is not None and _uses_name(html, "greeting")),
            )
            self._by_key[language.lower().replace("_", "-")] = language

    def _split(self, file: str) -> tuple[str, str]:
        """(the header section's source, the whole source with the separator for the blank line).

        The header section may hold Jinja statements and comments (`{% set %}`, `{# #}`, even
        over several lines) before the Subject line; they belong to the subject's template.
        """
        where = self.prefix + file
        lines = self._sources[file].replace("\r\n", "\n").replace("\r", "\n").split("\n")
        # Kept lines at their own positions (others blank), so Jinja's line numbers are the file's.
        kept = [""] * len(lines)
        subject_line: int | None = None
        end = None
        index = 0
        while index < len(lines):
            line = lines[index]
            number = index + 1
            if not line.strip():
                end = number
                break
            opener = line.lstrip()[:2]
            if opener in ("{%", "{#"):
                closer = "%}" if opener == "{%" else "#}"
                while True:
                    kept[index] = lines[index]
                    if closer in lines[index] or index + 1 >= len(lines):
                        break
                    index += 1
                index += 1
                continue
            match = _HEADER_RE.match(line)
            if not match:
                raise TemplateError(
                    f"{where}:{number}: expected a header line such as `Subject: ...` "
                    "(header lines, then a blank line, then the body)"
                )
            header = match.group(1)
            if header.lower() != "subject":
                raise TemplateError(
                    f"{where}:{number}: header {header!r} is not allowed in a template; "
                    "only Subject (the other headers come from the campaign)"
                )
            if subject_line is not None:
                raise TemplateError(f"{where}:{number}: a second Subject line")
            subject_line = number
            kept[index] = match.group(2)
            index += 1
        if subject_line is None:
            raise TemplateError(
                f"{where}: no `Subject:` line; a text variant starts with `Subject: ...`, "
                "a blank line, then the body"
            )
        if end is None:
            raise TemplateError(
                f"{where}: no blank line after the header lines; put one between "
                "`Subject: ...` and the body"
            )
        header = kept[: end - 1]
        return "\n".join(header), "\n".join([*header, self._separator, *lines[end:]])

    def _compile_one(self, env: jinja2.Environment, source: str, file: str) -> jinja2.Template:
        try:
            code = env.compile(source, name=file, filename=self.prefix + file)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{self.prefix}{file}:{exc.lineno}: {exc.message}") from None
        template = env.template_class.from_code(env, code, env.make_globals(None), None)
        template._mailer_ast = env.parse(source)  # type: ignore[attr-defined]
        # Jinja flattens its ChainMap of globals on every render (most of a short render's
        # cost); flattened once here instead, see _render_template.
        template._mailer_globals = dict(template.globals)  # type: ignore[attr-defined]
        return template

    # ---- rendering

    def choose_language(self, *, requested: str | None, default: str) -> tuple[str, str, bool]:
        """(language used, language asked for, whether that is a fallback)."""
        wanted = (requested or "").strip() or default
        for candidate in (wanted, default, FALLBACK_LANGUAGE):
            found = self._lookup(candidate)
            if found is not None:
                return found, wanted, found != self._lookup(wanted)
        # No en variant and neither requested nor default: any variant beats no letter,
        # but it is a fallback and check reports it.
        first = self.languages[0]
        return first, wanted, True

    def _lookup(self, language: str) -> str | None:
        key = language.strip().lower().replace("_", "-")
        if not key:
            return None
        found = self._by_key.get(key)
        if found is None and "-" in key:
            found = self._by_key.get(key.split("-", 1)[0])
        return found

    def render(
        self,
        *,
        recipient: Recipient,
        campaign: CampaignView,
        unsubscribe_url: str | None,
        unsubscribe_mailto: str,
        today: dt.date,
    ) -> Rendered:
        language, requested, fell_back = self.choose_language(
            requested=recipient.contact.language, default=campaign.default_language
        )
        variant = self._variants[language]
        _reset_budget()  # per letter: its text and HTML versions share the budget
        partner = recipient.partnerships[0] if recipient.partnerships else None
        contact = recipient.contact
        greeting = greeting_for(
            language=language,
            contact_language=contact.language,
            salutation=contact.salutation,
            title=contact.title,
            name=contact.name,
            attributes=contact.attributes,
            tags=contact.tags,
        )
        context = {
            "contact": contact,
            "greeting": greeting,
            "city": recipient.city,
            "partnerships": recipient.partnerships,
            "partner": partner,
            "signatory": partner.signatory if partner is not None else None,
            "signatories": recipient.signatories,
            "campaign": campaign,
            "unsubscribe_url": unsubscribe_url,
            "unsubscribe_mailto": unsubscribe_mailto,
            "today": today,
            "first_letter": recipient.first_letter,
            "previous_letter": recipient.previous_letter,
        }
        output = self._run(variant.text, context, variant.text_file)
        subject, found, body = output.partition(self._separator)
        if not found:
            raise RenderProblem(
                "the header section swallowed the blank line before the body "
                "(a block opened on a header line must close there)",
                file=self.prefix + variant.text_file,
                line=None,
            )
        # A `{%-` opening the body may have eaten the newline that follows the separator.
        body = body.removeprefix("\n")
        html = None
        if variant.html is not None and variant.html_file is not None:
            html = self._run(variant.html, context, variant.html_file)
            if variant.html_split:
                _, found, html = html.partition(self._separator)
                if not found:
                    raise RenderProblem(
                        "the header section swallowed the blank line before the body",
                        file=self.prefix + variant.html_file,
                        line=None,
                    )
                html = html.removeprefix("\n")
        return Rendered(
            language=language,
            requested_language=requested,
            fell_back=fell_back,
            # Line breaks (CR, LF, U+2028...) in contact data must never reach a header.
            subject=" ".join(subject.split()),
            headers={},
            text=body.replace("\r\n", "\n").replace("\r", "\n"),
            html=html,
            generic_greeting=variant.uses_greeting
            and isinstance(greeting, Greeting)
            and greeting.generic,
        )

    def _run(self, template: jinja2.Template, context: dict[str, Any], file: str) -> str:
        try:
            return _render_template(template, context)
        except _Missing as exc:
            line = _template_line(exc, self.prefix + file)
            raise MissingFieldError(
                field=_field_name(exc, context, template, line),
                file=self.prefix + file,
                line=line,
            ) from None
        except _NonePrinted as exc:
            line = _template_line(exc, self.prefix + file)
            name = _none_field(template, line, context)
            raise MissingFieldError(field=name, file=self.prefix + file, line=line) from None
        except _TooLarge as exc:
            line = _template_line(exc, self.prefix + file)
            raise LetterTooLarge(
                f"the letter would be larger than {MAX_LETTER_CHARS:,} characters, the limit "
                f"for one letter ({exc})",
                file=self.prefix + file,
                line=line,
            ) from None
        except SecurityError as exc:
            line = _template_line(exc, self.prefix + file)
            raise TemplateSecurityError(
                f"unsafe template code refused by the sandbox: {exc}",
                file=self.prefix + file,
                line=line,
            ) from None
        except TemplateError:
            raise
        except Exception as exc:
            line = _template_line(exc, self.prefix + file)
            raise RenderProblem(
                f"{type(exc).__name__}: {exc}", file=self.prefix + file, line=line
            ) from None


def _render_template(template: jinja2.Template, context: dict[str, Any]) -> str:
    """`template.render(context)` without re-flattening the globals for every letter, and
    stopped as soon as its output passes MAX_LETTER_CHARS (it streams: nothing larger exists)."""
    env = template.environment
    globals_: dict[str, Any] = template._mailer_globals  # type: ignore[attr-defined]
    ctx = env.context_class(
        env, {**globals_, **context}, template.name, template.blocks, globals=globals_
    )
    pieces: list[str] = []
    append = pieces.append
    size = 0
    try:
        output: Generator[str, None, None] = template.root_render_func(ctx)  # type: ignore[assignment]
        for piece in output:
            size += len(piece)
            if size > MAX_LETTER_CHARS:
                # Raised where the template stands, so the error names its line.
                output.throw(_TooLarge(f"more than {MAX_LETTER_CHARS:,} characters of output"))
            append(piece)
        return "".join(pieces)
    except Exception:
        # Rewrites the traceback to template lines (as Template.render does), then raises.
        env.handle_exception()


def _uses_name(template: jinja2.Template, name: str) -> bool:
    tree: nodes.Template = template._mailer_ast  # type: ignore[attr-defined]
    return any(node.name == name for node in tree.find_all(nodes.Name))


def _has_header_section(source: str) -> bool:
    """Whether a file starts with header lines (`Subject: ...`), after any Jinja statements."""
    inside: str | None = None
    for line in source.splitlines():
        stripped = line.strip()
        if inside is not None:
            if inside in line:
                inside = None
            continue
        if stripped[:2] in ("{%", "{#"):
            closer = "%}" if stripped[:2] == "{%" else "#}"
            if closer not in stripped:
                inside = closer
            continue
        match = _HEADER_RE.match(line)
        return match is not None and match.group(1).lower() == "subject"
    return False


def _template_line(exc: BaseException, filename: str) -> int | None:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _walk_context(context: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(dotted path, object) for every object a template can reach by name, shallow first."""
    stack: list[tuple[str, Any]] = [
        (name, context[name])
        for name in (
            "contact",
            "city",
            "signatory",
            "partner",
            "campaign",
            "partnerships",
            "signatories",
            "first_letter",
            "previous_letter",
        )
    ]
    seen: set[int] = set()
    while stack:
        path, obj = stack.pop(0)
        if obj is None or isinstance(obj, str | int | float | dt.date) or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield path, obj
        if isinstance(obj, tuple | list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(obj))
        elif isinstance(obj, Mapping):
            stack.extend((f"{path}.{key}", value) for key, value in obj.items())
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(
                (f"{path}.{name}", getattr(obj, name)) for name in obj.__dataclass_fields__
            )


def _field_name(
    exc: _Missing, context: Mapping[str, Any], template: jinja2.Template, line: int | None
) -> str:
    name = exc.name or "?"
    if exc.obj is jinja2.utils.missing:
        return name
    if exc.obj is None:
        # `city.name` when there is no city: find the expression whose base is None.
        tree: nodes.Template = template._mailer_ast  # type: ignore[attr-defined]
        for node in tree.find_all(nodes.Getattr):
            if node.attr != name or (line and node.lineno != line):
                continue
            base = _dotted(node.node)
            if base and _resolve(base, context) == (True, None):
                return f"{base}.{name}"
        return name
    for path, obj in _walk_context(context):
        if obj is exc.obj:
            return f"{path}.{name}"
    return name


def _dotted(node: nodes.Node) -> str | None:
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Getattr):
        base = _dotted(node.node)
        return f"{base}.{node.attr}" if base else None
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        base = _dotted(node.node)
        return f"{base}.{node.arg.value}" if base else None
    return None


def _resolve(path: str, context: Mapping[str, Any]) -> tuple[bool, Any]:
    head, *rest = path.split(".")
    if head not in context:
        return False, None
    value = context[head]
    for part in rest:
        if isinstance(value, Mapping):
            if part not in value:
                return False, None
            value = value[part]
        elif hasattr(value, part):
            value = getattr(value, part)
        else:
            return False, None
    return True, value


def _none_field(template: jinja2.Template, line: int | None, context: Mapping[str, Any]) -> str:
    """The printed expression on `line` that is None (only computed on failure, so it may be slow)."""
    tree: nodes.Template = template._mailer_ast  # type: ignore[attr-defined]
    candidates: list[str] = []
    for output in tree.find_all(nodes.Output):
        for expr in output.nodes:
            if isinstance(expr, nodes.TemplateData) or (line and expr.lineno != line):
                continue
            dotted = _dotted(expr)
            if dotted:
                candidates.append(dotted)
    for dotted in candidates:
        found, value = _resolve(dotted, context)
        if found and value is None:
            return dotted
    # A loop variable (`p.note`) is not in the context: name it as the template writes it.
    return candidates[0] if candidates else "a value printed here"


_LEFTOVER = re.compile(r"\{[{%#]")


def leftover_markup(text: str) -> str | None:
    """The first unrendered `{{`, `{%` or `{#` in output, with some context, or None."""
    found = _LEFTOVER.search(text)
    if found is None:
        return None
    index = found.start()
    return text[max(0, index - 10) : index + 20].replace("\n", " ")


def normalise_sources(sources: Mapping[str, Any]) -> dict[str, str]:
    """A frozen copy from the database, checked to be {file: text}."""
    result: dict[str, str] = {}
    for key, value in sources.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TemplateError(f"frozen template source {key!r} is not text")
        result[key] = value
    return result


def template_names(templates_dir: Path) -> list[str]:
    if not templates_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in templates_dir.iterdir()
        if p.is_dir() and any(f.name.endswith(TEXT_SUFFIX) for f in p.iterdir())
    )


def load_template_set(templates_dir: Path, name: str) -> TemplateSet:
    """The template `templates_dir/NAME/`, compiled (syntax errors name file and line)."""
    available = template_names(templates_dir)
    if name not in available:
        listing = ", ".join(available) if available else "none"
        raise NotFoundError(
            f"no template {name!r} in {templates_dir} (available: {listing}); "
            f"a template is a folder {templates_dir}/NAME/ with LANG.txt.j2 files"
        )
    return TemplateSet.from_directory(templates_dir / name, name=name)
