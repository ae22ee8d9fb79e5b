"""A fake X API v2, shaped like the documented responses, for tweepy's real AsyncClient to
talk to (tests/twitter/conftest.py serves it on a loopback port), and its data."""

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from connectors.settings import TwitterSettings

ACCOUNT_ID = "1500000000000000001"
ACCOUNT_HANDLE = "AcmeSupport"
BEARER = "AAAAAAAAAAAAAAAAAAAAAbearer-must-never-be-logged-7f3a9c"
ACCESS_TOKEN = f"{ACCOUNT_ID}-accesstoken"

JSON = dict[str, Any]


def user(uid: str, username: str, name: str) -> JSON:
    return {"id": uid, "username": username, "name": name}


ACCOUNT = user(ACCOUNT_ID, ACCOUNT_HANDLE, "Acme Support")
ALICE = user("2244994945", "Alice_Example", "Alice Example")
BOB = user("783214", "bob", "Bob")


def tweet(
    tid: str,
    author: JSON,
    text: str,
    *,
    conversation: str | None = None,
    replied_to: str | None = None,
    media_keys: list[str] | None = None,
) -> JSON:
    """A Tweet object as GET /2/users/:id/mentions returns it with our tweet.fields."""
    body: JSON = {
        "id": tid,
        "text": text,
        "author_id": author["id"],
        "created_at": "2024-05-01T10:00:00.000Z",
        "conversation_id": conversation or tid,
        "edit_history_tweet_ids": [tid],
        "entities": {
            "mentions": [{"start": 0, "end": 12, "username": ACCOUNT_HANDLE, "id": ACCOUNT_ID}]
        },
    }
    if replied_to:
        body["referenced_tweets"] = [{"type": "replied_to", "id": replied_to}]
        body["in_reply_to_user_id"] = ACCOUNT_ID
    if media_keys:
        body["attachments"] = {"media_keys": media_keys}
    return body


def conversation_id(other: str) -> str:
    """A one-to-one DM conversation id: both user ids, the smaller first."""
    low, high = sorted((int(other), int(ACCOUNT_ID)))
    return f"{low}-{high}"


def dm_event(eid: str, sender: JSON, text: str) -> JSON:
    """A MessageCreate DM event as GET /2/dm_events returns it with our dm_event.fields."""
    other = sender["id"] if sender["id"] != ACCOUNT_ID else ALICE["id"]
    return {
        "id": eid,
        "text": text,
        "event_type": "MessageCreate",
        "dm_conversation_id": conversation_id(other),
        "sender_id": sender["id"],
        "created_at": "2024-05-01T10:00:00.000Z",
    }


@dataclass
class Scripted:
    """A canned error answer for the next request to an endpoint (to the next one asking
    for ``page``, a ``pagination_token``, when given)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: JSON | None = None
    page: str | None = None


PROBLEMS = {
    401: {"title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"},
    429: {
        "title": "Too Many Requests",
        "type": "about:blank",
        "status": 429,
        "detail": "Too Many Requests",
    },
    503: {
        "title": "Service Unavailable",
        "type": "about:blank",
        "status": 503,
        "detail": "Service Unavailable",
    },
}


def rate_limited(reset_in: float) -> Scripted:
    return Scripted(
        429,
        {
            "x-rate-limit-limit": "15",
            "x-rate-limit-remaining": "0",
            "x-rate-limit-reset": str(int(time.time() + reset_in)),
        },
    )


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    json: JSON | None
    authorization: str
    at: float


@dataclass
class FakeX:
    """State of the fake API: tweets and DM events newest first, scripted failures per
    endpoint ("mentions", "dm_events", "tweets", "dm_send"), and every request received."""

    mentions: list[JSON] = field(default_factory=list)
    dm_events: list[JSON] = field(default_factory=list)
    users: dict[str, JSON] = field(default_factory=dict)
    media: dict[str, JSON] = field(default_factory=dict)
    page_size: int = 2
    script: dict[str, list[Scripted]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    base_url: str = ""
    _next_id: int = 1790000000000000000

    def __post_init__(self) -> None:
        for u in (ACCOUNT, ALICE, BOB):
            self.users.setdefault(u["id"], u)

    def fail_next(self, endpoint: str, *answers: Scripted) -> None:
        self.script.setdefault(endpoint, []).extend(answers)

    def hits(self, endpoint_path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == endpoint_path]

    def new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def settings(self, **overrides: Any) -> TwitterSettings:
        values: JSON = {
            "user_id": ACCOUNT_ID,
            "bearer_token": SecretStr(BEARER),
            "consumer_key": SecretStr("consumer-key"),
            "consumer_secret": SecretStr("consumer-secret"),
            "access_token": SecretStr(ACCESS_TOKEN),
            "access_token_secret": SecretStr("access-secret"),
            "poll_interval": 1.0,
            "timeout": 5.0,
            "api_base_url": self.base_url,
            "retry_initial": 0.05,
            "retry_max": 0.2,
            "backfill_pages": 10,
        }
        values.update(overrides)
        return TwitterSettings(**values)

    # -- the HTTP side --------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/2/users/{id}/mentions", self._mentions)
        app.router.add_get("/2/dm_events", self._dm_events)
        app.router.add_post("/2/tweets", self._create_tweet)
        app.router.add_post("/2/dm_conversations/with/{pid}/messages", self._create_dm)
        return app

    async def _record(self, request: web.Request, endpoint: str) -> web.Response | None:
        body = await request.json() if request.can_read_body else None
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                body,
                request.headers.get("Authorization", ""),
                time.time(),
            )
        )
        queue = self.script.get(endpoint, [])
        token = request.query.get("pagination_token")
        answer = next((a for a in queue if a.page is None or a.page == token), None)
        if answer is not None:
            queue.remove(answer)
            return web.json_response(
                answer.body or PROBLEMS.get(answer.status, {"status": answer.status}),
                status=answer.status,
                headers=answer.headers,
                content_type="application/problem+json",
            )
        return None

    def _page(self, items: list[JSON], token: str | None) -> tuple[list[JSON], str | None]:
        start = int(token.removeprefix("page-")) if token else 0
        chunk = items[start : start + self.page_size]
        following = start + self.page_size
        return chunk, (f"page-{following}" if following < len(items) else None)

    def _includes(self, items: list[JSON], who: str) -> JSON:
        ids = {i[who] for i in items}
        includes: JSON = {"users": [self.users[u] for u in sorted(ids) if u in self.users]}
        keys = [k for i in items for k in (i.get("attachments") or {}).get("media_keys", [])]
        if keys:
            includes["media"] = [self.media[k] for k in keys if k in self.media]
        return includes

    async def _mentions(self, request: web.Request) -> web.Response:
        failure = await self._record(request, "mentions")
        if failure is not None:
            return failure
        since = request.query.get("since_id")
        items = [t for t in self.mentions if since is None or int(t["id"]) > int(since)]
        chunk, following = self._page(items, request.query.get("pagination_token"))
        if not chunk:
            return web.json_response({"meta": {"result_count": 0}})
        meta: JSON = {
            "newest_id": chunk[0]["id"],
            "oldest_id": chunk[-1]["id"],
            "result_count": len(chunk),
        }
        if following:
            meta["next_token"] = following
        return web.json_response(
            {"data": chunk, "includes": self._includes(chunk, "author_id"), "meta": meta}
        )

    async def _dm_events(self, request: web.Request) -> web.Response:
        failure = await self._record(request, "dm_events")
        if failure is not None:
            return failure
        chunk, following = self._page(self.dm_events, request.query.get("pagination_token"))
        meta: JSON = {"result_count": len(chunk)}
        if following:
            meta["next_token"] = following
        if not chunk:
            return web.json_response({"meta": meta})
        return web.json_response(
            {"data": chunk, "includes": self._includes(chunk, "sender_id"), "meta": meta}
        )

    async def _create_tweet(self, request: web.Request) -> web.Response:
        failure = await self._record(request, "tweets")
        if failure is not None:
            return failure
        body = self.requests[-1].json or {}
        tid = self.new_id()
        return web.json_response(
            {"data": {"id": tid, "text": body.get("text", ""), "edit_history_tweet_ids": [tid]}},
            status=201,
        )

    async def _create_dm(self, request: web.Request) -> web.Response:
        failure = await self._record(request, "dm_send")
        if failure is not None:
            return failure
        pid = request.match_info["pid"]
        return web.json_response(
            {
                "data": {
                    "dm_conversation_id": conversation_id(pid),
                    "dm_event_id": self.new_id(),
                }
            },
            status=201,
        )
