"""Public holidays of a country (the ``holidays`` package), as ``routers.schedule`` closes them.

A public holiday closes all day. The package's HALF_DAY category means different things per
country (China: for some groups; Estonia: three hours shorter), so it counts only where the
names say when the holiday begins: Turkey and Iceland, 13:00 (Turkey's arife of Ramazan and
Kurban Bayramı and 28 October; public offices close at 13:00). Names are in the country's
language ("Kurban Bayramı"), not the process locale.
"""

from datetime import date
from functools import lru_cache

#: the minute from which a country's HALF_DAY holidays close
HALF_DAY_FROM = {"TR": 13 * 60, "IS": 13 * 60}


def check_country(code: str) -> str:
    """``code`` in canonical form ("TR", "DE-BY"), or ValueError if the holidays package
    has no calendar for it."""
    import holidays  # here, not at the top: ~0.1 s that loading settings needs only for this

    country, dash, subdiv = code.strip().upper().partition("-")
    subdivs = holidays.list_supported_countries(include_aliases=False).get(country)
    if subdivs is None:
        raise ValueError(f"unknown holiday country {code!r} (ISO 3166-1 alpha-2, e.g. TR)")
    known = [name for name in subdivs if name.upper() == subdiv]
    if dash and not known:
        raise ValueError(f"unknown subdivision {code!r} ({country}: {', '.join(subdivs)})")
    return f"{country}-{known[0]}" if dash else country


@lru_cache(maxsize=1024)
def holidays_of(country: str, year: int) -> dict[date, tuple[str, int | None]]:
    """A country's holidays of a year, built once: date -> (name, None for a whole day or
    the minute a half day begins). A public holiday wins over a half day."""
    import holidays

    code, _, subdiv = country.partition("-")
    language = holidays.country_holidays(code).default_language  # not the process locale
    half = HALF_DAY_FROM.get(code)
    out: dict[date, tuple[str, int | None]] = {}
    for category in (holidays.HALF_DAY,) * (half is not None) + (holidays.PUBLIC,):
        begins = half if category == holidays.HALF_DAY else None
        found = holidays.country_holidays(
            code, subdiv or None, years=year, categories=category, language=language
        )
        out.update((day, (name, begins)) for day, name in found.items())
    return out
