"""Settings of each connector and of the HTTP app; light on purpose (pydantic only), so the
composition root can validate every section without importing a disabled channel's library."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors.addresses import checked_host, checked_url, is_loopback_host


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = Field(
        default=None,
        description="the URL Twilio calls, as seen from outside (proxy or load balancer); "
        "signatures are checked against it",
    )
    max_body: int = Field(default=64 * 1024, ge=1024)
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="seconds a connection gets to deliver a whole request head, from its "
        "opening or from the previous response (however slowly the bytes come); then it is "
        "closed, with a 408 if part of a head arrived",
    )
    body_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="seconds a request gets to deliver its whole body once the head is in; "
        "then it is answered 408 and the connection closed",
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        le=100_000,
        description="open HTTP connections served for every path; a new one past it closes "
        "the connection that has waited longest for a request head. Lowered at start (with "
        "a warning) when it and the reserve do not fit the descriptor limit (LimitNOFILE=)",
    )
    reserved_connections: int = Field(
        default=16,
        ge=0,
        le=1000,
        description="connections accepted beyond max_connections when all of those are busy, "
        "served only for /healthz, /readyz and /v1/route (others get 503); past both, a new "
        "connection is closed at once",
    )
    status_page: bool = Field(
        default=False,
        description="serve the status page at /status (connectors, decisions per minute, "
        "queue depths, the last decisions, dead letters), behind status_token, else "
        "api.token; with neither set every request is refused (401)",
    )
    status_token: SecretStr | None = Field(
        default=None,
        description="bearer token of /status (a browser gives it as the password of HTTP "
        "Basic authentication, any user name); unset: api.token",
    )

    @field_validator("status_token")
    @classmethod
    def _status_token(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value() if value is not None else ""
        if value is not None and not (text.isascii() and text.isprintable() and " " not in text):
            raise ValueError("must be printable ASCII without spaces (it travels in a header)")
        if value is not None and len(text) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        checked_url(value, ("http", "https"))
        return value.rstrip("/") if value else value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return checked_host(value)


class ApiSettings(_Section):
    token: SecretStr | None = Field(
        default=None, description="bearer token for /v1/route; the endpoint answers 401 without"
    )
    default_dial: str | None = Field(
        default=None,
        description="dial string answered for withheld callers, unsafe targets and when no "
        "decision can be taken; without it such calls get an empty dial",
    )
    decide_timeout: float = Field(default=2.0, gt=0, description="deadline of one decision")

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value() if value is not None else ""
        if value is not None and not (text.isascii() and text.isprintable() and " " not in text):
            raise ValueError("must be printable ASCII without spaces (it travels in a header)")
        return value


class MailboxSettings(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str
    port: int = Field(default=993, ge=1, le=65535)
    security: Literal["tls", "starttls", "none"] = "tls"
    username: str
    password: SecretStr | None = None
    folder: str = "INBOX"
    team: str | None = None
    after: str = Field(default="flag", pattern=r"^(flag|move:.+)$")
    poll_interval: float = Field(default=60.0, gt=0)
    idle_renew: float = Field(default=300.0, gt=0, le=1740)
    batch_size: int = Field(default=50, ge=1, le=1000)
    timeout: float = Field(default=30.0, gt=0)
    address: str | None = Field(
        default=None,
        description="the address mail arrives on (the message's recipient); "
        "defaults to username when that is an email address",
    )
    ca_file: str | None = Field(
        default=None, description="PEM file of the CA that signed the server's certificate"
    )
    backoff_initial: float = Field(
        default=1.0, gt=0, description="first reconnect delay after a failure, in seconds"
    )
    backoff_max: float = Field(default=300.0, gt=0, description="cap of the reconnect delay")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return checked_host(value)

    @model_validator(mode="after")
    def _plaintext_only_to_loopback(self) -> "MailboxSettings":
        if self.security == "none" and not is_loopback_host(self.host):
            raise ValueError("security = none is allowed only towards a loopback host")
        return self


class EmailSettings(_Section):
    mailboxes: list[MailboxSettings] = Field(default_factory=list)
    inline_attachment_max: int = Field(
        default=256 * 1024,
        ge=0,
        description="bytes of attachment content carried inline per message, in total; "
        "attachments past it carry a locator (mailbox, UIDVALIDITY, UID, part) instead",
    )
    message_id_domain: str | None = Field(
        default=None, description="domain of the Message-IDs omniroute sets on replies"
    )
    parse_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="processes that parse mail, so a hostile mail costs one of them, never "
        "the daemon (restarted with new limits on reload once their mails are done)",
    )
    parse_memory: int = Field(
        default=256 * 1024 * 1024,
        ge=64 * 1024 * 1024,
        description="address space of a parse process, in bytes (RLIMIT_AS), plus ten "
        "times the size of the mail it parses; a mail that needs more is routed unparsed",
    )
    parse_timeout: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="CPU seconds one mail may take to parse (RLIMIT_CPU; the process is "
        "killed after twice that plus one second of wall clock); past it the mail is "
        "routed unparsed",
    )
    max_message_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1024 * 1024,
        description="size (RFC822.SIZE) past which a mail is not fetched whole: its first "
        "64 KiB give a stand-in (sender, Subject, Message-ID; reason too_large), the "
        "original stays in the mailbox",
    )
    max_header_bytes: int = Field(
        default=256 * 1024,
        ge=8 * 1024,
        description="size of a mail's header block past which it is routed unparsed",
    )
    max_encoded_words: int = Field(
        default=2000,
        ge=10,
        description="RFC 2047 encoded words in a mail past which it is routed unparsed "
        "(the stdlib header parser is quadratic in them)",
    )
    max_mime_depth: int = Field(
        default=20, ge=1, le=200, description="MIME nesting past which a mail is routed unparsed"
    )
    max_parts: int = Field(
        default=1000, ge=1, description="MIME parts past which a mail is routed unparsed"
    )
    trusted_authserv_ids: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="authserv-ids of the receiving mail servers whose Authentication-Results "
        "headers are believed (RFC 8601; compared case-insensitively); the server must delete "
        "incoming headers carrying its own id. Others' headers are ignored: anyone can write "
        "one. Setting it turns routing.require_authenticated_email on unless that is set",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> "EmailSettings":
        names = [m.name for m in self.mailboxes]
        if len(names) != len(set(names)):
            raise ValueError("mailbox names must be unique")
        return self

    @field_validator("trusted_authserv_ids")
    @classmethod
    def _authserv_ids(cls, value: list[str]) -> list[str]:
        """An id that no header can carry (blank, spaces, ``;``, ``=``) is a typo, not trust."""
        for name in value:
            text = name.strip()
            if not text or len(text) > 255 or any(c.isspace() or c in ';=()"' for c in text):
                raise ValueError(f"not an authserv-id: {name[:40]!r}")
        return [name.strip() for name in value]


class SmtpSettings(_Section):
    host: str
    port: int = Field(default=465, ge=1, le=65535)
    security: Literal["tls", "starttls", "none"] = "tls"
    username: str | None = None
    password: SecretStr | None = None
    from_address: str
    timeout: float = Field(default=30.0, gt=0)
    ca_file: str | None = Field(
        default=None, description="PEM file of the CA that signed the server's certificate"
    )
    auto_reply_null_sender: bool = Field(
        default=False,
        description="acknowledgements by mail with the null envelope sender `MAIL FROM:<>` "
        "(RFC 3834 3.3: a bounce of one goes nowhere); agents' replies keep `from_address`. "
        "Off: Office 365 and Gmail refuse or rewrite it (an `outbound.failed` naming this "
        "key); turn it on behind an MTA of your own",
    )

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return checked_host(value)

    @model_validator(mode="after")
    def _plaintext_only_to_loopback(self) -> "SmtpSettings":
        if self.security == "none" and not is_loopback_host(self.host):
            raise ValueError("security = none is allowed only towards a loopback host")
        return self


class TwilioSettings(_Section):
    account_sid: str | None = None
    auth_token: SecretStr | None = None
    from_number: str | None = Field(default=None, description="sender number for SMS replies")
    whatsapp_from: str | None = Field(
        default=None, description="sender number for WhatsApp replies (default: from_number)"
    )
    sms_ack_text: str | None = Field(default=None, description="auto-answer to each SMS")
    dial_timeout: int = Field(default=20, ge=5, le=600)
    api_base_url: str | None = Field(
        default=None, description="override of Twilio's API host (tests, regional edges)"
    )
    default_dial: str | None = Field(
        default=None,
        description="dial target for withheld callers and when no decision can be taken",
    )
    decide_timeout: float = Field(default=5.0, gt=0, description="deadline of one decision")
    send_timeout: float = Field(default=15.0, gt=0, description="deadline of one API call")

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str | None) -> str | None:
        return checked_url(value, ("http", "https"))


class TwitterSettings(_Section):
    user_id: str
    bearer_token: SecretStr
    consumer_key: SecretStr | None = None
    consumer_secret: SecretStr | None = None
    access_token: SecretStr | None = None
    access_token_secret: SecretStr | None = None
    poll_interval: float = Field(default=60.0, ge=1.0)
    timeout: float = Field(default=30.0, gt=0)
    api_base_url: str | None = Field(default=None, description="override of X's API host (tests)")
    retry_initial: float = Field(
        default=1.0, gt=0, description="first backoff after a 5xx or network error, in seconds"
    )
    retry_max: float = Field(default=300.0, gt=0, description="cap of that backoff, in seconds")
    retry_attempts: int = Field(
        default=4, ge=1, description="tries per request before the poll pass gives up"
    )
    backfill_pages: int = Field(
        default=1, ge=1, le=50, description="pages read per endpoint when no cursor is stored yet"
    )

    @field_validator("api_base_url")
    @classmethod
    def _api_base_url(cls, value: str | None) -> str | None:
        return checked_url(value, ("http", "https"))


class SpoolSettings(_Section):
    max_messages: int = Field(default=100_000, ge=1)
    publish_timeout: float = Field(
        default=5.0,
        gt=0,
        description="how long a webhook waits for the broker before it spools the message",
    )
    retry_initial: float = Field(default=0.5, gt=0, description="first pause between drains")
    retry_max: float = Field(default=30.0, gt=0, description="longest pause between drains")
