"""Identity normalisation shared by the router, the directory importer and every connector.

Sole purpose: two spellings of one person's address compare equal after normalisation,
and normalising twice changes nothing. Phone numbers go to E.164 with ``phonenumbers``;
what is not a phone number (``client:alice``, ``sip:…``, alphanumeric sender ids) stays a
readable, stable identity instead of an error. An invisible or control character (Unicode
Cc/Cf: zero-width, bidi controls) makes any address invalid: it would be a look-alike.
"""

import functools
import re
import unicodedata
from typing import Literal

import phonenumbers

IdentityKind = Literal["email", "phone", "twitter"]

_SPACE = re.compile(r"\s")
_HANDLE = re.compile(r"^@?([A-Za-z0-9_]{1,15})$")
_USER_ID = re.compile(r"^id:([0-9]{1,20})$")
_WITHHELD = frozenset(
    {"anonymous", "restricted", "unknown", "private", "unavailable", "withheld", "266696687"}
)


class InvalidIdentity(ValueError):
    """The text cannot be read as an identity of the asked kind."""


def hidden_character(text: str) -> str | None:
    """The first invisible or control character in ``text`` (``U+200B ZERO WIDTH SPACE``),
    else None.

    Unicode categories Cc and Cf: controls, zero-width space/joiners (U+200B-U+200D,
    U+2060), the BOM (U+FEFF), bidi marks and overrides (U+200E/F, U+202A-U+202E,
    U+2066-U+2069). None belongs in an address, and ``ayse@acme.test`` followed by a
    zero-width space would otherwise be a second identity that looks like the first."""
    if text.isascii() and text.isprintable():
        return None  # ASCII has no Cf, and its Cc are exactly what is not printable
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf"):
            name = unicodedata.name(char, "control character")
            return f"U+{ord(char):04X} {name}"
    return None


def _refuse_hidden(text: str, what: str) -> None:
    found = hidden_character(text)
    if found is not None:
        raise InvalidIdentity(f"{what} {text!r} contains an invisible character ({found})")


@functools.lru_cache(maxsize=65536)
def normalise_email(address: str) -> str:
    """Case-fold the whole address: mailbox local parts are case-insensitive in practice.

    Cached: the router normalises each sender twice (the message, then the directory
    lookup), and the same senders come back."""
    text = address.strip().strip("<>").strip()
    _refuse_hidden(text, "email address")
    if text.lower().startswith("mailto:"):
        text = text[7:]
    if text.count("@") != 1 or _SPACE.search(text):
        raise InvalidIdentity(f"not an email address: {address!r}")
    local, domain = text.split("@")
    if not local or not domain:
        raise InvalidIdentity(f"not an email address: {address!r}")
    return f"{local}@{domain}".casefold()


def is_withheld_caller(address: str) -> bool:
    """True for the caller ids carriers send when the number is hidden."""
    digits = address.strip().lstrip("+")
    return address.strip().casefold() in _WITHHELD or digits in _WITHHELD or digits == ""


@functools.lru_cache(maxsize=65536)
def normalise_phone(address: str, region: str) -> str:
    """Return E.164 for a dialable number, else a stable readable form.

    ``0532 111 22 33``, ``+90 (532) 111-2233`` and ``905321112233`` are one number in
    region TR. A SIP URI or Twilio client identity is kept, lower-cased in its scheme;
    an alphanumeric sender id is kept as written, trimmed.

    Cached: ``phonenumbers.parse`` costs more than the rest of a caller-ID decision, and
    the same callers and numbers come back (an invalid one raises each time).
    """
    text = address.strip()
    if not text:
        raise InvalidIdentity("empty phone number")
    _refuse_hidden(text, "phone number")
    lowered = text.casefold()
    for scheme in ("client:", "sip:", "sips:", "tel:"):
        if lowered.startswith(scheme):
            if scheme == "tel:":
                return normalise_phone(text[4:], region)
            return scheme + text[len(scheme) :]
    if text.startswith("+") or any(c.isdigit() for c in text):
        if not re.fullmatch(r"[+0-9 ().\-/]+", text):
            if re.fullmatch(r"[A-Za-z0-9 ]{1,11}", text):
                return text  # alphanumeric sender id, e.g. "ACME123"
            raise InvalidIdentity(f"not a phone number: {address!r}")
        for candidate, parsed in _phone_candidates(text, region):
            valid = parsed is not None
            if parsed is None:
                try:
                    parsed = phonenumbers.parse(candidate, region)
                except phonenumbers.NumberParseException:
                    continue
            if phonenumbers.is_possible_number(parsed):
                e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
                # "+digits" formatted to itself was just parsed as _is_fixed_point would
                # (a leading "+" makes the region irrelevant); a valid number's E.164 reads
                # back as itself (no prefix of it is stripped as national): no second parse
                if valid or e164 == candidate or _is_fixed_point(e164):
                    return e164
        raise InvalidIdentity(f"not a phone number: {address!r}")
    if re.fullmatch(r"[A-Za-z0-9 ]{1,11}", text):
        return text
    raise InvalidIdentity(f"not a phone number: {address!r}")


def _is_fixed_point(e164: str) -> bool:
    """Some impossible national prefixes lose digits on formatting; such a reading is not a
    stable identity, so it is refused rather than stored."""
    try:
        again = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.format_number(again, phonenumbers.PhoneNumberFormat.E164) == e164


def _phone_candidates(
    text: str, region: str
) -> list[tuple[str, phonenumbers.PhoneNumber | None]]:
    """The number as written, then as international when it carries a country code bare;
    each with its parse when already made and valid (None: parse it).

    ``905321112233`` in region TR is the international form without ``+``; a valid
    national reading wins, so only numbers invalid as national are retried with ``+``.
    """
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        return [("+" + digits, None)]
    if text.startswith("00"):
        return [("+" + digits[2:], None)]
    out: list[tuple[str, phonenumbers.PhoneNumber | None]] = []
    try:
        national = phonenumbers.parse(digits, region)
        if phonenumbers.is_valid_number(national):
            return [(digits, national)]  # parsing is deterministic: reuse this one
    except phonenumbers.NumberParseException:
        pass
    out.append(("+" + digits, None))
    out.append((digits, None))
    return out


def normalise_handle(handle: str) -> str:
    """An X handle without ``@``, case-folded (X handles are case-insensitive)."""
    _refuse_hidden(handle.strip(), "X handle")
    match = _HANDLE.match(handle.strip())
    if not match:
        raise InvalidIdentity(f"not an X handle: {handle!r}")
    return match.group(1).casefold()


def normalise_twitter(address: str) -> str:
    """An X user id as ``id:<digits>``; anything else as a handle.

    User ids are stable across handle changes, so the directory matches them first. Only
    the ``id:`` prefix marks a user id: a handle may be all digits, and normalising twice
    must not turn it into an id.
    """
    text = address.strip()
    _refuse_hidden(text, "X user id or handle")
    if text.casefold().startswith("id:"):
        match = _USER_ID.match("id:" + text[3:].strip())
        if not match:
            raise InvalidIdentity(f"not an X user id: {address!r}")
        return "id:" + match.group(1)
    return normalise_handle(text)


def normalise(kind: IdentityKind, address: str, region: str) -> str:
    """Normalise ``address`` as an identity of ``kind``; raises ``InvalidIdentity``."""
    if kind == "email":
        return normalise_email(address)
    if kind == "phone":
        return normalise_phone(address, region)
    return normalise_twitter(address)


def redact(address: str) -> str:
    """A log-safe form that still lets an operator tell two identities apart."""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    if len(address) > 4:
        return "***" + address[-4:]
    return "***"
