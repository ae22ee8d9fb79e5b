"""Settings: a TOML file (``--config`` or ``OMNIROUTE_CONFIG``), overridden by ``OMNIROUTE_*``
environment variables (``__`` for nesting), with secrets from files in a directory
(``$CREDENTIALS_DIRECTORY`` under systemd's ``LoadCredential=``, else ``$OMNIROUTE_SECRETS_DIR``).

A secret file is named after its key: ``twilio.auth_token`` (or ``twilio__auth_token``),
``api.token``, ``amqp_url``; a mailbox password is ``mailbox.<name>.password``.
"""

import json
import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from config import registry
from connectors.addresses import url_problem
from connectors.settings import (
    ApiSettings,
    EmailSettings,
    HttpSettings,
    SmtpSettings,
    SpoolSettings,
    TwilioSettings,
    TwitterSettings,
)
from ingest.errors import ConfigError
from ingest.settings import BusSettings, MetricsSettings, amqp_nodes
from routers.settings import (
    AckSettings,
    DirectorySettings,
    DispatchSettings,
    EventsSettings,
    RouterSettings,
    RoutingSettings,
)
from routers.store.engine import normalise_url

COMPONENTS = registry.COMPONENTS  # derived from the channel table: never listed here
_TOML: ContextVar[Path | None] = ContextVar("omniroute_toml", default=None)


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: JSON lines unless the log stream is a terminal; `omniroute run` "
        "logs to stdout, every other command to stderr (its stdout is its output alone, "
        "audit lines such as `customer.identities_shown` included on stderr)",
    )
    level: Literal["debug", "info", "warning", "error"] = "info"
    redact: bool = Field(default=True, description="redact customer identities in logs")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OMNIROUTE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="the broker: one URL, or the nodes of one cluster as a list of URLs (in "
        "the environment or a credential file: a JSON list, or the URLs separated by commas) "
        "sharing user, vhost and parameters; each process tries them in a shuffled order and "
        "moves to another node when its connection is lost (docs/OPERATIONS.md, Several "
        "broker nodes). Add ?heartbeat=N to override bus.heartbeat",
    )
    database_url: str | None = Field(
        default=None, description="default: SQLite file directory.db in state_dir"
    )
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "var")).absolute(),
        description="the SQLite directory and the webhook spool live here",
    )
    components: list[Literal[COMPONENTS]] = Field(  # type: ignore[valid-type]
        default=list(COMPONENTS),
        description="components this process runs; those without configuration are skipped",
    )
    shutdown_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds SIGTERM may take to drain before what is left is cancelled",
    )
    watchdog_interval: float | None = Field(
        default=None,
        gt=0,
        description="seconds between WATCHDOG=1 when not set by systemd's WATCHDOG_USEC",
    )

    bus: BusSettings = BusSettings()
    routing: RoutingSettings = RoutingSettings()
    router: RouterSettings = RouterSettings()
    directory: DirectorySettings = DirectorySettings()
    dispatch: DispatchSettings = DispatchSettings()
    events: EventsSettings = EventsSettings()
    ack: AckSettings | None = None
    http: HttpSettings = HttpSettings()
    api: ApiSettings = ApiSettings()
    twilio: TwilioSettings = TwilioSettings()
    email: EmailSettings = EmailSettings()
    smtp: SmtpSettings | None = None
    twitter: TwitterSettings | None = None
    spool: SpoolSettings = SpoolSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()

    @field_validator("amqp_url", mode="before")
    @classmethod
    def _amqp_url(cls, value: object) -> object:
        """One broker URL, or several nodes (issue 18: a list, a JSON list or URLs joined by
        commas), each checked (issue 19: a list used to start a daemon that connected
        nowhere); kept as one secret, the URLs joined by commas. Errors never show a URL."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"is not a JSON list of URLs {AMQP_EXPECTED}") from None
        if isinstance(value, str):
            nodes: list[object] = list(amqp_nodes(value))
        elif isinstance(value, list | tuple):
            nodes = [n.get_secret_value() if isinstance(n, SecretStr) else n for n in value]
        else:
            return value  # pydantic says what it is not
        if not all(isinstance(node, str) for node in nodes):
            raise ValueError(f"is a list with something else than URLs {AMQP_EXPECTED}")
        if (problem := amqp_nodes_problem([str(n) for n in nodes])) is not None:
            raise ValueError(f"{problem} {AMQP_EXPECTED}")
        return SecretStr(",".join(str(n) for n in nodes))

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and (problem := database_url_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _resolve_require_authenticated_email(self) -> "Settings":
        """The router gets a plain bool: unset means "on once trusted servers are named"."""
        if self.routing.require_authenticated_email is None:
            required = bool(self.email.trusted_authserv_ids)
            self.routing = self.routing.model_copy(update={"require_authenticated_email": required})
        return self

    @property
    def directory_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'directory.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            SecretFilesSource(settings_cls),
        ]
        toml = _TOML.get()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


AMQP_EXPECTED = "(expected amqp://user:password@host[:port][/vhost], or amqps://…)"
#: the drivers the directory runs on (``routers.store.engine.normalise_url`` picks them)
DATABASE_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")


def amqp_url_problem(url: str) -> str | None:
    """What is wrong with one node's URL, or None: a comma is refused rather than read as
    part of a host name (several nodes are several URLs); ``heartbeat`` a number."""
    if "," in url:
        return "names several nodes in one URL (give one URL per node, in a list)"
    if (problem := url_problem(url, ("amqp", "amqps"))) is not None:
        return problem
    heartbeat = parse_qs(urlsplit(url).query).get("heartbeat", ["0"])
    if len(heartbeat) != 1 or not heartbeat[0].isdigit():
        return "has a heartbeat that is not a whole number of seconds"
    return None


def amqp_nodes_problem(nodes: list[str]) -> str | None:
    """What is wrong with the nodes ``amqp_url`` names, or None: each must be a good URL,
    none twice, and all of one cluster's users, vhost and parameters, as every node must
    accept what a process publishes as its user (``user_id``) on the same topology."""
    if not nodes:
        return "names no node"
    for number, node in enumerate(nodes, 1):
        if (problem := amqp_url_problem(node)) is not None:
            return problem if len(nodes) == 1 else f"node {number}: {problem}"
    parts = [urlsplit(node) for node in nodes]
    if len({(p.hostname, p.port) for p in parts}) < len(parts):
        return "names a node twice"
    shared = {(p.scheme, p.username, p.password, p.path.strip("/"), p.query) for p in parts}
    if len(shared) > 1:
        return "names nodes that differ in scheme, user, password, vhost or ?parameters"
    return None


def database_url_problem(url: str) -> str | None:
    """What is wrong with ``database_url``, or None; the error never shows the URL."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "has spaces or control characters"
    try:
        parsed = make_url(normalise_url(url))
    except ConfigError as exc:
        return str(exc).removeprefix("database_url: ").split(":", 1)[0]
    except ValueError:
        return "has a port that is not a number from 1 to 65535"
    if parsed.drivername not in DATABASE_DRIVERS:
        return f"driver {parsed.drivername} is not supported (use sqlite:// or postgresql://)"
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return "has a port that is not a number from 1 to 65535"
    if parsed.drivername.startswith("sqlite") and not parsed.database:
        return "names no SQLite file (sqlite:////absolute/path.db)"
    return None


class SecretFilesSource(PydanticBaseSettingsSource):
    """Reads one file per secret from ``$CREDENTIALS_DIRECTORY`` or ``OMNIROUTE_SECRETS_DIR``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        directory = secrets_directory()
        if directory is None:
            return {}
        out: dict[str, Any] = {}
        for path in sorted(directory.iterdir()):
            name = path.name.replace("__", ".")
            if not path.is_file() or name.startswith("mailbox."):
                continue
            parts = name.split(".")
            if parts[0] not in Settings.model_fields:
                continue
            node = out
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = path.read_text(encoding="utf-8").strip()
        return out


def secrets_directory() -> Path | None:
    for candidate in (
        os.environ.get("CREDENTIALS_DIRECTORY"),
        os.environ.get("OMNIROUTE_SECRETS_DIR"),
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def config_path(explicit: str | None) -> Path | None:
    """``--config``, else ``OMNIROUTE_CONFIG``; None means environment and defaults only."""
    raw = explicit or os.environ.get("OMNIROUTE_CONFIG")
    return Path(raw) if raw else None


def load_settings(path: Path | None) -> Settings:
    """Load and validate; every problem becomes one ``ConfigError`` line naming the key."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    token = _TOML.set(path)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(describe(exc, path)) from exc
    except SettingsError as exc:  # an environment variable that is not the JSON it must be
        raise ConfigError(_describe_source_error(exc)) from None
    finally:
        _TOML.reset(token)
    return _with_mailbox_passwords(settings)


def describe(exc: ValidationError, path: Path | None) -> str:
    """One line; a problem whose value came from the environment or a credential file
    names that source, the others the TOML file (issue 17: an environment variable's bad
    value was blamed on the file)."""
    from_file, elsewhere = [], []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        source = _source_of(error["loc"])
        if source is None:
            from_file.append(f"{key}: {message}")
        else:
            elsewhere.append(f"{source}: {key}: {message}")
    where = f"{path}: " if path and from_file else ""
    return "; ".join([*elsewhere, *([where + "; ".join(from_file)] if from_file else [])])


def _describe_source_error(exc: SettingsError) -> str:
    """pydantic-settings names the section only: name the variables of that section whose
    value is not JSON (a list or a table given in the environment must be)."""
    match = re.search(r'field "(\w+)"', str(exc))
    section = f"OMNIROUTE_{match.group(1).upper()}" if match else "OMNIROUTE_"
    bad = []
    for name, text in sorted(os.environ.items()):
        if name.upper().startswith(section):
            try:
                json.loads(text)
            except ValueError:
                bad.append(name)
    named = ", ".join(bad) or f"an {section}* variable"
    return (
        f"environment variable {named}: not valid JSON (a list or a table in the "
        """environment is written as JSON, e.g. '["email", "sms"]')"""
    )


def _source_of(loc: tuple[int | str, ...]) -> str | None:
    """The environment variable or credential file that set the key at ``loc`` (or a
    section holding it, as JSON), else None (the TOML file or a default). Environment
    variables win over credential files, as in ``settings_customise_sources``."""
    names: list[str] = []
    for part in loc:
        if not isinstance(part, str):  # a list index: the list came whole
            break
        names.append(part)
    prefixes = [names[:n] for n in range(len(names), 0, -1)]
    environ = {name.upper(): name for name in os.environ}
    for parts in prefixes:
        variable = environ.get("OMNIROUTE_" + "__".join(parts).upper())
        if variable is not None:
            return f"environment variable {variable}"
    directory = secrets_directory()
    if directory is not None:
        for parts in prefixes:
            for spelling in (".".join(parts), "__".join(parts)):
                if (directory / spelling).is_file():
                    return f"credential file {directory / spelling}"
    return None


def _with_mailbox_passwords(settings: Settings) -> Settings:
    directory = secrets_directory()
    if directory is None or not settings.email.mailboxes:
        return settings
    mailboxes = []
    for mailbox in settings.email.mailboxes:
        secret = directory / f"mailbox.{mailbox.name}.password"
        if mailbox.password is None and secret.is_file():
            password = SecretStr(secret.read_text(encoding="utf-8").strip())
            mailbox = mailbox.model_copy(update={"password": password})
        mailboxes.append(mailbox)
    email = settings.email.model_copy(update={"mailboxes": mailboxes})
    return settings.model_copy(update={"email": email})
