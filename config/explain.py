"""``omniroute route explain``: the decision for a sender, with the policy's chain of rules
as it ran: each rule in order, what it found, which one decided and which were not reached.

An email is taken as authenticated (``dmarc=pass``) unless ``--auth`` says otherwise, so the
usual path of a customer's mail is what shows by default; ``--auth dmarc=fail`` or
``--auth none`` shows what a spoofed mail gets. A call carries ``--verstat`` if given.
"""

import argparse
import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from config.instants import instant
from config.registry import IDENTITY_KINDS
from config.settings import Settings
from ingest.errors import ConfigError
from ingest.identities import IdentityKind
from ingest.schema import Identity, InboundMessage, Route, Thread, utcnow
from ingest.sender_auth import METHODS
from routers.decider import DirectoryDecider
from routers.directory import CustomerRecord
from routers.policy import trace
from routers.settings import RoutingSettings
from routers.store.engine import create_engine, require_current

KINDS: dict[str, IdentityKind] = IDENTITY_KINDS  # one table of channels (config.registry)


def sender_meta(
    channel: str, auth: str | None, verstat: str | None, trusted: list[str]
) -> dict[str, Any]:
    """The message meta that ``--auth`` and ``--verstat`` stand for, as the connectors write
    it (``meta.auth`` as if from the first trusted server, ``meta.stir_verstat``)."""
    if auth is not None and channel != "email":
        raise ConfigError("--auth is for --channel email")
    if verstat is not None and channel != "voice":
        raise ConfigError("--verstat is for --channel voice")
    meta: dict[str, Any] = {}
    if verstat:
        meta["stir_verstat"] = verstat
    if channel != "email" or (auth or "").strip().lower() == "none":
        return meta
    results = dict.fromkeys(METHODS, "none")
    for part in (auth or "dmarc=pass").split(","):
        method, sep, result = part.strip().partition("=")
        if not sep or method.strip().lower() not in METHODS or not result.strip().isalpha():
            raise ConfigError(f"--auth: {part.strip()!r} is not spf=, dkim= or dmarc=<result>")
        results[method.strip().lower()] = result.strip().lower()
    meta["auth"] = {**results, "authserv_id": trusted[0] if trusted else "route-explain"}
    return meta


def topic_rules(
    message: InboundMessage, customer: CustomerRecord | None, routing: RoutingSettings, route: Route
) -> list[tuple[str, str, str, str]]:
    """Each topic rule (issue 20) with its place in the chain, whether it matched (decided,
    tagged, matched but not asked: the place was not reached or an earlier rule decided),
    and why not."""
    zone = ZoneInfo(routing.timezone)
    reached = {step.partition(": ")[0] for step in route.steps}
    out = []
    for rule, miss, why in routing.topics.explain(message, customer, route.decided_at, zone):
        place = "topic_override" if rule.early else "topic"
        if miss is not None:
            outcome = "no match"
        elif rule.tag is not None:
            outcome = "tagged" if rule.tag in route.tags else "not reached"
            why += "" if outcome == "tagged" else ", but a step before it decided"
        elif rule.name == route.rule:
            outcome = "decided"
        else:
            outcome = "matched" if place in reached else "not reached"
            why += ", but a rule or step before it decided"
        out.append((rule.name, place, outcome, why))
    return out


def decision_time(text: str | None) -> datetime | None:
    """``--at``: an RFC 3339 instant with its offset (a naive one would mean a different
    moment in every time zone of the directory)."""
    return None if text is None else instant(text, "--at")


async def explain(args: argparse.Namespace, settings: Settings) -> int:
    kind = KINDS[args.channel]
    meta = sender_meta(
        args.channel,
        args.auth,
        args.verstat,
        settings.email.trusted_authserv_ids,
    )
    message = InboundMessage(
        channel=args.channel,
        external_id="explain",
        sender=Identity(kind=kind, address=args.sender),
        recipient=Identity(kind=kind, address=args.recipient) if args.recipient else None,
        thread=Thread(in_reply_to=args.in_reply_to) if args.in_reply_to else None,
        subject=args.subject,
        text=args.text,
        meta=meta | ({"language": args.language} if args.language else {}),
    )
    at = decision_time(args.at)
    await require_current(settings.directory_url)
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        decider = DirectoryDecider(engine, settings.routing, clock=lambda: at or utcnow())
        decision, facts = await decider.explain(message)
    finally:
        await engine.dispose()
    route = decision.route
    chain = trace(route)
    rules = topic_rules(message, facts.customer, settings.routing, route)
    if args.json:
        print(
            json.dumps(
                {
                    "customer": decision.customer.model_dump(mode="json")
                    if decision.customer
                    else None,
                    "route": route.model_dump(mode="json"),
                    "chain": [link._asdict() for link in chain],
                    "rules": [
                        {"rule": n, "place": p, "outcome": o, "why": w} for n, p, o, w in rules
                    ],
                    "meta": meta,
                    "routing_key": route.routing_key,
                    "dial": decision.dial,
                    "fallback_dial": decision.fallback_dial,
                },
                indent=2,
            )
        )
        return 0
    customer = decision.customer
    print(f"sender:    {args.channel} {message.sender.address}")
    if customer is None and facts.customer is not None:  # matched, but the sender is unproven
        print(f"customer:  {facts.customer.id} by address only, no context (unverified sender)")
    else:
        print(f"customer:  {customer.id + ' (' + customer.name + ')' if customer else 'unknown'}")
    if args.channel == "email":
        auth = meta.get("auth")
        shown = " ".join(f"{m}={auth[m]}" for m in METHODS) if auth else "none"
        assumed = " (assumed; --auth to change)" if args.auth is None else ""
        required = "required" if settings.routing.require_authenticated_email else "not required"
        print(f"auth:      {shown}{assumed}, {required}")
    if at is not None:
        print(f"at:        {at.isoformat()}")
    print("chain:")
    for number, link in enumerate(chain, 1):
        said = link.rule if link.step is None else f"{link.rule}: {link.step}"
        print(f"  {number}. {link.outcome:<11} {said}")
    if rules:
        print("rules:")
    for name, place, outcome, why in rules:
        print(f"  {name:<20} {place:<15} {outcome:<11} {why}")
    print(f"route:     {route.routing_key}")
    print(f"reason:    {route.reason}")
    if route.rule or route.tags:
        print(f"rule:      {route.rule or '-'}; tags: {', '.join(route.tags) or '-'}")
    if route.for_agent:
        print(f"for:       {route.for_agent} (a deputy stands in)")
    if route.opens_at:
        print(f"opens at:  {route.opens_at.isoformat()}")
    if route.respond_by:  # issue 16: escalated then to the team's escalate_to, unanswered
        print(f"answer by: {route.respond_by.isoformat()} (the team's first_response)")
    if args.channel == "voice":
        print(f"dial:      {decision.dial or '-'}")
        if decision.fallback_dial:
            print(f"fallback:  {decision.fallback_dial}")
    return 0
