"""A mail's body and attachments: the text a person reads, and what is attached.

Sole purpose: the half of ``normalise`` that walks MIME parts, bounded in depth and count
(a mail nesting itself forever ends here, not in a crash), with a charset that is wrong,
unknown or no charset at all never raising.
"""

import base64
import codecs
import contextlib
import hashlib
import re
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from typing import Any

from ingest.schema import Attachment

MAX_ATTACHMENTS = 100
MAX_DEPTH = 20
#: charset labels mail clients write that Python's codecs do not know under that name
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "x-mac-turkish": "mac_turkish",
    "windows-874": "cp874",
    "unknown-8bit": "utf-8",
    "x-unknown": "utf-8",
}
#: codecs that decode text but are no mail charset, some slow on purpose-built input
#: (punycode is quadratic: a 200 KB body took 5 s); such a label is read as unknown
_NOT_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"})


def safe_walk(msg: Message) -> list[Message]:
    """Every part, depth-bounded (a mail nesting itself forever ends here, not in a crash)."""
    out: list[Message] = []

    def visit(part: Message, depth: int) -> None:
        out.append(part)
        if depth >= MAX_DEPTH or len(out) > 10 * MAX_ATTACHMENTS:
            return
        payload = _raw_payload(part)
        if isinstance(payload, list):
            for child in payload:
                if isinstance(child, Message):
                    visit(child, depth + 1)

    visit(msg, 0)
    return out


def body_part(msg: Message) -> Message | None:
    """The plain text part, else the HTML one; a non-MIME mail is its own body."""
    # get_body walks arbitrary structures; on failure fall back to our own bounded walk
    with contextlib.suppress(Exception):
        if isinstance(msg, EmailMessage):
            body = msg.get_body(preferencelist=("plain", "html"))
            if body is not None:
                return body
    for kind in ("text/plain", "text/html"):
        for part in safe_walk(msg):
            if content_type(part) == kind and not _is_attachment(part):
                return part
    return msg if not msg.is_multipart() and content_type(msg).startswith("text/") else None


def content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment"
    except Exception:
        return False


def text_of(part: Message) -> str:
    data = _payload(part)
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = decode(data, charset)
    if content_type(part) == "text/html":
        text = html_to_text(text)
    return text.replace("\r\n", "\n").strip()


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    try:
        return part.as_bytes()
    except Exception:
        return str(_raw_payload(part) or "").encode("utf-8", "replace")


def _raw_payload(part: Message) -> Any:
    """The undecoded payload, or None: the stdlib decodes a part's bytes with its declared
    charset even here, and a charset with a NUL in it raises ValueError."""
    try:
        return part.get_payload()
    except Exception:
        return None


def decode(data: bytes, charset: str | None) -> str:
    """Declared charset if it reads cleanly, else UTF-8, else the declared one (or UTF-8)
    with replacement characters: an unknown or wrong label never raises."""
    codec: str | None = None
    if charset:
        label = charset.strip().strip('"').lower()
        label = _CHARSET_ALIASES.get(label, label)
        try:
            codec = codecs.lookup(label).name
            codec = None if codec in _NOT_CHARSETS else codec
        except (LookupError, ValueError):  # unknown, or not even a name (a NUL in it)
            codec = None
    for candidate in (codec, "utf-8"):
        if candidate is None:
            continue
        try:
            return data.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode(codec or "utf-8", errors="replace")


class _TextExtractor(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table"}
    )
    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """Readable text from HTML: tags dropped, blocks on their own lines, blank runs folded."""
    parser = _TextExtractor()
    with contextlib.suppress(Exception):  # html.parser is lenient; keep what was read
        parser.feed(html)
        parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.chunks).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- attachments ----------------------------------------------------------------------


def attachments(
    msg: Message,
    body: Message | None,
    inline_max: int,
    locator: dict[str, Any],
    meta: dict[str, Any],
) -> list[Attachment]:
    """Leaf parts other than the body and its alternatives; an attached mail is one part."""
    out: list[Attachment] = []
    index = 0
    # inline_max bounds the inline content of the whole message, not of each part: a
    # hundred attachments at the limit would make a message the broker refuses for ever
    budget = inline_max

    def visit(part: Message, depth: int) -> None:
        nonlocal index, budget
        index += 1
        ctype = content_type(part)
        payload = part.get_payload()
        if ctype.startswith("multipart/") and isinstance(payload, list) and depth < MAX_DEPTH:
            for child in payload:
                if isinstance(child, Message):
                    visit(child, depth + 1)
            return
        if part is body or (ctype in ("text/plain", "text/html") and not _named(part)):
            return
        if len(out) >= MAX_ATTACHMENTS:
            meta["attachments_truncated"] = True
            return
        data = _attached_bytes(part, ctype)
        filename = _filename(part)
        item = Attachment(
            filename=filename,
            content_type=ctype,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        if len(data) <= budget:
            item.content_b64 = base64.b64encode(data).decode("ascii")
            budget -= len(data)
        else:
            item.locator = {**locator, "part": index}
        out.append(item)

    try:
        visit(msg, 0)
    except Exception:  # a structure we cannot walk keeps the text, and says so
        meta["attachments_unreadable"] = True
    return out


def _named(part: Message) -> bool:
    return _is_attachment(part) or _filename(part) is not None


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    return " ".join(str(name).split()) or None if name else None


def _attached_bytes(part: Message, ctype: str) -> bytes:
    if ctype.startswith("message/"):
        payload = part.get_payload()
        if isinstance(payload, list) and payload and ctype == "message/rfc822":
            inner = payload[0]
            with contextlib.suppress(Exception):  # a broken inner mail: its raw text below
                if isinstance(inner, Message):
                    return inner.as_bytes()
        try:
            return part.as_bytes().split(b"\n\n", 1)[-1]
        except Exception:
            return str(payload).encode("utf-8", "replace")
    return _payload(part)
