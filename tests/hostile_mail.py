"""Generated hostile mails (issue 13), one function per class of attack; shared by the
tests and ``bench/hostile.py``. Each keeps a readable From, Message-ID and Subject, so
a test can check that the stand-in routed for it keeps them."""

SENDER = "mallory@attacker.example"


def _head(tag: str, subject: bytes = b"") -> bytes:
    return (
        (
            f"From: Mallory <{SENDER}>\r\n"
            f"To: support@omniroute.test\r\n"
            f"Message-ID: <{tag}@attacker.example>\r\n"
            f"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\n"
        ).encode()
        + b"Subject: "
        + (subject or tag.encode())
        + b"\r\n"
    )


def encoded_word_flood(tag: str, size: int) -> bytes:
    """A Subject of ``size`` bytes of RFC 2047 encoded words: quadratic in the stdlib."""
    word = b"=?utf-8?b?YQ==?= "
    subject = b"Flood " + word * (size // len(word))
    return _head(tag, subject) + b"MIME-Version: 1.0\r\n\r\nhello\r\n"


def nested_multipart(tag: str, depth: int) -> bytes:
    """A multipart nested ``depth`` levels deep (900 took 22 s of CPU in the stdlib)."""
    out = [_head(tag), b"MIME-Version: 1.0\r\n"]
    for level in range(depth):
        header = b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % level
        out.append(header + b"--b%d\r\n" % level)
    out.append(b"Content-Type: text/plain\r\n\r\ndeep\r\n")
    for level in reversed(range(depth)):
        out.append(b"--b%d--\r\n" % level)
    return b"".join(out)


def many_parts(tag: str, parts: int) -> bytes:
    out = [_head(tag), b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n']
    for n in range(parts):
        out.append(b"--p\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % n)
    out.append(b"--p--\r\n")
    return b"".join(out)


def punycode_body(tag: str, size: int) -> bytes:
    """A body labelled ``charset=punycode``: that codec is quadratic (200 KB took 5 s)."""
    body = b"-" + b"b" * size  # all of it inserted: 150 KB took 5.7 s
    return (
        _head(tag)
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=punycode\r\n\r\n"
        + body
        + b"\r\n"
    )


def punycode_subject(tag: str, size: int) -> bytes:
    """One RFC 2047 word labelled punycode: one word, a header under the size limit, so
    no pre-check refuses it, and the stdlib decodes it in quadratic time."""
    word = b"=?punycode?q?-" + b"b" * size + b"?="
    return _head(tag, tag.encode() + b" " + word) + b"\r\nhello\r\n"


def address_flood(tag: str, count: int) -> bytes:
    """A To of ``count`` addresses with comments and groups: the address parser's worst."""
    addresses = b", ".join(b'"N\\"%d" (c(%d)) <u%d@x.example>' % (n, n, n) for n in range(count))
    return _head(tag) + b"Cc: group: " + addresses + b";\r\n\r\nhello\r\n"


def nul_bytes(tag: str) -> bytes:
    return (
        _head(tag)
        + b'Content-Type: text/plain; charset="utf\x00-8"\r\nX-Nul: a\x00b\r\n\r\nbo\x00dy\r\n'
    )


def huge_ids(tag: str, size: int) -> bytes:
    """A Message-ID and References far past RFC 5322's line limit (``Thread`` refuses
    ids over 998 characters); the From must survive it."""
    long_id = b"<" + b"x" * size + b"@attacker.example>"
    return (
        f"From: Mallory <{SENDER}>\r\nSubject: {tag}\r\n".encode()
        + b"Message-ID: "
        + long_id
        + b"\r\nIn-Reply-To: "
        + long_id
        + b"\r\nReferences: "
        + b" ".join([long_id] * 3)
        + b"\r\n\r\nhello\r\n"
    )


def header_flood(tag: str, size: int) -> bytes:
    """A header block of ``size`` bytes of folded X- headers."""
    line = b"X-Pad: " + b"p" * 70 + b"\r\n"
    return _head(tag) + line * (size // len(line)) + b"\r\nhello\r\n"


def good(tag: str) -> bytes:
    return (
        f"From: Ayse Yilmaz <ayse@customer.example>\r\nTo: support@omniroute.test\r\n"
        f"Message-ID: <{tag}@customer.example>\r\nSubject: {tag}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nMerhaba, faturam gelmedi.\r\n"
    ).encode()


def every_class(scale: int = 1) -> list[tuple[str, bytes]]:
    """One mail of each class, named by its tag; ``scale`` grows the big ones."""
    return [
        ("ew-85k", encoded_word_flood("ew-85k", 85_000 * scale)),
        ("ew-986k", encoded_word_flood("ew-986k", 986_000)),
        ("nest-900", nested_multipart("nest-900", 900)),
        ("nest-5000", nested_multipart("nest-5000", 5000)),
        ("parts-5000", many_parts("parts-5000", 5000)),
        ("punycode-200k", punycode_body("punycode-200k", 200_000)),
        ("punycode-subject", punycode_subject("punycode-subject", 150_000)),
        ("addresses-20k", address_flood("addresses-20k", 20_000)),
        ("nul", nul_bytes("nul")),
        ("huge-ids", huge_ids("huge-ids", 5000)),
        ("header-600k", header_flood("header-600k", 600_000)),
    ]


def attacks() -> list[tuple[str, bytes]]:
    """Every class, the encoded-word flood at increasing sizes, and the two slow ones (the
    daemon test and ``bench/hostile.py`` send the same mails)."""
    floods = [
        (f"ew-{size // 1000}k", encoded_word_flood(f"ew-{size // 1000}k", size))
        for size in (170_000, 340_000)
    ]
    slow = [
        ("parts-30000", many_parts("parts-30000", 30_000)),
        ("punycode-450k", punycode_subject("punycode-450k", 450_000)),
    ]
    return floods + slow + every_class()
