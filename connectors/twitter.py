"""The X (Twitter) channel: mentions and DMs in by polling API v2 with tweepy, replies out.

Sole purpose: turn each mention of the support account and each DM it receives into one
``InboundMessage`` on the bus, and send an agent's answer back as a reply tweet or a DM.

Invariants:
- The mentions cursor (``since_id``) advances only after every page down to the stored one
  was published and confirmed; DM events have no ``since_id``, so they are paged until the
  last event already taken and deduplicated on the event id. Both pass through the
  ``SeenStore``, so a pass that failed half way and is repeated publishes nothing twice.
- tweepy's ``wait_on_rate_limit`` is off (it retries without bound and spins when the reset
  header is missing): a 429 waits until ``x-rate-limit-reset``; 5xx and network errors back
  off with jitter; 401/403 stop the connector and mark it down in ``Health``.
- tweepy's DEBUG log prints the ``Authorization`` header (the bearer token): its logger is
  set to WARNING when a client is built here, so that line never reaches the daemon's logs.
- Each pass costs at least one request per endpoint; the default ``poll_interval`` of 60 s
  stays well inside the per-15-minute windows X documents for mentions and DM lookup, and
  a 429 is honoured until its reset whatever the access tier allows.
"""

import asyncio
import logging
import mimetypes
import random
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
import tweepy
from pydantic import ValidationError
from tweepy.asynchronous import AsyncClient
from yarl import URL

from connectors.leasing import LeaseKeeper
from connectors.settings import TwitterSettings
from ingest.errors import AuthError, OmnirouteError, PermanentSendError, TransientError
from ingest.health import Health
from ingest.identities import InvalidIdentity, normalise_twitter, redact
from ingest.protocols import (
    CursorStore,
    InboundSink,
    Lease,
    ReplyContext,
    SeenStore,
    SendResult,
)
from ingest.schema import Attachment, Identity, InboundMessage, ReplyRequest, Thread

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

JSON = dict[str, Any]


class _RateLimited(TransientError):
    def __init__(self, message: str, reset_at: float | None) -> None:
        super().__init__(message)
        self.reset_at = reset_at


class _Refused(PermanentSendError):
    """X answered 4xx (not 401/403/429): the request itself is wrong."""


class _Stopping(Exception):
    """``stop`` was set during a wait: abandon the pass, cursors untouched."""


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


class _XApi:
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
            raise _RateLimited(str(exc), _reset_at(exc.reset_time)) from exc
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
        return _RateLimited(text, None)
    if 400 <= status < 500:
        return _Refused(f"X API refused the request: {text}")
    return TransientError(f"X API unavailable: {text}")


def _reset_at(header: int | None) -> float | None:
    return float(header) if header else None


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.5, 1.5)  # noqa: S311 (jitter, not crypto)


def _newer(a: str, b: str) -> bool:
    """X ids are snowflakes: a larger number is a later tweet or event."""
    try:
        return int(a) > int(b)
    except ValueError:
        return a != b


class TwitterConnector:
    """Polls the account's mentions and DM events; ``run`` supervises, ``poll_once`` drains.

    ``poll_once`` returns how many messages it published; it raises ``AuthError`` on
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
        self._sink = sink
        self._cursors = cursors
        self._seen = seen
        self._health = health
        self._api = _XApi(settings)
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
        self._account = Identity(kind="twitter", address=normalise_twitter(f"id:{self._uid}"))
        self._stop = asyncio.Event()
        health.register(NAME)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop``; returns (never raises) on refused credentials, marked down."""
        self._stop = stop
        delay = self._settings.retry_initial
        failing = False
        with structlog.contextvars.bound_contextvars(connector=NAME, channel=NAME):
            try:
                while not stop.is_set():
                    if self._leasing is not None and await self._leasing.wait(stop) is None:
                        break
                    try:
                        await self.poll_once()
                    except _Stopping:
                        break
                    except AuthError as exc:
                        if self._health.set(NAME, "down", str(exc)):
                            log.error("twitter.auth_failed", error=str(exc))
                        return
                    except TransientError as exc:
                        self._down(str(exc))
                        failing = True
                        pause = _jitter(delay)
                        delay = min(delay * 2, self._settings.retry_max)
                    else:
                        if self._health.set(NAME, "up"):
                            log.info("twitter.recovered" if failing else "twitter.up")
                        failing = False
                        delay = self._settings.retry_initial
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

    async def poll_once(self) -> int:
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
            users, media = _includes(page)
            for tweet in page.get("data") or []:
                if newest is None or _newer(tweet["id"], newest):
                    newest = tweet["id"]
                message = self._tweet(tweet, users, media)
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
            users, media = _includes(page)
            reached = False
            for event in page.get("data") or []:
                if last is not None and not _newer(event["id"], last):
                    reached = True
                    break
                if newest is None or _newer(event["id"], newest):
                    newest = event["id"]
                message = self._dm(event, users, media)
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
        delay = self._settings.retry_initial
        attempt = 0
        limited = False
        while True:
            try:
                return await self._api.call(method, *args, **kwargs)
            except _RateLimited as exc:
                now = time.time()
                wait = RATE_LIMIT_FALLBACK if exc.reset_at is None else exc.reset_at - now
                wait = min(max(wait, 1.0), RATE_LIMIT_CAP)
                if not limited:
                    resume = datetime.fromtimestamp(now + wait, UTC).isoformat(timespec="seconds")
                    log.warning("twitter.rate_limited", endpoint=endpoint, resume_at=resume)
                    limited = True
                await self._sleep(wait)
            except _Refused as exc:
                raise TransientError(str(exc)) from exc
            except AuthError:
                raise
            except TransientError as exc:
                attempt += 1
                if attempt >= self._settings.retry_attempts:
                    raise
                log.debug("twitter.retry", endpoint=endpoint, attempt=attempt, error=str(exc))
                await self._sleep(_jitter(delay))
                delay = min(delay * 2, self._settings.retry_max)

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
        for message in sorted(messages, key=lambda m: _sort_key(m.external_id)):
            if not await self._seen.first_time(NAME, message.external_id):
                continue
            with structlog.contextvars.bound_contextvars(message_id=message.id):
                try:
                    await self._sink.submit(message)
                except BaseException:
                    await self._seen.forget(NAME, message.external_id)
                    raise
                log.debug(
                    "twitter.published",
                    external_id=message.external_id,
                    sender=redact(message.sender.address),
                )
            published += 1
        return published

    def _tweet(
        self, tweet: JSON, users: dict[str, JSON], media: dict[str, JSON]
    ) -> InboundMessage | None:
        author = str(tweet.get("author_id") or "")
        if author == self._uid:
            return None
        replied = next(
            (
                r.get("id")
                for r in tweet.get("referenced_tweets") or []
                if r.get("type") == "replied_to"
            ),
            None,
        )
        conversation = tweet.get("conversation_id")
        meta = {
            "kind": "mention",
            "entities": tweet.get("entities") or {},
            "conversation_id": conversation,
            "created_at": tweet.get("created_at"),
            "in_reply_to_user_id": tweet.get("in_reply_to_user_id"),
            "referenced_tweets": tweet.get("referenced_tweets") or [],
        }
        thread = Thread(
            message_id=str(tweet["id"]),
            in_reply_to=replied,
            references=[conversation] if conversation else [],
        )
        keys = (tweet.get("attachments") or {}).get("media_keys") or []
        return self._message(str(tweet["id"]), author, users, tweet, thread, keys, media, meta)

    def _dm(
        self, event: JSON, users: dict[str, JSON], media: dict[str, JSON]
    ) -> InboundMessage | None:
        sender = str(event.get("sender_id") or "")
        if sender == self._uid or event.get("event_type", "MessageCreate") != "MessageCreate":
            return None
        conversation = event.get("dm_conversation_id")
        external_id = f"dm:{event['id']}"
        meta = {
            "kind": "dm",
            "entities": event.get("entities") or {},
            "dm_conversation_id": conversation,
            "dm_event_id": event["id"],
            "created_at": event.get("created_at"),
            "referenced_tweets": event.get("referenced_tweets") or [],
        }
        thread = Thread(message_id=external_id, references=[conversation] if conversation else [])
        keys = (event.get("attachments") or {}).get("media_keys") or []
        return self._message(external_id, sender, users, event, thread, keys, media, meta)

    def _message(
        self,
        external_id: str,
        author: str,
        users: dict[str, JSON],
        item: JSON,
        thread: Thread,
        media_keys: Iterable[str],
        media: dict[str, JSON],
        meta: JSON,
    ) -> InboundMessage | None:
        user = users.get(author, {})
        username = user.get("username")
        try:
            sender = Identity(
                kind="twitter",
                address=normalise_twitter(f"id:{author}"),
                aliases=[str(username).casefold()] if username else [],
                name=user.get("name"),
            )
            return InboundMessage(
                channel="twitter",
                external_id=external_id,
                sender=sender,
                recipient=self._account,
                text=item.get("text") or "",
                thread=thread,
                attachments=[_attachment(media[k]) for k in media_keys if k in media],
                meta=meta,
            )
        except (InvalidIdentity, ValidationError) as exc:
            log.warning("twitter.malformed", external_id=external_id, error=str(exc))
            return None


def _includes(page: JSON) -> tuple[dict[str, JSON], dict[str, JSON]]:
    includes = page.get("includes") or {}
    users = {str(u.get("id")): u for u in includes.get("users") or []}
    media = {str(m.get("media_key")): m for m in includes.get("media") or []}
    return users, media


def _attachment(item: JSON) -> Attachment:
    """Media by reference: X serves the bytes; ``size`` 0 means not downloaded."""
    kind = item.get("type")
    url = item.get("url")
    content_type = None
    variants = [v for v in item.get("variants") or [] if v.get("url")]
    if kind in ("video", "animated_gif") and variants:
        best = max(variants, key=lambda v: int(v.get("bit_rate") or 0))
        url, content_type = best["url"], best.get("content_type")
    if content_type is None and url:
        content_type = mimetypes.guess_type(str(url))[0]
    if content_type is None:
        content_type = "image/jpeg" if kind == "photo" else "application/octet-stream"
    return Attachment(
        content_type=content_type,
        size=0,
        url=url or item.get("preview_image_url"),
        locator={
            "media_key": item.get("media_key"),
            "type": kind,
            "alt_text": item.get("alt_text"),
        },
    )


def _sort_key(external_id: str) -> tuple[int, str]:
    digits = external_id.removeprefix("dm:")
    return (int(digits), external_id) if digits.isdigit() else (0, external_id)


class TwitterSender:
    """The dispatcher's sender for channel ``twitter``: a reply tweet when the request
    answers a mention, else a DM to the customer's user id."""

    channel = NAME

    def __init__(self, settings: TwitterSettings) -> None:
        self._api = _XApi(settings)

    async def aclose(self) -> None:
        await self._api.aclose()

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        original = context.original
        try:
            if original is not None and original.meta.get("kind") == "mention":
                tweet_id = original.thread.message_id if original.thread else None
                data = await self._api.call(
                    "create_tweet",
                    text=reply.text,
                    in_reply_to_tweet_id=tweet_id or original.external_id,
                    user_auth=self._api.user_auth,
                )
                new_id = (data.get("data") or {}).get("id")
                log.info("twitter.replied", tweet_id=new_id, to=redact(reply.to.address))
                return SendResult(external_id=new_id, extra={"kind": "reply"})
            participant = _participant(reply, original)
            data = await self._api.call(
                "create_direct_message",
                participant_id=participant,
                text=reply.text,
                user_auth=self._api.user_auth,
            )
        except (AuthError, _Refused) as exc:
            raise PermanentSendError(str(exc)) from exc
        body = data.get("data") or {}
        event_id = body.get("dm_event_id")
        log.info("twitter.dm_sent", dm_event_id=event_id, to=redact(participant))
        extra = {"kind": "dm"}
        if body.get("dm_conversation_id"):
            extra["dm_conversation_id"] = str(body["dm_conversation_id"])
        return SendResult(external_id=f"dm:{event_id}" if event_id else None, extra=extra)


def _participant(reply: ReplyRequest, original: InboundMessage | None) -> str:
    """The customer's numeric user id: from ``reply.to``, else from the original sender."""
    for address in (reply.to.address, original.sender.address if original else None):
        if not address:
            continue
        try:
            normalised = normalise_twitter(address)
        except InvalidIdentity:
            continue
        if normalised.startswith("id:"):
            return normalised[3:]
    raise PermanentSendError("a DM needs the customer's X user id (id:<digits>) in reply.to")
