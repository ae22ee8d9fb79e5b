"""Writes docs/CONFIGURATION.md from the settings models, so the reference cannot drift from
the code (a test compares the two). Usage: python scripts/config_reference.py [--check]"""

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from config.settings import Settings

OUT = Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md"
SECRETS = "a secret: give it as a file in the credentials directory, named after the key"

HEADER = """# Configuration reference

Generated from the settings models by `python scripts/config_reference.py`; do not edit.

omniroute reads a TOML file (`--config FILE` or `OMNIROUTE_CONFIG`). Every key can be
overridden by an environment variable `OMNIROUTE_<KEY>`, sections joined with `__`
(`OMNIROUTE_ROUTING__DEFAULT_TEAM=billing`). Secrets are read from one file per key in
`$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) or `OMNIROUTE_SECRETS_DIR`: the file
`twilio.auth_token` sets `twilio.auth_token`; a mailbox's password is
`mailbox.<name>.password`. Unknown keys are errors; a bad value stops the start with one
line naming the key. Durations are seconds, or ISO 8601 (`P14D`, `PT30S`) where the type
says duration.
"""


def _type(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is not None and str(origin) in ("typing.Literal",):
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if annotation is SecretStr:
        return "secret string"
    if annotation is timedelta:
        return "duration"
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and origin is not list and origin is not dict:
        inner = " or ".join(_type(a) for a in args)
        return inner + (" (optional)" if len(args) < len(get_args(annotation)) else "")
    if origin is list:
        return f"list of {_type(get_args(annotation)[0])}"
    if origin is dict:
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return ""
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, SecretStr):
        return f"`{value.get_secret_value()}`"  # a default is public, never a real secret
    if isinstance(value, timedelta):
        return f"{value.days} days" if value.days else f"{value.total_seconds():g} s"
    if isinstance(value, Path):
        return "`$STATE_DIRECTORY` or `./var`"
    return "none" if value is None else f"`{value}`"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *get_args(annotation)]
    for candidate in candidates:
        if get_origin(candidate) is list:
            candidate = get_args(candidate)[0]
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        key = prefix + name
        sub = _model_of(info.annotation)
        if sub is not None:
            list_of = get_origin(info.annotation) is list
            nested.append((key + ("[]" if list_of else ""), sub))
            continue
        text = (info.description or "").replace("\n", " ")
        if info.annotation is SecretStr or "SecretStr" in str(info.annotation):
            text = f"{text}; {SECRETS}" if text else SECRETS
        out.append((key, _type(info.annotation), _default(info), text))
    for key, sub in nested:
        out.extend(rows(sub, key + "."))
    return out


ROUTING_INTRO = """
## Routing steps and reasons

The policy's rules, in order: `bounce`, `customer`, `sender`, `topic_override`,
`thread_owner`, `last_agent`, `dedicated_team`, `topic`, `address`, `default_team`, `triage`
(README, "How a message is routed"; `topic_override` and `topic` ask `[[routing.rules]]`,
README "Topic rules").
Every reason `route.reason` can take is listed by `omniroute schema`. What the keys above
and the directory's columns decide:
"""
#: (reasons, what sets them)
ROUTING_ROWS = [
    (
        "`thread_owner`, `last_agent`",
        "the agent who sent the thread / last answered (`routing.sticky_for`, "
        "`routing.sticky_channels`)",
    ),
    (
        "`deputy`",
        "the agent is away, offline (until an `agent.status`'s `until`) or "
        "outside their hours, and their deputy can take it; `route.for_agent` "
        "names the agent",
    ),
    (
        "`thread_owner_fallback`, `last_agent_fallback`",
        "the agent cannot take it and no deputy can: the customer's team",
    ),
    (
        "`thread_owner_busy`, `last_agent_busy`",
        "agents.csv `capacity` reached on the message's channel (open assignments"
        " within `routing.load_window`)",
    ),
    (
        "`offer_timeout`, `declined`",
        "an offer (`routing.offer_timeout`) not accepted in time, or declined: routed again"
        " without the agent, `route.attempt` + 1, `route.previous`",
    ),
    (
        "`topic`",
        "a `[[routing.rules]]` rule matched (`route.rule` names it): after the thread owner, "
        "last agent and customer's team, or before them with `override_owner = true`; "
        "`tag` rules add to `route.tags` and never decide",
    ),
    (
        "`dedicated_team`",
        "the customer's team",
    ),
    (
        "`after_hours`, `holiday`",
        "the team is closed (teams.csv `timezone` (default `routing.timezone`), "
        "`hours`, `holidays`; holidays.csv) and its `after_hours` team is open",
    ),
    (
        "`unknown_sender`, `no_team`",
        "the address's team (`routing.address_teams`), `routing.default_team`, or `triage`",
    ),
    (
        "`unverified_sender`",
        "`routing.require_authenticated_email`, `email.trusted_authserv_ids`",
    ),
    (
        "`bounce`",
        "a delivery report: `triage`",
    ),
]
ROUTING_OUTRO = """
A team that is closed with no open after-hours team keeps the message and sets
`route.opens_at`; a call gets the team's `after_hours_dial`.
"""


def render() -> str:
    lines = [HEADER, "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, text in rows(Settings):
        lines.append(f"| `{key}` | {typ} | {default} | {text} |")
    table = ["| reason | set by |", "|---|---|", *(f"| {a} | {b} |" for a, b in ROUTING_ROWS)]
    return "\n".join(lines) + "\n" + ROUTING_INTRO + "\n" + "\n".join(table) + "\n" + ROUTING_OUTRO


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        return 0 if OUT.exists() and OUT.read_text(encoding="utf-8") == text else 1
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
