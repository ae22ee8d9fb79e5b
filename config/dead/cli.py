"""``omniroute dead list|show|replay|purge``: see what ``omniroute.dead`` holds, put messages
back where they came from, drop old ones. How the queue is read without taking anything off
it: ``config.dead.queue``."""

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from config.dead import letters, render
from config.dead.letters import DeadLetter, Selection
from config.dead.queue import MAX_HELD, DeadQueue, Held
from config.settings import Settings
from ingest.bus import Bus
from ingest.errors import ConfigError, OmnirouteError

log = structlog.get_logger("omniroute.dead")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    now = datetime.now(UTC)
    if args.action == "replay":
        chosen = bool(args.ids) + (args.reason is not None) + bool(args.all)
        if chosen != 1:
            raise ConfigError("dead replay: give IDs, --reason R or --all (one of them)")
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-dead")
    await bus.open()
    try:
        async with DeadQueue(bus) as dead:
            if args.action == "list":
                return await _list(dead, args, now)
            if args.action == "show":
                return await _show(dead, args.id, args.show_identities)
            if args.action == "replay":
                return await _replay(dead, args, now)
            return await _purge(dead, args, now)
    finally:
        await bus.close()


def _out(lines: list[str]) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def _notes(dead: DeadQueue) -> None:
    """What the operator does not see, on stderr (stdout stays the listing)."""
    if dead.consumers:
        print(
            f"note: omniroute.dead has {dead.consumers} consumer(s); "
            "messages they hold unacknowledged are not seen here",
            file=sys.stderr,
        )
    if len(dead.held) >= MAX_HELD:
        print(
            f"note: only the first {MAX_HELD} dead letters were read; purge or replay "
            "some to see the rest",
            file=sys.stderr,
        )


async def _read(
    dead: DeadQueue, wanted: Callable[[DeadLetter], bool], *, bodies: bool = False
) -> list[Held]:
    """The held dead letters ``wanted`` selects, with their bodies if ``bodies``."""
    held = await dead.read(wanted if bodies else None)
    _notes(dead)
    return [h for h in held if wanted(h.letter)]


async def _list(dead: DeadQueue, args: argparse.Namespace, now: datetime) -> int:
    since = letters.cutoff(args.since, "--since", now) if args.since else None
    wanted = Selection(reason=args.reason, since=since)
    shown = [held.letter for held in await _read(dead, wanted)]
    await dead.hand_back()
    if args.json:
        _out([json.dumps(render.summary(letter), ensure_ascii=False) for letter in shown])
        return 0
    of = f" of {len(dead.held)}" if len(shown) != len(dead.held) else ""
    _out([*render.table(shown), f"{len(shown)}{of} dead letters in omniroute.dead"])
    return 0


async def _show(dead: DeadQueue, name: str, identities: bool) -> int:
    if identities:
        log.warning("dead.identities_shown", id=name, user=getpass.getuser())
    wanted = Selection(ids=frozenset({name}))
    found = [held.letter for held in await _read(dead, wanted, bodies=True)]
    await dead.hand_back()
    if not found:
        raise OmnirouteError(f"no dead letter {name!r} in omniroute.dead")
    lines: list[str] = []
    for letter in found:
        lines += [*([""] if lines else []), *render.show(letter, identities)]
    _out(lines)
    return 0


async def _replay(dead: DeadQueue, args: argparse.Namespace, now: datetime) -> int:
    wanted = Selection(ids=frozenset(args.ids), reason=args.reason)
    chosen = await _read(dead, wanted, bodies=not args.dry_run)
    missing = sorted(set(args.ids) - {name for h in chosen for name in h.letter.named_as()})
    if missing:
        raise OmnirouteError(f"no dead letter {missing[0]!r} in omniroute.dead; nothing replayed")
    if not chosen:
        print("no dead letter matches; nothing replayed")
        return 0
    lines: list[str] = []
    ready: list[Held] = []
    for held in chosen:
        problem = held.letter.replay_problem()
        if problem is None:
            ready.append(held)
        else:
            lines.append(f"skipped {held.letter.id}: {problem}")
    failed = len(chosen) - len(ready)
    # what stays goes back now, in its order: after a replay, the queue would put it behind
    # the messages that die again
    await dead.hand_back(keep=() if args.dry_run else ready)
    if args.dry_run:
        lines += [
            f"would replay {h.letter.id} -> {render.source(h.letter)} "
            f"(replay {h.letter.replayed + 1})"
            for h in ready
        ]
        _out([*lines, f"would replay {len(ready)} of {len(chosen)} dead letters"])
        return 1 if failed else 0
    outcomes = await dead.replay(ready, now)
    for held, outcome in zip(ready, outcomes, strict=True):
        if outcome is None:
            lines.append(f"replayed {held.letter.id} -> {render.source(held.letter)}")
        else:
            failed += 1
            lines.append(f"failed {held.letter.id}: {outcome}")
    _out([*lines, f"replayed {len(chosen) - failed} of {len(chosen)} dead letters"])
    return 1 if failed else 0


async def _purge(dead: DeadQueue, args: argparse.Namespace, now: datetime) -> int:
    before = now - letters.age(args.older_than, "--older-than")
    wanted = Selection(reason=args.reason, before=before)
    chosen = await _read(dead, wanted)
    when = before.isoformat(timespec="seconds")
    await dead.hand_back(keep=() if args.dry_run else chosen)
    if args.dry_run:
        _out(
            [
                *(render.table([h.letter for h in chosen]) if chosen else []),
                f"would purge {len(chosen)} dead letters that died before {when}",
            ]
        )
        return 0
    for held in chosen:
        await dead.remove(held)
    log.info("dead.purged", count=len(chosen), before=when, user=getpass.getuser())
    _out([f"purged {len(chosen)} dead letters that died before {when}"])
    return 0
