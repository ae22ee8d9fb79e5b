"""What one mail's parse costs in a parse worker's ``normalise``: the bench mail of
``imap_ingest.py`` with the plain headers read as text (``connectors.email.headers``, as
shipped) against every header taking the stdlib's structured parse, in alternating rounds
in one process, so the machine's drift hits both alike.

Sole purpose: the worker's share of an intake's CPU, decided without Dovecot or RabbitMQ.

    .venv/bin/python bench/email_parse.py [--mails 1000] [--rounds 6]

Prints each round's CPU per mail and the fastest of each. Benchmarks are never tests: this
prints, it asserts nothing.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors.email import headers  # noqa: E402
from connectors.email.mime import normalise  # noqa: E402
from tests.support.mail import make_mail  # noqa: E402

KWARGS = {
    "mailbox": "support",
    "recipient": "support@example.com",
    "inline_max": 256 * 1024,
    "locator": {"mailbox": "support", "folder": "INBOX", "uidvalidity": 1, "uid": 1},
}


def mails(n: int) -> list[bytes]:
    """imap_ingest.py's mails, with the CRLF line ends IMAP hands them over in."""
    return [
        make_mail(
            f"bench-{i:06d}@customer.example",
            sender="ayse@acme.test",
            subject=f"Sipariş {i} hakkında",
            text="Merhaba, siparişim henüz gelmedi. " * 30,
        ).replace(b"\n", b"\r\n")
        for i in range(n)
    ]


def ms_per_mail(batch: list[bytes]) -> float:
    started = time.process_time()
    for raw in batch:
        normalise(raw, **KWARGS)  # type: ignore[arg-type]
    return (time.process_time() - started) / len(batch) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    batch = mails(args.mails)
    shipped = headers._READ_AS_TEXT
    rounds: dict[str, list[float]] = {"read as text": [], "all parsed": []}
    for _ in range(args.rounds):
        for name, as_text in (("read as text", shipped), ("all parsed", frozenset[str]())):
            headers._READ_AS_TEXT = as_text
            rounds[name].append(ms_per_mail(batch))
    headers._READ_AS_TEXT = shipped
    for name, values in rounds.items():
        each = " ".join(f"{v:.3f}" for v in values)
        print(f"normalise, {name}: {each} ms a mail (fastest {min(values):.3f})")


if __name__ == "__main__":
    main()
