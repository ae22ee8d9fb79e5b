"""Keyword matching for topic rules (issue 20), Turkish-aware and cheap on the hot path.

Sole purpose: say which of a rule set's keywords a message contains, in one pass over its
words whatever the number of rules.

- Case folding (``fold``): ``İ``, ``I``, ``ı`` and ``i`` are one letter, then Unicode case
  folding, on NFC text. Turkish writes ``FATURAMI`` for ``faturamı`` and ``İADE`` for
  ``iade``; English writes ``INVOICE`` for ``invoice``: both match, whichever the
  keyboard.
- A keyword matches at the start of a word and runs on to any ending: Turkish adds
  suffixes, so ``fatura`` matches ``Faturam``, ``FATURAMI``, ``faturası``. Never inside a
  word: ``ayar`` does not match ``kayar``. A word is a run of letters and digits
  (``\\w``); anything else separates words.
- A keyword of several words (``iade talebi``, ``e-fatura``) matches those words in order,
  separated by anything that is not a letter or digit, each word taking an ending.
- Only the first ``SCAN_LIMIT`` characters of the text are read (the subject always).
"""

import re
import unicodedata
from collections.abc import Iterable

#: characters of a message's text that keywords are looked for in (the subject besides)
SCAN_LIMIT = 20_000
_I = str.maketrans({"İ": "i", "I": "i", "ı": "i"})
_WORD = re.compile(r"\w+")


def fold(text: str) -> str:
    """``text`` in the one form keywords and messages are compared in (module docstring)."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text.translate(_I).casefold()


def words(keyword: str) -> tuple[str, ...]:
    """The folded words of a keyword; empty when it has none (punctuation only)."""
    return tuple(_WORD.findall(fold(keyword)))


def prefix_of(shorter: str, longer: str) -> bool:
    """Whether every text ``longer`` matches is matched by ``shorter`` too (both keywords):
    the same number of words, each of ``shorter``'s a start of ``longer``'s, or a one-word
    ``shorter`` that starts ``longer``'s first word."""
    a, b = words(shorter), words(longer)
    if len(a) == 1 and b:
        return b[0].startswith(a[0])
    return len(a) == len(b) and all(y.startswith(x) for x, y in zip(a, b, strict=True))


class KeywordIndex:
    """Every keyword of a rule set, numbered: ``ids(keywords)`` at load, ``found(text)`` per
    message (the numbers of the keywords the text contains)."""

    def __init__(self) -> None:
        self._single: dict[str, int] = {}  # one-word keyword -> its number
        self._lengths: list[int] = []  # the lengths of one-word keywords, longest first
        self._phrases: list[tuple[re.Pattern[str], int]] = []
        self._numbers: dict[tuple[str, ...], int] = {}

    def ids(self, keywords: Iterable[str]) -> frozenset[int]:
        """The numbers of ``keywords``, adding those not seen yet; ValueError for a keyword
        with no letter or digit."""
        out = set()
        for keyword in keywords:
            parts = words(keyword)
            if not parts:
                raise ValueError(f"keyword {keyword!r} has no letter or digit")
            number = self._numbers.get(parts)
            if number is None:
                number = self._numbers[parts] = len(self._numbers)
                if len(parts) == 1:
                    self._single[parts[0]] = number
                    self._lengths = sorted({*self._lengths, len(parts[0])}, reverse=True)
                else:
                    pattern = r"\w*\W+".join(re.escape(part) for part in parts)
                    self._phrases.append((re.compile(r"(?<!\w)" + pattern), number))
            out.add(number)
        return frozenset(out)

    def found(self, text: str) -> frozenset[int]:
        """The numbers of the keywords ``text`` (already folded) contains."""
        hits = set()
        if self._single:
            single, lengths = self._single, self._lengths
            for word in set(_WORD.findall(text)):
                for length in lengths:
                    if length <= len(word) and (n := single.get(word[:length])) is not None:
                        hits.add(n)
        for pattern, number in self._phrases:
            if pattern.search(text):
                hits.add(number)
        return frozenset(hits)


def message_text(subject: str | None, text: str) -> str:
    """The folded text keywords are looked for in: the subject, then the text's start."""
    return fold(f"{subject or ''}\n{text[:SCAN_LIMIT]}")
