"""The policy ``connectors.email.mime`` parses mails with: ``policy.default``, made cheaper.

Sole purpose: speed without a change in what is read. The stdlib's structured header
parse is most of a mail's parse; this policy makes each header class once, reuses a
header's parse within one mail, and skips the parse where nothing read from the header
would differ. ``normalise`` calls ``forget_headers`` before each mail, so nothing a
hostile mail made outlives its parse.
"""

import functools
import re
from email.headerregistry import BaseHeader, HeaderRegistry
from email.policy import EmailPolicy
from typing import Any


class _HeaderClasses(HeaderRegistry):
    """``email.headerregistry``'s registry, with each header class made once.

    Sole purpose: speed. The stdlib makes a new class (``type(...)``) for every header it
    parses, and each one is a reference cycle the garbage collector must find: with five
    headers a mail, that was a fifth of a mail's parse in the worker. Keyed by the
    registry's class, so a mail's header names cannot grow it."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[type, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(kind)
        if made is None:
            made = self._made[kind] = super().__getitem__(name)
        return made


class _HeaderCachePolicy(EmailPolicy):
    """``policy.default``, with a header's parsed object reused within one mail.

    Sole purpose: speed. ``email.headerregistry`` builds a new header object on every
    access: Content-Type alone was parsed nine times per mail, a quarter of a mail's cost.
    ``normalise`` empties the cache at the start of each mail, so a hostile mail's parse
    trees never stay behind to cost the next one memory; header objects are read-only here.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name") or len(value) > _CACHED_VALUE:
            return super().header_fetch_parse(name, value)
        return _parsed_header(name, value)


_CACHED_VALUE = 512
_CACHED_HEADERS = 256
#: Headers only ever read as text: the stdlib's ``get_content_type``, ``get_param`` and
#: boundary search split the header's string with its legacy parser whatever the policy,
#: and ``normalise`` reads ids and dates from the string. Their structured parse was a
#: third of a mail's parse and changed nothing read from them, unless the value has
#: what the structured parser reads differently from the legacy one: encoded words
#: (decoded in parameters), comments (dropped: ``boundary="b" (c)``), RFC 2231
#: parameters, quoted pairs, non-ASCII bytes. Those still take it, and so does a
#: Content-Type or Message-ID not in its ``_PLAIN`` shape below.
_READ_AS_TEXT = frozenset(
    {
        "content-type",
        "content-transfer-encoding",
        "mime-version",
        "message-id",
        "in-reply-to",
        "references",
        "date",
    }
)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NEEDS_PARSE = re.compile(r"=\?|[()*\\]")
#: The structured parse writes a Content-Type's parameters back (the string the legacy
#: parser then reads): an unquoted value cut at its first special (``boundary=----=_P1``
#: becomes ``boundary="----"``, ``name=a b`` ``name="a"``), an unterminated quote closed,
#: a parameter with an empty value or a ``'`` in it dropped, a control character kept
#: where the legacy parser strips it. Of a Message-ID it keeps the first msg-id only, and
#: only as far as it reads it (``<a b@c> <d@e>`` becomes ``<a``, ``<a@b@c>`` ``<a@b>``).
#: Read as text, then, only a type with ``;``-separated ``name=token`` or
#: ``name="text"`` parameters, and a single msg-id of dot-atoms: those it keeps as written.
_BARE = r"[A-Za-z0-9!#$&+\-.^_`{|}~]+"  # RFC 2045's token, without * ' %
_ATOMS = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
_SPACE = r"[ \t]*"
_PLAIN = {
    "content-type": re.compile(
        rf"{_SPACE}{_BARE}{_SPACE}/{_SPACE}{_BARE}{_SPACE}"
        rf'(?:;{_SPACE}(?:{_BARE}{_SPACE}={_SPACE}(?:{_BARE}|"[\t !#-\[\]-~]*"){_SPACE})?)*'
    ),
    "message-id": re.compile(rf"{_SPACE}<{_ATOMS}@(?:{_ATOMS}|\[[!-Z^-~]+\])>{_SPACE}"),
}
#: ``policy.default`` but for its header classes
_PARSING = EmailPolicy(header_factory=_HeaderClasses())
POLICY = _HeaderCachePolicy(header_factory=_PARSING.header_factory)


@functools.lru_cache(maxsize=_CACHED_HEADERS)
def _parsed_header(name: str, value: str) -> Any:
    kind = name.lower()
    if kind in _READ_AS_TEXT:
        text = "".join(_LINE_BREAK.split(value))
        plain = _PLAIN.get(kind)
        if (
            text.isascii()
            and not _NEEDS_PARSE.search(text)
            and (plain is None or plain.fullmatch(text))
        ):
            return text
    return _PARSING.header_fetch_parse(name, value)


def forget_headers() -> None:
    """Drop every header parsed so far (at the start of each mail)."""
    _parsed_header.cache_clear()
