"""Replies out through Twilio's Messages API (twilio's async client).

4xx answers are permanent (``PermanentSendError``; 401/403 ``AuthError``), 429, 5xx and
network failures transient. With ``http.public_url`` set, every message asks for status
callbacks, so a later delivery failure still becomes an ``outbound.failed`` event.
"""

import asyncio
import base64
import logging
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from connectors.calls import phone_identity
from connectors.settings import HttpSettings, TwilioSettings
from connectors.twilio import addresses
from ingest.errors import AuthError, ConfigError, PermanentSendError, TransientError
from ingest.identities import redact
from ingest.protocols import ReplyContext, SendResult
from ingest.schema import ReplyRequest

log = structlog.get_logger("omniroute.twilio")

STATUS_PATH = "/webhooks/twilio/status"
_quiet = ("twilio.http_client", "twilio.async_http_client")


class _HostRewritingClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio is untyped
    """twilio's aiohttp client, sending to ``base`` (scheme, host, port, path prefix)
    instead of Twilio's host: a loopback fake API in tests, a proxy in production."""

    def __init__(self, base: str | None, timeout: float) -> None:
        super().__init__(timeout=timeout, logger=logging.getLogger("twilio.async_http_client"))
        self._base = urlsplit(base) if base else None
        self._timeout = timeout

    async def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if self._base is not None:
            parts = urlsplit(url)
            url = urlunsplit(
                parts._replace(
                    scheme=self._base.scheme,
                    netloc=self._base.netloc,
                    path=self._base.path.rstrip("/") + parts.path,
                )
            )
        kwargs["timeout"] = kwargs.get("timeout") or self._timeout
        auth = kwargs.pop("auth", None)
        if auth is not None:  # aiohttp deprecates BasicAuth objects, which twilio would build
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Basic {token}"}
        return await super().request(method, url, *args, **kwargs)


class TwilioSmsSender:
    """The outbound dispatcher's ``Sender`` for channel ``sms``."""

    channel = "sms"
    prefix = ""  # of both addresses, as the Messages API wants them on this channel

    def __init__(self, settings: TwilioSettings, http: HttpSettings, *, region: str) -> None:
        if not (settings.account_sid and settings.auth_token and settings.from_number):
            raise ConfigError("twilio: account_sid, auth_token and from_number are required")
        for name in _quiet:  # twilio logs every request at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self._settings = settings
        self._public_url = http.public_url
        self._region = region
        self._client: Any = None
        self._http: _HostRewritingClient | None = None

    def _api(self) -> Any:
        if self._client is None:
            settings = self._settings
            assert settings.auth_token is not None
            self._http = _HostRewritingClient(settings.api_base_url, settings.send_timeout)
            self._client = Client(
                settings.account_sid,
                settings.auth_token.get_secret_value(),
                http_client=self._http,
                environment={},  # never TWILIO_* from the process environment
            )
        return self._client

    def _from(self) -> str:
        """The ``From`` of our messages on this channel."""
        return str(self._settings.from_number)

    def _refused(self, exc: TwilioRestException) -> Exception:
        """Twilio's refusal as our error: 4xx permanent (401/403 ``AuthError``), 429 and
        5xx transient; a code in ``addresses.ERROR_REASONS`` gives its stable reason."""
        status = int(exc.status)
        what = f"twilio error {exc.code} (HTTP {status}): {exc.msg}"
        if status in (401, 403):
            return AuthError(what)
        if status == 429 or status >= 500:
            return TransientError(what)
        return PermanentSendError(what, code=addresses.ERROR_REASONS.get(str(exc.code)))

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        # a ticket system may hand back the address as Twilio wrote it (whatsapp:+…)
        _, number = addresses.split(reply.to.address)
        to = phone_identity(number, self._region).address
        if not to.startswith("+"):
            raise PermanentSendError(f"not a phone number: {redact(to)}")
        options: dict[str, Any] = {
            "to": self.prefix + to,
            "from_": self.prefix + self._from(),
            "body": reply.text,
        }
        if self._public_url:
            query = urlencode({"request_id": reply.id, "agent_id": reply.agent_id})
            options["status_callback"] = f"{self._public_url}{STATUS_PATH}?{query}"
        try:
            async with asyncio.timeout(self._settings.send_timeout + 1):
                sent = await self._api().messages.create_async(**options)
        except TwilioRestException as exc:
            raise self._refused(exc) from exc  # outcomes are counted once, by the dispatcher
        except (TimeoutError, aiohttp.ClientError, OSError, TwilioException) as exc:
            raise TransientError(f"twilio API unreachable: {type(exc).__name__}") from exc
        log.info(
            "twilio.sms_sent",
            channel=self.channel,
            request_id=reply.id,
            external_id=sent.sid,
            to=redact(to),
        )
        return SendResult(external_id=sent.sid, extra={"status": str(sent.status)})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        self._http = None
        self._client = None
