"""Topic rules (issue 20): ``[[routing.rules]]``, an operator's conditions and one action each.

- ``TopicRule`` (``routers.rule_model``): one rule as written (``name``, conditions, one
  action), checked alone.
- ``RuleSet(rules, region)``: the rules checked together (names unique, none that can
  never match) and compiled for the hot path: the keywords of every rule in one
  ``routers.keywords.KeywordIndex``, the other conditions as frozensets. ``match()`` per
  message; ``explain()`` says for each rule why it did or did not match.

Where the policy asks (``routers.policy``): ``topic_override`` (after ``sender``, before
``thread_owner``) walks the rules with ``override_owner = true``, and every ``tag`` rule;
``topic`` (after ``dedicated_team``, before ``address``) walks the others, so they route
only what no thread owner, last agent or customer team took. In each place the first rule
whose conditions all hold decides; tag rules add their tag and never decide.

Conditions: ``channel``, ``to`` (the address it arrived on, normalised like identities:
numbers in E.164), ``keywords`` (any of, ``routers.keywords``), ``customer_team``,
``known``, ``language`` (``meta.language`` when the publisher gave one, else the
customer's ``language`` column; none: the rule does not match), ``hours`` (teams.csv's
form, in ``routing.timezone``). A condition left out holds for every message.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple
from zoneinfo import ZoneInfo

from ingest.identities import InvalidIdentity, normalise
from ingest.schema import InboundMessage
from routers.keywords import KeywordIndex, message_text
from routers.rule_model import TopicRule as TopicRule
from routers.rule_model import problems as problems_of
from routers.schedule import DAY, WeeklyHours

if TYPE_CHECKING:  # only named: the settings load rules without the directory's database layer
    from routers.directory import CustomerRecord


class Found(NamedTuple):
    """What one place of the chain found: the rule that decides (None: none), the tags
    added, and the step's text."""

    rule: TopicRule | None
    tags: tuple[str, ...]
    said: str


class _Compiled(NamedTuple):
    rule: TopicRule
    channels: frozenset[str] | None
    to: frozenset[str] | None
    keywords: frozenset[int] | None
    teams: frozenset[str] | None
    languages: frozenset[str] | None
    hours: WeeklyHours | None


class _Seen:
    """One message as the rules see it; the costly parts (folded text, recipient, local
    time) are worked out once, on first use."""

    __slots__ = ("_hits", "_local", "_message", "_to", "customer", "language", "rules", "zone")

    def __init__(
        self, rules: "RuleSet", message: InboundMessage, customer: "CustomerRecord | None"
    ) -> None:
        self.rules, self._message, self.customer = rules, message, customer
        raw = message.meta.get("language") or (customer.language if customer else None)
        self.language = str(raw).split("-")[0].strip().lower() if raw else None
        self._hits: frozenset[int] | None = None
        self._to: str | None = None
        self._local: tuple[int, int] | None = None
        self.zone: ZoneInfo | None = None

    def hits(self) -> frozenset[int]:
        if self._hits is None:
            self._hits = self.rules.found(self._message)
        return self._hits

    def to(self) -> str:
        if self._to is None:
            self._to = _recipient(self._message, self.rules.region)
        return self._to

    def local(self, now: datetime) -> tuple[int, int]:
        """(weekday, minute of the day) in ``routing.timezone``."""
        if self._local is None:
            at = now.astimezone(self.zone) if self.zone else now
            self._local = (at.weekday(), at.hour * 60 + at.minute)
        return self._local


def _recipient(message: InboundMessage, region: str) -> str:
    to = message.recipient
    if to is None:
        return ""
    try:
        return normalise(to.kind, to.address, region).casefold()
    except InvalidIdentity:
        return to.address.casefold()


def _open(hours: WeeklyHours, weekday: int, minute: int) -> bool:
    today, yesterday = hours.days[weekday], hours.days[(weekday - 1) % 7]
    return any(s <= minute < e for s, e in today) or any(
        s <= minute + DAY < e for s, e in yesterday
    )


def _miss(c: _Compiled, seen: _Seen, message: InboundMessage, now: datetime) -> str | None:
    """The first condition of ``c`` that does not hold (None: all hold); cheap ones first."""
    customer = seen.customer
    if c.channels is not None and message.channel not in c.channels:
        return "channel"
    if c.rule.known is not None and c.rule.known != (customer is not None):
        return "known"
    if c.teams is not None and (customer is None or customer.team_id not in c.teams):
        return "customer_team"
    if c.languages is not None and seen.language not in c.languages:
        return "language"
    if c.to is not None and seen.to() not in c.to:
        return "to"
    if c.hours is not None and not _open(c.hours, *seen.local(now)):
        return "hours"
    if c.keywords is not None and c.keywords.isdisjoint(seen.hits()):
        return "keywords"
    return None


class RuleSet:
    """Rules checked together and compiled; ValueError with one line per problem."""

    def __init__(self, rules: Sequence[TopicRule] = (), region: str = "US") -> None:
        self.rules = tuple(rules)
        self.region = region
        self.index = KeywordIndex()
        self._last: tuple[InboundMessage | None, frozenset[int]] = (None, frozenset())
        problems = problems_of(self.rules)
        compiled = []
        for number, rule in enumerate(self.rules, 1):
            try:
                compiled.append(self._compile(rule))
            except ValueError as exc:
                problems.append(f"rule {number} {rule.name!r}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        self._early = tuple(c for c in compiled if c.rule.early)
        self._late = tuple(c for c in compiled if not c.rule.early)
        self._candidates = {True: _by_keyword(self._early), False: _by_keyword(self._late)}
        #: every team a rule may route to or asks about (the decider reads them per batch)
        self.teams = frozenset(
            t for r in self.rules for t in (r.team, *(r.customer_team or ())) if t
        )

    def _compile(self, rule: TopicRule) -> _Compiled:
        return _Compiled(
            rule,
            _set(rule.channel),
            _set(_address(a, self.region) for a in rule.to) if rule.to else None,
            self.index.ids(rule.keywords) if rule.keywords else None,
            _set(rule.customer_team),
            _set(lang.split("-")[0].strip().lower() for lang in rule.language)
            if rule.language
            else None,
            WeeklyHours.parse(rule.hours) if rule.hours is not None else None,
        )

    def __len__(self) -> int:
        return len(self.rules)

    def found(self, message: InboundMessage) -> frozenset[int]:
        """The keywords ``message`` contains; the last message's are kept, as both places
        of the chain ask about the same message one after the other."""
        last, hits = self._last
        if last is not message:
            hits = self.index.found(message_text(message.subject, message.text))
            self._last = (message, hits)
        return hits

    def match(
        self,
        message: InboundMessage,
        customer: "CustomerRecord | None",
        now: datetime,
        zone: ZoneInfo,
        *,
        early: bool,
    ) -> Found:
        """The first deciding rule of one place (``early``: topic_override) whose conditions
        hold, with the tags of the tag rules that hold (early only)."""
        compiled = self._early if early else self._late
        if not compiled:
            return Found(None, (), "no override_owner or tag rules" if early else "no rules here")
        seen = _Seen(self, message, customer)
        seen.zone = zone
        tags: list[str] = []
        keyless, by_keyword = self._candidates[early]
        order: Iterable[int] = range(len(compiled))
        if by_keyword:  # only the rules whose keywords the message has, or that have none
            wanted = set(keyless)
            for number in seen.hits():
                wanted.update(by_keyword.get(number, ()))
            order = sorted(wanted)
        for i in order:
            c = compiled[i]
            if _miss(c, seen, message, now) is not None:
                continue
            if c.rule.tag is not None:
                tags.append(c.rule.tag)
                continue
            tagged = f", tags {', '.join(tags)}" if tags else ""
            return Found(
                c.rule, tuple(tags), f"rule {c.rule.name} matches: {c.rule.action}{tagged}"
            )
        said = f"none of {len(compiled)} rules decides"
        return Found(None, tuple(tags), said + (f", tags {', '.join(tags)}" if tags else ""))

    def explain(
        self,
        message: InboundMessage,
        customer: "CustomerRecord | None",
        now: datetime,
        zone: ZoneInfo,
    ) -> list[tuple[TopicRule, str | None, str]]:
        """Each rule in order with the condition that did not hold (None: all held) and
        what was looked at, for ``route explain``."""
        seen = _Seen(self, message, customer)
        seen.zone = zone
        out = []
        for c in (*self._early, *self._late):
            miss = _miss(c, seen, message, now)
            out.append((c.rule, miss, _looked_at(miss, c.rule, seen, message, now)))
        return out


def _looked_at(
    miss: str | None, rule: TopicRule, seen: _Seen, message: InboundMessage, now: datetime
) -> str:
    if miss is None:
        return "every condition holds"
    customer = seen.customer
    found: dict[str, str] = {
        "channel": f"{message.channel} is not {', '.join(rule.channel or ())}",
        "known": "the sender is " + ("a customer" if customer else "unknown"),
        "customer_team": f"the customer's team is {customer.team_id if customer else 'none'}",
        "language": f"language {seen.language or 'unknown'} is not "
        + ", ".join(rule.language or ()),
        "to": f"it arrived on {seen.to() or 'no address'}",
        "hours": f"{now.astimezone(seen.zone):%a %H:%M} is outside {rule.hours}",
        "keywords": f"none of {', '.join(rule.keywords or ())} begins a word",
    }
    return found[miss]


def _by_keyword(compiled: Sequence[_Compiled]) -> tuple[list[int], dict[int, list[int]]]:
    """The positions of the rules without keywords, and of those with each keyword."""
    keyless: list[int] = []
    by_keyword: dict[int, list[int]] = {}
    for i, c in enumerate(compiled):
        if c.keywords is None:
            keyless.append(i)
        for number in c.keywords or ():
            by_keyword.setdefault(number, []).append(i)
    return keyless, by_keyword


def _set(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _address(text: str, region: str) -> str:
    """A ``to`` address as the recipient of a message is compared: normalised by its look."""
    text = text.strip()
    try:
        if text.startswith("@") or text.casefold().startswith("id:"):
            return normalise("twitter", text, region).casefold()
        if "@" in text:
            return normalise("email", text, region).casefold()
        if not text.startswith("+"):
            raise ValueError(f"to {text!r}: write numbers in E.164 (+905321112233)")
        return normalise("phone", text, region).casefold()
    except InvalidIdentity as exc:
        raise ValueError(f"to: {exc}") from None
