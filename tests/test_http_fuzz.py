"""Bad input on the HTTP app: whatever a stranger sends gets a documented, bounded answer.

schemathesis generates requests from the app's own OpenAPI document (valid and invalid
ones, Twilio webhooks signed with the test auth token so the fuzzer gets past the
signature check); each is sent in-process (ASGI) to the app wired like the daemon wires it,
over the real broker and a real SQLite directory. No answer may be a 500, and every answer
must be a documented status with a body matching its documented schema. A direct test
adds what a generator from the schema does not produce: garbage, oversized streamed
bodies, wrong content types and invalid UTF-8 on every endpoint.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.settings import HttpSettings, SpoolSettings, TwilioSettings
from ingest.bus import Bus
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.sink import BusSink
from ingest.spool import SpooledSink
from routers.decider import DirectoryDecider
from routers.settings import RoutingSettings
from routers.store.connector_state import DbSeenStore
from tests.phone_fixtures import (
    ACCOUNT_SID,
    API_TOKEN,
    AUTH_TOKEN,
    DEFAULT_DIAL,
    PUBLIC_URL,
    REGION,
    seed_directory,
    signature,
    webhook_app,
)

MAX_BODY = 64 * 1024
QUERY = "?caller=%FF%FE&call_id=%C0"  # invalid UTF-8, percent-encoded
EXAMPLES = 50  # per operation and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
ENDPOINTS = [
    ("POST", "/webhooks/twilio/sms"),
    ("POST", "/webhooks/twilio/voice"),
    ("POST", "/webhooks/twilio/status"),
    ("GET", "/v1/route"),
    ("POST", "/v1/route"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]


@pytest.fixture
async def app(engine: AsyncEngine, bus: Bus, tmp_path: Path) -> Any:
    """The app as the daemon wires it: Twilio webhooks, /v1/route, the spool, health."""
    await seed_directory(engine, tmp_path)
    metrics, health = Metrics(), Health()
    health.register("broker")
    health.set("broker", "up")
    routing = RoutingSettings(default_region=REGION, default_team="t-triage")
    decider = DirectoryDecider(engine, routing)
    seen = DbSeenStore(engine)
    spool = SpooledSink(
        BusSink(bus), tmp_path / "spool", SpoolSettings(publish_timeout=3.0), metrics
    )
    http = HttpSettings(public_url=PUBLIC_URL, port=0, max_body=MAX_BODY)
    twilio = TwilioSettings(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number="+902125550000",
        default_dial=DEFAULT_DIAL,
    )
    return webhook_app(
        twilio=twilio,
        http=http,
        spool=spool,
        seen=seen,
        decider=decider,
        bus=bus,
        metrics=metrics,
        health=health,
    )


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def _operations(app: Any) -> Iterator[Any]:
    schema = schemathesis.openapi.from_dict(app.openapi())
    for result in schema.get_all_operations():
        yield result.ok()


def _sign(path: str, query: dict[str, Any], form: dict[str, Any]) -> str:
    url = PUBLIC_URL + path
    if query:
        url += "?" + str(httpx.QueryParams({k: str(v) for k, v in query.items()}))
    return signature(url, {str(k): str(v) for k, v in form.items()})


async def test_fuzzed_requests_from_the_openapi_document_never_get_500_or_off_schema(
    app: Any, client: httpx.AsyncClient
) -> None:
    """Nothing a stranger sends produces a 500 or an answer the document does not promise."""
    loop = asyncio.get_running_loop()
    statuses: dict[str, set[int]] = {}

    async def send(kwargs: dict[str, Any]) -> httpx.Response:
        return await client.request(**kwargs)

    def exercise(operation: Any, mode: GenerationMode) -> None:
        label = f"{operation.method.upper()} {operation.path}"

        @settings(
            max_examples=EXAMPLES,
            deadline=None,  # the broker's confirm is part of each example; bounded below
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
            kwargs.pop("cookies", None)
            headers = dict(kwargs.get("headers") or {})
            if operation.path.startswith("/webhooks/twilio/") and isinstance(
                kwargs.get("data"), dict
            ):
                # sign what is sent, so the fuzzer reaches the handlers behind the check
                headers["X-Twilio-Signature"] = _sign(
                    operation.path, kwargs.get("params") or {}, kwargs["data"]
                )
            if operation.path == "/v1/route" and case.meta.phase.name.value != "negative":
                headers.setdefault("Authorization", f"Bearer {API_TOKEN}")
            kwargs["headers"] = headers
            request = asyncio.run_coroutine_threadsafe(send(kwargs), loop)
            response = request.result(timeout=15)
            statuses.setdefault(label, set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            # nothing to negate: an operation without parameters or body (/healthz)
            assert mode is GenerationMode.NEGATIVE, label

    async with asyncio.timeout(75):
        for operation in _operations(app):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                await asyncio.to_thread(exercise, operation, mode)
    print(statuses)
    # the fuzzer got past the gates: signed webhooks and authorised routes were answered
    assert 200 in statuses["POST /webhooks/twilio/sms"], statuses
    assert 200 in statuses["GET /v1/route"], statuses
    assert all(500 not in codes for codes in statuses.values())


def _starlette_form(body: bytes) -> dict[str, str]:
    """The form as starlette reads a urlencoded body (latin-1, then percent-decoding)."""
    form: dict[str, str] = {}
    for pair in body.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        form[unquote_plus(name.decode("latin-1"))] = unquote_plus(value.decode("latin-1"))
    return form


def _garbage_bodies() -> list[tuple[str, bytes]]:
    return [
        ("application/x-www-form-urlencoded", b"\xff\xfe\x00garbage=%%%&&=="),
        ("application/x-www-form-urlencoded", b"From=%FF%FE%C3&MessageSid=%C0%AF&CallSid=%ED%A0"),
        ("application/x-www-form-urlencoded", b"From=\xc3\x28&MessageSid=SM\xa0\xa1&CallSid=\xf0"),
        ("application/json", b'{"From": "+905321112233", "MessageSid": "SM1"}'),
        ("multipart/form-data; boundary=zzz", b"--zzz\r\nnot a part\r\n--zzz--"),
        ("multipart/form-data", b"no boundary at all"),
        ("text/plain; charset=utf-8", b"From=+90 532 111 22 33"),
        ("application/x-www-form-urlencoded; charset=x-unknown", b"From=%2B1&MessageSid=SM2"),
        ("", b"\x00" * 100),
    ]


async def test_garbage_wrong_types_and_invalid_utf8_never_get_500(
    client: httpx.AsyncClient,
) -> None:
    """Unsigned, signed-but-malformed, unauthorised and authorised garbage: no crash."""
    seen: dict[tuple[str, str], set[int]] = {}
    for method, path in ENDPOINTS:
        for content_type, body in _garbage_bodies():
            variants: list[dict[str, str]] = [{}]
            if path.startswith("/webhooks/twilio/"):
                sig = signature(PUBLIC_URL + path + QUERY, _starlette_form(body))
                variants.append({"X-Twilio-Signature": sig})
            if path == "/v1/route":
                variants.append({"Authorization": f"Bearer {API_TOKEN}"})
            for extra in variants:
                headers = {**extra, "Content-Type": content_type} if content_type else extra
                response = await client.request(method, path + QUERY, content=body, headers=headers)
                seen.setdefault((method, path), set()).add(response.status_code)
                assert response.status_code < 500 or response.status_code == 503, (
                    method,
                    path,
                    content_type,
                    body,
                    response.status_code,
                    response.text,
                )
    # the signed invalid-UTF-8 SMS got past the signature check and was answered
    assert seen[("POST", "/webhooks/twilio/sms")] & {200, 400}, seen
    assert 403 in seen[("POST", "/webhooks/twilio/sms")], seen
    assert 401 in seen[("GET", "/v1/route")], seen


async def test_oversized_bodies_are_413_on_every_endpoint_announced_or_chunked(
    client: httpx.AsyncClient,
) -> None:
    """No body over 64 KiB reaches a handler, with or without Content-Length."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):  # 80 KiB in 8 KiB chunks, no Content-Length
            yield b"Body=" + b"y" * 8192 + b"&"

    for method, path in ENDPOINTS:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Authorization": f"Bearer {API_TOKEN}",
            "X-Twilio-Signature": "forged",
        }
        announced = await client.request(
            method, path, content=b"x" * (MAX_BODY + 1), headers=headers
        )
        assert announced.status_code == 413, (method, path, announced.status_code)
        streamed = await client.request(method, path, content=chunks(), headers=headers)
        assert "content-length" not in streamed.request.headers
        # an endpoint that never reads its body may answer before the limit is reached
        # (GET: health, metrics, /v1/route); any endpoint that reads it stops at the limit
        if method == "POST":
            assert streamed.status_code == 413, (method, path, streamed.status_code)
        else:
            assert streamed.status_code in (200, 400, 413), (method, path, streamed.status_code)
