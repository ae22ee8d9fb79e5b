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
from typing import Any

#: characters of a message's text that keywords are looked for in (the subject besides)
SCAN_LIMIT = 20_000
_WORD = re.compile(r"\w+")


def fold(text: str) -> str:
    """``text`` in the one form keywords and messages are compared in (module docstring)."""
    if not text.isascii():  # (str.translate would cost more than the whole scan)
        text = unicodedata.normalize("NFC", text).replace("İ", "i").replace("ı", "i")
    return text.casefold()  # I -> i


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
    message (the numbers of the keywords the text contains).

    One regular expression finds every word start that begins with a keyword's first word:
    a trie of the first words (``fatura(?:m)?``), greedy, so at each word start it matches
    the longest first word there, and every shorter one that matches is a start of it
    (worked out at load). A keyword of several words is then matched from that position.
    The text is scanned once, in C, whatever the number of keywords."""

    def __init__(self) -> None:
        self._numbers: dict[tuple[str, ...], int] = {}
        #: first word of a keyword -> (the keyword's words, its number, its phrase pattern)
        self._first: dict[str, list[tuple[int, re.Pattern[str] | None]]] = {}
        self._scan: re.Pattern[str] | None = None
        #: a longest first word found -> every keyword whose first word starts it
        self._at: dict[str, list[tuple[int, re.Pattern[str] | None]]] = {}

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
                phrase = None
                if len(parts) > 1:  # each word a start of a word, the next after non-words
                    phrase = re.compile(r"\w*\W+".join(re.escape(part) for part in parts))
                self._first.setdefault(parts[0], []).append((number, phrase))
                self._scan = None
            out.add(number)
        return frozenset(out)

    def _compile(self) -> re.Pattern[str]:
        firsts = sorted(self._first)
        self._at = {
            word: [
                entry for other in firsts if word.startswith(other) for entry in self._first[other]
            ]
            for word in firsts
        }
        return re.compile(r"\b" + _trie(firsts))

    def found(self, text: str) -> frozenset[int]:
        """The numbers of the keywords ``text`` (already folded) contains."""
        if not self._first:
            return frozenset()
        if self._scan is None:
            self._scan = self._compile()
        hits: set[int] = set()
        at = self._at
        for match in self._scan.finditer(text):
            for number, phrase in at[match[0]]:
                if phrase is None or phrase.match(text, match.start()):
                    hits.add(number)
        return frozenset(hits)


def _trie(words: list[str]) -> str:
    """A pattern matching any of ``words`` (no empty one), the longest where several do."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [re.escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


def message_text(subject: str | None, text: str) -> str:
    """The folded text keywords are looked for in: the subject, then the text's start."""
    return fold(f"{subject or ''}\n{text[:SCAN_LIMIT]}")
