"""Letters by shape: render one letter per shape and build the others from it, exactly.

`check` must see every letter of a campaign, and most letters of a campaign differ only in what
the template prints unexamined: a name, an address, a city. `LetterShapes.render` gives the same
`Rendered` as `TemplateSet.render` for every recipient, rendering only one letter per *shape*:

- A letter's context is cut into values (the contact's fields and attributes, the greeting's
  parts, the city's fields, the partnerships, the partner, the signatory, the signatories, the
  unsubscribe URL). Per template variant, each value is either *looked at* or not; at first
  none is.
- A shape is the variant plus every looked-at value, and None-ness of the others (None prints
  as an error, never as text). For a shape not seen before, the letter is rendered with a
  stand-in (render.StandIn) for each value not looked at: a stand-in prints as a unique token,
  and any other use of it (str(), comparison, truth, hashing, length, iteration, an attribute,
  an isinstance check, a filter, its printed token captured in a buffer such as a macro's
  output) is recorded and refused. If any stand-in was used so, those values are looked at from
  now on for this variant and the shape is tried again (a value is added at most once).
- A render that used no stand-in beyond printing proves its shape: Jinja's execution depends
  only on the context, the stand-ins' values never took part in it, so for every recipient of
  the shape the template runs the same steps and prints that recipient's value (`str(value)`,
  or its HTML escape in an HTML variant) where the token stands. The letter is built by putting
  the values in the tokens' places, then cut and checked exactly as a rendered one.
- Rendered one by one instead (the letter itself, never a shape): a variant that includes,
  imports or extends other files, switches autoescaping or tests identity (`sameas`); a
  recipient whose greeting cannot print; a shape whose render raised (the error is then the
  real letter's, with its file and line); a built letter over the size limit (rendered to
  raise the size error where the template stands); a follow-up's letter (its thread is not
  among the values above).

So every letter is rendered, or is character for character the one rendering would give.
Pure rendering: knows nothing of the database. Must not import compose, check or engine.
"""

from __future__ import annotations

import datetime as dt
import secrets
import types
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import escape

from mailer import render as render_mod
from mailer.greetings import Greeting
from mailer.render import (
    MAX_LETTER_CHARS,
    CampaignView,
    CityView,
    ContactView,
    Recipient,
    Rendered,
    StandIn,
    TemplateSet,
)

# The values of a letter's context, by number; attributes follow from _ATTRIBUTES on.
_LEAVES = (
    "contact.email",
    "contact.name",
    "contact.title",
    "contact.salutation",
    "contact.language",
    "contact.organisation",
    "contact.tags",
    "greeting.text",
    "greeting.address",
    "greeting.gender",
    "greeting.generic",
    "city.name",
    "city.country",
    "city.region",
    "city.name_uk",
    "partnerships",
    "partner",
    "signatory",
    "signatories",
    "unsubscribe_url",
)
_ATTRIBUTES = len(_LEAVES)
_CITY = _LEAVES.index("city.name")
_PARTNERSHIPS = _LEAVES.index("partnerships")

# In a shape's key, where a value stands in.
_OPEN = object()
# A key part for values compared as themselves (type included: 1, 1.0 and True are equal).
_PLAIN = (str, int, bool, type(None))


@dataclass(frozen=True, slots=True)
class _Shape:
    # A raw output as its literal pieces and, between each two, the number of a value.
    text: tuple[tuple[str, ...], tuple[int, ...]]
    html: tuple[tuple[str, ...], tuple[int, ...]] | None


class _Variant:
    """What is known of one template variant: the values it looks at, its shapes."""

    __slots__ = ("looked_at", "order", "shapes")

    def __init__(self) -> None:
        self.looked_at: set[int] = set()
        self.order: list[int] = []  # looked_at, sorted
        # key -> its shape, or None: its letters are rendered one by one.
        self.shapes: dict[Hashable, _Shape | None] = {}


class LetterShapes:
    """One campaign's letters, rendered by shape (see the module's docstring).

    `rendered` counts the letters rendered in full, `shapes` the shapes rendered (with stand-
    ins), `built` the letters built from a shape.
    """

    def __init__(
        self,
        template_set: TemplateSet,
        *,
        campaign: CampaignView,
        unsubscribe_mailto: str,
        today: dt.date,
    ) -> None:
        self.template_set = template_set
        self.campaign = campaign
        self.unsubscribe_mailto = unsubscribe_mailto
        self.today = today
        # Unguessable, so no contact data can hold a token.
        self._marker = f"\x00shape-{secrets.token_hex(12)}:"
        self._variants: dict[str, _Variant] = {}
        # Views compared by identity first (a loader shares them), then by value.
        self._by_id: dict[int, tuple[object, int]] = {}
        self._canonical: dict[object, int] = {}
        self._languages: dict[str | None, tuple[str, str, bool]] = {}
        self.rendered = 0
        self.shapes = 0
        self.built = 0

    # ---- one letter

    def render(self, recipient: Recipient, *, unsubscribe_url: str | None) -> Rendered:
        """Exactly what `TemplateSet.render` gives for this recipient."""
        templates = self.template_set
        contact = recipient.contact
        chosen = self._languages.get(contact.language)
        if chosen is None:
            chosen = self._languages[contact.language] = templates.choose_language(
                requested=contact.language, default=self.campaign.default_language
            )
        language, requested, fell_back = chosen
        variant = templates._variants[language]
        greeting = templates.greeting(contact, language)
        attributes = contact.attributes
        # A follow-up's letter quotes its thread (first_letter, previous_letter), which the
        # shape's context does not carry: such letters are rendered as they are.
        if (
            not variant.shapeable
            or type(greeting) is not Greeting
            or recipient.first_letter is not None
        ):
            return self._one_by_one(recipient, unsubscribe_url)
        partnerships = recipient.partnerships
        partner = partnerships[0] if partnerships else None
        city = recipient.city
        values: list[Any] = [
            contact.email,
            contact.name,
            contact.title,
            contact.salutation,
            contact.language,
            contact.organisation,
            contact.tags,
            greeting.text,
            greeting.address,
            greeting.gender,
            greeting.generic,
            city.name if city is not None else None,
            city.country if city is not None else None,
            city.region if city is not None else None,
            city.name_uk if city is not None else None,
            partnerships,
            partner,
            partner.signatory if partner is not None else None,
            recipient.signatories,
            unsubscribe_url,
            *attributes.values(),
        ]
        state = self._variants.get(language)
        if state is None:
            state = self._variants[language] = _Variant()
        structure = (language, city is None, tuple(attributes))
        for _ in range(len(values) + 1):
            key = (structure, self._key(state.order, values))
            if key in state.shapes:
                shape = state.shapes[key]
                break
            found = self._shape(state, variant, recipient, greeting, values)
            if found is _AGAIN:
                continue
            shape = state.shapes[key] = found if isinstance(found, _Shape) else None
            break
        else:  # pragma: no cover - every try looks at one more value, so it ends before
            shape = None
        if shape is None:
            return self._one_by_one(recipient, unsubscribe_url)
        text = _fill(shape.text, values, str)
        html = _fill(shape.html, values, _escaped) if shape.html is not None else None
        if len(text) > MAX_LETTER_CHARS or (html is not None and len(html) > MAX_LETTER_CHARS):
            # Rendered to raise the size error where the template stands.
            return self._one_by_one(recipient, unsubscribe_url)
        self.built += 1
        return templates._finish(
            variant,
            requested=requested,
            fell_back=fell_back,
            greeting=greeting,
            text=text,
            html=html,
        )

    def _one_by_one(self, recipient: Recipient, unsubscribe_url: str | None) -> Rendered:
        self.rendered += 1
        return self.template_set.render(
            recipient=recipient,
            campaign=self.campaign,
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=self.unsubscribe_mailto,
            today=self.today,
        )

    # ---- shapes

    def _key(self, looked_at: list[int], values: Sequence[Any]) -> tuple[Any, ...]:
        """Which values are None, and the values looked at (the others stand in)."""
        parts: list[Any] = [value is None for value in values]
        for index in looked_at:
            if index >= len(values):
                continue
            value = values[index]
            if value is None:
                continue
            if type(value) in _PLAIN:
                parts.append((index, type(value), value))
            elif _PARTNERSHIPS <= index < _ATTRIBUTES:
                parts.append((index, self._same(value)))
            else:
                # Tags, attributes of other types: compared as their repr, type and all.
                parts.append((index, type(value), repr(value)))
        return tuple(parts)

    def _same(self, view: object) -> int:
        """A number equal for equal views (a partnership, a tuple of them, a signatory)."""
        known = self._by_id.get(id(view))
        if known is not None and known[0] is view:
            return known[1]
        number = self._canonical.setdefault(view, len(self._canonical))
        self._by_id[id(view)] = (view, number)
        return number

    def _shape(
        self,
        state: _Variant,
        variant: Any,
        recipient: Recipient,
        greeting: Greeting,
        values: list[Any],
    ) -> _Shape | object:
        """The shape of this recipient's letter; _AGAIN when a stand-in was used (now looked
        at), _ONE_BY_ONE when rendering it failed."""
        marker = self._marker

        def stand(index: int) -> Any:
            value = values[index]
            if value is None or index in state.looked_at:
                return value
            return StandIn(index, f"{marker}{index}\x00")

        contact = recipient.contact
        n_attrs = len(values) - _ATTRIBUTES
        keys = tuple(contact.attributes)
        masked_contact = ContactView(
            email=stand(0),
            name=stand(1),
            title=stand(2),
            salutation=stand(3),
            language=stand(4),
            organisation=stand(5),
            tags=stand(6),
            attributes=types.MappingProxyType(
                {keys[i]: stand(_ATTRIBUTES + i) for i in range(n_attrs)}
            ),
        )
        masked_greeting = Greeting(
            text=stand(7), address=stand(8), gender=stand(9), generic=stand(10)
        )
        masked_city = (
            None
            if recipient.city is None
            else CityView(
                name=stand(_CITY),
                country=stand(_CITY + 1),
                region=stand(_CITY + 2),
                name_uk=stand(_CITY + 3),
            )
        )
        context = {
            "contact": masked_contact,
            "greeting": masked_greeting,
            "city": masked_city,
            "partnerships": stand(15),
            "partner": stand(16),
            "signatory": stand(17),
            "signatories": stand(18),
            "campaign": self.campaign,
            "unsubscribe_url": stand(19),
            "unsubscribe_mailto": self.unsubscribe_mailto,
            "today": self.today,
        }
        trace = render_mod._Trace(marker)
        render_mod._trace = trace
        outputs: tuple[str, str | None] | None
        try:
            outputs = self.template_set._outputs(variant, context)
        except Exception:
            outputs = None
        finally:
            render_mod._trace = None
        self.shapes += 1
        if trace.inspected:
            state.looked_at.update(trace.inspected)
            state.order = sorted(state.looked_at)
            return _AGAIN
        if outputs is None:
            return _ONE_BY_ONE
        text, html = outputs
        return _Shape(
            text=_pieces(text, trace), html=_pieces(html, trace) if html is not None else None
        )


_AGAIN = object()
_ONE_BY_ONE = object()


def _pieces(output: str, trace: render_mod._Trace) -> tuple[tuple[str, ...], tuple[int, ...]]:
    parts = trace.token.split(output)
    return tuple(parts[0::2]), tuple(int(n) for n in parts[1::2])


def _escaped(value: Any) -> str:
    return str(escape(value))


def _fill(
    shape: tuple[tuple[str, ...], tuple[int, ...]],
    values: Sequence[Any],
    printed: Callable[[Any], str],
) -> str:
    literals, numbers = shape
    if not numbers:
        return literals[0]
    out: list[str] = [""] * (2 * len(numbers) + 1)
    out[0::2] = literals
    out[1::2] = [printed(values[number]) for number in numbers]
    return "".join(out)
