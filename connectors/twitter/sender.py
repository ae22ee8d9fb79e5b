"""The X channel's way out: an agent's answer as a reply tweet or a DM.

Sole purpose: the outbound dispatcher's ``Sender`` for channel ``twitter``. A refusal that
retrying cannot fix (credentials, a 4xx) is a ``PermanentSendError``; X being away is a
``TransientError`` for the dispatcher to retry.
"""

import structlog

from connectors.settings import TwitterSettings
from connectors.twitter.api import Refused, XApi
from ingest.errors import AuthError, PermanentSendError
from ingest.identities import InvalidIdentity, normalise_twitter, redact
from ingest.protocols import ReplyContext, SendResult
from ingest.schema import InboundMessage, ReplyRequest

log = structlog.get_logger("omniroute.twitter")


class TwitterSender:
    """The dispatcher's sender for channel ``twitter``: a reply tweet when the request
    answers a mention, else a DM to the customer's user id."""

    channel = "twitter"

    def __init__(self, settings: TwitterSettings) -> None:
        self._api = XApi(settings)

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
        except (AuthError, Refused) as exc:
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
