"""normalise_phone's fast path (issue 18: one or two parses fewer per number) against the
algorithm it replaced, kept here as the reference: bit-identical answers on every phone
spelling the directory generator writes, every phone-like string in the tests, the test
data corpus and the example files, and on random dialable strings."""

import importlib.util
import random
import re
from pathlib import Path

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.identities import InvalidIdentity, _refuse_hidden, normalise_phone

ROOT = Path(__file__).parent.parent
REGIONS = ("TR", "US", "DE", "GB", "IT")
PHONE_LIKE = re.compile(r"(?:tel:|00|\+)?[0-9(][0-9 ().\-/]{4,24}[0-9]")


def reference(address: str, region: str) -> str:
    """normalise_phone before issue 18: three parses for a national number."""
    text = address.strip()
    if not text:
        raise InvalidIdentity("empty phone number")
    _refuse_hidden(text, "phone number")
    lowered = text.casefold()
    for scheme in ("client:", "sip:", "sips:", "tel:"):
        if lowered.startswith(scheme):
            if scheme == "tel:":
                return reference(text[4:], region)
            return scheme + text[len(scheme) :]
    if text.startswith("+") or any(c.isdigit() for c in text):
        if not re.fullmatch(r"[+0-9 ().\-/]+", text):
            if re.fullmatch(r"[A-Za-z0-9 ]{1,11}", text):
                return text
            raise InvalidIdentity(f"not a phone number: {address!r}")
        for candidate in _candidates(text, region):
            try:
                parsed = phonenumbers.parse(candidate, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_possible_number(parsed):
                e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
                if _fixed(e164):
                    return e164
        raise InvalidIdentity(f"not a phone number: {address!r}")
    if re.fullmatch(r"[A-Za-z0-9 ]{1,11}", text):
        return text
    raise InvalidIdentity(f"not a phone number: {address!r}")


def _fixed(e164: str) -> bool:
    try:
        again = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.format_number(again, phonenumbers.PhoneNumberFormat.E164) == e164


def _candidates(text: str, region: str) -> list[str]:
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        return ["+" + digits]
    if text.startswith("00"):
        return ["+" + digits[2:]]
    try:
        if phonenumbers.is_valid_number(phonenumbers.parse(digits, region)):
            return [digits]
    except phonenumbers.NumberParseException:
        pass
    return ["+" + digits, digits]


def outcome(fn: object, text: str, region: str) -> str:
    try:
        return fn(text, region)  # type: ignore[operator, no-any-return]
    except InvalidIdentity as exc:
        return f"InvalidIdentity: {exc}"


def same(texts: set[str], regions: tuple[str, ...] = REGIONS) -> None:
    normalise_phone.cache_clear()
    for region in regions:
        for text in sorted(texts):
            assert outcome(normalise_phone, text, region) == outcome(reference, text, region), (
                text,
                region,
            )


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "bench" / "gen_directory.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_spelling_the_directory_generator_writes() -> None:
    """The million-customer benchmark's numbers: Turkish in three spellings, US in two."""
    gen: object = _generator()
    rng = random.Random(18)
    phones: set[str] = set()
    for i in rng.sample(range(2_000_000), 1_000):
        row = gen.customer_row(i, rng, 20)  # type: ignore[attr-defined]
        phones.update(p for p in row[4].split(";") if p)
        for style in range(6):
            phones.add(gen._tr_phone(i, style))  # type: ignore[attr-defined]
            phones.add(gen._us_phone(i, style))  # type: ignore[attr-defined]
    phones.update(f"+90 212 555 {a:04d}" for a in range(200))  # the agents'
    same(phones, ("TR", "US"))


def test_every_phone_like_string_in_the_tests_corpus_and_examples() -> None:
    """The test tables, tests/data's mails and the example directory files."""
    texts: set[str] = set()
    files = [
        *ROOT.glob("tests/**/*.py"),
        *ROOT.glob("tests/data/**/*"),
        *ROOT.glob("config/examples/*.csv"),
    ]
    for path in files:
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            texts.update(m.group(0) for m in PHONE_LIKE.finditer(text))
            texts.update(re.findall(r"[\"']([^\"'\n]{1,40})[\"']", text))
    for part in list(texts):
        texts.update(p for p in part.split(";") if p.strip())
    assert len(texts) > 1_000
    same(texts)


@settings(max_examples=1_000, deadline=None)
@given(
    st.from_regex(r"(tel:|00|\+|0)?[0-9 ()\-.]{1,20}", fullmatch=True),
    st.sampled_from(REGIONS),
)
def test_random_dialable_strings(text: str, region: str) -> None:
    normalise_phone.cache_clear()
    assert outcome(normalise_phone, text, region) == outcome(reference, text, region)


def test_every_regions_example_numbers_in_national_and_bare_spellings() -> None:
    """A valid national reading is not parsed again from its E.164: phonenumbers' example
    number of every type for every region, written nationally and as bare digits, read in
    its own region and in Turkey's."""
    types = [t for t in vars(phonenumbers.PhoneNumberType).values() if isinstance(t, int)]
    national = phonenumbers.PhoneNumberFormat.NATIONAL
    normalise_phone.cache_clear()
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in types:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            written = phonenumbers.format_number(example, national)
            for text in (written, re.sub(r"\D", "", written)):
                for where in (region, "TR"):
                    got = outcome(normalise_phone, text, where)
                    assert got == outcome(reference, text, where), (text, where)


@pytest.mark.parametrize(
    ("text", "fewer"), [("+905321112233", 1), ("0532 111 22 33", 2), ("905321112233", 2)]
)
def test_the_fast_path_parses_less(
    text: str, fewer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer parses than the reference for each Turkish spelling: a valid national
    reading (the bare 90… one is, phonenumbers takes the country code off) is parsed once,
    not three times."""
    calls = {"n": 0}
    real = phonenumbers.parse

    def counting(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(phonenumbers, "parse", counting)
    normalise_phone.cache_clear()
    normalise_phone(text, "TR")
    ours = calls["n"]
    calls["n"] = 0
    reference(text, "TR")
    assert ours == calls["n"] - fewer
