"""Reads the SPF, DKIM and DMARC results of a mail from its ``Authentication-Results``
headers (RFC 8601), believing only the receiving servers the operator trusts.

Sole purpose: ``read_auth`` gives ``meta.auth`` (issue 13, "Sender authentication"), so a
mail whose From names a customer but whose sender is not proven is not routed as theirs.

Trust (RFC 8601 section 5): anyone can write an ``Authentication-Results`` header, so only
headers whose authserv-id is in ``email.trusted_authserv_ids`` count, and the operator's
receiving MTA must delete every incoming header that carries its own authserv-id before it
adds its own (Postfix with OpenDKIM/OpenDMARC, rspamd and Exim do this when told their
authserv-id). Without that, a forged header with the trusted id is believed. The topmost
trusted header is the receiving server's own; the other headers carrying the same id are
read with it, as each milter (OpenDKIM, OpenDMARC, policyd-spf) writes one of its own.
A header without an authserv-id (Microsoft 365 writes these) or in ARC's ``i=1; …`` form
names no server and is never trusted.

Hostile input: at most ``MAX_VALUES`` headers of ``MAX_LENGTH`` characters each are read,
``MAX_RESULTS`` results per header, in one linear pass; nothing here raises.
"""

import re
from collections.abc import Iterable, Sequence

from ingest.sender_auth import METHODS, verified

__all__ = ["MAX_LENGTH", "MAX_RESULTS", "MAX_VALUES", "parse", "read_auth", "verified"]

MAX_VALUES = 32
MAX_LENGTH = 8192
MAX_RESULTS = 64
#: RFC 8601 methodspec: ``method[/version] = result``, CFWS allowed around each part
_METHODSPEC = re.compile(
    r"\s*([a-z0-9][a-z0-9_-]{0,63})\s*(?:/\s*[0-9]{1,5}\s*)?=\s*([a-z0-9][a-z0-9_-]{0,63})",
    re.ASCII | re.IGNORECASE,
)
_SYNONYMS = {"hardfail": "fail"}  # RFC 8601 section 2.7.2: older SPF implementations


def read_auth(values: Sequence[str], trusted: Sequence[str]) -> dict[str, str] | None:
    """``{"spf", "dkim", "dmarc", "authserv_id"}`` from the topmost header written by a
    trusted server (``values`` topmost first, ``trusted`` compared case-insensitively);
    None when no trusted header exists or nothing is trusted.

    Each result is lowercased (``pass``, ``fail``, ``softfail``, ``neutral``, ``none``,
    ``temperror``, ``permerror``, ``policy``); a method the server did not report is
    ``none``. Several DKIM signatures: ``pass`` if any passed; SPF and DMARC: the first."""
    wanted = _ids(trusted)
    if not wanted:
        return None
    chosen: str | None = None
    found: dict[str, list[str]] = {method: [] for method in METHODS}
    for raw in _bounded(values, MAX_VALUES):
        authserv_id, results = parse(raw)
        if authserv_id is None or authserv_id.casefold() not in wanted:
            continue
        if chosen is None:
            chosen = authserv_id
        elif authserv_id.casefold() != chosen.casefold():
            continue  # another trusted server further down the path: ours already spoke
        for method, result in results:
            if method in found:
                found[method].append(result)
    if chosen is None:
        return None
    auth = {method: (found[method] or ["none"])[0] for method in METHODS}
    if "pass" in found["dkim"]:
        auth["dkim"] = "pass"
    auth["authserv_id"] = chosen
    return auth


def parse(value: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The authserv-id (None when the header names none) and the ``(method, result)``
    pairs of one header value, lowercased, comments and properties left out."""
    if not isinstance(value, str):
        return None, []
    segments = _segments(value[:MAX_LENGTH])
    head = segments[0].strip() if segments else ""
    authserv_id, version = _authserv(head)
    if authserv_id is None and "=" in head:
        rest = segments  # no authserv-id: the first segment is already a result
    elif version not in (None, "1"):
        return authserv_id, []  # a later version of RFC 8601 we cannot read: no results
    else:
        rest = segments[1:]
    results: list[tuple[str, str]] = []
    for segment in rest[:MAX_RESULTS]:
        spec = _METHODSPEC.match(segment)
        if spec is not None:
            result = spec.group(2).lower()
            results.append((spec.group(1).lower(), _SYNONYMS.get(result, result)))
    return authserv_id, results


def _ids(trusted: Sequence[str]) -> set[str]:
    return {t.strip().casefold() for t in _bounded(trusted, 1000) if t.strip()}


def _bounded(values: Iterable[object], limit: int) -> list[str]:
    """At most ``limit`` of the values, strings only (a lone string is one value)."""
    if isinstance(values, str):
        return [values]
    taken: list[str] = []
    try:
        for value in values:
            if len(taken) == limit:
                break
            if isinstance(value, str):
                taken.append(value)
    except TypeError:  # not iterable: nothing to read
        return []
    return taken


def _authserv(head: str) -> tuple[str | None, str | None]:
    """``authserv-id [version]`` of the first segment, or (None, None) when it is not one
    (an RFC 2045 token holds no ``=``, so ``spf=pass`` or ARC's ``i=1`` is no id)."""
    if head.startswith('"'):
        end = head.find('"', 1)
        if end <= 1:
            return None, None
        name, words = head[1:end], head[end + 1 :].split()
    else:
        words = head.split()
        if not words or "=" in words[0] or '"' in words[0]:
            return None, None
        name, words = words[0], words[1:]
    if len(words) > 1 or (words and not (words[0].isascii() and words[0].isdigit())):
        return None, None
    return name, (words[0] if words else None)


def _segments(text: str) -> list[str]:
    """The text split at each ``;`` outside quoted strings and comments, with comments
    (nested, with ``\\`` escapes; RFC 5322 CFWS) replaced by a space. An unclosed quote or
    comment runs to the end."""
    segments: list[str] = []
    current: list[str] = []
    depth = 0
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
            if not depth:
                current.append(char)
        elif char == "\\" and (quoted or depth):
            escaped = True
            if quoted:
                current.append(char)
        elif depth:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if not depth:
                current.append(" ")
        elif quoted:
            quoted = char != '"'
            current.append(char)
        elif char == '"':
            quoted = True
            current.append(char)
        elif char == "(":
            depth = 1
        elif char == ";":
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
    segments.append("".join(current))
    return segments
