"""The X API v2 client of the X connector and sender: tweepy's ``AsyncClient`` under a deadline.

Sole purpose: one place that talks to X, with a timeout on every call and tweepy's and
aiohttp's exceptions translated into omniroute's at this edge (429 ``RateLimited`` with its
reset time, other 4xx ``Refused``, 401/403 ``AuthError``, the rest ``TransientError``).

Invariants:
- tweepy's ``wait_on_rate_limit`` is off (it retries without bound and spins when the reset
  header is missing): the caller decides how long a 429 waits.
- tweepy's DEBUG log prints the ``Authorization`` header (the bearer token): its logger is
  set to WARNING when a client is built here, so that line never reaches the daemon's logs.
"""

import asyncio
import logging
from typing import Any

import aiohttp
import tweepy
from tweepy.asynchronous import AsyncClient
from yarl import URL

from connectors.settings import TwitterSettings
from ingest.errors import AuthError, OmnirouteError, PermanentSendError, TransientError

JSON = dict[str, Any]


class RateLimited(TransientError):
    """X answered 429; ``reset_at`` is when its window resets (epoch seconds), if it said."""

    def __init__(self, message: str, reset_at: float | None) -> None:
        super().__init__(message)
        self.reset_at = reset_at


class Refused(PermanentSendError):
    """X answered 4xx (not 401/403/429): the request itself is wrong."""


class _RebasedSession:
    """Sends tweepy's requests to ``api_base_url`` instead of https://api.twitter.com.

    tweepy's ``AsyncBaseClient.request`` hard-codes the host and then calls only
    ``self.session.request(method, url, **kwargs)``; this stand-in for the session swaps
    scheme and host and passes everything else through. OAuth 1.0a signing happens before,
    against X's own URL, so it fits a loopback fake (tests) or a transparent reverse proxy.
    """

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    def request(self, method: str, url: str | URL, **kwargs: Any) -> Any:
        target = URL(self._base + URL(url).raw_path_qs, encoded=True)
        return self._session.request(method, target, **kwargs)


class XApi:
    """One tweepy ``AsyncClient`` on one aiohttp session, a timeout on every call, and
    tweepy's and aiohttp's exceptions translated into omniroute's at this edge."""

    def __init__(self, settings: TwitterSettings) -> None:
        # tweepy logs every request's headers, bearer token included, at DEBUG.
        logging.getLogger("tweepy").setLevel(logging.WARNING)
        self._settings = settings
        oauth1 = (
            settings.consumer_key,
            settings.consumer_secret,
            settings.access_token,
            settings.access_token_secret,
        )
        #: OAuth 1.0a user context when all four are set; else the bearer token must be a
        #: user-context OAuth 2.0 token to read DMs and post
        self.user_auth = all(s is not None for s in oauth1)
        secrets = [s.get_secret_value() if s is not None else None for s in oauth1]
        self._client = AsyncClient(
            settings.bearer_token.get_secret_value(),
            *secrets,
            return_type=dict,
            wait_on_rate_limit=False,
        )
        self._session: aiohttp.ClientSession | None = None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> JSON:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout)
            )
            base = self._settings.api_base_url
            self._client.session = _RebasedSession(self._session, base) if base else self._session
        try:
            async with asyncio.timeout(self._settings.timeout):
                result = await getattr(self._client, method)(*args, **kwargs)
        except tweepy.TooManyRequests as exc:
            raise RateLimited(str(exc), _reset_at(exc.reset_time)) from exc
        except tweepy.HTTPException as exc:
            raise _translate(_status(exc), str(exc)) from exc
        except aiohttp.ClientResponseError as exc:  # an error page that is not JSON
            raise _translate(exc.status, exc.message) from exc
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise TransientError(f"X API {method}: {type(exc).__name__}: {exc}") from exc
        return result if isinstance(result, dict) else {}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None


def _status(exc: tweepy.HTTPException) -> int:
    return int(getattr(exc.response, "status", 0) or 0)


def _translate(status: int, text: str) -> OmnirouteError:
    if status in (401, 403):
        return AuthError(f"X API refused the credentials: {text}")
    if status == 429:
        return RateLimited(text, None)
    if 400 <= status < 500:
        return Refused(f"X API refused the request: {text}")
    return TransientError(f"X API unavailable: {text}")


def _reset_at(header: int | None) -> float | None:
    return float(header) if header else None
