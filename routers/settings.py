"""Settings of the routing policy and the router worker."""

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ingest.schema import Channel
from routers.rule_file import load_rule_file
from routers.rules import RuleSet, TopicRule
from routers.schedule import parse_timezone


class RoutingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_region: str = Field(
        default="US", description="ISO 3166 region for numbers written without a country code"
    )
    sticky_for: timedelta = Field(
        default=timedelta(days=14), description="how long the last agent keeps a customer"
    )
    sticky_channels: list[Channel] = Field(
        default=["email", "sms", "twitter", "whatsapp"],
        description="channels on which the last agent keeps the customer (voice goes to the team)",
    )
    default_team: str | None = Field(
        default=None, description="team for unknown senders when the address has none"
    )
    address_teams: dict[str, str] = Field(
        default_factory=dict,
        description="team per address a message arrived on (a mailbox, a number, an X account)",
    )
    recent_contacts: int = Field(
        default=5, ge=0, le=100, description="recent contacts carried in each routed message"
    )
    routed_log_days: int = Field(
        default=90,
        ge=1,
        description="days the record of routed messages and sent replies is kept (it serves "
        "recent contacts, reply threading and duplicate removal)",
    )
    timezone: str = Field(
        default="UTC",
        description="IANA time zone of a team's hours when teams.csv gives none (issue 15)",
    )
    load_window: timedelta = Field(
        default=timedelta(hours=8),
        description="how long a message routed to an agent and not answered counts towards "
        "the agent's capacity on its channel (an assignment.closed event or the agent's reply "
        "ends it sooner)",
    )
    offer_timeout: dict[Channel, timedelta] = Field(
        default_factory=dict,
        description="per channel: a message routed to an agent is an offer; not accepted "
        "(assignment.accepted, or the agent's reply to that customer) within this time, or "
        "declined, it is routed again without the agent (reason offer_timeout or declined, "
        "route.attempt 2, AMQP message_id <id>#2). A channel left out: no offers (issue 16)",
    )
    max_escalations: int = Field(
        default=3,
        ge=0,
        le=10,
        description="how many times a message without a first answer escalates along teams.csv's "
        "escalate_to chain (issue 16); 0: sla.breached is still published, nothing re-routed",
    )
    require_authenticated_email: bool | None = Field(
        default=None,
        description="a mail whose sender is not proven (DMARC fail, or no SPF, DKIM or DMARC "
        "pass from a server in email.trusted_authserv_ids) never goes to a thread owner or "
        "last agent and carries no customer context: it goes to the customer's team (or the "
        "address, default team or triage) with the reason unverified_sender. Unset: true "
        "when email.trusted_authserv_ids is set",
    )
    rules: list[TopicRule] = Field(
        default_factory=list,
        max_length=1000,
        description='topic rules (issue 20; README, "Topic rules"): [[routing.rules]] '
        "tables, each a name, conditions that must all hold and one action. Asked after the "
        "thread owner, last agent and the customer's team (override_owner = true: before "
        "them); the first that matches decides, reason topic, route.rule its name",
    )
    shadow_rules: Path | None = Field(
        default=None,
        description="a file of candidate [[rules]]: every message is decided with them too, "
        "and where the route differs it is counted (omniroute_shadow_diff_total), logged "
        "once and recorded for `omniroute rules diff`; the live route is never changed",
    )
    _topics: RuleSet = PrivateAttr(default_factory=RuleSet)
    _candidate: RuleSet | None = PrivateAttr(default=None)
    #: (the settings it was made from, the shadow settings): a copy of these settings
    #: (``model_copy`` keeps private attributes) makes its own
    _shadow_of: "tuple[object, RoutingSettings] | None" = PrivateAttr(default=None)

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        import phonenumbers

        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region {value!r} (use an ISO 3166 code such as TR or US)")
        return region

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return parse_timezone(value).key

    @field_validator("offer_timeout")
    @classmethod
    def _offers(cls, value: dict[Channel, timedelta]) -> dict[Channel, timedelta]:
        for channel, after in value.items():
            if channel == "voice":  # a call is answered or not within seconds, by the PBX
                raise ValueError("voice: calls are not offered (the PBX rings the agent)")
            if after.total_seconds() <= 0:
                raise ValueError(f"{channel}: must be positive")
        return value

    @field_validator("rules")
    @classmethod
    def _rules(cls, value: list[TopicRule], info: ValidationInfo) -> list[TopicRule]:
        RuleSet(value, info.data.get("default_region", "US"))  # refused here: the key is named
        return value

    @field_validator("shadow_rules")
    @classmethod
    def _shadow_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            load_rule_file(value, info.data.get("default_region", "US"))
        return value

    @model_validator(mode="after")
    def _compile_rules(self) -> "RoutingSettings":
        """Check the rules together (names, shadowed rules) and compile them once; load the
        shadow candidate the same way."""
        self._topics = RuleSet(self.rules, self.default_region)
        if self.shadow_rules is not None:
            self._candidate = load_rule_file(self.shadow_rules, self.default_region).rules
        return self

    # The two properties below are read for every message. They read the private values
    # from ``__pydantic_private__`` themselves: pydantic's ``__getattr__`` for a private
    # attribute costs about 3 µs (a ``hasattr`` that raises inside), 60 times the lookup.
    @property
    def topics(self) -> RuleSet:
        """``rules``, compiled (``routers.rules``)."""
        topics: RuleSet = self.__pydantic_private__["_topics"]  # type: ignore[index]
        return topics

    @property
    def shadow(self) -> "RoutingSettings | None":
        """These settings with the candidate rules of ``shadow_rules`` (None: not set)."""
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
        candidate = private["_candidate"]
        if candidate is None:
            return None
        made = private["_shadow_of"]
        if made is None or made[0] is not self:
            made = self._shadow_of = (self, self.with_topics(candidate))
        return cast("RoutingSettings", made[1])

    def with_topics(self, topics: RuleSet) -> "RoutingSettings":
        """A copy deciding with ``topics`` instead (and no shadow of its own)."""
        copy = self.model_copy(update={"rules": list(topics.rules)})
        copy._topics, copy._candidate, copy._shadow_of = topics, None, None
        return copy

    @field_validator("sticky_for", "load_window")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0:
            raise ValueError("must not be negative")
        return value


class AckSettings(BaseModel):
    """``[ack]``: an acknowledgement to the customer on the first message of a conversation
    (issue 16). Absent: none is sent."""

    model_config = ConfigDict(extra="forbid")

    quiet_for: timedelta = Field(
        default=timedelta(hours=24),
        description="a message is the first of a conversation when the customer had no contact "
        "for this long; a customer gets at most one acknowledgement in this time, across "
        "channels and instances",
    )
    default_language: Literal["tr", "en"] = Field(
        default="en",
        description="the templates' language for a customer without customers.csv's language",
    )
    unknown_senders: bool = Field(
        default=False, description="acknowledge senders the directory does not know too"
    )
    channels: list[Channel] = Field(
        default=["email", "sms", "whatsapp", "twitter"],
        description="channels on which an acknowledgement is sent (never voice)",
    )
    templates: Path | None = Field(
        default=None,
        description="a directory of the operator's own templates (<channel>.<language>.txt, "
        "<language>.txt), used before the ones shipped with omniroute",
    )

    @field_validator("quiet_for")
    @classmethod
    def _quiet(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[Channel]) -> list[Channel]:
        if "voice" in value:
            raise ValueError("voice: a call cannot be acknowledged by a message")
        return value


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefetch: int = Field(
        default=256, ge=1, le=65535, description="messages each worker takes in at once"
    )
    directory_cache_ttl: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="seconds a directory lookup (customer by identity, team, agent) is reused "
        "by the decider; for as long again it is still used while one background read "
        "refreshes it, so a directory change is seen this much later plus that read (0: read "
        "every time). Routing state (last agent, presence) is always read fresh",
    )


class DirectorySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool_size: int = Field(
        default=5, ge=1, le=100, description="PostgreSQL connections per process"
    )
    statement_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds a database connect or statement may take (SQLite: how long a "
        "statement waits for another writer's lock before it fails and is retried)",
    )


class EventsSettings(BaseModel):
    """How far events and reply requests from ticket systems are believed (issue 13)."""

    model_config = ConfigDict(extra="forbid")

    max_clock_skew: timedelta = Field(
        default=timedelta(minutes=5),
        description="how far in the future an event's `at` may lie (a publisher's clock "
        "running ahead); further, it is dead-lettered as future_timestamp instead of pinning a "
        "customer or a presence for ever",
    )
    trusted_publishers: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="broker user names whose events and reply requests are believed, read "
        "from the AMQP user_id property (which RabbitMQ checks against the publishing "
        "connection's user); others, and messages without user_id, are dead-lettered as "
        "untrusted_publisher. omniroute's own user (from amqp_url) is always trusted. Empty: "
        "every publisher is believed",
    )

    @field_validator("max_clock_skew")
    @classmethod
    def _skew(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("trusted_publishers")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or len(name) > 255:
                raise ValueError(f"not a broker user name: {name[:40]!r}")
        return value


class DispatchSettings(BaseModel):
    """The outbound dispatcher's retries and concurrency (``routers.dispatcher``); here, not
    beside the dispatcher, so that loading the settings imports no routing machinery."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(
        default=5, ge=1, le=50, description="tries of a transient send failure before giving up"
    )
    base_delay: float = Field(default=1.0, gt=0, description="first pause between tries, s")
    max_delay: float = Field(default=30.0, gt=0, description="longest pause between tries, s")
    prefetch: int = Field(default=16, ge=1, le=1000, description="replies sent concurrently")
