"""``omniroute route explain``: the decision for a sender, with every policy step shown."""

import argparse
import json

from config.settings import Settings
from ingest.identities import IdentityKind
from ingest.schema import Identity, InboundMessage, Thread
from routers.db import create_engine, require_current
from routers.decider import Decider

KINDS: dict[str, IdentityKind] = {
    "email": "email",
    "sms": "phone",
    "voice": "phone",
    "twitter": "twitter",
}


async def explain(args: argparse.Namespace, settings: Settings) -> int:
    kind = KINDS[args.channel]
    message = InboundMessage(
        channel=args.channel,
        external_id="explain",
        sender=Identity(kind=kind, address=args.sender),
        recipient=Identity(kind=kind, address=args.recipient) if args.recipient else None,
        thread=Thread(in_reply_to=args.in_reply_to) if args.in_reply_to else None,
    )
    await require_current(settings.directory_url)
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        decision, _facts = await Decider(engine, settings.routing).explain(message)
    finally:
        await engine.dispose()
    route = decision.route
    if args.json:
        print(
            json.dumps(
                {
                    "customer": decision.customer.model_dump(mode="json")
                    if decision.customer
                    else None,
                    "route": route.model_dump(mode="json"),
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
    print(f"customer:  {customer.id + ' (' + customer.name + ')' if customer else 'unknown'}")
    for number, step in enumerate(route.steps, 1):
        print(f"  {number}. {step}")
    print(f"route:     {route.routing_key}")
    print(f"reason:    {route.reason}")
    if args.channel == "voice":
        print(f"dial:      {decision.dial or '-'}")
        if decision.fallback_dial:
            print(f"fallback:  {decision.fallback_dial}")
    return 0
