"""X API objects (a mention, a DM event, their ``includes``) as omniroute's ``InboundMessage``.

Sole purpose: the X connector's normalisation, apart from its polling: who sent it (X user
id, with the handle as an alias), the thread it belongs to, media by reference, and the
raw entities kept in ``meta``. The API's JSON in, messages out: nothing here talks to X
or to the bus.
"""

import mimetypes
from collections.abc import Iterable

import structlog
from pydantic import ValidationError

from connectors.twitter.api import JSON
from ingest.identities import InvalidIdentity, normalise_twitter
from ingest.schema import Attachment, Identity, InboundMessage, Thread

log = structlog.get_logger("omniroute.twitter")
#: X's own limits (a long post is 25,000 characters, a name 50, four photos or one video),
#: with room to spare: a field past them is cut, whatever a response says (issue 13)
MAX_TEXT = 25_000
MAX_NAME = 200
MAX_MEDIA = 10


class XNormaliser:
    """Turns the items the support account (user id ``uid``) received into messages; its
    own tweets and DMs, and items that do not validate (logged), become None."""

    def __init__(self, uid: str) -> None:
        self._uid = uid
        self._account = Identity(kind="twitter", address=normalise_twitter(f"id:{uid}"))

    def mention(
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

    def dm(
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
                name=str(user.get("name") or "")[:MAX_NAME] or None,
            )
            return InboundMessage(
                channel="twitter",
                external_id=external_id,
                sender=sender,
                recipient=self._account,
                text=str(item.get("text") or "")[:MAX_TEXT],
                thread=thread,
                attachments=[
                    _attachment(media[k]) for k in list(media_keys)[:MAX_MEDIA] if k in media
                ],
                meta=meta,
            )
        except (InvalidIdentity, ValidationError) as exc:
            log.warning("twitter.malformed", external_id=external_id, error=str(exc))
            return None


def includes(page: JSON) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """The users and media a page expands, by user id and by media key."""
    expanded = page.get("includes") or {}
    users = {str(u.get("id")): u for u in expanded.get("users") or []}
    media = {str(m.get("media_key")): m for m in expanded.get("media") or []}
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


def sort_key(external_id: str) -> tuple[int, str]:
    """Oldest first: X ids are snowflakes, a DM's after its ``dm:`` prefix."""
    digits = external_id.removeprefix("dm:")
    return (int(digits), external_id) if digits.isdigit() else (0, external_id)
