"""Write a deterministic synthetic directory (teams, agents, customers CSV) for imports and
benchmarks of ``omniroute directory import``.

Every customer gets unique identities (1-2 emails, 1-2 phones in mixed Turkish and US
spellings for default region TR, an X handle or user id for some), so a clean import
rejects nothing; ``--bad-every N`` spoils every Nth customer row to exercise rejections.

    python bench/gen_directory.py /tmp/dir --customers 1000000
    omniroute directory import /tmp/dir/teams.csv   # then agents.csv, customers.csv
"""

import argparse
import csv
import random
from pathlib import Path

TEAMS = 20
AGENTS_PER_TEAM = 10
FIRST = ["Ayşe", "Mehmet", "Fatma", "Mustafa", "Emine", "Ahmet", "John", "Mary", "Emily", "Can"]
LAST = ["Yılmaz", "Kaya", "Demir", "Şahin", "Çelik", "Smith", "Johnson", "Brown", "Öztürk"]
US_AREAS = ["212", "646", "415", "312", "617", "206", "305", "512"]


def _tr_phone(n: int, style: int) -> str:
    """A unique Turkish mobile number (53x plus 7 digits from n) in one of three spellings."""
    national = f"53{n // 10_000_000 % 10}{n % 10_000_000:07d}"
    a, b, c, d = national[:3], national[3:6], national[6:8], national[8:]
    return [f"0{a} {b} {c} {d}", f"+90 ({a}) {b}-{c}{d}", f"90{national}"][style % 3]


def _us_phone(n: int, style: int) -> str:
    area = US_AREAS[n // 8_000_000 % len(US_AREAS)]
    exchange = 200 + n // 10_000 % 800
    line = n % 10_000
    return [f"+1 ({area}) {exchange}-{line:04d}", f"+1{area}{exchange}{line:04d}"][style % 2]


def customer_row(i: int, rng: random.Random, teams: int) -> list[str]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    team = "" if rng.random() < 0.02 else f"team-{rng.randrange(teams):02d}"
    emails = [f"Customer{i}@Example{i % 97}.com"]
    if rng.random() < 0.3:
        emails.append(f"c{i}.billing@corp{i % 31}.example.com.tr")
    phones = [_tr_phone(i, rng.randrange(3)) if i % 4 else _us_phone(i, rng.randrange(2))]
    if rng.random() < 0.3:
        phones.append(_tr_phone(i + 50_000_000, rng.randrange(3)))
    roll = rng.random()
    twitter = f"@cust_{i}" if roll < 0.3 else f"id:{10**15 + i}" if roll < 0.4 else ""
    return [f"c{i:08d}", name, team, ";".join(emails), ";".join(phones), twitter]


def write_directory(folder: Path, customers: int, *, seed: int = 1, bad_every: int = 0) -> None:
    """Write teams.csv, agents.csv and customers.csv into ``folder`` (created if needed)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "teams.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "name", "dial", "email"])
        for t in range(TEAMS):
            w.writerow([f"team-{t:02d}", f"Team {t}", f"queue:team-{t:02d}", f"t{t}@example.com"])
    with (folder / "agents.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "name", "team", "email", "phone", "dial", "active"])
        for a in range(TEAMS * AGENTS_PER_TEAM):
            w.writerow(
                [
                    f"agent-{a:04d}",
                    f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                    f"team-{a % TEAMS:02d}",
                    f"agent{a}@support.example.com",
                    f"+90 212 555 {a:04d}",
                    f"sip:agent{a}@pbx.example.com",
                    "true" if rng.random() < 0.9 else "false",
                ]
            )
    with (folder / "customers.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "name", "team", "emails", "phones", "twitter"])
        for i in range(customers):
            row = customer_row(i, rng, TEAMS)
            if bad_every and i % bad_every == bad_every - 1:
                row[4] = "not a number"
            w.writerow(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bad-every", type=int, default=0, help="spoil every Nth customer row")
    args = parser.parse_args()
    write_directory(args.folder, args.customers, seed=args.seed, bad_every=args.bad_every)


if __name__ == "__main__":
    main()
