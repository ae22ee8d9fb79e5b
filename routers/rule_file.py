"""A rule set in a file of its own (issue 20): the candidate of ``routing.shadow_rules`` and
the file ``omniroute rules test`` replays messages through.

The file holds ``[[rules]]`` tables (the keys of ``[[routing.rules]]``) and, for ``rules
test``, ``[[samples]]`` tables: ``message`` (an InboundMessage's ``id`` or ``external_id``
in the messages replayed) and ``expect`` (the routing key it must get: ``team.billing``,
``agent.ayse``, ``triage``). A whole omniroute configuration file works too: its
``[[routing.rules]]`` are taken.
"""

import tomllib
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from routers.rules import RuleSet, TopicRule


class Sample(BaseModel):
    """An expectation of ``rules test``."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, description="the id or external_id of a replayed message")
    expect: str = Field(pattern=r"^(triage|team\..+|agent\..+)$", description="its routing key")


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[TopicRule] = Field(default_factory=list, max_length=1000)
    samples: list[Sample] = Field(default_factory=list)


class RuleFile(NamedTuple):
    rules: RuleSet
    samples: list[Sample]


def load_rule_file(path: Path, region: str) -> RuleFile:
    """The file's rules, checked and compiled, and its samples; ValueError in one line."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    if "rules" not in data and isinstance(data.get("routing"), dict):
        data = {"rules": data["routing"].get("rules", []), "samples": data.get("samples", [])}
    try:
        parsed = _File.model_validate(data)
        return RuleFile(RuleSet(parsed.rules, region), parsed.samples)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]) or "(root)"
            message = error["msg"].removeprefix("Value error, ")
            problems.append(
                f"{key}: {'unknown key' if error['type'] == 'extra_forbidden' else message}"
            )
        raise ValueError(f"{path}: {'; '.join(problems)}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
