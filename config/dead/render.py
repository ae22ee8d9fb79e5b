"""How dead letters are printed: a table or JSON lines for ``list``, headers, reason and the
pretty-printed body for ``show``. Customer identities are redacted by ``config.logging``'s
rules (a value under an identity key such as ``address`` or ``sender``, and any email
address, international number or X handle in other text) unless the operator asked for them.
"""

import json
from datetime import datetime
from typing import Any

from config.dead.letters import DeadLetter, text
from config.logging import IDENTITY_KEYS, hide_secrets, scrub
from ingest.identities import redact

#: the most of a body ``show`` prints
SHOW_LIMIT = 64 * 1024
#: ``show``'s view of a body that is not UTF-8: this many bytes as hex
HEX_LIMIT = 512
_REASON_WIDTH = 60


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else "-"


def source(letter: DeadLetter) -> str:
    if not letter.exchange:
        return "-"
    return f"{letter.exchange}/{letter.routing_key or ''}"


def summary(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as ``list --json`` prints it (no body, the reason scrubbed)."""
    return {
        "id": letter.id,
        "message_id": letter.message_id,
        "reason": scrub(letter.reason),
        "exchange": letter.exchange,
        "routing_key": letter.routing_key,
        "dead_at": letter.dead_at.isoformat() if letter.dead_at else None,
        "type": letter.type,
        "size": letter.size,
        "replayed": letter.replayed,
    }


def table(shown: list[DeadLetter]) -> list[str]:
    """``list``'s lines: a header and one line per dead letter."""
    width = max([len("ID"), *(len(letter.id) for letter in shown)])
    lines = [f"{'ID':<{width}}  {'DEAD AT (UTC)':<19}  {'REASON':<{_REASON_WIDTH}}  FROM"]
    for letter in shown:
        reason = scrub(letter.reason).replace("\n", " ")
        if len(reason) > _REASON_WIDTH:
            reason = reason[: _REASON_WIDTH - 1] + "…"
        replayed = f"  (replayed {letter.replayed}x)" if letter.replayed else ""
        lines.append(
            f"{letter.id:<{width}}  {_when(letter.dead_at):<19}  {reason:<{_REASON_WIDTH}}  "
            f"{source(letter)}{replayed}"
        )
    return lines


def plain(value: Any) -> Any:
    """A header value as JSON can hold it."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return text(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def redacted(value: Any, identities: bool, key: str = "") -> Any:
    """``value`` with customer identities redacted (``identities``: shown); URL passwords
    are always hidden."""
    if isinstance(value, dict):
        return {k: redacted(v, identities, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, identities, key) for v in value]
    if not isinstance(value, str):
        return value
    if identities:
        return hide_secrets(value)
    if key.lower() in IDENTITY_KEYS:
        return redact(value)
    return scrub(value)


def body_lines(letter: DeadLetter, identities: bool) -> list[str]:
    """The body: pretty-printed JSON, else the text, else a hex dump; bounded."""
    body = letter.body or b""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError:
        dump = body[:HEX_LIMIT].hex(" ", 2)
        more = f" (first {HEX_LIMIT} shown)" if len(body) > HEX_LIMIT else ""
        return [f"({len(body)} bytes, not UTF-8{more})", dump]
    try:
        shown = json.dumps(redacted(json.loads(decoded), identities), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
        shown = redacted(decoded, identities)
    if len(shown) > SHOW_LIMIT:
        shown = shown[:SHOW_LIMIT] + f"\n… ({len(shown) - SHOW_LIMIT} more characters)"
    return shown.splitlines() or ["(empty)"]


def show(letter: DeadLetter, identities: bool) -> list[str]:
    """``show``'s lines for one dead letter."""
    headers = redacted(plain(letter.headers), identities)
    lines = [
        f"id:           {letter.id}",
        f"message id:   {letter.message_id or '-'}",
        f"reason:       {redacted(letter.reason, identities)}",
        f"dead at:      {letter.dead_at.isoformat() if letter.dead_at else '-'}",
        f"came from:    {source(letter)}",
        f"type:         {letter.type or '-'}",
        f"content type: {letter.content_type or '-'}",
        f"size:         {letter.size} bytes",
        f"replayed:     {letter.replayed}",
        "headers:",
    ]
    lines += [f"  {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in sorted(headers.items())]
    lines.append("body:")
    lines += [f"  {line}" for line in body_lines(letter, identities)]
    return lines
