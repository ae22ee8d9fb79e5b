"""Caller-ID routing for any PBX: ``GET|POST /v1/route?caller=&called=&call_id=``.

Sole purpose: Asterisk, FreeSWITCH, Kamailio and others ask where to connect a caller (with
``verstat``, the carrier's STIR/SHAKEN verdict on the caller ID, when they have it) and
get the router's decision in milliseconds, as JSON or as a bare dial string
(``Accept: text/plain`` or ``format=text``) fit for ``Dial(${CURL(...)})``. What is
decided and how a dial is made safe is in ``connectors.calls``.

Invariants:
- Bearer ``api.token``, compared in constant time; no token configured means every request
  is refused (401), never an open endpoint.
- The call is published as a voice ``InboundMessage`` after the answer is sent.
- Two ways in, one behaviour: FastAPI's route (documented in the OpenAPI document; every
  POST and every request out of the ordinary) and ``PbxRoutes.fast_path``, a plain ASGI
  handler for the common request (a GET with the right token and well-formed parameters)
  that skips the framework's per-request machinery, which costs more CPU than the
  decision itself. Whatever the fast path is not sure of, it leaves to FastAPI, so errors
  are always FastAPI's own answers.
"""

import hmac
import json
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Receive, Scope, Send

from connectors.calls import MAX_FIELD, CallRecorder, CallRouter, NoDecision, RouteAnswer
from connectors.settings import ApiSettings
from ingest.metrics import Metrics
from ingest.protocols import Decider, InboundSink
from ingest.schema import InboundMessage

PATH = "/v1/route"
PARAMS = ("caller", "called", "call_id", "verstat", "format")
JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"

_bearer = HTTPBearer(auto_error=False, description="api.token")


class PbxRoutes:
    """The route API: ``router`` for FastAPI, ``fast_path`` for the common GET."""

    def __init__(
        self,
        *,
        settings: ApiSettings,
        decider: Decider,
        sink: InboundSink,
        metrics: Metrics,
        region: str,
    ) -> None:
        self._calls = CallRouter(
            decider=decider,
            metrics=metrics,
            region=region,
            default_dial=settings.default_dial,
            decide_timeout=settings.decide_timeout,
        )
        self._recorder = CallRecorder(sink, metrics)
        token = settings.token.get_secret_value().encode() if settings.token else None
        self._token = token
        self._authorization = b"Bearer " + token if token else None
        self.router = self._api_router()

    async def fast_path(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer a plain GET /v1/route; False (nothing sent) for anything else."""
        if scope["path"] != PATH or scope["method"] != "GET" or self._authorization is None:
            return False
        authorization = accept = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"accept" and accept is None:
                accept = value
        if authorization is None or not hmac.compare_digest(authorization, self._authorization):
            return False  # FastAPI answers 401 (or accepts another spelling of the scheme)
        params = _query(scope["query_string"])
        if params is None:
            return False
        caller = (params.get("caller") or "").strip()
        fmt = params.get("format")
        if not caller or fmt not in (None, "json", "text"):
            return False
        message = self._calls.message(
            caller, params.get("called"), params.get("call_id"), params.get("verstat")
        )
        try:
            answer, ms = await self._calls.answer(message)
        except NoDecision as exc:  # FastAPI's answer to HTTPException(503), byte for byte
            body = json.dumps({"detail": str(exc)}, ensure_ascii=False, separators=(",", ":"))
            await _send(send, 503, body.encode(), JSON)
            return True
        text = fmt == "text" or (fmt is None and (accept or b"").startswith(b"text/plain"))
        if text:
            await _send(send, 200, (answer.dial or "").encode(), TEXT)
        else:
            await _send(send, 200, answer.model_dump_json().encode(), JSON)
        await self._after(message, answer, ms)
        return True

    async def _after(self, message: InboundMessage, answer: RouteAnswer, ms: float) -> None:
        """After the answer is sent: record the call, then log the answer. The log line
        waits for the record so that a burst of calls is answered before any of them is
        logged: a PBX waits on the answer, nobody waits on the log."""
        try:
            await self._recorder.record(message)
        finally:
            self._calls.log(message, answer, ms)

    def _api_router(self) -> APIRouter:
        router = APIRouter(tags=["pbx"])
        token = self._token
        calls, after = self._calls, self._after

        async def authorised(  # async: a sync dependency would cost a thread-pool hop per call
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        ) -> None:
            given = credentials.credentials.encode() if credentials else b""
            if token is None or not hmac.compare_digest(given, token):
                raise HTTPException(
                    401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
                )

        async def route(
            request: Request,
            background: BackgroundTasks,
            caller: Annotated[str | None, Query(max_length=MAX_FIELD)] = None,
            called: Annotated[str | None, Query(max_length=MAX_FIELD)] = None,
            call_id: Annotated[str | None, Query(max_length=MAX_FIELD)] = None,
            verstat: Annotated[
                str | None,
                Query(
                    max_length=MAX_FIELD,
                    description="the carrier's STIR/SHAKEN verdict (SIP Identity verstat, "
                    "e.g. TN-Validation-Passed-A); TN-Validation-Failed-* never reaches an agent",
                ),
            ] = None,
            format: Annotated[Literal["json", "text"] | None, Query()] = None,
        ) -> Response:
            params: dict[str, Any] = {
                "caller": caller,
                "called": called,
                "call_id": call_id,
                "verstat": verstat,
                "format": format,
            }
            if request.method == "POST" and _is_form(request):
                form = await request.form()
                for key in params:
                    value = form.get(key)
                    if params[key] is None and isinstance(value, str):
                        params[key] = value[:MAX_FIELD]
            fmt = params["format"]  # issue 17: a form body's format counts too
            if fmt not in (None, "json", "text"):
                raise HTTPException(422, "format must be json or text")
            caller_text = (params["caller"] or "").strip()
            if not caller_text:
                raise HTTPException(400, "missing caller")
            message = calls.message(
                caller_text, params["called"], params["call_id"], params["verstat"]
            )
            try:
                answer, ms = await calls.answer(message)
            except NoDecision as exc:
                raise HTTPException(503, str(exc)) from exc
            background.add_task(after, message, answer, ms)
            accept = request.headers.get("accept", "")
            if fmt == "text" or (fmt is None and accept.startswith("text/plain")):
                return Response(answer.dial or "", media_type="text/plain")
            return Response(answer.model_dump_json(), media_type="application/json")

        for method in ("GET", "POST"):
            router.add_api_route(
                PATH,
                route,
                methods=[method],
                operation_id=f"route_call_{method.lower()}",
                summary="Where to connect a caller",
                description="Parameters in the query string, or for POST also as an "
                "application/x-www-form-urlencoded body. JSON by default; only the dial string "
                "(possibly empty) with `Accept: text/plain` or `format=text`.",
                response_model=RouteAnswer,
                responses={
                    200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                    400: {"description": "missing caller"},
                    401: {"description": "missing or wrong bearer token"},
                    503: {"description": "no decision possible and no api.default_dial"},
                },
                dependencies=[Depends(authorised)],
            )
        return router


async def _send(send: Send, status: int, body: bytes, media: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", media)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _query(raw: bytes) -> dict[str, str] | None:
    """The route's parameters as FastAPI reads them, or None when FastAPI should judge
    them (one given twice, one too long)."""
    found: dict[str, str] = {}
    for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if key not in PARAMS:
            continue
        if key in found or len(value) > MAX_FIELD:
            return None
        found[key] = value
    return found


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
