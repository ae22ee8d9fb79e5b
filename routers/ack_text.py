"""The words of an acknowledgement (issue 16): templates in Turkish and English shipped with
omniroute, an operator's own before them, and ``{opens_at}`` in the customer's language.

A template is a UTF-8 text file named ``[<channel>.]<language>[.closed].txt``: the most
specific one wins, and every file of ``ack.templates`` is searched before the shipped ones
(``routers/ack_templates/``), so an operator's ``tr.txt`` answers every channel in Turkish.
``.closed`` templates are used while the team the message went to is closed (the route has
``opens_at``); without one, the open template is used. Placeholders: ``{customer_name}``,
``{team_name}``, ``{reference}``, and in ``.closed`` templates ``{opens_at}``; ``{{`` and
``}}`` are literal braces. Every file is checked when loaded, so a typo stops the start or
the reload with one line instead of reaching a customer.
"""

import re
import string
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

from ingest.errors import ConfigError
from ingest.schema import Channel

PLACEHOLDERS = ("customer_name", "team_name", "reference", "opens_at")
#: a template longer than this is a mistake (an SMS is split past 70-160 characters)
MAX_CHARS = 4000
_NAME = re.compile(
    r"^(?:(?P<channel>email|sms|whatsapp|twitter)\.)?(?P<language>[a-z]{2,3})"
    r"(?P<closed>\.closed)?\.txt$"
)
_DAYS = {
    "tr": ("Pazartesi", "Salı", "Çarşamba", "Perşembe", "Cuma", "Cumartesi", "Pazar"),
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
}
_MONTHS = {
    "tr": ("Ocak", "Şubat", "Mart", "Nisan", "Mayıs", "Haziran", "Temmuz", "Ağustos",
           "Eylül", "Ekim", "Kasım", "Aralık"),
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
}  # fmt: skip
_TODAY = {"tr": ("bugün", "yarın"), "en": ("today", "tomorrow")}
#: what a placeholder says when the directory has nothing for it
_UNNAMED = {
    "tr": {"customer_name": "değerli müşterimiz", "team_name": "destek ekibimiz"},
    "en": {"customer_name": "there", "team_name": "our support team"},
}


@dataclass(frozen=True)
class Words:
    """What fills a template's placeholders; None: the language's stand-in."""

    customer_name: str | None
    team_name: str | None
    reference: str
    opens_at: datetime | None


class Templates:
    """Every template found, by file name; ``render`` picks and fills one."""

    def __init__(self, operator: dict[str, str], shipped: dict[str, str]) -> None:
        self._operator = operator
        self._shipped = shipped

    def pick(self, channel: Channel, language: str, closed: bool) -> str | None:
        """The most specific template for the message, the operator's before ours."""
        names = [f"{channel}.{language}.txt", f"{language}.txt"]
        if closed:
            names = [f"{channel}.{language}.closed.txt", f"{language}.closed.txt", *names]
        for found in (self._operator, self._shipped):
            for name in names:
                if name in found:
                    return found[name]
        return None

    def render(
        self, channel: Channel, language: str, words: Words, now: datetime, *, fallback: str
    ) -> str:
        """The filled template in ``language``, else (no template of that language for the
        channel) in ``fallback``, which the shipped templates always have."""
        closed = words.opens_at is not None
        text = self.pick(channel, language, closed)
        if text is None:
            language = fallback
            text = self.pick(channel, language, closed)
        if text is None:
            raise ConfigError(f"ack: no template for {channel} in {language!r}")
        unnamed = _UNNAMED.get(language, _UNNAMED["en"])
        values = {
            "customer_name": words.customer_name or unnamed["customer_name"],
            "team_name": words.team_name or unnamed["team_name"],
            "reference": words.reference,
            "opens_at": opens_at_text(words.opens_at, language, now) if words.opens_at else "",
        }
        return text.format_map(values).strip()


def load(directory: Path | None) -> Templates:
    """The shipped templates and the operator's (``ack.templates``), all checked; a bad one
    is a ``ConfigError`` naming the file and the problem in one line."""
    shipped_dir = resources.files("routers") / "ack_templates"
    shipped = {
        entry.name: _checked(entry.name, entry.read_text(encoding="utf-8"), "shipped")
        for entry in shipped_dir.iterdir()
        if entry.name.endswith(".txt")
    }
    operator: dict[str, str] = {}
    if directory is not None:
        if not directory.is_dir():
            raise ConfigError(f"ack.templates: {directory} is not a directory")
        for path in sorted(directory.iterdir()):
            if path.suffix != ".txt":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"ack.templates: {path.name}: unreadable ({exc})") from exc
            operator[path.name] = _checked(path.name, text, "ack.templates")
    return Templates(operator, shipped)


def _checked(name: str, text: str, where: str) -> str:
    """The template, if its name and placeholders are ones ``render`` can fill."""
    match = _NAME.match(name)
    if match is None:
        raise ConfigError(
            f"{where}: {name}: not a template name ([<channel>.]<language>[.closed].txt)"
        )
    if not text.strip():
        raise ConfigError(f"{where}: {name}: empty")
    if len(text) > MAX_CHARS:
        raise ConfigError(f"{where}: {name}: longer than {MAX_CHARS} characters")
    allowed = set(PLACEHOLDERS) if match["closed"] else set(PLACEHOLDERS) - {"opens_at"}
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{where}: {name}: {exc} (write {{{{ and }}}} for braces)") from exc
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in allowed or spec or conversion:
            known = ", ".join("{" + p + "}" for p in sorted(allowed))
            hint = " ({opens_at} only in .closed templates)" if field == "opens_at" else ""
            raise ConfigError(
                f"{where}: {name}: unknown placeholder {{{field[:40]}}}{hint}; known: {known}"
            )
    return text


def opens_at_text(at: datetime, language: str, now: datetime) -> str:
    """When a closed team opens, in the team's own time zone and the customer's language:
    "yarın 09:00", "Pazartesi 09:00", or with the date from a week on ("12 Ocak Pazartesi
    09:00"). Languages without day names here get ISO 8601."""
    days, months = _DAYS.get(language), _MONTHS.get(language)
    if days is None or months is None:
        return at.strftime("%Y-%m-%d %H:%M")
    today = now.astimezone(at.tzinfo).date()
    clock = at.strftime("%H:%M")
    ahead = (at.date() - today).days
    if ahead in (0, 1):
        return f"{_TODAY[language][ahead]} {clock}"
    day = days[at.weekday()]
    if ahead < 7:
        return f"{day} {clock}"
    month = months[at.month - 1]
    if language == "tr":
        return f"{at.day} {month} {day} {clock}"
    return f"{day} {at.day} {month} {clock}"
