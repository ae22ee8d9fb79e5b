"""The HTTP app: health, readiness, metrics, body limits, and the embedded uvicorn server."""

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx

from connectors.http import HttpServer, build_app
from connectors.settings import HttpSettings
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.topology import ROUTER_QUEUE
from tests.phone_fixtures import ACCOUNT_SID, PUBLIC_URL, AppFactory, signature


def bare_app(health: Health, metrics: Metrics) -> httpx.AsyncClient:
    app = build_app(health=health, metrics=metrics, http=HttpSettings(max_body=64 * 1024))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_healthz_and_readyz_follow_component_health() -> None:
    """/readyz says why the daemon is not ready; /healthz only that it lives."""
    health = Health()
    health.register("broker")
    async with bare_app(health, Metrics()) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        starting = await client.get("/readyz")
        assert starting.status_code == 503
        assert starting.json()["problems"] == ["broker: starting"]
        health.set("broker", "up")
        assert (await client.get("/readyz")).status_code == 200
        health.draining = True
        draining = await client.get("/readyz")
        assert draining.status_code == 503
        assert draining.json()["problems"][0] == "draining"


async def test_metrics_count_responses_per_endpoint_without_unbounded_labels() -> None:
    """Random paths from strangers never become label values."""
    metrics = Metrics()
    metrics.messages_in.labels("sms").inc()
    async with bare_app(Health(), metrics) as client:
        await client.get("/healthz")
        await client.get("/no/such/path/+905321112233")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'omniroute_messages_in_total{channel="sms"} 1.0' in text
    assert 'omniroute_webhook_responses_total{endpoint="/healthz",status="200"} 1.0' in text
    assert 'omniroute_webhook_responses_total{endpoint="unmatched",status="404"} 1.0' in text
    assert "905321112233" not in text


async def test_oversized_bodies_are_413_by_header_and_by_stream(make_phones: AppFactory) -> None:
    """No body over http.max_body reaches a handler, announced or streamed."""
    phones = await make_phones()
    big = {"MessageSid": "SM1", "AccountSid": ACCOUNT_SID, "From": "+1555", "Body": "x" * 70_000}
    headers = {"X-Twilio-Signature": signature(f"{PUBLIC_URL}/webhooks/twilio/sms", big)}
    declared = await phones.client.post("/webhooks/twilio/sms", data=big, headers=headers)
    assert declared.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"Body=" + b"y" * 8192 + b"&"

    streamed = await phones.client.post(
        "/webhooks/twilio/sms",
        content=chunks(),
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert streamed.status_code == 413
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


async def test_real_uvicorn_server_on_loopback(make_phones: AppFactory) -> None:
    """The app runs on uvicorn inside our loop, on the port it bound, and stops on request."""
    phones = await make_phones()
    server = HttpServer(phones.app, HttpSettings(host="127.0.0.1", port=0), shutdown_timeout=3)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    try:
        async with asyncio.timeout(10):
            await server.started.wait()
        base = f"http://127.0.0.1:{server.port}"
        params = {
            "MessageSid": "SM" + "ab" * 16,
            "AccountSid": ACCOUNT_SID,
            "From": "+905321112233",
        }
        headers = {"X-Twilio-Signature": signature(f"{PUBLIC_URL}/webhooks/twilio/sms", params)}
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200
            response = await client.post("/webhooks/twilio/sms", data=params, headers=headers)
            assert response.status_code == 200
            assert "<Response" in response.text

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(10):
                    yield b"z" * 8192

            big = await client.post(
                "/webhooks/twilio/sms",
                content=chunks(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert big.status_code == 413
        assert await phones.bus.queue_depth(ROUTER_QUEUE) == (1, 0)
        text = phones.metrics.render().decode()
        sms = 'endpoint="/webhooks/twilio/sms"'
        assert f'omniroute_webhook_responses_total{{{sms},status="200"}} 1.0' in text
        assert f'omniroute_webhook_responses_total{{{sms},status="413"}} 1.0' in text
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
    assert task.exception() is None


async def test_connections_to_the_http_port_send_without_nagle_delay() -> None:
    """A response goes out as headers then body; with Nagle's algorithm on, the body waited
    for the client's delayed ACK: 40 ms on every keep-alive webhook and PBX request. asyncio
    turns it off only for sockets that say they are TCP, so the listening socket must."""
    listening = HttpServer(
        lambda *_: None,  # type: ignore[arg-type, return-value]
        HttpSettings(host="127.0.0.1", port=0),
    )._bind()
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = writer.get_extra_info("socket")
        nodelay.set_result(connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=listening)
    try:
        _, client = await asyncio.open_connection("127.0.0.1", listening.getsockname()[1])
        async with asyncio.timeout(5):
            assert await nodelay == 1
        client.close()
    finally:
        server.close()
        await server.wait_closed()
