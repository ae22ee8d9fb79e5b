"""What the routing policy's rules read and return (``routers.policy``): the facts the
decider read for one message, a rule's ``Verdict``, and the ``Walk`` of one decision."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from ingest.schema import ReasonName, RouteKind
from routers.availability import AgentFacts
from routers.directory import CustomerRecord, TeamRecord
from routers.schedule import Schedule


@dataclass(frozen=True)
class TeamFacts:
    """A team a route may name, with its calendar (None: always open)."""

    record: TeamRecord
    schedule: Schedule | None = None


@dataclass(frozen=True)
class Facts:
    """What the decider read for one message: the rules' only view of the directory and the
    routing state. ``team``: the customer's team as the directory has it (None: none, or
    one it lacks). ``teams``: every team a route may name (the customer's, the address's,
    the default, their after-hours teams) with their calendars (issue 15)."""

    customer: CustomerRecord | None
    thread_owner: AgentFacts | None = None
    last_agent: AgentFacts | None = None
    last_agent_at: datetime | None = None
    team: TeamRecord | None = None
    teams: Mapping[str, TeamFacts] = field(default_factory=dict)

    @property
    def agents(self) -> tuple[AgentFacts, ...]:
        """Each agent this message involves, once: the thread owner, then the last agent."""
        owner, last = self.thread_owner, self.last_agent
        if owner is not None and last is not None and last.id == owner.id:
            last = None
        return tuple(agent for agent in (owner, last) if agent is not None)


class Verdict(NamedTuple):
    """A rule's decision; ``decide()`` makes the ``Route`` of it."""

    kind: RouteKind
    target: str | None
    reason: ReasonName
    #: the agent a deputy stands in for
    for_agent: str | None = None
    #: when the team, closed now, opens next
    opens_at: datetime | None = None


@dataclass
class Walk:
    """One walk of the chain: the steps so far, and what an earlier rule found that a later
    rule's reason depends on (the sender is unproven, an agent was not available)."""

    rule: str = ""
    steps: list[str] = field(default_factory=list)
    unproven: bool = False
    fallback: ReasonName | None = None
    #: issue 20: the tags of the topic rules that matched, and the rule that decided
    tags: list[str] = field(default_factory=list)
    topic: str | None = None

    def step(self, text: str) -> None:
        self.steps.append(f"{self.rule}: {text}")
