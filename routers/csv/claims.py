"""Who gets a contested identity: the rows of a customers file decided one by one, in order.

Sole purpose: keep the file-order rule of identity ownership where set-based SQL cannot
state it. An identity another customer owns rejects the row claiming it, unless a row
earlier in the file released it (its customer's new set leaves it out); of two rows
claiming one identity the first wins. ``routers.csv.merge`` hands over only the rows
involved in a contest (a clean or repeated import has none), with what they need.
"""

from dataclasses import dataclass

from routers.csv.format import Identity
from routers.csv.report import Rejected


@dataclass
class Claim:
    """An accepted-so-far row of the file: its line, customer and new identity set."""

    line: int
    customer: str
    identities: frozenset[Identity]


def decide(
    claims: list[Claim], owner: dict[Identity, str], held: dict[str, set[Identity]]
) -> list[Rejected]:
    """The rows to reject, in line order. ``owner`` maps every identity the rows claim or
    hold to its owner before the import; ``held`` each of their customers to the set it
    owns (absent: none). ``owner`` is updated as the file would leave it."""
    rejects: list[Rejected] = []
    for claim in sorted(claims, key=lambda c: c.line):
        who = claim.customer
        taken = sorted(i for i in claim.identities if owner.get(i, who) != who)
        if taken:
            kind, address = taken[0]
            why = f"{kind} {address} is owned by customer {owner[taken[0]]!r}"
            rejects.append(Rejected(claim.line, why))
            continue
        before = held.get(who, set())
        for identity in before - claim.identities:
            del owner[identity]
        for identity in claim.identities - before:
            owner[identity] = who
    return rejects
