"""``omniroute rules test|diff`` (issue 20): try a rule set before it goes live.

``rules test FILE.toml --messages SAMPLE.jsonl`` replays messages through the rules of FILE
with the router's own engine (``DirectoryDecider`` on the configured directory; no broker),
each decided as of the time it was received (``received_at``: hours conditions, closed
teams). A line of SAMPLE is an InboundMessage or a routed message (``omniroute tail
--json``, whose ``route`` is shown as the live one), optionally with ``"expect":
"team.billing"``; FILE's ``[[samples]]`` add expectations by message id or external id.
Prints the route and the rule per message and a summary; exit 1 when an expectation fails.

``rules diff --since 24h`` summarises what the shadow candidate (``routing.shadow_rules``)
would have routed elsewhere, from the ``shadow_diffs`` record the router keeps.

``unknown_teams``: the teams rules name that the directory lacks, for ``omniroute check``,
the start and a reload (the directory is not at hand when the settings are read); with
``named_teams``, also the teams the configuration names outside rules (issue 17).
"""

import argparse
import json
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from config.settings import Settings
from ingest.errors import ConfigError
from ingest.schema import InboundMessage, Route, utcnow
from routers.decider import DirectoryDecider
from routers.models import RoutedRecord, ShadowDiff
from routers.rule_file import load_rule_file
from routers.settings import RoutingSettings
from routers.store.engine import create_engine, require_current
from routers.store.transactions import transactions_of

_SINCE = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


async def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "test":
        return await test(settings, args.file, args.messages)
    return await diff(settings, since(args.since))


def since(text: str) -> timedelta:
    """``--since``: ``24h``, ``90m``, ``7d``, ``30s``."""
    match = _SINCE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"--since {text!r}: give a number and s, m, h or d (24h, 7d)")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def read_samples(path: Path) -> list[tuple[InboundMessage, Route | None, str | None]]:
    """Each line's message, the route it had (a routed message's) and its expectation."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                expect = data.pop("expect", None)
                live = Route.model_validate(data["route"]) if "route" in data else None
                message = InboundMessage.model_validate(data.get("message", data))
            except (ValueError, ValidationError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(f"{path}:{number}: not a message: {first}") from None
            out.append((message, live, str(expect) if expect is not None else None))
    return out


async def test(settings: Settings, file: Path, messages: Path) -> int:
    try:
        rule_file = load_rule_file(file, settings.routing.default_region)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    samples = read_samples(messages)
    expected = {s.message: s.expect for s in rule_file.samples}
    routing = settings.routing.with_topics(rule_file.rules)
    await require_current(settings.directory_url)
    engine = create_engine(settings.directory_url, settings.directory)
    at = [utcnow()]
    try:
        if problem := await unknown_teams(engine, routing, source=str(file)):
            raise ConfigError(problem)
        decider = DirectoryDecider(engine, routing, clock=lambda: at[0])
        routes: list[Route] = []
        for message, _, _ in samples:
            at[0] = message.received_at
            routes.append((await decider.decide_many([message]))[0].route)
    finally:
        await engine.dispose()
    failed, checked, found = 0, 0, set()
    by_key: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    for (message, live, expect), route in zip(samples, routes, strict=True):
        expect = expect or expected.get(message.id) or expected.get(message.external_id)
        found |= {message.id, message.external_id}
        verdict = ""
        if expect is not None:
            checked += 1
            ok = route.routing_key == expect
            failed += not ok
            verdict = "  ok" if ok else f"  FAIL (expected {expect})"
        was = (
            f"  (live: {live.routing_key})"
            if live and live.routing_key != route.routing_key
            else ""
        )
        tags = f"  tags={','.join(route.tags)}" if route.tags else ""
        print(
            f"{message.id[:36]:<36}  {message.channel:<8}  {route.routing_key:<24}  "
            f"{route.reason:<16}  rule={route.rule or '-'}{tags}{was}{verdict}"
        )
        by_key[route.routing_key] += 1
        by_rule[route.rule or "-"] += 1
    for missing in sorted(set(expected) - found):
        failed, checked = failed + 1, checked + 1
        print(f"sample {missing}: FAIL (no such message in {messages})")
    print(f"\n{len(samples)} messages, {len(rule_file.rules)} rules")
    print("routes: " + ", ".join(f"{k} {n}" for k, n in by_key.most_common()))
    print("rules:  " + ", ".join(f"{k} {n}" for k, n in by_rule.most_common()))
    print(f"expectations: {checked - failed} of {checked} met")
    return 1 if failed else 0


async def diff(settings: Settings, period: timedelta) -> int:
    await require_current(settings.directory_url)
    engine = create_engine(settings.directory_url, settings.directory)
    start = utcnow() - period
    grouped = (
        select(
            ShadowDiff.live,
            ShadowDiff.shadow,
            ShadowDiff.rule,
            func.count(),
            func.min(ShadowDiff.message_id),
        )
        .where(ShadowDiff.at >= start)
        .group_by(ShadowDiff.live, ShadowDiff.shadow, ShadowDiff.rule)
        .order_by(func.count().desc())
    )
    routed = select(func.count()).select_from(RoutedRecord).where(RoutedRecord.routed_at >= start)
    try:
        rows, total = await transactions_of(engine)(
            lambda c: (list(c.execute(grouped)), c.execute(routed).scalar_one())
        )
    finally:
        await engine.dispose()
    moved = sum(row[3] for row in rows)
    candidate = settings.routing.shadow_rules or "(routing.shadow_rules is not set now)"
    print(f"since {start.isoformat(timespec='seconds')}: {moved} of {total} routed messages "
          f"would have gone elsewhere with {candidate}")  # fmt: skip
    if rows:
        print(f"\n{'count':>7}  {'live':<24}  {'candidate':<24}  {'rule':<20}  example")
    for live, shadow, rule, count, example in rows:
        print(f"{count:>7}  {live:<24}  {shadow:<24}  {rule or '-':<20}  {example}")
    return 0


def named_teams(settings: Settings) -> dict[str, str]:
    """The teams the configuration names outside topic rules, by the key that names them:
    ``routing.default_team``, ``routing.address_teams`` values, mailboxes' ``team``."""
    routing = settings.routing
    named = {f"routing.address_teams.{a!r}": team for a, team in routing.address_teams.items()}
    if routing.default_team:
        named["routing.default_team"] = routing.default_team
    for box in settings.email.mailboxes:
        if box.team:
            named[f"email.mailboxes {box.name!r} team"] = box.team
    return named


async def unknown_teams(
    engine: AsyncEngine,
    routing: RoutingSettings,
    *,
    source: str | None = None,
    named: dict[str, str] | None = None,
) -> str | None:
    """One line naming the rules whose teams the directory lacks (None: all there): the
    live rules' (said to come from ``source`` if given) and the shadow candidate's, and
    the ``named`` teams (``named_teams``) by their key."""
    named = named or {}
    sets = [(source or "routing.rules", routing.topics)]
    if routing.shadow is not None:
        sets.append((f"routing.shadow_rules {routing.shadow_rules}", routing.shadow.topics))
    wanted = {team for _, rules in sets for team in rules.teams} | set(named.values())
    if not wanted:
        return None
    decider = DirectoryDecider(engine, routing)
    found = await decider.directory.get_teams(wanted)
    problems = [
        f"{where}: rule {rule.name!r} names team {team!r}, which is not in the directory"
        for where, rules in sets
        for rule in rules.rules
        for team in (rule.team, *(rule.customer_team or ()))
        if team and found.get(team) is None
    ]
    problems += [
        f"{key}: team {team!r} is not in the directory"
        for key, team in named.items()
        if found.get(team) is None
    ]
    return "; ".join(problems) or None
