"""The X (Twitter) channel's way in: mentions and DMs, polled from API v2 with tweepy.

Sole purpose: turn each mention of the support account and each DM it receives into one
``InboundMessage`` on the bus. The client is ``connectors.twitter.api``, the normalisation
``connectors.twitter.messages``; the way out (reply tweets and DMs) is
``connectors.twitter.sender.TwitterSender``.

Invariants:
- The mentions cursor (``since_id``) advances only after every page down to the stored one
  was published and confirmed; DM events have no ``since_id``, so they are paged until the
  last event already taken and deduplicated on the event id. Both pass through the
  ``SeenStore``, so a pass that failed half way and is repeated publishes nothing twice.
- A 429 waits until ``x-rate-limit-reset`` (tweepy's ``wait_on_rate_limit`` is off); 5xx
  and network errors back off with jitter; 401/403 stop the connector and mark it down in
  ``Health``.
- Each pass costs at least one request per endpoint; the default ``poll_interval`` of 60 s
  stays well inside the per-15-minute windows X documents for mentions and DM lookup, and
  a 429 is honoured until its reset whatever the access tier allows.
"""

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from connectors.leasing import LeaseKeeper
from connectors.settings import TwitterSettings
from connectors.twitter.api import JSON, RateLimited, Refused, XApi
from connectors.twitter.messages import XNormaliser, includes, sort_key
from ingest.backoff import Backoff
from ingest.dedup import OnceSink
from ingest.errors import AuthError, TransientError
from ingest.health import Health
from ingest.identities import redact
from ingest.protocols import CursorStore, InboundSink, Lease, SeenStore
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.twitter")

NAME = "twitter"
MAX_PAGES = 50  # a guard against a next_token that never ends; X stops mentions at 800
RATE_LIMIT_FALLBACK = 60.0  # seconds to wait on a 429 without a usable reset header
RATE_LIMIT_CAP = 960.0  # a reset further away than one 15-minute window is clock skew

TWEET_FIELDS = (
    "author_id,created_at,conversation_id,in_reply_to_user_id,"
    "entities,attachments,referenced_tweets,lang"
)
DM_FIELDS = (
    "id,text,event_type,created_at,dm_conversation_id,"
    "sender_id,participant_ids,referenced_tweets,attachments,entities"
)
USER_FIELDS = "username,name"
MEDIA_FIELDS = "media_key,type,url,preview_image_url,variants,alt_text"


class _Stopping(Exception):
    """``stop`` was set during a wait: abandon the pass, cursors untouched."""




def _newer(a: str, b: str) -> bool:
    """X ids are snowflakes: a larger number is a later tweet or event."""
    try:
        return int(a) > int(b)
    except ValueError:
        return a != b


class TwitterConnector:
    """Polls the account's mentions and DM events; ``run`` supervises, ``drain`` drains.

    ``drain`` returns how many messages it published; it raises ``AuthError`` on
    refused credentials and ``TransientError`` when X, the broker or the database failed
    after the in-place retries, with the failing endpoint's cursor left where it was.
    """

    name = NAME

    def __init__(
        self,
        settings: TwitterSettings,
        sink: InboundSink,
        cursors: CursorStore,
        seen: SeenStore,
        health: Health,
        lease: Lease | None = None,
        lease_retry: float = 3.0,
    ) -> None:
        self._settings = settings
        self._cursors = cursors
        # a broken seen store fails the pass (tried again), never publishes blind
        self._once = OnceSink(sink, seen, name="twitter", open_on_outage=False)
        self._health = health
        self._api = XApi(settings)
        self._uid = settings.user_id.removeprefix("id:")
        self._leasing = (
            LeaseKeeper(
                lease,
                f"twitter:{self._uid}",
                health=health,
                component=NAME,
                down=self._down,
                log=log,
                prefix=NAME,
                retry=lease_retry,
            )
            if lease is not None
            else None
        )
        self._normalise = XNormaliser(self._uid)
        self._stop = asyncio.Event()
        health.register(NAME)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``; returns (never raises) on refused credentials, marked down."""
        self._stop = stop
        backoff = Backoff(self._settings.retry_initial, self._settings.retry_max)
        failing = False
        with structlog.contextvars.bound_contextvars(connector=NAME, channel=NAME):
            try:
                while not stop.is_set():
                    if self._leasing is not None and await self._leasing.wait(stop) is None:
                        break
                    try:
                        await self.drain()
                    except _Stopping:
                        break
                    except AuthError as exc:
                        if self._health.set(NAME, "down", str(exc)):
                            log.error("twitter.auth_failed", error=str(exc))
                        return
                    except TransientError as exc:
                        self._down(str(exc))
                        failing = True
                        pause = backoff.next()
                    else:
                        if self._health.set(NAME, "up"):
                            log.info("twitter.recovered" if failing else "twitter.up")
                        failing = False
                        backoff.reset()
                        pause = self._settings.poll_interval
                    try:
                        await self._sleep(pause)
                    except _Stopping:
                        break
                self._health.set(NAME, "stopped")
            finally:
                self._stop = asyncio.Event()
                if self._leasing is not None:
                    await self._leasing.release()
                await self.aclose()

    def _down(self, reason: str) -> None:
        if self._health.set(NAME, "down", reason):
            log.warning("twitter.unavailable", error=reason)

    async def aclose(self) -> None:
        """Close the HTTP session (``run`` does it on its way out)."""
        await self._api.aclose()

    async def drain(self) -> int:
        published = await self._poll_mentions()
        published += await self._poll_dms()
        if published:
            log.info("twitter.polled", published=published)
        return published

    async def _poll_mentions(self) -> int:
        key = f"twitter:mentions:{self._uid}"
        since = await self._cursors.get(key)
        params: JSON = {
            "expansions": ["author_id", "attachments.media_keys"],
            "tweet_fields": TWEET_FIELDS,
            "user_fields": USER_FIELDS,
            "media_fields": MEDIA_FIELDS,
            "max_results": 100,
        }
        if since is not None:
            params["since_id"] = since
        newest = since
        messages: list[InboundMessage] = []
        token: str | None = None
        for pages in range(1, MAX_PAGES + 1):
            page = await self._get(
                "mentions", "get_users_mentions", self._uid, pagination_token=token, **params
            )
            users, media = includes(page)
            for tweet in page.get("data") or []:
                if newest is None or _newer(tweet["id"], newest):
                    newest = tweet["id"]
                message = self._normalise.mention(tweet, users, media)
                if message is not None:
                    messages.append(message)
            token = page.get("meta", {}).get("next_token")
            if not token or (since is None and pages >= self._settings.backfill_pages):
                break
        published = await self._publish(messages)
        if newest is not None and newest != since:
            await self._cursors.set(key, newest)
        return published

    async def _poll_dms(self) -> int:
        key = f"twitter:dm:{self._uid}"
        last = await self._cursors.get(key)
        newest = last
        messages: list[InboundMessage] = []
        token: str | None = None
        for pages in range(1, MAX_PAGES + 1):
            page = await self._get(
                "dm_events",
                "get_direct_message_events",
                event_types="MessageCreate",
                dm_event_fields=DM_FIELDS,
                expansions=["sender_id", "attachments.media_keys"],
                user_fields=USER_FIELDS,
                media_fields=MEDIA_FIELDS,
                max_results=100,
                pagination_token=token,
                user_auth=self._api.user_auth,
            )
            users, media = includes(page)
            reached = False
            for event in page.get("data") or []:
                if last is not None and not _newer(event["id"], last):
                    reached = True
                    break
                if newest is None or _newer(event["id"], newest):
                    newest = event["id"]
                message = self._normalise.dm(event, users, media)
                if message is not None:
                    messages.append(message)
            token = page.get("meta", {}).get("next_token")
            if reached or not token or (last is None and pages >= self._settings.backfill_pages):
                break
        published = await self._publish(messages)
        if newest is not None and newest != last:
            await self._cursors.set(key, newest)
        return published

    async def _get(self, endpoint: str, method: str, *args: Any, **kwargs: Any) -> JSON:
        """One request, retried in place: until the reset on 429, with backoff on 5xx."""
        backoff = Backoff(self._settings.retry_initial, self._settings.retry_max)
        attempt = 0
        limited = False
        while True:
            try:
                return await self._api.call(method, *args, **kwargs)
            except RateLimited as exc:
                now = time.time()
                wait = RATE_LIMIT_FALLBACK if exc.reset_at is None else exc.reset_at - now
                wait = min(max(wait, 1.0), RATE_LIMIT_CAP)
                if not limited:
                    resume = datetime.fromtimestamp(now + wait, UTC).isoformat(timespec="seconds")
                    log.warning("twitter.rate_limited", endpoint=endpoint, resume_at=resume)
                    limited = True
                await self._sleep(wait)
            except Refused as exc:
                raise TransientError(str(exc)) from exc
            except AuthError:
                raise
            except TransientError as exc:
                attempt += 1
                if attempt >= self._settings.retry_attempts:
                    raise
                log.debug("twitter.retry", endpoint=endpoint, attempt=attempt, error=str(exc))
                await self._sleep(backoff.next())

    async def _sleep(self, seconds: float) -> None:
        """Wait, unless ``stop`` is set first: then raise ``_Stopping``."""
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            return
        raise _Stopping

    async def _publish(self, messages: list[InboundMessage]) -> int:
        """Publish oldest first; each one confirmed before the next, each id only once."""
        published = 0
        for message in sorted(messages, key=lambda m: sort_key(m.external_id)):
            if not await self._once.first_time(NAME, message.external_id):
                continue
            with structlog.contextvars.bound_contextvars(message_id=message.id):
                await self._once.submit(message, channel=NAME)
                log.debug(
                    "twitter.published",
                    external_id=message.external_id,
                    sender=redact(message.sender.address),
                )
            published += 1
        return published
