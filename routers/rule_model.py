"""A topic rule as the operator writes it (issue 20; ``routers.rules`` compiles and matches
them): ``TopicRule``, one ``[[routing.rules]]`` table checked alone, and ``problems`` of a
list of them checked together (names used twice, rules that can never match because an
earlier one in the same place takes every message they would)."""

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ingest.schema import Channel
from routers.keywords import prefix_of
from routers.schedule import WeeklyHours

_LISTS = ("channel", "to", "keywords", "customer_team", "language")


class TopicRule(BaseModel):
    """One ``[[routing.rules]]`` table. A condition left out holds for every message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="unique; shown as route.rule, in route explain and in the shadow metric",
    )
    override_owner: bool = Field(
        default=False,
        description="true: asked before the thread owner, last agent and the customer's team "
        "(the rule takes the message from them); false: only for what none of them took "
        "(unknown senders, customers without a team)",
    )
    channel: list[Channel] | None = Field(default=None, description="any of these channels")
    to: list[str] | None = Field(
        default=None,
        description="any of these arrival addresses (mailbox, number in E.164, @X account)",
    )
    keywords: list[str] | None = Field(
        default=None,
        description="any of these at the start of a word of the subject or text (fatura: "
        "Faturamı, FATURASI), Turkish-aware case",
    )
    customer_team: list[str] | None = Field(
        default=None, description="the customer's team is one of these (needs override_owner)"
    )
    known: bool | None = Field(
        default=None, description="true: the sender is a customer in the directory; false: not"
    )
    language: list[str] | None = Field(
        default=None,
        description="meta.language of the message, else the customer's language column "
        "(tr matches tr-TR); a message with neither does not match",
    )
    hours: str | None = Field(
        default=None,
        description="only within these weekly hours (Mon-Fri 09:00-18:00), routing.timezone",
    )
    team: str | None = Field(default=None, description="action: route to this team")
    triage: bool = Field(default=False, description="action: route to triage")
    tag: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
        description="action: add this tag to route.tags; the target is not changed",
    )

    @field_validator(*_LISTS, mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*_LISTS)
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(v.strip() for v in value)):
            raise ValueError("empty: give at least one value, or leave the key out")
        return value

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: str | None) -> str | None:
        return None if value is None else str(WeeklyHours.parse(value))

    @model_validator(mode="after")
    def _one_action(self) -> "TopicRule":
        actions = [a for a in (self.team, self.triage or None, self.tag) if a]
        if len(actions) != 1:
            raise ValueError(f"rule {self.name!r}: give one action: team, triage = true or tag")
        if self.known is False and self.customer_team:
            raise ValueError(f"rule {self.name!r}: never matches: known = false with customer_team")
        if self.customer_team and not (self.override_owner or self.tag):
            raise ValueError(
                f"rule {self.name!r}: never matches: a customer with a team goes to that team "
                "before this rule (set override_owner = true)"
            )
        return self

    @property
    def early(self) -> bool:
        """Asked in ``topic_override`` (before the customer's own people)."""
        return self.override_owner or self.tag is not None

    @property
    def action(self) -> str:
        return f"tag {self.tag}" if self.tag else f"team.{self.team}" if self.team else "triage"


def problems(rules: Sequence[TopicRule]) -> list[str]:
    """Duplicate names, and rules an earlier one shadows (it decides in the same place for
    every message this one would match)."""
    problems, seen = [], set()
    for number, rule in enumerate(rules, 1):
        if rule.name in seen:
            problems.append(f"rule {number}: name {rule.name!r} is used twice")
        seen.add(rule.name)
        if rule.tag is not None:
            continue
        for earlier in rules[: number - 1]:
            if earlier.tag is None and earlier.early == rule.early and covers(earlier, rule):
                problems.append(
                    f"rule {number} {rule.name!r} can never match: rule {earlier.name!r} "
                    "before it takes every message it would"
                )
                break
    return problems


def covers(a: TopicRule, b: TopicRule) -> bool:
    """Whether every message ``b``'s conditions hold for, ``a``'s hold for too."""
    for key in ("channel", "to", "customer_team", "language"):
        mine, theirs = getattr(a, key), getattr(b, key)
        if mine is not None and (theirs is None or not set(theirs) <= set(mine)):
            return False
    if a.known is not None and a.known != b.known:
        return False
    if a.hours is not None and (b.hours is None or not _within(b.hours, a.hours)):
        return False
    if a.keywords is not None:
        if b.keywords is None:
            return False
        return all(any(prefix_of(k, kb) for k in a.keywords) for kb in b.keywords)
    return True


def _within(inner: str, outer: str) -> bool:
    small, big = WeeklyHours.parse(inner), WeeklyHours.parse(outer)
    return all(
        any(s >= bs and e <= be for bs, be in big_day)
        for day, big_day in zip(small.days, big.days, strict=True)
        for s, e in day
    )
