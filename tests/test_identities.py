"""Identity normalisation: every spelling of one address compares equal, and normalising
twice changes nothing (the router normalises again what connectors already normalised)."""

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.identities import (
    InvalidIdentity,
    hidden_character,
    is_withheld_caller,
    normalise_email,
    normalise_handle,
    normalise_phone,
    normalise_twitter,
    redact,
)


@pytest.mark.parametrize(
    "written",
    [
        "0532 111 22 33",
        "+90 (532) 111-2233",
        "905321112233",
        "0090 532 111 22 33",
        "tel:+905321112233",
        "+90-532-111-22-33",
    ],
)
def test_turkish_number_in_any_format_is_one_e164(written: str) -> None:
    """Customers and connectors write the same number many ways; the directory holds one."""
    assert normalise_phone(written, "TR") == "+905321112233"


def test_region_decides_national_numbers() -> None:
    assert normalise_phone("(415) 555-0100", "US") == "+14155550100"
    assert normalise_phone("+1 415 555 0100", "TR") == "+14155550100"


@pytest.mark.parametrize(
    "address", ["client:alice", "sip:bob@pbx.example.com", "ACME", "anonymous"]
)
def test_non_numbers_stay_readable(address: str) -> None:
    """Twilio clients, SIP URIs and alphanumeric sender ids are identities, not crashes."""
    assert normalise_phone(address, "TR") == address


@pytest.mark.parametrize("bad", ["", "   ", "12", "+0", "hello; drop", "x" * 40])
def test_garbage_is_rejected_with_a_clear_error(bad: str) -> None:
    with pytest.raises(InvalidIdentity):
        normalise_phone(bad, "TR")


def test_withheld_callers_are_recognised() -> None:
    for caller in ("anonymous", "Restricted", "+266696687", ""):
        assert is_withheld_caller(caller)
    assert not is_withheld_caller("+905321112233")


def test_email_is_case_folded_and_unwrapped() -> None:
    assert normalise_email(" <Ayse.Yilmaz@Example.COM> ") == "ayse.yilmaz@example.com"
    assert normalise_email("mailto:Bob@x.org") == "bob@x.org"
    for bad in ("no-at-sign", "a@@b", "a b@c", "@x", "x@"):
        with pytest.raises(InvalidIdentity):
            normalise_email(bad)


def test_handles_and_user_ids() -> None:
    assert normalise_handle("@AcmeSupport") == "acmesupport"
    assert normalise_twitter("@AcmeSupport") == "acmesupport"
    assert normalise_twitter("1234567890") == "1234567890"  # an all-digit handle
    assert normalise_twitter("id:1234567890") == "id:1234567890"
    with pytest.raises(InvalidIdentity):
        normalise_handle("not a handle!")


def test_redaction_keeps_identities_apart_but_unreadable() -> None:
    assert redact("ayse@example.com") == "a***@example.com"
    assert redact("+905321112233") == "***2233"


@given(st.text(max_size=40))
def test_phone_normalisation_is_idempotent(text: str) -> None:
    try:
        once = normalise_phone(text, "TR")
    except InvalidIdentity:
        return
    assert normalise_phone(once, "TR") == once


@given(st.from_regex(r"\+?[0-9 ()\-]{6,20}", fullmatch=True), st.sampled_from(["TR", "US", "DE"]))
def test_dialable_numbers_are_idempotent(text: str, region: str) -> None:
    try:
        once = normalise_phone(text, region)
    except InvalidIdentity:
        return
    assert normalise_phone(once, region) == once


@given(st.emails())
def test_email_normalisation_is_idempotent(address: str) -> None:
    once = normalise_email(address)
    assert normalise_email(once) == once


@given(st.from_regex(r"@?[A-Za-z0-9_]{1,15}", fullmatch=True))
def test_handle_normalisation_is_idempotent(handle: str) -> None:
    once = normalise_twitter(handle)
    assert normalise_twitter(once) == once


INVISIBLE = [
    *"\u200b\u200c\u200d\u2060\ufeff",  # zero-width space, non-joiner, joiner; word joiner; BOM
    *"\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f",  # bidi controls
    "\u00ad",  # soft hyphen: any other Cf
    "\x07",  # bell: any Cc
]


@pytest.mark.parametrize("char", INVISIBLE)
def test_invisible_and_control_characters_are_no_identity(char: str) -> None:
    """An address with a hidden character would be a look-alike second identity."""
    code = f"U+{ord(char):04X}"
    for normalise, text in (
        (normalise_email, f"ayse@acme.test{char}"),
        (normalise_email, f"ay{char}se@acme.test"),
        (lambda t: normalise_phone(t, "TR"), f"client:ay{char}se"),
        (lambda t: normalise_phone(t, "TR"), f"sip:desk@pbx.test{char}"),
        (normalise_twitter, f"ay{char}se"),
        (normalise_handle, f"@ayse{char}"),
    ):
        with pytest.raises(InvalidIdentity, match=re.escape(f"invisible character ({code}")):
            normalise(text)


def test_hidden_character_ascii_fast_path_agrees_with_the_unicode_categories() -> None:
    """Printable ASCII skips the per-character walk: every ASCII character, alone and inside
    text, is found exactly when its category is Cc or Cf; non-ASCII still walks."""
    for char in map(chr, range(128)):
        hidden = unicodedata.category(char) in ("Cc", "Cf")
        assert (hidden_character(char) is not None) == hidden, repr(char)
        assert (hidden_character(f"ay{char}se@acme.test") is not None) == hidden, repr(char)
    assert hidden_character("ayşe@acme.test") is None
    assert hidden_character("ayşe\u200b@acme.test") == "U+200B ZERO WIDTH SPACE"
